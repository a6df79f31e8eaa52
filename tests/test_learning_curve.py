"""LearningCurveWriter on real Ignite engines: one row per validation, best so far, resume continues the curve."""

from __future__ import annotations

from ignite.engine import Engine, Events

from medcl.handlers import LearningCurveWriter, read_learning_curve

SCORES = [0.2, 0.5, 0.4, 0.6]  # validation score of epochs 1..4


def _engines(score_evaluator: bool = True):
    trainer = Engine(lambda e, b: None)
    evaluator = Engine(lambda e, b: None)
    evaluator.state.key_metric_name = "val_mean_dice"
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1.0, -1

    def score(engine):  # what MONAI's evaluator does with its key metric, registered before the writer
        epoch = trainer.state.epoch
        engine.state.metrics = {"val_mean_dice": SCORES[epoch - 1], "not_a_scalar": [1, 2]}
        if SCORES[epoch - 1] > engine.state.best_metric:
            engine.state.best_metric, engine.state.best_metric_epoch = SCORES[epoch - 1], epoch

    if score_evaluator:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, score)

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine):
        engine.state.metrics = {"train_loss": 1.0 / engine.state.epoch}
        evaluator.run([0])

    return trainer, evaluator


def test_one_row_per_validation_with_best_so_far(tmp_path):
    path = tmp_path / "sub" / "learning_curve.csv"
    trainer, evaluator = _engines()
    LearningCurveWriter(evaluator, path).attach(trainer)
    trainer.run([0, 1, 2], max_epochs=4)
    rows = read_learning_curve(path)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["iteration"] for r in rows] == [3, 6, 9, 12]
    assert [r["val_mean_dice"] for r in rows] == SCORES
    assert [r["best_val_mean_dice"] for r in rows] == [0.2, 0.5, 0.5, 0.6]
    assert rows[1]["train_loss"] == 0.5 and "not_a_scalar" not in rows[0]
    assert not (tmp_path / "sub" / "learning_curve.csv.tmp").exists()


def test_resumed_run_replaces_the_epochs_it_repeats(tmp_path):
    path = tmp_path / "learning_curve.csv"
    trainer, evaluator = _engines()
    LearningCurveWriter(evaluator, path).attach(trainer)
    trainer.run([0, 1, 2], max_epochs=4)
    # a run killed after epoch 4 whose last run state was epoch 2 repeats epochs 3 and 4: no duplicate rows
    trainer, evaluator = _engines()
    LearningCurveWriter(evaluator, path).attach(trainer)
    trainer.state.epoch, trainer.state.iteration, trainer.state.epoch_length = 2, 6, 3
    trainer.state.max_epochs = 4
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.5, 2
    trainer.run([0, 1, 2], max_epochs=4)
    rows = read_learning_curve(path)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["best_val_mean_dice"] for r in rows] == [0.2, 0.5, 0.5, 0.6]


def test_no_best_column_before_a_best_exists(tmp_path):
    path = tmp_path / "learning_curve.csv"
    trainer, evaluator = _engines(score_evaluator=False)
    LearningCurveWriter(evaluator, path).attach(trainer)
    trainer.run([0], max_epochs=1)
    (row,) = read_learning_curve(path)
    assert "best_val_mean_dice" not in row and row["train_loss"] == 1.0
    assert read_learning_curve(tmp_path / "missing.csv") == []
