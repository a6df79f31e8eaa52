"""MACL's losses against references written from the paper's equations (Zeng et al., IEEE JBHI, §III.C):

- eq. 9, L_g:  sum_i -1/|Omega_i| sum_{j in Omega_i} log( exp(sim(Zg_i, ~Zg_j)/t) /
  sum_k 1[i != k] exp(sim(Zg_i, ~Zg_k)/t) )
- eq. 10, L_d: sum_i -1/|Omega_i| sum_{j in Omega_i} 1/|S| sum_s log( exp(sim(Zl_is, ~Zl_js)/t) /
  sum_k 1[i != k] exp(sim(Zl_is, ~Zl_ks)/t) )
- eq. 11, L_ER: || Y - down(~Y) ||_1

Z (no tilde) is the dominant branch, ~Z the auxiliary one, Omega_i the position-based positives (|p_i - p_j| < delta,
j = i included), sim the cosine similarity. Every reference below is a plain Python loop over anchors, positives,
locations and feature components, in the order the equation writes them; values and gradients (torch.autograd) are
compared with the fast modules' ``form="paper"`` / ``reduction="sum"`` options, and the defaults (the public code's
forms) are shown to differ from the equations by what the bundle doc says.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_macl_step import VIEW_KEYS, make_batch, make_network

from medcl.engines.macl_step import MACLStep
from medcl.errors import MedclInputError
from medcl.losses.dense_supcon import DenseSupConLoss
from medcl.losses.feature_consistency import FeatureConsistencyLoss
from medcl.losses.supcon import PositionalSupConLoss

DT = torch.float64
TAU, DELTA = 0.1, 0.1


# ----------------------------------------------------------------------------------------------------------------------
# the equations, literally
# ----------------------------------------------------------------------------------------------------------------------
def sim(u: torch.Tensor, v: torch.Tensor):
    """Cosine similarity, one component at a time."""
    dot, nu, nv = 0.0, 0.0, 0.0
    for d in range(u.shape[0]):
        dot = dot + u[d] * v[d]
        nu = nu + u[d] * u[d]
        nv = nv + v[d] * v[d]
    return dot / (torch.sqrt(nu) * torch.sqrt(nv))


def omega(i: int, positions: list[float], delta: float) -> list[int]:
    """Position-based positive indices of anchor i (PCL's rule; i itself is at distance 0)."""
    return [j for j in range(len(positions)) if abs(positions[i] - positions[j]) < delta]


def eq9(zg: torch.Tensor, zg_aux: torch.Tensor, positions: list[float], tau: float, delta: float):
    """L_g of eq. 9: zg (N, D) dominant projections, zg_aux (N, D) auxiliary ones."""
    n = zg.shape[0]
    loss = 0.0
    for i in range(n):
        pos = omega(i, positions, delta)
        denom = 0.0
        for k in range(n):
            if i != k:
                denom = denom + torch.exp(sim(zg[i], zg_aux[k]) / tau)
        acc = 0.0
        for j in pos:
            acc = acc + torch.log(torch.exp(sim(zg[i], zg_aux[j]) / tau) / denom)
        loss = loss - acc / len(pos)
    return loss


def eq10(zl: torch.Tensor, zl_aux: torch.Tensor, positives, tau: float):
    """L_d of eq. 10: zl, zl_aux (B, C, H, W); positives(i) -> Omega_i."""
    b, _, h, w = zl.shape
    locations = [(y, x) for y in range(h) for x in range(w)]
    loss = 0.0
    for i in range(b):
        pos = positives(i)
        outer = 0.0
        for j in pos:
            inner = 0.0
            for y, x in locations:
                denom = 0.0
                for k in range(b):
                    if i != k:
                        denom = denom + torch.exp(sim(zl[i, :, y, x], zl_aux[k, :, y, x]) / tau)
                inner = inner + torch.log(torch.exp(sim(zl[i, :, y, x], zl_aux[j, :, y, x]) / tau) / denom)
            outer = outer + inner / len(locations)
        loss = loss - outer / len(pos)
    return loss


def down(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Bilinear downsampling by ``factor`` with corners aligned (the public code's F.interpolate call; the paper does
    not name the interpolation): output pixel o samples the input at o * (in - 1) / (out - 1)."""
    b, c, h, w = x.shape
    oh, ow = int(math.floor(h * factor)), int(math.floor(w * factor))
    rows = []
    for bi in range(b):
        for ci in range(c):
            for oy in range(oh):
                for ox in range(ow):
                    sy = oy * (h - 1) / (oh - 1) if oh > 1 else 0.0
                    sx = ox * (w - 1) / (ow - 1) if ow > 1 else 0.0
                    y0, x0 = int(math.floor(sy)), int(math.floor(sx))
                    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
                    fy, fx = sy - y0, sx - x0
                    rows.append(
                        (1 - fy) * (1 - fx) * x[bi, ci, y0, x0]
                        + (1 - fy) * fx * x[bi, ci, y0, x1]
                        + fy * (1 - fx) * x[bi, ci, y1, x0]
                        + fy * fx * x[bi, ci, y1, x1]
                    )
    return torch.stack(rows).reshape(b, c, oh, ow)


def eq11(y: torch.Tensor, y_aux: torch.Tensor, factor: float):
    """L_ER of eq. 11: the L1 norm (sum of absolute values) of Y - down(~Y)."""
    d = down(y_aux, factor)
    total = 0.0
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in y.shape]).tolist():
        total = total + torch.abs(y[tuple(idx)] - d[tuple(idx)])
    return total


def value_and_grads(fn, inputs: list[torch.Tensor]):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    value = fn(*leaves)
    return value, torch.autograd.grad(value, leaves)


def assert_matches(fast, reference, inputs: list[torch.Tensor]) -> torch.Tensor:
    value, grads = value_and_grads(fast, inputs)
    ref_value, ref_grads = value_and_grads(reference, inputs)
    torch.testing.assert_close(value, ref_value.reshape(()), atol=1e-10, rtol=1e-9)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert float(rg.abs().sum()) > 0
        torch.testing.assert_close(g, rg, atol=1e-10, rtol=1e-9)
    return value


# positions with near neighbours (0.10 / 0.15 / 0.18) and loners: anchors with 1, 2 and 3 positives
POSITIONS = [0.10, 0.15, 0.50, 0.90, 0.18]


# ----------------------------------------------------------------------------------------------------------------------
# eq. 9
# ----------------------------------------------------------------------------------------------------------------------
def test_eq9_paper_form_matches_the_equation():
    g = torch.Generator().manual_seed(0)
    zg, zg_aux = torch.randn(5, 6, generator=g, dtype=DT), torch.randn(5, 6, generator=g, dtype=DT)
    pos = torch.tensor(POSITIONS, dtype=DT)
    loss = PositionalSupConLoss(TAU, DELTA, form="paper")
    assert_matches(
        lambda a, b: loss(torch.stack([a, b], 1), pos),
        lambda a, b: eq9(a, b, POSITIONS, TAU, DELTA),
        [zg, zg_aux],
    )


def test_eq9_code_form_and_base_temperature_differ_from_the_equation_as_documented():
    g = torch.Generator().manual_seed(1)
    zg, zg_aux = torch.randn(5, 6, generator=g, dtype=DT), torch.randn(5, 6, generator=g, dtype=DT)
    pos = torch.tensor(POSITIONS, dtype=DT)
    feats = torch.stack([zg, zg_aux], 1)
    literal = eq9(zg, zg_aux, POSITIONS, TAU, DELTA)
    code = PositionalSupConLoss(TAU, DELTA)(feats, pos)
    # the public code contrasts all 2N vectors (same-branch pairs too) and averages over anchors: not eq. 9
    assert not torch.isclose(code, literal, rtol=0.05)
    # the sum over anchors: eq. 9 grows with the batch, the code's mean does not
    doubled = torch.cat([feats, feats + 1e-3 * torch.randn(feats.shape, generator=g, dtype=DT)])
    far = torch.cat([pos, pos + 10.0])  # a second, far-away batch half: no cross positives
    paper = PositionalSupConLoss(TAU, DELTA, form="paper")
    assert float(paper(doubled, far)) > 1.5 * float(paper(feats, pos))
    # base_temperature multiplies either form by tau / base_temperature
    scaled = PositionalSupConLoss(TAU, DELTA, base_temperature=0.07, form="paper")(feats, pos)
    torch.testing.assert_close(scaled, literal * (TAU / 0.07))


def test_eq9_needs_two_views_and_two_samples_and_names_the_forms():
    loss = PositionalSupConLoss(form="paper")
    with pytest.raises(ValueError, match="V = 2"):
        loss(torch.randn(3, 4, 5), torch.rand(3))
    with pytest.raises(ValueError, match="at least 2"):
        loss(torch.randn(1, 2, 5), torch.rand(1))
    with pytest.raises(MedclInputError, match=r"one of \['code', 'paper'\], got 'Paper'"):
        PositionalSupConLoss(form="Paper")


# ----------------------------------------------------------------------------------------------------------------------
# eq. 10
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["position", "sample"])
def test_eq10_paper_form_matches_the_equation(rule):
    g = torch.Generator().manual_seed(2)
    zl, zl_aux = (torch.randn(5, 3, 2, 3, generator=g, dtype=DT) for _ in range(2))
    pos = torch.tensor(POSITIONS, dtype=DT)
    loss = DenseSupConLoss(TAU, DELTA, positives=rule, form="paper")

    def positives(i):
        return omega(i, POSITIONS, DELTA) if rule == "position" else [i]

    # forward(aux, dom): the dominant map holds the anchors
    assert_matches(lambda a, d: loss(a, d, pos), lambda a, d: eq10(d, a, positives, TAU), [zl_aux, zl])


def test_eq10_code_form_differs_from_the_equation():
    g = torch.Generator().manual_seed(3)
    zl, zl_aux = (torch.randn(4, 3, 2, 2, generator=g, dtype=DT) for _ in range(2))
    pos = torch.tensor(POSITIONS[:4], dtype=DT)
    literal = eq10(zl, zl_aux, lambda i: omega(i, POSITIONS[:4], DELTA), TAU)
    code = DenseSupConLoss(TAU, DELTA)(zl_aux, zl, pos)
    assert not torch.isclose(code, literal, rtol=0.05)
    # swapping the branches changes the paper form (anchors are dominant only), not the code form (symmetric)
    paper = DenseSupConLoss(TAU, DELTA, form="paper")
    assert not torch.isclose(paper(zl_aux, zl, pos), paper(zl, zl_aux, pos), rtol=1e-3)
    torch.testing.assert_close(DenseSupConLoss(TAU, DELTA)(zl, zl_aux, pos), code)


# ----------------------------------------------------------------------------------------------------------------------
# eq. 11
# ----------------------------------------------------------------------------------------------------------------------
def test_eq11_sum_reduction_matches_the_equation_and_the_default_is_its_mean():
    g = torch.Generator().manual_seed(4)
    y_aux = torch.randn(2, 3, 8, 8, generator=g, dtype=DT)  # auxiliary bottleneck (full-resolution input)
    y = torch.randn(2, 3, 2, 2, generator=g, dtype=DT)  # dominant bottleneck (input x 0.25)
    paper = FeatureConsistencyLoss(scale=0.25, reduction="sum")
    literal = assert_matches(lambda a, d: paper(a, d), lambda a, d: eq11(d, a, 0.25), [y_aux, y])
    # the public code's nn.L1Loss() (the default) is the same sum divided by the number of elements
    torch.testing.assert_close(FeatureConsistencyLoss(scale=0.25)(y_aux, y), literal / y.numel())


# ----------------------------------------------------------------------------------------------------------------------
# the step: supcon_form="paper", er_reduction="sum", base_temperature=None give eq. 8 with eq. 9-11
# ----------------------------------------------------------------------------------------------------------------------
def test_step_paper_options_compute_the_equations_on_the_right_branches():
    torch.manual_seed(0)
    net, batch = make_network(), make_batch(b=3)
    net.eval()  # batch norm on running statistics: one more forward gives the same outputs
    step = MACLStep(supcon_form="paper", er_reduction="sum", base_temperature=None)
    terms = step(net, batch)
    with torch.no_grad():
        out = {k: v.double() for k, v in net(*(batch[k] for k in VIEW_KEYS)).items()}
    positions = [float(p) for p in batch["position"]]
    l_g = eq9(out["z_g_dom"], out["z_g_aux"], positions, TAU, DELTA)
    l_d = eq10(out["z_l_dom"], out["z_l_aux"], lambda i: omega(i, positions, DELTA), TAU)
    l_er = eq11(out["bottleneck_dom"], out["bottleneck_aux"], 0.25)
    torch.testing.assert_close(terms["loss_g"].double(), l_g, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["loss_d"].double(), l_d, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["loss_er"].double(), l_er, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(terms["loss"].double(), l_g + 0.5 * l_d + l_er, rtol=1e-4, atol=1e-4)
    # the default step (the code's forms) is something else
    default = MACLStep()(net, batch)
    assert not torch.isclose(default["loss_g"].double(), l_g, rtol=0.05)
