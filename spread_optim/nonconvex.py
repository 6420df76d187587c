r"""scikit-learn-style linear models with the non-convex penalties L_{2/3} and L_{1/2}, fitted by depth-k spread.

:class:`SpreadLq` minimises, for ``X`` of shape ``(n, d)`` and ``Y`` of shape ``(n,)`` or ``(n, m)`` (``m``
independent outputs)::

    ||Y - X W - b||_F^2 / (2n)  +  alpha * sum_ij |W_ij|^q,     q = 1 ("L1"), 2/3 ("L2/3") or 1/2 ("L1/2")

skglm's convention for its ``L1``, ``L2_3`` and ``L0_5`` penalties (``Quadratic`` datafit), so ``alpha`` means the
same in both. The fit runs :class:`~spread_optim.SpreadOptimizer` with ``depth = 2/q`` (2, 3, 4) and
``kappa = alpha/depth`` (the depth-k penalty is ``depth*kappa*|theta|^(2/depth)``), base ``torch.optim.LBFGS``
(strong-Wolfe line search, 10 iterations per step) on the whole ``(d, m)`` coefficient matrix, from zero (or from the
last fit's ``coef_`` with ``warm_start=True``: a path of decreasing ``alpha`` warm-started fit by fit).

A non-convex problem has local minima; this is a local solver, as skglm's coordinate descent is. Zeros are revived
by the L_q thresholding rule with LBFGS's backtracked proximal step (ISTA's step ``<= 1/Lipschitz``), a more
conservative test than coordinate descent's per-coordinate step: the two solvers can end at different local minima
(``benchmarks/nonconvex.py`` reports both objectives). The fit stops when ``kkt_residual_`` (the first-order
condition ``g + alpha*q*|w|^(q-1)*sign(w) = 0`` on the nonzeros, the thresholding condition on the zeros; see
:meth:`spread_optim.SpreadOptimizer.kkt_residual`) is at most ``tol * max|X^T Y|/n``, after ``max_iter`` steps, or
when five steps in a row no longer lower the smooth objective (then a ``ConvergenceWarning`` if ``tol`` was not met).

Kept small on purpose (dense ``X``, no working sets); :mod:`spread_optim.linear` holds the lasso estimators.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from spread_optim._estimator_base import BaseEstimator as _Base
from spread_optim._estimator_base import ConvergenceWarning, InvalidParameterError, as_numpy, check_param
from spread_optim._estimator_base import keeps_state_on_error, validate_fit_data, validate_X
from spread_optim.kernels import reference as ref
from spread_optim.optimizer import SpreadOptimizer

try:
    from sklearn.base import RegressorMixin as _Regressor
except ImportError:  # pragma: no cover - exercised only without scikit-learn

    class _Regressor:  # type: ignore[no-redef]
        def score(self, X, y) -> float:
            y = np.asarray(y, dtype=float)
            residual = ((y - self.predict(X)) ** 2).sum()
            total = ((y - y.mean(0)) ** 2).sum()
            return float(1 - residual / total) if total > 0 else float(residual == 0)


#: the penalties and their depth (q = 2/depth)
PENALTIES = {"L1": 2, "L2/3": 3, "L1/2": 4}
INNER_ITERATIONS = 10


class SpreadLq(_Regressor, _Base):
    """``||Y - XW - b||^2/(2n) + alpha*sum|W|^q`` by depth-k spread with LBFGS (module docstring).

    Args:
        alpha: strength, a finite float > 0 (skglm's ``alpha`` for ``L1`` / ``L2_3`` / ``L0_5``).
        penalty: ``"L2/3"`` (default, depth 3), ``"L1/2"`` (depth 4) or ``"L1"`` (depth 2, the lasso).
        fit_intercept: centre ``X`` and ``Y`` and fit an unpenalised intercept.
        tol: stop when the KKT residual is at most ``tol * max|X^T Y|/n``; >= 0.
        max_iter: cap on optimizer steps (each up to 10 LBFGS iterations); an int >= 1.
        warm_start: start from the previous fit's ``coef_`` (same shape) instead of zero.
        dtype, device: of the tensors the fit runs on.

    Attributes: ``coef_`` (``(d,)`` or ``(m, d)``), ``intercept_``, ``n_iter_`` (optimizer steps), ``kkt_residual_``,
    ``objective_`` (the objective above at the fit, in float64), ``n_features_in_``.
    """

    _param_names = ("alpha", "penalty", "fit_intercept", "tol", "max_iter", "warm_start", "dtype", "device")

    def __init__(self, alpha=1.0, *, penalty="L2/3", fit_intercept=True, tol=1e-6, max_iter=1000, warm_start=False,
                 dtype=torch.float64, device=None):
        self.alpha = alpha
        self.penalty = penalty
        self.fit_intercept = fit_intercept
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.dtype = dtype
        self.device = device

    def _depth(self) -> int:
        if not isinstance(self.penalty, str) or self.penalty not in PENALTIES:
            raise InvalidParameterError(f"The 'penalty' parameter of {type(self).__name__} must be one of "
                                        f"{sorted(PENALTIES)}. Got {self.penalty!r} instead.")
        return PENALTIES[self.penalty]

    @keeps_state_on_error
    def fit(self, X, y):
        alpha = check_param(self, "alpha", "real", 0, strict=True)
        tol = check_param(self, "tol", "real", 0)
        max_iter = check_param(self, "max_iter", "int", 1)
        centre = check_param(self, "fit_intercept", "bool")
        warm = check_param(self, "warm_start", "bool")
        depth = self._depth()
        dtype = self.dtype if isinstance(self.dtype, torch.dtype) else torch.from_numpy(np.empty(0, dtype=np.dtype(self.dtype))).dtype
        if not dtype.is_floating_point:
            raise InvalidParameterError(f"The 'dtype' parameter of {type(self).__name__} must be a floating-point dtype. "
                                        f"Got {self.dtype!r} instead.")
        X, y = validate_fit_data(self, X, y, regression=True)
        X = torch.as_tensor(X, dtype=dtype, device=self.device)
        Y = torch.as_tensor(y, dtype=dtype, device=self.device)
        one_output = Y.dim() == 1
        Y = Y.reshape(Y.shape[0], -1)
        n, d = X.shape
        x_mean = X.mean(0) if centre else torch.zeros(d, dtype=dtype, device=X.device)
        y_mean = Y.mean(0) if centre else torch.zeros(Y.shape[1], dtype=dtype, device=X.device)
        X, Y = X - x_mean, Y - y_mean
        W = torch.zeros(d, Y.shape[1], dtype=dtype, device=X.device)
        previous = getattr(self, "coef_", None)
        if warm and previous is not None and np.shape(previous) in ((d,) if one_output else (Y.shape[1], d),):
            W = torch.as_tensor(np.asarray(previous).reshape(-1, d).T.copy(), dtype=dtype, device=X.device)
        tol_abs = tol * float((X.T @ Y).abs().max()) / n
        W, steps, kkt = _solve(X, Y, W, alpha / depth, depth, tol_abs, max_iter)
        self.n_iter_, self.kkt_residual_ = steps, kkt
        residual = Y - X @ W
        self.objective_ = float(residual.double().pow(2).sum() / (2 * n) + ref.lq_penalty(W, alpha / depth, depth))
        coef = as_numpy(W.T)
        intercept = as_numpy(y_mean - x_mean @ W)
        self.coef_ = coef[0] if one_output else coef
        self.intercept_ = float(intercept[0]) if one_output else intercept
        if kkt > tol_abs:
            warnings.warn(f"{type(self).__name__}: stopped at KKT residual {kkt:.2e} > tol * max|X^T y|/n = {tol_abs:.2e} "
                          f"after {steps} steps", ConvergenceWarning, stacklevel=3)
        return self

    def predict(self, X):
        X = validate_X(self, X)
        return X.astype(np.float64, copy=False) @ np.asarray(self.coef_).T + self.intercept_


def _solve(X: torch.Tensor, Y: torch.Tensor, W0: torch.Tensor, kappa: float, depth: int, tol_abs: float, max_steps: int,
           patience: int = 5):
    """``||Y - X W||^2/(2n) + depth*kappa*sum|W|^(2/depth)`` from ``W0`` with spread + LBFGS; returns
    ``(W, steps, kkt)``."""
    n = X.shape[0]
    W = W0.clone().requires_grad_(True)
    opt = SpreadOptimizer([W], torch.optim.LBFGS, kappa=kappa, depth=depth, lr=1.0, max_iter=INNER_ITERATIONS,
                          history_size=10, line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)
    loss_box = [math.inf]

    def closure():
        opt.zero_grad()
        loss = (Y - X @ W).pow(2).sum() / (2 * n)
        if not torch.isfinite(loss):
            raise FloatingPointError("the data term became non-finite (diverging fit)")
        loss.backward()
        loss_box[0] = float(loss.detach())
        return loss

    with warnings.catch_warnings():  # depth > 2 runs the PyTorch path: the dispatch's note is not news here
        warnings.filterwarnings("ignore", message="spread_optim: 'depth'", category=RuntimeWarning)
        with torch.enable_grad():
            closure()
        kkt = opt.kkt_residual()
        steps, best, stalled = 0, math.inf, 0
        while kkt > tol_abs and steps < max_steps and stalled < patience:
            opt.step(closure)
            steps += 1
            with torch.enable_grad():
                closure()
            kkt = opt.kkt_residual()
            smooth = loss_box[0] + opt.penalty()
            stalled = stalled + 1 if smooth >= best else 0
            best = min(best, smooth)
    return W.detach(), steps, kkt
