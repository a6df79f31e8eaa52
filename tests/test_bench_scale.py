"""scripts/bench_scale.py --only_checks: one row per (N, mode), and the deferred mode skips the header reads."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_scale  # noqa: E402


def test_checks_rows(tmp_path, capsys):
    bench_scale.checks(sizes=[3, 6], repeats=1, distinct=3, defer_above=4, work=str(tmp_path))
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["n"], r["checks"]) for r in rows] == [
        (3, "all now"),
        (3, "deferred above 4"),
        (6, "all now"),
        (6, "deferred above 4"),
    ]
    assert all(r["load_splits_wall_s"] >= 0 and r["repeats"] == 1 for r in rows)
    assert logging.root.manager.disable == logging.NOTSET  # the process's logging is left as it was
