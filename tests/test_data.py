"""Data module: dataset info, deterministic splits, input checks, patch sampling with positions."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medcl.data import (
    RandPatchWithPositiond,
    as_patch_size,
    check_datalist,
    dataset_num_classes,
    load_splits,
    num_labelled_cases,
    read_dataset_info,
    split_datalist,
    volume_pad_size,
)
from medcl.errors import MedclInputError


def _items(n):
    return [{"image": f"/d/img_{i:03d}.nii.gz", "label": f"/d/lab_{i:03d}.nii.gz"} for i in range(n)]


def test_split_is_deterministic_disjoint_and_complete():
    a = split_datalist(_items(50), val_fraction=0.2, label_fraction=0.1, seed=3)
    b = split_datalist(list(reversed(_items(50))), val_fraction=0.2, label_fraction=0.1, seed=3)
    assert a == b  # input order does not matter
    imgs = {k: {d["image"] for d in v} for k, v in a.items()}
    assert len(imgs["val"]) == 10 and len(imgs["labelled"]) == 4 and len(imgs["unlabelled"]) == 36
    assert not (imgs["val"] & imgs["labelled"]) and not (imgs["val"] & imgs["unlabelled"])
    assert not (imgs["labelled"] & imgs["unlabelled"])
    assert len(imgs["val"] | imgs["labelled"] | imgs["unlabelled"]) == 50
    assert all("label" not in d for d in a["unlabelled"])
    c = split_datalist(_items(50), val_fraction=0.2, label_fraction=0.1, seed=4)
    assert c["labelled"] != a["labelled"]


def test_split_val_fixed_and_labelled_nested_across_fractions():
    small = split_datalist(_items(40), label_fraction=0.1, seed=0)
    large = split_datalist(_items(40), label_fraction=0.5, seed=0)
    assert small["val"] == large["val"]
    assert all(d in large["labelled"] for d in small["labelled"])


@pytest.mark.parametrize(
    "fraction,num,expected",
    [(0.05, None, 2), (0.1, None, 3), (1.0, None, 32), (0.01, None, 1), (None, 2, 2), (0.5, 1, 1)],
)
def test_num_labelled_cases(fraction, num, expected):
    assert num_labelled_cases(32, fraction, num) == expected


@pytest.mark.parametrize("fraction,num", [(0.0, None), (1.5, None), (-0.1, None), (None, 0), (None, 33), (None, None)])
def test_num_labelled_cases_rejects_bad_values(fraction, num):
    with pytest.raises(MedclInputError, match="label_fraction|num_labelled"):
        num_labelled_cases(32, fraction, num)


def test_dataset_info_and_load_splits(phantom_dir):
    info = read_dataset_info(str(phantom_dir))
    assert info.num_classes == len(info.labels) and info.is_ct and info.label_names[0] == "background"
    splits = load_splits(str(phantom_dir), label_fraction=0.1, seed=0, check="full", include_test=True)
    assert len(splits["val"]) == 2 and len(splits["labelled"]) == 1 and len(splits["unlabelled"]) == 6  # 5 + 1 test


def test_missing_dataset_says_how_to_create_it(tmp_path):
    with pytest.raises(MedclInputError, match="medcl-phantom --out"):
        read_dataset_info(str(tmp_path / "nowhere"))


def test_dataset_num_classes_falls_back_only_without_dataset_json(phantom_dir, tmp_path):
    """dataset.json's count when there is one (whatever the default), the default without (no dataset, None)."""
    assert dataset_num_classes(str(phantom_dir), default=2) == read_dataset_info(str(phantom_dir)).num_classes == 5
    assert dataset_num_classes(str(tmp_path / "nowhere"), default=7) == 7
    assert dataset_num_classes(None, default=3) == 3
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(MedclInputError, match="not valid JSON"):  # a broken dataset.json is not silently ignored
        dataset_num_classes(str(tmp_path), default=5)


def _copy_dataset(src, dst):
    shutil.copytree(src, dst)
    return dst, json.loads((dst / "dataset.json").read_text())


def test_missing_image_file_is_named(phantom_dir, tmp_path):
    ds, meta = _copy_dataset(phantom_dir, tmp_path / "ds")
    victim = ds / meta["training"][3]["image"]
    victim.unlink()
    with pytest.raises(MedclInputError, match=f"{victim.name}: file not found"):
        load_splits(str(ds))


def test_corrupt_nifti_is_named(phantom_dir, tmp_path):
    ds, meta = _copy_dataset(phantom_dir, tmp_path / "ds")
    victim = ds / meta["training"][2]["image"]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated gzip: header readable, data not
    with pytest.raises(MedclInputError, match=f"{victim.name}: the NIfTI data is corrupt"):
        load_splits(str(ds), check="full")
    victim.write_bytes(b"not a nifti at all")
    with pytest.raises(MedclInputError, match=f"{victim.name}: not a readable NIfTI"):
        load_splits(str(ds), check="header")


def test_shape_mismatch_is_named(phantom_dir, tmp_path):
    ds, meta = _copy_dataset(phantom_dir, tmp_path / "ds")
    label = ds / meta["training"][1]["label"]
    img = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), str(label))
    with pytest.raises(MedclInputError, match=f"{label.name}: label shape .* does not match image"):
        load_splits(str(ds))


def test_label_values_outside_dataset_labels(phantom_dir, tmp_path):
    ds, meta = _copy_dataset(phantom_dir, tmp_path / "ds")
    label = ds / meta["training"][0]["label"]
    img = nib.load(str(label))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 17
    nib.save(nib.Nifti1Image(data, img.affine), str(label))
    with pytest.raises(MedclInputError, match=r"label values \[17\]"):
        load_splits(str(ds), check="full")


def test_empty_datalist(phantom_dir, tmp_path):
    ds, meta = _copy_dataset(phantom_dir, tmp_path / "ds")
    meta["training"] = []
    (ds / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(MedclInputError, match="'training' list .* is empty"):
        load_splits(str(ds))
    with pytest.raises(MedclInputError, match="empty"):
        check_datalist([], level="off")


def test_patch_size_helpers():
    assert as_patch_size(32, 3) == (32, 32, 32)
    assert as_patch_size([64, 48, 32], 2) == (64, 48)
    assert volume_pad_size([64, 48, 32], 2, slice_axis=2) == [64, 48, -1]
    with pytest.raises(MedclInputError):
        as_patch_size([64], 3)
    with pytest.raises(MedclInputError):
        as_patch_size(32, 4)


def _volume(shape=(20, 18, 10)):
    label = torch.zeros((1, *shape), dtype=torch.uint8)
    label[0, 8:12, 6:10, 7] = 1  # foreground only in slice 7
    image = torch.rand((1, *shape))
    return {"image": image, "label": label}


def test_slice_sampling_keeps_normalised_slice_position():
    t = RandPatchWithPositiond(["image", "label"], patch_size=(8, 8), spatial_dims=2, num_samples=6, pos=1, neg=0)
    t.set_random_state(0)
    samples = t(_volume())
    assert len(samples) == 6
    for s in samples:
        assert s["image"].shape == (1, 8, 8) and s["label"].shape == (1, 8, 8)
        assert s["label"].sum() > 0  # all foreground-centred: the only foreground slice
        assert float(s["position"]) == pytest.approx((7 + 1) / 10)


def test_slice_position_matches_slice_content():
    vol = _volume()
    vol["image"] = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 10).expand(1, 20, 18, 10).clone()
    t = RandPatchWithPositiond(["image"], patch_size=8, spatial_dims=2, num_samples=20, label_key=None)
    t.set_random_state(1)
    for s in t(vol):
        idx = int(s["image"][0, 0, 0])  # the image value is the slice index
        assert float(s["position"]) == pytest.approx((idx + 1) / 10)


def test_3d_patch_position_is_centre_position():
    t = RandPatchWithPositiond(["image", "label"], patch_size=(8, 8, 4), spatial_dims=3, num_samples=4)
    t.set_random_state(0)
    for s in t(_volume()):
        assert s["image"].shape == (1, 8, 8, 4)
        assert 0 < float(s["position"]) <= 1


def test_volume_smaller_than_patch_is_a_clear_error():
    t = RandPatchWithPositiond(["image", "label"], patch_size=32, spatial_dims=3)
    with pytest.raises(MedclInputError, match="smaller than the patch"):
        t(_volume())


def test_intensity_follows_modality():
    from medcl.data import ScaleIntensityByModalityd

    hu = torch.tensor([[-1000.0, -175.0, 37.5, 250.0, 900.0]])
    ct = ScaleIntensityByModalityd("image", modality="CT", ct_window=(-175, 250))({"image": hu})["image"]
    assert torch.allclose(ct, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))
    mr_in = torch.linspace(0, 1000, 1001).view(1, -1)
    mr = ScaleIntensityByModalityd("image", modality="MRI")({"image": mr_in})["image"]
    assert float(mr.min()) == 0.0 and float(mr.max()) == 1.0
    assert float(mr[0, 500]) == pytest.approx(0.5, abs=1e-3)  # percentile scaling, not a HU window


def test_bundle_follows_dataset_json_classes_and_modality(phantom_dir, tmp_path):
    """A 2-class MR dataset needs no other change: out_channels and intensity scaling follow dataset.json."""
    from conftest import BUNDLES
    from monai.bundle import ConfigParser

    ds, meta = _copy_dataset(phantom_dir, tmp_path / "ds")
    meta["labels"] = {"0": "background", "1": "organ"}
    meta["modality"] = {"0": "MRI"}
    (ds / "dataset.json").write_text(json.dumps(meta))
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "scratch_baseline" / "configs" / "train.json"))
    parser.update({"dataset_dir": str(ds), "bundle_root": str(tmp_path)})
    net = parser.get_parsed_content("network_def")
    assert parser.get_parsed_content("num_classes") == 2
    from medcl.data import ScaleIntensityByModalityd

    transforms = parser.get_parsed_content("preprocessing_transforms")
    scaler = next(t for t in transforms if isinstance(t, ScaleIntensityByModalityd))
    ramp = torch.arange(1001, dtype=torch.float32).reshape(1, 1001)
    scaled = scaler({"image": ramp})["image"]
    assert abs(float(scaled[0, 500]) - 0.5) < 0.01  # percentile scaling (a CT window would clip 500 HU to 1)
    out = net(torch.zeros(1, 1, 64, 64))
    assert out.shape[1] == 2
