"""Pool scaling benchmark: memory and start-up of pre-training (MACL, MixCL) and of the self-training pool (local
CL) as the number of volumes grows, as real ``python -m monai.bundle run`` processes.

    python scripts/bench_scale.py                                   # N = 50, 500, 2000; every bundle; defaults
    python scripts/bench_scale.py --sizes "[50,500]" --iterations 10
    python scripts/bench_scale.py --sizes "[50,500]" --pool_mode memory   # today's in-memory pools, for contrast
    python scripts/bench_scale.py --distinct 200                    # N volumes made of 200 generated ones (faster)
    python scripts/bench_scale.py --sizes "[50,2000]" --only_checks true   # input checks now vs deferred, in-process

For each N, a phantom dataset of N volumes of 64 x 64 x 48 (``medcl.data.phantom``) is written under ``--work``
(default ``/tmp/medcl_bench_scale``; never the repository): ``round(N / (1 - val_fraction))`` labelled training
cases, so that the pre-training pool (the cases outside the 0.2 validation split) holds N volumes. With
``--distinct D`` only ``D`` cases are generated and the others are symbolic links to them (distinct paths, so
distinct cache entries; the content repeats, which changes no cost measured here). Each bundle then runs with its
default data settings (``pool_mode``, ``cache_rate``, ``num_workers``, batch and crop sizes) for one epoch of
``--iterations`` iterations:

- ``macl``, ``mixcl``: ``pretrain.json``.
- ``localcl_selftrain``: ``train.json`` with one baseline epoch and one self-training round of one epoch; the round
  pseudo-labels every unlabelled training case (N - 2 volumes; the CRF is off to keep CPU time sane) into the pool
  whose iterations are measured.

One JSON line per (bundle, N): ``peak_rss_mib`` (largest sum of the resident memory of the run's process and its
loader workers, sampled every 0.2 s), ``peak_pss_mib`` (the same with shared pages split between processes: what
the processes use together), ``first_iteration_s`` (process start to the end of the first iteration; localcl: of
the first self-training iteration, pseudo-labelling included), ``iter_per_s`` (iterations after the first, of the
measured epoch), ``data_wait_fraction`` (share of those iterations' wall time spent waiting for the data loader),
the pool mode the run logged and its command. Process wall time, not CPU time: run it on an otherwise quiet machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("macl", "mixcl", "localcl_selftrain")
SHAPE = (64, 64, 48)
VAL_FRACTION = 0.2


class IterationClock:
    """Ignite handler for the benchmarked run: per iteration, its end (wall clock), epoch and the time the engine
    waited for the batch; written as JSON to ``path`` when the run completes.

    Args:
        path: the JSON file to write (``{"end": [...], "epoch": [...], "wait": [...]}``, seconds).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.end: list[float] = []
        self.epoch: list[int] = []
        self.wait: list[float] = []
        self._asked = 0.0

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.GET_BATCH_STARTED, self._ask)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._got)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._done)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _ask(self, engine) -> None:
        self._asked = time.perf_counter()

    def _got(self, engine) -> None:
        self.wait.append(time.perf_counter() - self._asked)

    def _done(self, engine) -> None:
        self.end.append(time.time())
        self.epoch.append(int(engine.state.epoch))
        self._write(engine)

    def _write(self, engine) -> None:
        with open(self.path, "w") as f:
            json.dump({"end": self.end, "epoch": self.epoch, "wait": self.wait}, f)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Peak RSS and PSS (MiB) of a process tree, sampled every ``interval`` seconds until ``stop``."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            pids = _tree(self.pid)
            rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids) / 1024
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids) / 1024
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def make_dataset(root: Path, n: int, distinct: int, seed: int = 0) -> Path:
    """A phantom dataset whose pre-training pool holds ``n`` volumes (see the module docstring); reused if present.

    Returns:
        the dataset folder.
    """
    from medcl.data.phantom import generate_dataset

    total = math.ceil(n / (1 - VAL_FRACTION))
    out = root / f"phantom_n{n}_d{distinct}"
    if (out / "dataset.json").is_file():
        return out
    made = min(total, distinct) if distinct else total
    source = root / f"phantom_source_{made}"
    if not (source / "dataset.json").is_file():
        generate_dataset(str(source), n=made, n_test=0, seed=seed, shape=SHAPE)
    meta = json.loads((source / "dataset.json").read_text())
    cases = meta["training"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    training = []
    for i in range(total):
        case = cases[i % len(cases)]
        entry = {}
        for key, folder in (("image", "imagesTr"), ("label", "labelsTr")):
            name = f"case_{i:05d}.nii.gz"
            os.symlink((source / case[key]).resolve(), tmp / folder / name)
            entry[key] = f"./{folder}/{name}"
        training.append(entry)
    meta.update(training=training, numTraining=total, test=[], numTest=0)
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=1))
    tmp.rename(out)
    return out


#: MixCL's default network is the paper's 3D UNETR on 96^3 patches (about 16 GiB and minutes per iteration on a CPU):
#: ``--mixcl_cpu`` (default) runs the narrow UNETR of tests/test_bundle_mixcl.py on 32^3 patches instead; the data
#: settings stay the defaults.
MIXCL_CPU = ["--patch_size", "[32,32,32]", "--feature_size", "8", "--hidden_size", "96", "--mlp_dim", "192"]
MIXCL_CPU += ["--num_heads", "4"]


def _overrides(bundle: str, iterations: int, mixcl_cpu: bool = True) -> list[str]:
    if bundle == "localcl_selftrain":
        return [
            *("--baseline_epochs", "1", "--num_rounds", "1", "--round_epochs", "1", "--epoch_length", str(iterations)),
            *("--val_interval", "1000", "--use_crf", "false"),
        ]
    cpu = MIXCL_CPU if bundle == "mixcl" and mixcl_cpu else []
    return ["--max_epochs", "1", "--epoch_length", str(iterations), "--checkpoint_interval", "1000", *cpu]


def run_one(
    bundle: str, dataset: Path, work: Path, iterations: int, pool_mode: str | None, timeout: int, mixcl_cpu: bool = True
) -> dict:
    """One bundle run on ``dataset``; returns its JSON row."""
    config = "train.json" if bundle == "localcl_selftrain" else "pretrain.json"
    root = work / "runs" / f"{bundle}_{dataset.name}_{pool_mode or 'default'}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    clock = root / "clock.json"
    extra = root / "bench_clock.json"  # merged after the bundle's config, as evaluate.json is onto train.json
    clock_handler = {"_target_": "bench_scale.IterationClock", "path": str(clock)}
    extra.write_text(
        json.dumps({"bench_clock": clock_handler, "train#trainer#train_handlers": "$@train#handlers + [@bench_clock]"})
    )
    configs = [str(REPO / "bundles" / bundle / "configs" / config), str(extra)]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(configs)]
    cmd += ["--bundle_root", str(root), "--dataset_dir", str(dataset), *_overrides(bundle, iterations, mixcl_cpu)]
    if pool_mode:
        cmd += ["--pool_mode", pool_mode]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "scripts"), os.environ.get("PYTHONPATH", "")]))
    start = time.time()
    with open(root / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = MemorySampler(proc.pid)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        sampler.stop()
    text = (root / "run.log").read_text()
    modes = re.findall(r"(\w+) pool: (\d+) volumes, mode (\w+)", text)
    row = {
        "bundle": bundle,
        "n": int(re.search(r"_n(\d+)_", dataset.name + "_").group(1)),
        "pool": [{"name": m[0], "volumes": int(m[1]), "mode": m[2]} for m in modes],
        "returncode": rc,
        "peak_rss_mib": round(sampler.peak_rss, 1),
        "peak_pss_mib": round(sampler.peak_pss, 1),
    }
    if rc != 0 or not clock.is_file():
        row["error"] = text[-2000:]
        return row
    times = json.loads(clock.read_text())
    last_epoch = max(times["epoch"])
    idx = [i for i, e in enumerate(times["epoch"]) if e == last_epoch]
    first, rest = idx[0], idx[1:]
    span = times["end"][rest[-1]] - times["end"][first] if rest else float("nan")
    row.update(
        first_iteration_s=round(times["end"][first] - start, 2),
        iter_per_s=round(len(rest) / span, 3) if rest else None,
        data_wait_fraction=round(sum(times["wait"][i] for i in rest) / span, 3) if rest else None,
        iterations=len(idx),
        command=" ".join(cmd[1:]),
    )
    return row


def main(
    sizes: list[int] | tuple[int, ...] = (50, 500, 2000),
    bundles: list[str] | tuple[str, ...] = BUNDLES,
    iterations: int = 20,
    pool_mode: str | None = None,
    distinct: int = 0,
    work: str = "/tmp/medcl_bench_scale",
    timeout: int = 3600,
    keep: bool = False,
    mixcl_cpu: bool = True,
    only_checks: bool = False,
) -> None:
    """Print one JSON line per (bundle, N).

    Args:
        sizes: pool sizes N.
        bundles: among ``macl``, ``mixcl``, ``localcl_selftrain``.
        iterations: iterations of the measured epoch (K).
        pool_mode: ``--pool_mode`` passed to every run (``None``: the bundle's default, ``auto``).
        distinct: generate only this many distinct cases per dataset, the rest are links (0: all distinct).
        work: scratch folder for datasets, runs and caches (outside the repository).
        timeout: seconds per run.
        keep: keep the runs' folders (caches, logs) after each run.
        mixcl_cpu: run MixCL's narrow UNETR on 32^3 patches (see ``MIXCL_CPU``); ``False`` for the paper's network.
        only_checks: time only the input checks of the datalist (:func:`checks`), no bundle run.
    """
    work_dir = Path(work)
    if work_dir.resolve().is_relative_to(REPO):
        raise SystemExit(f"--work {work}: put the benchmark's data outside the repository (e.g. /tmp).")
    if only_checks:
        return checks(sizes, distinct=distinct or 100, work=work)
    for n in sizes:
        dataset = make_dataset(work_dir, int(n), int(distinct))
        for bundle in bundles:
            row = run_one(bundle, dataset, work_dir, int(iterations), pool_mode, int(timeout), bool(mixcl_cpu))
            print(json.dumps(row), flush=True)
            if not keep:
                shutil.rmtree(work_dir / "runs", ignore_errors=True)


def checks(
    sizes: list[int] | tuple[int, ...] = (50, 2000),
    repeats: int = 3,
    distinct: int = 100,
    defer_above: int = 100,
    work: str = "/tmp/medcl_bench_scale",
) -> None:
    """The start-up part that grows with N, in one process: ``medcl.data.load_splits`` (read dataset.json, check the
    files, split) with every file checked now and with the check deferred above ``defer_above`` (the bundles'
    ``pool_memory_max``), sizes and modes interleaved ``repeats`` times. One JSON line per (N, mode): medians of
    process (CPU) and wall seconds.

    Args:
        sizes: pool sizes N (datasets made as by ``main``).
        repeats: rounds over every (N, mode).
        distinct: generate only this many distinct cases per dataset, the rest are links.
        defer_above: the deferral limit of the deferred mode.
        work: scratch folder for the datasets (outside the repository).
    """
    import logging
    import statistics

    from medcl.data import checks as input_checks
    from medcl.data import load_splits

    datasets = {int(n): make_dataset(Path(work), int(n), int(distinct)) for n in sizes}
    times: dict[tuple[int, int | None], list[tuple[float, float]]] = {}
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the checks' per-run INFO/WARNING lines, not what is timed
    try:
        for _ in range(int(repeats)):
            for n, dataset in datasets.items():
                for defer in (None, int(defer_above)):
                    input_checks._CHECKED.clear()
                    cpu, wall = time.process_time(), time.perf_counter()
                    load_splits(str(dataset), val_fraction=VAL_FRACTION, defer_checks_above=defer)
                    times.setdefault((n, defer), []).append((time.process_time() - cpu, time.perf_counter() - wall))
    finally:
        logging.disable(previous)
    for (n, defer), runs in times.items():
        row = {
            "n": n,
            "checks": "all now" if defer is None else f"deferred above {defer}",
            "load_splits_cpu_s": round(statistics.median(r[0] for r in runs), 3),
            "load_splits_wall_s": round(statistics.median(r[1] for r in runs), 3),
            "repeats": len(runs),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    fire.Fire(main)
