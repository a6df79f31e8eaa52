"""The MACL bundle run for real: ``python -m monai.bundle run`` of pretrain -> fine-tune -> inference on a 32³
phantom."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from conftest import BUNDLES, assert_segmentation_of, run_bundle
from monai.networks.nets import BasicUNet

from medcl.networks.macl import pretrained_prefixes

CONFIGS = BUNDLES / "macl" / "configs"
# 4-level nets at scale 0.25 need patches divisible by 64: the 32³ phantom is padded to 64 in-plane
TINY = [
    "--patch_size",
    "64",
    "--max_epochs",
    "1",
    "--epoch_length",
    "2",
    "--num_workers",
    "0",
    "--batch_size",
    "1",
    "--samples_per_volume",
    "2",
    "--cache_rate",
    "0",
]
FEATURES = (32, 32, 64, 128, 256, 32)  # the configs' default BasicUNet

pytestmark = pytest.mark.slow


def _assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:]


def _under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


@pytest.fixture(scope="module")
def pretrained(phantom_dir, tmp_path_factory):
    """One 2D pre-training run (2 iterations, MLflow tracking on): (bundle_root, completed process)."""
    root = tmp_path_factory.mktemp("macl")
    proc = run_bundle(
        [CONFIGS / "pretrain.json"],
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(phantom_dir),
        *TINY,
        "--checkpoint_interval",
        "1",
        "--output_dir",
        str(root / "eval"),
        "--tracking",
        "mlflow",
    )
    _assert_ok(proc)
    return root, proc


def test_pretrain_logs_each_term_and_saves_the_backbone(pretrained):
    root, proc = pretrained
    for term in ("loss: ", "loss_g: ", "loss_d: ", "loss_er: "):  # StatsHandler, every iteration
        assert "Iter: 2/2 -- " in proc.stdout and term in proc.stdout.split("Iter: 2/2 -- ")[1].splitlines()[0]
    metrics = [line for line in proc.stdout.splitlines() if "Metrics -- " in line]
    assert metrics and "loss_d: " in metrics[0] and "grad_norm_d: " in metrics[0]  # epoch averages, gradient norms
    ckpt = torch.load(root / "models" / "pretrained.pt", weights_only=True)
    assert set(ckpt) == set(BasicUNet(2, 1, 5, features=FEATURES, norm="batch").state_dict())  # backbone only
    assert list((root / "models").glob("pretrained_*epoch=1.pt")), "interval checkpoint (--checkpoint_interval 1)"
    with sqlite3.connect(root / "eval" / "mlruns.db") as con:
        keys = {k for (k,) in con.execute("select distinct key from metrics")}
    assert {"train_loss", "pretrain_loss", "loss_g", "loss_d", "loss_er"} <= keys
    assert {"grad_norm_g", "grad_norm_d", "grad_norm_er"} <= keys  # TermGradNormHandler, per epoch, in MLflow
    assert "gradient norms on the shared parameters: grad_norm_g " in proc.stdout


def test_finetune_starts_from_the_pretrained_encoder_and_two_decoder_blocks(pretrained, phantom_dir):
    root, _ = pretrained
    # learning rate 0: the saved fine-tuned weights are the initialisation; seed 1: the random part differs from the
    # pre-training run's (seed 0) initialisation
    proc = run_bundle(
        [CONFIGS / "train.json"],
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(phantom_dir),
        *TINY,
        "--val_interval",
        "2",
        "--label_fraction",
        "0.2",
        "--learning_rate",
        "0",
        "--seed",
        "1",
    )
    _assert_ok(proc)
    assert "PretrainedLoader: 102 tensors loaded" in proc.stdout
    net = BasicUNet(2, 1, 5, features=FEATURES, norm="batch")
    prefixes = pretrained_prefixes(net)
    assert prefixes == ["conv_0", "down_1", "down_2", "down_3", "down_4", "upcat_4", "upcat_3"]
    pre = torch.load(root / "models" / "pretrained.pt", weights_only=True)
    fine = torch.load(root / "models" / "model_final.pt", weights_only=True)
    params = [name for name, _ in net.named_parameters()]  # not the batch-norm statistics, which training updates
    loaded = [k for k in params if _under(k, prefixes)]
    rest = [k for k in params if not _under(k, prefixes)]
    assert loaded and rest and {k.split(".")[0] for k in rest} == {"upcat_2", "upcat_1", "final_conv"}
    for k in loaded:
        assert torch.equal(fine[k], pre[k]), k
    # the rest is a fresh random initialisation (batch-norm scales/shifts start at constants 1 / 0 in both runs)
    random_rest = [k for k in rest if not torch.all(pre[k] == pre[k].flatten()[0])]
    assert len(random_rest) >= 12
    for k in random_rest:
        assert not torch.equal(fine[k], pre[k]), k

    # whole-volume inference with the fine-tuned network: a NIfTI on the input's grid
    out = root / "pred"
    proc = run_bundle(
        [CONFIGS / "inference.json"],
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(phantom_dir),
        "--output_dir",
        str(out),
        "--num_workers",
        "0",
        "--ckpt_path",
        str(root / "models" / "model_final.pt"),
    )
    _assert_ok(proc)
    assert_segmentation_of(out, next((phantom_dir / "imagesTs").glob("*.nii.gz")), num_classes=5)


def test_pretrain_3d_smoke_with_a_unet_override(phantom_dir, tmp_path):
    # a 3-level UNet (encoder stride 8) only needs patches divisible by 8 / 0.25 = 32: the phantom's own size
    unet = (
        "{'_target_': 'UNet', 'spatial_dims': '@spatial_dims', 'in_channels': 1, 'out_channels': '@num_classes', "
        "'channels': [4, 8, 16, 32], 'strides': [2, 2, 2], 'num_res_units': 0, 'norm': 'batch'}"
    )
    proc = run_bundle(
        [CONFIGS / "pretrain.json"],
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(phantom_dir),
        *TINY,
        "--epoch_length",
        "1",
        "--spatial_dims",
        "3",
        "--patch_size",
        "32",
        "--network_def",
        unet,
    )
    _assert_ok(proc)
    assert "'_target_': 'UNet'" in proc.stdout  # the override reached the config
    assert "loss_d: " in proc.stdout and (tmp_path / "models" / "pretrained.pt").is_file()


def test_pretrain_torchrun_two_cpu_processes(phantom_dir, tmp_path):
    proc = run_bundle(
        [CONFIGS / "pretrain.json", CONFIGS / "multi_gpu_pretrain.json"],
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(phantom_dir),
        *TINY,
        torchrun=2,
    )
    _assert_ok(proc)
    assert (tmp_path / "models" / "pretrained.pt").is_file()
