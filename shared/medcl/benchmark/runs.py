"""Run one bundle workflow as ``python -m monai.bundle run`` in a subprocess, and read its Dice from MetricsSaver."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from medcl.errors import MedclInputError

__all__ = ["BenchmarkError", "RunResult", "bundle_command", "echo_text", "read_case_dice", "read_dice", "run_bundle"]

#: Log lines echoed while a run goes on (``medcl.handlers.ProgressHandler`` writes the ``Progress:`` lines).
PROGRESS = ("Progress:", "Metrics -- val_mean_dice", "pretrain_loss:", "Train completed", "Error")

#: A log line's prefix: ``%(asctime)s - %(name)s - %(levelname)s - `` (the bundles' ``logging.conf``) or, from
#: MONAI's own loggers, ``%(asctime)s - %(levelname)s - ``.
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - (?:\S+ - )?(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) - ")


def echo_text(line: str) -> str:
    """The text of a log line to echo: the whole message, without the logging prefix (date, logger, level)."""
    return _LOG_PREFIX.sub("", line.rstrip())


class BenchmarkError(RuntimeError):
    """A bundle run failed; the message names its log."""


class RunResult(dict):
    """``{"wall_s": seconds, "peak_rss_mib": peak resident memory of the subprocess}``."""


def bundle_command(configs: Sequence[Path | str], overrides: Mapping[str, object]) -> list[str]:
    """The ``python -m monai.bundle run`` command line: ``configs`` (merged in order), ``--key value`` overrides."""
    configs = [str(c) for c in configs]
    config_arg = configs[0] if len(configs) == 1 else repr(configs)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg]
    for key, value in overrides.items():
        cmd += [f"--{key}", repr(value) if isinstance(value, (list, tuple)) else str(value)]
    return cmd


def run_bundle(
    configs: Sequence[Path | str],
    overrides: Mapping[str, object],
    log: Path,
    cwd: Path | None = None,
    echo: Sequence[str] = PROGRESS,
    prefix: str = "    ",
) -> RunResult:
    """
    Run a bundle workflow, write its output to ``log`` and echo the lines containing one of ``echo``, each whole
    (see :func:`echo_text`), prefixed with ``prefix``.

    Returns:
        wall time and peak resident memory (MiB, from the child's own ``rusage``).

    Raises:
        BenchmarkError: when the run exits with a non-zero status (the message gives the log's last error line).
    """
    cmd = bundle_command(configs, overrides)
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "a") as f:  # appended: a resumed run keeps the killed run's log above its own
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        last_error = ""
        for line in proc.stdout:
            f.write(line)
            if "Error" in line:
                last_error = line.strip()
            if any(p in line for p in echo):
                print(f"{prefix}{echo_text(line)}", flush=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise BenchmarkError(
            f"bundle run failed (exit {proc.returncode}): {last_error or '(no error line)'}; see {log}"
        )
    return RunResult(wall_s=round(time.time() - start, 1), peak_rss_mib=round(usage.ru_maxrss / 1024, 1))


def _dice_rows(eval_dir: Path | str) -> list[dict[str, str]]:
    """Rows of MONAI's ``MetricsSaver`` CSV ``<eval_dir>/val_mean_dice_raw.csv`` (one per evaluated volume)."""
    path = Path(eval_dir) / "val_mean_dice_raw.csv"
    if not path.is_file():
        raise MedclInputError(f"{path} is missing: run the bundle's evaluate.json first.")
    with open(path) as f:
        return list(csv.DictReader(f))


def read_dice(eval_dir: Path | str, label_names: Sequence[str]) -> dict[str, float]:
    """
    Mean Dice per foreground class and overall (``"mean"``) from MONAI's ``MetricsSaver`` CSV
    ``<eval_dir>/val_mean_dice_raw.csv`` (one row per validation volume; a class absent from a volume is NaN there
    and left out of its mean).

    Raises:
        MedclInputError: when the CSV is missing.
    """
    rows = _dice_rows(eval_dir)
    result = {}
    for i, name in enumerate(label_names[1:]):
        values = [float(r[f"class{i}"]) for r in rows if r.get(f"class{i}") not in (None, "nan", "")]
        result[name] = sum(values) / len(values) if values else float("nan")
    result["mean"] = sum(float(r["mean"]) for r in rows) / len(rows) if rows else float("nan")
    return result


def read_case_dice(eval_dir: Path | str) -> dict[str, float]:
    """
    Mean Dice per evaluated volume, ``{file name: mean Dice}``, from ``<eval_dir>/val_mean_dice_raw.csv`` (its
    ``filename`` column is the image path; the key is its base name).

    Raises:
        MedclInputError: when the CSV is missing.
    """
    return {os.path.basename(r["filename"]): float(r["mean"]) for r in _dice_rows(eval_dir)}
