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
Pooled pre-training data: the labelled cases of several MSD-style datasets, each with its own label map, in one
datalist whose items carry the dataset they come from (for label namespaces and same-dataset pairing).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from medcl.data.dataset_info import read_dataset_info
from medcl.data.splits import load_splits
from medcl.errors import MedclInputError

__all__ = ["pooled_datalist", "pooled_label_maps"]


def _as_dirs(dataset_dirs: str | Sequence[str]) -> list[str]:
    dirs = [dataset_dirs] if isinstance(dataset_dirs, (str, os.PathLike)) else list(dataset_dirs)
    if not dirs:
        raise MedclInputError("the pooled dataset list is empty: give at least one MSD-style dataset folder.")
    real = [os.path.realpath(str(d)) for d in dirs]
    if len(set(real)) != len(real):
        raise MedclInputError(f"a dataset is listed twice in {dirs}: each pooled dataset must appear once.")
    return [str(d) for d in dirs]


def pooled_datalist(
    dataset_dirs: str | Sequence[str],
    holdout_dir: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    check: str = "header",
    test_fraction: float = 0.0,
    test_seed: int = 0,
    defer_checks_above: int | None = None,
) -> list[dict]:
    """
    Every labelled training case of each dataset, as ``{"image", "label", "dataset_id", "modality"}``.

    ``dataset_id`` is the dataset's index in ``dataset_dirs``; labels stay the dataset's own (class ``k`` of two
    datasets are different classes: :class:`~medcl.losses.label_consistency.LabelConsistencyLoss` separates them
    by dataset id). When a pooled dataset is also the fine-tuning dataset (``holdout_dir``), its test and validation
    cases (the split of :func:`medcl.data.load_splits` with the same ``val_fraction``, ``seed``, ``test_fraction``
    and ``test_seed`` as fine-tuning) are left out, so that pre-training never sees the labels fine-tuning is
    selected or evaluated on. A dataset's labelled ``test`` entries are never pooled.

    Args:
        dataset_dirs: MSD-style dataset folders (a single path is one dataset).
        holdout_dir: the fine-tuning dataset, whose validation split is excluded if it is pooled.
        val_fraction: fine-tuning's validation fraction (only used for ``holdout_dir``).
        seed: fine-tuning's split seed (only used for ``holdout_dir``).
        test_fraction: fine-tuning's test fraction (only used for ``holdout_dir``).
        test_seed: fine-tuning's test seed (only used for ``holdout_dir``).
        check: input check level (see :func:`medcl.data.checks.check_datalist`).
        defer_checks_above: a dataset with more training cases is checked in part now and the rest at load time
            (see :func:`medcl.data.load_splits`).

    Raises:
        MedclInputError: for an empty or duplicated list, a dataset without labelled cases, or bad files.
    """
    dirs = _as_dirs(dataset_dirs)
    held = os.path.realpath(str(holdout_dir)) if holdout_dir is not None else None
    items: list[dict] = []
    for dataset_id, ddir in enumerate(dirs):
        info = read_dataset_info(ddir)
        if os.path.realpath(ddir) == held:
            cases = load_splits(
                ddir,
                val_fraction=val_fraction,
                label_fraction=1.0,
                seed=seed,
                check=check,
                test_fraction=test_fraction,
                test_seed=test_seed,
                defer_checks_above=defer_checks_above,
            )["labelled"]
        else:
            cases = load_splits(
                ddir,
                val_fraction=0.0,
                label_fraction=1.0,
                seed=seed,
                check=check,
                defer_checks_above=defer_checks_above,
            )["labelled"]
        if not cases:
            raise MedclInputError(f"{info.dataset_json} lists no labelled training case to pool.")
        for case in cases:
            items.append(
                {"image": case["image"], "label": case["label"], "dataset_id": dataset_id, "modality": info.modality}
            )
    return items


def pooled_label_maps(dataset_dirs: str | Sequence[str]) -> list[dict[int, str]]:
    """The label map (class index -> name) of each pooled dataset, in ``dataset_dirs`` order."""
    return [read_dataset_info(d).labels for d in _as_dirs(dataset_dirs)]
