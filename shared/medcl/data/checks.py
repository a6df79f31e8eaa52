"""Checks on a datalist's files before training, so bad input fails once, clearly, naming the file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np

from medcl.errors import MedclInputError

__all__ = ["check_datalist", "CHECK_LEVELS"]

CHECK_LEVELS = ("off", "header", "full")


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


def _check_item(item: dict, keys: Sequence[str], level: str, origin: str, label_values: set[int] | None) -> None:
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
                f"(image origin {img.affine[:3, 3].round(3).tolist()}, label origin {lab.affine[:3, 3].round(3).tolist()}). "
                "Both must share one voxel grid: resample the label onto the image."
            )
    if level != "full":
        return
    for key, img in images.items():
        data = _read_data(img, item[key], origin)
        if key == "label" and label_values is not None:
            found = set(np.unique(data).astype(int).tolist())
            unknown = sorted(found - label_values)
            if unknown:
                raise MedclInputError(
                    f"{item[key]}: label values {unknown} are not in dataset.json 'labels' {sorted(label_values)}. "
                    "Fix the label map or add the classes to dataset.json."
                )


def check_datalist(
    datalist: Sequence[dict],
    keys: Sequence[str] = ("image", "label"),
    level: str = "header",
    origin: str = "the datalist",
    label_values: Sequence[int] | None = None,
    num_threads: int = 4,
    name: str = "datalist",
) -> list[dict]:
    """Check every file of a datalist and return the datalist unchanged.

    Args:
        datalist: items like ``{"image": path, "label": path}``.
        keys: which keys hold file paths to check (missing keys are skipped).
        level: ``"off"`` (only emptiness), ``"header"`` (files exist, headers load, image/label shape and
            affine agree) or ``"full"`` (also decompress every file, catching corrupt/truncated data, and check
            label values against ``label_values``).
        origin: where the list came from (e.g. the dataset.json path), quoted in errors.
        label_values: allowed label values (``dataset.json`` 'labels' keys), checked at level ``"full"``.
        num_threads: threads used to read files.
        name: what the list is (``"training"``, ``"validation"``), quoted in errors.

    Raises:
        MedclInputError: on the first problem found, naming the file and the fix.
    """
    if level not in CHECK_LEVELS:
        raise MedclInputError(f"check level must be one of {CHECK_LEVELS}, got {level!r}.")
    if len(datalist) == 0:
        raise MedclInputError(f"The {name} list from {origin} is empty: add cases to it or point --dataset_dir elsewhere.")
    if level == "off":
        return list(datalist)
    allowed = None if label_values is None else {int(v) for v in label_values}
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        # list() re-raises the first error in datalist order
        list(pool.map(lambda it: _check_item(it, keys, level, origin, allowed), datalist))
    return list(datalist)
