"""localcl_selftrain in the pattern of the model zoo's ``ci/unit_tests/test_spleen_ct_segmentation.py``:
ConfigWorkflow initialize -> check_properties -> run -> finalize for train (one baseline epoch, one self-training
round), train + evaluate and inference, on a 32³ phantom (2D 32² slices)."""

from __future__ import annotations

import json

import pytest
from zoo_utils import (  # noqa: F401
    LOCALCL_SCHEDULE,
    SIZES,
    TINY,
    check_inference_without_weights,
    check_workflow,
    copy_bundle,
    workflow,
    zoo_process_state,
)

NAME = "localcl_selftrain"
pytestmark = pytest.mark.usefixtures("zoo_process_state")


def test_train_eval_config(phantom_dir, tmp_path):
    bundle = copy_bundle(NAME, tmp_path)
    override = {"dataset_dir": str(phantom_dir), **TINY, **SIZES[NAME], **LOCALCL_SCHEDULE}
    check_workflow(workflow(bundle, ["train.json"], "train", **override))
    rounds = json.loads((bundle / "models" / "pseudo_labels" / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1]
    check_workflow(workflow(bundle, ["train.json", "evaluate.json"], "train", **override))
    assert (bundle / "eval" / "val_mean_dice_raw.csv").is_file()


def test_infer_config(phantom_dir, tmp_path):
    check_inference_without_weights(NAME, phantom_dir, tmp_path)
