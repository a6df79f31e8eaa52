"""Learning curves of benchmark cells and the convergence criterion of the benchmark's protocol.

A cell's curve is its training run's ``models/learning_curve.csv`` (:class:`medcl.handlers.LearningCurveWriter`);
cells trained before that file existed fall back to the ``Epoch[N] Metrics -- ...`` and ``Progress: ...`` lines of
their ``train.log``.

**Converged** (docs/benchmark.md): the best validation Dice so far — the score of the checkpoint the cell selects,
``model.pt`` — gains less than :data:`CONVERGED_GAIN` (0.01) over the last quarter of the training iterations. The
best-so-far curve is used rather than single validations, which swing by ±0.1 on 5 small validation volumes.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path

from medcl.handlers.learning_curve import read_learning_curve

__all__ = ["CONVERGED_GAIN", "TAIL", "cell_curve", "convergence", "write_learning_curves"]

#: Largest gain of the best-so-far validation Dice over the last :data:`TAIL` of training for a converged run.
CONVERGED_GAIN = 0.01
#: Share of the training iterations the criterion looks at (the last quarter).
TAIL = 0.25
KEY = "val_mean_dice"

_METRICS = re.compile(r"Epoch\[(\d+)\] Metrics -- (.*)$")
_PAIR = re.compile(r"(\w+): (-?[\d.]+(?:e-?\d+)?|nan)")
_PROGRESS = re.compile(r"Progress: epoch (\d+)/\d+, iteration (\d+)/")


def _curve_from_log(log: Path) -> list[dict[str, float]]:
    by_epoch: dict[int, dict[str, float]] = {}
    iterations: dict[int, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        if m := _METRICS.search(line):
            by_epoch.setdefault(int(m[1]), {}).update({k: float(v) for k, v in _PAIR.findall(m[2])})
        elif m := _PROGRESS.search(line):
            iterations[int(m[1])] = int(m[2])
    rows, best = [], -math.inf
    for epoch in sorted(e for e, r in by_epoch.items() if KEY in r):
        best = max(best, by_epoch[epoch][KEY])
        row = {"epoch": epoch, "iteration": iterations.get(epoch, math.nan), **by_epoch[epoch], f"best_{KEY}": best}
        rows.append(row)
    return rows


def cell_curve(cell_dir: Path | str) -> list[dict[str, float]]:
    """The validation rows of a cell: ``epoch``, ``iteration``, ``val_mean_dice``, ``best_val_mean_dice``, ...;
    ``[]`` when the cell has neither a learning-curve file nor a training log with validation lines."""
    cell_dir = Path(cell_dir)
    rows = read_learning_curve(cell_dir / "models" / "learning_curve.csv")
    if rows:
        return rows
    log = cell_dir / "train.log"
    return _curve_from_log(log) if log.is_file() else []


def convergence(
    rows: Sequence[dict[str, float]], iterations: float, tail: float = TAIL, tol: float = CONVERGED_GAIN
) -> dict[str, float | bool] | None:
    """The protocol's convergence check of one run.

    Args:
        rows: validation rows (:func:`cell_curve`) with ``iteration`` and ``val_mean_dice``.
        iterations: the run's training iterations (the tail is measured from ``(1 - tail) * iterations``).
        tail: share of the iterations at the end of training to look at.
        tol: largest gain of the best-so-far score over the tail for a converged run.

    Returns:
        ``{"tail_gain": best overall - best before the tail, "converged": tail_gain < tol}``, or None when no
        validation falls before the tail or none within it (too few validations to tell).
    """
    cut = (1.0 - tail) * iterations
    scored = [(r["iteration"], r[KEY]) for r in rows if not math.isnan(r.get(KEY, math.nan))]
    before = [s for i, s in scored if i <= cut]
    within = [s for i, s in scored if i > cut]
    if not before or not within:
        return None
    gain = max(before + within) - max(before)
    return {"tail_gain": round(gain, 4), "converged": gain < tol}


def _label(row: dict) -> str:
    n = row.get("num_labelled")
    frac = row["label_fraction"]
    return f"{frac:.0%} ({n} vol.)" if n else f"{frac:.0%}"


def write_learning_curves(run_dir: Path | str, cells: Sequence[dict]) -> dict[str, Path] | None:
    """Write ``learning_curves.csv`` (one row per cell and validation) and ``learning_curves.png`` (one panel per
    label budget: each seed's validation Dice thin, the mean over seeds of the best so far thick, the last quarter
    shaded) for the run's cells.

    Args:
        run_dir: the run folder (cells in ``cells/<name>/``).
        cells: the cells' records (``cell.json`` contents with their ``cell`` folder name).

    Returns:
        the two paths, or None when no cell has a curve.
    """
    run_dir = Path(run_dir)
    curves = [(c, cell_curve(run_dir / "cells" / c["cell"])) for c in cells if c.get("cell")]
    curves = [(c, rows) for c, rows in curves if rows]
    if not curves:
        return None
    paths = {"csv": run_dir / "learning_curves.csv", "png": run_dir / "learning_curves.png"}
    columns = ["method", "label_fraction", "num_labelled", "seed", "epoch", "iteration", KEY, f"best_{KEY}"]
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for c, rows in curves:
            for r in rows:
                values = {k: r.get(k, "") for k in columns[4:]}
                values.update({k: int(values[k]) for k in ("epoch", "iteration") if _whole(values[k])})
                writer.writerow({**{k: c.get(k, "") for k in columns[:4]}, **values})
    _plot(curves, paths["png"])
    return paths


def _plot(curves: Sequence[tuple[dict, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({c["label_fraction"] for c, _ in curves})
    methods = list(dict.fromkeys(c["method"] for c, _ in curves))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 * len(budgets), 3.6), dpi=110, squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        label = ""
        for m in methods:
            runs = [(c, rows) for c, rows in curves if c["method"] == m and c["label_fraction"] == budget]
            for c, rows in runs:
                label = _label(c)
                ax.plot([r["iteration"] for r in rows], [r[KEY] for r in rows], color=colours[m], alpha=0.25, lw=0.8)
            if runs:
                steps = sorted({r["iteration"] for _, rows in runs for r in rows})
                best = [_mean([_best_at(rows, s) for _, rows in runs]) for s in steps]
                ax.plot(steps, best, color=colours[m], lw=2, label=f"{m} ({len(runs)} seeds)")
        end = max(c.get("iterations") or 0 for c, _ in curves if c["label_fraction"] == budget)
        if end:
            ax.axvspan((1 - TAIL) * end, end, color="grey", alpha=0.1, lw=0)
        ax.set_title(f"labels {label}", fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation mean Dice")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("thin: each seed's validations; thick: mean best so far; shaded: last quarter", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _whole(value: object) -> bool:
    return isinstance(value, float) and value.is_integer()


def _best_at(rows: Sequence[dict], iteration: float) -> float:
    seen = [r[KEY] for r in rows if r["iteration"] <= iteration and not math.isnan(r[KEY])]
    return max(seen) if seen else math.nan


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan
