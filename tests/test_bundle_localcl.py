"""The local-contrastive self-training bundle run for real: baseline -> 2 pseudo-label rounds -> evaluate ->
inference."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLES, assert_segmentation_of, run_bundle

CONFIGS = BUNDLES / "localcl_selftrain" / "configs"
TINY = [
    "--patch_size",
    "32",
    "--round_epochs",
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


def _assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:]


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory):
    """One labelled volume (of the 6 training cases), 2 self-training rounds: (bundle_root, completed process)."""
    root = tmp_path_factory.mktemp("localcl")
    proc = run_bundle(
        [CONFIGS / "train.json"],
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(phantom_dir),
        *TINY,
        "--num_labelled",
        "1",
        "--num_rounds",
        "2",
        "--max_epochs",
        "3",
    )
    _assert_ok(proc)
    return root, proc


def test_pipeline_runs_baseline_then_rounds(trained, phantom_dir):
    root, proc = trained
    assert "Epoch[3] Complete" in proc.stdout and "Epoch[4] Complete" not in proc.stdout  # 1 baseline + 2 rounds
    for r in (1, 2):
        assert f"round {r}: pseudo-label Dice" in proc.stdout
    log = json.loads((root / "models" / "pseudo_labels" / "rounds.json").read_text())
    assert [e["round"] for e in log] == [1, 2]
    assert all(e["num_volumes"] == 5 and e["num_scored"] == 5 for e in log)  # 6 training cases - 1 labelled
    assert all(e["checkpoint"].endswith("model.pt") for e in log)  # labelled by the best-validation model
    # the baseline epoch trains on the labelled volume only (no local loss), the rounds add the local loss
    epochs = [line for line in proc.stdout.splitlines() if "Metrics -- " in line and "loss_local: " in line]
    local = [float(line.split("loss_local: ")[1].split()[0]) for line in epochs]
    assert local[0] == 0.0 and all(v > 0 for v in local[1:]), local
    # per-term gradient norms on the shared backbone: seg alone in the baseline, seg and local in the rounds
    assert "grad_norm_seg: " in epochs[0] and "grad_norm_local: " not in epochs[0]
    assert all("grad_norm_seg: " in e and "grad_norm_local: " in e for e in epochs[1:]), epochs
    # pseudo-labels: uint8 label maps on each unlabelled image's grid, valid classes only
    for r in (1, 2):
        files = sorted((root / "models" / "pseudo_labels" / f"round{r}").glob("*_pseudo.nii.gz"))
        assert len(files) == 5
        for f in files:
            src = nib.load(str(phantom_dir / "imagesTr" / f.name.replace("_pseudo", "")))
            lab = nib.load(str(f))
            assert lab.shape == src.shape and lab.get_data_dtype() == np.uint8
            np.testing.assert_allclose(lab.affine, src.affine, atol=1e-4)
            assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= set(range(5))
    assert (root / "models" / "model.pt").is_file() and (root / "models" / "model_final.pt").is_file()


def test_evaluate_and_inference_after_self_training(trained, phantom_dir):
    root, _ = trained
    proc = run_bundle(
        [CONFIGS / "train.json", CONFIGS / "evaluate.json"],
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(phantom_dir),
        "--patch_size",
        "32",
        "--num_workers",
        "0",
        "--num_labelled",
        "1",
    )
    _assert_ok(proc)
    assert (root / "eval" / "val_mean_dice_raw.csv").is_file()
    out = root / "pred"
    proc = run_bundle(
        [CONFIGS / "inference.json"],
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(phantom_dir),
        "--patch_size",
        "32",
        "--num_workers",
        "0",
        "--output_dir",
        str(out),
    )
    _assert_ok(proc)
    assert_segmentation_of(out, next((phantom_dir / "imagesTs").glob("*.nii.gz")), num_classes=5)


def test_rounds_need_an_unlabelled_pool(phantom_dir, tmp_path):
    proc = run_bundle(
        [CONFIGS / "train.json"],
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(phantom_dir),
        *TINY,
        "--label_fraction",
        "1.0",
        "--num_rounds",
        "1",
        "--max_epochs",
        "2",
    )
    assert proc.returncode != 0
    assert "num_rounds > 0 needs unlabelled volumes" in proc.stdout


def test_torchrun_two_cpu_processes_shard_the_pseudo_labels(phantom_dir, tmp_path):
    proc = run_bundle(
        [CONFIGS / "train.json", CONFIGS / "multi_gpu_train.json"],
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(phantom_dir),
        *TINY,
        "--num_labelled",
        "2",
        "--num_rounds",
        "1",
        "--max_epochs",
        "2",
        torchrun=2,
    )
    _assert_ok(proc)
    pseudo = tmp_path / "models" / "pseudo_labels"
    shards = [sorted(p.name for p in (pseudo / "round1" / f"rank{k}").glob("*_pseudo.nii.gz")) for k in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2 and not set(shards[0]) & set(shards[1])  # 4 unlabelled, disjoint
    assert (pseudo / "rounds_rank0.json").is_file() and (pseudo / "rounds_rank1.json").is_file()
    assert (tmp_path / "models" / "model.pt").is_file()
