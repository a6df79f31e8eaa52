"""Loading weights from elsewhere: sha256 from large_files.yml checked first, torch.load(weights_only=True), clear
errors."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from medcl.errors import MedclInputError
from medcl.handlers import SafeCheckpointLoader
from medcl.networks import load_pretrained
from medcl.utils import expected_sha256, file_sha256


class _Engine:
    """What CheckpointLoader touches of an Ignite engine."""

    class state:
        max_epochs = None
        epoch = 0
        iteration = 0

    logger = __import__("logging").getLogger("test")


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 1))


def test_safe_loader_checks_sha256_then_loads(tmp_path):
    src, dst = _net(), nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 1))
    path = tmp_path / "model.pt"
    torch.save(src.state_dict(), path)
    SafeCheckpointLoader(str(path), {"model": dst}, sha256=file_sha256(path))(_Engine())
    for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # one changed byte: refused before torch.load sees it
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered = tmp_path / "tampered.pt"
    tampered.write_bytes(bytes(data))
    with pytest.raises(MedclInputError, match="tampered.pt: sha256 .* does not match the expected"):
        SafeCheckpointLoader(str(tampered), {"model": dst}, sha256=file_sha256(path))(_Engine())
    with pytest.raises(MedclInputError, match="missing.pt: checkpoint not found"):
        SafeCheckpointLoader(str(tmp_path / "missing.pt"), {"model": dst})(_Engine())


def test_pickle_carrying_checkpoint_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": _net().state_dict(), "extra": _Payload(str(marker))}, path)
    with pytest.raises(
        MedclInputError, match="evil.pt: not a readable plain weights file .* Nothing in it was executed"
    ):
        SafeCheckpointLoader(str(path), {"model": _net()})(_Engine())
    with pytest.raises(MedclInputError, match="weights_only=True"):
        load_pretrained(_net(), path)
    assert not marker.exists()
    # what the checks prevent: an unrestricted torch.load runs the payload
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_expected_sha256_reads_large_files_yml(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "large_files.yml").write_text(
        "large_files:\n"
        "  - path: models/model.pt\n"
        "    url: https://example.org/model.pt\n"
        "    hash_val: abc123\n"
        "    hash_type: sha256\n"
        "  - path: models/model.ts\n"
        "    url: https://example.org/model.ts\n"
        "    hash_val: ffff\n"
        "    hash_type: md5\n"
    )
    assert expected_sha256(tmp_path, "models/model.pt") == "abc123"
    assert expected_sha256(tmp_path, str(tmp_path / "models" / "model.pt")) == "abc123"
    assert expected_sha256(tmp_path, "models/model.ts") is None  # not a sha256
    assert expected_sha256(tmp_path, "models/other.pt") is None
    assert expected_sha256(tmp_path / "models", "model.pt") is None  # no listing there


def test_load_pretrained_verifies_sha256(tmp_path):
    path = tmp_path / "pretrained.pt"
    torch.save(_net().state_dict(), path)
    report = load_pretrained(_net(), path, sha256=file_sha256(path))
    assert len(report["loaded"]) == 4
    with pytest.raises(MedclInputError, match="does not match the expected 0000"):
        load_pretrained(_net(), path, sha256="0000")
    assert os.path.isfile(path)  # a refused checkpoint is left where it is
