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
"""A dataset that gives each item a partner from the same group: MixCL's auxiliary image ``I2``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from monai.transforms import Randomizable, apply_transform
from torch.utils.data import Dataset as _TorchDataset

from medcl.errors import MedclInputError

__all__ = ["PartnerDataset"]


class PartnerDataset(_TorchDataset, Randomizable):
    """
    Item ``i`` of ``data`` together with the ``partner_keys`` of a partner item ``j`` of the same group (e.g. the
    same pooled dataset), stored under ``key + suffix``; then ``transform`` (the random part of the pipeline).

    MixCL (Sec. 2.3): the auxiliary patch ``P2`` is cropped from ``I1`` itself or from another image ``I2`` of the
    same dataset, 1:1. Here ``j = i`` with probability ``same_item_prob`` (or when ``i`` is alone in its group),
    else ``j`` is drawn uniformly from the other items of its group. Cropping both from the partner pair is left to
    ``transform`` (e.g. two :class:`~medcl.data.RandPatchWithPositiond`, one per key set).

    Wrap a :class:`~monai.data.CacheDataset` of the deterministic preprocessing to keep volumes in memory: only
    ``transform`` runs per draw. The groups are read from the wrapped dataset's datalist (``data.data``) without
    loading anything. MONAI's ``DataLoader`` seeds this dataset (``set_random_state``), which also seeds
    ``transform``.

    Args:
        data: a dataset (or sequence) of dict items; its datalist items need ``group_key``.
        group_key: key of the group id. Defaults to ``"dataset_id"``.
        partner_keys: keys copied from the partner. Defaults to ``("image", "label")``.
        suffix: appended to the copied keys. Defaults to ``"_2"``.
        same_item_prob: probability that the partner is the item itself. Defaults to 0.5 (the paper's 1:1).
        transform: callable applied to the paired item.

    Raises:
        MedclInputError: for an empty dataset, items without ``group_key`` or a probability outside [0, 1].
    """

    def __init__(
        self,
        data: Sequence,
        group_key: str = "dataset_id",
        partner_keys: Sequence[str] = ("image", "label"),
        suffix: str = "_2",
        same_item_prob: float = 0.5,
        transform: Callable | None = None,
    ) -> None:
        if not 0.0 <= same_item_prob <= 1.0:
            raise MedclInputError(f"same_item_prob must be in [0, 1], got {same_item_prob}.")
        datalist = getattr(data, "data", data)
        if len(datalist) == 0:
            raise MedclInputError("the pre-training datalist is empty: check the dataset folders and their splits.")
        missing = [i for i, d in enumerate(datalist) if group_key not in d]
        if missing:
            raise MedclInputError(
                f"{len(missing)} item(s) lack {group_key!r} (e.g. {datalist[missing[0]]}); build the datalist with "
                "medcl.data.pooled_datalist."
            )
        self.data = data
        self.group_key = group_key
        self.partner_keys = [partner_keys] if isinstance(partner_keys, str) else list(partner_keys)
        self.suffix = suffix
        self.same_item_prob = float(same_item_prob)
        self.transform = transform
        groups: dict[Any, list[int]] = {}
        for i, d in enumerate(datalist):
            groups.setdefault(d[group_key], []).append(i)
        self.group_of = [groups[d[group_key]] for d in datalist]

    def __len__(self) -> int:
        return len(self.group_of)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> PartnerDataset:
        super().set_random_state(seed, state)
        if isinstance(self.transform, Randomizable) or hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=int(self.R.randint(np.iinfo(np.int32).max)))
        return self

    def randomize(self, index: int) -> int:  # type: ignore[override]
        """Draw the partner index of item ``index``."""
        group = self.group_of[index]
        if len(group) == 1 or self.R.rand() < self.same_item_prob:
            return index
        others = [j for j in group if j != index]
        return others[self.R.randint(len(others))]

    def __getitem__(self, index: int) -> Any:
        item = dict(self.data[index])
        partner = self.data[self.randomize(index)]
        for key in self.partner_keys:
            if key not in partner:
                raise MedclInputError(f"partner item {index} has no {key!r} (keys: {sorted(partner)}).")
            item[key + self.suffix] = partner[key]
        return apply_transform(self.transform, item) if self.transform is not None else item
