"""MONAI bundle tooling on every bundle, offline: verify_metadata (medcl's schema), verify_net_in_out, ckpt_export."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from conftest import BUNDLES
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

import medcl.bundle
from medcl.bundle import META_SCHEMA, META_SCHEMA_SHA256, verify_metadata_offline

BUNDLE_DIRS = sorted(p for p in BUNDLES.iterdir() if (p / "configs").is_dir())
#: overrides that keep the networks CPU-sized (MixCL's UNETR at the narrow CPU width and 32³)
SMALL = {"mixcl": {"patch_size": [32, 32, 32], "feature_size": 8, "hidden_size": 192, "mlp_dim": 384, "num_heads": 4}}


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_metadata_verifies_offline(bundle):
    verify_metadata_offline(bundle / "configs" / "metadata.json")


def test_metadata_schema_rejects_a_broken_file(tmp_path):
    meta = json.loads((BUNDLE_DIRS[0] / "configs" / "metadata.json").read_text())
    del meta["version"]
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = "five"
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version|num_channels"):
        verify_metadata_offline(path)
    assert json.loads(open(META_SCHEMA).read())["required"][:2] == ["schema", "version"]


def test_meta_schema_hash_is_the_shipped_files():
    """META_SCHEMA_SHA256 is the sha256 of meta_schema.json (edit the schema, then update the constant)."""
    with open(META_SCHEMA, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == META_SCHEMA_SHA256, f"meta_schema.json changed: set medcl.bundle.META_SCHEMA_SHA256 = {digest!r}"


def test_verify_metadata_checks_the_schema_hash_without_warning(monkeypatch):
    """MONAI's "No hash value provided ... integrity is NOT verified" warning is gone, and a wrong hash is refused."""
    meta_file = BUNDLE_DIRS[0] / "configs" / "metadata.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        verify_metadata_offline(meta_file)
    assert not [w for w in caught if "hash" in str(w.message).lower()], [str(w.message) for w in caught]
    monkeypatch.setattr(medcl.bundle, "META_SCHEMA_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="hash check"):  # monai.apps.utils.HashCheckError, a ValueError
        verify_metadata_offline(meta_file)


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_verify_net_in_out(bundle, phantom_dir):
    """The inference network takes the metadata's input shape and gives its output channels."""
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    if bundle.name in SMALL:  # check at the CPU size: the metadata's shape with the small network
        meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = SMALL[bundle.name]["patch_size"]
        meta["network_data_format"]["outputs"]["pred"]["spatial_shape"] = SMALL[bundle.name]["patch_size"]
    meta_file = phantom_dir.parent / f"{bundle.name}_metadata.json"
    meta_file.write_text(json.dumps(meta))
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(meta_file),
        config_file=str(bundle / "configs" / "inference.json"),
        device="cpu",
        dataset_dir=str(phantom_dir),
        **SMALL.get(bundle.name, {}),
    )


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_ckpt_export_gives_the_same_outputs(bundle, phantom_dir, tmp_path, one_thread):
    """Every network scripts (no tracing; localcl's SegContrastNet too) and the TorchScript module agrees."""
    config = bundle / "configs" / "inference.json"
    parser = ConfigParser()
    parser.read_config(str(config))
    small = SMALL.get(bundle.name, {})
    parser.update({"dataset_dir": str(phantom_dir), "device": "cpu", **small})
    net = parser.get_parsed_content("network_def").eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    shape = small.get("patch_size") or meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(tmp_path / "model.pt"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(config),
        device="cpu",
        dataset_dir=str(phantom_dir),
        **small,
    )
    ts = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.randn(1, 1, *shape)
    with torch.no_grad():
        torch.testing.assert_close(ts(x), net(x), rtol=1e-4, atol=1e-4)
