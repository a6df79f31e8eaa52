"""Cost of the per-term gradient norms (medcl.handlers.TermGradNormHandler) against one MixCL pre-training step.

    python scripts/bench_grad_norms.py                     # UNETR at the CPU benchmark width, 32³ patches
    python scripts/bench_grad_norms.py --size 64 --repeats 6

Times, interleaved and in process time (so background load hits both alike): (a) one MixCL step with its backward,
(b) the same step followed by the handler's per-term ``torch.autograd.grad`` passes. ``(b - a) / a`` is the cost of
one measurement relative to one step; the handler measures once per epoch, so its share of an epoch is that ratio
divided by the epoch length.
"""

from __future__ import annotations

import statistics
import time

import fire
import torch
from monai.networks.nets import UNETR

from medcl.engines import MixCLStep
from medcl.handlers import TermGradNormHandler
from medcl.networks.mixcl import MixCLPretrainModel

WIDTH = {"feature_size": 8, "hidden_size": 192, "mlp_dim": 384, "num_heads": 4}


def _batch(size: int, batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 1, size, size, size, generator=g)
    image_2 = torch.rand(batch, 1, size, size, size, generator=g)
    label = torch.zeros(batch, 1, size, size, size)
    label[:, :, size // 8 : size // 2, size // 8 : size // 2, size // 4 : 3 * size // 4] = 1
    label[:, :, size // 2 : 7 * size // 8, size // 2 : 7 * size // 8, size // 4 : 3 * size // 4] = 2
    return {
        "view_1": image + 0.1 * torch.randn(image.shape, generator=g),
        "view_1p": image * 0.9 + 0.05,
        "view_2": image_2,
        "image": image,
        "image_2": image_2,
        "label": label,
        "label_2": label.flip(2),
        "dataset_id": torch.zeros(batch, dtype=torch.long),
    }


def main(size: int = 32, batch: int = 2, repeats: int = 5, threads: int = 1) -> dict:
    """Print and return the median step time, the median step + gradient-norm time and their ratio."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    network = MixCLPretrainModel(UNETR(1, 1, (size,) * 3, **WIDTH))
    step, handler = MixCLStep(num_per_class=32), TermGradNormHandler()
    data = _batch(size, batch)

    def plain() -> None:
        network.zero_grad()
        step(network, data)["loss"].backward()

    def measured() -> None:
        network.zero_grad()
        terms = step(network, data)
        handler.compute(network, terms, step.term_weights)
        terms["loss"].backward()

    times: dict[str, list[float]] = {"step": [], "step_and_norms": []}
    plain(), measured()  # warm-up
    for _ in range(repeats):
        for name, fn in (("step", plain), ("step_and_norms", measured)):
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    a, b = statistics.median(times["step"]), statistics.median(times["step_and_norms"])
    result = {"size": size, "step_s": round(a, 3), "step_and_norms_s": round(b, 3), "extra_per_step": (b - a) / a}
    print(
        f"MixCL step {a:.3f} s, with per-term gradient norms {b:.3f} s: one measurement costs "
        f"{(b - a) / a:.2f} steps (once per epoch: {100 * (b - a) / a / 20:.1f} % of a 20-iteration epoch, "
        f"{100 * (b - a) / a / 250:.2f} % of a 250-iteration one); {size}³, batch {batch}, {threads} thread(s)"
    )
    return result


if __name__ == "__main__":
    fire.Fire(main)
