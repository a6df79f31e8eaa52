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
"""Projection heads of contrastive pre-training: a dense (pixel-level) one and a pooled (image-level) one."""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = ["ImageProjector", "PixelProjector", "PointwiseProjector"]


class PixelProjector(nn.Module):
    """
    Dense projection head: two 3x3 convolutions, each followed by batch norm and LeakyReLU (slope 0.01),
    ``conv(in -> out) -> BN -> LeakyReLU -> conv(out -> out) -> BN -> LeakyReLU``, padding keeps the size.

    This is MACL's auxiliary-branch pixel projector (``target_pixel_projector`` of the public code), which maps
    the encoder bottleneck to the channels of the dominant branch's pixel map so that the two can be compared
    location by location.

    Shapes: input ``(B, in_channels, *spatial)``, output ``(B, out_channels, *spatial)`` (1D, 2D or 3D).

    Args:
        in_channels: channels of the input feature map.
        out_channels: channels of the projection.
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        negative_slope: LeakyReLU slope. Defaults to 0.01 (``nn.LeakyReLU``'s default, as the public code).
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int, negative_slope: float = 0.01) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        act = ("leakyrelu", {"negative_slope": negative_slope, "inplace": True})
        self.spatial_dims = spatial_dims
        self.layers = nn.Sequential(
            Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, norm="batch", act=act),
            Convolution(spatial_dims, out_channels, out_channels, kernel_size=3, norm="batch", act=act),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``(B, in_channels, *spatial)``.

        Returns:
            ``(B, out_channels, *spatial)``.
        """
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims}D feature map (B, C, *spatial), got {tuple(x.shape)}.")
        return self.layers(x)


class ImageProjector(nn.Module):
    """
    Image-level projection head: global average pooling over all spatial locations, then a two-layer MLP
    ``Linear(in -> hidden) -> ReLU -> Linear(hidden -> out_dim)`` (SimCLR-style; MACL's instance projectors).

    Shapes: input ``(B, in_channels, *spatial)`` (any number of spatial dimensions, or ``(B, in_channels)``
    when already pooled), output ``(B, out_dim)``.

    Args:
        in_channels: channels of the input feature map.
        hidden: width of the hidden layer.
        out_dim: dimension of the projection. Defaults to 128 (MACL).
    """

    def __init__(self, in_channels: int, hidden: int, out_dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``(B, in_channels, *spatial)`` or ``(B, in_channels)``.

        Returns:
            ``(B, out_dim)``.
        """
        if x.ndim < 2:
            raise ValueError(f"expected (B, C, *spatial), got {tuple(x.shape)}.")
        pooled = x.flatten(2).mean(dim=-1) if x.ndim > 2 else x
        return self.mlp(pooled)


class PointwiseProjector(nn.Module):
    """
    MixCL's per-layer projector ``sigma^l``: three 1x1(x1) convolutions with channels ``[c, c, expansion * c]``
    (``c`` = the layer's channels, ``expansion`` 2 in the paper), normalisation and activation between them
    (not after the last one, as in Barlow Twins' projector)::

        conv1x1(c -> c) -> norm -> act -> conv1x1(c -> c) -> norm -> act -> conv1x1(c -> expansion * c)

    A 1x1 convolution is a per-pixel linear layer, so each pixel is projected independently and the map keeps
    its size. Batch norm (default) normalises each channel over the ``B * H * W [* D]`` pixels of the batch.

    Shapes: input ``(B, c, *spatial)``, output ``(B, expansion * c, *spatial)``.

    Args:
        in_channels: ``c``.
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        expansion: output channels are ``expansion * c``. Defaults to 2.
        norm: MONAI norm name or ``(name, args)``. Defaults to ``"batch"``.
        act: MONAI activation name or ``(name, args)``. Defaults to ``"relu"``.
    """

    def __init__(
        self,
        in_channels: int,
        spatial_dims: int,
        expansion: int = 2,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if expansion < 1:
            raise ValueError(f"expansion must be >= 1, got {expansion}.")
        self.spatial_dims = spatial_dims
        c = in_channels
        self.layers = nn.Sequential(
            Convolution(spatial_dims, c, c, kernel_size=1, norm=norm, act=act),
            Convolution(spatial_dims, c, c, kernel_size=1, norm=norm, act=act),
            Convolution(spatial_dims, c, expansion * c, kernel_size=1, conv_only=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``(B, c, *spatial)``.

        Returns:
            ``(B, expansion * c, *spatial)``.
        """
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims}D feature map (B, C, *spatial), got {tuple(x.shape)}.")
        return self.layers(x)
