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
"""Pixel-wise contrastive projection head (1x1 conv - norm - ReLU - 1x1 conv)."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_norm_layer

__all__ = ["ContrastiveHead"]


class ContrastiveHead(nn.Sequential):
    """
    Dense projection head for pixel/voxel-level contrastive losses: ``1x1 conv -> norm -> ReLU -> 1x1 conv``,
    applied at every location, so the output keeps the input's spatial size. In Chaitanya et al. (MedIA 2023)
    it sits on the last (full-resolution, 16-channel) decoder level of the U-Net and feeds
    :class:`medcl.losses.local_contrastive.LocalContrastiveLoss`; the public TF code uses 16 hidden and 16
    output channels, convolutions without bias and batch norm with ``eps=1e-3`` and moving-average decay
    0.99 (PyTorch ``momentum=0.01``), which are the defaults here. The output is not normalised (the loss
    uses cosine similarities).

    Shapes: input ``(B, in_channels, *spatial)``, output ``(B, out_channels, *spatial)`` with ``spatial``
    2D or 3D according to ``spatial_dims``.

    Example::

        head = ContrastiveHead(in_channels=16, hidden_channels=16, out_channels=16, spatial_dims=2)
        z = head(decoder_features)  # (B, 16, H, W)

    Reference:
        Chaitanya, K. et al., "Local contrastive loss with pseudo-label based self-training for
        semi-supervised medical image segmentation", Medical Image Analysis 87, 102792, 2023.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int = 16,
        out_channels: int = 16,
        spatial_dims: int = 2,
        bias: bool = False,
        norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.01}),
    ) -> None:
        """
        Args:
            in_channels: channels of the decoder features.
            hidden_channels: channels after the first 1x1 convolution. Defaults to 16 (code).
            out_channels: embedding size. Defaults to 16 (code).
            spatial_dims: 2 or 3. Defaults to 2 (code).
            bias: bias in both convolutions. Defaults to False (code).
            norm: MONAI norm spec for the hidden layer (name or ``(name, kwargs)``). Defaults to batch norm
                with the code's ``eps=1e-3``, ``momentum=0.01``.

        Raises:
            ValueError: for ``spatial_dims`` not in (2, 3) or non-positive channel counts.
        """
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if min(in_channels, hidden_channels, out_channels) < 1:
            raise ValueError("channel counts must be positive.")
        conv = Conv[Conv.CONV, spatial_dims]
        super().__init__()
        self.add_module("conv1", conv(in_channels, hidden_channels, kernel_size=1, bias=bias))
        self.add_module("norm", get_norm_layer(norm, spatial_dims=spatial_dims, channels=hidden_channels))
        self.add_module("act", nn.ReLU())
        self.add_module("conv2", conv(hidden_channels, out_channels, kernel_size=1, bias=bias))
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``(B, in_channels, *spatial)`` features.

        Returns:
            ``(B, out_channels, *spatial)`` embeddings.

        Raises:
            ValueError: when ``x`` does not have ``spatial_dims + 2`` dimensions.
        """
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims + 2}D input (B, C, *spatial), got shape {list(x.shape)}.")
        for layer in self:  # not super().forward(x), and a list shape above: both keep the head scriptable
            x = layer(x)
        return x
