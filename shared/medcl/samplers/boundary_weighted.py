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
Pixel sampling for pixel-level contrastive losses.

* :func:`boundary_distance_weights`: the weight map of MixCL eq. 7 / Fig. 2b.
* :func:`sample_class_pixels`: ``r`` pixels per class, weighted or uniform (class-balanced sampling).
* :class:`BoundaryWeightedPixelSampler`: both, for a batch of label maps.
* :func:`labels_to_resolution`, :func:`gather_pixel_features`: bring labels to a feature map's grid and
  pick the sampled pixels' embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms.utils import distance_transform_edt
from monai.utils import convert_to_tensor

__all__ = [
    "BoundaryWeightedPixelSampler",
    "DISTANCES",
    "boundary_distance_weights",
    "class_boundary",
    "gather_pixel_features",
    "labels_to_resolution",
    "sample_class_pixels",
]


def _as_label_tensor(label: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Plain (non-Meta) long tensor; float label maps (as loaded by MONAI) are rounded."""
    t = convert_to_tensor(label, track_meta=False)
    if t.is_floating_point():
        t = t.round()
    return t.long()


DISTANCES = ("boundary", "outside")


def class_boundary(mask: torch.Tensor) -> torch.Tensor:
    """
    The boundary ``∂S`` of a class mask: voxels of the mask with at least one face neighbour outside it.

    Neighbours beyond the array's edge do not count (the patch edge is not a class boundary).

    Args:
        mask: boolean ``(*spatial)`` mask, 1 to 3 dimensions.

    Returns:
        boolean tensor of the shape of ``mask``.
    """
    outside = ~mask
    touches = torch.zeros_like(mask)
    for axis in range(mask.ndim):
        n = mask.shape[axis]
        if n < 2:
            continue
        lo, hi = outside.narrow(axis, 0, n - 1), outside.narrow(axis, 1, n - 1)
        touches.narrow(axis, 1, n - 1).logical_or_(lo)  # neighbour at index - 1 is outside
        touches.narrow(axis, 0, n - 1).logical_or_(hi)  # neighbour at index + 1 is outside
    return mask & touches


def boundary_distance_weights(
    label: torch.Tensor | np.ndarray,
    mu: float = 8.0,
    eps: float = 0.05,
    classes: Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    distance: str = "boundary",
) -> torch.Tensor:
    """
    Boundary-distance weight map of MixCL (eq. 7, Fig. 2b), computed class by class:

    .. math::
        D(i) = \\inf\\{d(i, j) : j \\in \\partial S\\},\\ i \\in S,
        \\qquad W(i) = \\tfrac{1}{2}\\sqrt{D(i)}\\,\\exp(-D(i)/\\mu) + \\epsilon        \\qquad (7)

    ``S`` is the set of voxels of the pixel's own class and ``∂S`` its boundary: the voxels of ``S`` with at
    least one face neighbour (4 in 2D, 6 in 3D) outside ``S``. ``D`` is the Euclidean distance to the nearest
    boundary voxel (MONAI's ``distance_transform_edt`` of the non-boundary mask: scipy on CPU, cuCIM on GPU when
    available), in voxels or, with ``spacing``, in physical units (then ``mu`` is in the same units). Boundary
    voxels have ``D = 0`` and weight ``eps``; ``W`` peaks at ``D = mu / 2`` and decays inside; ``W >= eps > 0``
    on every voxel of the class, so boundary voxels can still be drawn. The patch edge is not a boundary (the
    class continues outside the crop); a class that fills the whole patch has no boundary, ``D = inf`` and
    ``W = eps`` (uniform).

    ``distance="outside"`` is the variant used by medcl before 0.2: ``D`` is the distance to the nearest voxel
    outside the class (the class mask's distance transform), so the outermost voxels have ``D = 1`` instead of
    0 and every distance is about one voxel larger.

    Args:
        label: integer label map ``(L, *spatial)``: the leading axis is a channel (1) or a batch axis (B);
            each ``label[k]`` is treated as an independent 2D or 3D map. Tensor or numpy array.
        mu: decay ``mu`` (default 8).
        eps: offset ``epsilon`` (default 0.05).
        classes: the classes to weight; others get weight 0. None: every label value present.
        spacing: voxel spacing per spatial axis (or one number) for anisotropic distances; None: 1.
        distance: ``"boundary"`` (eq. 7, default) or ``"outside"`` (see above).

    Returns:
        float32 tensor of the shape of ``label`` (on ``label``'s device).

    Raises:
        ValueError: when ``label`` has fewer than 3 or more than 4 dimensions, ``mu <= 0``, ``eps < 0``, or
            ``distance`` is unknown.
    """
    lab = _as_label_tensor(label)
    if lab.ndim not in (3, 4):
        raise ValueError(f"label must be (1|B, H, W[, D]), got shape {tuple(lab.shape)}.")
    if mu <= 0 or eps < 0:
        raise ValueError(f"need mu > 0 and eps >= 0, got mu={mu}, eps={eps}.")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}.")
    sampling = None if spacing is None else (float(spacing) if np.isscalar(spacing) else [float(s) for s in spacing])

    out = torch.zeros(lab.shape, dtype=torch.float32, device=lab.device)
    for k in range(lab.shape[0]):
        item = lab[k]
        present = torch.unique(item).tolist()
        wanted = present if classes is None else [c for c in classes if c in present]
        for c in wanted:
            mask = item == c
            if bool(mask.all()):
                dist = torch.full(mask.shape, float("inf"), dtype=torch.float64, device=lab.device)
            else:
                # MONAI wants channel-first (C, H, W[, D]); the transform gives distances to the nearest 0, i.e. to
                # the nearest boundary voxel (eq. 7) or to the nearest voxel outside the class ("outside")
                source = ~class_boundary(mask) if distance == "boundary" else mask
                dist = torch.as_tensor(distance_transform_edt(source[None].to(torch.uint8), sampling=sampling))[0]
                dist = dist.to(device=lab.device, dtype=torch.float64)
            d = dist[mask]
            w = torch.where(torch.isinf(d), torch.zeros_like(d), 0.5 * d.sqrt() * torch.exp(-d / mu)) + eps
            out[k][mask] = w.to(torch.float32)
    return out


def sample_class_pixels(
    label: torch.Tensor | np.ndarray,
    num_per_class: int,
    weights: torch.Tensor | np.ndarray | None = None,
    classes: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    replacement_if_short: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Draw ``num_per_class`` pixels of each class, with probability proportional to ``weights`` within the class
    (uniform if ``weights`` is None, i.e. plain class-balanced sampling).

    A class with at least ``num_per_class`` drawable pixels (pixels of the class with positive weight) is
    sampled without replacement (``torch.multinomial``, successive weighted draws: for
    ``num_per_class << class size`` the inclusion probabilities are ~ proportional to the weights; with
    replacement they are exactly so). A smaller class is sampled with replacement to ``num_per_class``
    pixels if ``replacement_if_short`` (default), else each of its drawable pixels is returned once (fewer
    than ``num_per_class``). If all weights of a class are 0 the class is sampled uniformly. Classes absent
    from ``label`` yield nothing.

    Args:
        label: integer label map, any spatial shape or already flat ``(N,)``.
        num_per_class: ``r``, pixels per class (``>= 0``).
        weights: non-negative sampling weights, same number of elements as ``label`` (e.g. from
            :func:`boundary_distance_weights`); None: uniform.
        classes: classes to sample, in this order; None: every value present, ascending.
        generator: torch random generator, for reproducible draws (must be on ``label``'s device).
        replacement_if_short: behaviour for classes smaller than ``num_per_class``, see above.

    Returns:
        ``(flat_index, class)``: long tensors of equal length; ``flat_index`` indexes ``label.reshape(-1)``.

    Raises:
        ValueError: when ``num_per_class < 0``, ``weights`` has a different size, or negative weights.
    """
    flat = _as_label_tensor(label).reshape(-1)
    if num_per_class < 0:
        raise ValueError(f"num_per_class must be >= 0, got {num_per_class}.")
    w_flat = None
    if weights is not None:
        w_flat = convert_to_tensor(weights, track_meta=False).reshape(-1).to(device=flat.device, dtype=torch.float64)
        if w_flat.numel() != flat.numel():
            raise ValueError(f"weights have {w_flat.numel()} elements, label has {flat.numel()}.")
        if (w_flat < 0).any():
            raise ValueError("weights must be non-negative.")
    class_list = torch.unique(flat).tolist() if classes is None else list(classes)

    idx_out, cls_out = [], []
    for c in class_list:
        members = torch.nonzero(flat == c, as_tuple=False).reshape(-1)
        if members.numel() == 0 or num_per_class == 0:
            continue
        w = torch.ones(members.numel(), dtype=torch.float64, device=flat.device) if w_flat is None else w_flat[members]
        if not bool((w > 0).any()):
            w = torch.ones_like(w)
        available = int((w > 0).sum())
        if available >= num_per_class:
            pick = torch.multinomial(w, num_per_class, replacement=False, generator=generator)
        elif replacement_if_short:
            pick = torch.multinomial(w, num_per_class, replacement=True, generator=generator)
        else:
            pick = torch.multinomial(w, available, replacement=False, generator=generator)
        idx_out.append(members[pick])
        cls_out.append(torch.full((pick.numel(),), int(c), dtype=torch.long, device=flat.device))
    if not idx_out:
        empty = torch.zeros(0, dtype=torch.long, device=flat.device)
        return empty, empty.clone()
    return torch.cat(idx_out), torch.cat(cls_out)


def labels_to_resolution(label: torch.Tensor, size: Sequence[int], mode: str = "nearest") -> torch.Tensor:
    """
    Resample a label map to a feature map's grid by nearest neighbour (no new label values appear).

    ``mode="nearest"`` is torch's (and MONAI ``Resize(mode="nearest")``'s) rule: output voxel ``i`` takes
    input voxel ``floor(i * in / out)``, i.e. the first voxel of each block when downsampling by an integer
    factor. ``"nearest-exact"`` takes ``floor((i + 0.5) * in / out)``, the block's centre, which matches a
    strided patch embedding's receptive-field centre better. Use the same mode everywhere in a pipeline.

    Args:
        label: ``(B, 1, *spatial)`` integer (or float) labels, 2D or 3D spatial.
        size: target spatial size.
        mode: ``"nearest"`` (default) or ``"nearest-exact"``.

    Returns:
        ``(B, 1, *size)`` tensor of ``label``'s dtype.

    Raises:
        ValueError: on a wrong shape, size length or mode.
    """
    if mode not in ("nearest", "nearest-exact"):
        raise ValueError(f"mode must be 'nearest' or 'nearest-exact', got {mode!r}.")
    lab = convert_to_tensor(label, track_meta=False)
    if lab.ndim not in (4, 5) or lab.shape[1] != 1:
        raise ValueError(f"label must be (B, 1, H, W[, D]), got {tuple(lab.shape)}.")
    size = tuple(int(s) for s in size)
    if len(size) != lab.ndim - 2:
        raise ValueError(f"size {size} does not match {lab.ndim - 2} spatial dimensions.")
    if tuple(lab.shape[2:]) == size:
        return lab.clone()
    # float64 represents every int32 label exactly
    out = F.interpolate(lab.to(torch.float64), size=size, mode=mode)
    return out.round().to(lab.dtype)


def gather_pixel_features(features: torch.Tensor, batch_index: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """
    Embeddings of sampled pixels.

    Args:
        features: ``(B, C, *spatial)``.
        batch_index: ``(N,)`` batch item of each sample.
        flat_index: ``(N,)`` index into the flattened spatial grid of each sample.

    Returns:
        ``(N, C)`` tensor (differentiable w.r.t. ``features``).
    """
    b, c = features.shape[:2]
    flat = features.reshape(b, c, -1)
    return flat[batch_index, :, flat_index]


class BoundaryWeightedPixelSampler:
    """
    Per-class pixel sampler of MixCL (Sec. 2.3.3): for every item of a batch of label maps, draw
    ``num_per_class`` pixels of each class present with probability proportional to the boundary-distance
    weight ``W = 1/2 sqrt(D) exp(-D / mu) + eps`` of :func:`boundary_distance_weights`.

    Background is a class like the others (it provides the background-foreground negatives); its budget can
    be set separately with ``background_samples`` (0 skips it). Pass label maps already at the feature
    resolution, or give ``size`` to :meth:`__call__` to resample them with :func:`labels_to_resolution`.

    Example::

        sampler = BoundaryWeightedPixelSampler(num_per_class=64)
        b, idx, y = sampler(label, size=feat.shape[2:], generator=g)
        z = gather_pixel_features(feat, b, idx)  # (N, C), labels y
    """

    def __init__(
        self,
        num_per_class: int,
        mu: float = 8.0,
        eps: float = 0.05,
        background: int | None = 0,
        background_samples: int | None = None,
        classes: Sequence[int] | None = None,
        spacing: float | Sequence[float] | None = None,
        replacement_if_short: bool = True,
        resize_mode: str = "nearest",
        distance: str = "boundary",
    ) -> None:
        """
        Args:
            num_per_class: ``r``, pixels drawn per class and batch item.
            mu: decay of the weight map (default 8, in voxels or ``spacing`` units).
            eps: offset of the weight map (default 0.05).
            background: background label (None: no special background).
            background_samples: budget for the background class; None: ``num_per_class``; 0: skip background.
            classes: restrict sampling to these classes (background included only if listed); None: all present.
            spacing: voxel spacing at the sampled resolution for anisotropic distances.
            replacement_if_short: see :func:`sample_class_pixels`.
            resize_mode: nearest-neighbour rule of :func:`labels_to_resolution`.
            distance: ``D`` of the weight map, ``"boundary"`` (eq. 7, default) or ``"outside"``, see
                :func:`boundary_distance_weights`.

        Raises:
            ValueError: for a negative budget or an unknown ``distance``.
        """
        if num_per_class < 0 or (background_samples is not None and background_samples < 0):
            raise ValueError("sample budgets must be non-negative.")
        self.num_per_class = int(num_per_class)
        self.mu = mu
        self.eps = eps
        self.background = background
        self.background_samples = background_samples
        self.classes = None if classes is None else [int(c) for c in classes]
        self.spacing = spacing
        self.replacement_if_short = replacement_if_short
        self.resize_mode = resize_mode
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}.")
        self.distance = distance

    def __call__(
        self,
        label: torch.Tensor | np.ndarray,
        size: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            label: ``(B, 1, *spatial)`` integer label maps (2D or 3D).
            size: optional feature-map size to bring the labels to first.
            generator: torch random generator for reproducible draws.

        Returns:
            ``(batch_index, flat_index, label)`` long tensors of length ``N``; ``flat_index`` indexes the
            flattened spatial grid (of ``size`` if given).
        """
        lab = _as_label_tensor(label)
        if lab.ndim not in (4, 5) or lab.shape[1] != 1:
            raise ValueError(f"label must be (B, 1, H, W[, D]), got {tuple(lab.shape)}.")
        if size is not None:
            lab = labels_to_resolution(lab, size, mode=self.resize_mode)
        bg_budget = self.num_per_class if self.background_samples is None else self.background_samples

        out_b, out_i, out_y = [], [], []
        for k in range(lab.shape[0]):
            item = lab[k]  # (1, *spatial)
            present = torch.unique(item).tolist()
            wanted = present if self.classes is None else [c for c in self.classes if c in present]
            if self.background is not None and bg_budget != self.num_per_class:
                groups = [
                    ([c for c in wanted if c != self.background], self.num_per_class),
                    ([c for c in wanted if c == self.background], bg_budget),
                ]
            else:
                groups = [(wanted, self.num_per_class)]
            groups = [(cl, r) for cl, r in groups if cl and r > 0]
            if not groups:
                continue
            weights = boundary_distance_weights(
                item,
                mu=self.mu,
                eps=self.eps,
                classes=[c for cl, _ in groups for c in cl],
                spacing=self.spacing,
                distance=self.distance,
            )
            for cl, r in groups:
                idx, y = sample_class_pixels(
                    item,
                    r,
                    weights=weights,
                    classes=cl,
                    generator=generator,
                    replacement_if_short=self.replacement_if_short,
                )
                out_b.append(torch.full_like(idx, k))
                out_i.append(idx)
                out_y.append(y)
        if not out_b:
            empty = torch.zeros(0, dtype=torch.long, device=lab.device)
            return empty, empty.clone(), empty.clone()
        return torch.cat(out_b), torch.cat(out_i), torch.cat(out_y)
