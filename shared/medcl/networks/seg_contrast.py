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

# no ``from __future__ import annotations``: TorchScript reads the real annotations of forward and its unused branch
import torch
from monai.networks.blocks import Convolution
from torch import nn

from medcl.errors import MedclInputError
from medcl.networks.contrastive_head import ContrastiveHead
from medcl.networks.feature_taps import FeatureTaps, check_module_names

__all__ = ["SegContrastNet", "SegTail"]


class SegTail(nn.Module):
    """
    Segmentation-only layers in front of a backbone's logits layer: ``out(layers(x))``.

    The public code of Chaitanya et al. (``models.py``, ``joint_tr_unet_seg_loss_and_local_cont_loss``:
    ``seg_c1_a``, ``seg_c1_b``, then ``seg_fin_layer``) puts two 3x3 conv - batch norm - ReLU layers between the
    last shared decoder level and the 1x1 logits convolution, so the contrastive head and the segmentation output
    branch off the same shared features. State-dict keys: ``layers.<i>.conv.weight``, ``layers.<i>.adn.N.*`` and
    ``out.*`` (the original logits layer).

    Args:
        out: the backbone's logits layer (e.g. ``BasicUNet.final_conv``).
        channels: channels of its input (kept by the extra layers).
        num_layers: number of 3x3 conv - norm - ReLU layers. Defaults to 2 (code).
        spatial_dims: 2 or 3.
        norm: MONAI norm spec. Defaults to batch norm with the code's ``eps=1e-3``, ``momentum=0.01``.
    """

    def __init__(
        self,
        out: nn.Module,
        channels: int,
        num_layers: int = 2,
        spatial_dims: int = 2,
        norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.01}),
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[
                Convolution(spatial_dims, channels, channels, kernel_size=3, act="relu", norm=norm, bias=False)
                for _ in range(int(num_layers))
            ]
        )
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layers(x))


class SegContrastNet(nn.Module):
    """
    Any segmentation ``backbone`` plus a :class:`~medcl.networks.ContrastiveHead` on the output of its submodule
    ``tap`` (Chaitanya et al., MedIA 2023: the last, full-resolution decoder level of the U-Net).

    With ``seg_layers > 0`` (default 2, the public code's ``seg_c1_a`` / ``seg_c1_b``) the backbone's logits layer
    ``seg_tail`` (``final_conv`` of MONAI's ``BasicUNet``) is replaced in place by a :class:`SegTail`: that many
    3x3 conv - batch norm - ReLU layers, then the original layer. The head still reads ``tap`` (the last shared
    decoder level), so the local loss shapes the shared features and the logits come from the extra layers;
    ``seg_layers=0`` keeps the backbone as it is (logits = 1x1 conv of the tapped features, medcl <= 0.1).

    ``forward(x)`` returns the backbone's logits only, so evaluation, inference, TorchScript export and MONAI Label
    see a plain segmentation network; ``forward(x, return_embeddings=True)`` returns ``(logits, embeddings)`` from
    one pass (one call, so ``DistributedDataParallel`` sees every parameter). State-dict keys are ``backbone.*`` and
    ``head.*`` (the extra layers: ``backbone.<seg_tail>.layers.*``, the logits layer ``backbone.<seg_tail>.out.*``).

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
        seg_layers: segmentation-only 3x3 conv - BN - ReLU layers before the logits layer. Defaults to 2 (code);
            0 switches them off.
        seg_tail: name of the backbone's logits layer (its input must be the ``tap`` output for the code's
            layout). Defaults to ``"final_conv"`` (``BasicUNet``). Its channels come from its ``in_channels``
            (else ``tap_channels``).

    Raises:
        MedclInputError: when ``tap`` or ``seg_tail`` is not a submodule of ``backbone`` (the message lists the
            names), or ``seg_layers < 0``.
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
        seg_layers: int = 2,
        seg_tail: str = "final_conv",
    ) -> None:
        super().__init__()
        if int(seg_layers) < 0:
            raise MedclInputError(
                f"seg_layers must be >= 0 (0 switches the segmentation-only layers off), got {seg_layers}."
            )
        self.seg_layers = int(seg_layers)
        check_module_names(backbone, [tap])  # before changing the backbone
        if self.seg_layers:
            old = check_module_names(backbone, [seg_tail])[seg_tail]
            if isinstance(old, SegTail):
                raise MedclInputError(f"{seg_tail!r} already has segmentation-only layers (a backbone used twice?).")
            parent_name, _, child = seg_tail.rpartition(".")
            parent = backbone.get_submodule(parent_name) if parent_name else backbone
            channels = int(getattr(old, "in_channels", tap_channels))
            setattr(parent, child, SegTail(old, channels, self.seg_layers, spatial_dims=spatial_dims))
        self.backbone = backbone
        self.head = ContrastiveHead(tap_channels, hidden_channels, out_channels, spatial_dims=spatial_dims)
        self.tap = tap
        self.tap_channels = int(tap_channels)
        self._taps = FeatureTaps(backbone, [tap])  # checks the name now

    def forward(
        self, x: torch.Tensor, return_embeddings: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not return_embeddings:
            return self.backbone(x)
        return self._forward_with_embeddings(x)

    @torch.jit.unused
    def _forward_with_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and embeddings from one pass (a forward hook reads the tap: left out of TorchScript, whose
        scripted module is the plain segmentation network, ``return_embeddings=False``)."""
        with self._taps as taps:
            logits = self.backbone(x)
        feats = taps.outputs[self.tap]
        if feats.shape[1] != self.tap_channels:
            raise ValueError(
                f"{type(self.backbone).__name__}.{self.tap} gives {feats.shape[1]} channels, the contrastive head "
                f"expects tap_channels={self.tap_channels}: set tap_channels to {feats.shape[1]}."
            )
        return logits, self.head(feats)
