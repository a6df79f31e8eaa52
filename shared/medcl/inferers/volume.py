"""Whole-volume inference: slice by slice for 2D networks, sliding window for 3D ones."""

from __future__ import annotations

from collections.abc import Sequence

from monai.inferers import SliceInferer, SlidingWindowInferer

from medcl.data.patches import as_patch_size

__all__ = ["volume_inferer"]


def volume_inferer(
    spatial_dims: int,
    patch_size: int | Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    slice_axis: int = 2,
    mode: str = "gaussian",
) -> SlidingWindowInferer:
    """Inferer that predicts a whole 3D volume ``(B, C, X, Y, Z)`` with a 2D or 3D network.

    Args:
        spatial_dims: 2 runs the network on every slice along ``slice_axis`` (:class:`monai.inferers.SliceInferer`,
            in-plane sliding window of ``patch_size``); 3 slides ``patch_size`` windows
            (:class:`monai.inferers.SlidingWindowInferer`).
        patch_size: the training patch size (int, or list; see :func:`medcl.data.as_patch_size`).
        sw_batch_size: windows per network call.
        overlap: window overlap.
        slice_axis: spatial axis of the slices (2 = axial for RAS volumes).
        mode: blending of overlapping windows.
    """
    roi = as_patch_size(patch_size, spatial_dims)
    if int(spatial_dims) == 2:
        return SliceInferer(
            spatial_dim=slice_axis,
            roi_size=roi,
            sw_batch_size=sw_batch_size,
            overlap=overlap,
            mode=mode,
            progress=False,
        )
    return SlidingWindowInferer(roi_size=roi, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, progress=False)
