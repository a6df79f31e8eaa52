"""macl in the pattern of the model zoo's ``ci/unit_tests/test_spleen_ct_segmentation.py``: ConfigWorkflow
initialize -> check_properties -> run -> finalize for pretrain, train (from the pre-trained weights), train + evaluate
and inference, on a 32³ phantom (2D 64² slices: MACL's 4-level nets at scale 0.25 need 64)."""

from __future__ import annotations

import pytest
from zoo_utils import (  # noqa: F401
    SIZES,
    TINY,
    check_inference_without_weights,
    check_workflow,
    copy_bundle,
    workflow,
    zoo_process_state,
)

NAME = "macl"
pytestmark = pytest.mark.usefixtures("zoo_process_state")


def test_pretrain_train_eval_config(phantom_dir, tmp_path):
    bundle = copy_bundle(NAME, tmp_path)
    override = {"dataset_dir": str(phantom_dir), **TINY, **SIZES[NAME]}
    check_workflow(workflow(bundle, ["pretrain.json"], "train", **override))
    assert (bundle / "models" / "pretrained.pt").is_file()
    # train.json (init "pretrained") starts from models/pretrained.pt, which it requires at initialize
    check_workflow(workflow(bundle, ["train.json"], "train", **override))
    assert (bundle / "models" / "model.pt").is_file()
    check_workflow(workflow(bundle, ["train.json", "evaluate.json"], "train", **override))
    assert (bundle / "eval" / "val_mean_dice_raw.csv").is_file()


def test_infer_config(phantom_dir, tmp_path):
    check_inference_without_weights(NAME, phantom_dir, tmp_path)
