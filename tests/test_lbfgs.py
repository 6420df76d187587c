"""LBFGS as the base: the zero pass (hold, revive, snap) between steps, and LBFGS's own state.

Oracles: scikit-learn's coordinate descent (``Lasso``) for the optimum, and the definition of a hold (an
entry held at exact zero is not moved: the base must not move it either).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from spread_optim import SpreadOptimizer

sys.path.insert(0, str(Path(__file__).parent))
from test_closed_form import LBFGS_KW, _start, correlated_problem, ls_loss  # noqa: E402

DT = torch.float64


def _sparse_coding_problem(dtype=DT):
    """Codes of 64 signals over a correlated 64-atom dictionary with unit columns (curvature ||B||^2 = 10)."""
    g = torch.Generator().manual_seed(197)  # drawn in float32, solved in ``dtype``
    d = k = n = 64
    B = torch.randn(d, k, generator=g)
    B = B + torch.roll(B, 1, 0) + torch.roll(B, -1, 0) + 0.8 * torch.randn(d, 1, generator=g)
    B /= B.norm(dim=0)
    X = B @ (torch.randn(k, n, generator=g) * (torch.rand(k, n, generator=g) < 0.1)) + 0.3 * torch.randn(d, n, generator=g)
    return B.to(dtype), X.to(dtype)


def _spread_lbfgs_coder(B, X, lam):
    """The codes ``A`` (one proximal-gradient step from zero), spread + LBFGS on them (3 iterations per
    step, strong Wolfe) and the least-squares closure."""
    L = float(torch.linalg.matrix_norm(B, 2)) ** 2
    z = B.T @ X / L
    A = torch.nn.Parameter(torch.sign(z) * (z.abs() - lam / L).clamp(min=0))
    opt = SpreadOptimizer([A], torch.optim.LBFGS, kappa=lam / 2, max_iter=3, line_search_fn="strong_wolfe", zero_threshold=1e-3)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (X - B @ A).pow(2).sum()
        loss.backward()
        return loss

    return A, opt, closure


def test_lbfgs_short_steps_reach_the_sparse_coding_optimum():
    """Repeated steps of 3 LBFGS iterations, with a zero pass between them, must converge.

    Before the fix the zero pass moved the factors behind LBFGS's back: LBFGS paired its own small move
    with a gradient change that included the zero pass's jump, the pair's huge ``1/(y.s)`` gave a
    direction ~1000x too long, the 2-evaluation line search returned ``t = 0`` and every later step
    repeated it: the objective sat at 284.3 (optimum 182.8, relative gap 0.55) for good.
    """
    from sklearn.linear_model import Lasso

    B, X = _sparse_coding_problem()
    lam = 0.15
    objective = lambda A: float(0.5 * (X - B @ A).pow(2).sum() + lam * A.abs().sum())
    # 0.5*||X - B A||^2 + lam*|A|_1 is, column by column, scikit-learn's lasso with alpha = lam / 64
    best = Lasso(alpha=lam / 64, fit_intercept=False, tol=1e-14, max_iter=10**6).fit(B.numpy(), X.numpy()).coef_.T
    f_best = objective(torch.from_numpy(best))
    A, opt, closure = _spread_lbfgs_coder(B, X, lam)
    for _ in range(100):  # 51 needed after the fix
        opt.step(closure)
    assert (objective(A.detach()) - f_best) / f_best <= 1e-6, (objective(A.detach()), f_best)


def test_lbfgs_zero_pass_uses_the_accepted_point_not_a_rejected_trial():
    """With a strong-Wolfe line search the last closure evaluation can be a rejected trial point; the
    hold/revive/snap pass must use the gradient at the accepted point, or the objective blows up."""
    lam = 0.15
    B, X = _sparse_coding_problem(torch.float32)
    A, opt, closure = _spread_lbfgs_coder(B, X, lam)

    def objective():
        with torch.no_grad():
            return float(0.5 * (X - B @ A).pow(2).sum() + lam * A.abs().sum())

    values = [objective()]
    for _ in range(4):
        opt.step(closure)
        values.append(objective())
    # before the fix: 310.7 -> 284.7 -> 9478 -> 1.2e6 -> FloatingPointError
    assert all(b <= a * (1 + 1e-6) for a, b in zip(values, values[1:])), values


def test_lbfgs_does_not_move_entries_held_at_zero():
    """An entry held at exact zero (U = W = 0, its KKT condition satisfied) stays put until revived; the
    zero pass restores it after the base step. LBFGS's history must not move it either: before the fix
    its stored curvature pairs still had components there, every LBFGS step moved the 38 held entries
    of this problem off zero and the zero pass moved them back, so each step's first pair was wrong and
    the line searches wasted their evaluations (the objective stopped 7e-7 short when only the pair was
    fixed)."""
    X, y = correlated_problem(40, 60, 0.5, 3)
    b = _start(60, 3, True)
    opt = SpreadOptimizer([b], torch.optim.LBFGS, kappa=0.1, max_iter=100, **LBFGS_KW)

    def closure():
        opt.zero_grad()
        loss = ls_loss(X, y, b)
        loss.backward()
        return loss

    moved_by_base = []
    opt.step(closure)
    base_step = opt._hidden.step
    for _ in range(6):
        held = (opt.state[b]["U"] == 0) & (opt.state[b]["W"] == 0)
        assert held.any()

        def watched(c, held=held):
            out = base_step(c)
            moved_by_base.append(int((held & ((opt.state[b]["U"] != 0) | (opt.state[b]["W"] != 0))).sum()))
            return out

        opt._hidden.step = watched
        opt.step(closure)
        opt._hidden.step = base_step
    assert moved_by_base == [0] * 6, moved_by_base  # before the fix: [47, 40, 39, 38, 38, 38]


def test_lbfgs_revival_from_zero_does_not_overshoot():
    """An unscaled Gaussian lasso from b = 0: LBFGS's first step revives every coefficient whose KKT
    condition fails. With LBFGS's lr = 1 as the proximal step the revived point overshot (curvature
    ~17 here: the objective went 7.06 -> 272 before LBFGS recovered); with the backtracked step each
    step lowers the objective, and the run ends at scikit-learn's optimum."""
    from sklearn.linear_model import Lasso

    n, d = 200, 2000
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=DT)
    truth = torch.zeros(d, dtype=DT)
    truth[:20] = torch.randn(20, generator=g, dtype=DT)
    y = X @ truth + 0.5 * torch.randn(n, generator=g, dtype=DT)
    lam = 0.1 * float((X.T @ y).abs().max()) / n
    objective = lambda b: float((y - X @ b).pow(2).sum() / (2 * n) + lam * b.abs().sum())
    best = torch.from_numpy(Lasso(alpha=lam, fit_intercept=False, tol=1e-12, max_iter=10**6).fit(X.numpy(), y.numpy()).coef_)
    b = torch.zeros(d, dtype=DT, requires_grad=True)
    opt = SpreadOptimizer([b], torch.optim.LBFGS, kappa=lam / 2, max_iter=10, line_search_fn="strong_wolfe",
                          tolerance_grad=0.0, tolerance_change=0.0)

    def closure():
        opt.zero_grad()
        loss = (y - X @ b).pow(2).sum() / (2 * n)
        loss.backward()
        return loss

    values = [objective(b.detach())]
    for _ in range(15):  # 7 needed
        opt.step(closure)
        values.append(objective(b.detach()))
    assert values[1] < values[0], values[:3]
    assert all(v1 <= v0 * (1 + 1e-12) for v0, v1 in zip(values, values[1:])), values
    assert (values[-1] - objective(best)) / objective(best) <= 1e-6
    assert torch.equal(b.detach() == 0, best == 0)


def test_the_global_hooks_fire_once_after_dynamo_wrapped_lbfgs_step(monkeypatch):
    """Once dynamo runs, it wraps LBFGS's step (already wrapped by torch's hooks) in ``torch.compiler.disable``, which
    copies the hook wrapper's mark: the hidden base must still step without the global hooks, and run as before."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])  # (torch hooks the class's step)
    monkeypatch.setattr(torch.optim.LBFGS, "step", torch.compiler.disable(torch.optim.LBFGS.step))  # (what dynamo does)
    A, b = torch.randn(8, 3, dtype=DT, generator=torch.Generator().manual_seed(0)), torch.ones(8, dtype=DT)
    results = []
    for watched in (False, True):
        x = torch.zeros(3, dtype=DT, requires_grad=True)
        opt = SpreadOptimizer([x], torch.optim.LBFGS, lr=1.0, max_iter=5, kappa=0.01)
        seen = []
        handles = [register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", type(o).__name__))),
                   register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(("post", type(o).__name__)))] if watched else []

        def closure():
            opt.zero_grad()
            loss = ((A @ x - b) ** 2).sum()
            loss.backward()
            return loss
        try:
            opt.step(closure)
        finally:
            for handle in handles:
                handle.remove()
        results.append(x.detach().clone())
        if watched:
            assert seen == [("pre", "SpreadOptimizer"), ("post", "SpreadOptimizer")]
    assert torch.equal(results[0], results[1]) and results[0].abs().sum() > 0
