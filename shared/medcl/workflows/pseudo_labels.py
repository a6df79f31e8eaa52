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
"""Pseudo-labels for self-training (Chaitanya et al., MedIA 2023): predict unlabelled volumes, write label maps.

One self-training round predicts every unlabelled volume with the current segmentation network, turns the
predictions into label maps (the *pseudo-labels*) and trains on them (e.g. with
:class:`medcl.losses.local_contrastive.LocalContrastiveLoss`). This module provides the prediction half:

- :class:`PseudoLabeler` runs a network on whole volumes (any inferer, e.g. :func:`medcl.workflows.volume_inferer`),
  optionally refines the softmax with a CRF (:func:`crf_refine`) and drops low-confidence voxels
  (:func:`confidence_filter`), maps the label map back to each input's original grid (MONAI ``Invertd`` with
  the preprocessing) and writes ``<output_dir>/<name>_pseudo.nii.gz`` (uint8, input shape and affine). A
  ``manifest.json`` written after every volume makes a round resumable: a rerun with the same tag, checkpoint
  and settings skips the volumes already written; anything else starts afresh.
- :func:`pseudo_label_dice` reports the pseudo-labels' quality against true labels (per class and overall).

Pseudo-labels are plain argmax maps by default (the paper's setting). The confidence filter is off by default;
when enabled, filtered voxels carry ``ignore_index`` (255) and every downstream consumer must exclude that
value (a loss that treats 255 as a class, or one-hot encodes it, is wrong).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from monai.data import MetaTensor
from monai.networks.blocks import CRF
from monai.networks.layers import GaussianFilter
from monai.transforms import Invertd
from monai.utils import convert_to_tensor, optional_import

from medcl.errors import MedclInputError
from medcl.workflows.checkpoints import file_sha256, require_checkpoint
from medcl.workflows.pretrained import load_pretrained

_, HAS_MONAI_CPP = optional_import("monai._C")

__all__ = [
    "DEFAULT_IGNORE_INDEX",
    "MANIFEST_NAME",
    "PseudoLabeler",
    "confidence_filter",
    "crf_refine",
    "pseudo_label_dice",
]

logger = logging.getLogger(__name__)

DEFAULT_IGNORE_INDEX = 255
MANIFEST_NAME = "manifest.json"
_MANIFEST_VERSION = 1
_CRF_BACKENDS = ("auto", "monai", "torch")
_MAX_LEVELS = 64  # intensity levels of the PyTorch bilateral approximation


# ----------------------------------------------------------------------------------------------------
# confidence filter
# ----------------------------------------------------------------------------------------------------


def _check_ignore_index(ignore_index: int, num_classes: int) -> int:
    ignore_index = int(ignore_index)
    if not num_classes <= ignore_index <= 255:
        raise ValueError(
            f"ignore_index must be in [{num_classes}, 255] (not a class, and representable as uint8), "
            f"got {ignore_index}."
        )
    return ignore_index


def confidence_filter(
    prob: torch.Tensor | np.ndarray,
    threshold: float | None = 0.9,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    keepdim: bool = True,
) -> torch.Tensor | np.ndarray:
    """Argmax label map of softmax probabilities with low-confidence voxels set to ``ignore_index``.

    A voxel whose largest class probability is below ``threshold`` gets ``ignore_index``; every other voxel its
    argmax class. Consumers of the result must exclude ``ignore_index`` voxels (mask them out of losses and
    metrics); a loss that one-hot encodes the labels or treats every value as a class would take 255 for a
    class. :class:`PseudoLabeler` leaves the filter off by default.

    Args:
        prob: ``(C, *spatial)`` class probabilities (softmax output), torch tensor or numpy array.
        threshold: minimum max-probability kept, in ``[0, 1]``; None: no filtering (plain argmax). Values at or
            below ``1 / C`` filter nothing. Defaults to 0.9.
        ignore_index: label of filtered voxels, in ``[C, 255]``. Defaults to 255.
        keepdim: return ``(1, *spatial)`` (MONAI channel-first, as ``AsDiscrete(argmax=True)``); False:
            ``(*spatial)``. Defaults to True.

    Returns:
        uint8 label map, a torch tensor (on ``prob``'s device) for a tensor input, a numpy array for a numpy input.

    Raises:
        ValueError: for ``prob`` without a spatial dimension, more than 255 classes, a threshold outside
            ``[0, 1]`` or an ``ignore_index`` that is a class or not representable as uint8.
    """
    is_numpy = isinstance(prob, np.ndarray)
    p = convert_to_tensor(prob, track_meta=False)
    if p.ndim < 2:
        raise ValueError(f"prob must be (C, *spatial), got shape {tuple(p.shape)}.")
    num_classes = int(p.shape[0])
    if num_classes > 255:
        raise ValueError(f"at most 255 classes fit a uint8 label map with an ignore label, got {num_classes}.")
    ignore_index = _check_ignore_index(ignore_index, num_classes)
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] or None, got {threshold}.")
    conf, label = p.max(dim=0, keepdim=keepdim)
    label = label.to(torch.uint8)
    if threshold is not None:
        label[conf < float(threshold)] = ignore_index
    return label.cpu().numpy() if is_numpy else label


# ----------------------------------------------------------------------------------------------------
# CRF
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# pseudo-labeller
# ----------------------------------------------------------------------------------------------------


def _stem(path: str) -> str:
    name = os.path.basename(os.fspath(path))
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tensors/arrays as lists), for comparing settings with a manifest."""
    def default(o):
        if isinstance(o, (torch.Tensor, np.ndarray)):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def _load_label_array(path: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise MedclInputError(f"{path}: {what} not found.")
    try:
        img = nib.load(path)
        arr = np.asanyarray(img.dataobj)
    except Exception as e:
        raise MedclInputError(f"{path}: cannot read the {what} with nibabel: {e}") from e
    return arr, img.affine


class PseudoLabeler:
    """
    Write pseudo-label maps of unlabelled volumes for a self-training round, resumably.

    For every ``{"image": path}`` item of a datalist: ``preprocessing({"image": path})`` (a dictionary
    ``Compose`` starting with ``LoadImaged(ensure_channel_first=True)``, as a bundle's inference
    ``preprocessing``), ``inferer(x, network)`` on the whole volume (``x`` is ``(1, C_in, *spatial)``, e.g.
    :func:`medcl.workflows.volume_inferer`) in eval mode without gradients, softmax (or :func:`crf_refine` with
    ``crf=True``), argmax (with :func:`confidence_filter` when ``confidence_threshold`` is set), then the
    inverse of the preprocessing's spatial transforms (``Invertd``, nearest neighbour for the label map), and
    ``<output_dir>/<name>_<postfix>.nii.gz`` is written: uint8, the input's spatial shape and affine (taken from
    the input's NIfTI header), written to a temporary file and renamed. Crops are undone with background (0).

    ``<output_dir>/manifest.json`` (rewritten atomically after every volume) holds ``tag``, the checkpoint
    (path, size, sha256), the labelling settings and the ``items`` written. :meth:`run` with the same tag,
    checkpoint content and settings skips the items already listed whose file exists (resume after an
    interruption); a different tag, checkpoint or settings starts a fresh manifest and rewrites every file.
    The network, inferer and preprocessing are not fingerprinted: change the tag when they change.

    Example (one round)::

        labeler = PseudoLabeler(network, volume_inferer(3, 96), preprocessing, "runs/round1", device)
        pseudo = labeler.run(unlabelled, tag="round1", checkpoint_path="runs/round0/model.pt")
        train_items = labelled + pseudo          # {"image", "label"} items
        print(pseudo_label_dice(pseudo_val, truth_val, num_classes))

    Args:
        network: segmentation network returning ``(B, num_classes, *spatial)`` logits.
        inferer: ``inferer(x, network) -> logits`` on a whole preprocessed volume; a tuple/list output uses
            its first element.
        preprocessing: invertible dictionary transform applied to ``{image_key: path}``; must return one dict.
        output_dir: folder of the pseudo-labels and the manifest (created if needed).
        device: device of the network and the inference; None: the network's device (cpu without parameters).
        crf: refine the softmax with :func:`crf_refine` (reference: the preprocessed image). Defaults to False.
        confidence_threshold: None (default, paper setting): plain argmax. A float: voxels whose max probability
            is below it get ``ignore_index`` (see :func:`confidence_filter`; downstream losses must ignore it).
        ignore_index: label of filtered voxels. Defaults to 255.
        crf_kwargs: keyword arguments of :func:`crf_refine` (sigmas, weights, iterations, backend).
        resample_probabilities: False (default): invert the label map with nearest neighbour. True: invert the
            class probabilities with the preprocessing's interpolation and take the argmax (and confidence
            filter) on the original grid, smoother for anisotropic resampling but ``C`` times the memory.
        image_key: datalist key of the image. Defaults to ``"image"``.
        label_key: key of the pseudo-label path in the returned items. Defaults to ``"label"``.
        postfix: file name postfix. Defaults to ``"pseudo"``.
        load_checkpoint: when :meth:`run` is given a checkpoint, load it into ``network`` first
            (:func:`medcl.workflows.load_pretrained`, all keys, strict) so the labels come from that checkpoint.
            Defaults to True.
        checkpoint_key: entry of the checkpoint holding the state dict (ignored for a raw state dict).
            Defaults to ``"model"``.
        amp: run the network under ``torch.autocast``. Defaults to False.

    Raises:
        ValueError: for a ``preprocessing`` that is not an invertible transform (MONAI ``Compose``), a
            confidence threshold outside ``[0, 1]`` or an ``ignore_index`` outside ``[0, 255]``.
    """

    def __init__(
        self,
        network: nn.Module,
        inferer: Callable[[torch.Tensor, nn.Module], Any],
        preprocessing: Callable[[Mapping[str, Any]], Any],
        output_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        crf: bool = False,
        confidence_threshold: float | None = None,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        crf_kwargs: Mapping[str, Any] | None = None,
        resample_probabilities: bool = False,
        image_key: str = "image",
        label_key: str = "label",
        postfix: str = "pseudo",
        load_checkpoint: bool = True,
        checkpoint_key: str | None = "model",
        amp: bool = False,
    ) -> None:
        if confidence_threshold is not None and not 0.0 <= float(confidence_threshold) <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1] or None, got {confidence_threshold}.")
        if not 0 <= int(ignore_index) <= 255:
            raise ValueError(f"ignore_index must be in [0, 255] (uint8), got {ignore_index}.")
        if crf_kwargs and "backend" in crf_kwargs and crf_kwargs["backend"] not in _CRF_BACKENDS:
            raise ValueError(f"crf_kwargs['backend'] must be one of {_CRF_BACKENDS}, got {crf_kwargs['backend']!r}.")
        self.network = network
        self.inferer = inferer
        self.preprocessing = preprocessing
        self.output_dir = os.fspath(output_dir)
        if device is None:
            param = next(iter(network.parameters()), None)
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)
        self.crf = bool(crf)
        self.confidence_threshold = None if confidence_threshold is None else float(confidence_threshold)
        self.ignore_index = int(ignore_index)
        self.crf_kwargs = dict(crf_kwargs or {})
        self.resample_probabilities = bool(resample_probabilities)
        self.image_key = image_key
        self.label_key = label_key
        self.postfix = postfix
        self.load_checkpoint = bool(load_checkpoint)
        self.checkpoint_key = checkpoint_key
        self.amp = bool(amp)
        self._invert = Invertd(
            keys="pred", transform=preprocessing, orig_keys=image_key,
            nearest_interp=not self.resample_probabilities, to_tensor=True,
        )

    @property
    def manifest_path(self) -> str:
        """``<output_dir>/manifest.json``."""
        return os.path.join(self.output_dir, MANIFEST_NAME)

    def settings(self) -> dict[str, Any]:
        """Labelling settings recorded in the manifest (a change starts a fresh round)."""
        return _jsonable({
            "crf": self.crf,
            "crf_kwargs": self.crf_kwargs if self.crf else None,
            "confidence_threshold": self.confidence_threshold,
            "ignore_index": self.ignore_index if self.confidence_threshold is not None else None,
            "resample_probabilities": self.resample_probabilities,
            "postfix": self.postfix,
        })

    def output_path(self, image_path: str) -> str:
        """``<output_dir>/<name>_<postfix>.nii.gz`` for an image ``<name>.nii.gz``."""
        return os.path.join(self.output_dir, f"{_stem(image_path)}_{self.postfix}.nii.gz")

    # --- manifest ---------------------------------------------------------------------------------

    def _header(self, tag: str, checkpoint_path: str | None) -> dict[str, Any]:
        header: dict[str, Any] = {"version": _MANIFEST_VERSION, "tag": str(tag), "checkpoint": None,
                                  "checkpoint_size": None, "checkpoint_sha256": None}
        if checkpoint_path is not None:
            path = require_checkpoint(
                os.fspath(checkpoint_path), "train the segmentation network first (its saved checkpoint)",
                "checkpoint for pseudo-labelling", "checkpoint_path",
            )
            header.update(checkpoint=os.path.abspath(path), checkpoint_size=os.path.getsize(path),
                          checkpoint_sha256=file_sha256(path))
        header["settings"] = self.settings()
        return header

    def _previous_items(self, header: Mapping[str, Any]) -> dict[str, dict]:
        """Items of an existing manifest written with the same header, keyed by absolute image path; else {}."""
        path = self.manifest_path
        if not os.path.isfile(path):
            return {}
        try:
            with open(path) as f:
                old = json.load(f)
            same = all(old.get(k) == header[k] for k in ("version", "tag", "checkpoint_sha256", "settings"))
            items = old["items"] if same else []
            prev = {os.path.abspath(it["image"]): dict(it) for it in items}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning("%s: unreadable manifest (%s); starting afresh.", path, e)
            return {}
        if not same:
            logger.info("%s: tag/checkpoint/settings changed (was tag %r); starting afresh.", path, old.get("tag"))
        return prev

    def _write_manifest(self, header: Mapping[str, Any], items: Mapping[str, dict]) -> None:
        _write_json_atomic(self.manifest_path, {**header, "items": list(items.values())})

    # --- one volume -------------------------------------------------------------------------------

    def _predict(self, image: torch.Tensor) -> torch.Tensor:
        """``(C, *spatial)`` class probabilities of a preprocessed ``(C_in, *spatial)`` image, on the CPU."""
        x = convert_to_tensor(image, track_meta=False).float()[None].to(self.device)
        autocast = torch.autocast(self.device.type) if self.amp else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            logits = self.inferer(x, self.network)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        logits = convert_to_tensor(logits, track_meta=False).float()
        with torch.no_grad():
            prob = crf_refine(logits, x, **self.crf_kwargs) if self.crf else torch.softmax(logits, dim=1)
        return prob[0].cpu()

    def _label_one(self, src: str, out_path: str) -> None:
        if not os.path.isfile(src):
            raise MedclInputError(f"{src}: image not found (datalist item {self.image_key!r}).")
        try:
            ref = nib.load(src)
            ref_shape, ref_affine = tuple(int(s) for s in ref.shape[:3]), ref.affine
        except Exception as e:
            raise MedclInputError(f"{src}: cannot read the image header with nibabel: {e}") from e
        try:
            data = self.preprocessing({self.image_key: src})
        except Exception as e:  # unreadable/corrupt data surfaces here (nibabel loads lazily)
            raise MedclInputError(f"{src}: cannot load or preprocess the image ({type(e).__name__}: {e}).") from e
        if not isinstance(data, Mapping) or not isinstance(data.get(self.image_key), MetaTensor):
            raise MedclInputError(
                f"{src}: preprocessing must return one dict with a MetaTensor under {self.image_key!r} "
                f"(got {type(data).__name__}); use the bundle's inference preprocessing, without random crops."
            )
        image = data[self.image_key]
        prob = self._predict(image)
        if self.resample_probabilities:
            to_invert = prob
        else:
            to_invert = confidence_filter(prob, self.confidence_threshold, self.ignore_index).float()
        inverted = self._invert({self.image_key: image, "pred": MetaTensor(to_invert)})["pred"]
        if self.resample_probabilities:
            inverted = confidence_filter(inverted.as_tensor().float(), self.confidence_threshold, self.ignore_index)
        label = convert_to_tensor(inverted, track_meta=False).round().to(torch.uint8).cpu().numpy()
        label = label.reshape(label.shape[1:]) if label.shape[0] == 1 else label
        if tuple(label.shape) != ref_shape:
            raise MedclInputError(
                f"{src}: the inverted label map has shape {tuple(label.shape)}, the image {ref_shape}: the "
                "preprocessing's spatial transforms must be invertible (MONAI dictionary transforms that track "
                "their operations)."
            )
        inv_affine = getattr(inverted, "affine", None)
        if inv_affine is not None and not np.allclose(np.asarray(inv_affine, dtype=np.float64), ref_affine, atol=1e-3):
            raise MedclInputError(f"{src}: the inverted label map is not on the image's grid (affine differs).")
        out = nib.Nifti1Image(label, ref_affine)
        out.set_data_dtype(np.uint8)
        out.header.set_xyzt_units(*ref.header.get_xyzt_units())
        out.set_qform(ref_affine, code=max(int(ref.header["qform_code"]), 1))
        out.set_sform(ref_affine, code=max(int(ref.header["sform_code"]), 1))
        tmp = out_path[: -len(".nii.gz")] + f".tmp{os.getpid()}.nii.gz"
        try:
            nib.save(out, tmp)
            os.replace(tmp, out_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    # --- a round ----------------------------------------------------------------------------------

    def _as_items(self, datalist: Sequence[Mapping[str, Any] | str]) -> list[dict]:
        if isinstance(datalist, (str, Mapping)):
            datalist = [datalist]
        items = []
        for i, it in enumerate(datalist):
            if isinstance(it, (str, os.PathLike)):
                it = {self.image_key: os.fspath(it)}
            if not isinstance(it, Mapping) or self.image_key not in it:
                raise MedclInputError(f"datalist item {i} has no {self.image_key!r} entry: {it!r}.")
            items.append(dict(it))
        seen: dict[str, str] = {}
        for it in items:
            out, src = self.output_path(it[self.image_key]), os.path.abspath(it[self.image_key])
            if out in seen and seen[out] != src:
                raise MedclInputError(
                    f"{it[self.image_key]} and {seen[out]} would both write {out}: image file names must be unique."
                )
            seen[out] = src
        return items

    def run(
        self, datalist: Sequence[Mapping[str, Any] | str], tag: str, checkpoint_path: str | None = None
    ) -> list[dict]:
        """Write the pseudo-labels of ``datalist``; skip those already written for the same tag and checkpoint.

        Args:
            datalist: ``{"image": path}`` items (other keys are kept; an existing ``"label"`` is replaced) or paths.
            tag: name of the round (e.g. ``"round2"``); recorded in the manifest, part of the resume key.
            checkpoint_path: checkpoint the labels come from; loaded into ``network`` first when
                ``load_checkpoint`` (see the class). Its size and sha256 are part of the resume key.

        Returns:
            the datalist items, in order, with ``label_key`` set to the pseudo-label file.

        Raises:
            MedclInputError: for a missing checkpoint, an item without an image, a missing or unreadable image
                (named), colliding output names, or a preprocessing that does not invert to the input grid.
        """
        items = self._as_items(datalist)
        os.makedirs(self.output_dir, exist_ok=True)
        header = self._header(tag, checkpoint_path)
        done = self._previous_items(header)
        self._write_manifest(header, done)

        todo = [
            it for it in items
            if not (
                (prev := done.get(os.path.abspath(it[self.image_key])))
                and prev.get(self.label_key) == self.output_path(it[self.image_key])
                and os.path.isfile(prev[self.label_key])
            )
        ]
        if todo and checkpoint_path is not None and self.load_checkpoint:
            load_pretrained(self.network, checkpoint_path, prefixes=None, key=self.checkpoint_key, strict=True,
                            map_location=self.device)
        if todo:
            logger.info("%s: %d of %d volumes to label (tag %r).", self.output_dir, len(todo), len(items), tag)
        was_training = self.network.training
        self.network.to(self.device)
        self.network.eval()
        try:
            for it in todo:
                src = it[self.image_key]
                out_path = self.output_path(src)
                self._label_one(src, out_path)
                done[os.path.abspath(src)] = {self.image_key: src, self.label_key: out_path}
                self._write_manifest(header, done)
        finally:
            self.network.train(was_training)
        return [{**it, self.label_key: self.output_path(it[self.image_key])} for it in items]


# ----------------------------------------------------------------------------------------------------
# quality report
# ----------------------------------------------------------------------------------------------------


def _pair_items(pseudo_items, truth_items, image_key: str) -> list[tuple[Mapping, Mapping]]:
    pseudo_items, truth_items = list(pseudo_items), list(truth_items)
    if all(isinstance(it, Mapping) and image_key in it for it in pseudo_items + truth_items):
        truth = {os.path.abspath(it[image_key]): it for it in truth_items}
        missing = [it[image_key] for it in pseudo_items if os.path.abspath(it[image_key]) not in truth]
        if missing:
            raise MedclInputError(f"no true label for the images {missing[:5]}{' ...' if len(missing) > 5 else ''}.")
        return [(it, truth[os.path.abspath(it[image_key])]) for it in pseudo_items]
    if len(pseudo_items) != len(truth_items):
        raise MedclInputError(
            f"{len(pseudo_items)} pseudo-label items vs {len(truth_items)} true-label items: pair them by "
            f"{image_key!r} or pass lists of equal length."
        )
    return list(zip(pseudo_items, truth_items))


def pseudo_label_dice(
    pseudo_items: Sequence[Mapping[str, Any]],
    truth_items: Sequence[Mapping[str, Any]],
    num_classes: int,
    include_background: bool = False,
    ignore_index: int | None = DEFAULT_IGNORE_INDEX,
    label_key: str = "label",
    image_key: str = "image",
) -> dict[str, Any]:
    """Dice of pseudo-label files against true label files, per class and overall (pseudo-label quality).

    Items are paired by ``image_key`` when all items have one, else by position. Per case and class, Dice is
    ``2 |P ∩ T| / (|P| + |T|)`` over the voxels where neither map is ``ignore_index`` (so confidence-filtered
    voxels are excluded); it equals ``monai.metrics.compute_dice(..., ignore_empty=False)`` on one-hot maps,
    except that a class absent from both maps gives NaN (not 1) and is left out of the means. A class predicted
    in a case where it is absent scores 0. Counts come from a confusion matrix, so memory stays one volume.

    Args:
        pseudo_items: ``{"image", "label"}`` items of pseudo-labels (e.g. :meth:`PseudoLabeler.run` output).
        truth_items: ``{"image", "label"}`` items of the true labels (same grids).
        num_classes: number of classes (background included).
        include_background: report class 0 too. Defaults to False.
        ignore_index: label excluded from the comparison; None: none. Defaults to 255.
        label_key: key of the label file in both item lists. Defaults to ``"label"``.
        image_key: key used to pair the items. Defaults to ``"image"``.

    Returns:
        ``{"per_class": {class: mean Dice over cases (NaN if the class is in no case)}, "mean": mean of the
        per-class values (NaN if none), "per_case": [{"image", "label", "dice": {class: Dice}}],
        "ignored_fraction": fraction of voxels excluded, "num_cases": int}``.

    Raises:
        MedclInputError: for unpaired items, missing or unreadable files, maps of different shapes, or labels
            ``>= num_classes`` (other than ``ignore_index``).
    """
    num_classes = int(num_classes)
    if num_classes < 1 + int(not include_background):
        raise ValueError(f"num_classes={num_classes} leaves no class to report.")
    classes = list(range(0 if include_background else 1, num_classes))
    per_case, ignored, total = [], 0, 0
    for p_item, t_item in _pair_items(pseudo_items, truth_items, image_key):
        p_path, t_path = os.fspath(p_item[label_key]), os.fspath(t_item[label_key])
        p, p_aff = _load_label_array(p_path, "pseudo-label")
        t, t_aff = _load_label_array(t_path, "true label")
        p, t = np.squeeze(p), np.squeeze(t)
        if p.shape != t.shape:
            raise MedclInputError(f"{p_path} has shape {p.shape}, {t_path} has {t.shape}: not on the same grid.")
        if not np.allclose(p_aff, t_aff, atol=1e-3):
            logger.warning("%s and %s have different affines; comparing voxel by voxel.", p_path, t_path)
        p, t = np.rint(p).astype(np.int64).ravel(), np.rint(t).astype(np.int64).ravel()
        keep = np.ones(p.shape, dtype=bool)
        if ignore_index is not None:
            keep = (p != ignore_index) & (t != ignore_index)
            p, t = p[keep], t[keep]
        for arr, path in ((p, p_path), (t, t_path)):
            if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
                raise MedclInputError(
                    f"{path}: labels outside [0, {num_classes}) (range {arr.min()}..{arr.max()}; "
                    f"ignore_index {ignore_index})."
                )
        conf = np.bincount(p * num_classes + t, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
        inter, p_sum, t_sum = np.diag(conf), conf.sum(axis=1), conf.sum(axis=0)
        denom = p_sum + t_sum
        dice = {c: float(2.0 * inter[c] / denom[c]) if denom[c] > 0 else float("nan") for c in classes}
        per_case.append({image_key: p_item.get(image_key), label_key: p_path, "dice": dice})
        ignored += int(keep.size - keep.sum())
        total += int(keep.size)

    def nanmean(values):
        vals = [v for v in values if not math.isnan(v)]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    per_class = {c: nanmean([case["dice"][c] for case in per_case]) for c in classes}
    return {
        "per_class": per_class,
        "mean": nanmean(per_class.values()),
        "per_case": per_case,
        "ignored_fraction": ignored / total if total else 0.0,
        "num_cases": len(per_case),
    }
