"""Tests of the local contrastive loss (Chaitanya et al., MedIA 2023) and its contrastive head."""

from __future__ import annotations

import math

import pytest
import torch

from medcl.losses.local_contrastive import LocalContrastiveLoss, make_pairs
from medcl.networks.contrastive_head import ContrastiveHead

# --------------------------------------------------------------------------------------------------
# slow, obvious reference
# --------------------------------------------------------------------------------------------------


def ref_cos(a, b):
    dot = sum(a[k] * b[k] for k in range(a.shape[0]))
    na = torch.sqrt(sum(a[k] ** 2 for k in range(a.shape[0])))
    nb = torch.sqrt(sum(b[k] ** 2 for k in range(b.shape[0])))
    return dot / (na * nb)


def ref_pair_losses(emb, lab, pairs, anchors, tau=0.1, bg=0, positives="inter", num_classes=None, n=3):
    """Per-pair losses written as plain loops over pixels, classes and anchors (labels at embedding size)."""
    bsz, c = emb.shape[:2]
    zf = emb.reshape(bsz, c, -1)
    lf = lab.reshape(bsz, -1).tolist()
    npix = zf.shape[2]

    def classes_of(b):
        return {v for v in lf[b] if v != bg}

    def mean(b, k):
        members = [p for p in range(npix) if lf[b][p] == k]
        return sum(zf[b, :, p] for p in members) / len(members)

    out = []
    for q, (i, j) in enumerate(pairs):
        fg = {i: classes_of(i), j: classes_of(j)}
        total, count = 0.0, 0
        for u, other, idxs in ((i, j, anchors[q][0]), (j, i, anchors[q][1])):
            for a in [int(x) for x in idxs]:
                cl = lf[u][a]
                if cl == bg or cl not in fg[i] or cl not in fg[j]:
                    continue
                views = [u, other] if positives == "inter" else [u]
                z = zf[u, :, a]
                den = 0.0
                for w in views:
                    for k in sorted(fg[w]):
                        den = den + torch.exp(ref_cos(z, mean(w, k)) / tau)
                for v in views:
                    total = total - torch.log(torch.exp(ref_cos(z, mean(v, cl)) / tau) / den)
                count += 1
        n_views = 2 if positives == "inter" else 1
        if num_classes is not None:
            out.append(total / (n * (num_classes - 1) * n_views))
        elif count == 0:
            out.append(None)
        else:
            out.append(total / (count * n_views / 2))
    return out


def ref_loss(*args, num_classes=None, **kwargs):
    losses = ref_pair_losses(*args, num_classes=num_classes, **kwargs)
    if num_classes is not None:
        return sum(losses) / len(losses)
    valid = [v for v in losses if v is not None]
    return sum(valid) / len(valid)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def make_case(spatial=(4, 5), bsz=4, ch=3, seed=0):
    """Random embeddings, labels 0..3 with class 3 missing from image 1 and class 2 missing from image 3."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(bsz, ch, *spatial, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 4, (bsz, 1, *spatial), generator=g)
    lab[1][lab[1] == 3] = 1
    lab[3][lab[3] == 2] = 0
    for b in range(bsz):  # make sure classes 1 and 2 (when allowed) appear
        flat = lab[b].reshape(-1)
        flat[0], flat[1] = 1, 2 if b != 3 else 1
    return emb, lab


def random_anchors(lab, pairs, per_image=7, seed=1):
    """Fixed anchors on arbitrary pixels (background and unshared classes included: they must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    npix = lab[0].numel()
    return [tuple(torch.randint(0, npix, (per_image,), generator=g) for _ in range(2)) for _ in pairs]


PAIRS = [(0, 1), (2, 3), (1, 2)]

# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(4, 5), (3, 3, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("positives", ["inter", "intra"])
def test_matches_loop_reference_values_and_gradients(spatial, positives):
    emb, lab = make_case(spatial)
    anchors = random_anchors(lab, PAIRS)
    loss_fn = LocalContrastiveLoss(temperature=0.1, positives=positives)
    e1 = emb.clone().requires_grad_(True)
    out = loss_fn(e1, lab, pairs=torch.tensor(PAIRS), anchors=anchors)
    (g1,) = torch.autograd.grad(out, e1)
    e2 = emb.clone().requires_grad_(True)
    ref = ref_loss(e2, lab, PAIRS, anchors, positives=positives)
    (g2,) = torch.autograd.grad(ref, e2)
    assert out.dtype == torch.float64 and out.ndim == 0
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_reduction_none_and_sum_and_nominal_normaliser():
    emb, lab = make_case()
    anchors = random_anchors(lab, PAIRS)
    pairs = torch.tensor(PAIRS)
    per_pair = LocalContrastiveLoss(reduction="none")(emb, lab, pairs=pairs, anchors=anchors)
    ref = ref_pair_losses(emb, lab, PAIRS, anchors)
    assert per_pair.shape == (3,)
    for got, want in zip(per_pair, ref, strict=True):
        torch.testing.assert_close(got, want if want is not None else torch.zeros((), dtype=torch.float64))
    total = LocalContrastiveLoss(reduction="sum")(emb, lab, pairs=pairs, anchors=anchors)
    torch.testing.assert_close(total, per_pair.sum())
    # the code's nominal divisor n (K - 1) |V| and mean over all pairs
    nominal = LocalContrastiveLoss(num_classes=4, num_anchors=3)(emb, lab, pairs=pairs, anchors=anchors)
    torch.testing.assert_close(nominal, ref_loss(emb, lab, PAIRS, anchors, num_classes=4, n=3))


def test_nominal_equals_valid_when_every_class_is_in_every_image():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 3, (4, 1, 6, 6), generator=g)
    lab[:, 0, 0, :3] = torch.tensor([0, 1, 2])
    a = LocalContrastiveLoss(num_anchors=3)(emb, lab, generator=torch.Generator().manual_seed(0))
    b = LocalContrastiveLoss(num_anchors=3, num_classes=3)(emb, lab, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_background_embeddings_do_not_matter():
    emb, lab = make_case()
    anchors = random_anchors(lab, PAIRS)
    loss_fn = LocalContrastiveLoss()
    base = loss_fn(emb, lab, pairs=torch.tensor(PAIRS), anchors=anchors)
    changed = emb.clone()
    bg = (lab == 0).expand_as(emb)
    changed[bg] = torch.randn(int(bg.sum()), dtype=torch.float64) * 10
    torch.testing.assert_close(loss_fn(changed, lab, pairs=torch.tensor(PAIRS), anchors=anchors), base)
    e = emb.clone().requires_grad_(True)
    loss_fn(e, lab, pairs=torch.tensor(PAIRS), anchors=anchors).backward()
    assert torch.all(e.grad[bg] == 0)
    # background=None makes label 0 a class: the loss changes
    other = LocalContrastiveLoss(background=None)(emb, lab, pairs=torch.tensor(PAIRS), anchors=anchors)
    assert not torch.isclose(other, base)


def test_absent_and_unshared_classes_add_nothing():
    emb, lab = make_case()
    pairs = torch.tensor([[0, 1]])  # class 3 is in image 0 but not in image 1
    loss_fn = LocalContrastiveLoss()
    flat0, flat1 = lab[0].reshape(-1), lab[1].reshape(-1)
    shared0 = torch.nonzero((flat0 == 1) | (flat0 == 2)).reshape(-1)[:4]
    shared1 = torch.nonzero((flat1 == 1) | (flat1 == 2)).reshape(-1)[:4]
    unshared0 = torch.nonzero(flat0 == 3).reshape(-1)
    assert unshared0.numel() > 0
    base = loss_fn(emb, lab, pairs=pairs, anchors=[(shared0, shared1)])
    with_unshared = loss_fn(emb, lab, pairs=pairs, anchors=[(torch.cat([shared0, unshared0]), shared1)])
    torch.testing.assert_close(with_unshared, base)
    # a class present in neither image of the pair (only elsewhere in the batch) changes nothing
    lab_extra = lab.clone()
    lab_extra[2:, :, :2, :2] = 5
    assert torch.isclose(loss_fn(emb, lab_extra, pairs=pairs, anchors=[(shared0, shared1)]), base)
    ref = ref_loss(emb, lab, [(0, 1)], [(shared0, shared1)])
    torch.testing.assert_close(base, ref)
    # a pair with no shared foreground class is left out of the mean
    lab2 = lab.clone()
    lab2[2] = 0
    lab2[2, 0, 0, 0] = 3
    lab2[3] = torch.where(lab2[3] == 3, torch.ones_like(lab2[3]), lab2[3])  # image 3 has no class 3
    two = torch.tensor([[0, 1], [2, 3]])
    anchors = [(shared0, shared1), (torch.arange(20), torch.arange(20))]
    got = loss_fn(emb, lab2, pairs=two, anchors=anchors)
    torch.testing.assert_close(got, loss_fn(emb, lab2, pairs=pairs, anchors=anchors[:1]))


def test_nothing_valid_gives_zero_with_grad():
    emb = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    lab = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    loss = LocalContrastiveLoss()(emb, lab)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(emb.grad == 0)
    # foreground present but no class shared by the pair
    lab[0, 0, 0, 0], lab[1, 0, 0, 0] = 1, 2
    emb.grad = None
    loss = LocalContrastiveLoss()(emb, lab)
    assert loss.item() == 0.0 and loss.requires_grad
    none = LocalContrastiveLoss(reduction="none")(emb, lab)
    assert none.shape == (1,) and none.item() == 0.0


def test_pixel_permutation_invariance():
    emb, lab = make_case((4, 6))
    anchors = random_anchors(lab, PAIRS)
    g = torch.Generator().manual_seed(5)
    bsz, ch = emb.shape[:2]
    perms = [torch.randperm(24, generator=g) for _ in range(bsz)]
    emb_p = torch.stack([emb[b].reshape(ch, -1)[:, perms[b]] for b in range(bsz)]).reshape(emb.shape)
    lab_p = torch.stack([lab[b].reshape(1, -1)[:, perms[b]] for b in range(bsz)]).reshape(lab.shape)
    inv = [torch.argsort(p) for p in perms]  # new position of old pixel k is inv[k]
    anchors_p = [(inv[i][a], inv[j][b]) for (i, j), (a, b) in zip(PAIRS, anchors, strict=True)]
    loss_fn = LocalContrastiveLoss()
    torch.testing.assert_close(
        loss_fn(emb_p, lab_p, pairs=torch.tensor(PAIRS), anchors=anchors_p),
        loss_fn(emb, lab, pairs=torch.tensor(PAIRS), anchors=anchors),
    )


@pytest.mark.parametrize("spatial", [(5, 5), (3, 4, 5)], ids=["2d", "3d"])
def test_positive_scale_invariance(spatial):
    emb, lab = make_case(spatial)
    loss_fn = LocalContrastiveLoss()
    a = loss_fn(emb, lab, generator=torch.Generator().manual_seed(0))
    b = loss_fn(emb * 7.3, lab, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_separated_clusters_give_lower_loss_than_mixed():
    g = torch.Generator().manual_seed(0)
    lab = torch.zeros(4, 1, 8, 8, dtype=torch.long)
    lab[:, :, :4, :] = 1
    lab[:, :, 4:, :4] = 2
    centres = {0: torch.tensor([0.0, 0.0, 1.0]), 1: torch.tensor([1.0, 0.0, 0.0]), 2: torch.tensor([0.0, 1.0, 0.0])}
    sep = torch.zeros(4, 3, 8, 8)
    for k, cvec in centres.items():
        mask = (lab == k).expand_as(sep)
        sep[mask] = (cvec[None, :, None, None].expand_as(sep) + 0.05 * torch.randn(sep.shape, generator=g))[mask]
    mixed = torch.randn(4, 3, 8, 8, generator=g)
    loss_fn = LocalContrastiveLoss()
    low = loss_fn(sep, lab, generator=torch.Generator().manual_seed(1))
    high = loss_fn(mixed, lab, generator=torch.Generator().manual_seed(1))
    assert low < high
    # inter: per anchor 2 * log(2K') - ... is bounded below by 2 log 2 (positive appears once per image)
    assert low.item() < 2 * math.log(2) + 0.1


def test_label_resizing_to_embedding_resolution():
    emb, lab = make_case((4, 5))
    lab_hr = lab.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (B, 1, 8, 10)
    loss_fn = LocalContrastiveLoss()
    a = loss_fn(emb, lab, generator=torch.Generator().manual_seed(2))
    b = loss_fn(emb, lab_hr, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    b3 = loss_fn(emb, lab_hr.float(), generator=torch.Generator().manual_seed(2))  # float label maps
    torch.testing.assert_close(a, b3)


def test_deterministic_with_generator_and_sample_anchors():
    emb, lab = make_case((6, 6))
    loss_fn = LocalContrastiveLoss(num_anchors=3)
    a = loss_fn(emb, lab, generator=torch.Generator().manual_seed(11))
    b = loss_fn(emb, lab, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    anchors = loss_fn.sample_anchors(lab, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(loss_fn(emb, lab, anchors=anchors), a)
    # n anchors per class shared by the pair, in each image, of the right class
    flat = lab.reshape(4, -1)
    for (i, j), (first, second) in zip(make_pairs(4).tolist(), anchors, strict=True):
        shared = sorted((set(flat[i].tolist()) & set(flat[j].tolist())) - {0})
        assert flat[i][first].tolist() == [c for c in shared for _ in range(3)]
        assert flat[j][second].tolist() == [c for c in shared for _ in range(3)]
    # without replacement: distinct pixels when the class is large enough
    big = torch.zeros(2, 1, 6, 6, dtype=torch.long)
    big[:, :, :3] = 1
    big[:, :, 3:, :3] = 2  # 18 and 9 pixels: 4 distinct anchors each without replacement
    no_rep = LocalContrastiveLoss(num_anchors=4, anchor_replacement=False)
    for seed in range(5):
        ((first, second),) = no_rep.sample_anchors(big, generator=torch.Generator().manual_seed(seed))
        for idx in (first, second):
            assert idx.numel() == 8 and torch.unique(idx).numel() == 8
            assert big.reshape(2, -1)[0][idx].tolist() == [1] * 4 + [2] * 4


def test_pair_layouts():
    assert make_pairs(4).tolist() == [[0, 1], [2, 3]]
    assert make_pairs(6, "halves").tolist() == [[0, 3], [1, 4], [2, 5]]
    emb, lab = make_case()
    anchors = random_anchors(lab, [(0, 2), (1, 3)])
    loss_fn = LocalContrastiveLoss()
    torch.testing.assert_close(
        loss_fn(emb, lab, pairs="halves", anchors=anchors),
        loss_fn(emb, lab, pairs=torch.tensor([[0, 2], [1, 3]]), anchors=anchors),
    )


def test_half_precision_and_options_run():
    emb, lab = make_case()
    out = LocalContrastiveLoss()(emb.half(), lab, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    e = emb.clone().requires_grad_(True)
    LocalContrastiveLoss(detach_means=True, normalize_before_mean=True)(e, lab).backward()
    assert torch.isfinite(e.grad).all()


def test_shape_errors():
    emb, lab = make_case()
    loss_fn = LocalContrastiveLoss()
    with pytest.raises(ValueError, match="embeddings"):
        loss_fn(emb[:, :, 0], lab)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(emb, lab.repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match="batch size"):
        loss_fn(emb, lab[:2])
    with pytest.raises(ValueError, match="labels"):
        loss_fn(emb, lab[..., None])
    with pytest.raises(ValueError, match="even"):
        loss_fn(emb[:3], lab[:3])
    with pytest.raises(ValueError, match="pair"):
        loss_fn(emb, lab, pairs=torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="pairs"):
        loss_fn(emb, lab, pairs=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="anchors"):
        loss_fn(emb, lab, anchors=[(torch.tensor([0]), torch.tensor([0]))])
    with pytest.raises(ValueError, match="anchor"):
        loss_fn(emb, lab, anchors=[(torch.tensor([99]), torch.tensor([0]))] * 2)
    with pytest.raises(ValueError, match="num_classes"):
        LocalContrastiveLoss(num_classes=3)(emb, lab)
    with pytest.raises(ValueError):
        LocalContrastiveLoss(temperature=0)
    with pytest.raises(ValueError):
        LocalContrastiveLoss(positives="both")


@pytest.mark.parametrize("dims", [2, 3])
def test_contrastive_head(dims):
    head = ContrastiveHead(in_channels=8, hidden_channels=16, out_channels=4, spatial_dims=dims)
    x = torch.randn(2, 8, *([6] * dims))
    y = head(x)
    assert y.shape == (2, 4, *([6] * dims))
    names = [type(m).__name__ for m in head]
    assert names == [f"Conv{dims}d", f"BatchNorm{dims}d", "ReLU", f"Conv{dims}d"]
    assert head.conv1.bias is None and head.conv2.bias is None
    assert head.conv1.kernel_size == (1,) * dims
    assert head.norm.eps == 1e-3 and head.norm.momentum == 0.01
    # 1x1 convs: each output location depends only on the same input location
    x2 = x.clone()
    x2[(0, slice(None)) + (0,) * dims] += 1.0
    head.eval()
    diff = (head(x2) - head(x)).abs().sum(1)
    assert diff[(0,) + (0,) * dims] > 0 and diff.sum() == diff[(0,) + (0,) * dims]
    with pytest.raises(ValueError):
        head(torch.randn(2, 8, 6))
    with pytest.raises(ValueError):
        ContrastiveHead(8, 16, 4, spatial_dims=1)
