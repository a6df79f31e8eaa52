"""Dense CRF (medcl.inferers.crf_refine) against one mean-field update written from the dense-CRF equations
(Krahenbuhl & Koltun, NeurIPS 2011) with explicit loops over voxel pairs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from medcl.errors import MedclInputError
from medcl.inferers.crf import CODE_CRF_KWARGS, crf_refine

PARAMS = dict(
    bilateral_weight=1.5,
    gaussian_weight=0.7,
    bilateral_spatial_sigma=2.0,
    bilateral_color_sigma=0.5,
    gaussian_spatial_sigma=1.5,
    update_factor=3.0,
)


def reference_update(logits, image, q, p=PARAMS):
    """One mean-field update for one image: ``logits`` ``(C, *spatial)``, ``image`` ``(*spatial)``, current ``q``.

    E_i(l) = -logits_i(l) + update_factor * sum_m w_m sum_{l'} mu(l, l') sum_j k~_m(i, j) Q_j(l'),
    mu = Potts [l != l'], k~_m(i, j) = k_m(i, j) / sum_j' k_m(i, j') over every voxel j (i included),
    k_1 = exp(-|p_i - p_j|^2 / 2 theta_a^2 - |I_i - I_j|^2 / 2 theta_b^2), k_2 = exp(-|p_i - p_j|^2 / 2 theta_g^2),
    Q_i(l) = exp(-E_i(l)) / sum_l' exp(-E_i(l')).
    """
    n_cls = logits.shape[0]
    voxels = list(itertools.product(*[range(s) for s in logits.shape[1:]]))

    def k_app(a, b):
        d2 = sum((a[t] - b[t]) ** 2 for t in range(len(a)))
        return math.exp(
            -d2 / (2 * p["bilateral_spatial_sigma"] ** 2)
            - (float(image[a]) - float(image[b])) ** 2 / (2 * p["bilateral_color_sigma"] ** 2)
        )

    def k_smooth(a, b):
        d2 = sum((a[t] - b[t]) ** 2 for t in range(len(a)))
        return math.exp(-d2 / (2 * p["gaussian_spatial_sigma"] ** 2))

    new_q = torch.zeros_like(q, dtype=torch.float64)
    for i in voxels:
        energy = []
        for lab in range(n_cls):
            pairwise = 0.0
            for w, kern in ((p["bilateral_weight"], k_app), (p["gaussian_weight"], k_smooth)):
                norm = sum(kern(i, j) for j in voxels)
                msg = 0.0
                for j in voxels:
                    kij = kern(i, j) / norm
                    msg += kij * sum(float(q[(lp, *j)]) for lp in range(n_cls) if lp != lab)  # Potts
                pairwise += w * msg
            energy.append(-float(logits[(lab, *i)]) + p["update_factor"] * pairwise)
        z = sum(math.exp(-e) for e in energy)
        for lab in range(n_cls):
            new_q[(lab, *i)] = math.exp(-energy[lab]) / z
    return new_q


def _case(spatial, seed=0, smooth=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 3, *spatial, generator=g) * 2
    if smooth:  # an image with two flat regions and a ramp (the bilateral kernel's intensities vary smoothly)
        grid = torch.meshgrid(*[torch.linspace(0, 1, s) for s in spatial], indexing="ij")
        image = (0.6 * grid[0] + 0.3 * (grid[1] > 0.5).float())[None, None]
    else:
        image = torch.rand(1, 1, *spatial, generator=g)
    return logits, image


@pytest.mark.parametrize("spatial", [(4, 5), (3, 3, 3)], ids=["2d", "3d"])
def test_exact_backend_is_the_mean_field_update(spatial, one_thread):
    logits, image = _case(spatial)
    q0 = torch.softmax(logits[0].double(), dim=0)
    want = reference_update(logits[0], image[0, 0], q0)
    got = crf_refine(logits, image, iterations=1, backend="exact", **PARAMS)[0]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    # a second iteration starts from the first's output
    want2 = reference_update(logits[0], image[0, 0], want)
    got2 = crf_refine(logits, image, iterations=2, backend="exact", **PARAMS)[0]
    torch.testing.assert_close(got2.double(), want2, rtol=0, atol=2e-6)
    assert (got - torch.softmax(logits[0], 0)).abs().max() > 1e-2  # the update does something


@pytest.mark.parametrize("spatial", [(4, 5), (3, 3, 3)], ids=["2d", "3d"])
def test_torch_backend_approximates_the_update(spatial, one_thread):
    """The separable Gaussian is exact here (grids within 3 sigma); the bilateral term's intensity interpolation
    is the approximation: within 0.005 of the exact update on smooth images (documented in crf_refine)."""
    logits, image = _case(spatial, smooth=True)
    q0 = torch.softmax(logits[0].double(), dim=0)
    want = reference_update(logits[0], image[0, 0], q0)
    got = crf_refine(logits, image, iterations=1, backend="torch", **PARAMS)[0]
    err = (got.double() - want).abs().max()
    assert err < 0.005, err
    # without the bilateral term the torch backend is exact
    p0 = {**PARAMS, "bilateral_weight": 0.0}
    want0 = reference_update(logits[0], image[0, 0], q0, p0)
    got0 = crf_refine(logits, image, iterations=1, backend="torch", **p0)[0]
    torch.testing.assert_close(got0.double(), want0, rtol=0, atol=2e-6)


def test_slice_axis_runs_independent_2d_crfs(one_thread):
    logits, image = _case((4, 5, 3), seed=2)
    for axis in (0, 2, -1):
        out = crf_refine(logits, image, iterations=2, backend="exact", slice_axis=axis, **PARAMS)
        ax = axis % 3 + 2
        for s in range(logits.shape[ax]):
            one = crf_refine(logits.select(ax, s), image.select(ax, s), iterations=2, backend="exact", **PARAMS)
            torch.testing.assert_close(out.select(ax, s), one)
    whole = crf_refine(logits, image, iterations=2, backend="exact", **PARAMS)
    assert not torch.allclose(whole, out)
    with pytest.raises(MedclInputError, match="slice_axis"):
        crf_refine(logits, image, slice_axis=3)
    with pytest.raises(MedclInputError, match="auto, monai, torch, exact"):
        crf_refine(logits, image, backend="dense")


def test_code_settings_smooth_strongly(one_thread):
    logits, image = _case((12, 12, 2), seed=3)
    out = crf_refine(logits, image, backend="torch", slice_axis=2, **CODE_CRF_KWARGS)
    before = logits.argmax(1)
    after = out.argmax(1)
    changes = lambda lab: int((lab[:, 1:] != lab[:, :-1]).sum() + (lab[:, :, 1:] != lab[:, :, :-1]).sum())  # noqa: E731
    assert changes(after) < 0.6 * changes(before)  # random logits: the code's smoothing removes many label edges
    torch.testing.assert_close(out.sum(1), torch.ones_like(out[:, 0]))
