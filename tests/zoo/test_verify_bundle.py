"""Every bundle through the checks of the model zoo's ``ci/verify_bundle.py`` (Project-MONAI/model-zoo), offline.

What the zoo's script does, per bundle, and what stands for it here (medcl's own code, in the script's order):

- ``verify_bundle_directory`` (``-m min``): ``configs/metadata.json`` and ``LICENSE`` must exist, and the preferred
  ``models/model.pt`` and ``configs/inference.json`` too (after downloading what a ``large_files.yml`` lists). The
  source bundles ship no weights and no ``large_files.yml`` (``scripts/export_bundle.py`` writes both into a shared
  zip), so the weights come from a tiny training run into a copy of the bundle;
- ``verify_version_changes``: ``version`` has a ``changelog`` entry (the zoo's ``model_info.json``, the versions it
  already published, does not apply here);
- ``verify_metadata_format``: ``configs/metadata.json`` against the official schema named in it,
  ``meta_schema_20240725.json``. It is vendored beside this file (there is no network at test time), byte for byte
  from Project-MONAI/project-monai.github.io ``public/schema/meta_schema_20240725.json`` (the schema the zoo's
  ``prepare_schema`` downloads to ``eval/schema.json``); :data:`SCHEMA_SHA256` pins it;
- ``verify_bundle_properties``: ``check_properties()`` of the inference workflow (the zoo leaves train and evaluate
  to the unit tests: tests/zoo/test_<bundle>.py);
- ``verify_data_shape``: ``verify_net_in_out`` of ``network_def`` in ``inference.json`` at the metadata's input
  shape, with the bundle's defaults: no ``dataset_dir`` given and none at the default path;
- ``verify_torchscript``: ``ckpt_export`` of ``models/model.pt`` (``torch.jit.script``, no tracing), also without a
  dataset.

MixCL's UNETR runs at the narrow CPU width and 32³ of tests/test_bundle_mixcl.py, so its copy's metadata gets that
input shape (the shape check and the export need the trained network's size). Fine-tuning bundles (MACL, MixCL)
train with ``init: random`` here: the weights only have to exist (tests/zoo/test_macl.py and test_mixcl.py run
pre-training first).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, create_workflow, verify_metadata, verify_net_in_out
from zoo_utils import (  # noqa: F401
    BUNDLES,
    NAMES,
    SIZES,
    TINY,
    check_workflow,
    copy_bundle,
    workflow,
    zoo_process_state,
)

import medcl
from medcl.errors import MedclInputError

SCHEMA = Path(__file__).with_name("meta_schema_20240725.json")
SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"
NECESSARY = ("configs/metadata.json", "LICENSE")
PREFERRED = ("models/model.pt", "configs/inference.json")
pytestmark = pytest.mark.usefixtures("zoo_process_state")


def _find(folder: Path, stem: str) -> Path | None:
    """``<stem>.json|yaml|yml`` in ``folder``, as the zoo's ``_find_bundle_file``."""
    return next(
        (folder / f"{stem}.{ext}" for ext in ("json", "yaml", "yml") if (folder / f"{stem}.{ext}").is_file()), None
    )


def verify_directory_min(bundle: Path) -> None:
    """The zoo's ``verify_bundle_directory`` in ``min`` mode, offline: a ``large_files`` list is not downloaded."""
    if _find(bundle, "large_files") is not None:
        pytest.skip(f"{bundle.name} lists large files to download; offline, they are not fetched")
    for rel in NECESSARY:
        if not (bundle / rel).is_file():
            raise ValueError(f"necessary file {rel} is not existing.")
    for rel in PREFERRED:
        found = _find(bundle / "configs", "inference") if rel == "configs/inference.json" else bundle / rel
        if found is None or not found.is_file():
            raise ValueError(f"necessary file {rel} is not existing.")


def _meta(bundle: Path) -> dict:
    return json.loads((bundle / "configs" / "metadata.json").read_text())


def _network_size(name: str) -> dict:
    """The overrides of :data:`SIZES` that shape the network (not the sampling)."""
    return {k: v for k, v in SIZES[name].items() if k != "samples_per_volume"}


def _small_copy(name: str, dst: Path) -> Path:
    """A copy of the bundle whose metadata describes the network size these CPU tests build (MixCL: 32³)."""
    bundle = copy_bundle(name, dst)
    shape = SIZES[name]["patch_size"]
    if isinstance(shape, list):
        meta = _meta(bundle)
        for io in ("inputs", "outputs"):
            for v in meta["network_data_format"][io].values():
                v["spatial_shape"] = shape
        (bundle / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4))
    return bundle


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory):
    """``trained(name)``: a copy of the bundle with ``models/model.pt`` from one tiny training run (made once)."""
    done: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in done:
            bundle = _small_copy(name, tmp_path_factory.mktemp("zoo"))
            extra = {"init": "random"} if name in ("macl", "mixcl") else {}
            if name == "localcl_selftrain":
                extra = {"baseline_epochs": 1, "num_rounds": 0}
            override = {"dataset_dir": str(phantom_dir), **TINY, **SIZES[name], **extra}
            check_workflow(workflow(bundle, ["train.json"], "train", **override), check_properties=False)
            done[name] = bundle
        return done[name]

    return make


def test_vendored_schema_is_the_official_file():
    """meta_schema_20240725.json as published (sha256 of the file taken from project-monai.github.io)."""
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    assert json.loads(SCHEMA.read_text())["required"][:2] == ["schema", "version"]


@pytest.mark.parametrize("name", NAMES)
def test_directory_min_mode(name, trained, tmp_path):
    """Without weights (the source bundle) the zoo's min mode stops at models/model.pt; after training it passes."""
    with pytest.raises(ValueError, match="models/model.pt is not existing"):
        verify_directory_min(copy_bundle(name, tmp_path))
    verify_directory_min(trained(name))


@pytest.mark.parametrize("name", NAMES)
def test_version_changes(name):
    meta = _meta(BUNDLES / name)
    assert "version" in meta and "changelog" in meta
    assert meta["version"] in meta["changelog"], f"version {meta['version']} has no changelog entry"


@pytest.mark.parametrize("name", NAMES)
def test_metadata_format_and_packages(name, tmp_path):
    """The official schema (the one the metadata names), and the packages a zoo user must install: medcl itself (at
    this version) is required, MLflow (only for --tracking mlflow) optional."""
    meta_file = copy_bundle(name, tmp_path) / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    assert meta["schema"].rsplit("/", 1)[-1] == SCHEMA.name
    schema = tmp_path / "eval" / "schema.json"  # where the zoo's prepare_schema puts it
    schema.parent.mkdir()
    schema.write_bytes(SCHEMA.read_bytes())
    verify_metadata(meta_file=str(meta_file), filepath=str(schema), hash_val=SCHEMA_SHA256, hash_type="sha256")
    assert meta["required_packages_version"]["medcl"] == medcl.__version__
    assert "mlflow" not in meta["required_packages_version"] and "mlflow" in meta["optional_packages_version"]


@pytest.mark.filterwarnings("ignore:parsing config_file")  # create_workflow's note on trusted configs
@pytest.mark.parametrize("name", NAMES)
def test_inference_properties(name, phantom_dir, tmp_path):
    """create_workflow (it initializes) then check_properties: inference and meta properties all present."""
    bundle = copy_bundle(name, tmp_path)
    wf = create_workflow(
        workflow_type="inference",
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        bundle_root=str(bundle),
        dataset_dir=str(phantom_dir),
    )
    assert wf.check_properties() == []


@pytest.mark.parametrize("name", NAMES)
def test_data_shape_without_a_dataset(name, tmp_path):
    bundle = _small_copy(name, tmp_path)
    assert not (bundle.parent.parent / "data" / "phantom").exists()  # the default dataset_dir is not there
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        device="cpu",
        **_network_size(name),
    )


@pytest.mark.parametrize("name", NAMES)
def test_torchscript(name, trained):
    """ckpt_export scripts the trained network (no tracing, no dataset); the TorchScript module gives its output."""
    bundle = trained(name)
    ts = bundle / "models" / "verify_model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(bundle / "models" / "model.pt"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        device="cpu",
        **_network_size(name),
    )
    module = torch.jit.load(str(ts))
    inputs = _meta(bundle)["network_data_format"]["inputs"]["image"]
    with torch.no_grad():
        out = module(torch.rand(1, inputs["num_channels"], *[int(s) for s in inputs["spatial_shape"]]))
    assert out.shape[1] == _meta(bundle)["network_data_format"]["outputs"]["pred"]["num_channels"]


@pytest.mark.parametrize("name", NAMES)
def test_every_config_builds_without_a_dataset(name, tmp_path):
    """network_def of every config builds with no dataset anywhere (num_classes: the metadata's channel count), and
    evaluate / inference initialize() with no dataset and no checkpoint."""
    bundle = copy_bundle(name, tmp_path)
    channels = _meta(bundle)["network_data_format"]["outputs"]["pred"]["num_channels"]
    for config in sorted((bundle / "configs").glob("*.json")):
        if config.name == "metadata.json" or config.name.startswith("multi_gpu_"):
            continue
        files = [bundle / "configs" / "train.json", config] if config.name == "evaluate.json" else [config]
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        parser.read_meta(str(bundle / "configs" / "metadata.json"))
        parser.update({"bundle_root": str(bundle), "device": "cpu", **_network_size(name)})
        net = parser.get_parsed_content("network_def")
        assert isinstance(net, torch.nn.Module), config.name
        if "num_classes" in parser:
            assert parser.get_parsed_content("num_classes") == channels, config.name
    for configs, kind in ((["inference.json"], "inference"), (["train.json", "evaluate.json"], "train")):
        workflow(bundle, configs, kind).initialize()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("configs", [["inference.json"], ["train.json", "evaluate.json"]], ids=["infer", "eval"])
def test_run_without_checkpoint_says_how_to_make_one(name, configs, tmp_path):
    """With the loader on and no models/model.pt, run() stops first with the message naming the training command."""
    bundle = copy_bundle(name, tmp_path)
    wf = workflow(bundle, configs, "inference" if len(configs) == 1 else "train")
    wf.initialize()
    with pytest.raises(RuntimeError) as info:  # MONAI wraps the expression's error
        wf.run()
    cause = info.value.__cause__
    assert isinstance(cause, MedclInputError), repr(info.value)
    assert "model.pt: checkpoint not found" in str(cause) and "train" in str(cause)
    assert not os.path.exists(bundle / "eval")  # nothing ran
