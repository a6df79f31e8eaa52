"""medcl.weights: the manifest beside every weights file, input-channel / class-count adaptation when loading
pre-trained weights, ``python -m medcl.weights inspect``, and the 1-channel MACL pre-training fine-tuned on a
2-channel dataset through ``--pretrained_ckpt``."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES, REPO, run_bundle
from monai.networks.nets import BasicUNet
from test_bundle_macl import TINY  # the MACL bundle tests' tiny run
from torch import nn

from medcl.data import check_datalist
from medcl.errors import MedclInputError
from medcl.handlers import SafeCheckpointLoader
from medcl.networks import load_pretrained
from medcl.weights import adapt_in_channels, manifest_path, network_spec, read_manifest, write_manifest
from medcl.weights.__main__ import main as inspect_main

CONFIGS = BUNDLES / "macl" / "configs"
FEATURES = (8, 8, 16, 16, 32, 8)


def _reference(weight: torch.Tensor, c_new: int, mode: str) -> torch.Tensor:
    """The rule of medcl.weights.adapt, element by element: W'[:, j] = (mean_i W[:, i] | W[:, j mod C]) * C / C'."""
    out_ch, c = weight.shape[:2]
    out = torch.empty(out_ch, c_new, *weight.shape[2:], dtype=weight.dtype)
    for o in range(out_ch):
        for j in range(c_new):
            if mode == "average":
                total = torch.zeros(weight.shape[2:], dtype=weight.dtype)
                for i in range(c):
                    total = total + weight[o, i]
                source = total / c
            else:
                source = weight[o, j % c]
            out[o, j] = source * (c / c_new)
    return out


def _unet(spatial_dims=2, in_channels=1, out_channels=5, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return BasicUNet(spatial_dims, in_channels, out_channels, features=FEATURES, norm="batch")


def _save_with_manifest(net: nn.Module, path: Path) -> None:
    torch.save(net.state_dict(), path)
    write_manifest(path, net.state_dict(), {"role": "pretrained", "network": network_spec(net, None)})


@pytest.mark.parametrize("mode", ["average", "repeat"])
@pytest.mark.parametrize(("c_old", "c_new"), [(1, 2), (1, 3), (2, 3), (3, 2)])
def test_channel_adaptation_follows_the_rule(mode, c_old, c_new):
    torch.manual_seed(c_old * 10 + c_new)
    weight = torch.randn(4, c_old, 3, 3, 3)
    got = adapt_in_channels(weight, c_new, mode)
    assert got.shape == (4, c_new, 3, 3, 3)
    torch.testing.assert_close(got, _reference(weight, c_new, mode))
    # the activation scale stays (average: always; repeat: when C' is a multiple of C): an input with the same image
    # in every channel gives the pre-trained response
    x = torch.randn(1, 1, 5, 5, 5)
    before = nn.functional.conv3d(x.expand(1, c_old, -1, -1, -1), weight)
    after = nn.functional.conv3d(x.expand(1, c_new, -1, -1, -1), got)
    if mode == "average" or c_new % c_old == 0:
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    with pytest.raises(MedclInputError, match="pretrained channel mode 'mean' is not one of"):
        adapt_in_channels(weight, c_new, "mean")


@pytest.mark.parametrize("mode", ["average", "repeat"])
def test_load_pretrained_adapts_input_channels_and_gives_a_fresh_head(tmp_path, caplog, mode):
    pre = _unet(in_channels=1, out_channels=5, seed=0)
    path = tmp_path / "pretrained.pt"
    _save_with_manifest(pre, path)
    net = _unet(in_channels=2, out_channels=3, seed=1)
    head_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("final_conv.")}
    with caplog.at_level(logging.INFO, logger="medcl.networks.pretrained"):
        report = load_pretrained(net, path, channel_mode=mode)  # all keys, strict
    first = "conv_0.conv_0.conv.weight"
    assert report["adapted"] == {first: f"1 -> 2 input channels ({mode})"}
    assert set(report["fresh"]) == {"final_conv.weight", "final_conv.bias"}
    assert not report["mismatched"] and not report["missing"]
    sd, ref = net.state_dict(), pre.state_dict()
    torch.testing.assert_close(sd[first], _reference(ref[first], 2, mode))
    for k in ref:
        if k != first and not k.startswith("final_conv."):
            assert torch.equal(sd[k], ref[k]), k
    for k, v in head_before.items():  # the new 3-class head keeps its own initialisation
        assert torch.equal(sd[k], v), k
    table = [r.getMessage() for r in caplog.records if "tensors into BasicUNet" in r.getMessage()]
    assert len(table) == 1
    lines = table[0].splitlines()
    assert lines[1].split() == ["module", "loaded", "adapted", "skipped", "missing"]
    assert next(line for line in lines if line.split()[0] == "conv_0").split()[2] == "1"
    assert next(line for line in lines if line.split()[0] == "final_conv").split()[1:] == ["0", "0", "2", "0"]
    assert f"adapted: {first}: 1 -> 2 input channels ({mode})" in table[0]
    assert "skipped: final_conv.weight: 5 -> 3 outputs (fresh head)" in table[0]


def test_unetr_adapts_every_kernel_that_reads_the_input(tmp_path):
    """MixCL's UNETR: the ViT patch embedding and encoder1's two convolutions (and its residual path) read the image."""
    from monai.networks.nets import UNETR

    kw = dict(img_size=(16, 16, 16), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4, res_block=True)
    torch.manual_seed(0)
    pre = UNETR(in_channels=1, out_channels=1, **kw)
    torch.save(pre.state_dict(), tmp_path / "pretrained.pt")
    net = UNETR(in_channels=2, out_channels=3, **kw)
    report = load_pretrained(net, tmp_path / "pretrained.pt", channel_mode="repeat")
    assert set(report["adapted"]) == {
        "vit.patch_embedding.patch_embeddings.weight",
        "encoder1.layer.conv1.conv.weight",
        "encoder1.layer.conv3.conv.weight",
    }
    assert set(report["fresh"]) == {"out.conv.conv.weight", "out.conv.conv.bias"} and not report["mismatched"]
    for key in report["adapted"]:
        torch.testing.assert_close(net.state_dict()[key], _reference(pre.state_dict()[key], 2, "repeat"))


def test_2d_weights_into_a_3d_network_are_refused(tmp_path):
    path = tmp_path / "pretrained.pt"
    _save_with_manifest(_unet(spatial_dims=2), path)
    net = _unet(spatial_dims=3, seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(MedclInputError) as err:
        load_pretrained(net, path, strict=False)
    message = str(err.value)
    assert str(path) in message and "weights are of a 2D network" in message and "the network is 3D" in message
    assert "--spatial_dims 2" in message and "python -m medcl.weights inspect" in message
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing loaded


def test_manifest_sha256_mismatch_is_refused_and_nothing_changes(tmp_path):
    path = tmp_path / "pretrained.pt"
    _save_with_manifest(_unet(seed=0), path)
    torch.save(_unet(seed=2).state_dict(), path)  # weights replaced, manifest left from the first file
    weights, side = path.read_bytes(), Path(manifest_path(path)).read_bytes()
    net = _unet(seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(MedclInputError) as err:
        load_pretrained(net, path)
    message = str(err.value)
    assert message.startswith(f"{path}: sha256 ") and "does not match its manifest" in message
    assert "Nothing was loaded" in message and "Copy the weights file and its .manifest.json together" in message
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert path.read_bytes() == weights and Path(manifest_path(path)).read_bytes() == side
    with pytest.raises(MedclInputError, match="does not match its manifest"):  # the inference loader checks it too
        SafeCheckpointLoader(str(path), {"model": net})(None)
    # a weights file without a manifest loads as before (nothing to check)
    Path(manifest_path(path)).unlink()
    assert load_pretrained(net, path)["loaded"]


def _inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medcl.weights", "inspect", *args], capture_output=True, text=True, cwd=REPO
    )


def test_inspect_prints_the_manifest(tmp_path, capsys):
    path = tmp_path / "model.pt"
    _save_with_manifest(_unet(in_channels=1, out_channels=5), path)
    proc = _inspect(str(path))  # the command itself, once; the other cases in-process
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "class: monai.networks.nets.basic_unet.BasicUNet" in out
    rows = [line.split() for line in out.splitlines()]
    for row in (["spatial_dims", "2"], ["in_channels", "1"], ["out_channels", "5"], ["role", "pretrained"]):
        assert row in rows, out
    assert inspect_main(["inspect", manifest_path(path), "--json"]) == 0  # the manifest's own path works too
    assert json.loads(capsys.readouterr().out) == read_manifest(path)
    torch.save(_unet(seed=3).state_dict(), path)
    assert inspect_main(["inspect", str(path)]) == 1
    assert "does not match the manifest" in capsys.readouterr().err
    Path(manifest_path(path)).unlink()
    assert inspect_main(["inspect", str(path)]) == 1
    captured = capsys.readouterr()
    assert "no manifest" in captured.err and json.loads(captured.out)["in_channels"] == 1
    assert inspect_main(["inspect", str(tmp_path / "missing.pt")]) == 2


def test_network_spec_reads_the_bundle_config_with_overrides(phantom_dir):
    argv = [
        "monai.bundle",
        "run",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--dataset_dir",
        str(phantom_dir),
        "--in_channels",
        "2",
        "--features=[8, 8, 16, 16, 32, 8]",
    ]
    spec = network_spec(_unet(), "network_def", argv=argv)
    assert spec["class"] == "monai.networks.nets.basic_unet.BasicUNet"
    assert spec["args"] == {
        "_target_": "BasicUNet",
        "spatial_dims": 2,
        "in_channels": 2,
        "out_channels": 5,
        "features": [8, 8, 16, 16, 32, 8],
        "norm": "batch",
    }
    assert network_spec(_unet(), "network_def", argv=["pytest"])["args"] is None  # not a bundle run


def _two_channel_volume(path: Path, src: Path) -> None:
    img = nib.load(str(src))
    x = np.asarray(img.dataobj, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.stack([x, 0.5 * x + 100.0], axis=-1), img.affine), str(path))


def two_channel_dataset(src: Path, dst: Path) -> Path:
    """An MSD-style 2-channel copy of a phantom dataset: each image a 4D (X, Y, Z, 2) file holding the image and
    another contrast of it (0.5 x + 100), labels as they are."""
    info = json.loads((src / "dataset.json").read_text())
    for item in info["training"]:
        _two_channel_volume(dst / item["image"], src / item["image"])
        (dst / item["label"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / item["label"], dst / item["label"])
    for item in info.get("test", []):
        rel = item if isinstance(item, str) else item["image"]
        _two_channel_volume(dst / rel, src / rel)
    info["modality"] = {"0": "CT", "1": "CT"}
    (dst / "dataset.json").write_text(json.dumps(info, indent=2))
    return dst


def test_checks_accept_c_channels_only_when_in_channels_is_c(phantom_dir, tmp_path):
    src = json.loads((phantom_dir / "dataset.json").read_text())["training"][0]
    two = tmp_path / "two.nii.gz"
    _two_channel_volume(two, phantom_dir / src["image"])
    item = {"image": str(two), "label": str(phantom_dir / src["label"])}
    check_datalist([item], in_channels=2)
    with pytest.raises(MedclInputError, match=r"two.nii.gz: a 4D image .* or, for 2 channels of one case, set "):
        check_datalist([item])
    with pytest.raises(MedclInputError, match=r"two.nii.gz: an image of shape .* \(2 channels\), but in_channels is 3"):
        check_datalist([item], in_channels=3)
    one = {"image": str(phantom_dir / src["image"]), "label": item["label"]}
    with pytest.raises(MedclInputError, match=r"\(1 channel\), but in_channels is 2.* Set --in_channels 1"):
        check_datalist([one], in_channels=2)


@pytest.mark.slow
def test_one_channel_macl_pretraining_fine_tunes_on_two_channels(phantom_dir, tmp_path):
    """Done-when of #16 item 6: pretrain.json on the 1-channel phantom writes pretrained.pt + manifest; train.json
    --in_channels 2 --pretrained_ckpt on a 2-channel copy runs to the end with the first convolution adapted, and
    inference.json --in_channels 2 segments a 2-channel image; a replaced pretrained.pt is then refused with one
    message and the earlier fine-tuned weights stay as they were."""
    pre_root, ft_root = tmp_path / "pre", tmp_path / "ft"
    proc = run_bundle(
        [CONFIGS / "pretrain.json"], "--bundle_root", str(pre_root), "--dataset_dir", str(phantom_dir), *TINY
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    pretrained = pre_root / "models" / "pretrained.pt"
    manifest = read_manifest(pretrained)
    assert manifest["role"] == "pretrained" and manifest["loss"] == "MACLStep"
    assert (manifest["spatial_dims"], manifest["in_channels"], manifest["out_channels"]) == (2, 1, 5)
    assert manifest["network"]["args"]["_target_"] == "BasicUNet" and manifest["network"]["args"]["in_channels"] == 1
    assert manifest["pretrained_parts"][0] == "conv_0" and manifest["dataset"]["num_images"] == 6
    assert set(manifest["versions"]) == {"medcl", "monai", "torch", "python"}

    data2 = two_channel_dataset(phantom_dir, tmp_path / "phantom2")
    finetune = [
        "--bundle_root",
        str(ft_root),
        "--dataset_dir",
        str(data2),
        "--pretrained_ckpt",
        str(pretrained),
        "--in_channels",
        "2",
        *TINY,
        "--val_interval",
        "1",
        "--label_fraction",
        "0.2",
        "--learning_rate",
        "0",  # the saved weights are the initialisation
    ]
    proc = run_bundle([CONFIGS / "train.json"], *finetune)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "adapted: conv_0.conv_0.conv.weight: 1 -> 2 input channels (average)" in proc.stdout
    assert "PretrainedLoader: 102 tensors loaded" in proc.stdout
    first = "conv_0.conv_0.conv.weight"
    pre_sd = torch.load(pretrained, weights_only=True)
    fine = torch.load(ft_root / "models" / "model_final.pt", weights_only=True)
    torch.testing.assert_close(fine[first], _reference(pre_sd[first], 2, "average"))
    for name in ("model.pt", "model_final.pt"):
        m = read_manifest(ft_root / "models" / name)
        args = m["network"]["args"]
        assert (m["role"], m["in_channels"], m["out_channels"], args["in_channels"]) == ("model", 2, 5, 2)
        assert m["pretrained_from"] == str(pretrained) and m["pretrained_parts"][-1] == "upcat_3"
    assert ["in_channels", "2"] in [
        line.split() for line in _inspect(str(ft_root / "models" / "model.pt")).stdout.splitlines()
    ]

    # inference of the 2-channel network on the 2-channel test image: a label map on the image's grid
    proc = run_bundle(
        [CONFIGS / "inference.json"],
        "--bundle_root",
        str(ft_root),
        "--dataset_dir",
        str(data2),
        "--in_channels",
        "2",
        "--num_workers",
        "0",
        "--output_dir",
        str(tmp_path / "pred"),
        "--ckpt_path",
        str(ft_root / "models" / "model_final.pt"),
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    image = nib.load(str(next((data2 / "imagesTs").glob("*.nii.gz"))))
    pred = nib.load(str(next((tmp_path / "pred").glob("*_seg.nii.gz"))))
    assert image.shape[3] == 2 and pred.shape == image.shape[:3]
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(5))

    # weights replaced after their manifest was written: one message, no traceback, nothing overwritten
    torch.save(_unet(seed=5, out_channels=5).state_dict(), tmp_path / "other.pt")
    shutil.copy(tmp_path / "other.pt", pretrained)
    kept = (ft_root / "models" / "model_final.pt").read_bytes()
    proc = run_bundle([CONFIGS / "train.json"], *finetune)
    assert proc.returncode != 0
    assert "medcl.errors.MedclInputError: " + str(pretrained) + ": sha256 " in proc.stdout
    assert "does not match its manifest" in proc.stdout and "Traceback" not in proc.stdout
    assert (ft_root / "models" / "model_final.pt").read_bytes() == kept
