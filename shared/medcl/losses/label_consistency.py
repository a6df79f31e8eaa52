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
"""Label-consistency contrastive loss of MixCL (eq. 6) over pooled, per-dataset labelled pixels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

__all__ = ["LabelConsistencyLoss", "label_relation", "namespace_labels"]


def namespace_labels(
    labels: torch.Tensor,
    dataset_ids: torch.Tensor,
    num_foreground_classes: Sequence[int] | torch.Tensor,
    background: int = 0,
) -> torch.Tensor:
    """
    Map per-dataset labels to one pooled label space: foreground class ``k`` (``1..K_d``) of dataset ``d``
    becomes ``offset_d + k`` with ``offset_d = K_0 + ... + K_{d-1}``; background of every dataset stays
    ``background``. Class ``k`` of dataset A and class ``k`` of dataset B thus get different ids.

    Note that namespaced labels alone lose the dataset of background pixels; to apply the
    "background is not contrasted across datasets" rule pass raw labels and dataset ids to
    :class:`LabelConsistencyLoss` instead.

    Args:
        labels: integer labels, any shape; foreground classes of dataset ``d`` are ``1..K_d``.
        dataset_ids: integer dataset index of each label (``0..len(num_foreground_classes) - 1``), same shape.
        num_foreground_classes: ``K_d`` for each dataset.
        background: background label, must be 0 (foreground classes start at 1). Defaults to 0.

    Returns:
        long tensor of the shape of ``labels``.

    Raises:
        ValueError: on shape mismatch, ``background != 0``, or labels / dataset ids out of range.
    """
    if background != 0:
        raise ValueError("namespace_labels expects background 0 and foreground classes 1..K_d.")
    labels = torch.as_tensor(labels).long()
    dataset_ids = torch.as_tensor(dataset_ids, device=labels.device).long()
    if labels.shape != dataset_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and dataset_ids {tuple(dataset_ids.shape)} differ in shape.")
    k = torch.as_tensor(num_foreground_classes, device=labels.device).long().reshape(-1)
    if dataset_ids.numel() and (dataset_ids.min() < 0 or dataset_ids.max() >= k.numel()):
        raise ValueError(f"dataset ids must lie in [0, {k.numel() - 1}].")
    if labels.numel() and (labels.min() < 0 or (labels > k[dataset_ids]).any()):
        raise ValueError("labels must lie in [0, K_d] for their dataset d.")
    offsets = torch.cumsum(k, 0) - k  # exclusive cumulative sum
    return torch.where(labels == background, labels, labels + offsets[dataset_ids])


def label_relation(
    y1: torch.Tensor,
    y2: torch.Tensor,
    d1: torch.Tensor | None = None,
    d2: torch.Tensor | None = None,
    background: int | None = 0,
    contrast_background_across_datasets: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Positive and negative masks of the label relation matrix ``A`` (Fig. 2d of MixCL), shape ``(N1, N2)``.

    Rules, for pixel ``i`` of view 1 and ``j`` of view 2 (``d`` = dataset, equal everywhere when not given):

    * positive (``A = 1``): both foreground, same class and same dataset;
    * background-background: excluded (neither);
    * foreground-foreground of different class or different dataset: negative (``A = 0``);
    * background-foreground of the same dataset: negative (the dataset annotates that class, so its
      background is known not to be it);
    * background of dataset A vs foreground of dataset B != A: excluded, because A's background may contain
      B's class unannotated (the shaded area of Fig. 2d); ``contrast_background_across_datasets=True``
      makes it a negative instead.

    ``background=None`` disables the background rules: every label is an ordinary class.

    Returns:
        ``(positive, negative)`` boolean masks of shape ``(N1, N2)``.
    """
    same_set = torch.ones(y1.shape[0], y2.shape[0], dtype=torch.bool, device=y1.device)
    if d1 is not None and d2 is not None:
        same_set = d1[:, None] == d2[None, :]
    same_class = (y1[:, None] == y2[None, :]) & same_set
    if background is None:
        return same_class, ~same_class
    bg1 = (y1 == background)[:, None]
    bg2 = (y2 == background)[None, :]
    fg_pair = ~bg1 & ~bg2
    positive = same_class & fg_pair
    one_bg = bg1 ^ bg2
    if not contrast_background_across_datasets:
        one_bg = one_bg & same_set
    negative = (fg_pair & ~same_class) | one_bg
    return positive, negative


class LabelConsistencyLoss(_Loss):
    """
    Label-consistency loss of MixCL (eq. 6): a supervised contrast between sampled pixel embeddings of
    two patches (layer-2 projections ``Z_1^1`` of P1 and ``Z_2^1`` of P2), with pairs defined by the labels.

    With ``s_ij = cos(z1_i, z2_j) / tau`` over the ``N1 x N2`` pixel pairs, ``P`` the positive pairs and
    ``V = P ∪ N`` the valid pairs (positives and negatives, see :func:`label_relation` for the background
    and dataset-namespace rules), the paper's eq. 6 is one log over the whole relation matrix:

    .. math::
        \\mathcal{L}_{label} = -\\log \\frac{\\sum_{(i,j) \\in P} \\exp(s_{ij})}{\\sum_{(i,k) \\in V} \\exp(s_{ik})}
        \\qquad (6,\\ \\text{mode="global"}, default)

    Eq. 6 has no outer sum or average over anchors and sums over pairs ``(i, j)`` in ``[A = 1]`` in the
    numerator and over ``[A = 0] ∪ [A = 1]`` in the denominator, so the default implements it literally.
    (Eq. 6 also writes ``cos(Z^1_{1,i}, Z^1_{1,j})``, both from ``Z_1``; the text says the pairs are between
    ``Z^1_1`` and ``Z^1_2``, which is implemented.) ``mode="anchor"`` gives the common per-anchor variant,
    one log per pixel ``i`` of view 1 that has at least one positive, averaged over those anchors:

    .. math::
        \\mathcal{L} = \\frac{1}{|I|}\\sum_{i \\in I} -\\log
            \\frac{\\sum_{j \\in P_i} \\exp(s_{ij})}{\\sum_{k \\in V_i} \\exp(s_{ik})}

    Anchors without a positive are skipped in that mode; in the global mode pixels without a positive still
    contribute their negatives to the denominator, as eq. 6 reads. If there is no positive pair at all the
    loss is 0 (with a graph, so ``backward`` works). Everything is one ``(N1, N2)`` similarity matrix, so
    memory is bounded by the sample budget, not by the image size.

    Shapes: ``z1 (N1, C)``, ``y1 (N1,)``, ``z2 (N2, C)``, ``y2 (N2,)``, optional dataset ids ``d1 (N1,)``,
    ``d2 (N2,)``. Labels are the raw per-dataset labels; with dataset ids class ``k`` of dataset A and class
    ``k`` of dataset B are different classes (a negative pair), and background is shared by all datasets
    (background-background pairs are always excluded; background of A vs foreground of B is excluded by
    default, see :func:`label_relation`).

    Reference:
        Li, Quan, Zhou, "MixCL: Pixel label matters to contrastive learning in medical image segmentation",
        Sec. 2.3, eq. 6 and Fig. 2d.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        background: int | None = 0,
        mode: str = "global",
        contrast_background_across_datasets: bool = False,
        eps: float = 1e-8,
    ) -> None:
        """
        Args:
            temperature: ``tau``. Defaults to 0.1.
            background: background label shared by all datasets; None treats every label as a class.
                Defaults to 0.
            mode: ``"global"`` (eq. 6 as printed, one log over all pairs) or ``"anchor"`` (one log per
                view-1 pixel with a positive, averaged). Defaults to ``"global"``.
            contrast_background_across_datasets: make background of dataset A vs foreground of dataset B a
                negative pair (default False: excluded).
            eps: small value for the norms in the cosine similarity.

        Raises:
            ValueError: when ``temperature <= 0`` or ``mode`` is unknown.
        """
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if mode not in ("global", "anchor"):
            raise ValueError(f"mode must be 'global' or 'anchor', got {mode!r}.")
        self.temperature = float(temperature)
        self.background = background
        self.mode = mode
        self.contrast_background_across_datasets = contrast_background_across_datasets
        self.eps = eps

    def forward(
        self,
        z1: torch.Tensor,
        y1: torch.Tensor,
        z2: torch.Tensor,
        y2: torch.Tensor,
        d1: torch.Tensor | None = None,
        d2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            z1: embeddings of the sampled pixels of patch 1, ``(N1, C)``.
            y1: their integer labels, ``(N1,)``.
            z2: embeddings of the sampled pixels of patch 2, ``(N2, C)``.
            y2: their integer labels, ``(N2,)``.
            d1: optional dataset id of each ``z1`` pixel, ``(N1,)``.
            d2: optional dataset id of each ``z2`` pixel, ``(N2,)``; give both or neither.

        Returns:
            scalar loss (float32 for half precision inputs; autocast is disabled for the similarities).

        Raises:
            ValueError: on inconsistent shapes, or when only one of ``d1``, ``d2`` is given.
        """
        if z1.ndim != 2 or z2.ndim != 2 or z1.shape[1] != z2.shape[1]:
            raise ValueError(f"z1, z2 must be (N1, C), (N2, C); got {tuple(z1.shape)}, {tuple(z2.shape)}.")
        y1 = torch.as_tensor(y1, device=z1.device).reshape(-1).long()
        y2 = torch.as_tensor(y2, device=z2.device).reshape(-1).long()
        if y1.shape[0] != z1.shape[0] or y2.shape[0] != z2.shape[0]:
            raise ValueError("each label vector must have one entry per embedding row.")
        if (d1 is None) != (d2 is None):
            raise ValueError("give dataset ids for both views or for neither.")
        if d1 is not None and d2 is not None:
            d1 = torch.as_tensor(d1, device=z1.device).reshape(-1).long()
            d2 = torch.as_tensor(d2, device=z2.device).reshape(-1).long()
            if d1.shape != y1.shape or d2.shape != y2.shape:
                raise ValueError("dataset ids must have one entry per embedding row.")

        positive, negative = label_relation(y1, y2, d1, d2, self.background, self.contrast_background_across_datasets)
        valid = positive | negative

        # the (N1, N2) similarities and their logsumexp run in float32 (half precision inputs promoted, autocast
        # off): exp(s / tau) of fp16/bf16 similarities loses the small differences the contrast is made of
        dtype = torch.float32 if z1.dtype in (torch.float16, torch.bfloat16) else z1.dtype
        with torch.autocast(device_type=z1.device.type, enabled=False):
            a = F.normalize(z1.to(dtype), dim=1, eps=self.eps)
            b = F.normalize(z2.to(dtype), dim=1, eps=self.eps)
            sim = a @ b.t() / self.temperature
        neg_inf = torch.finfo(sim.dtype).min
        zero = sim.sum() * 0.0  # keeps the graph when nothing is valid

        if self.mode == "global":
            if not positive.any():
                return zero
            log_num = sim.masked_fill(~positive, neg_inf).flatten().logsumexp(0)
            log_den = sim.masked_fill(~valid, neg_inf).flatten().logsumexp(0)
            return log_den - log_num

        anchors = positive.any(dim=1)  # rows with a positive also have a valid pair
        if not anchors.any():
            return zero
        sim, positive, valid = sim[anchors], positive[anchors], valid[anchors]
        log_num = sim.masked_fill(~positive, neg_inf).logsumexp(1)
        log_den = sim.masked_fill(~valid, neg_inf).logsumexp(1)
        return (log_den - log_num).mean()
