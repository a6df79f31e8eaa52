"""Pooled pre-training data: the pooled datalist, same-dataset partners, per-item modality and single-dict crops."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
from monai.transforms import RandGaussianNoised

from medcl.data import (
    PartnerDataset,
    RandPatchWithPositiond,
    ScaleIntensityByModalityd,
    load_splits,
    pooled_datalist,
    pooled_label_maps,
)
from medcl.data.phantom import generate_dataset
from medcl.errors import MedclInputError

SETS = (("abdomen", 5), ("pelvis", 3), ("thorax", 3))


@pytest.fixture(scope="module")
def pooled_dirs(tmp_path_factory) -> list[str]:
    dirs = []
    for organ_set, n in SETS:
        out = tmp_path_factory.mktemp(f"pooled_{organ_set}")
        generate_dataset(str(out), n=n, n_test=0, seed=0, shape=(16, 16, 16), organ_set=organ_set)
        dirs.append(str(out))
    return dirs


def _real(path: str) -> str:
    return os.path.realpath(path)


# ----------------------------------------------------------------------------------------------------------------------
# pooled_datalist / pooled_label_maps
# ----------------------------------------------------------------------------------------------------------------------
def test_pooled_datalist_ids_and_keys(pooled_dirs):
    items = pooled_datalist(pooled_dirs)
    assert len(items) == 5 + 3 + 3
    assert Counter(d["dataset_id"] for d in items) == {0: 5, 1: 3, 2: 3}
    for d in items:
        assert {"image", "label", "dataset_id", "modality"} <= set(d)
        assert d["modality"] == "CT"
        assert os.path.isfile(d["image"]) and os.path.isfile(d["label"])
        # each item carries the id of the dataset whose folder it comes from
        assert _real(d["image"]).startswith(_real(pooled_dirs[d["dataset_id"]]) + os.sep)
        assert _real(d["label"]).startswith(_real(pooled_dirs[d["dataset_id"]]) + os.sep)
    # the ids follow the order of the list
    reordered = pooled_datalist([pooled_dirs[2], pooled_dirs[0]])
    assert Counter(d["dataset_id"] for d in reordered) == {0: 3, 1: 5}


def test_pooled_datalist_holds_out_finetuning_validation(pooled_dirs):
    abdomen = pooled_dirs[0]
    val = {_real(d["image"]) for d in load_splits(abdomen, val_fraction=0.2, seed=0)["val"]}
    assert len(val) == 1
    items = pooled_datalist(pooled_dirs, holdout_dir=abdomen)
    images = {_real(d["image"]) for d in items}
    assert not (val & images)
    assert sum(d["dataset_id"] == 0 for d in items) == 4
    everything = {_real(d["image"]) for d in pooled_datalist(pooled_dirs)}
    assert images == everything - val  # only the held-out validation cases go
    for i in (1, 2):  # every pelvis and thorax case stays
        assert sum(d["dataset_id"] == i for d in items) == 3
    # a holdout folder that is not pooled changes nothing
    assert {_real(d["image"]) for d in pooled_datalist(pooled_dirs[1:], holdout_dir=abdomen)} == {
        _real(d["image"]) for d in pooled_datalist(pooled_dirs[1:])
    }


def test_pooled_datalist_rejects_duplicates_and_empty(pooled_dirs):
    with pytest.raises(MedclInputError, match="twice"):
        pooled_datalist([pooled_dirs[0], pooled_dirs[1], pooled_dirs[0]])
    with pytest.raises(MedclInputError):  # the same folder spelled differently
        pooled_datalist([pooled_dirs[0], pooled_dirs[0] + os.sep + "."])
    with pytest.raises(MedclInputError, match="empty"):
        pooled_datalist([])
    with pytest.raises(MedclInputError):
        pooled_label_maps([])


def test_pooled_label_maps_differ(pooled_dirs):
    maps = pooled_label_maps(pooled_dirs)
    assert len(maps) == 3
    assert all(m[0] == "background" for m in maps)
    assert maps[0] != maps[1] and maps[1] != maps[2] and maps[0] != maps[2]
    assert "liver" in maps[0].values() and "bladder" in maps[1].values() and "heart" in maps[2].values()


# ----------------------------------------------------------------------------------------------------------------------
# PartnerDataset
# ----------------------------------------------------------------------------------------------------------------------
GROUPS = [0, 0, 0, 1, 1, 2, 0, 1]  # group 2 has a single item


def _data() -> list[dict]:
    return [{"image": i, "label": i, "dataset_id": g} for i, g in enumerate(GROUPS)]


def test_partner_from_same_group():
    ds = PartnerDataset(_data()).set_random_state(0)
    assert len(ds) == len(GROUPS)
    for _ in range(20):
        for i in range(len(ds)):
            item = ds[i]
            assert item["image"] == i and item["label"] == i and item["dataset_id"] == GROUPS[i]
            assert GROUPS[item["image_2"]] == GROUPS[i]
            assert item["label_2"] == item["image_2"]  # image and label come from the same partner


def test_partner_same_item_probability_extremes():
    always = PartnerDataset(_data(), same_item_prob=1.0).set_random_state(0)
    never = PartnerDataset(_data(), same_item_prob=0.0).set_random_state(0)
    seen_others = Counter()
    for _ in range(30):
        for i in range(len(GROUPS)):
            assert always[i]["image_2"] == i
            partner = never[i]["image_2"]
            if GROUPS.count(GROUPS[i]) == 1:
                assert partner == i  # alone in its group: itself
            else:
                assert partner != i and GROUPS[partner] == GROUPS[i]
                seen_others[(i, partner)] += 1
    # every other member of the group is drawn
    assert {p for (i, p) in seen_others if i == 0} == {1, 2, 6}


def test_partner_single_item_group_is_itself():
    ds = PartnerDataset(
        [{"image": "a", "label": "la", "dataset_id": 0}, {"image": "b", "label": "lb", "dataset_id": 1}],
        same_item_prob=0.0,
    ).set_random_state(0)
    for _ in range(10):
        assert ds[0]["image_2"] == "a" and ds[0]["label_2"] == "la"
        assert ds[1]["image_2"] == "b"


def test_partner_half_probability_rate():
    ds = PartnerDataset(_data(), same_item_prob=0.5)
    ds.set_random_state(0)
    draws = 2000
    selves = sum(ds[0]["image_2"] == 0 for _ in range(draws))
    assert 0.45 <= selves / draws <= 0.55


def test_partner_draws_reproducible():
    def draws(seed):
        ds = PartnerDataset(_data()).set_random_state(seed)
        return [ds[i % len(GROUPS)]["image_2"] for i in range(100)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


def test_partner_rejects_items_without_group():
    data = _data()
    del data[3]["dataset_id"]
    with pytest.raises(MedclInputError, match="dataset_id"):
        PartnerDataset(data)
    with pytest.raises(MedclInputError):
        PartnerDataset(_data(), group_key="site")
    with pytest.raises(MedclInputError):
        PartnerDataset([])
    with pytest.raises(MedclInputError):
        PartnerDataset(_data(), same_item_prob=1.5)


def test_partner_transform_applied_and_custom_keys():
    ds = PartnerDataset(
        _data(),
        partner_keys=["image"],
        suffix="_p",
        same_item_prob=1.0,
        transform=lambda d: {**d, "sum": d["image"] + d["image_p"]},
    )
    item = ds[4]
    assert item["image_p"] == 4 and item["sum"] == 8 and "label_p" not in item


def test_partner_seeds_randomizable_transform():
    data = [{"image": torch.zeros(1, 4, 4, 4), "label": torch.zeros(1, 4, 4, 4), "dataset_id": 0} for _ in range(3)]

    def make(seed):
        noise = RandGaussianNoised(keys="image", prob=1.0, std=1.0)
        return PartnerDataset(data, transform=noise).set_random_state(seed)

    a, b, c = make(5), make(5), make(6)
    out_a, out_b, out_c = a[0]["image"], b[0]["image"], c[0]["image"]
    assert float(torch.as_tensor(out_a).abs().sum()) > 0  # the transform ran
    torch.testing.assert_close(torch.as_tensor(out_a), torch.as_tensor(out_b))
    assert not torch.allclose(torch.as_tensor(out_a), torch.as_tensor(out_c))
    # the next draws stay in step too
    torch.testing.assert_close(torch.as_tensor(a[1]["image"]), torch.as_tensor(b[1]["image"]))


# ----------------------------------------------------------------------------------------------------------------------
# ScaleIntensityByModalityd with a per-item modality
# ----------------------------------------------------------------------------------------------------------------------
def _volume() -> torch.Tensor:
    return torch.linspace(-1000.0, 1000.0, 1000).reshape(1, 10, 10, 10)


def _ct_expected(x: torch.Tensor) -> torch.Tensor:
    return ((x + 175.0) / 425.0).clamp(0.0, 1.0)


def _mr_expected(x: torch.Tensor) -> torch.Tensor:
    lo, hi = np.percentile(x.numpy(), [1.0, 99.0])
    return ((x - float(lo)) / float(hi - lo)).clamp(0.0, 1.0)


def test_scale_intensity_uses_item_modality():
    t = ScaleIntensityByModalityd(keys="image", modality="CT", modality_key="modality")
    x = _volume()
    ct = torch.as_tensor(t({"image": x.clone(), "modality": "CT"})["image"])
    mr = torch.as_tensor(t({"image": x.clone(), "modality": "MRI"})["image"])
    torch.testing.assert_close(ct.float(), _ct_expected(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mr.float(), _mr_expected(x), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ct.float(), mr.float())
    lower = torch.as_tensor(t({"image": x.clone(), "modality": "ct"})["image"])  # case-insensitive
    torch.testing.assert_close(lower.float(), _ct_expected(x), atol=1e-5, rtol=1e-5)


def test_scale_intensity_falls_back_to_dataset_modality():
    x = _volume()
    ct = ScaleIntensityByModalityd(keys="image", modality="CT", modality_key="modality")
    torch.testing.assert_close(
        torch.as_tensor(ct({"image": x.clone()})["image"]).float(), _ct_expected(x), atol=1e-5, rtol=1e-5
    )
    mr = ScaleIntensityByModalityd(keys="image", modality="MRI", modality_key="modality")
    torch.testing.assert_close(
        torch.as_tensor(mr({"image": x.clone()})["image"]).float(), _mr_expected(x), atol=1e-4, rtol=1e-4
    )
    # without modality_key the item's modality is ignored
    plain = ScaleIntensityByModalityd(keys="image", modality="CT")
    torch.testing.assert_close(
        torch.as_tensor(plain({"image": x.clone(), "modality": "MRI"})["image"]).float(),
        _ct_expected(x),
        atol=1e-5,
        rtol=1e-5,
    )


# ----------------------------------------------------------------------------------------------------------------------
# RandPatchWithPositiond(as_list=...)
# ----------------------------------------------------------------------------------------------------------------------
def _patch_item() -> dict:
    label = torch.zeros(1, 12, 12, 12)
    label[:, 3:8, 3:8, 3:8] = 1
    return {"image": torch.rand(1, 12, 12, 12), "label": label, "dataset_id": 2}


def test_rand_patch_single_dict_when_not_as_list():
    crop = RandPatchWithPositiond(keys=["image", "label"], patch_size=8, num_samples=1, as_list=False)
    crop.set_random_state(0)
    out = crop(_patch_item())
    assert isinstance(out, dict)
    assert out["image"].shape == (1, 8, 8, 8) and out["label"].shape == (1, 8, 8, 8)
    assert out["dataset_id"] == 2 and 0 < float(out["position"]) <= 1


def test_rand_patch_lists_otherwise():
    two = RandPatchWithPositiond(keys=["image", "label"], patch_size=8, num_samples=2, as_list=False)
    out = two.set_random_state(0)(_patch_item())
    assert isinstance(out, list) and len(out) == 2 and all(o["image"].shape == (1, 8, 8, 8) for o in out)
    default = RandPatchWithPositiond(keys=["image", "label"], patch_size=8)
    out = default.set_random_state(0)(_patch_item())
    assert isinstance(out, list) and len(out) == 1 and out[0]["image"].shape == (1, 8, 8, 8)


def test_rand_patch_single_dict_matches_list_element():
    item = _patch_item()
    single = RandPatchWithPositiond(keys=["image", "label"], patch_size=8, as_list=False).set_random_state(1)(item)
    listed = RandPatchWithPositiond(keys=["image", "label"], patch_size=8).set_random_state(1)(item)[0]
    assert torch.equal(torch.as_tensor(single["image"]), torch.as_tensor(listed["image"]))
    assert float(single["position"]) == float(listed["position"])
