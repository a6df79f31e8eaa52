# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Supervised contrastive (SupCon) losses with cosine similarity, used by MACL's image-level term L_g.

The module exposes two loss classes and the shared, batched math they (and
:class:`medcl.losses.dense_supcon.DenseSupConLoss`) are built on:

- :func:`supcon_anchor_losses`: per-anchor SupCon terms for a batch of independent problems (all vectors are
  anchors and candidates: the public SupCon / PCL / MACL code, ``contrast_mode='all'``).
- :func:`supcon_loss`: the scalar reduction (mean over anchors with a positive, then over problems).
- :func:`cross_supcon_anchor_losses` / :func:`cross_supcon_loss`: the cross-branch form of MACL's eq. 9-10 as
  printed (anchors from one branch, candidates from the other, sum over anchors).
- :func:`positional_positive_mask`: the PCL rule ``|p_i - p_j| < threshold``.
"""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

from medcl.errors import MedclInputError

__all__ = [
    "SUPCON_FORMS",
    "SupConLoss",
    "PositionalSupConLoss",
    "check_form",
    "cross_supcon_anchor_losses",
    "cross_supcon_loss",
    "supcon_anchor_losses",
    "supcon_loss",
    "positional_positive_mask",
]

#: How MACL's SupCon terms (L_g, L_d) are formed: ``"code"`` (the public code: all 2N vectors of both branches are
#: anchors and candidates, mean over anchors) or ``"paper"`` (eq. 9-10 as printed: dominant anchors against
#: auxiliary candidates, sum over anchors).
SUPCON_FORMS = ("code", "paper")


def check_form(form: str) -> str:
    """``form`` if it is one of :data:`SUPCON_FORMS`, else :class:`~medcl.errors.MedclInputError` naming them."""
    if form not in SUPCON_FORMS:
        raise MedclInputError(f"SupCon form must be one of {list(SUPCON_FORMS)}, got {form!r}.")
    return form


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision inputs are promoted to float32 for the (small) similarity computation."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def supcon_anchor_losses(
    features: torch.Tensor, positive_mask: torch.Tensor, temperature: float, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Per-anchor supervised contrastive terms for a batch of independent problems.

    For every problem (leading dimensions ``*``) with ``M`` feature vectors and every anchor ``i``::

        l_i = -(1 / W_i) * sum_{p != i} w_ip * log( exp(s_ip / t) / sum_{a != i} exp(s_ia / t) ),
        W_i = sum_{p != i} w_ip

    where ``s`` is the cosine similarity and ``w`` the (boolean or non-negative float) positive mask.
    The diagonal of the mask is ignored (an anchor is never its own positive and never in its own
    denominator). The log-denominator is computed with ``logsumexp``; half precision inputs are
    promoted to float32 and autocast is disabled inside, so the result is float32 (or float64 for
    float64 inputs).

    Args:
        features: ``(*, M, D)`` feature vectors, ``M >= 2``.
        positive_mask: broadcastable to ``(*, M, M)``; ``positive_mask[..., i, j]`` is True (or a
            positive weight) when ``j`` is a positive of anchor ``i``.
        temperature: softmax temperature ``t > 0``.
        eps: small value avoiding division by zero when normalising a zero vector.

    Returns:
        ``(losses, weights)``, both of shape ``(*, M)``: ``losses[..., i] = l_i`` (exactly 0 for an
        anchor without positives) and ``weights[..., i] = W_i`` (0 marks an anchor without positives).

    Raises:
        ValueError: when ``features`` has fewer than 2 dimensions or ``M < 2``.
    """
    if features.ndim < 2:
        raise ValueError(f"features must have shape (*, M, D), got {tuple(features.shape)}.")
    m = features.shape[-2]
    if m < 2:
        raise ValueError(f"SupCon needs at least 2 feature vectors per problem, got M={m}.")
    dtype = _compute_dtype(features.dtype)
    with torch.autocast(device_type=features.device.type, enabled=False):
        # contiguous rows: the batched matmul below then runs without per-problem copies
        x = features.to(dtype).contiguous()
        # (*, M, M) cosine similarities / t from one (batched) Gram matmul, normalised afterwards:
        # s_ij = <x_i, x_j> / (max(|x_i|, eps) * max(|x_j|, eps)), i.e. F.normalize's convention,
        # without materialising (and back-propagating through) a normalised copy of the features
        gram = torch.matmul(x, x.transpose(-1, -2))
        inv_norm = gram.diagonal(dim1=-2, dim2=-1).clamp_min(eps * eps).rsqrt()
        logits = gram * (inv_norm.unsqueeze(-1) * inv_norm.unsqueeze(-2) / temperature)
        self_mask = torch.eye(m, dtype=torch.bool, device=features.device)
        # log sum_{a != i} exp(s_ia / t), stable for any precision
        log_denom = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=-1, keepdim=True)
        log_prob = logits - log_denom
        weights = positive_mask.to(device=features.device, dtype=dtype).masked_fill(self_mask, 0.0)
        weight_sum = weights.sum(-1)
        has_pos = weight_sum > 0
        # anchors without positives contribute exactly 0 (and are counted out by the caller)
        losses = -(weights * log_prob).sum(-1) / torch.where(has_pos, weight_sum, torch.ones_like(weight_sum))
        losses = torch.where(has_pos, losses, torch.zeros_like(losses))
    return losses, weight_sum.expand_as(losses)


def supcon_loss(
    features: torch.Tensor,
    positive_mask: torch.Tensor,
    temperature: float,
    base_temperature: float | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """
    Scalar SupCon loss of a batch of independent problems (see :func:`supcon_anchor_losses`).

    Each problem's loss is the mean of ``l_i`` over its anchors with at least one positive; the result
    is the mean over problems that have at least one such anchor (0, still attached to the graph, when
    there is none). With ``base_temperature`` the result is multiplied by ``temperature / base_temperature``.

    Args:
        features: ``(*, M, D)``; ``(M, D)`` is a single problem.
        positive_mask: broadcastable to ``(*, M, M)``, boolean or non-negative float weights.
        temperature: softmax temperature.
        base_temperature: optional rescaling, ``None`` for none.
        eps: see :func:`supcon_anchor_losses`.

    Returns:
        0-dim tensor.
    """
    losses, weights = supcon_anchor_losses(features, positive_mask, temperature, eps)
    n_anchors = (weights > 0).sum(-1)  # (*,)
    per_problem = losses.sum(-1) / n_anchors.clamp_min(1)
    n_problems = (n_anchors > 0).sum()
    loss = per_problem.sum() / n_problems.clamp_min(1)
    if base_temperature is not None:
        loss = loss * (temperature / base_temperature)
    return loss


def _cosine_logits(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float, eps: float) -> torch.Tensor:
    """``(*, M, K)`` cosine similarities / temperature (F.normalize's ``eps`` convention)."""
    a = anchors * (anchors * anchors).sum(-1, keepdim=True).clamp_min(eps * eps).rsqrt()
    c = candidates * (candidates * candidates).sum(-1, keepdim=True).clamp_min(eps * eps).rsqrt()
    return torch.matmul(a, c.transpose(-1, -2)) / temperature


def cross_supcon_anchor_losses(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive_mask: torch.Tensor,
    temperature: float,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Per-anchor terms of MACL's eq. 9 / 10 as printed: anchors ``z_i`` of one branch (dominant) are contrasted with
    the candidates ``c_k`` of the other branch (auxiliary) only::

        l_i = -(1 / W_i) * sum_j w_ij * log( exp(s(z_i, c_j) / t) / sum_{k != i} exp(s(z_i, c_k) / t) ),
        W_i = sum_j w_ij

    with ``s`` the cosine similarity. Unlike :func:`supcon_anchor_losses` the diagonal of the mask is kept (the
    candidate of the anchor's own sample, ``j = i``, is a positive when ``w_ii > 0``) while the denominator leaves
    ``k = i`` out (the indicator :math:`\\mathbb{1}_{i \\neq k}` of the equations). Half precision inputs are
    promoted to float32 with autocast off.

    Args:
        anchors: ``(*, M, D)``.
        candidates: ``(*, M, D)``, same shape; ``M >= 2`` (the denominator needs a ``k != i``).
        positive_mask: broadcastable to ``(*, M, M)``, boolean or non-negative weights ``w``.
        temperature: ``t > 0``.
        eps: see :func:`supcon_anchor_losses`.

    Returns:
        ``(losses, weights)`` of shape ``(*, M)`` (a loss of exactly 0 and a weight of 0 for an anchor without
        positives).

    Raises:
        ValueError: for mismatched shapes or ``M < 2``.
    """
    if anchors.shape != candidates.shape or anchors.ndim < 2:
        raise ValueError(
            f"anchors and candidates must both be (*, M, D), got {tuple(anchors.shape)} and {tuple(candidates.shape)}."
        )
    m = anchors.shape[-2]
    if m < 2:
        raise ValueError(f"the cross-branch SupCon needs at least 2 samples (a k != i), got M={m}.")
    dtype = _compute_dtype(anchors.dtype)
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        logits = _cosine_logits(anchors.to(dtype), candidates.to(dtype), temperature, eps)
        self_mask = torch.eye(m, dtype=torch.bool, device=anchors.device)
        log_denom = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=-1, keepdim=True)
        log_prob = logits - log_denom
        weights = positive_mask.to(device=anchors.device, dtype=dtype).expand(logits.shape)
        weight_sum = weights.sum(-1)
        has_pos = weight_sum > 0
        losses = -(weights * log_prob).sum(-1) / torch.where(has_pos, weight_sum, torch.ones_like(weight_sum))
        losses = torch.where(has_pos, losses, torch.zeros_like(losses))
    return losses, weight_sum


def cross_supcon_loss(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive_mask: torch.Tensor,
    temperature: float,
    base_temperature: float | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """
    Scalar cross-branch SupCon (see :func:`cross_supcon_anchor_losses`): the **sum** over anchors (eq. 9:
    :math:`\\sum_{i=1}^{2N}`), then the mean over the leading problems (eq. 10: the mean over locations ``s``), times
    ``temperature / base_temperature`` when ``base_temperature`` is given.

    Args:
        anchors, candidates: ``(*, M, D)``.
        positive_mask: broadcastable to ``(*, M, M)``.
        temperature: ``t > 0``.
        base_temperature: optional rescaling, ``None`` for none.
        eps: see :func:`supcon_anchor_losses`.

    Returns:
        0-dim tensor.
    """
    losses, _ = cross_supcon_anchor_losses(anchors, candidates, positive_mask, temperature, eps)
    loss = losses.sum(-1).mean() if losses.ndim > 1 else losses.sum()
    if base_temperature is not None:
        loss = loss * (temperature / base_temperature)
    return loss


def positional_positive_mask(positions: torch.Tensor, threshold: float) -> torch.Tensor:
    """
    The PCL positive rule: ``mask[i, j] = |p_i - p_j| < threshold``.

    Args:
        positions: ``(N,)`` (any shape with N elements) normalised positions, e.g. ``(slice index + 1) / depth``.
        threshold: positions closer than this are positives.

    Returns:
        ``(N, N)`` boolean mask (its diagonal is True; the loss ignores it).
    """
    p = positions.reshape(-1)
    if not p.is_floating_point() or p.dtype in (torch.float16, torch.bfloat16):
        p = p.float()
    return (p[:, None] - p[None, :]).abs() < threshold


def _check_temperatures(temperature: float, base_temperature: float | None) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if base_temperature is not None and base_temperature <= 0:
        raise ValueError(f"base_temperature must be positive or None, got {base_temperature}.")


class SupConLoss(_Loss):
    """
    Supervised contrastive loss (Khosla et al.) with cosine similarity, for ``N`` feature vectors and
    either class labels or an explicit positive mask:

    .. math::

        L = -\\frac{1}{|A|} \\sum_{i \\in A} \\frac{1}{|P(i)|} \\sum_{p \\in P(i)}
            \\log \\frac{\\exp(s_{ip} / \\tau)}{\\sum_{a \\neq i} \\exp(s_{ia} / \\tau)}

    with :math:`s_{ij}` the cosine similarity of features ``i`` and ``j``, :math:`P(i)` the positives of
    anchor ``i`` (self excluded) and :math:`A` the anchors having at least one positive (anchors without
    positive are skipped; if there is none the loss is 0, with a gradient of 0). A float mask weighs the
    positives: :math:`\\frac{1}{|P(i)|}\\sum_{p \\in P(i)}` becomes :math:`\\sum_p w_{ip} / \\sum_p w_{ip}`.
    The denominator uses ``logsumexp``; half precision inputs are computed in float32.

    Optionally (``base_temperature``) the loss is multiplied by :math:`\\tau / \\tau_{base}`, as the reference
    SupCon code and the MACL public code do (with :math:`\\tau_{base} = 0.07`).

    Reference:
        Khosla, P. et al. "Supervised Contrastive Learning." NeurIPS 2020. https://arxiv.org/abs/2004.11362
    """

    def __init__(self, temperature: float = 0.1, base_temperature: float | None = None) -> None:
        """
        Args:
            temperature: softmax temperature :math:`\\tau`. Defaults to 0.1 (MACL).
            base_temperature: if set, the loss is multiplied by ``temperature / base_temperature``
                (the public SupCon/MACL code uses 0.07, i.e. a factor 1/0.7 at :math:`\\tau = 0.1`).
                Defaults to None (no scaling): the factor only rescales the gradient, i.e. the learning rate.

        Raises:
            ValueError: when ``temperature`` or ``base_temperature`` is not positive.
        """
        super().__init__()
        _check_temperatures(temperature, base_temperature)
        self.temperature = float(temperature)
        self.base_temperature = None if base_temperature is None else float(base_temperature)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            features: ``(N, D)`` feature vectors (not necessarily normalised), ``N >= 2``.
            labels: ``(N,)`` labels; ``i`` and ``j`` are positives when ``labels[i] == labels[j]``.
            mask: ``(N, N)`` boolean or non-negative float positive mask (may be asymmetric; the
                diagonal is ignored). Give exactly one of ``labels`` and ``mask``.

        Returns:
            0-dim loss tensor (float32 for half precision inputs).

        Raises:
            ValueError: when ``features`` is not 2D or has fewer than 2 rows, when not exactly one of
                ``labels``/``mask`` is given, when their shape does not match ``N``, or when ``mask`` is negative.
        """
        if features.ndim != 2:
            raise ValueError(f"features must have shape (N, D), got {tuple(features.shape)}.")
        n = features.shape[0]
        if (labels is None) == (mask is None):
            raise ValueError("Give exactly one of `labels` and `mask`.")
        if labels is not None:
            if labels.numel() != n:
                raise ValueError(f"labels must have {n} elements (one per feature), got shape {tuple(labels.shape)}.")
            flat = labels.reshape(-1)
            pos = flat[:, None] == flat[None, :]
        else:
            assert mask is not None
            if tuple(mask.shape) != (n, n):
                raise ValueError(f"mask must have shape ({n}, {n}), got {tuple(mask.shape)}.")
            if mask.dtype != torch.bool and bool((mask < 0).any()):
                raise ValueError("mask must be boolean or non-negative.")
            pos = mask
        return supcon_loss(features, pos, self.temperature, self.base_temperature)


class PositionalSupConLoss(_Loss):
    """
    Positional SupCon loss over ``N`` samples seen in ``V`` views (MACL's image-level loss :math:`L_g`,
    following PCL): the ``N * V`` views are contrasted with each other and the positives of a view are
    all views (of any sample, including the other views of its own sample) whose normalised slice
    position differs by less than ``threshold``:

    .. math::

        P(i) = \\{p \\neq i : |\\pi_i - \\pi_p| < \\delta\\}, \\qquad
        L = -\\frac{1}{|A|} \\sum_{i \\in A} \\frac{1}{|P(i)|} \\sum_{p \\in P(i)}
            \\log \\frac{\\exp(s_{ip} / \\tau)}{\\sum_{a \\neq i} \\exp(s_{ia} / \\tau)}

    where :math:`\\pi` is the position, e.g. ``(slice index + 1) / depth`` in (0, 1], :math:`s` the cosine
    similarity, :math:`\\delta` the threshold and :math:`A` the anchors with at least one positive (with
    ``V >= 2`` every view has one: the other views of its sample). This (``form="code"``, the default) equals the
    public MACL / PCL ``SupConLoss(contrastive_method='pcl')`` computation, without its
    ``temperature / base_temperature`` factor unless ``base_temperature`` is given.

    ``form="paper"`` is MACL's eq. 9 as printed, for ``V = 2`` views: view 0 holds the dominant projections
    :math:`Z^g_i` (the anchors), view 1 the auxiliary ones :math:`\\tilde Z^g_j` (the only candidates):

    .. math::

        L_g = \\sum_{i} -\\frac{1}{|\\Omega^+_i|} \\sum_{j \\in \\Omega^+_i}
            \\log \\frac{\\exp(s(Z^g_i, \\tilde Z^g_j) / \\tau)}
            {\\sum_{k} \\mathbb{1}_{i \\neq k} \\exp(s(Z^g_i, \\tilde Z^g_k) / \\tau)},
        \\qquad \\Omega^+_i = \\{j : |\\pi_i - \\pi_j| < \\delta\\}

    i.e. no same-branch pairs, the sample's own auxiliary projection (``j = i``) a positive but left out of the
    denominator, and a **sum** (not a mean) over the anchors, so the loss grows with the batch. Needs ``N >= 2``.

    Shapes: ``features`` ``(N, V, D)``, ``positions`` ``(N,)``; output: scalar.

    References:
        Zeng, S. et al. "Multi-level Asymmetric Contrastive Learning for Volumetric Medical Image
        Segmentation Pre-training." IEEE JBHI (MACL). https://github.com/stevezs315/MACL

        Zeng, D. et al. "Positional Contrastive Learning for Volumetric Medical Image Segmentation."
        MICCAI 2021 (PCL). https://arxiv.org/abs/2106.09157
    """

    def __init__(
        self,
        temperature: float = 0.1,
        threshold: float = 0.1,
        base_temperature: float | None = None,
        form: str = "code",
    ) -> None:
        """
        Args:
            temperature: softmax temperature :math:`\\tau`. Defaults to 0.1 (MACL code and paper).
            threshold: positions closer than this (strictly) are positives. Defaults to 0.1 (MACL's
                CHD/KiTS pre-training scripts; 0.05 for BraTS).
            base_temperature: if set, the loss is multiplied by ``temperature / base_temperature``
                (0.07 in the public code). Defaults to None (no scaling).
            form: ``"code"`` (default: all views are anchors and candidates, mean over anchors) or ``"paper"``
                (eq. 9 as printed, see above).

        Raises:
            ValueError: when ``temperature``/``base_temperature`` is not positive or ``threshold`` is negative.
            MedclInputError: for a ``form`` other than ``"code"``/``"paper"``.
        """
        super().__init__()
        _check_temperatures(temperature, base_temperature)
        if threshold < 0:
            raise ValueError(f"threshold must be non-negative, got {threshold}.")
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        self.base_temperature = None if base_temperature is None else float(base_temperature)
        self.form = check_form(form)

    def positive_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """``(N, N)`` boolean sample-level positive mask ``|p_i - p_j| < threshold``."""
        return positional_positive_mask(positions, self.threshold)

    def forward(self, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features: ``(N, V, D)`` projected features of ``V`` views of ``N`` samples, ``N * V >= 2``.
            positions: ``(N,)`` normalised positions (any shape with ``N`` elements).

        Returns:
            0-dim loss tensor.

        Raises:
            ValueError: when ``features`` is not 3D or ``positions`` does not have ``N`` elements; for
                ``form="paper"``, when ``V != 2`` or ``N < 2``.
        """
        if features.ndim != 3:
            raise ValueError(f"features must have shape (N, V, D), got {tuple(features.shape)}.")
        n, v, d = features.shape
        if positions.numel() != n:
            raise ValueError(f"positions must have {n} elements (one per sample), got shape {tuple(positions.shape)}.")
        if self.form == "paper":
            if v != 2:
                raise ValueError(f"form='paper' needs V = 2 views (dominant, auxiliary), got V={v}.")
            mask = self.positive_mask(positions)
            return cross_supcon_loss(features[:, 0], features[:, 1], mask, self.temperature, self.base_temperature)
        # view-major order: row v * N + n is view v of sample n
        flat = features.transpose(0, 1).reshape(v * n, d)
        mask = self.positive_mask(positions).repeat(v, v)
        return supcon_loss(flat, mask, self.temperature, self.base_temperature)
