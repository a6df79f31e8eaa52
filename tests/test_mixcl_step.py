"""MixCL's pre-training step: the three terms of eq. 1 against manual computations from the model outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNETR

from medcl.engines import MixCLStep
from medcl.engines.mixcl_step import MIXCL_VIEW_KEYS
from medcl.errors import MedclInputError
from medcl.losses.barlow_twins_pixel import BarlowTwinsPixelLoss
from medcl.losses.label_consistency import LabelConsistencyLoss
from medcl.networks.mixcl import MixCLPretrainModel
from medcl.samplers.boundary_weighted import BoundaryWeightedPixelSampler, gather_pixel_features

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
B = 2
R = 12  # pixels per class (small: fast)


@pytest.fixture(scope="module")
def network() -> MixCLPretrainModel:
    torch.manual_seed(0)
    net = UNETR(1, 1, SIZE, feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4)
    return MixCLPretrainModel(net)


def _labels(shift: int, three: bool) -> torch.Tensor:
    lab = torch.zeros(1, SIZE, SIZE, SIZE)
    lab[:, 4 + shift : 16 + shift, 4:16, 6:20] = 1
    if three:
        lab[:, 16:28, 18 - shift : 30 - shift, 8:24] = 2
    return lab


def make_batch(seed: int = 0, ids=(0, 1)) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 1, SIZE, SIZE, SIZE, generator=g)
    image_2 = torch.rand(B, 1, SIZE, SIZE, SIZE, generator=g)
    batch = {
        "view_1": image + 0.1 * torch.randn(B, 1, SIZE, SIZE, SIZE, generator=g),
        "view_1p": image * 0.9 + 0.05,
        "view_2": image_2 + 0.1 * torch.randn(B, 1, SIZE, SIZE, SIZE, generator=g),
        "image": image,
        "image_2": image_2,
        # both items use class ids 1 and 2 (3 classes with background)
        "label": torch.stack([_labels(0, True), _labels(2, True)]),
        "label_2": torch.stack([_labels(4, True), _labels(6, True)]),
    }
    if ids is not None:
        batch["dataset_id"] = torch.tensor(ids)
    return batch


def forward(network, batch):
    return network(torch.cat([batch[k] for k in MIXCL_VIEW_KEYS], dim=0))


def manual_label_term(out, batch, ids, layer=1, num_per_class=R, temperature=0.1):
    """Sampler + gather + loss in MixCLStep.label_term's call order (the sampler draws from torch's global RNG)."""
    z = out["z"][layer]
    z1, z2 = z[:B], z[2 * B :]
    sampler = BoundaryWeightedPixelSampler(num_per_class, mu=8.0, eps=0.05)
    b1, i1, y1 = sampler(batch["label"], size=z1.shape[2:])
    b2, i2, y2 = sampler(batch["label_2"], size=z2.shape[2:])
    f1, f2 = gather_pixel_features(z1, b1, i1), gather_pixel_features(z2, b2, i2)
    loss = LabelConsistencyLoss(temperature=temperature)
    if ids is None:
        return loss(f1, y1, f2, y2)
    ids = torch.as_tensor(ids)
    return loss(f1, y1, f2, y2, ids[b1], ids[b2])


def test_step_terms_and_weighted_total(network):
    batch = make_batch()
    step = MixCLStep(weight_id=0.5, alpha=2.0, beta=3.0, num_per_class=R)
    terms = step(network, batch)
    assert set(terms) == {"loss", "loss_id", "loss_label", "loss_recon"}
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
    assert all(terms[k].item() > 0 for k in ("loss_id", "loss_label", "loss_recon"))
    torch.testing.assert_close(
        terms["loss"], 0.5 * terms["loss_id"] + 2.0 * terms["loss_label"] + 3.0 * terms["loss_recon"]
    )
    assert terms["loss"].requires_grad


def eq3(p, p_tilde):
    """MixCL eq. 3, ||P - P~||^2, for each patch of the batch as a Python sum over its voxels; mean over the batch."""
    per_patch = []
    for b in range(p.shape[0]):
        total = 0.0
        for a, r in zip(p[b].reshape(-1).tolist(), p_tilde[b].reshape(-1).tolist(), strict=True):
            total += (a - r) ** 2
        per_patch.append(total)
    return sum(per_patch) / len(per_patch)


def test_recon_term_is_eq3_averaged_over_the_three_reconstructions(network):
    batch = make_batch(1)
    network.eval()
    try:
        terms = MixCLStep(num_per_class=R)(network, batch)
        mean_terms = MixCLStep(num_per_class=R, recon_reduction="mean")(network, batch)
        recon = forward(network, batch)["recon"]
    finally:
        network.train()
    r1, r1p, r2 = recon[:B], recon[B : 2 * B], recon[2 * B :]
    p1, p2 = batch["image"], batch["image_2"]
    expected = (eq3(p1, r1) + eq3(p1, r1p) + eq3(p2, r2)) / 3
    assert abs(float(terms["loss_recon"].detach()) - expected) <= 1e-4 * abs(expected)
    # V2 is reconstructed against P2, not P1
    wrong = (eq3(p1, r1) + eq3(p1, r1p) + eq3(p1, r2)) / 3
    assert abs(float(terms["loss_recon"].detach()) - wrong) > 1e-3 * abs(expected)
    # the "mean" option averages over the voxels as well (F.mse_loss)
    expected_mean = (F.mse_loss(r1, p1) + F.mse_loss(r1p, p1) + F.mse_loss(r2, p2)) / 3
    torch.testing.assert_close(mean_terms["loss_recon"], expected_mean)
    torch.testing.assert_close(terms["loss_recon"] / p1[0].numel(), expected_mean, rtol=1e-4, atol=1e-6)


def test_recon_gradient_matches_eq3():
    """d/dP~ of eq. 3 averaged over the batch: 2 (P~ - P) / B, for each of the three reconstructions (/ 3)."""
    step = MixCLStep(num_per_class=R)
    p = torch.randn(2, 1, 4, 4, 4)
    r = torch.randn(2, 1, 4, 4, 4, requires_grad=True)
    step.recon_term(r, p).backward()
    torch.testing.assert_close(r.grad, 2 * (r.detach() - p) / 2)


def test_unknown_recon_reduction_and_distance_are_named():
    with pytest.raises(MedclInputError, match="recon_reduction='avg'.*'sum', 'mean'"):
        MixCLStep(recon_reduction="avg")
    with pytest.raises(MedclInputError, match="boundary_distance='edge'.*'boundary', 'outside'"):
        MixCLStep(boundary_distance="edge")


def test_identity_term_is_barlow_twins_over_every_layer(network):
    batch = make_batch(2)
    terms = MixCLStep(lambd=0.02, num_per_class=R)(network, batch)
    out = forward(network, batch)  # train-mode batch norm: the same batch gives the same outputs
    expected = BarlowTwinsPixelLoss(lambd=0.02)([z[:B] for z in out["z"]], [z[B : 2 * B] for z in out["z"]])
    torch.testing.assert_close(terms["loss_id"], expected)
    assert len(out["z"]) == 4
    # all layers count: dropping the deepest one changes the value
    partial = BarlowTwinsPixelLoss(lambd=0.02)([z[:B] for z in out["z"][:3]], [z[B : 2 * B] for z in out["z"][:3]])
    assert not torch.allclose(terms["loss_id"], partial)


def test_label_term_matches_manual_sampling(network):
    batch = make_batch(3)
    torch.manual_seed(123)
    terms = MixCLStep(num_per_class=R, temperature=0.2)(network, batch)
    torch.manual_seed(123)
    out = forward(network, batch)
    expected = manual_label_term(out, batch, batch["dataset_id"], temperature=0.2)
    torch.testing.assert_close(terms["loss_label"], expected)
    # the pixels are drawn at random: another seed gives another value
    torch.manual_seed(124)
    out = forward(network, batch)
    assert not torch.allclose(terms["loss_label"], manual_label_term(out, batch, batch["dataset_id"], temperature=0.2))


def test_label_term_uses_label_layer(network):
    batch = make_batch(3)
    torch.manual_seed(7)
    terms = MixCLStep(num_per_class=R, label_layer=2)(network, batch)
    torch.manual_seed(7)
    out = forward(network, batch)
    torch.testing.assert_close(terms["loss_label"], manual_label_term(out, batch, batch["dataset_id"], layer=2))


def test_identity_ablation_gradient_equals_identity_term_gradient(network):
    batch = make_batch(4)
    params = list(network.parameters())

    network.zero_grad(set_to_none=True)
    MixCLStep(alpha=0.0, beta=0.0, num_per_class=R)(network, batch)["loss"].backward()
    g_total = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    network.zero_grad(set_to_none=True)
    MixCLStep(num_per_class=R)(network, batch)["loss_id"].backward()
    g_id = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    network.zero_grad(set_to_none=True)

    assert any(g.abs().sum() > 0 for g in g_id)
    for (name, _), a, b in zip(network.named_parameters(), g_total, g_id, strict=True):
        torch.testing.assert_close(a, b, msg=name)

    # with the full weights the gradient differs (the other terms do contribute)
    MixCLStep(alpha=1.0, beta=1.0, num_per_class=R)(network, batch)["loss"].backward()
    g_full = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    network.zero_grad(set_to_none=True)
    assert any(not torch.allclose(a, b) for a, b in zip(g_full, g_id, strict=True))


def _label_loss(network, batch, seed=11):
    torch.manual_seed(seed)
    return MixCLStep(num_per_class=R)(network, batch)["loss_label"]


def test_dataset_ids_namespace_the_classes(network):
    base = make_batch(5, ids=(0, 1))
    different = _label_loss(network, base)
    same = _label_loss(network, {**base, "dataset_id": torch.tensor([0, 0])})
    renamed = _label_loss(network, {**base, "dataset_id": torch.tensor([3, 7])})
    absent = _label_loss(network, {k: v for k, v in base.items() if k != "dataset_id"})
    assert torch.isfinite(different) and torch.isfinite(same)
    assert not torch.allclose(different, same)  # class k of two datasets is not the same class
    torch.testing.assert_close(renamed, different)  # only equality of ids matters
    torch.testing.assert_close(absent, same)  # no ids: one dataset
    # a plain list of ids (as a collated int list) works too
    torch.testing.assert_close(_label_loss(network, {**base, "dataset_id": [0, 1]}), different)


def test_step_errors_name_the_problem(network):
    batch = make_batch()
    del batch["label_2"]
    with pytest.raises(MedclInputError, match="label_2"):
        MixCLStep(num_per_class=R)(network, batch)
    batch = make_batch()
    del batch["view_1p"]
    with pytest.raises(MedclInputError, match="view_1p"):
        MixCLStep(num_per_class=R)(network, batch)
    for kwargs in ({"weight_id": -1.0}, {"alpha": -0.01}, {"beta": -1e-3}):
        with pytest.raises(MedclInputError, match="non-negative"):
            MixCLStep(**kwargs)
    with pytest.raises(MedclInputError, match="label_layer"):
        MixCLStep(label_layer=4, num_per_class=R)(network, make_batch())
    with pytest.raises(MedclInputError, match="label_layer"):
        MixCLStep(label_layer=-5, num_per_class=R)(network, make_batch())
    with pytest.raises(MedclInputError):
        MixCLStep(view_keys=("a", "b"))
    bad = make_batch()
    bad["view_2"] = bad["view_2"][:1]
    with pytest.raises(MedclInputError, match="shape"):
        MixCLStep(num_per_class=R)(network, bad)
