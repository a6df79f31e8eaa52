"""Benchmark outputs: ``label_efficiency.csv`` (one row per cell), a Markdown table and a PNG plot."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

__all__ = ["collect_cells", "markdown_table", "plot", "write_csv", "write_reports"]

_FIRST = ["method", "backbone", "bundle", "label_fraction", "num_labelled", "seed", "mean_dice"]
_LAST = ["train_s", "pretrain_s", "iterations", "pretrain_iterations", "peak_rss_mib", "pretrain_peak_rss_mib"]


def collect_cells(run_dir: Path | str) -> list[dict]:
    """Every finished cell of a run (``cells/*/cell.json``), sorted by method, fraction and seed."""
    rows = [json.loads(p.read_text()) for p in sorted(Path(run_dir).glob("cells/*/cell.json"))]
    return sorted(rows, key=lambda r: (r["method"], r["label_fraction"], r["seed"]))


def write_csv(rows: Sequence[dict], path: Path | str) -> None:
    """One row per cell: method, backbone, fraction, seed, Dice per class, mean Dice, times, iterations, memory."""
    dice = sorted({k for r in rows for k in r if k.startswith("dice_")})
    columns = _FIRST + dice + _LAST
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in columns})


def _stats(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown_table(rows: Sequence[dict], baselines: dict[str, str | None]) -> str:
    """
    Mean ± sd of the mean Dice per method (rows) and label fraction (columns), the number of seeds in brackets,
    the best mean of each column in bold, and Δ = the mean paired difference to the method's baseline (same seeds,
    same fraction) where the baseline was run.
    """
    fractions = sorted({r["label_fraction"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell: dict[tuple[str, float], dict[int, float]] = {}
    for r in rows:
        cell.setdefault((r["method"], r["label_fraction"]), {})[r["seed"]] = float(r["mean_dice"])
    best = {
        f: max((_stats(list(v.values()))[0] for (m, g), v in cell.items() if g == f), default=math.nan)
        for f in fractions
    }
    head = (
        "| method | backbone | " + " | ".join(f"{f:g} labels" if f > 1 else f"{f:.0%} labels" for f in fractions) + " |"
    )
    lines = [head, "|---|---|" + "---|" * len(fractions)]
    backbone = {r["method"]: r["backbone"] for r in rows}
    for m in methods:
        parts = []
        for f in fractions:
            seeds = cell.get((m, f))
            if not seeds:
                parts.append("–")
                continue
            mean, sd = _stats(list(seeds.values()))
            text = f"{mean:.3f} ± {sd:.3f} ({len(seeds)})"
            if mean == best[f]:
                text = f"**{text}**"
            base = cell.get((baselines.get(m), f)) if baselines.get(m) else None
            common = sorted(set(seeds) & set(base)) if base else []
            if common:
                diffs = [seeds[s] - base[s] for s in common]
                text += f" Δ {statistics.fmean(diffs):+.3f}"
            parts.append(text)
        lines.append(f"| {m} | {backbone[m]} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: Path | str, title: str = "") -> None:
    """Mean Dice vs label fraction, one line per method, error bars = sd over seeds (log x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m in dict.fromkeys(r["method"] for r in rows):
        fractions = sorted({r["label_fraction"] for r in rows if r["method"] == m})
        stats = [
            _stats([float(r["mean_dice"]) for r in rows if r["method"] == m and r["label_fraction"] == f])
            for f in fractions
        ]
        ax.errorbar(fractions, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ticks = sorted({r["label_fraction"] for r in rows})
    ax.set_xticks(ticks, [f"{t:.0%}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("label fraction")
    ax.set_ylabel("mean Dice (validation)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(run_dir: Path | str, baselines: dict[str, str | None], title: str = "") -> dict[str, Path]:
    """Write ``label_efficiency.csv``, ``label_efficiency.md`` and ``label_efficiency.png`` from the run's cells."""
    run_dir = Path(run_dir)
    rows = collect_cells(run_dir)
    paths = {k: run_dir / f"label_efficiency.{k}" for k in ("csv", "md", "png")}
    write_csv(rows, paths["csv"])
    table = markdown_table(rows, baselines) if rows else "(no finished cells)"
    paths["md"].write_text(f"{title}\n\n{table}\n" if title else table + "\n")
    if rows:
        plot(rows, paths["png"], title)
    return paths
