"""Checkpoint files: paths a workflow needs before it starts, sha256 checks, and comparing state dicts."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

from monai.bundle import ConfigParser

from medcl.errors import MedclInputError

__all__ = ["compare_state_dicts", "expected_sha256", "file_sha256", "require_checkpoint", "verify_sha256"]

LARGE_FILES = ("large_files.yml", "large_files.yaml", "large_files.json")


def require_checkpoint(
    path: str,
    how_to_make: str = "run the bundle's train.json first",
    what: str = "checkpoint",
    override: str = "--ckpt_dir",
) -> str:
    """Return ``path`` if the checkpoint exists, else raise an error that says how to create it.

    Args:
        path: checkpoint file.
        how_to_make: the command or step that creates it.
        what: what the file is, for the message (e.g. ``"pre-trained checkpoint"``).
        override: the config override that points elsewhere.

    Raises:
        MedclInputError: when ``path`` is not a file.
    """
    if not os.path.isfile(path):
        raise MedclInputError(f"{path}: {what} not found. To create it, {how_to_make} (or pass {override}).")
    return path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str | None) -> None:
    """Check ``path`` against an expected sha256 (nothing to check when ``expected`` is None or empty).

    Raises:
        MedclInputError: when the file's sha256 differs (tampered, truncated or another file).
    """
    if not expected:
        return
    actual = file_sha256(path)
    if actual.lower() != str(expected).lower():
        raise MedclInputError(
            f"{os.fspath(path)}: sha256 {actual} does not match the expected {expected}: the file is not the one the "
            "bundle was published with (tampered, truncated or replaced). It was not loaded; download the bundle again "
            "from a source you trust."
        )


def expected_sha256(bundle_root: str | os.PathLike, path: str | os.PathLike) -> str | None:
    """The sha256 that ``<bundle_root>/large_files.yml`` (or ``.yaml``/``.json``) records for ``path``, if any.

    ``path`` may be absolute or relative to ``bundle_root``; entries are ``{"path", "url", "hash_val", "hash_type"}``
    as MONAI's ``download_large_files`` reads them. None when there is no such file, no entry for ``path`` or the
    entry's hash is not a sha256.
    """
    root = os.path.abspath(os.fspath(bundle_root))
    target = os.path.normpath(os.path.join(root, os.fspath(path)))
    for name in LARGE_FILES:
        listing = os.path.join(root, name)
        if not os.path.isfile(listing):
            continue
        entries = ConfigParser.load_config_file(listing).get("large_files", [])
        for entry in entries:
            if os.path.normpath(os.path.join(root, entry.get("path", ""))) == target:
                if str(entry.get("hash_type", "")).lower() == "sha256" and entry.get("hash_val"):
                    return str(entry["hash_val"])
                return None
    return None


def compare_state_dicts(ckpt: Mapping[str, Any], net_sd: Mapping[str, Any]) -> dict[str, Any]:
    """How a checkpoint's state dict fits a network's.

    Returns:
        ``{"fits": {key: value} (in the network, same shape), "unexpected": [checkpoint keys not in the network],
        "missing": [network keys not in the checkpoint], "mismatched": [(key, checkpoint shape, network shape)]}``;
        lists in checkpoint order, ``missing`` in network order.
    """
    fits, unexpected, mismatched = {}, [], []
    for key, value in ckpt.items():
        if key not in net_sd:
            unexpected.append(key)
            continue
        have, want = tuple(getattr(value, "shape", ())), tuple(getattr(net_sd[key], "shape", ()))
        if have != want:
            mismatched.append((key, have, want))
        else:
            fits[key] = value
    missing = [k for k in net_sd if k not in ckpt]
    return {"fits": fits, "unexpected": unexpected, "missing": missing, "mismatched": mismatched}
