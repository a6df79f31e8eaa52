"""Random 2D-slice or 3D-patch sampling that keeps each sample's normalised position along the slice axis."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, SpatialCrop, SqueezeDim
from monai.transforms.utils import correct_crop_centers, generate_pos_neg_label_crop_centers, map_binary_to_indices

from medcl.errors import MedclInputError

__all__ = ["as_patch_size", "volume_pad_size", "RandPatchWithPositiond"]


def as_patch_size(patch_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """Normalise a patch size to ``spatial_dims`` ints: an int means isotropic, a longer list is truncated.

    A 3-element list with ``spatial_dims=2`` keeps its first two (in-plane) values, so one config value can serve
    both modes.

    Raises:
        MedclInputError: when ``spatial_dims`` is not 2 or 3 or the patch has too few positive values.
    """
    if int(spatial_dims) not in (2, 3):
        raise MedclInputError(f"spatial_dims must be 2 (slice-wise) or 3 (volumetric), got {spatial_dims}.")
    sizes = [int(patch_size)] * int(spatial_dims) if np.isscalar(patch_size) else [int(p) for p in patch_size]
    if len(sizes) < spatial_dims or any(p < 1 for p in sizes[:spatial_dims]):
        raise MedclInputError(
            f"patch_size={patch_size} needs {spatial_dims} positive sizes for spatial_dims={spatial_dims}."
        )
    return tuple(sizes[: int(spatial_dims)])


def volume_pad_size(patch_size: int | Sequence[int], spatial_dims: int, slice_axis: int = 2) -> list[int]:
    """Smallest 3D volume size :class:`RandPatchWithPositiond` can sample from, for
    :class:`monai.transforms.SpatialPadd`.

    3D: the patch size. 2D: the in-plane patch size, and ``-1`` (keep) along ``slice_axis``.
    """
    size = list(as_patch_size(patch_size, spatial_dims))
    if int(spatial_dims) == 2:
        size.insert(slice_axis, -1)
    return size


class RandPatchWithPositiond(Randomizable, MapTransform):
    """Crop ``num_samples`` random patches from a 3D volume: 3D patches, or 2D slices (``spatial_dims=2``).

    Each sample carries ``position_key`` = (centre index + 1) / depth along ``slice_axis``, in (0, 1]: for a 2D
    slice this is the normalised slice position MACL's positional positives use; for a 3D patch the position of
    its centre. With a ``label_key``, centres are foreground with probability ``pos / (pos + neg)`` (as
    :class:`monai.transforms.RandCropByPosNegLabeld`); without labels (self-supervised data) they are uniform.

    Input items hold channel-first 3D arrays ``(C, X, Y, Z)`` at least ``patch_size`` large (pad before).
    Returns a list of ``num_samples`` dicts with ``(C, *patch_size)`` arrays (the dict itself when ``as_list`` is
    False and ``num_samples`` is 1: a second crop of other keys, e.g. MixCL's partner patch, can then follow a
    multi-sample crop in the same pipeline).

    Args:
        keys: keys of the arrays to crop (image, label, ...).
        patch_size: 3D patch size, or in-plane 2D size (the axes other than ``slice_axis``, in order).
        spatial_dims: 2 (slices) or 3 (patches).
        num_samples: samples per volume.
        label_key: label used to pick foreground centres; None or absent in an item means uniform centres.
        pos, neg: foreground/background centre ratio.
        slice_axis: spatial axis (0, 1, 2) along which slices are taken; 2 is axial for RAS-oriented volumes.
        position_key: key receiving the normalised position (float tensor).
        as_list: return a list even for one sample (default, as MONAI's multi-sample crops).
        allow_missing_keys: skip keys that an item lacks (e.g. ``label`` for unlabelled data).
    """

    def __init__(
        self,
        keys: KeysCollection,
        patch_size: int | Sequence[int],
        spatial_dims: int = 3,
        num_samples: int = 1,
        label_key: str | None = "label",
        pos: float = 1.0,
        neg: float = 1.0,
        slice_axis: int = 2,
        position_key: str = "position",
        as_list: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.as_list = as_list
        self.spatial_dims = int(spatial_dims)
        self.patch_size = as_patch_size(patch_size, self.spatial_dims)
        if slice_axis not in (0, 1, 2):
            raise MedclInputError(f"slice_axis must be 0, 1 or 2, got {slice_axis}.")
        self.slice_axis = slice_axis
        if self.spatial_dims == 2:
            roi = list(self.patch_size)
            roi.insert(slice_axis, 1)
            self.roi_size = tuple(roi)
        else:
            self.roi_size = self.patch_size
        if pos < 0 or neg < 0 or pos + neg == 0:
            raise MedclInputError(f"pos={pos}, neg={neg}: both must be >= 0 and not both 0.")
        self.pos_ratio = pos / (pos + neg)
        self.num_samples = int(num_samples)
        self.label_key = label_key
        self.position_key = position_key
        self.squeeze = SqueezeDim(dim=slice_axis + 1)

    def randomize(self, label: torch.Tensor | np.ndarray | None, shape: Sequence[int]) -> list[list[int]]:
        if label is not None:
            fg, bg = map_binary_to_indices(label)
            if len(fg) + len(bg) > 0:
                return [
                    list(c)
                    for c in generate_pos_neg_label_crop_centers(
                        self.roi_size, self.num_samples, self.pos_ratio, shape, fg, bg, self.R
                    )
                ]
        centres = []
        for _ in range(self.num_samples):
            centre = [int(self.R.randint(s)) for s in shape]
            centres.append([int(c) for c in correct_crop_centers(centre, self.roi_size, shape)])
        return centres

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict[Hashable, torch.Tensor]] | dict:
        d = dict(data)
        first = d[self.first_key(d)]
        shape = tuple(first.shape[1:])
        if len(shape) != 3:
            raise MedclInputError(
                f"RandPatchWithPositiond expects channel-first 3D volumes, got shape {tuple(first.shape)}."
            )
        if any(s < r for s, r in zip(shape, self.roi_size, strict=True)):
            name = getattr(first, "meta", {}).get("filename_or_obj", "a volume")
            raise MedclInputError(
                f"{name}: volume {shape} is smaller than the patch {self.roi_size}; pad it first (SpatialPadd) "
                "or choose a smaller --patch_size."
            )
        label = d.get(self.label_key) if self.label_key else None
        depth = shape[self.slice_axis]
        samples = []
        for centre in self.randomize(label, shape):
            crop = SpatialCrop(roi_center=centre, roi_size=self.roi_size)
            out = dict(d)
            for key in self.key_iterator(d):
                out[key] = crop(d[key])
                if self.spatial_dims == 2:
                    out[key] = self.squeeze(out[key])
            out[self.position_key] = torch.tensor((centre[self.slice_axis] + 1) / depth, dtype=torch.float32)
            samples.append(out)
        return samples if self.as_list or len(samples) != 1 else samples[0]
