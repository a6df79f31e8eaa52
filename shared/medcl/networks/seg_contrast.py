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
"""A segmentation network with a dense contrastive head on one of its decoder levels."""

from __future__ import annotations

import torch
from torch import nn

from medcl.networks.contrastive_head import ContrastiveHead
from medcl.networks.feature_taps import FeatureTaps

__all__ = ["SegContrastNet"]


class SegContrastNet(nn.Module):
    """
    Any segmentation ``backbone`` plus a :class:`~medcl.networks.ContrastiveHead` on the output of its submodule
    ``tap`` (Chaitanya et al., MedIA 2023: the last, full-resolution decoder level of the U-Net).

    ``forward(x)`` returns the backbone's logits only, so evaluation, inference, TorchScript export and MONAI Label
    see a plain segmentation network; ``forward(x, return_embeddings=True)`` returns ``(logits, embeddings)`` from
    one pass (one call, so ``DistributedDataParallel`` sees every parameter). State-dict keys are ``backbone.*`` and
    ``head.*``.

    Shapes: ``x`` ``(B, C_in, *spatial)``; logits ``(B, num_classes, *spatial)``; embeddings
    ``(B, out_channels, *spatial_tap)`` (the tap's grid: the input grid for the last decoder level).

    Example (the public code's 2D U-Net: encoder 16-32-64-128-128, last decoder level 16 channels)::

        net = SegContrastNet(BasicUNet(2, 1, 4, features=(16, 32, 64, 128, 128, 16)), tap="upcat_1",
                             tap_channels=16, spatial_dims=2)
        logits, z = net(x, return_embeddings=True)  # z: (B, 16, H, W)

    Args:
        backbone: segmentation network returning ``(B, num_classes, *spatial)`` logits.
        tap: name of the backbone submodule whose output feeds the head (``dict(backbone.named_modules())``),
            e.g. ``"upcat_1"`` for MONAI's ``BasicUNet``.
        tap_channels: channels of that output. Defaults to 16.
        hidden_channels, out_channels: the head's sizes. Default to 16 (code).
        spatial_dims: 2 or 3. Defaults to 2.

    Raises:
        MedclInputError: when ``tap`` is not a submodule of ``backbone`` (the message lists the names).
        ValueError: (in forward) when the tapped output does not have ``tap_channels`` channels.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tap: str,
        tap_channels: int = 16,
        hidden_channels: int = 16,
        out_channels: int = 16,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ContrastiveHead(tap_channels, hidden_channels, out_channels, spatial_dims=spatial_dims)
        self.tap = tap
        self.tap_channels = int(tap_channels)
        self._taps = FeatureTaps(backbone, [tap])  # checks the name now

    def forward(self, x: torch.Tensor, return_embeddings: bool = False):
        if not return_embeddings:
            return self.backbone(x)
        with self._taps as taps:
            logits = self.backbone(x)
        feats = taps.outputs[self.tap]
        if feats.shape[1] != self.tap_channels:
            raise ValueError(
                f"{type(self.backbone).__name__}.{self.tap} gives {feats.shape[1]} channels, the contrastive head "
                f"expects tap_channels={self.tap_channels}: set tap_channels to {feats.shape[1]}."
            )
        return logits, self.head(feats)
