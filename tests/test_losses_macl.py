"""Tests of the MACL loss modules against slow loop references, invariances and hand-built cases.

The references here follow the public code's reading (all-vs-all SupCon, mean over anchors; mean L1), i.e. the
defaults. References written from the paper's eq. 9-11 themselves, against the ``form="paper"`` /
``reduction="sum"`` options, are in ``tests/test_macl_equations.py``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from medcl.losses.dense_supcon import DenseSupConLoss
from medcl.losses.feature_consistency import FeatureConsistencyLoss
from medcl.losses.supcon import PositionalSupConLoss, SupConLoss, positional_positive_mask, supcon_anchor_losses

DT = torch.float64


# ----------------------------------------------------------------------------------------------------------------------
# slow, obvious references (python loops, scalar maths)
# ----------------------------------------------------------------------------------------------------------------------
def ref_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum() / (torch.sqrt((x * x).sum()) * torch.sqrt((y * y).sum()))


def ref_supcon(vectors: list[torch.Tensor], weight, tau: float) -> torch.Tensor:
    """SupCon over a list of vectors; weight(i, j) -> float positive weight (0: not a positive)."""
    m = len(vectors)
    total, count = None, 0
    for i in range(m):
        denom = 0.0
        for a in range(m):
            if a != i:
                denom = denom + torch.exp(ref_cos(vectors[i], vectors[a]) / tau)
        wsum = sum(float(weight(i, p)) for p in range(m) if p != i)
        if wsum == 0:
            continue
        acc = 0.0
        for p in range(m):
            w = float(weight(i, p))
            if p == i or w == 0:
                continue
            acc = acc + w * torch.log(torch.exp(ref_cos(vectors[i], vectors[p]) / tau) / denom)
        term = -acc / wsum
        total = term if total is None else total + term
        count += 1
    return total / count


def ref_positional(features: torch.Tensor, positions: torch.Tensor, tau: float, thr: float) -> torch.Tensor:
    """features (N, V, D); views enumerated sample-major (the module uses view-major order)."""
    n, v, _ = features.shape
    vecs = [features[i, k] for i in range(n) for k in range(v)]
    owner = [i for i in range(n) for _ in range(v)]
    pos = [float(x) for x in positions]
    return ref_supcon(vecs, lambda a, b: abs(pos[owner[a]] - pos[owner[b]]) < thr, tau)


def ref_dense(aux, dom, positions, tau: float, thr: float, rule: str) -> torch.Tensor:
    b = aux.shape[0]
    locs = list(itertools.product(*[range(s) for s in aux.shape[2:]]))
    if rule == "position":
        pos = [float(x) for x in positions]

        def weight(a, c):
            return abs(pos[a % b] - pos[c % b]) < thr

    else:

        def weight(a, c):
            return a % b == c % b

    total = 0.0
    for loc in locs:
        vecs = [aux[(i, slice(None)) + loc] for i in range(b)] + [dom[(i, slice(None)) + loc] for i in range(b)]
        total = total + ref_supcon(vecs, weight, tau)
    return total / len(locs)


def ref_resample_align_corners(x: torch.Tensor, out_size: list[int]) -> torch.Tensor:
    """Multilinear resampling with align_corners=True, one output value at a time."""
    b, c = x.shape[:2]
    in_size = list(x.shape[2:])
    values = []
    for bi, ci, *o in itertools.product(range(b), range(c), *[range(s) for s in out_size]):
        acc = 0.0
        for corner in itertools.product((0, 1), repeat=len(o)):
            weight, idx = 1.0, []
            for k, (ok, ck) in enumerate(zip(o, corner, strict=True)):
                # align_corners=True: output index ok sits at input coordinate ok * (in - 1) / (out - 1)
                src = ok * (in_size[k] - 1) / (out_size[k] - 1) if out_size[k] > 1 else 0.0
                lo = int(math.floor(src))
                frac = src - lo
                weight *= frac if ck else 1.0 - frac
                idx.append(min(lo + ck, in_size[k] - 1))
            if weight != 0.0:
                acc = acc + weight * x[(bi, ci, *idx)]
        values.append(acc)
    return torch.stack(values).reshape(b, c, *out_size)


def ref_l1(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    total, n = 0.0, 0
    for idx in itertools.product(*[range(s) for s in d.shape]):
        total = total + torch.abs(a[idx] - d[idx])
        n += 1
    return total / n


def assert_same_value_and_grad(loss_fn, ref_fn, inputs: list[torch.Tensor], atol=1e-10, rtol=1e-8):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    val = loss_fn(*inputs)
    grads = torch.autograd.grad(val, inputs)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref = ref_fn(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    assert torch.allclose(val, ref, atol=atol, rtol=rtol), (float(val), float(ref))
    for g, rg in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all()
        assert torch.allclose(g, rg, atol=atol, rtol=rtol)
    return val


# ----------------------------------------------------------------------------------------------------------------------
# SupConLoss (generic)
# ----------------------------------------------------------------------------------------------------------------------
def test_supcon_labels_matches_reference_and_skips_anchors_without_positive():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 5, generator=g, dtype=DT)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])  # anchors 2 and 5 have no positive
    lab = labels.tolist()
    assert_same_value_and_grad(
        lambda f: SupConLoss(temperature=0.2)(f, labels=labels),
        lambda f: ref_supcon(list(f), lambda i, j: lab[i] == lab[j], 0.2),
        [feats],
    )


def test_supcon_float_mask_matches_reference():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(5, 4, generator=g, dtype=DT)
    mask = torch.rand(5, 5, generator=g, dtype=DT)
    mask[mask < 0.4] = 0.0  # sparse, asymmetric weights
    mask[3] = 0.0  # anchor 3: no positive at all
    mask[3, 3] = 1.0  # the diagonal is ignored
    assert_same_value_and_grad(
        lambda f: SupConLoss(temperature=0.1)(f, mask=mask),
        lambda f: ref_supcon(list(f), lambda i, j: mask[i, j], 0.1),
        [feats],
    )
    # boolean mask equals labels
    labels = torch.tensor([0, 1, 0, 1, 1])
    f = torch.randn(5, 4, generator=g, dtype=DT)
    by_mask = SupConLoss()(f, mask=labels[:, None] == labels[None, :])
    assert torch.allclose(by_mask, SupConLoss()(f, labels=labels))


def test_supcon_without_positives_is_zero_with_grad():
    feats = torch.randn(4, 3, dtype=DT, requires_grad=True)
    loss = SupConLoss()(feats, labels=torch.arange(4))
    assert loss.item() == 0.0
    loss.backward()
    assert feats.grad is not None and torch.equal(feats.grad, torch.zeros_like(feats))


def test_supcon_core_gradcheck():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 4, 3, generator=g, dtype=DT, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda f: supcon_anchor_losses(f, mask, 0.3)[0], (feats,))


def test_supcon_invalid_inputs():
    f = torch.randn(4, 3)
    loss = SupConLoss()
    with pytest.raises(ValueError):
        loss(f)  # neither labels nor mask
    with pytest.raises(ValueError):
        loss(f, labels=torch.arange(4), mask=torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError):
        loss(f, labels=torch.arange(3))
    with pytest.raises(ValueError):
        loss(f, mask=torch.ones(3, 3))
    with pytest.raises(ValueError):
        loss(f, mask=-torch.ones(4, 4))
    with pytest.raises(ValueError):
        loss(torch.randn(4, 2, 3), labels=torch.arange(4))
    with pytest.raises(ValueError):
        loss(torch.randn(1, 3), labels=torch.arange(1))
    with pytest.raises(ValueError):
        SupConLoss(temperature=0.0)
    with pytest.raises(ValueError):
        SupConLoss(base_temperature=-1.0)


# ----------------------------------------------------------------------------------------------------------------------
# PositionalSupConLoss (L_g)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau,thr,views", [(0.1, 0.1, 2), (0.5, 0.3, 2), (0.2, 0.2, 3)])
def test_positional_matches_reference(tau, thr, views):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(5, views, 7, generator=g, dtype=DT)
    positions = torch.tensor([0.1, 0.15, 0.5, 0.62, 0.9], dtype=DT)
    assert_same_value_and_grad(
        lambda f: PositionalSupConLoss(temperature=tau, threshold=thr)(f, positions),
        lambda f: ref_positional(f, positions, tau, thr),
        [feats],
    )


def test_positional_hand_built_case():
    positions = torch.tensor([0.1, 0.15, 0.9])
    mask = positional_positive_mask(positions, 0.1)
    expected = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    assert torch.equal(mask, expected)
    assert torch.equal(PositionalSupConLoss(threshold=0.1).positive_mask(positions), expected)
    # views: sample 0 -> e0, e0 ; sample 1 -> e1, e1 ; sample 2 -> e2, e3 (all other cosines are 0)
    e = torch.eye(4, dtype=DT)
    feats = torch.stack([torch.stack([e[0], e[0]]), torch.stack([e[1], e[1]]), torch.stack([e[2], e[3]])])
    loss = PositionalSupConLoss(temperature=0.1, threshold=0.1)(feats, positions)
    # anchors of samples 0/1: positives {own other view (cos 1), the 2 views of the other sample (cos 0)},
    # denominator e^10 + 4 -> l = log(e^10 + 4) - 10/3 ; anchors of sample 2: one positive (cos 0),
    # denominator 5 -> l = log 5
    expected_value = (4 * (math.log(math.exp(10) + 4) - 10 / 3) + 2 * math.log(5)) / 6
    assert math.isclose(loss.item(), expected_value, rel_tol=1e-10)
    # threshold 0.78: samples 1 and 2 (|0.9 - 0.15| = 0.75) become positives, samples 0 and 2 (0.8) do not
    expected = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]]).bool()
    assert torch.equal(positional_positive_mask(positions, 0.78), expected)


def test_positional_invariances():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(6, 2, 8, generator=g, dtype=DT)
    positions = torch.rand(6, generator=g, dtype=DT)
    loss = PositionalSupConLoss(threshold=0.25)
    ref = loss(feats, positions)
    perm = torch.randperm(6, generator=g)
    assert torch.allclose(loss(feats[perm], positions[perm]), ref)
    assert torch.allclose(loss(feats.flip(1), positions), ref)  # swapping the views
    assert torch.allclose(loss(3.7 * feats, positions), ref)  # cosine: scale invariant
    assert torch.allclose(loss(feats, positions[:, None]), ref)  # (N, 1) positions accepted


def test_positional_invalid_inputs():
    loss = PositionalSupConLoss()
    with pytest.raises(ValueError):
        loss(torch.randn(4, 8), torch.rand(4))
    with pytest.raises(ValueError):
        loss(torch.randn(4, 2, 8), torch.rand(3))
    with pytest.raises(ValueError):
        PositionalSupConLoss(threshold=-0.1)


def test_base_temperature_scales_by_tau_over_base():
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(4, 2, 6, generator=g, dtype=DT)
    positions = torch.tensor([0.1, 0.12, 0.5, 0.9], dtype=DT)
    factor = 0.1 / 0.07
    plain = PositionalSupConLoss()(feats, positions)
    assert torch.allclose(PositionalSupConLoss(base_temperature=0.07)(feats, positions), plain * factor)
    f2 = feats[:, 0]
    assert torch.allclose(
        SupConLoss(base_temperature=0.07)(f2, labels=torch.tensor([0, 0, 1, 1])),
        SupConLoss()(f2, labels=torch.tensor([0, 0, 1, 1])) * factor,
    )
    aux, dom = torch.randn(2, 4, 3, 3, generator=g, dtype=DT)
    assert torch.allclose(
        DenseSupConLoss(base_temperature=0.07)(aux, dom, positions), DenseSupConLoss()(aux, dom, positions) * factor
    )


def test_half_precision_is_finite_and_close():
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(8, 2, 128, generator=g)
    positions = torch.rand(8, generator=g)
    ref = PositionalSupConLoss()(feats, positions)
    for dtype in (torch.float16, torch.bfloat16):
        f = (feats * 100).to(dtype).requires_grad_(True)  # large magnitudes: no overflow
        out = PositionalSupConLoss()(f, positions)
        out.backward()
        assert out.dtype == torch.float32 and torch.isfinite(out) and torch.isfinite(f.grad.float()).all()
        assert torch.allclose(out, ref, atol=5e-2)
    aux, dom = torch.randn(2, 8, 16, 4, 4, generator=g)
    ref = DenseSupConLoss()(aux, dom, positions)
    out = DenseSupConLoss()(aux.half(), dom.half(), positions)
    assert torch.isfinite(out) and torch.allclose(out, ref, atol=1e-2)


# ----------------------------------------------------------------------------------------------------------------------
# DenseSupConLoss (L_d)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", [(3, 4), (2, 3, 2)])
@pytest.mark.parametrize("rule", ["position", "sample"])
def test_dense_matches_loop_reference(spatial, rule):
    g = torch.Generator().manual_seed(7)
    aux = torch.randn(3, 5, *spatial, generator=g, dtype=DT)
    dom = torch.randn(3, 5, *spatial, generator=g, dtype=DT)
    positions = torch.tensor([0.2, 0.25, 0.7], dtype=DT)
    assert_same_value_and_grad(
        lambda a, d: DenseSupConLoss(temperature=0.1, threshold=0.1, positives=rule)(a, d, positions),
        lambda a, d: ref_dense(a, d, positions, 0.1, 0.1, rule),
        [aux, dom],
    )


def test_dense_equals_public_code_per_location_loop():
    """The public code calls its PCL SupCon at every pixel on stack([aux(s), dom(s)], views)."""
    g = torch.Generator().manual_seed(8)
    aux = torch.randn(4, 6, 3, 3, generator=g, dtype=DT)
    dom = torch.randn(4, 6, 3, 3, generator=g, dtype=DT)
    positions = torch.tensor([0.1, 0.15, 0.5, 0.55], dtype=DT)
    per_loc = PositionalSupConLoss(temperature=0.1, threshold=0.1, base_temperature=0.07)
    a, d = aux.flatten(2), dom.flatten(2)
    expected = sum(per_loc(torch.stack([a[..., s], d[..., s]], dim=1), positions) for s in range(9)) / 9
    got = DenseSupConLoss(temperature=0.1, threshold=0.1, base_temperature=0.07)(aux, dom, positions)
    assert torch.allclose(got, expected)


def test_dense_without_positions_uses_same_sample_positives():
    g = torch.Generator().manual_seed(9)
    aux, dom = torch.randn(2, 4, 5, 3, 3, generator=g, dtype=DT)
    positions = torch.full((4,), 0.5, dtype=DT)  # all positives under the position rule
    sample_rule = DenseSupConLoss(positives="sample")(aux, dom, positions)
    assert torch.allclose(DenseSupConLoss()(aux, dom), sample_rule)
    assert not torch.allclose(DenseSupConLoss()(aux, dom, positions), sample_rule)
    with pytest.raises(ValueError):
        DenseSupConLoss(positives="anything")


def test_dense_invariances():
    g = torch.Generator().manual_seed(10)
    aux, dom = torch.randn(2, 5, 6, 4, 4, generator=g, dtype=DT)
    positions = torch.rand(5, generator=g, dtype=DT)
    loss = DenseSupConLoss(threshold=0.3)
    ref = loss(aux, dom, positions)
    perm = torch.randperm(5, generator=g)
    assert torch.allclose(loss(aux[perm], dom[perm], positions[perm]), ref)
    assert torch.allclose(loss(dom, aux, positions), ref)  # the two branches play symmetric roles
    assert torch.allclose(loss(2.5 * aux, 0.3 * dom, positions), ref)
    # permuting locations (the same way in both maps) does not matter either
    sp = torch.randperm(16, generator=g)
    a2 = aux.flatten(2)[..., sp].reshape(aux.shape)
    d2 = dom.flatten(2)[..., sp].reshape(dom.shape)
    assert torch.allclose(loss(a2, d2, positions), ref)


def test_dense_default_size_runs_vectorised():
    # B=8, C=128, 32x32 map: O(S^2) memory or a python loop over the 1024 locations would be far slower
    torch.manual_seed(11)
    aux = torch.randn(8, 128, 32, 32, requires_grad=True)
    dom = torch.randn(8, 128, 32, 32, requires_grad=True)
    loss = DenseSupConLoss()(aux, dom, torch.rand(8))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(aux.grad).all() and torch.isfinite(dom.grad).all()


def test_dense_invalid_inputs():
    loss = DenseSupConLoss()
    with pytest.raises(ValueError):
        loss(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 2))
    with pytest.raises(ValueError):
        loss(torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError):
        loss(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError):
        loss(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.rand(3))


# ----------------------------------------------------------------------------------------------------------------------
# FeatureConsistencyLoss (L_ER)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "aux_shape,dom_shape,scale,mode",
    [
        ((2, 3, 8, 8), (2, 3, 2, 2), 0.25, "bilinear"),
        ((2, 3, 10, 9), (2, 3, 2, 2), 0.25, "bilinear"),  # floor(2.5), floor(2.25)
        ((1, 2, 8, 8, 4), (1, 2, 2, 2, 1), 0.25, "bilinear"),  # 3D: the linear family becomes trilinear
        ((1, 2, 8, 8, 4), (1, 2, 2, 2, 1), 0.25, "trilinear"),
        ((2, 2, 9, 7), (2, 2, 3, 2), None, "linear"),  # scale=None: resample to dom's size
    ],
)
def test_feature_consistency_matches_reference(aux_shape, dom_shape, scale, mode):
    g = torch.Generator().manual_seed(12)
    aux = torch.randn(*aux_shape, generator=g, dtype=DT)
    dom = torch.randn(*dom_shape, generator=g, dtype=DT)
    assert_same_value_and_grad(
        lambda a, d: FeatureConsistencyLoss(scale=scale, mode=mode)(a, d),
        lambda a, d: ref_l1(ref_resample_align_corners(a, list(dom_shape[2:])), d),
        [aux, dom],
    )


def test_feature_consistency_other_modes_and_reductions():
    g = torch.Generator().manual_seed(13)
    aux = torch.randn(2, 3, 8, 8, generator=g, dtype=DT)
    dom = torch.randn(2, 3, 2, 2, generator=g, dtype=DT)
    # area with an integer factor = mean over 4x4 blocks
    blocks = aux.reshape(2, 3, 2, 4, 2, 4).mean(dim=(3, 5))
    assert torch.allclose(FeatureConsistencyLoss(mode="area")(aux, dom), (blocks - dom).abs().mean())
    nearest = aux[:, :, ::4, ::4]
    assert torch.allclose(FeatureConsistencyLoss(mode="nearest")(aux, dom), (nearest - dom).abs().mean())
    elem = FeatureConsistencyLoss(reduction="none")(aux, dom)
    assert elem.shape == dom.shape
    assert torch.allclose(FeatureConsistencyLoss(reduction="sum")(aux, dom), elem.sum())
    assert torch.allclose(FeatureConsistencyLoss()(aux, dom), elem.mean())
    # scale 1: plain L1 (symmetric network)
    same = torch.randn(2, 3, 2, 2, generator=g, dtype=DT)
    assert torch.allclose(FeatureConsistencyLoss(scale=1.0)(same, dom), (same - dom).abs().mean())
    # per-dimension scale (anisotropic 3D)
    a3 = torch.randn(1, 2, 8, 8, 4, generator=g, dtype=DT)
    d3 = torch.randn(1, 2, 2, 2, 4, generator=g, dtype=DT)
    assert torch.isfinite(FeatureConsistencyLoss(scale=(0.25, 0.25, 1.0))(a3, d3))


def test_feature_consistency_invalid_inputs():
    loss = FeatureConsistencyLoss()
    with pytest.raises(ValueError, match="does not match"):
        loss(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError):
        loss(torch.randn(2, 3, 8, 8), torch.randn(2, 4, 2, 2))  # channels
    with pytest.raises(ValueError):
        loss(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 2, 2, 2))  # dimensionality
    with pytest.raises(ValueError):
        FeatureConsistencyLoss(scale=(0.25, 0.25))(torch.randn(1, 1, 8, 8, 8), torch.randn(1, 1, 2, 2, 2))
    with pytest.raises(ValueError):
        FeatureConsistencyLoss(mode="bicubic")(torch.randn(1, 1, 8, 8, 8), torch.randn(1, 1, 2, 2, 2))
    with pytest.raises(ValueError):
        FeatureConsistencyLoss(mode="cubic")
    with pytest.raises(ValueError):
        FeatureConsistencyLoss(scale=0.0)
    with pytest.raises(ValueError):
        FeatureConsistencyLoss(reduction="max")
