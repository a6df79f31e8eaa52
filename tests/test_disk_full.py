"""A disk that fills during a save (ENOSPC injected into the writer): the previous file stays intact and readable,
no temporary file remains, and the run stops with one message naming the folder and the space."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from medcl.benchmark.cli import _write_json
from medcl.data.splits import record_split
from medcl.handlers import AtomicCheckpointSaver, RunStateHandler
from medcl.inferers.pseudo_labeler import _write_json_atomic
from medcl.utils.atomic import DiskFullError, atomic_write

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _half_then_full(path_or_file, *_, **__):
    """A writer that gets half-way, then finds the disk full."""
    if isinstance(path_or_file, (str, Path)):
        Path(path_or_file).write_bytes(b"x" * 1000)
    else:
        path_or_file.write(b"x" * 1000)
    raise ENOSPC


def _torch_save_full(obj, f, *args, **kwargs):
    _half_then_full(f)


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_atomic_write_keeps_the_previous_file_and_names_the_folder(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous")
    with pytest.raises(DiskFullError) as info:
        atomic_write(target, _half_then_full)
    assert target.read_bytes() == b"previous" and _leftovers(tmp_path, {"model.pt"}) == []
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path}: the disk is full while writing model.pt (")
    assert "MiB free; it needs at least" in msg and "--resume true" in msg
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC


def test_other_errors_pass_through_and_leave_nothing(tmp_path):
    def broken(tmp):
        Path(tmp).write_text("partial")
        raise PermissionError(errno.EACCES, "denied")

    with pytest.raises(PermissionError):
        atomic_write(tmp_path / "a.json", broken)
    assert _leftovers(tmp_path, set()) == []


def _engine():
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs, engine.state.epoch, engine.state.iteration = 1, 1, 1
    return engine


def test_run_state_write_on_a_full_disk(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 2)
    handler = RunStateHandler(str(tmp_path), {"network": net}, lock=False)
    handler.save(_engine())
    before = (tmp_path / "run_state.pt").read_bytes()
    monkeypatch.setattr(torch, "save", _torch_save_full)
    with torch.no_grad():
        net.weight.add_(1.0)
    with pytest.raises(DiskFullError, match="run_state.pt"):
        handler.save(_engine())
    assert (tmp_path / "run_state.pt").read_bytes() == before and _leftovers(tmp_path, {"run_state.pt"}) == []
    monkeypatch.undo()
    torch.load(tmp_path / "run_state.pt", weights_only=False)  # still readable


def test_checkpoint_saver_on_a_full_disk_stops_without_a_final_save(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_final=True, final_filename="model_final.pt")
    first = Engine(lambda e, b: None)
    saver.attach(first)
    first.run([0], max_epochs=1)
    before = (tmp_path / "model_final.pt").read_bytes()

    saver = AtomicCheckpointSaver(
        str(tmp_path), {"model": net}, save_interval=1, n_saved=1, save_final=True, final_filename="model_final.pt"
    )
    second = Engine(lambda e, b: None)
    saver.attach(second)
    monkeypatch.setattr(torch, "save", _torch_save_full)
    with pytest.raises(DiskFullError, match=rf"{tmp_path}: the disk is full while writing model_epoch=1.pt"):
        second.run([0], max_epochs=1)
    monkeypatch.undo()
    assert (tmp_path / "model_final.pt").read_bytes() == before  # no final save attempted over it
    assert _leftovers(tmp_path, {"model_final.pt"}) == []


@pytest.mark.parametrize(
    "write",
    [
        lambda p: _write_json_atomic(str(p), {"round": 2}),  # pseudo-label round records
        lambda p: _write_json(p, {"mean_dice": 0.5}),  # benchmark cell.json / done.json
        lambda p: record_split({"test": [], "val": [{"image": "/a/case_1.nii.gz"}]}, str(p)),  # models/split.json
    ],
    ids=["pseudo_labels", "benchmark", "split"],
)
def test_json_writers_on_a_full_disk(tmp_path, monkeypatch, write):
    target = tmp_path / "record.json"
    target.write_text('{"previous": true}')
    monkeypatch.setattr(json, "dump", lambda obj, f, **kw: _half_then_full(f.buffer if hasattr(f, "buffer") else f))
    with pytest.raises(DiskFullError, match="record.json"):
        write(target)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"previous": True} and _leftovers(tmp_path, {"record.json"}) == []
    write(target)  # and a normal write still works
    assert json.loads(target.read_text()) != {"previous": True}
