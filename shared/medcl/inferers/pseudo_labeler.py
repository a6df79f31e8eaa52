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

- :class:`PseudoLabeler` runs a network on whole volumes (any inferer, e.g. :func:`medcl.inferers.volume_inferer`),
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
import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd
from monai.utils import convert_to_tensor
from torch import nn

from medcl.errors import MedclInputError
from medcl.inferers.crf import _CRF_BACKENDS, crf_refine
from medcl.networks.pretrained import load_pretrained
from medcl.utils.atomic import atomic_write, atomic_write_json
from medcl.utils.checkpoints import file_sha256, require_checkpoint

__all__ = ["DEFAULT_IGNORE_INDEX", "MANIFEST_NAME", "PseudoLabeler", "confidence_filter"]

logger = logging.getLogger(__name__)

DEFAULT_IGNORE_INDEX = 255
MANIFEST_NAME = "manifest.json"
_MANIFEST_VERSION = 1


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
# pseudo-labeller
# ----------------------------------------------------------------------------------------------------


def _stem(path: str) -> str:
    name = os.path.basename(os.fspath(path))
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def _write_json_atomic(path: str, obj: Any) -> None:
    atomic_write_json(path, obj, indent=2)


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
    :func:`medcl.inferers.volume_inferer`) in eval mode without gradients, softmax (or :func:`crf_refine` with
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
            (:func:`medcl.networks.load_pretrained`, all keys, strict) so the labels come from that checkpoint.
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
            keys="pred",
            transform=preprocessing,
            orig_keys=image_key,
            nearest_interp=not self.resample_probabilities,
            to_tensor=True,
        )

    @property
    def manifest_path(self) -> str:
        """``<output_dir>/manifest.json``."""
        return os.path.join(self.output_dir, MANIFEST_NAME)

    def settings(self) -> dict[str, Any]:
        """Labelling settings recorded in the manifest (a change starts a fresh round)."""
        return _jsonable(
            {
                "crf": self.crf,
                "crf_kwargs": self.crf_kwargs if self.crf else None,
                "confidence_threshold": self.confidence_threshold,
                "ignore_index": self.ignore_index if self.confidence_threshold is not None else None,
                "resample_probabilities": self.resample_probabilities,
                "postfix": self.postfix,
            }
        )

    def output_path(self, image_path: str) -> str:
        """``<output_dir>/<name>_<postfix>.nii.gz`` for an image ``<name>.nii.gz``."""
        return os.path.join(self.output_dir, f"{_stem(image_path)}_{self.postfix}.nii.gz")

    # --- manifest ---------------------------------------------------------------------------------

    def _header(self, tag: str, checkpoint_path: str | None) -> dict[str, Any]:
        header: dict[str, Any] = {
            "version": _MANIFEST_VERSION,
            "tag": str(tag),
            "checkpoint": None,
            "checkpoint_size": None,
            "checkpoint_sha256": None,
        }
        if checkpoint_path is not None:
            path = require_checkpoint(
                os.fspath(checkpoint_path),
                "train the segmentation network first (its saved checkpoint)",
                "checkpoint for pseudo-labelling",
                "checkpoint_path",
            )
            header.update(
                checkpoint=os.path.abspath(path),
                checkpoint_size=os.path.getsize(path),
                checkpoint_sha256=file_sha256(path),
            )
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
        atomic_write(out_path, lambda tmp: nib.save(out, tmp), suffix=".nii.gz")

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
            it
            for it in items
            if not (
                (prev := done.get(os.path.abspath(it[self.image_key])))
                and prev.get(self.label_key) == self.output_path(it[self.image_key])
                and os.path.isfile(prev[self.label_key])
            )
        ]
        if todo and checkpoint_path is not None and self.load_checkpoint:
            load_pretrained(
                self.network,
                checkpoint_path,
                prefixes=None,
                key=self.checkpoint_key,
                strict=True,
                map_location=self.device,
            )
        if todo:
            logger.info("%s: %d of %d volumes to label (tag %r).", self.output_dir, len(todo), len(items), tag)
        was_training = self.network.training
        self.network.to(self.device)
        self.network.eval()
        start = time.monotonic()
        try:
            for i, it in enumerate(todo, 1):
                src = it[self.image_key]
                out_path = self.output_path(src)
                self._label_one(src, out_path)
                done[os.path.abspath(src)] = {self.image_key: src, self.label_key: out_path}
                self._write_manifest(header, done)
                elapsed = time.monotonic() - start
                logger.info(
                    "Progress: pseudo-labels %r, volume %d/%d, elapsed %s, left ~%s",
                    tag,
                    i,
                    len(todo),
                    timedelta(seconds=round(elapsed)),
                    timedelta(seconds=round(elapsed / i * (len(todo) - i))),
                )
        finally:
            self.network.train(was_training)
        return [{**it, self.label_key: self.output_path(it[self.image_key])} for it in items]
