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
"""Save a training run's whole state every epoch and continue a killed run from it (``resume: true``)."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from monai.transforms import Randomizable, Transform
from monai.utils import IgniteInfo, min_version, optional_import

from medcl.errors import MedclInputError
from medcl.handlers.run_lock import RunDirLock
from medcl.utils.atomic import atomic_write

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["RunStateHandler", "RUN_STATE_FILE", "register_run_state", "run_state_path"]

logger = logging.getLogger(__name__)

RUN_STATE_FILE = "run_state.pt"
_FORMAT = 1


def run_state_path(save_dir: str, rank: int = 0) -> str:
    """``<save_dir>/run_state.pt`` (rank 0, single process) or ``run_state_rank<k>.pt`` (other torchrun ranks)."""
    return os.path.join(save_dir, RUN_STATE_FILE if rank == 0 else f"run_state_rank{rank}.pt")


_REGISTRY = "medcl_run_state"


def register_run_state(engine: Engine, name: str, obj: Any) -> None:
    """Have ``engine``'s :class:`RunStateHandler` save and restore ``obj`` (``state_dict``/``load_state_dict``).

    Handlers with state of their own call this from ``attach`` (:class:`medcl.handlers.AtomicCheckpointSaver`,
    :class:`medcl.handlers.SelfTrainingHandler`), so a config lists them once, as plain handler dicts (what MONAI
    Label expects of ``train#handlers``). Names are made unique per engine in attach order (``name``, ``name1``, ...).
    """
    registry = engine.__dict__.setdefault(_REGISTRY, {})
    key, i = name, 0
    while key in registry:
        i += 1
        key = f"{name}{i}"
    registry[key] = obj


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _loaders(data: Any) -> list[Any]:
    """The data loaders behind a trainer's data: a loader itself, or the loaders of a ``MixedLoader``."""
    inner = getattr(data, "loaders", None)
    if isinstance(inner, Mapping):
        return [ld for ld in inner.values() if ld is not None]
    return [data]


def _datasets(dataset: Any) -> Iterator[Any]:
    yield dataset
    for child in getattr(dataset, "datasets", None) or []:  # ConcatDataset
        yield from _datasets(child)
    if getattr(dataset, "dataset", None) is not None:  # Subset
        yield from _datasets(dataset.dataset)


def _randomizables(obj: Any, seen: set[int]) -> Iterator[Randomizable]:
    """Every ``Randomizable`` transform reachable from ``obj`` (Compose chains, wrapped transforms), each once."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _randomizables(x, seen)
        return
    if isinstance(obj, Mapping):
        for x in obj.values():
            yield from _randomizables(x, seen)
        return
    if not isinstance(obj, (Transform, Randomizable)):
        return
    if isinstance(obj, Randomizable) and isinstance(getattr(obj, "R", None), np.random.RandomState):
        yield obj
    for value in vars(obj).values():
        if isinstance(value, (Transform, Randomizable, list, tuple, Mapping)):
            yield from _randomizables(value, seen)


def _np_state(state: tuple) -> dict[str, Any]:
    """A numpy ``RandomState`` state as plain values (loadable with ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, gauss = state
    return {
        "name": name,
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _from_np_state(d: Mapping[str, Any]) -> tuple:
    return d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["gauss"]


class RunStateHandler:
    """
    Keep a resumable snapshot of a training run and, with ``resume=True``, continue a run that was killed.

    At the end of every ``interval``-th epoch (after validation and the checkpoint savers, so attach it last) the
    handler writes ``<save_dir>/run_state.pt`` atomically (temporary file in the same folder, then rename) with:

    - the trainer's state (epoch, iteration, epoch length) and its AMP ``GradScaler``;
    - ``state_dict()`` of each of ``objects`` (network, optimizer, LR scheduler, ...; for other Ignite engines, e.g.
      the evaluator, the best metric so far) and of what handlers registered on the trainer and on those engines
      (:func:`register_run_state`): the checkpoint savers' lists of saved files (so the best-metric ``model.pt`` is
      only replaced by a better one) and the self-training round with its pseudo-label items;
    - the random states: Python, NumPy, torch (CPU and CUDA) and every ``Randomizable`` transform of the trainer's
      data loaders (MONAI transforms draw from their own ``R``).

    With ``resume=True`` and such a file present, everything is loaded back when the trainer starts (after any
    pre-trained weights are loaded, so the run's own weights win), ``objects`` first and random states last, and the
    run goes on from the next epoch; without the file the run starts afresh. The configured ``max_epochs`` wins over
    the saved one, so a finished run can also be extended (objects keep their saved state: an LR scheduler its old
    schedule, e.g. a cosine's ``T_max``). Under ``torchrun`` every rank keeps its own file (``run_state_rank<k>.pt``):
    random states and self-training shards differ per rank.

    A resumed run repeats an uninterrupted one exactly (same seed, CPU) when each epoch starts a fresh pass over the
    data: ``num_workers=0`` and an ``epoch_length`` that is a multiple of the loader's length (the tests' set-up).
    Otherwise (data-loader worker processes, an epoch ending mid-pass) it continues with a fresh
    pass and the workers' own random streams: the same training, not the same numbers.

    Args:
        save_dir: folder of the run state (the bundle's ``ckpt_dir``).
        objects: ``{name: object with state_dict/load_state_dict}`` (or an Ignite engine, see above); None values are
            skipped (e.g. a missing scheduler). Registered handlers are added to them.
        resume: load the run state when the trainer starts, if one exists. Defaults to False (a new run overwrites
            it).
        interval: save every ``interval`` epochs. Defaults to 1.
        lock: hold ``<save_dir>/.medcl_run.lock`` from attach to the end of the run (:class:`RunDirLock`), so a second
            run on the same folder is refused while this one is alive. Defaults to True.

    Raises:
        MedclInputError: (when resuming) for an unreadable run state, or one saved with other objects (another
            config); (at attach) when another live run holds ``save_dir``.
    """

    def __init__(
        self,
        save_dir: str,
        objects: Mapping[str, Any] | None = None,
        resume: bool = False,
        interval: int = 1,
        lock: bool = True,
    ) -> None:
        if int(interval) < 1:
            raise MedclInputError(f"run state interval must be >= 1 epoch, got {interval}.")
        self.save_dir = os.fspath(save_dir)
        self.objects = {k: v for k, v in (objects or {}).items() if v is not None}
        self.resume = bool(resume)
        self.interval = int(interval)
        self.lock = RunDirLock(self.save_dir) if lock else None

    @property
    def path(self) -> str:
        return run_state_path(self.save_dir, _rank())

    def attach(self, engine: Engine) -> None:
        if self.lock is not None:
            self.lock.acquire()
            engine.add_event_handler(Events.COMPLETED, lambda _: self.lock.release())
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)

    # --- what is saved ------------------------------------------------------------------------------

    def _transforms(self, engine: Engine) -> list[Randomizable]:
        seen: set[int] = set()
        found: list[Randomizable] = []
        for loader in _loaders(getattr(engine, "data_loader", None)):
            for ds in _datasets(getattr(loader, "dataset", None)):
                if isinstance(ds, Randomizable) and id(ds) not in seen:  # e.g. PartnerDataset draws partners
                    seen.add(id(ds))
                    found.append(ds)
                found.extend(_randomizables(getattr(ds, "transform", None), seen))
        return found

    def _objects(self, engine: Engine) -> dict[str, Any]:
        """``objects`` plus what handlers registered on the trainer and on the engines among ``objects``."""
        found = dict(self.objects)
        engines = {"trainer": engine, **{k: v for k, v in self.objects.items() if isinstance(v, Engine)}}
        for prefix, eng in engines.items():
            found.update({f"{prefix}.{k}": v for k, v in eng.__dict__.get(_REGISTRY, {}).items()})
        return found

    def state_dict(self, engine: Engine) -> dict[str, Any]:
        objects: dict[str, Any] = {}
        for name, obj in self._objects(engine).items():
            if isinstance(obj, Engine):  # the evaluator: its best metric, for logs and key-metric comparisons
                objects[name] = {"best_metric": obj.state.best_metric, "best_metric_epoch": obj.state.best_metric_epoch}
            else:
                objects[name] = obj.state_dict()
        scaler = getattr(engine, "scaler", None)
        rng = {
            "python": random.getstate(),
            "numpy": _np_state(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "transforms": [_np_state(t.R.get_state()) for t in self._transforms(engine)],
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": _FORMAT,
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "trainer": engine.state_dict(),
            "objects": objects,
            "rng": rng,
            "scaler": None if scaler is None else scaler.state_dict(),
        }

    def save(self, engine: Engine) -> None:
        """Write the run state atomically: a kill while saving leaves the previous one intact."""
        state = self.state_dict(engine)
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))

    # --- resuming -----------------------------------------------------------------------------------

    def load(self, engine: Engine) -> None:
        """Load the run state into the trainer and ``objects`` (``resume=True`` and a saved state only)."""
        if not self.resume:
            return
        path = self.path
        if not os.path.isfile(path):
            logger.info("resume: no run state at %s, starting a new run.", path)
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MedclInputError(
                f"{path}: the run state cannot be read ({type(e).__name__}: {e}). Delete it to start afresh "
                "(--resume false), or restore it from a backup."
            ) from e
        targets = self._objects(engine)
        saved, expected = set(state.get("objects", {})), set(targets)
        if state.get("format") != _FORMAT or saved != expected:
            raise MedclInputError(
                f"{path}: this run state holds {sorted(saved)} but the config resumes {sorted(expected)}; it was "
                "saved by another config. Resume with the config that wrote it, or pass --resume false (or another "
                "--ckpt_dir) to start afresh."
            )
        max_epochs = engine.state.max_epochs
        engine.load_state_dict(state["trainer"])
        if max_epochs is not None:
            engine.state.max_epochs = max(max_epochs, engine.state.epoch)
        for name, obj in targets.items():
            if isinstance(obj, Engine):
                obj.state.best_metric = state["objects"][name]["best_metric"]
                obj.state.best_metric_epoch = state["objects"][name]["best_metric_epoch"]
            else:
                obj.load_state_dict(state["objects"][name])
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        self._load_rng(engine, state["rng"], path)
        logger.info(
            "resumed from %s: epoch %d, iteration %d of %d epochs.",
            path,
            engine.state.epoch,
            engine.state.iteration,
            engine.state.max_epochs,
        )

    def _load_rng(self, engine: Engine, rng: Mapping[str, Any], path: str) -> None:
        random.setstate(rng["python"])
        np.random.set_state(_from_np_state(rng["numpy"]))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        transforms = self._transforms(engine)
        if len(transforms) != len(rng["transforms"]):
            logger.warning(
                "%s: %d random transforms saved, %d now (transforms changed?); their random states were not restored.",
                path,
                len(rng["transforms"]),
                len(transforms),
            )
            return
        for t, s in zip(transforms, rng["transforms"], strict=True):
            t.R.set_state(_from_np_state(s))
