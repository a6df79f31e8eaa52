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
The semi-supervised step of Chaitanya et al. (MedIA 2023) for :class:`medcl.engines.PretrainTrainer`:
``L = L_seg(labelled) + lambda * L_local(labelled + pseudo-labelled)``, each term returned for logging.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from medcl.errors import MedclInputError
from medcl.losses.local_contrastive import LocalContrastiveLoss

__all__ = ["LocalCLStep"]


class LocalCLStep:
    """
    One iteration of the joint objective, on a :class:`medcl.data.MixedLoader` batch
    ``{"labelled": {"image", "label"}, "unlabelled": {"image", "label"}}`` (the ``unlabelled`` labels are
    pseudo-labels; the entry is absent before the first self-training round):

    .. math::
        L = L_{seg}(f(x_l), y_l) + \\lambda \\, L_{local}(z([x_l; x_u]), [y_l; \\hat y_u])

    - one forward pass of ``network(x, return_embeddings=True)`` (e.g. :class:`medcl.networks.SegContrastNet`) on
      the concatenated labelled and unlabelled images gives logits and contrastive-head embeddings;
    - ``L_seg`` (e.g. MONAI ``DiceLoss(to_onehot_y=True, softmax=True)``, the paper's Dice loss) sees the labelled
      images only;
    - ``L_local`` (:class:`medcl.losses.LocalContrastiveLoss`) sees every image of the batch with its ground truth
      or pseudo-label. The images are paired at random each step (a random permutation, consecutive pairs; an odd
      image out is left unpaired), so (labelled, labelled), (labelled, unlabelled) and (unlabelled, unlabelled)
      pairs all occur; every image carries its own random intensity augmentation from the data pipeline.

    ``lambda_local`` applies when the batch has pseudo-labelled images, ``lambda_local_gt`` when it has only
    labelled ones (the "local loss with ground truth only" ablation; 0 = the labelled-only baseline). A weight of 0
    skips the loss and its pairing; ``loss_local`` is then logged as 0.

    Args:
        seg_loss: ``seg_loss(logits, labels)`` on the labelled part, labels ``(B_l, 1, *spatial)``.
        local_loss: the local contrastive loss (its ``ignore_index`` should match the pseudo-labeller's when a
            confidence filter is used).
        lambda_local: weight of ``L_local`` with pseudo-labels. Defaults to 0.1 (paper).
        lambda_local_gt: weight of ``L_local`` before pseudo-labels exist (labelled images only). Defaults to 0.
        image_key, label_key: keys in each part of the batch.
        labelled_key, unlabelled_key: the parts of the batch.
        generator: random generator of the pairing (None: torch's global one, seeded by ``set_determinism``).

    Raises:
        MedclInputError: (during a run) when the batch has no labelled part, or a part lacks image or label.
    """

    def __init__(
        self,
        seg_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        local_loss: LocalContrastiveLoss | Callable | None = None,
        lambda_local: float = 0.1,
        lambda_local_gt: float = 0.0,
        image_key: str = "image",
        label_key: str = "label",
        labelled_key: str = "labelled",
        unlabelled_key: str = "unlabelled",
        generator: torch.Generator | None = None,
    ) -> None:
        if min(lambda_local, lambda_local_gt) < 0:
            raise ValueError(f"loss weights must be >= 0, got {lambda_local}, {lambda_local_gt}.")
        self.seg_loss = seg_loss
        self.local_loss = local_loss if local_loss is not None else LocalContrastiveLoss()
        self.lambda_local = float(lambda_local)
        self.lambda_local_gt = float(lambda_local_gt)
        self.image_key, self.label_key = image_key, label_key
        self.labelled_key, self.unlabelled_key = labelled_key, unlabelled_key
        self.generator = generator

    def _part(self, batch: Mapping[str, Any], key: str) -> tuple[torch.Tensor, torch.Tensor]:
        part = batch.get(key)
        if not isinstance(part, Mapping) or self.image_key not in part or self.label_key not in part:
            raise MedclInputError(
                f"LocalCLStep needs batch[{key!r}] with {self.image_key!r} and {self.label_key!r} "
                f"(a medcl.data.MixedLoader batch); got keys {sorted(batch)}."
            )
        return part[self.image_key], part[self.label_key]

    def random_pairs(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """``(batch_size // 2, 2)`` disjoint random pairs of batch indices."""
        perm = torch.randperm(batch_size, generator=self.generator).to(device)
        return perm[: batch_size - batch_size % 2].reshape(-1, 2)

    def __call__(self, network: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        x_l, y_l = self._part(batch, self.labelled_key)
        images, labels = [x_l], [y_l]
        pseudo = self.unlabelled_key in batch
        if pseudo:
            x_u, y_u = self._part(batch, self.unlabelled_key)
            images.append(x_u)
            labels.append(y_u)
        weight = self.lambda_local if pseudo else self.lambda_local_gt
        x = torch.cat(images) if len(images) > 1 else x_l
        logits, embeddings = network(x, return_embeddings=True)
        n_l = x_l.shape[0]
        seg = self.seg_loss(logits[:n_l], y_l)
        if weight > 0 and x.shape[0] >= 2:
            y = torch.cat(labels) if len(labels) > 1 else y_l
            local = self.local_loss(embeddings, y, self.random_pairs(x.shape[0], x.device))
        else:
            local = torch.zeros((), device=seg.device, dtype=seg.dtype)
        return {"loss": seg + weight * local, "loss_seg": seg.detach(), "loss_local": local.detach()}
