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
MACL's pre-training step for :class:`medcl.engines.pretrain_trainer.PretrainTrainer`: views -> two-branch model ->
``L = w_g L_g + w_d L_d + w_er L_ER`` (defaults 1, 0.5, 1), each term returned for logging.

How the public code (``train_contrast.py``, ``network/unet2d.py``) pairs views, branches and losses, and where each
piece lives here:

===========================  ==================================================  =================================
public code                  what it is                                          medcl
===========================  ==================================================  =================================
``img1``, ``img2``           intensity views I1, I2 (pixel-aligned)              ``batch["view_i1"/"view_i2"]``
``img3``, ``img4``           spatial views V1 = spatial(I1), V2 = spatial(I2)    ``batch["view_v1"/"view_v2"]``
``share_encoder(x1)``        auxiliary branch on I1 (full resolution)            ``MACLPretrainModel(i1, i2)``
``share_encoder(x2)`` +      dominant branch on I2 / 4 (encoder + 2 decoder
``online_decoder``           blocks)
``criterion_L1``             L_ER: L1(interp(bottleneck(I1), x0.25),             :class:`FeatureConsistencyLoss`
                             bottleneck(I2 / 4))
pixel loop over ``h * w``    L_d: SupCon at every location between the           :class:`DenseSupConLoss`
                             projected I1 bottleneck and decoder block 2 of      (vectorised)
                             I2 / 4, positives by slice position
``instance_1/2``             L_g: SupCon over the 2N pooled projections of       :class:`PositionalSupConLoss`
                             V1 (auxiliary) and V2 / 4 (dominant), positives
                             by slice position
``loss_instance + alpha *    total, ``alpha = 0.5``, ``alpha_ER = 1.0``          ``weight_g/weight_d/weight_er``
loss_pixel + alpha_ER *
loss_ER``
===========================  ==================================================  =================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medcl.data.views import VIEW_KEYS
from medcl.errors import MedclInputError
from medcl.losses.dense_supcon import DenseSupConLoss
from medcl.losses.feature_consistency import FeatureConsistencyLoss
from medcl.losses.supcon import PositionalSupConLoss, check_form
from medcl.networks.macl import MACLPretrainModel

__all__ = ["ER_REDUCTIONS", "MACLStep", "MACLViewsModel", "PIXEL_POSITIVES"]

#: L_ER reductions: the public code's mean absolute difference, or eq. 11's L1 norm (a sum).
ER_REDUCTIONS = ("mean", "sum")
#: L_d positives: by slice position (the public code) or the same sample only.
PIXEL_POSITIVES = ("position", "sample")

_PIXEL_KEYS = ("z_l_aux", "z_l_dom", "bottleneck_aux", "bottleneck_dom")
_IMAGE_KEYS = ("z_g_aux", "z_g_dom")


class MACLViewsModel(nn.Module):
    """
    All of MACL's network passes for one batch in a single ``forward`` call, so that ``DistributedDataParallel``
    (which needs one forward per backward) can wrap it: ``(I1, I2)`` through the two branches for the pixel- and
    feature-level outputs, ``(V1, V2)`` through them for the image-level outputs (the public code's four-input
    model). With two views only (``v1 = v2 = None``) one pair gives all six outputs.

    ``MACLViewsModel(model).backbone`` is the segmentation network (what the pre-training checkpoint stores).

    Args:
        model: the two-branch model around the backbone.
    """

    def __init__(self, model: MACLPretrainModel) -> None:
        super().__init__()
        self.model = model

    @property
    def backbone(self) -> nn.Module:
        """The segmentation network being pre-trained."""
        return self.model.backbone

    def forward(
        self,
        i1: torch.Tensor,
        i2: torch.Tensor,
        v1: torch.Tensor | None = None,
        v2: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            i1, i2: ``(B, C, *S)`` intensity views (auxiliary, dominant).
            v1, v2: ``(B, C, *S)`` spatial views (auxiliary, dominant), or both None.

        Returns:
            ``{"z_g_aux", "z_g_dom"}`` of ``model(v1, v2)`` and ``{"z_l_aux", "z_l_dom", "bottleneck_aux",
            "bottleneck_dom"}`` of ``model(i1, i2)`` (all six of ``model(i1, i2)`` without ``v1``/``v2``); shapes
            as :class:`~medcl.networks.macl.MACLPretrainModel`.

        Raises:
            ValueError: when only one of ``v1``, ``v2`` is given.
        """
        pixel = self.model(i1, i2)
        if v1 is None and v2 is None:
            return pixel
        if v1 is None or v2 is None:
            raise ValueError("give both spatial views v1 and v2, or neither.")
        image = self.model(v1, v2)
        out = {k: pixel[k] for k in _PIXEL_KEYS}
        out.update({k: image[k] for k in _IMAGE_KEYS})
        return out


class MACLStep:
    """
    MACL pre-training step: ``step(network, batch) -> {"loss", "loss_g", "loss_d", "loss_er"}`` with

    .. math::

        L = w_g L_g + w_d L_d + w_{er} L_{ER}

    - :math:`L_g` = ``PositionalSupConLoss(temperature, position_threshold, base_temperature, supcon_form)`` on
      ``stack([z_g_dom, z_g_aux], 1)`` ``(B, 2, proj_dim)`` (view 0 dominant: the anchors of the paper's eq. 9) with
      the batch's positions;
    - :math:`L_d` = ``DenseSupConLoss(temperature, position_threshold, base_temperature, pixel_positives,
      supcon_form)`` between ``z_l_aux`` and ``z_l_dom`` ``(B, C, *s)``, one SupCon problem per location, all
      locations at once;
    - :math:`L_{ER}` = ``FeatureConsistencyLoss(scale, reduction=er_reduction)`` between ``bottleneck_aux`` and
      ``bottleneck_dom``.

    ``network`` is a :class:`MACLViewsModel` (or ``DistributedDataParallel`` around one); it is called once with the
    views ``batch[k] for k in view_keys``: four keys ``(I1, I2, V1, V2)`` (the public code: intensity pair for L_d
    and L_ER, spatial pair for L_g) or two ``(I1, I2)`` (one pair for all terms, half the network passes).
    ``batch[position_key]`` ``(B,)`` holds each sample's normalised position ``(slice index + 1) / depth`` (2D) or
    the patch centre's (3D), shared by all its views.

    All three terms are computed whatever the weights (so that each can be logged); the returned terms are the
    unweighted values.

    Args:
        temperature: SupCon temperature of L_g and L_d. Defaults to 0.1.
        position_threshold: positions closer than this are positives (PCL rule). Defaults to 0.1.
        base_temperature: the public code's 0.07 (default), which multiplies both SupCon terms by
            ``temperature / base_temperature`` (1 / 0.7 at ``temperature`` 0.1, so L_g and L_d weigh 1.43 times more
            against L_ER), or None for the paper's unscaled eq. 9-10.
        weight_g: weight of L_g. Defaults to 1.0.
        weight_d: weight of L_d (the public ``--alpha``). Defaults to 0.5.
        weight_er: weight of L_ER (the public ``--alpha_ER``). Defaults to 1.0.
        scale: downsampling of the dominant branch (must equal the model's ``scale``). Defaults to 0.25.
        pixel_positives: ``"position"`` (public code) or ``"sample"`` positives of L_d, see
            :class:`~medcl.losses.dense_supcon.DenseSupConLoss`.
        supcon_form: ``"code"`` (default, the public code: all vectors of both branches are anchors and
            candidates, mean over anchors) or ``"paper"`` (eq. 9-10 as printed: dominant anchors against auxiliary
            candidates, sum over anchors); see :class:`~medcl.losses.supcon.PositionalSupConLoss`.
        er_reduction: ``"mean"`` (default, the public code's ``nn.L1Loss()``) or ``"sum"`` (eq. 11's
            :math:`\\|Y - down(\\tilde Y)\\|_1`, summed over every element of the batch).
        view_keys: batch keys of the views: ``(I1, I2, V1, V2)`` or ``(I1, I2)``. Defaults to
            :data:`medcl.data.views.VIEW_KEYS`.
        position_key: batch key of the positions. Defaults to ``"position"``.

    Raises:
        MedclInputError: for a number of view keys other than 2 or 4, a negative weight, or a ``supcon_form`` /
            ``er_reduction`` / ``pixel_positives`` outside its allowed values (the message names them).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        position_threshold: float = 0.1,
        base_temperature: float | None = 0.07,
        weight_g: float = 1.0,
        weight_d: float = 0.5,
        weight_er: float = 1.0,
        scale: float = 0.25,
        pixel_positives: str = "position",
        supcon_form: str = "code",
        er_reduction: str = "mean",
        view_keys: Sequence[str] = VIEW_KEYS,
        position_key: str = "position",
    ) -> None:
        self.view_keys = [view_keys] if isinstance(view_keys, str) else list(view_keys)
        if len(self.view_keys) not in (2, 4):
            raise MedclInputError(f"view_keys must name 4 views (I1, I2, V1, V2) or 2 (I1, I2), got {self.view_keys}.")
        weights = {"weight_g": weight_g, "weight_d": weight_d, "weight_er": weight_er}
        negative = {k: w for k, w in weights.items() if w < 0}
        if negative:
            raise MedclInputError(f"loss weights must be non-negative, got {negative}.")
        self.weight_g, self.weight_d, self.weight_er = float(weight_g), float(weight_d), float(weight_er)
        choices = {"pixel_positives": (pixel_positives, PIXEL_POSITIVES), "er_reduction": (er_reduction, ER_REDUCTIONS)}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise MedclInputError(f"{name} must be one of {list(allowed)}, got {value!r}.")
        check_form(supcon_form)
        self.position_key = position_key
        self.loss_g = PositionalSupConLoss(temperature, position_threshold, base_temperature, form=supcon_form)
        self.loss_d = DenseSupConLoss(
            temperature, position_threshold, base_temperature, positives=pixel_positives, form=supcon_form
        )
        self.loss_er = FeatureConsistencyLoss(scale=scale, reduction=er_reduction)

    def losses(self, outputs: Mapping[str, torch.Tensor], positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        The terms from the model's outputs.

        Args:
            outputs: ``{"z_g_aux", "z_g_dom", "z_l_aux", "z_l_dom", "bottleneck_aux", "bottleneck_dom"}`` (see
                :class:`MACLViewsModel`).
            positions: ``(B,)`` normalised positions.

        Returns:
            ``{"loss": total, "loss_g": L_g, "loss_d": L_d, "loss_er": L_ER}`` (0-dim tensors).
        """
        l_g = self.loss_g(torch.stack([outputs["z_g_dom"], outputs["z_g_aux"]], dim=1), positions)
        l_d = self.loss_d(outputs["z_l_aux"], outputs["z_l_dom"], positions)
        l_er = self.loss_er(outputs["bottleneck_aux"], outputs["bottleneck_dom"])
        total = self.weight_g * l_g + self.weight_d * l_d + self.weight_er * l_er
        return {"loss": total, "loss_g": l_g, "loss_d": l_d, "loss_er": l_er}

    @property
    def term_weights(self) -> dict[str, float]:
        """Weight of each returned term in the total (read by :class:`~medcl.handlers.TermGradNormHandler`)."""
        return {"loss_g": self.weight_g, "loss_d": self.weight_d, "loss_er": self.weight_er}

    def __call__(self, network: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """
        Args:
            network: :class:`MACLViewsModel`, possibly wrapped in ``DistributedDataParallel``.
            batch: collated batch with the view keys (``(B, C, *S)`` each) and the position key (``(B,)``).

        Returns:
            see :meth:`losses`.

        Raises:
            MedclInputError: when the batch lacks a view or the position key.
        """
        missing = [k for k in (*self.view_keys, self.position_key) if k not in batch]
        if missing:
            raise MedclInputError(
                f"the batch lacks {missing} (has {sorted(batch)}): make the views with the pre-training transforms "
                "(CopyItemsd + Rand*d per view, see bundles/macl/configs/pretrain.json) and sample slices/patches "
                "with medcl.data.RandPatchWithPositiond, which adds the position."
            )
        views = [batch[k] for k in self.view_keys]
        return self.losses(network(*views), batch[self.position_key])
