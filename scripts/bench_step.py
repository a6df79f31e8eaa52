"""Cost harness, one process per method: (a) the method's pre-training step vs (b) the same network passes with a
trivial loss vs (c) the scratch supervised step on the same backbone and input size; plus the memory its losses
allocate as the sample budget grows.

    python scripts/bench_step.py                         # every method at its CPU benchmark size
    python scripts/bench_step.py --method macl --size 128 --repeats 10
    python scripts/bench_step.py --method mixcl --size 96 --width paper   # the paper's UNETR (a GPU)
    python scripts/bench_step.py --method localcl --size 192              # the public code's ACDC slice size

The three steps are timed interleaved (so background load hits them alike); CPU uses process time, CUDA uses
events. Ratios are what matter: ``a / b`` is the losses' overhead (goal <= 1.10), ``a / c`` the cost against
training from scratch.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import fire
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
VIEWS = ("view_i1", "view_i2", "view_v1", "view_v2")
MIXCL_VIEWS = ("view_1", "view_1p", "view_2")
#: UNETR widths: the CPU benchmark's narrow one and the paper's.
UNETR_WIDTHS = {
    "cpu": {"feature_size": 8, "hidden_size": 192, "mlp_dim": 384, "num_heads": 4},
    "paper": {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12},
}


def _timer(device: torch.device):
    if device.type == "cuda":

        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
    else:

        def run(fn):
            t0 = time.process_time()
            fn()
            return time.process_time() - t0

    return run


def _allocation_kind(device: torch.device) -> str:
    """What :func:`_allocated_bytes` measures on ``device``, for the printed reports."""
    return "peak" if device.type == "cuda" else "sum of allocations, an upper bound of the peak"


def _allocated_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs (CUDA), or the sum of allocations the profiler sees (CPU, an upper
    bound); :func:`_allocation_kind` names which."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())


def _time_steps(steps: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each step, two warm-ups each, timed interleaved."""
    timer = _timer(device)
    for fn in steps.values():
        fn()
        fn()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            times[name].append(timer(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _report(method: str, med: dict[str, float]) -> None:
    print("median step seconds: " + ", ".join(f"{k} {v:.4f}" for k, v in med.items()))
    print(f"{method} / trivial-loss passes = {med[method] / med['trivial']:.3f}   (loss overhead, goal <= 1.10)")
    print(f"{method} / scratch supervised  = {med[method] / med['scratch']:.3f}")


def _parser(bundle: str, config: str, device: str, dataset_dir: str, **updates) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / config))
    parser.update({"dataset_dir": dataset_dir, "device": f"$torch.device('{device}')", **updates})
    return parser


def bench_macl(size: int, repeats: int, dev: torch.device, dataset_dir: str) -> None:
    """MACL at the bundle's defaults (2D BasicUNet, batch 2 x 8 slices of ``size``²)."""
    parser = _parser("macl", "pretrain.json", dev.type, dataset_dir)
    net, step = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    batch_size = parser.get_parsed_content("batch_size") * parser.get_parsed_content("samples_per_volume")
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.rand(batch_size, 1, size, size, generator=g).to(dev) for k in VIEWS}
    batch["position"] = torch.rand(batch_size, generator=g).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def macl():
        opt.zero_grad()
        step(net, batch)["loss"].backward()
        opt.step()

    def trivial():
        opt.zero_grad()
        sum(v.sum() for v in net(*(batch[k] for k in VIEWS)).values()).backward()
        opt.step()

    seg = parser.get_parsed_content("network_def", lazy=False).to(dev)  # a fresh copy of the same backbone
    seg_opt = torch.optim.Adam(seg.parameters(), lr=5e-4)
    x = torch.rand(batch_size, 1, size, size, generator=g).to(dev)
    y = torch.randint(0, parser.get_parsed_content("num_classes"), (batch_size, size, size), generator=g).to(dev)

    def scratch():
        seg_opt.zero_grad()
        F.cross_entropy(seg(x), y).backward()
        seg_opt.step()

    print(f"[macl] device {dev}, batch {batch_size} x 1 x {size}², repeats {repeats}")
    _report("macl", _time_steps({"macl": macl, "trivial": trivial, "scratch": scratch}, dev, repeats))

    with torch.no_grad():
        outs = net(*(batch[k] for k in VIEWS))
    outs = {k: v.detach().requires_grad_() for k, v in outs.items()}

    def losses_only():
        step.losses(outs, batch["position"])["loss"].backward()

    def dense_only():
        step.loss_d(outs["z_l_aux"], outs["z_l_dom"], batch["position"]).backward()

    print(
        f"losses fwd+bwd allocate {_allocated_bytes(losses_only, dev) / 2**20:.2f} MiB; "
        f"L_d alone {_allocated_bytes(dense_only, dev) / 2**20:.2f} MiB "
        f"(maps {tuple(outs['z_l_aux'].shape)}; {_allocation_kind(dev)})"
    )


def _blocky_labels(n: int, size: int, classes: int, g: torch.Generator, spatial_dims: int = 3) -> torch.Tensor:
    """``(n, 1, size, ...)`` labels made of random 8-voxel blocks (organ-like regions with boundaries), 2D or 3D."""
    coarse = torch.randint(0, classes, (n, 1, *(max(1, size // 8),) * spatial_dims), generator=g).float()
    return F.interpolate(coarse, size=(size,) * spatial_dims, mode="nearest").long()


def bench_mixcl(
    size: int,
    repeats: int,
    dev: torch.device,
    dataset_dir: str,
    width: str = "cpu",
    budgets: tuple = (16, 64, 256, 1024),
) -> None:
    """MixCL: UNETR on ``size``³ patches (width ``cpu`` or ``paper``), batch 2 patches -> 6 views per step."""
    widths = UNETR_WIDTHS[width]
    parser = _parser("mixcl", "pretrain.json", dev.type, dataset_dir, patch_size=[size] * 3, **widths)
    net, step = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    n = parser.get_parsed_content("batch_size") * parser.get_parsed_content("samples_per_volume")
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.rand(n, 1, size, size, size, generator=g).to(dev) for k in (*MIXCL_VIEWS, "image", "image_2")}
    batch.update({k: _blocky_labels(n, size, 4, g).to(dev) for k in ("label", "label_2")})
    batch["dataset_id"] = torch.arange(n).remainder(2).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def mixcl():
        opt.zero_grad()
        step(net, batch)["loss"].backward()
        opt.step()

    def trivial():
        opt.zero_grad()
        out = net(torch.cat([batch[k] for k in MIXCL_VIEWS]))
        (out["recon"].sum() + sum(z.sum() for z in out["z"])).backward()
        opt.step()

    train = _parser("mixcl", "train.json", dev.type, dataset_dir, patch_size=[size] * 3, **widths)
    seg = train.get_parsed_content("network_def", lazy=False).to(dev)
    seg_opt = torch.optim.AdamW(seg.parameters(), lr=1e-4)
    x = batch["view_1"]
    y = _blocky_labels(n, size, train.get_parsed_content("num_classes"), g)[:, 0].to(dev)

    def scratch():
        seg_opt.zero_grad()
        F.cross_entropy(seg(x), y).backward()
        seg_opt.step()

    print(
        f"[mixcl] device {dev}, UNETR width {width} {widths}, batch {n} patches x 3 views of {size}³, repeats {repeats}"
    )
    _report("mixcl", _time_steps({"mixcl": mixcl, "trivial": trivial, "scratch": scratch}, dev, repeats))

    with torch.no_grad():
        out = net(torch.cat([batch[k] for k in MIXCL_VIEWS]))
    z = out["z"][step.label_layer].detach()
    z1, z2 = z[:n].clone().requires_grad_(), z[2 * n :].clone().requires_grad_()
    kind = _allocation_kind(dev)
    for r in budgets:
        step.sampler.num_per_class = int(r)
        nbytes = _allocated_bytes(
            lambda: step.label_term(z1, batch["label"], z2, batch["label_2"], batch["dataset_id"]).backward(), dev
        )
        print(
            f"L_label fwd+bwd with r = {r:5d} pixels per class: {nbytes / 2**20:8.2f} MiB "
            f"({kind}; map {tuple(z1.shape)})"
        )


def bench_localcl(
    size: int, repeats: int, dev: torch.device, dataset_dir: str, budgets: tuple = (3, 10, 30, 100)
) -> None:
    """Local contrastive self-training (a round's step): 2D BasicUNet + head, labelled + pseudo-labelled slices."""
    parser = _parser("localcl_selftrain", "train.json", dev.type, dataset_dir, spatial_dims=2)
    net, step = parser.get_parsed_content("network"), parser.get_parsed_content("step")
    n = parser.get_parsed_content("batch_size") * parser.get_parsed_content("samples_per_volume")
    classes = parser.get_parsed_content("num_classes")
    g = torch.Generator().manual_seed(0)
    batch = {
        part: {
            "image": torch.rand(n, 1, size, size, generator=g).to(dev),
            "label": _blocky_labels(n, size, classes, g, spatial_dims=2).to(dev),
        }
        for part in ("labelled", "unlabelled")
    }
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x_all = torch.cat([batch["labelled"]["image"], batch["unlabelled"]["image"]])

    def localcl():
        opt.zero_grad()
        step(net, batch)["loss"].backward()
        opt.step()

    def trivial():
        opt.zero_grad()
        logits, z = net(x_all, return_embeddings=True)
        (logits.sum() + z.sum()).backward()
        opt.step()

    seg = parser.get_parsed_content("backbone_def", lazy=False).to(dev)  # a fresh copy of the same backbone
    seg_opt = torch.optim.Adam(seg.parameters(), lr=1e-3)
    seg_loss = parser.get_parsed_content("seg_loss")

    def scratch():  # the labelled-only supervised step (what the baseline phase does, without the head)
        seg_opt.zero_grad()
        seg_loss(seg(batch["labelled"]["image"]), batch["labelled"]["label"]).backward()
        seg_opt.step()

    print(f"[localcl] device {dev}, batch {n} labelled + {n} pseudo-labelled x 1 x {size}², repeats {repeats}")
    _report("localcl", _time_steps({"localcl": localcl, "trivial": trivial, "scratch": scratch}, dev, repeats))

    with torch.no_grad():
        _, z = net(x_all, return_embeddings=True)
    z = z.detach().requires_grad_()
    y = torch.cat([batch["labelled"]["label"], batch["unlabelled"]["label"]])
    pairs = step.random_pairs(z.shape[0], z.device)
    kind = _allocation_kind(dev)
    for r in budgets:
        step.local_loss.num_anchors = int(r)
        nbytes = _allocated_bytes(lambda: step.local_loss(z, y, pairs).backward(), dev)
        print(
            f"L_local fwd+bwd with {r:4d} anchors per class and image: {nbytes / 2**20:8.2f} MiB "
            f"({kind}; map {tuple(z.shape)})"
        )


def main(
    method: str = "all",
    size: int | None = None,
    repeats: int = 8,
    width: str = "cpu",
    device: str = "cuda" if torch.cuda.is_available() else "cpu",
    threads: int = 1,
    dataset_dir: str = str(REPO / "data" / "phantom"),
) -> None:
    """Print median step times, their ratios and the losses' memory.

    Args:
        method: ``macl``, ``mixcl``, ``localcl`` or ``all``.
        size: input size (2D slice side for MACL and local CL, default 64; 3D patch side for MixCL, default 32).
        repeats: timed repetitions of each step after two warm-ups.
        width: MixCL's UNETR width, ``cpu`` (the CPU benchmark's) or ``paper``.
        device: ``cpu`` or ``cuda``.
        threads: CPU threads (1 gives the steadiest CPU timings).
        dataset_dir: a dataset whose dataset.json sets the number of classes.
    """
    torch.set_num_threads(threads)
    dev = torch.device(device)
    if method not in ("macl", "mixcl", "localcl", "all"):
        raise SystemExit(f"--method must be macl, mixcl, localcl or all, got {method!r}")
    print(f"threads {threads}")
    if method in ("macl", "all"):
        bench_macl(size or 64, repeats, dev, dataset_dir)
    if method in ("mixcl", "all"):
        bench_mixcl(size or 32, repeats, dev, dataset_dir, width)
    if method in ("localcl", "all"):
        bench_localcl(size or 64, repeats, dev, dataset_dir)


if __name__ == "__main__":
    fire.Fire(main)
