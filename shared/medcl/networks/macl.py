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
MACL's two-branch (asymmetric) pre-training model around any MONAI U-Net-like segmentation network.

How the public 2D code (github.com/stevezs315/MACL, ``network/unet2d.py`` and ``train_contrast.py``) lines the
two branches up, and how it is generalised here:

- *Dominant branch*: the view is downsampled with ``F.interpolate(scale_factor=0.25, mode="bilinear",
  align_corners=True)`` (done in ``train_contrast.py`` before the model), goes through the shared encoder
  (4 poolings, bottleneck of ``16 * f`` channels at 1/16) and the **first two decoder blocks**
  (``expand_4_*`` at 1/8, ``expand_3_*`` at 1/4 of the downsampled input, ``4 * f`` channels). The output of
  decoder block 2 is the pixel map ``Z_l`` (no projector); its global average pool goes through
  ``Linear(4f, 4f) -> ReLU -> Linear(4f, 128)`` for ``Z_g``.
- *Auxiliary branch*: the full-resolution view goes through the encoder only. Its bottleneck (``16f`` channels
  at 1/16) goes through ``conv3x3(16f -> 4f) -> BN -> LeakyReLU -> conv3x3(4f -> 4f) -> BN -> LeakyReLU`` to
  give a map with **the same channels as Z_l** (``4 * f = 128`` for ``f = 32``, the value of every
  pre-training script) and through ``pool -> Linear(16f, 4f) -> ReLU -> Linear(4f, 128)`` for ``Z_g``.
- Sizes: for an input of size ``S`` the auxiliary bottleneck is ``S / 16``; the dominant branch sees ``S / 4``,
  its bottleneck is ``S / 64`` and two stride-2 decoder blocks bring it back to ``S / 16``. In general the maps
  agree when the two decoder blocks upsample by ``1 / scale`` in total (true for any depth of stride-2 U-Net at
  ``scale = 0.25``) and ``S`` is divisible by ``encoder stride / scale`` (64 for a 4-level U-Net); the L1 term
  compares ``interp(bottleneck_aux, x0.25)`` (``S / 64``) with ``bottleneck_dom`` (``S / 64``).

Here the channels are not hard-wired: the pixel projector maps the bottleneck channels to the channels of the
backbone's decoder block 2 (e.g. ``features[2]`` of :class:`~monai.networks.nets.BasicUNet`); both image
projectors have a hidden width of ``proj_dim`` (128, equal to the public code's ``4 * f`` at ``f = 32``).
The intermediate outputs are taken with forward hooks (:class:`~medcl.networks.feature_taps.FeatureTaps`), so
the backbone is the unchanged segmentation network and its ``state_dict`` loads directly into the fine-tuning
network of the same configuration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import AttentionUnet, BasicUNet, BasicUNetPlusPlus, DynUNet, UNet
from torch import nn

from medcl.errors import MedclInputError
from medcl.networks.feature_taps import FeatureTaps, check_module_names
from medcl.networks.probes import probe_mode, run_probe, tapped_prefixes
from medcl.networks.projectors import ImageProjector, PixelProjector

__all__ = [
    "BACKBONE_TAPS",
    "BackboneTaps",
    "MACLPretrainModel",
    "pretrained_prefixes",
    "resolve_taps",
]

_LINEAR_MODES = ("linear", "bilinear", "trilinear")


@dataclass(frozen=True)
class BackboneTaps:
    """
    Where MACL taps a segmentation network: module names as in ``dict(network.named_modules())``.

    Attributes:
        bottleneck: the encoder's last module (deepest features; the auxiliary branch stops after it).
        decoder: the first two decoder blocks, deepest first; the output of ``decoder[1]`` is the dominant
            branch's pixel map ``Z_l`` (the dominant branch stops after it).
    """

    bottleneck: str
    decoder: tuple[str, str]

    @property
    def names(self) -> list[str]:
        """``[bottleneck, decoder[0], decoder[1]]``."""
        return [self.bottleneck, *self.decoder]


def _unet_taps(net: nn.Module) -> BackboneTaps:
    """
    :class:`~monai.networks.nets.UNet` nests ``Sequential(down, SkipConnection(submodule), up)`` blocks:
    ``model`` is the top one, each ``SkipConnection.submodule`` the next one down, and the innermost
    ``SkipConnection.submodule`` is the bottom (stride 1) layer = bottleneck. The ``up`` layers (index 2 of each
    ``Sequential``) are the decoder blocks, the deepest first. For ``channels=(c0, ..., c4)``, 4 strides of 2:
    bottleneck ``model.1.submodule.1.submodule.1.submodule.1.submodule`` (c4 at 1/16), decoder blocks
    ``model.1.submodule.1.submodule.1.submodule.2`` (c2 at 1/8) and ``model.1.submodule.1.submodule.2``
    (c1 at 1/4). Needs ``len(channels) >= 3``.
    """
    path, node, ups = "model", net.model, []
    while True:
        if not (isinstance(node, nn.Sequential) and len(node) == 3 and isinstance(node[1], SkipConnection)):
            raise MedclInputError(f"unexpected UNet structure at {path!r}: expected Sequential(down, skip, up).")
        ups.append(f"{path}.2")
        inner = node[1].submodule
        if isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection):
            path, node = f"{path}.1.submodule", inner
            continue
        bottleneck = f"{path}.1.submodule"
        break
    if len(ups) < 2:
        raise MedclInputError("MACL needs a UNet with at least two decoder blocks (len(channels) >= 3).")
    return BackboneTaps(bottleneck, (ups[-1], ups[-2]))


def _attention_unet_taps(net: nn.Module) -> BackboneTaps:
    """
    :class:`~monai.networks.nets.AttentionUnet` nests ``AttentionLayer(submodule=Sequential(ConvBlock, next))``;
    the deepest ``AttentionLayer`` has a strided ``ConvBlock`` as ``submodule``: that block is the bottleneck.
    An ``AttentionLayer``'s output (``merge(attention, upconv(submodule(x)))``) is one decoder block, so the
    deepest layer is decoder block 1 and its parent decoder block 2. For ``channels=(c0, ..., c4)``: bottleneck
    ``model.1.submodule.1.submodule.1.submodule.1.submodule`` (c4 at 1/16), decoder blocks
    ``model.1.submodule.1.submodule.1.submodule.1`` (c3 at 1/8) and ``model.1.submodule.1.submodule.1``
    (c2 at 1/4). Needs ``len(channels) >= 3``.
    """
    path, node = "model.1", net.model[1]
    parents = []
    while isinstance(node.submodule, nn.Sequential):
        parents.append(path)
        path, node = f"{path}.submodule.1", node.submodule[1]
    if not parents:
        raise MedclInputError("MACL needs an AttentionUnet with at least two decoder blocks (len(channels) >= 3).")
    return BackboneTaps(f"{path}.submodule", (path, parents[-1]))


TapsEntry = BackboneTaps | Callable[[nn.Module], BackboneTaps]

#: Supported backbones: class -> taps (or a function of the instance for depth-dependent names).
#:
#: - ``BasicUNet`` (default): bottleneck ``down_4`` (``features[4]`` at 1/16), decoder ``upcat_4`` (1/8),
#:   ``upcat_3`` (``features[2]`` at 1/4).
#: - ``UNet``: nested ``SkipConnection`` names, depth dependent, see :func:`_unet_taps`.
#: - ``AttentionUnet``: nested ``AttentionLayer`` names, depth dependent, see :func:`_attention_unet_taps`.
#: - ``BasicUNetPlusPlus``: the backbone column ``conv_4_0`` and the nodes on the path from it to the final
#:   output ``x_0_4``: ``upcat_3_1`` (1/8) and ``upcat_2_2`` (1/4). ``upcat_2_2`` also reads the nested node
#:   ``x_2_1`` (``upcat_2_1``), which is therefore trained too; the other nested nodes run but get no gradient.
#: - ``DynUNet``: ``bottleneck``, ``upsamples.0`` (deepest), ``upsamples.1`` (the same modules are also
#:   reachable as ``skip_layers.next_layer...``; hooks fire whatever the name).
BACKBONE_TAPS: dict[type, TapsEntry] = {
    BasicUNet: BackboneTaps("down_4", ("upcat_4", "upcat_3")),
    UNet: _unet_taps,
    AttentionUnet: _attention_unet_taps,
    BasicUNetPlusPlus: BackboneTaps("conv_4_0", ("upcat_3_1", "upcat_2_2")),
    DynUNet: BackboneTaps("bottleneck", ("upsamples.0", "upsamples.1")),
}


def resolve_taps(backbone: nn.Module, taps: BackboneTaps | Mapping | Sequence | None = None) -> BackboneTaps:
    """
    The taps of ``backbone``: ``taps`` if given, else the :data:`BACKBONE_TAPS` entry of its class (or of the
    nearest base class in the table).

    Args:
        backbone: the segmentation network.
        taps: optional override: a :class:`BackboneTaps`, a mapping ``{"bottleneck": name, "decoder": [n1, n2]}``
            (convenient in a JSON config), or a sequence ``(bottleneck, [n1, n2])`` / ``(bottleneck, n1, n2)``.

    Raises:
        MedclInputError: for an unsupported backbone without ``taps``, a malformed ``taps`` or names that are
            not submodules of ``backbone``.
    """
    if taps is None:
        entry = next((BACKBONE_TAPS[c] for c in type(backbone).__mro__ if c in BACKBONE_TAPS), None)
        if entry is None:
            supported = ", ".join(c.__name__ for c in BACKBONE_TAPS)
            raise MedclInputError(
                f"MACL has no tap table entry for {type(backbone).__name__} (supported: {supported}). Pass "
                "taps={'bottleneck': <encoder's last module>, 'decoder': [<decoder block 1>, <decoder block 2>]} "
                "with names from dict(network.named_modules())."
            )
        resolved = entry if isinstance(entry, BackboneTaps) else entry(backbone)
    elif isinstance(taps, BackboneTaps):
        resolved = taps
    elif isinstance(taps, Mapping):
        try:
            resolved = BackboneTaps(str(taps["bottleneck"]), tuple(taps["decoder"]))  # type: ignore[arg-type]
        except KeyError as e:
            raise MedclInputError(f"taps must have keys 'bottleneck' and 'decoder', got {dict(taps)}.") from e
    else:
        items = list(taps)
        if len(items) == 2 and not isinstance(items[1], str):
            resolved = BackboneTaps(str(items[0]), tuple(items[1]))
        elif len(items) == 3:
            resolved = BackboneTaps(str(items[0]), (str(items[1]), str(items[2])))
        else:
            raise MedclInputError(f"taps must be (bottleneck, [decoder1, decoder2]), got {taps!r}.")
    if len(resolved.decoder) != 2:
        raise MedclInputError(f"MACL taps need exactly two decoder blocks, got {list(resolved.decoder)}.")
    check_module_names(backbone, resolved.names)
    return resolved


def pretrained_prefixes(
    backbone: nn.Module,
    taps: BackboneTaps | Mapping | Sequence | None = None,
    example_input: torch.Tensor | None = None,
) -> list[str]:
    """
    ``state_dict`` key prefixes (module names) of the parts of ``backbone`` that MACL pre-trains: the encoder
    up to the bottleneck and the first two decoder blocks. This is what fine-tuning initialises from the
    pre-trained checkpoint (see :func:`medcl.networks.pretrained.load_pretrained`); everything else (later
    decoder blocks, output layer, BasicUNet++ nested nodes not feeding the taps) stays random.

    Derived from the module tree, not from a per-class list (:func:`medcl.networks.probes.tapped_prefixes` on
    the bottleneck and decoder taps): exactly the modules that receive a gradient from the MACL losses. Modules
    reachable under several names (e.g. ``DynUNet``'s ``bottleneck`` and ``skip_layers.next_layer...``) are
    listed under every name.

    Args:
        backbone: the segmentation network (not wrapped in DDP).
        taps: optional tap override, see :func:`resolve_taps`.
        example_input: an input the network accepts, ``(1, C, *spatial)``; by default zeros of the input
            convolution's channels and the smallest cubic size among 16, 32, 64, ... that runs.

    Returns:
        the prefixes in ``named_modules`` order, e.g. ``["conv_0", "down_1", "down_2", "down_3", "down_4",
        "upcat_4", "upcat_3"]`` for :class:`~monai.networks.nets.BasicUNet`.
    """
    return tapped_prefixes(backbone, resolve_taps(backbone, taps).names, example_input)


# ----------------------------------------------------------------------------------------------------------------------
# the two-branch pre-training model
# ----------------------------------------------------------------------------------------------------------------------
class MACLPretrainModel(nn.Module):
    """
    Multi-level asymmetric contrastive pre-training model (MACL) around a segmentation network.

    One shared network (``backbone``, no momentum copy), two branches:

    - dominant: ``x_dom`` downsampled by ``scale`` -> encoder -> first two decoder blocks. ``z_l_dom`` is the
      output of decoder block 2 (no projector), ``z_g_dom = ImageProjector(z_l_dom)``;
    - auxiliary: full-resolution ``x_aux`` -> encoder only. ``z_l_aux = PixelProjector(bottleneck_aux)`` (to the
      channels of ``z_l_dom``), ``z_g_aux = ImageProjector(bottleneck_aux)``.

    Both branches stop the backbone's forward pass early (forward hooks, see
    :class:`~medcl.networks.feature_taps.FeatureTaps`): later decoder blocks are never run and get no gradient
    (wrap in DDP with ``find_unused_parameters=True``). The dominant input is downsampled as the public code
    does: ``F.interpolate(scale_factor=scale, mode="bilinear", align_corners=True)``, trilinear in 3D.

    MACL's losses on the outputs (with :mod:`medcl.losses`), ``L = L_g + 0.5 L_d + L_ER``::

        out = model(i1, i2)                        # intensity views: pixel and feature levels
        l_d = DenseSupConLoss()(out["z_l_aux"], out["z_l_dom"], pos)
        l_er = FeatureConsistencyLoss(scale=0.25)(out["bottleneck_aux"], out["bottleneck_dom"])
        out_v = model(v1, v2)                      # spatially transformed views: image level
        l_g = PositionalSupConLoss()(torch.stack([out_v["z_g_aux"], out_v["z_g_dom"]], 1), pos)

    (the public code feeds ``(I1, I2)`` to the pixel/feature terms and ``(V1, V2)`` to the image term; one call
    with a single pair gives all six outputs).

    Shapes (input ``(B, C, *S)``, ``s = S / (encoder stride)``): ``z_g_dom``, ``z_g_aux`` ``(B, proj_dim)``;
    ``z_l_dom``, ``z_l_aux`` ``(B, C_l, *s)`` with ``C_l`` the channels of decoder block 2; ``bottleneck_aux``
    ``(B, C_b, *s)``; ``bottleneck_dom`` ``(B, C_b, *(s * scale))``. ``S`` must be divisible by
    ``encoder stride / scale`` (64 for a 4-level U-Net at scale 0.25) so that the maps line up.

    Args:
        backbone: the segmentation network (e.g. ``BasicUNet(spatial_dims=2, ...)``); kept as ``self.backbone``,
            so ``model.backbone.state_dict()`` is a plain checkpoint of that network.
        spatial_dims: 2 or 3 (1 also works).
        scale: downsampling factor of the dominant input. Defaults to 0.25. The two decoder blocks must
            upsample by ``1 / scale`` in total (stride-2 blocks: 0.25).
        proj_dim: dimension of ``z_g``. Defaults to 128.
        taps: override of the :data:`BACKBONE_TAPS` entry, see :func:`resolve_taps`.
        hidden_dim: hidden width of both image projectors. Defaults to ``proj_dim`` (the public code's
            ``4 * initial_filter_size = 128``).
        interp_mode: ``F.interpolate`` mode of the downsampling; ``"linear"``/``"bilinear"``/``"trilinear"``
            mean multilinear for the input's dimensionality. Defaults to ``"bilinear"`` (the public code).
        align_corners: passed to ``F.interpolate`` for (multi)linear modes. Defaults to True (the public code).
        probe_size: spatial size (int or sequence) of a full-resolution input used once at construction to
            read the channel counts of the tapped modules; by default the smallest of 16, 32, 64, ... that runs.
        in_channels: input channels for the probe; by default those of the backbone's first convolution.

    Raises:
        MedclInputError: for an unsupported backbone, bad taps or a backbone that cannot run on a probe input.
    """

    def __init__(
        self,
        backbone: nn.Module,
        spatial_dims: int,
        scale: float = 0.25,
        proj_dim: int = 128,
        taps: BackboneTaps | Mapping | Sequence | None = None,
        hidden_dim: int | None = None,
        interp_mode: str = "bilinear",
        align_corners: bool | None = True,
        probe_size: int | Sequence[int] | None = None,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if not 0 < scale <= 1:
            raise ValueError(f"scale must lie in (0, 1], got {scale}.")
        self.backbone = backbone
        self.spatial_dims = spatial_dims
        self.scale = float(scale)
        self.taps = resolve_taps(backbone, taps)
        self.interp_mode = interp_mode
        self.align_corners = align_corners

        with probe_mode(backbone), torch.no_grad():
            outputs, _ = run_probe(
                backbone, self.taps.names, spatial_dims, None, False, in_channels=in_channels, size=probe_size
            )
        bottleneck_channels = int(outputs[self.taps.bottleneck].shape[1])
        local_channels = int(outputs[self.taps.decoder[1]].shape[1])
        hidden = proj_dim if hidden_dim is None else hidden_dim

        self.pixel_projector = PixelProjector(bottleneck_channels, local_channels, spatial_dims)
        self.image_projector_aux = ImageProjector(bottleneck_channels, hidden, proj_dim)
        self.image_projector_dom = ImageProjector(local_channels, hidden, proj_dim)

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """The dominant branch's input: ``x`` resampled by ``scale`` (identity for ``scale == 1``)."""
        if self.scale == 1.0:
            return x
        mode = self.interp_mode
        if mode in _LINEAR_MODES:
            mode = _LINEAR_MODES[x.ndim - 3]
        align = self.align_corners if mode in _LINEAR_MODES + ("bicubic",) else None
        return F.interpolate(x, scale_factor=self.scale, mode=mode, align_corners=align)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder only (the auxiliary branch's backbone pass): the bottleneck of ``x``."""
        return FeatureTaps(self.backbone, [self.taps.bottleneck], stop_early=True)(x)[self.taps.bottleneck]

    def forward(self, x_aux: torch.Tensor, x_dom: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """
        Args:
            x_aux: ``(B, C, *S)`` full-resolution view for the auxiliary branch.
            x_dom: ``(B, C, *S)`` view for the dominant branch (downsampled here by ``scale``); defaults to
                ``x_aux``.

        Returns:
            ``{"z_g_dom", "z_l_dom", "z_g_aux", "z_l_aux", "bottleneck_dom", "bottleneck_aux"}``, see the class
            docstring for the shapes.

        Raises:
            ValueError: when the input is not ``(B, C, *S)`` or the two pixel maps do not line up.
        """
        if x_aux.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims}D input (B, C, *S), got {tuple(x_aux.shape)}.")
        x_dom = x_aux if x_dom is None else x_dom
        if x_dom.shape != x_aux.shape:
            raise ValueError(
                f"x_aux and x_dom must have the same shape, got {tuple(x_aux.shape)} and {tuple(x_dom.shape)}."
            )

        dom = FeatureTaps(self.backbone, self.taps.names, stop_early=True)(self.downsample(x_dom))
        bottleneck_dom = dom[self.taps.bottleneck]
        z_l_dom = dom[self.taps.decoder[1]]
        bottleneck_aux = self.encode(x_aux)
        z_l_aux = self.pixel_projector(bottleneck_aux)
        if z_l_aux.shape != z_l_dom.shape:
            raise ValueError(
                f"input {tuple(x_aux.shape[2:])}: the auxiliary bottleneck is {tuple(bottleneck_aux.shape[2:])} but "
                f"decoder block 2 of the x{self.scale} input is {tuple(z_l_dom.shape[2:])}. Use a size divisible by "
                f"(encoder stride) / scale = {_stride_hint(x_aux, bottleneck_aux, self.scale)}, and decoder blocks "
                f"that upsample by 1 / scale = {1 / self.scale:g} in total."
            )
        return {
            "z_g_dom": self.image_projector_dom(z_l_dom),
            "z_l_dom": z_l_dom,
            "z_g_aux": self.image_projector_aux(bottleneck_aux),
            "z_l_aux": z_l_aux,
            "bottleneck_dom": bottleneck_dom,
            "bottleneck_aux": bottleneck_aux,
        }

    def pretrained_prefixes(self) -> list[str]:
        """:func:`pretrained_prefixes` of ``self.backbone`` with this model's taps."""
        return pretrained_prefixes(self.backbone, self.taps)


def _stride_hint(x: torch.Tensor, bottleneck: torch.Tensor, scale: float) -> str:
    strides = [max(1, round(a / max(b, 1))) for a, b in zip(x.shape[2:], bottleneck.shape[2:], strict=True)]
    return str([int(math.ceil(s / scale)) for s in strides])
