"""Workflow helpers: command-line override check, checkpoint requirement, inferer choice."""

from __future__ import annotations

import pytest
import torch
from conftest import BUNDLES
from monai.inferers import SlidingWindowInferer

from medcl.bundle import check_cli_overrides
from medcl.errors import MedclInputError
from medcl.inferers import SliceBatchInferer, volume_inferer
from medcl.utils import require_checkpoint

TRAIN = str(BUNDLES / "scratch_baseline" / "configs" / "train.json")
EVALUATE = str(BUNDLES / "scratch_baseline" / "configs" / "evaluate.json")


def _argv(*args):
    return ["monai/bundle/__main__.py", "run", "--config_file", TRAIN, *args]


def test_known_overrides_pass():
    assert check_cli_overrides(_argv("--label_fraction", "0.1", "--network_def#channels", "[8,16]", "--seed=3"))
    assert check_cli_overrides(_argv("--tracking", "mlflow", "--experiment_name", "x"))
    merged = ["m", "run", "--config_file", repr([TRAIN, EVALUATE]), "--ckpt_path", "x.pt"]
    assert check_cli_overrides(merged)  # ckpt_path exists only in the overlay
    assert check_cli_overrides(_argv("--loss#smooth_nr", "0.1"))  # a new argument of a component (its class checks it)


def test_unknown_override_is_named_with_a_suggestion():
    with pytest.raises(MedclInputError, match=r"--label_fractoin: no such key .* did you mean --label_fraction"):
        check_cli_overrides(_argv("--label_fractoin", "0.1"))
    with pytest.raises(MedclInputError, match="--experiment_name"):
        check_cli_overrides(_argv("--experiment_name", "x"))  # only valid with --tracking
    with pytest.raises(MedclInputError, match="--seed#x: no such key"):
        check_cli_overrides(_argv("--seed#x", "1"))  # seed is not a component


def test_not_a_bundle_command_is_left_alone():
    assert check_cli_overrides(["pytest", "-q", "--whatever"])


def test_require_checkpoint(tmp_path):
    with pytest.raises(MedclInputError, match="checkpoint not found. To create it, run pretrain"):
        require_checkpoint(str(tmp_path / "model.pt"), "run pretrain")
    (tmp_path / "model.pt").write_bytes(b"x")
    assert require_checkpoint(str(tmp_path / "model.pt"))


def test_volume_inferer_runs_2d_networks_over_3d_volumes():
    inferer = volume_inferer(2, [16, 16, 16], slice_axis=2)
    assert isinstance(inferer, SliceBatchInferer)
    calls = []

    def net(x):
        calls.append(tuple(x.shape))
        return x.repeat(1, 3, 1, 1)

    out = inferer(torch.rand(1, 1, 20, 18, 5), net)
    assert out.shape == (1, 3, 20, 18, 5) and all(len(c) == 4 for c in calls)
    assert isinstance(volume_inferer(3, 16), SlidingWindowInferer)
