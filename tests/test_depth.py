"""Depth-k factors: the non-convex penalties L_{2/k} (``depth`` key, ``spread_optim/deep.py``, the last section of
``kernels/reference.py``).

* the math: the balanced minimum of ``kappa*sum_j u_j^2`` subject to ``prod_j u_j = theta`` is
  ``k*kappa*|theta|^(2/k)`` (AM-GM, checked against scipy's minimiser); the exact power-of-two split; the L_q
  thresholding rule (threshold and prox) against the published closed forms (Xu et al. 2012 for L_{1/2}, Cao et al.
  2013 for L_{2/3}) and a dense 1-D search;
* the optimizer on orthogonal designs, where the L_{1/2} / L_{2/3} problems are separable and their global minima are
  the thresholding operators applied to ``z = X^T y / n``: spread reaches them with the exact support from zero (the
  revival is the global thresholding step there) and from random starts inside the global minimum's basin; the
  group version on rows;
* exact zeros: revival exactly at the threshold, snap, hold; the KKT residual; the ``depth`` key's checks, the
  dispatch's fallback, checkpoints, the report. Depth 2 is today's code, untouched (the rest of the suite).
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spread_optim import SpreadAdam, SpreadOptimizer, SpreadSGD, sparsity_report
from spread_optim import deep
from spread_optim.kernels import dispatch
from spread_optim.kernels import reference as ref
from spread_optim.sparsity import Element, Grouped, make_kind

scipy_optimize = pytest.importorskip("scipy.optimize")


@pytest.fixture(autouse=True)
def _quiet_fallback(monkeypatch):
    # the dispatch's one-time note (depth > 2 runs the PyTorch path) is tested on its own below
    monkeypatch.setattr(dispatch, "_warned_depth", True)


# ----------------------------------------------------------------------------------------------------
# closed forms of the thresholding operators (the published ones, written out here as the oracle)


def half_threshold(z: float, lam: float) -> float:
    """Xu, Chang, Xu & Zhang (2012): the global minimiser of ``(x - z)^2 + lam*|x|^(1/2)``."""
    if abs(z) <= 54 ** (1 / 3) / 4 * lam ** (2 / 3):
        return 0.0
    phi = math.acos(lam / 8 * (abs(z) / 3) ** -1.5)
    return 2 / 3 * z * (1 + math.cos(2 * math.pi / 3 - 2 * phi / 3))


def two_thirds_threshold(z: float, lam: float) -> float:
    """Cao, Sun & Xu (2013): the global minimiser of ``(x - z)^2 + lam*|x|^(2/3)``."""
    if abs(z) <= 2 / 3 * (3 * lam**3) ** 0.25:
        return 0.0
    phi = math.acosh(27 * z**2 / 16 * lam**-1.5)
    A = 2 / math.sqrt(3) * lam**0.25 * math.sqrt(math.cosh(phi / 3))
    return math.copysign(((A + math.sqrt(2 * abs(z) / A - A * A)) / 2) ** 3, z)


def oracle_prox(z: float, mu: float, q: float) -> float:
    """The global minimiser of ``(x - z)^2 / 2 + mu*|x|^q`` (= ``(x - z)^2 + 2*mu*|x|^q``, halved)."""
    if q == 1:
        return math.copysign(max(abs(z) - mu, 0.0), z)
    return {0.5: half_threshold, 2 / 3: two_thirds_threshold}[q](z, 2 * mu)


def grid_prox(z: float, mu: float, q: float) -> float:
    """The same by dense search in float64 (grid, then golden-section refinement near the best point)."""
    xs = np.linspace(-abs(z) - 1, abs(z) + 1, 400_001)
    h = lambda x: 0.5 * (x - z) ** 2 + mu * np.abs(x) ** q  # noqa: E731
    best = xs[np.argmin(h(xs))]
    if best == 0.0 or abs(best) < 1e-12:
        return 0.0
    step = xs[1] - xs[0]
    res = scipy_optimize.minimize_scalar(h, bounds=(best - 2 * step, best + 2 * step), method="bounded",
                                         options={"xatol": 1e-13})
    return float(res.x) if h(res.x) < h(0.0) else 0.0


def local_max(a: float, mu: float, q: float) -> float:
    """The smaller root of ``x + mu*q*x^(q-1) = a`` (the hump between zero and the nonzero local minimum), or
    ``inf`` when there is no nonzero stationary point (then every start on that side descends to zero)."""
    x_min = (mu * q * (1 - q)) ** (1 / (2 - q))
    phi = lambda x: x + mu * q * x ** (q - 1) - a  # noqa: E731
    if phi(x_min) >= 0:
        return math.inf
    return scipy_optimize.brentq(phi, 1e-300, x_min, xtol=1e-15)


# ----------------------------------------------------------------------------------------------------
# the math


@settings(max_examples=60, deadline=None)
@given(theta=st.floats(1e-6, 1e6), depth=st.integers(2, 6), kappa=st.floats(1e-3, 10.0))
def test_balanced_minimum_is_k_kappa_theta_to_2_over_k(theta, depth, kappa):
    """min kappa*sum_j u_j^2 s.t. prod_j |u_j| = theta, by scipy over log|u_1..u_{k-1}|, is k*kappa*theta^(2/k)."""
    s = math.log(theta)

    def smooth(x):  # the last factor takes what the others leave: u_k = theta / prod_j u_j
        return kappa * (np.exp(2 * x).sum() + math.exp(2 * (s - x.sum())))

    x0 = np.full(depth - 1, s / depth) + np.linspace(-1, 1, depth - 1)
    found = scipy_optimize.minimize(smooth, x0, method="BFGS", options={"gtol": 1e-12}).fun
    closed = depth * kappa * theta ** (2 / depth)
    assert found == pytest.approx(closed, rel=1e-7)
    # the balanced split starts within a factor 2^(2(k-1)/k) < 4 of it, never below it
    U, W = ref.deep_split(torch.tensor([theta], dtype=torch.float64), depth)
    start = float(ref.penalty([U, W], kappa))
    assert closed * (1 - 1e-12) <= start <= 4 * closed


finite = dict(allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(**finite), min_size=1, max_size=20), depth=st.integers(2, 7),
       double=st.booleans())
def test_split_is_exact_and_balanced(values, depth, double):
    dtype = torch.float64 if double else torch.float32
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    t = t[torch.isfinite(t)]
    U, W = ref.deep_split(t, depth)
    assert U.shape == (depth - 1, *t.shape)
    product = ref.element_product(U, W)
    assert torch.equal(product.view(torch.int64 if double else torch.int32), (t + 0.0).view(torch.int64 if double else torch.int32))
    nz = t != 0
    assert bool(ref.deep_element_dead(U, W)[~nz].all())
    if nz.any():
        root = t[nz].double().abs() ** (1 / depth)
        factors = torch.cat([U[:, nz], W[nz][None]]).double().abs() / root
        assert bool((factors < 2).all()) and bool((factors > 0.5).all())
    if depth == 2:  # balanced_split with the roles swapped: U carries the power of two
        a, b = ref.balanced_split(t)
        assert torch.equal(U[0], b) and torch.equal(W, a)


def test_split_extremes():
    for dtype in (torch.float32, torch.float64):
        info = torch.finfo(dtype)
        smallest = info.tiny * info.eps  # the smallest subnormal: at depth 7 in float32 the k-1 powers of two
        # multiply to 2**-127, below the normal range (a found case: built from its bits, that product was 0)
        t = torch.tensor([info.max, -info.max, info.tiny, info.tiny * 2.0**-20, -info.tiny / 3, smallest, -smallest,
                          1.0, -3.0, 0.0], dtype=dtype)
        for depth in (3, 4, 5, 6, 7, 8):
            assert torch.equal(ref.element_product(*ref.deep_split(t, depth)), t + 0.0)


@pytest.mark.parametrize("q", [0.5, 2 / 3])
def test_threshold_matches_published_forms_and_dense_search(q):
    for mu in (1e-3, 0.1, 0.7, 3.0):
        tau = ref.lq_threshold(mu, q)
        lam = 2 * mu  # the papers' (x - z)^2 + lam*|x|^q
        published = 54 ** (1 / 3) / 4 * lam ** (2 / 3) if q == 0.5 else 2 / 3 * (3 * lam**3) ** 0.25
        assert tau == pytest.approx(published, rel=1e-13)
        # just above the threshold the global minimiser jumps to x_bar = (2 mu (1-q))^(1/(2-q)); just below it is 0
        x_bar = (2 * mu * (1 - q)) ** (1 / (2 - q))
        assert grid_prox(tau * (1 + 1e-3), mu, q) == pytest.approx(x_bar, rel=0.05)
        assert grid_prox(tau * (1 - 1e-3), mu, q) == 0.0
    assert ref.lq_threshold(0.3, 1.0) == 0.3  # soft thresholding's


@pytest.mark.parametrize("q", [0.5, 2 / 3, 1.0])
def test_prox_matches_closed_forms(q):
    zs = np.concatenate([np.linspace(-6, 6, 2001), [1e-9, -1e-9, 50.0, -1e3]])
    for mu in (0.05, 0.5, 2.0):
        mine = ref.lq_prox(torch.from_numpy(zs), mu, q).numpy()
        closed = np.array([oracle_prox(z, mu, q) for z in zs])
        tau = ref.lq_threshold(mu, q)
        away = np.abs(np.abs(zs) - tau) > 1e-9 * tau  # (at the threshold itself 0 and x_bar tie)
        np.testing.assert_allclose(mine[away], closed[away], rtol=1e-11, atol=1e-12)
    for z in (-2.3, 0.4, 1.7, 3.3):  # and the closed forms against a dense search
        assert oracle_prox(z, 0.5, q) == pytest.approx(grid_prox(z, 0.5, q), abs=1e-6)


def test_revival_threshold():
    assert ref.revival_threshold(0.05, 2, 0.3) == 0.1  # depth 2: |g| > 2*kappa whatever the step
    for depth in (3, 4, 6):
        q, kappa, step = 2 / depth, 0.02, 0.1
        assert ref.revival_threshold(kappa, depth, step) == pytest.approx(ref.lq_threshold(step * depth * kappa, q) / step)
        # a larger step sees further past the penalty's hump: the threshold falls as step^((q-1)/(2-q))
        assert ref.revival_threshold(kappa, depth, 4 * step) == pytest.approx(ref.revival_threshold(kappa, depth, step) * 4 ** ((q - 1) / (2 - q)))
    assert ref.revival_threshold(0.1, 3, 0.0) == math.inf
    assert [ref.penalty_name(k) for k in (2, 3, 4, 5, 6)] == ["L1", "L2/3", "L1/2", "L2/5", "L1/3"]
    assert ref.penalty_name(3, grouped=True) == "group L2/3"


def test_depth_2_forms_are_the_lasso_ones():
    """At k = 2 the depth-k spec functions reduce to the lasso's (a check of the general formulas; the optimizer
    never runs them at depth 2)."""
    torch.manual_seed(0)
    g, U, W = torch.randn(3, 50, dtype=torch.float64)
    dU, dW = ref.deep_element_factor_grads(g, U[None], W, 0.3)
    eU, eW = ref.element_factor_grads(g, U, W, 0.3)
    assert torch.allclose(dU[0], eU) and torch.allclose(dW, eW)
    theta = U * W
    assert float(ref.deep_element_kkt(theta, g, 0.3, 2, 0.1)) == pytest.approx(float(ref.element_kkt(theta, g, 0.3)))
    z = torch.linspace(-2, 2, 101, dtype=torch.float64)
    assert torch.allclose(ref.lq_prox(z, 0.4, 1.0), torch.sign(z) * (z.abs() - 0.4).clamp(min=0))


# ----------------------------------------------------------------------------------------------------
# orthogonal designs: the global minimum in closed form


def orthogonal_problem(z: np.ndarray, n: int = 64, seed: int = 0, outputs: int | None = None):
    """``X`` (n, d) with ``X^T X / n = I`` and ``Y`` with ``X^T Y / n = z`` exactly-ish (Y = X z + R, R orthogonal to
    the columns of X): then ``||Y - X theta||^2/(2n) = ||theta - z||^2 / 2 + const``, separable."""
    d = z.shape[0]
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, d + 1)))
    X = math.sqrt(n) * Q[:, :d]
    R = Q[:, d:] * 0.3 * math.sqrt(n)
    Y = X @ z + (R if z.ndim == 2 else R[:, 0])
    return torch.from_numpy(X), torch.from_numpy(Y)


def zs_for(mu: float, q: float, seed: int = 1, d: int = 24) -> np.ndarray:
    """Values of z on every side of the thresholds: clearly above (global minimum nonzero), between the existence
    of a nonzero local minimum and the threshold (zero is the global minimum, a nonzero local one exists), and
    below (zero the only minimum); none within 3% of the threshold."""
    tau = ref.lq_threshold(mu, q)
    x_min = (mu * q * (1 - q)) ** (1 / (2 - q))
    z_local = x_min + mu * q * x_min ** (q - 1)  # smallest |z| with a nonzero stationary point
    rng = np.random.default_rng(seed)
    mags = np.concatenate([rng.uniform(1.1 * tau, 4 * tau, d // 2), rng.uniform(z_local * 1.02, tau * 0.97, d // 4),
                           rng.uniform(0, 0.9 * z_local, d - d // 2 - d // 4)])
    return mags * rng.choice([-1.0, 1.0], d)


def lbfgs(params, kappa, depth, sparsity="element", history=20):
    return SpreadOptimizer(params, torch.optim.LBFGS, kappa=kappa, depth=depth, sparsity=sparsity, lr=1.0, max_iter=20,
                           history_size=history, line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)


def run(opt, closure, steps):
    for _ in range(steps):
        opt.step(closure)
    closure()


def basin_start(z: np.ndarray, oracle: np.ndarray, mu: float, q: float, rng) -> np.ndarray:
    """A random start inside the basin of the global minimum, coordinate by coordinate: for a nonzero minimum
    ``x*``, between the hump ``x_lm`` and ``2*x*`` (halfway to the hump at the lowest); for a zero minimum, inside
    ``(-x_lm/2, x_lm/2)`` (anywhere up to ``|z|`` when there is no hump)."""
    out = np.empty_like(z)
    for j, (zj, xj) in enumerate(zip(z, oracle)):
        hump = local_max(abs(zj), mu, q)
        if xj != 0:
            out[j] = math.copysign(rng.uniform(abs(xj) - 0.5 * (abs(xj) - hump), 2 * abs(xj)), zj)
        else:
            out[j] = rng.uniform(-0.5, 0.5) * min(hump, abs(zj) + 1.0)
    return out


@pytest.mark.parametrize("depth", [3, 4])
def test_orthogonal_design_reaches_the_global_minimum(depth):
    q, lam = 2 / depth, 0.3  # min ||y - X theta||^2/(2n) + lam*sum|theta|^q, kappa = lam/k
    z = zs_for(lam, q)
    X, y = orthogonal_problem(z)
    n = X.shape[0]
    oracle = np.array([oracle_prox(zj, lam, q) for zj in z])
    assert (oracle != 0).sum() == len(z) // 2  # the "between" coordinates are zero at the global minimum
    rng = np.random.default_rng(depth)
    starts = {"zero": np.zeros_like(z)} | {f"basin {i}": basin_start(z, oracle, lam, q, rng) for i in range(3)}
    for name, start in starts.items():
        theta = torch.tensor(start, requires_grad=True)
        opt = lbfgs([theta], lam / depth, depth)

        def closure():
            opt.zero_grad()
            loss = (y - X @ theta).pow(2).sum() / (2 * n)
            loss.backward()
            return loss

        run(opt, closure, 15)
        got = theta.detach().numpy()
        assert np.array_equal(got != 0, oracle != 0), (name, got, oracle)
        np.testing.assert_allclose(got, oracle, atol=1e-7, err_msg=name)  # (LBFGS stalls near 3e-8 in float64)
        assert opt.kkt_residual() < 1e-6, name


@pytest.mark.parametrize("depth", [3, 4])
def test_orthogonal_rows_group_version(depth):
    """Rows of ``W`` (d, m) as groups: ``||Y - XW||^2/(2n) + lam*sum_j ||W_j||^q`` separates by rows; each row's
    minimum is ``Z_j/||Z_j|| * prox(||Z_j||)``."""
    q, lam, m = 2 / depth, 0.4, 3
    norms = np.abs(zs_for(lam, q, seed=2, d=16))
    rng = np.random.default_rng(5)
    directions = rng.standard_normal((16, m))
    Z = directions / np.linalg.norm(directions, axis=1, keepdims=True) * norms[:, None]
    X, Y = orthogonal_problem(Z)
    n = X.shape[0]
    oracle = Z / norms[:, None] * np.array([oracle_prox(a, lam, q) for a in norms])[:, None]
    for name, start in {"zero": np.zeros_like(Z), "basin": Z * (np.abs(oracle).sum(1, keepdims=True) > 0) * 1.3}.items():
        W = torch.tensor(start, requires_grad=True)
        opt = lbfgs([W], lam / depth, depth, sparsity="row")

        def closure():
            opt.zero_grad()
            loss = (Y - X @ W).pow(2).sum() / (2 * n)
            loss.backward()
            return loss

        run(opt, closure, 15)
        got = W.detach().numpy()
        assert np.array_equal((got != 0).any(1), (oracle != 0).any(1)), name
        assert ((got == 0).all(1) | (got != 0).all(1)).all()  # whole rows are zero or not
        np.testing.assert_allclose(got, oracle, atol=1e-7, err_msg=name)
        assert opt.kkt_residual() < 1e-6
        assert sparsity_report(opt)[0].penalty == f"group {ref.penalty_name(depth)}"


@pytest.mark.parametrize("depth", [3, 4])
def test_adam_from_the_basin(depth):
    """Adam (a decaying lr) on the same problem from a basin start: the exact support, the minimum to 1e-4."""
    q, lam = 2 / depth, 0.3
    z = zs_for(lam, q, seed=3, d=12)
    X, y = orthogonal_problem(z)
    n = X.shape[0]
    oracle = np.array([oracle_prox(zj, lam, q) for zj in z])
    theta = torch.tensor(basin_start(z, oracle, lam, q, np.random.default_rng(0)), requires_grad=True)
    opt = SpreadOptimizer([theta], "adam", kappa=lam / depth, depth=depth, lr=0.02)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.996)
    for _ in range(1500):
        opt.zero_grad()
        ((y - X @ theta).pow(2).sum() / (2 * n)).backward()
        opt.step()
        sched.step()
    got = theta.detach().numpy()
    assert np.array_equal(got != 0, oracle != 0)
    np.testing.assert_allclose(got, oracle, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# exact zeros: revival at the threshold, snap, hold


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_revival_at_the_threshold_through_the_optimizer(depth):
    """A linear loss ``<c, theta>`` from theta = 0 with SGD: one step revives exactly the entries with
    ``|c| > revival_threshold`` (to the proximal-gradient step's value), the others are held at 0."""
    kappa, lr = 0.05, 0.2
    thr = ref.revival_threshold(kappa, depth, lr)
    factors = torch.tensor([1 + 1e-9, 1 - 1e-9, 1.5, 0.5, 3.0, 1.0], dtype=torch.float64)
    c = torch.cat([factors, -factors]) * thr
    theta = torch.zeros_like(c, requires_grad=True)
    opt = SpreadSGD([theta], lr=lr, kappa=kappa, depth=depth)
    (c * theta).sum().backward()
    opt.step()
    expected = ref.lq_prox(-lr * c, lr * depth * kappa, 2 / depth)
    revived = c.abs() > thr
    assert torch.equal(theta.detach() != 0, revived)
    assert revived.tolist() == [True, False, True, False, True, False] * 2
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-14, atol=0)
    if depth > 2:  # the jump: the smallest revived value is x_bar, not 0+
        x_bar = (2 * lr * depth * kappa * (1 - 2 / depth)) ** (1 / (2 - 2 / depth))
        assert float(theta.detach()[0].abs()) == pytest.approx(x_bar, rel=1e-4)


@pytest.mark.parametrize("depth", [3, 4])
def test_group_revival_at_the_threshold(depth):
    kappa, lr = 0.05, 0.2
    thr = ref.revival_threshold(kappa, depth, lr)
    directions = torch.nn.functional.normalize(torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=1)
    c = directions * torch.tensor([1 + 1e-9, 1 - 1e-9, 2.0, 0.5], dtype=torch.float64)[:, None] * thr
    W = torch.zeros_like(c, requires_grad=True)
    opt = SpreadSGD([W], lr=lr, kappa=kappa, depth=depth, sparsity="row")
    (c * W).sum().backward()
    opt.step()
    assert (W.detach() != 0).all(1).tolist() == [True, False, True, False]
    assert (W.detach() == 0).all(1).tolist() == [False, True, False, True]
    norms = c.norm(dim=1)
    expected = -directions * ref.lq_prox(lr * norms, lr * depth * kappa, 2 / depth)[:, None]
    torch.testing.assert_close(W.detach(), expected, rtol=1e-12, atol=1e-15)


def test_zero_pass_snap_and_hold():
    depth, kappa, lr, thr = 3, 0.1, 0.1, 1e-6
    U = torch.tensor([[0.0, 1e-4, 0.5, 0.5, 0.0], [0.0, 1e-4, 0.5, -0.5, 0.0]], dtype=torch.float64)
    W = torch.tensor([0.0, 1e-4, 1.0, 1.0, 0.0], dtype=torch.float64)
    theta_old = torch.tensor([0.0, 2e-12, 0.2, 0.2, 0.0], dtype=torch.float64)
    dead = ref.deep_element_dead(U, W)
    g_small = 0.5 * ref.revival_threshold(kappa, depth, lr)
    g = torch.tensor([g_small, 0.0, 0.0, 0.0, -g_small], dtype=torch.float64)
    new_U, new_W = ref.deep_element_zero_pass(U, W, g, theta_old, dead, kappa, lr, thr, depth)
    theta = ref.element_product(new_U, new_W)
    # dead and below the threshold: held; tiny and shrinking: snapped; sign flip (0.25 -> -0.25 vs +0.2): snapped
    assert theta.tolist() == [0.0, 0.0, 0.25, 0.0, 0.0]
    assert bool(ref.deep_element_dead(new_U, new_W)[[0, 1, 3, 4]].all())
    assert not torch.signbit(theta).any()  # zeros are +0.0


@pytest.mark.parametrize("depth", [3, 4])
def test_exact_zeros_appear_in_training(depth):
    """Noise features of a random regression end at exact zeros, and stay there while their condition holds."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(200, 30, dtype=torch.float64, generator=gen)
    true = torch.zeros(30, dtype=torch.float64)
    true[:4] = torch.tensor([2.0, -1.5, 1.0, 3.0], dtype=torch.float64)
    y = X @ true + 0.3 * torch.randn(200, dtype=torch.float64, generator=gen)
    theta = torch.linalg.lstsq(X, y).solution.clone().requires_grad_(True)  # dense start
    opt = lbfgs([theta], 0.05 / depth, depth)

    def closure():
        opt.zero_grad()
        loss = (y - X @ theta).pow(2).sum() / 400
        loss.backward()
        return loss

    run(opt, closure, 20)
    assert torch.equal(theta.detach() != 0, true != 0)
    assert opt.kkt_residual() < 1e-7
    before = theta.detach().clone()
    run(opt, closure, 3)
    assert torch.equal(theta.detach() == 0, before == 0)


# ----------------------------------------------------------------------------------------------------
# the KKT residual


def test_kkt_residual_formula():
    depth, kappa, step = 3, 0.1, 0.5
    q = 2 / depth
    theta = torch.tensor([0.0, 0.0, 0.7, -0.2], dtype=torch.float64)
    thr = ref.revival_threshold(kappa, depth, step)
    g = torch.tensor([0.9 * thr, -1.2 * thr, -2 * kappa * 0.7 ** (q - 1) + 0.01, 2 * kappa * 0.2 ** (q - 1)], dtype=torch.float64)
    value = float(ref.deep_element_kkt(theta, g, kappa, depth, step))
    assert value == pytest.approx(0.2 * thr)  # the zero with |g| = 1.2*thr violates its condition most
    g[1] = 0.0
    assert float(ref.deep_element_kkt(theta, g, kappa, depth, step)) == pytest.approx(0.01)


def test_kkt_residual_uses_the_zero_pass_step():
    """The zeros' condition is the one the zero pass enforced, at the step it used (recorded in the state)."""
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = SpreadSGD([theta], lr=0.2, kappa=0.05, depth=3)
    c = torch.tensor([0.01, 0.02, -0.03], dtype=torch.float64)
    (c * theta).sum().backward()
    opt.step()
    assert opt.state[theta]["prox_step"] == 0.2
    assert opt.kkt_residual() == 0.0  # all held: |c| below the threshold at lr 0.2
    assert ref.revival_threshold(0.05, 3, 0.2) > 0.03


# ----------------------------------------------------------------------------------------------------
# the key, the kinds, the dispatch, checkpoints, the report


def test_depth_key_checks():
    p = torch.zeros(3, requires_grad=True)
    assert SpreadSGD([p], lr=0.1).param_groups[0]["depth"] == 2
    for value in (np.int64(3), torch.tensor(4), 3):
        group = SpreadSGD([torch.zeros(3, requires_grad=True)], lr=0.1, kappa=0.1, depth=value).param_groups[0]
        assert group["depth"] == int(value) and type(group["depth"]) is int
    for value, error in ((True, TypeError), (3.0, TypeError), ("3", TypeError), (1, ValueError), (np.bool_(True), TypeError)):
        with pytest.raises(error, match="param group 0: 'depth' must be an int >= 2"):
            SpreadSGD([torch.zeros(3, requires_grad=True)], lr=0.1, kappa=0.1, depth=value)
    opt = SpreadSGD([torch.zeros(3, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError, match="param group 1: 'depth'"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "depth": 2.5})


def test_kinds_follow_depth():
    p = torch.zeros(4, 3)
    group = {"params": [p], "kappa": 0.1, "sparsity": "element", "depth": 2, "share_groups": False, "init": "balanced",
             "zero_threshold": 1e-6}
    assert type(make_kind(group, 0, {}, "spec")) is Element
    assert type(make_kind({**group, "sparsity": "row"}, 0, {}, "spec")) is Grouped
    assert type(make_kind({**group, "depth": 3}, 0, {}, "spec")) is deep.DeepElement
    assert type(make_kind({**group, "depth": 3, "sparsity": "row"}, 0, {}, "spec")) is deep.DeepGrouped


def test_depth_3_falls_back_with_one_note(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned_depth", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            p = torch.ones(8, requires_grad=True)
            opt = SpreadSGD([p], lr=0.1, kappa=0.1, depth=3)
            p.sum().backward()
            opt.step()
            assert opt._paths == ["spec"]
    notes = [w for w in caught if issubclass(w.category, RuntimeWarning) and "'depth'=3" in str(w.message)]
    assert len(notes) == 1
    assert notes[0].filename == __file__  # the user's line (the step call), not one inside the package or torch
    p = torch.ones(8, requires_grad=True)
    opt = SpreadSGD([p], lr=0.1, kappa=0.1, depth=3, fused=True)
    p.sum().backward()
    with pytest.raises(RuntimeError, match="param group 0: fused=True, but 'depth'=3"):
        opt.step()


@pytest.mark.parametrize("sparsity", ["element", "row"])
def test_depth_3_never_takes_the_compiled_step(monkeypatch, sparsity):
    """A CPU group of 2^20 elements: at depth 2 ``fused=None`` picks the compiled step; at depth 3 the reference path
    runs instead (one note that names it), bit for bit as with ``fused=False``; ``fused=True`` raises on CPU."""
    monkeypatch.setattr(dispatch, "_warned_depth", False)
    shape = (1024, 1024)
    assert dispatch.choose([torch.ones(shape)], [], {"fused": None}, base_cls=torch.optim.Adam, one_dtype=False,
                           shared=False, sharded=False, where="g").path == "compiled"
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    start[start.abs() < 0.5] = 0.0
    start[:64] = 0.0  # whole rows too, held at zero by a zero gradient
    grads = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for g in grads:
        g[:64] = 0.0
    results = {}
    for fused in (None, False):
        p = start.clone().requires_grad_(True)
        opt = SpreadAdam([p], lr=0.01, kappa=0.05, depth=3, sparsity=sparsity, fused=fused)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for g in grads:
                p.grad = g.clone()
                opt.step()
        assert opt._paths == ["spec"]
        notes = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(notes) == (1 if fused is None else 0) and all("compiled CPU step" in n for n in notes)
        results[fused] = p.detach().clone()
    assert torch.equal(results[None], results[False])
    assert (results[None] == 0).any() and not torch.equal(results[None], start)
    p = start.clone().requires_grad_(True)
    opt = SpreadAdam([p], lr=0.01, kappa=0.05, depth=3, sparsity=sparsity, fused=True)
    p.grad = grads[0].clone()
    with pytest.raises(RuntimeError, match="param group 0: fused=True, but 'depth'=3: the fused paths"):
        opt.step()
    assert torch.equal(p.detach(), start)  # refused before anything moved


@pytest.mark.parametrize("sparsity", ["element", "row"])
def test_init_is_exact_and_state_layout(sparsity):
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        p = torch.randn(5, 4, dtype=dtype)
        p[1] = 0
        p.requires_grad_(True)
        before = p.detach().clone()
        opt = SpreadSGD([p], lr=0.0, kappa=0.1, depth=4, sparsity=sparsity)
        p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.equal(p.detach(), before)
        st = opt.state[p]
        key, shape = ("U", (3, 5, 4)) if sparsity == "element" else ("u", (3, 5))
        assert st[key].shape == shape and st[key].dtype == ref.factor_dtype(dtype)
        assert st["W"].shape == p.shape


@pytest.mark.parametrize("sparsity", ["element", "column"])
def test_checkpoint_resumes_bit_for_bit(sparsity):
    torch.manual_seed(0)
    X, y = torch.randn(40, 6), torch.randn(40, 2)

    def make():
        torch.manual_seed(1)
        model = torch.nn.Linear(6, 2)
        return model, SpreadOptimizer([{"params": [model.weight], "kappa": 0.01, "depth": 3, "sparsity": sparsity},
                                       {"params": [model.bias]}], "adam", lr=0.05)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(X), y).backward()
            opt.step()

    model, opt = make()
    train(model, opt, 5)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, 5)
    model2, opt2 = make()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    train(model2, opt2, 5)
    assert torch.equal(model.weight, model2.weight)
    # a depth-2 checkpoint does not fit a depth-3 optimizer
    model3 = torch.nn.Linear(6, 2)
    opt3 = SpreadOptimizer([{"params": [model3.weight], "kappa": 0.01, "sparsity": sparsity}, {"params": [model3.bias]}], "adam", lr=0.05)
    opt3.zero_grad()
    torch.nn.functional.mse_loss(model3(X), y).backward()
    opt3.step()
    # as torch loads a group's hyperparameters, a depth-2 checkpoint makes the group depth 2 again ...
    other = copy.deepcopy(opt3.state_dict())
    opt2.load_state_dict(copy.deepcopy(other))
    assert opt2.param_groups[0]["depth"] == 2
    train(model2, opt2, 1)
    # ... and one without the key (an older checkpoint) takes this optimizer's depth: its factors do not fit
    model4, opt4 = make()
    for group in other["param_groups"]:
        del group["depth"]
    with pytest.raises(ValueError, match="sparsity or depth"):
        opt4.load_state_dict(other)


def test_changing_depth_rebuilds_the_factors():
    p = torch.randn(10, requires_grad=True)
    opt = SpreadSGD([p], lr=0.01, kappa=0.01, depth=3)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.state[p]["U"].shape == (2, 10)
    opt.param_groups[0]["depth"] = 2
    before = p.detach().clone()
    opt.step()
    assert opt.state[p]["U"].shape == (10,)
    opt.param_groups[0]["depth"] = 4
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert opt.state[p]["U"].shape == (3, 10)
    assert torch.allclose(p.detach(), before, atol=1e-3)


def test_report_names_the_penalty():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
    opt = SpreadSGD([{"params": [model[0].weight], "kappa": 0.1, "depth": 3},
                     {"params": [model[1].weight], "kappa": 0.1, "depth": 4, "sparsity": "column"},
                     {"params": [model[0].bias], "kappa": 0.1},
                     {"params": [model[1].bias]}], lr=0.1)
    report = sparsity_report(model, opt)
    assert [r.penalty for r in report] == ["L2/3", "L1", "group L1/2", "-"]
    assert "group L1/2" in str(report) and "penalty" in str(report).splitlines()[0]
    assert sparsity_report(model)[0].penalty == "-"


def test_sharded_parameters_refused_at_depth_3(monkeypatch):
    p = torch.ones(4, requires_grad=True)
    monkeypatch.setattr(deep, "is_dtensor", lambda t: True)
    kind_group = {"params": [p], "kappa": 0.1, "sparsity": "element", "depth": 3, "share_groups": False,
                  "init": "balanced", "zero_threshold": 1e-6}
    with pytest.raises(ValueError, match="param group 0: 'depth' > 2 does not take sharded"):
        make_kind(kind_group, 0, {}, "spec")
