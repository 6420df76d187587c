"""Exact zeros: hold, revive and snap (spread_optim.kernels.reference), initialisation, and the report.

Oracles: the closed-form lasso / group-lasso solution of an orthogonal design (soft-thresholding of X^T y / n), one
proximal-gradient (ISTA) step computed by hand, plain ``torch.optim.SGD`` for dense groups, and counts of
zeros computed by hand.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

from spread_optim import SpreadAdam, SpreadOptimizer, SpreadSGD, sparsity_report

F64 = torch.float64
KAPPA = 0.25  # L1 strength 2*kappa = 0.5
# X^T y / n for the orthogonal-design lasso: |z| > 0.5 at 0, 1, 2, 5; the closed form is zero at 3, 4, 6, 7
Z = torch.tensor([3.0, -2.0, 0.8, -0.3, 0.05, 1.5, -0.1, 0.2], dtype=F64)
ZERO_IDX = [3, 4, 6, 7]


@pytest.fixture(autouse=True)
def _one_thread():
    """The problems here are tiny: intra-op threads only add overhead (and thrash on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def soft(z: torch.Tensor, t: float) -> torch.Tensor:
    return torch.sign(z) * (z.abs() - t).clamp(min=0)


class OrthoLasso:
    """``||y - X b||^2 / (2n)`` with ``X^T X / n = I`` and ``X^T y / n = z``: the L1 solution is soft(z, 2k)."""

    def __init__(self, z: torch.Tensor, n: int = 64, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, z.numel(), dtype=F64, generator=gen))
        self.n, self.X = n, math.sqrt(n) * q
        self.set_target(z)

    def set_target(self, z: torch.Tensor) -> None:
        self.y = self.X @ z

    def loss(self, b: torch.Tensor) -> torch.Tensor:
        return ((self.y - self.X @ b) ** 2).sum() / (2 * self.n)

    def grad(self, b: torch.Tensor) -> torch.Tensor:
        return self.X.T @ (self.X @ b.detach() - self.y) / self.n


def run(opt, b, problem: OrthoLasso, steps: int, autograd: bool = False) -> None:
    for _ in range(steps):
        if autograd:
            opt.zero_grad()
            problem.loss(b).backward()
        else:
            b.grad = problem.grad(b)
        opt.step()


def start(seed: int = 1, d: int = 8) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(0.5 * torch.randn(d, dtype=F64, generator=gen))


# ---------------------------------------------------------------------------------------------------
# exact zeros appear


@pytest.mark.parametrize("momentum, lr", [(0.0, 0.1), (0.9, 0.02)])
def test_exact_zeros_appear_on_orthogonal_lasso(momentum, lr):
    problem = OrthoLasso(Z)
    b = start()
    opt = SpreadSGD([b], lr=lr, momentum=momentum, kappa=KAPPA)
    run(opt, b, problem, 600, autograd=momentum == 0)
    expected = soft(Z, 2 * KAPPA)
    assert (expected[ZERO_IDX] == 0).all()
    # the support is exact: zeros are 0.0, not tiny numbers, and so are their factors
    assert (b.detach() == 0).nonzero().flatten().tolist() == ZERO_IDX
    st = opt.state[b]
    assert (st["U"][ZERO_IDX] == 0).all() and (st["W"][ZERO_IDX] == 0).all()
    torch.testing.assert_close(b.detach(), expected, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# hold


@pytest.mark.parametrize(
    "make, buffer",
    [
        pytest.param(lambda b: SpreadSGD([b], lr=0.02, momentum=0.9, kappa=KAPPA), "momentum_buffer", id="sgd-momentum"),
        pytest.param(lambda b: SpreadAdam([b], lr=0.03, kappa=KAPPA), "exp_avg", id="adam"),
    ],
)
def test_snapped_zero_is_held_despite_base_momentum(make, buffer):
    problem = OrthoLasso(Z)
    b = start()
    opt = make(b)
    held_against_momentum = 0
    zero_since = {}
    for step in range(300):
        before = b.detach().tolist()
        base = opt.state[b].get("base", {})
        bufs = [base.get(k, {}).get(buffer) for k in ("U", "W")]
        bufs = [None if t is None else t.tolist() for t in bufs]
        g = problem.grad(b)
        b.grad = g
        opt.step()
        after, gl = b.detach().tolist(), g.tolist()
        U, W = opt.state[b]["U"].tolist(), opt.state[b]["W"].tolist()
        for j in ZERO_IDX:
            if before[j] != 0:
                if after[j] == 0:
                    zero_since.setdefault(j, step)
                continue
            assert abs(gl[j]) <= 2 * KAPPA
            # exactly zero before the step and |g| <= 2*kappa: held at exact zero, factors included
            assert after[j] == 0, f"entry {j} left zero at step {step}: {after[j]}"
            assert U[j] == 0 and W[j] == 0
            if any(t is not None and t[j] != 0 for t in bufs):
                held_against_momentum += 1
    assert sorted(zero_since) == ZERO_IDX, zero_since
    # the base really did carry momentum for held entries, so holding them was needed
    assert held_against_momentum >= 50
    torch.testing.assert_close(b.detach()[ZERO_IDX], torch.zeros(4, dtype=F64), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# revive


@pytest.mark.parametrize("make", [
    pytest.param(lambda b, lr: SpreadSGD([b], lr=lr, kappa=KAPPA), id="sgd"),
    pytest.param(lambda b, lr: SpreadSGD([b], lr=lr, momentum=0.9, nesterov=True, kappa=KAPPA), id="sgd-nesterov"),
])
def test_revival_from_zero_start_is_one_ista_step(make):
    """``init="balanced"`` on b = 0 puts every entry on the saddle; the first step is an ISTA step."""
    lr = 0.1
    problem = OrthoLasso(Z)
    b = torch.nn.Parameter(torch.zeros(8, dtype=F64))
    opt = make(b, lr)
    g = problem.grad(b)
    b.grad = g
    opt.step()
    st = opt.state[b]
    expected = -torch.sign(g) * lr * (g.abs() - 2 * KAPPA).clamp(min=0)
    torch.testing.assert_close(b.detach(), expected, rtol=1e-13, atol=0)
    # revived entries have sign -sign(g) and balanced factors; |g| <= 2*kappa entries stay exactly zero
    alive = [i for i in range(8) if i not in ZERO_IDX]
    assert torch.equal(torch.sign(b.detach()[alive]), -torch.sign(g[alive]))
    torch.testing.assert_close(st["U"][alive].abs(), st["W"][alive].abs(), rtol=1e-15, atol=0)
    assert (b.detach()[ZERO_IDX] == 0).all()
    assert (st["U"][ZERO_IDX] == 0).all() and (st["W"][ZERO_IDX] == 0).all()


def test_revival_when_data_change_makes_a_zero_needed():
    lr = 0.1
    problem = OrthoLasso(Z)
    b = start()
    opt = SpreadSGD([b], lr=lr, kappa=KAPPA)
    run(opt, b, problem, 600)
    assert (b.detach()[ZERO_IDX] == 0).all()
    z2 = Z.clone()
    z2[3] = -1.2  # now |z| > 2*kappa: the L1 solution needs entry 3
    z2[6] = 0.45  # still |z| <= 2*kappa: must stay at zero
    problem.set_target(z2)
    g = problem.grad(b)
    assert abs(float(g[3])) > 2 * KAPPA and abs(float(g[6])) <= 2 * KAPPA
    b.grad = g
    opt.step()
    expected3 = -math.copysign(lr * (abs(float(g[3])) - 2 * KAPPA), float(g[3]))
    assert b[3] != 0
    assert math.isclose(float(b.detach()[3]), expected3, rel_tol=1e-12)  # -0.07
    assert b[4] == 0 and b[6] == 0 and b[7] == 0
    run(opt, b, problem, 600)
    torch.testing.assert_close(b.detach(), soft(z2, 2 * KAPPA), rtol=0, atol=1e-10)
    assert (b.detach() == 0).nonzero().flatten().tolist() == [4, 6, 7]


def _group_masks(sparsity, shape):
    """Boolean masks of the groups, computed without the library's GroupStructure."""
    if sparsity == "row":
        masks = []
        for r in range(shape[0]):
            m = torch.zeros(shape, dtype=torch.bool)
            m[r] = True
            masks.append(m)
        return masks
    if sparsity == "column":
        masks = []
        for c in range(shape[1]):
            m = torch.zeros(shape, dtype=torch.bool)
            m[:, c] = True
            masks.append(m)
        return masks
    return [sparsity == i for i in torch.unique(sparsity).tolist()]


GROUP_SPECS = [
    pytest.param("row", id="row"),
    pytest.param("column", id="column"),
    pytest.param(torch.tensor([[0, 0, 5, 5], [0, 2, 5, 2], [9, 9, 9, 2], [9, 7, 7, 7], [2, 5, 0, 7]]), id="ids"),
]


@pytest.mark.parametrize("sparsity", GROUP_SPECS)
def test_group_revival_is_one_group_ista_step(sparsity):
    lr, shape = 0.3, (5, 4)
    masks = _group_masks(sparsity, shape)
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(shape, dtype=F64, generator=gen)
    # make some groups small enough (||g_g|| <= 2*kappa) that they must stay at zero
    for m in masks[::2]:
        target[m] *= 0.4 / target[m].norm()
    theta = torch.nn.Parameter(torch.zeros(shape, dtype=F64))
    opt = SpreadSGD([theta], lr=lr, kappa=KAPPA, sparsity=sparsity)
    g = theta.detach() - target  # loss ||theta - target||^2 / 2
    theta.grad = g
    opt.step()
    revived = 0
    for m in masks:
        gg = g[m]
        got = theta.detach()[m]
        if gg.norm() > 2 * KAPPA:
            expected = -lr * (gg.norm() - 2 * KAPPA) * gg / gg.norm()
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
            revived += 1
        else:
            assert (got == 0).all()
            assert (opt.state[theta]["W"][m] == 0).all()
    assert 0 < revived < len(masks)
    u = opt.state[theta]["u"]
    assert (u == 0).sum() == len(masks) - revived  # groups left at zero keep u = 0 as well


# ---------------------------------------------------------------------------------------------------
# snap


def _decay_run(threshold: float, steps: int):
    theta = torch.nn.Parameter(torch.tensor([1e-2, -2e-2, 5e-3, -7e-3], dtype=F64))
    opt = SpreadSGD([theta], lr=0.1, kappa=KAPPA, zero_threshold=threshold)
    path = []
    for _ in range(steps):
        theta.grad = theta.detach().clone()  # loss ||theta||^2 / 2: |g| << 2*kappa, theta decays to 0
        opt.step()
        path.append(theta.detach().clone())
    return torch.stack(path)


def test_snap_respects_zero_threshold():
    sign0 = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64)
    free = _decay_run(0.0, 150)
    # zero_threshold=0: tiny but never exactly zero, never changed sign
    assert (free != 0).all()
    assert (torch.sign(free) == sign0).all()
    assert (free[-1].abs() < 1e-5).all()
    assert (free[1:].abs() < free[:-1].abs()).all()  # decaying monotonically
    thr = 1e-4
    snapped = _decay_run(thr, 150)
    assert (snapped[-1] == 0).all()
    for i in range(4):
        first_below = int((free[:, i].abs() <= thr).nonzero()[0])
        # identical until the step where |theta| first falls under the threshold, exact zero from then on
        assert torch.equal(snapped[:first_below, i], free[:first_below, i])
        assert (snapped[first_below:, i] == 0).all()


def test_growing_after_revival_is_not_snapped_below_threshold():
    lr, thr = 0.05, 1e-6
    theta = torch.nn.Parameter(torch.zeros(1, dtype=F64))
    z = torch.tensor([2 * KAPPA + 1e-5], dtype=F64)  # the L1 solution is theta = 1e-5
    opt = SpreadSGD([theta], lr=lr, kappa=KAPPA, zero_threshold=thr)
    values = []
    for _ in range(30):
        theta.grad = theta.detach() - z
        opt.step()
        values.append(float(theta.detach()))
    assert math.isclose(values[0], lr * 1e-5, rel_tol=1e-6)  # the revival: 5e-7, under the threshold
    assert all(v > 0 for v in values), values
    assert all(b > a for a, b in zip(values, values[1:])), values  # growing every step, never snapped
    assert values[-1] <= thr


def test_growing_below_threshold_is_not_snapped_unbalanced():
    theta = torch.nn.Parameter(torch.tensor([1e-8], dtype=F64))
    opt = SpreadSGD([theta], lr=1e-7, kappa=KAPPA, init="unbalanced", zero_threshold=1e-6)
    values = []
    for _ in range(5):
        theta.grad = theta.detach() - 1.0  # target 1: theta grows by ~1e-7 per step
        opt.step()
        values.append(float(theta.detach()))
    assert all(0 < v < 1e-6 for v in values), values
    assert all(b > a for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("threshold", [0.0, 1e-6])
def test_sign_flip_snaps_then_revives(threshold):
    """Current contract (reference docstring): a theta that changes sign in a step is snapped to exact
    zero, whatever the threshold, and revived on the other side at the next step if KKT asks for it."""
    lr = 0.01
    theta = torch.nn.Parameter(torch.tensor([1e-3], dtype=F64))
    opt = SpreadSGD([theta], lr=lr, kappa=KAPPA, init="unbalanced", zero_threshold=threshold)
    theta.grad = theta.detach() + 1.0  # target -1: W = 1e-3 - lr*(g + 2k W) < 0, |theta| grows past 1e-3
    opt.step()
    U, W = opt.state[theta]["U"], opt.state[theta]["W"]
    assert float(theta.detach()) == 0.0 and float(U) == 0.0 and float(W) == 0.0
    g = theta.detach() + 1.0
    theta.grad = g
    opt.step()
    assert math.isclose(float(theta.detach()), -lr * (float(g) - 2 * KAPPA), rel_tol=1e-12)


@pytest.mark.parametrize("sparsity", ["element", "row"])
@pytest.mark.parametrize("make", [lambda ps: SpreadSGD(ps, lr=0.01, kappa=KAPPA, init="unbalanced"),
                                  lambda ps: SpreadAdam(ps, lr=0.01, kappa=KAPPA, init="unbalanced")])
def test_gradless_parameter_does_not_change_another_step(make, sparsity):
    """A parameter of the optimizer whose grad is None must not change the others' step: the sign-flip
    snap compares theta with its value at the step's start, which p still holds then (a stale rewrite of
    every theta before the zero pass lost it). Oracle: the same run without the gradless parameter."""
    def run(with_idle):
        theta = torch.nn.Parameter(torch.tensor([[1e-3, -2e-3], [5e-4, 1.0]], dtype=F64))
        idle = torch.nn.Parameter(torch.ones(3, 2, dtype=F64))
        opt = make([{"params": [theta, idle] if with_idle else [theta], "sparsity": sparsity}])
        values = []
        for _ in range(3):
            theta.grad = theta.detach() - torch.tensor([[-1.0, 1.0], [-1.0, 1.0]], dtype=F64)  # targets across zero
            opt.step()
            values.append(theta.detach().clone())
        return values, idle.detach()
    want, _ = run(False)
    got, idle = run(True)
    assert any(bool((v == 0).any()) for v in want)  # the runs snap a sign flip to exact zero
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(idle, torch.ones(3, 2, dtype=F64))


# ---------------------------------------------------------------------------------------------------
# factors starting at zero


def test_unbalanced_zero_entries_are_not_stuck():
    lr = 0.1
    problem = OrthoLasso(Z)
    b = torch.nn.Parameter(torch.zeros(8, dtype=F64))
    opt = SpreadSGD([b], lr=lr, kappa=KAPPA, init="unbalanced")
    g = problem.grad(b)
    b.grad = g
    opt.step()
    assert (opt.state[b]["W"] != 0).all()
    # U = 1, W = 0: dU = 2k, dW = g, so theta = (1 - 2k lr) * (-lr g) for every entry
    torch.testing.assert_close(b.detach(), -(1 - 2 * KAPPA * lr) * lr * g, rtol=1e-14, atol=0)
    run(opt, b, problem, 600)
    torch.testing.assert_close(b.detach(), soft(Z, 2 * KAPPA), rtol=0, atol=1e-10)
    assert (b.detach() == 0).nonzero().flatten().tolist() == ZERO_IDX


# ---------------------------------------------------------------------------------------------------
# initialisation reproduces theta exactly


def _random_theta(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, dtype=F64, generator=gen) * 10.0 ** torch.empty(shape, dtype=F64).uniform_(-3, 3, generator=gen)
    t[torch.rand(shape, generator=gen) < 0.25] = 0.0
    t[0] = 0.0  # a zero row
    t[:, 1] = 0.0  # a zero column
    return t.to(dtype)


INIT_SPECS = ["element", "row", "column", "ids", "shared-column"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["balanced", "unbalanced"])
@pytest.mark.parametrize("spec", INIT_SPECS)
def test_init_reproduces_theta_bit_for_bit(spec, scheme, dtype):
    thetas = [_random_theta((6, 5), dtype, 0)] + ([_random_theta((4, 5), dtype, 1)] if spec == "shared-column" else [])
    params = [torch.nn.Parameter(t.clone()) for t in thetas]
    ids = torch.tensor([0, 3, 3, 1, 1] * 6).reshape(6, 5)
    ids[0] = 2  # the zero row is one group of its own
    sparsity = {"shared-column": "column", "ids": ids}.get(spec, spec)
    opt = SpreadSGD(params, lr=0.1, kappa=0.1, sparsity=sparsity, init=scheme, share_groups=spec == "shared-column")
    opt.step()  # no gradients: factors are created, nothing moves
    fdtype = torch.float32 if dtype == torch.bfloat16 else dtype
    for p, t in zip(params, thetas):
        assert torch.equal(p.detach(), t)
    st = [opt.state[p] for p in params]
    if spec == "element":
        U, W = st[0]["U"], st[0]["W"]
        assert U.dtype == W.dtype == fdtype
        t = thetas[0].to(fdtype)
        assert torch.equal(U * W, t)
        nz = t != 0
        if scheme == "balanced":
            ratio = U[nz].abs() / W[nz].abs()
            assert ((ratio >= 0.5) & (ratio <= 2.0)).all()
            assert (U[~nz] == 0).all() and (W[~nz] == 0).all()
        else:
            assert (U == 1).all() and torch.equal(W, t)
        return
    u = st[0]["u"]
    assert u.dtype == fdtype
    Ws = [s["W"] for s in st]
    if spec == "row":
        expand = [u[:, None]]
    elif spec in ("column", "shared-column"):
        expand = [u[None, :]] * len(params)
    else:
        expand = [u[ids]]  # ids 0..3 all occur: no compaction needed
    for e, W, t in zip(expand, Ws, thetas):
        assert W.dtype == fdtype
        assert torch.equal(e * W, t.to(fdtype))
        if scheme == "unbalanced":
            assert torch.equal(W, t.to(fdtype))
    if scheme == "unbalanced":
        assert (u == 1).all()
        return
    # balanced: |u_g| / ||W_g|| in [1/2, 2] on nonzero groups, zero groups on the saddle
    if spec == "row":
        wnorm, tnorm = Ws[0].norm(dim=1), thetas[0].to(fdtype).norm(dim=1)
    elif spec == "ids":
        wnorm = torch.stack([Ws[0][ids == i].norm() for i in range(4)])
        tnorm = torch.stack([thetas[0].to(fdtype)[ids == i].norm() for i in range(4)])
    else:
        wnorm = torch.stack([W.pow(2).sum(0) for W in Ws]).sum(0).sqrt()
        tnorm = torch.stack([t.to(fdtype).pow(2).sum(0) for t in thetas]).sum(0).sqrt()
    nz = tnorm != 0
    assert (~nz).any() and nz.any()
    ratio = u[nz].abs() / wnorm[nz]
    assert ((ratio >= 0.5 * (1 - 1e-6)) & (ratio <= 2.0 * (1 + 1e-6))).all(), ratio
    assert (u[~nz] == 0).all() and (wnorm[~nz] == 0).all()


@pytest.mark.parametrize("row", [[1e20, -3e19, 2e19], [1e10, 1.2345e-35, -3e-36]], ids=["overflow", "underflow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_balanced_group_init_extreme_magnitudes(row, dtype):
    theta = torch.tensor([row, [1.0, 2.0, 3.0]], dtype=dtype)
    p = torch.nn.Parameter(theta.clone())
    opt = SpreadSGD([p], lr=0.1, kappa=0.1, sparsity="row")
    opt.step()
    u, W = opt.state[p]["u"], opt.state[p]["W"]
    # "Both reproduce theta bit for bit": no overflow of the squared norm, no W pushed into subnormals
    assert torch.isfinite(u).all() and torch.isfinite(W).all()
    assert torch.equal(u[:, None] * W, theta.float())


# ---------------------------------------------------------------------------------------------------
# maximize and weight decay


@pytest.mark.parametrize("make", [
    pytest.param(lambda groups, maximize: SpreadSGD(groups, lr=0.02, momentum=0.9, maximize=maximize), id="sgd"),
    pytest.param(lambda groups, maximize: SpreadAdam(groups, lr=0.03, maximize=maximize), id="adam"),
])
def test_maximize_negated_loss_gives_same_trajectory(make):
    problem = OrthoLasso(Z)
    target = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    runs = []
    for maximize in (False, True):
        b = start()
        c = torch.nn.Parameter(torch.zeros(3, dtype=F64))  # a dense group alongside
        opt = make([{"params": [b], "kappa": KAPPA}, {"params": [c]}], maximize)
        sign = -1.0 if maximize else 1.0
        path = []
        for _ in range(300):
            opt.zero_grad()
            (sign * (problem.loss(b) + 0.5 * ((c - target) ** 2).sum())).backward()
            opt.step()
            path.append(torch.cat([b.detach(), c.detach()]))
        runs.append(torch.stack(path))
    assert torch.equal(runs[0], runs[1])
    # and the common trajectory minimises loss + 2k|b|_1 (not maximises it)
    final = runs[1][-1]
    torch.testing.assert_close(final[:8], soft(Z, 2 * KAPPA), rtol=0, atol=1e-2)
    torch.testing.assert_close(final[8:], target, rtol=0, atol=1e-2)


def test_base_weight_decay_applies_to_dense_groups_only():
    wd, lr = 5.0, 0.1
    problem = OrthoLasso(Z)
    target = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    results = []
    for decay in (0.0, wd):
        b = start()
        c = torch.nn.Parameter(torch.ones(3, dtype=F64))
        c_ref = torch.nn.Parameter(torch.ones(3, dtype=F64))
        opt = SpreadSGD([{"params": [b], "kappa": KAPPA}, {"params": [c]}], lr=lr, weight_decay=decay)
        ref = torch.optim.SGD([c_ref], lr=lr, weight_decay=decay)
        for _ in range(600):
            b.grad = problem.grad(b)
            c.grad = c.detach() - target
            c_ref.grad = c_ref.detach() - target
            opt.step()
            ref.step()
        assert torch.equal(c, c_ref)  # the dense group gets the base's weight decay exactly
        assert opt.param_groups[1]["weight_decay"] == decay
        results.append((b.detach().clone(), c.detach().clone()))
    for b, _ in results:
        torch.testing.assert_close(b, soft(Z, 2 * KAPPA), rtol=0, atol=1e-10)
        assert (b[ZERO_IDX] == 0).all()
    assert torch.equal(results[0][0], results[1][0])  # the sparse group never saw the decay
    torch.testing.assert_close(results[1][1], target / (1 + wd))  # ... but the dense group did
    torch.testing.assert_close(results[0][1], target)


# ---------------------------------------------------------------------------------------------------
# sparsity_report


def test_sparsity_report_counts_match_hand_counts():
    torch.manual_seed(0)
    n, d_in, d_out = 128, 8, 6
    q, _ = torch.linalg.qr(torch.randn(n, d_in))
    X = math.sqrt(n) * q
    B = torch.zeros(d_out, d_in)
    B[:3] = torch.randn(3, d_in)  # outputs 3..5 are noise: their weight rows should die
    Y = X @ B.T + 0.05 * torch.randn(n, d_out)
    model = torch.nn.Sequential(OrderedDict(enc=torch.nn.Linear(d_in, d_out), head=torch.nn.Linear(d_out, 1)))
    enc = model.enc
    opt = SpreadSGD(
        [
            {"params": [("enc.weight", enc.weight)], "kappa": 0.2, "sparsity": "row"},
            {"params": [("enc.bias", enc.bias)]},
        ],
        lr=0.2,
    )
    for _ in range(200):
        opt.zero_grad()
        (((enc(X) - Y) ** 2).sum() / (2 * n)).backward()
        opt.step()
    w = enc.weight.detach()
    zero_rows = int((w == 0).all(dim=1).sum())
    assert 1 <= zero_rows < d_out, w  # the setting produced some, not all, dead rows
    assert zero_rows == 3
    with torch.no_grad():
        enc.bias[0] = 0.0  # one exact zero in the dense parameter as well

    combined = sparsity_report(model, opt)
    rows = {r.name: r for r in combined}
    assert list(rows) == ["enc.weight", "enc.bias", "head.weight", "head.bias"]
    rw = rows["enc.weight"]
    assert rw.kappa == 0.2 and rw.sparsity == "row" and rw.shape == (d_out, d_in)
    assert rw.zeros == int((w == 0).sum()) and rw.numel == w.numel()
    assert rw.zero_groups == zero_rows and rw.num_groups == d_out
    assert rw.zero_fraction == int((w == 0).sum()) / w.numel()
    rb = rows["enc.bias"]
    assert rb.kappa == 0.0 and rb.zeros == int((enc.bias == 0).sum()) >= 1
    assert rb.zero_groups == rb.zeros and rb.num_groups == d_out  # element: entries are the groups
    assert rows["head.weight"].kappa is None  # not in the optimizer
    n_all = sum(p.numel() for p in model.parameters())
    n_zero = sum(int((p == 0).sum()) for p in model.parameters())
    assert combined.total_zero_fraction == n_zero / n_all

    alone = sparsity_report(model)
    assert [r.name for r in alone] == [name for name, _ in model.named_parameters()]
    assert all(r.kappa is None for r in alone)
    assert {r.name: r.zero_groups for r in alone}["enc.weight"] == int((w == 0).sum())  # entries counted

    by_opt = sparsity_report(opt)
    assert [r.name for r in by_opt] == ["enc.weight", "enc.bias"]
    assert by_opt[0].zero_groups == zero_rows and by_opt[0].kappa == 0.2

    unnamed = SpreadSGD([{"params": [enc.weight], "kappa": 0.05, "sparsity": "row"}, {"params": [enc.bias]}], lr=0.1)
    assert [r.name for r in sparsity_report(unnamed)] == ["group0.0", "group1.0"]
    assert sparsity_report(unnamed)[0].zero_groups == zero_rows

    text = str(combined)
    for name in rows:
        assert name in text
    assert f"{zero_rows}/{d_out}" in text
    assert f"{100 * rw.zero_fraction:.1f}%" in text
    assert "total" in text

    for bad in ("model", None, 3, [enc.weight]):
        with pytest.raises(TypeError):
            sparsity_report(bad)
    with pytest.raises(TypeError):
        sparsity_report(opt, opt)
