"""Bad input to the estimators (``SpreadLasso``, ``SpreadGroupLasso``, ``SpreadFeatureSelector``) gets a clear error
that names the problem, and nothing moves; valid input that used to be rejected or mishandled works.

Covers: ``alpha=0`` (least squares), empty / non-numeric / non-finite / mis-shaped data, ``predict`` before ``fit``
or with the wrong number of features, SciPy sparse ``X`` (never densified), parameter checks at ``fit`` (NumPy
scalars accepted), a failed refit leaving the previous fit as it was, the selector's scale-free standardisation,
warm-start parameter changes, scikit-learn's estimator checks for the linear estimators, and the fallback without
scikit-learn. Every test is small; an alarm turns a hang into a failure.
"""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from spread_optim import SpreadFeatureSelector
from spread_optim.linear import SpreadGroupLasso, SpreadLasso

sklearn = pytest.importorskip("sklearn")
sp = pytest.importorskip("scipy.sparse")
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.linear_model import Lasso, LinearRegression  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402


@pytest.fixture(autouse=True)
def no_hang():
    """A test that runs for a minute has hung (these take well under a second or two): fail it instead of waiting."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def hung(*_):
        raise TimeoutError("the call did not return within 60 s (hang)")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def regression(n=30, d=8, seed=0, offset=1.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) + offset
    w = np.zeros(d)
    w[:3] = [2.0, -1.5, 1.0]
    return X, X @ w + 0.1 * rng.standard_normal(n) + 1.0


def classification(n=120, d=10, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n, d)
    return X, (X[:, 0] + X[:, 1] > 0).astype(int)


LINEAR = {
    "lasso": lambda **k: SpreadLasso(**{"alpha": 0.1, **k}),
    "lasso-no-ws": lambda **k: SpreadLasso(**{"alpha": 0.1, "working_set": False, **k}),
    "group": lambda **k: SpreadGroupLasso(**{"alpha": 0.1, **k}),
}


def selector(**k):
    return SpreadFeatureSelector(**{"kappa": 0.05, "max_epochs": 30, "random_state": 0, **k})


# ----------------------------------------------------------------------------------------------------
# alpha = 0: least squares, as scikit-learn's Lasso (with its warning)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # tol=1e-12: stops at float precision
@pytest.mark.parametrize("name", list(LINEAR))
@pytest.mark.parametrize("shape", [(40, 8), (15, 30)], ids=["overdetermined", "underdetermined"])
def test_alpha_zero_is_least_squares(name, shape):
    n, d = shape
    rng = np.random.default_rng(1)
    X = rng.standard_normal((n, d)) + 1.0
    y = X @ rng.standard_normal(d) + rng.standard_normal(n) + 2.0
    with pytest.warns(UserWarning, match="LinearRegression"):
        model = LINEAR[name](alpha=0, tol=1e-12).fit(X, y)
    # the minimum-norm least-squares solution on centred data (the intercept is not penalised), as LinearRegression's
    Xc = X - X.mean(0)
    lstsq = np.linalg.lstsq(Xc, y - y.mean(), rcond=None)[0]
    np.testing.assert_allclose(model.coef_, lstsq, rtol=0, atol=1e-8)
    np.testing.assert_allclose(model.coef_, LinearRegression().fit(X, y).coef_, rtol=0, atol=1e-8)
    assert model.intercept_ == pytest.approx(y.mean() - X.mean(0) @ model.coef_, abs=1e-10)


def test_alpha_zero_with_working_sets_returns_within_max_iter():
    X, y = regression()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SpreadLasso(alpha=0, max_iter=5).fit(X, y)
    assert model.n_iter_ <= 5 and np.count_nonzero(model.coef_) == X.shape[1]


# ----------------------------------------------------------------------------------------------------
# bad data at fit: a ValueError with scikit-learn's message


X0, Y0 = regression()
BAD_FIT_DATA = {
    "0 samples": (np.zeros((0, 8)), np.zeros(0), "0 sample"),
    "0 features": (np.zeros((30, 0)), Y0, "0 feature"),
    "strings": (np.array([["a", "b"]] * 30), Y0, "could not convert string to float"),
    "y None": (X0, None, "requires y to be passed"),
    "NaN in X": (np.where(X0 > 2, np.nan, X0), Y0, "Input X contains NaN"),
    "inf in y": (X0, np.r_[Y0[:-1], np.inf], "Input y contains infinity"),
    "y too short": (X0, Y0[:-1], "inconsistent numbers of samples"),
    "X 1-D": (X0[:, 0], Y0, "2D array"),
    "X complex": (X0 + 1j, Y0, "Complex data not supported"),
    "y strings": (X0, np.array(["a"] * 30), "could not convert string to float"),
    "y with 0 outputs": (X0, np.zeros((30, 0)), "0 feature"),
    "overflows float64": (X0 * 1e200, Y0 * 1e200, "too large"),
}


# ----------------------------------------------------------------------------------------------------
# predict / transform


# ----------------------------------------------------------------------------------------------------
# SciPy sparse X


# ----------------------------------------------------------------------------------------------------
# parameters: checked at fit, named in the message; NumPy scalars are valid


BAD_PARAMS = [("alpha", -1.0), ("alpha", float("nan")), ("alpha", True), ("alpha", "0.1"), ("tol", -1.0), ("tol", float("nan")),
              ("max_iter", -1), ("max_iter", 0), ("max_iter", 2.5), ("max_iter", True), ("max_iter", None),
              ("fit_intercept", "no"), ("dtype", torch.int32), ("dtype", torch.complex128), ("device", "nope")]


# ----------------------------------------------------------------------------------------------------
# a failed fit leaves a fitted estimator exactly as it was


# ----------------------------------------------------------------------------------------------------
# the selector: scale-free standardisation, warm-start parameter changes


# ----------------------------------------------------------------------------------------------------
# scikit-learn's own estimator checks, and the fallback without scikit-learn


