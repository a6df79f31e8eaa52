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

__all__ = ["LocalCLStep", "intensity_view"]


_PAIRS = ("mixed", "same_image", "random")


def intensity_view(
    x: torch.Tensor,
    brightness: float = 0.3,
    contrast: tuple[float, float] = (0.7, 1.3),
    clip: tuple[float, float] | None = (0.0, 1.5),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    A randomly brightened and contrasted copy of every image of ``x`` (``(B, C, *spatial)``), as the public code's
    ``brit_cont_net`` (TF ``random_brightness(max_delta=0.3)``, ``random_contrast(0.7, 1.3)``, clip to [0, 1.5]):
    ``x' = clip((x + b - m) * f + m)`` with ``b ~ U(-brightness, brightness)``, ``f ~ U(*contrast)`` per image and
    ``m`` the mean of ``x + b`` over each image's channel. No gradient flows to the random factors.
    """
    n = x.shape[0]
    shape = (n,) + (1,) * (x.ndim - 1)
    u = torch.rand((2, n), generator=generator).to(device=x.device, dtype=x.dtype)
    b = ((2 * u[0] - 1) * brightness).reshape(shape)
    f = (contrast[0] + u[1] * (contrast[1] - contrast[0])).reshape(shape)
    y = x + b
    m = y.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    y = (y - m) * f + m
    return y.clamp(*clip) if clip is not None else y


class LocalCLStep:
    """
    One iteration of the joint objective, on a :class:`medcl.data.MixedLoader` batch
    ``{"labelled": {"image", "label"}, "unlabelled": {"image", "label"}}`` (the ``unlabelled`` labels are
    pseudo-labels; the entry is absent before the first self-training round):

    .. math::
        L = L_{seg}(f(x_l), y_l) + \\lambda \\, L_{local}(z([x_l; x_u; v]), [y_l; \\hat y_u; y_v])

    - one forward pass of ``network(x, return_embeddings=True)`` (e.g. :class:`medcl.networks.SegContrastNet`) on
      the concatenated labelled and unlabelled images (and, for ``pairs`` ``"mixed"`` / ``"same_image"``, the
      second views ``v``) gives logits and contrastive-head embeddings;
    - ``L_seg`` (e.g. MONAI ``DiceLoss(to_onehot_y=True, softmax=True)``, the paper's Dice loss) sees the labelled
      images only;
    - ``L_local`` (:class:`medcl.losses.LocalContrastiveLoss`) sees image pairs built from the batch's labelled
      and pseudo-labelled images with their ground truth or pseudo-label.

    Pair construction (``pairs``; the public code, ``train_model/prop_method_joint_tr_rand_init.py``, builds two
    stacks ``net_img_batch1_re`` / ``net_img_batch2_re`` of ``bt_size`` slices, each stack with its own random
    brightness / contrast, and pairs slice ``i`` of one with slice ``i`` of the other):

    - ``"mixed"`` (default, the code's default ``local_loss_exp_no=1``, whose 10 pairs are 4 slices paired with an
      augmented copy of themselves and 6 pairs of different slices, labelled-pseudo and pseudo-pseudo): the
      eligible images in random order; every even-ranked one is paired with a new intensity view of itself, every
      odd-ranked one with a new intensity view of the next eligible image (so about half the pairs are same-image);
    - ``"same_image"`` (the code's ``local_loss_exp_no=0`` layout): every eligible image with a new intensity
      view of itself (:func:`intensity_view`, the code's ``brit_cont_net``);
    - ``"random"`` (medcl <= 0.1): the eligible images in random disjoint pairs (a random permutation,
      consecutive pairs, an odd one out left unpaired), no extra views; each image carries only the pipeline's
      own random augmentation.

    ``class_filter`` (default True, the code: ``np.unique(label) == cls_ref``) makes only slices / patches whose
    label holds every class ``0 .. num_classes - 1`` eligible for the local loss (the Dice loss still sees every
    labelled image); with no eligible image (or, for ``"random"``, fewer than 2) the local loss is 0 for that step
    (the code skips the whole iteration instead).

    ``lambda_local`` applies when the batch has pseudo-labelled images, ``lambda_local_gt`` when it has only
    labelled ones (the "local loss with ground truth only" ablation; 0 = the labelled-only baseline). A weight of 0
    skips the loss, its pairing and its extra views; ``loss_local`` is then logged as 0.

    Args:
        seg_loss: ``seg_loss(logits, labels)`` on the labelled part, labels ``(B_l, 1, *spatial)``.
        local_loss: the local contrastive loss (its ``ignore_index`` should match the pseudo-labeller's when a
            confidence filter is used).
        lambda_local: weight of ``L_local`` with pseudo-labels. Defaults to 0.1 (paper).
        lambda_local_gt: weight of ``L_local`` before pseudo-labels exist (labelled images only). Defaults to 0.
        image_key, label_key: keys in each part of the batch.
        labelled_key, unlabelled_key: the parts of the batch.
        generator: random generator of the pairing and the views (None: torch's global one, seeded by
            ``set_determinism``).
        pairs: ``"mixed"`` (default), ``"same_image"`` or ``"random"``, see above.
        class_filter: only images holding every class take part in the local loss. Defaults to True (code).
        num_classes: number of classes, background included; required by ``class_filter``.
        view_kwargs: arguments of :func:`intensity_view` (``brightness``, ``contrast``, ``clip``); defaults: the
            code's 0.3, (0.7, 1.3), (0, 1.5).
        min_classes: with ``class_filter``: None (default, the code): every class ``0 .. num_classes - 1`` must be
            present; an int ``k``: at least ``k`` of them (background counts), for label sets whose classes rarely
            share a slice.

    Raises:
        MedclInputError: for a misspelt ``pairs`` (the message names the allowed values), ``class_filter`` without
            ``num_classes``, negative weights; during a run, when the batch has no labelled part, or a part lacks
            image or label.
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
        pairs: str = "mixed",
        class_filter: bool = True,
        num_classes: int | None = None,
        view_kwargs: Mapping[str, Any] | None = None,
        min_classes: int | None = None,
    ) -> None:
        if min(lambda_local, lambda_local_gt) < 0:
            raise MedclInputError(f"loss weights must be >= 0, got {lambda_local}, {lambda_local_gt}.")
        if pairs not in _PAIRS:
            raise MedclInputError(f"LocalCLStep: pairs must be one of {', '.join(_PAIRS)}; got {pairs!r}.")
        if class_filter and (num_classes is None or int(num_classes) < 2):
            raise MedclInputError(
                f"LocalCLStep: class_filter=True needs num_classes (>= 2, background included), got {num_classes}; "
                "pass num_classes or set class_filter false."
            )
        self.seg_loss = seg_loss
        self.local_loss = local_loss if local_loss is not None else LocalContrastiveLoss()
        self.lambda_local = float(lambda_local)
        self.lambda_local_gt = float(lambda_local_gt)
        self.image_key, self.label_key = image_key, label_key
        self.labelled_key, self.unlabelled_key = labelled_key, unlabelled_key
        self.generator = generator
        self.pairs = pairs
        self.class_filter = bool(class_filter)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.view_kwargs = dict(view_kwargs or {})
        if min_classes is not None and not 1 <= int(min_classes) <= (self.num_classes or int(min_classes)):
            raise MedclInputError(f"LocalCLStep: min_classes must be in [1, num_classes] or None, got {min_classes}.")
        self.min_classes = None if min_classes is None else int(min_classes)

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

    def eligible(self, labels: torch.Tensor) -> torch.Tensor:
        """Indices of the images whose label holds every class ``0 .. num_classes - 1`` (at least ``min_classes``
        of them when set; every image with no filter)."""
        n = labels.shape[0]
        if not self.class_filter:
            return torch.arange(n, device=labels.device)
        flat = labels.reshape(n, -1).long()
        classes = torch.arange(self.num_classes, device=labels.device)
        has = (flat[:, None, :] == classes[None, :, None]).any(dim=2)  # (B, K)
        need = self.num_classes if self.min_classes is None else self.min_classes
        return torch.nonzero(has.sum(dim=1) >= need).reshape(-1)

    def partners(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first, second_source)``: the pairs' first images and the images whose new view is their second."""
        order = keep[torch.randperm(keep.numel(), generator=self.generator).to(keep.device)]
        if self.pairs == "same_image" or order.numel() < 2:
            return order, order
        nxt = torch.roll(order, -1)
        rank = torch.arange(order.numel(), device=order.device)
        return order, torch.where(rank % 2 == 0, order, nxt)

    @property
    def term_weights(self) -> dict[str, float]:
        """Weight of each returned term in the last total (read by :class:`~medcl.handlers.TermGradNormHandler`):
        ``lambda_local`` in the self-training rounds, ``lambda_local_gt`` before them."""
        return {"loss_seg": 1.0, "loss_local": float(getattr(self, "_local_weight", self.lambda_local_gt))}

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
        y = torch.cat(labels) if len(labels) > 1 else y_l
        n_l, n = x_l.shape[0], x.shape[0]
        pair_idx = None
        if weight > 0:
            keep = self.eligible(y)
            if self.pairs == "random":
                if keep.numel() >= 2:
                    perm = self.random_pairs(keep.numel(), keep.device)
                    pair_idx = keep[perm]
            elif keep.numel() >= 1:
                first, source = self.partners(keep)
                view = intensity_view(x[source], generator=self.generator, **self.view_kwargs)
                x = torch.cat([x, view])
                y = torch.cat([y, y[source]])
                second = torch.arange(n, n + first.numel(), device=first.device)
                pair_idx = torch.stack([first, second], dim=1)
        logits, embeddings = network(x, return_embeddings=True)
        seg = self.seg_loss(logits[:n_l], y_l)
        if pair_idx is not None:
            local = self.local_loss(embeddings, y, pair_idx.to(embeddings.device))
        else:
            local = torch.zeros((), device=seg.device, dtype=seg.dtype)
        self._local_weight = weight
        # terms keep their graph for TermGradNormHandler; the trainer detaches every output after the iteration
        return {"loss": seg + weight * local, "loss_seg": seg, "loss_local": local}
