"""TermGradNormHandler: per-term gradient norms on the shared parameters, once per epoch, without changing training."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from medcl.engines import PretrainTrainer
from medcl.handlers import TermGradNormHandler


class TwoHeads(nn.Module):
    """A shared trunk and two heads: term "a" reaches trunk + head_a, term "b" trunk + head_b."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.head_a = nn.Linear(6, 1)
        self.head_b = nn.Linear(6, 1)


class Step:
    term_weights = {"loss_a": 1.0, "loss_b": 0.25}

    def __call__(self, network: TwoHeads, batch):
        h = torch.tanh(network.trunk(batch["x"]))
        a = network.head_a(h).pow(2).mean()
        b = (network.head_b(h) - 1).pow(2).mean()
        return {"loss": a + 0.25 * b, "loss_a": a, "loss_b": b}


def _trainer(network, handlers, max_epochs=2, epoch_length=3):
    torch.manual_seed(0)
    data = [{"x": torch.randn(5, 4)} for _ in range(epoch_length)]
    return PretrainTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=data,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        loss_function=Step(),
        epoch_length=epoch_length,
        train_handlers=handlers,
    )


def _manual_norm(network, batch, key, weight):
    terms = Step()(network, batch)
    grads = torch.autograd.grad(terms[key] * weight, list(network.trunk.parameters()))
    return float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))


def test_norms_are_the_weighted_terms_gradients_on_the_shared_trunk(caplog):
    torch.manual_seed(0)
    net = TwoHeads()
    handler = TermGradNormHandler()
    batch = {"x": torch.randn(5, 4)}
    terms = Step()(net, batch)
    norms = handler.compute(net, terms, Step.term_weights)
    assert set(norms) == {"grad_norm_a", "grad_norm_b"}
    assert norms["grad_norm_a"] == pytest.approx(_manual_norm(net, batch, "loss_a", 1.0), rel=1e-6)
    assert norms["grad_norm_b"] == pytest.approx(_manual_norm(net, batch, "loss_b", 0.25), rel=1e-6)
    # on every parameter instead (prefixes): head_a's gradient now counts for term a
    all_norms = TermGradNormHandler(param_prefixes=["trunk", "head_a", "head_b"]).compute(net, terms)
    assert all_norms["grad_norm_a"] > _manual_norm(net, batch, "loss_a", 1.0)


def test_logged_once_per_epoch_into_metrics_and_training_unchanged(caplog):
    torch.manual_seed(1)
    plain, measured = TwoHeads(), TwoHeads()
    measured.load_state_dict(plain.state_dict())
    _trainer(plain, []).run()
    handler = TermGradNormHandler()
    trainer = _trainer(measured, [handler])
    with caplog.at_level(logging.INFO, logger="medcl.handlers.grad_norms"):
        trainer.run()
    lines = [r.getMessage() for r in caplog.records if "gradient norms" in r.getMessage()]
    assert len(lines) == 2 and lines[0].startswith("epoch 1 ") and lines[1].startswith("epoch 2 ")
    assert {"grad_norm_a", "grad_norm_b"} <= set(trainer.state.metrics)
    for k, v in plain.state_dict().items():  # the extra backward passes leave the weights bit-identical
        assert torch.equal(v, measured.state_dict()[k]), k


def test_interval_zero_is_off_and_negative_is_refused():
    net = TwoHeads()
    trainer = _trainer(net, [TermGradNormHandler(interval=0)], max_epochs=1)
    trainer.run()
    assert not any(k.startswith("grad_norm_") for k in trainer.state.metrics)
    with pytest.raises(ValueError, match="interval"):
        TermGradNormHandler(interval=-1)


def test_detached_terms_are_skipped():
    net = TwoHeads()
    terms = Step()(net, {"x": torch.randn(5, 4)})
    terms["loss_b"] = terms["loss_b"].detach()
    norms = TermGradNormHandler(param_prefixes=["trunk"]).compute(net, terms)
    assert set(norms) == {"grad_norm_a"}
