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
"""A trainer's progress as one log line every few seconds: epoch and iteration of total, elapsed and time left."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from monai.utils import IgniteInfo, min_version, optional_import

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["ProgressHandler", "format_seconds"]

#: Every progress line starts with this (``medcl.benchmark.runs`` echoes the lines that contain it).
PROGRESS_PREFIX = "Progress:"


def format_seconds(seconds: float) -> str:
    """``seconds`` as ``H:MM:SS`` (rounded to whole seconds)."""
    return str(timedelta(seconds=round(max(seconds, 0.0))))


class ProgressHandler:
    """
    Log a trainer's progress as one whole line at most every ``interval`` seconds and at the end of every epoch::

        Progress: epoch 3/20, iteration 60/400 (15%), elapsed 0:00:32, left ~0:03:01

    Totals come from the engine's state (``max_epochs``, ``epoch_length``, ``iteration``); the time left is the
    remaining iterations at the mean rate of the iterations run since this run started (a resumed run does not count
    the iterations it restored). An engine whose ``epoch_length`` is unknown gets lines without totals or time left.

    Use it in a bundle's handler list as ``{"_target_": "medcl.handlers.ProgressHandler", "interval": 10}``.

    Args:
        interval: least number of seconds between two lines logged within an epoch (epoch ends are always logged);
            0 logs every iteration.
        name: logger name, as for MONAI's ``StatsHandler``; ``None`` uses the engine's logger.
        tag: text after ``"Progress:"``, e.g. ``"pretrain"``, to tell the lines of two engines apart.

    Raises:
        ValueError: for a negative ``interval``.
    """

    def __init__(self, interval: float = 10.0, name: str | None = "ProgressHandler", tag: str = "") -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval}.")
        self.interval = float(interval)
        self.name = name
        self.tag = tag
        self.logger = logging.getLogger(name)
        self._start_time = 0.0
        self._start_iteration: int | None = None
        self._last_log = 0.0

    def attach(self, engine: Engine) -> None:
        """Register the handler's events on ``engine`` (a trainer).

        Args:
            engine: the Ignite engine whose progress is logged.
        """
        if self.name is None:
            self.logger = engine.logger
        if not engine.has_event_handler(self.started, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.started)
        if not engine.has_event_handler(self.iteration_completed, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        if not engine.has_event_handler(self.epoch_completed, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def started(self, engine: Engine) -> None:
        """Start the clock. The iteration this run starts from is taken at its first iteration, after handlers that
        restore a killed run's state on ``STARTED`` (:class:`medcl.handlers.RunStateHandler`) have run."""
        self._start_time = self._last_log = time.monotonic()
        self._start_iteration = None

    def _note_start(self, engine: Engine) -> None:
        if self._start_iteration is None:
            self._start_iteration = engine.state.iteration - 1

    def iteration_completed(self, engine: Engine) -> None:
        """Log a line when ``interval`` seconds have passed since the last one (an epoch's last iteration is left to
        :meth:`epoch_completed`)."""
        self._note_start(engine)
        epoch_length = engine.state.epoch_length
        if epoch_length and engine.state.iteration % epoch_length == 0:
            return
        if time.monotonic() - self._last_log >= self.interval:
            self.log(engine)

    def epoch_completed(self, engine: Engine) -> None:
        """Log a line at every epoch end."""
        self._note_start(engine)
        self.log(engine)

    def message(self, engine: Engine) -> str:
        """The progress line for ``engine``'s state now.

        Args:
            engine: the Ignite engine whose progress is described.
        """
        state = engine.state
        elapsed = time.monotonic() - self._start_time
        head = f"{PROGRESS_PREFIX} {self.tag + ', ' if self.tag else ''}"
        epoch = f"epoch {state.epoch}/{state.max_epochs}" if state.max_epochs else f"epoch {state.epoch}"
        total = state.max_epochs * state.epoch_length if state.max_epochs and state.epoch_length else None
        if total is None:
            return f"{head}{epoch}, iteration {state.iteration}, elapsed {format_seconds(elapsed)}"
        done = state.iteration - (state.iteration if self._start_iteration is None else self._start_iteration)
        left = elapsed / done * (total - state.iteration) if done > 0 else float("nan")
        left_text = format_seconds(left) if done > 0 else "unknown"
        return (
            f"{head}{epoch}, iteration {state.iteration}/{total} ({100 * state.iteration / total:.0f}%), "
            f"elapsed {format_seconds(elapsed)}, left ~{left_text}"
        )

    def log(self, engine: Engine) -> None:
        """Log the progress line now and restart the ``interval``.

        Args:
            engine: the Ignite engine whose progress is logged.
        """
        self._last_log = time.monotonic()
        self.logger.info(self.message(engine))
