"""Shared fixtures: a tiny phantom dataset on disk, paths of the repository and its bundles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: extra threads only add contention on a 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Eight 32³ phantom cases (+1 test image): enough for a 2-case validation set and a 10 % split."""
    from medcl.data.phantom import generate_dataset

    out = tmp_path_factory.mktemp("phantom")
    generate_dataset(str(out), n=8, n_test=1, seed=0, shape=(32, 32, 32))
    return out


def run_bundle(config_files, *overrides: str, cwd: Path = REPO, timeout: int = 600, torchrun: int = 0):
    """Run ``python -m monai.bundle run`` in a subprocess; return the CompletedProcess (stdout+stderr merged)."""
    configs = [str(c) for c in config_files]
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "-m"]
        if torchrun
        else [sys.executable, "-m"]
    )
    cmd = launcher + [
        "monai.bundle",
        "run",
        "--config_file",
        repr(configs) if len(configs) > 1 else configs[0],
        *overrides,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.run(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


def assert_segmentation_of(pred_dir: Path, image_path: Path, num_classes: int) -> None:
    """``<pred_dir>/<name>_seg.nii.gz`` is a label map on ``image_path``'s grid (shape, affine) with valid classes."""
    import nibabel as nib
    import numpy as np

    pred = nib.load(str(Path(pred_dir) / Path(image_path).name.replace(".nii.gz", "_seg.nii.gz")))
    image = nib.load(str(image_path))
    assert pred.shape == image.shape
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(num_classes))
