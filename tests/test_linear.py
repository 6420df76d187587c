"""``spread_optim.linear``: SpreadLasso / SpreadGroupLasso against independent oracles.

Oracles: scikit-learn's coordinate descent (``Lasso``, ``MultiTaskLasso``) at tol 1e-14, and for
feature groups a NumPy accelerated proximal-gradient (FISTA) solve with the group soft-threshold, whose
own optimality conditions are checked. Small float64 problems with correlated features, fast.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spread_optim.linear import SpreadGroupLasso, SpreadLasso

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.linear_model import Lasso, MultiTaskLasso  # noqa: E402

COEF_TOL = 1e-5  # max |coef - oracle| asked of every fit (tol=1e-7: KKT residual <= 1e-8 * alpha_max)


def correlated(n=50, d=80, outputs=1, seed=0, offset=1.0):
    """AR(1)-correlated features (rho 0.5) with a nonzero mean, 8 true features, noise sd 0.3."""
    rng = np.random.default_rng(seed)
    cov = 0.5 ** np.abs(np.subtract.outer(np.arange(d), np.arange(d)))
    X = rng.standard_normal((n, d)) @ np.linalg.cholesky(cov).T + offset
    B = np.zeros((d, outputs))
    B[rng.choice(d, 8, replace=False)] = rng.choice([-2.0, 2.0], (8, outputs)) * rng.uniform(0.5, 1.0, (8, outputs))
    Y = X @ B + 0.3 * rng.standard_normal((n, outputs)) + 3.0
    return X, (Y[:, 0] if outputs == 1 else Y)


@pytest.fixture(params=["numpy", "torch"])
def path(request, monkeypatch):
    """The working-set solver's two implementations: NumPy (dense float64 on the CPU, the default there) and torch
    (float32, sparse ``X``, GPUs; forced here by turning the NumPy path off)."""
    import spread_optim.linear as linear

    if request.param == "torch":
        monkeypatch.setattr(linear, "_numpy_path", lambda X, Y: False)
    return request.param


def sklearn_lasso(X, y, alpha, fit_intercept=True):
    return Lasso(alpha=alpha, fit_intercept=fit_intercept, tol=1e-14, max_iter=10**6).fit(X, y)


@pytest.mark.parametrize("working_set", [True, False])
def test_lasso_matches_sklearn(working_set, path):
    X, y = correlated(seed=1)
    ref = sklearn_lasso(X, y, 0.1)
    model = SpreadLasso(alpha=0.1, tol=1e-7, working_set=working_set).fit(X, y)
    assert model.coef_.shape == (80,)
    assert np.abs(model.coef_ - ref.coef_).max() < COEF_TOL
    assert np.array_equal(model.coef_ != 0, ref.coef_ != 0)  # exact zeros, the same support
    assert 0 < (ref.coef_ != 0).sum() < 40
    assert abs(model.intercept_ - ref.intercept_) < COEF_TOL
    assert model.kkt_residual_ <= 1e-7 * np.abs((X - X.mean(0)).T @ (y - y.mean())).max() / len(y)


@pytest.mark.parametrize("working_set", [True, False])
def test_lasso_multi_output_is_one_lasso_per_output(working_set, path):
    X, Y = correlated(n=60, d=40, outputs=3, seed=2)
    ref = sklearn_lasso(X, Y, 0.15)
    model = SpreadLasso(alpha=0.15, tol=1e-7, working_set=working_set).fit(X, Y)
    assert model.coef_.shape == (3, 40) and model.intercept_.shape == (3,)
    assert np.abs(model.coef_ - ref.coef_).max() < COEF_TOL
    assert np.array_equal(model.coef_ != 0, ref.coef_ != 0)
    assert np.abs(model.intercept_ - ref.intercept_).max() < COEF_TOL
    # the outputs differ, so a mix-up of rows/columns would fail
    assert not np.array_equal(ref.coef_[0] != 0, ref.coef_[1] != 0)


def test_lasso_without_intercept_and_predict():
    X, y = correlated(seed=3, offset=0.0)
    ref = sklearn_lasso(X, y, 0.2, fit_intercept=False)
    model = SpreadLasso(alpha=0.2, fit_intercept=False, tol=1e-7).fit(X, y)
    assert model.intercept_ == 0.0
    assert np.abs(model.coef_ - ref.coef_).max() < COEF_TOL
    X_new = np.random.default_rng(4).standard_normal((7, 80))
    pred = model.predict(X_new)
    assert pred.shape == (7,)
    np.testing.assert_allclose(pred, ref.predict(X_new), atol=1e-4)
    np.testing.assert_allclose(pred, X_new @ model.coef_, rtol=0, atol=1e-12)


def test_predict_multi_output_and_torch_input():
    X, Y = correlated(n=60, d=30, outputs=2, seed=5)
    model = SpreadLasso(alpha=0.2).fit(torch.from_numpy(X), torch.from_numpy(Y))
    pred = model.predict(torch.from_numpy(X))
    assert pred.shape == (60, 2)
    np.testing.assert_allclose(pred, X @ model.coef_.T + model.intercept_, atol=1e-12)
    np.testing.assert_allclose(pred, sklearn_lasso(X, Y, 0.2).predict(X), atol=1e-4)


def test_alpha_above_alpha_max_gives_exact_zeros():
    X, y = correlated(seed=6)
    Xc, yc = X - X.mean(0), y - y.mean()
    alpha_max = np.abs(Xc.T @ yc).max() / len(y)
    model = SpreadLasso(alpha=1.01 * alpha_max).fit(X, y)
    assert np.all(model.coef_ == 0)
    assert model.intercept_ == pytest.approx(y.mean(), abs=1e-12)
    below = SpreadLasso(alpha=0.9 * alpha_max).fit(X, y)
    assert np.count_nonzero(below.coef_) >= 1


def test_group_lasso_rows_match_multitask_lasso():
    X, Y = correlated(n=60, d=40, outputs=3, seed=7)
    ref = MultiTaskLasso(alpha=0.3, tol=1e-14, max_iter=10**6).fit(X, Y)
    model = SpreadGroupLasso(alpha=0.3, tol=1e-7).fit(X, Y)
    assert model.coef_.shape == (3, 40)
    assert np.abs(model.coef_ - ref.coef_).max() < COEF_TOL
    kept, ref_kept = (model.coef_ != 0).any(0), (ref.coef_ != 0).any(0)
    assert np.array_equal(kept, ref_kept) and 0 < ref_kept.sum() < 40
    assert np.array_equal(model.coef_ != 0, np.broadcast_to(kept, (3, 40)))  # whole rows are exactly zero
    assert np.abs(model.intercept_ - ref.intercept_).max() < COEF_TOL


def group_fista(X, y, groups, alpha, iters=5000):
    """NumPy FISTA for ``||y - X w||^2/(2n) + alpha * sum_g ||w_g||`` (centred data, no intercept)."""
    n, d = X.shape
    L = np.linalg.norm(X, 2) ** 2 / n
    w = z = np.zeros(d)
    t = 1.0
    for _ in range(iters):
        v = z - X.T @ (X @ z - y) / n / L
        w_new = np.zeros(d)
        for g in np.unique(groups):
            m = groups == g
            norm = np.linalg.norm(v[m])
            if norm > alpha / L:
                w_new[m] = (1 - alpha / L / norm) * v[m]
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        z = w_new + (t - 1) / t_new * (w_new - w)
        w, t = w_new, t_new
    return w


def test_group_lasso_feature_groups_match_fista():
    X, y = correlated(n=40, d=12, seed=8)
    groups = np.repeat(np.arange(4), 3)
    Xc, yc = X - X.mean(0), y - y.mean()
    alpha = 1.0
    oracle = group_fista(Xc, yc, groups, alpha)
    # the oracle's own optimality conditions
    g = Xc.T @ (Xc @ oracle - yc) / len(y)
    for k in range(4):
        m = groups == k
        if np.linalg.norm(oracle[m]) == 0:
            assert np.linalg.norm(g[m]) <= alpha + 1e-8
        else:
            np.testing.assert_allclose(g[m], -alpha * oracle[m] / np.linalg.norm(oracle[m]), atol=1e-7)
    model = SpreadGroupLasso(alpha=alpha, groups=groups, tol=1e-7).fit(X, y)
    assert model.coef_.shape == (12,)
    assert np.abs(model.coef_ - oracle).max() < COEF_TOL
    zero_groups = [k for k in range(4) if np.all(oracle[groups == k] == 0)]
    assert 0 < len(zero_groups) < 4
    for k in range(4):
        assert np.all(model.coef_[groups == k] == 0) == (k in zero_groups)
    assert model.intercept_ == pytest.approx(y.mean() - X.mean(0) @ model.coef_, abs=1e-12)


def test_single_output_group_lasso_without_groups_is_the_lasso():
    X, y = correlated(seed=9)
    ref = sklearn_lasso(X, y, 0.1)
    model = SpreadGroupLasso(alpha=0.1, tol=1e-7).fit(X, y)
    assert np.abs(model.coef_ - ref.coef_).max() < COEF_TOL
    assert np.array_equal(model.coef_ != 0, ref.coef_ != 0)


def test_bad_input_and_sklearn_api():
    X, y = correlated(seed=10)
    with pytest.raises(ValueError, match="alpha"):
        SpreadLasso(alpha=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="alpha"):
        SpreadLasso(alpha=float("nan")).fit(X, y)
    with pytest.raises(ValueError, match="groups"):
        SpreadGroupLasso(alpha=0.1, groups=np.arange(5)).fit(X, y)
    with pytest.raises(ValueError, match="samples"):
        SpreadLasso(alpha=0.1).fit(X, y[:-1])
    with pytest.raises(ValueError, match="infinity"):  # scikit-learn's message
        SpreadLasso(alpha=0.1).fit(np.where(X > 2, np.inf, X), y)
    model = clone(SpreadLasso(alpha=0.3, working_set=False))
    assert model.get_params()["alpha"] == 0.3 and model.get_params()["working_set"] is False
    assert model.fit(X, y).score(X, y) > 0.5


def lasso_objective(X, y, coef, intercept, alpha):
    r = y - X @ coef - intercept
    return (r * r).sum() / (2 * len(y)) + alpha * np.abs(coef).sum()


def test_lasso_many_active_coefficients(path):
    """``alpha = 0.01 alpha_max`` with ``d > n``: nearly ``n`` nonzeros, where the factorised curvature ``~2|theta|``
    stalls first-order steps; the Newton steps reach scikit-learn's objective and support."""
    X, y = correlated(n=40, d=150, seed=11)
    Xc, yc = X - X.mean(0), y - y.mean()
    alpha = 0.01 * np.abs(Xc.T @ yc).max() / len(y)
    ref = sklearn_lasso(X, y, alpha)
    model = SpreadLasso(alpha=alpha, tol=1e-9).fit(X, y)
    assert (ref.coef_ != 0).sum() > 25
    assert np.array_equal(model.coef_ != 0, ref.coef_ != 0)
    obj, obj_ref = (lasso_objective(X, y, m.coef_, m.intercept_, alpha) for m in (model, ref))
    assert obj - obj_ref <= 1e-9 * obj_ref
    assert np.abs(model.coef_ - ref.coef_).max() < 1e-4


def test_lasso_sparse_x_multi_output_matches_sklearn():
    """A SciPy sparse ``X`` (never densified, centred implicitly) with three outputs: one lasso per output."""
    sp = pytest.importorskip("scipy.sparse")
    X, Y = correlated(n=60, d=50, outputs=3, seed=12)
    X = X * (np.random.default_rng(12).random(X.shape) < 0.3)  # 70% zeros
    ref = sklearn_lasso(X, Y, 0.05)
    model = SpreadLasso(alpha=0.05, tol=1e-8).fit(sp.csr_matrix(X), Y)
    assert np.abs(model.coef_ - ref.coef_).max() < COEF_TOL
    assert np.array_equal(model.coef_ != 0, ref.coef_ != 0)
    assert np.abs(model.intercept_ - ref.intercept_).max() < COEF_TOL


def test_lasso_outputs_of_very_different_sparsity(monkeypatch, path):
    """Outputs solved together are padded to the widest live set: an output whose solution is 0 beside dense ones,
    in one batch and one output per batch, both as scikit-learn's."""
    import spread_optim.linear as linear

    X, Y = correlated(n=50, d=60, outputs=4, seed=13)
    Y[:, 1] = 0.01 * np.random.default_rng(13).standard_normal(50)  # all zeros at this alpha
    Y[:, 2] = X[:, :30] @ np.linspace(-1, 1, 30)  # many nonzeros
    ref = sklearn_lasso(X, Y, 0.05)
    assert np.all(ref.coef_[1] == 0) and (ref.coef_[2] != 0).sum() > 20
    together = SpreadLasso(alpha=0.05, tol=1e-8).fit(X, Y)
    monkeypatch.setattr(linear, "_output_batches", lambda k, n, d: [slice(j, j + 1) for j in range(k)])
    apart = SpreadLasso(alpha=0.05, tol=1e-8).fit(X, Y)
    for model in (together, apart):
        assert np.abs(model.coef_ - ref.coef_).max() < COEF_TOL
        assert np.array_equal(model.coef_ != 0, ref.coef_ != 0)


def test_newton_line_search_batched_is_sequential_backtracking():
    """The line search tries its halvings several at a time: the point, the acceptance and the step size are those
    of plain Armijo backtracking (one halving at a time, each coefficient stopped at zero), row by row."""
    from spread_optim.linear import _FactorisedNewton

    rng = np.random.default_rng(21)
    k, L, alpha = 5, 12, 0.3
    A = torch.as_tensor(rng.standard_normal((k, 30, L)))
    GL = A.transpose(1, 2) @ A / 30
    thL = torch.as_tensor(rng.standard_normal((k, L)))
    gL = torch.as_tensor(rng.standard_normal((k, L)))
    scale = torch.as_tensor([1.0, 10.0, 1e3, 1e6, 1e12])[:, None]  # from a full step to one no halving accepts
    t = torch.as_tensor(rng.standard_normal((k, L))) * scale
    slope = -(gL * t).sum(1).abs()
    # row 0: t is the minimiser of the sign-fixed quadratic (no sign change): the full step is accepted
    s0 = torch.sign(thL[0])
    t[0] = -0.1 * thL[0]
    gL[0] = -alpha * s0 - GL[0] @ t[0]
    slope[0] = ((gL[0] + alpha * s0) * t[0]).sum()
    solver = _FactorisedNewton.__new__(_FactorisedNewton)
    solver.alpha = alpha
    best, accepted, eta = solver._line_search(thL, gL, GL, t, slope)

    def objective_change(row, trial):
        D = trial - thL[row]
        return float(gL[row] @ D + 0.5 * D @ GL[row] @ D + alpha * (trial.abs().sum() - thL[row].abs().sum()))

    for row in range(k):
        step, want = 1.0, None
        for _ in range(_FactorisedNewton.HALVINGS):
            trial = thL[row] + step * t[row]
            trial = torch.where(trial * thL[row] < 0, 0.0, trial)
            if objective_change(row, trial) <= _FactorisedNewton.ARMIJO * step * float(slope[row]):
                want = trial
                break
            step /= 2
        assert bool(accepted[row]) == (want is not None)
        if want is None:
            assert torch.equal(best[row], thL[row]) and float(eta[row]) == 2.0 ** -_FactorisedNewton.HALVINGS
        else:
            assert float(eta[row]) == step and torch.allclose(best[row], want, rtol=0, atol=1e-15)
    assert bool(accepted[0]) and float(eta[0]) == 1.0 and not bool(accepted[-1])


def test_lasso_many_rounds_revives_new_members_first(path):
    """Sets that grow over many rounds (``d >> n``, ``alpha = 0.02 alpha_max``, two outputs): each round's new members
    that violate ``|g| <= alpha`` are revived before its first Newton step. Exact support and objective as
    scikit-learn's."""
    X, Y = correlated(n=60, d=400, outputs=2, seed=22)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    alpha = 0.02 * np.abs(Xc.T @ Yc).max() / len(Y)
    ref = sklearn_lasso(X, Y, alpha)
    model = SpreadLasso(alpha=alpha, tol=1e-9).fit(X, Y)
    assert model.n_rounds_ >= 3 and (ref.coef_ != 0).sum() > 30
    assert np.array_equal(model.coef_ != 0, ref.coef_ != 0)
    for j in range(2):
        obj, obj_ref = (lasso_objective(X, Y[:, j], m.coef_[j], m.intercept_[j], alpha) for m in (model, ref))
        assert obj - obj_ref <= 1e-9 * obj_ref
    assert np.abs(model.coef_ - ref.coef_).max() < 1e-4


@pytest.mark.parametrize("per_output", [64, 10**9])
def test_lasso_many_outputs_wide_live_sets(monkeypatch, per_output, path):
    """Several outputs with ~40-90 nonzeros each (``d > n``, ``alpha = 0.01 alpha_max``): the sets grow by no more
    than the worst output's violators once they hold the support; live blocks are factorised one output at a time
    at their own sizes (``PER_OUTPUT``; or batched, padded to the widest), and only the outputs not yet converged
    are recomputed. Supports and objectives as scikit-learn's, with either factorisation."""
    import spread_optim.linear as linear

    monkeypatch.setattr(linear._FactorisedNewton, "PER_OUTPUT", per_output)
    X, Y = correlated(n=120, d=300, outputs=4, seed=23)
    Y[:, 3] = X[:, :60] @ np.linspace(-1, 1, 60) + 0.3 * np.random.default_rng(23).standard_normal(120)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    alpha = 0.01 * np.abs(Xc.T @ Yc).max() / len(Y)
    ref = sklearn_lasso(X, Y, alpha)
    model = SpreadLasso(alpha=alpha, tol=1e-9).fit(X, Y)
    nonzeros = (ref.coef_ != 0).sum(1)
    assert nonzeros.min() > 30 and nonzeros.max() > 64 and model.n_rounds_ >= 3
    assert np.array_equal(model.coef_ != 0, ref.coef_ != 0)
    for j in range(4):
        obj, obj_ref = (lasso_objective(X, Y[:, j], m.coef_[j], m.intercept_[j], alpha) for m in (model, ref))
        assert obj - obj_ref <= 1e-9 * obj_ref
    assert np.abs(model.coef_ - ref.coef_).max() < 1e-4


def test_lasso_numpy_path_without_scipy_uses_torch_cholesky(monkeypatch):
    """SciPy is optional at run time: without it the NumPy path factorises with torch (same memory), and the fit
    still ends at scikit-learn's support and objective."""
    import sys

    import spread_optim.linear as linear

    monkeypatch.setitem(sys.modules, "scipy.linalg.lapack", None)  # `from scipy.linalg.lapack import ...` fails
    factor, solve = linear._cholesky_solver()
    rng = np.random.default_rng(0)
    A = rng.standard_normal((7, 7))
    H, b = A @ A.T + 7 * np.eye(7), rng.standard_normal(7)
    chol, info = factor(H.copy())
    assert info == 0 and np.allclose(solve(chol, b), np.linalg.solve(H, b), rtol=1e-10, atol=1e-12)
    assert factor(-np.eye(3))[1] > 0  # not positive definite: reported, as LAPACK's info does
    X, y = correlated(n=60, d=300, seed=26)
    Xc, yc = X - X.mean(0), y - y.mean()
    alpha = 0.05 * np.abs(Xc.T @ yc).max() / len(y)
    ref = sklearn_lasso(X, y, alpha)
    model = SpreadLasso(alpha=alpha, tol=1e-9).fit(X, y)
    assert np.array_equal(model.coef_ != 0, ref.coef_ != 0)
    obj, obj_ref = (lasso_objective(X, y, m.coef_, m.intercept_, alpha) for m in (model, ref))
    assert obj - obj_ref <= 1e-9 * obj_ref


@pytest.mark.parametrize("seed, frac", [(24, 0.1), (25, 0.01)])
def test_lasso_single_output_numpy_path_is_the_torch_solver(monkeypatch, seed, frac):
    """Dense float64 on the CPU: the NumPy copy of the solver (``_working_set_lasso_numpy``) takes the steps of the
    torch one and ends at scikit-learn's support and objective; float32 takes the torch path."""
    import spread_optim.linear as linear

    X, y = correlated(n=60, d=400, seed=seed)
    Xc, yc = X - X.mean(0), y - y.mean()
    alpha = frac * np.abs(Xc.T @ yc).max() / len(y)
    ref = sklearn_lasso(X, y, alpha)
    calls = []
    original = linear._working_set_lasso_numpy
    monkeypatch.setattr(linear, "_working_set_lasso_numpy", lambda *a, **k: calls.append(1) or original(*a, **k))
    fast = SpreadLasso(alpha=alpha, tol=1e-9).fit(X, y)
    assert calls == [1]
    monkeypatch.setattr(linear, "_numpy_path", lambda X, Y: False)
    slow = SpreadLasso(alpha=alpha, tol=1e-9).fit(X, y)
    assert calls == [1]
    for model in (fast, slow):
        assert np.array_equal(model.coef_ != 0, ref.coef_ != 0)
        obj, obj_ref = (lasso_objective(X, y, m.coef_, m.intercept_, alpha) for m in (model, ref))
        assert obj - obj_ref <= 1e-9 * obj_ref
        assert np.abs(model.coef_ - ref.coef_).max() < 1e-5 and abs(model.intercept_ - ref.intercept_) < 1e-5
        assert model.kkt_residual_ <= 1e-9 * np.abs(Xc.T @ yc).max() / len(y)
    assert np.abs(fast.coef_ - slow.coef_).max() < 1e-8
    assert fast.n_rounds_ == slow.n_rounds_ and abs(fast.n_iter_ - slow.n_iter_) <= 1
    monkeypatch.undo()
    assert not linear._numpy_path(torch.zeros(3, 2), torch.zeros(3, 1))  # float32
    assert linear._numpy_path(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64))
