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


@pytest.mark.parametrize("name", list(LINEAR))
@pytest.mark.parametrize("case", list(BAD_FIT_DATA))
def test_bad_fit_data_linear(name, case):
    X, y, match = BAD_FIT_DATA[case]
    with pytest.raises(ValueError, match=match):
        LINEAR[name]().fit(X, y)


@pytest.mark.parametrize("name", list(LINEAR))
def test_float32_overflow_and_torch_sparse(name):
    X, y = regression()
    with pytest.raises(ValueError, match="too large for torch.float32"):
        LINEAR[name](dtype=torch.float32).fit(X * 1e30, y * 1e30)
    with pytest.raises(TypeError, match="torch sparse tensors"):
        LINEAR[name]().fit(torch.from_numpy(X).to_sparse(), y)


@pytest.mark.parametrize("name", list(LINEAR))
def test_tensor_that_requires_grad(name):
    """A tensor that requires grad is data: the fit neither fails nor writes into its ``.grad``."""
    X, y = regression()
    Xt = torch.from_numpy(X.copy()).requires_grad_(True)
    model = LINEAR[name]().fit(Xt, torch.from_numpy(y))
    assert Xt.grad is None
    np.testing.assert_array_equal(model.coef_, LINEAR[name]().fit(X, y).coef_)


@pytest.mark.parametrize(
    "X, y, match",
    [
        (np.zeros((0, 10)), np.zeros(0), "0 sample"),
        (classification()[0], None, "requires y to be passed"),
        (classification()[0], np.zeros(120), "1 class"),
        (classification()[0], np.where(classification()[1] > 0, np.nan, 0.0), "Input y contains NaN"),
    ],
)
def test_bad_fit_data_selector(X, y, match):
    with pytest.raises(ValueError, match=match):
        selector().fit(X, y)


# ----------------------------------------------------------------------------------------------------
# predict / transform


@pytest.mark.parametrize("name", list(LINEAR))
def test_predict_checks(name):
    X, y = regression()
    with pytest.raises(NotFittedError):
        LINEAR[name]().predict(X)
    with pytest.raises(NotFittedError):
        LINEAR[name]().score(X, y)
    model = LINEAR[name]().fit(X, y)
    with pytest.raises(ValueError, match="X has 5 features, but Spread.*Lasso is expecting 8 features"):
        model.predict(X[:, :5])
    with pytest.raises(ValueError, match="Input X contains NaN"):
        model.predict(np.full((2, 8), np.nan))
    with pytest.raises(ValueError, match="2D array"):
        model.predict(X[0])
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        model.score(X, y[:-1])


def test_selector_predict_checks():
    X, y = classification()
    sel = selector().fit(X, y)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        sel.score(X, y[:-1])
    with pytest.raises(ValueError, match="float32"):  # the model's input would be inf: not NaN probabilities
        sel.predict_proba(X[:3] * 1e40)
    with pytest.raises(ValueError, match="float32"):
        selector(standardize=False).fit(X * 1e300, y)


# ----------------------------------------------------------------------------------------------------
# SciPy sparse X


class NeverDense(sp.csr_matrix):
    """A CSR matrix that fails if anything turns it into a dense array."""

    def toarray(self, *args, **kwargs):
        raise AssertionError("X was densified")

    todense = toarray

    def __array__(self, *args, **kwargs):
        raise AssertionError("X was densified")


@pytest.mark.parametrize("name", list(LINEAR))
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_X_matches_dense(name, fit_intercept, fmt):
    rng = np.random.default_rng(2)
    X = sp.random(60, 40, density=0.25, format="csr", random_state=3).toarray()
    X[:, :3] += 1.0  # nonzero means: the implicit centring matters
    Y = X[:, :6] @ rng.standard_normal((6, 2)) + 0.1 * rng.standard_normal((60, 2)) + 2.0
    y = Y[:, 0] if name == "lasso" else Y
    dense = LINEAR[name](alpha=0.05, tol=1e-7, fit_intercept=fit_intercept).fit(X, y)
    sparse = LINEAR[name](alpha=0.05, tol=1e-7, fit_intercept=fit_intercept).fit(sp.csr_matrix(X).asformat(fmt), y)
    np.testing.assert_allclose(sparse.coef_, dense.coef_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sparse.intercept_, dense.intercept_, rtol=0, atol=1e-6)
    assert np.array_equal(sparse.coef_ != 0, dense.coef_ != 0)
    np.testing.assert_allclose(sparse.predict(sp.csc_matrix(X)), sparse.predict(X), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sparse.predict(sp.csr_matrix(X)), dense.predict(X), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(LINEAR))
def test_sparse_X_is_never_densified(name):
    X = sp.random(50, 300, density=0.05, format="csr", random_state=4)
    y = np.asarray(X[:, :4] @ np.array([3.0, -2.0, 2.0, 1.0])).ravel() + 1.0
    model = LINEAR[name](alpha=0.01).fit(NeverDense(X), y)
    assert 0 < np.count_nonzero(model.coef_) < 300
    assert model.predict(NeverDense(X)).shape == (50,)
    ref = Lasso(alpha=0.01, tol=1e-12, max_iter=10**5).fit(X, y)
    np.testing.assert_allclose(model.coef_, ref.coef_, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# parameters: checked at fit, named in the message; NumPy scalars are valid


BAD_PARAMS = [("alpha", -1.0), ("alpha", float("nan")), ("alpha", True), ("alpha", "0.1"), ("tol", -1.0), ("tol", float("nan")),
              ("max_iter", -1), ("max_iter", 0), ("max_iter", 2.5), ("max_iter", True), ("max_iter", None),
              ("fit_intercept", "no"), ("dtype", torch.int32), ("dtype", torch.complex128), ("device", "nope")]


@pytest.mark.parametrize("name", list(LINEAR))
@pytest.mark.parametrize("param, value", BAD_PARAMS, ids=[f"{p}={v!r}" for p, v in BAD_PARAMS])
def test_bad_params_linear(name, param, value):
    X, y = regression()
    with pytest.raises(ValueError, match=f"'{param}' parameter"):
        LINEAR[name](**{param: value}).fit(X, y)


@pytest.mark.parametrize("value", ["no", 0])
def test_working_set_must_be_bool(value):
    X, y = regression()
    with pytest.raises(ValueError, match="'working_set' parameter"):
        SpreadLasso(working_set=value).fit(X, y)


@pytest.mark.parametrize("name", list(LINEAR))
def test_numpy_scalars_are_valid_params(name):
    X, y = regression()
    plain = LINEAR[name](alpha=float(np.float32(0.1)), tol=float(np.float32(1e-5)), max_iter=100, fit_intercept=False).fit(X, y)
    numpy = LINEAR[name](alpha=np.float32(0.1), tol=np.float32(1e-5), max_iter=np.int64(100), fit_intercept=np.bool_(False)).fit(X, y)
    np.testing.assert_array_equal(numpy.coef_, plain.coef_)
    for dtype in ("float64", np.float64):  # NumPy's names of torch.float64
        np.testing.assert_array_equal(LINEAR[name](dtype=dtype).fit(X, y).coef_, LINEAR[name]().fit(X, y).coef_)


@pytest.mark.parametrize("groups", [np.repeat([0.0, 1.0], 4), -np.ones(8, int), np.arange(5), np.array(list("aabbccdd")),
                                    np.repeat([True, False], 4)])
def test_bad_groups(groups):
    X, y = regression()
    with pytest.raises(ValueError, match="'groups' parameter"):
        SpreadGroupLasso(alpha=0.1, groups=groups).fit(X, y)


def test_group_ids_need_not_be_contiguous():
    X, y = regression()
    contiguous = SpreadGroupLasso(alpha=0.1, groups=[0, 0, 0, 0, 1, 1, 1, 2]).fit(X, y)
    huge = SpreadGroupLasso(alpha=0.1, groups=[3, 3, 3, 3, 7, 7, 7, 10**12]).fit(X, y)  # no 10**12-long buffer
    np.testing.assert_array_equal(huge.coef_, contiguous.coef_)


@pytest.mark.parametrize("param, value", [("warm_start", "no"), ("warm_start", None), ("standardize", 1), ("kappa", True),
                                          ("max_epochs", 5.0), ("lr", np.inf)])
def test_bad_params_selector(param, value):
    X, y = classification()
    with pytest.raises(ValueError, match=param):
        selector(**{param: value}).fit(X, y)


def test_numpy_scalars_are_valid_selector_params():
    X, y = classification()
    plain = selector(kappa=float(np.float32(0.05)), max_epochs=20, batch_size=32, n_features_to_select=2).fit(X, y)
    numpy = selector(kappa=np.float32(0.05), max_epochs=np.int64(20), batch_size=np.int64(32), n_features_to_select=np.int64(2),
                     warm_start=np.bool_(False), standardize=np.bool_(True)).fit(X, y)
    np.testing.assert_array_equal(numpy.feature_importances_, plain.feature_importances_)


# ----------------------------------------------------------------------------------------------------
# a failed fit leaves a fitted estimator exactly as it was


def fitted_state(est) -> dict:
    return {k: copy.deepcopy(v) for k, v in vars(est).items() if k.endswith("_") and not k.startswith("_")}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.nn.Module):
            for (n1, p1), (n2, p2) in zip(a[k].state_dict().items(), b[k].state_dict().items()):
                assert n1 == n2 and torch.equal(p1, p2), (k, n1)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("name", list(LINEAR))
def test_failed_refit_keeps_the_previous_fit_linear(name):
    pd = pytest.importorskip("pandas")
    X, y = regression()
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(8)])
    est = LINEAR[name]().fit(frame, y)
    before, prediction = fitted_state(est), est.predict(frame)
    assert "feature_names_in_" in before
    failures = [
        lambda: est.fit(np.where(X > 2, np.nan, X)[:, :5], y),  # new width, bad values
        lambda: est.fit(X[:, :5], None),
        lambda: est.fit(X[:0, :5], y[:0]),
        lambda: est.fit(X[:, :5], y[:-1]),
        lambda: est.set_params(tol=-1.0).fit(X[:, :5], y),
    ]
    if name == "group":
        failures.append(lambda: est.set_params(tol=1e-6, groups=np.arange(3)).fit(X[:, :5], y))
    for fail in failures:
        with pytest.raises(ValueError):
            fail()
        assert_same_state(fitted_state(est), before)
    np.testing.assert_array_equal(est.predict(frame), prediction)


def test_failed_refit_keeps_the_previous_fit_selector():
    X, y = classification()
    sel = selector(n_features_to_select=2).fit(X, y)
    before, support = fitted_state(sel), sel.get_support()
    failures = [
        lambda: sel.fit(X[:, :4], np.zeros(len(X))),  # new width, one class
        lambda: sel.fit(np.where(X > 2, np.nan, X), y),
        lambda: sel.set_params(n_features_to_select=50).fit(X[:, :6], y),  # more than the 6 features
    ]
    for fail in failures:
        with pytest.raises(ValueError):
            fail()
        sel.set_params(n_features_to_select=2)
        assert_same_state(fitted_state(sel), before)
        np.testing.assert_array_equal(sel.get_support(), support)


# ----------------------------------------------------------------------------------------------------
# the selector: scale-free standardisation, warm-start parameter changes


def test_selector_standardisation_is_scale_free():
    """Features in tiny or huge units (1e-14, 1e300) are standardised as in unit scale: the same selection."""
    X, y = classification()
    X[:, 9] = 5.0  # a constant feature stays out in any units
    ref = selector(max_epochs=100).fit(X, y)
    assert ref.get_support(indices=True).tolist() == [0, 1]
    for scale in (1e-14, 1e300):
        sel = selector(max_epochs=100).fit(X * scale, y)
        np.testing.assert_array_equal(sel.get_support(), ref.get_support())
        np.testing.assert_allclose(sel.feature_importances_, ref.feature_importances_, rtol=1e-4)
        np.testing.assert_allclose(sel.mean_ / scale, ref.mean_, rtol=1e-12)


def test_selector_warm_start_follows_parameter_changes():
    X, y = classification()
    sel = selector(kappa=0.2, warm_start=True, hidden_sizes=(4,)).fit(X, y)
    few = sel.n_selected_features_
    sel.set_params(kappa=0.0, weight_decay=0.5).fit(X, y)  # no penalty: every feature revives
    assert sel.n_selected_features_ > few
    decay = [g["weight_decay"] for g in sel._optimizer.param_groups[1:] if any(p.dim() > 1 for p in g["params"])]
    assert decay == [0.5]
    with pytest.raises(ValueError, match="standardize"):
        sel.set_params(standardize=False).fit(X, y)


# ----------------------------------------------------------------------------------------------------
# scikit-learn's own estimator checks, and the fallback without scikit-learn


@parametrize_with_checks(
    [SpreadLasso(alpha=0.1), SpreadLasso(alpha=0.1, working_set=False), SpreadGroupLasso(alpha=0.1)],
    expected_failed_checks=lambda est: {
        "check_parameters_default_constructible": "the default dtype=torch.float64 is not a type scikit-learn lists",
    },
)
def test_sklearn_compatible_linear(estimator, check):
    check(estimator)


def test_linear_without_sklearn():
    code = textwrap.dedent("""
        import sys
        sys.modules["sklearn"] = None  # any import of scikit-learn fails
        import warnings
        import numpy as np, scipy.sparse as sp, torch
        torch.set_num_threads(1)
        from spread_optim import _estimator_base as base
        from spread_optim.linear import SpreadLasso, SpreadGroupLasso
        assert not base.HAS_SKLEARN
        rng = np.random.default_rng(0)
        X = rng.standard_normal((40, 6)) + 1
        y = X[:, 0] * 2 - X[:, 1] + 0.1 * rng.standard_normal(40)
        def fails(call, error, text):
            try:
                call()
            except error as e:
                assert text in str(e), str(e)
            else:
                raise AssertionError(f"no {error.__name__}: {text}")
        fails(lambda: SpreadLasso().predict(X), base.NotFittedError, "not fitted yet")
        assert issubclass(base.NotFittedError, ValueError) and issubclass(base.NotFittedError, AttributeError)
        m = SpreadLasso(alpha=0.05).fit(X, y)
        assert np.count_nonzero(m.coef_) >= 2 and m.score(X, y) > 0.9
        fails(lambda: m.predict(X[:, :3]), ValueError, "X has 3 features, but SpreadLasso is expecting 6")
        fails(lambda: SpreadLasso().fit(X[:0], y[:0]), ValueError, "0 sample")
        fails(lambda: SpreadLasso().fit(X, None), ValueError, "requires y")
        fails(lambda: SpreadLasso().fit(np.where(X > 2, np.nan, X), y), ValueError, "Input X contains NaN")
        fails(lambda: SpreadLasso().fit(X, y[:-1]), ValueError, "inconsistent numbers of samples")
        fails(lambda: SpreadLasso(tol=-1).fit(X, y), ValueError, "'tol' parameter")
        fails(lambda: SpreadGroupLasso(max_iter=1.5).fit(X, y), ValueError, "'max_iter' parameter")
        s = SpreadLasso(alpha=0.05).fit(sp.csr_matrix(X), y)
        assert np.abs(s.coef_ - m.coef_).max() < 1e-5 and np.abs(s.predict(sp.csc_matrix(X)) - m.predict(X)).max() < 1e-5
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ls = SpreadLasso(alpha=0, tol=1e-12).fit(X, y)
        assert any("LinearRegression" in str(x.message) for x in w)
        Xc = X - X.mean(0)
        assert np.abs(ls.coef_ - np.linalg.lstsq(Xc, y - y.mean(), rcond=None)[0]).max() < 1e-8
        before = ls.coef_.copy()
        fails(lambda: ls.set_params(alpha=-1).fit(X, y), ValueError, "'alpha' parameter")
        assert np.array_equal(ls.coef_, before)
        print("ok")
    """)
    root = Path(__file__).resolve().parent.parent  # this checkout's spread_optim first on the path
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
