"""Deterministic labelled / unlabelled / validation splits of an MSD datalist."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.data import load_decathlon_datalist

from medcl.data.checks import check_datalist
from medcl.data.dataset_info import dataset_json_path, read_dataset_info
from medcl.errors import MedclInputError

__all__ = ["num_labelled_cases", "split_datalist", "load_splits"]


def num_labelled_cases(pool_size: int, label_fraction: float | None = None, num_labelled: int | None = None) -> int:
    """How many of ``pool_size`` training cases keep their labels.

    ``num_labelled`` (a count) wins over ``label_fraction`` (a fraction in (0, 1]); the count from a fraction is
    ``max(1, round(fraction * pool_size))``.

    Raises:
        MedclInputError: fraction outside (0, 1], count outside [1, pool_size], or neither given.
    """
    if num_labelled is not None:
        n = int(num_labelled)
        if not 1 <= n <= pool_size:
            raise MedclInputError(f"num_labelled={num_labelled} must be between 1 and the {pool_size} training cases.")
        return n
    if label_fraction is None:
        raise MedclInputError("Give either label_fraction (0 < f <= 1) or num_labelled (>= 1).")
    f = float(label_fraction)
    if not 0.0 < f <= 1.0:
        raise MedclInputError(f"label_fraction={label_fraction} must be in (0, 1]; e.g. --label_fraction 0.1 for 10 %.")
    return max(1, int(round(f * pool_size)))


def split_datalist(
    datalist: Sequence[dict],
    val_fraction: float = 0.2,
    num_val: int | None = None,
    label_fraction: float | None = 1.0,
    num_labelled: int | None = None,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Split a labelled datalist into ``val``, ``labelled`` and ``unlabelled`` parts, deterministically.

    One permutation (seeded) orders the cases: the first ``num_val`` are validation, the next ``n_labelled`` keep
    their labels, the rest form the unlabelled pool (their ``label`` key is dropped). The validation set does not
    depend on the label fraction, and for one seed a smaller labelled set is a subset of a larger one.

    Args:
        datalist: items with ``image`` and ``label``; order-independent (sorted by image path first).
        val_fraction: fraction of cases held out for validation (at least 1), used when ``num_val`` is None.
        num_val: number of validation cases (overrides ``val_fraction``).
        label_fraction: fraction of the remaining cases that keep labels.
        num_labelled: number of cases that keep labels (overrides ``label_fraction``).
        seed: seed of the permutation.

    Returns:
        ``{"val": [...], "labelled": [...], "unlabelled": [...]}``.

    Raises:
        MedclInputError: too few cases for a validation set and a training set, or bad fractions/counts.
    """
    items = sorted((dict(d) for d in datalist), key=lambda d: str(d["image"]))
    n = len(items)
    if num_val is None:
        if not 0.0 <= val_fraction < 1.0:
            raise MedclInputError(f"val_fraction={val_fraction} must be in [0, 1).")
        num_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
    if n - num_val < 1:
        raise MedclInputError(f"{n} labelled case(s) cannot give {num_val} validation case(s) and a training set.")
    order = np.random.default_rng(seed).permutation(n)
    ordered = [items[i] for i in order]
    val, pool = ordered[:num_val], ordered[num_val:]
    n_lab = num_labelled_cases(len(pool), label_fraction, num_labelled)
    unlabelled = [{k: v for k, v in d.items() if k != "label"} for d in pool[n_lab:]]
    return {"val": val, "labelled": pool[:n_lab], "unlabelled": unlabelled}


def load_splits(
    dataset_dir: str,
    val_fraction: float = 0.2,
    num_val: int | None = None,
    label_fraction: float | None = 1.0,
    num_labelled: int | None = None,
    seed: int = 0,
    check: str = "header",
    include_test: bool = False,
) -> dict[str, list[dict]]:
    """Load ``<dataset_dir>/dataset.json``, check its files and split it (see :func:`split_datalist`).

    Args:
        dataset_dir: MSD-style dataset folder.
        val_fraction, num_val, label_fraction, num_labelled, seed: as in :func:`split_datalist`.
        check: file check level, ``"off"``, ``"header"`` or ``"full"`` (see :func:`medcl.data.checks.check_datalist`).
        include_test: also add the dataset's unlabelled ``test`` images to the unlabelled pool.

    Returns:
        ``{"val", "labelled", "unlabelled"}`` datalists with absolute paths.

    Raises:
        MedclInputError: missing dataset.json, empty ``training`` list, missing/corrupt/mismatched files, bad split.
    """
    path = dataset_json_path(dataset_dir)
    info = read_dataset_info(dataset_dir)
    try:
        training = load_decathlon_datalist(path, is_segmentation=True, data_list_key="training")
    except (KeyError, ValueError) as e:
        raise MedclInputError(f"{path} has no usable 'training' list ({e}); list image/label pairs there.") from e
    check_datalist(training, level=check, origin=path, label_values=info.labels, name="'training'")
    splits = split_datalist(training, val_fraction, num_val, label_fraction, num_labelled, seed)
    if include_test:
        try:
            test = load_decathlon_datalist(path, is_segmentation=False, data_list_key="test")
        except (KeyError, ValueError):
            test = []
        if test:
            check_datalist(test, keys=("image",), level=check, origin=path, name="'test'")
        splits["unlabelled"] += test
    return splits
