"""Deterministic test / validation / labelled / unlabelled splits of an MSD datalist.

The test set is fixed first (the dataset's labelled ``test`` entries, or a ``test_fraction`` of ``training`` drawn
with its own ``test_seed``), so it is the same for every label fraction and training seed; validation (checkpoint
selection only) and the labelled / unlabelled training pool are then drawn from the rest with the training seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from monai.data import load_decathlon_datalist

from medcl.data.checks import check_datalist
from medcl.data.dataset_info import dataset_json_path, read_dataset_info
from medcl.errors import MedclInputError
from medcl.utils.atomic import atomic_write_json

__all__ = [
    "EVAL_SPLITS",
    "eval_datalist",
    "num_labelled_cases",
    "read_test_entries",
    "record_split",
    "split_datalist",
    "load_splits",
]

#: The splits ``evaluate.json`` can score (its ``eval_split`` key).
EVAL_SPLITS = ("val", "test")


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


def _check_test_fraction(test_fraction: float) -> float:
    try:
        f = float(test_fraction)
    except (TypeError, ValueError):
        f = float("nan")
    if isinstance(test_fraction, bool) or not 0.0 <= f < 1.0:
        raise MedclInputError(
            f"test_fraction={test_fraction!r} must be in [0, 1); e.g. --test_fraction 0.2 holds out 20 % of "
            "'training' as a fixed test set (0: no test set carved out)."
        )
    return f


def _check_disjoint(training: Sequence[dict], test: Sequence[dict], origin: str) -> None:
    """Raise when a test image is also a training image (same path after normalisation)."""
    train_paths = {os.path.normpath(str(d["image"])) for d in training}
    both = sorted(os.path.basename(str(d["image"])) for d in test if os.path.normpath(str(d["image"])) in train_paths)
    if both:
        raise MedclInputError(
            f"{origin}: test image(s) {both[:5]}{' ...' if len(both) > 5 else ''} also listed in 'training' (same "
            "image path): a case cannot be trained on and tested on; remove it from 'test' or from 'training'."
        )


def _carve_test(items: list[dict], test_fraction: float, test_seed: int) -> tuple[list[dict], list[dict]]:
    """``(test, rest)``: ``max(1, round(test_fraction * n))`` cases drawn with ``test_seed``; ``rest`` keeps order."""
    if test_fraction == 0.0:
        return [], items
    n = len(items)
    num_test = max(1, int(round(test_fraction * n)))
    chosen = set(np.random.default_rng(test_seed).permutation(n)[:num_test].tolist())
    test = [items[i] for i in sorted(chosen)]
    return test, [d for i, d in enumerate(items) if i not in chosen]


def split_datalist(
    datalist: Sequence[dict],
    val_fraction: float = 0.2,
    num_val: int | None = None,
    label_fraction: float | None = 1.0,
    num_labelled: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.0,
    test_seed: int = 0,
    test: Sequence[dict] | None = None,
    origin: str = "the datalist",
) -> dict[str, list[dict]]:
    """Split a labelled datalist into ``test``, ``val``, ``labelled`` and ``unlabelled`` parts, deterministically.

    The test set comes first and depends neither on ``seed`` nor on the label fraction: either ``test`` (labelled
    cases given apart from ``datalist``, e.g. a dataset's ``labelsTs/``) or, with ``test_fraction > 0``, that
    fraction of ``datalist`` drawn with ``test_seed``. Of the remaining cases one permutation (``seed``) orders the
    rest: the first ``num_val`` are validation (checkpoint selection only), the next ``n_labelled`` keep their labels,
    the rest form the unlabelled pool (their ``label`` key is dropped). The validation set does not depend on the label
    fraction, and for one seed a smaller labelled set is a subset of a larger one. With ``test_fraction == 0`` and no
    ``test`` the split is the two-way split of earlier versions, case for case.

    Args:
        datalist: items with ``image`` and ``label``; order-independent (sorted by image path first).
        val_fraction: fraction of the non-test cases held out for validation (at least 1 when > 0), used when
            ``num_val`` is None.
        num_val: number of validation cases (overrides ``val_fraction``).
        label_fraction: fraction of the remaining cases that keep labels.
        num_labelled: number of cases that keep labels (overrides ``label_fraction``).
        seed: seed of the validation / labelled / unlabelled permutation.
        test_fraction: fraction of ``datalist`` carved out first as the test set, in [0, 1) (at least 1 case when
            > 0); must be 0 when ``test`` is given.
        test_seed: seed of the test draw (not the training seed: the test set is the same for every seed).
        test: labelled test cases listed apart from ``datalist``; none of their images may be in ``datalist``.
        origin: where the lists come from (e.g. the dataset.json path), quoted in errors.

    Returns:
        ``{"test": [...], "val": [...], "labelled": [...], "unlabelled": [...]}``; no image is in two parts.

    Raises:
        MedclInputError: ``test_fraction`` outside [0, 1), ``test_fraction > 0`` together with ``test``, a test
            image that is also in ``datalist``, too few cases for test, validation and training, or bad
            fractions/counts.
    """
    items = sorted((dict(d) for d in datalist), key=lambda d: str(d["image"]))
    test_fraction = _check_test_fraction(test_fraction)
    given = sorted((dict(d) for d in test or []), key=lambda d: str(d["image"]))
    if given:
        if test_fraction > 0:
            raise MedclInputError(
                f"{origin} has {len(given)} labelled 'test' case(s) (image and label): they are the test set; leave "
                f"test_fraction at 0 (got {test_fraction:g}), or drop their labels to carve a test set from 'training'."
            )
        _check_disjoint(items, given, origin)
        test_items, rest = given, items
    else:
        test_items, rest = _carve_test(items, test_fraction, test_seed)
    n = len(rest)
    if num_val is None:
        if not 0.0 <= val_fraction < 1.0:
            raise MedclInputError(f"val_fraction={val_fraction} must be in [0, 1).")
        num_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
    if n - num_val < 1:
        carved = f" after {len(test_items)} test case(s) (test_fraction={test_fraction:g})" if test_fraction else ""
        raise MedclInputError(
            f"{len(items)} labelled case(s){carved} cannot give {num_val} validation case(s) and a training set; "
            "lower val_fraction / test_fraction or add cases."
        )
    order = np.random.default_rng(seed).permutation(n)
    ordered = [rest[i] for i in order]
    val, pool = ordered[:num_val], ordered[num_val:]
    n_lab = num_labelled_cases(len(pool), label_fraction, num_labelled)
    unlabelled = [{k: v for k, v in d.items() if k != "label"} for d in pool[n_lab:]]
    return {"test": test_items, "val": val, "labelled": pool[:n_lab], "unlabelled": unlabelled}


def read_test_entries(dataset_dir: str) -> tuple[list[dict], list[dict]]:
    """The ``test`` entries of ``<dataset_dir>/dataset.json`` with absolute paths, as ``(labelled, image_only)``.

    An entry is labelled when it is ``{"image": ..., "label": ...}`` with a non-empty label (e.g. in
    ``labelsTs/``); MSD's usual ``"./imagesTs/x.nii.gz"`` strings and dicts without a label are image-only. Paths
    are resolved against the dataset folder as :func:`monai.data.load_decathlon_datalist` does.

    Raises:
        MedclInputError: missing dataset.json, or a ``test`` entry that is neither a path nor a dict with ``image``.
    """
    path = dataset_json_path(dataset_dir)
    with open(path) as f:
        entries = json.load(f).get("test") or []
    base = os.path.dirname(path)
    labelled, image_only = [], []
    for entry in entries:
        item = {"image": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, dict) else None
        if item is None or not isinstance(item.get("image"), str):
            raise MedclInputError(
                f"{path}: 'test' entry {entry!r} is neither an image path nor {{'image': ..., 'label': ...}}."
            )
        item["image"] = os.path.normpath(os.path.join(base, item["image"]))
        if isinstance(item.get("label"), str) and item["label"]:
            item["label"] = os.path.normpath(os.path.join(base, item["label"]))
            labelled.append(item)
        else:
            item.pop("label", None)
            image_only.append(item)
    return labelled, image_only


def load_splits(
    dataset_dir: str,
    val_fraction: float = 0.2,
    num_val: int | None = None,
    label_fraction: float | None = 1.0,
    num_labelled: int | None = None,
    seed: int = 0,
    check: str = "header",
    include_test: bool = False,
    test_fraction: float = 0.0,
    test_seed: int = 0,
    in_channels: int = 1,
    defer_checks_above: int | None = None,
) -> dict[str, list[dict]]:
    """Load ``<dataset_dir>/dataset.json``, check its files and split it (see :func:`split_datalist`).

    The test set is the dataset's labelled ``test`` entries (``{"image", "label"}``, labels e.g. in ``labelsTs/``)
    when it has any, else ``test_fraction`` of ``training`` (seeded by ``test_seed``), else empty. Image-only
    ``test`` entries are never a test set; ``include_test`` adds them to the unlabelled pool. A labelled test set
    is never added to any training pool.

    Args:
        dataset_dir: MSD-style dataset folder.
        val_fraction, num_val, label_fraction, num_labelled, seed: as in :func:`split_datalist`.
        check: file check level, ``"off"``, ``"header"`` or ``"full"`` (see :func:`medcl.data.checks.check_datalist`).
        include_test: also add the dataset's image-only ``test`` entries to the unlabelled pool.
        test_fraction: fraction of ``training`` carved out first as a fixed test set, in [0, 1); must be 0 when
            the dataset has labelled ``test`` entries.
        test_seed: seed of that draw, independent of ``seed``.
        in_channels: channels per image: 1 (a 3D volume each) or C > 1 (a 4D ``(X, Y, Z, C)`` file each, MSD
            layout); see :func:`medcl.data.checks.check_datalist`.
        defer_checks_above: a ``training`` (or image-only ``test``) list longer than this is checked in part now,
            the rest when the pipeline's :class:`medcl.data.CheckFilesd` loads it (``check_datalist``'s
            ``defer_above``; the bundles pass ``pool_memory_max``). None: every file now.

    Returns:
        ``{"test", "val", "labelled", "unlabelled"}`` datalists with absolute paths.

    Raises:
        MedclInputError: missing dataset.json, empty ``training`` list, missing/corrupt/mismatched files, a test
            set overlapping ``training``, ``test_fraction`` outside [0, 1) or given with a labelled test set, bad
            split.
    """
    path = dataset_json_path(dataset_dir)
    info = read_dataset_info(dataset_dir)
    try:
        training = load_decathlon_datalist(path, is_segmentation=True, data_list_key="training")
    except (KeyError, ValueError) as e:
        raise MedclInputError(f"{path} has no usable 'training' list ({e}); list image/label pairs there.") from e
    check_datalist(
        training,
        level=check,
        origin=path,
        label_values=info.labels,
        name="'training'",
        in_channels=in_channels,
        defer_above=defer_checks_above,
    )
    test_labelled, test_images = read_test_entries(dataset_dir)
    if test_labelled:
        check_datalist(
            test_labelled, level=check, origin=path, label_values=info.labels, name="'test'", in_channels=in_channels
        )
    splits = split_datalist(
        training,
        val_fraction,
        num_val,
        label_fraction,
        num_labelled,
        seed,
        test_fraction=test_fraction,
        test_seed=test_seed,
        test=test_labelled,
        origin=path,
    )
    if include_test and test_images:
        check_datalist(
            test_images,
            keys=("image",),
            level=check,
            origin=path,
            name="'test'",
            in_channels=in_channels,
            defer_above=defer_checks_above,
        )
        splits["unlabelled"] += test_images
    return splits


def _case_names(items: Sequence[dict]) -> list[str]:
    return sorted(os.path.basename(str(it["image"])) for it in items)


def record_split(splits: dict[str, list[dict]], path: str) -> str:
    """Write the case names of each split (``{"test": [...], "val": [...], "labelled": [...], "unlabelled":
    [...]}``, image base names, sorted) to ``path``, so that a later evaluation can check it scores the cases that
    training held out (see :func:`eval_datalist`). Written to a temporary file and renamed into place.

    Args:
        splits: the output of :func:`load_splits`.
        path: the JSON file, conventionally ``<ckpt_dir>/split.json``.

    Returns:
        ``path``.
    """
    record = {k: _case_names(v) for k, v in splits.items()}
    atomic_write_json(path, record, indent=1)
    return path


def eval_datalist(
    splits: dict[str, list[dict]],
    eval_split: str = "val",
    dataset_dir: str = "the dataset",
    record: str | None = None,
) -> list[dict]:
    """The labelled cases ``evaluate.json`` scores: ``splits[eval_split]``.

    Args:
        splits: the output of :func:`load_splits` (with the ``test_fraction`` / ``test_seed`` training used).
        eval_split: ``"val"`` (the checkpoint-selection cases) or ``"test"`` (the fixed test set).
        dataset_dir: the dataset, quoted in errors.
        record: the ``split.json`` that training wrote beside its checkpoints (:func:`record_split`); when the file
            exists, the cases to score must be the ones it lists for ``eval_split``. None or a missing file: no
            check (e.g. a downloaded bundle).

    Returns:
        the datalist of ``{"image", "label"}`` items.

    Raises:
        MedclInputError: an unknown ``eval_split``, ``"test"`` when there is no labelled test set, or cases other
            than those training held out for ``eval_split`` (split keys differ from training's).
    """
    if eval_split not in EVAL_SPLITS:
        raise MedclInputError(f"eval_split={eval_split!r} must be one of {list(EVAL_SPLITS)}.")
    items = splits.get(eval_split) or []
    if eval_split == "test" and not items:
        raise MedclInputError(
            f"eval_split 'test' but {dataset_dir} has no labelled test set: its dataset.json 'test' entries have "
            "no labels (labelsTs/) and test_fraction is 0. Pass --test_fraction 0.2 (the value training used) "
            "to carve a fixed test set out of 'training', or add labels to the 'test' entries."
        )
    if record and os.path.isfile(record):
        with open(record) as f:
            held_out = json.load(f).get(eval_split)
        if held_out is not None and sorted(held_out) != _case_names(items):
            extra = sorted(set(_case_names(items)) - set(held_out))
            raise MedclInputError(
                f"{record}: training held out other '{eval_split}' cases than this evaluation would score "
                f"({len(extra)} not in training's {eval_split!r} list, e.g. {extra[:3]}); scoring them could score "
                "training cases. Pass the split keys training used (--seed / --split_seed, --val_fraction, "
                "--label_fraction / --num_labelled, --test_fraction, --test_seed)."
            )
    return items
