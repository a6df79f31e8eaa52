"""Pseudo-labelling for self-training: confidence filter, CRF refinement, PseudoLabeler (grid, resume), Dice report."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import load_decathlon_datalist
from monai.inferers import SlidingWindowInferer
from monai.metrics import compute_dice
from monai.networks.nets import UNet
from monai.transforms import Compose, CropForegroundd, EnsureTyped, LoadImaged, Orientationd, Spacingd

from medcl.data import ScaleIntensityByModalityd
from medcl.errors import MedclInputError
from medcl.inferers import HAS_MONAI_CPP, PseudoLabeler, confidence_filter, crf_refine
from medcl.metrics import pseudo_label_dice

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

NUM_CLASSES = 5


def _preprocessing(mode: str = "bilinear", scale: bool = True) -> Compose:
    """The bundles' inference preprocessing (RAS, resampling, intensity scaling, foreground crop)."""
    transforms = [
        LoadImaged("image", ensure_channel_first=True, image_only=True),
        EnsureTyped("image", dtype=torch.float32),
        Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=(1.5, 1.5, 2.0), mode=mode),
    ]
    if scale:
        transforms.append(ScaleIntensityByModalityd("image", modality="CT", ct_window=(-175, 250)))
    transforms.append(CropForegroundd("image", source_key="image", margin=2, allow_smaller=True))
    return Compose(transforms)


def _training(phantom_dir) -> list[dict]:
    return load_decathlon_datalist(str(phantom_dir / "dataset.json"), True, "training")


def _tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, channels=(4, 8), strides=(2,))


# ------------------------------------------------------------------------------------------------
# confidence_filter
# ------------------------------------------------------------------------------------------------


def test_confidence_filter_values():
    prob = torch.tensor([[[0.95, 0.5], [0.1, 0.2]], [[0.05, 0.3], [0.85, 0.2]], [[0.0, 0.2], [0.05, 0.6]]])
    out = confidence_filter(prob, threshold=0.8)
    assert out.dtype == torch.uint8 and out.shape == (1, 2, 2)
    assert out[0].tolist() == [[0, 255], [1, 255]]
    # threshold exactly reached is kept; custom ignore label; no channel dim
    out = confidence_filter(prob, threshold=0.6, ignore_index=7, keepdim=False)
    assert out.shape == (2, 2) and out.tolist() == [[0, 7], [1, 2]]
    # off: plain argmax
    assert confidence_filter(prob, threshold=None)[0].tolist() == [[0, 0], [1, 2]]
    # numpy in, numpy out
    out_np = confidence_filter(prob.numpy(), threshold=0.8)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.uint8
    np.testing.assert_array_equal(out_np, [[[0, 255], [1, 255]]])


@pytest.mark.parametrize("kwargs", [{"ignore_index": 2}, {"ignore_index": 256}, {"threshold": 1.5}])
def test_confidence_filter_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        confidence_filter(torch.full((3, 2, 2), 1 / 3), **kwargs)


# ------------------------------------------------------------------------------------------------
# crf_refine
# ------------------------------------------------------------------------------------------------


def _two_regions(n: int = 10):
    """Image 0 | 1 along the first axis, logits agreeing with it, one wrong voxel inside region 0."""
    image = torch.zeros(1, 1, n, n, n)
    image[:, :, n // 2 :] = 1.0
    logits = torch.zeros(1, 2, n, n, n)
    logits[:, 0] = torch.where(image[0, 0] < 0.5, 1.0, -1.0)
    logits[:, 1] = -logits[:, 0]
    wrong = (n // 4, n // 2, n // 2)
    logits[(0, slice(None), *wrong)] = torch.tensor([-1.0, 1.0])
    return logits, image, wrong


def test_crf_refine_smooths_isolated_voxel(one_thread):
    logits, image, wrong = _two_regions()
    assert logits.argmax(1)[(0, *wrong)] == 1
    out = crf_refine(logits, image, iterations=5, backend="torch")
    assert out.shape == logits.shape and out.dtype == torch.float32
    assert torch.all(out >= 0)
    torch.testing.assert_close(out.sum(1), torch.ones(out.shape[0], *out.shape[2:]))
    labels = out.argmax(1)[0]
    assert labels[wrong] == 0  # the isolated wrong voxel follows its region
    expected = (image[0, 0] >= 0.5).long()
    assert torch.equal(labels, expected)  # and the region border is kept (bilateral term)


def test_crf_refine_2d_and_arguments(one_thread):
    logits, image, wrong = _two_regions()
    out = crf_refine(logits[..., 0], image[..., 0], iterations=2, backend="torch")  # 2D
    assert out.shape == logits[..., 0].shape
    torch.testing.assert_close(out.sum(1), torch.ones(1, *out.shape[2:]))
    with pytest.raises(ValueError, match="does not match"):
        crf_refine(logits, image[..., :-1])
    with pytest.raises(ValueError, match="backend"):
        crf_refine(logits, image, backend="dense")
    with pytest.raises(ValueError, match="compatibility_matrix"):
        crf_refine(logits, image, compatibility_matrix=torch.eye(3))
    with pytest.raises(ValueError, match="single-channel"):
        crf_refine(logits, image.repeat(1, 2, 1, 1, 1), backend="torch")


def test_crf_refine_monai_backend(one_thread):
    logits, image, wrong = _two_regions(8)
    if not HAS_MONAI_CPP:
        with pytest.raises(RuntimeError, match="C\\+\\+ extension"):
            crf_refine(logits, image, backend="monai")
        pytest.skip("MONAI is installed without its C++ extension (monai._C): backend='monai' unavailable.")
    out = crf_refine(logits, image, backend="monai")
    ref = crf_refine(logits, image, backend="torch")
    assert out.shape == logits.shape
    assert torch.equal(out.argmax(1), ref.argmax(1))


# ------------------------------------------------------------------------------------------------
# PseudoLabeler
# ------------------------------------------------------------------------------------------------


def _labeler(out_dir, network=None, **kwargs) -> PseudoLabeler:
    network = _tiny_unet() if network is None else network
    inferer = SlidingWindowInferer(roi_size=16, sw_batch_size=4, overlap=0.25, progress=False)
    return PseudoLabeler(network, inferer, _preprocessing(), out_dir, device="cpu", **kwargs)


def test_pseudo_labeler_grid_manifest_and_resume(phantom_dir, tmp_path, one_thread):
    test_images = load_decathlon_datalist(str(phantom_dir / "dataset.json"), False, "test")
    items = [{"image": _training(phantom_dir)[0]["image"]}, {"image": test_images[0]["image"]}]
    network = _tiny_unet()
    ckpt = tmp_path / "model.pt"
    torch.save({"model": network.state_dict()}, ckpt)
    out_dir = tmp_path / "pseudo"
    labeler = _labeler(out_dir, network)
    network.train()

    result = labeler.run(items, tag="round1", checkpoint_path=str(ckpt))
    assert network.training  # mode restored
    assert [r["image"] for r in result] == [it["image"] for it in items]
    for r in result:
        assert r["label"] == str(out_dir / os.path.basename(r["image"]).replace(".nii.gz", "_pseudo.nii.gz"))
        pseudo, image = nib.load(r["label"]), nib.load(r["image"])
        assert pseudo.shape == image.shape
        assert np.allclose(pseudo.affine, image.affine)
        assert pseudo.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(pseudo.dataobj)).tolist()) <= set(range(NUM_CLASSES))

    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["tag"] == "round1"
    assert manifest["checkpoint"] == os.path.abspath(ckpt)
    assert manifest["checkpoint_size"] == os.path.getsize(ckpt) and len(manifest["checkpoint_sha256"]) == 64
    assert manifest["items"] == [{"image": r["image"], "label": r["label"]} for r in result]
    assert not [f for f in os.listdir(out_dir) if ".tmp" in f]

    # same tag and checkpoint: nothing rewritten
    old = 1_000_000_000
    for r in result:
        os.utime(r["label"], (old, old))
    again = _labeler(out_dir, network).run(items, tag="round1", checkpoint_path=str(ckpt))
    assert again == result
    assert all(os.stat(r["label"]).st_mtime == old for r in result)

    # another tag: a fresh round, every file rewritten
    _labeler(out_dir, network).run(items, tag="round2", checkpoint_path=str(ckpt))
    assert all(os.stat(r["label"]).st_mtime != old for r in result)
    assert json.loads((out_dir / "manifest.json").read_text())["tag"] == "round2"

    # another checkpoint (different content) under the same tag: rewritten too
    for r in result:
        os.utime(r["label"], (old, old))
    ckpt2 = tmp_path / "model2.pt"
    torch.save({"model": _tiny_unet().state_dict(), "epoch": 2}, ckpt2)
    _labeler(out_dir, network).run(items, tag="round2", checkpoint_path=str(ckpt2))
    assert all(os.stat(r["label"]).st_mtime != old for r in result)


def test_pseudo_labeler_missing_or_corrupt_image_and_resume(phantom_dir, tmp_path, one_thread):
    train = _training(phantom_dir)
    out_dir = tmp_path / "pseudo"
    missing = str(tmp_path / "nowhere" / "case_999.nii.gz")
    with pytest.raises(MedclInputError, match="case_999.nii.gz"):
        _labeler(out_dir).run([{"image": train[1]["image"]}, {"image": missing}], tag="r")
    # the first volume was written and recorded before the failure
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert [it["image"] for it in manifest["items"]] == [train[1]["image"]]
    first = manifest["items"][0]["label"]
    os.utime(first, (1_000_000_000, 1_000_000_000))

    corrupt = tmp_path / "corrupt_001.nii.gz"
    corrupt.write_bytes(b"not a nifti file")
    with pytest.raises(MedclInputError, match="corrupt_001.nii.gz"):
        _labeler(out_dir).run([{"image": train[1]["image"]}, {"image": str(corrupt)}], tag="r")

    # resume: the recorded volume is skipped, the new one written
    result = _labeler(out_dir).run([{"image": train[1]["image"]}, {"image": train[2]["image"]}], tag="r")
    assert os.stat(first).st_mtime == 1_000_000_000
    assert os.path.isfile(result[1]["label"])
    items = json.loads((out_dir / "manifest.json").read_text())["items"]
    assert [it["image"] for it in items] == [train[1]["image"], train[2]["image"]]


def test_pseudo_labeler_rejects_colliding_names(tmp_path, phantom_dir):
    image = _training(phantom_dir)[0]["image"]
    other = tmp_path / "copy" / os.path.basename(image)
    other.parent.mkdir()
    other.write_bytes(open(image, "rb").read())
    with pytest.raises(MedclInputError, match="unique"):
        _labeler(tmp_path / "pseudo").run([image, str(other)], tag="r")


def test_pseudo_labeler_inverts_to_the_input_grid(phantom_dir, tmp_path, one_thread):
    """Oracle: 'segment' the label files themselves; the inverse preprocessing must give back the labels."""
    train = _training(phantom_dir)[:3]

    def oracle(x, network):
        return torch.nn.functional.one_hot(x[:, 0].round().long(), NUM_CLASSES).permute(0, 4, 1, 2, 3).float() * 10

    labeler = PseudoLabeler(torch.nn.Identity(), oracle, _preprocessing("nearest", scale=False), tmp_path / "o")
    pseudo = labeler.run([{"image": it["label"]} for it in train], tag="oracle")
    truth = [{"image": it["label"], "label": it["label"]} for it in train]
    report = pseudo_label_dice(pseudo, truth, NUM_CLASSES)
    assert report["mean"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# pseudo_label_dice
# ------------------------------------------------------------------------------------------------


def test_pseudo_label_dice_of_true_labels_is_one(phantom_dir):
    train = _training(phantom_dir)[:3]
    report = pseudo_label_dice(train, train, NUM_CLASSES)
    assert report["num_cases"] == 3 and report["ignored_fraction"] == 0.0
    present = set()
    for it in train:
        present |= set(np.unique(np.asarray(nib.load(it["label"]).dataobj)).tolist())
    for c, v in report["per_class"].items():
        if c in present:
            assert v == pytest.approx(1.0)
        else:
            assert np.isnan(v)
    assert report["mean"] == pytest.approx(1.0)
    assert set(report["per_class"]) == set(range(1, NUM_CLASSES))
    assert 0 in pseudo_label_dice(train, train, NUM_CLASSES, include_background=True)["per_class"]


def _save(path, arr):
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.eye(4)), str(path))
    return str(path)


def test_pseudo_label_dice_matches_monai_and_ignores_filtered(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=(6, 6, 4))
    pseudo = truth.copy()
    pseudo[rng.random(truth.shape) < 0.3] = 1
    items_p = [{"image": "a.nii.gz", "label": _save(tmp_path / "p.nii.gz", pseudo)}]
    items_t = [{"image": "a.nii.gz", "label": _save(tmp_path / "t.nii.gz", truth)}]
    report = pseudo_label_dice(items_p, items_t, 3)

    def onehot(a):
        return torch.nn.functional.one_hot(torch.as_tensor(a).long(), 3).permute(3, 0, 1, 2)[None]

    expected = compute_dice(onehot(pseudo), onehot(truth), include_background=False, ignore_empty=False)[0]
    assert [report["per_class"][c] for c in (1, 2)] == pytest.approx(expected.tolist())

    # voxels with ignore_index in the pseudo-label are excluded from the comparison
    filtered = pseudo.copy()
    wrong = pseudo != truth
    filtered[wrong] = 255
    _save(tmp_path / "p.nii.gz", filtered)
    report = pseudo_label_dice(items_p, items_t, 3)
    assert report["mean"] == pytest.approx(1.0)
    assert report["ignored_fraction"] == pytest.approx(wrong.mean())

    with pytest.raises(MedclInputError, match="no true label"):
        pseudo_label_dice([{"image": "b.nii.gz", "label": items_p[0]["label"]}], items_t, 3)
