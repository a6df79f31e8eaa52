"""SliceBatchInferer: batches of slices give SliceInferer's result (label maps identical) and keep MetaTensor meta."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer, SlidingWindowInferer
from monai.networks.nets import UNet

from medcl.inferers import volume_inferer
from medcl.inferers.volume import SliceBatchInferer


@pytest.fixture(scope="module")
def net() -> UNet:
    torch.manual_seed(0)
    return UNet(2, 1, 5, (8, 16, 32), (2, 2), num_res_units=1).eval()


@pytest.mark.parametrize("spatial_dim,shape,roi", [(2, (2, 1, 40, 36, 7), (32, 32)), (0, (1, 1, 9, 32, 32), (32, 32))])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_same_as_slice_inferer(net, spatial_dim, shape, roi, batch):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    ref = SliceInferer(spatial_dim=spatial_dim, roi_size=roi, sw_batch_size=4, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        expected, got = ref(x, net), SliceBatchInferer(roi, spatial_dim, batch)(x, net)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_network_calls_are_batched_and_meta_kept(net):
    calls = []

    def counting(x):
        calls.append(x.shape[0])
        return net(x)

    x = MetaTensor(torch.rand(1, 1, 32, 32, 10), affine=torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0])))
    with torch.no_grad():
        out = SliceBatchInferer((32, 32), 2, slice_batch_size=4)(x, counting)
    assert calls == [4, 4, 2]  # 10 slices, one window each, 4 per call
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, x.affine)


def test_volume_inferer_choice_and_bad_arguments():
    assert isinstance(volume_inferer(2, 64), SliceBatchInferer)
    assert isinstance(volume_inferer(3, [32, 32, 32]), SlidingWindowInferer)
    with pytest.raises(ValueError, match="slice_batch_size"):
        SliceBatchInferer((32, 32), 2, slice_batch_size=0)
    with pytest.raises(ValueError, match="roi_size"):
        SliceBatchInferer((32, 32, 32), 2)
    with pytest.raises(ValueError, match="5D|\\(B, C, X, Y, Z\\)"):
        SliceBatchInferer((32, 32), 2)(torch.rand(1, 1, 32, 32), lambda t: t)
