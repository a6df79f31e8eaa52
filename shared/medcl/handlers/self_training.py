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
Pseudo-label self-training rounds (Chaitanya et al., MedIA 2023) as an Ignite handler on one trainer.

The trainer's epochs are cut into phases: ``baseline_epochs`` on the labelled volumes only (round 0), then
``num_rounds`` rounds of ``round_epochs`` each. At the first epoch of round ``r >= 1`` this handler

1. loads the best-validation checkpoint so far (``checkpoint_path``, the ``CheckpointSaver`` key-metric file) into
   the network (each round starts from the model that makes its pseudo-labels);
2. predicts every unlabelled volume with it (:class:`medcl.inferers.PseudoLabeler`, whole volumes, optional CRF
   and confidence filter) into ``<pseudo_dir>/round<r>/``, resumable through that folder's manifest;
3. puts the pseudo-labelled items into ``dataset`` (``set_data``, e.g. a ``CacheDataset``) and a fresh data loader
   over it into ``mixed_loader`` under ``"unlabelled"``, so the step sees labelled + pseudo-labelled batches;
4. clears the optimizer's state unless ``reset_optimizer=False`` (each round starts with fresh Adam moments, as a
   new training run from the loaded checkpoint would);
5. when true labels of the unlabelled volumes are known (``truth_items``, e.g. the phantom), records the
   pseudo-labels' Dice (:func:`medcl.metrics.pseudo_label_dice`) in ``<pseudo_dir>/rounds.json`` and the log
   (every round is logged there: checkpoint used, folder, number of volumes).

Everything else (validation, best checkpoint, logging, MLflow) stays with the trainer's usual MONAI handlers.

Under ``torch.distributed`` every rank waits at a barrier (so rank 0 has finished writing the best checkpoint),
then labels its own shard ``unlabelled[rank::world_size]`` into ``round<r>/rank<rank>/`` and trains on that shard:
the pseudo-labelled pool is partitioned across ranks without a sampler, and the work of labelling is shared.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from monai.data import DataLoader
from monai.utils import IgniteInfo, min_version, optional_import
from torch.optim.optimizer import Optimizer
from torch.utils.data import Dataset

from medcl.data.mixed_loader import MixedLoader
from medcl.errors import MedclInputError
from medcl.handlers.run_state import register_run_state
from medcl.inferers.pseudo_labeler import PseudoLabeler, _write_json_atomic
from medcl.metrics.pseudo_label_dice import pseudo_label_dice

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["SelfTrainingHandler", "round_of_epoch", "scale_schedule", "total_epochs"]

logger = logging.getLogger(__name__)

ROUNDS_LOG = "rounds.json"


def total_epochs(baseline_epochs: int, num_rounds: int, round_epochs: int) -> int:
    """Epochs of the whole pipeline: the baseline plus every round.

    Raises:
        MedclInputError: a schedule with no baseline epoch (e.g. ``--max_epochs`` below ``num_rounds * round_epochs``:
            the bundle's baseline runs what the rounds leave), negative rounds or empty rounds.
    """
    if baseline_epochs < 1 or num_rounds < 0 or (num_rounds > 0 and round_epochs < 1):
        raise MedclInputError(
            f"the self-training schedule does not fit: baseline_epochs {baseline_epochs}, num_rounds {num_rounds}, "
            f"round_epochs {round_epochs} (need >= 1, >= 0, >= 1). The baseline runs max_epochs - num_rounds * "
            f"round_epochs = {baseline_epochs} epochs: give --baseline_epochs instead of --max_epochs (max_epochs "
            "follows), or raise --max_epochs, or lower --num_rounds / --round_epochs."
        )
    return baseline_epochs + num_rounds * round_epochs


def scale_schedule(epochs: int, num_rounds: int, round_epochs: int, bundle_epochs: int) -> tuple[int, int, int]:
    """The self-training schedule of a bundle (``bundle_epochs`` in all, ``num_rounds`` rounds of ``round_epochs``)
    fitted into ``epochs``, e.g. a MONAI Label ``/train`` request's ``max_epochs``.

    The rounds keep their share of the epochs (45 of 145 at the localcl_selftrain defaults), each round at least
    one epoch, the baseline at least one epoch; as many of the ``num_rounds`` rounds run as fit. ``epochs`` below 2
    leaves no room for a round.

    Returns:
        ``(baseline_epochs, num_rounds, round_epochs)`` with ``baseline_epochs + num_rounds * round_epochs ==
        epochs``, e.g. ``(1, 1, 1)`` for 2 epochs, ``(7, 3, 1)`` for 10 and ``(100, 3, 15)`` for 145.
    """
    epochs = int(epochs)
    if epochs < 1:
        raise MedclInputError(f"the self-training schedule needs at least 1 epoch, got {epochs}.")
    if num_rounds <= 0 or round_epochs <= 0 or epochs < 2:
        return epochs, 0, max(int(round_epochs), 1)
    share = num_rounds * round_epochs / max(bundle_epochs, num_rounds * round_epochs + 1)
    budget = min(epochs - 1, max(1, round(epochs * share)))
    rounds = min(int(num_rounds), budget)
    per = max(1, min(int(round_epochs), budget // rounds))
    return epochs - rounds * per, rounds, per


def round_of_epoch(epoch: int, baseline_epochs: int, round_epochs: int) -> int:
    """Self-training round of a 1-based ``epoch``: 0 for the baseline epochs, then 1, 2, ..."""
    if epoch <= baseline_epochs:
        return 0
    return (epoch - baseline_epochs - 1) // round_epochs + 1


class SelfTrainingHandler:
    """
    Switch a trainer from the labelled-only baseline to pseudo-label rounds (see the module docstring).

    Args:
        pseudo_labeler: makes the pseudo-labels (its network is the trained one; its ``output_dir`` is set to
            ``<pseudo_dir>/round<r>`` each round).
        unlabelled: ``{"image": path}`` items of the unlabelled pool.
        dataset: dataset of the pseudo-labelled items, with the training transforms; must have ``set_data``.
        mixed_loader: the trainer's :class:`medcl.data.MixedLoader`.
        baseline_epochs: epochs of round 0.
        round_epochs: epochs of each later round.
        num_rounds: number of pseudo-label rounds (0: baseline only; the handler then does nothing).
        pseudo_dir: root folder of the pseudo-labels.
        checkpoint_path: best-validation checkpoint (written by the evaluator's ``CheckpointSaver``); when it does
            not exist yet (no validation so far), the current weights label the volumes.
        loader_kwargs: arguments of the ``monai.data.DataLoader`` over ``dataset`` (batch size, workers, shuffle).
        optimizer: cleared at each round start when given (``reset_optimizer``).
        reset_optimizer: clear the optimizer's state (e.g. Adam moments) at each round start. Defaults to True.
        truth_items: ``{"image", "label"}`` true labels of (some of) the unlabelled volumes, for the pseudo-label
            quality report; None: no report.
        num_classes: number of classes (background included), for the report.

    Raises:
        ValueError: for bad epoch counts or a dataset without ``set_data``.
    """

    def __init__(
        self,
        pseudo_labeler: PseudoLabeler,
        unlabelled: Sequence[Mapping[str, Any]],
        dataset: Dataset,
        mixed_loader: MixedLoader,
        baseline_epochs: int,
        round_epochs: int,
        num_rounds: int,
        pseudo_dir: str,
        checkpoint_path: str,
        loader_kwargs: Mapping[str, Any] | None = None,
        optimizer: Optimizer | None = None,
        reset_optimizer: bool = True,
        truth_items: Sequence[Mapping[str, Any]] | None = None,
        num_classes: int | None = None,
    ) -> None:
        total_epochs(baseline_epochs, num_rounds, round_epochs)  # validates the counts
        if not hasattr(dataset, "set_data"):
            raise ValueError(f"the pseudo-label dataset must have set_data (e.g. CacheDataset), got {type(dataset)}.")
        if num_rounds > 0 and not unlabelled:
            raise ValueError(
                "num_rounds > 0 needs unlabelled volumes: the split left none (lower label_fraction / "
                "num_labelled, or add --unlabelled_dir)."
            )
        self.labeler = pseudo_labeler
        self.unlabelled = [dict(it) for it in unlabelled]
        self.dataset = dataset
        self.mixed_loader = mixed_loader
        self.baseline_epochs, self.round_epochs, self.num_rounds = (
            int(baseline_epochs),
            int(round_epochs),
            int(num_rounds),
        )
        self.pseudo_dir = os.fspath(pseudo_dir)
        self.checkpoint_path = os.fspath(checkpoint_path)
        self.loader_kwargs = dict(loader_kwargs or {})
        self.optimizer = optimizer
        self.reset_optimizer = bool(reset_optimizer)
        self.truth_items = None if truth_items is None else [dict(it) for it in truth_items]
        self.num_classes = num_classes
        self.round = 0
        self.items: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.check_length)
        engine.add_event_handler(Events.EPOCH_STARTED, self)
        register_run_state(engine, "self_training", self)  # round and pseudo-labels travel with a resumed run

    def check_length(self, engine: Engine) -> None:
        """Fail before training when the trainer stops before the last round ends.

        Raises:
            MedclInputError: when ``max_epochs < baseline_epochs + num_rounds * round_epochs`` (with rounds).
        """
        need = total_epochs(self.baseline_epochs, self.num_rounds, self.round_epochs)
        have = engine.state.max_epochs
        if self.num_rounds > 0 and have is not None and have < need:
            raise MedclInputError(
                f"the trainer runs {have} epochs, the self-training schedule needs {need} (baseline_epochs "
                f"{self.baseline_epochs} + num_rounds {self.num_rounds} x round_epochs {self.round_epochs}): set "
                "max_epochs to at least that (the bundle's default derives it), or lower baseline_epochs / rounds."
            )

    def __call__(self, engine: Engine) -> None:
        r = min(round_of_epoch(engine.state.epoch, self.baseline_epochs, self.round_epochs), self.num_rounds)
        if r != self.round and r > 0:
            self.start_round(r)

    # --- one round --------------------------------------------------------------------------------

    def start_round(self, r: int) -> list[dict]:
        """Make round ``r``'s pseudo-labels and hand them to the training data; returns the pseudo-label items."""
        rank, world = (
            (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        )
        if world > 1:
            dist.barrier()  # rank 0 has saved the best checkpoint of the last validation
        ckpt = self.checkpoint_path if os.path.isfile(self.checkpoint_path) else None
        if ckpt is None:
            logger.warning(
                "round %d: no checkpoint at %s yet (no validation run?); labelling with the current weights.",
                r,
                self.checkpoint_path,
            )
        out_dir = os.path.join(self.pseudo_dir, f"round{r}")
        self.labeler.output_dir = os.path.join(out_dir, f"rank{rank}") if world > 1 else out_dir
        items = self.labeler.run(self.unlabelled[rank::world], tag=f"round{r}", checkpoint_path=ckpt)
        self._use(r, items)
        if self.optimizer is not None and self.reset_optimizer:
            self.optimizer.state.clear()
        self._log_round(r, ckpt, items, rank, world)
        return items

    def _use(self, r: int, items: list[dict]) -> None:
        """Train on round ``r``'s pseudo-labelled ``items`` from the next batch on."""
        self.dataset.set_data(items)
        self.mixed_loader.set_loader("unlabelled", DataLoader(self.dataset, **self.loader_kwargs))
        self.round, self.items = r, [dict(it) for it in items]

    # --- resuming (medcl.handlers.RunStateHandler) ----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The current round and its pseudo-labelled items (this rank's shard)."""
        return {"round": self.round, "items": self.items}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go back to a saved round without labelling again: its pseudo-label files must still exist.

        Raises:
            MedclInputError: when a pseudo-label file of the saved round is gone.
        """
        r, items = int(state["round"]), [dict(it) for it in state["items"]]
        if r == 0:
            self.round, self.items = 0, []
            return
        gone = [it["label"] for it in items if "label" in it and not os.path.isfile(it["label"])]
        if gone:
            raise MedclInputError(
                f"{gone[0]}: pseudo-label of round {r} is missing ({len(gone)} file(s)); the run "
                "cannot resume its round. Restore the folder, or start afresh with --resume false."
            )
        self._use(r, items)

    def _log_round(self, r: int, ckpt: str | None, items: list[dict], rank: int, world: int) -> None:
        entry: dict[str, Any] = {
            "round": r,
            "checkpoint": ckpt,
            "num_volumes": len(items),
            "pseudo_dir": self.labeler.output_dir,
        }
        if self.truth_items and self.num_classes:
            truth = {os.path.abspath(t["image"]) for t in self.truth_items}
            known = [it for it in items if os.path.abspath(it["image"]) in truth]
            if known:
                q = pseudo_label_dice(known, self.truth_items, self.num_classes, ignore_index=self.labeler.ignore_index)
                entry.update(
                    pseudo_dice_mean=q["mean"],
                    pseudo_dice_per_class={str(k): v for k, v in q["per_class"].items()},
                    ignored_fraction=q["ignored_fraction"],
                    num_scored=q["num_cases"],
                )
                logger.info(
                    "round %d: pseudo-label Dice %.4f over %d volumes %s",
                    r,
                    q["mean"],
                    q["num_cases"],
                    {k: round(v, 4) for k, v in q["per_class"].items()},
                )
        path = os.path.join(self.pseudo_dir, ROUNDS_LOG if world == 1 else f"rounds_rank{rank}.json")
        log = []
        if os.path.isfile(path):
            with open(path) as f:
                log = [e for e in json.load(f) if e.get("round") != r]
        _write_json_atomic(path, sorted([*log, entry], key=lambda e: e["round"]))
