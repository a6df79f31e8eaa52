"""The scratch-baseline bundle run for real: ``python -m monai.bundle run`` in subprocesses on a 32³ phantom."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLES, REPO, run_bundle

from medcl.handlers import read_learning_curve

CONFIGS = BUNDLES / "scratch_baseline" / "configs"
TINY = [
    "--patch_size",
    "32",
    "--max_epochs",
    "1",
    "--epoch_length",
    "2",
    "--val_interval",
    "1",
    "--num_workers",
    "0",
    "--batch_size",
    "1",
    "--samples_per_volume",
    "2",
]

pytestmark = pytest.mark.slow


def _overrides(phantom_dir, root, *extra):
    return ["--bundle_root", str(root), "--dataset_dir", str(phantom_dir), *TINY, *extra]


def _assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:]


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_train_then_infer_writes_prediction_on_input_grid(phantom_dir, tmp_path, spatial_dims):
    dims = ["--spatial_dims", str(spatial_dims)]
    proc = run_bundle([CONFIGS / "train.json"], *_overrides(phantom_dir, tmp_path, *dims, "--label_fraction", "0.2"))
    _assert_ok(proc)
    assert "Epoch: 1/1, Iter: 2/2" in proc.stdout  # per-iteration progress
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "model_final.pt").is_file()
    (curve,) = read_learning_curve(tmp_path / "models" / "learning_curve.csv")
    assert (curve["epoch"], curve["iteration"]) == (1, 2) and curve["best_val_mean_dice"] == curve["val_mean_dice"]

    out = tmp_path / "pred"
    proc = run_bundle(
        [CONFIGS / "inference.json"],
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(phantom_dir),
        "--output_dir",
        str(out),
        "--patch_size",
        "32",
        "--num_workers",
        "0",
        *dims,
    )
    _assert_ok(proc)
    src = next((phantom_dir / "imagesTs").glob("*.nii.gz"))
    pred = nib.load(str(out / src.name.replace(".nii.gz", "_seg.nii.gz")))
    image = nib.load(str(src))
    assert pred.shape == image.shape
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
    values = np.unique(np.asarray(pred.dataobj))
    assert set(values.tolist()) <= set(range(5)) and values.dtype == np.uint8


def test_evaluate_writes_metrics(phantom_dir, tmp_path):
    _assert_ok(run_bundle([CONFIGS / "train.json"], *_overrides(phantom_dir, tmp_path)))
    proc = run_bundle([CONFIGS / "train.json", CONFIGS / "evaluate.json"], *_overrides(phantom_dir, tmp_path))
    _assert_ok(proc)
    metrics = dict(line.split(",", 1) for line in (tmp_path / "eval" / "metrics.csv").read_text().splitlines())
    assert 0.0 <= float(metrics["val_mean_dice"]) <= 1.0
    rows = (tmp_path / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header + the two validation volumes


def test_mlflow_tracking_logs_metrics(phantom_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_bundle(
        [CONFIGS / "train.json"], *_overrides(phantom_dir, tmp_path, "--output_dir", str(out)), "--tracking", "mlflow"
    )
    _assert_ok(proc)
    db = out / "mlruns.db"
    assert db.is_file(), "MLflow 3 with MONAI 1.6 writes a SQLite store at <output_dir>/mlruns.db"
    with sqlite3.connect(db) as con:
        keys = {k for (k,) in con.execute("select distinct key from metrics")}
    assert {"train_loss", "val_mean_dice"} <= keys


def test_torchrun_two_cpu_processes(phantom_dir, tmp_path):
    proc = run_bundle(
        [CONFIGS / "train.json", CONFIGS / "multi_gpu_train.json"], *_overrides(phantom_dir, tmp_path), torchrun=2
    )
    _assert_ok(proc)
    assert (tmp_path / "models" / "model_final.pt").is_file()
    # each rank keeps its own run state (random streams differ per rank) and resumes from it
    assert (tmp_path / "models" / "run_state.pt").is_file() and (tmp_path / "models" / "run_state_rank1.pt").is_file()
    proc = run_bundle(
        [CONFIGS / "train.json", CONFIGS / "multi_gpu_train.json"],
        *_overrides(phantom_dir, tmp_path),
        "--resume",
        "true",
        "--max_epochs",
        "2",
        torchrun=2,
    )
    _assert_ok(proc)
    assert proc.stdout.count("resumed from") == 2 and "run_state_rank1.pt: epoch 1" in proc.stdout
    assert "Epoch[2] Complete" in proc.stdout and "Epoch[1] Complete" not in proc.stdout
    # rank 0 alone writes the learning curve, and the resumed run continues it
    assert [r["epoch"] for r in read_learning_curve(tmp_path / "models" / "learning_curve.csv")] == [1, 2]


def test_two_nodes_on_loopback_one_shared_folder(phantom_dir, tmp_path):
    """The multi-node command of docs/torchrun.md, two "nodes" of one process each on this host (c10d rendezvous):
    one job, one checkpoint folder, the same configs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    launcher += [
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=medcl-test",
        "--local_addr=127.0.0.1",
    ]
    configs = repr([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    cmd = [*launcher, "-m", "monai.bundle", "run", "--config_file", configs, *_overrides(phantom_dir, tmp_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    nodes = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, out in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-4000:]
    models = tmp_path / "models"
    assert (models / "model_final.pt").is_file() and (models / "run_state_rank1.pt").is_file()
    assert not (models / ".medcl_run.lock").exists()  # rank 0 released the job's lock


def test_missing_dataset_names_the_command_that_creates_it(tmp_path):
    proc = run_bundle([CONFIGS / "train.json"], "--bundle_root", str(tmp_path), "--dataset_dir", str(tmp_path / "none"))
    assert proc.returncode != 0
    assert "dataset.json not found" in proc.stdout and "medcl-phantom --out" in proc.stdout


def test_inference_without_checkpoint_says_how_to_make_one(phantom_dir, tmp_path):
    proc = run_bundle([CONFIGS / "inference.json"], "--bundle_root", str(tmp_path), "--dataset_dir", str(phantom_dir))
    assert proc.returncode != 0
    assert "model.pt: checkpoint not found" in proc.stdout


def test_misspelt_override_fails_before_training(phantom_dir, tmp_path):
    proc = run_bundle([CONFIGS / "train.json"], *_overrides(phantom_dir, tmp_path), "--max_epoch", "3")
    assert proc.returncode != 0
    assert "--max_epoch: no such key" in proc.stdout and "--max_epochs" in proc.stdout
    assert not (tmp_path / "models" / "model_final.pt").exists()
