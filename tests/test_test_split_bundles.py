"""The test split in the bundles: configs route it (evaluate's ``eval_split``), training and checkpoint selection never
read it, and bad test-split input stops a run with one message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLES, run_bundle
from monai.bundle import ConfigParser

from medcl.data import load_splits

TEST_FRACTION = 0.25  # 2 of the 8 phantom cases
BUNDLE_NAMES = ["scratch_baseline", "macl", "mixcl", "localcl_selftrain"]


def _images(items):
    return {str(d["image"]) for d in items}


def _parser(configs, **updates):
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser.update(updates)
    return parser


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_evaluate_scores_the_test_split_and_training_never_reads_it(bundle, phantom_dir, tmp_path):
    configs = BUNDLES / bundle / "configs"
    common = {"bundle_root": str(tmp_path), "dataset_dir": str(phantom_dir), "test_fraction": TEST_FRACTION}
    test = _images(load_splits(str(phantom_dir), check="off", test_fraction=TEST_FRACTION)["test"])
    assert len(test) == 2
    train = _parser([configs / "train.json"], **common)
    assert train["test_fraction"] == TEST_FRACTION and train.get_parsed_content("test_seed") == 0
    seen = _images(train.get_parsed_content("train#dataset#data")) | _images(
        train.get_parsed_content("validate#dataset#data")
    )
    assert seen and not seen & test
    if bundle == "localcl_selftrain":
        train.update({"report_pseudo_dice": True, "include_test": True})
        assert not _images(train.get_parsed_content("unlabelled")) & test
        assert not _images(train.get_parsed_content("truth_items")) & test
    for split in ("val", "test"):
        evaluate = _parser([configs / "train.json", configs / "evaluate.json"], **common, eval_split=split)
        scored = _images(evaluate.get_parsed_content("validate#dataset#data"))
        assert (scored == test) if split == "test" else (scored and not scored & test)
    if (configs / "pretrain.json").is_file():
        pre = _parser(
            [configs / "pretrain.json"], **common, pretrain_dataset_dirs=[str(phantom_dir)], include_test=True
        )
        pool = _images(pre.get_parsed_content("pretrain_datalist"))
        assert len(pool) >= 5 and not pool & test


def _copy(phantom_dir: Path, dst: Path, corrupt_test: bool) -> Path:
    """A phantom copy; with ``corrupt_test`` every label of the carved test set is flipped and shifted."""
    shutil.copytree(phantom_dir, dst)
    if corrupt_test:
        for item in load_splits(str(dst), check="off", test_fraction=TEST_FRACTION)["test"]:
            img = nib.load(item["label"])
            data = np.roll(np.flip(np.asarray(img.dataobj), 0), 5, axis=1)
            nib.save(nib.Nifti1Image(np.ascontiguousarray(data), img.affine, img.header), item["label"])
    return dst


TINY = {
    "spatial_dims": 2,
    "patch_size": 32,
    "max_epochs": 2,
    "epoch_length": 2,
    "val_interval": 1,
    "num_workers": 0,
    "batch_size": 1,
    "samples_per_volume": 2,
    "test_fraction": TEST_FRACTION,
}


def _args(root, dataset, **extra):
    over = {**TINY, "bundle_root": root, "dataset_dir": dataset, **extra}
    return [a for k, v in over.items() for a in (f"--{k}", str(v))]


@pytest.mark.slow
def test_corrupted_test_labels_train_and_select_identically(phantom_dir, tmp_path):
    """Training and checkpoint selection never read the test cases: a copy whose test labels are wrong gives the same
    bytes of ``model.pt`` (validation-selected) and ``model_final.pt``; only the test Dice differs."""
    configs = BUNDLES / "scratch_baseline" / "configs"
    dice = {}
    for name, corrupt in (("intact", False), ("corrupt", True)):
        data, root = _copy(phantom_dir, tmp_path / f"data_{name}", corrupt), tmp_path / name
        proc = run_bundle([configs / "train.json"], *_args(root, data))
        assert proc.returncode == 0, proc.stdout[-4000:]
        proc = run_bundle([configs / "train.json", configs / "evaluate.json"], *_args(root, data, eval_split="test"))
        assert proc.returncode == 0, proc.stdout[-4000:]
        rows = (root / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()
        assert len(rows) == 1 + 2  # header + the two test volumes
        dice[name] = json.dumps(rows[1:])
    for ckpt in ("model.pt", "model_final.pt"):
        a, b = (tmp_path / n / "models" / ckpt for n in ("intact", "corrupt"))
        assert a.read_bytes() == b.read_bytes(), f"{ckpt} differs: training or selection read a test label"
    assert dice["intact"] != dice["corrupt"]  # the test labels are what evaluation scores
    # training recorded its split; evaluating with another test set is refused in one line (no training case scored)
    root = tmp_path / "intact"
    assert len(json.loads((root / "models" / "split.json").read_text())["test"]) == 2
    proc = run_bundle(
        [configs / "train.json", configs / "evaluate.json"],
        *_args(root, tmp_path / "data_intact", eval_split="test", test_fraction=0.5),
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stdout
    assert proc.stdout.count("MedclInputError: ") == 1 and "training held out other 'test' cases" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, extra, message",
    [
        ("train.json", {"test_fraction": 1.0}, "test_fraction=1.0 must be in [0, 1)"),
        ("evaluate.json", {"test_fraction": 0.0, "eval_split": "test"}, "has no labelled test set"),
    ],
)
def test_bad_test_split_input_stops_with_one_line(phantom_dir, tmp_path, config, extra, message):
    configs = BUNDLES / "scratch_baseline" / "configs"
    files = [configs / "train.json"] + ([configs / config] if config != "train.json" else [])
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"")  # evaluate only checks the checkpoint exists before
    proc = run_bundle(files, *_args(tmp_path, phantom_dir, **extra))
    assert proc.returncode != 0
    assert proc.stdout.count("MedclInputError: ") == 1 and message in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
