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
"""One batch from each of several data loaders per iteration (labelled + pseudo-labelled batches)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["MixedLoader"]


class MixedLoader:
    """
    Iterable of ``{name: batch}`` dicts drawing one batch from each *active* loader, restarting a loader (a new
    epoch of it, so a new shuffle) whenever it runs out: a handful of labelled volumes and a large pseudo-labelled
    pool then give one batch of each per iteration, however different their lengths.

    It is endless: give the trainer an ``epoch_length``. The set of active loaders and the loaders themselves can
    change between iterations (:meth:`set_loader`, :meth:`activate`), e.g. from an Ignite handler at the start of a
    self-training round; a replaced loader starts afresh.

    Example::

        mixed = MixedLoader({"labelled": labelled_loader})
        ...  # later, once pseudo-labels exist
        mixed.set_loader("unlabelled", DataLoader(pseudo_dataset, batch_size=4, shuffle=True))
        batch = next(iter(mixed))  # {"labelled": {...}, "unlabelled": {...}}

    Args:
        loaders: ``{name: iterable of batches}``; None entries are placeholders (inactive until set).
        active: names drawn from; defaults to every non-None loader.

    Raises:
        ValueError: when no loader is active, or an active name has no loader.
    """

    def __init__(self, loaders: dict[str, Iterable | None], active: Iterable[str] | None = None) -> None:
        self.loaders: dict[str, Iterable | None] = dict(loaders)
        self._iters: dict[str, Iterator] = {}
        self.activate(active if active is not None else [k for k, v in self.loaders.items() if v is not None])

    def activate(self, names: Iterable[str]) -> None:
        """Draw from ``names`` from the next batch on."""
        names = list(names)
        missing = [n for n in names if self.loaders.get(n) is None]
        if not names or missing:
            raise ValueError(f"MixedLoader needs at least one active loader with data; no loader for {missing}.")
        self.active = names

    def set_loader(self, name: str, loader: Iterable, active: bool = True) -> None:
        """Replace (or add) loader ``name``; its next batch comes from a fresh iterator."""
        self.loaders[name] = loader
        self._iters.pop(name, None)
        if active and name not in self.active:
            self.activate([*self.active, name])

    def _next(self, name: str) -> Any:
        it = self._iters.get(name)
        if it is not None:
            try:
                return next(it)
            except StopIteration:
                pass
        it = self._iters[name] = iter(self.loaders[name])
        try:
            return next(it)
        except StopIteration:
            raise ValueError(f"MixedLoader: the {name!r} loader yields no batch (empty dataset?).") from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield {name: self._next(name) for name in self.active}
