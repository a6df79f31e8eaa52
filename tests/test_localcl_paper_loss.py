"""The local contrastive loss against a reference written from the paper's equation (Chaitanya et al., MedIA 2023).

Paper: for a pair of images, for every class c present in both, a set R_c of sampled anchor pixels (n per class
and image); each anchor's positive is the mean embedding of class c (over all its pixels), its negatives the mean
embeddings of the other (foreground) classes; the loss of one positive is
-log(exp(sim(z, mu_pos)/tau) / (exp(sim(z, mu_pos)/tau) + sum_neg exp(sim(z, mu_neg)/tau))) and the pair's loss is
1/|C| sum_c 1/|R_c| sum_{a in R_c} (sum over the anchor's positives), averaged over pairs. "intra": positive and
negatives from the anchor's own image; "inter": the class means of both images of the pair are positives, the
other classes' means of both images negatives. The reference below loops over pixels, classes, anchors and
negatives with scalar torch operations; it never calls the module's code.
"""

from __future__ import annotations

import math

import pytest
import torch

from medcl.errors import MedclInputError
from medcl.losses.local_contrastive import LocalContrastiveLoss

TAU = 0.1
BG = 0


def _cos(a, b):
    dot = sum(a[k] * b[k] for k in range(len(a)))
    return dot / (math.sqrt(1e-300) + torch.sqrt(sum(x * x for x in a)) * torch.sqrt(sum(x * x for x in b)))


def _class_mean(emb, lab, b, k):
    """mu_b^k: mean embedding over every pixel of class k in image b (explicit loop over pixels)."""
    ch, npix = emb.shape[1], lab[b].numel()
    flat_lab = lab[b].reshape(-1).tolist()
    flat = emb[b].reshape(ch, npix)
    members = [p for p in range(npix) if flat_lab[p] == k]
    total = [sum(flat[c, p] for p in members) for c in range(ch)]
    return [t / len(members) for t in total]


def paper_loss(emb, lab, pairs, anchors, positives="inter", denominator="paper", normalizer="paper"):
    """The paper's equation (``denominator="paper"``, ``normalizer="paper"``); the other values give the public
    code's forms for comparison: ``denominator="shared"``: one denominator over every foreground class mean of the
    positives' images (both positives included), ``normalizer="code"``: sum over anchors / (n |C| |V|)."""
    bsz, ch = emb.shape[:2]
    labels = [lab[b].reshape(-1).tolist() for b in range(bsz)]
    pair_losses = []
    for q, (x, xp) in enumerate(pairs):
        present = {b: {v for v in labels[b] if v != BG} for b in (x, xp)}
        shared = sorted(present[x] & present[xp])
        if not shared:
            continue
        mu = {(b, k): _class_mean(emb, lab, b, k) for b in (x, xp) for k in present[b]}
        per_class = []
        n_anchors_total = 0
        for c in shared:
            r_c = [(x, int(a)) for a in anchors[q][0] if labels[x][int(a)] == c]
            r_c += [(xp, int(a)) for a in anchors[q][1] if labels[xp][int(a)] == c]
            n_anchors_total += len(r_c)
            total = 0.0
            for u, a in r_c:
                z = [emb[u].reshape(ch, -1)[k, a] for k in range(ch)]
                views = [x, xp] if positives == "inter" else [u]
                for v in views:
                    pos = torch.exp(_cos(z, mu[(v, c)]) / TAU)
                    if denominator == "paper":
                        den = pos
                        for w in views:
                            for k in sorted(present[w]):
                                if k != c:
                                    den = den + torch.exp(_cos(z, mu[(w, k)]) / TAU)
                    else:
                        den = 0.0
                        for w in views:
                            for k in sorted(present[w]):
                                den = den + torch.exp(_cos(z, mu[(w, k)]) / TAU)
                    total = total - torch.log(pos / den)
            per_class.append((total, len(r_c)))
        if normalizer == "paper":
            pair_losses.append(sum(t / m for t, m in per_class) / len(shared))
        else:
            n_views = 2 if positives == "inter" else 1
            pair_losses.append(sum(t for t, _ in per_class) / (n_anchors_total / 2 * n_views))
    return sum(pair_losses) / len(pair_losses)


def _case(spatial=(5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(4, 3, *spatial, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 4, (4, 1, *spatial), generator=g)
    lab[1][lab[1] == 3] = 2  # class 3 absent from image 1: not shared in pairs with image 1, still a negative
    for b in range(4):
        lab[b].view(-1)[:3] = torch.tensor([1, 2, 3 if b != 1 else 1])
    return emb, lab


PAIRS = [(0, 1), (2, 3), (1, 3)]


def _fast(emb, lab, anchors, **kw):
    return LocalContrastiveLoss(temperature=TAU, **kw)(emb, lab, pairs=torch.tensor(PAIRS), anchors=anchors)


@pytest.mark.parametrize("spatial", [(5, 6), (3, 3, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("positives", ["inter", "intra"])
def test_paper_option_matches_the_equation(spatial, positives, one_thread):
    emb, lab = _case(spatial)
    loss = LocalContrastiveLoss(num_anchors=3)
    anchors = loss.sample_anchors(lab, torch.tensor(PAIRS), generator=torch.Generator().manual_seed(3))
    e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    got = _fast(e1, lab, anchors, positives=positives, denominator="per_positive", normalizer="paper")
    want = paper_loss(e2, lab, PAIRS, anchors, positives=positives)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (g1,) = torch.autograd.grad(got, e1)
    (g2,) = torch.autograd.grad(want, e2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    assert g1.abs().sum() > 0


@pytest.mark.parametrize("positives", ["inter", "intra"])
def test_default_is_the_code_form_and_differs_from_the_paper_where_documented(positives, one_thread):
    emb, lab = _case()
    anchors = LocalContrastiveLoss().sample_anchors(
        lab, torch.tensor(PAIRS), generator=torch.Generator().manual_seed(4)
    )
    e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    default = _fast(e1, lab, anchors, positives=positives)
    code = paper_loss(e2, lab, PAIRS, anchors, positives=positives, denominator="shared", normalizer="code")
    torch.testing.assert_close(default, code, rtol=1e-10, atol=1e-12)
    (g1,) = torch.autograd.grad(default, e1)
    (g2,) = torch.autograd.grad(code, e2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    paper = paper_loss(emb, lab, PAIRS, anchors, positives=positives)
    if positives == "intra":
        # one positive: the denominators agree; the code divides by n|C| anchors per image pair -> twice the mean
        torch.testing.assert_close(default, 2 * paper, rtol=1e-10, atol=1e-12)
    else:
        # two positives: the code's shared denominator holds both positives, so each term is larger than the paper's
        assert float(default.detach()) > float(paper) + 1e-3
        same_den = paper_loss(emb, lab, PAIRS, anchors, positives="inter", denominator="shared")
        torch.testing.assert_close(default, same_den, rtol=1e-10, atol=1e-12)  # normalisers agree for "inter"


def test_misspelt_values_name_the_allowed_ones():
    with pytest.raises(MedclInputError, match="per_positive"):
        LocalContrastiveLoss(denominator="paper")
    with pytest.raises(MedclInputError, match="code, paper"):
        LocalContrastiveLoss(normalizer="papr")
    with pytest.raises(MedclInputError, match="inter, intra"):
        LocalContrastiveLoss(positives="both")
    with pytest.raises(MedclInputError, match="num_classes"):
        LocalContrastiveLoss(normalizer="paper", num_classes=4)
