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
Views for contrastive pre-training, made from one sampled 2D slice or 3D patch.

MACL (public code: ``dataset/chd.py``, ``prepare_contrast_JCL``) makes four views of every sampled slice, all
sharing the slice's normalised position ``(slice index + 1) / depth``:

- ``I1``, ``I2``: two independent *intensity* augmentations of the slice (torchvision ``ColorJitter(brightness=
  (0, 1))``, ``ColorJitter(contrast=(0.8, 1.2))``, ``GaussianBlur(kernel_size=3, sigma=(1, 3))``, then min-max
  rescaling to [0, 1]). They stay pixel-aligned, so they feed the pixel-level term L_d and the feature-level term
  L_ER.
- ``V1 = spatial(I1)``, ``V2 = spatial(I2)``: two independent *spatial* augmentations of those (batchgenerators
  ``MirrorTransform((0, 1))`` then, with probability 0.67, ``SpatialTransform`` with elastic deformation (alpha
  100-350, sigma 14-17), rotation in [0, 2 pi) and isotropic scaling 0.7-1.3; otherwise an identity crop). They feed
  the image-level term L_g.

The paper (§IV.B, implementation details) uses other views: "non-spatial augmentation is identity mapping, and
spatial augmentations are translation, rotation and scale", i.e. ``I1 = I2 =`` the slice and ``V1``, ``V2`` its
independent rigid-plus-scale transforms (the authors found the original images better than intensity-augmented ones
for the pixel-level term). The MACL bundle offers both chains (``views: paper | code``, chosen with
:func:`select_views`).

In a bundle these are plain MONAI dictionary transforms composed in the config (``CopyItemsd`` then ``Rand*d`` on
each key, so every view gets its own random draw). The only piece written here is :class:`RandElasticd`: MONAI's
elastic transforms are dimension-specific and parametrised differently in 2D (control-point spacing) and 3D
(Gaussian sigma), whereas MACL's parametrisation (uniform noise smoothed by a Gaussian of ``sigma`` pixels, times
``magnitude``, as batchgenerators and :class:`monai.transforms.Rand3DElastic` do) serves both. Its
``reference_size`` expresses the public code's elastic parameters relative to the code's 512² slices, so that a
64² patch gets the same warp relative to its size instead of a 512²-sized one.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.networks.layers import GaussianFilter
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import MapTransform, RandomizableTransform, Resample
from monai.transforms.utils import create_grid, create_rotate, create_scale
from monai.utils import ensure_tuple_rep

from medcl.errors import MedclInputError

__all__ = ["VIEW_KEYS", "VIEW_SETTINGS", "RandElasticd", "select_views", "smoothing_gain"]

#: Default keys of MACL's four views: intensity pair (I1, I2), spatial pair (V1, V2).
VIEW_KEYS = ("view_i1", "view_i2", "view_v1", "view_v2")

#: MACL's view chains: ``"paper"`` (§IV.B: I = identity, V = translation / rotation / scale) and ``"code"`` (the
#: public ``prepare_contrast_JCL``: intensity jitter, then flips + elastic / rotation / scale).
VIEW_SETTINGS = ("paper", "code")


def select_views(views: str, chains: Mapping[str, Sequence]) -> list:
    """
    The transform chain named ``views`` (one of :data:`VIEW_SETTINGS`) from ``chains``.

    Args:
        views: ``"paper"`` or ``"code"``.
        chains: ``{name: list of transforms}`` with an entry per name of :data:`VIEW_SETTINGS`.

    Raises:
        MedclInputError: for a ``views`` outside :data:`VIEW_SETTINGS` (the message names the allowed values), or a
            ``chains`` without that entry.
    """
    if views not in VIEW_SETTINGS:
        raise MedclInputError(f"views must be one of {list(VIEW_SETTINGS)}, got {views!r}.")
    if views not in chains:
        raise MedclInputError(f"no transform chain for views={views!r} (have {sorted(chains)}).")
    return list(chains[views])


def smoothing_gain(sigma: float, spatial_dims: int, truncated: float = 3.0) -> float:
    """
    ``||k||_2`` of the ``spatial_dims``-D (separable) Gaussian kernel of :class:`RandElasticd`: white noise of
    standard deviation ``x`` smoothed by it has, away from the borders, a standard deviation of ``x * gain``.
    """
    k = gaussian_1d(torch.tensor(float(sigma)), truncated=truncated, approx="erf").double()
    return float(torch.sqrt((k * k).sum()) ** spatial_dims)


def _as_range(value: float | Sequence[float] | None, name: str, symmetric: bool = False) -> tuple[float, float] | None:
    """``(low, high)`` from a pair, or from one number ``x`` as ``(-x, x)`` (symmetric) / ``(x, x)``."""
    if value is None:
        return None
    if np.isscalar(value):
        x = float(value)  # type: ignore[arg-type]
        return (-abs(x), abs(x)) if symmetric else (x, x)
    low, high = (float(v) for v in value)  # type: ignore[union-attr]
    if low > high:
        raise MedclInputError(f"{name} must be (low, high) with low <= high, got {value}.")
    return low, high


class RandElasticd(RandomizableTransform, MapTransform):
    """
    Random elastic deformation, rotation and isotropic scaling of 2D or 3D channel-first arrays (MACL's spatial
    view augmentation, as batchgenerators' ``SpatialTransform``), with one random draw shared by all ``keys``.

    With probability ``prob`` the sampling grid is, for output location ``x`` (pixel units, origin at the centre)::

        g(x) = s * R(theta) * (x + magnitude * G_sigma * u(x)),   u ~ U(-1, 1)^D per pixel

    where ``G_sigma * u`` is ``u`` smoothed by a Gaussian of ``sigma`` pixels, ``R(theta)`` a rotation in the image
    plane (2D) or about ``rotate_axis`` (3D; the slice axis, so a patch's position along it is unchanged) and ``s`` an
    isotropic scale (``s > 1`` zooms out). Each input is resampled on ``g`` (``padding_mode`` outside). Otherwise the
    data pass through unchanged. The output has the input's spatial size.

    (``t``, a translation of ``translate_range`` times the size, is added after ``s * R``.)

    Sizes relative to the image (``reference_size``): the public code's values (sigma 14-17, magnitude 100-350) are
    pixels of its 512² CHD slices (192² BraTS). With ``reference_size=512`` they are read as such and converted for
    an input of in-plane size ``P`` (mean of the spatial sizes, leaving out ``rotate_axis`` in 3D), ``f = P / 512``::

        sigma_px = f * sigma,   magnitude_px = f * magnitude * gain_2(sigma) / gain_D(sigma_px)

    with ``gain_D`` the L2 norm of the D-dimensional smoothing kernel (:func:`smoothing_gain`). The warp's
    correlation length and the displacement's standard deviation (``0.577 * magnitude * gain``) are then the same
    fraction of the image as in the code at 512² in 2D, whatever ``P`` and ``spatial_dims``. Without
    ``reference_size`` the values are pixels of the input, as batchgenerators reads them.

    Notes:
        - in pixels of the input (no ``reference_size``) the displacement's standard deviation is about
          ``magnitude * 0.16 / sigma`` pixels in 2D and ``magnitude * 0.087 / sigma**1.5`` in 3D: the public 2D values
          give ~2.5 px (0.5 % of 512, but 4 % of a 64² patch) in 2D and ~0.3 px in 3D;
        - the smoothing costs ~0.5 s per 64^3 view on 2 CPU threads at sigma 16 (a 3 * sigma separable filter);
          2D is ~100x cheaper;
        - a multi-key call (e.g. image and label) applies the same warp to every key; give ``mode`` per key
          (``"nearest"`` for labels).

    Args:
        keys: keys of the arrays to deform (``(C, H, W)`` or ``(C, H, W, D)``).
        spatial_dims: 2 or 3.
        prob: probability of deforming. Defaults to 0.67 (the public code's ``RndTransform`` probability).
        sigma_range: range of the Gaussian sigma (pixels) smoothing the displacement noise. Defaults to (14, 17).
        magnitude_range: range of the displacement magnitude (pixels); None disables the elastic part.
            Defaults to (100, 350).
        rotate_range: rotation angle range in radians, ``(low, high)`` or ``x`` for ``(-x, x)``; None: no rotation.
            Defaults to pi (any angle, as the public code's ``(0, 2 pi)``).
        rotate_axis: 3D only: the axis (0, 1, 2) the rotation turns about. Defaults to 2 (axial slices).
        scale_range: range of the isotropic scale factor; None: no scaling. Defaults to (0.7, 1.3).
        translate_range: range of the translation as a fraction of the size along each in-plane axis (not along
            ``rotate_axis`` in 3D), ``(low, high)`` or ``x`` for ``(-x, x)``; None (default): no translation (the
            public code centres its patch).
        reference_size: image size (pixels) that ``sigma_range`` / ``magnitude_range`` refer to, e.g. 512 for the
            public code's values; None (default): they are pixels of the input.
        mode: interpolation, ``"bilinear"`` or ``"nearest"`` (one, or one per key). Defaults to ``"bilinear"``.
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"`` (one, or one per key). Defaults to
            ``"zeros"`` (the public code pads with 0).
        allow_missing_keys: skip keys that an item lacks.

    Raises:
        MedclInputError: for ``spatial_dims`` other than 2/3, a bad range, a non-positive ``reference_size``, or an
            input whose number of spatial dimensions differs from ``spatial_dims``.
    """

    backend = Resample.backend

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int,
        prob: float = 0.67,
        sigma_range: Sequence[float] = (14.0, 17.0),
        magnitude_range: Sequence[float] | None = (100.0, 350.0),
        rotate_range: float | Sequence[float] | None = math.pi,
        rotate_axis: int = 2,
        scale_range: Sequence[float] | None = (0.7, 1.3),
        translate_range: float | Sequence[float] | None = None,
        reference_size: float | None = None,
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "zeros",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if int(spatial_dims) not in (2, 3):
            raise MedclInputError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if rotate_axis not in (0, 1, 2):
            raise MedclInputError(f"rotate_axis must be 0, 1 or 2, got {rotate_axis}.")
        self.spatial_dims = int(spatial_dims)
        self.sigma_range = _as_range(sigma_range, "sigma_range")
        self.magnitude_range = _as_range(magnitude_range, "magnitude_range")
        if self.magnitude_range is not None and (self.sigma_range is None or self.sigma_range[0] <= 0):
            raise MedclInputError(f"sigma_range must be positive for an elastic deformation, got {sigma_range}.")
        self.rotate_range = _as_range(rotate_range, "rotate_range", symmetric=True)
        self.rotate_axis = rotate_axis
        self.scale_range = _as_range(scale_range, "scale_range")
        if self.scale_range is not None and self.scale_range[0] <= 0:
            raise MedclInputError(f"scale_range must be positive, got {scale_range}.")
        self.translate_range = _as_range(translate_range, "translate_range", symmetric=True)
        if reference_size is not None and float(reference_size) <= 0:
            raise MedclInputError(f"reference_size must be positive or None, got {reference_size}.")
        self.reference_size = None if reference_size is None else float(reference_size)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))
        self.resampler = Resample(dtype=torch.float32)
        self._noise: np.ndarray | None = None
        self._sigma = self._magnitude = self._angle = 0.0
        self._scale = 1.0
        self._shift = np.zeros(3)

    def in_plane_size(self, spatial_size: Sequence[int]) -> float:
        """The size ``P`` that ``reference_size`` is compared with: mean of the in-plane spatial sizes."""
        sizes = [s for a, s in enumerate(spatial_size) if len(spatial_size) == 2 or a != self.rotate_axis]
        return float(np.mean(sizes))

    def pixel_parameters(self, spatial_size: Sequence[int], sigma: float, magnitude: float) -> tuple[float, float]:
        """``(sigma, magnitude)`` in pixels of an input of ``spatial_size`` (see ``reference_size``)."""
        if self.reference_size is None:
            return sigma, magnitude
        f = self.in_plane_size(spatial_size) / self.reference_size
        sigma_px = sigma * f
        nd = len(spatial_size)
        return sigma_px, magnitude * f * smoothing_gain(sigma, 2) / smoothing_gain(sigma_px, nd)

    def randomize(self, spatial_size: Sequence[int]) -> None:  # type: ignore[override]
        """Draw whether to deform and, if so, sigma, magnitude, the displacement noise, the angle, scale and shift."""
        super().randomize(None)
        if not self._do_transform:
            return
        self._noise = None
        if self.magnitude_range is not None and self.sigma_range is not None:
            self._sigma = float(self.R.uniform(*self.sigma_range))
            self._magnitude = float(self.R.uniform(*self.magnitude_range))
            self._noise = self.R.uniform(-1.0, 1.0, (len(spatial_size), *spatial_size)).astype(np.float32)
        self._angle = float(self.R.uniform(*self.rotate_range)) if self.rotate_range is not None else 0.0
        self._scale = float(self.R.uniform(*self.scale_range)) if self.scale_range is not None else 1.0
        self._shift = np.zeros(len(spatial_size))
        if self.translate_range is not None:
            for a in range(len(spatial_size)):
                if len(spatial_size) == 2 or a != self.rotate_axis:
                    self._shift[a] = self.R.uniform(*self.translate_range) * spatial_size[a]

    def sampling_grid(self, spatial_size: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
        """
        The homogeneous sampling grid ``(D + 1, *spatial_size)`` (pixel units, centred) of the last draw; call after
        :meth:`randomize` with ``_do_transform`` True.
        """
        nd = len(spatial_size)
        grid = create_grid(spatial_size, device=device, backend="torch", dtype=torch.float32)
        if self._noise is not None:
            sigma, magnitude = self.pixel_parameters(spatial_size, self._sigma, self._magnitude)
            noise = torch.as_tensor(self._noise, device=device).unsqueeze(0)
            smooth = GaussianFilter(nd, sigma, truncated=3.0).to(device)
            grid[:nd] += smooth(noise)[0] * magnitude
        radians = self._angle if nd == 2 else [self._angle if a == self.rotate_axis else 0.0 for a in range(3)]
        affine = create_rotate(nd, radians, device=device, backend="torch") @ create_scale(
            nd, [self._scale] * nd, device=device, backend="torch"
        )
        affine[:nd, nd] = torch.as_tensor(self._shift[:nd], dtype=affine.dtype, device=affine.device)
        return (affine.to(grid) @ grid.reshape(nd + 1, -1)).reshape(grid.shape)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        spatial = tuple(d[first].shape[1:])
        if len(spatial) != self.spatial_dims:
            raise MedclInputError(
                f"RandElasticd(spatial_dims={self.spatial_dims}) got {first!r} of shape {tuple(d[first].shape)}; "
                "expected channel-first (C, *spatial)."
            )
        self.randomize(spatial)
        if not self._do_transform:
            return d
        device = d[first].device if isinstance(d[first], torch.Tensor) else None
        grid = self.sampling_grid(spatial, device)
        for key, mode, padding_mode in self.key_iterator(d, self.mode, self.padding_mode):
            d[key] = self.resampler(d[key], grid, mode=mode, padding_mode=padding_mode)
        return d
