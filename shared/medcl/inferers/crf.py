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
"""Dense CRF refinement of softmax probabilities (mean-field; MONAI's CRF or a PyTorch approximation)."""

import math
import warnings

import torch
from monai.networks.blocks import CRF
from monai.networks.layers import GaussianFilter
from monai.utils import convert_to_tensor, optional_import

_, HAS_MONAI_CPP = optional_import("monai._C")

__all__ = ["HAS_MONAI_CPP", "crf_refine"]

_CRF_BACKENDS = ("auto", "monai", "torch")
_MAX_LEVELS = 64  # intensity levels of the PyTorch bilateral approximation


def _gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian of ``(B, C, *spatial)`` with zero padding (truncated at 3 sigma)."""
    if sigma <= 0:
        return x
    return GaussianFilter(x.ndim - 2, sigma, truncated=3.0, approx="sampled").to(x.device)(x)


def _normalized_gaussian(q: torch.Tensor, sigma: float) -> torch.Tensor:
    """Normalised Gaussian filter: the kernel-weighted mean of ``q`` (zero padding does not darken borders)."""
    num = _gaussian_smooth(q, sigma)
    den = _gaussian_smooth(torch.ones_like(q[:, :1]), sigma)
    return num / den.clamp_min(torch.finfo(q.dtype).tiny)


def _normalized_bilateral(q: torch.Tensor, ref: torch.Tensor, spatial_sigma: float, color_sigma: float) -> torch.Tensor:
    """Normalised bilateral filter of ``q`` guided by a single-channel ``ref`` (piecewise-linear approximation).

    Exact at ``_MAX_LEVELS`` (at most) intensity levels spaced ``color_sigma / 2`` apart and interpolated
    linearly in between (Durand & Dorsey, 2002): for level ``l`` the weights ``exp(-(ref - l)^2 / 2 sigma_c^2)``
    are applied to ``q``, blurred spatially and normalised; every voxel mixes the two levels enclosing its
    intensity.
    """
    out = torch.zeros_like(q)
    tiny = torch.finfo(q.dtype).tiny
    for b in range(q.shape[0]):
        r, qb = ref[b : b + 1], q[b : b + 1]
        lo, hi = float(r.min()), float(r.max())
        step = color_sigma / 2.0
        n_levels = int(math.floor((hi - lo) / step)) + 2 if hi > lo else 1
        if n_levels > _MAX_LEVELS:
            step = (hi - lo) / (_MAX_LEVELS - 1)
            n_levels = _MAX_LEVELS
            warnings.warn(
                f"crf_refine (torch backend): the reference spans {hi - lo:.4g} intensity units, "
                f"{(hi - lo) / color_sigma:.0f} color sigmas; the bilateral term is approximated with levels "
                f"{step / color_sigma:.2f} color sigmas apart. Scale the image intensities (as the preprocessing does) "
                "or raise bilateral_color_sigma.",
                stacklevel=3,
            )
        for k in range(n_levels):
            level = lo + k * step
            tent = (1.0 - (r - level).abs() / step).clamp_min(0.0) if n_levels > 1 else torch.ones_like(r)
            if not bool((tent > 0).any()):
                continue
            w = torch.exp(-0.5 * ((r - level) / color_sigma) ** 2)
            num = _gaussian_smooth(w * qb, spatial_sigma)
            den = _gaussian_smooth(w, spatial_sigma)
            filtered = torch.where(den > tiny, num / den.clamp_min(tiny), qb)
            out[b : b + 1] += tent * filtered
    return out


def _crf_torch(
    logits: torch.Tensor,
    ref: torch.Tensor,
    iterations: int,
    bilateral_weight: float,
    gaussian_weight: float,
    bilateral_spatial_sigma: float,
    bilateral_color_sigma: float,
    gaussian_spatial_sigma: float,
    update_factor: float,
    compatibility_matrix: torch.Tensor | None,
) -> torch.Tensor:
    """The mean-field loop of :class:`monai.networks.blocks.CRF` with PyTorch filters instead of ``monai._C``."""
    if ref.shape[1] != 1:
        raise ValueError(
            f"the PyTorch CRF backend supports a single-channel image, got {ref.shape[1]} channels; "
            "install MONAI with its C++ extension (BUILD_MONAI=1) to use backend='monai'."
        )
    out = torch.softmax(logits, dim=1)
    for _ in range(iterations):
        bilateral = _normalized_bilateral(out, ref, bilateral_spatial_sigma, bilateral_color_sigma)
        gaussian = _normalized_gaussian(out, gaussian_spatial_sigma)
        combined = bilateral_weight * bilateral + gaussian_weight * gaussian
        if compatibility_matrix is not None:
            flat = combined.flatten(start_dim=2).permute(0, 2, 1)
            flat = torch.matmul(flat, compatibility_matrix.to(flat))
            combined = flat.permute(0, 2, 1).reshape(combined.shape)
        out = torch.softmax(logits + update_factor * combined, dim=1)
    return out


def crf_refine(
    logits: torch.Tensor,
    image: torch.Tensor,
    iterations: int = 5,
    bilateral_weight: float = 1.0,
    gaussian_weight: float = 1.0,
    bilateral_spatial_sigma: float = 5.0,
    bilateral_color_sigma: float = 0.5,
    gaussian_spatial_sigma: float = 5.0,
    update_factor: float = 3.0,
    compatibility_matrix: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Refine segmentation logits with a dense CRF (mean-field, :class:`monai.networks.blocks.CRF`).

    Each iteration smooths the current class probabilities with a bilateral filter (position and intensity of
    ``image``) and a Gaussian filter (position), both normalised weighted means over the neighbourhood, and sets
    ``softmax(logits + update_factor * (bilateral_weight * bilateral + gaussian_weight * gaussian))``, so a
    voxel whose class disagrees with similar-looking neighbours is pulled toward theirs. Spatial sigmas are in
    voxels of the given grid; the color sigma is in intensity units of ``image`` (use the preprocessed,
    intensity-scaled image). The parameters and defaults are MONAI's.

    Backends: ``"monai"`` is :class:`monai.networks.blocks.CRF` (permutohedral-lattice filters), which needs
    MONAI built with its C++ extension (``monai._C``, ``BUILD_MONAI=1``); ``"torch"`` runs the same update
    with PyTorch filters: a separable Gaussian (truncated at 3 sigma) and a piecewise-linear bilateral
    approximation (single-channel ``image`` only; 2-3 spatial dims); ``"auto"`` (default) picks ``"monai"``
    when the extension is available.

    Args:
        logits: ``(B, C, *spatial)`` class logits (not probabilities).
        image: ``(B, R, *spatial)`` reference image guiding the bilateral term (``R = 1`` for the torch backend).
        iterations: mean-field iterations. Defaults to 5.
        bilateral_weight: weight of the bilateral term. Defaults to 1.0.
        gaussian_weight: weight of the Gaussian term. Defaults to 1.0.
        bilateral_spatial_sigma: spatial sigma of the bilateral term (voxels). Defaults to 5.0.
        bilateral_color_sigma: intensity sigma of the bilateral term. Defaults to 0.5.
        gaussian_spatial_sigma: sigma of the Gaussian term (voxels). Defaults to 5.0.
        update_factor: weight of the messages against the logits. Defaults to 3.0.
        compatibility_matrix: optional ``(C, C)`` class compatibility applied to the messages.
        backend: ``"auto"``, ``"monai"`` or ``"torch"``, see above.

    Returns:
        ``(B, C, *spatial)`` refined class probabilities (sum to 1 over ``C``), float32, on ``logits``' device.

    Raises:
        ValueError: for mismatched shapes, an unknown backend, or a multi-channel image with the torch backend.
        RuntimeError: for ``backend="monai"`` when MONAI's C++ extension is not available.
    """
    if backend not in _CRF_BACKENDS:
        raise ValueError(f"backend must be one of {_CRF_BACKENDS}, got {backend!r}.")
    x = convert_to_tensor(logits, track_meta=False).float()
    ref = convert_to_tensor(image, track_meta=False).to(device=x.device, dtype=torch.float32)
    if x.ndim < 3 or ref.ndim != x.ndim:
        raise ValueError(
            f"logits (B, C, *spatial) and image (B, R, *spatial) need the same number of dimensions (>= 3), "
            f"got {tuple(x.shape)} and {tuple(ref.shape)}."
        )
    if ref.shape[0] != x.shape[0] or ref.shape[2:] != x.shape[2:]:
        raise ValueError(f"image {tuple(ref.shape)} does not match logits {tuple(x.shape)} (batch and spatial size).")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}.")
    if compatibility_matrix is not None:
        compatibility_matrix = convert_to_tensor(compatibility_matrix, track_meta=False).to(x)
        if tuple(compatibility_matrix.shape) != (x.shape[1], x.shape[1]):
            raise ValueError(
                f"compatibility_matrix must be ({x.shape[1]}, {x.shape[1]}), got {tuple(compatibility_matrix.shape)}."
            )
    if backend == "monai" and not HAS_MONAI_CPP:
        raise RuntimeError(
            "crf_refine(backend='monai') needs MONAI's C++ extension (monai._C), which this installation lacks: "
            "reinstall MONAI with BUILD_MONAI=1, or use backend='torch' / 'auto'."
        )
    params = dict(
        iterations=int(iterations),
        bilateral_weight=float(bilateral_weight),
        gaussian_weight=float(gaussian_weight),
        bilateral_spatial_sigma=float(bilateral_spatial_sigma),
        bilateral_color_sigma=float(bilateral_color_sigma),
        gaussian_spatial_sigma=float(gaussian_spatial_sigma),
        update_factor=float(update_factor),
        compatibility_matrix=compatibility_matrix,
    )
    with torch.no_grad():
        if backend == "monai" or (backend == "auto" and HAS_MONAI_CPP):
            return CRF(**params)(x, ref)
        if x.ndim not in (4, 5):
            raise ValueError(f"the torch CRF backend supports 2 or 3 spatial dimensions, got shape {tuple(x.shape)}.")
        return _crf_torch(x, ref, **params)
