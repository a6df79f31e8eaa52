"""What the benchmark runs: the methods (a bundle and its overrides) and the size presets."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["METHODS", "PRESETS", "STRONG_RECIPE", "Method"]


@dataclass(frozen=True)
class Method:
    """
    One benchmark entry: a bundle of ``bundles/`` and how to run it.

    Attributes:
        name: the entry's name on the command line and in the tables.
        bundle: folder name under ``bundles/``.
        backbone: the segmentation network, for the tables.
        pretrain: run ``configs/pretrain.json`` once per seed before fine-tuning (reused across fractions).
        train: overrides of the fine-tuning run (``train.json``).
        pretrain_overrides: overrides of the pre-training run only.
        baseline: the entry this one is compared with (same backbone and recipe from random init), for the Δ
            columns; None for a baseline itself.
        pretrain_from: another entry whose pre-training (same seed) this one fine-tunes from, instead of its own.
    """

    name: str
    bundle: str
    backbone: str
    pretrain: bool = False
    train: dict = field(default_factory=dict)
    pretrain_overrides: dict = field(default_factory=dict)
    baseline: str | None = None
    pretrain_from: str | None = None


#: The scratch bundle's recipe (DiceCE with equal weights, AdamW 3e-3, weight decay 1e-5, cosine to 1e-6), applied to
#: another bundle's fine-tuning: a method must also win against its control under the strongest recipe, not only
#: under its paper's (issue 14, "strongest fair recipe").
STRONG_RECIPE = {
    "optimizer#_target_": "torch.optim.AdamW",
    "learning_rate": 0.003,
    "weight_decay": 1e-5,
    "min_learning_rate": 1e-6,
    "dice_weight": 1.0,
}

#: Every method bundle, its random-init control and MixCL's ablation rows (paper Table 2); the self-training bundle's
#: ablation (Chaitanya et al.): labelled-only baseline, + local loss on ground truth only, + pseudo-label rounds, all
#: for the same number of iterations (its baseline phase lasts max_epochs - num_rounds * round_epochs epochs). A new
#: bundle joins the benchmark by adding its entries here.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("scratch", "scratch_baseline", "UNet"),
        Method("macl", "macl", "BasicUNet", pretrain=True, baseline="macl_scratch"),
        Method("macl_scratch", "macl", "BasicUNet", train={"init": "random"}),
        Method(
            "macl_strong",
            "macl",
            "BasicUNet",
            pretrain=True,
            train=STRONG_RECIPE,
            baseline="macl_scratch_strong",
            pretrain_from="macl",
        ),
        Method("macl_scratch_strong", "macl", "BasicUNet", train={"init": "random", **STRONG_RECIPE}),
        Method("mixcl", "mixcl", "UNETR", pretrain=True, baseline="mixcl_scratch"),
        Method(
            "mixcl_id",
            "mixcl",
            "UNETR",
            pretrain=True,
            pretrain_overrides={"alpha": 0.0, "beta": 0.0},
            baseline="mixcl_scratch",
        ),
        Method(
            "mixcl_id_label",
            "mixcl",
            "UNETR",
            pretrain=True,
            pretrain_overrides={"beta": 0.0},
            baseline="mixcl_scratch",
        ),
        Method("mixcl_scratch", "mixcl", "UNETR", train={"init": "random"}),
        Method("localcl", "localcl_selftrain", "BasicUNet", baseline="localcl_baseline"),
        Method(
            "localcl_gt",
            "localcl_selftrain",
            "BasicUNet",
            train={"num_rounds": 0, "lambda_local_gt": 0.1},
            baseline="localcl_baseline",
        ),
        Method("localcl_baseline", "localcl_selftrain", "BasicUNet", train={"num_rounds": 0}),
    )
}

_CPU_2D = {
    "spatial_dims": 2,
    "patch_size": 64,
    "max_epochs": 150,
    "epoch_length": 20,
    "val_interval": 5,
    "samples_per_volume": 4,
    "pretrain": {"max_epochs": 50},
}
_CPU_UNETR = {
    "spatial_dims": 3,
    "patch_size": [32, 32, 32],
    "feature_size": 8,
    "hidden_size": 192,
    "mlp_dim": 384,
    "num_heads": 4,
    "max_epochs": 150,
    "epoch_length": 20,
    "val_interval": 5,
    "samples_per_volume": 2,
    "learning_rate": 5e-4,
    "pretrain": {"samples_per_volume": 1, "max_epochs": 15},
}
_CPU_SELFTRAIN = {
    "spatial_dims": 2,
    "patch_size": 64,
    "max_epochs": 145,
    "epoch_length": 20,
    "val_interval": 5,
    "num_rounds": 3,
    "round_epochs": 15,
    "samples_per_volume": 4,
}

#: Per-bundle overrides of every run (pre-training and fine-tuning; a ``"pretrain"`` entry holds overrides of the
#: pre-training run only) and the default grid of each preset.
#:
#: - ``cpu``: budgets set from measured learning curves on 2 CPU cores (``docs/benchmark.md``, "Headroom and
#:   convergence"): 2D 64² slices for the U-Nets, 3000 fine-tuning iterations (150 x 20; the scratch control's best
#:   validation Dice gains < 0.01 over the last quarter at 1-26 labelled volumes) and 1000 MACL pre-training
#:   iterations; the self-training rows 2900 iterations (baseline 2000, then 3 rounds of 300: the bundle's 0.2.0
#:   schedule); a narrow UNETR on 32³ patches for MixCL (300 pre-training and 3000 fine-tuning iterations, learning
#:   rate 5e-4 for both; the scratch UNETR at 100 % labels is converged at 3000 by the criterion but finds liver and
#:   kidneys only, never spleen or pancreas: run ``mixcl_unetr_curve``, see the MixCL docs). One 2D
#:   cell takes 4-13 min here, so the default grid takes an estimated 1.5 hours (``--overrides`` shortens it for a smoke
#:   run, e.g. ``{'scratch_baseline': {'max_epochs': 20}}``);
#: - ``paper``: for a GPU. MixCL, the scratch baseline and the self-training bundle run with their own defaults (MixCL:
#:   UNETR on 96³, 1000 pre-training and 2000 fine-tuning iterations); MACL (and its random-init control) with the
#:   paper's size (§IV.B, :data:`_PAPER_MACL`): 512² slices, U-Net widths 32-64-128-256-512, 100 epochs, 16 slices
#:   per step, SGD lr 0.1 for pre-training (the paper; the public ``pretrain.sh`` uses 0.01).
#: MACL at the paper's size (JBHI §IV.B; the public ``pretrain.sh`` for what the paper leaves out): 512² CHD/KiTS
#: slices, the public U-Net's widths 32-64-128-256-512 (``initial_filter_size`` 32), 100 epochs for both stages, 16
#: slices per step (2 volumes x 8 slices), pre-training SGD lr 0.1 cosine to 0 (the paper; ``--learning_rate 0.01``
#: for the code's). One pre-training epoch is 548 steps: CHD's 17525 slices / 32 per step (16 per GPU on 2 GPUs).
#: Fine-tuning keeps the bundle's Adam 5e-4 -> 5e-6 (the paper's).
_PAPER_MACL = {
    "spatial_dims": 2,
    "patch_size": 512,
    "features": [32, 64, 128, 256, 512, 32],
    "max_epochs": 100,
    "pretrain": {"learning_rate": 0.1, "batch_size": 2, "samples_per_volume": 8, "epoch_length": 548},
}

PRESETS: dict[str, dict] = {
    "cpu": {
        "bundles": {
            "scratch_baseline": _CPU_2D,
            "macl": _CPU_2D,
            "mixcl": _CPU_UNETR,
            "localcl_selftrain": _CPU_SELFTRAIN,
        },
        "methods": ["scratch", "macl", "macl_scratch", "mixcl", "mixcl_scratch"],
        "fractions": [0.15, 1.0],
        "seeds": [0],
    },
    "paper": {
        "bundles": {"scratch_baseline": {}, "macl": _PAPER_MACL, "mixcl": {}, "localcl_selftrain": {}},
        "methods": ["scratch", "macl", "macl_scratch", "mixcl", "mixcl_scratch"],
        "fractions": [0.05, 0.15, 1.0],
        "seeds": [0, 1, 2],
    },
}
