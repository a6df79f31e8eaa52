r"""Cost (and effect) of the dense CRF on pseudo-labels: seconds per volume of medcl.inferers.crf_refine.

python scripts/bench_crf.py --dataset_dir data/phantom_st --cases 3 --threads 1

Each case: the phantom's CT volume (window [-175, 250] HU scaled to [0, 1]) and "network" logits made from its
true label (4 * one-hot + Gaussian noise of sd ``noise``, smoothed), refined with each setting; prints the CPU time
per volume and the mean foreground Dice of the argmax before and after against the true label.
"""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from medcl.inferers.crf import CODE_CRF_KWARGS, crf_refine

_BUNDLE_CRF = json.loads(
    (Path(__file__).resolve().parents[1] / "bundles/localcl_selftrain/configs/train.json").read_text()
)["crf_kwargs"]
SETTINGS = {
    "bundle default (crf_kwargs of localcl train.json), 2D slices": {
        **{k: v for k, v in _BUNDLE_CRF.items() if k not in ("backend", "slice_axis")},
        "slice_axis": 2,
    },
    "crf_refine defaults (MONAI-style), 2D slices": {"slice_axis": 2},
    "crf_refine defaults (MONAI-style), 3D": {},
    "public code's settings (CODE_CRF_KWARGS), 2D slices": {**CODE_CRF_KWARGS, "slice_axis": 2},
}


def _dice(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> float:
    out = []
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        if int(t.sum()) == 0:
            continue
        out.append(2 * float((p & t).sum()) / (float(p.sum()) + float(t.sum())))
    return float(np.mean(out))


def main(dataset_dir: str = "data/phantom_st", cases: int = 3, threads: int = 1, noise: float = 3.0, seed: int = 0):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    images = sorted(glob.glob(os.path.join(dataset_dir, "imagesTr", "*.nii.gz")))[:cases]
    rows: dict[str, list] = {k: [] for k in SETTINGS}
    base = []
    for path in images:
        img = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        lab = np.asarray(nib.load(path.replace("imagesTr", "labelsTr")).dataobj).astype(np.int64)
        image = torch.from_numpy(np.clip((img + 175.0) / 425.0, 0, 1))[None, None]
        truth = torch.from_numpy(lab)
        k = int(truth.max()) + 1
        onehot = F.one_hot(truth, k).permute(3, 0, 1, 2)[None].float()
        logits = 4 * onehot + noise * torch.randn(onehot.shape, generator=g)
        logits = F.avg_pool3d(logits, 3, stride=1, padding=1)  # spatially correlated errors
        base.append(_dice(logits.argmax(1)[0], truth, k))
        for name, kw in SETTINGS.items():
            t0 = time.process_time()
            prob = crf_refine(logits, image, backend="torch", **kw)
            dt = time.process_time() - t0
            rows[name].append((dt, _dice(prob.argmax(1)[0], truth, k)))
    shape = tuple(image.shape[2:])
    print(f"{len(images)} volumes {shape}, {threads} thread(s), torch {torch.__version__}")
    print(f"no CRF: foreground Dice {np.mean(base):.3f}")
    for name, vals in rows.items():
        t = np.array([v[0] for v in vals])
        d = np.mean([v[1] for v in vals])
        print(f"{name}: {t.mean():.2f} s / volume (min {t.min():.2f}), foreground Dice {d:.3f}")


if __name__ == "__main__":
    fire.Fire(main)
