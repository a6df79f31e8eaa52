"""MixCL fine-tuning augmentation as the paper (Sec. 3): rot90, flips on every axis, scale and shift, each p = 0.2."""

from __future__ import annotations

import json

import pytest
from conftest import BUNDLES
from monai.bundle import ConfigParser

import medcl.data  # noqa: F401  (the config's expressions use it)


def _random_transforms(spatial_dims: int, patch_size, phantom_dir) -> list:
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "mixcl" / "configs" / "train.json"))
    parser.update({"dataset_dir": str(phantom_dir), "spatial_dims": spatial_dims, "patch_size": patch_size})
    return parser.get_parsed_content("train#random_transforms", instantiate=True)


@pytest.mark.parametrize("spatial_dims,patch_size", [(3, [32, 32, 32]), (2, [64, 64, 48])])
def test_finetune_augmentation_is_the_papers(spatial_dims, patch_size, phantom_dir):
    transforms = _random_transforms(spatial_dims, patch_size, phantom_dir)
    by_name = [(type(t).__name__, t) for t in transforms]
    rot = [t for n, t in by_name if n == "RandRotate90d"]
    flips = [t for n, t in by_name if n == "RandFlipd"]
    assert len(rot) == 1 and rot[0].prob == 0.2 and rot[0].max_k == 3
    active_axes = sorted(f.flipper.spatial_axis for f in flips if f.prob > 0)
    assert active_axes == list(range(spatial_dims))  # axial, coronal, sagittal in 3D; the two in-plane axes in 2D
    assert all(f.prob == 0.2 for f in flips if f.prob > 0)
    intensity = [t for n, t in by_name if n in ("RandScaleIntensityd", "RandShiftIntensityd")]
    assert len(intensity) == 2 and all(t.prob == 0.2 for t in intensity)


def test_rot90_is_off_for_a_non_square_patch(phantom_dir):
    transforms = _random_transforms(3, [32, 48, 32], phantom_dir)
    rot = [t for t in transforms if type(t).__name__ == "RandRotate90d"]
    assert rot[0].prob == 0.0  # a rotated non-square patch could not be batched with an unrotated one


def test_pretraining_defaults_to_the_target_dataset_alone(phantom_dir):
    """A user's own dataset pre-trains without naming other folders (no default into this repository's data/)."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "mixcl" / "configs" / "pretrain.json"))
    parser.update({"dataset_dir": str(phantom_dir)})
    assert parser.get_parsed_content("pretrain_dataset_dirs") == [str(phantom_dir)]
    for config in BUNDLES.glob("*/configs/*.json"):  # only dataset_dir (the demo's phantom) points into data/
        keys = [k for k, v in json.loads(config.read_text()).items() if "/data/" in str(v)]
        assert keys in ([], ["dataset_dir"]), (config, keys)
