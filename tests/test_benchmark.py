"""The label-efficiency benchmark on a tiny grid: real bundle runs, reports, resuming, bad arguments."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import REPO

from medcl.benchmark.cli import main, validate_grid
from medcl.errors import MedclInputError

TINY = {
    "*": {
        "max_epochs": 1,
        "epoch_length": 2,
        "val_interval": 1,
        "num_workers": 0,
        "cache_rate": 0,
        "batch_size": 1,
        "samples_per_volume": 1,
    },
    "scratch_baseline": {"patch_size": 32},
}
GRID = dict(methods=["scratch", "mixcl"], fractions=[0.5, 1.0], seeds=[0], overrides=TINY, num_workers=0)


@pytest.fixture(scope="module")
def tiny_run(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    table = main(
        run="tiny",
        out=str(out),
        dataset_dir=str(phantom_dir),
        pretrain_dataset_dirs=[str(phantom_dir)],
        tracking="mlflow",
        **GRID,
    )
    return out / "tiny", table


@pytest.mark.slow
def test_tiny_grid_writes_csv_table_and_plot(tiny_run):
    run_dir, table = tiny_run
    with open(run_dir / "label_efficiency.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], float(r["label_fraction"])) for r in rows) == [
        ("mixcl", 0.5),
        ("mixcl", 1.0),
        ("scratch", 0.5),
        ("scratch", 1.0),
    ]
    for r in rows:
        assert 0.0 <= float(r["mean_dice"]) <= 1.0 and 0.0 <= float(r["mean_dice_final"]) <= 1.0
        assert {"dice_liver", "dice_spleen", "final_dice_liver", "train_s", "peak_rss_mib", "iterations"} <= set(r)
        assert int(r["iterations"]) == 2 and float(r["peak_rss_mib"]) > 0
        assert r["eval_split"] == "test" and int(r["num_test"]) == 2  # default test_fraction 0.2 of 8 cases
    assert {r["pretrain_s"] != "" for r in rows if r["method"] == "mixcl"} == {True}
    # 8 cases - 2 test - 1 val = 5, half of it rounded (to even) = 2
    assert int([r for r in rows if r["label_fraction"] == "0.5"][0]["num_labelled"]) == 2
    # both checkpoints scored on the same two test volumes, every cell
    split = json.loads((run_dir / "split.json").read_text())
    assert split["test_fraction"] == 0.2 and len(split["test"]) == 2
    for cell in (run_dir / "cells").iterdir():
        record = json.loads((cell / "cell.json").read_text())
        assert sorted(record["case_dice"]) == sorted(record["case_dice_final"]) == split["test"]
        assert (cell / "eval_final" / "val_mean_dice_raw.csv").is_file()
    # one pre-training per method and seed, reused by both fractions
    assert sorted(p.name for p in (run_dir / "pretrain").iterdir()) == ["mixcl_s0"]
    assert "| scratch | UNet | 50% |" in table and "| mixcl | UNETR | 100% |" in table
    assert "Mean Dice on the **test** split (2 cases" in table
    assert (run_dir / "label_efficiency.md").read_text().count("\n|") >= 3
    assert (run_dir / "label_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one validation per cell (1 epoch): every cell has a learning curve, too short to judge convergence
    with open(run_dir / "learning_curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert sorted((r["method"], r["label_fraction"], r["epoch"]) for r in curves) == sorted(
        (r["method"], r["label_fraction"], "1") for r in rows
    )
    assert (run_dir / "learning_curves.png").is_file() and {r["converged"] for r in rows} == {""}
    with sqlite3.connect(run_dir / "mlruns.db") as con:  # every run of the grid is an MLflow run of one experiment
        runs = {
            name
            for (name,) in con.execute(
                "select r.name from runs r join experiments e on "
                "r.experiment_id = e.experiment_id where e.name = 'medcl_tiny'"
            )
        }
    assert runs == {"mixcl_s0_pretrain", "mixcl_f0.5_s0", "mixcl_f1_s0", "scratch_f0.5_s0", "scratch_f1_s0"}


@pytest.mark.slow
def test_rerun_skips_finished_cells(tiny_run, phantom_dir, capsys):
    run_dir, _ = tiny_run
    logs = {p: p.stat().st_mtime_ns for p in run_dir.glob("**/*.log")}
    main(
        run="tiny",
        out=str(run_dir.parent),
        dataset_dir=str(phantom_dir),
        pretrain_dataset_dirs=[str(phantom_dir)],
        **GRID,
    )
    assert capsys.readouterr().out.count("done, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("**/*.log")} == logs


@pytest.mark.slow
def test_killed_benchmark_resumes_without_redoing_finished_cells(phantom_dir, tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "benchmark.py"),
        "--run",
        "killed",
        "--out",
        str(tmp_path),
        "--dataset_dir",
        str(phantom_dir),
        "--methods",
        "[scratch]",
        "--fractions",
        "[0.5,1.0]",
        "--seeds",
        "[0]",
        "--num_workers",
        "0",
        "--overrides",
        json.dumps(TINY),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    first = tmp_path / "killed" / "cells" / "scratch_f0.5_s0" / "cell.json"
    deadline = time.time() + 300
    while not first.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert first.is_file(), "the first cell never finished"
    os.killpg(proc.pid, signal.SIGKILL)  # the benchmark and its bundle run, mid second cell
    proc.wait()
    finished = first.read_text()
    log_time = (first.parent / "train.log").stat().st_mtime_ns
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "scratch_f0.5_s0: done, skipped" in done.stdout
    assert first.read_text() == finished and (first.parent / "train.log").stat().st_mtime_ns == log_time
    assert (tmp_path / "killed" / "cells" / "scratch_f1_s0" / "cell.json").is_file()


@pytest.mark.parametrize(
    "grid, message",
    [
        (dict(methods=["macl", "nope"], fractions=[0.1], num_labelled=[], seeds=[0]), "unknown method"),
        (dict(methods=["scratch"], fractions=[0.0], num_labelled=[], seeds=[0]), "(0, 1]"),
        (dict(methods=["scratch"], fractions=[1.5], num_labelled=[], seeds=[0]), "(0, 1]"),
        (dict(methods=["scratch"], fractions=[], num_labelled=[0], seeds=[0]), "integers >= 1"),
        (dict(methods=["scratch"], fractions=[0.1], num_labelled=[], seeds=[0.5]), "seeds must be integers"),
        (dict(methods=[], fractions=[0.1], num_labelled=[], seeds=[0]), "grid is empty"),
    ],
)
def test_bad_grid_arguments_fail_with_one_clear_error(grid, message):
    with pytest.raises(
        MedclInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        validate_grid(**grid)


def test_bad_arguments_fail_before_anything_runs(phantom_dir, tmp_path):
    with pytest.raises(MedclInputError, match="unknown method"):
        main(methods=["mixcl", "typo"], out=str(tmp_path), dataset_dir=str(phantom_dir))
    with pytest.raises(MedclInputError, match="unknown preset"):
        main(preset="gpu", out=str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing was started


def test_dataset_without_labels_is_refused(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {"labels": {"0": "background"}, "modality": {"0": "CT"}, "training": [{"image": "imagesTr/a.nii.gz"}]}
        )
    )
    with pytest.raises(MedclInputError, match="no labelled training cases"):
        main(methods=["scratch"], out=str(tmp_path / "out"), dataset_dir=str(tmp_path))


def test_a_second_call_with_another_test_set_is_refused(phantom_dir, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "split.json").write_text(json.dumps({"test_fraction": 0.2, "test_seed": 0, "test": ["x"]}))
    with pytest.raises(MedclInputError, match="split.json: this run's cells were scored on another test set"):
        main(run="r", methods=["scratch"], out=str(tmp_path), dataset_dir=str(phantom_dir), test_fraction=0.25)
    assert not (tmp_path / "r" / "cells").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(test_fraction=0.0), "has no labelled 'test' entries and --test_fraction is 0"),
        (dict(test_fraction=1.0), r"test_fraction=1.0 must be in \[0, 1\)"),
        (dict(test_seed=0.5), "--test_seed must be an integer"),
        (dict(overrides={"*": {"test_fraction": 0.1}}), r"--overrides sets \['test_fraction'\]"),
    ],
)
def test_bad_test_split_fails_before_anything_runs(phantom_dir, tmp_path, kwargs, message):
    with pytest.raises(MedclInputError, match=message):
        main(methods=["scratch"], out=str(tmp_path), dataset_dir=str(phantom_dir), **kwargs)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_strong_recipe_rows_share_the_pretraining_and_train_with_adamw(phantom_dir, tmp_path):
    grid = dict(methods=["macl", "macl_strong", "macl_scratch_strong"], fractions=[1.0], seeds=[0])
    tiny = {**TINY, "macl": {"patch_size": 64, "samples_per_volume": 2}}  # BatchNorm needs > 1 sample per batch
    table = main(run="strong", out=str(tmp_path), dataset_dir=str(phantom_dir), overrides=tiny, num_workers=0, **grid)
    run_dir = tmp_path / "strong"
    assert sorted(p.name for p in (run_dir / "pretrain").iterdir()) == ["macl_s0"]  # macl_strong reuses it
    cells = {p.name: json.loads((p / "cell.json").read_text()) for p in (run_dir / "cells").iterdir()}
    assert cells["macl_strong_f1_s0"]["pretrain_s"] == cells["macl_f1_s0"]["pretrain_s"]
    assert "| macl_strong | macl_scratch_strong | 100% |" in table
    # the rows really ran the scratch bundle's recipe: the command line of the strong cells
    for name in ("macl_strong_f1_s0", "macl_scratch_strong_f1_s0"):
        log = (run_dir / "cells" / name / "train.log").read_text()
        assert "--optimizer#_target_ torch.optim.AdamW" in log and "--dice_weight 1.0" in log
    assert "torch.optim.AdamW" not in (run_dir / "cells" / "macl_f1_s0" / "train.log").read_text()


def test_strong_recipe_is_the_scratch_bundles_recipe_in_the_macl_config(phantom_dir):
    from monai.bundle import ConfigParser

    from medcl.benchmark.grid import STRONG_RECIPE

    def parsed(bundle, overrides):
        parser = ConfigParser()
        parser.read_config(REPO / "bundles" / bundle / "configs" / "train.json")
        parser.update({"dataset_dir": str(phantom_dir), "spatial_dims": 2, "init": "random", **overrides})
        return parser

    macl, scratch = parsed("macl", STRONG_RECIPE), parsed("scratch_baseline", {})
    for p in (macl, scratch):
        p["optimizer"]["params"] = "$[torch.nn.Parameter(torch.zeros(1))]"
    opt, ref = macl.get_parsed_content("optimizer"), scratch.get_parsed_content("optimizer")
    assert type(opt) is type(ref) is __import__("torch").optim.AdamW
    assert opt.defaults["lr"] == ref.defaults["lr"] and opt.defaults["weight_decay"] == ref.defaults["weight_decay"]
    loss, ref_loss = macl.get_parsed_content("loss"), scratch.get_parsed_content("loss")
    assert (loss.lambda_dice, loss.lambda_ce) == (ref_loss.lambda_dice, ref_loss.lambda_ce) == (1.0, 1.0)
    assert macl.get_parsed_content("min_learning_rate") == scratch.get_parsed_content("lr_scheduler#eta_min")
