"""Whole-volume inference: batches of slices for 2D networks, sliding window for 3D ones."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.utils import convert_to_dst_type

from medcl.data.patches import as_patch_size

__all__ = ["SliceBatchInferer", "volume_inferer"]


class SliceBatchInferer(Inferer):
    """
    Runs a 2D network on every slice of a 3D volume, ``slice_batch_size`` slices per network call.

    The slices along ``spatial_dim`` become items of one 2D batch, ``(B, C, X, Y, Z) -> (B * Z, C, X, Y)`` for
    ``spatial_dim=2``; a 2D :class:`~monai.inferers.SlidingWindowInferer` with ``roi_size`` predicts them (windows of
    several slices share a network call, up to ``slice_batch_size``), and the result is stacked back along the same
    axis. Each slice gets exactly what :class:`monai.inferers.SliceInferer` gives it (same windows, overlap and
    blending); only the grouping of slices into network calls differs, so outputs agree to floating-point rounding.
    ``SliceInferer`` slides a 3D window of one slice, with a 3D importance map and aggregation per window; here the
    bookkeeping is 2D and the network sees larger batches.

    Args:
        roi_size: in-plane window, 2 ints.
        spatial_dim: axis of the volume's spatial dims ``(X, Y, Z)`` the slices are taken along (2: axial in RAS).
        slice_batch_size: slices (windows) per network call.
        overlap: in-plane window overlap.
        mode: blending of overlapping windows (``"gaussian"`` or ``"constant"``).

    Raises:
        ValueError: when ``roi_size`` is not 2D, ``spatial_dim`` not in 0..2 or ``slice_batch_size < 1``.
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        spatial_dim: int = 2,
        slice_batch_size: int = 8,
        overlap: float = 0.25,
        mode: str = "gaussian",
    ) -> None:
        super().__init__()
        if len(tuple(roi_size)) != 2:
            raise ValueError(f"roi_size must be 2D (in-plane), got {roi_size}.")
        if spatial_dim not in (0, 1, 2):
            raise ValueError(f"spatial_dim must be 0, 1 or 2, got {spatial_dim}.")
        if slice_batch_size < 1:
            raise ValueError(f"slice_batch_size must be >= 1, got {slice_batch_size}.")
        self.spatial_dim = int(spatial_dim)
        self.slice_batch_size = int(slice_batch_size)
        self.window = SlidingWindowInferer(
            roi_size=tuple(roi_size), sw_batch_size=self.slice_batch_size, overlap=overlap, mode=mode, progress=False
        )

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        Args:
            inputs: ``(B, C, X, Y, Z)`` volume (tensor or MetaTensor).
            network: 2D network, ``(N, C, H, W) -> (N, C_out, H, W)``.
            args, kwargs: passed to ``network``.

        Returns:
            ``(B, C_out, X, Y, Z)``, of ``inputs``' type (a MetaTensor keeps the input's metadata).

        Raises:
            ValueError: when ``inputs`` is not 5D.
        """
        if inputs.ndim != 5:
            raise ValueError(f"inputs must be (B, C, X, Y, Z), got shape {tuple(inputs.shape)}.")
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        axis = 2 + self.spatial_dim
        b, n = x.shape[0], x.shape[axis]
        slices = x.movedim(axis, 1).reshape(
            b * n, x.shape[1], *[s for i, s in enumerate(x.shape[2:]) if i != self.spatial_dim]
        )
        out = self.window(slices, network, *args, **kwargs)
        out = out.reshape(b, n, *out.shape[1:]).movedim(1, axis)
        return convert_to_dst_type(out, inputs, dtype=out.dtype)[0]


def volume_inferer(
    spatial_dims: int,
    patch_size: int | Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    slice_axis: int = 2,
    mode: str = "gaussian",
    slice_batch_size: int = 8,
) -> Inferer:
    """Inferer that predicts a whole 3D volume ``(B, C, X, Y, Z)`` with a 2D or 3D network.

    Args:
        spatial_dims: 2 runs the network on every slice along ``slice_axis``, ``slice_batch_size`` slices per call
            (:class:`SliceBatchInferer`, in-plane sliding window of ``patch_size``); 3 slides ``patch_size`` windows
            (:class:`monai.inferers.SlidingWindowInferer`, ``sw_batch_size`` windows per call).
        patch_size: the training patch size (int, or list; see :func:`medcl.data.as_patch_size`).
        sw_batch_size: 3D windows per network call.
        overlap: window overlap.
        slice_axis: spatial axis of the slices (2 = axial for RAS volumes).
        mode: blending of overlapping windows.
        slice_batch_size: 2D: slices per network call.
    """
    roi = as_patch_size(patch_size, spatial_dims)
    if int(spatial_dims) == 2:
        return SliceBatchInferer(
            roi_size=roi, spatial_dim=slice_axis, slice_batch_size=slice_batch_size, overlap=overlap, mode=mode
        )
    return SlidingWindowInferer(roi_size=roi, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, progress=False)
