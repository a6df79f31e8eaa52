"""MACL's view chains (``views: paper | code`` in bundles/macl/configs/pretrain.json) and the elastic warp's size
relative to the patch (``RandElasticd(reference_size=...)``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BUNDLES
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose
from monai.transforms.utils import create_grid

from medcl.data.views import VIEW_KEYS, VIEW_SETTINGS, RandElasticd, select_views
from medcl.errors import MedclInputError, find_medcl_error

PRETRAIN = BUNDLES / "macl" / "configs" / "pretrain.json"

pytestmark = pytest.mark.usefixtures("one_thread")


def relative_displacement(size: int, dims: int, reference_size: float | None, seeds=range(4)) -> float:
    """Standard deviation of the elastic displacement field / patch size (interior, away from the filter's borders),
    for the public code's mid-range values (sigma 15.5, magnitude 225)."""
    values = []
    for seed in seeds:
        t = RandElasticd(
            "x",
            dims,
            prob=1.0,
            sigma_range=(15.5, 15.5),
            magnitude_range=(225.0, 225.0),
            rotate_range=None,
            scale_range=None,
            reference_size=reference_size,
        )
        t.set_random_state(seed)
        shape = (size,) * dims
        t.randomize(shape)
        disp = t.sampling_grid(shape)[:dims] - create_grid(shape, backend="torch", dtype=torch.float32)[:dims]
        sigma_px, _ = t.pixel_parameters(shape, 15.5, 225.0)
        m = min(int(np.ceil(3 * sigma_px)), size // 4)
        interior = (slice(None),) + (slice(m, size - m),) * dims
        values.append(float(disp[interior].std()) / size)
    return float(np.mean(values))


def test_elastic_displacement_relative_to_the_patch_is_the_same_at_two_patch_sizes():
    at_64 = relative_displacement(64, 2, reference_size=512)
    at_256 = relative_displacement(256, 2, reference_size=512)
    assert at_64 == pytest.approx(at_256, rel=0.15)
    # and it is the code's warp at 512²: 0.577 * 225 * gain(15.5) / 512 (about 0.5 % of the image)
    k = torch.exp(-0.5 * (torch.arange(-47, 48, dtype=torch.float64) / 15.5) ** 2)
    k = k / k.sum()
    expected = 3**-0.5 * 225 * float((k * k).sum()) / 512
    assert at_256 == pytest.approx(expected, rel=0.15)
    # a 3D patch gets the same relative warp (the 2D values in pixels would give ~1/9 of it)
    assert relative_displacement(48, 3, reference_size=512, seeds=range(2)) == pytest.approx(at_256, rel=0.15)
    # control: read as pixels of the input, the same values warp a 64² patch far more than a 256² one
    assert relative_displacement(128, 2, None) > 1.4 * relative_displacement(256, 2, None)


def test_elastic_reference_size_converts_sigma_and_magnitude():
    t = RandElasticd("x", 2, reference_size=512)
    sigma, magnitude = t.pixel_parameters((64, 64), 16.0, 200.0)
    assert sigma == pytest.approx(2.0)
    assert magnitude < 200.0 / 8  # smaller warp, finer noise: the gain ratio shrinks the magnitude further
    assert RandElasticd("x", 2).pixel_parameters((64, 64), 16.0, 200.0) == (16.0, 200.0)
    t3 = RandElasticd("x", 3, reference_size=512, rotate_axis=2)
    assert t3.in_plane_size((64, 32, 8)) == pytest.approx(48.0)  # the slice axis does not count
    with pytest.raises(MedclInputError, match="reference_size"):
        RandElasticd("x", 2, reference_size=0)


def test_translation_moves_the_content_by_the_drawn_fraction():
    x = torch.zeros(1, 16, 16)
    x[0, 6:10, 6:10] = 1.0
    t = RandElasticd(
        "x", 2, prob=1.0, magnitude_range=None, rotate_range=None, scale_range=None, translate_range=(0.25, 0.25)
    )
    y = torch.as_tensor(t({"x": x})["x"])
    # output(p) = input(p + 4): the square moves 4 pixels towards the origin along both axes
    torch.testing.assert_close(y[0, 2:6, 2:6], torch.ones(4, 4))
    assert float(y.sum()) == pytest.approx(16.0)
    # in 3D the slice axis is never translated: the patch keeps its position
    t3 = RandElasticd("x", 3, prob=1.0, magnitude_range=None, rotate_range=None, scale_range=None, translate_range=0.3)
    t3.set_random_state(0)
    t3.randomize((8, 8, 4))
    assert t3._shift[2] == 0.0 and np.abs(t3._shift[:2]).max() > 0


def _views(views: str, dims: int = 2, samples: int = 2) -> Compose:
    parser = ConfigParser()
    parser.read_config(str(PRETRAIN))
    parser.update({"views": views, "spatial_dims": dims, "samples_per_volume": samples, "spatial_prob": 1.0})
    chain = Compose(parser.get_parsed_content("view_transforms#transforms"))
    chain.set_random_state(seed=0)
    return chain


def test_paper_views_are_identity_pairs_and_rigid_scaled_pairs():
    volume = MetaTensor(torch.as_tensor(np.random.default_rng(0).random((1, 64, 64, 12)), dtype=torch.float32))
    for s in _views("paper")({"image": volume}):
        # I1 = I2 = the sampled slice (non-spatial augmentation = identity, §IV.B)
        assert torch.equal(torch.as_tensor(s["view_i1"]), torch.as_tensor(s["image"]))
        assert torch.equal(torch.as_tensor(s["view_i2"]), torch.as_tensor(s["image"]))
        # V1, V2: two independent translation / rotation / scale draws, no intensity change beyond resampling
        assert not torch.allclose(s["view_v1"], s["view_v2"])
        assert float(s["view_v1"].max()) <= float(s["image"].max()) + 1e-5
    # the code's chain: intensity-jittered, min-max rescaled I views that differ from each other
    s = _views("code")({"image": volume})[0]
    assert not torch.allclose(s["view_i1"], s["view_i2"])
    assert float(s["view_i1"].min()) == pytest.approx(0.0, abs=1e-6)


def test_misspelt_views_fail_naming_the_allowed_values():
    # MONAI's parser wraps it in a RuntimeError; the bundle CLI finds it in the chain and prints its one line
    with pytest.raises(RuntimeError) as info:
        _views("papr")
    error = find_medcl_error(info.value)
    assert isinstance(error, MedclInputError)
    assert str(error) == "views must be one of ['paper', 'code'], got 'papr'."
    with pytest.raises(MedclInputError, match="views must be one of"):
        select_views("Paper", {"paper": [], "code": []})
    assert select_views("code", {"paper": [1], "code": [2]}) == [2]
    assert set(VIEW_SETTINGS) == {"paper", "code"} and len(VIEW_KEYS) == 4


def test_the_default_views_are_the_papers():
    parser = ConfigParser()
    parser.read_config(str(PRETRAIN))
    assert parser.get("views") == "paper"
    assert parser.get("base_temperature") == 0.07
    assert parser.get("elastic_reference_size") == 512
