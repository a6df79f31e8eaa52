"""Every bundle entry against every bad input (issue 8, part 4): one clear error naming the file or the key and the
fix, or a run that goes on where going on is right.

The entries run in this process (``monai.bundle.ConfigWorkflow``, what ``python -m monai.bundle run`` builds) on a
5-case 32³ phantom with tiny settings; two subprocesses show what a user sees on the terminal. The test ids,
``<bundle>/<entry>-<case>``, make pytest's verbose output the table:

=========================  =====================================================================================
case                       outcome
=========================  =====================================================================================
missing_file               ``<file>: file not found (listed in <dataset.json>). Fix the path there ...``
truncated, garbage_data    ``<image>: the NIfTI data is corrupt or truncated (...). Re-export or re-download it``
not_gzip                   ``<file>: not a readable NIfTI file (...). Re-export it or remove it from ...``
shape/affine_mismatch      ``<label>: label shape/affine ... Resample the label onto the image ...``
label_values               ``<label>: label values [7] are not in dataset.json 'labels' [...]. Fix the label map``
empty_datalist             ``The 'training' list from <dataset.json> is empty: add cases ...``
empty_input_dir            ``<dir>: no .nii.gz or .nii images in this folder; put the images there ...``
label_fraction_0 / _1.5    ``label_fraction=0 must be in (0, 1]; e.g. --label_fraction 0.1 for 10 %.``
unknown_key                ``--max_epoch: no such key in <config>; did you mean --max_epochs?``
class_never_labelled_*     training runs (finite loss, checkpoint written); a warning names the class
small_volume               training pads and runs; inference writes a segmentation on the input grid
pretrained_other_net       strict (default): ``<ckpt>: the checkpoint does not fit ...``, nothing loaded;
                           ``--pretrained_strict false``: runs, the log lists the keys it did not load
model_other_net            ``<model.pt>: the checkpoint does not fit <Net>: ... pass --ckpt_path ...``
nonfinite_voxels, rgb,      hostile images (issue 18): ``<file>: <what is wrong> ... <fix>`` before training or
4d_series, one_voxel_thick, inference, from ``medcl.data.checks``; odd_but_valid (int64/float64, (X, Y, Z, 1),
zero_spacing, header_2gb,   flipped axis / negative pixdim, float label with whole values, a constant image):
label_fractional            runs, the constant image warned about
=========================  =====================================================================================
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES, assert_segmentation_of, run_bundle

from medcl.errors import MedclInputError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MIXCL_NET = {"feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}
ONE_STEP = {"max_epochs": 1, "epoch_length": 1, "val_interval": 1, "num_workers": 0, "cache_rate": 0.0}


@dataclass(frozen=True)
class Entry:
    """A bundle config run as an entry point, with the overrides that make it tiny."""

    bundle: str
    config: str
    tiny: dict = field(hash=False)

    def __str__(self) -> str:
        return f"{self.bundle}/{self.config}"

    @property
    def configs(self) -> Path:
        return BUNDLES / self.bundle / "configs"

    @property
    def is_finetune(self) -> bool:
        return self.config == "train"


TRAIN = [
    Entry("scratch_baseline", "train", {**ONE_STEP, "patch_size": 32, "batch_size": 1, "samples_per_volume": 2}),
    Entry("macl", "pretrain", {**ONE_STEP, "patch_size": 64, "batch_size": 1, "samples_per_volume": 2}),
    Entry("macl", "train", {**ONE_STEP, "patch_size": 64, "batch_size": 1, "samples_per_volume": 2, "init": "random"}),
    Entry(
        "mixcl",
        "pretrain",
        {**ONE_STEP, "patch_size": [32, 32, 32], **MIXCL_NET, "batch_size": 2, "samples_per_volume": 1},
    ),
    Entry(
        "mixcl",
        "train",
        {
            **ONE_STEP,
            "patch_size": [32, 32, 32],
            **MIXCL_NET,
            "batch_size": 1,
            "samples_per_volume": 2,
            "init": "random",
        },
    ),
    # no pseudo-label round (slow); the local loss runs on the labelled pair instead (lambda_local_gt)
    Entry(
        "localcl_selftrain",
        "train",
        {
            **ONE_STEP,
            "patch_size": 32,
            "batch_size": 2,
            "samples_per_volume": 2,
            "num_labelled": 2,
            "num_rounds": 0,
            "round_epochs": 1,
            "lambda_local_gt": 0.1,
        },
    ),
]
FINETUNE = [e for e in TRAIN if e.is_finetune]
INFERENCE = [
    Entry("scratch_baseline", "inference", {"patch_size": 32, "num_workers": 0}),
    Entry("macl", "inference", {"patch_size": 64, "num_workers": 0}),
    Entry("mixcl", "inference", {"patch_size": [32, 32, 32], **MIXCL_NET, "num_workers": 0}),
    Entry("localcl_selftrain", "inference", {"patch_size": 32, "num_workers": 0}),
]
NUM_CLASSES = 5  # the abdomen phantom: background + 4 organs


def _ids(entries):
    return [str(e) for e in entries]


# --------------------------------------------------------------------------------------------------- running
def make_workflow(entry: Entry, dataset_dir, root, **extra):
    """The workflow ``python -m monai.bundle run`` would build for ``entry`` (initialised: CLI check done)."""
    from monai.bundle import ConfigWorkflow

    overrides = {**entry.tiny, "bundle_root": str(root), "dataset_dir": str(dataset_dir), **extra}
    if str(entry) == "mixcl/pretrain":
        overrides.setdefault("pretrain_dataset_dirs", [str(dataset_dir)])
    workflow = ConfigWorkflow(
        config_file=str(entry.configs / f"{entry.config}.json"),
        meta_file=str(entry.configs / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        **overrides,
    )
    workflow.initialize()
    return workflow


def run_entry(entry: Entry, dataset_dir, root, **extra):
    workflow = make_workflow(entry, dataset_dir, root, **extra)
    workflow.run()
    workflow.finalize()
    return workflow


def the_input_error(excinfo) -> str:
    """The one :class:`MedclInputError` in an exception chain (MONAI wraps it in RuntimeErrors); its message."""
    chain, err = [], excinfo.value
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    errors = [e for e in chain if isinstance(e, MedclInputError)]
    assert errors, f"no MedclInputError behind {type(excinfo.value).__name__}: {excinfo.value}"
    assert len({str(e) for e in errors}) == 1, [str(e) for e in errors]
    msg = str(errors[0])
    assert "Traceback" not in msg and len(msg) < 2000, msg  # one message, not a dump
    return msg


def expect_error(entry: Entry, dataset_dir, root, patterns, **extra) -> str:
    """Run ``entry``; it must fail with one MedclInputError matching every regex of ``patterns``, before training."""
    with pytest.raises(Exception) as excinfo:
        run_entry(entry, dataset_dir, root, **extra)
    msg = the_input_error(excinfo)
    for pattern in patterns:
        assert re.search(pattern, msg), f"{pattern!r} not in: {msg}"
    assert not list(Path(root).glob("models/*.pt")), "a failed run must not write a checkpoint"
    return msg


def last_loss(workflow) -> float:
    out = workflow.parser.get_parsed_content("train#trainer").state.output
    out = out[0] if isinstance(out, (list, tuple)) else out
    return float(out["loss"])


def assert_trained(entry: Entry, workflow, root) -> None:
    assert math.isfinite(last_loss(workflow))
    written = "pretrained.pt" if entry.config == "pretrain" else "model_final.pt"
    assert (Path(root) / "models" / written).is_file()


# --------------------------------------------------------------------------------------------------- data
def _label_path(ds: Path, meta: dict, i: int = 0) -> Path:
    return ds / meta["training"][i]["label"]


def _image_path(ds: Path, meta: dict, i: int = 0) -> Path:
    return ds / meta["training"][i]["image"]


def _rewrite_label(path: Path, fn) -> None:
    img = nib.load(str(path))
    data, affine = fn(np.asarray(img.dataobj).copy(), img.affine.copy())
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(path))


def _shift_origin(data, affine):
    affine[:3, 3] += 10.0  # 10 mm off the image's grid
    return data, affine


def _unknown_value(data, affine):
    data.flat[0] = 7  # the dataset's labels are 0-4
    return data, affine


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_after_header(path: Path) -> None:
    """Valid gzip header and NIfTI header bytes, then random bytes: same length, undecodable data."""
    data = path.read_bytes()
    keep = len(data) // 4
    path.write_bytes(data[:keep] + np.random.default_rng(0).bytes(len(data) - keep))


def _not_gzip(path: Path) -> None:
    path.write_text("this is not a NIfTI file\n" * 8)


@dataclass
class Bad:
    """A damaged dataset: its folder, the file (or folder) an error must name, and extra overrides."""

    dataset_dir: Path
    names: Path | None = None
    extra: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from medcl.data.phantom import generate_dataset

    out = tmp_path_factory.mktemp("base")
    generate_dataset(str(out), n=5, n_test=1, seed=0, shape=(32, 32, 32))
    return out


@pytest.fixture(scope="module")
def bad(base, tmp_path_factory) -> dict[str, Bad]:
    """Every damaged training dataset, built once: a copy of ``base`` with one defect."""
    from medcl.data.phantom import generate_dataset

    root = tmp_path_factory.mktemp("bad")
    meta0 = json.loads((base / "dataset.json").read_text())
    out = {}

    def copy(name: str):
        ds = root / name
        shutil.copytree(base, ds)
        return ds, json.loads((ds / "dataset.json").read_text())

    ds, meta = copy("missing_file")
    _image_path(ds, meta).unlink()
    out["missing_file"] = Bad(ds, _image_path(ds, meta))
    for name, damage, victim in (
        ("truncated", _truncate, _image_path),
        ("garbage_data", _garbage_after_header, _image_path),
        ("not_gzip", _not_gzip, _label_path),
    ):
        ds, meta = copy(name)
        damage(victim(ds, meta))
        out[name] = Bad(ds, victim(ds, meta))
    ds, meta = copy("shape_mismatch")
    _rewrite_label(_label_path(ds, meta), lambda d, a: (d[..., :-2], a))
    out["shape_mismatch"] = Bad(ds, _label_path(ds, meta))
    ds, meta = copy("affine_mismatch")
    _rewrite_label(_label_path(ds, meta), _shift_origin)
    out["affine_mismatch"] = Bad(ds, _label_path(ds, meta))
    ds, meta = copy("label_values")
    _rewrite_label(_label_path(ds, meta), _unknown_value)
    out["label_values"] = Bad(ds, _label_path(ds, meta))
    ds, meta = copy("empty_datalist")
    (ds / "dataset.json").write_text(json.dumps({**meta, "training": [], "numTraining": 0}))
    out["empty_datalist"] = Bad(ds, ds / "dataset.json")
    # a class that no label map contains: listed after the others, or a gap (spleen erased everywhere)
    ds, meta = copy("class_never_labelled_extra")
    (ds / "dataset.json").write_text(json.dumps({**meta, "labels": {**meta["labels"], "5": "ghost"}}))
    out["class_never_labelled_extra"] = Bad(ds, extra={"absent": "5 ('ghost')"})
    ds, meta = copy("class_never_labelled_gap")
    for i in range(len(meta["training"])):
        _rewrite_label(_label_path(ds, meta, i), lambda d, a: (np.where(d == 2, 0, d), a))
    out["class_never_labelled_gap"] = Bad(ds, extra={"absent": f"2 ({meta0['labels']['2']!r})"})
    small = root / "small_volume"
    generate_dataset(str(small), n=5, n_test=1, seed=1, shape=(16, 16, 16))
    out["small_volume"] = Bad(small)
    return out


@pytest.fixture(scope="module")
def bad_inference(base, tmp_path_factory) -> dict[str, Bad]:
    """Damaged inputs for inference: a dataset whose 'test' image is gone, and --input_dir folders."""
    root = tmp_path_factory.mktemp("bad_inference")
    test_image = base / json.loads((base / "dataset.json").read_text())["test"][0]
    out = {}
    ds = root / "missing_file"
    shutil.copytree(base, ds)
    (ds / test_image.relative_to(base)).unlink()
    out["missing_file"] = Bad(ds, ds / test_image.relative_to(base))
    for name, damage in (("truncated", _truncate), ("garbage_data", _garbage_after_header), ("not_gzip", _not_gzip)):
        folder = root / name
        folder.mkdir()
        shutil.copy(test_image, folder / test_image.name)
        damage(folder / test_image.name)
        out[name] = Bad(base, folder / test_image.name, {"input_dir": str(folder)})
    (root / "empty").mkdir()
    out["empty_input_dir"] = Bad(base, root / "empty", {"input_dir": str(root / "empty")})
    return out


@pytest.fixture(scope="module")
def trained_roots(base, tmp_path_factory) -> dict[str, Path]:
    """A bundle root per inference entry with a models/model.pt of the right (tiny) network, random weights."""
    from monai.bundle import ConfigParser

    roots = {}
    for entry in INFERENCE:
        root = tmp_path_factory.mktemp(entry.bundle)
        parser = ConfigParser()
        parser.read_config(str(entry.configs / "inference.json"))
        parser.update({**entry.tiny, "bundle_root": str(root), "dataset_dir": str(base)})
        (root / "models").mkdir()
        torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
        roots[str(entry)] = root
    return roots


# --------------------------------------------------------------------------------------------------- bad data
P = re.escape
DATA_CASES = {  # case -> (regexes on the message, given the file the message must name and its dataset.json)
    "missing_file": lambda f, j: [rf"^{P(str(f))}: file not found \(listed in {P(str(j))}\)", "Fix the path"],
    "truncated": lambda f, j: [rf"^{P(str(f))}: the NIfTI data is corrupt or truncated", "Re-export or re-download"],
    "garbage_data": lambda f, j: [rf"^{P(str(f))}: the NIfTI data is corrupt or truncated", "Re-export or re-download"],
    "not_gzip": lambda f, j: [rf"^{P(str(f))}: not a readable NIfTI file", "Re-export it or remove it"],
    "shape_mismatch": lambda f, j: [
        rf"^{P(str(f))}: label shape \(32, 32, 30\) does not match image",
        "Resample the label onto the image grid",
    ],
    "affine_mismatch": lambda f, j: [rf"^{P(str(f))}: label affine differs from image", "resample the label onto"],
    "label_values": lambda f, j: [
        rf"^{P(str(f))}: label values \[7\] are not in dataset.json 'labels' "
        r"\[0, 1, 2, 3, 4\]",
        "Fix the label map or add the classes",
    ],
    "empty_datalist": lambda f, j: [rf"The 'training' list from {P(str(j))} is empty: add cases"],
}


@pytest.mark.parametrize("case", list(DATA_CASES))
@pytest.mark.parametrize("entry", TRAIN, ids=_ids(TRAIN))
def test_train_bad_data(entry, case, bad, tmp_path):
    b = bad[case]
    expect_error(entry, b.dataset_dir, tmp_path, DATA_CASES[case](b.names, b.dataset_dir / "dataset.json"))


@pytest.mark.parametrize("fraction", [0, 1.5], ids=["label_fraction_0", "label_fraction_1.5"])
@pytest.mark.parametrize("entry", FINETUNE, ids=_ids(FINETUNE))
def test_train_bad_label_fraction(entry, fraction, base, tmp_path):
    pattern = rf"^label_fraction={fraction} must be in \(0, 1\]; e\.g\. --label_fraction 0\.1"
    expect_error(entry, base, tmp_path, [pattern], label_fraction=fraction, num_labelled=None)


@pytest.mark.parametrize("case", ["class_never_labelled_extra", "class_never_labelled_gap"])
@pytest.mark.parametrize("entry", TRAIN, ids=_ids(TRAIN))
def test_train_class_never_labelled_runs_and_warns(entry, case, bad, tmp_path, caplog):
    b = bad[case]
    with caplog.at_level(logging.WARNING, logger="medcl.data.checks"):
        workflow = run_entry(entry, b.dataset_dir, tmp_path)
    assert_trained(entry, workflow, tmp_path)
    warned = [r.getMessage() for r in caplog.records if r.name == "medcl.data.checks"]
    assert any(f"class {b.extra['absent']} is in no label map" in m and "dataset.json" in m for m in warned), warned


@pytest.mark.parametrize("entry", TRAIN, ids=_ids(TRAIN))
def test_train_small_volume_is_padded(entry, bad, tmp_path):
    """16³ volumes with 32³ (64² for MACL) patches: the pipelines pad (SpatialPadd, sliding windows) and train."""
    workflow = run_entry(entry, bad["small_volume"].dataset_dir, tmp_path)
    assert_trained(entry, workflow, tmp_path)


# --------------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("case", ["missing_file", "truncated", "garbage_data", "not_gzip", "empty_input_dir"])
@pytest.mark.parametrize("entry", INFERENCE, ids=_ids(INFERENCE))
def test_inference_bad_data(entry, case, bad_inference, trained_roots, tmp_path):
    b = bad_inference[case]
    if case == "empty_input_dir":
        patterns = [rf"^{P(str(b.names))}: no \.nii\.gz or \.nii images in this folder; put the images there"]
    else:
        patterns = DATA_CASES[case](b.names, b.dataset_dir / "dataset.json")
    with pytest.raises(Exception) as excinfo:
        run_entry(entry, b.dataset_dir, trained_roots[str(entry)], output_dir=str(tmp_path / "pred"), **b.extra)
    msg = the_input_error(excinfo)
    for pattern in patterns:
        assert re.search(pattern, msg), f"{pattern!r} not in: {msg}"
    assert not list(tmp_path.rglob("*_seg.nii.gz"))


@pytest.mark.parametrize("entry", INFERENCE, ids=_ids(INFERENCE))
def test_inference_small_volume_on_input_grid(entry, bad, trained_roots, tmp_path):
    small = bad["small_volume"].dataset_dir
    run_entry(entry, small, trained_roots[str(entry)], output_dir=str(tmp_path))
    test_image = small / json.loads((small / "dataset.json").read_text())["test"][0]
    assert nib.load(str(test_image)).shape == (16, 16, 16)
    assert_segmentation_of(tmp_path, test_image, NUM_CLASSES)


@pytest.mark.parametrize("entry", INFERENCE, ids=_ids(INFERENCE))
def test_inference_model_of_another_network(entry, base, trained_roots, tmp_path):
    from monai.networks.nets import UNet

    ckpt = tmp_path / "other_model.pt"
    torch.save(UNet(2, 1, NUM_CLASSES, channels=(4, 8, 16), strides=(2, 2)).state_dict(), ckpt)
    with pytest.raises(Exception) as excinfo:
        run_entry(entry, base, trained_roots[str(entry)], output_dir=str(tmp_path / "pred"), ckpt_path=str(ckpt))
    msg = the_input_error(excinfo)
    assert re.search(rf"^{P(str(ckpt))}: the checkpoint does not fit \w+: \d+ (keys|shape)", msg), msg
    assert "pass --ckpt_path to a model.pt this bundle wrote" in msg
    assert not list(tmp_path.rglob("*_seg.nii.gz"))


# --------------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("entry", TRAIN + INFERENCE, ids=_ids(TRAIN + INFERENCE))
def test_unknown_cli_key(entry, base, trained_roots, tmp_path, monkeypatch):
    """check_cli_overrides reads sys.argv: here it is what ``python -m monai.bundle run`` would see."""
    config = str(entry.configs / f"{entry.config}.json")
    monkeypatch.setattr(
        sys,
        "argv",
        ["monai/bundle/__main__.py", "run", "--config_file", config, "--dataset_dir", str(base), "--max_epoch", "3"],
    )
    root = trained_roots.get(str(entry), tmp_path)
    with pytest.raises(Exception) as excinfo:
        make_workflow(entry, base, root, max_epoch=3)
    msg = the_input_error(excinfo)
    assert msg.startswith(f"--max_epoch: no such key in {config}"), msg
    assert "Check the spelling" in msg
    if entry.config != "inference":  # inference has no epochs: nothing close to suggest
        assert "did you mean --max_epochs?" in msg


def _partly_fitting_checkpoint(entry: Entry, path: Path) -> str:
    """A pre-training checkpoint of the same family but another width: some tensors fit, others do not.

    Returns a key that fits (and is targeted by the PretrainedLoader).
    """
    from monai.networks.nets import UNETR, BasicUNet

    torch.manual_seed(7)
    if entry.bundle == "macl":  # deeper levels twice as wide
        net = BasicUNet(2, 1, NUM_CLASSES, features=(32, 32, 64, 128, 512, 32), norm="batch")
        key = "conv_0.conv_0.conv.weight"
    else:  # a narrower transformer; the first convolutional encoder block still fits
        net = UNETR(
            1,
            1,
            img_size=(32, 32, 32),
            feature_size=8,
            hidden_size=48,
            mlp_dim=96,
            num_heads=4,
            norm_name="instance",
            res_block=True,
        )
        key = "encoder1.layer.conv1.conv.weight"
    torch.save(net.state_dict(), path)
    return key


@pytest.mark.parametrize("entry", FINETUNE[1:3], ids=_ids(FINETUNE[1:3]))
def test_pretrained_checkpoint_of_another_network(entry, base, tmp_path, caplog):
    ckpt = tmp_path / "other_pretrained.pt"
    fitting_key = _partly_fitting_checkpoint(entry, ckpt)
    saved = torch.load(ckpt, weights_only=True)[fitting_key]
    pretrained = {"init": "pretrained", "pretrained_ckpt": str(ckpt), "learning_rate": 0.0}

    # strict (the default): one report naming the file and the mismatches, and nothing loaded
    workflow = make_workflow(entry, base, tmp_path / "strict", **pretrained)
    with pytest.raises(Exception) as excinfo:
        workflow.run()
    msg = the_input_error(excinfo)
    assert re.search(rf"^{P(str(ckpt))}: the checkpoint does not fit \w+ under prefixes .*shape mismatches", msg), msg
    assert "To make a matching one, run the" in msg and "--pretrained_strict false" in msg
    assert not torch.equal(workflow.parser.get_parsed_content("network").state_dict()[fitting_key], saved)
    assert not list((tmp_path / "strict").glob("models/*.pt"))

    # strict false: the matching tensors load, the run goes on, the log lists what was not loaded
    with caplog.at_level(logging.INFO, logger="medcl.networks.pretrained"):
        workflow = run_entry(entry, base, tmp_path / "lenient", **pretrained, pretrained_strict=False)
    assert_trained(entry, workflow, tmp_path / "lenient")
    final = torch.load(tmp_path / "lenient" / "models" / "model_final.pt", weights_only=True)
    assert torch.equal(final[fitting_key], saved)  # learning rate 0: the loaded initialisation
    log = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"{ckpt}: partial load (strict=False)" in log and "shape mismatches (" in log
    assert f"{ckpt}: skipped checkpoint keys" in log  # the decoder keys outside the pre-trained prefixes


# --------------------------------------------------------------------------------------------------- the check itself
def test_header_check_reads_label_maps_and_only_suspicious_images(base, tmp_path, monkeypatch):
    """The default level stays cheap: a sound image is not decompressed; a file whose stored length disagrees with
    its header is, and fails only if its data really is unreadable (a two-member gzip is fine)."""
    import gzip

    from medcl.data import checks

    meta = json.loads((base / "dataset.json").read_text())
    item = {"image": str(_image_path(base, meta)), "label": str(_label_path(base, meta))}
    reads = []
    read = checks._read_data
    monkeypatch.setattr(checks, "_read_data", lambda img, path, origin: reads.append(path) or read(img, path, origin))
    checks.check_datalist([item], level="header", label_values=[0, 1, 2, 3, 4])
    assert reads == [item["label"]]

    raw = gzip.decompress(Path(item["image"]).read_bytes())
    two = tmp_path / "two_members.nii.gz"  # as bgzip writes: the last member's size field is not the total
    two.write_bytes(gzip.compress(raw[:4096]) + gzip.compress(raw[4096:]))
    reads.clear()
    checks.check_datalist([{"image": str(two)}], keys=("image",), level="header")
    assert reads == [str(two)]

    short = tmp_path / "short.nii"  # uncompressed, cut short
    short.write_bytes(raw[:-100])
    with pytest.raises(MedclInputError, match=rf"^{P(str(short))}: the NIfTI data is corrupt or truncated"):
        checks.check_datalist([{"image": str(short)}], keys=("image",), level="header")


# --------------------------------------------------------------------------------------------------- terminal
def test_terminal_shows_the_error_naming_the_file(bad, tmp_path):
    """What a user sees: the MedclInputError line once, naming the file, as the last words of the run (no traceback:
    ``medcl.errors.install_excepthook``)."""
    b = bad["truncated"]
    entry = TRAIN[2]  # macl/train
    args = [a for k, v in {**entry.tiny, "init": "random"}.items() for a in (f"--{k}", str(v))]
    proc = run_bundle(
        [entry.configs / "train.json"], "--bundle_root", str(tmp_path), "--dataset_dir", str(b.dataset_dir), *args
    )
    assert proc.returncode != 0
    line = f"medcl.errors.MedclInputError: {b.names}: the NIfTI data is corrupt or truncated"
    assert proc.stdout.count("MedclInputError: ") == 1 and line in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and proc.stdout.strip().splitlines()[-2].startswith(line)
    assert "Epoch: 1/1" not in proc.stdout  # stopped before training


def test_terminal_unknown_key_from_the_real_command_line(base, trained_roots):
    entry = INFERENCE[2]  # mixcl/inference
    proc = run_bundle(
        [entry.configs / "inference.json"],
        "--bundle_root",
        str(trained_roots[str(entry)]),
        "--dataset_dir",
        str(base),
        "--max_epoch",
        "3",
    )
    assert proc.returncode != 0
    assert proc.stdout.count("MedclInputError: --max_epoch: no such key in ") == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout


def test_full_traceback_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCL_TRACEBACK", "1")
    proc = run_bundle(
        [TRAIN[0].configs / "train.json"], "--bundle_root", str(tmp_path), "--dataset_dir", str(tmp_path / "none")
    )
    assert proc.returncode != 0 and "Traceback" in proc.stdout and "dataset.json not found" in proc.stdout


def test_terminal_self_training_schedule_that_does_not_fit(base, tmp_path):
    """``--max_epochs 20`` with the default 3 rounds x 15 epochs leaves no baseline: one line naming the keys."""
    entry = TRAIN[5]  # localcl_selftrain/train
    schedule = {"max_epochs": 20, "num_rounds": 3, "round_epochs": 15}  # the defaults' rounds
    args = [a for k, v in {**entry.tiny, **schedule}.items() for a in (f"--{k}", str(v))]
    proc = run_bundle([entry.configs / "train.json"], "--bundle_root", str(tmp_path), "--dataset_dir", str(base), *args)
    assert proc.returncode != 0
    line = "medcl.errors.MedclInputError: the self-training schedule does not fit: baseline_epochs -25"
    assert proc.stdout.count("MedclInputError: ") == 1 and line in proc.stdout, proc.stdout[-3000:]
    assert "--baseline_epochs" in proc.stdout and "Traceback" not in proc.stdout
    assert not (tmp_path / "models" / "model_final.pt").exists()


# --------------------------------------------------------------------------------------------------- hostile images
# Valid NIfTI files that the pipelines cannot use (issue 18, item 4): each fails in medcl.data.checks, before training
# or inference, with one message naming the file, what is wrong and the fix. The "odd but valid" ones run.
def _save(path: Path, data: np.ndarray, affine: np.ndarray, **header) -> None:
    img = nib.Nifti1Image(data, affine, dtype=data.dtype)
    for name, value in header.items():
        img.header[name] = value
    nib.save(img, str(path))


def _nonfinite(path: Path) -> None:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).astype(np.float32)
    data.flat[[0, 100, 200]] = np.nan
    data.flat[[300, 400]] = [np.inf, -np.inf]
    _save(path, data, img.affine)


def _rgb(path: Path) -> None:
    img = nib.load(str(path))
    grey = np.clip(np.asarray(img.dataobj), 0, 255).astype(np.uint8)
    rgb = np.zeros(grey.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"], rgb["B"] = grey, grey, grey
    _save(path, rgb, img.affine)


def _series(path: Path) -> None:  # 3 time points (or channels) in one file
    img = nib.load(str(path))
    _save(path, np.stack([np.asarray(img.dataobj)] * 3, axis=-1), img.affine)


def _one_slice(path: Path) -> None:
    img = nib.load(str(path))
    _save(path, np.asarray(img.dataobj)[:, :, 10:11], img.affine)


def _zero_spacing(path: Path) -> None:  # a zero column in the sform: what e.g. a broken converter writes
    img = nib.load(str(path))
    affine = img.affine.copy()
    affine[:3, 1] = 0.0
    out = nib.Nifti1Image(np.asarray(img.dataobj), None)
    out.header.set_sform(affine, code=1)
    out.header.set_qform(None, code=0)
    nib.save(out, str(path))


def _header_2gb(path: Path) -> None:
    """A valid NIfTI header declaring 1024 x 1024 x 512 float32 voxels (2 GiB), then 4 KiB of data, gzipped."""
    import gzip

    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((1024, 1024, 512))
    header.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + np.zeros(1024, np.float32).tobytes()))


def _fractional_label(path: Path) -> None:  # as after resampling a label map with linear interpolation
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[data > 0] -= 0.5
    _save(path, data, img.affine)


HOSTILE = {  # case -> (damage, damaged file of the item, regexes on the message given that file)
    "nonfinite_voxels": (
        _nonfinite,
        _image_path,
        lambda f: [rf"^{P(str(f))}: 3 NaN and 2 infinite voxels \(of 32768\)", "Replace them", "remove the case"],
    ),
    "rgb": (_rgb, _image_path, lambda f: [rf"^{P(str(f))}: RGB colour voxels \(NIfTI datatype RGB24\)", "grey"]),
    "4d_series": (
        _series,
        _image_path,
        lambda f: [rf"^{P(str(f))}: a 4D image of shape \(32, 32, 32, 3\) \(3 volumes", r"img\.slicer\[\.\.\., 0\]"],
    ),
    "one_voxel_thick": (
        _one_slice,
        _image_path,
        lambda f: [rf"^{P(str(f))}: the volume is 1 voxel thick along axis 2 \(shape \(32, 32, 1\)\)", "whole series"],
    ),
    "zero_spacing": (
        _zero_spacing,
        _image_path,
        lambda f: [rf"^{P(str(f))}: voxel size \[[\d.]+, 0\.0, [\d.]+\] mm has a zero", "Write the true spacing"],
    ),
    "header_2gb": (
        _header_2gb,
        _image_path,
        lambda f: [
            rf"^{P(str(f))}: the NIfTI data is corrupt or truncated: the header declares shape \(1024, 1024, 512\) "
            r"of float32 \(2\.0 GiB of voxel data\) but the file holds 4\.0 KiB",
            "Re-export or re-download",
        ],
    ),
    "label_fractional": (
        _fractional_label,
        _label_path,
        lambda f: [rf"^{P(str(f))}: the label map holds 4 non-integer values \(0\.5, 1\.5, 2\.5, 3\.5; ", "nearest"],
    ),
}
HOSTILE_IMAGES = [c for c, (_, victim, _) in HOSTILE.items() if victim is _image_path]


@pytest.fixture(scope="module")
def hostile(base, tmp_path_factory) -> dict[str, Bad]:
    """A copy of ``base`` per hostile case, its first training image (or label) replaced."""
    root = tmp_path_factory.mktemp("hostile")
    meta = json.loads((base / "dataset.json").read_text())
    out = {}
    for case, (damage, victim, _) in HOSTILE.items():
        ds = root / case
        shutil.copytree(base, ds)
        damage(victim(ds, meta))
        out[case] = Bad(ds, victim(ds, meta))
    return out


@pytest.fixture(scope="module")
def hostile_inference(base, tmp_path_factory) -> dict[str, Bad]:
    """An --input_dir per hostile image case holding the dataset's test image, damaged."""
    root = tmp_path_factory.mktemp("hostile_inference")
    test_image = base / json.loads((base / "dataset.json").read_text())["test"][0]
    out = {}
    for case in HOSTILE_IMAGES:
        folder = root / case
        folder.mkdir()
        shutil.copy(test_image, folder / test_image.name)
        HOSTILE[case][0](folder / test_image.name)
        out[case] = Bad(base, folder / test_image.name, {"input_dir": str(folder)})
    return out


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("entry", TRAIN, ids=_ids(TRAIN))
def test_train_hostile_image(entry, case, hostile, tmp_path):
    b = hostile[case]
    expect_error(entry, b.dataset_dir, tmp_path, HOSTILE[case][2](b.names))


@pytest.mark.parametrize("case", HOSTILE_IMAGES)
@pytest.mark.parametrize("entry", INFERENCE, ids=_ids(INFERENCE))
def test_inference_hostile_image(entry, case, hostile_inference, trained_roots, tmp_path):
    b = hostile_inference[case]
    with pytest.raises(Exception) as excinfo:
        run_entry(entry, b.dataset_dir, trained_roots[str(entry)], output_dir=str(tmp_path / "pred"), **b.extra)
    msg = the_input_error(excinfo)
    for pattern in HOSTILE[case][2](b.names):
        assert re.search(pattern, msg), f"{pattern!r} not in: {msg}"
    assert not list(tmp_path.rglob("*_seg.nii.gz"))


def _odd_but_valid(ds: Path, meta: dict) -> dict[str, Path]:
    """Rewrite ``ds``'s training cases into the odd forms that must work; return case -> image path.

    int64 and float64 voxels (cast to float32 by EnsureTyped), a 4D file holding one volume ``(X, Y, Z, 1)``, a
    flipped x axis (negative affine column, with its label; the label stored as float32 with integer values) and
    negative ``pixdim`` values in the header, and a constant float image (warned about, not refused).
    """
    paths = {name: _image_path(ds, meta, i) for i, name in enumerate(["int64", "float64", "one_volume_4d", "flip"])}
    paths["constant"] = _image_path(ds, meta, 4)
    for name, cast in (("int64", np.int64), ("float64", np.float64)):
        img = nib.load(str(paths[name]))
        _save(paths[name], np.asarray(img.dataobj).astype(cast), img.affine)
    img = nib.load(str(paths["one_volume_4d"]))
    _save(paths["one_volume_4d"], np.asarray(img.dataobj)[..., None], img.affine)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    for path, dtype in ((paths["flip"], np.int16), (_label_path(ds, meta, 3), np.float32)):
        img = nib.load(str(path))
        affine = img.affine @ np.array([[-1, 0, 0, img.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        assert np.allclose(affine[:3, :3], img.affine[:3, :3] @ flip[:3, :3])
        _save(path, np.asarray(img.dataobj)[::-1].astype(dtype), affine)
        raw = nib.load(str(path))
        raw.header["pixdim"][1:4] = -np.abs(raw.header["pixdim"][1:4])  # negative spacing in pixdim: abs is read
        nib.save(raw, str(path))
    img = nib.load(str(paths["constant"]))
    _save(paths["constant"], np.full(img.shape, -1000.0, np.float32), img.affine)
    return paths


@pytest.fixture(scope="module")
def odd_but_valid(base, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    ds = tmp_path_factory.mktemp("odd") / "odd_but_valid"
    shutil.copytree(base, ds)
    return ds, _odd_but_valid(ds, json.loads((ds / "dataset.json").read_text()))


@pytest.mark.parametrize("entry", TRAIN, ids=_ids(TRAIN))
def test_train_odd_but_valid_images_run(entry, odd_but_valid, tmp_path, caplog):
    ds, paths = odd_but_valid
    with caplog.at_level(logging.WARNING, logger="medcl.data.checks"):
        workflow = run_entry(entry, ds, tmp_path)
    assert_trained(entry, workflow, tmp_path)
    warned = [r.getMessage() for r in caplog.records if r.name == "medcl.data.checks"]
    assert any(m.startswith(f"{paths['constant']}: every voxel of the image is -1000.0") for m in warned), warned


@pytest.mark.parametrize("entry", INFERENCE, ids=_ids(INFERENCE))
def test_inference_odd_but_valid_images_on_input_grid(entry, odd_but_valid, base, trained_roots, tmp_path, caplog):
    _, paths = odd_but_valid
    folder = tmp_path / "in"
    folder.mkdir()
    for name, path in paths.items():
        shutil.copy(path, folder / f"{name}.nii.gz")
    with caplog.at_level(logging.WARNING, logger="medcl.data.checks"):
        run_entry(entry, base, trained_roots[str(entry)], output_dir=str(tmp_path / "pred"), input_dir=str(folder))
    assert any("constant.nii.gz: every voxel" in r.getMessage() for r in caplog.records)
    for name in paths:
        image = folder / f"{name}.nii.gz"
        if name == "one_volume_4d":  # the segmentation of an (X, Y, Z, 1) file is (X, Y, Z), same grid
            pred = nib.load(str(tmp_path / "pred" / f"{name}_seg.nii.gz"))
            assert pred.shape == nib.load(str(image)).shape[:3]
            continue
        assert_segmentation_of(tmp_path / "pred", image, NUM_CLASSES)


def _variant(case: str, path: Path) -> str:
    """Write the variant ``case`` to ``path``; return the regex its message must match after the path."""
    data, affine = np.ones((8, 8, 8), np.float32), np.diag([1.5, 1.5, 2.0, 1.0])
    if case == "2d_image":
        _save(path, data[:, :, 0], affine)
        return r"the volume is 1 voxel thick along axis 2 \(shape \(8, 8\)\)"
    if case == "5d_vector":  # NIfTI's vector convention (X, Y, Z, 1, C)
        _save(path, np.ones((8, 8, 8, 1, 3), np.float32), affine)
        return r"a 5D image of shape \(8, 8, 8, 1, 3\) \(3 volumes"
    if case == "rgba":
        _save(path, np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")]), affine)
        return r"RGB colour voxels \(NIfTI datatype RGBA32\)"
    img = nib.Nifti1Image(data, None)  # no sform, no qform: the affine comes from pixdim
    if case == "zero_pixdim_without_sform":  # nibabel would read the zero as 1 mm
        img.header["pixdim"][1:4] = [1.5, 1.5, 0.0]
        expect = r"voxel size \[1\.5, 1\.5, 0\.0\] mm has a zero or non-finite spacing along axis 2"
    else:  # infinite_affine
        img.header.set_sform(np.diag([np.inf, 1.5, 2.0, 1.0]), code=1)
        expect = r"voxel size \[inf, 1\.5, 2\.0\] mm has a zero or non-finite spacing along axis 0"
    nib.save(img, str(path))
    return expect


@pytest.mark.parametrize("case", ["2d_image", "5d_vector", "rgba", "zero_pixdim_without_sform", "infinite_affine"])
def test_check_hostile_variants(case, tmp_path):
    """Variants of the hostile cases above, at the check itself (milliseconds each)."""
    from medcl.data import checks

    path = tmp_path / f"{case}.nii.gz"
    expect = _variant(case, path)
    with pytest.raises(MedclInputError, match=rf"^{P(str(path))}: {expect}"):
        checks.check_datalist([{"image": str(path)}], keys=("image",))


def test_check_float_label_with_integer_values_passes(tmp_path):
    """A label map stored as float64 holding whole numbers is a label map: its values are the classes."""
    from medcl.data import checks

    image, label = tmp_path / "image.nii.gz", tmp_path / "label.nii.gz"
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    _save(image, np.ones((8, 8, 8), np.int16), affine)
    _save(label, np.arange(512, dtype=np.float64).reshape(8, 8, 8) % 3, affine)
    checks.check_datalist([{"image": str(image), "label": str(label)}], label_values=[0, 1, 2])


def test_header_2gb_is_refused_without_reading_the_data(tmp_path, monkeypatch):
    """A 2 GiB header in a 4 KiB file is refused from its stored length: nibabel never allocates the 2 GiB."""
    from medcl.data import checks

    path = tmp_path / "big.nii.gz"
    _header_2gb(path)
    monkeypatch.setattr(checks, "_read_data", lambda *a: pytest.fail("the data must not be read"))
    with pytest.raises(MedclInputError, match=rf"^{P(str(path))}: .*\(2\.0 GiB of voxel data\) but the file holds 4"):
        checks.check_datalist([{"image": str(path)}], keys=("image",))


def test_terminal_inference_hostile_image(hostile_inference, trained_roots):
    """What a user of inference.json sees for a NaN image: the one message, no traceback."""
    b, entry = hostile_inference["nonfinite_voxels"], INFERENCE[0]  # scratch_baseline/inference
    args = [a for k, v in {**entry.tiny, **b.extra}.items() for a in (f"--{k}", str(v))]
    root = trained_roots[str(entry)]
    proc = run_bundle([entry.configs / "inference.json"], "--bundle_root", str(root), *args)
    assert proc.returncode != 0
    line = f"medcl.errors.MedclInputError: {b.names}: 3 NaN and 2 infinite voxels (of 32768)"
    assert proc.stdout.count("MedclInputError: ") == 1 and line in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
