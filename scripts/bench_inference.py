"""Whole-volume 2D inference cost: MONAI's SliceInferer (medcl < 0.2) vs SliceBatchInferer vs one bare network call.

    python scripts/bench_inference.py                              # every bundle's 2D network, 64 x 64 x 48
    python scripts/bench_inference.py --shape "[512,512,200]" --repeats 1 --network_chunk 16

Each bundle's ``network_def`` from its ``inference.json`` (2D, 5 classes, in-plane window = the volume's slice, so
one window per slice) predicts one random volume three ways, timed interleaved in process time with
``torch.no_grad``: (a) ``SliceInferer(sw_batch_size=4)``, what every bundle used before; (b)
``SliceBatchInferer(slice_batch_size)``, what ``medcl.inferers.volume_inferer`` returns now; (c) the network on all
slices in one call, the floor. Prints one JSON line per bundle with the medians, ``a / b`` (the speed-up) and
``b / c`` (what is left above the network's own cost), and the peak resident memory of the process.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import fire
import torch
from monai.bundle import ConfigParser
from monai.inferers import SliceInferer

from medcl.inferers.volume import SliceBatchInferer

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("scratch_baseline", "macl", "localcl_selftrain", "mixcl")


def _network(bundle: str, roi: tuple[int, int]) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    parser.update({"num_classes": 5, "spatial_dims": 2, "patch_size": list(roi)})
    return parser.get_parsed_content("network_def", instantiate=True).eval()


def _network_only(net: torch.nn.Module, volume: torch.Tensor, chunk: int) -> None:
    slices = volume[0].permute(3, 0, 1, 2)
    step = chunk or slices.shape[0]
    for start in range(0, slices.shape[0], step):
        net(slices[start : start + step])


def main(
    shape: tuple = (64, 64, 48),
    bundles: tuple = BUNDLES,
    slice_batch_size: int = 8,
    repeats: int = 3,
    threads: int = 1,
    network_chunk: int = 0,
) -> None:
    """Print one JSON line per bundle (see the module docstring).

    Args:
        shape: the volume's (X, Y, Z); slices are axial (the last axis).
        bundles: folders under ``bundles/``.
        slice_batch_size: slices per call of ``SliceBatchInferer``.
        repeats: timed rounds (medians are reported).
        threads: torch CPU threads.
        network_chunk: slices per call of the floor (c); 0: all in one call (at 512 x 512 x 200 that needs tens of
            GiB: give e.g. 16).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, y, z = (int(s) for s in shape)
    volume = torch.rand(1, 1, x, y, z)
    rows = []
    for bundle in bundles:
        net = _network(bundle, (x, y))
        ways = {
            "slice_inferer_s": lambda n=net: SliceInferer(
                spatial_dim=2, roi_size=(x, y), sw_batch_size=4, overlap=0.25, mode="gaussian"
            )(volume, n),
            "slice_batch_s": lambda n=net: SliceBatchInferer((x, y), 2, slice_batch_size)(volume, n),
            "network_only_s": lambda n=net: _network_only(n, volume, network_chunk),
        }
        times: dict[str, list[float]] = {k: [] for k in ways}
        with torch.no_grad():
            for _ in range(repeats):
                for name, fn in ways.items():
                    t0 = time.process_time()
                    fn()
                    times[name].append(time.process_time() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "bundle": bundle,
            "shape": [x, y, z],
            **{k: round(v, 3) for k, v in med.items()},
            "speedup": round(med["slice_inferer_s"] / med["slice_batch_s"], 2),
            "above_network": round(med["slice_batch_s"] / med["network_only_s"], 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "threads": threads,
            "slice_batch_size": slice_batch_size,
            "network_chunk": network_chunk,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return None


if __name__ == "__main__":
    fire.Fire(main)
