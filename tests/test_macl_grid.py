"""The benchmark's ``paper`` preset runs MACL at the paper's size (JBHI §IV.B), not at the 64² bundle defaults."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import BUNDLES
from monai.bundle import ConfigParser

from medcl.benchmark.cli import _Benchmark
from medcl.benchmark.grid import METHODS, PRESETS


def _overrides(method: str, config: str) -> dict:
    bench = _Benchmark(Path("/tmp/unused"), Path("/tmp/unused"), [], PRESETS["paper"]["bundles"], {}, {}, None)
    return bench.overrides(METHODS[method], config, {}, "x")


def test_paper_preset_macl_cells_carry_the_papers_size():
    for method in ("macl", "macl_scratch"):
        assert method in PRESETS["paper"]["methods"]
        for config in ("pretrain.json", "train.json"):
            over = _overrides(method, config)
            assert over["patch_size"] >= 256 and over["patch_size"] == 512
            assert over["features"][:5] == [32, 64, 128, 256, 512]
            assert over["max_epochs"] == 100
            assert over["spatial_dims"] == 2
    pre = _overrides("macl", "pretrain.json")
    assert pre["learning_rate"] == 0.1  # the paper's (the public code: 0.01)
    assert pre["batch_size"] * pre["samples_per_volume"] == 16  # 16 slices per step
    assert pre["max_epochs"] * pre["epoch_length"] >= 50_000
    assert "learning_rate" not in _overrides("macl", "train.json")  # fine-tuning keeps Adam 5e-4


def test_paper_preset_overrides_reach_the_network_and_optimizer():
    over = _overrides("macl", "pretrain.json")
    for name in ("pretrain.json", "train.json"):
        keys = set(json.loads((BUNDLES / "macl" / "configs" / name).read_text()))
        assert {"patch_size", "features", "max_epochs"} <= keys  # the preset is filtered to top-level keys
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "macl" / "configs" / "pretrain.json"))
    parser.update(over)
    assert parser.get_parsed_content("network_def#features") == [32, 64, 128, 256, 512, 32]
    assert parser.get_parsed_content("roi_size") == (512, 512)
    assert parser.get_parsed_content("optimizer#lr") == 0.1
    # the cpu preset stays small
    assert PRESETS["cpu"]["bundles"]["macl"]["patch_size"] == 64
