"""Helpers for the model-zoo style tests in this folder (written after Project-MONAI/model-zoo's ``ci/unit_tests``
and ``ci/verify_bundle.py``; medcl's own code).

The zoo runs a bundle's configs in-process with :class:`monai.bundle.ConfigWorkflow` from the bundle folder
(``bundle_root`` is the bundle itself, outputs land in its ``models/``), so every test here works on a copy of the
bundle in a temporary folder and never writes to ``bundles/``.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
NAMES = ("scratch_baseline", "macl", "mixcl", "localcl_selftrain")

#: CPU-sized training settings shared by every bundle: one epoch of one or two iterations, no worker processes
#: (``train#dataset#cache_rate`` 0 as the zoo's unit tests set it, so only the sampled volumes are read)
TINY = {
    "max_epochs": 1,
    "epoch_length": 2,
    "val_interval": 1,
    "num_workers": 0,
    "cache_rate": 0.0,
    "batch_size": 1,
    "samples_per_volume": 1,
    "device": "cpu",
}
#: per bundle: 2D 32² slices of the 32³ phantom; MACL's 4-level nets at scale 0.25 need 64² (the phantom is padded)
#: and two slices per batch (batch norm at the 1x1 bottleneck); MixCL is a 3D UNETR, here at 32³ and the narrow width
#: of tests/test_bundle_mixcl.py
SIZES = {
    "scratch_baseline": {"patch_size": 32},
    "macl": {"patch_size": 64, "samples_per_volume": 2},
    "mixcl": {"patch_size": [32, 32, 32], "feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4},
    "localcl_selftrain": {"patch_size": 32},
}
#: localcl: one baseline epoch and one self-training round of one epoch (pseudo-labels without the CRF, for time)
LOCALCL_SCHEDULE = {"baseline_epochs": 1, "num_rounds": 1, "round_epochs": 1, "max_epochs": 2, "use_crf": False}


def copy_bundle(name: str, dst: Path) -> Path:
    """``bundles/<name>`` (configs, docs, LICENSE; no outputs) copied to ``dst/<name>``, as the zoo lays it out."""
    out = Path(dst) / name
    shutil.copytree(BUNDLES / name, out, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    return out


def workflow(bundle: Path, configs: Sequence[str], workflow_type: str, **override) -> ConfigWorkflow:
    """A :class:`ConfigWorkflow` of ``bundle/configs/<configs>`` with its logging.conf and metadata.json, as the
    zoo's tests build one (``bundle_root`` is the bundle folder)."""
    return ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=[str(bundle / "configs" / c) for c in configs],
        logging_file=str(bundle / "configs" / "logging.conf"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle),
        **override,
    )


def check_workflow(wf: ConfigWorkflow, check_properties: bool = True) -> None:
    """initialize -> check_properties (no missing or wrongly referenced property) -> run -> finalize."""
    wf.initialize()
    if check_properties:
        missing = wf.check_properties()
        assert not missing, f"check_properties: {missing}"
    wf.run()
    wf.finalize()


@pytest.fixture
def zoo_process_state(one_thread) -> Iterator[None]:
    """ConfigWorkflow changes process-wide state: logging.conf replaces the root logger's handlers and level, and
    ``run()`` puts the bundle folder on ``sys.path``; put both back afterwards (the suite runs in one process)."""
    root = logging.getLogger()
    handlers, level, path = list(root.handlers), root.level, list(sys.path)
    grad = torch.is_grad_enabled()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        sys.path[:] = path
        torch.set_grad_enabled(grad)


def check_inference_without_weights(name: str, phantom_dir: Path, tmp_path: Path) -> None:
    """The bundle's inference.json with its checkpoint loader disabled (no trained weights: the initial network)
    writes a label map on the grid of every test image."""
    from conftest import assert_segmentation_of

    bundle = copy_bundle(name, tmp_path)
    override = {
        "dataset_dir": str(phantom_dir),
        "handlers#0#_disabled_": True,
        "num_workers": 0,
        "device": "cpu",
        **SIZES[name],
    }
    check_workflow(workflow(bundle, ["inference.json"], "inference", **override))
    for image in sorted((phantom_dir / "imagesTs").glob("*.nii.gz")):
        assert_segmentation_of(bundle / "eval", image, num_classes=5)
