"""RunStateHandler in-process: what a resume loads, extends and refuses (tiny network, no files but the state)."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.transforms import Compose, RandGaussianNoised

from medcl.errors import MedclInputError
from medcl.handlers import AtomicCheckpointSaver, RunStateHandler


def _trainer(save_dir, resume: bool, max_epochs: int, objects=("network", "optimizer")):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    data = Dataset(
        [{"image": torch.randn(4), "label": torch.randn(2)} for _ in range(4)],
        transform=Compose([RandGaussianNoised(keys="image", prob=1.0)]),
    )
    saver = AtomicCheckpointSaver(str(save_dir), {"model": net}, save_final=True, final_filename="final.pt")
    pool = {"network": net, "optimizer": opt, "checkpoint_saver": saver}
    handler = RunStateHandler(str(save_dir), {k: pool[k] for k in objects}, resume=resume)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        epoch_length=2,
        train_data_loader=DataLoader(data, batch_size=2, shuffle=True, num_workers=0),
        network=net,
        optimizer=opt,
        loss_function=torch.nn.MSELoss(),
        train_handlers=[saver, handler],
    )
    return trainer, net


def test_resume_continues_and_extends_a_finished_run(tmp_path, caplog):
    straight, net_a = _trainer(tmp_path / "a", resume=False, max_epochs=4)
    straight.run()
    first, _ = _trainer(tmp_path / "b", resume=False, max_epochs=2)
    first.run()
    assert torch.load(tmp_path / "b" / "run_state.pt", weights_only=True)["epoch"] == 2
    resumed, net_b = _trainer(tmp_path / "b", resume=True, max_epochs=4)  # a longer max_epochs extends the run
    with caplog.at_level(logging.INFO, logger="medcl.handlers.run_state"):
        resumed.run()
    assert "epoch 2, iteration 4 of 4 epochs" in caplog.text
    assert resumed.state.epoch == 4 and resumed.state.iteration == 8
    for a, b in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_without_a_state_starts_afresh(tmp_path, caplog):
    trainer, _ = _trainer(tmp_path, resume=True, max_epochs=1)
    with caplog.at_level(logging.INFO, logger="medcl.handlers.run_state"):
        trainer.run()
    assert "no run state" in caplog.text and trainer.state.epoch == 1


def test_state_of_another_config_is_refused(tmp_path):
    _trainer(tmp_path, resume=False, max_epochs=1)[0].run()
    trainer, _ = _trainer(tmp_path, resume=True, max_epochs=2, objects=("network", "optimizer", "checkpoint_saver"))
    with pytest.raises(MedclInputError, match="saved by another config.*--resume false"):
        trainer.run()


def test_unreadable_state_is_named(tmp_path):
    (tmp_path / "run_state.pt").write_bytes(b"not a torch file")
    trainer, _ = _trainer(tmp_path, resume=True, max_epochs=1)
    with pytest.raises(MedclInputError, match="run_state.pt: the run state cannot be read"):
        trainer.run()


def test_no_temporary_files_are_left(tmp_path):
    _trainer(tmp_path, resume=False, max_epochs=2)[0].run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt", "run_state.pt"]
