"""Three-way split: a fixed test set carved out first, then validation and the labelled / unlabelled pool."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medcl.data import (
    eval_datalist,
    load_splits,
    pooled_datalist,
    read_test_entries,
    record_split,
    split_datalist,
)
from medcl.errors import MedclInputError


def _items(n):
    return [{"image": f"/d/img_{i:03d}.nii.gz", "label": f"/d/lab_{i:03d}.nii.gz"} for i in range(n)]


def _images(items):
    return [d["image"] for d in items]


@pytest.mark.parametrize("n", [10, 23, 50])
def test_no_case_in_two_sets_and_test_fixed_across_seeds_and_fractions(n):
    """Property over seeds x label fractions x test fractions: parts are disjoint and cover the datalist, and the
    test set depends on the test fraction and test seed only."""
    for test_fraction in (0.0, 0.1, 0.2, 0.35):
        tests = set()
        for seed in range(12):
            for label_fraction in (0.05, 0.1, 0.5, 1.0):
                s = split_datalist(
                    _items(n), val_fraction=0.2, label_fraction=label_fraction, seed=seed, test_fraction=test_fraction
                )
                parts = [set(_images(s[k])) for k in ("test", "val", "labelled", "unlabelled")]
                assert sum(len(p) for p in parts) == n == len(set().union(*parts))  # disjoint and complete
                assert all("label" in d for k in ("test", "val", "labelled") for d in s[k])
                assert all("label" not in d for d in s["unlabelled"])
                expected = 0 if test_fraction == 0 else max(1, round(test_fraction * n))
                assert len(s["test"]) == expected
                tests.add(tuple(_images(s["test"])))
        assert len(tests) == 1  # the same test set for every seed and label fraction
    other = split_datalist(_items(n), test_fraction=0.2, test_seed=1)["test"]
    assert other != split_datalist(_items(n), test_fraction=0.2, test_seed=0)["test"]


def test_without_test_fraction_the_split_is_the_two_way_split():
    """test_fraction 0 keeps the former split case for case (val from all cases, then the labelled pool)."""
    s = split_datalist(_items(50), val_fraction=0.2, label_fraction=0.1, seed=3)
    assert s["test"] == [] and len(s["val"]) == 10 and len(s["labelled"]) == 4 and len(s["unlabelled"]) == 36
    # the former implementation: one permutation of the sorted cases
    order = np.random.default_rng(3).permutation(50)
    assert _images(s["val"]) == [_items(50)[i]["image"] for i in order[:10]]
    assert _images(s["labelled"]) == [_items(50)[i]["image"] for i in order[10:14]]


def test_val_and_labelled_nested_within_one_test_set():
    small = split_datalist(_items(40), label_fraction=0.1, seed=0, test_fraction=0.2)
    large = split_datalist(_items(40), label_fraction=0.5, seed=0, test_fraction=0.2)
    assert small["test"] == large["test"] and small["val"] == large["val"]
    assert all(d in large["labelled"] for d in small["labelled"])


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "x", True])
def test_test_fraction_outside_range_is_refused(bad):
    with pytest.raises(MedclInputError, match=r"test_fraction=.* must be in \[0, 1\); e.g. --test_fraction 0.2"):
        split_datalist(_items(10), test_fraction=bad)


def test_too_few_cases_for_test_val_and_training():
    with pytest.raises(MedclInputError, match="lower val_fraction / test_fraction"):
        split_datalist(_items(3), val_fraction=0.5, test_fraction=0.5)


def test_given_test_set_must_not_overlap_training_nor_come_with_a_fraction():
    train, extra = _items(10), [{"image": "/d/img_900.nii.gz", "label": "/d/lab_900.nii.gz"}]
    s = split_datalist(train, test=extra, seed=1)
    assert s["test"] == extra and len(s["val"]) + len(s["labelled"]) == 10
    with pytest.raises(MedclInputError, match=r"img_003.nii.gz'\] also listed in 'training'"):
        split_datalist(train, test=extra + [train[3]])
    with pytest.raises(MedclInputError, match="leave test_fraction at 0"):
        split_datalist(train, test=extra, test_fraction=0.2)


def _labelled_test_copy(phantom_dir, tmp_path, moved=2, overlap=False):
    """A phantom copy whose last ``moved`` training cases are labelled ``test`` entries (next to an image-only one)."""
    ds = tmp_path / "ds"
    shutil.copytree(phantom_dir, ds)
    meta = json.loads((ds / "dataset.json").read_text())
    tests = meta["training"][-moved:]
    if not overlap:
        meta["training"] = meta["training"][:-moved]
    meta["test"] = list(meta["test"]) + tests
    (ds / "dataset.json").write_text(json.dumps(meta))
    return ds


def test_labelled_test_entries_are_the_test_set_and_never_pooled(phantom_dir, tmp_path):
    ds = _labelled_test_copy(phantom_dir, tmp_path)
    labelled, image_only = read_test_entries(str(ds))
    assert len(labelled) == 2 and len(image_only) == 1 and all("label" not in d for d in image_only)
    for include_test in (False, True):
        s = load_splits(str(ds), label_fraction=0.5, seed=0, check="full", include_test=include_test)
        assert _images(s["test"]) == sorted(_images(labelled))
        pools = set(_images(s["val"] + s["labelled"] + s["unlabelled"]))
        assert not pools & set(_images(labelled))
        assert (_images(image_only)[0] in pools) == include_test  # include_test adds image-only entries only
    assert eval_datalist(s, "test", str(ds)) == s["test"]
    held = {d["image"] for d in pooled_datalist([str(ds)], holdout_dir=str(ds), seed=0, check="off")}
    assert not held & set(_images(labelled))


def test_carved_test_set_is_left_out_of_every_pool(phantom_dir):
    a = load_splits(str(phantom_dir), label_fraction=0.5, seed=0, check="off", include_test=True, test_fraction=0.25)
    b = load_splits(str(phantom_dir), label_fraction=1.0, seed=5, check="off", include_test=True, test_fraction=0.25)
    assert a["test"] == b["test"] and len(a["test"]) == 2
    for s in (a, b):
        assert not set(_images(s["test"])) & set(_images(s["val"] + s["labelled"] + s["unlabelled"]))
    pooled = {
        d["image"]
        for d in pooled_datalist([str(phantom_dir)], holdout_dir=str(phantom_dir), seed=0, test_fraction=0.25)
    }
    assert len(pooled) == 8 - 2 - 1 and not pooled & set(_images(a["test"]))


def test_test_set_overlapping_training_names_the_file(phantom_dir, tmp_path):
    ds = _labelled_test_copy(phantom_dir, tmp_path, moved=1, overlap=True)
    with pytest.raises(MedclInputError, match=r"dataset.json: test image\(s\) \['.*_007.nii.gz'\] also listed"):
        load_splits(str(ds), check="off")


def test_labelled_test_set_with_test_fraction_is_refused(phantom_dir, tmp_path):
    ds = _labelled_test_copy(phantom_dir, tmp_path)
    with pytest.raises(MedclInputError, match="dataset.json has 2 labelled 'test' case.* leave test_fraction at 0"):
        load_splits(str(ds), check="off", test_fraction=0.2)


def test_test_dice_without_a_labelled_test_set_names_the_fix(phantom_dir):
    s = load_splits(str(phantom_dir), check="off")
    assert eval_datalist(s, "val") == s["val"]
    with pytest.raises(MedclInputError, match="no labelled test set.*--test_fraction 0.2"):
        eval_datalist(s, "test", str(phantom_dir))
    with pytest.raises(MedclInputError, match="eval_split='valid' must be one of"):
        eval_datalist(s, "valid")


def test_evaluation_scores_only_the_cases_training_held_out(tmp_path):
    """``record_split`` writes the case names training used; ``eval_datalist`` with that record refuses a split
    made with other keys (it could score training cases) and accepts the same one."""
    trained = split_datalist(_items(20), val_fraction=0.2, label_fraction=0.5, seed=0, test_fraction=0.2)
    record = record_split(trained, str(tmp_path / "models" / "split.json"))
    saved = json.loads((tmp_path / "models" / "split.json").read_text())
    assert saved["test"] == sorted(p.split("/")[-1] for p in _images(trained["test"]))
    assert set(saved) == set(trained)
    for split in ("val", "test"):
        assert eval_datalist(trained, split, record=record) == trained[split]
    other_seed = split_datalist(_items(20), val_fraction=0.2, label_fraction=0.5, seed=1, test_fraction=0.2)
    assert eval_datalist(other_seed, "test", record=record) == other_seed["test"]  # test set: independent of seed
    with pytest.raises(MedclInputError, match=r"split\.json: training held out other 'val' cases.*--split_seed"):
        eval_datalist(other_seed, "val", record=record)
    other_test = split_datalist(_items(20), val_fraction=0.2, label_fraction=0.5, seed=0, test_fraction=0.3)
    with pytest.raises(MedclInputError, match="other 'test' cases.*--test_fraction"):
        eval_datalist(other_test, "test", record=record)
    assert eval_datalist(other_test, "test", record=str(tmp_path / "absent.json")) == other_test["test"]
