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
"""A training run's learning curve as a CSV file: one row per validation, written as the run goes."""

from __future__ import annotations

import csv
import math
import numbers
import os
from typing import TYPE_CHECKING

import torch.distributed as dist
from monai.utils import IgniteInfo, min_version, optional_import

from medcl.utils.atomic import atomic_write

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["LearningCurveWriter", "read_learning_curve"]


def read_learning_curve(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a learning-curve CSV (:class:`LearningCurveWriter`) as floats (empty cells as NaN); ``[]`` for a
    missing file."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


class LearningCurveWriter:
    """
    Write a trainer's learning curve to ``filename``: after every validation run, one row with the trainer's
    ``epoch`` and ``iteration``, its epoch metrics (e.g. ``train_loss``, the average over the epoch), the
    evaluator's metrics (e.g. ``val_mean_dice``) and ``best_<key metric>`` (the evaluator's best so far, the score of
    the checkpoint ``model.pt`` holds)::

        epoch,iteration,train_loss,val_mean_dice,best_val_mean_dice
        2,40,0.8123,0.3571,0.3571

    The file is rewritten (temporary file + rename) at every row, and rows of epochs at or after the current one are
    dropped first, so a run resumed from an earlier epoch (``RunStateHandler``) continues the curve instead of
    repeating it. Only rank 0 writes in a multi-process run. Attach it to the trainer; it listens to the evaluator::

        {"_target_": "medcl.handlers.LearningCurveWriter", "evaluator": "@validate#evaluator",
         "filename": "$@ckpt_dir + '/learning_curve.csv'"}

    Args:
        evaluator: the engine the trainer's ``ValidationHandler`` runs.
        filename: path of the CSV file (its folder is created).
    """

    def __init__(self, evaluator: Engine, filename: str | os.PathLike) -> None:
        self.evaluator = evaluator
        self.filename = os.fspath(filename)
        self.trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        """Write a row after every run of the evaluator that ``engine`` (the trainer) validates with.

        Args:
            engine: the trainer.
        """
        self.trainer = engine
        if not self.evaluator.has_event_handler(self.write_row, Events.EPOCH_COMPLETED):
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.write_row)

    def row(self) -> dict[str, float]:
        """The current row: trainer epoch and iteration, trainer and evaluator scalar metrics, best key metric."""
        trainer, state = self.trainer, self.evaluator.state
        row: dict[str, float] = {"epoch": trainer.state.epoch, "iteration": trainer.state.iteration}
        for metrics in (trainer.state.metrics, state.metrics):
            row.update({k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)})
        key = getattr(state, "key_metric_name", None)
        if key and getattr(state, "best_metric", None) is not None and state.best_metric_epoch > 0:
            row[f"best_{key}"] = float(state.best_metric)
        return row

    def write_row(self, _evaluator: Engine | None = None) -> None:
        """Add the current row to the file, replacing rows of this epoch or later (rank 0 only)."""
        if self.trainer is None or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
            return
        new = self.row()
        rows = [r for r in read_learning_curve(self.filename) if r["epoch"] < new["epoch"]] + [new]
        columns = list(dict.fromkeys(k for r in rows for k in r))

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns, restval="")
                writer.writeheader()
                for r in rows:
                    writer.writerow({k: _cell(v) for k, v in r.items()})

        atomic_write(self.filename, write)


def _cell(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
