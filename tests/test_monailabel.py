"""All four bundles as MONAI Label models: one real server (scripts/start_monailabel.sh) on a tiny phantom, on loopback.

One server for the module serves macl, mixcl, localcl_selftrain and scratch_baseline (a 5-case 32³ phantom: three
studies labelled, two to annotate; the dataset's label names differ from the bundles' metadata). Over HTTP:

- /info/ shows the dataset's label names and each run's dimension (a 3D scratch_baseline reports 3), and lists a
  model once it has weights; /infer answers a model without weights with 404, weights that do not fit the served
  config with 409, a run state as model_filename with 400, each with a one-line reason;
- every /train changes what /infer serves: macl from the pre-training checkpoint, then from its served model (the
  pre-trained weights are not re-applied), mixcl from random init (no served model, no pre-training checkpoint) with
  a warning and its val_interval 10 lowered to the requested epoch, localcl_selftrain with a self-training round that
  pseudo-labels the one unlabelled study and not the one just labelled, scratch_baseline from its served model
  with no validation study (val_split 0);
- run_state.pt is never offered as a model; a restart keeps the weights trained in MONAI Label;
- a requested pre-training that fails (macl's 32² patches are too small for it) ends with one message, no weights
  file changed (the pre-training that works: tests/test_monailabel_unlabelled.py).

The helper's own tests (no server): the self-training schedule fitted into the requested epochs, and the
preparation step of start_monailabel.sh (kept weights, per-bundle --set). Needs the separate MONAI Label venv made
by scripts/setup_monailabel.sh for the server tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import BUNDLES, REPO

MONAILABEL = REPO / ".venv-monailabel" / "bin" / "monailabel"
ALL = ["scratch_baseline", "macl", "mixcl", "localcl_selftrain"]  # --model goes to the first
# the dataset's names (dataset.json), not the phantom's liver/spleen/kidneys/pancreas of the bundles' metadata.json
LABELS = ["hepar", "lien", "renes", "glandula"]
TO_LABEL, UNLABELLED = "phantomabdomen_003", "phantomabdomen_004"

needs_monailabel = pytest.mark.skipif(
    not MONAILABEL.exists(), reason=f"no MONAI Label venv ({MONAILABEL}); run scripts/setup_monailabel.sh"
)


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


def _params(**params) -> dict:
    """/infer's ``params`` form field (MONAI Label reads model_filename and other options from it, not the query)."""
    body = urllib.parse.urlencode({"params": json.dumps(params)}).encode()
    return {"data": body, "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


def _error(url: str, method: str = "POST", **kwargs) -> tuple[int, str]:
    """The HTTP error status and ``detail`` of a request that must fail."""
    with pytest.raises(urllib.error.HTTPError) as e:
        _request(url, method=method, **kwargs)
    body = e.value.read().decode()
    try:
        detail = json.loads(body).get("detail", body)
    except ValueError:
        detail = body
    return e.value.code, str(detail)


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


def _studies(tmp: Path, n: int = 5, labelled: int = 3) -> tuple[Path, Path]:
    """An ``n``-case 32³ phantom in MSD layout, its dataset.json label names replaced by :data:`LABELS`, and MONAI
    Label's studies folder made from it: all images at the top level, the labels of the first ``labelled`` in
    labels/final/."""
    from medcl.data.phantom import generate_dataset

    dataset = tmp / "phantom"
    generate_dataset(str(dataset), n=n, n_test=0, seed=0, shape=(32, 32, 32))
    meta = json.loads((dataset / "dataset.json").read_text())
    meta["labels"] = {"0": "background", **{str(i + 1): name for i, name in enumerate(LABELS)}}
    (dataset / "dataset.json").write_text(json.dumps(meta, indent=2))
    studies = tmp / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, image in enumerate(sorted((dataset / "imagesTr").glob("*.nii.gz"))):
        shutil.copy(image, studies / image.name)
        if i < labelled:
            shutil.copy(dataset / "labelsTr" / image.name, studies / "labels" / "final" / image.name)
    return dataset, studies


def _network(bundle: str, dataset: Path, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    parser["dataset_dir"] = str(dataset)
    for k, v in overrides.items():
        parser[k] = v
    return parser.get_parsed_content("network_def")


def _state(path: Path) -> dict:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)


class Server:
    """scripts/start_monailabel.sh serving ``bundles`` (all four by default) on an ``n``-study datastore with
    ``labelled`` final labels, with the HTTP calls the tests make."""

    def __init__(self, tmp: Path, bundles: list[str] = ALL, n: int = 5, labelled: int = 3, sets: tuple = ()):
        self.tmp, self.bundles, self.sets = tmp, list(bundles), list(sets)
        self.dataset, self.studies = _studies(tmp, n, labelled)
        self.app, self.port = tmp / "app", _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "server.log"
        self.proc = None
        self.log = None
        self.task: dict = {}  # the last /train task (GET /train/)

    def models(self, bundle: str) -> Path:
        return self.app / "model" / bundle / "models"

    def command(self, *extra: str) -> list[str]:
        sets = [
            "num_workers=0",
            "patch_size=[32,32,32]",
            "epoch_length=2",
            "scratch_baseline:spatial_dims=3",
            # a tiny UNETR for MixCL (its defaults: 768 hidden, 12 heads)
            "mixcl:hidden_size=32",
            "mixcl:num_heads=2",
            "mixcl:mlp_dim=64",
            "mixcl:feature_size=8",
            "localcl_selftrain:use_crf=false",
            *self.sets,
        ]
        cmd = ["bash", str(REPO / "scripts" / "start_monailabel.sh"), "--app", str(self.app)]
        cmd += ["--studies", str(self.studies), "--dataset", str(self.dataset), "--bundle", ",".join(self.bundles)]
        cmd += ["--port", str(self.port), *extra]
        for s in sets:
            if ":" not in s.split("=")[0] or s.split(":")[0] in self.bundles:
                cmd += ["--set", s]
        return cmd

    def start(self, *extra: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            self.command(*extra), stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.time() + 180
        while True:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.tail()}"
            try:
                self.info()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.time() < deadline, f"no answer from {self.url} in 180 s:\n{self.tail()}"
                time.sleep(1)

    def stop(self) -> None:
        # the server and its training subprocess share the process group that start_new_session made
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None

    def tail(self, n: int = 4000) -> str:
        if self.log is not None:
            self.log.flush()
        return self.log_path.read_text()[-n:]

    def info(self) -> dict:
        return json.loads(_request(f"{self.url}/info/", timeout=5)[1])

    def infer(self, bundle: str, image: str = TO_LABEL, out: Path | None = None) -> bytes:
        status, data = _request(f"{self.url}/infer/{bundle}?image={image}&output=image", method="POST")
        assert status == 200, self.tail()
        _check_label_volume(data, self.studies / f"{image}.nii.gz", out or self.tmp / f"pred_{bundle}.nii.gz")
        return data

    def train(self, bundle: str, epochs: int, expect: str = "DONE", **params) -> str:
        """POST /train/<bundle>, wait for the task to end; assert its status (``expect``) and return the server log
        of the run (the task's details keep only its last lines)."""
        self.log.flush()
        start = self.log_path.stat().st_size
        body = {"max_epochs": epochs, "device": "cpu", "multi_gpu": False, "val_split": 0.25, **params}
        status, data = _request(
            f"{self.url}/train/{bundle}",
            method="POST",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert status == 200 and json.loads(data)["status"] in ("SUBMITTED", "RUNNING"), data
        deadline = time.time() + 240
        while True:
            task = json.loads(_request(f"{self.url}/train/")[1])
            if task["status"] not in ("SUBMITTED", "RUNNING"):
                break
            assert time.time() < deadline, f"training still running after 240 s:\n{self.tail()}"
            time.sleep(1)
        self.task = task
        details = "\n".join(task.get("details", []))
        assert task["status"] == expect, f"{bundle}: {task['status']}:\n{details[-6000:]}\n{self.tail()}"
        self.log.flush()
        with open(self.log_path) as f:
            f.seek(start)
            return f.read()


def _check_label_volume(data: bytes, image: Path, out: Path) -> None:
    import nibabel as nib
    import numpy as np

    out.write_bytes(data)
    pred, ref = nib.load(str(out)), nib.load(str(image))
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-4)
    values = np.unique(np.asarray(pred.dataobj))
    assert np.all(values == np.round(values)) and values.min() >= 0 and values.max() <= len(LABELS), values


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    tmp = tmp_path_factory.mktemp("monailabel")
    srv = Server(tmp)
    # scratch_baseline: untrained 3D weights to serve (the app's config is made 3D with --set); a 2D checkpoint
    # beside it for the mismatch check
    torch.save(_network("scratch_baseline", srv.dataset, spatial_dims=3).state_dict(), tmp / "model.pt")
    models = srv.models("scratch_baseline")
    models.mkdir(parents=True)
    torch.save(_network("scratch_baseline", srv.dataset, spatial_dims=2).state_dict(), models / "model_2d.pt")
    # macl: a pre-training checkpoint (a BasicUNet's weights) and no served model; mixcl, localcl: nothing
    srv.models("macl").mkdir(parents=True)
    torch.save({"model": _network("macl", srv.dataset).state_dict()}, srv.models("macl") / "pretrained.pt")
    try:
        srv.start("--model", str(tmp / "model.pt"))
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
@needs_monailabel
def test_info_shows_the_dataset_labels_and_each_runs_dimension(server):
    info = server.info()
    expected = {name: i + 1 for i, name in enumerate(LABELS)}
    assert set(ALL) <= set(info["trainers"]), info["trainers"].keys()
    # a model is listed once it has weights: scratch_baseline (--model), not the others yet
    assert "scratch_baseline" in info["models"] and "macl" not in info["models"], info["models"].keys()
    scratch = info["models"]["scratch_baseline"]
    assert scratch["labels"] == expected and scratch["dimension"] == 3, scratch
    assert info["labels"] == LABELS
    assert scratch["config"]["model_filename"] == ["model.pt", "model_2d.pt"]
    assert info["trainers"]["macl"]["config"]["model_filename"] == []  # pretrained.pt is no segmentation model


@pytest.mark.slow
@needs_monailabel
def test_infer_answers_a_missing_or_mismatched_model_with_a_4xx_and_a_reason(server):
    status, detail = _error(f"{server.url}/infer/macl?image={TO_LABEL}&output=image")
    assert status == 404 and "macl has no trained model yet" in detail and "POST /train/macl" in detail, detail
    # a 2D checkpoint on the 3D-configured scratch_baseline: what differs and the --set that fixes it
    url = f"{server.url}/infer/scratch_baseline?image={TO_LABEL}&output=image"
    status, detail = _error(url, **_params(model_filename="model_2d.pt"))
    assert status == 409, detail
    assert "spatial_dims 2, the config 3" in detail and "--set scratch_baseline:spatial_dims=2" in detail, detail
    assert "\n" not in detail
    status, detail = _error(url, **_params(model_filename="run_state.pt"))
    assert status == 400 and "not a segmentation checkpoint" in detail, detail
    # the served model itself still works
    server.infer("scratch_baseline")


def _distance(a: dict, b: dict, keys: list[str]) -> float:
    return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in keys) ** 0.5


@pytest.mark.slow
@needs_monailabel
def test_macl_trains_from_pretraining_then_from_its_served_model(server, tmp_path):
    from medcl.networks.macl import pretrained_prefixes

    models = server.models("macl")
    assert _error(f"{server.url}/infer/macl?image={TO_LABEL}&output=image")[0] == 404

    # first /train: no served model, so the pre-training checkpoint initialises the network
    details = server.train("macl", 2)
    assert "no served model: initialising from the pre-training checkpoint" in details, details[-4000:]
    first = (models / "model.pt").read_bytes()
    server.infer("macl", out=tmp_path / "first.nii.gz")  # was 404: the trained model serves without a restart
    assert server.info()["models"]["macl"]["dimension"] == 2

    # second /train: from the served model.pt; pretrained.pt is not applied again
    details = server.train("macl", 2)
    assert "training from the served model model.pt; pre-trained weights are not applied" in details, details[-4000:]
    assert (models / "model.pt").read_bytes() != first
    server.infer("macl", out=tmp_path / "second.nii.gz")
    (tmp_path / "first.pt").write_bytes(first)
    pre, w1, w2 = _state(models / "pretrained.pt"), _state(tmp_path / "first.pt"), _state(models / "model.pt")
    prefixes = pretrained_prefixes(_network("macl", server.dataset))
    keys = [
        k
        for k, v in w2.items()
        if v.is_floating_point() and "running_" not in k and any(k == p or k.startswith(p + ".") for p in prefixes)
    ]
    # fine-tuning went on from the first run (re-applying pretrained.pt would restart the encoder from it, as far
    # from it after the second run as after the first)
    assert keys and _distance(w2, pre, keys) > 1.2 * _distance(w1, pre, keys), (
        _distance(w1, pre, keys),
        _distance(w2, pre, keys),
    )

    # run_state.pt (written by both runs) is never a model to choose
    assert (models / "run_state.pt").exists()
    info = server.info()
    assert info["models"]["macl"]["config"]["model_filename"] == ["model.pt", "model_final.pt"]
    assert info["trainers"]["macl"]["config"]["model_filename"] == ["model.pt", "model_final.pt"]
    details = server.train("macl", 1, expect="ERROR", model_filename="run_state.pt")
    assert "model_filename run_state.pt is not a segmentation checkpoint" in details, details[-4000:]


@pytest.mark.slow
@needs_monailabel
def test_a_failed_pretraining_ends_with_one_message_and_keeps_the_weights(server):
    # macl's 2D views are scaled by 0.25 before a 4-level BasicUNet: the app's 32² patches are too small for it
    models = server.models("macl")
    before = {p: p.read_bytes() for p in models.glob("*.pt")}
    server.train("macl", 1, expect="ERROR", pretrain=True, pretrain_epochs=1)
    last = list(server.task["details"])[-1]
    assert "macl: pre-training failed: RuntimeError: " in last and "Output size is too small" in last, last
    assert "--set macl:patch_size=[...]" in last and "model.pt is unchanged, pretrained.pt unchanged" in last, last
    assert {p: p.read_bytes() for p in models.glob("*.pt")} == before


@pytest.mark.slow
@needs_monailabel
def test_mixcl_trains_from_random_init_and_validates_on_its_only_epoch(server):
    models = server.models("mixcl")
    assert not (models / "pretrained.pt").exists()
    assert _error(f"{server.url}/infer/mixcl?image={TO_LABEL}&output=image")[0] == 404
    details = server.train("mixcl", 1)
    assert "no served model and no pre-training checkpoint" in details and "training from random init" in details
    assert "val_interval 10 > 1 epochs: validating every 1 epochs" in details, details[-4000:]
    assert (models / "model.pt").exists() and (models / "model_final.pt").exists()
    server.infer("mixcl")
    assert server.info()["models"]["mixcl"]["dimension"] == 3


@pytest.mark.slow
@needs_monailabel
def test_localcl_rounds_follow_the_requested_epochs_and_skip_labelled_studies(server):
    # the annotator labels TO_LABEL; UNLABELLED stays the only study without a final label
    body, headers = _multipart("label", server.dataset / "labelsTr" / f"{TO_LABEL}.nii.gz")
    status, data = _request(
        f"{server.url}/datastore/label?image={TO_LABEL}&tag=final", method="PUT", data=body, headers=headers
    )
    assert status == 200 and json.loads(data)["image"] == TO_LABEL

    models = server.models("localcl_selftrain")
    assert _error(f"{server.url}/infer/localcl_selftrain?image={UNLABELLED}&output=image")[0] == 404
    details = server.train("localcl_selftrain", 2)
    assert "self-training plan for 2 epochs: 1 baseline + 1 round(s) x 1" in details, details[-4000:]
    assert f"pool of 1 unlabelled studies: {UNLABELLED}.nii.gz" in details, details[-4000:]
    round1 = sorted(p.name for p in (models / "pseudo_labels" / "round1").glob("*.nii.gz"))
    assert round1 == [f"{UNLABELLED}_pseudo.nii.gz"], round1
    # the round trained with its pseudo-labels: the local contrastive loss is no longer 0 in epoch 2
    losses = re.findall(r"Epoch\[(\d)\] Metrics -- .*?loss_local: ([0-9.]+)", details)
    assert dict(losses).get("1") == "0.0000" and float(dict(losses).get("2", 0)) > 0, losses
    rounds = json.loads((models / "pseudo_labels" / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1] and rounds[0]["num_volumes"] == 1, rounds
    server.infer("localcl_selftrain", image=UNLABELLED)


@pytest.mark.slow
@needs_monailabel
def test_scratch_baseline_train_changes_the_served_model(server, tmp_path):
    models = server.models("scratch_baseline")
    before = _state(models / "model.pt")
    server.infer("scratch_baseline", out=tmp_path / "before.nii.gz")
    # val_split 0: no validation study; the training studies validate, so model.pt is still rewritten
    details = server.train("scratch_baseline", 1, val_split=0.0)
    assert "val_interval 2 > 1 epochs: validating every 1 epochs" in details, details[-4000:]
    assert re.search(r"no validation study \(\d labelled, val_split too small\): validating on the training", details)
    after = _state(models / "model.pt")
    assert any(not (before[k] == after[k]).all() for k in before), "the served model did not change"
    server.infer("scratch_baseline", out=tmp_path / "after.nii.gz")
    assert "Reload model from cache" in server.tail(20000)  # /infer loaded the new model.pt


@pytest.mark.slow
@needs_monailabel
def test_restart_keeps_the_weights_trained_in_monailabel(server):
    weights = {p: p.read_bytes() for p in sorted(server.app.glob("model/*/models/*.pt"))}
    trained = {p.parent.parent.name for p in weights if p.name == "model.pt"}
    server.stop()
    server.start()  # no --model: nothing replaces the served models
    assert {p: p.read_bytes() for p in weights} == weights
    assert trained <= set(server.info()["models"]), (trained, server.info()["models"].keys())
    for bundle in sorted(trained & {"macl", "scratch_baseline"}):
        server.infer(bundle)


# --- without a server ----------------------------------------------------------------------------------------------


def test_self_training_schedule_fits_the_requested_epochs():
    from medcl.errors import MedclInputError
    from medcl.handlers.self_training import scale_schedule, total_epochs

    assert scale_schedule(145, 3, 15, 145) == (100, 3, 15)  # the bundle's own plan
    assert scale_schedule(2, 3, 15, 145) == (1, 1, 1)
    assert scale_schedule(10, 3, 15, 145) == (7, 3, 1)
    assert scale_schedule(1, 3, 15, 145) == (1, 0, 15)  # no room for a round
    assert scale_schedule(6, 0, 15, 145) == (6, 0, 15)
    for epochs in range(1, 300):
        baseline, rounds, per = scale_schedule(epochs, 3, 15, 145)
        assert baseline >= 1 and 0 <= rounds <= 3 and 1 <= per <= 15
        assert total_epochs(baseline, rounds, per) == epochs
    with pytest.raises(MedclInputError):
        scale_schedule(0, 3, 15, 145)


@pytest.mark.slow
@needs_monailabel
def test_start_script_keeps_weights_and_sets_per_bundle_keys(tmp_path):
    script, app = REPO / "scripts" / "start_monailabel.sh", tmp_path / "app"
    base = ["bash", str(script), "--app", str(app), "--studies", str(tmp_path / "studies")]
    base += ["--bundle", "macl,scratch_baseline", "--no-start"]
    subprocess.run([*base, "--phantom", "2", "--set", "scratch_baseline:spatial_dims=3"], check=True)
    dims = {
        b: json.loads((app / "model" / b / "configs" / "inference.json").read_text())["spatial_dims"]
        for b in ("macl", "scratch_baseline")
    }
    assert dims == {"macl": 2, "scratch_baseline": 3}
    trained = app / "model" / "macl" / "models" / "model.pt"
    trained.write_bytes(b"weights trained in MONAI Label")
    again = [*base, "--dataset", str(tmp_path / "studies.phantom")]
    res = subprocess.run(again, check=True, capture_output=True, text=True)
    assert trained.read_bytes() == b"weights trained in MONAI Label" and "keeping the weights" in res.stderr
    res = subprocess.run([*again, "--set", "nosuch:spatial_dims=3"], capture_output=True, text=True)
    assert res.returncode != 0 and "nosuch is not one of the served bundles" in res.stderr
