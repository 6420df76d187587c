"""``SpreadFeatureSelector``: recovery of planted features, the group-lasso optimality conditions (autograd of
the objective as the oracle), scikit-learn's estimator checks, pipelines, selection rules, determinism, errors."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from spread_optim import SpreadFeatureSelector

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

PLANTED = [0, 1, 2, 3, 4]


def planted_data(n: int, d: int = 200, seed: int = 0):
    """5 informative features among ``d``; 3 classes from a nonlinear score of them, the rest noise."""
    rng = np.random.RandomState(seed)
    X = rng.randn(n, d)
    s = (np.sin(1.5 * X[:, 0]) + np.sin(1.5 * X[:, 1]) + np.tanh(2 * X[:, 2]) - np.tanh(2 * X[:, 3])
         + 0.5 * X[:, 4] * np.abs(X[:, 4]))
    return X, np.digitize(s, [-0.8, 0.8])


@pytest.fixture(scope="module")
def data():
    return planted_data(300)


@pytest.fixture(scope="module")
def fitted_linear(data):
    X, y = data
    return SpreadFeatureSelector(kappa=0.05, max_epochs=300, random_state=0).fit(X, y)


@pytest.fixture(scope="module")
def fitted_ensemble(data):
    X, y = data
    return SpreadFeatureSelector(kappa=0.1, hidden_sizes=(32,), max_epochs=300, random_state=0).fit(X, y)


# ----------------------------------------------------------------------------------------------------
# what it selects


@pytest.mark.parametrize("which", ["fitted_linear", "fitted_ensemble"])
def test_recovers_planted_features(which, request, data):
    sel = request.getfixturevalue(which)
    X, _ = data
    top5 = np.argsort(-sel.feature_importances_)[:5]
    assert sorted(top5.tolist()) == PLANTED
    support = sel.get_support()
    assert support[PLANTED].all()
    assert support.sum() <= 15, support.sum()  # a few noise features at most, out of 195
    assert sel.n_selected_features_ == support.sum()
    # exact zeros: a dropped feature has an exactly zero column in every first layer, a kept one is used by all
    for layer in sel.model_.first_layers():
        W = layer.weight.detach().numpy()
        assert (W[:, ~support] == 0).all()
        assert (np.abs(W[:, support]).sum(0) > 0).all()
    # the selector's own classifier generalises above chance (3 balanced-ish classes)
    X_test, y_test = planted_data(2000, seed=1)
    assert sel.score(X_test, y_test) > 0.6


@pytest.mark.parametrize("working_set", [False, True])
def test_group_lasso_optimality_conditions(data, working_set):
    """At the end of a full-batch fit of the linear model, the KKT conditions of
    ``CE(X A^T + a) + 2*kappa*sum_j ||A[:, j]||`` hold, with the gradient from autograd of the plain loss (with a
    working set: for every feature, also those the optimizer never saw)."""
    X, y = data
    kappa = 0.05
    sel = SpreadFeatureSelector(kappa=kappa, lr=5e-3, max_epochs=800, random_state=0, working_set=working_set).fit(X, y)
    Xs = torch.tensor((X - X.mean(0)) / X.std(0), dtype=torch.float64)
    A = torch.tensor(sel.model_.linear.weight.detach().numpy(), dtype=torch.float64, requires_grad=True)
    a = torch.tensor(sel.model_.linear.bias.detach().numpy(), dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(Xs @ A.T + a, torch.tensor(y))
    gA, ga = torch.autograd.grad(loss, [A, a])
    norms = A.detach().norm(dim=0)
    zero, live = norms == 0, norms > 0
    assert zero.sum() > 150 and live.sum() >= 5
    # zero columns: ||g_j|| <= 2*kappa; nonzero columns: g_j + 2*kappa*A_j/||A_j|| = 0; the bias: g = 0
    assert float(gA[:, zero].norm(dim=0).max()) <= 2 * kappa * 1.05
    residual = (gA[:, live] + 2 * kappa * A.detach()[:, live] / norms[live]).norm(dim=0)
    assert float(residual.max()) < 0.1 * 2 * kappa, residual
    assert float(ga.abs().max()) < 1e-2
    # and it is a classifier on top: its importances are the columns' norms
    np.testing.assert_allclose(sel.feature_importances_, norms.numpy(), rtol=1e-6)


def test_kappa_orders_the_selection(data):
    X, y = data
    counts = [SpreadFeatureSelector(kappa=k, max_epochs=200, random_state=0).fit(X, y).n_selected_features_
              for k in (0.01, 0.05, 0.2)]
    assert counts[0] > counts[1] > counts[2], counts
    assert counts[0] > 20 and counts[2] < 5, counts


def test_minibatches(data):
    X, y = data
    # noisy gradients: few exact zeros (see the README's mini-batch note), but the ranking is right
    sel = SpreadFeatureSelector(kappa=0.03, batch_size=64, lr=1e-2, max_epochs=60, random_state=0).fit(X, y)
    assert sorted(np.argsort(-sel.feature_importances_)[:5].tolist()) == PLANTED
    assert len(sel.loss_curve_) == 60 and sel.loss_curve_[-1] < sel.loss_curve_[0] - 0.1


# ----------------------------------------------------------------------------------------------------
# the selector API


def test_get_support_and_transform(fitted_ensemble, data):
    X, _ = data
    sel = fitted_ensemble
    imp = sel.feature_importances_
    assert imp.shape == (X.shape[1],) and (imp >= 0).all()
    np.testing.assert_array_equal(sel.get_support(), imp > 0)
    np.testing.assert_array_equal(sel.get_support(indices=True), np.flatnonzero(imp > 0))
    Xt = sel.transform(X)
    assert Xt.shape == (X.shape[0], int((imp > 0).sum()))
    np.testing.assert_array_equal(Xt, X[:, imp > 0])
    back = sel.inverse_transform(Xt)
    np.testing.assert_array_equal(back[:, imp > 0], Xt)
    assert (back[:, imp == 0] == 0).all()


@pytest.mark.parametrize("k", [1, 3, 5, 12])
def test_n_features_to_select(fitted_linear, data, k):
    X, y = data
    sel = clone(fitted_linear).set_params(n_features_to_select=k)
    if k > fitted_linear.n_selected_features_:
        with pytest.warns(UserWarning, match="fewer than n_features_to_select"):
            sel.fit(X, y)
    else:
        sel.fit(X, y)
    support = sel.get_support()
    assert support.sum() == k
    imp = sel.feature_importances_
    assert imp[support].min() >= imp[~support].max()
    np.testing.assert_array_equal(imp, fitted_linear.feature_importances_)  # k changes the rule, not the fit
    assert sel.transform(X).shape == (X.shape[0], k)
    if k <= 5:
        assert set(np.flatnonzero(support)) <= set(PLANTED)


def test_pipeline_after_standard_scaler(data):
    X, y = data
    X = X * np.linspace(0.1, 10, X.shape[1]) + 3.0  # features on different scales
    X_test, y_test = planted_data(1000, seed=1)
    X_test = X_test * np.linspace(0.1, 10, X.shape[1]) + 3.0
    pipe = make_pipeline(StandardScaler(), SpreadFeatureSelector(kappa=0.05, standardize=False, random_state=0),
                         LogisticRegression())
    pipe.fit(X, y)
    sel = pipe[1]
    assert set(PLANTED) <= set(sel.get_support(indices=True))
    assert pipe.score(X_test, y_test) > 0.6
    assert pipe[:2].transform(X_test).shape == (len(X_test), sel.n_selected_features_)
    # standardize=True inside the selector is the same standardisation as the pipeline's StandardScaler
    inner = SpreadFeatureSelector(kappa=0.05, random_state=0).fit(X, y)
    np.testing.assert_array_equal(inner.get_support(), sel.get_support())
    np.testing.assert_allclose(inner.feature_importances_, sel.feature_importances_, rtol=1e-3, atol=1e-5)
    # ...and it matters: without standardisation the large-scale noise features are the cheap ones to keep
    raw = SpreadFeatureSelector(kappa=0.05, standardize=False, random_state=0).fit(X, y)
    assert not np.array_equal(raw.get_support(), sel.get_support())


def test_random_state_determinism(data):
    X, y = data
    params = dict(kappa=0.1, hidden_sizes=(16,), batch_size=100, max_epochs=30)
    a = SpreadFeatureSelector(random_state=3, **params).fit(X, y)
    b = SpreadFeatureSelector(random_state=3, **params).fit(X, y)
    c = SpreadFeatureSelector(random_state=4, **params).fit(X, y)
    np.testing.assert_array_equal(a.feature_importances_, b.feature_importances_)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert not np.array_equal(a.feature_importances_, c.feature_importances_)
    # a RandomState instance is accepted (scikit-learn's convention); the global torch RNG is not used
    torch.manual_seed(123)
    d = SpreadFeatureSelector(random_state=np.random.RandomState(0), **params).fit(X, y)
    torch.manual_seed(456)
    e = SpreadFeatureSelector(random_state=np.random.RandomState(0), **params).fit(X, y)
    np.testing.assert_array_equal(d.feature_importances_, e.feature_importances_)


def test_warm_start_continues(data):
    X, y = data
    params = dict(kappa=0.1, hidden_sizes=(8,), batch_size=128, random_state=0)
    full = SpreadFeatureSelector(max_epochs=40, **params).fit(X, y)
    warm = SpreadFeatureSelector(max_epochs=25, warm_start=True, **params).fit(X, y)
    warm.set_params(max_epochs=15).fit(X, y)
    assert warm.n_iter_ == full.n_iter_ == 40
    np.testing.assert_array_equal(warm.feature_importances_, full.feature_importances_)
    cold = SpreadFeatureSelector(max_epochs=25, **params).fit(X, y)
    cold.set_params(max_epochs=15).fit(X, y)  # warm_start=False: a fresh fit of 15 epochs
    assert cold.n_iter_ == 15


def test_working_set(data):
    """``working_set=True``: the ensemble finds the planted features, ends with exact zeros outside the set and no
    violated optimality condition among them (autograd of the full loss), continues under warm_start, pickles and
    is deterministic."""
    X, y = data
    params = dict(kappa=0.1, hidden_sizes=(32,), max_epochs=300, random_state=0, working_set=True)
    sel = SpreadFeatureSelector(**params).fit(X, y)
    assert sorted(np.argsort(-sel.feature_importances_)[:5].tolist()) == PLANTED
    assert sel.n_selected_features_ <= 15 and sel.n_iter_ == len(sel.loss_curve_) == 300
    active = sel._ws[0].numpy()
    assert active.size < X.shape[1]  # the optimizer never saw every feature
    outside = np.setdiff1d(np.arange(X.shape[1]), active)
    assert (sel.feature_importances_[outside] == 0).all()
    Xs = torch.tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32)
    model = sel.model_
    weights = [layer.weight for layer in model.first_layers()]
    loss = sum(torch.nn.functional.cross_entropy(out, torch.tensor(y)) for out in model(Xs))
    grads = torch.autograd.grad(loss, weights)
    gnorm = torch.sqrt(sum(g.pow(2).sum(0) for g in grads)).numpy()
    assert gnorm[outside].max() <= 2 * 0.1 * 1.1, gnorm[outside].max()
    X_test, y_test = planted_data(2000, seed=1)
    assert sel.score(X_test, y_test) > 0.6
    again = SpreadFeatureSelector(**params).fit(X, y)
    np.testing.assert_array_equal(again.feature_importances_, sel.feature_importances_)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(sel)).predict_proba(X), sel.predict_proba(X))
    warm = SpreadFeatureSelector(**{**params, "max_epochs": 150, "warm_start": True}).fit(X, y)
    warm.fit(X, y)
    assert warm.n_iter_ == 300
    assert sorted(np.argsort(-warm.feature_importances_)[:5].tolist()) == PLANTED


@pytest.mark.parametrize("hidden", [(), (8,), (8, 4)])
def test_working_set_stacked_model(data, hidden):
    """The working set's model stacks the ensemble's first layers into one tensor: on the working set's columns it
    computes the full model's logits, its first layer's columns are the shared groups, and it writes back into the
    full model exactly."""
    from spread_optim.feature_selection import _Stacked

    X, y = data
    sel = SpreadFeatureSelector(kappa=0.05, hidden_sizes=hidden, max_epochs=50, random_state=0, working_set=True).fit(X, y)
    active, sub, _ = sel._ws
    model = sel.model_
    Xs = torch.tensor((X - sel.mean_) / sel.scale_, dtype=torch.float32)
    with torch.no_grad():
        for a, b in zip(model(Xs), sub(Xs[:, active])):
            torch.testing.assert_close(a, b)
        norms = torch.sqrt(sum(layer.weight.pow(2).sum(0) for layer in model.first_layers()))
        torch.testing.assert_close(norms[active], sub.first.weight.norm(dim=0))
        fresh = _Stacked(model, active)  # a rebuild starts from the full model: the same stacked weights
        torch.testing.assert_close(fresh.first.weight, sub.first.weight)
        torch.testing.assert_close(fresh.first.bias, sub.first.bias)
        sub.first.weight.add_(1.0)
        sub.write_back(model, active)
        torch.testing.assert_close(_Stacked(model, active).first.weight, sub.first.weight)


def test_predict_and_pickle(fitted_ensemble, data):
    X, y = data
    proba = fitted_ensemble.predict_proba(X)
    assert proba.shape == (len(X), 3)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-6)
    labels = np.array(["a", "b", "c"])[y]
    sel = SpreadFeatureSelector(kappa=0.05, max_epochs=50, random_state=0).fit(X, labels)
    assert set(sel.predict(X)) <= {"a", "b", "c"}
    assert sel.score(X, labels) == np.mean(sel.predict(X) == labels)
    again = pickle.loads(pickle.dumps(fitted_ensemble))
    np.testing.assert_array_equal(again.predict_proba(X), proba)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(kappa=-1.0), "kappa"), (dict(kappa=float("nan")), "kappa"), (dict(lr=0.0), "lr"),
        (dict(max_epochs=0), "max_epochs"), (dict(batch_size=0), "batch_size"), (dict(hidden_sizes=(0,)), "hidden_sizes"),
        (dict(hidden_sizes="abc"), "hidden_sizes"), (dict(n_features_to_select=0), "n_features_to_select"),
        (dict(n_features_to_select=2.5), "n_features_to_select"), (dict(n_features_to_select=201), "larger than the number of features"),
        (dict(weight_decay=-1), "weight_decay"), (dict(random_state="x"), "random_state"),
        (dict(working_set=1), "working_set"), (dict(working_set=True, batch_size=32), "working_set"),
    ],
)
def test_bad_parameters(data, params, match):
    X, y = data
    with pytest.raises(ValueError, match=match):
        SpreadFeatureSelector(max_epochs=params.pop("max_epochs", 2), **params).fit(X, y)


def test_bad_input(fitted_linear, data):
    X, y = data
    sel = SpreadFeatureSelector(max_epochs=2)
    with pytest.raises(ValueError, match="1 class"):
        sel.fit(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="[Uu]nknown label type"):
        sel.fit(X, np.linspace(0, 1, len(X)))
    Xn = X.copy()
    Xn[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sel.fit(Xn, y)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        sel.fit(X, y[:-1])
    with pytest.raises(ValueError, match="expecting 200 features"):
        fitted_linear.transform(X[:, :10])
    with pytest.raises(NotFittedError):
        SpreadFeatureSelector().transform(X)
    with pytest.raises(NotFittedError):
        SpreadFeatureSelector().get_support()
    warm = SpreadFeatureSelector(max_epochs=2, warm_start=True).fit(X, y)
    with pytest.raises(ValueError, match="warm_start"):
        warm.fit(X, (y + 1) % 4)


# ----------------------------------------------------------------------------------------------------
# scikit-learn's estimator checks: all of them pass (none is expected to fail)


@parametrize_with_checks([SpreadFeatureSelector(max_epochs=20, random_state=0),
                          SpreadFeatureSelector(hidden_sizes=(8,), max_epochs=10, batch_size=16, random_state=0)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_works_without_sklearn(tmp_path):
    """scikit-learn is a test dependency only: with it blocked the module imports and the selector works."""
    code = textwrap.dedent("""
        import sys
        sys.modules["sklearn"] = None  # any import of scikit-learn fails
        import numpy as np, torch
        torch.set_num_threads(1)
        from spread_optim import SpreadFeatureSelector
        from spread_optim import feature_selection
        assert not feature_selection.HAS_SKLEARN
        rng = np.random.RandomState(0)
        X = rng.randn(100, 30)
        y = (X[:, 0] + X[:, 1] > 0).astype(int)
        sel = SpreadFeatureSelector(kappa=0.05, max_epochs=100, random_state=0).fit(X, y)
        assert sel.get_params()["kappa"] == 0.05
        assert sel.set_params(n_features_to_select=2) is sel
        assert sorted(sel.get_support(indices=True).tolist()) == [0, 1], sel.feature_importances_
        assert sel.transform(X).shape == (100, 2) and sel.fit_transform(X, y).shape == (100, 2)
        assert sel.inverse_transform(sel.transform(X)).shape == X.shape
        try:
            sel.transform(X[:, :3])
        except ValueError as e:
            assert "expecting 30 features" in str(e)
        else:
            raise AssertionError("no error")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
