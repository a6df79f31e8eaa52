"""Tests of the boundary-distance weighted pixel sampler (MixCL eq. 7, Fig. 2b)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from medcl.samplers.boundary_weighted import (
    BoundaryWeightedPixelSampler,
    boundary_distance_weights,
    class_boundary,
    gather_pixel_features,
    labels_to_resolution,
    sample_class_pixels,
)

MU, EPS = 8.0, 0.05


def w_of_d(d):
    return 0.5 * np.sqrt(d) * np.exp(-d / MU) + EPS


def eq7_distance(label, spacing):
    """MixCL eq. 7 read literally: D(i) = inf{ d(i, j) : j in boundary of S }, S the class of voxel i.

    The boundary of S: voxels of S with a face neighbour (inside the array) of another class. Every voxel i is
    compared with every boundary voxel j of its class (physical Euclidean distance); a boundary voxel is at
    distance 0 from itself; a class without boundary voxels gets inf.
    """
    coords = [tuple(c) for c in np.argwhere(np.ones(label.shape, dtype=bool))]
    steps = [tuple(s if a == k else 0 for a in range(label.ndim)) for k in range(label.ndim) for s in (-1, 1)]
    sp = np.asarray(spacing, dtype=np.float64)

    def on_boundary(v):
        for s in steps:
            n = tuple(a + b for a, b in zip(v, s, strict=True))
            if all(0 <= x < m for x, m in zip(n, label.shape, strict=True)) and label[n] != label[v]:
                return True
        return False

    boundary = {v for v in coords if on_boundary(v)}
    out = np.full(label.shape, np.inf)
    for v in coords:
        same = [j for j in boundary if label[j] == label[v]]
        if same:
            out[v] = min(float(np.sqrt((((np.asarray(v) - np.asarray(j)) * sp) ** 2).sum())) for j in same)
    return out


def brute_force_distance(label, spacing):
    """For every voxel: min Euclidean distance (physical) to a voxel of another class; inf if none."""
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in label.shape], indexing="ij"), -1).reshape(-1, label.ndim)
    phys = coords * np.asarray(spacing, dtype=np.float64)
    flat = label.reshape(-1)
    out = np.full(flat.shape, np.inf)
    for i in range(flat.size):
        other = flat != flat[i]
        if other.any():
            out[i] = np.sqrt(((phys[other] - phys[i]) ** 2).sum(1)).min()
    return out.reshape(label.shape)


def disk(size, radius, ndim):
    grid = np.meshgrid(*[np.arange(size) for _ in range(ndim)], indexing="ij")
    r2 = sum((g - (size - 1) / 2) ** 2 for g in grid)
    return torch.as_tensor((r2 <= radius**2).astype(np.int64))


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,spacing", [((11, 12), (1.0, 1.0)), ((11, 12), (1.0, 2.5)), ((6, 7, 8), (1.0, 1.5, 2.0))]
)
def test_weights_match_brute_force_distance(shape, spacing):
    rng = np.random.default_rng(0)
    label = np.zeros(shape, dtype=np.int64)
    # blocky classes plus scattered voxels, so both interiors and 1-voxel classes occur
    label[tuple(slice(1, n - 2) for n in shape)] = 1
    label[tuple(slice(2, n // 2 + 1) for n in shape)] = 2
    label[rng.random(shape) < 0.05] = 3
    w = boundary_distance_weights(torch.as_tensor(label)[None], mu=MU, eps=EPS, spacing=spacing)
    assert w.shape == (1, *shape) and w.dtype == torch.float32
    d = eq7_distance(label, spacing)
    np.testing.assert_allclose(w[0].numpy(), w_of_d(d), rtol=1e-5)
    # every voxel of every class can be drawn; boundary voxels (D = 0) have weight eps
    assert (w > 0).all()
    assert (d == 0).any() and np.allclose(w[0].numpy()[d == 0], EPS)
    # the option kept from medcl < 0.2: distance to the nearest voxel of another class
    w_out = boundary_distance_weights(torch.as_tensor(label)[None], mu=MU, eps=EPS, spacing=spacing, distance="outside")
    np.testing.assert_allclose(w_out[0].numpy(), w_of_d(brute_force_distance(label, spacing)), rtol=1e-5)


def test_class_boundary_ignores_the_patch_edge():
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[:, :3] = True  # touches the top, bottom and left edges; its only boundary is column 2
    b = class_boundary(mask)
    assert b[:, 2].all() and not b[:, :2].any() and not b[:, 3:].any()
    assert not class_boundary(torch.ones(3, 4, 5, dtype=torch.bool)).any()


def test_weights_profile_on_square():
    label = torch.zeros(1, 21, 21, dtype=torch.long)
    label[0, 3:18, 3:18] = 1  # 15 x 15 square, centre at D = 8
    w = boundary_distance_weights(label)[0]
    row = w[10, 3:11].numpy()  # from the boundary (D = 0) to the centre (D = 7)
    np.testing.assert_allclose(row, w_of_d(np.arange(0, 8)), rtol=1e-6)
    assert int(np.argmax(row)) == 4  # W peaks at D = mu / 2
    w_out = boundary_distance_weights(label, distance="outside")[0]
    np.testing.assert_allclose(w_out[10, 3:11].numpy(), w_of_d(np.arange(1, 9)), rtol=1e-6)
    with pytest.raises(ValueError, match="distance"):
        boundary_distance_weights(label, distance="edge")


def test_weights_class_filling_patch_restricted_classes_and_batch_axis():
    label = np.zeros((3, 5, 6), dtype=np.int64)  # leading axis: 3 independent maps
    label[1, 1:4, 1:5] = 2
    label[2] = 4  # one class fills the whole patch: no boundary -> W = eps, no NaN
    w = boundary_distance_weights(label)
    assert torch.isfinite(w).all()
    assert torch.allclose(w[2], torch.full((5, 6), EPS))
    assert torch.allclose(w[0], torch.full((5, 6), EPS))
    w_only2 = boundary_distance_weights(torch.as_tensor(label), classes=[2, 9])
    assert (w_only2[0] == 0).all() and (w_only2[2] == 0).all()
    item1 = torch.as_tensor(label[1])
    assert (w_only2[1][item1 == 2] > 0).all() and (w_only2[1][item1 == 0] == 0).all()
    with pytest.raises(ValueError):
        boundary_distance_weights(np.zeros((4, 4), dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# sample_class_pixels
# --------------------------------------------------------------------------------------------------


def test_samples_stay_in_class_and_respect_budget():
    g = torch.Generator().manual_seed(1)
    label = torch.zeros(16, 16, dtype=torch.long)
    label[2:10, 3:12] = 1
    label[11:15, 11:15] = 2  # 16 pixels
    label[0, 0] = 3  # 1 pixel
    w = boundary_distance_weights(label[None])[0]
    for r in [1, 5, 16]:
        idx, cls = sample_class_pixels(label, r, weights=w, generator=g)
        assert cls.tolist() == sum([[c] * r for c in [0, 1, 2, 3]], [])
        assert (label.reshape(-1)[idx] == cls).all()
        for c in [0, 1, 2]:  # classes with >= r pixels: no duplicates
            assert idx[cls == c].unique().numel() == r


def test_absent_and_small_classes():
    g = torch.Generator().manual_seed(2)
    label = torch.zeros(8, 8, dtype=torch.long)
    label[1:3, 1:3] = 1  # 4 pixels
    idx, cls = sample_class_pixels(label, 6, classes=[1, 5], generator=g)
    assert cls.tolist() == [1] * 6 and (label.reshape(-1)[idx] == 1).all()  # with replacement to r
    idx, cls = sample_class_pixels(label, 6, classes=[1, 5], generator=g, replacement_if_short=False)
    assert sorted(idx.tolist()) == torch.nonzero(label.reshape(-1) == 1).reshape(-1).tolist()  # each once
    idx, cls = sample_class_pixels(label, 6, classes=[5, 7], generator=g)
    assert idx.numel() == 0 and cls.numel() == 0 and idx.dtype == torch.long
    idx, cls = sample_class_pixels(label, 0, generator=g)
    assert idx.numel() == 0
    # zero weights on part of a class: those pixels are never drawn, the rest fill the budget
    w = torch.zeros(8, 8)
    w[1, 1:3] = 1.0
    idx, _ = sample_class_pixels(label, 5, weights=w, classes=[1], generator=g)
    assert set(idx.tolist()) <= {9, 10} and idx.numel() == 5
    with pytest.raises(ValueError):
        sample_class_pixels(label, 2, weights=-torch.ones(8, 8))
    with pytest.raises(ValueError):
        sample_class_pixels(label, 2, weights=torch.ones(7, 8))


def test_sampling_is_deterministic_given_generator_and_shape_agnostic():
    label = disk(20, 7, 2)
    w = boundary_distance_weights(label[None])[0]
    a = sample_class_pixels(label, 10, weights=w, generator=torch.Generator().manual_seed(3))
    b = sample_class_pixels(label.reshape(-1), 10, weights=w.reshape(-1), generator=torch.Generator().manual_seed(3))
    c = sample_class_pixels(label, 10, weights=w, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def _ring_profile(counts, weights, level):
    """Empirical vs predicted probability mass per level set of ``level`` (rings of equal D)."""
    levels = np.unique(np.round(level, 6))
    emp = np.array([counts[np.isclose(level, lv)].sum() for lv in levels]) / counts.sum()
    pred = np.array([weights[np.isclose(level, lv)].sum() for lv in levels]) / weights.sum()
    return emp, pred


@pytest.mark.parametrize("ndim,size,radius,min_corr", [(2, 48, 20, 0.95), (3, 24, 10, 0.8)])
def test_empirical_distribution_follows_w(ndim, size, radius, min_corr):
    label = disk(size, radius, ndim)
    w = boundary_distance_weights(label[None])[0].reshape(-1).double()
    inside = label.reshape(-1) == 1
    g = torch.Generator().manual_seed(5)
    n = 1_000_000
    # n > class size: drawn with replacement, so counts ~ Multinomial(n, W / sum W) exactly
    idx, cls = sample_class_pixels(label, n, weights=w, classes=[1], generator=g)
    assert idx.numel() == n and (cls == 1).all()
    counts = torch.bincount(idx, minlength=label.numel()).double()
    assert counts[~inside].sum() == 0  # never outside the class
    cnt, wi = counts[inside].numpy(), w[inside].numpy()
    expected = wi / wi.sum() * n
    assert stats.chisquare(cnt, expected).pvalue > 1e-3
    # per pixel, the correlation is limited by Poisson noise (W varies less inside a 3D ball of radius 10)
    assert np.corrcoef(cnt, expected)[0, 1] > min_corr
    # per ring of equal W (equal D) the noise averages out: mass per ring matches W closely
    emp, pred = _ring_profile(cnt, wi, wi)
    assert np.corrcoef(emp, pred)[0, 1] > 0.99
    np.testing.assert_allclose(emp, pred, atol=2e-3)
    # the test is sensitive: the same counts are grossly incompatible with uniform sampling
    assert stats.chisquare(cnt).pvalue < 1e-12
    _, pred_uniform = _ring_profile(np.ones_like(wi), np.ones_like(wi), wi)
    assert np.abs(emp - pred_uniform).max() > 10 * np.abs(emp - pred).max()


def test_without_replacement_inclusion_follows_w():
    """r << class size: aggregated draws without replacement are ~ proportional to W."""
    label = disk(48, 20, 2)
    w = boundary_distance_weights(label[None])[0].reshape(-1).double()
    inside = (label.reshape(-1) == 1).numpy()
    g = torch.Generator().manual_seed(6)
    counts = torch.zeros(label.numel(), dtype=torch.float64)
    for _ in range(3000):
        idx, _ = sample_class_pixels(label, 20, weights=w, classes=[1], generator=g)
        assert idx.unique().numel() == 20
        counts += torch.bincount(idx, minlength=label.numel())
    cnt, wi = counts.numpy()[inside], w.numpy()[inside]
    emp, pred = _ring_profile(cnt, wi, wi)
    assert np.corrcoef(emp, pred)[0, 1] > 0.95
    _, pred_uniform = _ring_profile(np.ones_like(wi), np.ones_like(wi), wi)
    assert np.abs(emp - pred).sum() < 0.3 * np.abs(emp - pred_uniform).sum()  # far closer to W than to uniform


def test_uniform_when_no_weights():
    label = disk(30, 12, 2)
    g = torch.Generator().manual_seed(7)
    idx, _ = sample_class_pixels(label, 200_000, classes=[1], generator=g)
    cnt = torch.bincount(idx, minlength=label.numel()).double()[label.reshape(-1) == 1].numpy()
    assert stats.chisquare(cnt).pvalue > 1e-3


# --------------------------------------------------------------------------------------------------
# resolution, gathering, batch sampler
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,offset", [("nearest", 0.0), ("nearest-exact", 0.5)])
def test_labels_to_resolution_index_rule(mode, offset):
    g = torch.Generator().manual_seed(8)
    label = torch.randint(0, 5, (2, 1, 12, 9, 10), generator=g)
    size = (4, 3, 5)
    out = labels_to_resolution(label, size, mode=mode)
    assert out.shape == (2, 1, *size) and out.dtype == label.dtype
    for i, j, k in itertools.product(*[range(s) for s in size]):
        src = [math.floor((o + offset) * n / s) for o, n, s in zip((i, j, k), label.shape[2:], size, strict=True)]
        assert torch.equal(out[:, 0, i, j, k], label[:, 0, src[0], src[1], src[2]])
    assert torch.equal(labels_to_resolution(label, (12, 9, 10)), label)
    with pytest.raises(ValueError):
        labels_to_resolution(label, (4, 3))


def test_gather_pixel_features():
    g = torch.Generator().manual_seed(9)
    feat = torch.randn(2, 3, 4, 5, 6, generator=g, requires_grad=True)
    b = torch.tensor([0, 1, 1, 0])
    idx = torch.tensor([0, 7, 119, 33])
    z = gather_pixel_features(feat, b, idx)
    assert z.shape == (4, 3)
    for n in range(4):
        h, w, d = np.unravel_index(int(idx[n]), (4, 5, 6))
        assert torch.equal(z[n], feat[int(b[n]), :, h, w, d])
    z.sum().backward()
    assert feat.grad.sum() == 4 * 3


@pytest.mark.parametrize("spatial", [(24, 20), (12, 14, 10)])
def test_batch_sampler(spatial):
    g = torch.Generator().manual_seed(10)
    label = torch.zeros(3, 1, *spatial, dtype=torch.long)
    label[0, 0, 2:9, 3:10] = 1
    label[0, 0, 9:11, 10:12] = 2  # 4 (2D) / 8 (3D) pixels: fewer than r
    label[1, 0, 1:7, 1:7] = 3
    # item 2: background only
    sampler = BoundaryWeightedPixelSampler(num_per_class=10, background_samples=4)
    b, idx, y = sampler(label, generator=g)
    assert b.shape == idx.shape == y.shape and b.dtype == idx.dtype == y.dtype == torch.long
    flat = label.reshape(3, -1)
    assert torch.equal(flat[b, idx], y)  # every sample lies in its class
    counts = {
        (int(bb), int(yy)): int(((b == bb) & (y == yy)).sum())
        for bb, yy in set(zip(b.tolist(), y.tolist(), strict=True))
    }
    assert counts == {(0, 0): 4, (0, 1): 10, (0, 2): 10, (1, 0): 4, (1, 3): 10, (2, 0): 4}

    again = sampler(label, generator=torch.Generator().manual_seed(10))
    assert all(torch.equal(u, v) for u, v in zip((b, idx, y), again, strict=True))

    no_bg = BoundaryWeightedPixelSampler(num_per_class=3, background_samples=0)(label, generator=g)
    assert (no_bg[2] != 0).all() and set(no_bg[0].tolist()) == {0, 1}

    only = BoundaryWeightedPixelSampler(num_per_class=3, classes=[3, 8])(label, generator=g)
    assert set(only[2].tolist()) == {3} and set(only[0].tolist()) == {1}

    size = tuple(s // 2 for s in spatial)
    b2, idx2, y2 = sampler(label, size=size, generator=g)
    low = labels_to_resolution(label, size).reshape(3, -1)
    assert torch.equal(low[b2, idx2], y2) and int(idx2.max()) < low.shape[1]


def test_batch_sampler_empty_budget_and_bad_input():
    label = torch.zeros(2, 1, 6, 6, dtype=torch.long)
    b, idx, y = BoundaryWeightedPixelSampler(num_per_class=5, background_samples=0)(label)
    assert b.numel() == idx.numel() == y.numel() == 0
    with pytest.raises(ValueError):
        BoundaryWeightedPixelSampler(num_per_class=5)(torch.zeros(2, 6, 6, dtype=torch.long))
