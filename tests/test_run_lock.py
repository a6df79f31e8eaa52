"""One run per checkpoint folder: RunDirLock on its own, and two real bundle runs on one folder."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
from conftest import BUNDLES, REPO, run_bundle

from medcl.errors import MedclInputError
from medcl.handlers.run_lock import LOCK_FILE, RunDirLock


def _hold(directory, pid, host=None, job=None):
    os.makedirs(directory, exist_ok=True)
    record = {"pid": pid, "host": host or os.uname().nodename, "job": job, "started": "then", "command": "train"}
    (directory / LOCK_FILE).write_text(json.dumps(record))


def test_a_live_run_holds_the_folder(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _hold(tmp_path, other.pid)
        with pytest.raises(MedclInputError, match=rf"another run \(pid {other.pid}, started then: train\)"):
            RunDirLock(tmp_path).acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == other.pid  # untouched
    finally:
        other.kill()
        other.wait()


def test_a_dead_runs_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _hold(tmp_path, dead.pid)
    lock = RunDirLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert "no longer alive" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    RunDirLock(tmp_path).acquire()  # the same owner again (e.g. another handler of this run): allowed
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_run_on_another_host_is_refused_with_how_to_clear_it(tmp_path):
    _hold(tmp_path, 1, host="gpu-node-7")
    with pytest.raises(MedclInputError, match=r"on host gpu-node-7.*delete .*\.medcl_run\.lock"):
        RunDirLock(tmp_path).acquire()


def test_torchrun_ranks_share_the_agents_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    _hold(tmp_path, os.getppid())  # rank 0 took it for the agent (this process's parent)
    lock = RunDirLock(tmp_path)
    lock.acquire()
    assert lock.held


def test_nodes_of_one_torchrun_job_share_a_lock_on_a_shared_folder(tmp_path, monkeypatch):
    """Multi-node: the node that took the lock is another host and agent; the job (rendezvous id and master) is one."""
    for key, value in {"TORCHELASTIC_RUN_ID": "job7", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    _hold(tmp_path, 4242, host="gpu-node-1", job="job7@10.0.0.1:29500")
    lock = RunDirLock(tmp_path)
    lock.acquire()
    assert lock.held
    monkeypatch.setenv("MASTER_PORT", "29501")  # another job that reuses the rendezvous id
    with pytest.raises(MedclInputError, match=r"on host gpu-node-1"):
        RunDirLock(tmp_path).acquire()


@pytest.mark.slow
def test_second_bundle_run_on_the_same_folder_is_refused(phantom_dir, tmp_path):
    configs = BUNDLES / "scratch_baseline" / "configs"
    args = ["--bundle_root", str(tmp_path), "--dataset_dir", str(phantom_dir), "--patch_size", "32"]
    args += ["--spatial_dims", "2", "--num_workers", "0", "--max_epochs", "40", "--epoch_length", "2"]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "train.json"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / "models" / LOCK_FILE
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert lock.exists(), "the first run never took the lock"
    second = run_bundle([configs / "train.json"], *args)
    out, _ = first.communicate(timeout=600)
    assert second.returncode != 0
    assert second.stdout.count("MedclInputError: ") == 1 and "Traceback" not in second.stdout, second.stdout[-3000:]
    assert f"another run (pid {first.pid}" in second.stdout
    assert first.returncode == 0, out[-3000:]  # the first run was not disturbed
    assert (tmp_path / "models" / "model_final.pt").is_file() and not lock.exists()  # released at the end
