"""scripts/gpu_check.sh without a GPU: it stops at once with one message; its pieces (arguments, the runs it would make,
the probe fragment, the report, the round-trip verdict) with fake results; and the GradScaler round trip through
``--resume true`` itself, on CPU with a CPU ``torch.amp.GradScaler`` (MONAI builds its scaler for CUDA only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from monai.bundle import ConfigParser

sys.path.insert(0, str(REPO / "scripts"))

import gpu_check  # noqa: E402
import gpu_check_probe  # noqa: E402

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env or {}))
    env["MEDCL_PYTHON"] = sys.executable
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run")
def test_without_cuda_it_stops_at_once_with_one_message(tmp_path):
    out = tmp_path / "gc"
    t0 = time.monotonic()
    proc = _sh("--out", str(out))
    assert proc.returncode == gpu_check.NO_CUDA_EXIT == 2
    assert time.monotonic() - t0 < 60
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and proc.stdout == ""
    assert not out.exists()  # nothing set up, nothing written


def test_help_and_bad_arguments_need_no_gpu():
    proc = _sh("--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for word in ("--out", "gpu_check_out", "--budget_s", ".venv/bin/python", "MEDCL_PYTHON", "exit code 2"):
        assert word in text, word
    proc = _sh("--only", "nope")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown run(s) ['nope']" in proc.stderr.strip().splitlines()[-1]


def test_parse_args_defaults_and_checks():
    args = gpu_check.parse_args([])
    assert str(args.out) == "gpu_check_out" and args.budget_s == 480 and args.shape == [96, 96, 64]
    assert args.only == [] and args.epoch_length >= 2
    args = gpu_check.parse_args(["--out", "x", "--shape", "64x64x48", "--only", "macl_pretrain, scaler_roundtrip"])
    assert args.shape == [64, 64, 48] and args.only == ["macl_pretrain", "scaler_roundtrip"]
    for bad in (["--shape", "64,64"], ["--epoch_length", "1"], ["--budget_s", "0"]):
        with pytest.raises(SystemExit) as e:
            gpu_check.parse_args(bad)
        assert e.value.code == 2


def _top_keys(configs) -> set:
    return set(ConfigParser.load_config_files([str(c) for c in configs]))


def test_every_bundle_is_run_with_keys_its_configs_have(tmp_path):
    """Each run's overrides are keys of its configs (``check_cli_overrides`` would stop it only on the GPU), and the
    probe fragment merges into each config after the bundle's own ``initialize`` steps."""
    runs = gpu_check.bundle_runs(tmp_path / "data", tmp_path / "runs", epoch_length=5, num_workers=2)
    assert {r.bundle for r in runs} == {p.name for p in (REPO / "bundles").iterdir() if (p / "configs").is_dir()}
    assert [r.name for r in runs] == list(gpu_check.RUN_NAMES[:6])
    fragment = gpu_check.probe_fragment(tmp_path / "f.json", tmp_path / "p.json")
    for run in runs:
        keys = _top_keys(run.configs)
        flags = [a[2:] for a in run.overrides if a.startswith("--")]
        assert set(flags) <= keys, (run.name, set(flags) - keys)
        merged = ConfigParser.load_config_files([*run.configs, str(fragment)])
        assert "trainer" in merged["train"]
        assert merged["initialize"][-1].startswith("$gpu_check_probe.StepProbe(")
        assert "$import gpu_check_probe" in merged["imports"]
        cmd = run.command(tmp_path / run.name, fragment)
        assert cmd[1:4] == ["-m", "monai.bundle", "run"] and cmd[cmd.index("--bundle_root") + 1].endswith(run.name)
    cmd = gpu_check.BundleRun("t", "scratch_baseline", ["train.json"], torchrun=2).command(tmp_path, fragment)
    assert "torch.distributed.run" in cmd and "--nproc_per_node=2" in cmd


def test_report_and_summary_from_fake_results(tmp_path):
    probe = {
        "step": gpu_check_probe.summarize_times([50.0, 10.0, 12.0, 11.0, 30.0]),
        "peak_mem_mib": 2048.0,
        "data_wait_fraction": 0.25,
        "losses_finite": True,
    }
    results = {
        "scratch_baseline": {"status": "ok", "wall_s": 41.0, "probe": probe},
        "torchrun_nccl": {"status": "skipped", "reason": "1 GPU (needs 2)"},
    }
    ok, lines = gpu_check.summarize(results)
    assert ok and len(lines) == 2
    assert "step 11.5 ms (p90 30.0)" in lines[0] and "peak 2048 MiB" in lines[0] and "data wait 25%" in lines[0]
    assert "skipped" in lines[1] and "needs 2" in lines[1]
    results["mixcl_pretrain"] = {"status": "failed", "error": ["...", "RuntimeError: CUDA out of memory"]}
    ok, lines = gpu_check.summarize(results)
    assert not ok and lines[-1].endswith("RuntimeError: CUDA out of memory")
    path = gpu_check.write_report(tmp_path / "out", {"ok": ok, "results": results, "out": tmp_path})
    back = json.loads(path.read_text())
    assert back["results"]["scratch_baseline"]["probe"]["step"]["median_ms"] == 11.5 and back["ok"] is False
    assert back["out"] == str(tmp_path) and not list((tmp_path / "out").glob("*.tmp"))


def test_probe_helpers():
    s = gpu_check_probe.summarize_times([100.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert s == {"n": 10, "first_ms": 100.0, "median_ms": 5.5, "p90_ms": 9.0, "mean_ms": 5.5}
    assert gpu_check_probe.summarize_times([])["median_ms"] is None
    assert gpu_check_probe.summarize_times([7.0])["median_ms"] == 7.0  # too few to skip the warm-up
    assert gpu_check_probe.loss_of([{"loss": torch.tensor(0.5)}, {"loss": torch.tensor(0.5)}]) == 0.5
    assert gpu_check_probe.loss_of({"loss": 2.0, "loss_g": 1.0}) == 2.0
    assert gpu_check_probe.loss_of(torch.tensor([3.0])) == 3.0 and gpu_check_probe.loss_of({"pred": 1}) is None


def test_roundtrip_verdict():
    initial = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3, "_growth_tracker": 0}
    saved = dict(initial, scale=2048.0, _growth_tracker=1)
    first = {"scaler_at_start": initial, "iterations": 4}
    assert gpu_check.judge_roundtrip(saved, first, {"scaler_at_start": dict(saved), "first_iteration": 5}) == []
    fresh = gpu_check.judge_roundtrip(saved, first, {"scaler_at_start": initial, "first_iteration": 5})
    assert len(fresh) == 1 and "not the saved" in fresh[0]
    assert (
        "no GradScaler state"
        in gpu_check.judge_roundtrip({}, first, {"scaler_at_start": None, "first_iteration": 5})[0]
    )
    unchanged = gpu_check.judge_roundtrip(initial, first, {"scaler_at_start": initial, "first_iteration": 5})
    assert len(unchanged) == 1 and "never changed" in unchanged[0]
    assert "iteration 1" in gpu_check.judge_roundtrip(saved, first, {"scaler_at_start": saved, "first_iteration": 1})[0]


@pytest.mark.slow
def test_grad_scaler_state_survives_resume_on_cpu(phantom_dir, tmp_path):
    """The round trip gpu_check.sh runs on the GPU, here with a CPU GradScaler (init 1024, doubling every 3 steps):
    scratch_baseline with ``--amp true`` for 2 epochs of 2 iterations, then ``--resume true`` for a third. The run
    state holds the changed scaler (2048, tracker 1); the resumed run starts with it and ends at 4096."""
    tiny = ["--patch_size", "32", "--num_labelled", "2", "--epoch_length", "2", "--num_workers", "0"]
    tiny += ["--batch_size", "1", "--samples_per_volume", "2", "--spatial_dims", "3"]
    cpu_scaler = {"init_scale": 1024.0, "growth_interval": 3}
    r = gpu_check.scaler_roundtrip(tmp_path, phantom_dir, 300, tiny, cpu_scaler=cpu_scaler)
    assert r["status"] == "ok", (r.get("error"), r.get("first", {}).get("error"), r.get("resumed", {}).get("error"))
    assert r["saved"]["scale"] == 2048.0 and r["saved"]["_growth_tracker"] == 1
    assert r["loaded"] == r["saved"]
    assert r["after_resume"]["scale"] == 4096.0 and r["after_resume"]["_growth_tracker"] == 0
    assert "resumed from" in (tmp_path / "logs" / "scaler_resumed.log").read_text()
