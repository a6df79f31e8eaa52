"""SegContrastNet's segmentation-only layers (the public code's seg_c1_a / seg_c1_b): the contrastive head reads the
shared decoder level, the logits come from two extra 3x3 conv-BN-ReLU layers on top of it."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import BasicUNet

from medcl.errors import MedclInputError
from medcl.networks import ContrastiveHead, SegContrastNet
from medcl.networks.seg_contrast import SegTail


def _net(seg_layers: int = 2, spatial_dims: int = 2) -> SegContrastNet:
    torch.manual_seed(0)
    backbone = BasicUNet(spatial_dims, 1, 3, features=(4, 4, 8, 8, 8, 6), norm="batch")
    return SegContrastNet(backbone, tap="upcat_1", tap_channels=6, spatial_dims=spatial_dims, seg_layers=seg_layers)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_logits_pass_through_the_extra_layers(spatial_dims, one_thread):
    net = _net(spatial_dims=spatial_dims).eval()
    tail = net.backbone.final_conv
    assert isinstance(tail, SegTail) and len(tail.layers) == 2
    for layer in tail.layers:  # 3x3 conv (no bias) -> batch norm -> ReLU
        conv = layer.conv
        assert conv.kernel_size == (3,) * spatial_dims and conv.bias is None
        assert conv.in_channels == conv.out_channels == 6
    seen = {}
    handles = [
        net.backbone.upcat_1.register_forward_hook(lambda m, a, o: seen.__setitem__("shared", o)),
        tail.layers.register_forward_hook(lambda m, a, o: seen.__setitem__("seg_in", a[0])),
        tail.out.register_forward_hook(lambda m, a, o: seen.__setitem__("out_in", a[0])),
        net.head.register_forward_hook(lambda m, a, o: seen.__setitem__("head_in", a[0])),
    ]
    x = torch.randn(2, 1, *([16] * spatial_dims))
    logits, z = net(x, return_embeddings=True)
    for h in handles:
        h.remove()
    assert seen["head_in"] is seen["shared"] and seen["seg_in"] is seen["shared"]  # both branch off the shared level
    torch.testing.assert_close(seen["out_in"], tail.layers(seen["shared"]))  # logits layer sees the extra layers
    torch.testing.assert_close(logits, tail.out(tail.layers(seen["shared"])))
    assert not torch.allclose(seen["out_in"], seen["shared"])
    assert logits.shape == (2, 3, *([16] * spatial_dims)) and z.shape[1] == 16
    torch.testing.assert_close(net(x), logits)  # forward(x) = logits


def test_zeroing_the_extra_layers_changes_logits_not_embeddings(one_thread):
    net = _net().eval()
    x = torch.randn(2, 1, 16, 16)
    logits, z = net(x, return_embeddings=True)
    with torch.no_grad():
        for p in net.backbone.final_conv.layers.parameters():
            p.zero_()
    logits0, z0 = net(x, return_embeddings=True)
    torch.testing.assert_close(z0, z)  # the tapped features and the head do not depend on the extra layers
    assert (logits0 - logits).abs().max() > 1e-3
    # with zero weights (and zero BN shift) the extra layers output 0: logits are the 1x1 conv's bias everywhere
    bias = net.backbone.final_conv.out.bias
    torch.testing.assert_close(logits0, bias.reshape(1, -1, 1, 1).expand_as(logits0))


def test_seg_layers_off_and_gradients(one_thread):
    off = _net(seg_layers=0).train()
    assert not isinstance(off.backbone.final_conv, SegTail)
    assert not any(".layers." in k for k in off.state_dict())
    on = _net().train()
    logits, z = on(torch.randn(2, 1, 16, 16), return_embeddings=True)
    z.sum().backward()  # the local loss's gradient reaches the shared decoder but not the segmentation-only layers
    assert all(p.grad is None for p in on.backbone.final_conv.parameters())
    assert on.backbone.upcat_1.convs.conv_0.conv.weight.grad.abs().sum() > 0
    with pytest.raises(MedclInputError, match="seg_layers"):
        _net(seg_layers=-1)
    backbone = BasicUNet(2, 1, 3, features=(4, 4, 8, 8, 8, 6))
    with pytest.raises(MedclInputError, match="final_cnv"):
        SegContrastNet(backbone, tap="upcat_1", tap_channels=6, seg_tail="final_cnv")
    SegContrastNet(backbone, tap="upcat_1", tap_channels=6)
    with pytest.raises(MedclInputError, match="already"):
        SegContrastNet(backbone, tap="upcat_1", tap_channels=6)


def test_traced_network_matches(one_thread):
    net = _net().eval()
    x = torch.randn(1, 1, 32, 32)
    traced = torch.jit.trace(net, x, check_trace=False)
    torch.testing.assert_close(traced(x), net(x))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_scripted_network_is_the_segmentation_network(spatial_dims, one_thread):
    """torch.jit.script works (the model-zoo's TorchScript check): the scripted forward gives the logits; the
    hook-based embedding branch stays Python-only."""
    net = _net(spatial_dims=spatial_dims).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, *([16] * spatial_dims))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))
        logits, emb = net(x, return_embeddings=True)  # eager module unchanged by scripting
    assert logits.shape[1] == 3 and emb.shape[1] == 16


def test_contrastive_head_scripts(one_thread):
    head = ContrastiveHead(in_channels=6, spatial_dims=2).eval()
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(head)(x), head(x))
    with pytest.raises(ValueError, match=r"got shape \[2, 6, 8\]"):
        head(x[..., 0])
