"""Self-training pieces: SegContrastNet, MixedLoader, LocalCLStep, the round schedule and SelfTrainingHandler."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, load_decathlon_datalist
from monai.losses import DiceLoss
from monai.networks.nets import BasicUNet
from monai.transforms import Compose, LoadImaged

from medcl.data import MixedLoader
from medcl.engines import LocalCLStep
from medcl.errors import MedclInputError
from medcl.handlers import SelfTrainingHandler, round_of_epoch, total_epochs
from medcl.inferers import PseudoLabeler, volume_inferer
from medcl.losses import LocalContrastiveLoss
from medcl.networks import SegContrastNet

NUM_CLASSES = 5


def _net(spatial_dims: int = 2) -> SegContrastNet:
    torch.manual_seed(0)
    backbone = BasicUNet(spatial_dims, 1, NUM_CLASSES, features=(4, 4, 8, 8, 8, 4), norm="batch")
    return SegContrastNet(
        backbone, tap="upcat_1", tap_channels=4, hidden_channels=6, out_channels=5, spatial_dims=spatial_dims
    )


# ------------------------------------------------------------------------------------------------
# SegContrastNet
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_seg_contrast_net_outputs(spatial_dims, one_thread):
    net = _net(spatial_dims).eval()
    x = torch.randn(2, 1, *([16] * spatial_dims))
    logits = net(x)
    torch.testing.assert_close(logits, net.backbone(x))
    assert type(net.backbone.final_conv).__name__ == "SegTail"  # two 3x3 conv-BN-ReLU layers before the logits
    logits2, z = net(x, return_embeddings=True)
    torch.testing.assert_close(logits2, logits)
    assert z.shape == (2, 5, *([16] * spatial_dims))  # full-resolution embeddings
    keys = set(net.state_dict())
    assert all(k.startswith(("backbone.", "head.")) for k in keys)
    assert any(k.startswith("head.") for k in keys)


def test_seg_contrast_net_errors():
    backbone = BasicUNet(2, 1, NUM_CLASSES, features=(4, 4, 8, 8, 8, 4))
    with pytest.raises(MedclInputError, match="upcat_1"):
        SegContrastNet(backbone, tap="upcat_one")
    net = SegContrastNet(backbone, tap="upcat_1", tap_channels=16)
    with pytest.raises(ValueError, match="set tap_channels to 4"):
        net(torch.randn(1, 1, 32, 32), return_embeddings=True)


# ------------------------------------------------------------------------------------------------
# MixedLoader
# ------------------------------------------------------------------------------------------------


def test_mixed_loader_cycles_each_loader():
    mixed = MixedLoader({"a": [1, 2], "b": None})
    it = iter(mixed)
    assert [next(it) for _ in range(3)] == [{"a": 1}, {"a": 2}, {"a": 1}]
    mixed.set_loader("b", ["x", "y", "z"])
    assert [next(it) for _ in range(4)] == [
        {"a": 2, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "z"},
        {"a": 1, "b": "x"},
    ]
    mixed.activate(["b"])
    assert next(it) == {"b": "y"}


def test_mixed_loader_errors():
    with pytest.raises(ValueError, match="at least one active loader"):
        MixedLoader({"a": None})
    with pytest.raises(ValueError, match="'a' loader yields no batch"):
        next(iter(MixedLoader({"a": []})))


# ------------------------------------------------------------------------------------------------
# LocalCLStep
# ------------------------------------------------------------------------------------------------


def _batch(n_l: int = 2, n_u: int = 2, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def part(n):
        lab = torch.zeros(n, 1, size, size, dtype=torch.long)
        lab[:, :, 2:8, 2:8] = 1
        lab[:, :, 9:14, 3:12] = 2
        lab[:, :, 4:12, 12:15] = 3
        return {"image": torch.randn(n, 1, size, size, generator=g) + lab.float(), "label": lab}

    out = {"labelled": part(n_l)}
    if n_u:
        out["unlabelled"] = part(n_u)
    return out


def test_local_cl_step_terms_match_the_losses(one_thread):
    net = _net().train()
    seg_loss = DiceLoss(to_onehot_y=True, softmax=True)
    local = LocalContrastiveLoss()
    step = LocalCLStep(
        seg_loss,
        local,
        lambda_local=0.3,
        generator=torch.Generator().manual_seed(5),
        pairs="random",
        class_filter=False,
    )
    batch = _batch()
    torch.manual_seed(1)
    terms = step(net, batch)
    # the same computation by hand: one pass on [labelled; unlabelled], Dice on the labelled part, local on all
    pairs = torch.randperm(4, generator=torch.Generator().manual_seed(5)).reshape(2, 2)
    x = torch.cat([batch["labelled"]["image"], batch["unlabelled"]["image"]])
    y = torch.cat([batch["labelled"]["label"], batch["unlabelled"]["label"]])
    torch.manual_seed(1)
    logits, z = net(x, return_embeddings=True)
    seg = seg_loss(logits[:2], y[:2])
    loc = local(z, y, pairs)
    torch.testing.assert_close(terms["loss_seg"], seg.detach())
    torch.testing.assert_close(terms["loss_local"], loc.detach())
    torch.testing.assert_close(terms["loss"], seg + 0.3 * loc)
    # the terms keep their graphs (for TermGradNormHandler) and the step says how it weighed them
    assert terms["loss"].requires_grad and terms["loss_local"].requires_grad and terms["loss_seg"].requires_grad
    assert step.term_weights == {"loss_seg": 1.0, "loss_local": 0.3}
    labelled_only = step(net, {"labelled": batch["labelled"]})  # before the rounds: lambda_local_gt (0 here)
    assert step.term_weights["loss_local"] == 0.0 and not labelled_only["loss_local"].requires_grad


def test_local_cl_step_segmentation_sees_labelled_only(one_thread):
    net = _net().eval()  # eval: batch norm statistics do not couple the parts
    step = LocalCLStep(DiceLoss(to_onehot_y=True, softmax=True), lambda_local=0.0, class_filter=False)
    batch = _batch()
    a = step(net, batch)
    batch["unlabelled"]["label"] = torch.zeros_like(batch["unlabelled"]["label"])
    b = step(net, batch)
    torch.testing.assert_close(a["loss"], b["loss"])
    assert float(a["loss_local"]) == 0.0


def test_local_cl_step_phases_and_head_gradient(one_thread):
    seg_loss = DiceLoss(to_onehot_y=True, softmax=True)
    for lam_gt, head_grad in ((0.0, False), (0.5, True)):
        net = _net().train()
        step = LocalCLStep(seg_loss, lambda_local=0.1, lambda_local_gt=lam_gt, num_classes=4)  # mixed pairs, filter
        terms = step(net, _batch(n_u=0))
        terms["loss"].backward()
        grads = [p.grad for p in net.head.parameters()]
        assert (all(g is not None and g.abs().sum() > 0 for g in grads)) == head_grad
        assert (float(terms["loss_local"]) > 0) == head_grad


def test_local_cl_step_rejects_bad_batches():
    step = LocalCLStep(DiceLoss(to_onehot_y=True, softmax=True), num_classes=NUM_CLASSES)
    with pytest.raises(MedclInputError, match="batch\\['labelled'\\]"):
        step(_net(), {"image": torch.zeros(2, 1, 16, 16)})
    with pytest.raises(ValueError, match=">= 0"):
        LocalCLStep(DiceLoss(), lambda_local=-1.0)


def test_local_contrastive_ignore_index_is_background(one_thread):
    torch.manual_seed(0)
    z = torch.randn(4, 6, 12, 12, requires_grad=True)
    lab = torch.randint(0, 4, (4, 1, 12, 12))
    lab[:, :, :3] = 255
    as_bg = lab.masked_fill(lab == 255, 0)
    loss = LocalContrastiveLoss(ignore_index=255)
    ref = LocalContrastiveLoss()
    torch.manual_seed(0)
    a = loss(z, lab, "consecutive")
    torch.manual_seed(0)
    b = ref(z, as_bg, "consecutive")
    torch.testing.assert_close(a, b)
    (grad,) = torch.autograd.grad(a, z)
    assert grad[:, :, :3].abs().sum() == 0  # ignored pixels: no anchors, no class means
    with pytest.raises(ValueError, match="distinct background"):
        LocalContrastiveLoss(background=None, ignore_index=255)


# ------------------------------------------------------------------------------------------------
# round schedule and handler
# ------------------------------------------------------------------------------------------------


def test_round_schedule():
    assert total_epochs(3, 2, 4) == 11
    assert [round_of_epoch(e, 3, 4) for e in range(1, 12)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError):
        total_epochs(0, 1, 1)
    with pytest.raises(ValueError):
        total_epochs(1, 2, 0)


class _Engine:
    class state:
        epoch = 0


def test_self_training_handler_rounds_and_resume(phantom_dir, tmp_path, one_thread):
    training = load_decathlon_datalist(str(phantom_dir / "dataset.json"), True, "training")
    unlabelled = [{"image": it["image"]} for it in training[:3]]
    net = _net(2)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    labeler = PseudoLabeler(
        net, volume_inferer(2, 32), Compose([LoadImaged("image", ensure_channel_first=True)]), tmp_path / "unused"
    )
    dataset = CacheDataset([], transform=LoadImaged(["image", "label"], ensure_channel_first=True), progress=False)
    mixed = MixedLoader({"labelled": [{"image": 0}], "unlabelled": None})
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 1, 16, 16)).sum().backward()
    opt.step()
    handler = SelfTrainingHandler(
        labeler,
        unlabelled,
        dataset,
        mixed,
        baseline_epochs=2,
        round_epochs=1,
        num_rounds=2,
        pseudo_dir=str(tmp_path / "pseudo"),
        checkpoint_path=str(ckpt),
        loader_kwargs={"batch_size": 1},
        optimizer=opt,
        truth_items=training,
        num_classes=NUM_CLASSES,
    )
    engine = _Engine()
    for epoch in (1, 2):
        engine.state.epoch = epoch
        handler(engine)
    assert handler.round == 0 and mixed.active == ["labelled"] and len(dataset) == 0
    engine.state.epoch = 3
    handler(engine)
    assert handler.round == 1 and mixed.active == ["labelled", "unlabelled"] and len(dataset) == 3
    assert not opt.state  # Adam restarts each round
    files = sorted((tmp_path / "pseudo" / "round1").glob("*_pseudo.nii.gz"))
    assert len(files) == 3
    for f, item in zip(files, sorted(unlabelled, key=lambda d: d["image"]), strict=True):
        src, out = nib.load(item["image"]), nib.load(str(f))
        assert out.shape == src.shape
        np.testing.assert_allclose(out.affine, src.affine, atol=1e-4)
    batch = next(iter(mixed))
    assert batch["unlabelled"]["label"].shape[0] == 1
    # a restarted round 1 (same checkpoint) finds its pseudo-labels and does not write them again
    mtimes = [os.path.getmtime(f) for f in files]
    SelfTrainingHandler(
        labeler,
        unlabelled,
        dataset,
        mixed,
        2,
        1,
        2,
        str(tmp_path / "pseudo"),
        str(ckpt),
        loader_kwargs={"batch_size": 1},
    ).start_round(1)
    assert [os.path.getmtime(f) for f in files] == mtimes
    engine.state.epoch = 4
    handler(engine)
    log = json.loads((tmp_path / "pseudo" / "rounds.json").read_text())
    assert [e["round"] for e in log] == [1, 2]
    assert log[1]["num_scored"] == 3 and 0.0 <= log[1]["pseudo_dice_mean"] <= 1.0
    engine.state.epoch = 9  # past the last round: nothing new
    handler(engine)
    assert handler.round == 2

    # resuming (RunStateHandler): a fresh handler goes back to round 2's items without labelling again ...
    state = handler.state_dict()
    fresh_mixed = MixedLoader({"labelled": [{"image": 0}], "unlabelled": None})
    fresh = SelfTrainingHandler(
        labeler,
        unlabelled,
        dataset,
        fresh_mixed,
        2,
        1,
        2,
        str(tmp_path / "pseudo"),
        str(ckpt),
        loader_kwargs={"batch_size": 1},
    )
    fresh.load_state_dict(state)
    assert fresh.round == 2 and fresh_mixed.active == ["labelled", "unlabelled"] and fresh.items == state["items"]
    # ... and refuses, naming the file, when a pseudo-label of that round is gone
    os.remove(state["items"][0]["label"])
    with pytest.raises(MedclInputError, match=r"_pseudo\.nii\.gz: pseudo-label of round 2 is missing"):
        fresh.load_state_dict(state)


def test_self_training_handler_needs_unlabelled(tmp_path):
    dataset = CacheDataset([], transform=None, progress=False)
    with pytest.raises(ValueError, match="needs unlabelled volumes"):
        SelfTrainingHandler(None, [], dataset, MixedLoader({"labelled": [0]}), 1, 1, 1, str(tmp_path), "x.pt")
    # without rounds an empty pool is fine (labelled-only baseline)
    SelfTrainingHandler(None, [], dataset, MixedLoader({"labelled": [0]}), 1, 1, 0, str(tmp_path), "x.pt")
