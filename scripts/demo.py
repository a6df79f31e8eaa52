"""CPU demo: synthetic phantom -> scratch baseline at 10 % / 100 % labels -> MACL pre-train + fine-tune at 10 % -> Dice.

Every step is a real ``python -m monai.bundle run`` of a bundle in ``bundles/``; logs, checkpoints and metrics
land under ``--out`` (default ``demo_runs/``). Run through ``bash scripts/demo.sh``, which sets up ``.venv``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import fire

from medcl.benchmark.runs import BenchmarkError, read_dice, run_bundle

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"

#: Environment variables that choose CPU kernels or thread counts, and so the demo's numbers (see scripts/demo.sh).
NUMERICS_ENV = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "OPENBLAS_CORETYPE",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)


def machine_facts() -> dict:
    """What the demo's numbers depend on besides the code: CPU, kernels and threads in use, package versions."""
    import ignite
    import monai
    import numpy
    import torch

    cpu = platform.processor() or "unknown"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k, "(unset)") for k in NUMERICS_ENV},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "ignite": ignite.__version__,
        "numpy": numpy.__version__,
    }


def facts_line(facts: dict) -> str:
    """``facts`` (see :func:`machine_facts`) as one line."""
    env = ", ".join(f"{k}={v}" for k, v in facts["env"].items())
    return (
        f"{facts['cpu']} ({facts['cpus']} CPUs); torch CPU kernels {facts['torch_cpu_capability']}, "
        f"{facts['torch_threads']} threads; {env}; Python {facts['python']}, torch {facts['torch']}, "
        f"MONAI {facts['monai']}, ignite {facts['ignite']}, numpy {facts['numpy']}"
    )


def _bundle_run(configs: list[Path], overrides: dict, log: Path) -> float:
    """Run one bundle workflow in a subprocess (log in ``log``, progress lines echoed); return wall seconds."""
    try:
        return run_bundle(configs, overrides, log, cwd=REPO)["wall_s"]
    except BenchmarkError as e:
        raise SystemExit(f"[demo] step failed: {e}") from None


def _train_and_evaluate(
    name: str, bundle: str, fraction: float, root: Path, run: dict, label_names: list[str], extra: dict | None = None
) -> dict:
    configs = BUNDLES / bundle / "configs"
    run = {**run, "bundle_root": root, "label_fraction": fraction, **(extra or {})}
    print(
        f"[demo] {name}, {fraction:.0%} labels: train ({run['max_epochs'] * run['epoch_length']} iterations)",
        flush=True,
    )
    train_s = _bundle_run([configs / "train.json"], run, root / "train.log")
    print(f"[demo] {name}, {fraction:.0%} labels: evaluate on the validation volumes", flush=True)
    _bundle_run([configs / "train.json", configs / "evaluate.json"], run, root / "evaluate.log")
    return {
        "method": name,
        "label_fraction": fraction,
        "train_s": round(train_s, 1),
        **read_dice(root / "eval", label_names),
    }


def main(
    out: str = "demo_runs",
    dataset_dir: str = "data/phantom",
    n: int = 40,
    seed: int = 0,
    fractions: tuple = (0.1, 1.0),
    macl_fraction: float = 0.1,
    spatial_dims: int = 2,
    patch_size: int = 64,
    max_epochs: int = 20,
    epoch_length: int = 20,
    samples_per_volume: int = 4,
    num_workers: int = 2,
    macl: bool = True,
) -> None:
    """Run the demo and print a Markdown Dice table (also written to ``<out>/results.md`` and ``results.json``).

    Runs: the scratch baseline (MONAI UNet) at each of ``fractions``; then, with ``macl``, MACL pre-training on all
    training images (no labels) and fine-tuning at ``macl_fraction``, next to the same fine-tuning recipe and
    backbone (BasicUNet) from random initialisation. Every run trains for ``max_epochs * epoch_length`` iterations.

    Args:
        out: folder for every run's checkpoints, logs and metrics.
        dataset_dir: phantom location; generated with ``n`` cases if it has no dataset.json.
        n: phantom training cases (20 % are held out for validation).
        seed: training and split seed.
        fractions: label fractions for the scratch baseline.
        macl_fraction: label fraction for MACL fine-tuning and its random-init control.
        spatial_dims: 2 (slice-wise, default) or 3.
        patch_size: training patch (in-plane size for 2D).
        max_epochs, epoch_length: training length (epochs x iterations per epoch), the same for every run.
        samples_per_volume: slices (2D) or patches (3D) drawn per volume per iteration.
        num_workers: data-loader workers.
        macl: also run MACL pre-training and fine-tuning.
    """
    t0 = time.time()
    facts = machine_facts()
    print(f"[demo] machine: {facts_line(facts)}", flush=True)
    out_dir, data = (REPO / out).resolve(), (REPO / dataset_dir).resolve()
    if not (data / "dataset.json").is_file():
        from medcl.data.phantom import generate_dataset

        print(f"[demo] generating the phantom ({n} cases) in {data}", flush=True)
        generate_dataset(str(data), n=n, seed=0)
    from medcl.data import read_dataset_info

    names = read_dataset_info(str(data)).label_names
    common = {
        "dataset_dir": data,
        "seed": seed,
        "spatial_dims": spatial_dims,
        "patch_size": patch_size,
        "max_epochs": max_epochs,
        "epoch_length": epoch_length,
        "val_interval": max(1, max_epochs // 5),
        "samples_per_volume": samples_per_volume,
        "num_workers": num_workers,
    }
    rows = [
        _train_and_evaluate("scratch (UNet)", "scratch_baseline", f, out_dir / f"scratch_f{f:g}_s{seed}", common, names)
        for f in fractions
    ]
    if macl:
        root = out_dir / f"macl_s{seed}"
        pretrain = {k: v for k, v in common.items() if k != "val_interval"}
        print(
            f"[demo] MACL: pre-train on all training images, no labels ({max_epochs * epoch_length} iterations)",
            flush=True,
        )
        pretrain_s = _bundle_run(
            [BUNDLES / "macl" / "configs" / "pretrain.json"], {**pretrain, "bundle_root": root}, root / "pretrain.log"
        )
        row = _train_and_evaluate("MACL (BasicUNet)", "macl", macl_fraction, root, common, names)
        rows.append({**row, "pretrain_s": round(pretrain_s, 1)})
        rows.append(
            _train_and_evaluate(
                "scratch (BasicUNet, MACL recipe)",
                "macl",
                macl_fraction,
                out_dir / f"macl_random_init_s{seed}",
                common,
                names,
                {"init": "random"},
            )
        )
    classes = names[1:]
    lines = [
        "| method | labels | " + " | ".join(classes) + " | mean Dice | train time |",
        "|---|---|" + "---|" * len(classes) + "---|---|",
    ]
    for r in rows:
        time_s = f"{r['train_s']:.0f} s" + (f" (+{r['pretrain_s']:.0f} s pre-train)" if "pretrain_s" in r else "")
        lines.append(
            f"| {r['method']} | {r['label_fraction']:.0%} | "
            + " | ".join(f"{r[k]:.3f}" for k in classes)
            + f" | **{r['mean']:.3f}** | {time_s} |"
        )
    wall = time.time() - t0
    text = (
        "\n".join(lines)
        + f"\n\nMean Dice over the validation volumes (original voxel grid); total wall time {wall / 60:.1f} min."
        + f"\n\nMachine: {facts_line(facts)}."
    )
    print("\n" + text, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(text + "\n")
    settings = {k: str(v) for k, v in common.items()}
    (out_dir / "results.json").write_text(
        json.dumps({"rows": rows, "wall_s": wall, "settings": settings, "machine": facts}, indent=2)
    )


if __name__ == "__main__":
    fire.Fire(main)
