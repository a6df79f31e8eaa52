"""Progress lines: ProgressHandler on a tiny ignite Engine, its place in the bundles, whole lines echoed by runs.py."""

from __future__ import annotations

import itertools
import json
import logging
import re
import sys

import pytest
from conftest import REPO
from ignite.engine import Engine, Events

import medcl.handlers.progress as progress
from medcl.benchmark import runs
from medcl.handlers import ProgressHandler

LINE = re.compile(
    r"Progress: epoch (\d+)/(\d+), iteration (\d+)/(\d+) \((\d+)%\), elapsed (\d+:\d\d:\d\d), left ~(\d+):(\d\d):(\d\d)"
)


def _run(monkeypatch, caplog, interval, max_epochs=3, epoch_length=5, name="test_progress"):
    """Run a no-op engine with a clock that advances one second per reading; return the progress lines."""
    clock = itertools.count()
    monkeypatch.setattr(progress.time, "monotonic", lambda: float(next(clock)))
    engine = Engine(lambda e, b: None)
    ProgressHandler(interval=interval, name=name).attach(engine)
    with caplog.at_level(logging.INFO):
        engine.run(range(epoch_length), max_epochs=max_epochs)
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Progress:")]


def test_lines_totals_and_time_left(monkeypatch, caplog):
    lines = _run(monkeypatch, caplog, interval=0)
    assert len(lines) == 15  # every iteration (interval 0), an epoch's last one at the epoch end
    parsed = [LINE.fullmatch(s) for s in lines]
    assert all(parsed), lines
    assert {(m[2], m[4]) for m in parsed} == {("3", "15")}  # totals: max_epochs, max_epochs * epoch_length
    iterations = [int(m[3]) for m in parsed]
    assert iterations == sorted(iterations) and iterations[-1] == 15
    left = [int(m[7]) * 3600 + int(m[8]) * 60 + int(m[9]) for m in parsed]
    assert all(a >= b for a, b in itertools.pairwise(left)) and left[0] > left[-1] == 0
    assert parsed[-1][1] == "3" and parsed[-1][5] == "100"


def test_interval_limits_lines(monkeypatch, caplog):
    lines = _run(monkeypatch, caplog, interval=1e9)
    assert [LINE.fullmatch(s)[1] for s in lines] == ["1", "2", "3"]  # epoch ends only
    caplog.clear()
    records = []
    monkeypatch.setattr(logging.Logger, "info", lambda self, msg, *a, **k: records.append((self.name, msg)))
    _run(monkeypatch, caplog, interval=1e9, name=None)
    assert [n for n, m in records if m.startswith("Progress:")] == ["ignite.engine.engine.Engine"] * 3


def test_resumed_run_counts_its_own_iterations(monkeypatch, caplog):
    clock = itertools.count()
    monkeypatch.setattr(progress.time, "monotonic", lambda: float(next(clock)))
    engine = Engine(lambda e, b: None)
    ProgressHandler(interval=1e9).attach(engine)

    @engine.on(Events.STARTED)
    def restore(e):  # as RunStateHandler does, after ProgressHandler's STARTED
        e.state.iteration, e.state.epoch = 10, 2

    with caplog.at_level(logging.INFO):
        engine.run(range(5), max_epochs=4)
    lines = [LINE.fullmatch(r.getMessage()) for r in caplog.records if r.getMessage().startswith("Progress:")]
    assert [(m[1], m[3]) for m in lines] == [("3", "15"), ("4", "20")]
    elapsed = int(lines[0][6].split(":")[-1])
    assert int(lines[0][9]) == elapsed  # 5 of 10 remaining iterations done: time left equals time taken


def test_bad_interval():
    with pytest.raises(ValueError, match="interval"):
        ProgressHandler(interval=-1)


@pytest.mark.parametrize(
    "path",
    [p for p in sorted((REPO / "bundles").glob("*/configs/*.json")) if p.name in ("train.json", "pretrain.json")],
    ids=lambda p: f"{p.parent.parent.name}/{p.name}",
)
def test_bundles_list_the_handler(path):
    handlers = json.loads(path.read_text())["train"]["handlers"]
    assert all(isinstance(h, dict) for h in handlers)
    targets = [h["_target_"] for h in handlers]
    assert "medcl.handlers.ProgressHandler" in targets
    assert targets[0] == "medcl.handlers.NonFiniteLossGuard" and targets[-1] == "medcl.handlers.RunStateHandler"


def test_runs_echo_whole_lines(monkeypatch, tmp_path, capsys):
    message = "Progress: epoch 7/20, iteration 140/400 (35%), " + "x" * 300 + " end"
    script = (
        f"import logging,sys; print('2026-12-02 18:00:00,123 - ProgressHandler - INFO - {message}'); print('quiet')"
    )
    monkeypatch.setattr(runs, "bundle_command", lambda configs, overrides: [sys.executable, "-c", script])
    runs.run_bundle([], {}, tmp_path / "run.log", prefix="> ")
    assert capsys.readouterr().out.splitlines() == [f"> {message}"]
    assert message in (tmp_path / "run.log").read_text()
    assert runs.echo_text("2026-12-02 18:00:00,123 - INFO - Epoch[4] Metrics -- val_mean_dice: 0.5 \n") == (
        "Epoch[4] Metrics -- val_mean_dice: 0.5"
    )
