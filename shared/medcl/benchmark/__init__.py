"""Label-efficiency benchmark: method bundle x label fraction x seed -> CSV, Markdown table and plot.

Run it as ``python scripts/benchmark.py`` or ``python -m medcl.benchmark`` (see :mod:`medcl.benchmark.cli`).
"""

from medcl.benchmark.grid import METHODS, PRESETS, Method
from medcl.benchmark.runs import BenchmarkError, read_case_dice, read_dice, run_bundle

__all__ = [
    "BenchmarkError",
    "Method",
    "METHODS",
    "PRESETS",
    "read_case_dice",
    "read_dice",
    "run_bundle",
]
