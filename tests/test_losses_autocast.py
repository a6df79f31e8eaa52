"""Every medcl loss under ``torch.autocast("cpu", dtype=torch.bfloat16)``: finite, and close to its float32 value.

Under autocast the projections that feed a contrastive loss arrive in bfloat16 (matmuls and convolutions run in
low precision), so the test casts the inputs to bfloat16 and evaluates the loss inside the autocast region, as a
training step under AMP does. A loss without a float32 guard computes its similarity matrix and ``logsumexp`` in
bfloat16 (8 bits of mantissa) and lands far from the float32 value.
"""

from __future__ import annotations

import pytest
import torch

from medcl.losses import (
    BarlowTwinsPixelLoss,
    DenseSupConLoss,
    FeatureConsistencyLoss,
    LabelConsistencyLoss,
    LocalContrastiveLoss,
    PositionalSupConLoss,
    SupConLoss,
)


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels2d = torch.zeros(4, 1, 8, 8, dtype=torch.long)
    labels2d[:, :, 2:6, 2:6] = 1
    labels2d[:, :, 5:8, 0:3] = 2
    return {
        "pixels": torch.randn(2, 16, 4, 4, 4, generator=g),  # (B, C, H, W, D) projections
        "pixels_b": torch.randn(2, 16, 4, 4, 4, generator=g),
        "vectors": torch.randn(24, 32, generator=g),  # (N, C) sampled pixel or image embeddings
        "vectors_b": torch.randn(20, 32, generator=g),
        "y1": torch.randint(0, 3, (24,), generator=g),
        "y2": torch.randint(0, 3, (20,), generator=g),
        "views": torch.randn(6, 2, 32, generator=g),  # (N, V, D)
        "positions": torch.rand(6, generator=g),
        "maps": torch.randn(4, 8, 8, 8, generator=g),  # (B, C, H, W)
        "maps_b": torch.randn(4, 8, 8, 8, generator=g),
        "labels2d": labels2d,
        "bottleneck_aux": torch.randn(2, 8, 16, 16, generator=g),
        "bottleneck_dom": torch.randn(2, 8, 4, 4, generator=g),
    }


# name -> (loss, call(loss, x, cast)): cast converts each floating input the way autocast would hand it over
LOSSES = {
    "BarlowTwinsPixelLoss": (BarlowTwinsPixelLoss(), lambda f, x, c: f(c(x["pixels"]), c(x["pixels_b"]))),
    "DenseSupConLoss": (DenseSupConLoss(), lambda f, x, c: f(c(x["maps"]), c(x["maps_b"]), x["positions"][:4])),
    "FeatureConsistencyLoss": (
        FeatureConsistencyLoss(),
        lambda f, x, c: f(c(x["bottleneck_aux"]), c(x["bottleneck_dom"])),
    ),
    "LabelConsistencyLoss": (
        LabelConsistencyLoss(),
        lambda f, x, c: f(c(x["vectors"]), x["y1"], c(x["vectors_b"]), x["y2"]),
    ),
    "LabelConsistencyLoss(anchor)": (
        LabelConsistencyLoss(mode="anchor"),
        lambda f, x, c: f(c(x["vectors"]), x["y1"], c(x["vectors_b"]), x["y2"]),
    ),
    "LocalContrastiveLoss": (
        LocalContrastiveLoss(num_anchors=3),
        lambda f, x, c: f(c(x["maps"]), x["labels2d"], generator=torch.Generator().manual_seed(0)),
    ),
    "PositionalSupConLoss": (PositionalSupConLoss(), lambda f, x, c: f(c(x["views"]), x["positions"])),
    "SupConLoss": (SupConLoss(), lambda f, x, c: f(c(x["vectors"]), labels=x["y1"])),
}


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_under_bfloat16_autocast_is_finite_and_close_to_float32(name):
    loss, call = LOSSES[name]
    x = _inputs()
    # reference: the same bfloat16-rounded inputs, evaluated in float32 without autocast
    ref = call(loss, x, lambda t: _bf16(t).float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = call(loss, x, _bf16)
    assert torch.isfinite(low).all(), f"{name}: non-finite under autocast"
    assert low.dtype == torch.float32, f"{name}: returned {low.dtype}; the reduction should run in float32"
    torch.testing.assert_close(low.float(), ref, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_label_consistency_without_guard_would_differ():
    """Control: the same similarity + logsumexp computed in bfloat16 is measurably off, so the test above can fail."""
    x = _inputs()
    z1, z2 = _bf16(x["vectors"]), _bf16(x["vectors_b"])
    sim = torch.nn.functional.normalize(z1, dim=1) @ torch.nn.functional.normalize(z2, dim=1).t() / 0.1
    ref = LabelConsistencyLoss()(z1.float(), x["y1"], z2.float(), x["y2"])
    pos = x["y1"][:, None] == x["y2"][None, :]
    fg = (x["y1"][:, None] > 0) | (x["y2"][None, :] > 0)
    lo = sim.masked_fill(~(pos & fg), -1e4).flatten().logsumexp(0)
    den = sim.masked_fill(~fg, -1e4).flatten().logsumexp(0)
    assert sim.dtype == torch.bfloat16
    assert abs(float(den - lo) - float(ref)) > 1e-3
