"""Bounded-memory data pools (issue 15, item 1): ``medcl.data.make_pool_dataset`` returns MONAI's own datasets,
caches on disk under ``cache_dir`` keyed by the preprocessing, picks by size, and turns a bad cache folder, a full
disk or a stale item into one message naming the folder."""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES, run_bundle
from monai.data import CacheDataset, DataLoader, PersistentDataset
from monai.transforms import Compose, EnsureTyped, LoadImaged, RandSpatialCropd, ScaleIntensityd

import medcl.data.pools as pools
from medcl.data import make_pool_dataset
from medcl.errors import MedclInputError, worker_message


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> list[dict]:
    """Six 8x8x6 NIfTI volumes as a datalist."""
    out = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        path = out / f"v{i}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((8, 8, 6)).astype(np.float32), np.eye(4)), str(path))
        items.append({"image": str(path)})
    return items


def _transform(maxv: float = 1.0) -> Compose:
    return Compose(
        [
            LoadImaged("image", ensure_channel_first=True, image_only=True),
            EnsureTyped("image", dtype=torch.float32),
            ScaleIntensityd("image", minv=0.0, maxv=maxv),
            RandSpatialCropd("image", roi_size=(4, 4, 4), random_size=False),
        ]
    )


def _pt_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.pt"))


def test_each_mode_returns_the_monai_class(volumes, tmp_path):
    memory = make_pool_dataset(volumes, _transform(), mode="memory", num_workers=0)
    assert type(memory) is CacheDataset and memory.cache_num == len(volumes)
    window = make_pool_dataset(volumes, _transform(), mode="window", cache_num=2, num_workers=0)
    assert type(window) is CacheDataset and window.cache_num == 2
    assert len(window) == len(volumes) and window[5]["image"].shape == (1, 4, 4, 4)  # beyond the window: read
    disk = make_pool_dataset(volumes, _transform(), mode="disk", cache_dir=tmp_path, name="pre")
    assert isinstance(disk, PersistentDataset) and disk.cache_dir == tmp_path / "pre"
    assert not _pt_files(tmp_path / "pre"), "lazy: nothing is preprocessed before the first draw"


def test_disk_writes_to_cache_dir_and_reuses_it(volumes, tmp_path, monkeypatch, caplog):
    first = make_pool_dataset(volumes, _transform(), mode="disk", cache_dir=tmp_path, name="pre")
    seen = [b["image"].shape for b in DataLoader(first, batch_size=2, shuffle=True, num_workers=0)]
    assert len(seen) == 3 and all(s == (2, 1, 4, 4, 4) for s in seen), "one pass draws every volume"
    files = _pt_files(tmp_path / "pre")
    assert len(files) == len(volumes)

    def no_preprocessing(self, item):
        raise AssertionError("a cached volume was preprocessed again")

    monkeypatch.setattr(PersistentDataset, "_pre_transform", no_preprocessing)
    with caplog.at_level(logging.INFO, logger=pools.__name__):
        again = make_pool_dataset(volumes, _transform(), mode="disk", cache_dir=tmp_path, name="pre")
    assert "(6 already cached)" in caplog.text
    assert [again[i]["image"].shape for i in range(len(volumes))] == [(1, 4, 4, 4)] * len(volumes)
    assert _pt_files(tmp_path / "pre") == files


def test_a_changed_preprocessing_gets_a_new_cache_key(volumes, tmp_path, caplog):
    a = make_pool_dataset(volumes[:2], _transform(1.0), mode="disk", cache_dir=tmp_path, name="pre")
    b = make_pool_dataset(volumes[:2], _transform(2.0), mode="disk", cache_dir=tmp_path, name="pre")
    assert a.transform_hash and a.transform_hash != b.transform_hash
    assert a.transform_hash == make_pool_dataset([], _transform(1.0), "disk", tmp_path, "pre").transform_hash
    assert float(a[0]["image"].max()) <= 1.0 + 1e-6 < 1.5 < float(b[0]["image"].max())  # b scaled to [0, 2]
    assert len(_pt_files(tmp_path / "pre")) == 2, "the second preprocessing wrote its own item"
    with caplog.at_level(logging.INFO, logger=pools.__name__):
        make_pool_dataset(volumes[:2], _transform(3.0), mode="disk", cache_dir=tmp_path, name="pre")
    assert "2 cached items of another preprocessing or version are not used" in caplog.text


def test_auto_picks_by_size_and_logs_it(volumes, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger=pools.__name__):
        small = make_pool_dataset(volumes, _transform(), cache_dir=tmp_path, memory_max_items=6, num_workers=0)
        large = make_pool_dataset(volumes, _transform(), cache_dir=tmp_path, memory_max_items=5, name="big")
        bare = make_pool_dataset(volumes, _transform(), memory_max_items=5, cache_num=3, num_workers=0)
        later = make_pool_dataset([], _transform(), cache_dir=tmp_path, memory_max_items=5, expected_items=9)
    assert type(small) is CacheDataset and isinstance(large, PersistentDataset)
    assert type(bare) is CacheDataset and bare.cache_num == 3, "no cache_dir: a bounded window"
    assert isinstance(later, PersistentDataset), "a pool filled later decides on its expected size"
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "pool pool: 6 volumes, mode memory (auto: at most 6 volumes): CacheDataset holding 6 in memory"
    assert lines[1].startswith("big pool: 6 volumes, mode disk (auto: more than 5 volumes): PersistentDataset in ")
    assert "mode window (auto: more than 5 volumes)" in lines[2]


def test_bad_settings_are_one_message(volumes):
    with pytest.raises(MedclInputError, match="pool_mode='ram' is not one of"):
        make_pool_dataset(volumes, _transform(), mode="ram")
    with pytest.raises(MedclInputError, match="needs a cache folder: pass --cache_dir"):
        make_pool_dataset(volumes, _transform(), mode="disk")


def test_cache_dir_not_writable_names_the_folder(volumes, tmp_path, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(MedclInputError, match=rf"{a_file}/pre: the pool cache folder is not writable.*--cache_dir"):
        make_pool_dataset(volumes, _transform(), mode="disk", cache_dir=a_file, name="pre")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(pools.tempfile, "mkstemp", denied)  # a read-only folder, also when the tests run as root
    with pytest.raises(MedclInputError, match=rf"{tmp_path}/ro: the pool cache folder is not writable \(Permission"):
        make_pool_dataset(volumes, _transform(), mode="disk", cache_dir=tmp_path, name="ro")


def test_disk_full_while_caching_names_the_folder(volumes, tmp_path, monkeypatch):
    ds = make_pool_dataset(volumes, _transform(), mode="disk", cache_dir=tmp_path, name="pre")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(MedclInputError, match=rf"{tmp_path}/pre: the disk is full while caching") as info:
        ds[0]
    assert "--pool_mode window" in str(info.value) and info.value.__cause__.errno == errno.ENOSPC
    assert not _pt_files(tmp_path / "pre")


def test_a_cached_item_of_another_preprocessing_names_the_folder(volumes, tmp_path):
    ds = make_pool_dataset(volumes, _transform(), mode="disk", cache_dir=tmp_path, name="pre")
    key = ds.hash_func(volumes[0]).decode() + ds.transform_hash
    torch.save({"img": torch.zeros(1, 8, 8, 6)}, tmp_path / "pre" / f"{key}.pt")  # written under other keys
    with pytest.raises(MedclInputError, match=rf"{tmp_path}/pre: a cached item lacks \['image'\].*Delete the folder"):
        ds[0]


def test_an_error_in_a_loader_worker_shows_its_own_message():
    wrapped = (
        "Caught MedclInputError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nmedcl.errors.MedclInputError: /c/pre: the disk is full while caching. Free it.'
    )
    assert worker_message(wrapped) == "/c/pre: the disk is full while caching. Free it."
    assert worker_message("plain: message") == "plain: message"


@pytest.mark.slow
def test_macl_pretraining_on_disk_and_a_bad_cache_dir(phantom_dir, tmp_path):
    tiny = ["--dataset_dir", str(phantom_dir), "--patch_size", "64", "--max_epochs", "1", "--epoch_length", "1"]
    tiny += ["--num_workers", "0", "--batch_size", "1", "--samples_per_volume", "2", "--pool_mode", "disk"]
    cache = tmp_path / "cache"
    configs = [BUNDLES / "macl" / "configs" / "pretrain.json"]
    proc = run_bundle(configs, "--bundle_root", str(tmp_path / "a"), "--cache_dir", str(cache), *tiny)
    assert proc.returncode == 0, proc.stdout[-3000:]
    line = rf"pretrain pool: \d+ volumes, mode disk: PersistentDataset in {cache}/pretrain \(0 already cached\)"
    assert re.search(line, proc.stdout), proc.stdout[-3000:]
    written = len(_pt_files(cache / "pretrain"))
    assert written >= 1 and (tmp_path / "a" / "models" / "pretrained.pt").is_file()

    blocked = tmp_path / "a_file"
    blocked.write_text("")
    proc = run_bundle(configs, "--bundle_root", str(tmp_path / "c"), "--cache_dir", str(blocked), *tiny)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout
    assert f"MedclInputError: {blocked}/pretrain: the pool cache folder is not writable" in proc.stdout
