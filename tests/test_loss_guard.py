"""NonFiniteLossGuard: an injected NaN stops the run naming the iteration and the term, or the step is skipped."""

from __future__ import annotations

import copy

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from torch import nn

from medcl.workflows import NonFiniteLossError, NonFiniteLossGuard, PretrainTrainer


class _NaNAt:
    """A step with two terms; ``loss_label`` is NaN at the given iterations."""

    def __init__(self, bad: set[int]):
        self.bad, self.calls = bad, 0

    def __call__(self, network, batch):
        self.calls += 1
        out = network(batch["image"])
        recon = out.pow(2).mean()
        label = out.mean() * (float("nan") if self.calls in self.bad else 1.0)
        return {"loss": recon + label, "loss_recon": recon.detach(), "loss_label": label.detach()}


def _trainer(step, iterations: int, handler) -> tuple[PretrainTrainer, nn.Module, list]:
    torch.manual_seed(0)
    net = nn.Conv2d(1, 2, 1)
    data = [{"image": torch.randn(2, 1, 4, 4)} for _ in range(iterations)]
    trainer = PretrainTrainer(device="cpu", max_epochs=1, train_data_loader=data, network=net,
                              optimizer=torch.optim.Adam(net.parameters(), lr=0.1), loss_function=step,
                              train_handlers=[handler])
    snapshots = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: snapshots.append(copy.deepcopy(net.state_dict())))
    return trainer, net, snapshots


def test_stop_names_the_iteration_and_the_term():
    trainer, net, snaps = _trainer(_NaNAt({3}), 5, NonFiniteLossGuard())
    with pytest.raises(NonFiniteLossError, match=r"iteration 3 \(epoch 1\): loss = nan, loss_label = nan .*loss_recon"):
        trainer.run()
    assert len(snaps) == 2  # stopped before the third optimizer step
    for k, v in net.state_dict().items():
        assert torch.equal(v, snaps[-1][k])  # the weights of the last finite step


def test_skip_leaves_weights_and_optimizer_state_unchanged():
    guard = NonFiniteLossGuard(mode="skip")
    trainer, net, snaps = _trainer(_NaNAt({3}), 5, guard)
    trainer.run()
    assert len(snaps) == 5 and guard.total_skipped == 1
    for k in snaps[1]:
        assert torch.equal(snaps[2][k], snaps[1][k])  # iteration 3 changed nothing
        assert not torch.equal(snaps[3][k], snaps[2][k])  # training goes on
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())


def test_skip_stops_after_too_many_in_a_row():
    trainer, _, snaps = _trainer(_NaNAt({2, 3, 4}), 5, NonFiniteLossGuard(mode="skip", max_skips=2))
    with pytest.raises(NonFiniteLossError, match="iteration 4 .* after 2 skipped steps in a row"):
        trainer.run()


def test_supervised_trainer_total_loss():
    torch.manual_seed(0)
    net = nn.Conv2d(1, 2, 1)
    data = [{"image": torch.randn(2, 1, 4, 4), "label": torch.zeros(2, 1, 4, 4)} for _ in range(3)]
    calls = []

    def loss(pred, label):
        calls.append(1)
        return pred.mean() * (float("inf") if len(calls) == 2 else 1.0)

    trainer = SupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=data, network=net,
                                optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=loss,
                                train_handlers=[NonFiniteLossGuard()])
    with pytest.raises(NonFiniteLossError, match=r"iteration 2 \(epoch 1\): loss = (-)?inf"):
        trainer.run()


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        NonFiniteLossGuard(mode="ignore")
