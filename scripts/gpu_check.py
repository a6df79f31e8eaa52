r"""One-call GPU check of every bundle (issue #15 item 4); run it through ``bash scripts/gpu_check.sh``.

In one call of at most ``--budget_s`` (default 480 s = 8 minutes) on one GPU:

1. **set-up**: uses the Python that runs it (gpu_check.sh picks ``$MEDCL_PYTHON``, else ``.venv/bin/python``, else
   ``python3``); needs ``torch`` (with CUDA) already installed. When ``medcl`` is not importable it runs
   ``pip install --no-deps --no-build-isolation -e .`` (offline: nothing is downloaded, the dependencies must be
   there). No CUDA device: one message on stderr and exit code 2, before anything else;
2. **phantom**: ``python -m medcl.data.phantom`` (``medcl-phantom``) writes ``--n`` cases of ``--shape`` voxels;
3. **bundles**: a short run of each bundle at its defaults, the paper's sizes (patch and batch sizes, networks), with
   AMP (the bundles' ``amp`` is on with CUDA): scratch_baseline train, macl pretrain + train (fine-tuning the
   pre-trained weights), mixcl pretrain + train, localcl_selftrain train (1 baseline epoch + 1 self-training round),
   each a real ``python -m monai.bundle run`` with ``--epoch_length`` iterations per epoch. Each run gets a
   measuring handler (scripts/gpu_check_probe.py, added by a config fragment): step times by CUDA events (median,
   p90; the first, warm-up iteration left out), iterations/s, share of time waiting for data, peak GPU memory
   (allocated and reserved), first and last loss, all finite;
4. **GradScaler round trip**: scratch_baseline with AMP for 2 epochs, then ``--resume true`` for a third: the
   scaler state the resumed run starts with must equal the one saved in ``run_state.pt`` (scale and growth
   tracker), and the state saved must be a real one (an enabled scaler that has stepped);
5. **torchrun**: with 2 or more GPUs, one epoch of scratch_baseline in 2 processes (NCCL,
   ``multi_gpu_train.json``); with one GPU it is recorded as skipped.

Writes ``<out>/gpu_check.json`` (everything above, plus the card, the versions and the date), ``<out>/gpu_check.log``
(what ran, with each run's log under ``<out>/logs/``), the phantom and the runs' folders. Exit code 0 when every
check passed, 1 when one failed (the JSON says which), 2 without a CUDA device or without torch.

    bash scripts/gpu_check.sh                         # everything, gpu_check_out/
    bash scripts/gpu_check.sh --out /tmp/gc --epoch_length 20 --budget_s 420
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCRIPTS = Path(__file__).resolve().parent
NO_CUDA_EXIT = 2

__all__ = [
    "NO_CUDA_EXIT",
    "BundleRun",
    "bundle_runs",
    "check_cuda",
    "judge_roundtrip",
    "main",
    "parse_args",
    "probe_fragment",
    "scaler_roundtrip",
    "summarize",
    "write_report",
]


# --- arguments -------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring; ``--help`` needs neither torch nor a GPU).

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        the parsed arguments, ``out`` as a :class:`~pathlib.Path`, ``shape`` as 3 ints.

    Raises:
        SystemExit: for ``--help`` (code 0) or a bad argument (code 2, argparse's one-line message).
    """
    p = argparse.ArgumentParser(
        prog="bash scripts/gpu_check.sh",
        description=(
            "One-call GPU check of every medcl bundle: short AMP runs at the paper sizes on the phantom, CUDA-event "
            "step times, peak GPU memory, a GradScaler round trip through --resume true, a 2-process NCCL torchrun "
            "step when 2 GPUs exist. Writes <out>/gpu_check.json and <out>/gpu_check.log. Set-up: runs with "
            "$MEDCL_PYTHON, else .venv/bin/python when the repository has one, else python3; torch with CUDA must "
            "be installed there already (the machine needs no internet); medcl is installed from this tree with "
            "'pip install --no-deps -e .' when missing. Without a CUDA device it stops at once with one message "
            "(exit code 2)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="output folder")
    p.add_argument("--budget_s", type=float, default=480.0, help="wall-clock budget of the whole check (seconds)")
    p.add_argument("--epoch_length", type=int, default=10, help="iterations per epoch of each bundle run")
    p.add_argument("--n", type=int, default=8, help="phantom training cases (plus 2 test cases)")
    p.add_argument("--shape", default="96,96,64", help="phantom volume shape X,Y,Z")
    p.add_argument("--num_workers", type=int, default=4, help="data-loader workers of each run")
    p.add_argument(
        "--only", default="", help="comma-separated run names to do (default all: " + ", ".join(RUN_NAMES) + ")"
    )
    args = p.parse_args(argv)
    try:
        shape = [int(s) for s in str(args.shape).replace("x", ",").split(",")]
    except ValueError:
        shape = []
    if len(shape) != 3 or min(shape) < 8:
        p.error(f"--shape must be three sizes of at least 8, e.g. 96,96,64; got {args.shape!r}")
    args.shape = shape
    if args.epoch_length < 2:
        p.error(f"--epoch_length must be >= 2 (the first iteration is warm-up); got {args.epoch_length}")
    if args.budget_s <= 0:
        p.error(f"--budget_s must be positive; got {args.budget_s}")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(RUN_NAMES))
    if unknown:
        p.error(f"--only: unknown run(s) {unknown}; choose from {', '.join(RUN_NAMES)}")
    args.only = only
    return args


# --- CUDA and set-up -------------------------------------------------------------------------------------------------
def check_cuda() -> tuple[dict[str, Any] | None, str | None]:
    """Whether a CUDA device is usable from this Python.

    Returns:
        ``(info, None)`` with the card, count and versions, or ``(None, message)``: one line saying what is missing.
    """
    try:
        import torch
    except ImportError as e:
        return None, f"gpu_check: torch is not importable with {sys.executable} ({e}); set MEDCL_PYTHON or run setup."
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU build)"
        return None, (
            f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build {built}); run it on a machine with an "
            "NVIDIA GPU and a CUDA build of torch. Nothing was run."
        )
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }, None


def ensure_medcl(log) -> dict[str, str]:
    """Import medcl and MONAI, installing this tree (``pip install --no-deps --no-build-isolation -e .``) when medcl
    is missing.

    Returns:
        ``{"medcl", "monai", "python"}`` versions and path.

    Raises:
        RuntimeError: when medcl still cannot be imported (the message names the pip command and its output).
    """
    try:
        import medcl  # noqa: F401
    except ImportError:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(REPO)]
        log(f"[setup] medcl not importable: {shlex.join(cmd)}")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log(proc.stdout[-2000:])
        import importlib

        importlib.invalidate_caches()
        try:
            import medcl  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"medcl could not be installed ({shlex.join(cmd)} gave rc {proc.returncode}).") from e
    import monai

    import medcl

    return {"medcl": medcl.__version__, "monai": monai.__version__, "python": sys.executable}


# --- bundle runs -----------------------------------------------------------------------------------------------------
class BundleRun:
    """One ``python -m monai.bundle run`` of a bundle's configs with a measuring handler.

    Args:
        name: the run's name (its folder ``<out>/runs/<name>`` is the ``bundle_root``, its log ``<out>/logs``).
        bundle: the bundle folder name under ``bundles/``.
        configs: config file names in ``bundles/<bundle>/configs``.
        overrides: extra ``--key value`` arguments.
        torchrun: number of processes (0: a plain process).
    """

    def __init__(
        self, name: str, bundle: str, configs: Sequence[str], overrides: Sequence[str] = (), torchrun: int = 0
    ) -> None:
        self.name, self.bundle = name, bundle
        self.configs = [str(BUNDLES / bundle / "configs" / c) for c in configs]
        self.overrides = list(overrides)
        self.torchrun = int(torchrun)

    def command(self, root: Path, fragment: Path, extra: Sequence[str] = ()) -> list[str]:
        """The command line: the bundle's configs, then the probe fragment, ``--bundle_root root``, the overrides."""
        launcher = [sys.executable, "-m"]
        if self.torchrun:
            launcher += ["torch.distributed.run", "--standalone", f"--nproc_per_node={self.torchrun}", "-m"]
        files = [*self.configs, str(fragment)]
        return [
            *launcher,
            "monai.bundle",
            "run",
            "--config_file",
            repr(files),
            "--bundle_root",
            str(root),
            *self.overrides,
            *extra,
        ]


RUN_NAMES = (
    "scratch_baseline",
    "macl_pretrain",
    "macl_train",
    "mixcl_pretrain",
    "mixcl_train",
    "localcl_selftrain",
    "scaler_roundtrip",
    "torchrun_nccl",
)


def bundle_runs(dataset_dir: Path, runs_dir: Path, epoch_length: int, num_workers: int) -> list[BundleRun]:
    """The short runs of step 3, in order (a fine-tuning run after the pre-training whose weights it loads).

    Args:
        dataset_dir: the phantom.
        runs_dir: parent of the runs' ``bundle_root`` folders.
        epoch_length: iterations per epoch.
        num_workers: data-loader workers.
    """
    common = ["--dataset_dir", str(dataset_dir), "--epoch_length", str(epoch_length)]
    common += ["--num_workers", str(num_workers), "--max_epochs", "1", "--val_interval", "1"]
    pre = ["--dataset_dir", str(dataset_dir), "--epoch_length", str(epoch_length), "--num_workers", str(num_workers)]
    pre += ["--max_epochs", "1"]
    local = ["--dataset_dir", str(dataset_dir), "--epoch_length", str(epoch_length), "--num_workers", str(num_workers)]
    local += ["--baseline_epochs", "1", "--num_rounds", "1", "--round_epochs", "1", "--val_interval", "1"]
    return [
        BundleRun("scratch_baseline", "scratch_baseline", ["train.json"], common),
        BundleRun("macl_pretrain", "macl", ["pretrain.json"], pre),
        BundleRun(
            "macl_train",
            "macl",
            ["train.json"],
            [*common, "--pretrained_ckpt", str(runs_dir / "macl_pretrain" / "models" / "pretrained.pt")],
        ),
        BundleRun("mixcl_pretrain", "mixcl", ["pretrain.json"], pre),
        BundleRun(
            "mixcl_train",
            "mixcl",
            ["train.json"],
            [*common, "--pretrained_ckpt", str(runs_dir / "mixcl_pretrain" / "models" / "pretrained.pt")],
        ),
        BundleRun("localcl_selftrain", "localcl_selftrain", ["train.json"], local),
    ]


def probe_fragment(path: Path, probe_json: Path, cpu_scaler: dict[str, Any] | None = None) -> Path:
    """Write the config fragment that adds :class:`gpu_check_probe.StepProbe` to ``train#trainer``.

    Args:
        path: the fragment (JSON) to write.
        probe_json: where the probe writes its record.
        cpu_scaler: GradScaler arguments for a CPU scaler (tests without a GPU), or None.

    Returns:
        ``path``.
    """
    call = f"StepProbe({str(probe_json)!r}, cpu_scaler={cpu_scaler!r})"
    fragment = {
        "+imports": ["$import gpu_check_probe"],
        "+initialize": [f"$gpu_check_probe.{call}.attach(@train#trainer)"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fragment, indent=1))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_one(
    run: BundleRun,
    out: Path,
    timeout: float,
    extra: Sequence[str] = (),
    tag: str | None = None,
    cpu_scaler: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``run`` with the probe; its log goes to ``<out>/logs/<tag>.log``.

    Args:
        run: the run.
        out: the output folder (``runs/<run.name>`` is its ``bundle_root``).
        timeout: seconds before the run is killed.
        extra: more overrides (e.g. ``--resume true``).
        tag: name of the log and probe files (default ``run.name``).
        cpu_scaler: see :func:`probe_fragment`.

    Returns:
        ``{"status": "ok" | "failed" | "timeout", "rc", "wall_s", "log", "command", "probe": record or None,
        "error": last log lines when it failed}``.
    """
    tag = tag or run.name
    root = out / "runs" / run.name
    probe_json = out / "probes" / f"{tag}.json"
    probe_json.unlink(missing_ok=True)
    fragment = probe_fragment(out / "probes" / f"{tag}_fragment.json", probe_json, cpu_scaler)
    cmd = run.command(root, fragment, extra)
    log = out / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            rc, status = proc.returncode, "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
    result: dict[str, Any] = {
        "status": status,
        "rc": rc,
        "wall_s": round(time.perf_counter() - t0, 1),
        "log": str(log),
        "command": shlex.join(cmd),
        "probe": json.loads(probe_json.read_text()) if probe_json.is_file() else None,
    }
    if status == "ok" and result["probe"] is None:
        result["status"] = "failed"
        result["error"] = "the run ended without the probe's record (did the trainer complete?)"
    elif status == "ok" and not result["probe"]["losses_finite"]:
        result["status"] = "failed"
        result["error"] = "non-finite loss"
    if status != "ok":
        result["error"] = log.read_text().splitlines()[-15:]
    return result


def scaler_roundtrip(
    out: Path,
    dataset_dir: Path,
    timeout: float,
    overrides: Sequence[str] = (),
    cpu_scaler: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check that the AMP GradScaler state survives ``--resume true`` (scratch_baseline, 2 epochs, then a third).

    Args:
        out: the output folder (the run is ``<out>/runs/scaler_roundtrip``).
        dataset_dir: the dataset.
        timeout: seconds for both runs together.
        overrides: extra overrides of both runs (tests: small patches); ``--amp true`` is always added.
        cpu_scaler: GradScaler arguments of a CPU scaler (without a GPU; MONAI builds its scaler for CUDA only).

    Returns:
        ``{"status": "ok" | "failed" | "timeout", "saved": scaler state in run_state.pt, "loaded": the resumed run's
        state at its start, "after_resume": at its end, "first": the first run's result, "resumed": the second's,
        "error": why it failed}``.
    """
    run = BundleRun(
        "scaler_roundtrip",
        "scratch_baseline",
        ["train.json"],
        ["--dataset_dir", str(dataset_dir), "--amp", "true", "--val_interval", "100", *overrides],
    )
    t0 = time.perf_counter()
    first = run_one(run, out, timeout, ["--max_epochs", "2"], "scaler_first", cpu_scaler)
    result: dict[str, Any] = {"status": first["status"], "first": first}
    if first["status"] != "ok":
        result["error"] = "the first run failed"
        return result
    import torch

    state_file = out / "runs" / run.name / "models" / "run_state.pt"
    saved = torch.load(state_file, map_location="cpu", weights_only=True).get("scaler")
    result["saved"] = saved
    left = timeout - (time.perf_counter() - t0)
    resumed = run_one(run, out, max(left, 1.0), ["--max_epochs", "3", "--resume", "true"], "scaler_resumed", cpu_scaler)
    result["resumed"] = resumed
    if resumed["status"] != "ok":
        result.update(status=resumed["status"], error="the resumed run failed")
        return result
    loaded = resumed["probe"]["scaler_at_start"]
    result["loaded"], result["after_resume"] = loaded, resumed["probe"]["scaler_at_end"]
    problems = judge_roundtrip(saved, first["probe"], resumed["probe"])
    if problems:
        result.update(status="failed", error="; ".join(problems))
    return result


def judge_roundtrip(saved: dict | None, first: dict[str, Any], resumed: dict[str, Any]) -> list[str]:
    """What is wrong with a GradScaler round trip (empty: it survived).

    Args:
        saved: the ``scaler`` entry of the first run's ``run_state.pt``.
        first: the first run's probe record (``scaler_at_start``, ``iterations``).
        resumed: the resumed run's probe record (``scaler_at_start``: after the run state was loaded,
            ``first_iteration``).

    Returns:
        one sentence per problem: no scaler state saved, a saved state that never changed from the initial one
        (nothing would be tested), a resumed run that started with another state, or one that did not continue
        from the next iteration.
    """
    problems = []
    initial = first.get("scaler_at_start") or {}
    if not saved:
        problems.append("run_state.pt holds no GradScaler state (amp off, or a disabled scaler)")
    elif saved.get("_growth_tracker", 0) == 0 and saved.get("scale") == initial.get("scale"):
        problems.append(f"the saved scaler never changed from its initial state {saved}: nothing to round-trip")
    loaded = resumed.get("scaler_at_start")
    if saved and loaded != saved:
        problems.append(f"the resumed run started with scaler {loaded}, not the saved {saved}")
    if resumed.get("first_iteration") != first.get("iterations", 0) + 1:
        expected = first.get("iterations", 0) + 1
        problems.append(f"the resumed run started at iteration {resumed.get('first_iteration')}, not {expected}")
    return problems


# --- the report ------------------------------------------------------------------------------------------------------
def summarize(results: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether every check passed, and one line per check (for the log and the terminal).

    Args:
        results: ``{name: result}`` as :func:`run_one` / :func:`scaler_roundtrip` give (``status`` "ok", "failed",
            "timeout" or "skipped", with ``reason`` for a skipped one), ``probe`` records where a run had one.

    Returns:
        ``(all passed, lines)``; a skipped check does not fail the run.
    """
    lines, ok = [], True
    for name, r in results.items():
        status = r.get("status", "failed")
        ok &= status in ("ok", "skipped")
        probe = r.get("probe") or {}
        step = probe.get("step") or {}
        parts = [f"{name:18s} {status}"]
        if step.get("median_ms") is not None:
            parts.append(f"step {step['median_ms']:.1f} ms (p90 {step['p90_ms']:.1f})")
        if probe.get("peak_mem_mib") is not None:
            parts.append(f"peak {probe['peak_mem_mib']:.0f} MiB")
        if probe.get("data_wait_fraction") is not None:
            parts.append(f"data wait {probe['data_wait_fraction']:.0%}")
        if r.get("wall_s") is not None:
            parts.append(f"{r['wall_s']:.0f} s")
        if status == "skipped":
            parts.append(r.get("reason", ""))
        elif status != "ok" and r.get("error"):
            err = r["error"]
            parts.append(err[-1] if isinstance(err, list) and err else str(err))
        lines.append(" | ".join(p for p in parts if p))
    return ok, lines


def write_report(out: Path, report: dict[str, Any]) -> Path:
    """Write ``<out>/gpu_check.json`` (indented, keys in insertion order; temp file then rename).

    Args:
        out: the output folder (created).
        report: JSON-serialisable values; other values (paths, tensors) are written with ``str``.

    Returns:
        the JSON file's path.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check (see the module docstring).

    Returns:
        0 when every check passed, 1 when one failed, :data:`NO_CUDA_EXIT` (2) without a CUDA device or torch.
    """
    args = parse_args(argv)
    t_start = time.perf_counter()
    info, problem = check_cuda()
    if problem:
        print(problem, file=sys.stderr)
        return NO_CUDA_EXIT
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "gpu_check.log", "w")  # noqa: SIM115 (closed at the end)

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        **info,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    log(f"[gpu_check] {info['gpu']} x{info['gpu_count']}, torch {info['torch']}, CUDA {info['cuda']}; out {out}")
    try:
        report.update(ensure_medcl(log))
    except RuntimeError as e:
        log(f"[gpu_check] set-up failed: {e}")
        report["setup_error"] = str(e)
        write_report(out, report)
        return 1
    data = out / "phantom"
    if not (data / "dataset.json").is_file():
        cmd = [sys.executable, "-m", "medcl.data.phantom", "--out", str(data), "--n", str(args.n), "--n_test", "2"]
        cmd += ["--shape", ",".join(map(str, args.shape))]
        log(f"[gpu_check] {shlex.join(cmd)}")
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log(proc.stdout.strip()[-2000:])
        if proc.returncode != 0:
            report["setup_error"] = "phantom generation failed"
            write_report(out, report)
            return 1
    report["setup_s"] = round(time.perf_counter() - t_start, 1)
    wanted = set(args.only or RUN_NAMES)
    results: dict[str, Any] = {}
    report["results"] = results
    reserve = 5.0  # for writing the report
    for run in bundle_runs(data, out / "runs", args.epoch_length, args.num_workers):
        if run.name not in wanted:
            continue
        if left() < 30 + reserve:
            results[run.name] = {"status": "skipped", "reason": f"budget of {args.budget_s:.0f} s spent"}
        else:
            log(f"[gpu_check] {run.name} (log {out / 'logs' / (run.name + '.log')})")
            results[run.name] = run_one(run, out, left() - reserve)
        log("  " + summarize({run.name: results[run.name]})[1][0])
        write_report(out, report)
    if "scaler_roundtrip" in wanted:
        if left() < 40 + reserve:
            results["scaler_roundtrip"] = {"status": "skipped", "reason": "budget spent"}
        else:
            log("[gpu_check] scaler_roundtrip: scratch_baseline, AMP, 2 epochs, then --resume true for a third")
            overrides = ["--epoch_length", str(args.epoch_length), "--num_workers", str(args.num_workers)]
            results["scaler_roundtrip"] = scaler_roundtrip(out, data, left() - reserve, overrides)
        log("  " + summarize({"scaler_roundtrip": results["scaler_roundtrip"]})[1][0])
    if "torchrun_nccl" in wanted:
        if info["gpu_count"] < 2:
            results["torchrun_nccl"] = {"status": "skipped", "reason": f"{info['gpu_count']} GPU (needs 2)"}
        elif left() < 40 + reserve:
            results["torchrun_nccl"] = {"status": "skipped", "reason": "budget spent"}
        else:
            run = BundleRun(
                "torchrun_nccl",
                "scratch_baseline",
                ["train.json", "multi_gpu_train.json"],
                ["--dataset_dir", str(data), "--epoch_length", str(args.epoch_length), "--max_epochs", "1"],
                torchrun=2,
            )
            log("[gpu_check] torchrun_nccl: scratch_baseline in 2 processes (NCCL)")
            results["torchrun_nccl"] = run_one(run, out, left() - reserve)
        log("  " + summarize({"torchrun_nccl": results["torchrun_nccl"]})[1][0])
    ok, lines = summarize(results)
    report["ok"] = ok
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    path = write_report(out, report)
    log("[gpu_check] summary")
    for line in lines:
        log("  " + line)
    log(f"[gpu_check] {'all checks passed' if ok else 'FAILED'} in {report['total_s']:.0f} s; wrote {path}")
    log_file.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
