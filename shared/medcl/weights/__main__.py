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
"""``python -m medcl.weights inspect FILE [--json]``: print the manifest of a weights file and check its sha256.

``FILE`` is the weights file (``models/pretrained.pt``) or its ``.manifest.json``. Exit status: 0 the manifest
matches the file; 1 the file has no manifest (what its tensors say is printed instead) or its sha256 differs from
the manifest's; 2 the file does not exist or cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from medcl.errors import MedclInputError
from medcl.utils.checkpoints import file_sha256
from medcl.weights.manifest import MANIFEST_SUFFIX, manifest_path, read_manifest, state_dict_facts

ORDER = (
    "file",
    "sha256",
    "size_bytes",
    "created",
    "role",
    "network",
    "spatial_dims",
    "in_channels",
    "out_channels",
    "first_conv",
    "head",
    "num_tensors",
    "pretrained_parts",
    "pretrained_from",
    "loss",
    "dataset",
    "versions",
)


def _text(manifest: dict[str, Any]) -> str:
    """The manifest as ``key: value`` lines, known keys first, nested dicts indented."""
    keys = [k for k in ORDER if k in manifest] + [k for k in manifest if k not in ORDER and k != "format"]
    width = max(len(k) for k in keys) if keys else 0
    lines = []
    for key in keys:
        value = manifest[key]
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for sub, item in value.items():
                shown = json.dumps(item) if isinstance(item, (dict, list)) else item
                lines.append(f"  {sub}: {shown}")
        else:
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def inspect(path: str, as_json: bool = False) -> int:
    """Print the manifest of ``path`` (text, or JSON with ``as_json``); return the exit status (module docstring)."""
    if path.endswith(MANIFEST_SUFFIX):
        path = path[: -len(MANIFEST_SUFFIX)]
    if not os.path.isfile(path):
        print(f"{path}: no such weights file.", file=sys.stderr)
        return 2
    try:
        manifest = read_manifest(path)
    except MedclInputError as e:
        print(str(e), file=sys.stderr)
        return 2
    if manifest is None:
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a weights file torch can read safely
            print(f"{path}: cannot read it with torch.load(weights_only=True): {e}", file=sys.stderr)
            return 2
        sd = obj.get("model", obj) if isinstance(obj, dict) else {}
        facts = state_dict_facts(sd if isinstance(sd, dict) else {})
        print(
            f"{path}: no manifest ({manifest_path(path)} does not exist; medcl writes one beside every weights file "
            "it saves). What the tensors say:",
            file=sys.stderr,
        )
        print(json.dumps({"file": os.path.basename(path), "sha256": file_sha256(path), **facts}, indent=2))
        return 1
    actual = file_sha256(path)
    ok = actual.lower() == str(manifest.get("sha256", "")).lower()
    print(json.dumps(manifest, indent=2) if as_json else _text(manifest))
    if not ok:
        print(
            f"{path}: sha256 {actual} does not match the manifest ({manifest.get('sha256')}): the file is not the one "
            "the manifest describes. Copy the weights and the manifest together from the same run.",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m medcl.weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("inspect", help="print the manifest of a weights file and check its sha256")
    cmd.add_argument("file", help="the weights file (e.g. models/pretrained.pt) or its .manifest.json")
    cmd.add_argument("--json", action="store_true", help="print the manifest as JSON")
    args = parser.parse_args(argv)
    return inspect(args.file, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
