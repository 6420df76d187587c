"""``SpreadLq``: the L2/3 and L1/2 linear models (``spread_optim/nonconvex.py``), scikit-learn's conventions.

On an orthogonal design the fit from zero is the global minimum (the thresholding operators of Xu et al. 2012 /
Cao et al. 2013, see ``test_depth.py``); with ``penalty="L1"`` it is scikit-learn's lasso; against skglm's
``L2_3`` / ``L0_5`` on a well-posed problem (n > d, strong signal) both local solvers reach the same minimum.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import spread_optim
from spread_optim.nonconvex import SpreadLq
from spread_optim.kernels import reference as ref
from test_depth import oracle_prox, orthogonal_problem, zs_for

pytestmark = pytest.mark.filterwarnings("ignore:spread_optim. 'depth'")


@pytest.mark.parametrize("penalty,q", [("L2/3", 2 / 3), ("L1/2", 0.5)])
def test_orthogonal_design_global_minimum(penalty, q):
    alpha = 0.3
    z = zs_for(alpha, q, seed=4)
    X, y = orthogonal_problem(z)
    est = SpreadLq(alpha, penalty=penalty, fit_intercept=False, tol=1e-8).fit(X.numpy(), y.numpy())
    oracle = np.array([oracle_prox(zj, alpha, q) for zj in z])
    assert np.array_equal(est.coef_ != 0, oracle != 0)
    np.testing.assert_allclose(est.coef_, oracle, atol=1e-7)
    n = X.shape[0]
    expected = ((y.numpy() - X.numpy() @ oracle) ** 2).sum() / (2 * n) + alpha * (np.abs(oracle) ** q).sum()
    assert est.objective_ == pytest.approx(expected, rel=1e-10)


def test_l1_is_the_lasso():
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 15))
    y = X[:, :3] @ [2.0, -1.0, 0.5] + 0.1 * rng.standard_normal(80) + 3.0
    ours = SpreadLq(0.1, penalty="L1", tol=1e-9).fit(X, y)
    theirs = sklearn_linear.Lasso(alpha=0.1, tol=1e-12, max_iter=100_000).fit(X, y)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, atol=1e-6)
    assert np.array_equal(ours.coef_ != 0, theirs.coef_ != 0)
    assert ours.intercept_ == pytest.approx(theirs.intercept_, abs=1e-6)


@pytest.mark.parametrize("penalty", ["L2/3", "L1/2"])
def test_agrees_with_skglm_on_a_well_posed_problem(penalty):
    pytest.importorskip("skglm")
    from skglm import GeneralizedLinearEstimator
    from skglm.datafits import Quadratic
    from skglm.penalties import L0_5, L2_3
    from skglm.solvers import AndersonCD

    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 30))
    true = np.zeros(30)
    true[:5] = [3.0, -2.0, 2.5, -1.5, 2.0]
    y = X @ true + 0.5 * rng.standard_normal(200)
    alpha = 0.2
    ours = SpreadLq(alpha, penalty=penalty, fit_intercept=False, tol=1e-7).fit(X, y)
    pen = {"L2/3": L2_3, "L1/2": L0_5}[penalty](alpha)
    theirs = GeneralizedLinearEstimator(Quadratic(), pen, AndersonCD(tol=1e-10, fit_intercept=False,
                                                                     ws_strategy="fixpoint")).fit(X, y)
    assert np.array_equal(ours.coef_ != 0, true != 0)
    assert np.array_equal(theirs.coef_ != 0, true != 0)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, atol=1e-6)


def test_shapes_intercept_predict_and_warm_start():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((60, 8))
    Y = np.stack([X[:, 0] * 2 + 1, -X[:, 1] + 0.5], 1) + 0.05 * rng.standard_normal((60, 2))
    est = SpreadLq(0.05, penalty="L1/2").fit(X, Y)
    assert est.coef_.shape == (2, 8) and est.intercept_.shape == (2,)
    assert est.predict(X).shape == (60, 2) and est.score(X, Y) > 0.99
    assert (est.coef_ != 0).sum(1).tolist() == [1, 1]
    np.testing.assert_allclose(est.intercept_, [1, 0.5], atol=0.05)
    one = SpreadLq(0.05).fit(X, Y[:, 0])
    assert one.coef_.shape == (8,) and isinstance(one.intercept_, float)
    # a warm start from the solution stops at once
    warm = SpreadLq(0.05, penalty="L1/2", warm_start=True).fit(X, Y)
    steps = warm.n_iter_
    warm.fit(X, Y)
    assert warm.n_iter_ <= 1 < steps or warm.n_iter_ < steps


def test_parameters_are_checked():
    X, y = np.ones((5, 2)), np.arange(5.0)
    with pytest.raises(ValueError, match="'penalty' parameter of SpreadLq must be one of"):
        SpreadLq(penalty="L3").fit(X, y)
    with pytest.raises(ValueError, match="'alpha' parameter of SpreadLq must be a finite float > 0"):
        SpreadLq(alpha=0.0).fit(X, y)
    assert spread_optim.SpreadLq is SpreadLq
    from spread_optim import linear

    assert linear.SpreadLq is SpreadLq
    assert SpreadLq().get_params()["penalty"] == "L2/3"
