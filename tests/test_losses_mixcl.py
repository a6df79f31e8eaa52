"""Tests of the MixCL losses: pixel Barlow Twins (identity consistency) and label consistency."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from medcl.losses.barlow_twins_pixel import BarlowTwinsPixelLoss, pixel_cross_correlation
from medcl.losses.label_consistency import LabelConsistencyLoss, label_relation, namespace_labels

# --------------------------------------------------------------------------------------------------
# slow, obvious references
# --------------------------------------------------------------------------------------------------


def ref_barlow_layer(z1, z2, lambd):
    """Eq. 4-5 for one layer with explicit loops over channels and pixels (B, C, *spatial) layout."""
    bsz, c = z1.shape[:2]
    pixels = [(b, *s) for b in range(bsz) for s in itertools.product(*[range(n) for n in z1.shape[2:]])]
    m = len(pixels)

    def at(z, p, ch):
        return z[(p[0], ch, *p[1:])]

    mean1 = [sum(at(z1, p, i) for p in pixels) / m for i in range(c)]
    mean2 = [sum(at(z2, p, j) for p in pixels) / m for j in range(c)]
    loss = 0.0
    for i in range(c):
        for j in range(c):
            num = sum((at(z1, p, i) - mean1[i]) * (at(z2, p, j) - mean2[j]) for p in pixels)
            n1 = torch.sqrt(sum((at(z1, p, i) - mean1[i]) ** 2 for p in pixels))
            n2 = torch.sqrt(sum((at(z2, p, j) - mean2[j]) ** 2 for p in pixels))
            cij = num / (n1 * n2)
            loss = loss + ((1 - cij) ** 2 if i == j else lambd * cij**2)
    return loss


def ref_eq4_eq5_as_printed(z1, z2, lambd):
    """Eq. 4-5 exactly as printed, no centring: C_ij = sum_M Z_Mi Z'_Mj / (sqrt(sum_M Z_Mi^2) sqrt(sum_M Z'_Mj^2)),
    L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2, with M running over every (batch, pixel) of the layer.
    """
    bsz, c = z1.shape[:2]
    pixels = [(b, *s) for b in range(bsz) for s in itertools.product(*[range(n) for n in z1.shape[2:]])]
    loss = 0.0
    for i in range(c):
        for j in range(c):
            num = sum(z1[(p[0], i, *p[1:])] * z2[(p[0], j, *p[1:])] for p in pixels)
            den_i = torch.sqrt(sum(z1[(p[0], i, *p[1:])] ** 2 for p in pixels))
            den_j = torch.sqrt(sum(z2[(p[0], j, *p[1:])] ** 2 for p in pixels))
            cij = num / (den_i * den_j)
            loss = loss + ((1 - cij) ** 2 if i == j else lambd * cij**2)
    return loss


def ref_pair(y1, y2, d1, d2, bg=0, cross=False):
    """'pos', 'neg' or None (excluded) for one pixel pair, written as plain if-rules."""
    if bg is not None and y1 == bg and y2 == bg:
        return None
    if bg is not None and (y1 == bg or y2 == bg):
        if d1 != d2 and not cross:
            return None
        return "neg"
    if y1 == y2 and d1 == d2:
        return "pos"
    return "neg"


def ref_cos(a, b):
    dot = sum(a[k] * b[k] for k in range(a.shape[0]))
    na = torch.sqrt(sum(a[k] ** 2 for k in range(a.shape[0])))
    nb = torch.sqrt(sum(b[k] ** 2 for k in range(b.shape[0])))
    return dot / (na * nb)


def ref_label_loss(z1, y1, z2, y2, d1=None, d2=None, tau=0.1, mode="global", bg=0, cross=False):
    n1, n2 = z1.shape[0], z2.shape[0]
    d1 = [0] * n1 if d1 is None else d1.tolist()
    d2 = [0] * n2 if d2 is None else d2.tolist()
    y1, y2 = y1.tolist(), y2.tolist()
    num_all, den_all, per_anchor = 0.0, 0.0, []
    for i in range(n1):
        num, den, has_pos = 0.0, 0.0, False
        for j in range(n2):
            rel = ref_pair(y1[i], y2[j], d1[i], d2[j], bg, cross)
            if rel is None:
                continue
            e = torch.exp(ref_cos(z1[i], z2[j]) / tau)
            den = den + e
            if rel == "pos":
                num = num + e
                has_pos = True
        num_all, den_all = num_all + num, den_all + den
        if has_pos:
            per_anchor.append(-torch.log(num / den))
    if mode == "global":
        return -torch.log(num_all / den_all)
    return sum(per_anchor) / len(per_anchor)


def whitened(m, c, seed):
    """(M, C) float64 features with zero mean and identity covariance (biased) over the M rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, c, generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(x.t() @ x / m)
    return x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.t()


def to_map(z, shape):
    """(M, C) -> (B, C, *spatial) with M = B * prod(spatial)."""
    b, *spatial = shape
    return z.reshape(b, *spatial, z.shape[1]).movedim(-1, 1).contiguous()


# --------------------------------------------------------------------------------------------------
# BarlowTwinsPixelLoss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 4, 3), (2, 3, 2, 3, 2)])  # 2D and 3D, M = 24
def test_barlow_matches_loop_reference_values_and_grads(shape):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = (0.7 * z1.detach() + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    lambd = 0.05  # larger than the default so the off-diagonal term matters in the comparison
    loss = BarlowTwinsPixelLoss(lambd=lambd)(z1, z2)
    ref = ref_barlow_layer(z1, z2, lambd)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    g_loss = torch.autograd.grad(loss, (z1, z2))
    g_ref = torch.autograd.grad(ref, (z1, z2))
    for a, b in zip(g_loss, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 3, 4, 3), (2, 3, 2, 3, 2)])
def test_barlow_uncentred_option_is_eq5_as_printed_values_and_grads(shape):
    """center=False evaluates eq. 5 literally (raw features); the default centres them as Barlow Twins' batch norm."""
    g = torch.Generator().manual_seed(2)
    z1 = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.8).requires_grad_(True)  # non-zero means
    z2 = (0.6 * z1.detach() + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    lambd = 0.05
    loss = BarlowTwinsPixelLoss(lambd=lambd, center=False)(z1, z2)
    ref = ref_eq4_eq5_as_printed(z1, z2, lambd)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, (z1, z2)), torch.autograd.grad(ref, (z1, z2)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # the centred default differs from the printed equation when the features have non-zero means
    centred = BarlowTwinsPixelLoss(lambd=lambd)(z1, z2)
    assert abs(float(centred - ref)) > 1e-3


def test_barlow_gradcheck():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: BarlowTwinsPixelLoss(lambd=0.1)(a, b), (z1, z2))


def test_barlow_zero_for_identical_whitened_features():
    shape = (2, 4, 6, 5, 5)  # B, C, H, W, D: M = 300 >> C = 4
    z = to_map(whitened(300, 4, seed=2), (2, 6, 5, 5))
    assert z.shape == shape
    corr = pixel_cross_correlation(z, z)
    torch.testing.assert_close(corr, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)
    assert BarlowTwinsPixelLoss()(z, z).item() == pytest.approx(0.0, abs=1e-20)


def test_barlow_grows_with_injected_redundancy():
    c, m, lambd = 5, 400, 5e-3
    z = whitened(m, c, seed=3)
    loss_fn = BarlowTwinsPixelLoss(lambd=lambd)
    values = []
    for rho in [0.0, 0.1, 0.3, 0.5, 0.8]:
        r = (1 - rho) * torch.eye(c, dtype=torch.float64) + rho * torch.ones(c, c, dtype=torch.float64)
        zr = to_map(z @ torch.linalg.cholesky(r).t(), (4, 10, 10))  # channel correlation exactly rho
        val = loss_fn(zr, zr).item()
        # identical views: diagonal term 0, off-diagonal term lambd * C(C-1) * rho^2
        assert val == pytest.approx(lambd * c * (c - 1) * rho**2, rel=1e-9, abs=1e-15)
        values.append(val)
    assert all(b > a for a, b in itertools.pairwise(values))


def test_barlow_grows_with_cross_view_mixing():
    c = 4
    z1 = whitened(256, c, seed=4)
    loss_fn = BarlowTwinsPixelLoss()
    values = []
    for a in [0.0, 0.2, 0.5, 1.0]:
        mix = torch.eye(c, dtype=torch.float64) + a * (torch.ones(c, c, dtype=torch.float64) - torch.eye(c))
        values.append(loss_fn(to_map(z1, (4, 8, 8)), to_map(z1 @ mix, (4, 8, 8))).item())
    assert values[0] == pytest.approx(0.0, abs=1e-20)
    assert all(b > a for a, b in itertools.pairwise(values))


def test_barlow_multi_layer_sum_mean_none():
    g = torch.Generator().manual_seed(5)
    shapes = [(2, 3, 8, 8, 8), (2, 6, 4, 4, 4), (2, 12, 2, 2, 2), (2, 5, 7, 6)]  # mixed channels, 3D and 2D
    z1 = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    z2 = [a + 0.3 * torch.randn(a.shape, generator=g, dtype=torch.float64) for a in z1]
    single = torch.stack([BarlowTwinsPixelLoss()(a, b) for a, b in zip(z1, z2, strict=True)])
    torch.testing.assert_close(BarlowTwinsPixelLoss()(z1, z2), single.sum())
    torch.testing.assert_close(BarlowTwinsPixelLoss(reduction="mean")(z1, z2), single.mean())
    torch.testing.assert_close(BarlowTwinsPixelLoss(reduction="none")(tuple(z1), tuple(z2)), single)


def test_barlow_invariant_to_pixel_order():
    g = torch.Generator().manual_seed(6)
    z1 = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(z1.shape, generator=g, dtype=torch.float64)
    perm = torch.randperm(2 * 30, generator=g)

    def shuffle(z):  # same pixel permutation (across batch items too) for both views
        flat = z.movedim(1, -1).reshape(-1, 4)[perm]
        return to_map(flat, (2, 5, 6))

    loss_fn = BarlowTwinsPixelLoss()
    torch.testing.assert_close(loss_fn(shuffle(z1), shuffle(z2)), loss_fn(z1, z2))


def test_barlow_vs_monai_differs_only_by_unbiased_std():
    """Documents why monai.losses.BarlowTwinsLoss is not reused: its C is (M - 1) / M times eq. 5."""
    from monai.losses import BarlowTwinsLoss

    g = torch.Generator().manual_seed(7)
    z1 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    z2 = z1 + torch.randn(z1.shape, generator=g, dtype=torch.float64)
    m, lambd = 32, 5e-3
    corr = pixel_cross_correlation(z1, z2) * (m - 1) / m
    off = ~torch.eye(3, dtype=torch.bool)
    scaled = (1 - torch.diagonal(corr)).pow(2).sum() + lambd * corr[off].pow(2).sum()
    flat1, flat2 = z1.movedim(1, -1).reshape(m, 3), z2.movedim(1, -1).reshape(m, 3)
    monai_val = BarlowTwinsLoss(lambd=lambd)(flat1, flat2)
    torch.testing.assert_close(monai_val, scaled, rtol=1e-4, atol=1e-8)
    assert abs(monai_val.item() - BarlowTwinsPixelLoss(lambd=lambd)(z1, z2).item()) > 1e-4


def test_barlow_constant_channel_is_finite():
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    z[:, 1] = 2.0
    z.requires_grad_(True)
    loss = BarlowTwinsPixelLoss()(z, z)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert loss.item() == pytest.approx(1.0, abs=1e-2)  # the dead channel has C_ii = 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_barlow_half_precision_many_pixels(dtype):
    z = torch.randn(1, 2, 300, 300).to(dtype)  # sum of squares over M = 90000 pixels > fp16 max
    loss = BarlowTwinsPixelLoss()(z, z)
    assert torch.isfinite(loss) and loss.item() < 1e-2


def test_barlow_bad_inputs():
    loss_fn = BarlowTwinsPixelLoss()
    with pytest.raises(ValueError):
        loss_fn(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError):
        loss_fn([torch.randn(2, 3, 4, 4)], [])
    with pytest.raises(ValueError):
        loss_fn(torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError):
        BarlowTwinsPixelLoss(lambd=-1.0)


# --------------------------------------------------------------------------------------------------
# LabelConsistencyLoss
# --------------------------------------------------------------------------------------------------


def random_pixels(seed, n1=9, n2=8, c=4, num_classes=3, datasets=2):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n1, c, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n2, c, generator=g, dtype=torch.float64, requires_grad=True)
    y1 = torch.randint(0, num_classes, (n1,), generator=g)
    y2 = torch.randint(0, num_classes, (n2,), generator=g)
    d1 = torch.randint(0, datasets, (n1,), generator=g)
    d2 = torch.randint(0, datasets, (n2,), generator=g)
    return z1, y1, z2, y2, d1, d2


@pytest.mark.parametrize("mode", ["global", "anchor"])
@pytest.mark.parametrize("with_datasets", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_label_loss_matches_loop_reference(mode, with_datasets, cross):
    for seed in range(3):
        z1, y1, z2, y2, d1, d2 = random_pixels(seed)
        if not with_datasets:
            d1 = d2 = None
        loss_fn = LabelConsistencyLoss(temperature=0.1, mode=mode, contrast_background_across_datasets=cross)
        loss = loss_fn(z1, y1, z2, y2, d1, d2)
        ref = ref_label_loss(z1, y1, z2, y2, d1, d2, tau=0.1, mode=mode, cross=cross)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        for a, b in zip(torch.autograd.grad(loss, (z1, z2)), torch.autograd.grad(ref, (z1, z2)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_label_relation_masks_by_hand():
    y1 = torch.tensor([0, 1, 1, 0])
    d1 = torch.tensor([0, 0, 1, 1])
    y2 = torch.tensor([0, 1, 2])
    d2 = torch.tensor([0, 0, 0])
    pos, neg = label_relation(y1, y2, d1, d2)
    # rows: bg(A), 1(A), 1(B), bg(B); cols: bg(A), 1(A), 2(A)
    assert pos.tolist() == [[False] * 3, [False, True, False], [False] * 3, [False] * 3]
    assert neg.tolist() == [
        [False, True, True],  # bg(A) vs bg: excluded; vs fg of A: negative
        [True, False, True],
        [False, True, True],  # class 1 of B vs class 1 of A: negative (namespaces); vs bg of A: excluded
        [False, False, False],  # bg(B) vs bg: excluded; vs fg of A: excluded (other dataset)
    ]


def test_label_loss_hand_value_and_background_pairs_ignored():
    tau = 0.1
    a = c = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # foreground class 1, cos(a, c) = 1
    y1, y2 = torch.tensor([1, 0]), torch.tensor([1, 0])
    expected = math.log(1 + 2 * math.exp(-1 / tau))  # -log(e^{10} / (e^{10} + e^0 + e^0))
    values, values_no_bg_rule = [], []
    for angle in [0.0, 0.7, 1.6, 3.0]:
        # background pixels b, e orthogonal to a, c; only their mutual angle (a bg-bg pair) varies
        b = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
        e = torch.tensor([0.0, math.cos(angle), math.sin(angle)], dtype=torch.float64)
        z1, z2 = torch.stack([a, b]), torch.stack([c, e])
        values.append(LabelConsistencyLoss(temperature=tau)(z1, y1, z2, y2).item())
        values_no_bg_rule.append(LabelConsistencyLoss(temperature=tau, background=None)(z1, y1, z2, y2).item())
    assert values == pytest.approx([expected] * 4, rel=1e-12)
    # the test can fail: treating background as a class makes the loss depend on the bg-bg pair
    assert max(values_no_bg_rule) > 1.5 * min(values_no_bg_rule)


def test_label_loss_background_only_features_do_not_matter():
    g = torch.Generator().manual_seed(11)
    z1, y1, z2, y2, d1, d2 = random_pixels(11)
    # add background pixels of a third dataset (no foreground there): they only meet bg or other datasets
    extra = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y1b, d1b = torch.cat([y1, torch.zeros(3, dtype=torch.long)]), torch.cat([d1, torch.full((3,), 2)])
    loss_fn = LabelConsistencyLoss()
    base = loss_fn(torch.cat([z1, extra]), y1b, z2, y2, d1b, d2)
    moved = loss_fn(torch.cat([z1, 5 * torch.randn(3, 4, generator=g, dtype=torch.float64)]), y1b, z2, y2, d1b, d2)
    torch.testing.assert_close(base, moved)
    torch.testing.assert_close(base, loss_fn(z1, y1, z2, y2, d1, d2))


def test_label_loss_separates_dataset_namespaces():
    tau = 0.1
    z1 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # class 1 of dataset 0
    z2 = torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)  # class 1 of dataset 0, class 1 of dataset 1
    y1, y2 = torch.tensor([1]), torch.tensor([1, 1])
    d1, d2 = torch.tensor([0]), torch.tensor([0, 1])
    loss = LabelConsistencyLoss(temperature=tau)(z1, y1, z2, y2, d1, d2)
    expected = -math.log(math.exp(0.6 / tau) / (math.exp(0.6 / tau) + math.exp(0.0 / tau)))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # without namespaces both pairs would be positives and the loss 0
    assert LabelConsistencyLoss(temperature=tau)(z1, y1, z2, y2).item() == pytest.approx(0.0, abs=1e-12)


def test_label_loss_cross_dataset_background_rule():
    tau = 0.5
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # class 1 (A), background (A)
    z2 = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)  # class 1 (A), class 2 (B)
    y1, d1 = torch.tensor([1, 0]), torch.tensor([0, 0])
    y2, d2 = torch.tensor([1, 2]), torch.tensor([0, 1])
    s = {("a", "c"): 1.0, ("a", "e"): 0.6, ("b", "c"): 0.0, ("b", "e"): 0.8}
    pos = math.exp(s["a", "c"] / tau)
    excluded = -math.log(pos / (pos + math.exp(s["a", "e"] / tau) + math.exp(s["b", "c"] / tau)))
    included = -math.log(pos / (pos + sum(math.exp(s[k] / tau) for k in [("a", "e"), ("b", "c"), ("b", "e")])))
    default = LabelConsistencyLoss(temperature=tau)(z1, y1, z2, y2, d1, d2).item()
    crossed = LabelConsistencyLoss(temperature=tau, contrast_background_across_datasets=True)(z1, y1, z2, y2, d1, d2)
    assert default == pytest.approx(excluded, rel=1e-12)
    assert crossed.item() == pytest.approx(included, rel=1e-12)


def test_namespace_labels_helper_and_equivalence():
    labels = torch.tensor([0, 1, 2, 0, 1, 3])
    ds = torch.tensor([0, 0, 0, 1, 1, 1])
    assert namespace_labels(labels, ds, [2, 3]).tolist() == [0, 1, 2, 0, 3, 5]
    with pytest.raises(ValueError):
        namespace_labels(torch.tensor([3]), torch.tensor([0]), [2, 3])
    # namespaced labels without ids == raw labels with ids when bg-fg pairs are contrasted everywhere
    z1, y1, z2, y2, d1, d2 = random_pixels(12)
    loss_fn = LabelConsistencyLoss(contrast_background_across_datasets=True)
    with_ids = loss_fn(z1, y1, z2, y2, d1, d2)
    namespaced = loss_fn(z1, namespace_labels(y1, d1, [2, 2]), z2, namespace_labels(y2, d2, [2, 2]))
    torch.testing.assert_close(with_ids, namespaced)


@pytest.mark.parametrize("mode", ["global", "anchor"])
def test_label_loss_permutation_invariance(mode):
    z1, y1, z2, y2, d1, d2 = random_pixels(13, n1=12, n2=10)
    g = torch.Generator().manual_seed(0)
    p1, p2 = torch.randperm(12, generator=g), torch.randperm(10, generator=g)
    loss_fn = LabelConsistencyLoss(mode=mode)
    torch.testing.assert_close(loss_fn(z1[p1], y1[p1], z2[p2], y2[p2], d1[p1], d2[p2]), loss_fn(z1, y1, z2, y2, d1, d2))


@pytest.mark.parametrize("mode", ["global", "anchor"])
def test_label_loss_nothing_valid_returns_zero_with_grad(mode):
    z1 = torch.randn(4, 3, requires_grad=True)
    z2 = torch.randn(5, 3, requires_grad=True)
    loss_fn = LabelConsistencyLoss(mode=mode)
    for y1, y2 in [(torch.zeros(4), torch.zeros(5)), (torch.tensor([1, 1, 0, 0]), torch.tensor([2, 2, 0, 0, 2]))]:
        loss = loss_fn(z1, y1, z2, y2)  # only bg-bg pairs; then only negatives
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.count_nonzero(z1.grad) == 0 and torch.count_nonzero(z2.grad) == 0


def test_label_loss_anchor_mode_skips_anchors_without_positive():
    z1, y1, z2, y2, _, _ = random_pixels(14)
    y1 = y1.clone()
    y1[0] = 7  # a class absent from view 2: anchor 0 has negatives but no positive
    loss_fn = LabelConsistencyLoss(mode="anchor")
    keep = torch.arange(1, y1.numel())
    torch.testing.assert_close(loss_fn(z1, y1, z2, y2), loss_fn(z1[keep], y1[keep], z2, y2))


def test_label_loss_bad_inputs():
    loss_fn = LabelConsistencyLoss()
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 1])
    with pytest.raises(ValueError):
        loss_fn(z, y, torch.randn(3, 5), y)
    with pytest.raises(ValueError):
        loss_fn(z, y[:2], z, y)
    with pytest.raises(ValueError):
        loss_fn(z, y, z, y, d1=torch.zeros(3))
    with pytest.raises(ValueError):
        LabelConsistencyLoss(temperature=0.0)
    with pytest.raises(ValueError):
        LabelConsistencyLoss(mode="pixel")
