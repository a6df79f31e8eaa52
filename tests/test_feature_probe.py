"""Feature probes (medcl.metrics.feature_probe) against slow references written from their definitions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from monai.networks.nets import BasicUNet

from medcl.metrics.feature_probe import (
    balanced_accuracy,
    knn_predict,
    layer_features,
    linear_probe_predict,
    sample_pixels,
)


def _knn_reference(train_x, train_y, test_x, k):
    """One test point at a time: cosine similarity to every training point, sort, count the k first, vote."""
    out = []
    for t in test_x.tolist():
        sims = []
        for x, y in zip(train_x.tolist(), train_y.tolist(), strict=True):
            dot = sum(a * b for a, b in zip(t, x, strict=True))
            norm = math.sqrt(sum(a * a for a in t)) * math.sqrt(sum(b * b for b in x))
            sims.append((dot / norm, y))
        top = [y for _, y in sorted(sims, key=lambda s: -s[0])[:k]]
        counts = {c: top.count(c) for c in set(top)}
        best = max(counts.values())
        out.append(min(c for c, n in counts.items() if n == best))
    return torch.tensor(out)


def test_knn_matches_the_definition():
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(60, 5, generator=gen), torch.randn(25, 5, generator=gen)
    train_y = torch.randint(0, 4, (60,), generator=gen)
    for k in (1, 4, 7):
        assert torch.equal(knn_predict(train_x, train_y, test_x, k=k), _knn_reference(train_x, train_y, test_x, k))


def test_knn_tie_goes_to_the_smallest_class():
    train_x = torch.tensor([[1.0, 0.0], [1.0, 0.01]])
    train_y = torch.tensor([3, 1])
    assert knn_predict(train_x, train_y, torch.tensor([[1.0, 0.005]]), k=2).tolist() == [1]


def test_balanced_accuracy_by_hand():
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    acc, per_class = balanced_accuracy(pred, target)
    assert per_class == {0: 0.75, 1: 0.5, 2: 1.0}
    assert acc == pytest.approx((0.75 + 0.5 + 1.0) / 3)


def test_linear_probe_separates_separable_classes_and_not_xor():
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    y = torch.arange(3).repeat_interleave(40)
    x = centres[y] + 0.5 * torch.randn(120, 2, generator=gen)
    acc, _ = balanced_accuracy(linear_probe_predict(x, y, x), y)
    assert acc == 1.0
    # XOR: no linear boundary exists, so the probe stays near chance while k-NN reads it off
    corners = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    cy = torch.tensor([0, 0, 1, 1]).repeat_interleave(30)
    cx = corners.repeat_interleave(30, 0) + 0.1 * torch.randn(120, 2, generator=gen)
    lin, _ = balanced_accuracy(linear_probe_predict(cx, cy, cx), cy)
    knn, _ = balanced_accuracy(knn_predict(cx, cy, cx, k=5), cy)
    assert lin < 0.8 and knn == 1.0


def test_sample_pixels_draws_per_class_and_keeps_pairs():
    feats = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    labels = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    labels[0, 0, :2, :2] = 1  # 4 pixels of class 1, 28 of class 0
    x, y = sample_pixels(feats, labels, per_class=6, generator=torch.Generator().manual_seed(0))
    assert (y == 0).sum() == 6 and (y == 1).sum() == 4
    # every drawn row is the feature vector of a pixel of its class
    for row, cls in zip(x, y, strict=True):
        n, i, j = [int(v) for v in torch.nonzero(feats[:, 0] == row[0])[0]]
        assert torch.equal(feats[n, :, i, j], row) and labels[n, 0, i, j] == cls


def test_layer_features_are_the_modules_output_resized():
    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=3, features=(4, 4, 8, 8, 16, 4))
    images = torch.rand(3, 1, 32, 32)
    feats = layer_features(net, images, "down_1", batch_size=2)
    assert feats.shape == (3, 4, 32, 32)
    with torch.no_grad():
        direct = net.down_1(net.conv_0(images))
    assert torch.allclose(feats, torch.nn.functional.interpolate(direct, size=(32, 32), mode="bilinear"), atol=1e-5)
    with pytest.raises(KeyError, match="top-level modules"):
        layer_features(net, images, "nope")


def test_probe_script_on_the_phantom(phantom_dir, tmp_path, capsys):
    """scripts/probe_features.py end to end: rows for intensity, random init and a checkpoint, balanced accuracies
    in [0, 1]; a checkpoint equal to the random init probes identically (same features, same draws)."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import probe_features
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(probe_features.REPO / "bundles" / "macl" / "configs" / "train.json"))
    parser.update({"dataset_dir": str(phantom_dir), "features": [4, 4, 8, 8, 16, 4]})
    torch.manual_seed(0)
    ckpt = tmp_path / "same_as_random.pt"
    torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, ckpt)
    probe_features.main(
        bundle="macl",
        dataset_dir=str(phantom_dir),
        ckpts={"same": str(ckpt)},
        num_labelled=1,
        test_fraction=0.0,
        per_class=30,
        overrides={"features": [4, 4, 8, 8, 16, 4]},
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["features"] for r in rows] == ["intensity_5x5", "random_init", "same"]
    for r in rows:
        assert 0.0 <= r["knn_balanced_acc"] <= 1.0 and 0.0 <= r["linear_balanced_acc"] <= 1.0
    assert rows[1]["knn_recall"] == rows[2]["knn_recall"]
    assert rows[1]["linear_balanced_acc"] == rows[2]["linear_balanced_acc"]
