r"""scikit-learn-style lasso and group lasso, fitted by spread (:class:`~spread_optim.SpreadOptimizer`).

The objectives are scikit-learn's, for ``X`` of shape ``(n, d)`` and targets ``Y`` of shape ``(n,)`` or
``(n, k)`` (summed over the ``k`` outputs):

* :class:`SpreadLasso` (as ``sklearn.linear_model.Lasso``; ``k`` outputs are ``k`` independent lassos)::

      ||Y - X W - b||_F^2 / (2n)  +  alpha * ||W||_1

* :class:`SpreadGroupLasso` (``groups=None``: one group per feature across the outputs, as
  ``sklearn.linear_model.MultiTaskLasso``; ``groups`` = one id per feature: groups of features)::

      ||Y - X W - b||_F^2 / (2n)  +  alpha * sum_g ||W_g||_2

In the optimizer's convention the penalty is ``2*kappa*R(W)``: these estimators run ``SpreadOptimizer``
with ``kappa = alpha / 2``. The intercept ``b`` is not penalised: with ``fit_intercept=True`` the
columns of ``X`` and ``Y`` are centred first, as scikit-learn does.

Solver. The coefficients of all outputs are one tensor (one matrix product per evaluation) handed to
``SpreadOptimizer`` with base ``torch.optim.LBFGS`` (strong-Wolfe line search, 10 iterations per step;
spread snaps and revives exact zeros between steps). The fit stops when ``optimizer.kkt_residual()``,
the largest violation of the optimality conditions, is at most ``tol * alpha_max``, with ``alpha_max``
the smallest ``alpha`` whose solution is 0 (``max |X^T Y| / n`` for the lasso), so ``tol`` is scale
free; it is not scikit-learn's duality-gap ``tol``. A fit also stops when several steps in a row no
longer lower the smooth objective (in float64 that happens near a relative KKT residual of 1e-8 to
1e-9: the line search sees no change in the objective's value); it then warns if ``tol`` was not met.

Working sets (``SpreadLasso(working_set=True)``, the default). The optimizer runs on a few features per
output at a time: for output ``j`` the current nonzeros plus the zeros whose optimality condition
``|g_ij| <= alpha`` is violated the most (``g`` the gradient of the data term); the sets start at 10
features, at least double each round and hold at least twice the nonzeros of the widest output. After
each inner solve (to a KKT residual of ``max(tol * alpha_max, 0.1 * the largest violation outside)``) one
product ``X^T R`` checks every feature of every output, and the rounds go on until nothing violates its
condition (the outer loop of celer and skglm; the inner problems are solved by spread). The outputs' working sets are
stacked into one ``(k, m, n)`` tensor, so an evaluation costs ``O(k m n)`` instead of ``O(k d n)``.
``working_set=False`` runs the optimizer on the whole ``(d, k)`` coefficient matrix.

``alpha=0`` is ordinary least squares (with a warning, as scikit-learn's ``Lasso``): the fit runs LBFGS alone
(``kappa=0``: a dense group), stopped when the largest entry of the gradient is at most ``tol * alpha_max``.
From ``W = 0`` its iterates stay in the row space of ``X`` (centred with ``fit_intercept``), so where the
problem is underdetermined the result is the minimum-norm least-squares solution, as ``LinearRegression``'s.

Input. ``X`` is anything 2-D and numeric (NumPy, pandas, torch tensors, lists) or a SciPy sparse matrix (CSR or
CSC, as scikit-learn's ``Lasso``); it is checked as scikit-learn checks it (:mod:`spread_optim._estimator_base`)
and moved to ``dtype``/``device``. A sparse ``X`` stays sparse: the products ``X @ W`` and ``X^T R`` are torch
sparse products and ``fit_intercept`` centres it implicitly (``X - 1 mean^T`` inside the products), as
scikit-learn does. The parameters are checked at ``fit``; a ``fit`` that raises leaves the estimator as it was.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch

from spread_optim.kernels import reference as ref
from spread_optim.optimizer import SpreadOptimizer

from spread_optim._estimator_base import BaseEstimator as _Base
from spread_optim._estimator_base import ConvergenceWarning, InvalidParameterError, check_consistent_length, check_param
from spread_optim._estimator_base import as_numpy, issparse, keeps_state_on_error, validate_fit_data, validate_X

try:  # scikit-learn is optional: with it the estimators work with clone, pipelines and grid search
    from sklearn.base import RegressorMixin as _Regressor
except ImportError:  # pragma: no cover - exercised only without scikit-learn

    class _Regressor:  # type: ignore[no-redef]
        def score(self, X, y) -> float:
            """R^2 of :meth:`predict` (1 for a perfect fit of a constant ``y``, as scikit-learn's)."""
            y = np.asarray(y, dtype=float)
            pred = self.predict(X)
            check_consistent_length(y, pred)
            residual, total = ((y - pred) ** 2).sum(), ((y - y.mean(0)) ** 2).sum()
            return float(1 - residual / total) if total > 0 else float(residual == 0)


#: LBFGS iterations per optimizer step (spread snaps and revives exact zeros between steps)
INNER_ITERATIONS = 10


# ----------------------------------------------------------------------------------------------------
# the inner solve: one SpreadOptimizer on one parameter, stopped by its KKT residual


def _make_optimizer(P: torch.Tensor, kappa: float, sparsity, history_size: int) -> SpreadOptimizer:
    # tolerance_grad=0 lets a start at exact zeros pass straight to spread's KKT revival; the fit is stopped
    # by the KKT residual (or a stall), never by LBFGS's own tolerances (their defaults cap the precision)
    return SpreadOptimizer(
        [P], torch.optim.LBFGS, kappa=kappa, sparsity=sparsity, lr=1.0, max_iter=INNER_ITERATIONS,
        history_size=history_size, line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0,
    )


def _solve(
    forward: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    P0: torch.Tensor,
    kappa: float,
    sparsity,
    tol_abs: float,
    max_steps: int,
    n: int,
    history_size: int = 10,
    patience: int = 5,
):
    """Minimise ``||targets - forward(P)||^2/(2n) + 2*kappa*R(P)`` from ``P0`` with spread + LBFGS.

    Stops when ``optimizer.kkt_residual() <= tol_abs`` (``kappa=0``, least squares: the largest entry of the
    gradient, as the optimizer leaves a dense group to its base), after ``max_steps`` steps, or when ``patience``
    steps in a row did not lower the smooth objective: LBFGS's line search no longer sees a change in the
    objective's floating-point value (in float64 near a KKT residual of ``sqrt(L * f * 1e-16)``; the
    relative objective suboptimality is then ~1e-15). Returns ``(P, residuals, steps, kkt)`` with
    ``residuals = targets - forward(P)``.
    """
    P = P0.clone().requires_grad_(True)
    box: list = [None, math.inf]

    def closure():
        opt.zero_grad()
        residuals = targets - forward(P)
        loss = residuals.pow(2).sum() / (2 * n)
        if not torch.isfinite(loss):
            raise FloatingPointError("the data term became non-finite (diverging fit)")
        loss.backward()
        box[0], box[1] = residuals.detach(), float(loss.detach())
        return loss

    def residual() -> float:
        return opt.kkt_residual() if kappa > 0 else float(P.grad.abs().max()) if P.numel() else 0.0

    opt = _make_optimizer(P, kappa, sparsity, history_size)
    with torch.enable_grad():
        closure()
    kkt = residual()
    steps, best, stalled = 0, math.inf, 0
    while kkt > tol_abs and steps < max_steps and stalled < patience:
        opt.step(closure)
        steps += 1
        with torch.enable_grad():
            closure()  # gradients at the new point, for the KKT residual
        kkt = residual()
        smooth = box[1] + opt.penalty()
        stalled = stalled + 1 if smooth >= best else 0
        best = min(best, smooth)
    return P.detach(), box[0], steps, kkt


# ----------------------------------------------------------------------------------------------------
# the data on the solver's device; a sparse X stays sparse


def _to_tensor(a, name: str, dtype: torch.dtype, device) -> torch.Tensor:
    """Validated (finite) data as a tensor of ``dtype``; a clear error where the cast overflows (float32, float16)."""
    with warnings.catch_warnings():  # a read-only array (e.g. from pandas) is fine: the fit never writes into its data
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        t = torch.as_tensor(a, dtype=dtype, device=device)
    # a sum is finite unless an entry is inf/NaN (or it overflows): 20x faster than isfinite(t).all()
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise ValueError(f"{name} has values too large for {dtype} (largest |{name}| = {float(np.abs(a).max()):.3g}): "
                         "rescale it or use dtype=torch.float64")
    return t


def _sparse_tensor(rows, cols, values: torch.Tensor, shape) -> torch.Tensor:
    indices = torch.from_numpy(np.vstack([rows, cols]).astype(np.int64)).to(values.device)
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=False).coalesce()


class _SparseX:
    """A SciPy sparse ``X`` (n, d) for the solver, never densified: ``X @ P`` and ``X.T @ R`` are torch sparse
    products, with ``X`` centred implicitly (``X - 1 mean^T``) when ``mean`` is given, as scikit-learn centres
    sparse input; :meth:`stacked` is the working sets' forward."""

    def __init__(self, X, mean: torch.Tensor | None, dtype: torch.dtype, device):
        coo = X.tocoo()
        self.shape = X.shape
        self.mean = mean
        self._X = X
        self._A = _sparse_tensor(coo.row, coo.col, _to_tensor(coo.data, "X", dtype, device), X.shape)
        self.T = _SparseXT(self)

    def __matmul__(self, P: torch.Tensor) -> torch.Tensor:
        out = torch.sparse.mm(self._A, P)
        return out if self.mean is None else out - self.mean @ P

    def stacked(self, idx: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``P`` (k, m) -> (k, n), row ``j`` = ``X[:, idx[:, j]] @ P[j]``: one product with the block-diagonal matrix
        of the ``k`` outputs' column blocks."""
        (m, k), n = idx.shape, self.shape[0]
        if self._X.format != "csc":  # column blocks are cheap in CSC: convert once, on the first working set
            self._X = self._X.tocsc()
        blocks = [self._X[:, cols].tocoo() for cols in idx.T.cpu().numpy()]
        rows = np.concatenate([b.row + j * n for j, b in enumerate(blocks)])
        cols = np.concatenate([b.col + j * m for j, b in enumerate(blocks)])
        values = torch.as_tensor(np.concatenate([b.data for b in blocks]), dtype=self._A.dtype, device=self._A.device)
        B = _sparse_tensor(rows, cols, values, (k * n, k * m))
        shift = None if self.mean is None else self.mean[idx.T]  # (k, m): the centring of each block's columns

        def forward(P: torch.Tensor) -> torch.Tensor:
            out = torch.sparse.mm(B, P.reshape(-1, 1)).reshape(k, n)
            return out if shift is None else out - (P * shift).sum(1, keepdim=True)

        return forward


class _SparseXT:
    """``X.T`` of a :class:`_SparseX`: ``X.T @ R`` (centred: ``X^T R - mean (1^T R)``)."""

    def __init__(self, X: _SparseX):
        self._X = X
        self._At = X._A.t().coalesce()

    def __matmul__(self, R: torch.Tensor) -> torch.Tensor:
        out = torch.sparse.mm(self._At, R)
        return out if self._X.mean is None else out - self._X.mean[:, None] * R.sum(0)


def _stacked_forward(X, idx: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The working sets' forward ``P`` (k, m) -> (k, n), ``row j = X[:, idx[:, j]] @ P[j]`` (dense: one bmm)."""
    if isinstance(X, _SparseX):
        return X.stacked(idx)
    (m, k), n = idx.shape, X.shape[0]
    Xw = X.T[idx.T.reshape(-1)].reshape(k, m, n)  # Xw[j] = X[:, idx[:, j]].T
    return lambda P: torch.bmm(P.unsqueeze(1), Xw).squeeze(1)


# ----------------------------------------------------------------------------------------------------
# estimators


def _check_dtype(estimator) -> torch.dtype:
    """``dtype``: a floating-point torch dtype, or a NumPy float dtype (``np.float32``, ``"float64"``) as the same."""
    value = estimator.dtype
    try:
        dtype = value if isinstance(value, torch.dtype) else torch.from_numpy(np.empty(0, dtype=np.dtype(value))).dtype
    except (TypeError, ValueError):
        dtype = None
    if value is None or dtype is None or not dtype.is_floating_point:
        raise InvalidParameterError(f"The 'dtype' parameter of {type(estimator).__name__} must be a floating-point torch "
                                    f"dtype (e.g. torch.float64) or NumPy float dtype. Got {value!r} instead.")
    return dtype


def _check_device(estimator):
    """``device``: ``None`` (torch's default) or a device tensors can be made on (``"cuda"`` only where there is one)."""
    value = estimator.device
    if value is None:
        return None
    try:
        device = torch.device(value)
        torch.empty(0, device=device)
        problem = "meta tensors hold no data" if device.type == "meta" else None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, AssertionError, TypeError...
        problem = str(e).splitlines()[0]
    if problem:
        raise InvalidParameterError(f"The 'device' parameter of {type(estimator).__name__} must be None or a usable torch "
                                    f"device. Got {value!r} instead ({problem}).")
    return device


class _SpreadLinear(_Regressor, _Base):
    """Shared by the estimators: parameter and data checks, centring, ``coef_``/``intercept_`` in scikit-learn's layout."""

    def _check_params(self) -> dict:
        return dict(
            alpha=check_param(self, "alpha", "real", 0), tol=check_param(self, "tol", "real", 0),
            max_iter=check_param(self, "max_iter", "int", 1), fit_intercept=check_param(self, "fit_intercept", "bool"),
            dtype=_check_dtype(self), device=_check_device(self),
        )

    def _prepare(self, X, y, params: dict):
        """Checked data as tensors: ``(X, Y, XtY)``, ``Y`` of shape ``(n, k)``, both centred with ``fit_intercept`` (a
        sparse ``X`` implicitly: a :class:`_SparseX`), and ``XtY = X^T Y / n`` (minus the data term's gradient at 0)."""
        X, y = validate_fit_data(self, X, y, accept_sparse=True, regression=True)
        dtype, device, centre = params["dtype"], params["device"], params["fit_intercept"]
        Y = _to_tensor(y, "y", dtype, device)
        self._one_output = Y.dim() == 1
        Y = Y.reshape(Y.shape[0], -1)
        if issparse(X):
            self._x_mean = _to_tensor(np.asarray(X.mean(axis=0)).ravel(), "X", dtype, device) if centre else None
            X = _SparseX(X, self._x_mean, dtype, device)
        else:
            X = _to_tensor(X, "X", dtype, device)
            if centre:
                self._x_mean = X.mean(0)
                X = X - self._x_mean
        if centre:
            self._y_mean = Y.mean(0)
            Y = Y - self._y_mean
        XtY = X.T @ Y / Y.shape[0]
        if not (torch.isfinite(XtY).all() and torch.isfinite(Y.pow(2).sum())):
            raise ValueError(f"X and y are too large for {dtype}: X^T y or ||y||^2 overflows (rescale them)")
        if params["alpha"] == 0:
            warnings.warn(  # stacklevel: _prepare, fit, keeps_state_on_error, the caller
                "With alpha=0 this is ordinary least squares (no penalty, no sparsity): it is fitted by LBFGS alone, "
                "from zero (the minimum-norm solution where there are several). You are advised to use the "
                "LinearRegression estimator", UserWarning, stacklevel=4,
            )
        return X, Y, XtY

    def _finish(self, W: torch.Tensor, kkt: float, tol_abs: float, steps: int) -> None:
        """Store ``W`` (``(d, k)``) as ``coef_`` (``(k, d)``, or ``(d,)`` for a 1-D ``y``) and the intercept."""
        coef = as_numpy(W.T)
        intercept = as_numpy(self._y_mean - self._x_mean @ W) if self.fit_intercept else np.zeros(W.shape[1])
        self.coef_ = coef[0] if self._one_output else coef
        self.intercept_ = float(intercept[0]) if self._one_output else intercept
        self.kkt_residual_ = kkt
        self.n_iter_ = steps
        if kkt > tol_abs:
            warnings.warn(  # stacklevel: _finish, fit, keeps_state_on_error, the caller
                f"{type(self).__name__}: stopped at KKT residual {kkt:.2e} > tol * alpha_max = {tol_abs:.2e} after "
                f"{steps} steps (max_iter reached, or no further progress in float precision)", ConvergenceWarning, stacklevel=4,
            )

    def predict(self, X):
        """``X @ coef_.T + intercept_`` as a NumPy array (shape ``(n,)`` when ``y`` was 1-D at fit time); ``X`` dense or
        SciPy sparse, with the fitted number of features."""
        X = validate_X(self, X, accept_sparse=True)
        return X.astype(np.float64, copy=False) @ np.asarray(self.coef_).T + self.intercept_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.target_tags.multi_output = True  # a 2-D y: k outputs
        return tags


class SpreadLasso(_SpreadLinear):
    """Lasso ``||Y - XW - b||_F^2/(2n) + alpha*||W||_1`` by spread with LBFGS; ``kappa = alpha/2``.

    ``k`` outputs are ``k`` independent lassos (as ``sklearn.linear_model.Lasso`` with a 2-D ``y``),
    fitted together as one ``(d, k)`` parameter (see the module docstring).

    Args:
        alpha: L1 strength (scikit-learn's ``alpha``; the optimizer's ``2*kappa``), a finite float >= 0; ``0`` is
            least squares (with a warning; module docstring).
        fit_intercept: centre ``X`` and ``Y`` and fit an unpenalised intercept.
        tol: stop when the KKT residual is at most ``tol * alpha_max`` (``alpha_max = max|X^T Y|/n``); >= 0.
        max_iter: cap on optimizer steps (each runs up to 10 LBFGS iterations), over all working sets (and on
            their rounds); an int >= 1.
        working_set: solve on growing per-output working sets (module docstring); ``False`` runs the
            optimizer on the whole coefficient matrix.
        dtype, device: of the tensors the fit runs on (a floating-point torch or NumPy dtype; a torch device).

    Attributes: ``coef_`` (``(d,)`` or ``(k, d)``), ``intercept_`` (float or ``(k,)``), ``n_iter_``
    (optimizer steps), ``kkt_residual_`` (the final largest KKT violation, absolute), ``n_rounds_``
    (working-set rounds; 1 without working sets), ``n_features_in_`` (``feature_names_in_`` for a DataFrame).
    """

    _param_names = ("alpha", "fit_intercept", "tol", "max_iter", "working_set", "dtype", "device")

    def __init__(self, alpha=1.0, *, fit_intercept=True, tol=1e-6, max_iter=10_000, working_set=True,
                 dtype=torch.float64, device=None):
        self.alpha = alpha
        self.fit_intercept = fit_intercept
        self.tol = tol
        self.max_iter = max_iter
        self.working_set = working_set
        self.dtype = dtype
        self.device = device

    @keeps_state_on_error
    def fit(self, X, y):
        params = self._check_params()
        working_set = check_param(self, "working_set", "bool")
        X, Y, XtY = self._prepare(X, y, params)
        n, d = X.shape
        alpha, max_iter = params["alpha"], params["max_iter"]
        tol_abs = params["tol"] * float(XtY.abs().max())
        if working_set and alpha > 0:  # alpha = 0: every feature is in, a working set would only add rounds
            W, kkt, steps, rounds = _working_set_lasso(X, Y, XtY, alpha, tol_abs, max_iter)
        else:
            W0 = torch.zeros(d, Y.shape[1], dtype=XtY.dtype, device=XtY.device)
            W, _, steps, kkt = _solve(lambda P: X @ P, Y, W0, alpha / 2, "element", tol_abs, max_iter, n)
            rounds = 1
        self.n_rounds_ = rounds
        self._finish(W, kkt, tol_abs, steps)
        return self


def _working_set_lasso(X, Y, XtY, alpha, tol_abs, max_steps, min_size=10):
    """Lasso on growing per-output working sets; returns ``(W (d, k), kkt, steps, rounds)``.

    ``X``: the (centred) data as a dense tensor or a :class:`_SparseX`. At most ``max_steps`` steps and as many
    rounds (a round takes at least one step unless its sets were already solved).
    """
    n, d = X.shape
    k = Y.shape[1]
    W = torch.zeros(d, k, dtype=XtY.dtype, device=XtY.device)
    g = -XtY  # the data term's gradient at W
    Yt = Y.T.contiguous()  # (k, n)
    size, steps, rounds = 0, 0, 0
    inside = torch.zeros_like(W, dtype=torch.bool)  # the last working sets
    stalled = False  # the last inner solve stopped short of its tolerance (max_iter or float precision)
    while True:
        kkt = float(ref.element_kkt(W, g, alpha / 2)) if W.numel() else 0.0
        # outside the working sets W = 0: the violation there is max(|g| - alpha, 0)
        outside = float(((g.abs() - alpha).clamp(min=0) * ~inside).max()) if W.numel() else 0.0
        # done when everything is optimal, or when nothing outside the sets asks to join and the inner
        # solve stalled (a new round on the same sets would not do better)
        if kkt <= tol_abs or steps >= max_steps or rounds >= max_steps or (outside <= tol_abs and stalled):
            return W, kkt, steps, rounds
        nonzero = W != 0
        # per output: its nonzeros first, then its zeros by how much they violate |g| <= alpha; the sets
        # at least double each round (few rounds) and hold twice the widest output's nonzeros
        score = torch.where(nonzero, torch.full_like(g, math.inf), g.abs() - alpha)
        size = min(d, max(2 * size, min_size, 2 * int(nonzero.sum(0).max())))
        idx = torch.topk(score, size, dim=0).indices  # (m, k)
        forward = _stacked_forward(X, idx)  # (k, m) -> (k, n)
        P0 = torch.gather(W, 0, idx).T.contiguous()
        # the inner problem need not be solved far beyond what the next check of the outside asks
        inner_tol = max(tol_abs, 0.1 * outside)
        P, residuals, s, inner_kkt = _solve(forward, Yt, P0, alpha / 2, "element", inner_tol, max_steps - steps, n)
        steps += s
        rounds += 1
        W = torch.zeros_like(W).scatter_(0, idx, P.T)
        inside = torch.zeros_like(inside).scatter_(0, idx, True)
        g = -(X.T @ residuals.T) / n  # (d, k): checks every feature of every output
        stalled = inner_kkt > inner_tol


class SpreadGroupLasso(_SpreadLinear):
    """Group lasso ``||Y - XW - b||_F^2/(2n) + alpha * sum_g ||W_g||_2`` by spread with LBFGS; ``kappa = alpha/2``.

    Args:
        alpha: strength (the optimizer's ``2*kappa``), a finite float >= 0; groups are not reweighted by their size.
        groups: ``None`` (one group per feature: the row ``W[j, :]`` across all outputs, as
            scikit-learn's ``MultiTaskLasso``; with a 1-D ``y`` this is the lasso) or one integer id >= 0 per
            feature (features with the same id form one group, across all outputs; any ids, not only 0..G-1).
        fit_intercept, tol, max_iter, dtype, device: as :class:`SpreadLasso`; ``alpha_max`` is the
            largest group norm of ``X^T Y / n``. No working sets: the optimizer runs on the whole
            ``(d, k)`` coefficient matrix with ``sparsity="row"`` or the group ids.

    Attributes: ``coef_`` (``(d,)`` or ``(k, d)``), ``intercept_``, ``n_iter_``, ``kkt_residual_``, ``n_features_in_``.
    """

    _param_names = ("alpha", "groups", "fit_intercept", "tol", "max_iter", "dtype", "device")

    def __init__(self, alpha=1.0, *, groups=None, fit_intercept=True, tol=1e-6, max_iter=10_000,
                 dtype=torch.float64, device=None):
        self.alpha = alpha
        self.groups = groups
        self.fit_intercept = fit_intercept
        self.tol = tol
        self.max_iter = max_iter
        self.dtype = dtype
        self.device = device

    def _group_ids(self, d: int) -> np.ndarray:
        """``groups`` checked (one integer id >= 0 per feature) and numbered ``0..G-1`` in the same order."""
        ids = np.asarray(as_numpy(self.groups))
        if ids.shape != (d,) or ids.dtype.kind not in "iu" or (ids < 0).any():
            raise InvalidParameterError(
                f"The 'groups' parameter of {type(self).__name__} must be None or {d} integer ids >= 0 (one per "
                f"feature). Got shape {ids.shape}, dtype {ids.dtype} instead.")
        return np.unique(ids, return_inverse=True)[1].reshape(d)

    @keeps_state_on_error
    def fit(self, X, y):
        params = self._check_params()
        X, Y, XtY = self._prepare(X, y, params)
        n, d = X.shape
        k = Y.shape[1]
        device = XtY.device
        if self.groups is None:
            sparsity, ids = "row", torch.arange(d, device=device)
        else:
            ids = torch.as_tensor(self._group_ids(d), device=device)
            sparsity = ids.reshape(d, 1).expand(d, k).contiguous()
        group_sq = torch.zeros(int(ids.max()) + 1, dtype=XtY.dtype, device=device).index_add_(0, ids, XtY.pow(2).sum(1))
        tol_abs = params["tol"] * float(group_sq.max().sqrt())
        W0 = torch.zeros(d, k, dtype=XtY.dtype, device=device)
        W, _, steps, kkt = _solve(lambda P: X @ P, Y, W0, params["alpha"] / 2, sparsity, tol_abs, params["max_iter"], n)
        self._finish(W, kkt, tol_abs, steps)
        return self


def __getattr__(name):  # SpreadLq (L2/3, L1/2 linear models by depth-k spread) lives in spread_optim/nonconvex.py
    if name == "SpreadLq":
        from spread_optim.nonconvex import SpreadLq

        return SpreadLq
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
