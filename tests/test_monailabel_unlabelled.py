"""Unlabelled studies in MONAI Label (issue 16 item 5): one real server (scripts/start_monailabel.sh) on loopback.

The server serves macl and localcl_selftrain on an 8-study datastore (32³ phantom) that starts with no label at all;
macl has a served model.pt and a pretrained.pt. In file order:

- a training request with no labelled study: a queued ``/train`` ends ``ERROR`` with one message (label a study
  first) as the task's last line, a synchronous one (``run_sync=true``) answers 409 with it; no model file changes;
- two studies are labelled (``PUT /datastore/label``); a ``/train`` of localcl_selftrain writes pseudo-labels for
  exactly the six unlabelled studies;
- ``"pretrain": true`` on macl pre-trains on all eight datastore images (pretrained.pt and its manifest, which
  counts them), then fine-tunes from the new pre-trained weights: model.pt changes and serves; on a bundle without
  pre-training the option is refused with 400.

Needs the MONAI Label venv made by scripts/setup_monailabel.sh (skipped without it); marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_monailabel import Server, _error, _multipart, _network, _request, needs_monailabel

N, LABELLED = 8, ["phantomabdomen_000", "phantomabdomen_001"]
UNLABELLED = [f"phantomabdomen_{i:03d}" for i in range(2, N)]
BUNDLES = ["macl", "localcl_selftrain", "mixcl"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    tmp = tmp_path_factory.mktemp("monailabel_unlabelled")
    # MACL pre-training downscales its 2D views by 0.25 before a 4-level BasicUNet: 32² patches end at 0 pixels
    srv = Server(tmp, bundles=BUNDLES, n=N, labelled=0, sets=("macl:patch_size=[64,64,64]",))
    # macl: a served model (--model) and a pre-training checkpoint, both untrained BasicUNet weights
    torch.save(_network("macl", srv.dataset).state_dict(), tmp / "model.pt")
    srv.models("macl").mkdir(parents=True)
    torch.save({"model": _network("macl", srv.dataset).state_dict()}, srv.models("macl") / "pretrained.pt")
    try:
        srv.start("--model", str(tmp / "model.pt"))
        yield srv
    finally:
        srv.stop()


def _weights(srv: Server) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(srv.app.glob("model/*/models/**/*")) if p.is_file()}


def _label(srv: Server, ids: list[str]) -> None:
    """Save the phantom's label of each study as its final label, as an annotator would (PUT /datastore/label)."""
    for image in ids:
        if (srv.studies / "labels" / "final" / f"{image}.nii.gz").exists():
            continue
        body, headers = _multipart("label", srv.dataset / "labelsTr" / f"{image}.nii.gz")
        url = f"{srv.url}/datastore/label?image={image}&tag=final"
        status, data = _request(url, method="PUT", data=body, headers=headers)
        assert status == 200 and json.loads(data)["image"] == image


@pytest.mark.slow
@needs_monailabel
def test_training_without_a_labelled_study_is_refused_with_one_message(server):
    before = _weights(server)
    assert any(p.name == "model.pt" for p in before)
    # queued (what clients send): the task ends ERROR, its last line the message, no traceback
    server.train("localcl_selftrain", 2, expect="ERROR")
    last = list(server.task["details"])[-1]
    assert "localcl_selftrain: the datastore has no labelled study (8 image(s), none with a final label)" in last
    assert "Label a study first" in last and "Nothing was trained or overwritten" in last, last
    assert not any("Traceback" in line for line in server.task["details"]), server.task["details"]
    # synchronous: the request itself answers 409 with the message, before any pre-training
    body = json.dumps({"max_epochs": 1, "device": "cpu", "pretrain": True}).encode()
    status, detail = _error(
        f"{server.url}/train/macl?run_sync=true", data=body, headers={"Content-Type": "application/json"}
    )
    assert status == 409 and "macl: the datastore has no labelled study" in detail, detail
    assert _weights(server) == before


@pytest.mark.slow
@needs_monailabel
def test_selftraining_pseudo_labels_exactly_the_unlabelled_studies(server):
    _label(server, LABELLED)
    models = server.models("localcl_selftrain")
    details = server.train("localcl_selftrain", 2, val_split=0.5)
    assert "self-training plan for 2 epochs: 1 baseline + 1 round(s) x 1" in details, details[-4000:]
    assert "pool of 6 unlabelled studies" in details, details[-4000:]
    written = sorted(p.name for p in (models / "pseudo_labels").rglob("*.nii.gz"))
    assert written == [f"{image}_pseudo.nii.gz" for image in UNLABELLED], written
    rounds = json.loads((models / "pseudo_labels" / "rounds.json").read_text())
    assert [(r["round"], r["num_volumes"]) for r in rounds] == [(1, 6)], rounds
    server.infer("localcl_selftrain", image=UNLABELLED[0])


@pytest.mark.slow
@needs_monailabel
def test_macl_pretrain_request_pretrains_on_every_image_then_fine_tunes_from_it(server, tmp_path):
    _label(server, LABELLED)
    models = server.models("macl")
    options = server.info()["trainers"]
    assert options["macl"]["config"]["pretrain"] is False and options["macl"]["config"]["pretrain_epochs"] >= 1
    assert "pretrain" not in options["localcl_selftrain"]["config"]
    # a bundle without pre-training: 400 with the reason, nothing run
    body = json.dumps({"max_epochs": 1, "device": "cpu", "pretrain": True}).encode()
    status, detail = _error(
        f"{server.url}/train/localcl_selftrain?run_sync=true", data=body, headers={"Content-Type": "application/json"}
    )
    assert status == 400 and "localcl_selftrain has no pre-training" in detail, detail

    served, pretrained = (models / "model.pt").read_bytes(), (models / "pretrained.pt").read_bytes()
    details = server.train("macl", 1, val_split=0.5, pretrain=True, pretrain_epochs=1)
    assert "macl: pre-training (pretrain.json, 1 epoch(s)) on all 8 datastore images (2 labelled, 6 unlabelled)" in (
        details
    ), details[-4000:]
    assert "pretrain requested: fine-tuning from the new pre-training checkpoint" in details, details[-4000:]
    assert "training from the served model" not in details
    assert (models / "pretrained.pt").read_bytes() != pretrained
    manifest = json.loads((models / "pretrained.pt.manifest.json").read_text())
    assert manifest["role"] == "pretrained" and manifest["method"] == "macl", manifest
    assert manifest["dataset"]["num_images"] == N and manifest["dataset"]["num_unlabelled"] == len(UNLABELLED)
    assert Path(manifest["dataset"]["dir"]).resolve() == server.studies.resolve(), manifest["dataset"]
    # the fine-tuning started from the new pre-trained weights and replaced the served model
    assert (models / "model.pt").read_bytes() != served
    model_manifest = json.loads((models / "model.pt.manifest.json").read_text())
    assert Path(model_manifest["pretrained_from"]).resolve() == (models / "pretrained.pt").resolve(), model_manifest
    assert model_manifest["pretrained_parts"], model_manifest
    server.infer("macl", image=UNLABELLED[0], out=tmp_path / "macl.nii.gz")


@pytest.mark.slow
@needs_monailabel
def test_mixcl_pretrain_request_pretrains_on_the_labelled_training_studies(server):
    _label(server, LABELLED)
    models = server.models("mixcl")
    # val_split 0.5 leaves one training study, less than a batch: 409 before anything runs
    body = json.dumps({"max_epochs": 1, "device": "cpu", "val_split": 0.5, "pretrain": True}).encode()
    status, detail = _error(
        f"{server.url}/train/mixcl?run_sync=true", data=body, headers={"Content-Type": "application/json"}
    )
    assert status == 409 and "mixcl: pre-training needs at least batch_size (2) studies" in detail, detail
    assert "label more studies or lower val_split" in detail and not (models / "pretrained.pt").exists(), detail
    # val_split 0: both labelled studies train (and validate, with a warning)
    details = server.train("mixcl", 1, val_split=0.0, pretrain=True, pretrain_epochs=1)
    assert (
        "mixcl: pre-training (pretrain.json, 1 epoch(s)) on the 2 labelled training studies (its loss needs label "
        "maps: 6 unlabelled and 0 validation studies not used)"
    ) in details, details[-4000:]
    assert "pretrain requested: fine-tuning from the new pre-training checkpoint" in details, details[-4000:]
    manifest = json.loads((models / "pretrained.pt.manifest.json").read_text())
    assert manifest["method"] == "mixcl" and manifest["dataset"]["num_images"] == len(LABELLED), manifest
    assert (models / "model.pt").exists()
    server.infer("mixcl", image=UNLABELLED[0])
