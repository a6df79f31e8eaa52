"""Learning curves of benchmark cells: the convergence criterion by hand, the log fallback, the curve files."""

from __future__ import annotations

import csv
import json

from medcl.benchmark.curves import cell_curve, convergence
from medcl.benchmark.report import collect_cells, markdown_table, write_reports


def _rows(scores, every=100):
    return [{"epoch": i + 1, "iteration": every * (i + 1), "val_mean_dice": s} for i, s in enumerate(scores)]


def test_convergence_by_hand():
    # 8 validations over 800 iterations: the last quarter is iterations 601-800 (the last two validations)
    flat = _rows([0.3, 0.5, 0.6, 0.62, 0.61, 0.63, 0.60, 0.635])
    assert convergence(flat, 800) == {"tail_gain": 0.005, "converged": True}  # 0.635 - 0.63
    rising = _rows([0.3, 0.5, 0.6, 0.62, 0.61, 0.63, 0.60, 0.65])
    assert convergence(rising, 800) == {"tail_gain": 0.02, "converged": False}
    dropping = _rows([0.3, 0.5, 0.6, 0.62, 0.61, 0.63, 0.40, 0.45])  # worse at the end: the best did not move
    assert convergence(dropping, 800) == {"tail_gain": 0.0, "converged": True}
    assert convergence(_rows([0.3, 0.5]), 800) is None  # no validation in the last quarter
    assert convergence(_rows([0.3], every=700), 800) is None  # none before it


LOG = """\
2026-12-05 13:07:26,649 - INFO - Epoch[1] Metrics -- loss_seg: 0.8802 train_loss: 0.8802
2026-12-05 13:07:26,649 - ProgressHandler - INFO - Progress: epoch 1/4, iteration 20/80 (25%), elapsed 0:00:04
2026-12-05 13:07:30,691 - INFO - Epoch[2] Metrics -- loss_seg: 0.8292 train_loss: 0.8292
2026-12-05 13:07:30,700 - INFO - Epoch[2] Metrics -- val_mean_dice: 0.4571
2026-12-05 13:07:30,701 - ProgressHandler - INFO - Progress: epoch 2/4, iteration 40/80 (50%), elapsed 0:00:08
2026-12-05 13:07:34,700 - INFO - Epoch[4] Metrics -- val_mean_dice: 0.4012
2026-12-05 13:07:34,701 - ProgressHandler - INFO - Progress: epoch 4/4, iteration 80/80 (100%), elapsed 0:00:12
"""


def test_cells_without_a_curve_file_read_their_training_log(tmp_path):
    (tmp_path / "train.log").write_text(LOG)
    rows = cell_curve(tmp_path)
    assert [(r["epoch"], r["iteration"], r["val_mean_dice"], r["best_val_mean_dice"]) for r in rows] == [
        (2, 40, 0.4571, 0.4571),
        (4, 80, 0.4012, 0.4571),
    ]
    assert rows[0]["train_loss"] == 0.8292
    assert cell_curve(tmp_path / "missing") == []


def _cell(run_dir, name, seed, scores):
    cell = run_dir / "cells" / name
    (cell / "models").mkdir(parents=True)
    with open(cell / "models" / "learning_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "iteration", "val_mean_dice"])
        writer.writeheader()
        writer.writerows(_rows(scores))
    record = {"method": "scratch", "backbone": "UNet", "label_fraction": 0.1, "num_labelled": 2, "seed": seed}
    record.update({"mean_dice": 0.5, "mean_dice_final": 0.5, "iterations": 100 * len(scores)})
    (cell / "cell.json").write_text(json.dumps(record))


def test_reports_give_curves_and_a_convergence_table(tmp_path):
    _cell(tmp_path, "scratch_n2_s0", 0, [0.3, 0.5, 0.6, 0.61])  # last quarter: +0.01, not converged
    _cell(tmp_path, "scratch_n2_s1", 1, [0.3, 0.5, 0.6, 0.605])  # +0.005, converged
    cells = collect_cells(tmp_path)
    assert [(c["cell"], c["converged"]) for c in cells] == [("scratch_n2_s0", False), ("scratch_n2_s1", True)]
    assert "| scratch | 10% | 400 | +0.007, +0.010 | 1/2 |" in markdown_table(cells, {"scratch": None})
    paths = write_reports(tmp_path, {"scratch": None})
    with open(paths["curves_csv"]) as f:
        curve = list(csv.DictReader(f))
    assert len(curve) == 8 and {r["seed"] for r in curve} == {"0", "1"}
    assert paths["curves_png"].read_bytes()[:4] == b"\x89PNG"
