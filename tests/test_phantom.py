"""Tests for the synthetic CT phantom (medcl.data.phantom)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import runpy
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medcl.data.phantom import ORGAN_SETS, PHANTOM_VARIANTS, generate_case, generate_dataset, main, organ_labels
from medcl.errors import MedclInputError

SMALL = (32, 32, 24)
DEMO = (64, 64, 48)

# Fingerprint of the standard phantom as it was before the "varied" variant existed (commit 118bb19), for
# generate_case(index, seed, (32, 32, 32), organ_set), index 0 and 1 of each organ set (abdomen, pelvis, thorax):
# - "labels": sha256 prefix of the label maps and affines; the same on every floating-point kernel tried;
# - "images": sha256 prefixes of the float32 images. The last bits depend on numpy's SIMD kernels (AVX-512, AVX2,
#   SSE) and OpenBLAS's, so there is one digest per combination, measured with NPY_DISABLE_CPU_FEATURES and
#   OPENBLAS_CORETYPE (numpy 2.4.6, scipy 1.17.1 as in constraints.txt; max difference between them 0.007 HU);
# - "moments": mean and std (HU) of each image, equal to 1e-3 HU on all of those kernels.
_STANDARD_REFERENCE = {
    0: {
        "labels": "ea4a3cda59369d3b",
        "images": {
            "8ea85946f45fd6aa",
            "7e2054f2af8f6b98",
            "50f3ce1c405191b5",
            "1ddce4e7944cb615",
            "d30422b3ce7acb1f",
            "e177c35f050ab827",
        },
        "moments": [-402.671, 490.092, -402.728, 493.351, -407.023, 491.356]
        + [-442.064, 490.437, -478.706, 468.409, -570.298, 471.784],
    },
    1: {
        "labels": "c3064e6dbd453da5",
        "images": {
            "83cbcaf1a2057cd0",
            "21536b65f2c9e34d",
            "e60d334c4352f074",
            "4544256a1e031521",
            "ad43d27b1086a1b0",
            "13389a9a980fa1ff",
        },
        "moments": [-417.956, 496.122, -321.48, 476.426, -317.018, 467.248]
        + [-566.987, 488.844, -568.095, 468.505, -685.573, 421.462],
    },
}
_REFERENCE_PLATFORM = ("x86_64", "2.4.6", "1.17.1")  # machine, numpy, scipy the image digests were measured with


def _nominal_hu(organ_set: str) -> dict[int, float]:
    """Nominal HU of each class: that of the first structure painted with the label."""
    nominal: dict[int, float] = {}
    for st in ORGAN_SETS[organ_set].structures:
        if st.label:
            nominal.setdefault(st.label, st.hu)
    return nominal


def _load(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img


def _air_noise_std(image: np.ndarray) -> float:
    """Noise sd in the air around the body: 97.7th minus 84.1th percentile (2 sd - 1 sd; the clip at -1024 HU cuts
    only the low tail). Air has no texture, bias or blur, so this measures the added noise alone."""
    body = ndimage.binary_dilation(ndimage.gaussian_filter(image, 1.0) > -500, iterations=3)
    air = image[~body]
    return float(np.percentile(air, 97.725) - np.percentile(air, 84.134))


def _organ_contrast(image: np.ndarray, label: np.ndarray, c: int) -> float | None:
    """Median HU inside class ``c`` (eroded) minus that of its unlabelled 2-voxel neighbourhood; None if absent."""
    mask = label == c
    if mask.sum() < 20:
        return None
    inner = ndimage.binary_erosion(mask)
    inner = inner if inner.sum() >= 10 else mask
    shell = ndimage.binary_dilation(mask, iterations=2) & (label == 0) & (image > -900)
    return float(np.median(image[inner]) - np.median(image[shell]))


# ----------------------------------------------------------------------------------------------- determinism


def test_generate_case_is_deterministic_and_seed_dependent():
    a = generate_case(1, seed=0, shape=SMALL)
    b = generate_case(1, seed=0, shape=SMALL)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = generate_case(1, seed=1, shape=SMALL)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])
    d = generate_case(2, seed=0, shape=SMALL)  # other index: other case
    assert not np.array_equal(a[1], d[1])


def test_case_independent_of_number_of_cases(tmp_path):
    p3 = generate_dataset(tmp_path / "n3", n=3, n_test=0, seed=0, shape=SMALL)
    p5 = generate_dataset(tmp_path / "n5", n=5, n_test=1, seed=0, shape=SMALL)
    for sub in ("imagesTr", "labelsTr"):
        x, _ = _load(os.path.join(os.path.dirname(p3), sub, "phantomabdomen_002.nii.gz"))
        y, _ = _load(os.path.join(os.path.dirname(p5), sub, "phantomabdomen_002.nii.gz"))
        np.testing.assert_array_equal(x, y)
    # the written case is generate_case(2) (image rounded to int16 HU)
    image, label, affine = generate_case(2, seed=0, shape=SMALL)
    x, ximg = _load(os.path.join(os.path.dirname(p3), "imagesTr", "phantomabdomen_002.nii.gz"))
    np.testing.assert_array_equal(x, np.round(image).astype(np.int16))
    np.testing.assert_allclose(ximg.affine, affine, atol=1e-5)


@functools.cache
def _standard_fingerprint(seed: int) -> tuple[str, str, list[float]]:
    labels, images, moments = hashlib.sha256(), hashlib.sha256(), []
    for organ_set in ("abdomen", "pelvis", "thorax"):
        for index in (0, 1):
            image, label, affine = generate_case(index, seed=seed, shape=(32, 32, 32), organ_set=organ_set)
            labels.update(label.tobytes())
            labels.update(affine.tobytes())
            images.update(image.tobytes())
            moments += [float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64))]
    return labels.hexdigest()[:16], images.hexdigest()[:16], moments


@pytest.mark.parametrize("seed", [0, 1])
def test_standard_output_unchanged(seed):
    """The default (standard) phantom renders the same labels, affines and intensities as before (any platform)."""
    labels, _, moments = _standard_fingerprint(seed)
    reference = _STANDARD_REFERENCE[seed]
    assert labels == reference["labels"], "label maps or affines of the standard phantom changed"
    np.testing.assert_allclose(moments, reference["moments"], rtol=0, atol=2e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_standard_output_bit_identical(seed):
    """... and bit-identical images, checked where the image digests were measured (the float kernels differ)."""
    import scipy

    here = (platform.machine(), np.__version__, scipy.__version__)
    if here != _REFERENCE_PLATFORM:
        pytest.skip(f"image digests were measured on {_REFERENCE_PLATFORM} (machine, numpy, scipy), this is {here}")
    _, images, _ = _standard_fingerprint(seed)
    assert images in _STANDARD_REFERENCE[seed]["images"], f"standard phantom images changed (digest {images})"


# ------------------------------------------------------------------------------------------ files / geometry


def test_written_files_agree(tmp_path):
    path = generate_dataset(tmp_path, n=3, n_test=1, seed=3, shape=SMALL, organ_set="pelvis")
    meta = json.loads(open(path).read())
    for item in meta["training"]:
        image, img = _load(os.path.join(tmp_path, item["image"]))
        label, lab = _load(os.path.join(tmp_path, item["label"]))
        assert image.shape == label.shape == SMALL
        assert image.dtype == np.int16 and label.dtype == np.uint8
        np.testing.assert_allclose(img.affine, lab.affine)
        for nii in (img, lab):
            assert int(nii.header["qform_code"]) == 1 and int(nii.header["sform_code"]) == 1
            np.testing.assert_allclose(nii.get_qform(), nii.get_sform(), atol=1e-4)
        # ITK/DICOM-like orientation: LPS, so RAS needs flips of the first two axes
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        sx, sy, sz = np.abs(np.diag(img.affine)[:3])
        assert 1.4 <= sx <= 1.8 and sx == pytest.approx(sy) and 2.0 <= sz <= 3.0
        assert set(np.unique(label)) <= set(organ_labels("pelvis"))
        assert -1024 <= image.min() and image.max() <= 3071
        assert (image[0, 0, :] < -900).all()  # corner of the field of view is air


@pytest.mark.parametrize("variant", sorted(PHANTOM_VARIANTS))
@pytest.mark.parametrize("organ_set", sorted(ORGAN_SETS))
def test_labels_valid_and_classes_present_in_most_cases(organ_set, variant):
    labels = organ_labels(organ_set)
    present = {c: 0 for c in labels if c}
    n_cases = 30
    for i in range(n_cases):
        shape = SMALL if i < 3 else (24, 24, 24)  # mostly tiny volumes, to keep the test fast
        image, label, affine = generate_case(i, seed=0, shape=shape, organ_set=organ_set, variant=variant)
        assert image.dtype == np.float32 and label.dtype == np.uint8 and affine.shape == (4, 4)
        assert image.shape == label.shape == shape
        assert set(np.unique(label).tolist()) <= set(labels)
        for c in present:
            present[c] += bool((label == c).any())
    # classes are absent occasionally (documented probabilities <= 0.1 per case), present in most cases
    assert all(count >= 0.75 * n_cases for count in present.values()), present
    if organ_set == "abdomen":
        assert present[4] < n_cases  # the pancreas is sometimes missing (p = 0.1)


def test_shape_is_free_and_anatomy_scales():
    for shape in [(16, 16, 16), (48, 40, 20)]:
        image, label, _ = generate_case(0, shape=shape)
        assert image.shape == label.shape == shape
    # the same case at two resolutions has (nearly) the same relative organ volumes
    _, lab_a, _ = generate_case(5, shape=(32, 32, 24))
    _, lab_b, _ = generate_case(5, shape=(64, 64, 48))
    frac_a = np.bincount(lab_a.ravel(), minlength=5) / lab_a.size
    frac_b = np.bincount(lab_b.ravel(), minlength=5) / lab_b.size
    np.testing.assert_allclose(frac_a[1:3], frac_b[1:3], rtol=0.2)


# --------------------------------------------------------------------------------------- labels match image


@pytest.mark.parametrize("organ_set", sorted(ORGAN_SETS))
def test_organ_intensity_matches_nominal_and_differs_from_surroundings(organ_set):
    nominal = _nominal_hu(organ_set)
    contrast: dict[int, list[float]] = {c: [] for c in nominal}
    for i in range(3):
        image, label, _ = generate_case(i, seed=0, shape=DEMO, organ_set=organ_set)
        labelled = label > 0
        for c, hu in nominal.items():
            mask = label == c
            if mask.sum() < 20:
                continue  # absent class
            inner = ndimage.binary_erosion(mask)  # interior: not a partial-volume border voxel
            inner = inner if inner.sum() >= 10 else mask
            organ = float(np.median(image[inner]))
            assert abs(organ - hu) < 40.0, (organ_set, i, organ_labels(organ_set)[c], organ, hu)
            shell = ndimage.binary_dilation(mask, iterations=2) & ~labelled & (image > -900)
            contrast[c].append(organ - float(np.median(image[shell])))
    for c, values in contrast.items():
        # the organ stands out from the unlabelled tissue around it (on average over cases)
        assert values and abs(np.mean(values)) > 8.0, (organ_set, organ_labels(organ_set)[c], values)


def test_liver_spleen_not_separable_by_a_threshold():
    """Intensity alone must not solve the task: spatial context is needed (so more labels can help)."""
    for i in range(3):
        image, label, _ = generate_case(i, seed=0, shape=DEMO)
        liver, spleen = label == 1, label == 2
        union = liver | spleen
        v, is_liver = image[union], liver[union]
        best = 0.0
        for t in np.arange(-50.0, 150.0, 2.0):
            pred = v >= t
            d_liver = 2 * (pred & is_liver).sum() / max(pred.sum() + is_liver.sum(), 1)
            d_spleen = 2 * (~pred & ~is_liver).sum() / max((~pred).sum() + (~is_liver).sum(), 1)
            best = max(best, (d_liver + d_spleen) / 2)
        assert best < 0.75, (i, best)
        # and no intensity window picks the liver out of the whole volume
        edges = np.arange(-100.0, 200.0, 5.0)
        n_all = np.searchsorted(np.sort(image.ravel()), edges)  # voxels below each edge
        n_liver = np.searchsorted(np.sort(image[liver]), edges)
        lo, hi = np.triu_indices(len(edges), k=1)  # every window [edges[lo], edges[hi])
        dice = 2 * (n_liver[hi] - n_liver[lo]) / (n_all[hi] - n_all[lo] + liver.sum())
        best_window = float(dice.max())
        assert best_window < 0.8, (i, best_window)
        assert spleen.any() and liver.sum() > 3 * spleen.sum()


# --------------------------------------------------------------------------------------------- varied variant


def test_varied_variant_is_deterministic_and_differs_from_standard():
    a = generate_case(1, seed=0, shape=SMALL, variant="varied")
    b = generate_case(1, seed=0, shape=SMALL, variant="varied")
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], generate_case(1, seed=1, shape=SMALL, variant="varied")[0])
    standard = generate_case(1, seed=0, shape=SMALL)
    for x, y in zip(standard, generate_case(1, seed=0, shape=SMALL, variant="standard"), strict=True):
        np.testing.assert_array_equal(x, y)  # the default is the standard variant
    assert not np.array_equal(a[0], standard[0]) and not np.array_equal(a[1], standard[1])
    np.testing.assert_array_equal(a[2], standard[2])  # same geometry (spacing, origin)


def test_varied_variant_spreads_noise_and_organ_volume_more():
    """Over 12 cases, the varied variant's per-case noise level and liver volume vary more than the standard's."""
    spread = {}
    for variant in ("standard", "varied"):
        noise, liver = [], []
        for i in range(12):
            image, label, _ = generate_case(i, seed=0, shape=(32, 32, 32), variant=variant)
            noise.append(_air_noise_std(image))
            liver.append(int((label == 1).sum()))
        spread[variant] = (np.std(noise), np.std(liver) / np.mean(liver))
    (noise_std, liver_cv), (noise_std_v, liver_cv_v) = spread["standard"], spread["varied"]
    assert 2.5 < noise_std < 4.5, spread  # U(15, 25) HU: sd 2.9
    assert noise_std_v > 3.0 * noise_std, spread  # U(10, 60) HU: sd 14
    assert liver_cv_v > 1.4 * liver_cv, spread


@pytest.mark.parametrize("organ_set", sorted(ORGAN_SETS))
def test_varied_variant_organs_still_stand_out(organ_set):
    """Each organ still differs from its neighbourhood, on the same side as in the standard phantom."""
    contrast: dict[int, dict[str, list[float]]] = {c: {"standard": [], "varied": []} for c in organ_labels(organ_set)}
    del contrast[0]
    for variant in ("standard", "varied"):
        for i in range(6):
            image, label, _ = generate_case(i, seed=0, shape=(32, 32, 32), organ_set=organ_set, variant=variant)
            for c in contrast:
                value = _organ_contrast(image, label, c)
                if value is not None:
                    contrast[c][variant].append(value)
    for c, values in contrast.items():
        name = organ_labels(organ_set)[c]
        standard, varied = np.mean(values["standard"]), np.mean(values["varied"])
        assert abs(varied) > 8.0 and np.sign(varied) == np.sign(standard), (organ_set, name, values)


# ----------------------------------------------------------------------------------------------- organ sets


def test_organ_sets_have_different_label_maps():
    assert len(ORGAN_SETS) >= 3 and {"abdomen", "pelvis", "thorax"} <= set(ORGAN_SETS)
    maps = {name: organ_labels(name) for name in ORGAN_SETS}
    for name, labels in maps.items():
        assert labels[0] == "background" and len(labels) >= 5, name
        assert sorted(labels) == list(range(len(labels)))
        assert set(labels) == {0} | {st.label for st in ORGAN_SETS[name].structures}
    names = [frozenset(v for k, v in m.items() if k) for m in maps.values()]
    assert len(set(names)) == len(names)
    assert maps["abdomen"] == {0: "background", 1: "liver", 2: "spleen", 3: "kidneys", 4: "pancreas"}
    # structure names are unique within a set and clip targets refer to earlier structures
    for spec in ORGAN_SETS.values():
        seen = []
        for st in spec.structures:
            assert st.name not in seen and (st.clip is None or st.clip in seen), (spec.name, st.name)
            seen.append(st.name)
    # different sets render different anatomy for the same seed/index
    _, lab_abd, _ = generate_case(0, shape=SMALL, organ_set="abdomen")
    _, lab_thx, _ = generate_case(0, shape=SMALL, organ_set="thorax")
    assert not np.array_equal(lab_abd, lab_thx) and lab_thx.max() == 5


# ----------------------------------------------------------------------------------------- MSD / dataset.json


def test_dataset_json_msd_layout_and_monai(tmp_path):
    from monai.data import load_decathlon_datalist

    path = generate_dataset(tmp_path / "ds", n=3, n_test=2, seed=0, shape=SMALL, organ_set="thorax", name="My Thorax")
    root = os.path.dirname(path)
    assert os.path.basename(path) == "dataset.json"
    meta = json.loads(open(path).read())
    for key in (
        "name",
        "description",
        "reference",
        "licence",
        "tensorImageSize",
        "modality",
        "labels",
        "numTraining",
        "numTest",
        "training",
        "test",
    ):
        assert key in meta, key
    assert meta["name"] == "My Thorax" and meta["tensorImageSize"] == "3D" and meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {str(k): v for k, v in organ_labels("thorax").items()}
    assert meta["numTraining"] == 3 and meta["numTest"] == 2
    assert meta["training"][0] == {
        "image": "./imagesTr/my_thorax_000.nii.gz",
        "label": "./labelsTr/my_thorax_000.nii.gz",
    }
    assert meta["test"] == ["./imagesTs/my_thorax_003.nii.gz", "./imagesTs/my_thorax_004.nii.gz"]
    assert sorted(os.listdir(os.path.join(root, "labelsTr"))) == [f"my_thorax_00{i}.nii.gz" for i in range(3)]

    train = load_decathlon_datalist(path, True, "training")
    test = load_decathlon_datalist(path, False, "test")
    assert len(train) == 3 and len(test) == 2
    for item in train:
        assert os.path.isfile(item["image"]) and os.path.isfile(item["label"])
    assert all(os.path.isfile(item["image"]) for item in test)
    assert meta["medcl_phantom"]["variant"] == "standard"


def test_dataset_json_records_varied_variant(tmp_path):
    path = generate_dataset(tmp_path, n=1, n_test=1, seed=2, shape=(16, 16, 16), variant="varied")
    meta = json.loads(open(path).read())
    assert meta["medcl_phantom"]["variant"] == "varied" and "varied variant" in meta["description"]
    image, label, _ = generate_case(1, seed=2, shape=(16, 16, 16), variant="varied")  # the unlabelled test case
    np.testing.assert_array_equal(_load(str(tmp_path / "imagesTs" / "phantomabdomen_001.nii.gz"))[0], np.round(image))


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_main_writes_dataset(tmp_path, capsys):
    out = tmp_path / "cli"
    main(
        ["--out", str(out), "--n", "2", "--n_test", "1", "--seed", "4", "--shape", "16,16,12", "--organ_set", "pelvis"]
    )
    printed = capsys.readouterr().out
    assert "dataset.json" in printed and "bladder" in printed and "2 training" in printed
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["name"] == "PhantomPelvis"
    image, _ = _load(str(out / "imagesTr" / "phantompelvis_001.nii.gz"))
    assert image.shape == (16, 16, 12)
    main(["--out", str(tmp_path / "cli3"), "--n", "1", "--n_test", "0", "--shape", "16,16,16", "--variant", "varied"])
    assert "varied variant" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli3" / "dataset.json").read_text())["medcl_phantom"]["variant"] == "varied"
    main(["--out", str(tmp_path / "cli2"), "--n", "1", "--n_test", "0", "--shape", "[16,12,10]"])
    assert _load(str(tmp_path / "cli2" / "labelsTr" / "phantomabdomen_000.nii.gz"))[0].shape == (16, 12, 10)


def test_cli_python_dash_m(tmp_path, monkeypatch, capsys):
    """``python -m medcl.data.phantom ...`` (run in-process: a subprocess would re-import MONAI, ~10 s)."""
    out = tmp_path / "sub"
    argv = ["phantom", "--out", str(out), "--n", "1", "--n_test", "1", "--shape", "[16,16,16]", "--seed", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules" (module already imported)
        runpy.run_module("medcl.data.phantom", run_name="__main__")
    assert "dataset.json" in capsys.readouterr().out
    assert (out / "imagesTr" / "phantomabdomen_000.nii.gz").is_file()
    assert (out / "imagesTs" / "phantomabdomen_001.nii.gz").is_file()


# --------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"organ_set": "brain"}, "valid organ sets: abdomen, pelvis, thorax"),
        ({"n": 0}, "n must be an integer >= 1"),
        ({"n_test": -1}, "n_test must be an integer >= 0"),
        ({"seed": -3}, "seed must be an integer >= 0"),
        ({"shape": (32, 32)}, "3 positive integers"),
        ({"shape": (32, 0, 32)}, "3 positive integers"),
        ({"shape": "32,32"}, "3 positive integers"),
        ({"shape": "big"}, "3 positive integers"),
        ({"shape": (32, 32, 4)}, "at least 8"),
        ({"variant": "foo"}, "unknown variant 'foo'; valid variants: standard, varied"),
        ({"variant": None}, "valid variants: standard, varied"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path, **{"n": 1, "n_test": 0, "shape": SMALL, **kwargs})
    assert not (tmp_path / "dataset.json").exists()


def test_bad_arguments_generate_case_and_cli(tmp_path):
    with pytest.raises(ValueError, match="index"):
        generate_case(-1)
    with pytest.raises(ValueError, match="unknown organ_set 'knee'"):
        organ_labels("knee")
    with pytest.raises(ValueError, match="valid organ sets"):
        main(["--out", str(tmp_path), "--organ_set", "knee"])
    with pytest.raises(ValueError, match="n must be"):
        main(["--out", str(tmp_path), "--n", "0"])
    with pytest.raises(ValueError, match="3 positive integers"):
        main(["--out", str(tmp_path), "--shape", "32,32"])
    with pytest.raises(ValueError, match="unknown variant 'foo'"):
        generate_case(0, variant="foo")
    with pytest.raises(MedclInputError, match=r"^unknown variant 'foo'; valid variants: standard, varied$"):
        main(["--out", str(tmp_path / "bad"), "--n", "1", "--variant", "foo"])
    assert not (tmp_path / "bad").exists()  # checked before anything is written
