# Copyright (c) medcl contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The manifest of a weights file: what network, what data, what software made it, and its sha256.

Every weights file medcl writes (``pretrained.pt``, ``model.pt``, ``model_final.pt`` and the interval checkpoints)
gets a sidecar ``<file>.manifest.json`` (:data:`MANIFEST_SUFFIX`). A sidecar, not an entry inside the ``.pt``: the
weights file stays the plain state dict that MONAI's ``CheckpointLoader``, ``ckpt_export``, the model zoo's
``verify_bundle``, MONAI Label and ``torch.load(..., weights_only=True)`` read today, and the manifest can record the
sha256 of the exact bytes of the file (a manifest inside the file could not hold its own hash). The cost: the two
files must travel together; a weights file without its manifest still loads (nothing to check), one whose manifest
names another sha256 is refused (:func:`verify_manifest`).

Manifest fields (JSON)::

    format           "medcl-weights-manifest/1"
    file, sha256, size_bytes, created (UTC, ISO 8601)
    network          {"class": "monai.networks.nets.basic_unet.BasicUNet", "config_id": "network_def",
                      "args": {...the bundle config's network_def arguments, resolved...} or null}
    spatial_dims, in_channels, out_channels    read from the saved tensors (first / last convolution)
    first_conv, head                           the state-dict keys those come from
    num_tensors
    role             "pretrained" (a pre-training export) or "model" (a segmentation network)
    pretrained_parts module-name prefixes that were pre-trained (pretrained.pt: exported; model.pt: initialised
                     from pre-training; [] when trained from scratch)
    loss, dataset {"dir", "num_images"}, plus any other field the bundle config passes
    versions         {"medcl", "monai", "torch", "python"}
"""

from __future__ import annotations

import ast
import datetime
import json
import logging
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from copy import deepcopy
from typing import Any

import torch

from medcl.errors import MedclInputError
from medcl.utils.atomic import atomic_write_json
from medcl.utils.checkpoints import file_sha256

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_SUFFIX",
    "build_manifest",
    "manifest_path",
    "network_spec",
    "read_manifest",
    "state_dict_facts",
    "verify_manifest",
    "write_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "medcl-weights-manifest/1"
_SPEC_ID = "__medcl_manifest_network__"


def manifest_path(weights_path: str | os.PathLike) -> str:
    """The sidecar manifest of ``weights_path``: ``<weights_path>.manifest.json``."""
    return os.fspath(weights_path) + MANIFEST_SUFFIX


def _is_kernel(key: str, value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 3 and key.endswith("weight")


def state_dict_facts(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What the tensors of a network's state dict say about it, without the network.

    The *first convolution* is the first floating-point ``*weight`` tensor of rank >= 3 in state-dict order (a
    convolution kernel ``(out, in, *kernel)``), the *head* the last one. ``spatial_dims`` is the first kernel's rank
    minus 2, ``in_channels`` its dimension 1, ``out_channels`` the head's dimension 0 (the class count of a
    segmentation network; a projection size for a pre-training model).

    Args:
        state_dict: ``{key: tensor}``.

    Returns:
        ``{"spatial_dims", "in_channels", "out_channels", "first_conv", "head", "num_tensors"}``; the first five are
        None when the state dict has no convolution kernel.
    """
    kernels = [k for k, v in state_dict.items() if _is_kernel(k, v)]
    first = kernels[0] if kernels else None
    head = kernels[-1] if kernels else None
    return {
        "spatial_dims": state_dict[first].ndim - 2 if first else None,
        "in_channels": int(state_dict[first].shape[1]) if first else None,
        "out_channels": int(state_dict[head].shape[0]) if head else None,
        "first_conv": first,
        "head": head,
        "num_tensors": len(state_dict),
    }


def _jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it: containers recursively, a module or class as ``{"_target_": its path}``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.nn.Module):
        return {"_target_": f"{type(value).__module__}.{type(value).__qualname__}"}
    if isinstance(value, type):
        return {"_target_": f"{value.__module__}.{value.__qualname__}"}
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _cli_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` pairs of a ``monai.bundle run`` command, values read as Python literals
    (what the command line parser of ``monai.bundle`` does for numbers, lists and dicts)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            if "=" in arg:
                key, raw = arg[2:].split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, raw = arg[2:], argv[i + 1]
                i += 1
            else:
                key, raw = arg[2:], "True"
            try:
                out[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                out[key] = raw
        i += 1
    return out


def _config_args(config_id: str, argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The arguments of the bundle config's ``config_id`` component as this ``monai.bundle run`` command resolves
    them (config files and ``--key value`` overrides from ``argv``), without building the component: a copy of its
    arguments without ``_target_`` is parsed as a plain dict (references and expressions resolved; a nested component
    is built and recorded by its class). None when the process is not such a command or the config cannot be read."""
    from medcl.bundle.overrides import RUN_ARGS, _config_files  # the bundle package imports handlers; import late

    argv = list(sys.argv if argv is None else argv)
    files = _config_files(argv)
    if "run" not in argv or not files:
        return None
    try:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(files)
        for key, value in _cli_overrides(argv).items():
            if key not in RUN_ARGS:
                parser[key] = value
        raw = parser.get(config_id)
        if not isinstance(raw, dict) or "_target_" not in raw:
            return None
        parser[_SPEC_ID] = {k: deepcopy(v) for k, v in raw.items() if not str(k).startswith("_")}
        if "imports" in parser:
            parser.get_parsed_content("imports")
        args = parser.get_parsed_content(_SPEC_ID)
        return {"_target_": raw["_target_"], **{str(k): _jsonable(v) for k, v in args.items()}}
    except Exception as e:  # informative only: never stop a run for the manifest's network arguments
        logger.info("weights manifest: the arguments of %r could not be read from the config (%s).", config_id, e)
        return None


def network_spec(
    network: torch.nn.Module | None, config_id: str | None = "network_def", argv: Sequence[str] | None = None
) -> dict[str, Any]:
    """The ``network`` entry of a manifest: the network's class and the arguments it was built with.

    Args:
        network: the network (its class is recorded; a DDP/DataParallel wrapper is unwrapped). None: no class.
        config_id: the bundle config key that defines the network (its ``_target_`` and arguments are read from
            the ``monai.bundle run`` command's config files and overrides); None: none.
        argv: the command line (default ``sys.argv``).

    Returns:
        ``{"class": "module.Class" or None, "config_id": config_id, "args": {"_target_", ...} or None}``.
    """
    if isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        network = network.module
    cls = f"{type(network).__module__}.{type(network).__qualname__}" if network is not None else None
    return {"class": cls, "config_id": config_id, "args": _config_args(config_id, argv) if config_id else None}


def _versions() -> dict[str, str]:
    import medcl

    try:
        import monai

        monai_version = monai.__version__
    except ImportError:  # pragma: no cover - medcl depends on MONAI
        monai_version = None
    return {
        "medcl": medcl.__version__,
        "monai": monai_version,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def build_manifest(
    weights_path: str | os.PathLike, state_dict: Mapping[str, Any], fields: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The manifest of the weights file ``weights_path`` (already written) holding ``state_dict``.

    Args:
        weights_path: the weights file; its sha256 and size are read from disk.
        state_dict: the tensors the file holds (for :func:`state_dict_facts`).
        fields: what the writer knows beyond the tensors (``role``, ``pretrained_parts``, ``loss``, ``dataset``,
            ``network``: a :func:`network_spec` dict or the network itself, ...); copied in, JSON-converted.

    Returns:
        the manifest dict (see the module docstring).
    """
    path = os.fspath(weights_path)
    extra = dict(fields or {})
    network = extra.pop("network", None)
    if not (isinstance(network, Mapping) and "class" in network):
        network = network_spec(network if isinstance(network, torch.nn.Module) else None, None)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "file": os.path.basename(path),
        "sha256": file_sha256(path),
        "size_bytes": os.path.getsize(path),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "network": _jsonable(network),
        **state_dict_facts(state_dict),
    }
    manifest.update({k: _jsonable(v) for k, v in extra.items()})
    manifest["versions"] = _versions()
    return manifest


def write_manifest(
    weights_path: str | os.PathLike, state_dict: Mapping[str, Any], fields: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Build the manifest of ``weights_path`` and write it (atomically) to :func:`manifest_path`; return it."""
    manifest = build_manifest(weights_path, state_dict, fields)
    atomic_write_json(manifest_path(weights_path), manifest)
    return manifest


def read_manifest(weights_path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest beside ``weights_path``, or None when there is none.

    Raises:
        MedclInputError: the manifest exists but is not a JSON object.
    """
    side = manifest_path(weights_path)
    if not os.path.isfile(side):
        return None
    try:
        with open(side) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise MedclInputError(
            f"{side}: the weights manifest cannot be read ({e}). Restore it from where "
            f"{os.path.basename(weights_path)} came from, or delete it to load the weights without the check."
        ) from e
    if not isinstance(data, dict):
        raise MedclInputError(f"{side}: the weights manifest is not a JSON object; restore or delete it.")
    return data


def verify_manifest(weights_path: str | os.PathLike) -> dict[str, Any] | None:
    """Check ``weights_path`` against its manifest's sha256 before it is read; return the manifest (None: none).

    Raises:
        MedclInputError: the file's sha256 differs from the manifest's (the file was replaced, retrained or
            truncated after the manifest was written, or the pair was mixed up when copying); names both files and
            the fix. Nothing is loaded.
    """
    manifest = read_manifest(weights_path)
    if manifest is None or not manifest.get("sha256"):
        return manifest
    actual = file_sha256(weights_path)
    if actual.lower() != str(manifest["sha256"]).lower():
        raise MedclInputError(
            f"{os.fspath(weights_path)}: sha256 {actual} does not match its manifest {manifest_path(weights_path)} "
            f"({manifest['sha256']}, written {manifest.get('created', '?')}): the weights file is not the one the "
            "manifest describes (replaced, re-trained, truncated, or copied without its manifest). Nothing was "
            "loaded. Copy the weights file and its .manifest.json together from the same run; if you replaced the "
            "weights on purpose, delete the stale manifest."
        )
    return manifest
