"""What a bundle needs to know about an MSD-style dataset: label map, modality, class count."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from medcl.errors import MedclInputError

__all__ = ["DatasetInfo", "read_dataset_info", "dataset_json_path", "dataset_num_classes"]

PHANTOM_HINT = "medcl-phantom --out {dir} --n 40 --seed 0"


def dataset_json_path(dataset_dir: str) -> str:
    """Return ``<dataset_dir>/dataset.json``, raising a clear error (with the fix) when it is missing.

    Raises:
        MedclInputError: when the folder or its ``dataset.json`` does not exist.
    """
    path = os.path.join(os.path.abspath(os.path.expanduser(str(dataset_dir))), "dataset.json")
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        raise MedclInputError(
            f"{path} not found: --dataset_dir must be an MSD-style folder (imagesTr/, labelsTr/, dataset.json). "
            f"To create the synthetic phantom there, run: {PHANTOM_HINT.format(dir=folder)}"
        )
    return path


@dataclass
class DatasetInfo:
    """Label map and modality read from an MSD ``dataset.json``.

    Attributes:
        dataset_json: path of the ``dataset.json`` file.
        labels: class index -> name, background (0) included.
        modality: the first channel's modality, upper case (``"CT"``, ``"MRI"``, ``"T2"``, ...).
    """

    dataset_json: str
    labels: dict[int, str] = field(default_factory=dict)
    modality: str = "CT"

    @property
    def num_classes(self) -> int:
        """Number of output channels a segmentation network needs (background included)."""
        return max(self.labels) + 1

    @property
    def label_names(self) -> list[str]:
        """Class names ordered by index, background first."""
        return [self.labels.get(i, f"class_{i}") for i in range(self.num_classes)]

    @property
    def is_ct(self) -> bool:
        """Whether intensities are Hounsfield units (CT window) rather than arbitrary (percentile scaling)."""
        return self.modality.upper() == "CT"

    @property
    def dataset_dir(self) -> str:
        return os.path.dirname(self.dataset_json)


def read_dataset_info(dataset_dir: str) -> DatasetInfo:
    """Read ``labels`` and ``modality`` from ``<dataset_dir>/dataset.json``.

    Args:
        dataset_dir: MSD-style dataset folder.

    Raises:
        MedclInputError: when ``dataset.json`` is missing, is not JSON, or has no usable ``labels``.
    """
    path = dataset_json_path(dataset_dir)
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise MedclInputError(f"{path} is not valid JSON ({e}); fix the file.") from e
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise MedclInputError(
            f'{path} has no \'labels\' mapping (e.g. {{"0": "background", "1": "spleen"}}); '
            "add one so the number of classes is known."
        )
    try:
        labels = {int(k): str(v) for k, v in raw_labels.items()}
    except ValueError as e:
        raise MedclInputError(f"{path}: 'labels' keys must be integers as strings ({e}).") from e
    modality = meta.get("modality", {"0": "CT"})
    if isinstance(modality, dict):
        modality = modality.get("0", next(iter(modality.values()), "CT"))
    return DatasetInfo(dataset_json=path, labels=labels, modality=str(modality).upper())


def dataset_num_classes(dataset_dir: str | None, default: int) -> int:
    """The class count of ``<dataset_dir>/dataset.json`` when that file exists, else ``default``.

    Bundle configs set ``num_classes`` with it, so that ``network_def`` builds with no dataset present (the model
    zoo's checks ``verify_net_in_out`` and ``ckpt_export``, a downloaded or copied bundle): ``default`` is the
    metadata's output channels (``network_data_format.outputs.pred.num_channels``), and a dataset overrides it.
    Everything that reads images or labels still needs the dataset, and says so when it is missing.

    Args:
        dataset_dir: MSD-style dataset folder, or None.
        default: class count without a ``dataset.json``.

    Raises:
        MedclInputError: when ``dataset.json`` exists but is not valid (see :func:`read_dataset_info`).
    """
    if dataset_dir is None:
        return int(default)
    path = os.path.join(os.path.abspath(os.path.expanduser(str(dataset_dir))), "dataset.json")
    return read_dataset_info(str(dataset_dir)).num_classes if os.path.isfile(path) else int(default)
