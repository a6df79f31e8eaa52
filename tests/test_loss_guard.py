"""NonFiniteLossGuard: an injected NaN stops the run naming the iteration and the term, or the step is skipped."""

from __future__ import annotations

import copy

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from torch import nn

from medcl.engines import PretrainTrainer
from medcl.handlers import NonFiniteLossError, NonFiniteLossGuard


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


def _trainer(step, iterations: int, *handlers) -> tuple[PretrainTrainer, nn.Module, list]:
    torch.manual_seed(0)
    net = nn.Conv2d(1, 2, 1)
    data = [{"image": torch.randn(2, 1, 4, 4)} for _ in range(iterations)]
    trainer = PretrainTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=0.1),
        loss_function=step,
        train_handlers=list(handlers),
    )
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

    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=loss,
        train_handlers=[NonFiniteLossGuard()],
    )
    with pytest.raises(NonFiniteLossError, match=r"iteration 2 \(epoch 1\): loss = (-)?inf"):
        trainer.run()


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        NonFiniteLossGuard(mode="ignore")


@pytest.mark.parametrize("nan_at", [3, 1])
def test_final_checkpoint_on_a_stop_holds_the_last_finite_weights(tmp_path, nan_at):
    """A stop after some training saves the last finite weights as the final checkpoint; a stop before any step
    saves nothing (the bundles put the saver first among the handlers: the first EXCEPTION_RAISED handler re-raises
    and ends the others)."""
    from medcl.handlers import AtomicCheckpointSaver

    trainer, net, snaps = _trainer(_NaNAt({nan_at}), 5, NonFiniteLossGuard())
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_final=True, final_filename="final.pt").attach(trainer)
    with pytest.raises(NonFiniteLossError):
        trainer.run()
    if nan_at == 1:
        assert not (tmp_path / "final.pt").exists()
        return
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    for k, v in snaps[-1].items():
        assert torch.equal(final[k], v)


@pytest.mark.slow
def test_bundle_run_stops_on_an_injected_nan_with_one_message(tmp_path):
    """A real ``monai.bundle run``: one good epoch, then ``--resume true`` with the Dice smoothing set to NaN, so the
    loss is NaN at the next iteration. The run stops naming it, the message is the last thing printed (no traceback),
    and the checkpoints of the good epoch are untouched (nothing was trained since)."""
    from conftest import BUNDLES, run_bundle

    from medcl.data.phantom import generate_dataset

    generate_dataset(str(tmp_path / "data"), n=5, n_test=0, seed=0, shape=(32, 32, 32))
    configs = [BUNDLES / "scratch_baseline" / "configs" / "train.json"]
    common = [
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(tmp_path / "data"),
        "--patch_size",
        "32",
        "--epoch_length",
        "2",
        "--num_workers",
        "0",
        "--batch_size",
        "1",
        "--val_interval",
        "1",
    ]
    proc = run_bundle(configs, *common, "--max_epochs", "1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    models = tmp_path / "models"
    before = {p.name: p.read_bytes() for p in models.glob("*.pt")}
    assert set(before) == {"model.pt", "model_final.pt", "run_state.pt"}

    proc = run_bundle(configs, *common, "--max_epochs", "2", "--resume", "true", "--loss#smooth_nr", "$float('nan')")
    assert proc.returncode != 0
    last = proc.stdout.strip().splitlines()[-2]
    assert last.startswith(
        "medcl.handlers.loss_guard.NonFiniteLossError: non-finite loss at iteration 3 (epoch 2): loss = nan"
    ), last
    assert "--resume true" in last and "Traceback" not in proc.stdout
    assert {p.name: p.read_bytes() for p in models.glob("*.pt")} == before
