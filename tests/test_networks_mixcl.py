"""MixCL networks: the per-pixel projector, the pre-training model on a UNETR, token maps and fine-tuning prefixes."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR

from medcl.errors import MedclInputError
from medcl.networks.feature_taps import FeatureTaps
from medcl.networks.mixcl import MIXCL_LAYERS, MixCLPretrainModel, as_feature_map, mixcl_pretrained_prefixes
from medcl.networks.projectors import PointwiseProjector

pytestmark = pytest.mark.usefixtures("one_thread")

F = 8  # feature_size
HIDDEN = 96
SIZE = 32


def make_unetr(out_channels: int = 1, dims: int = 3, seed: int = 0) -> UNETR:
    torch.manual_seed(seed)
    return UNETR(
        1, out_channels, (SIZE,) * dims, feature_size=F, hidden_size=HIDDEN, mlp_dim=192, num_heads=4, spatial_dims=dims
    )


def under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


# ----------------------------------------------------------------------------------------------------------------------
# PointwiseProjector
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims, spatial", [(2, (6, 5)), (3, (4, 3, 5))])
def test_pointwise_projector_shape(dims, spatial):
    proj = PointwiseProjector(6, dims)
    out = proj(torch.randn(2, 6, *spatial))
    assert out.shape == (2, 12, *spatial)
    assert PointwiseProjector(6, dims, expansion=3)(torch.randn(2, 6, *spatial)).shape == (2, 18, *spatial)


@pytest.mark.parametrize("dims, spatial", [(2, (5, 4)), (3, (3, 4, 2))])
def test_pointwise_projector_acts_per_pixel(dims, spatial):
    torch.manual_seed(0)
    c = 5
    proj = PointwiseProjector(c, dims)
    with torch.no_grad():  # non-trivial running statistics, then eval mode
        for _ in range(3):
            proj(torch.randn(4, c, *spatial) * 3 + 1)
    proj.eval()
    x = torch.randn(2, c, *spatial)
    with torch.no_grad():
        y = proj(x)
        # permute all pixels of the batch (items and locations together)
        pixels = x.movedim(1, -1).reshape(-1, c)
        perm = torch.randperm(pixels.shape[0])
        xp = pixels[perm].reshape(2, *spatial, c).movedim(-1, 1)
        yp = proj(xp)
    y_pixels = y.movedim(1, -1).reshape(-1, 2 * c)
    yp_pixels = yp.movedim(1, -1).reshape(-1, 2 * c)
    torch.testing.assert_close(yp_pixels, y_pixels[perm])
    assert not torch.allclose(yp_pixels, y_pixels)  # the permutation did move pixels


@pytest.mark.parametrize("dims, shape", [(3, (2, 4, 8, 8)), (2, (2, 4, 8, 8, 8)), (2, (4, 8, 8))])
def test_pointwise_projector_rejects_wrong_ndim(dims, shape):
    with pytest.raises(ValueError):
        PointwiseProjector(4, dims)(torch.randn(*shape))


# ----------------------------------------------------------------------------------------------------------------------
# MixCLPretrainModel
# ----------------------------------------------------------------------------------------------------------------------
def test_pretrain_model_default_layers_shapes_and_channels():
    net = make_unetr()
    model = MixCLPretrainModel(net)
    assert model.layers == list(MIXCL_LAYERS)
    assert model.channels == [F, 2 * F, 4 * F, 8 * F]
    # the probe's channels are the tapped layers' real channels
    with FeatureTaps(net, list(MIXCL_LAYERS)) as taps:
        net(torch.randn(1, 1, SIZE, SIZE, SIZE))
    assert model.channels == [int(taps.outputs[n].shape[1]) for n in MIXCL_LAYERS]

    out = model(torch.randn(2, 1, SIZE, SIZE, SIZE))
    assert out["recon"].shape == (2, 1, SIZE, SIZE, SIZE)
    expected = [(2, 2 * c, s, s, s) for c, s in zip((F, 2 * F, 4 * F, 8 * F), (32, 16, 8, 4), strict=True)]
    assert [tuple(z.shape) for z in out["z"]] == expected
    assert all(torch.isfinite(z).all() for z in out["z"])


def test_pretrain_model_taps_transformer_blocks_as_token_maps():
    net = make_unetr()
    model = MixCLPretrainModel(net, layers=["vit.blocks.3", "vit.blocks.11"])
    assert model.channels == [HIDDEN, HIDDEN]
    x = torch.randn(2, 1, SIZE, SIZE, SIZE)
    out = model(x)
    assert [tuple(z.shape) for z in out["z"]] == [(2, 2 * HIDDEN, 2, 2, 2)] * 2

    # token t of the block output lands at grid position t in row-major order: in eval mode (per-pixel
    # projector) z at (i, j, k) is the projection of token i*4 + j*2 + k
    model.eval()
    with torch.no_grad():
        out = model(x)
        with FeatureTaps(net, ["vit.blocks.3"]) as taps:
            net(x)
        tokens = taps.outputs["vit.blocks.3"]
        tokens = tokens[0] if isinstance(tokens, (tuple, list)) else tokens
        assert tokens.shape == (2, 8, HIDDEN)
        by_token = model.projectors[0](tokens.transpose(1, 2).reshape(2, HIDDEN, 8, 1, 1))[..., 0, 0]  # (B, 2h, 8)
    z = out["z"][0]
    for i in range(2):
        for j in range(2):
            for k in range(2):
                torch.testing.assert_close(z[:, :, i, j, k], by_token[:, :, i * 4 + j * 2 + k])


def test_pretrain_model_rejects_wrong_input_size_and_unknown_layer():
    net = make_unetr()
    model = MixCLPretrainModel(net)
    with pytest.raises(MedclInputError, match="32"):
        model(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(MedclInputError):
        model(torch.randn(1, 1, SIZE, SIZE, 16))
    with pytest.raises(MedclInputError):
        MixCLPretrainModel(net, layers=["encoder1", "encoder9"])
    with pytest.raises(MedclInputError):
        MixCLPretrainModel(net, layers=["vit.blocks.99"])


def test_pretrain_model_gradients_reach_projectors_encoder_and_decoder():
    net = make_unetr()
    model = MixCLPretrainModel(net)
    out = model(torch.randn(2, 1, SIZE, SIZE, SIZE))
    loss = sum(z.pow(2).mean() for z in out["z"]) + out["recon"].pow(2).mean()
    loss.backward()

    def has_grad(params) -> bool:
        return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)

    for i, proj in enumerate(model.projectors):
        assert has_grad(proj.parameters()), f"projector {i} got no gradient"
        assert has_grad([proj.layers[0].conv.weight]), f"first conv of projector {i} got no gradient"
    assert has_grad(net.vit.parameters())
    assert has_grad(net.vit.blocks[-1].parameters())
    assert has_grad(net.decoder2.parameters())
    assert has_grad(net.out.parameters())


def test_pretrain_model_gradient_of_z_alone_reaches_vit_not_decoder():
    net = make_unetr()
    model = MixCLPretrainModel(net)
    out = model(torch.randn(2, 1, SIZE, SIZE, SIZE))
    sum(z.pow(2).mean() for z in out["z"]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.vit.parameters())
    assert all(p.grad is None or not p.grad.abs().sum() > 0 for p in net.decoder2.parameters())


def test_pretrain_model_2d_unetr():
    net = make_unetr(dims=2)
    model = MixCLPretrainModel(net, spatial_dims=2)
    assert model.channels == [F, 2 * F, 4 * F, 8 * F]
    out = model(torch.randn(2, 1, SIZE, SIZE))
    assert out["recon"].shape == (2, 1, SIZE, SIZE)
    assert [tuple(z.shape) for z in out["z"]] == [
        (2, 2 * c, s, s) for c, s in zip((F, 2 * F, 4 * F, 8 * F), (32, 16, 8, 4), strict=True)
    ]
    with pytest.raises(MedclInputError):
        model(torch.randn(2, 1, 16, 16))


def test_pretrain_model_explicit_channels():
    net = make_unetr()
    model = MixCLPretrainModel(net, layers=["encoder2"], channels=[2 * F], expansion=3)
    assert model(torch.randn(1, 1, SIZE, SIZE, SIZE))["z"][0].shape == (1, 6 * F, 16, 16, 16)
    with pytest.raises(MedclInputError):
        MixCLPretrainModel(net, channels=[F, 2 * F])


# ----------------------------------------------------------------------------------------------------------------------
# as_feature_map
# ----------------------------------------------------------------------------------------------------------------------
def test_as_feature_map_token_order_is_row_major():
    grid = (2, 3, 4)
    tokens = torch.randn(2, 24, 5)
    fmap = as_feature_map(tokens, grid)
    assert fmap.shape == (2, 5, 2, 3, 4)
    for i in range(2):
        for j in range(3):
            for k in range(4):
                torch.testing.assert_close(fmap[:, :, i, j, k], tokens[:, i * 12 + j * 4 + k, :])
    fmap2d = as_feature_map(tokens, (4, 6))
    torch.testing.assert_close(fmap2d[:, :, 1, 2], tokens[:, 1 * 6 + 2, :])


def test_as_feature_map_tuple_and_maps():
    tokens = torch.randn(1, 8, 3)
    torch.testing.assert_close(as_feature_map((tokens, [torch.zeros(1)]), (2, 2, 2)), as_feature_map(tokens, (2, 2, 2)))
    torch.testing.assert_close(as_feature_map([tokens], (2, 2, 2)), as_feature_map(tokens, (2, 2, 2)))
    fmap = torch.randn(1, 3, 4, 4, 4)
    assert torch.equal(as_feature_map(fmap, (2, 2, 2)), fmap)  # already a map: unchanged


def test_as_feature_map_rejects_wrong_token_count():
    with pytest.raises(MedclInputError):
        as_feature_map(torch.randn(1, 7, 3), (2, 2, 2))
    with pytest.raises(MedclInputError):
        as_feature_map(torch.randn(1, 9, 3), (2, 2, 2))
    with pytest.raises(MedclInputError):
        as_feature_map(("not a tensor",), (2, 2, 2))


# ----------------------------------------------------------------------------------------------------------------------
# fine-tuning prefixes
# ----------------------------------------------------------------------------------------------------------------------
def test_pretrained_prefixes_cover_encoder_with_matching_shapes():
    finetune = make_unetr(out_channels=4, seed=1)
    prefixes = mixcl_pretrained_prefixes(finetune)
    assert prefixes == ["vit", "encoder1", "encoder2", "encoder3", "encoder4"]

    pretrain = MixCLPretrainModel(make_unetr(out_channels=1)).backbone.state_dict()
    target = finetune.state_dict()
    covered = [k for k in pretrain if under(k, prefixes)]
    assert covered and any(k.startswith("vit.blocks.11.") for k in covered)
    for k in covered:
        assert k in target and target[k].shape == pretrain[k].shape, k
    # every fine-tuning key under the prefixes exists in the checkpoint
    assert {k for k in target if under(k, prefixes)} == set(covered)
    # the output layer (whose shape differs) and the decoder are not covered
    out_keys = [k for k in pretrain if k.startswith("out.")]
    assert out_keys and not any(under(k, prefixes) for k in out_keys)
    assert any(pretrain[k].shape != target[k].shape for k in out_keys)
    assert not any(under(k, prefixes) for k in target if k.startswith(("decoder2.", "decoder5.")))
