"""Intensity normalisation chosen by modality: CT window in HU, or percentile scaling for MR and others."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

__all__ = ["ScaleIntensityByModalityd", "foreground_or_all"]


class ScaleIntensityByModalityd(MapTransform):
    """Scale intensities to [0, 1] as the dataset's modality calls for.

    ``CT``: clip to ``ct_window`` (HU) and map it linearly to [0, 1] (:class:`monai.transforms.ScaleIntensityRanged`).
    Anything else (MR, ...): map the ``percentiles`` (default 1st–99th) of each volume to [0, 1] and clip
    (:class:`monai.transforms.ScaleIntensityRangePercentilesd`), as is usual for MR whose intensities have no unit.

    Args:
        keys: image keys.
        modality: the dataset's modality (``dataset.json`` ``modality["0"]``), case-insensitive.
        ct_window: ``(low, high)`` HU window for CT.
        percentiles: ``(lower, upper)`` percentiles for other modalities.
        modality_key: optional item key holding the item's own modality (pooled datasets of mixed modalities);
            items without it use ``modality``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality: str = "CT",
        ct_window: Sequence[float] = (-175.0, 250.0),
        percentiles: Sequence[float] = (1.0, 99.0),
        modality_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality = str(modality).upper()
        self.modality_key = modality_key
        lo, hi = ct_window
        self.ct_scaler = ScaleIntensityRanged(
            keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True, allow_missing_keys=allow_missing_keys
        )
        lo, hi = percentiles
        self.percentile_scaler = ScaleIntensityRangePercentilesd(
            keys, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True, allow_missing_keys=allow_missing_keys
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        modality = self.modality
        if self.modality_key is not None and self.modality_key in data:
            modality = str(data[self.modality_key]).upper()
        return self.ct_scaler(data) if modality == "CT" else self.percentile_scaler(data)


def foreground_or_all(img):
    """Foreground mask for ``CropForegroundd``'s ``select_fn``: voxels above 0, or every voxel when none is.

    After :class:`ScaleIntensityByModalityd`, a constant image (a blank export) or one with nothing inside the CT
    window (all air) has no voxel above 0; MONAI's default would crop it to an empty volume, which fails later (an
    empty patch in training, a traceback in inference). With this mask the whole volume is kept instead.

    Args:
        img: the scaled image, ``(C, *spatial)``, a tensor or an array.

    Returns:
        A boolean mask of ``img``'s shape and type.
    """
    mask = img > 0
    return mask if mask.any() else mask | True
