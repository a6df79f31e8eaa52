"""In-process tests of MACL pre-training: the step (views -> model -> weighted terms), the generic pre-training trainer,
the view transforms of bundles/macl/configs/pretrain.json, and the backbone overrides the docs list."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import BUNDLES
from ignite.engine import Events
from ignite.metrics import Average
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.handlers import StatsHandler, from_engine
from monai.networks.nets import BasicUNet
from monai.transforms import Compose
from torch import nn

from medcl.data.views import VIEW_KEYS, RandElasticd
from medcl.engines import MACLStep, MACLViewsModel, PretrainTrainer, prepare_dict_batch
from medcl.errors import MedclInputError
from medcl.losses.dense_supcon import DenseSupConLoss
from medcl.losses.feature_consistency import FeatureConsistencyLoss
from medcl.losses.supcon import PositionalSupConLoss
from medcl.networks.macl import MACLPretrainModel

PRETRAIN = BUNDLES / "macl" / "configs" / "pretrain.json"
FEATURES = (4, 4, 8, 8, 16, 4)
SIZE = 64  # 4-level nets at scale 0.25 need multiples of 64
POSITIONS = torch.tensor([0.10, 0.15, 0.50, 0.90])

# the network_def overrides documented in bundles/macl/docs/README.md ("Backbones")
BACKBONES = {
    "BasicUNet": {
        "_target_": "BasicUNet",
        "spatial_dims": "@spatial_dims",
        "in_channels": 1,
        "out_channels": "@num_classes",
        "features": [32, 32, 64, 128, 256, 32],
        "norm": "batch",
    },
    "UNet": {
        "_target_": "UNet",
        "spatial_dims": "@spatial_dims",
        "in_channels": 1,
        "out_channels": "@num_classes",
        "channels": [32, 64, 128, 256, 512],
        "strides": [2, 2, 2, 2],
        "num_res_units": 2,
        "norm": "batch",
    },
    "AttentionUnet": {
        "_target_": "AttentionUnet",
        "spatial_dims": "@spatial_dims",
        "in_channels": 1,
        "out_channels": "@num_classes",
        "channels": [32, 64, 128, 256, 512],
        "strides": [2, 2, 2, 2],
    },
    "BasicUNetPlusPlus": {
        "_target_": "BasicUNetPlusPlus",
        "spatial_dims": "@spatial_dims",
        "in_channels": 1,
        "out_channels": "@num_classes",
        "features": [32, 32, 64, 128, 256, 32],
        "norm": "batch",
    },
    "DynUNet": {
        "_target_": "DynUNet",
        "spatial_dims": "@spatial_dims",
        "in_channels": 1,
        "out_channels": "@num_classes",
        "kernel_size": [3, 3, 3, 3, 3],
        "strides": [1, 2, 2, 2, 2],
        "upsample_kernel_size": [2, 2, 2, 2],
        "filters": [32, 64, 128, 256, 512],
        "norm_name": "batch",
    },
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_network(seed: int = 0, dims: int = 2) -> MACLViewsModel:
    torch.manual_seed(seed)
    backbone = BasicUNet(dims, 1, 3, features=FEATURES, norm="batch")
    return MACLViewsModel(MACLPretrainModel(backbone, dims, proj_dim=16))


def make_batch(seed: int = 0, b: int = 4, dims: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {k: torch.rand((b, 1) + (SIZE,) * dims, generator=g) for k in VIEW_KEYS}
    batch["position"] = POSITIONS[:b].clone()
    return batch


def reference_terms(out: dict, positions: torch.Tensor, base_temperature=0.07, form="code", er="mean") -> tuple:
    """L_g, L_d, L_ER with the library's loss modules, computed by hand from the model outputs."""
    z_g = torch.stack([out["z_g_dom"], out["z_g_aux"]], 1)  # view 0: dominant (the anchors of eq. 9)
    l_g = PositionalSupConLoss(0.1, 0.1, base_temperature, form=form)(z_g, positions)
    l_d = DenseSupConLoss(0.1, 0.1, base_temperature, form=form)(out["z_l_aux"], out["z_l_dom"], positions)
    l_er = FeatureConsistencyLoss(scale=0.25, reduction=er)(out["bottleneck_aux"], out["bottleneck_dom"])
    return l_g, l_d, l_er


# ----------------------------------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------------------------------
def test_step_total_is_weighted_sum_of_terms_from_the_same_outputs():
    net, batch = make_network(), make_batch()
    terms = MACLStep()(net, batch)
    assert set(terms) == {"loss", "loss_g", "loss_d", "loss_er"}
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
    # train-mode batch norm: the same inputs give the same outputs again
    out = net(*(batch[k] for k in VIEW_KEYS))
    l_g, l_d, l_er = reference_terms(out, batch["position"])
    torch.testing.assert_close(terms["loss_g"], l_g)
    torch.testing.assert_close(terms["loss_d"], l_d)
    torch.testing.assert_close(terms["loss_er"], l_er)
    torch.testing.assert_close(terms["loss"], l_g + 0.5 * l_d + 1.0 * l_er)
    # the total backpropagates into the encoder, the first two decoder blocks and the heads, not the rest
    terms["loss"].backward()
    grads = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in net.named_parameters()}
    assert (
        grads["model.backbone.conv_0.conv_0.conv.weight"] and grads["model.backbone.upcat_3.convs.conv_1.conv.weight"]
    )
    assert grads["model.pixel_projector.layers.0.conv.weight"] and grads["model.image_projector_dom.mlp.0.weight"]
    assert not any(v for n, v in grads.items() if n.startswith(("model.backbone.upcat_2", "model.backbone.final_conv")))


def test_step_pairs_views_as_the_public_code():
    """(I1, I2) give the pixel and feature levels, (V1, V2) the image level."""
    net, batch = make_network(), make_batch()
    out = net(*(batch[k] for k in VIEW_KEYS))
    pixel = net.model(batch["view_i1"], batch["view_i2"])
    image = net.model(batch["view_v1"], batch["view_v2"])
    for k in ("z_l_aux", "z_l_dom", "bottleneck_aux", "bottleneck_dom"):
        torch.testing.assert_close(out[k], pixel[k])
    for k in ("z_g_aux", "z_g_dom"):
        torch.testing.assert_close(out[k], image[k])
    assert net.backbone is net.model.backbone


def test_step_weights_base_temperature_and_two_views():
    net, batch = make_network(), make_batch()
    step = MACLStep(weight_g=2.0, weight_d=0.0, weight_er=3.0, base_temperature=0.07)
    terms = step(net, batch)
    out = net(*(batch[k] for k in VIEW_KEYS))
    l_g, l_d, l_er = reference_terms(out, batch["position"], base_temperature=0.07)
    torch.testing.assert_close(terms["loss"], 2.0 * l_g + 3.0 * l_er)
    torch.testing.assert_close(terms["loss_d"], l_d)  # still computed (and logged) at weight 0
    plain = reference_terms(out, batch["position"], base_temperature=None)
    torch.testing.assert_close(terms["loss_g"], plain[0] * (0.1 / 0.07))
    # the default is the code's 0.07; None is the paper's unscaled form
    default = MACLStep()(net, batch)
    torch.testing.assert_close(default["loss_g"], plain[0] / 0.7)
    torch.testing.assert_close(default["loss_d"], plain[1] / 0.7)
    unscaled = MACLStep(base_temperature=None)(net, batch)
    torch.testing.assert_close(unscaled["loss_g"], plain[0])
    torch.testing.assert_close(unscaled["loss_d"], plain[1])
    torch.testing.assert_close(unscaled["loss_er"], default["loss_er"])  # L_ER is not rescaled: the balance moves
    scaled_supcon = (default["loss"] - default["loss_er"]).item()
    assert scaled_supcon == pytest.approx((unscaled["loss"] - unscaled["loss_er"]).item() / 0.7)

    two = MACLStep(view_keys=VIEW_KEYS[:2])(net, batch)
    out2 = net(batch["view_i1"], batch["view_i2"])
    torch.testing.assert_close(
        two["loss"], sum(w * t for w, t in zip((1.0, 0.5, 1.0), reference_terms(out2, POSITIONS), strict=True))
    )


def test_step_errors_name_the_problem():
    net, batch = make_network(), make_batch()
    del batch["view_v2"]
    with pytest.raises(MedclInputError, match=r"lacks \['view_v2'\].*RandPatchWithPositiond"):
        MACLStep()(net, batch)
    with pytest.raises(MedclInputError, match="4 views"):
        MACLStep(view_keys=["a", "b", "c"])
    with pytest.raises(MedclInputError, match="non-negative"):
        MACLStep(weight_d=-1.0)
    with pytest.raises(MedclInputError, match=r"\['code', 'paper'\], got 'papr'"):
        MACLStep(supcon_form="papr")
    with pytest.raises(MedclInputError, match=r"er_reduction must be one of \['mean', 'sum'\]"):
        MACLStep(er_reduction="avg")
    with pytest.raises(MedclInputError, match=r"pixel_positives must be one of \['position', 'sample'\]"):
        MACLStep(pixel_positives="positon")
    with pytest.raises(ValueError, match="both spatial views"):
        net(batch["view_i1"], batch["view_i2"], batch["view_v1"])


# ----------------------------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------------------------
class TwoTermStep:
    """A non-MACL step (as MixCL's would be): any terms, the total under "loss"."""

    def __call__(self, network, batch):
        pred = network(batch["x"])
        loss_a = (pred - batch["y"]).pow(2).mean()
        loss_b = pred.abs().mean()
        return {"loss": loss_a + 0.1 * loss_b, "loss_a": loss_a, "loss_b": loss_b}


def _linear_data(n: int = 4):
    g = torch.Generator().manual_seed(0)
    return [
        {"x": MetaTensor(torch.randn(2, 3, generator=g)), "y": torch.randn(2, 1, generator=g), "name": ["a", "b"]}
        for _ in range(n)
    ]


def test_trainer_runs_a_generic_step_and_exposes_every_term(capfd):
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    before = [p.detach().clone() for p in net.parameters()]
    seen_batches, events = [], []
    metrics = {
        "loss_a": Average(output_transform=from_engine(["loss_a"], first=True)),
        "loss_b": Average(output_transform=from_engine(["loss_b"], first=True)),
    }

    def step(network, batch):
        seen_batches.append(batch)
        return TwoTermStep()(network, batch)

    trainer = PretrainTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        epoch_length=2,
        train_data_loader=_linear_data(),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=step,
        key_train_metric={"train_loss": Average(output_transform=from_engine(["loss"], first=True))},
        additional_metrics=metrics,
        train_handlers=[StatsHandler(name="pretrain_test", output_transform=lambda x: x[0])],
    )
    for event in (
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    ):
        trainer.add_event_handler(event, lambda e, ev=event: events.append((ev, type(e.state.output).__name__)))
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    trainer.run()

    # the batch reaches the step as plain tensors on the device, other values untouched
    assert type(seen_batches[0]["x"]) is torch.Tensor and seen_batches[0]["name"] == ["a", "b"]
    # events in SupervisedTrainer's order; during the iteration the output is the step's dict, decollated at
    # MODEL_COMPLETED (the trainer's own handler runs first)
    assert events[:4] == [
        (IterationEvents.FORWARD_COMPLETED, "dict"),
        (IterationEvents.LOSS_COMPLETED, "dict"),
        (IterationEvents.BACKWARD_COMPLETED, "dict"),
        (IterationEvents.MODEL_COMPLETED, "list"),
    ]
    # after the iteration: a decollated output, every term a float
    assert len(outputs) == 2 and isinstance(outputs[0], list) and len(outputs[0]) == 1
    assert set(outputs[0][0]) == {"loss", "loss_a", "loss_b"} and all(
        isinstance(v, float) for v in outputs[0][0].values()
    )
    assert outputs[0][0]["loss"] == pytest.approx(outputs[0][0]["loss_a"] + 0.1 * outputs[0][0]["loss_b"], rel=1e-5)
    # epoch averages of each term, and the iteration log prints every term
    assert trainer.state.metrics["loss_a"] == pytest.approx(np.mean([o[0]["loss_a"] for o in outputs]))
    logged = capfd.readouterr()
    assert "loss_a: " in logged.out + logged.err and "loss_b: " in logged.out + logged.err
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_trainer_gradient_accumulation_and_raw_output():
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    steps = []
    opt.register_step_post_hook(lambda *args: steps.append(1))
    trainer = PretrainTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=4,
        train_data_loader=_linear_data(),
        network=net,
        optimizer=opt,
        loss_function=TwoTermStep(),
        accumulation_steps=2,
        decollate=False,
    )
    trainer.run()
    assert len(steps) == 2
    assert isinstance(trainer.state.output, dict) and isinstance(trainer.state.output["loss_a"], torch.Tensor)


@pytest.mark.parametrize(
    "bad, error",
    [
        (lambda net, batch: net(batch["x"]).sum(), TypeError),
        (lambda net, batch: {"total": net(batch["x"]).sum()}, KeyError),
        (lambda net, batch: {"loss": net(batch["x"])}, ValueError),
    ],
)
def test_trainer_rejects_malformed_steps(bad, error):
    net = nn.Linear(3, 1)
    trainer = PretrainTrainer(
        "cpu", 1, _linear_data(), net, torch.optim.SGD(net.parameters(), lr=0.1), bad, epoch_length=1
    )
    with pytest.raises(error):
        trainer.run()


def test_prepare_dict_batch_rejects_tuples():
    with pytest.raises(TypeError, match="dict batches"):
        prepare_dict_batch((torch.zeros(1), torch.zeros(1)))


def test_trainer_runs_the_macl_step():
    net = make_network()
    before = {k: v.detach().clone() for k, v in net.backbone.state_dict().items()}
    trainer = PretrainTrainer(
        "cpu",
        1,
        [make_batch(i) for i in range(2)],
        net,
        torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9),
        MACLStep(),
    )
    trainer.run()
    out = trainer.state.output[0]
    assert out["loss"] == pytest.approx(out["loss_g"] + 0.5 * out["loss_d"] + out["loss_er"], rel=1e-5)
    after = net.backbone.state_dict()
    assert not torch.equal(before["down_4.convs.conv_1.conv.weight"], after["down_4.convs.conv_1.conv.weight"])
    assert torch.equal(before["upcat_1.convs.conv_1.conv.weight"], after["upcat_1.convs.conv_1.conv.weight"])


# ----------------------------------------------------------------------------------------------------------------------
# the views of pretrain.json
# ----------------------------------------------------------------------------------------------------------------------
def _views(dims: int, samples: int, **overrides) -> Compose:
    parser = ConfigParser()
    parser.read_config(str(PRETRAIN))
    parser.update({"spatial_dims": dims, "samples_per_volume": samples, **overrides})
    views = Compose(parser.get_parsed_content("view_transforms#transforms"))
    views.set_random_state(seed=0)
    return views


def test_views_differ_and_keep_the_position_of_their_slice():
    depth = 20
    rng = np.random.default_rng(0)
    # independent slices, exactly the in-plane patch size: each sample is one whole slice
    volume = torch.as_tensor(rng.random((1, 64, 64, depth)), dtype=torch.float32)
    samples = _views(2, samples=4, views="code")({"image": MetaTensor(volume)})
    assert len(samples) == 4
    padded = samples[0]["image"].shape[1:]  # in-plane patch, (64, 64)
    assert tuple(padded) == (64, 64)
    for s in samples:
        views = [s[k] for k in VIEW_KEYS]
        assert all(tuple(v.shape) == (1, 64, 64) for v in views)
        for i in range(4):  # all four views differ from each other and from the sampled slice
            assert not torch.allclose(views[i], s["image"])
            for j in range(i + 1, 4):
                assert not torch.allclose(views[i], views[j])
        assert 0.0 < float(s["position"]) <= 1.0
        # the intensity views are blurred / rescaled copies of the slice at that position
        index = round(float(s["position"]) * depth) - 1
        for key in ("view_i1", "view_i2"):
            v = np.asarray(s[key]).ravel()
            corr = [np.corrcoef(v, np.asarray(volume[0, :, :, z]).ravel())[0, 1] for z in range(depth)]
            assert int(np.argmax(corr)) == index, (key, index, np.round(corr, 2))
        for v in views[:2]:
            assert float(v.min()) == pytest.approx(0.0, abs=1e-6) and float(v.max()) == pytest.approx(1.0, abs=1e-6)


def test_views_two_view_mode_and_3d():
    samples = _views(2, samples=1, view_keys=list(VIEW_KEYS[:2]))({"image": MetaTensor(torch.rand(1, 64, 64, 8))})
    assert "view_i1" in samples[0] and "view_v1" not in samples[0]
    volume = MetaTensor(torch.rand(1, 64, 64, 64))
    s = _views(3, samples=1)({"image": volume})[0]
    assert all(tuple(s[k].shape) == (1, 64, 64, 64) for k in VIEW_KEYS)
    assert float(s["position"]) == pytest.approx(33 / 64)  # the only 64^3 patch: centre index 32
    assert not torch.allclose(s["view_v1"], s["view_v2"])


def test_rand_elastic_rotation_scale_and_shared_draw():
    x = torch.rand(1, 8, 6)
    rotate = RandElasticd(
        ["a", "b"], 2, prob=1.0, magnitude_range=None, rotate_range=(math.pi, math.pi), scale_range=None
    )
    out = rotate({"a": x, "b": x.clone()})
    torch.testing.assert_close(torch.as_tensor(out["a"]), torch.flip(x, (1, 2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["a"], out["b"])  # one draw for all keys
    x3 = torch.rand(1, 6, 4, 5)
    out3 = RandElasticd(
        "a", 3, prob=1.0, magnitude_range=None, rotate_range=(math.pi, math.pi), rotate_axis=2, scale_range=None
    )({"a": x3})["a"]
    torch.testing.assert_close(torch.as_tensor(out3), torch.flip(x3, (1, 2)), atol=1e-5, rtol=0)
    assert torch.equal(RandElasticd("a", 2, prob=0.0)({"a": x})["a"], x)
    warped = RandElasticd("a", 2, prob=1.0)
    warped.set_random_state(0)
    y1 = warped({"a": torch.rand(1, 64, 64)})["a"]
    assert y1.shape == (1, 64, 64)
    with pytest.raises(MedclInputError, match="spatial_dims=3"):
        RandElasticd("a", 3, prob=1.0)({"a": x})


# ----------------------------------------------------------------------------------------------------------------------
# backbones through network_def (the documented overrides)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_overrides_build_and_step(name, phantom_dir):
    parser = ConfigParser()
    parser.read_config(str(PRETRAIN))
    parser.update({"dataset_dir": str(phantom_dir), "network_def": BACKBONES[name], "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network")
    assert type(network.backbone).__name__ == name
    terms = parser.get_parsed_content("loss")(network, make_batch(b=2))
    assert torch.isfinite(terms["loss"])
