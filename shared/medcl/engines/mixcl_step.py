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
MixCL's pre-training step for :class:`medcl.engines.pretrain_trainer.PretrainTrainer` (paper eq. 1):

.. math::

    L = w_{id} L_{id} + \\alpha L_{label} + \\beta L_{recon}, \\qquad w_{id} = 1,\\ \\alpha = \\beta = 0.01

One network pass over the three views ``[V1; V1'; V2]`` concatenated along the batch (``3B`` patches, one
forward for DDP), then:

- ``L_id`` (:class:`~medcl.losses.barlow_twins_pixel.BarlowTwinsPixelLoss`, eq. 4-5): pixel Barlow Twins between
  the projections of ``V1`` and ``V1'`` on every tapped layer (the views are pixel-aligned: they differ by
  intensity augmentation only);
- ``L_label`` (:class:`~medcl.losses.label_consistency.LabelConsistencyLoss`, eq. 6): on layer ``label_layer``
  (the paper's "2-nd layer"), between pixels of ``V1`` and of ``V2`` drawn by
  :class:`~medcl.samplers.boundary_weighted.BoundaryWeightedPixelSampler` (``r`` per class present, probability
  ``∝ W = ½ √D exp(−D/μ) + ε`` at the feature resolution), with the item's dataset id so that classes of
  different pooled datasets never match and background is not contrasted across datasets;
- ``L_recon`` (eq. 3, ``||P_i - P~_i||^2``): the squared error between each reconstruction and its clean patch
  (``P1`` for ``V1`` and ``V1'``, ``P2`` for ``V2``) summed over channels and voxels, averaged over the batch and
  the three reconstructions (``recon_reduction="sum"``, default). ``recon_reduction="mean"`` averages over voxels
  too (``F.mse_loss``, medcl before 0.2): that is ``1 / (C * H * W * D)`` of eq. 3 (``1 / 96^3`` at the paper's
  patch), so ``beta = 0.01`` then leaves the term almost without effect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medcl.errors import MedclInputError
from medcl.losses.barlow_twins_pixel import BarlowTwinsPixelLoss
from medcl.losses.label_consistency import LabelConsistencyLoss
from medcl.samplers.boundary_weighted import DISTANCES, BoundaryWeightedPixelSampler, gather_pixel_features

__all__ = ["MIXCL_VIEW_KEYS", "RECON_REDUCTIONS", "MixCLStep"]

#: Batch keys of the views ``V1, V1', V2``, the clean patches ``P1, P2`` and the labels ``S1, S2``.
MIXCL_VIEW_KEYS = ("view_1", "view_1p", "view_2")
RECON_REDUCTIONS = ("sum", "mean")


class MixCLStep:
    """
    MixCL pre-training step: ``step(network, batch) -> {"loss", "loss_id", "loss_label", "loss_recon"}``.

    ``network`` is a :class:`~medcl.networks.mixcl.MixCLPretrainModel` (or DDP around one): ``network(x) ->
    {"recon": (N, C, *S), "z": [(N, C_l, *s_l), ...]}``. The batch holds ``view_keys`` (``V1, V1', V2``, each
    ``(B, C, *S)``), ``target_keys`` (clean ``P1, P2``), ``label_keys`` (``S1, S2``, ``(B, 1, *S)``) and
    ``dataset_key`` (``(B,)`` dataset id, shared by ``P1`` and ``P2``; optional for a single dataset).

    All three terms are computed whatever the weights, so that each is logged (the returned terms are
    unweighted); weights of 0 give the paper's ablation rows (Identity: ``alpha = beta = 0``; +Label:
    ``beta = 0``).

    Args:
        weight_id: weight of L_id. Defaults to 1.
        alpha: weight of L_label. Defaults to 0.01.
        beta: weight of L_recon. Defaults to 0.01.
        lambd: Barlow Twins off-diagonal weight λ (not given by the paper; Barlow Twins' value). Defaults to 5e-3.
        temperature: τ of L_label. Defaults to 0.1.
        label_layer: index of the tapped layer for L_label. Defaults to 1 (the 2nd layer).
        num_per_class: ``r``, pixels drawn per class and patch. Defaults to 64.
        background_samples: budget of the background class (None: ``num_per_class``).
        mu: μ of the weight map (voxels at the feature resolution). Defaults to 8.
        eps: ε of the weight map. Defaults to 0.05.
        label_mode: ``"global"`` (eq. 6 as printed) or ``"anchor"``, see
            :class:`~medcl.losses.label_consistency.LabelConsistencyLoss`.
        contrast_background_across_datasets: make background of dataset A vs foreground of B a negative pair.
            Defaults to False (the paper: background is not contrasted across datasets).
        resize_mode: how labels reach the feature grid (``"nearest"`` or ``"nearest-exact"``).
        recon_reduction: ``"sum"`` (eq. 3: sum over voxels, mean over the batch; default) or ``"mean"`` (mean
            over voxels as well).
        center_features: L_id centres each channel over the ``M`` pixels before eq. 5 (Barlow Twins' batch-norm
            standardisation, default); False evaluates eq. 5 as printed, on the raw projections.
        boundary_distance: ``D`` of the weight map: ``"boundary"`` (eq. 7: distance to the class boundary,
            0 on it; default) or ``"outside"`` (distance to the nearest voxel outside the class, medcl before
            0.2), see :func:`~medcl.samplers.boundary_weighted.boundary_distance_weights`.
        view_keys, target_keys, label_keys, dataset_key: batch keys.

    Raises:
        MedclInputError: for a negative weight, bad key lists, or an unknown ``recon_reduction`` /
            ``boundary_distance``.
    """

    def __init__(
        self,
        weight_id: float = 1.0,
        alpha: float = 0.01,
        beta: float = 0.01,
        lambd: float = 5e-3,
        temperature: float = 0.1,
        label_layer: int = 1,
        num_per_class: int = 64,
        background_samples: int | None = None,
        mu: float = 8.0,
        eps: float = 0.05,
        label_mode: str = "global",
        contrast_background_across_datasets: bool = False,
        resize_mode: str = "nearest",
        recon_reduction: str = "sum",
        center_features: bool = True,
        boundary_distance: str = "boundary",
        view_keys: Sequence[str] = MIXCL_VIEW_KEYS,
        target_keys: Sequence[str] = ("image", "image_2"),
        label_keys: Sequence[str] = ("label", "label_2"),
        dataset_key: str | None = "dataset_id",
    ) -> None:
        weights = {"weight_id": weight_id, "alpha": alpha, "beta": beta}
        negative = {k: w for k, w in weights.items() if w < 0}
        if negative:
            raise MedclInputError(f"loss weights must be non-negative, got {negative}.")
        self.view_keys, self.target_keys, self.label_keys = list(view_keys), list(target_keys), list(label_keys)
        if len(self.view_keys) != 3 or len(self.target_keys) != 2 or len(self.label_keys) != 2:
            raise MedclInputError(
                "view_keys must name 3 views (V1, V1', V2), target_keys 2 patches (P1, P2), label_keys 2 labels "
                f"(S1, S2); got {self.view_keys}, {self.target_keys}, {self.label_keys}."
            )
        if recon_reduction not in RECON_REDUCTIONS:
            raise MedclInputError(
                f"recon_reduction={recon_reduction!r} is not one of {list(RECON_REDUCTIONS)}: 'sum' is eq. 3 of the "
                "paper (sum over voxels), 'mean' averages over voxels too (e.g. --recon_reduction sum)."
            )
        if boundary_distance not in DISTANCES:
            raise MedclInputError(
                f"boundary_distance={boundary_distance!r} is not one of {list(DISTANCES)}: 'boundary' is eq. 7 "
                "(distance to the class boundary), 'outside' the distance to the nearest voxel outside the class "
                "(e.g. --boundary_distance boundary)."
            )
        self.recon_reduction = recon_reduction
        self.weight_id, self.alpha, self.beta = float(weight_id), float(alpha), float(beta)
        self.label_layer = int(label_layer)
        self.dataset_key = dataset_key
        self.loss_id = BarlowTwinsPixelLoss(lambd=lambd, center=center_features)
        self.loss_label = LabelConsistencyLoss(
            temperature=temperature,
            mode=label_mode,
            contrast_background_across_datasets=contrast_background_across_datasets,
        )
        self.sampler = BoundaryWeightedPixelSampler(
            num_per_class,
            mu=mu,
            eps=eps,
            background_samples=background_samples,
            resize_mode=resize_mode,
            distance=boundary_distance,
        )

    @property
    def term_weights(self) -> dict[str, float]:
        """Weight of each returned term in the total (read by :class:`~medcl.handlers.TermGradNormHandler`)."""
        return {"loss_id": self.weight_id, "loss_label": self.alpha, "loss_recon": self.beta}

    def recon_term(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        L_recon of one reconstruction (eq. 3): ``||P - P~||^2`` per patch, averaged over the batch.

        Args:
            recon: ``(B, C, *S)`` reconstruction ``P~``.
            target: ``(B, C, *S)`` clean patch ``P``.

        Returns:
            0-dim tensor; with ``recon_reduction="mean"`` the mean over every element instead.
        """
        if self.recon_reduction == "mean":
            return F.mse_loss(recon, target)
        return (recon - target).pow(2).flatten(1).sum(1).mean()

    def label_term(
        self, z1: torch.Tensor, s1: torch.Tensor, z2: torch.Tensor, s2: torch.Tensor, dataset_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """
        L_label between sampled pixels of two projected maps.

        Args:
            z1, z2: ``(B, C, *s)`` projections of V1 and V2 at the label layer.
            s1, s2: ``(B, 1, *S)`` labels of P1 and P2 (brought to ``s`` by the sampler).
            dataset_ids: ``(B,)`` dataset of each item, or None for one dataset.
        """
        b1, i1, y1 = self.sampler(s1, size=z1.shape[2:])
        b2, i2, y2 = self.sampler(s2, size=z2.shape[2:])
        f1, f2 = gather_pixel_features(z1, b1, i1), gather_pixel_features(z2, b2, i2)
        if dataset_ids is None:
            return self.loss_label(f1, y1, f2, y2)
        return self.loss_label(f1, y1, f2, y2, dataset_ids[b1], dataset_ids[b2])

    def __call__(self, network: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """
        Args:
            network: :class:`~medcl.networks.mixcl.MixCLPretrainModel`, possibly wrapped in DDP.
            batch: collated batch with the view, target, label and (optional) dataset keys.

        Returns:
            ``{"loss": total, "loss_id", "loss_label", "loss_recon"}`` (0-dim tensors).

        Raises:
            MedclInputError: when the batch lacks a key or the views differ in shape.
        """
        wanted = [*self.view_keys, *self.target_keys, *self.label_keys]
        missing = [k for k in wanted if k not in batch]
        if missing:
            raise MedclInputError(
                f"the batch lacks {missing} (has {sorted(batch)}): build the pairs with medcl.data.PartnerDataset "
                "and the views with the transforms of bundles/mixcl/configs/pretrain.json."
            )
        v1, v1p, v2 = (batch[k] for k in self.view_keys)
        if not v1.shape == v1p.shape == v2.shape:
            raise MedclInputError(f"views must share one shape, got {[tuple(v.shape) for v in (v1, v1p, v2)]}.")
        p1, p2 = (batch[k] for k in self.target_keys)
        s1, s2 = (batch[k] for k in self.label_keys)
        n = v1.shape[0]
        out = network(torch.cat([v1, v1p, v2], dim=0))
        z = [layer.split(n, dim=0) for layer in out["z"]]
        if not -len(z) <= self.label_layer < len(z):
            raise MedclInputError(f"label_layer {self.label_layer} is out of range for {len(z)} tapped layers.")
        l_id = self.loss_id([zl[0] for zl in z], [zl[1] for zl in z])
        ids = batch.get(self.dataset_key) if self.dataset_key is not None else None
        ids = None if ids is None else torch.as_tensor(ids, device=v1.device).reshape(-1).long()
        zl = z[self.label_layer]
        l_label = self.label_term(zl[0], s1, zl[2], s2, ids)
        r1, r1p, r2 = out["recon"].split(n, dim=0)
        l_recon = (self.recon_term(r1, p1) + self.recon_term(r1p, p1) + self.recon_term(r2, p2)) / 3.0
        total = self.weight_id * l_id + self.alpha * l_label + self.beta * l_recon
        return {"loss": total, "loss_id": l_id, "loss_label": l_label, "loss_recon": l_recon}
