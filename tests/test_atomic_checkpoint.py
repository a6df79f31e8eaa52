"""A run killed (SIGKILL) in the middle of writing a checkpoint leaves the previous one intact, never a truncated
file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

# A training process that saves a checkpoint every epoch; from epoch 2 on, torch.save writes half of the file,
# touches <dir>/saving and sleeps, so the test can kill it mid-write.
CHILD = textwrap.dedent("""
    import os, sys, time, io, torch
    from ignite.engine import Engine
    from medcl.handlers import AtomicCheckpointSaver
    from monai.handlers import CheckpointSaver

    out, atomic = sys.argv[1], sys.argv[2] == "atomic"
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64)
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        if engine.state.epoch >= 2:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            fh = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
            fh.write(data[: len(data) // 2]); fh.flush()
            open(os.path.join(out, "saving"), "w").close()
            time.sleep(60)
        return real_save(obj, f, *args, **kwargs)

    torch.save = slow_save
    engine = Engine(lambda e, b: net.weight.data.add_(1.0))
    saver = (AtomicCheckpointSaver if atomic else CheckpointSaver)(out, {"model": net}, save_interval=1, n_saved=1)
    saver.attach(engine)
    engine.run([0], max_epochs=3)
""")


def _kill_during_second_save(tmp_path, mode: str):
    out = tmp_path / mode
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out), mode])
    try:
        for _ in range(600):
            if (out / "saving").exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert (out / "saving").exists(), "the child never reached the second save"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return sorted(p for p in out.iterdir() if p.suffix == ".pt")


def _loads(path) -> bool:
    try:
        torch.load(path, weights_only=True)
        return True
    except Exception:
        return False


def test_atomic_saver_keeps_the_previous_checkpoint(tmp_path):
    files = _kill_during_second_save(tmp_path, "atomic")
    assert [p.name for p in files] == ["model_epoch=1.pt"]  # epoch 2 never appeared under its name
    state = torch.load(files[0], weights_only=True)
    torch.manual_seed(0)
    expected = torch.nn.Linear(64, 64).weight + 1.0  # the weights after epoch 1
    torch.testing.assert_close(state["weight"], expected)


def test_monai_saver_alone_leaves_a_truncated_file(tmp_path):
    """What the atomic saver prevents (MONAI's own CheckpointSaver writes in place)."""
    files = _kill_during_second_save(tmp_path, "plain")
    assert "model_epoch=2.pt" in [p.name for p in files]
    assert not _loads(tmp_path / "plain" / "model_epoch=2.pt")


def test_fixed_file_name_is_replaced_not_removed(tmp_path):
    """MONAI's key-metric file (model.pt): Ignite's remove-then-save order must not delete the file being replaced."""
    from medcl.handlers import AtomicCheckpointSaver

    net = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_filename="model.pt")
    handler = saver._key_metric_checkpoint.save_handler
    handler({"model": {"w": torch.zeros(1)}}, "model_key_metric=0.1.pt")
    handler.remove("model_key_metric=0.1.pt")  # what Ignite does first for a new best
    assert torch.load(tmp_path / "model.pt", weights_only=True)["model"]["w"].item() == 0.0  # still there
    handler({"model": {"w": torch.ones(1)}}, "model_key_metric=0.2.pt")
    assert torch.load(tmp_path / "model.pt", weights_only=True)["model"]["w"].item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
