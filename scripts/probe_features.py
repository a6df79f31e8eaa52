"""Probe frozen per-pixel features of a bundle's network: pre-trained vs random init vs raw intensity.

    python scripts/probe_features.py --bundle macl --dataset_dir data/phantom \\
        --ckpts "{'macl_s0': 'scripts/benchmark_results/macl_phantom_v2/pretrain/macl_s0/models/pretrained.pt'}"

The bundle's ``train.json`` gives the network (``network_def``), the split (``splits``, with ``--num_labelled``,
``--seed``, ``--test_fraction`` as in the benchmark) and the deterministic preprocessing
(``preprocessing_transforms``). Probes are fitted on pixels of the **labelled** training volumes' slices and scored
on the **validation** volumes' slices (never the test split): k-NN and linear probe balanced accuracy of
``--layer`` (default for MACL: the deepest pre-trained decoder block), for each checkpoint (loaded into the parts
the bundle's fine-tuning loads: ``medcl.networks.macl.pretrained_prefixes`` for MACL, all keys otherwise), for
the same network at random init (``--seed``), and for the image intensity alone (each pixel's 5 x 5
neighbourhood). Features are standardised by the fitting pixels' mean and sd before both probes. One JSON line
per row; see ``medcl.metrics.feature_probe``. Runs on CPU in about a minute at the phantom's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import torch
from monai.bundle import ConfigParser
from monai.data import Dataset
from monai.transforms import Compose, DivisiblePadd

from medcl.metrics.feature_probe import (
    balanced_accuracy,
    knn_predict,
    layer_features,
    linear_probe_predict,
    sample_pixels,
)
from medcl.networks.pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LAYER = {"macl": "upcat_3"}


def _slices(parser: ConfigParser, items: list[dict], slice_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed volumes cut into 2D slices that hold foreground: ``(N, 1, H, W)`` images and labels."""
    pad = DivisiblePadd(keys=["image", "label"], k=16)
    data = Dataset(items, Compose([*parser.get_parsed_content("preprocessing_transforms"), pad]))
    images, labels = [], []
    for item in data:
        img, lab = (torch.as_tensor(item[k]).movedim(slice_axis + 1, 0) for k in ("image", "label"))
        keep = lab.flatten(1).amax(1) > 0
        images.append(img[keep].float())  # (slices, 1, H, W)
        labels.append(lab[keep].long())
    # volumes differ in-plane after the foreground crop: pad every slice to the largest
    h = max(t.shape[-2] for t in images)
    w = max(t.shape[-1] for t in images)

    def fit(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]))

    return torch.cat([fit(t) for t in images]), torch.cat([fit(t) for t in labels])


def _patches(images: torch.Tensor, size: int = 5) -> torch.Tensor:
    """Each pixel's ``size`` x ``size`` intensity neighbourhood as channels: ``(N, size², H, W)``."""
    n, _, h, w = images.shape
    return torch.nn.functional.unfold(images, size, padding=size // 2).reshape(n, size * size, h, w)


def _probe(name: str, train: torch.Tensor, train_lab, val: torch.Tensor, val_lab, per_class, k, seed) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tx, ty = sample_pixels(train, train_lab, per_class, gen)
    vx, vy = sample_pixels(val, val_lab, per_class, gen)
    # standardised by the fitting pixels, so that cosine k-NN compares patterns, not the common offset
    mean, std = tx.mean(0), tx.std(0).clamp_min(1e-6)
    tx, vx = (tx - mean) / std, (vx - mean) / std
    knn, knn_per = balanced_accuracy(knn_predict(tx, ty, vx, k=k), vy)
    lin, lin_per = balanced_accuracy(linear_probe_predict(tx, ty, vx, seed=seed), vy)
    return {
        "features": name,
        "channels": int(train.shape[1]),
        "knn_balanced_acc": round(knn, 4),
        "linear_balanced_acc": round(lin, 4),
        "knn_recall": {c: round(v, 3) for c, v in knn_per.items()},
        "linear_recall": {c: round(v, 3) for c, v in lin_per.items()},
    }


def main(
    bundle: str = "macl",
    dataset_dir: str = "data/phantom",
    ckpts: dict | None = None,
    layer: str | None = None,
    num_labelled: int = 2,
    seed: int = 0,
    test_fraction: float = 0.2,
    per_class: int = 400,
    k: int = 10,
    overrides: dict | None = None,
) -> None:
    """Print one JSON line per feature set (see the module docstring).

    Args:
        bundle: folder under ``bundles/``.
        dataset_dir: MSD-style dataset.
        ckpts: ``{name: checkpoint path}`` to probe (pre-trained or fine-tuned weights of the bundle's network).
        layer: module of ``network_def`` whose output is probed (default: the bundle's entry of ``DEFAULT_LAYER``).
        num_labelled, seed, test_fraction: the split, as the benchmark's cell (``seed`` also seeds the random init
            and the pixel draws).
        per_class: pixels drawn per class for fitting and for scoring.
        k: neighbours of the k-NN probe.
        overrides: other ``train.json`` keys, e.g. ``{"features": [...]}`` for a network of another width.
    """
    layer = layer or DEFAULT_LAYER.get(bundle)
    if layer is None:
        raise SystemExit(f"--layer is needed for bundle {bundle!r} (a module name of its network_def)")
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
    parser.update(
        {
            "dataset_dir": str(Path(dataset_dir).resolve()),
            "num_labelled": num_labelled,
            "seed": seed,
            "test_fraction": test_fraction,
            **(overrides or {}),
        }
    )
    splits = parser.get_parsed_content("splits")
    slice_axis = int(parser.get_parsed_content("slice_axis"))
    train, train_lab = _slices(parser, splits["labelled"], slice_axis)
    val, val_lab = _slices(parser, splits["val"], slice_axis)
    meta = {"bundle": bundle, "layer": layer, "train_slices": len(train), "val_slices": len(val), "seed": seed}

    def network() -> torch.nn.Module:
        torch.manual_seed(seed)
        return parser.get_parsed_content("network_def", instantiate=True, lazy=False)

    def probe_network(name: str, net: torch.nn.Module) -> dict:
        feats = (layer_features(net, train, layer), layer_features(net, val, layer))
        return _probe(name, feats[0], train_lab, feats[1], val_lab, per_class, k, seed)

    rows = [_probe("intensity_5x5", _patches(train), train_lab, _patches(val), val_lab, per_class, k, seed)]
    rows.append(probe_network("random_init", network()))
    for name, path in (ckpts or {}).items():
        net = network()
        prefixes = None
        if bundle == "macl":
            from medcl.networks.macl import pretrained_prefixes

            prefixes = pretrained_prefixes(net)
        load_pretrained(net, path, prefixes=prefixes, strict=prefixes is not None)
        rows.append(probe_network(name, net) | {"checkpoint": str(path)})
    for row in rows:
        print(json.dumps(meta | row), flush=True)


if __name__ == "__main__":
    fire.Fire(main)
