"""Checks on a datalist's files before training, so bad input fails once, clearly, naming the file."""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
from monai.transforms import MapTransform

from medcl.errors import MedclInputError

__all__ = ["check_datalist", "CheckFilesd", "CHECK_LEVELS", "DEFERRED_SAMPLE"]

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


def _declared_bytes(img: nib.spatialimages.SpatialImage) -> tuple[int, int] | None:
    """``(vox_offset, voxel data bytes)`` the header of a single-file NIfTI announces; None for other formats."""
    offset = getattr(img.dataobj, "offset", None)  # where the voxel data starts (the header's vox_offset)
    if not isinstance(img, nib.Nifti1Image) or offset is None:  # Nifti2Image included; not .hdr/.img pairs
        return None
    return int(offset), int(np.prod(img.shape)) * img.get_data_dtype().itemsize


def _stored_size_ok(img: nib.spatialimages.SpatialImage, path: str) -> bool:
    """Cheap test that a NIfTI file holds all the voxel data its header announces, without decompressing it.

    ``.nii``: the file size; ``.nii.gz``: the uncompressed size a gzip stream records in its last 4 bytes (modulo
    2**32), against ``vox_offset`` + the data size. False means "suspicious" (truncated, corrupt, or a gzip file
    of several members): the caller then measures the stored length (:func:`_stored_length`). Other formats: True.
    """
    declared = _declared_bytes(img)
    if declared is None:
        return True
    expected = sum(declared)
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


def _stored_length(path: str, limit: int, chunk: int = 1 << 20) -> int:
    """Bytes of NIfTI data (header included) stored in ``path``, counted up to ``limit`` in ``chunk``-sized reads.

    ``.nii``: the file size; ``.nii.gz``: the decompressed length of every gzip member, streamed (memory stays at
    ``chunk``, whatever the header declares). A corrupt stream counts as what decompressed before the damage.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        limit: stop counting once this many bytes are found (the header's ``vox_offset`` + data size).
        chunk: read size in bytes.

    Returns:
        ``min(stored, limit)`` for ``.nii.gz``; the file size for anything else.
    """
    if not path.lower().endswith(".gz"):
        return os.path.getsize(path)
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while total < limit:
                block = f.read(min(chunk, limit - total))
                if not block:
                    break
                total += len(block)
    except (OSError, EOFError, zlib.error):
        pass
    return total


def _check_stored_size(img: nib.spatialimages.SpatialImage, path: str, origin: str) -> None:
    """Refuse a file shorter than its header declares before reading it: a header announcing 2 GB of voxels in a
    small file would otherwise make nibabel allocate the 2 GB first.

    Raises:
        MedclInputError: naming the declared shape, dtype and size, and how much the file holds.
    """
    declared = _declared_bytes(img)
    if declared is None or _stored_size_ok(img, path):
        return
    offset, nbytes = declared
    stored = _stored_length(path, offset + nbytes)
    held = _size(max(stored - offset, 0))
    if stored < offset + nbytes:
        raise MedclInputError(
            f"{path}: the NIfTI data is corrupt or truncated: the header declares shape {tuple(img.shape)} of "
            f"{img.get_data_dtype()} ({_size(nbytes)} of voxel data) but the file holds {held}. "
            f"Re-export or re-download it, or remove the case from {origin}."
        )


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _check_geometry(img: nib.spatialimages.SpatialImage, path: str, origin: str, in_channels: int = 1) -> None:
    """Refuse what the 3D one-channel pipelines cannot use, from the header alone (no voxel data read).

    Refused: RGB/RGBA voxels (a structured NIfTI datatype); more than one volume in a file (4D time series or
    channels, 5D vector images; a 4D file of shape ``(X, Y, Z, 1)`` is one volume and passes); a volume with a
    spatial axis of 1 voxel (a single slice, or a 2D image); an affine with a zero, infinite or NaN voxel size; a
    zero voxel size in ``pixdim`` when no sform gives the affine (nibabel would silently read it as 1 mm). A negative
    ``pixdim`` passes: NIfTI readers use its absolute value, the axis direction being the qform's; a negative
    column of the affine is an axis flip, undone by ``Orientationd``.

    With ``in_channels`` C > 1 (an image key of a multi-channel dataset, MSD style: the channels along a 4th
    axis, e.g. BraTS), exactly a 4D ``(X, Y, Z, C)`` image is accepted; one volume or another channel count is
    refused.

    Raises:
        MedclInputError: naming the file, what is wrong and the fix.
    """
    shape, dtype = tuple(img.shape), img.get_data_dtype()
    if dtype.fields is not None:
        raise MedclInputError(
            f"{path}: RGB colour voxels (NIfTI datatype {'RGBA32' if len(dtype.fields) == 4 else 'RGB24'}), but the "
            "bundles take one grey-value channel. Convert it to grey values (e.g. the mean of R, G and B) and save "
            f"it as a 3D volume, or remove the case from {origin}."
        )
    if in_channels > 1:
        channels = shape[3] if len(shape) == 4 else 1 if len(shape) == 3 else int(np.prod(shape[3:]))
        if len(shape) > 4 or channels != in_channels:
            raise MedclInputError(
                f"{path}: an image of shape {shape} ({channels} channel{'s' if channels != 1 else ''}), but "
                f"in_channels is {in_channels}: a {in_channels}-channel image is a 4D file of shape (X, Y, Z, "
                f"{in_channels}) (MSD layout, the channels along the 4th axis). Set --in_channels {channels} when "
                f"every image has {channels}, or re-save this case with its {in_channels} channels "
                f"(e.g. nibabel: numpy.stack([...], axis=-1)), or remove it from {origin}."
            )
    elif len(shape) > 4 or (len(shape) == 4 and shape[3] > 1):
        n = int(np.prod(shape[3:]))
        raise MedclInputError(
            f"{path}: a {len(shape)}D image of shape {shape} ({n} volumes: time points or channels), but the "
            "bundles take one 3D grey-value volume per case (in_channels 1). Save the volume you want as its own "
            f"file (e.g. nibabel: img.slicer[..., 0]; FSL: fslroi <file> <out> 0 1) and list that file in {origin}; "
            f"or, for {n} channels of one case, set --in_channels {n} (bundles that have the key)."
        )
    if len(shape) < 3 or min(shape[:3]) < 2:
        thin = [i for i, n in enumerate(shape[:3]) if n < 2] or [len(shape)]
        raise MedclInputError(
            f"{path}: the volume is {shape[thin[0]] if len(shape) > thin[0] else 1} voxel thick along axis "
            f"{thin[0]} (shape {shape}): a single slice, not a 3D volume; the bundles need 3D volumes (resampling, "
            f"3D patches and slices along every axis). Export the whole series, or remove the case from {origin}."
        )
    sizes = np.linalg.norm(np.asarray(img.affine, dtype=np.float64)[:3, :3], axis=0)
    bad = [i for i, v in enumerate(sizes) if not np.isfinite(v) or v < 1e-6]
    header = img.header
    if not bad and isinstance(header, nib.Nifti1Header) and int(header["sform_code"]) == 0:
        pixdim = _raw_pixdim(header, path)
        bad = [i for i, v in enumerate(pixdim) if not np.isfinite(v) or v == 0]
        sizes = pixdim
    if bad:
        shown = [round(float(v), 4) for v in sizes]
        raise MedclInputError(
            f"{path}: voxel size {shown} mm has a zero or non-finite spacing along axis {bad[0]}: the voxel grid is "
            "undefined (resampling to pixdim would be wrong or fail). Write the true spacing into the header (the "
            f"sform/qform affine and pixdim), e.g. re-convert the DICOM series, or remove the case from {origin}."
        )


def _raw_pixdim(header: nib.Nifti1Header, path: str) -> np.ndarray:
    """``pixdim[1:4]`` as stored in ``path``'s header: nibabel's loaded header has replaced a zero by 1 already.

    Args:
        header: the header nibabel loaded (its class reads the raw one).
        path: the NIfTI file.

    Returns:
        The three stored voxel sizes, float64; the loaded header's when the file cannot be re-read.
    """
    try:
        with nib.openers.ImageOpener(path) as f:
            raw = type(header).from_fileobj(f, check=False)
        return np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    except Exception:  # the header loaded once already; keep its (fixed) values
        return np.asarray(header["pixdim"][1:4], dtype=np.float64)


def _check_values(data: np.ndarray, key: str, path: str, origin: str) -> None:
    """Check the voxel values of an image (``key != "label"``) once read: shape of ``data`` any.

    Raises:
        MedclInputError: NaN or infinite voxels (they turn the intensity scaling, the losses and the weights into
            NaN), with their count.
    """
    if data.dtype.kind not in "fc":
        return
    finite = np.isfinite(data)
    if finite.all():
        return
    n_nan = int(np.isnan(data).sum())
    n_inf = int(finite.size - finite.sum()) - n_nan
    raise MedclInputError(
        f"{path}: {n_nan} NaN and {n_inf} infinite voxels (of {data.size}); one would make the intensity scaling, "
        "the losses and then the weights NaN. Replace them (e.g. numpy.nan_to_num with the background value) and "
        f"re-save the file, or remove the case from {origin}."
    )


def _warn_if_constant(data: np.ndarray, path: str, origin: str) -> None:
    """Log a warning for an image whose voxels all have one value (numerically harmless, but usually a failed
    export or an anonymisation that blanked the volume)."""
    if data.size and data.min() == data.max():
        logger.warning(
            "%s: every voxel of the image is %s (a constant image, listed in %s): it carries no information, and is "
            "usually a failed export or a blanked volume. The run goes on (it is scaled to one value, no NaN); "
            "re-export it or remove the case.",
            path,
            data.flat[0].item(),
            origin,
        )


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


def _check_item(
    item: dict, keys: Sequence[str], level: str, origin: str, label_values: set[int] | None, in_channels: int = 1
) -> set:
    """Check one item's files; return the values found in its label map (empty without one)."""
    images = {k: _load_header(item[k], origin) for k in keys if k in item}
    for key, img in images.items():
        _check_geometry(img, item[key], origin, in_channels if key != "label" else 1)
        _check_stored_size(img, item[key], origin)  # before the pair check: a 2 GB header is this file's fault
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
        # label maps are always read (they compress well, and their values matter); images at "full", when stored
        # as floating point (NaN and inf are possible only there) or when their stored length looked suspicious
        if key != "label" and level != "full" and img.get_data_dtype().kind != "f" and _stored_size_ok(img, item[key]):
            continue
        data = _read_data(img, item[key], origin)
        if key != "label":
            _check_values(data, key, item[key], origin)
            _warn_if_constant(data, item[key], origin)
            continue
        found = _label_values(data)
        fractional = sorted((v for v in found if not isinstance(v, int)), key=float)
        if fractional:
            shown = ", ".join(f"{float(v):g}" for v in fractional[:4]) + (", …" if len(fractional) > 4 else "")
            raise MedclInputError(
                f"{item[key]}: the label map holds {len(fractional)} non-integer values ({shown}; stored as "
                f"{img.get_data_dtype()}), but a label map holds class indices 0, 1, 2, … (values like these come "
                "from resampling with linear interpolation, or from saving probabilities). Re-make it with "
                "nearest-neighbour interpolation (or round it, numpy.rint) and save it as integers, or remove the "
                f"case from {origin}."
            )
        unknown = sorted(found - label_values, key=float) if label_values is not None else []
        if unknown:
            raise MedclInputError(
                f"{item[key]}: label values {unknown} are not in dataset.json 'labels' {sorted(label_values)}. "
                "Fix the label map or add the classes to dataset.json."
            )
    return found


#: Files this process has checked (absolute paths): :class:`CheckFilesd` skips them. Loader workers forked later
#: inherit it; spawned ones start empty and check again (harmless).
_CHECKED: set[str] = set()

#: Items of a deferred list checked before training (the first ones): a systematic problem (wrong channel count,
#: wrong labels) still fails at once.
DEFERRED_SAMPLE = 8


def _check_and_record(item: dict, keys: Sequence[str], level: str, origin: str, allowed, in_channels: int) -> set:
    found = _check_item(item, keys, level, origin, allowed, in_channels)
    _CHECKED.update(os.path.abspath(item[k]) for k in keys if k in item)
    return found


def check_datalist(
    datalist: Sequence[dict],
    keys: Sequence[str] = ("image", "label"),
    level: str = "header",
    origin: str = "the datalist",
    label_values: Sequence[int] | Mapping[int, str] | None = None,
    num_threads: int = 4,
    name: str = "datalist",
    in_channels: int = 1,
    defer_above: int | None = None,
) -> list[dict]:
    """Check every file of a datalist and return the datalist unchanged.

    A list longer than ``defer_above`` (a pool of thousands of volumes, whose headers alone take seconds to read)
    is checked in part before training: every file must exist, and the first :data:`DEFERRED_SAMPLE` items get the
    full check; the others are checked by :class:`CheckFilesd` in the data pipeline when the pool first loads them
    (once per item with MONAI's Persistent/CacheDataset), with the same messages. Such a run stops at the first bad
    file it meets, after its checkpoints are saved (fix the file, then ``--resume true``).

    Args:
        datalist: items like ``{"image": path, "label": path}``.
        keys: which keys hold file paths to check (missing keys are skipped).
        level: ``"off"`` (only emptiness); ``"header"`` (files exist, headers load, each file is one 3D
            grey-value volume at least 2 voxels thick with a finite, non-zero voxel size (no RGB, no 4D series;
            see :func:`_check_geometry`), image/label shape and affine agree, each NIfTI file is as long as its
            header needs, so a truncated file fails here without allocating what its header declares (a
            suspicious one is decompressed to decide), label maps are read: their values must be integers in
            ``label_values``; images stored as floating point are read: no NaN or infinite voxel); ``"full"``
            (also decompress every image, catching corruption inside the data). An image read whose voxels are
            all one value is logged as a warning (the run goes on).
        origin: where the list came from (e.g. the dataset.json path), quoted in errors.
        label_values: allowed label values (``dataset.json`` 'labels' keys, or the whole ``{value: name}`` map).
            A value that no label map of the list contains is logged as a warning (training goes on: the class
            is left out of the mean Dice and never sampled by the contrastive losses).
        num_threads: threads used to read files.
        name: what the list is (``"training"``, ``"validation"``), quoted in errors.
        in_channels: channels per image (see :func:`_check_geometry`).
        defer_above: check lists longer than this in part now and the rest at load time (see above); None: all now.
        in_channels: channels per image (not label): 1, a 3D volume; C > 1, a 4D ``(X, Y, Z, C)`` file each.

    Raises:
        MedclInputError: on the first problem found, naming the file, what is wrong and the fix.
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
    now = datalist
    if defer_above is not None and len(datalist) > defer_above:
        for item in datalist:
            for k in keys:
                if k in item and not os.path.isfile(item[k]):
                    raise MedclInputError(
                        f"{item[k]}: file not found (listed in {origin}). Fix the path there or restore the file."
                    )
        now = datalist[:DEFERRED_SAMPLE]
        logger.info(
            "%s list: %d cases, more than %d: the files of the first %d checked now, every other one when the "
            "pool first loads it (check level %r).",
            name,
            len(datalist),
            defer_above,
            len(now),
            level,
        )
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        # list() re-raises the first error in datalist order
        found = list(pool.map(lambda it: _check_and_record(it, keys, level, origin, allowed, in_channels), now))
    if now is not datalist:
        return list(datalist)  # which classes occur is known only once every label map is read
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


class CheckFilesd(MapTransform):
    """The input check of :func:`check_datalist` as the first transform of a pipeline, for the items a deferred
    check left for load time; files this process already checked pass untouched.

    Args:
        keys: keys holding file paths (missing keys are skipped).
        level: check level, as :func:`check_datalist` (``"off"``: nothing).
        origin: where the items came from (the dataset.json path), quoted in errors.
        label_values: allowed label values (``dataset.json`` 'labels').
        in_channels: channels per image.

    Raises:
        MedclInputError: the item's first problem, naming the file, what is wrong and the fix.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("image", "label"),
        level: str = "header",
        origin: str = "the datalist",
        label_values: Sequence[int] | Mapping[int, str] | None = None,
        in_channels: int = 1,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if level not in CHECK_LEVELS:
            raise MedclInputError(f"check level must be one of {CHECK_LEVELS}, got {level!r}.")
        self.level, self.origin, self.in_channels = level, origin, in_channels
        self.allowed = None if label_values is None else {int(v) for v in label_values}

    def __call__(self, data: Mapping) -> Mapping:
        if self.level == "off":
            return data
        keys = [k for k in self.keys if k in data and isinstance(data[k], str)]
        if keys and not all(os.path.abspath(data[k]) in _CHECKED for k in keys):
            _check_and_record(dict(data), keys, self.level, self.origin, self.allowed, self.in_channels)
        return data
