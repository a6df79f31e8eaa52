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
"""Quality of pseudo-labels against true labels: Dice per class and overall, on the label maps written to disk."""

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medcl.errors import MedclInputError
from medcl.inferers.pseudo_labeler import DEFAULT_IGNORE_INDEX, _load_label_array

__all__ = ["pseudo_label_dice"]

logger = logging.getLogger(__name__)


def _pair_items(pseudo_items, truth_items, image_key: str) -> list[tuple[Mapping, Mapping]]:
    pseudo_items, truth_items = list(pseudo_items), list(truth_items)
    if all(isinstance(it, Mapping) and image_key in it for it in pseudo_items + truth_items):
        truth = {os.path.abspath(it[image_key]): it for it in truth_items}
        missing = [it[image_key] for it in pseudo_items if os.path.abspath(it[image_key]) not in truth]
        if missing:
            raise MedclInputError(f"no true label for the images {missing[:5]}{' ...' if len(missing) > 5 else ''}.")
        return [(it, truth[os.path.abspath(it[image_key])]) for it in pseudo_items]
    if len(pseudo_items) != len(truth_items):
        raise MedclInputError(
            f"{len(pseudo_items)} pseudo-label items vs {len(truth_items)} true-label items: pair them by "
            f"{image_key!r} or pass lists of equal length."
        )
    return list(zip(pseudo_items, truth_items, strict=True))


def pseudo_label_dice(
    pseudo_items: Sequence[Mapping[str, Any]],
    truth_items: Sequence[Mapping[str, Any]],
    num_classes: int,
    include_background: bool = False,
    ignore_index: int | None = DEFAULT_IGNORE_INDEX,
    label_key: str = "label",
    image_key: str = "image",
) -> dict[str, Any]:
    """Dice of pseudo-label files against true label files, per class and overall (pseudo-label quality).

    Items are paired by ``image_key`` when all items have one, else by position. Per case and class, Dice is
    ``2 |P ∩ T| / (|P| + |T|)`` over the voxels where neither map is ``ignore_index`` (so confidence-filtered
    voxels are excluded); it equals ``monai.metrics.compute_dice(..., ignore_empty=False)`` on one-hot maps,
    except that a class absent from both maps gives NaN (not 1) and is left out of the means. A class predicted
    in a case where it is absent scores 0. Counts come from a confusion matrix, so memory stays one volume.

    Args:
        pseudo_items: ``{"image", "label"}`` items of pseudo-labels (e.g. :meth:`PseudoLabeler.run` output).
        truth_items: ``{"image", "label"}`` items of the true labels (same grids).
        num_classes: number of classes (background included).
        include_background: report class 0 too. Defaults to False.
        ignore_index: label excluded from the comparison; None: none. Defaults to 255.
        label_key: key of the label file in both item lists. Defaults to ``"label"``.
        image_key: key used to pair the items. Defaults to ``"image"``.

    Returns:
        ``{"per_class": {class: mean Dice over cases (NaN if the class is in no case)}, "mean": mean of the
        per-class values (NaN if none), "per_case": [{"image", "label", "dice": {class: Dice}}],
        "ignored_fraction": fraction of voxels excluded, "num_cases": int}``.

    Raises:
        MedclInputError: for unpaired items, missing or unreadable files, maps of different shapes, or labels
            ``>= num_classes`` (other than ``ignore_index``).
    """
    num_classes = int(num_classes)
    if num_classes < 1 + int(not include_background):
        raise ValueError(f"num_classes={num_classes} leaves no class to report.")
    classes = list(range(0 if include_background else 1, num_classes))
    per_case, ignored, total = [], 0, 0
    for p_item, t_item in _pair_items(pseudo_items, truth_items, image_key):
        p_path, t_path = os.fspath(p_item[label_key]), os.fspath(t_item[label_key])
        p, p_aff = _load_label_array(p_path, "pseudo-label")
        t, t_aff = _load_label_array(t_path, "true label")
        p, t = np.squeeze(p), np.squeeze(t)
        if p.shape != t.shape:
            raise MedclInputError(f"{p_path} has shape {p.shape}, {t_path} has {t.shape}: not on the same grid.")
        if not np.allclose(p_aff, t_aff, atol=1e-3):
            logger.warning("%s and %s have different affines; comparing voxel by voxel.", p_path, t_path)
        p, t = np.rint(p).astype(np.int64).ravel(), np.rint(t).astype(np.int64).ravel()
        keep = np.ones(p.shape, dtype=bool)
        if ignore_index is not None:
            keep = (p != ignore_index) & (t != ignore_index)
            p, t = p[keep], t[keep]
        for arr, path in ((p, p_path), (t, t_path)):
            if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
                raise MedclInputError(
                    f"{path}: labels outside [0, {num_classes}) (range {arr.min()}..{arr.max()}; "
                    f"ignore_index {ignore_index})."
                )
        conf = np.bincount(p * num_classes + t, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
        inter, p_sum, t_sum = np.diag(conf), conf.sum(axis=1), conf.sum(axis=0)
        denom = p_sum + t_sum
        dice = {c: float(2.0 * inter[c] / denom[c]) if denom[c] > 0 else float("nan") for c in classes}
        per_case.append({image_key: p_item.get(image_key), label_key: p_path, "dice": dice})
        ignored += int(keep.size - keep.sum())
        total += int(keep.size)

    def nanmean(values):
        vals = [v for v in values if not math.isnan(v)]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    per_class = {c: nanmean([case["dice"][c] for case in per_case]) for c in classes}
    return {
        "per_class": per_class,
        "mean": nanmean(per_class.values()),
        "per_case": per_case,
        "ignored_fraction": ignored / total if total else 0.0,
        "num_cases": len(per_case),
    }
