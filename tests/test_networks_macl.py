"""Tests of MACL's network side: feature taps, projectors, the two-branch pre-training model, pretrained prefixes."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AttentionUnet, BasicUNet, BasicUNetPlusPlus, DynUNet, UNet
from torch import nn

from medcl.errors import MedclInputError
from medcl.losses.dense_supcon import DenseSupConLoss
from medcl.losses.feature_consistency import FeatureConsistencyLoss
from medcl.losses.supcon import PositionalSupConLoss
from medcl.networks.feature_taps import FeatureTaps
from medcl.networks.macl import BACKBONE_TAPS, BackboneTaps, MACLPretrainModel, pretrained_prefixes, resolve_taps
from medcl.networks.projectors import ImageProjector, PixelProjector

KINDS = ("basicunet", "unet", "attentionunet", "basicunetplusplus", "dynunet")
SIZE = 64  # 4-level nets at scale 0.25: the dominant bottleneck is 64 / 4 / 16 = 1 voxel wide
C_BOTTLENECK, C_LOCAL = 16, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def make_backbone(kind: str, dims: int) -> nn.Module:
    """Tiny 4-level versions of the 5 supported backbones: bottleneck 16 channels, decoder block 2 8 channels."""
    torch.manual_seed(0)
    feats = (4, 4, 8, 8, 16, 4)
    chans = (4, 8, 8, 16, 16)
    if kind == "basicunet":
        return BasicUNet(dims, 1, 2, features=feats, norm="batch")
    if kind == "unet":
        return UNet(dims, 1, 2, channels=chans, strides=(2, 2, 2, 2), num_res_units=1, norm="batch")
    if kind == "attentionunet":
        return AttentionUnet(dims, 1, 2, channels=chans, strides=(2, 2, 2, 2))
    if kind == "basicunetplusplus":
        return BasicUNetPlusPlus(dims, 1, 2, features=feats, norm="batch")
    if kind == "dynunet":
        return DynUNet(
            dims,
            1,
            2,
            kernel_size=[3] * 5,
            strides=[1, 2, 2, 2, 2],
            upsample_kernel_size=[2] * 4,
            filters=list(chans),
            norm_name="batch",
        )
    raise ValueError(kind)


def under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def macl_loss(out: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """L = L_g + 0.5 L_d + L_ER with the library's loss modules."""
    l_g = PositionalSupConLoss()(torch.stack([out["z_g_aux"], out["z_g_dom"]], dim=1), positions)
    l_d = DenseSupConLoss()(out["z_l_aux"], out["z_l_dom"], positions)
    l_er = FeatureConsistencyLoss(scale=0.25)(out["bottleneck_aux"], out["bottleneck_dom"])
    return l_g + 0.5 * l_d + l_er


# ----------------------------------------------------------------------------------------------------------------------
# the tap table
# ----------------------------------------------------------------------------------------------------------------------
def test_tap_table_names():
    taps = {k: resolve_taps(make_backbone(k, 2)) for k in KINDS}
    assert taps["basicunet"] == BackboneTaps("down_4", ("upcat_4", "upcat_3"))
    assert taps["basicunetplusplus"] == BackboneTaps("conv_4_0", ("upcat_3_1", "upcat_2_2"))
    assert taps["dynunet"] == BackboneTaps("bottleneck", ("upsamples.0", "upsamples.1"))
    assert taps["unet"] == BackboneTaps(
        "model.1.submodule.1.submodule.1.submodule.1.submodule",
        ("model.1.submodule.1.submodule.1.submodule.2", "model.1.submodule.1.submodule.2"),
    )
    assert taps["attentionunet"] == BackboneTaps(
        "model.1.submodule.1.submodule.1.submodule.1.submodule",
        ("model.1.submodule.1.submodule.1.submodule.1", "model.1.submodule.1.submodule.1"),
    )
    assert set(BACKBONE_TAPS) == {BasicUNet, UNet, AttentionUnet, BasicUNetPlusPlus, DynUNet}
    # depth-dependent names follow the configuration
    shallow = UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2))
    assert resolve_taps(shallow) == BackboneTaps("model.1.submodule.1.submodule", ("model.1.submodule.2", "model.2"))


def test_taps_override_forms():
    net = make_backbone("basicunet", 2)
    expected = BackboneTaps("down_3", ("upcat_3", "upcat_2"))
    assert resolve_taps(net, {"bottleneck": "down_3", "decoder": ["upcat_3", "upcat_2"]}) == expected
    assert resolve_taps(net, ("down_3", ["upcat_3", "upcat_2"])) == expected
    assert resolve_taps(net, ["down_3", "upcat_3", "upcat_2"]) == expected


def test_bad_tap_name_lists_available_modules():
    net = make_backbone("basicunet", 2)
    with pytest.raises(MedclInputError, match="no submodule named 'down_5'") as err:
        MACLPretrainModel(net, 2, taps={"bottleneck": "down_5", "decoder": ["upcat_4", "upcat_3"]})
    assert "down_4" in str(err.value) and "upcat_1" in str(err.value)  # suggestion and list of names
    with pytest.raises(MedclInputError, match="Available names"):
        FeatureTaps(net, ["upcat4"])
    with pytest.raises(MedclInputError, match="no tap table entry for Sequential"):
        MACLPretrainModel(nn.Sequential(nn.Conv2d(1, 2, 3)), 2)


# ----------------------------------------------------------------------------------------------------------------------
# feature taps
# ----------------------------------------------------------------------------------------------------------------------
def test_feature_taps_keep_autograd_and_remove_hooks():
    net = make_backbone("basicunet", 2).eval()
    x = torch.randn(2, 1, 32, 32)
    tapped = FeatureTaps(net, ["down_2"], stop_early=True)(x)["down_2"]
    manual = net.down_2(net.down_1(net.conv_0(x)))
    torch.testing.assert_close(tapped, manual)
    g_tapped = torch.autograd.grad(tapped.square().sum(), net.conv_0.conv_0.conv.weight)[0]
    g_manual = torch.autograd.grad(manual.square().sum(), net.conv_0.conv_0.conv.weight)[0]
    torch.testing.assert_close(g_tapped, g_manual)
    assert all(not m._forward_hooks for m in net.modules())
    # the context form runs the whole network and returns its output
    with FeatureTaps(net, ["down_4", "upcat_3"]) as taps:
        logits = net(x)
    assert logits.shape == (2, 2, 32, 32) and set(taps.outputs) == {"down_4", "upcat_3"}
    assert all(not m._forward_hooks for m in net.modules())


def test_early_stop_skips_later_modules():
    net = make_backbone("basicunet", 2)
    calls = {name: 0 for name in ("conv_0", "down_4", "upcat_4", "upcat_3", "upcat_2", "upcat_1", "final_conv")}
    for name in calls:
        getattr(net, name).register_forward_hook(lambda m, a, o, n=name: calls.__setitem__(n, calls[n] + 1))
    model = MACLPretrainModel(net, 2)
    calls.update({k: 0 for k in calls})  # forget the construction probe
    model(torch.randn(2, 1, SIZE, SIZE))
    assert calls == {"conv_0": 2, "down_4": 2, "upcat_4": 1, "upcat_3": 1, "upcat_2": 0, "upcat_1": 0, "final_conv": 0}
    calls.update({k: 0 for k in calls})
    model.encode(torch.randn(2, 1, SIZE, SIZE))  # auxiliary branch: encoder only
    assert calls["down_4"] == 1 and calls["upcat_4"] == 0
    calls.update({k: 0 for k in calls})
    FeatureTaps(net, ["down_4"], stop_early=False)(torch.randn(1, 1, SIZE, SIZE))  # no early stop: everything runs
    assert calls["final_conv"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# the pre-training model: shapes, losses, gradients, for each backbone in 2D and 3D
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_pretrain_model_shapes_and_gradients(kind, dims):
    net = make_backbone(kind, dims)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = MACLPretrainModel(net, spatial_dims=dims)
    prefixes = pretrained_prefixes(net)
    for k, v in net.state_dict().items():  # the probes leave the network as it was
        assert torch.equal(v, before[k]), k
    assert net.training and all(m.training for m in net.modules())

    b, s = 2, SIZE
    x1, x2 = torch.randn(b, 1, *(s,) * dims), torch.randn(b, 1, *(s,) * dims)
    out = model(x1, x2)
    small = (s // 16,) * dims
    assert out["z_g_dom"].shape == out["z_g_aux"].shape == (b, 128)
    assert out["z_l_dom"].shape == out["z_l_aux"].shape == (b, C_LOCAL, *small)
    assert out["bottleneck_aux"].shape == (b, C_BOTTLENECK, *small)
    assert out["bottleneck_dom"].shape == (b, C_BOTTLENECK, *(s // 64,) * dims)
    positions = torch.tensor([0.2, 0.25])
    loss = macl_loss(out, positions)
    assert torch.isfinite(loss)
    loss.backward()

    # exactly the encoder + first two decoder blocks (= pretrained_prefixes) receive a gradient
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
    expected = {n for n, _ in net.named_parameters() if under(n, prefixes)}
    assert with_grad == expected
    taps = resolve_taps(net)
    assert any(n.startswith(taps.decoder[1] + ".") for n in with_grad)
    later = {n for n, _ in net.named_parameters()} - expected
    assert later, "the later decoder blocks / output layer must exist and get no gradient"
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("backbone."))
    # the fine-tuning network loads the backbone's state dict directly
    fresh = make_backbone(kind, dims)
    fresh.load_state_dict(model.backbone.state_dict())


def test_basicunet_prefixes_and_dynunet_aliases():
    assert pretrained_prefixes(make_backbone("basicunet", 2)) == [
        "conv_0",
        "down_1",
        "down_2",
        "down_3",
        "down_4",
        "upcat_4",
        "upcat_3",
    ]
    dyn = pretrained_prefixes(make_backbone("dynunet", 2))
    # the same modules are in the state dict twice: under their own names and under skip_layers
    assert {"input_block", "downsamples", "bottleneck", "upsamples.0", "upsamples.1"} <= set(dyn)
    assert "skip_layers.downsample" in dyn and "upsamples.2" not in dyn and "output_block" not in dyn
    pp = pretrained_prefixes(make_backbone("basicunetplusplus", 2))
    assert "upcat_2_1" in pp and "upcat_0_1" not in pp and "upcat_1_3" not in pp


def test_default_basicunet_instance_norm_2d():
    """The bundle's default backbone (instance norm): the dominant bottleneck needs >= 2 pixels, so 128²."""
    torch.manual_seed(0)
    net = BasicUNet(2, 1, 3, features=(4, 4, 8, 8, 16, 4))
    model = MACLPretrainModel(net, 2)
    out = model(torch.randn(2, 1, 128, 128))
    assert out["z_l_aux"].shape == out["z_l_dom"].shape == (2, 8, 8, 8)
    assert out["bottleneck_dom"].shape == (2, 16, 2, 2)
    macl_loss(out, torch.tensor([0.1, 0.9])).backward()


def test_misaligned_taps_raise():
    net = make_backbone("basicunet", 2)
    model = MACLPretrainModel(net, 2, taps=("down_4", ["upcat_4", "upcat_2"]))  # 3 upsamplings: 8x, not 4x
    with pytest.raises(ValueError, match="decoder block 2"):
        model(torch.randn(2, 1, SIZE, SIZE))


def test_downsample_matches_public_code():
    model = MACLPretrainModel(make_backbone("basicunet", 2), 2)
    x = torch.randn(2, 1, 64, 64)
    expected = nn.functional.interpolate(x, scale_factor=0.25, mode="bilinear", align_corners=True)
    torch.testing.assert_close(model.downsample(x), expected)
    x3 = torch.randn(1, 1, 16, 16, 16)
    assert model.downsample(x3).shape == (1, 1, 4, 4, 4)  # "bilinear" means trilinear for 3D inputs


def test_projectors_shapes():
    assert PixelProjector(16, 8, 3)(torch.randn(2, 16, 4, 4, 4)).shape == (2, 8, 4, 4, 4)
    assert PixelProjector(16, 8, 2)(torch.randn(2, 16, 4, 4)).shape == (2, 8, 4, 4)
    proj = ImageProjector(16, 32, 128)
    assert proj(torch.randn(2, 16, 4, 4, 4)).shape == (2, 128)
    x = torch.randn(2, 16, 3, 5)
    torch.testing.assert_close(proj(x), proj(x.mean(dim=(2, 3))))  # global average pooling
