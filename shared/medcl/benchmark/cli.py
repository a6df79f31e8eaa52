"""
``python scripts/benchmark.py`` / ``python -m medcl.benchmark``: run a grid of method bundle x label fraction x seed
on one MSD-style dataset through ``python -m monai.bundle run`` (the very configs users run), then write
``<out>/<run>/label_efficiency.{csv,md,png}``.

Layout of a run folder::

    <out>/<run>/pretrain/<method>_s<seed>/      pre-training bundle_root (models/pretrained.pt, pretrain.log, done.json)
    <out>/<run>/cells/<method>_f<frac>_s<seed>/ fine-tuning bundle_root (models/, eval/, logs, cell.json)

Every cell is scored on a fixed **test** set that neither training nor checkpoint selection sees: the dataset's
labelled ``test`` entries when it has any, else ``--test_fraction`` (default 0.2) of its ``training`` cases drawn with
``--test_seed`` (default 0), the same for every method, fraction and seed (:func:`medcl.data.load_splits`). Both
checkpoints are scored: ``model.pt`` (selected on the validation cases) into ``eval/`` and ``model_final.pt`` (the
last) into ``eval_final/``. ``<out>/<run>/split.json`` records the test set; a later call with another one is refused.

A cell or pre-training whose ``cell.json`` / ``done.json`` exists is skipped, so a killed benchmark continues
where it stopped: every bundle run gets ``resume: true``, so an unfinished cell or pre-training goes on from its last
finished epoch (``models/run_state.pt``; its record then says ``"resumed": true`` and its times cover only the
resumed part); a second call with other methods, fractions or seeds adds cells to the same run, and the reports
cover every finished cell.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from medcl.benchmark.curves import cell_curve, convergence
from medcl.benchmark.grid import METHODS, PRESETS, Method
from medcl.benchmark.report import write_reports
from medcl.benchmark.runs import read_case_dice, read_dice, run_bundle
from medcl.errors import MedclInputError
from medcl.handlers.run_state import run_state_path
from medcl.utils.atomic import atomic_write_json

__all__ = ["main", "validate_grid"]

# the bundles this (editable) install of medcl ships with; data and results paths are relative to the working folder
REPO = Path(__file__).resolve().parents[3]
BUNDLES = REPO / "bundles"
DEFAULT_DATA = "data/phantom"
POOLED_PHANTOMS = {"data/phantom_pelvis": "pelvis", "data/phantom_thorax": "thorax"}
#: Fraction of ``training`` carved out as the test set when the dataset has no labelled ``test`` entries.
DEFAULT_TEST_FRACTION = 0.2
#: Keys the benchmark sets itself (through --test_fraction / --test_seed), refused in --overrides.
SPLIT_KEYS = ("test_fraction", "test_seed", "eval_split")


def _as_list(value, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (int, float, str)):
        return [value]
    try:
        return list(value)
    except TypeError as e:
        raise MedclInputError(f'--{name} must be a list, e.g. --{name} "[0.1, 1.0]", got {value!r}.') from e


def validate_grid(methods: Sequence[str], fractions: Sequence, num_labelled: Sequence, seeds: Sequence) -> None:
    """
    Check the grid before anything runs.

    Raises:
        MedclInputError: for an unknown method, a fraction outside (0, 1], a number of labelled volumes below 1,
            a non-integer seed or an empty grid.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MedclInputError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}.")
    bad = [f for f in fractions if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 < float(f) <= 1.0]
    if bad:
        raise MedclInputError(f"label fractions must lie in (0, 1], got {bad}; use --num_labelled for volume counts.")
    bad = [n for n in num_labelled if not isinstance(n, int) or isinstance(n, bool) or n < 1]
    if bad:
        raise MedclInputError(f"--num_labelled values must be integers >= 1, got {bad}.")
    if any(not isinstance(s, int) or isinstance(s, bool) for s in seeds):
        raise MedclInputError(f"seeds must be integers, got {list(seeds)}.")
    if not methods or not seeds or not (fractions or num_labelled):
        raise MedclInputError(
            "the grid is empty: give at least one method, one fraction (or --num_labelled) and one seed."
        )


def _check_labelled_dataset(dataset_dir: Path) -> list[str]:
    """The dataset's class names; raises when it has no labels to fine-tune and evaluate on."""
    from medcl.data import read_dataset_info

    info = read_dataset_info(str(dataset_dir))
    training = json.loads(Path(info.dataset_json).read_text()).get("training") or []
    if info.num_classes < 2 or not any(isinstance(t, dict) and t.get("label") for t in training):
        raise MedclInputError(
            f"{info.dataset_json} has no labelled training cases (needs 'labels' with a foreground class and "
            "'training' items with 'label'): the benchmark fine-tunes and evaluates on labels."
        )
    return info.label_names


def resolve_test_split(dataset_dir: Path, test_fraction: float | None, test_seed: int) -> dict:
    """
    The benchmark's test set: the dataset's labelled ``test`` entries, or ``test_fraction`` of ``training``.

    Args:
        dataset_dir: the labelled dataset.
        test_fraction: None for the default (0 with a labelled ``test`` set, else :data:`DEFAULT_TEST_FRACTION`).
        test_seed: seed of the test draw.

    Returns:
        ``{"test_fraction", "test_seed", "test": [image base names]}``.

    Raises:
        MedclInputError: ``test_fraction`` outside [0, 1), a test set overlapping training, a fraction given with a
            labelled test set, or no test set at all (test Dice needs labelled test cases).
    """
    from medcl.data import load_splits, read_test_entries

    if test_fraction is None:
        test_fraction = 0.0 if read_test_entries(str(dataset_dir))[0] else DEFAULT_TEST_FRACTION
    if isinstance(test_seed, bool) or not isinstance(test_seed, int):
        raise MedclInputError(f"--test_seed must be an integer, got {test_seed!r}.")
    test = load_splits(str(dataset_dir), check="off", test_fraction=test_fraction, test_seed=test_seed)["test"]
    if not test:
        raise MedclInputError(
            f"the benchmark reports test Dice, but {dataset_dir / 'dataset.json'} has no labelled 'test' entries and "
            "--test_fraction is 0: give --test_fraction 0.2 (a fixed test set carved out of 'training') or add "
            "labels (labelsTs/) to its 'test' entries."
        )
    return {
        "test_fraction": test_fraction,
        "test_seed": test_seed,
        "test": sorted(os.path.basename(d["image"]) for d in test),
    }


def _check_run_split(run_dir: Path, split: dict) -> None:
    """Record the run's test set in ``split.json``; refuse a later call whose test set differs."""
    path = run_dir / "split.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != split:
            raise MedclInputError(
                f"{path}: this run's cells were scored on another test set (test_fraction "
                f"{old.get('test_fraction')}, test_seed {old.get('test_seed')}); give the same --test_fraction / "
                "--test_seed, or a new --run."
            )
    else:
        _write_json(path, split)


def _ensure_phantom(path: Path, organ_set: str, n: int) -> None:
    if not (path / "dataset.json").is_file():
        from medcl.data.phantom import generate_dataset

        print(f"[benchmark] generating the {organ_set} phantom ({n} cases) in {path}", flush=True)
        generate_dataset(str(path), n=n, seed=0, organ_set=organ_set)


def _config_keys(bundle: str, config: str) -> set[str]:
    return set(json.loads((BUNDLES / bundle / "configs" / config).read_text()))


def _config_value(bundle: str, config: str, key: str, overrides: Mapping):
    return overrides[key] if key in overrides else json.loads((BUNDLES / bundle / "configs" / config).read_text())[key]


def _write_json(path: Path, data: Mapping) -> None:
    """Atomically: a finished marker is either complete or absent."""
    atomic_write_json(path, data)


class _Benchmark:
    def __init__(
        self,
        run_dir: Path,
        dataset_dir: Path,
        label_names: list[str],
        bundle_overrides: Mapping,
        user_overrides: Mapping,
        common: Mapping,
        tracking: str | None,
        split: Mapping | None = None,
    ):
        self.run_dir, self.dataset_dir, self.label_names = run_dir, dataset_dir, label_names
        self.split = dict(split or {"test_fraction": 0.0, "test_seed": 0, "test": []})
        self.bundle_overrides, self.user_overrides, self.common = bundle_overrides, user_overrides, common
        self.tracking = tracking

    def overrides(self, method: Method, config: str, extra: Mapping, run_name: str) -> dict:
        """Preset (filtered to the config's keys) < common < user < method-specific overrides."""
        keys = _config_keys(method.bundle, config)
        if config != "train.json":
            keys |= _config_keys(method.bundle, "train.json") if config == "evaluate.json" else set()
        spec = dict(self.bundle_overrides.get(method.bundle, {}))
        spec.update(spec.pop("pretrain", {}) if config == "pretrain.json" else {})
        spec.pop("pretrain", None)
        preset = {k: v for k, v in spec.items() if k in keys}
        common = {k: v for k, v in self.common.items() if k in keys}
        user = {k: v for k, v in self.user_overrides.get("*", {}).items() if k in keys}  # "*": where the key exists
        user.update(self.user_overrides.get(method.bundle, {}))  # per bundle: unknown keys fail loudly
        out = {**preset, **common, **user, **extra}
        if self.tracking:
            out.update(
                {
                    "tracking": self.tracking,
                    "experiment_name": f"medcl_{self.run_dir.name}",
                    "run_name": run_name,
                    "tracking_uri": f"sqlite:///{self.run_dir / 'mlruns.db'}",
                }
            )
        return out

    def pretrain(self, method: Method, seed: int) -> dict:
        root = self.run_dir / "pretrain" / f"{method.name}_s{seed}"
        done = root / "done.json"
        if done.is_file():
            return json.loads(done.read_text())
        name = f"{method.name}_s{seed}_pretrain"
        over = self.overrides(
            method,
            "pretrain.json",
            {**method.pretrain_overrides, "bundle_root": root, "seed": seed, "resume": True},
            name,
        )
        resumed = os.path.isfile(run_state_path(str(root / "models")))
        iters = _config_value(method.bundle, "pretrain.json", "max_epochs", over) * _config_value(
            method.bundle, "pretrain.json", "epoch_length", over
        )
        print(f"[benchmark] {name}: pre-train ({iters} iterations)", flush=True)
        result = run_bundle(
            [BUNDLES / method.bundle / "configs" / "pretrain.json"], over, root / "pretrain.log", cwd=REPO
        )
        record = {
            "pretrain_s": result["wall_s"],
            "pretrain_peak_rss_mib": result["peak_rss_mib"],
            "pretrain_iterations": iters,
            "pretrained_ckpt": str(root / "models" / "pretrained.pt"),
            **({"pretrain_resumed": True} if resumed else {}),
        }
        _write_json(done, record)
        return record

    def cell(self, method: Method, seed: int, fraction: float | None, num_labelled: int | None) -> None:
        tag = f"f{fraction:g}" if num_labelled is None else f"n{num_labelled}"
        root = self.run_dir / "cells" / f"{method.name}_{tag}_s{seed}"
        if (root / "cell.json").is_file():
            print(f"[benchmark] {root.name}: done, skipped", flush=True)
            return
        source = METHODS[method.pretrain_from] if method.pretrain_from else method
        pre = self.pretrain(source, seed) if method.pretrain else {}
        extra = {**method.train, "bundle_root": root, "seed": seed, "resume": True}
        resumed = os.path.isfile(run_state_path(str(root / "models")))
        if num_labelled is None:
            extra["label_fraction"] = fraction
        else:
            extra["num_labelled"] = num_labelled
        if pre:
            extra["pretrained_ckpt"] = pre["pretrained_ckpt"]
        over = self.overrides(method, "train.json", extra, root.name)
        iters = _config_value(method.bundle, "train.json", "max_epochs", over) * _config_value(
            method.bundle, "train.json", "epoch_length", over
        )
        print(f"[benchmark] {root.name}: fine-tune ({iters} iterations)", flush=True)
        configs = BUNDLES / method.bundle / "configs"
        train = run_bundle([configs / "train.json"], over, root / "train.log", cwd=REPO)
        eval_over = {
            k: v for k, v in over.items() if k not in ("tracking", "experiment_name", "run_name", "tracking_uri")
        }
        eval_over["eval_split"] = "test"
        evaluate = [configs / "train.json", configs / "evaluate.json"]
        run_bundle(evaluate, eval_over, root / "evaluate.log", cwd=REPO)  # model.pt -> eval/
        final = {**eval_over, "ckpt_path": root / "models" / "model_final.pt", "output_dir": root / "eval_final"}
        run_bundle(evaluate, final, root / "evaluate_final.log", cwd=REPO)
        dice = read_dice(root / "eval", self.label_names)
        dice_final = read_dice(root / "eval_final", self.label_names)
        from medcl.data import load_splits

        splits = load_splits(
            str(self.dataset_dir),
            label_fraction=fraction if num_labelled is None else None,
            num_labelled=num_labelled,
            seed=seed,
            check="off",
            test_fraction=self.split["test_fraction"],
            test_seed=self.split["test_seed"],
        )
        n_lab, pool = len(splits["labelled"]), len(splits["labelled"]) + len(splits["unlabelled"])
        record = {
            "method": method.name,
            "backbone": method.backbone,
            "bundle": method.bundle,
            "label_fraction": fraction if num_labelled is None else round(n_lab / pool, 4),
            "num_labelled": n_lab,
            "seed": seed,
            "eval_split": "test",
            "num_test": len(splits["test"]),
            "test_fraction": self.split["test_fraction"],
            "test_seed": self.split["test_seed"],
            "mean_dice": round(dice.pop("mean"), 4),
            "mean_dice_final": round(dice_final.pop("mean"), 4),
            **{f"dice_{k}": round(v, 4) for k, v in dice.items()},
            **{f"final_dice_{k}": round(v, 4) for k, v in dice_final.items()},
            "case_dice": read_case_dice(root / "eval"),
            "case_dice_final": read_case_dice(root / "eval_final"),
            "train_s": train["wall_s"],
            "iterations": iters,
            "peak_rss_mib": train["peak_rss_mib"],
            **{k: v for k, v in pre.items() if k != "pretrained_ckpt"},
            **(convergence(cell_curve(root), iters) or {}),
            **({"resumed": True} if resumed else {}),
        }
        _write_json(root / "cell.json", record)
        print(
            f"[benchmark] {root.name}: test Dice {record['mean_dice']:.3f} (model.pt), "
            f"{record['mean_dice_final']:.3f} (model_final.pt)",
            flush=True,
        )


def main(
    run: str | None = None,
    preset: str = "cpu",
    methods: Sequence[str] | str | None = None,
    fractions: Sequence[float] | float | None = None,
    num_labelled: Sequence[int] | int | None = None,
    seeds: Sequence[int] | int | None = None,
    dataset_dir: str = DEFAULT_DATA,
    pretrain_dataset_dirs: Sequence[str] | None = None,
    out: str = "results",
    overrides: Mapping | None = None,
    num_workers: int = 2,
    tracking: str | None = None,
    report_only: bool = False,
    test_fraction: float | None = None,
    test_seed: int = 0,
) -> str:
    """
    Run (or continue) a label-efficiency benchmark and write its CSV, Markdown table and plot.

    Args:
        run: name of the run folder under ``out`` (default: the preset's name).
        preset: ``cpu`` (converged 2D budgets, about 1.5 hours on 2 cores) or ``paper`` (the papers' sizes, for a
            GPU); sets the sizes and the default grid.
        methods: entries of :data:`medcl.benchmark.grid.METHODS` (default: the preset's).
        fractions: label fractions in (0, 1] (default: the preset's).
        num_labelled: numbers of labelled volumes instead of fractions.
        seeds: seeds (default: the preset's); each seed sets the split and the training seed.
        dataset_dir: MSD-style labelled dataset (default: the phantom, generated when missing).
        pretrain_dataset_dirs: MixCL's pooled labelled datasets (default: pelvis and thorax phantoms).
        out: root folder of the runs (relative paths here and in the dataset arguments are relative to the
            working folder; run from the repository root for the defaults).
        overrides: extra bundle overrides, ``{"*": {...}}`` for every config that has the key, or
            ``{"<bundle>": {...}}`` for every config of one bundle.
        num_workers: data-loader workers of every run.
        tracking: ``mlflow`` to log every cell as an MLflow run of the experiment ``medcl_<run>`` in
            ``<out>/<run>/mlruns.db``.
        report_only: only rewrite the reports from the finished cells.
        test_fraction: fraction of the dataset's ``training`` cases held out as the fixed test set every cell is
            scored on, in [0, 1); default: 0 when the dataset has labelled ``test`` entries (they are the test set),
            else :data:`DEFAULT_TEST_FRACTION` (0.2).
        test_seed: seed of that draw (not a training seed: the test set is the same for every cell).

    Returns:
        the Markdown table.

    Raises:
        MedclInputError: for a bad grid, an unknown preset, a dataset without labels, a bad or missing test set, a
            test set other than the run's, or ``test_fraction`` / ``test_seed`` / ``eval_split`` in ``overrides``.
    """
    if preset not in PRESETS:
        raise MedclInputError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}.")
    spec = PRESETS[preset]
    methods = _as_list(methods, "methods") or list(spec["methods"])
    num_labelled = _as_list(num_labelled, "num_labelled")
    fractions = _as_list(fractions, "fractions") or ([] if num_labelled else list(spec["fractions"]))
    seeds = _as_list(seeds, "seeds") or list(spec["seeds"])
    validate_grid(methods, fractions, num_labelled, seeds)
    if tracking not in (None, "mlflow"):
        raise MedclInputError(f"--tracking must be mlflow or left out, got {tracking!r}.")
    run_dir = (Path(out) / (run or preset)).resolve()
    baselines = {m.name: m.baseline for m in METHODS.values()}
    title = f"medcl label-efficiency benchmark, run {run_dir.name} (preset {preset})"
    if report_only:
        return write_reports(run_dir, baselines, title)["md"].read_text()

    data = Path(dataset_dir).resolve()
    if dataset_dir == DEFAULT_DATA:
        _ensure_phantom(data, "abdomen", 40)
    label_names = _check_labelled_dataset(data)
    split = resolve_test_split(data, test_fraction, test_seed)
    common: dict = {
        "dataset_dir": data,
        "num_workers": num_workers,
        "test_fraction": split["test_fraction"],
        "test_seed": split["test_seed"],
    }
    if any(METHODS[m].bundle == "mixcl" for m in methods):
        dirs = _as_list(pretrain_dataset_dirs, "pretrain_dataset_dirs") or list(POOLED_PHANTOMS)
        for d in dirs:
            if d in POOLED_PHANTOMS:
                _ensure_phantom(Path(d).resolve(), POOLED_PHANTOMS[d], 20)
        common["pretrain_dataset_dirs"] = [str(Path(d).resolve()) for d in dirs]
    user = {k: dict(v) for k, v in (overrides or {}).items()} if overrides else {}
    if any(not isinstance(v, Mapping) for v in (overrides or {}).values()):
        raise MedclInputError('--overrides must be {"*": {key: value}} or {"<bundle>": {key: value}}.')
    fixed = sorted({k for v in user.values() for k in v if k in SPLIT_KEYS})
    if fixed:
        raise MedclInputError(
            f"--overrides sets {fixed}: the benchmark sets the split itself; use --test_fraction / --test_seed."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_run_split(run_dir, split)
    bench = _Benchmark(run_dir, data, label_names, spec["bundles"], user, common, tracking, split)
    t0 = time.time()
    grid = [(f, None) for f in fractions] + [(None, n) for n in num_labelled]
    for seed in seeds:
        for name in methods:
            for fraction, n in grid:
                bench.cell(METHODS[name], int(seed), None if fraction is None else float(fraction), n)
            write_reports(run_dir, baselines, title)
    paths = write_reports(run_dir, baselines, title)
    table = paths["md"].read_text()
    print(f"\n{table}\n[benchmark] {time.time() - t0:.0f} s; reports: {', '.join(str(p) for p in paths.values())}")
    return table
