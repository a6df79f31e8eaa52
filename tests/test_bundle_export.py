"""Share a trained bundle: export the zip, download it over HTTP with `monai.bundle download`, run its inference in a
fresh virtual environment without medcl installed; a tampered weight file is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import BUNDLES, REPO, assert_segmentation_of
from monai.bundle import ConfigParser

from medcl.bundle.export import export_bundle
from medcl.utils import file_sha256

pytestmark = pytest.mark.slow

RUNTIME_VENV = REPO / ".venv-runtime"


def _fake_training_run(bundle: Path, phantom_dir: Path, root: Path, **overrides) -> Path:
    """A ``models/model.pt`` as a training run leaves it (weights of the bundle's network; training is tested
    elsewhere)."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"dataset_dir": str(phantom_dir), "device": "cpu", **overrides})
    (root / "models").mkdir(parents=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    return root


@pytest.mark.parametrize("name", ["scratch_baseline", "localcl_selftrain"])
def test_export_bundle_contents(name, phantom_dir, tmp_path):
    bundle = BUNDLES / name
    run = _fake_training_run(bundle, phantom_dir, tmp_path / "run", patch_size=32)
    zip_path = export_bundle(bundle, run, tmp_path / "dist", dataset_dir=phantom_dir, overrides={"patch_size": 32})
    version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    assert zip_path.name == f"{name}_v{version}.zip"
    with zipfile.ZipFile(zip_path) as z:
        names = set(z.namelist())
    for rel in (
        "configs/metadata.json",
        "configs/inference.json",
        "configs/train.json",
        "docs/README.md",
        "LICENSE",
        "models/model.pt",
        "models/model.ts",
        "large_files.yml",
        "medcl/__init__.py",
        "medcl/handlers/checkpoint_loader.py",
    ):
        assert f"{name}/{rel}" in names, rel
    assert not any("__pycache__" in n for n in names)
    stage = tmp_path / "dist" / name
    listing = ConfigParser.load_config_file(str(stage / "large_files.yml"))["large_files"]
    assert {e["path"] for e in listing} == {"models/model.pt", "models/model.ts"}
    for e in listing:
        assert e["hash_type"] == "sha256" and e["hash_val"] == file_sha256(stage / e["path"])
    baked = json.loads((stage / "configs" / "inference.json").read_text())
    assert baked["num_classes"] == 5 and baked["modality"] == "CT" and baked["patch_size"] == 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runtime_python() -> Path:
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup_runtime_venv.sh"), str(RUNTIME_VENV)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    return RUNTIME_VENV / "bin" / "python"


def test_download_and_infer_in_a_fresh_venv_without_medcl(phantom_dir, tmp_path):
    name = "localcl_selftrain"
    run = _fake_training_run(BUNDLES / name, phantom_dir, tmp_path / "run", patch_size=32)
    zip_path = export_bundle(
        BUNDLES / name, run, tmp_path / "dist", dataset_dir=phantom_dir, overrides={"patch_size": 32}
    )
    python = _runtime_python()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = subprocess.run([str(python), "-c", "import medcl"], cwd=outside, env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'medcl'" in probe.stderr  # really without medcl

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=zip_path.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/{zip_path.name}"
        for _ in range(50):  # wait until the server answers
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        dl = tmp_path / "downloaded"
        proc = subprocess.run(
            [str(python), "-m", "monai.bundle", "download", "--name", name, "--url", url, "--bundle_dir", str(dl)],
            cwd=outside,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    finally:
        server.terminate()
        server.wait(timeout=10)
    root = dl / name
    assert (root / "models" / "model.pt").is_file() and (root / "medcl").is_dir()

    infer = [
        str(python),
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--input_dir",
        str(phantom_dir / "imagesTs"),
        "--output_dir",
        "out",
        "--num_workers",
        "0",
    ]
    proc = subprocess.run(
        infer, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert_segmentation_of(root / "out", next((phantom_dir / "imagesTs").glob("*.nii.gz")), num_classes=5)

    # a weight file changed after publishing is refused before torch.load reads it
    data = bytearray((root / "models" / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (root / "models" / "model.pt").write_bytes(bytes(data))
    proc = subprocess.run(
        infer, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    assert proc.returncode != 0
    assert "model.pt: sha256" in proc.stdout and "does not match the expected" in proc.stdout
