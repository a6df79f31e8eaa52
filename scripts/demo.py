"""CPU demo: synthetic phantom -> scratch-baseline training at 10 % and 100 % of the labels -> Dice table.

Every step is a real ``python -m monai.bundle run`` of a bundle in ``bundles/``; logs, checkpoints and metrics
land under ``--out`` (default ``demo_runs/``). Run through ``bash scripts/demo.sh``, which sets up ``.venv``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
PROGRESS = ("Metrics -- val_mean_dice", "Train completed", "Error")


def _bundle_run(configs: list[Path], overrides: dict, log: Path) -> float:
    """Run one bundle workflow in a subprocess, echo its progress lines, return wall seconds."""
    config_arg = str(configs[0]) if len(configs) == 1 else repr([str(c) for c in configs])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        for line in proc.stdout:
            f.write(line)
            if any(p in line for p in PROGRESS):
                print(f"    {line.rstrip()[-110:]}", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"[demo] step failed (exit {proc.returncode}); see {log}")
    return time.time() - start


def _dice_per_class(eval_dir: Path, label_names: list[str]) -> dict[str, float]:
    """Mean Dice per foreground class and overall from MONAI's MetricsSaver CSV (one row per validation volume)."""
    with open(eval_dir / "val_mean_dice_raw.csv") as f:
        rows = list(csv.DictReader(f))
    result = {}
    for i, name in enumerate(label_names[1:]):
        values = [float(r[f"class{i}"]) for r in rows if r[f"class{i}"] not in ("nan", "")]
        result[name] = sum(values) / len(values) if values else float("nan")
    result["mean"] = sum(float(r["mean"]) for r in rows) / len(rows)
    return result


def main(
    out: str = "demo_runs",
    dataset_dir: str = "data/phantom",
    n: int = 40,
    seed: int = 0,
    fractions: tuple = (0.1, 1.0),
    spatial_dims: int = 2,
    patch_size: int = 64,
    max_epochs: int = 20,
    epoch_length: int = 20,
    num_workers: int = 2,
) -> None:
    """Run the demo and print a Markdown Dice table (also written to ``<out>/results.md`` and ``results.json``).

    Args:
        out: folder for every run's checkpoints, logs and metrics.
        dataset_dir: phantom location; generated with ``n`` cases and ``seed`` if it has no dataset.json.
        n: phantom training cases (20 % are held out for validation).
        seed: training and split seed.
        fractions: label fractions to train the scratch baseline with.
        spatial_dims: 2 (slice-wise, default) or 3.
        patch_size: training patch (in-plane size for 2D).
        max_epochs, epoch_length: training length (epochs x iterations per epoch), the same for every run.
        num_workers: data-loader workers.
    """
    t0 = time.time()
    out_dir, data = (REPO / out).resolve(), (REPO / dataset_dir).resolve()
    if not (data / "dataset.json").is_file():
        from medcl.data.phantom import generate_dataset

        print(f"[demo] generating the phantom ({n} cases) in {data}", flush=True)
        generate_dataset(str(data), n=n, seed=0)
    from medcl.data import read_dataset_info

    info = read_dataset_info(str(data))
    common = {"dataset_dir": data, "seed": seed, "spatial_dims": spatial_dims, "patch_size": patch_size,
              "max_epochs": max_epochs, "epoch_length": epoch_length, "val_interval": max(1, max_epochs // 5),
              "num_workers": num_workers}
    configs = BUNDLES / "scratch_baseline" / "configs"
    rows = []
    for fraction in fractions:
        root = out_dir / f"scratch_f{fraction:g}_s{seed}"
        run = {**common, "bundle_root": root, "label_fraction": fraction}
        print(f"[demo] scratch baseline, {fraction:.0%} labels: train ({max_epochs * epoch_length} iterations)", flush=True)
        train_s = _bundle_run([configs / "train.json"], run, root / "train.log")
        print(f"[demo] scratch baseline, {fraction:.0%} labels: evaluate on the validation volumes", flush=True)
        _bundle_run([configs / "train.json", configs / "evaluate.json"], run, root / "evaluate.log")
        rows.append({"method": "scratch", "label_fraction": fraction, "train_s": round(train_s, 1),
                     **_dice_per_class(root / "eval", info.label_names)})
    names = info.label_names[1:]
    lines = ["| method | labels | " + " | ".join(names) + " | mean Dice | train time |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['label_fraction']:.0%} | " + " | ".join(f"{r[k]:.3f}" for k in names)
                     + f" | **{r['mean']:.3f}** | {r['train_s']:.0f} s |")
    table = "\n".join(lines)
    wall = time.time() - t0
    footer = f"\nMean Dice over the validation volumes (original voxel grid); total wall time {wall / 60:.1f} min."
    print("\n" + table + footer, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(table + footer + "\n")
    (out_dir / "results.json").write_text(json.dumps({"rows": rows, "wall_s": wall, "settings": {k: str(v) for k, v in common.items()}}, indent=2))
    return None


if __name__ == "__main__":
    fire.Fire(main)
