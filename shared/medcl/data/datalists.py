"""Datalists for inference: a dataset's ``test`` images, or every NIfTI file of a folder."""

from __future__ import annotations

import glob
import os

from monai.data import load_decathlon_datalist

from medcl.data.checks import check_datalist
from medcl.data.dataset_info import dataset_json_path
from medcl.errors import MedclInputError

__all__ = ["inference_datalist"]


def inference_datalist(
    dataset_dir: str | None = None, input_dir: str | None = None, check: str = "header", in_channels: int = 1
) -> list[dict]:
    """Images to segment: ``*.nii.gz``/``*.nii`` files of ``input_dir`` if given, else the dataset's ``test`` list.

    ``in_channels``: channels per image, 1 (3D volumes) or C > 1 (4D ``(X, Y, Z, C)`` files), as checked by
    :func:`medcl.data.checks.check_datalist`.

    Raises:
        MedclInputError: when ``input_dir`` is not a folder or holds no NIfTI file, when neither source yields an
            image, or when a file is missing or unreadable.
    """
    if input_dir:
        if not os.path.isdir(input_dir):
            raise MedclInputError(
                f"{input_dir}: no such folder; point --input_dir (or --unlabelled_dir) at a folder of .nii.gz images."
            )
        files = sorted(glob.glob(os.path.join(input_dir, "*.nii.gz")) + glob.glob(os.path.join(input_dir, "*.nii")))
        if not files:
            raise MedclInputError(
                f"{input_dir}: no .nii.gz or .nii images in this folder; put the images there or point --input_dir "
                "(or --unlabelled_dir) at the folder that holds them."
            )
        origin = input_dir
        items = [{"image": f} for f in files]
    elif not dataset_dir:
        raise MedclInputError(
            "No images to segment: pass --input_dir with .nii.gz files (or --dataset_dir with a 'test' list)."
        )
    else:
        origin = dataset_json_path(dataset_dir)
        try:
            items = load_decathlon_datalist(origin, is_segmentation=False, data_list_key="test")
        except (ValueError, IndexError):  # no "test" key / an empty "test" list
            items = []
    if not items:
        raise MedclInputError(f"No images to segment in {origin}: pass --input_dir with .nii.gz files.")
    return check_datalist(items, keys=("image",), level=check, origin=origin, name="inference", in_channels=in_channels)
