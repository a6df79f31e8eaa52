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
"""
MixCL's pre-training model: a UNETR whose output is a reconstruction of its input (encoder θ + reconstructor ϕ),
with a projector ``sigma^l`` on each tapped encoder layer.

Which modules are "the layers of the encoder" the paper does not say beyond "all intermediate outputs of each
layer in the encoder" and "Z^1, the 2-nd layer". medcl's default taps MONAI UNETR's four encoder branches
``encoder1`` (``f`` channels, full resolution, from the input), ``encoder2`` (``2f``, 1/2, from transformer
block 3), ``encoder3`` (``4f``, 1/4, block 6) and ``encoder4`` (``8f``, 1/8, block 9): the multi-scale feature
maps UNETR's decoder reads, so "the 2-nd layer" is ``encoder2`` at half resolution, where a boundary-distance
weight with ``mu = 8`` voxels is meaningful. The transformer blocks themselves can be tapped instead
(``layers=["vit.blocks.0", ..., "vit.blocks.11"]``): their token outputs ``(B, N, hidden)`` are reshaped to
``(B, hidden, *feat_size)`` maps at 1/16 resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medcl.errors import MedclInputError
from medcl.networks.feature_taps import FeatureTaps, check_module_names
from medcl.networks.probes import input_size_of, probe_mode, run_probe, tapped_prefixes
from medcl.networks.projectors import PointwiseProjector

__all__ = ["MIXCL_LAYERS", "MixCLPretrainModel", "as_feature_map", "mixcl_pretrained_prefixes"]

#: Default taps on MONAI's UNETR: the four encoder branches (channels f, 2f, 4f, 8f at 1, 1/2, 1/4, 1/8).
MIXCL_LAYERS = ("encoder1", "encoder2", "encoder3", "encoder4")


def as_feature_map(output: Any, grid: Sequence[int] | None = None) -> torch.Tensor:
    """
    A tapped module output as a ``(B, C, *spatial)`` feature map.

    Args:
        output: a tensor ``(B, C, *spatial)``, a token tensor ``(B, N, C)`` (reshaped to ``(B, C, *grid)``) or a
            tuple/list whose first element is one of those (e.g. a ViT's ``(x, hidden_states)``).
        grid: the token grid (``feat_size`` of UNETR), needed for token tensors.

    Raises:
        MedclInputError: for a token tensor without a matching ``grid``, or an output that holds no tensor.
    """
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise MedclInputError(f"a tapped layer returned {type(output).__name__}, not a tensor.")
    if output.ndim != 3 or grid is None or len(grid) < 2:
        return output
    b, n, c = output.shape
    if n != int(torch.tensor(list(grid)).prod()):
        raise MedclInputError(f"{n} tokens do not fill the token grid {tuple(grid)}.")
    return output.transpose(1, 2).reshape(b, c, *grid)


class MixCLPretrainModel(nn.Module):
    """
    Encoder + reconstructor + per-layer projectors of MixCL (Fig. 1 of the paper).

    ``backbone`` is a segmentation network whose output has the input's channels (a UNETR with
    ``out_channels = in_channels``): its output is the reconstruction ``P~``. Forward hooks
    (:class:`~medcl.networks.feature_taps.FeatureTaps`) take the outputs of the ``layers`` during the same pass;
    each goes through its own :class:`~medcl.networks.projectors.PointwiseProjector` (``[c, c, 2c]`` 1x1 convs).

    Shapes: input ``(B, C, *S)`` with ``S`` the UNETR ``img_size``; returns ``{"recon": (B, C, *S), "z": [z^0, ...,
    z^{L-1}]}`` with ``z^l`` ``(B, 2 c_l, *s_l)``. ``model.backbone.state_dict()`` is a plain UNETR checkpoint;
    fine-tuning loads its encoder (:func:`mixcl_pretrained_prefixes`) into a UNETR with ``num_classes`` outputs.

    Args:
        backbone: the UNETR (or any network) producing the reconstruction.
        spatial_dims: 2 or 3.
        layers: module names to tap, shallow to deep. Defaults to :data:`MIXCL_LAYERS`.
        expansion: projector output channels ``expansion * c_l``. Defaults to 2 (the paper).
        projector_norm: norm of the projectors. Defaults to ``"batch"``.
        channels: the layers' channels, to skip the shape probe (one forward pass at the input size).

    Raises:
        MedclInputError: for unknown layer names or ``channels`` of the wrong length.
    """

    def __init__(
        self,
        backbone: nn.Module,
        spatial_dims: int = 3,
        layers: Sequence[str] = MIXCL_LAYERS,
        expansion: int = 2,
        projector_norm: str | tuple = "batch",
        channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.spatial_dims = int(spatial_dims)
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        check_module_names(backbone, self.layers)
        self.grid = getattr(backbone, "feat_size", None)
        if channels is None:
            channels = self._probe_channels()
        channels = [int(c) for c in channels]
        if len(channels) != len(self.layers):
            raise MedclInputError(f"channels {channels} must give one value per layer {self.layers}.")
        self.channels = channels
        self.projectors = nn.ModuleList(
            PointwiseProjector(c, self.spatial_dims, expansion=expansion, norm=projector_norm) for c in channels
        )

    def _probe_channels(self) -> list[int]:
        with probe_mode(self.backbone), torch.no_grad():
            outputs, _ = run_probe(self.backbone, self.layers, self.spatial_dims, None, collect_outputs=False)
        return [int(as_feature_map(outputs[n], self.grid).shape[1]) for n in self.layers]

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        """
        Args:
            x: ``(B, C, *S)`` patches (views of several patches may be concatenated along the batch).

        Returns:
            ``{"recon": (B, C, *S), "z": list of (B, 2 c_l, *s_l)}``.

        Raises:
            MedclInputError: when ``x`` is not of the network's fixed input size.
        """
        size = input_size_of(self.backbone)
        if size is not None and tuple(x.shape[2:]) != size:
            raise MedclInputError(
                f"{type(self.backbone).__name__} takes patches of exactly {size} (its img_size), got "
                f"{tuple(x.shape[2:])}: set patch_size to img_size."
            )
        with FeatureTaps(self.backbone, self.layers) as taps:
            recon = self.backbone(x)
        z = [
            proj(as_feature_map(taps.outputs[n], self.grid))
            for n, proj in zip(self.layers, self.projectors, strict=True)
        ]
        return {"recon": recon, "z": z}


def mixcl_pretrained_prefixes(
    backbone: nn.Module, layers: Sequence[str] = MIXCL_LAYERS, encoder: Sequence[str] = ("vit",)
) -> list[str]:
    """
    ``state_dict`` prefixes of the encoder MixCL pre-trains: every module feeding the tapped ``layers`` or the
    ``encoder`` modules, taken whole (for UNETR and the defaults: ``vit``, ``encoder1`` ... ``encoder4``; the
    whole ViT because its last blocks feed the reconstruction through ``decoder5``, not a tapped layer).
    Fine-tuning loads these from the pre-training checkpoint (:func:`medcl.networks.pretrained.load_pretrained`);
    the decoder (the reconstructor's ``decoder5`` ... ``decoder2``) and the output layer start from random
    weights, as in the paper.

    Args:
        backbone: the fine-tuning network (e.g. UNETR with ``num_classes`` outputs; same ``img_size`` and width
            as in pre-training).
        layers: the pre-training taps. Defaults to :data:`MIXCL_LAYERS`.
        encoder: further modules that belong to the encoder as a whole (those absent from ``backbone`` are
            ignored). Defaults to ``("vit",)``.
    """
    modules = dict(backbone.named_modules())
    whole = [e for e in encoder if e in modules]
    under = [p for p in tapped_prefixes(backbone, layers) if not any(p == e or p.startswith(e + ".") for e in whole)]
    return whole + under
