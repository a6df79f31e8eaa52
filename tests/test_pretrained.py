"""Tests of fine-tuning initialisation from a MACL pre-training checkpoint (load_pretrained, PretrainedLoader)."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.networks.nets import BasicUNet, UNet
from torch import nn

from medcl.errors import MedclInputError
from medcl.handlers import PretrainedLoader
from medcl.losses.dense_supcon import DenseSupConLoss
from medcl.losses.feature_consistency import FeatureConsistencyLoss
from medcl.losses.supcon import PositionalSupConLoss
from medcl.networks import load_pretrained
from medcl.networks.macl import MACLPretrainModel, pretrained_prefixes

FEATURES = (4, 4, 8, 8, 16, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(seed: int, features=FEATURES) -> BasicUNet:
    torch.manual_seed(seed)
    return BasicUNet(2, 1, 3, features=features, norm="batch")


def under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A backbone after one MACL pre-training step, saved as {"model": backbone.state_dict()}."""
    net = make_net(0)
    model = MACLPretrainModel(net, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    positions = torch.tensor([0.1, 0.15, 0.8])
    out = model(torch.randn(3, 1, 64, 64), torch.randn(3, 1, 64, 64))
    loss = (
        PositionalSupConLoss()(torch.stack([out["z_g_aux"], out["z_g_dom"]], 1), positions)
        + 0.5 * DenseSupConLoss()(out["z_l_aux"], out["z_l_dom"], positions)
        + FeatureConsistencyLoss(scale=0.25)(out["bottleneck_aux"], out["bottleneck_dom"])
    )
    loss.backward()
    opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "pretrain.pt"
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save({"model": state}, path)
    return path, state, model


def test_load_encoder_and_two_decoder_blocks(pretrained):
    path, saved, _ = pretrained
    fresh = make_net(1)
    init = {k: v.clone() for k, v in fresh.state_dict().items()}
    prefixes = pretrained_prefixes(fresh)
    assert prefixes == ["conv_0", "down_1", "down_2", "down_3", "down_4", "upcat_4", "upcat_3"]
    report = load_pretrained(fresh, path, prefixes=prefixes)
    after = fresh.state_dict()
    targeted = [k for k in after if under(k, prefixes)]
    assert sorted(report["loaded"]) == sorted(targeted)
    assert report["missing"] == [] and report["mismatched"] == []
    assert sorted(report["skipped"]) == sorted(k for k in saved if not under(k, prefixes))
    for k in after:
        if under(k, prefixes):
            assert torch.equal(after[k], saved[k]), k
        else:  # later decoder blocks and output layer keep the fresh initialisation
            assert torch.equal(after[k], init[k]), k
    rest = [k for k in after if not under(k, prefixes) and after[k].is_floating_point()]
    differs = [k for k in rest if not torch.equal(after[k], saved[k])]
    assert any(k.startswith("upcat_1.") for k in differs) and any(k.startswith("final_conv.") for k in differs)


def test_raw_state_dict_and_whole_pretrain_model(pretrained, tmp_path):
    path, saved, model = pretrained
    raw = tmp_path / "raw.pt"  # what CheckpointSaver writes for a single-entry save_dict
    torch.save(saved, raw)
    fresh = make_net(2)
    report = load_pretrained(fresh, raw, prefixes=pretrained_prefixes(fresh))
    assert report["loaded"] and not report["missing"]
    whole = tmp_path / "whole.pt"  # the MACLPretrainModel saved whole: backbone. prefix + projector keys
    torch.save({"model": model.state_dict()}, whole)
    fresh = make_net(3)
    report = load_pretrained(fresh, whole, prefixes=pretrained_prefixes(fresh), name_map={"backbone.": ""})
    assert torch.equal(fresh.down_4.convs.conv_0.conv.weight, model.backbone.down_4.convs.conv_0.conv.weight)
    assert any(k.startswith("pixel_projector.") for k in report["skipped"])


def test_ddp_module_prefix(pretrained, tmp_path):
    _, saved, _ = pretrained
    ddp = tmp_path / "ddp.pt"
    torch.save({"model": {"module." + k: v for k, v in saved.items()}}, ddp)
    fresh = make_net(4)
    prefixes = pretrained_prefixes(fresh)
    with pytest.raises(MedclInputError, match=r"name_map=\{'module.': ''\}"):
        load_pretrained(fresh, ddp, prefixes=prefixes)
    report = load_pretrained(fresh, ddp, prefixes=prefixes, name_map={"module.": ""})
    assert report["loaded"] and not report["missing"]
    assert torch.equal(fresh.conv_0.conv_0.conv.weight, saved["conv_0.conv_0.conv.weight"])
    fresh = make_net(5)
    report = load_pretrained(fresh, ddp, prefixes=prefixes, name_map={r"^module\.": ""})  # regex form
    assert report["loaded"] and not report["missing"]


def test_other_architecture_strict_and_partial(pretrained, tmp_path, caplog):
    path, saved, _ = pretrained
    # a wider BasicUNet: the first levels fit, the deeper ones do not
    wide = make_net(6, features=(4, 4, 8, 16, 32, 4))
    prefixes = pretrained_prefixes(wide)
    with pytest.raises(MedclInputError) as err:
        load_pretrained(wide, path, prefixes=prefixes)
    msg = str(err.value)
    assert str(path) in msg and "shape mismatches" in msg and "down_3" in msg
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="medcl.networks.pretrained"):
        report = load_pretrained(wide, path, prefixes=prefixes, strict=False)
    assert "partial load" in caplog.text
    deep = ("down_3", "down_4", "upcat_4", "upcat_3")
    assert report["mismatched"] and all(k.split(".")[0] in deep for k, _, _ in report["mismatched"])
    shallow = [k for k in wide.state_dict() if k.split(".")[0] in ("conv_0", "down_1", "down_2")]
    assert set(shallow) <= set(report["loaded"])  # per tensor, as the public code: equal shapes load
    assert not {k for k, _, _ in report["mismatched"]} & set(report["loaded"])
    after = wide.state_dict()
    assert torch.equal(after["down_1.convs.conv_0.conv.weight"], saved["down_1.convs.conv_0.conv.weight"])
    assert torch.equal(after["down_4.convs.conv_0.conv.weight"], before["down_4.convs.conv_0.conv.weight"])

    # a different network family: nothing matches
    torch.manual_seed(0)
    unet = UNet(2, 1, 3, channels=(4, 8, 8, 16, 16), strides=(2, 2, 2, 2))
    with pytest.raises(MedclInputError, match="does not fit UNet"):
        load_pretrained(unet, path, prefixes=pretrained_prefixes(unet))
    report = load_pretrained(unet, path, prefixes=pretrained_prefixes(unet), strict=False)
    assert report["loaded"] == [] and report["missing"] and len(report["skipped"]) == len(saved)


def test_missing_and_unreadable_files(tmp_path):
    net = make_net(0)
    with pytest.raises(MedclInputError, match="not found.*pretrain.json"):
        load_pretrained(net, tmp_path / "nope.pt")
    with pytest.raises(MedclInputError, match="not found.*pretrain.json"):
        PretrainedLoader(tmp_path / "nope.pt", net)
    bad = tmp_path / "bad.pt"
    torch.save({"model": net.state_dict(), "extra": nn.ReLU()}, bad)  # a pickled module: not weights-only
    with pytest.raises(MedclInputError, match="weights_only=True"):
        load_pretrained(net, bad)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, other)
    with pytest.raises(MedclInputError, match="no state dict under key 'model'"):
        load_pretrained(net, other)


def test_ignite_handler_loads_at_started(pretrained):
    from ignite.engine import Engine, Events

    path, saved, _ = pretrained
    net = make_net(7)
    loader = PretrainedLoader(path, net, prefixes=pretrained_prefixes(net))
    seen = {}
    engine = Engine(lambda e, batch: None)
    loader.attach(engine)
    engine.add_event_handler(
        Events.ITERATION_STARTED, lambda e: seen.setdefault("w", net.down_4.convs.conv_0.conv.weight.detach().clone())
    )
    assert not torch.equal(net.down_4.convs.conv_0.conv.weight, saved["down_4.convs.conv_0.conv.weight"])
    engine.run([0], max_epochs=1)
    assert torch.equal(seen["w"], saved["down_4.convs.conv_0.conv.weight"])
    assert loader.report is not None and loader.report["loaded"] and not loader.report["missing"]
