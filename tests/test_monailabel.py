"""The scratch_baseline bundle as a MONAI Label model: a real server (scripts/start_monailabel.sh) on a tiny phantom.

Checks, over HTTP: /info/ lists the model and its labels; /infer/<model> returns a label volume on the image's grid;
/datastore/label stores a submitted label; /train/<model> trains on the labelled studies and writes checkpoints that
the next inference uses. Needs the separate MONAI Label venv made by scripts/setup_monailabel.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import BUNDLES, REPO

MONAILABEL = REPO / ".venv-monailabel" / "bin" / "monailabel"
MODEL = "scratch_baseline"
LABELS = ["liver", "spleen", "kidneys", "pancreas"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not MONAILABEL.exists(), reason=f"no MONAI Label venv ({MONAILABEL}); run scripts/setup_monailabel.sh"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(
    url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None, timeout: float = 120
):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def _multipart(field: str, path: Path) -> tuple[bytes, dict]:
    """A multipart/form-data body with one file field (what FastAPI's UploadFile parameters read)."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{path.name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _studies(tmp: Path) -> tuple[Path, Path]:
    """A 4-case 32³ phantom in MSD layout and MONAI Label's studies folder made from it: all four images at the top
    level, the labels of the first three in labels/final/ under the images' file names (case 3 is left to annotate)."""
    from medcl.data.phantom import generate_dataset

    dataset = tmp / "phantom"
    generate_dataset(str(dataset), n=4, n_test=0, seed=0, shape=(32, 32, 32))
    studies = tmp / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, image in enumerate(sorted((dataset / "imagesTr").glob("*.nii.gz"))):
        shutil.copy(image, studies / image.name)
        if i < 3:
            shutil.copy(dataset / "labelsTr" / image.name, studies / "labels" / "final" / image.name)
    return dataset, studies


def _random_checkpoint(dataset: Path, out: Path) -> Path:
    """models/model.pt of an untrained network_def (enough to serve; the test trains it later)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / MODEL / "configs" / "inference.json"))
    parser["dataset_dir"] = str(dataset)
    torch.save(parser.get_parsed_content("network_def").state_dict(), out)
    return out


def _check_label_volume(data: bytes, image: Path, out: Path) -> None:
    import nibabel as nib
    import numpy as np

    out.write_bytes(data)
    pred, ref = nib.load(str(out)), nib.load(str(image))
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-4)
    values = np.unique(np.asarray(pred.dataobj))
    assert np.all(values == np.round(values)) and values.min() >= 0 and values.max() <= len(LABELS), values


def test_monailabel_serves_infers_and_trains_scratch_baseline(tmp_path):
    dataset, studies = _studies(tmp_path)
    checkpoint = _random_checkpoint(dataset, tmp_path / "model.pt")
    app, port = tmp_path / "app", _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        "bash",
        str(REPO / "scripts" / "start_monailabel.sh"),
        "--app",
        str(app),
        "--studies",
        str(studies),
        "--bundle",
        MODEL,
        "--model",
        str(checkpoint),
        "--dataset",
        str(dataset),
        "--port",
        str(port),
        # tiny volumes, 2 CPU cores: no loader workers, 32² patches, 4 iterations an epoch
        "--set",
        "num_workers=0",
        "--set",
        "patch_size=[32,32,32]",
        "--set",
        "epoch_length=4",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log_tail() -> str:
        log.flush()
        return (tmp_path / "server.log").read_text()[-4000:]

    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, f"server exited with {server.returncode}:\n{log_tail()}"
            try:
                status, body = _request(f"{url}/info/", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.time() < deadline, f"no answer from {url} in 180 s:\n{log_tail()}"
                time.sleep(1)

        # /info/: the bundle is an inference model and a trainer, with metadata.json's channel names
        info = json.loads(body)
        assert status == 200
        assert MODEL in info["models"] and MODEL in info["trainers"], log_tail()
        assert info["models"][MODEL]["labels"] == {name: i + 1 for i, name in enumerate(LABELS)}
        assert set(LABELS) <= set(info["labels"])

        # /infer/<model>?image=<id>: a label map on the unlabelled image's grid, values 0..4
        image_id, image = "phantomabdomen_003", studies / "phantomabdomen_003.nii.gz"
        status, data = _request(f"{url}/infer/{MODEL}?image={image_id}&output=image", method="POST")
        assert status == 200, log_tail()
        _check_label_volume(data, image, tmp_path / "pred_before.nii.gz")

        # PUT /datastore/label?image=<id>: an annotator's label becomes the final label of that image
        body, headers = _multipart("label", dataset / "labelsTr" / image.name)
        status, data = _request(
            f"{url}/datastore/label?image={image_id}&tag=final", method="PUT", data=body, headers=headers
        )
        assert status == 200 and json.loads(data)["image"] == image_id
        assert (studies / "labels" / "final" / image.name).exists()
        status, data = _request(f"{url}/datastore/?output=stats")
        assert json.loads(data)["label_tags"]["final"] == 4

        # POST /train/<model>: 2 epochs on the 4 labelled cases (3 train / 1 val; validation every 2 epochs)
        models = app / "model" / MODEL / "models"
        before = (models / "model.pt").read_bytes()
        params = json.dumps({"max_epochs": 2, "device": "cpu", "multi_gpu": False, "val_split": 0.25}).encode()
        status, data = _request(
            f"{url}/train/{MODEL}", method="POST", data=params, headers={"Content-Type": "application/json"}
        )
        assert status == 200 and json.loads(data)["status"] in ("SUBMITTED", "RUNNING")
        deadline = time.time() + 180
        while True:
            task = json.loads(_request(f"{url}/train/")[1])
            if task["status"] not in ("SUBMITTED", "RUNNING"):
                break
            assert time.time() < deadline, f"training still running after 180 s:\n{log_tail()}"
            time.sleep(2)
        details = "\n".join(task.get("details", []))
        assert task["status"] == "DONE", f"{task['status']}:\n{details}\n{log_tail()}"
        log.flush()
        assert "Total Records for Training: 3" in (tmp_path / "server.log").read_text()
        assert (models / "model_final.pt").exists(), details
        assert (models / "model.pt").read_bytes() != before, "validation did not save a new best model.pt"

        # the trained model.pt serves the next inference
        status, data = _request(f"{url}/infer/{MODEL}?image={image_id}&output=image", method="POST")
        assert status == 200, log_tail()
        _check_label_volume(data, image, tmp_path / "pred_after.nii.gz")
    finally:
        # the server and its training subprocess share the process group that start_new_session made
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
