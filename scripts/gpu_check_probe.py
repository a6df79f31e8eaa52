"""A measuring handler that scripts/gpu_check.py adds to a bundle's trainer (a config fragment, ``+initialize``).

It times every iteration (CUDA events on a GPU, ``time.perf_counter`` otherwise), records the peak GPU memory, the
loss of each iteration and the AMP ``GradScaler`` state when the run starts (after ``--resume true`` loaded the run
state) and when it ends, and writes them as one JSON file when the trainer completes. It changes nothing in the run,
except with ``cpu_scaler``: then a CPU ``torch.amp.GradScaler`` replaces MONAI's scaler (which MONAI only builds
for CUDA), so that the GradScaler round trip through ``--resume true`` can be tested without a GPU.

The fragment scripts/gpu_check.py writes (``scripts/`` on ``PYTHONPATH``)::

    {"+imports": ["$import gpu_check_probe"],
     "+initialize": ["$gpu_check_probe.StepProbe('<out>.json', cpu_scaler=None).attach(@train#trainer)"]}
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events

__all__ = ["StepProbe", "loss_of", "summarize_times"]


def loss_of(output: Any) -> float | None:
    """The total loss of a trainer's ``state.output``: a decollated ``[{"loss": ...}, ...]``, a dict, or a tensor.

    Returns:
        the loss as a float, or None when the output holds none.
    """
    if isinstance(output, (list, tuple)) and output:
        output = output[0]
    if isinstance(output, Mapping):
        output = output.get("loss")
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return float(output.detach())
    if isinstance(output, (int, float)):
        return float(output)
    return None


def summarize_times(ms: list[float], skip: int = 1) -> dict[str, float | int | None]:
    """Median, 90th percentile, mean and count of step times, the first ``skip`` (warm-up) left out.

    Args:
        ms: step times in milliseconds, in iteration order.
        skip: warm-up iterations not counted (cuDNN autotuning, allocator growth); all are used when fewer remain.

    Returns:
        ``{"n", "first_ms", "median_ms", "p90_ms", "mean_ms"}`` (None values for an empty list).
    """
    if not ms:
        return {"n": 0, "first_ms": None, "median_ms": None, "p90_ms": None, "mean_ms": None}
    steady = ms[skip:] if len(ms) > skip else ms
    ordered = sorted(steady)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {
        "n": len(steady),
        "first_ms": round(ms[0], 3),
        "median_ms": round(statistics.median(steady), 3),
        "p90_ms": round(p90, 3),
        "mean_ms": round(statistics.fmean(steady), 3),
    }


class StepProbe:
    """Time the iterations of a trainer and record memory, losses and the GradScaler state (see the module docstring).

    Args:
        path: the JSON file written when the trainer completes.
        cpu_scaler: without CUDA, ``torch.amp.GradScaler("cpu", **cpu_scaler)`` replaces the scaler MONAI's
            ``Trainer.run()`` builds (a CUDA one, disabled without CUDA); None (default) keeps MONAI's. Needs ``amp``
            true in the config (the trainer only scales with ``amp``).
        skip: warm-up iterations left out of the step-time statistics. Defaults to 1.
    """

    def __init__(self, path: str, cpu_scaler: Mapping[str, Any] | None = None, skip: int = 1) -> None:
        self.path = os.fspath(path)
        self.cpu_scaler = None if cpu_scaler is None else dict(cpu_scaler)
        self.skip = int(skip)
        self.cuda = torch.cuda.is_available()
        self._events: list[tuple[Any, Any]] = []
        self._wall_ms: list[float] = []
        self._wait_s = 0.0
        self._losses: list[float | None] = []
        self._t_iter = self._t_done = self._t_start = 0.0
        self._start: Any = None
        self.scaler_at_start: dict | None = None

    def attach(self, engine: Engine) -> StepProbe:
        """Install the CPU scaler (with ``cpu_scaler``) and the event handlers; attach after the run-state handler,
        so that the state recorded at the start is the loaded one.

        Returns:
            this probe.
        """
        if self.cpu_scaler is not None and not torch.cuda.is_available():
            # MONAI's Trainer.run() builds ``torch.cuda.amp.GradScaler()`` (disabled without CUDA) and then runs the
            # engine; this run() does the same with a CPU scaler, so the run-state handler (at STARTED) sees it.
            from monai.engines.workflow import Workflow

            kwargs = self.cpu_scaler

            def run_with_cpu_scaler() -> None:
                engine.scaler = torch.amp.GradScaler("cpu", **kwargs) if engine.amp else None
                Workflow.run(engine)

            engine.run = run_with_cpu_scaler
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)
        return self

    @staticmethod
    def _scaler_state(engine: Engine) -> dict | None:
        scaler = getattr(engine, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return {k: (float(v) if isinstance(v, float) else v) for k, v in scaler.state_dict().items()}

    def _started(self, engine: Engine) -> None:
        self.scaler_at_start = self._scaler_state(engine)
        self._start_iteration = engine.state.iteration
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._t_start = self._t_done = time.perf_counter()

    def _iteration_started(self, engine: Engine) -> None:
        self._t_iter = time.perf_counter()
        self._wait_s += self._t_iter - self._t_done  # loading the batch (and handlers between iterations)
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def _iteration_completed(self, engine: Engine) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        self._t_done = time.perf_counter()
        self._wall_ms.append(1000.0 * (self._t_done - self._t_iter))
        self._losses.append(loss_of(engine.state.output))

    def _completed(self, engine: Engine) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        total_s = time.perf_counter() - self._t_start
        step_ms = [s.elapsed_time(e) for s, e in self._events] if self.cuda else self._wall_ms
        n = len(self._wall_ms)
        losses = [x for x in self._losses if x is not None]
        record = {
            "device": torch.cuda.get_device_name(0) if self.cuda else "cpu",
            "timer": "cuda_events" if self.cuda else "perf_counter",
            "amp": bool(getattr(engine, "amp", False)),
            "iterations": n,
            "first_iteration": self._start_iteration + 1,
            "step": summarize_times(step_ms, self.skip),
            "iter_per_s": round(n / total_s, 3) if total_s > 0 else None,
            "data_wait_fraction": round(self._wait_s / total_s, 4) if total_s > 0 else None,
            "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if self.cuda else None,
            "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1) if self.cuda else None,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
            "scaler_at_start": self.scaler_at_start,
            "scaler_at_end": self._scaler_state(engine),
        }
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, self.path)
