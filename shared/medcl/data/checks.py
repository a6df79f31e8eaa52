"""Checks on a datalist's files before training, so bad input fails once, clearly, naming the file."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np

from medcl.errors import MedclInputError

__all__ = ["check_datalist", "CHECK_LEVELS"]

CHECK_LEVELS = ("off", "header", "full")

logger = logging.getLogger(__name__)


def _load_header(path: str, origin: str) -> nib.spatialimages.SpatialImage:
    if not os.path.isfile(path):
        raise MedclInputError(f"{path}: file not found (listed in {origin}). Fix the path there or restore the file.")
    try:
        return nib.load(path)
    except Exception as e:  # nibabel raises many types for unreadable headers
        raise MedclInputError(
            f"{path}: not a readable NIfTI file ({type(e).__name__}: {e}). Re-export it or remove it from {origin}."
        ) from e


def _read_data(img: nib.spatialimages.SpatialImage, path: str, origin: str) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except Exception as e:  # truncated/corrupt gzip: EOFError, zlib.error, OSError, ValueError
        raise MedclInputError(
            f"{path}: the NIfTI data is corrupt or truncated ({type(e).__name__}: {e}). "
            f"Re-export or re-download it, or remove the case from {origin}."
        ) from e


def _stored_size_ok(img: nib.spatialimages.SpatialImage, path: str) -> bool:
    """Cheap test that a NIfTI file holds all the voxel data its header announces, without decompressing it.

    ``.nii``: the file size; ``.nii.gz``: the uncompressed size a gzip stream records in its last 4 bytes (modulo
    2**32), against ``vox_offset`` + the data size. False means "suspicious" (truncated, corrupt, or a gzip file
    of several members): the caller then reads the data to decide. Other formats: True.
    """
    offset = getattr(img.dataobj, "offset", None)  # where the voxel data starts (the header's vox_offset)
    if not isinstance(img, nib.Nifti1Image) or offset is None:  # Nifti2Image included; not .hdr/.img pairs
        return True
    expected = int(offset) + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
    name = path.lower()
    try:
        if name.endswith(".nii"):
            return os.path.getsize(path) >= expected
        if name.endswith(".nii.gz"):
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                return int.from_bytes(f.read(4), "little") == expected % (1 << 32)
    except OSError:
        return False
    return True


def _label_values(data: np.ndarray) -> set:
    """Distinct values of a label map. Integer maps with a small range (the usual case): min, max, then one
    comparison per value in between, several times faster than ``np.unique``'s sort; other maps: ``np.unique``."""
    if data.size == 0:
        return set()
    if data.dtype.kind in "uib":
        lo, hi = int(data.min()), int(data.max())
        if hi - lo < 64:
            return {lo, hi} | {v for v in range(lo + 1, hi) if (data == v).any()}
    return {int(v) if float(v).is_integer() else v for v in np.unique(data).tolist()}


def _check_item(item: dict, keys: Sequence[str], level: str, origin: str, label_values: set[int] | None) -> set:
    """Check one item's files; return the values found in its label map (empty without one)."""
    images = {k: _load_header(item[k], origin) for k in keys if k in item}
    if "image" in images and "label" in images:
        img, lab = images["image"], images["label"]
        if tuple(img.shape[:3]) != tuple(lab.shape[:3]):
            raise MedclInputError(
                f"{item['label']}: label shape {tuple(lab.shape)} does not match image {item['image']} shape "
                f"{tuple(img.shape)}. Resample the label onto the image grid or fix the pair in {origin}."
            )
        if not np.allclose(img.affine, lab.affine, atol=1e-3):
            raise MedclInputError(
                f"{item['label']}: label affine differs from image {item['image']} affine "
                f"(image origin {img.affine[:3, 3].round(3).tolist()}, "
                f"label origin {lab.affine[:3, 3].round(3).tolist()}). "
                "Both must share one voxel grid: resample the label onto the image."
            )
    found: set = set()
    for key, img in images.items():
        # label maps are always read (they compress well, and their values matter); images at "full" or when suspicious
        if key != "label" and level != "full" and _stored_size_ok(img, item[key]):
            continue
        data = _read_data(img, item[key], origin)
        if key != "label":
            continue
        found = _label_values(data)
        unknown = sorted(found - label_values, key=float) if label_values is not None else []
        if unknown:
            raise MedclInputError(
                f"{item[key]}: label values {unknown} are not in dataset.json 'labels' {sorted(label_values)}. "
                "Fix the label map or add the classes to dataset.json."
            )
    return found


def check_datalist(
    datalist: Sequence[dict],
    keys: Sequence[str] = ("image", "label"),
    level: str = "header",
    origin: str = "the datalist",
    label_values: Sequence[int] | Mapping[int, str] | None = None,
    num_threads: int = 4,
    name: str = "datalist",
) -> list[dict]:
    """Check every file of a datalist and return the datalist unchanged.

    Args:
        datalist: items like ``{"image": path, "label": path}``.
        keys: which keys hold file paths to check (missing keys are skipped).
        level: ``"off"`` (only emptiness); ``"header"`` (files exist, headers load, image/label shape and
            affine agree, each NIfTI file is as long as its header needs, so a truncated file fails here (a
            suspicious one is decompressed to decide), and label maps are read: their values are checked against
            ``label_values``); ``"full"`` (also decompress every image, catching corruption inside the data).
        origin: where the list came from (e.g. the dataset.json path), quoted in errors.
        label_values: allowed label values (``dataset.json`` 'labels' keys, or the whole ``{value: name}`` map).
            A value that no label map of the list contains is logged as a warning (training goes on: the class
            is left out of the mean Dice and never sampled by the contrastive losses).
        num_threads: threads used to read files.
        name: what the list is (``"training"``, ``"validation"``), quoted in errors.

    Raises:
        MedclInputError: on the first problem found, naming the file and the fix.
    """
    if level not in CHECK_LEVELS:
        raise MedclInputError(f"check level must be one of {CHECK_LEVELS}, got {level!r}.")
    if len(datalist) == 0:
        raise MedclInputError(
            f"The {name} list from {origin} is empty: add cases to it or point --dataset_dir elsewhere."
        )
    if level == "off":
        return list(datalist)
    allowed = None if label_values is None else {int(v) for v in label_values}
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        # list() re-raises the first error in datalist order
        found = list(pool.map(lambda it: _check_item(it, keys, level, origin, allowed), datalist))
    if allowed is not None and "label" in keys and any("label" in it for it in datalist):
        absent = sorted(allowed - set().union(*found))
        if absent:
            names = label_values if isinstance(label_values, Mapping) else {}
            listed = ", ".join(f"{v} ({names[v]!r})" if v in names else str(v) for v in absent)
            logger.warning(
                "%s: dataset.json 'labels' class %s is in no label map of the %s list. Training goes on (the class "
                "is left out of the mean Dice and never sampled by the contrastive losses); remove it from 'labels' "
                "if the dataset has no such class, or check the label maps.",
                origin,
                listed,
                name,
            )
    return list(datalist)
