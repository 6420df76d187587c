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

try:  # scikit-learn is optional: with it the estimators work with clone, pipelines and grid search
    from sklearn.base import RegressorMixin as _Regressor
    from sklearn.exceptions import ConvergenceWarning as _ConvergenceWarning
except ImportError:  # pragma: no cover - exercised only without scikit-learn
    _ConvergenceWarning = UserWarning

    class _Regressor:  # type: ignore[no-redef]
        def score(self, X, y) -> float:
            y = np.asarray(y, dtype=float)
            residual = ((y - self.predict(X)) ** 2).sum()
            return float(1 - residual / ((y - y.mean(0)) ** 2).sum())


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
# estimators


class _SpreadLinear(_Base, _Regressor):
    """Shared data handling: float tensors, centring, ``coef_``/``intercept_`` in scikit-learn's layout."""

    def _prepare(self, X, y):
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < math.inf:
            raise ValueError(f"alpha must be a finite float >= 0, got {alpha!r}")
        X = torch.as_tensor(X if isinstance(X, torch.Tensor) else np.asarray(X), dtype=self.dtype, device=self.device)
        Y = torch.as_tensor(y if isinstance(y, torch.Tensor) else np.asarray(y), dtype=self.dtype, device=self.device)
        if X.dim() != 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {tuple(X.shape)}")
        if Y.dim() not in (1, 2) or Y.shape[0] != X.shape[0]:
            raise ValueError(f"y must have shape (n_samples,) or (n_samples, n_outputs) with n_samples = {X.shape[0]}, got {tuple(Y.shape)}")
        # a sum is finite unless an entry is inf/NaN (or it overflows): 20x faster than isfinite(X).all()
        if not (torch.isfinite(X.sum()) and torch.isfinite(Y.sum())):
            if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
                raise ValueError("X and y must be finite")
        self._one_output = Y.dim() == 1
        Y = Y.reshape(Y.shape[0], -1)
        if self.fit_intercept:
            self._x_mean, self._y_mean = X.mean(0), Y.mean(0)
            X, Y = X - self._x_mean, Y - self._y_mean
        self.n_features_in_ = X.shape[1]
        if alpha == 0:
            warnings.warn(
                "With alpha=0 this is ordinary least squares (no penalty, no sparsity): it is fitted by LBFGS alone, "
                "from zero (the minimum-norm solution where there are several). You are advised to use the "
                "LinearRegression estimator", UserWarning, stacklevel=3,
            )
        return X, Y

    def _finish(self, W: torch.Tensor, kkt: float, tol_abs: float, steps: int) -> None:
        """Store ``W`` (``(d, k)``) as ``coef_`` (``(k, d)``, or ``(d,)`` for a 1-D ``y``) and the intercept."""
        coef = W.T.cpu().numpy()
        intercept = (self._y_mean - self._x_mean @ W).cpu().numpy() if self.fit_intercept else np.zeros(W.shape[1])
        self.coef_ = coef[0] if self._one_output else coef
        self.intercept_ = float(intercept[0]) if self._one_output else intercept
        self.kkt_residual_ = kkt
        self.n_iter_ = steps
        if kkt > tol_abs:
            warnings.warn(
                f"{type(self).__name__}: stopped at KKT residual {kkt:.2e} > tol * alpha_max = {tol_abs:.2e} after "
                f"{steps} steps (max_iter reached, or no further progress in float precision)", _ConvergenceWarning, stacklevel=3,
            )

    def predict(self, X):
        """``X @ coef_.T + intercept_`` as a NumPy array (shape ``(n,)`` when ``y`` was 1-D at fit time)."""
        X = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
        return X.astype(np.float64, copy=False) @ np.asarray(self.coef_).T + self.intercept_


class SpreadLasso(_SpreadLinear):
    """Lasso ``||Y - XW - b||_F^2/(2n) + alpha*||W||_1`` by spread with LBFGS; ``kappa = alpha/2``.

    ``k`` outputs are ``k`` independent lassos (as ``sklearn.linear_model.Lasso`` with a 2-D ``y``),
    fitted together as one ``(d, k)`` parameter (see the module docstring).

    Args:
        alpha: L1 strength (scikit-learn's ``alpha``; the optimizer's ``2*kappa``); ``0`` is least squares (with
            a warning; module docstring).
        fit_intercept: centre ``X`` and ``Y`` and fit an unpenalised intercept.
        tol: stop when the KKT residual is at most ``tol * alpha_max`` (``alpha_max = max|X^T Y|/n``).
        max_iter: cap on optimizer steps (each runs up to 10 LBFGS iterations), over all working sets.
        working_set: solve on growing per-output working sets (module docstring); ``False`` runs the
            optimizer on the whole coefficient matrix.
        dtype, device: of the tensors the fit runs on.

    Attributes: ``coef_`` (``(d,)`` or ``(k, d)``), ``intercept_`` (float or ``(k,)``), ``n_iter_``
    (optimizer steps), ``kkt_residual_`` (the final largest KKT violation, absolute), ``n_rounds_``
    (working-set rounds; 1 without working sets).
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

    def fit(self, X, y):
        X, Y = self._prepare(X, y)
        n, d = X.shape
        XtY = X.T @ Y / n  # minus the data term's gradient at W = 0
        tol_abs = self.tol * (float(XtY.abs().max()) if XtY.numel() else 0.0)
        if self.working_set and self.alpha > 0:  # alpha = 0: every feature is in, a working set would only add rounds
            W, kkt, steps, rounds = _working_set_lasso(X, Y, XtY, self.alpha, tol_abs, self.max_iter)
        else:
            W0 = torch.zeros(d, Y.shape[1], dtype=X.dtype, device=X.device)
            W, _, steps, kkt = _solve(lambda P: X @ P, Y, W0, self.alpha / 2, "element", tol_abs, self.max_iter, n)
            rounds = 1
        self.n_rounds_ = rounds
        self._finish(W, kkt, tol_abs, steps)
        return self


def _working_set_lasso(X, Y, XtY, alpha, tol_abs, max_steps, min_size=10):
    """Lasso on growing per-output working sets; returns ``(W (d, k), kkt, steps, rounds)``.

    At most ``max_steps`` steps and as many rounds (a round takes at least one step unless its sets were already
    solved).
    """
    n, d = X.shape
    k = Y.shape[1]
    W = torch.zeros(d, k, dtype=X.dtype, device=X.device)
    g = -XtY  # the data term's gradient at W
    Yt = Y.T.contiguous()  # (k, n)
    XT = X.T  # (d, n), rows are features: a view (no copy of X)
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
        Xw = XT[idx.T.reshape(-1)].reshape(k, size, n)  # Xw[j] = X[:, idx[:, j]].T
        forward = lambda P, Xw=Xw: torch.bmm(P.unsqueeze(1), Xw).squeeze(1)  # (k, m) -> (k, n)
        P0 = torch.gather(W, 0, idx).T.contiguous()
        # the inner problem need not be solved far beyond what the next check of the outside asks
        inner_tol = max(tol_abs, 0.1 * outside)
        P, residuals, s, inner_kkt = _solve(forward, Yt, P0, alpha / 2, "element", inner_tol, max_steps - steps, n)
        steps += s
        rounds += 1
        W = torch.zeros_like(W).scatter_(0, idx, P.T)
        inside = torch.zeros_like(inside).scatter_(0, idx, True)
        g = -(XT @ residuals.T) / n  # (d, k): checks every feature of every output
        stalled = inner_kkt > inner_tol


class SpreadGroupLasso(_SpreadLinear):
    """Group lasso ``||Y - XW - b||_F^2/(2n) + alpha * sum_g ||W_g||_2`` by spread with LBFGS; ``kappa = alpha/2``.

    Args:
        alpha: strength (the optimizer's ``2*kappa``); groups are not reweighted by their size.
        groups: ``None`` (one group per feature: the row ``W[j, :]`` across all outputs, as
            scikit-learn's ``MultiTaskLasso``; with a 1-D ``y`` this is the lasso) or one integer id per
            feature (features with the same id form one group, across all outputs).
        fit_intercept, tol, max_iter, dtype, device: as :class:`SpreadLasso`; ``alpha_max`` is the
            largest group norm of ``X^T Y / n``. No working sets: the optimizer runs on the whole
            ``(d, k)`` coefficient matrix with ``sparsity="row"`` or the group ids.

    Attributes: ``coef_`` (``(d,)`` or ``(k, d)``), ``intercept_``, ``n_iter_``, ``kkt_residual_``.
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

    def fit(self, X, y):
        X, Y = self._prepare(X, y)
        n, d = X.shape
        k = Y.shape[1]
        if self.groups is None:
            sparsity, ids = "row", torch.arange(d, device=X.device)
        else:
            ids = torch.as_tensor(np.asarray(self.groups), device=X.device)
            if tuple(ids.shape) != (d,) or ids.dtype.is_floating_point or ids.dtype == torch.bool or (d and int(ids.min()) < 0):
                raise ValueError(f"groups must be {d} integer ids >= 0 (one per feature), got shape {tuple(ids.shape)}, dtype {ids.dtype}")
            ids = ids.long()
            sparsity = ids.reshape(d, 1).expand(d, k).contiguous()
        XtY = X.T @ Y / n
        group_sq = torch.zeros(int(ids.max()) + 1 if d else 0, dtype=X.dtype, device=X.device).index_add_(0, ids, XtY.pow(2).sum(1))
        tol_abs = self.tol * (float(group_sq.max().sqrt()) if group_sq.numel() else 0.0)
        W0 = torch.zeros(d, k, dtype=X.dtype, device=X.device)
        W, _, steps, kkt = _solve(lambda P: X @ P, Y, W0, self.alpha / 2, sparsity, tol_abs, self.max_iter, n)
        self._finish(W, kkt, tol_abs, steps)
        return self
