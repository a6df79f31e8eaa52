"""Every bundle's configs parse, every ``_target_`` resolves, and the model-zoo layout is complete."""

from __future__ import annotations

import json
from pydoc import locate

import pytest
from conftest import BUNDLES, run_bundle
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator

BUNDLE_DIRS = sorted(p for p in BUNDLES.iterdir() if (p / "configs").is_dir())
CONFIGS = sorted(c for b in BUNDLE_DIRS for c in (b / "configs").glob("*.json"))
REQUIRED_METADATA = [
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "data_source",
    "data_type",
    "image_classes",
    "label_classes",
    "network_data_format",
]
# overrides every bundle's train.json accepts by these exact names
COMMON_KEYS = [
    "bundle_root",
    "dataset_dir",
    "output_dir",
    "ckpt_dir",
    "device",
    "seed",
    "spatial_dims",
    "patch_size",
    "label_fraction",
    "num_labelled",
    "max_epochs",
    "val_interval",
    "num_workers",
    "cache_rate",
]


def _with_base(config):
    """Overlay configs (evaluate, multi_gpu_*) are merged onto the config they extend, as users run them."""
    if config.name == "evaluate.json" or config.name == "multi_gpu_train.json":
        return [config.parent / "train.json", config]
    if config.name.startswith("multi_gpu_"):
        return [config.parent / config.name.replace("multi_gpu_", ""), config]
    return [config]


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for v in node.values():
            yield from _targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v)


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_bundle_layout(bundle):
    for rel in [
        "configs/metadata.json",
        "configs/train.json",
        "configs/inference.json",
        "configs/evaluate.json",
        "configs/logging.conf",
        "docs/README.md",
        "LICENSE",
    ]:
        assert (bundle / rel).is_file(), f"{bundle.name} lacks {rel}"
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    assert not missing, f"{bundle.name}/configs/metadata.json lacks {missing}"
    assert meta["version"] in meta["changelog"]
    outputs = meta["network_data_format"]["outputs"]["pred"]
    assert outputs["num_channels"] == len(outputs["channel_def"])


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_train_accepts_common_overrides(bundle):
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/train.json"))
    missing = [k for k in COMMON_KEYS if k not in parser]
    assert not missing, f"{bundle.name}/configs/train.json lacks top-level keys {missing}"
    assert isinstance(parser["train"]["handlers"], list), "MONAI Label overrides train#handlers: keep it a literal list"
    # MONAI Label calls .get("_target_") on each entry: no "@reference" strings in the list
    assert all(isinstance(h, dict) for h in parser["train"]["handlers"]), "train#handlers entries must be dicts"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_config_targets_resolve(config):
    parser = ConfigParser()
    parser.read_config([str(c) for c in _with_base(config)])
    locator = ComponentLocator()
    for target in set(_targets(parser.get())):
        found = locate(target) if "." in target else locator.get_component_module_name(target)
        assert found, f"{config}: _target_ {target} does not resolve"


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_train_config_instantiates(bundle, phantom_dir, tmp_path):
    """Parse the whole train config against the phantom: trainer and evaluator build without running."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/train.json"))
    parser.update(
        {
            "bundle_root": str(tmp_path),
            "dataset_dir": str(phantom_dir),
            "patch_size": 32,
            "num_workers": 0,
            "cache_rate": 0.0,
        }
    )
    trainer = parser.get_parsed_content("train#trainer", lazy=True)
    evaluator = parser.get_parsed_content("validate#evaluator", lazy=True)
    assert trainer.state.max_epochs == parser.get_parsed_content("max_epochs")
    assert evaluator is not None


@pytest.mark.slow
@pytest.mark.parametrize(
    "bundle", [b for b in BUNDLE_DIRS if (b / "configs" / "pretrain.json").is_file()], ids=lambda p: p.name
)
def test_finetune_without_pretrained_checkpoint_names_the_pretrain_command(bundle, phantom_dir, tmp_path):
    proc = run_bundle(
        [bundle / "configs" / "train.json"], "--bundle_root", str(tmp_path), "--dataset_dir", str(phantom_dir)
    )
    assert proc.returncode != 0
    assert "pretrained.pt: checkpoint not found" in proc.stdout
    assert f"python -m monai.bundle run --config_file bundles/{bundle.name}/configs/pretrain.json" in proc.stdout


@pytest.mark.parametrize(
    "bundle", [b for b in BUNDLE_DIRS if (b / "configs" / "pretrain.json").is_file()], ids=lambda p: p.name
)
def test_finetuning_finds_the_pretraining_checkpoint_under_the_same_ckpt_dir(bundle, tmp_path):
    """pretrain.json writes ``<ckpt_dir>/pretrained.pt``; train.json with the same ``--ckpt_dir`` reads that file."""
    written, read = ConfigParser(), ConfigParser()
    written.read_config(str(bundle / "configs/pretrain.json"))
    read.read_config(str(bundle / "configs/train.json"))
    for parser in (written, read):
        parser.update({"bundle_root": str(tmp_path / "root"), "ckpt_dir": str(tmp_path / "elsewhere")})
    saver = next(h for h in written["train"]["handlers"] if h.get("final_filename") == "pretrained.pt")
    assert saver["save_dir"] == "@ckpt_dir"
    assert read.get_parsed_content("pretrained_ckpt") == str(tmp_path / "elsewhere" / "pretrained.pt")
