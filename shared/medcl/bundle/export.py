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
"""
A trained medcl bundle as a shareable, self-contained ``<name>_v<version>.zip`` (a pretrained-weights bundle).

The zip holds one folder ``<name>/`` with ``configs/``, ``docs/``, ``LICENSE``, ``models/model.pt`` (and
``models/pretrained.pt`` when the run has one), the TorchScript ``models/model.ts`` (``monai.bundle ckpt_export``),
``large_files.yml`` (each weight's URL placeholder and sha256) and a copy of the ``medcl`` library the configs import,
so it runs without installing medcl. ``configs/inference.json`` gets the values the training run used
(``num_classes``, ``modality`` from its ``dataset.json``, and the given overrides such as ``patch_size``) written in,
so inference needs only ``--input_dir``. Run it from inside the extracted folder (the model-zoo convention:
``bundle_root`` is ``.``, and ``python -m`` puts the working folder on ``sys.path``, where ``medcl/`` is)::

    python -m monai.bundle download --name localcl_selftrain --url <url of the zip> --bundle_dir bundles_dl
    cd bundles_dl/localcl_selftrain
    python -m monai.bundle run --config_file configs/inference.json --input_dir /path/to/niftis --output_dir out

Loading ``models/model.pt`` checks its sha256 against ``large_files.yml`` first
(:class:`medcl.handlers.SafeCheckpointLoader`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser, ckpt_export

from medcl.bundle import verify_metadata_offline
from medcl.data import as_patch_size, read_dataset_info
from medcl.errors import MedclInputError
from medcl.utils.checkpoints import file_sha256, require_checkpoint
from medcl.weights.manifest import MANIFEST_SUFFIX

__all__ = ["export_bundle"]

logger = logging.getLogger(__name__)

WEIGHTS = ("model.pt", "pretrained.pt")
URL_PLACEHOLDER = "https://REPLACE-WITH-THE-RELEASE-URL/{name}_v{version}/{file}"


def _copy_library(dst: Path) -> None:
    import medcl

    src = Path(medcl.__file__).resolve().parent
    shutil.copytree(src, dst / "medcl", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _bake_inference(config: Path, values: Mapping[str, Any]) -> None:
    """Write ``values`` into the exported ``inference.json`` (top-level keys, as ``--key value`` would set them)."""
    data = json.loads(config.read_text())
    data.update(values)
    config.write_text(json.dumps(data, indent=4) + "\n")


def _export_torchscript(stage: Path, shape: list[int]) -> str:
    """``models/model.ts`` by scripting; by tracing at the metadata's input shape when scripting fails."""
    common = dict(
        net_id="network_def",
        filepath=str(stage / "models" / "model.ts"),
        ckpt_file=str(stage / "models" / "model.pt"),
        meta_file=str(stage / "configs" / "metadata.json"),
        config_file=str(stage / "configs" / "inference.json"),
        bundle_root=str(stage),
        device="cpu",
    )
    try:
        ckpt_export(**common)
        return "script"
    except Exception as e:  # a network that TorchScript cannot script (every medcl bundle network scripts today)
        logger.info("torch.jit.script failed (%s); tracing at input shape %s instead.", type(e).__name__, shape)
        ckpt_export(**common, use_trace=True, input_shape=[1, 1, *shape])
        return "trace"


def export_bundle(
    bundle: str | os.PathLike,
    trained_root: str | os.PathLike,
    out_dir: str | os.PathLike = "dist",
    dataset_dir: str | os.PathLike | None = None,
    url: str = URL_PLACEHOLDER,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """
    Make ``<out_dir>/<name>_v<version>.zip`` from a bundle's source folder and a training run's ``models/``.

    Args:
        bundle: the bundle's source folder (``bundles/<name>``); ``<name>`` is its folder name.
        trained_root: the ``--bundle_root`` of the training run (its ``models/model.pt``; ``models/pretrained.pt``
            is shipped too when present).
        out_dir: where the zip (and a staging folder ``<out_dir>/<name>/``) go.
        dataset_dir: the dataset trained on (its ``dataset.json`` gives ``num_classes`` and ``modality``); None:
            the bundle's default ``dataset_dir``.
        url: URL pattern written to ``large_files.yml`` per weight file (``{name}``, ``{version}``, ``{file}``
            are filled in); replace it with the real release address before publishing.
        overrides: other inference settings the training run used (e.g. ``{"patch_size": 32}``), written into the
            exported ``configs/inference.json``.

    Returns:
        the zip's path.

    Raises:
        MedclInputError: when ``models/model.pt`` is missing from ``trained_root`` or the metadata is invalid.
    """
    bundle, trained_root, out_dir = Path(bundle), Path(trained_root), Path(out_dir)
    name = bundle.name
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    version = meta["version"]
    if version not in meta.get("changelog", {}):
        raise MedclInputError(f"{bundle}/configs/metadata.json: version {version} has no changelog entry.")
    require_checkpoint(
        str(trained_root / "models" / "model.pt"),
        f"train the bundle with --bundle_root {trained_root}",
        "trained checkpoint",
        "trained_root",
    )
    verify_metadata_offline(bundle / "configs" / "metadata.json")

    stage = out_dir / name
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(bundle / "configs", stage / "configs")
    shutil.copytree(bundle / "docs", stage / "docs")
    shutil.copy2(bundle / "LICENSE", stage / "LICENSE")
    _copy_library(stage)
    (stage / "models").mkdir()
    shipped = [f for f in WEIGHTS if (trained_root / "models" / f).is_file()]
    for f in shipped:
        shutil.copy2(trained_root / "models" / f, stage / "models" / f)
        side = trained_root / "models" / (f + MANIFEST_SUFFIX)  # medcl.weights manifest: travels with its weights
        if side.is_file():
            shutil.copy2(side, stage / "models" / side.name)

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    if dataset_dir is not None:
        parser["dataset_dir"] = str(dataset_dir)
    else:
        parser["bundle_root"] = str(bundle)
    info = read_dataset_info(parser.get_parsed_content("dataset_dir"))
    _bake_inference(
        stage / "configs" / "inference.json",
        {"num_classes": info.num_classes, "modality": info.modality, "dataset_dir": None, **(overrides or {})},
    )

    shape = [int(s) for s in meta["network_data_format"]["inputs"]["image"]["spatial_shape"]]
    if overrides and "patch_size" in overrides:
        shape = list(as_patch_size(overrides["patch_size"], len(shape)))
    how = _export_torchscript(stage, shape)
    files = [*(f"models/{f}" for f in shipped), "models/model.ts"]
    entries = [
        {
            "path": f,
            "url": url.format(name=name, version=version, file=os.path.basename(f)),
            "hash_val": file_sha256(stage / f),
            "hash_type": "sha256",
        }
        for f in files
    ]
    ConfigParser.export_config_file(
        {"large_files": entries}, str(stage / "large_files.yml"), fmt="yaml", sort_keys=False
    )

    zip_path = out_dir / f"{name}_v{version}.zip"
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".zip.tmp")
    os.close(fd)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                z.write(path, Path(name) / path.relative_to(stage))
    os.replace(tmp, zip_path)
    logger.info(
        "%s: %s v%s with %s, TorchScript by %s, %.1f MiB",
        zip_path,
        name,
        version,
        ", ".join(files),
        how,
        zip_path.stat().st_size / 2**20,
    )
    return zip_path
