"""MACL cost, measured in one process: pre-training step vs the same network passes with a trivial loss vs the
scratch supervised step on the same backbone and input size; plus the memory the losses allocate.

    python scripts/bench_macl_step.py                       # bundle defaults (2D, 64², batch 2 x 8 slices)
    python scripts/bench_macl_step.py --size 128 --repeats 10

The three steps are timed interleaved (so background load hits them alike); CPU uses process time, CUDA uses
events. Ratios are what matter: ``macl / trivial`` is the losses' overhead (goal <= 1.10).
"""

from __future__ import annotations

import statistics
import time

import fire
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VIEWS = ("view_i1", "view_i2", "view_v1", "view_v2")


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(); fn(); end.record(); torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
    else:
        def run(fn):
            t0 = time.process_time(); fn(); return time.process_time() - t0
    return run


def _allocated_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs (CUDA), or the sum of allocations the profiler sees (CPU, an upper bound)."""
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        fn(); torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())


def main(size: int = 64, repeats: int = 8, device: str = "cuda" if torch.cuda.is_available() else "cpu",
         threads: int = 1, dataset_dir: str = str(REPO / "data" / "phantom")) -> None:
    """Print median step times, their ratios and the losses' memory for the MACL bundle's default network.

    Args:
        size: slice size (2D) fed to every step.
        repeats: timed repetitions of each step after two warm-ups.
        device: ``cpu`` or ``cuda``.
        threads: CPU threads (1 gives the steadiest CPU timings).
        dataset_dir: a dataset whose dataset.json sets the number of classes.
    """
    torch.set_num_threads(threads)
    dev = torch.device(device)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "macl" / "configs" / "pretrain.json"))
    parser.update({"dataset_dir": dataset_dir, "device": f"$torch.device('{device}')"})
    net, step = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    batch_size = parser.get_parsed_content("batch_size") * parser.get_parsed_content("samples_per_volume")
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.rand(batch_size, 1, size, size, generator=g).to(dev) for k in VIEWS}
    batch["position"] = torch.rand(batch_size, generator=g).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def macl():
        opt.zero_grad(); step(net, batch)["loss"].backward(); opt.step()

    def trivial():
        opt.zero_grad(); sum(v.sum() for v in net(*(batch[k] for k in VIEWS)).values()).backward(); opt.step()

    seg = parser.get_parsed_content("network_def", lazy=False).to(dev)  # a fresh copy of the same backbone
    seg_opt = torch.optim.Adam(seg.parameters(), lr=5e-4)
    x = torch.rand(batch_size, 1, size, size, generator=g).to(dev)
    y = torch.randint(0, parser.get_parsed_content("num_classes"), (batch_size, size, size), generator=g).to(dev)

    def scratch():
        seg_opt.zero_grad(); F.cross_entropy(seg(x), y).backward(); seg_opt.step()

    timer, steps = _timer(dev), {"macl": macl, "trivial": trivial, "scratch": scratch}
    for fn in steps.values():
        fn(); fn()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            times[name].append(timer(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {device}, threads {threads}, batch {batch_size} x 1 x {size}², repeats {repeats}")
    print("median step seconds: " + ", ".join(f"{k} {v:.4f}" for k, v in med.items()))
    print(f"MACL / trivial-loss passes = {med['macl'] / med['trivial']:.3f}   (loss overhead, goal <= 1.10)")
    print(f"MACL / scratch supervised  = {med['macl'] / med['scratch']:.3f}")

    with torch.no_grad():
        outs = net(*(batch[k] for k in VIEWS))
    outs = {k: v.detach().requires_grad_() for k, v in outs.items()}

    def losses_only():
        step.losses(outs, batch["position"])["loss"].backward()

    def dense_only():
        step.loss_d(outs["z_l_aux"], outs["z_l_dom"], batch["position"]).backward()

    print(f"losses fwd+bwd allocate {_allocated_bytes(losses_only, dev) / 2**20:.2f} MiB; "
          f"L_d alone {_allocated_bytes(dense_only, dev) / 2**20:.2f} MiB "
          f"(maps {tuple(outs['z_l_aux'].shape)}; {'peak' if dev.type == 'cuda' else 'sum of allocations, an upper bound of the peak'})")


if __name__ == "__main__":
    fire.Fire(main)
