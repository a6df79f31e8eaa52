# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Feature-level consistency (L1) between two bottlenecks at different resolutions: MACL's term L_ER."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.utils import LossReduction, look_up_option
from torch.nn import functional as F
from torch.nn.modules.loss import _Loss

__all__ = ["FeatureConsistencyLoss"]

_LINEAR_MODES = ("linear", "bilinear", "trilinear")
_MODES = ("nearest", "nearest-exact", "area", "bicubic") + _LINEAR_MODES


class FeatureConsistencyLoss(_Loss):
    """
    L1 consistency between the auxiliary-branch bottleneck, resampled by ``scale``, and the dominant-branch
    bottleneck (MACL's feature-level loss :math:`L_{ER}`):

    .. math::

        L = \\frac{1}{B C |\\Omega|} \\sum_{b, c, x \\in \\Omega}
            \\left| \\mathrm{interp}_{\\text{scale}}(F^{aux})_{b c x} - F^{dom}_{b c x} \\right|

    The dominant branch sees the input downsampled by ``scale`` (0.25 in MACL), so its bottleneck is
    ``scale`` times the size of the auxiliary one. As in the public code
    (``F.interpolate(x, scale_factor=0.25, mode="bilinear", align_corners=True)`` then ``nn.L1Loss()``),
    the default resampling is multilinear with ``align_corners=True``; gradients flow into both inputs.

    Shapes: ``aux`` ``(B, C, *spatial_aux)``, ``dom`` ``(B, C, *spatial_dom)`` (1D, 2D or 3D spatial) with
    ``floor(spatial_aux * scale) == spatial_dom``; output: scalar (``reduction="none"``: ``dom``'s shape).

    Reference:
        Zeng, S. et al. "Multi-level Asymmetric Contrastive Learning for Volumetric Medical Image
        Segmentation Pre-training." IEEE JBHI (MACL). https://github.com/stevezs315/MACL
    """

    def __init__(
        self,
        scale: float | Sequence[float] | None = 0.25,
        mode: str = "bilinear",
        align_corners: bool | None = True,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        """
        Args:
            scale: resampling factor of ``aux`` (one per spatial dimension or one for all). Defaults to 0.25
                (MACL). ``None`` resamples ``aux`` directly to ``dom``'s spatial size (for backbones whose
                bottleneck sizes are not an exact multiple); a factor of 1 skips resampling.
            mode: ``torch.nn.functional.interpolate`` mode: ``"nearest"``, ``"nearest-exact"``, ``"area"``,
                ``"bicubic"`` (2D only) or a linear mode. Any of ``"linear"``, ``"bilinear"``, ``"trilinear"``
                means multilinear for the input's dimensionality (linear/bilinear/trilinear for 1D/2D/3D), so
                one setting serves 2D and 3D. Defaults to ``"bilinear"`` (the public 2D code).
            align_corners: passed to ``interpolate`` for linear and cubic modes (ignored otherwise).
                Defaults to True (the public code).
            reduction: ``"mean"`` (default, ``nn.L1Loss``), ``"sum"`` or ``"none"`` (element-wise).

        Raises:
            ValueError: for an unknown ``mode`` or ``reduction``, or a non-positive ``scale``.
        """
        super().__init__(reduction=LossReduction(look_up_option(reduction, LossReduction)).value)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        if scale is not None:
            factors = [scale] if isinstance(scale, (int, float)) else list(scale)
            if not factors or any(f <= 0 for f in factors):
                raise ValueError(f"scale must be positive, got {scale}.")
        self.scale = scale
        self.mode = mode
        self.align_corners = align_corners

    def _mode_for(self, spatial_dims: int) -> str:
        if self.mode in _LINEAR_MODES:
            return _LINEAR_MODES[spatial_dims - 1]
        if self.mode == "bicubic" and spatial_dims != 2:
            raise ValueError(f"mode='bicubic' needs 2D feature maps, got {spatial_dims} spatial dimensions.")
        return self.mode

    def _target_size(self, aux: torch.Tensor, dom: torch.Tensor) -> tuple[list[int], list[float] | None]:
        """Output size of the resampling and the factors to pass (None: resample to ``dom``'s size)."""
        spatial = aux.shape[2:]
        if self.scale is None:
            return list(dom.shape[2:]), None
        factors = [float(self.scale)] * len(spatial) if isinstance(self.scale, (int, float)) else list(self.scale)
        if len(factors) != len(spatial):
            raise ValueError(f"scale has {len(factors)} factors but the feature maps have {len(spatial)} spatial dims.")
        # interpolate's output size: floor(input_size * scale_factor)
        return [int(math.floor(s * f)) for s, f in zip(spatial, factors, strict=True)], factors

    def forward(self, aux: torch.Tensor, dom: torch.Tensor) -> torch.Tensor:
        """
        Args:
            aux: ``(B, C, *spatial_aux)`` auxiliary-branch bottleneck (full-resolution input).
            dom: ``(B, C, *spatial_dom)`` dominant-branch bottleneck (input downsampled by ``scale``).

        Returns:
            the L1 loss, reduced according to ``reduction`` (float32 for half precision inputs).

        Raises:
            ValueError: when the inputs are not ``(B, C, *spatial)`` with 1 to 3 spatial dimensions, differ in
                dimensionality, batch or channels, or when the resampled ``aux`` does not match ``dom``'s size.
        """
        if aux.ndim != dom.ndim or not 3 <= aux.ndim <= 5:
            raise ValueError(
                "aux and dom must both have shape (B, C, *spatial) with 1-3 spatial dims, "
                f"got {tuple(aux.shape)} and {tuple(dom.shape)}."
            )
        if aux.shape[:2] != dom.shape[:2]:
            raise ValueError(
                f"aux and dom must agree in batch and channels, got {tuple(aux.shape)} and {tuple(dom.shape)}."
            )
        size, factors = self._target_size(aux, dom)
        if list(dom.shape[2:]) != size:
            raise ValueError(
                f"aux spatial size {tuple(aux.shape[2:])} resampled by scale={self.scale} gives {tuple(size)}, "
                f"which does not match dom spatial size {tuple(dom.shape[2:])}."
            )
        if factors is None or any(f != 1.0 for f in factors):
            mode = self._mode_for(aux.ndim - 2)
            align = self.align_corners if mode in _LINEAR_MODES + ("bicubic",) else None
            if factors is None:
                aux = F.interpolate(aux, size=size, mode=mode, align_corners=align)
            else:
                aux = F.interpolate(aux, scale_factor=factors, mode=mode, align_corners=align)
        if aux.dtype in (torch.float16, torch.bfloat16) or dom.dtype in (torch.float16, torch.bfloat16):
            aux, dom = aux.float(), dom.float()  # a half-precision sum or mean over many voxels loses digits
        diff = (aux - dom).abs()
        if self.reduction == LossReduction.MEAN.value:
            return diff.mean()
        if self.reduction == LossReduction.SUM.value:
            return diff.sum()
        return diff
