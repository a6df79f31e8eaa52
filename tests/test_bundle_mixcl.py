"""The MixCL bundle run for real: ``python -m monai.bundle run`` of pooled pretrain -> fine-tune -> inference (32³)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BUNDLES, assert_segmentation_of, run_bundle
from monai.networks.nets import UNETR

from medcl.networks.mixcl import mixcl_pretrained_prefixes

CONFIGS = BUNDLES / "mixcl" / "configs"
WIDTH = {"feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}
TINY = [
    "--patch_size",
    "[32,32,32]",
    *[a for k, v in WIDTH.items() for a in (f"--{k}", str(v))],
    "--max_epochs",
    "1",
    "--epoch_length",
    "2",
    "--num_workers",
    "0",
    "--batch_size",
    "2",
    "--samples_per_volume",
    "1",
    "--cache_rate",
    "0",
]

pytestmark = pytest.mark.slow


def _assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:]


def _under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _unetr(out_channels: int) -> UNETR:
    return UNETR(1, out_channels, img_size=(32, 32, 32), norm_name="instance", res_block=True, **WIDTH)


@pytest.fixture(scope="module")
def pooled_dirs(tmp_path_factory):
    """Two more labelled phantoms with other organ sets (other label maps) to pool in pre-training."""
    from medcl.data.phantom import generate_dataset

    root = tmp_path_factory.mktemp("pooled")
    for organ_set in ("pelvis", "thorax"):
        generate_dataset(str(root / organ_set), n=3, n_test=0, seed=1, shape=(32, 32, 32), organ_set=organ_set)
    return [str(root / "pelvis"), str(root / "thorax")]


@pytest.fixture(scope="module")
def pretrained(phantom_dir, pooled_dirs, tmp_path_factory):
    """One pooled pre-training run (2 iterations): (bundle_root, completed process)."""
    root = tmp_path_factory.mktemp("mixcl")
    pooled = repr([str(phantom_dir), *pooled_dirs])  # the target dataset too: its validation cases are held out
    proc = run_bundle(
        [CONFIGS / "pretrain.json"],
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(phantom_dir),
        "--pretrain_dataset_dirs",
        pooled,
        *TINY,
    )
    _assert_ok(proc)
    return root, proc


def test_pretrain_logs_each_term_and_saves_the_reconstruction_unetr(pretrained):
    root, proc = pretrained
    last = proc.stdout.split("Iter: 2/2 -- ")[1].splitlines()[0]
    for term in ("loss: ", "loss_id: ", "loss_label: ", "loss_recon: "):
        assert term in last
    terms = dict(part.split(": ") for part in ("loss" + p for p in last.strip().split(" loss")[1:]))
    assert all(np.isfinite(float(v)) for v in terms.values())
    assert float(terms["loss_label"]) > 0  # labelled pixels of several classes were contrasted
    norms = proc.stdout.split("gradient norms on the shared parameters: ")[1].splitlines()[0]
    for name in ("grad_norm_id", "grad_norm_label", "grad_norm_recon"):  # each term reaches the shared encoder
        assert float(norms.split(name + " ")[1].split(",")[0].split(" ")[0]) > 0, norms
    ckpt = torch.load(root / "models" / "pretrained.pt", weights_only=True)
    assert set(ckpt) == set(_unetr(1).state_dict())  # the UNETR only, no projector


def test_finetune_loads_the_encoder_and_not_the_decoder(pretrained, phantom_dir):
    root, _ = pretrained
    # learning rate 0 (AdamW's decoupled decay is scaled by it too): the saved weights are the initialisation
    proc = run_bundle(
        [CONFIGS / "train.json"],
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(phantom_dir),
        *TINY,
        "--val_interval",
        "1",
        "--label_fraction",
        "0.2",
        "--learning_rate",
        "0",
        "--seed",
        "1",
    )
    _assert_ok(proc)
    net = _unetr(5)
    prefixes = mixcl_pretrained_prefixes(net)
    assert prefixes == ["vit", "encoder1", "encoder2", "encoder3", "encoder4"]
    pre = torch.load(root / "models" / "pretrained.pt", weights_only=True)
    fine = torch.load(root / "models" / "model_final.pt", weights_only=True)
    n_loaded = sum(1 for k in net.state_dict() if _under(k, prefixes))
    assert f"PretrainedLoader: {n_loaded} tensors loaded" in proc.stdout
    loaded = [k for k in fine if _under(k, prefixes)]
    rest = [k for k in fine if not _under(k, prefixes)]
    assert {k.split(".")[0] for k in rest} == {"decoder5", "decoder4", "decoder3", "decoder2", "out"}
    for k in loaded:
        assert torch.equal(fine[k], pre[k]), k
    changed = [k for k in rest if k in pre and fine[k].shape == pre[k].shape and not torch.equal(fine[k], pre[k])]
    assert len(changed) >= 10  # the decoder is a fresh random initialisation

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
        "--patch_size",
        "[32,32,32]",
        *[a for k, v in WIDTH.items() for a in (f"--{k}", str(v))],
    )
    _assert_ok(proc)
    assert_segmentation_of(out, next((phantom_dir / "imagesTs").glob("*.nii.gz")), num_classes=5)


def test_pretrain_refuses_a_dataset_listed_twice(phantom_dir, tmp_path):
    proc = run_bundle(
        [CONFIGS / "pretrain.json"],
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(phantom_dir),
        "--pretrain_dataset_dirs",
        repr([str(phantom_dir), str(phantom_dir)]),
        *TINY,
    )
    assert proc.returncode != 0
    assert "is listed twice" in proc.stdout


def test_pretrain_2d_slices_and_torchrun_two_cpu_processes(phantom_dir, pooled_dirs, tmp_path):
    proc = run_bundle(
        [CONFIGS / "pretrain.json", CONFIGS / "multi_gpu_pretrain.json"],
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(phantom_dir),
        "--pretrain_dataset_dirs",
        repr(pooled_dirs),
        *TINY,
        "--spatial_dims",
        "2",
        "--batch_size",
        "1",
        torchrun=2,
    )
    _assert_ok(proc)
    assert (tmp_path / "models" / "pretrained.pt").is_file()
