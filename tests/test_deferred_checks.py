"""Deferred input checks for large pools (issue 15): headers of a long list are read when the pool first loads
them, not all before the first iteration, and a bad file still gives one message."""

from __future__ import annotations

import gzip
import json
import logging
import shutil

import pytest
from conftest import BUNDLES, run_bundle

from medcl.data import checks
from medcl.data.checks import CheckFilesd, check_datalist
from medcl.data.phantom import generate_dataset
from medcl.errors import MedclInputError

N_CASES = 12


@pytest.fixture(scope="module")
def pool_with_bad_last(tmp_path_factory):
    """12 phantom cases; the last listed image is truncated (its header still reads)."""
    root = tmp_path_factory.mktemp("deferred")
    generate_dataset(str(root), n=N_CASES, n_test=0, seed=0, shape=(32, 32, 32))
    info = json.loads((root / "dataset.json").read_text())
    bad = root / info["training"][-1]["image"]
    raw = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    items = [{"image": str(root / it["image"]), "label": str(root / it["label"])} for it in info["training"]]
    return root, items, str(bad)


@pytest.fixture(autouse=True)
def fresh_record():
    saved = set(checks._CHECKED)
    checks._CHECKED.clear()
    yield
    checks._CHECKED.clear()
    checks._CHECKED.update(saved)


def test_a_long_list_is_checked_in_part_and_the_rest_at_load(pool_with_bad_last, caplog):
    _, items, bad = pool_with_bad_last
    with caplog.at_level(logging.INFO, logger="medcl.data.checks"):
        assert check_datalist(items, label_values=[0, 1, 2, 3, 4], defer_above=4) == items
    assert "first 8 checked now" in caplog.text
    check = CheckFilesd(label_values=[0, 1, 2, 3, 4])
    with pytest.raises(MedclInputError, match="corrupt or truncated") as err:
        check(dict(items[-1]))
    assert bad in str(err.value)
    # a file checked before training is not read again; an unchecked good one passes and is then recorded
    calls = []
    real = checks._check_item
    checks._check_item = lambda *a, **k: calls.append(a[0]["image"]) or real(*a, **k)
    try:
        assert check(dict(items[0])) == items[0]
        assert calls == []
        assert check(dict(items[9])) == items[9]
        assert calls == [items[9]["image"]]
        check(dict(items[9]))
        assert calls == [items[9]["image"]]
    finally:
        checks._check_item = real


def test_without_deferral_every_file_is_checked_now(pool_with_bad_last):
    _, items, bad = pool_with_bad_last
    with pytest.raises(MedclInputError, match="corrupt or truncated") as err:
        check_datalist(items, label_values=[0, 1, 2, 3, 4])
    assert bad in str(err.value)
    with pytest.raises(MedclInputError):
        check_datalist(items, defer_above=len(items))  # not longer than the limit: all now


def test_a_missing_file_of_a_deferred_list_fails_before_training(pool_with_bad_last, tmp_path):
    _, items, _ = pool_with_bad_last
    gone = [dict(it) for it in items]
    gone[10]["label"] = str(tmp_path / "nowhere.nii.gz")
    with pytest.raises(MedclInputError, match="file not found") as err:
        check_datalist(gone, defer_above=4)
    assert "nowhere.nii.gz" in str(err.value)


def test_check_level_off_checks_nothing_at_load(pool_with_bad_last):
    _, items, _ = pool_with_bad_last
    assert CheckFilesd(level="off")(dict(items[-1])) == items[-1]
    with pytest.raises(MedclInputError, match="check level"):
        CheckFilesd(level="some")


@pytest.mark.slow
def test_bundle_stops_with_one_message_when_the_pool_loads_the_bad_file(pool_with_bad_last, tmp_path):
    """scratch_baseline with pool_memory_max 4: the training set goes to disk (PersistentDataset), the truncated
    file is met in a loader worker during the first epoch, and the run ends with the one-line message."""
    root, _, bad = pool_with_bad_last
    data = tmp_path / "data"
    shutil.copytree(root, data)
    proc = run_bundle(
        [BUNDLES / "scratch_baseline" / "configs" / "train.json"],
        "--dataset_dir",
        str(data),
        "--bundle_root",
        str(tmp_path / "run"),
        "--pool_memory_max",
        "4",
        "--val_fraction",
        "0.2",
        "--max_epochs",
        "1",
        "--epoch_length",
        "12",
        "--num_workers",
        "1",
        timeout=400,
    )
    out = proc.stdout
    assert proc.returncode != 0, out[-3000:]
    assert "first 8 checked now" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "corrupt or truncated" in out and bad.replace(str(root), str(data)) in out, out[-3000:]
