"""Every method step under ``torch.autocast("cpu", dtype=torch.bfloat16)`` on phantom data: finite, and close to fp32.

Each bundle's training step (MACL pre-training, MixCL pre-training, the local-CL joint step of the self-training
bundle, the supervised ``loss(network(image), label)`` step of the scratch bundle, run by MONAI's
``SupervisedTrainer``) is run once in float32 and once inside a bfloat16 autocast region, from the same weights and
the same batch (and, where the step draws random numbers, the same random state). The batches are cut from
phantom cases (:func:`medcl.data.phantom.generate_case`, CT window [-175, 250] HU mapped to [0, 1]), at the smallest
sizes the networks accept.

What is compared, and the tolerances:

- every term and every parameter gradient of the total are finite under autocast;
- every term (the total included) is within ``LOSS_RTOL`` = 5 % (relative) of its float32 value;
- the gradient, flattened over all parameters, is within ``GRAD_DEV`` = 0.02 of the float32 gradient in
  ``1 - cosine``; a step whose gradient is further off passes only if its float32 gradient is itself that sensitive:
  the bf16 deviation must stay within ``GRAD_SENSITIVITY`` = 2 x the deviation that merely rounding the batch to
  bfloat16 (and computing in float32) causes (``grad_dev_rounded``, computed only then).

Why these values: bfloat16 keeps 8 bits of mantissa (a relative rounding error of up to 2^-9, about 0.2 %, per
operation) and autocast runs every convolution, linear layer and matmul in it, so after a dozen layers the outputs
carry errors of a few tenths of a percent to about a percent; the losses reduce in float32 (their own guard,
tests/test_losses_autocast.py) but inherit the error of their inputs. Measured here (torch 2.13.0 CPU, 1 thread):

=========  ==========  ===============  =========  =================  ==============
step       total       worst term       grad_dev   grad_dev_rounded   gradient norm
=========  ==========  ===============  =========  =================  ==============
macl       0.03 %      0.83 % (L_ER)    0.15       0.24               22 %
mixcl      0.16 %      0.16 % (recon)   3e-5       4e-6               0.16 %
localcl    0.01 %      0.05 % (local)   0.015      0.018              2.3 %
scratch    0.01 %      (total only)     0.001      0.0006             0.18 %
=========  ==========  ===============  =========  =================  ==============

The losses stay within 1 %: 5 % leaves room for other CPUs' bf16 kernels and still catches a loss computed in
bfloat16 end to end (several percent off, the control in tests/test_losses_autocast.py), a wrong term or a NaN/inf.
MACL's gradient is the exception: on this tiny 2D BasicUNet (4-16 channels, batch 4) it is ill-conditioned (the L1
sign gradient of L_ER, batch norm over few channels), so rounding the input views to bfloat16 in float32 already
turns it by ``1 - cos`` = 0.24, more than autocast does (0.15); at the bundle's width (32-256 channels, not run
here: too slow for the suite) the measured values were 0.067 (autocast) and 0.043 (rounded inputs). The
sensitivity rule accepts such a gradient and still fails one that bf16 turns much further than its input precision
explains. The gradient norm is reported, not asserted: for MACL it follows the same sensitivity.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.nets import UNETR, BasicUNet, UNet

from medcl.data.phantom import generate_case
from medcl.data.views import VIEW_KEYS
from medcl.engines import LocalCLStep, MACLStep, MACLViewsModel, MixCLStep
from medcl.losses import LocalContrastiveLoss
from medcl.networks import SegContrastNet
from medcl.networks.macl import MACLPretrainModel
from medcl.networks.mixcl import MixCLPretrainModel

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_RTOL = 0.05
GRAD_DEV = 0.02
GRAD_SENSITIVITY = 2.0
NUM_CLASSES = 5  # the abdomen phantom: background, liver, spleen, kidneys, pancreas


def _phantom(index: int, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One phantom case as ``(image (1, X, Y, Z) float32 in [0, 1], label (1, X, Y, Z) int64)``."""
    image, label, _ = generate_case(index, seed=0, shape=shape)
    image = np.clip((image + 175.0) / 425.0, 0.0, 1.0)
    return torch.from_numpy(image)[None].float(), torch.from_numpy(label.astype(np.int64))[None]


def _slices(index: int, n: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` axial slices from the middle of a ``size x size x max(2n, 16)`` case: images and labels
    ``(n, 1, size, size)`` and their positions ``(n,)`` (``(slice index + 1) / depth``, as RandPatchWithPositiond
    gives)."""
    depth = max(2 * n, 16)
    image, label = _phantom(index, (size, size, depth))
    z = torch.arange((depth - n) // 2, (depth - n) // 2 + n)
    return image[..., z].permute(3, 0, 1, 2), label[..., z].permute(3, 0, 1, 2), (z + 1).float() / depth


# --- the four steps: name -> () -> (network, batch, step(network, batch) -> {"loss": ..., ...}) -----------------------
def _macl():
    torch.manual_seed(0)
    backbone = BasicUNet(2, 1, NUM_CLASSES, features=(4, 4, 8, 8, 16, 4), norm="batch")
    net = MACLViewsModel(MACLPretrainModel(backbone, 2, proj_dim=16))
    x, _, positions = _slices(0, 4)
    # intensity views I1, I2 (pixel-aligned) and spatial views V1, V2 (flipped, as the bundle's random flips)
    views = [x, (0.9 * x + 0.05).clamp(0, 1), x.flip(2), (1.1 * x.flip(3) - 0.05).clamp(0, 1)]
    batch = dict(zip(VIEW_KEYS, views, strict=True))
    batch["position"] = positions
    return net, batch, MACLStep()


def _mixcl():
    torch.manual_seed(0)
    size = 32
    net = MixCLPretrainModel(UNETR(1, 1, size, feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4))
    cases = [_phantom(i, (size, size, size)) for i in range(4)]
    p1, s1 = torch.stack([c[0] for c in cases[:2]]), torch.stack([c[1] for c in cases[:2]])
    p2, s2 = torch.stack([c[0] for c in cases[2:]]), torch.stack([c[1] for c in cases[2:]])
    g = torch.Generator().manual_seed(1)
    batch = {
        "view_1": p1 + 0.05 * torch.randn(p1.shape, generator=g),
        "view_1p": (p1**1.2).clamp(0, 1),
        "view_2": p2 + 0.05 * torch.randn(p2.shape, generator=g),
        "image": p1,
        "image_2": p2,
        "label": s1,
        "label_2": s2,
        "dataset_id": torch.tensor([0, 0]),
    }
    # the bundle's weights (alpha = beta = 0.01, recon summed over voxels); few pixels per class to stay small
    return net, batch, MixCLStep(num_per_class=16)


def _localcl():
    torch.manual_seed(0)
    backbone = BasicUNet(2, 1, NUM_CLASSES, features=(8, 8, 16, 16, 32, 8), norm="batch")
    net = SegContrastNet(backbone, tap="upcat_1", tap_channels=8, hidden_channels=16, out_channels=16)
    x_l, y_l, _ = _slices(0, 2)
    x_u, y_u, _ = _slices(1, 2)  # y_u: the pseudo-labels of a self-training round
    batch = {"labelled": {"image": x_l, "label": y_l}, "unlabelled": {"image": x_u, "label": y_u}}
    step = LocalCLStep(
        DiceLoss(to_onehot_y=True, softmax=True, batch=True),
        LocalContrastiveLoss(num_anchors=3),
        lambda_local=0.1,
        num_classes=NUM_CLASSES,
        min_classes=2,  # phantom slices rarely hold all five classes
    )
    return net, batch, step


def _scratch():
    torch.manual_seed(0)
    net = UNet(2, 1, NUM_CLASSES, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="batch")
    x, y, _ = _slices(0, 4)
    loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    def supervised_step(network, batch):  # SupervisedTrainer with SimpleInferer: loss(network(image), label)
        return {"loss": loss(network(batch["image"]), batch["label"])}

    return net, {"image": x, "label": y}, supervised_step


STEPS: dict[str, Callable] = {"macl": _macl, "mixcl": _mixcl, "localcl": _localcl, "scratch": _scratch}


def _bf16_rounded(batch: dict) -> dict:
    """The batch with every floating tensor except positions rounded to bfloat16 and back (nested parts too)."""
    return {
        k: _bf16_rounded(v)
        if isinstance(v, dict)
        else (v.bfloat16().float() if v.is_floating_point() and k != "position" else v)
        for k, v in batch.items()
    }


def _run(net: torch.nn.Module, batch: dict, step: Callable, autocast: bool) -> tuple[dict, torch.Tensor]:
    """One step from a fixed random state on a copy of ``net``: ``({term: float32 0-dim tensor}, flat gradient of the
    total)``. Batch-norm running statistics do not enter a train-mode forward, so every call sees the same weights."""
    net = copy.deepcopy(net)
    net.train()
    torch.manual_seed(123)  # MixCL's pixel sampler and the local-CL pairing draw from torch's global generator
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        terms = step(net, batch)
    terms["loss"].backward()
    grad = torch.cat([p.grad.reshape(-1).float() for p in net.parameters() if p.grad is not None])
    return {k: v.detach().float() for k, v in terms.items()}, grad


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return 1.0 - float(F.cosine_similarity(a.double(), b.double(), dim=0))


def deviations(name: str, control: bool | None = True) -> dict[str, float]:
    """Run the step ``name`` in float32 and under bf16 autocast from the same weights and batch.

    Args:
        name: a key of :data:`STEPS`.
        control: also run the float32 step on the bf16-rounded batch (the gradient's own sensitivity); None: only
            when ``grad_dev`` exceeds :data:`GRAD_DEV`.

    Returns:
        ``{"<term>_rel": |t_bf16 - t_fp32| / |t_fp32| for each term ("loss_rel": the total), "grad_dev": 1 - cosine
        of the two flat gradients, "grad_norm_rel": |‖g_bf16‖ - ‖g_fp32‖| / ‖g_fp32‖}``, with ``control``
        ``"grad_dev_rounded"``: 1 - cosine between the float32 gradients of the rounded and the original batch.

    Raises:
        AssertionError: when a term or a gradient under autocast is not finite, or the terms differ.
    """
    net, batch, step = STEPS[name]()
    ref, g_ref = _run(net, batch, step, autocast=False)
    low, g_low = _run(net, batch, step, autocast=True)
    bad = [k for k, v in low.items() if not torch.isfinite(v)]
    assert not bad, f"{name}: non-finite terms under bf16 autocast: {bad}"
    assert torch.isfinite(g_low).all(), f"{name}: non-finite gradient under bf16 autocast"
    assert low.keys() == ref.keys()
    out = {f"{k}_rel": float((low[k] - ref[k]).abs() / ref[k].abs().clamp_min(1e-12)) for k in ref}
    out["grad_dev"] = _one_minus_cos(g_low, g_ref)
    out["grad_norm_rel"] = float((g_low.norm() - g_ref.norm()).abs() / g_ref.norm())
    if control or (control is None and out["grad_dev"] > GRAD_DEV):
        out["grad_dev_rounded"] = _one_minus_cos(_run(net, _bf16_rounded(batch), step, autocast=False)[1], g_ref)
    return out


@pytest.mark.parametrize("name", sorted(STEPS))
def test_step_under_bfloat16_autocast_is_finite_and_close_to_float32(name):
    d = deviations(name, control=None)
    far = {k: v for k, v in d.items() if k.endswith("_rel") and k != "grad_norm_rel" and v > LOSS_RTOL}
    assert not far, f"{name}: terms more than {LOSS_RTOL:.0%} from float32: {far} ({d})"
    if d["grad_dev"] > GRAD_DEV:  # the control ran: a gradient this sensitive may move as far as its inputs move it
        limit = GRAD_SENSITIVITY * d["grad_dev_rounded"]
        assert d["grad_dev"] <= limit, (
            f"{name}: the bf16 gradient is {d['grad_dev']:.3g} (1 - cosine) from float32, more than "
            f"{GRAD_SENSITIVITY} x the {d['grad_dev_rounded']:.3g} that bf16-rounding the inputs causes ({d})"
        )
