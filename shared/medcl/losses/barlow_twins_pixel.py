# Copyright (c) medcl contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Pixel-level Barlow Twins loss: the identity-consistency term of MixCL (eq. 4-5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

__all__ = ["BarlowTwinsPixelLoss", "pixel_cross_correlation"]


def pixel_cross_correlation(z1: torch.Tensor, z2: torch.Tensor, center: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """
    Channel cross-correlation matrix of two feature maps over all their pixels (eq. 5 of MixCL).

    Every pixel of every batch item is one observation, ``M = B * prod(spatial)``; channel ``i`` of ``z1``
    and channel ``j`` of ``z2`` are correlated over these ``M`` observations:

    .. math::
        \\mathcal{C}_{ij} = \\frac{\\sum_m z_{m,i} z'_{m,j}}{\\sqrt{\\sum_m z_{m,i}^2}\\sqrt{\\sum_m {z'_{m,j}}^2}}

    with ``z`` mean-centred over ``m`` when ``center`` is True (then ``C`` is the Pearson correlation, i.e.
    features standardised with the biased std and ``C = z_std^T z'_std / M``). The feature maps are never
    copied into a ``(M, M)`` structure: the memory used is ``O(M * C)`` for the normalised copies and
    ``O(C^2)`` for the result.

    Args:
        z1: features of view 1, shape ``(B, C, *spatial)`` (``spatial`` may be empty, 2D or 3D).
        z2: features of view 2, same shape as ``z1``.
        center: subtract the per-channel mean over the ``M`` pixels first (Barlow Twins' batch-norm
            standardisation). False evaluates eq. 5 literally on the raw features.
        eps: lower bound of a channel's (biased) standard deviation; a constant channel then yields
            ``C_ij = 0`` instead of NaN.

    Returns:
        ``(C, C)`` tensor (float32 for half-precision inputs, else the input dtype).

    Raises:
        ValueError: when shapes differ, inputs have fewer than 2 dimensions, or ``M < 2``.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"the two views must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    if z1.ndim < 2:
        raise ValueError(f"features must be (B, C, *spatial), got shape {tuple(z1.shape)}.")
    c = z1.shape[1]
    # (B, C, *S) -> (C, M): pixels of all batch items are the observations
    a = z1.transpose(0, 1).reshape(c, -1)
    b = z2.transpose(0, 1).reshape(c, -1)
    m = a.shape[1]
    if m < 2:
        raise ValueError(f"need at least 2 pixels (M = B * prod(spatial)) to correlate channels, got M={m}.")
    if a.dtype in (torch.float16, torch.bfloat16):
        # sums of squares over M pixels overflow half precision (max 65504): compute in float32
        a, b = a.float(), b.float()
    with torch.autocast(device_type=a.device.type, enabled=False):  # autocast would run the matmul in half
        if center:
            a = a - a.mean(dim=1, keepdim=True)
            b = b - b.mean(dim=1, keepdim=True)
        floor = m * eps * eps  # sum of squares of a channel whose biased std is eps
        a = a / a.pow(2).sum(dim=1, keepdim=True).clamp_min(floor).sqrt()
        b = b / b.pow(2).sum(dim=1, keepdim=True).clamp_min(floor).sqrt()
        return a @ b.t()


class BarlowTwinsPixelLoss(_Loss):
    """
    Identity-consistency loss of MixCL: Barlow Twins applied per pixel on every encoder layer.

    For each layer ``l`` the two views' projected feature maps ``Z1^l, Z1'^l`` of shape ``(B, C_l, *spatial)``
    are flattened to ``M = B * H * W [* D]`` observations of ``C_l`` channels, their channel cross-correlation
    ``C^l`` (eq. 5, see :func:`pixel_cross_correlation`) is formed, and

    .. math::
        \\mathcal{L}_{id} = \\sum_l \\Big[ \\sum_i (1 - \\mathcal{C}^l_{ii})^2
            + \\lambda \\sum_i \\sum_{j \\neq i} (\\mathcal{C}^l_{ij})^2 \\Big]      \\qquad (4)

    Eq. 4 of the paper prints :math:`\\mathcal{C}^l_{ii}` inside the off-diagonal (redundancy-reduction) term;
    that is a typo: the double sum over ``j != i`` only makes sense for :math:`\\mathcal{C}^l_{ij}`, as in
    Barlow Twins, and ``C_ij`` is what is implemented. ``lambda`` is not given by the paper; the default is
    Barlow Twins' 5e-3.

    Why not ``monai.losses.BarlowTwinsLoss`` on ``(M, C)`` pixels: MONAI standardises with the *unbiased*
    std (``torch.std``, divisor ``M - 1``) plus 1e-6 and then divides by ``M``, so its matrix is
    ``(M - 1) / M`` times eq. 5 (identical views give ``C_ii = 1 - 1/M``, not 1). This module computes eq. 5
    exactly (Pearson correlation over the ``M`` pixels, i.e. biased std) and avoids MONAI's 2D-only input
    check and in-place masking. The difference is ``O(1/M)``, negligible for real feature maps but not exact.

    Memory is ``O(M * C_l)`` per layer (a normalised copy of each view) plus ``O(C_l^2)``, never ``O(M^2)``.

    Reference:
        Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021.
        Li, Quan, Zhou, "MixCL: Pixel label matters to contrastive learning in medical image segmentation",
        Sec. 2.2, eq. 4-5.
    """

    def __init__(
        self,
        lambd: float = 5e-3,
        reduction: LossReduction | str = LossReduction.SUM,
        center: bool = True,
        eps: float = 1e-6,
    ) -> None:
        """
        Args:
            lambd: weight of the off-diagonal (redundancy-reduction) term. Defaults to 5e-3.
            reduction: how the per-layer losses are combined: ``"sum"`` (eq. 4, default), ``"mean"``
                (average over layers) or ``"none"`` (a ``(L,)`` tensor, one loss per layer).
            center: mean-centre each channel over the ``M`` pixels before correlating (Barlow Twins'
                standardisation). Defaults to True.
            eps: lower bound of a channel's std over the ``M`` pixels. Defaults to 1e-6.

        Raises:
            ValueError: when ``lambd`` is negative or ``eps`` is not positive.
        """
        super().__init__(reduction=LossReduction(reduction).value)
        if lambd < 0:
            raise ValueError(f"lambd must be non-negative, got {lambd}.")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}.")
        self.lambd = float(lambd)
        self.center = center
        self.eps = float(eps)

    def layer_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Loss of one layer: ``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` (scalar)."""
        corr = pixel_cross_correlation(z1, z2, center=self.center, eps=self.eps)
        diag = torch.diagonal(corr)
        on_diag = (1.0 - diag).pow(2).sum()
        off_diag = corr.pow(2).sum() - diag.pow(2).sum()
        return on_diag + self.lambd * off_diag

    def forward(
        self, z1: torch.Tensor | Sequence[torch.Tensor], z2: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """
        Args:
            z1: view-1 projections, a tensor ``(B, C, *spatial)`` or a sequence of them, one per layer
                (layers may differ in channels, resolution and spatial rank).
            z2: view-2 projections, same structure and shapes as ``z1``.

        Returns:
            scalar (``"sum"`` / ``"mean"``) or ``(L,)`` tensor (``"none"``).

        Raises:
            ValueError: when the numbers of layers differ, no layer is given, or a layer's shapes differ.
        """
        layers1 = [z1] if isinstance(z1, torch.Tensor) else list(z1)
        layers2 = [z2] if isinstance(z2, torch.Tensor) else list(z2)
        if len(layers1) != len(layers2):
            raise ValueError(f"got {len(layers1)} layers for view 1 and {len(layers2)} for view 2.")
        if not layers1:
            raise ValueError("at least one layer is required.")
        losses = torch.stack([self.layer_loss(a, b) for a, b in zip(layers1, layers2, strict=True)])
        if self.reduction == LossReduction.SUM.value:
            return losses.sum()
        if self.reduction == LossReduction.MEAN.value:
            return losses.mean()
        return losses
