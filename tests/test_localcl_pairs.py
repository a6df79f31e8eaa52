"""LocalCLStep's pair construction (mixed / same_image / random) and class filter."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceLoss

from medcl.engines import LocalCLStep
from medcl.engines.localcl_step import intensity_view
from medcl.errors import MedclInputError


class _Recorder:
    """A stand-in local loss that records what it is given."""

    def __call__(self, embeddings, labels, pairs):
        self.embeddings, self.labels, self.pairs = embeddings, labels, pairs
        return embeddings.sum() * 0.0 + 1.0


class _Net(torch.nn.Module):
    """Embeddings = the input images (so the recorded embeddings show which image went where)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, return_embeddings=False):
        logits = torch.cat([x * self.w, -x * self.w, x * 0], dim=1)
        return (logits, x.clone()) if return_embeddings else logits


def _batch(full=(True, True), partial=(False, True), size=8):
    """Labelled and unlabelled parts; an image holding all 3 classes where ``full``/``partial`` say so."""

    def part(flags, offset):
        imgs, labs = [], []
        for k, has_all in enumerate(flags):
            lab = torch.zeros(1, size, size, dtype=torch.long)
            lab[:, :4] = 1
            if has_all:
                lab[:, 6:] = 2
            g = torch.Generator().manual_seed(offset + k)
            imgs.append(0.4 + 0.2 * torch.rand((1, size, size), generator=g))  # a distinct pattern per image
            labs.append(lab)
        return {"image": torch.stack(imgs), "label": torch.stack(labs)}

    return {"labelled": part(full, 0), "unlabelled": part(partial, len(full))}


def _run(**kw):
    rec = _Recorder()
    step = LocalCLStep(DiceLoss(to_onehot_y=True, softmax=True), rec, generator=torch.Generator().manual_seed(0), **kw)
    step(_Net(), _batch())
    return rec


def _source(rec, j, n=4):
    """The batch image whose new view is embedding ``j``: the one it is an affine copy of."""
    v = rec.embeddings[j].flatten()
    for b in range(n):
        a = rec.embeddings[b].flatten()
        c = torch.corrcoef(torch.stack([a, v]))[0, 1]
        if c > 1 - 1e-5:
            return b
    raise AssertionError("view of no batch image")


def test_same_image_pairs_each_eligible_image_with_a_view_of_itself(one_thread):
    rec = _run(pairs="same_image", num_classes=3)
    # eligible (all 3 classes): labelled 0, 1 and unlabelled 1 (batch index 3); image 2 lacks class 2
    assert sorted(rec.pairs[:, 0].tolist()) == [0, 1, 3]
    assert rec.pairs[:, 1].tolist() == [4, 5, 6]  # the appended views
    assert rec.embeddings.shape[0] == 7
    for i, j in rec.pairs.tolist():
        assert _source(rec, j) == i  # a view of the image itself ...
        assert not torch.allclose(rec.embeddings[i], rec.embeddings[j])  # ... with new brightness / contrast
        torch.testing.assert_close(rec.labels[j], rec.labels[i])


def test_same_image_views_are_affine_copies():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 8, 8) * 0.5 + 0.25
    v = intensity_view(x, generator=g, clip=None)
    for a, b in zip(x, v, strict=True):
        a, b = a.flatten(), b.flatten()
        slope = ((a - a.mean()) * (b - b.mean())).sum() / ((a - a.mean()) ** 2).sum()
        assert 0.7 - 1e-5 <= slope <= 1.3 + 1e-5  # the contrast factor
        torch.testing.assert_close(b - b.mean(), slope * (a - a.mean()))
        assert abs(float(b.mean() - a.mean())) <= 0.3 + 1e-6  # the brightness shift
    assert float(intensity_view(torch.full((1, 1, 4, 4), 5.0)).max()) == 1.5  # the code's clip to [0, 1.5]


def test_mixed_pairs_half_same_image_half_other_image(one_thread):
    rec = _run(num_classes=3)  # default: mixed
    order = rec.pairs[:, 0].tolist()
    assert sorted(order) == [0, 1, 3] and rec.pairs[:, 1].tolist() == [4, 5, 6]
    sources = [_source(rec, j) for j in rec.pairs[:, 1].tolist()]
    # ranks 0 and 2: a view of the image itself; rank 1: a view of the next eligible image in the order
    assert sources == [order[0], order[2], order[2]]
    for k, (i, j) in enumerate(rec.pairs.tolist()):
        torch.testing.assert_close(rec.labels[j], rec.labels[sources[k]])
        assert (sources[k] == i) == (k % 2 == 0)


def test_random_pairs_are_disjoint_batch_images_without_views(one_thread):
    rec = _run(pairs="random", class_filter=False)
    assert rec.embeddings.shape[0] == 4  # no extra views
    assert sorted(rec.pairs.flatten().tolist()) == [0, 1, 2, 3]
    rec = _run(pairs="random", num_classes=3)  # filter: 3 eligible images, one left unpaired
    assert rec.pairs.shape == (1, 2) and set(rec.pairs.flatten().tolist()) <= {0, 1, 3}


def test_class_filter_switch(one_thread):
    kept = sorted(_run(pairs="same_image", num_classes=3).pairs[:, 0].tolist())
    assert kept == [0, 1, 3]
    every = sorted(_run(pairs="same_image", class_filter=False).pairs[:, 0].tolist())
    assert every == [0, 1, 2, 3]
    # nothing eligible: the local term is 0 and the step still trains the Dice loss
    rec = _Recorder()
    step = LocalCLStep(DiceLoss(to_onehot_y=True, softmax=True), rec, num_classes=4)
    terms = step(_Net(), _batch())
    assert float(terms["loss_local"]) == 0.0 and not hasattr(rec, "pairs")
    assert terms["loss"].requires_grad


def test_min_classes_loosens_the_filter(one_thread):
    # image 2 holds classes {0, 1}, the others {0, 1, 2}
    assert sorted(_run(pairs="same_image", num_classes=3, min_classes=2).pairs[:, 0].tolist()) == [0, 1, 2, 3]
    assert sorted(_run(pairs="same_image", num_classes=3, min_classes=3).pairs[:, 0].tolist()) == [0, 1, 3]
    with pytest.raises(MedclInputError, match="min_classes"):
        LocalCLStep(DiceLoss(), num_classes=3, min_classes=4)


def test_misspelt_options_fail_in_the_constructor():
    with pytest.raises(MedclInputError, match="mixed, same_image, random"):
        LocalCLStep(DiceLoss(), pairs="same-image", num_classes=3)
    with pytest.raises(MedclInputError, match="num_classes"):
        LocalCLStep(DiceLoss())
