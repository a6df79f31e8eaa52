"""The localcl_selftrain bundle's defaults (public-code choices) and its schedule keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from medcl.engines import LocalCLStep
from medcl.errors import MedclInputError
from medcl.handlers import SelfTrainingHandler
from medcl.inferers import PseudoLabeler

TRAIN = Path(__file__).resolve().parents[1] / "bundles" / "localcl_selftrain" / "configs" / "train.json"


def _parser(phantom_dir, **over):
    p = ConfigParser()
    p.read_config(str(TRAIN))
    p["dataset_dir"] = str(phantom_dir)
    p["num_workers"] = 0
    p["device"] = "$torch.device('cpu')"
    for k, v in over.items():
        p[k] = v
    return p


def test_defaults_follow_the_public_code(phantom_dir, one_thread):
    p = _parser(phantom_dir)
    net = p.get_parsed_content("network_def")
    assert type(net.backbone.final_conv).__name__ == "SegTail" and len(net.backbone.final_conv.layers) == 2
    step = p.get_parsed_content("step")
    assert isinstance(step, LocalCLStep) and step.pairs == "mixed" and step.class_filter and step.min_classes == 3
    assert step.num_classes == p.get_parsed_content("num_classes")
    labeler = p.get_parsed_content("train#pseudo_labeler")
    assert isinstance(labeler, PseudoLabeler) and labeler.crf
    assert labeler.crf_kwargs["slice_axis"] == 2 and labeler.crf_kwargs["backend"] == "torch"
    assert p.get_parsed_content("baseline_epochs") == 100 and p.get_parsed_content("round_epochs") == 15
    assert p.get_parsed_content("max_epochs") == 100 + 3 * 15
    handler = [h for h in p.get_parsed_content("train#handlers") if isinstance(h, SelfTrainingHandler)][0]
    assert (handler.baseline_epochs, handler.round_epochs, handler.num_rounds) == (100, 15, 3)


def test_schedule_overrides(phantom_dir, one_thread):
    p = _parser(phantom_dir, baseline_epochs=7, round_epochs=2)
    assert p.get_parsed_content("max_epochs") == 13
    p = _parser(phantom_dir, max_epochs=5, round_epochs=1, num_rounds=2)  # old usage: the baseline gets the rest
    handler = [h for h in p.get_parsed_content("train#handlers") if isinstance(h, SelfTrainingHandler)][0]
    assert handler.baseline_epochs == 3
    p = _parser(phantom_dir, num_rounds=0)
    assert p.get_parsed_content("max_epochs") == 100  # the labelled-only row: the converged baseline


def test_handler_refuses_a_trainer_that_stops_inside_the_rounds(phantom_dir, one_thread):
    from ignite.engine import Engine

    p = _parser(phantom_dir, baseline_epochs=2, round_epochs=1, num_rounds=2)
    handler = [h for h in p.get_parsed_content("train#handlers") if isinstance(h, SelfTrainingHandler)][0]
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    with pytest.raises(MedclInputError, match="needs 4"):
        engine.run([0], max_epochs=3)


def test_misspelt_pairs_fail_before_training(phantom_dir):
    p = _parser(phantom_dir, pairs="same-image")
    with pytest.raises(Exception) as info:
        p.get_parsed_content("step")
    err = info.value
    while err is not None and not isinstance(err, MedclInputError):
        err = err.__cause__ or err.__context__
    assert err is not None and "mixed, same_image, random" in str(err)
