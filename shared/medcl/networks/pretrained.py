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
"""Initialise part of a network (e.g. encoder + first decoder blocks) from a pre-training checkpoint."""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medcl.errors import MedclInputError
from medcl.utils.checkpoints import compare_state_dicts, require_checkpoint, verify_sha256
from medcl.weights.adapt import adapt_state_dict, load_table
from medcl.weights.manifest import verify_manifest

__all__ = ["load_pretrained"]

logger = logging.getLogger(__name__)

DEFAULT_HOW_TO_MAKE = (
    "run the MACL pre-training first: python -m monai.bundle run --config_file bundles/macl/configs/pretrain.json "
    "(it writes the checkpoint that train.json's pretrained_ckpt points to)"
)
_SHOWN = 5


def _under(key: str, prefixes: Sequence[str] | None) -> bool:
    """``key`` is under prefix ``p`` when ``key == p`` or it starts with ``p + "."`` (``p`` if it ends in ".")."""
    if prefixes is None:
        return True
    for p in prefixes:
        if p == "" or key == p or key.startswith(p if p.endswith(".") else p + "."):
            return True
    return False


def _rename(key: str, name_map: Mapping[str, str] | None) -> str:
    """Apply ``name_map`` in order: a pattern starting with ``^`` is a regex (first match), else a literal prefix."""
    for pattern, repl in (name_map or {}).items():
        if pattern.startswith("^"):
            key = re.sub(pattern, repl, key, count=1)
        elif key.startswith(pattern):
            key = repl + key[len(pattern) :]
    return key


def _extract_state_dict(obj: Any, key: str | None, path: str) -> Mapping[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: ``obj[key]`` if present, else ``obj`` itself if it is one."""
    if isinstance(obj, Mapping):
        if key is not None and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, Mapping) and not obj:
            raise MedclInputError(f"{path}: the checkpoint is empty.")
        entries = ", ".join(f"{k!r}" for k in list(obj)[:10])
        raise MedclInputError(
            f"{path}: no state dict under key {key!r} and the file is not a state dict itself (entries: {entries}). "
            "Pass key=<the entry holding the network's weights> (MONAI's CheckpointSaver uses the save_dict names)."
        )
    raise MedclInputError(f"{path}: expected a dict (state dict or {{key: state dict}}), got {type(obj).__name__}.")


def _common_prefix_hint(keys: Sequence[str]) -> str:
    """Suggest a name_map when most checkpoint keys share a first component (``module.``, ``backbone.``)."""
    firsts = Counter(k.split(".", 1)[0] for k in keys if "." in k)
    if not firsts:
        return ""
    first, count = firsts.most_common(1)[0]
    if count == len(keys):
        return f" All checkpoint keys start with {first + '.'!r}: pass name_map={{{first + '.'!r}: ''}} to strip it."
    return ""


def load_pretrained(
    network: nn.Module,
    checkpoint_path: str | os.PathLike,
    prefixes: Sequence[str] | None = None,
    key: str | None = "model",
    strict: bool = True,
    name_map: Mapping[str, str] | None = None,
    map_location: str | torch.device = "cpu",
    how_to_make: str = DEFAULT_HOW_TO_MAKE,
    sha256: str | None = None,
    channel_mode: str = "average",
) -> dict[str, Any]:
    """
    Copy the weights of ``network``'s modules under ``prefixes`` from a checkpoint; everything else is untouched.

    The checkpoint is read with ``torch.load(..., weights_only=True)``. It may be ``{key: state_dict, ...}``
    (e.g. ``{"model": ...}``) or a raw state dict (what MONAI's ``CheckpointSaver`` writes when its
    ``save_dict`` has a single entry). ``name_map`` renames checkpoint keys before matching, in order: a pattern
    starting with ``^`` is a regular expression (``re.sub``, first match), any other pattern a literal prefix,
    e.g. ``{"module.": ""}`` (DDP), ``{"backbone.": ""}`` (a :class:`~medcl.networks.macl.MACLPretrainModel`
    saved whole) or ``{"^online_decoder\\.": "decoder."}``.

    A network key is *targeted* when it lies under one of ``prefixes`` (all keys when ``prefixes`` is None);
    ``key == p`` or ``key.startswith(p + ".")``. ``network`` wrapped in DDP/DataParallel is unwrapped.

    Another input-channel count (the kernels that read the input) is adapted by ``channel_mode``, another class
    count leaves the head freshly initialised (:mod:`medcl.weights.adapt`); the file is checked against its
    ``<file>.manifest.json`` (:func:`medcl.weights.verify_manifest`) when it has one. One table of loaded / adapted
    / skipped / missing tensors per module is logged (INFO).

    Args:
        network: the network to initialise (in place).
        checkpoint_path: the checkpoint file.
        prefixes: module-name prefixes to load, e.g. :func:`medcl.networks.macl.pretrained_prefixes`. None: all.
        key: entry of the checkpoint dict holding the state dict; ignored when absent (raw state dict).
            Defaults to ``"model"``.
        strict: raise when a targeted key is missing from the checkpoint, has another shape, when nothing is
            loaded, or when a prefix matches no key of ``network``. False: load what matches and log the rest.
        name_map: renames of checkpoint keys, see above.
        map_location: passed to ``torch.load``. Defaults to ``"cpu"``.
        how_to_make: how to create the checkpoint, used in the "file not found" message.
        sha256: expected sha256 of the file, checked before it is read (e.g. a downloaded pre-trained bundle's
            ``large_files.yml`` entry, :func:`medcl.utils.expected_sha256`); None: no check.
        channel_mode: ``"average"`` (default) or ``"repeat"``: how pre-trained first-layer filters are spread
            over another input-channel count (:func:`medcl.weights.adapt_in_channels`).

    Returns:
        ``{"loaded": [keys, adapted ones included], "adapted": {key: note}, "fresh": {head key: note},
        "skipped": [checkpoint keys (renamed) not loaded: not in the network or outside prefixes], "missing":
        [targeted network keys absent from the checkpoint], "mismatched": [(key, checkpoint shape, network
        shape)] (neither adapted nor the head)}``.

    Raises:
        MedclInputError: for a missing or unreadable file, a sha256 mismatch (``sha256`` or the manifest's), a
            checkpoint without a state dict, kernels of another spatial rank (2D weights, 3D network), or
            (``strict``) a checkpoint that does not fit the targeted part of ``network``; the message names the
            file and lists the first few problems.
    """
    path = require_checkpoint(os.fspath(checkpoint_path), how_to_make, "pre-trained checkpoint", "--pretrained_ckpt")
    verify_sha256(path, sha256)
    verify_manifest(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, or pickled objects other than tensors/containers
        raise MedclInputError(f"{path}: cannot read the checkpoint with torch.load(weights_only=True): {e}") from e
    ckpt = _extract_state_dict(obj, key, path)

    if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        network = network.module
    net_sd = network.state_dict()
    prefixes = None if prefixes is None else [prefixes] if isinstance(prefixes, str) else list(prefixes)
    targeted = [k for k in net_sd if _under(k, prefixes)]
    unused_prefixes = [p for p in (prefixes or []) if not any(_under(k, [p]) for k in net_sd)]

    # checkpoint keys outside the prefixes count as not in the network: skipped
    renamed = {_rename(k, name_map): v for k, v in ckpt.items()}
    fit = compare_state_dicts(renamed, {k: net_sd[k] for k in targeted})
    to_load, skipped, missing = fit["fits"], fit["unexpected"], fit["missing"]
    adapt = adapt_state_dict(fit["mismatched"], renamed, net_sd, channel_mode, path)
    to_load.update(adapt["adapted"])
    mismatched = adapt["mismatched"]
    loaded = list(to_load)
    report = {
        "loaded": loaded,
        "adapted": adapt["adapted_notes"],
        "fresh": adapt["fresh"],
        "skipped": skipped,
        "missing": missing,
        "mismatched": mismatched,
    }

    problems = []
    if mismatched:
        shown = "; ".join(f"{k}: checkpoint {c} vs network {n}" for k, c, n in mismatched[:_SHOWN])
        problems.append(f"{len(mismatched)} shape mismatches ({shown}{' ...' if len(mismatched) > _SHOWN else ''})")
    if missing:
        problems.append(
            f"{len(missing)} of the {len(targeted)} targeted keys are not in the checkpoint "
            f"({', '.join(missing[:_SHOWN])}{' ...' if len(missing) > _SHOWN else ''})"
        )
    if not loaded:
        problems.append("no checkpoint key matches the targeted part of the network")
    if unused_prefixes:
        problems.append(f"prefixes {unused_prefixes} match no key of {type(network).__name__}")
    if strict and problems:
        ckpt_keys = list(ckpt)  # shown when no key matches: a naming problem (e.g. a "module." prefix) is likely
        keys = f"First checkpoint keys: {ckpt_keys[:_SHOWN]}.{_common_prefix_hint(ckpt_keys)} " if not loaded else ""
        raise MedclInputError(
            f"{path}: the checkpoint does not fit {type(network).__name__}"
            f"{' under prefixes ' + str(prefixes) if prefixes is not None else ''}: " + "; ".join(problems) + ". "
            f"{keys}Was it saved from a network with the same "
            f"configuration (network_def)? To make a matching one, {how_to_make}. Or pass strict=False (in a bundle: "
            "--pretrained_strict false) to load only the matching weights."
        )

    if to_load:
        result = network.load_state_dict(to_load, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys  # selected from network.state_dict()
    logger.info(
        "%s",
        load_table(
            report,
            f"{path}: loaded {len(loaded)} tensors into {type(network).__name__} ({len(report['adapted'])} adapted, "
            f"{len(skipped) + len(report['fresh']) + len(mismatched)} skipped, {len(missing)} missing):",
        ),
    )
    if problems:
        logger.warning("%s: partial load (strict=False): %s.", path, "; ".join(problems))
    if skipped and not strict:  # strict: the table above counts them per module
        logger.warning(
            "%s: skipped checkpoint keys (not in the network or outside the prefixes): %s",
            path,
            ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""),
        )
    return report
