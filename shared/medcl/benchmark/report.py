"""Benchmark outputs: ``label_efficiency.csv`` (one row per cell), a Markdown report and a PNG plot.

Each cell records the Dice of the validation-selected checkpoint (``model.pt``: ``mean_dice``, ``dice_<class>``,
``case_dice``) and of the last one (``model_final.pt``: ``mean_dice_final``, ``final_dice_<class>``,
``case_dice_final``) on the split it was scored on (``eval_split``: ``test`` for the benchmark; cells of older runs
have no ``eval_split`` and were scored on ``val``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from medcl.benchmark.curves import CONVERGED_GAIN, TAIL, cell_curve, convergence, write_learning_curves
from medcl.benchmark.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, PairedDiff, mean_sd, paired_diff, t_interval

__all__ = [
    "CHECKPOINTS",
    "collect_cells",
    "convergence_table",
    "dice_table",
    "diff_table",
    "markdown_table",
    "paired_diffs",
    "plot",
    "write_csv",
    "write_reports",
]

_FIRST = ["method", "backbone", "bundle", "label_fraction", "num_labelled", "seed", "eval_split", "num_test"]
_FIRST += ["mean_dice", "mean_dice_final"]
_LAST = [
    "tail_gain",
    "converged",
    "train_s",
    "pretrain_s",
    "iterations",
    "pretrain_iterations",
    "peak_rss_mib",
    "pretrain_peak_rss_mib",
]
_LAST += ["test_fraction", "test_seed"]

#: checkpoint file -> (key of its mean Dice in a cell, key of its per-case Dice).
CHECKPOINTS = {"model.pt": ("mean_dice", "case_dice"), "model_final.pt": ("mean_dice_final", "case_dice_final")}
NA_ONE_SEED = "n/a (1 seed)"


def collect_cells(run_dir: Path | str) -> list[dict]:
    """Every finished cell of a run (``cells/*/cell.json``, plus ``cell``: its folder name), sorted by method,
    fraction and seed; cells recorded without a convergence check get it from their learning curve."""
    rows = []
    for p in sorted(Path(run_dir).glob("cells/*/cell.json")):
        row = {**json.loads(p.read_text()), "cell": p.parent.name}
        if "converged" not in row and row.get("iterations"):
            row.update(convergence(cell_curve(p.parent), row["iterations"]) or {})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["method"], r["label_fraction"], r["seed"]))


def write_csv(rows: Sequence[dict], path: Path | str) -> None:
    """One row per cell: method, backbone, fraction, seed, split, Dice per class and mean of both checkpoints,
    times, iterations, memory."""
    dice = sorted({k for r in rows for k in r if k.startswith("dice_")})
    final = sorted({k for r in rows for k in r if k.startswith("final_dice_")})
    columns = _FIRST + dice + final + _LAST
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in columns})


def _label(fraction: float) -> str:
    return f"{fraction:g}" if fraction > 1 else f"{fraction:.0%}"


def _grid(rows: Sequence[dict], key: str) -> dict[tuple[str, float], dict[int, float]]:
    """(method, fraction) -> {seed: value of ``key``} over the cells that have it."""
    out: dict[tuple[str, float], dict[int, float]] = {}
    for r in rows:
        if r.get(key) not in (None, ""):
            out.setdefault((r["method"], r["label_fraction"]), {})[r["seed"]] = float(r[key])
    return out


def _cases(rows: Sequence[dict], key: str) -> dict[tuple[str, float], dict[int, dict[str, float]]]:
    out: dict[tuple[str, float], dict[int, dict[str, float]]] = {}
    for r in rows:
        if r.get(key):
            out.setdefault((r["method"], r["label_fraction"]), {})[r["seed"]] = {c: float(v) for c, v in r[key].items()}
    return out


def _ms(seeds: dict[int, float] | None) -> str:
    if not seeds:
        return "–"
    mean, sd = mean_sd(list(seeds.values()))
    return f"{mean:.3f} ± {sd:.3f} ({len(seeds)})"


def dice_table(rows: Sequence[dict]) -> str:
    """Mean ± sd over seeds (number of seeds) of the mean Dice per method and label budget, for ``model.pt`` and
    ``model_final.pt``; the best ``model.pt`` mean of each budget in bold.

    Args:
        rows: the cells (:func:`collect_cells`).

    Returns:
        a Markdown table with one row per method and label budget.
    """
    fractions = sorted({r["label_fraction"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    backbone = {r["method"]: r["backbone"] for r in rows}
    grids = {ckpt: _grid(rows, key) for ckpt, (key, _) in CHECKPOINTS.items()}
    selected = grids["model.pt"]
    best = {
        f: max((mean_sd(list(v.values()))[0] for (m, g), v in selected.items() if g == f and v), default=math.nan)
        for f in fractions
    }
    lines = ["| method | backbone | labels | " + " | ".join(CHECKPOINTS) + " |", "|---|---|---|---|---|"]
    for m in methods:
        for f in fractions:
            if (m, f) not in selected and (m, f) not in grids["model_final.pt"]:
                continue
            parts = []
            for ckpt, grid in grids.items():
                text = _ms(grid.get((m, f)))
                if ckpt == "model.pt" and grid.get((m, f)) and mean_sd(list(grid[(m, f)].values()))[0] == best[f]:
                    text = f"**{text}**"
                parts.append(text)
            lines.append(f"| {m} | {backbone[m]} | {_label(f)} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def _ci(ci: tuple[float, float] | None, n: int, missing: str = "–") -> str:
    if n < 2:
        return NA_ONE_SEED
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else missing


def paired_diffs(
    rows: Sequence[dict], baselines: dict[str, str | None]
) -> list[tuple[str, str, float, str, PairedDiff]]:
    """The paired differences of every method whose control ran the same label budget with a common seed.

    Args:
        rows: the cells (:func:`collect_cells`).
        baselines: method -> its control (``Method.baseline``), None for a control itself.

    Returns:
        ``(method, control, fraction, checkpoint, PairedDiff)`` tuples, sorted by method, fraction, checkpoint.
    """
    out = []
    fractions = sorted({r["label_fraction"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ckpt, (key, case_key) in CHECKPOINTS.items():
        grid, cases = _grid(rows, key), _cases(rows, case_key)
        for m in methods:
            control = baselines.get(m)
            for f in fractions:
                if not control or (m, f) not in grid or (control, f) not in grid:
                    continue
                d = paired_diff(grid[(m, f)], grid[(control, f)], cases.get((m, f)), cases.get((control, f)))
                if d is not None:
                    out.append((m, control, f, ckpt, d))
    return sorted(out, key=lambda t: (t[0], t[2], t[3]))


def diff_table(rows: Sequence[dict], baselines: dict[str, str | None]) -> str:
    """Paired difference to each method's control: Δ (mean over common seeds), the 95 % t-interval over seeds, the
    95 % bootstrap interval over test cases x seeds, and the wins; ``n/a (1 seed)`` where one seed gives no interval.

    Args:
        rows: the cells (:func:`collect_cells`).
        baselines: method -> its control (``Method.baseline``), None for a control itself.

    Returns:
        a Markdown table with one row per method, label budget and checkpoint; empty when no method has its control
        in the run.
    """
    diffs = paired_diffs(rows, baselines)
    if not diffs:
        return ""
    lines = [
        "| method | control | labels | checkpoint | Δ | 95 % CI (t, seeds) "
        "| 95 % CI (bootstrap, cases × seeds) | wins |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, control, f, ckpt, d in diffs:
        lines.append(
            f"| {m} | {control} | {_label(f)} | {ckpt} | {d.mean:+.3f} | {_ci(d.t_ci, d.n)} | "
            f"{_ci(d.bootstrap_ci, d.n, 'n/a (no per-case Dice)')} | {d.wins}/{d.n} |"
        )
    return "\n".join(lines)


def convergence_table(rows: Sequence[dict]) -> str:
    """Convergence per method and label budget: the iterations, the gain of the best validation Dice over the last
    quarter of training (mean and largest over seeds) and the seeds that count as converged.

    Args:
        rows: the cells (:func:`collect_cells`).

    Returns:
        a Markdown table; empty when no cell has a learning curve long enough to tell.
    """
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        if r.get("converged") not in (None, ""):
            groups.setdefault((r["method"], r["label_fraction"]), []).append(r)
    if not groups:
        return ""
    lines = [
        "| method | labels | iterations | best-Dice gain over the last quarter (mean, max) | converged seeds |",
        "|---|---|---|---|---|",
    ]
    for (m, f), cells in groups.items():
        gains = [float(c["tail_gain"]) for c in cells]
        iters = "/".join(str(i) for i in sorted({c.get("iterations") for c in cells}))
        done = sum(c["converged"] in (True, "True") for c in cells)
        lines.append(
            f"| {m} | {_label(f)} | {iters} | {sum(gains) / len(gains):+.3f}, {max(gains):+.3f} | {done}/{len(cells)} |"
        )
    return "\n".join(lines)


def _split_text(rows: Sequence[dict]) -> str:
    splits = {r.get("eval_split", "val") for r in rows}
    if splits == {"test"}:
        sizes = sorted({r["num_test"] for r in rows if r.get("num_test")})
        return f"the **test** split ({', '.join(map(str, sizes)) or '?'} cases, the same for every budget and seed)"
    if splits == {"val"}:
        return "the **validation** split (the cases that also selected `model.pt`: optimistic)"
    return "mixed splits (see the CSV's `eval_split`)"


def markdown_table(rows: Sequence[dict], baselines: dict[str, str | None]) -> str:
    """The Markdown report: the Dice table (:func:`dice_table`) and the paired-difference table (:func:`diff_table`),
    each with a sentence saying what it shows."""
    text = (
        f"Mean Dice on {_split_text(rows)}, mean ± sd over seeds (number of seeds); `model.pt` is the checkpoint "
        "selected on the validation cases, `model_final.pt` the last one. Best `model.pt` mean per budget in bold.\n\n"
        + dice_table(rows)
    )
    diffs = diff_table(rows, baselines)
    if diffs:
        text += (
            "\n\nPaired difference to the method's control (same label budget, seed, split and test set): Δ = mean "
            "over seeds of method − control; 95 % CI by the t-interval over seeds and by a percentile bootstrap over "
            f"test cases × seeds ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); wins = seeds where the "
            f"method scores higher. One seed gives no interval ({NA_ONE_SEED}).\n\n" + diffs
        )
    conv = convergence_table(rows)
    if conv:
        text += (
            f"\n\nConvergence: a cell is converged when its best validation Dice gains < {CONVERGED_GAIN} over the "
            f"last {TAIL:.0%} of its iterations (curves: `learning_curves.csv` / `.png`).\n\n" + conv
        )
    return text


def plot(rows: Sequence[dict], path: Path | str, title: str = "") -> None:
    """Mean Dice (``model.pt``) vs label fraction, one line per method, error bars = 95 % t-interval of the mean over
    seeds (none where a point has one seed), log x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m in dict.fromkeys(r["method"] for r in rows):
        fractions = sorted({r["label_fraction"] for r in rows if r["method"] == m})
        means, errs = [], [[], []]
        for f in fractions:
            values = [float(r["mean_dice"]) for r in rows if r["method"] == m and r["label_fraction"] == f]
            mean = mean_sd(values)[0]
            ci = t_interval(values)
            means.append(mean)
            errs[0].append(mean - ci[0] if ci else 0.0)
            errs[1].append(ci[1] - mean if ci else 0.0)
        ax.errorbar(fractions, means, yerr=errs, marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ticks = sorted({r["label_fraction"] for r in rows})
    ax.set_xticks(ticks, [f"{t:.0%}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("label fraction")
    splits = {r.get("eval_split", "val") for r in rows}
    ax.set_ylabel(f"mean Dice ({'/'.join(sorted(splits))}, model.pt)")
    ax.set_title((title + "\n" if title else "") + "error bars: 95 % t-interval over seeds", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(run_dir: Path | str, baselines: dict[str, str | None], title: str = "") -> dict[str, Path]:
    """Write ``label_efficiency.csv``, ``label_efficiency.md`` and ``label_efficiency.png`` from the run's cells, and
    ``learning_curves.csv`` / ``.png`` where the cells have curves."""
    run_dir = Path(run_dir)
    rows = collect_cells(run_dir)
    paths = {k: run_dir / f"label_efficiency.{k}" for k in ("csv", "md", "png")}
    write_csv(rows, paths["csv"])
    table = markdown_table(rows, baselines) if rows else "(no finished cells)"
    paths["md"].write_text(f"{title}\n\n{table}\n" if title else table + "\n")
    if rows:
        plot(rows, paths["png"], title)
        paths.update({f"curves_{k}": v for k, v in (write_learning_curves(run_dir, rows) or {}).items()})
    return paths
