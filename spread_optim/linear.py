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

Solver of ``SpreadLasso`` (``working_set=True``, the default): Newton steps on spread's factorised objective,
restricted to per-output working sets, with the KKT conditions on the full gradient choosing the sets.

* The smooth problem. On output ``j``'s working set ``S`` (``m`` features) the coefficients are factorised,
  ``theta = U * W`` elementwise, and the objective is spread's::

      F(U, W) = ||y - X_S theta||^2 / (2n) + kappa * (|U|^2 + |W|^2),    kappa = alpha / 2.

  ``F`` is smooth; every local minimum of ``F`` is a minimum of the lasso (``min over U*W = theta`` of the
  penalty is ``2*kappa*|theta|_1 = alpha*|theta|_1``, reached at balanced factors ``|U| = |W| = sqrt|theta|``).
* The step. After each step the factors are balanced (``U = sign(theta) sqrt|theta|``, ``W = sqrt|theta|``: the
  exact minimum of ``F`` over the factorisations of ``theta``, which never raises ``F``). At balanced factors
  the gradient of ``F`` is zero across the balanced set, and along it (``dU = s dW``, ``s = sign(theta)``) the
  Hessian of ``F``, written in ``theta``'s units (``d theta = 2 sqrt|theta| dW``), is::

      H = X_L^T X_L / n  +  diag((alpha + s * g) / (2 |theta|)),       g = -X_L^T r / n,

  on the live (nonzero) coordinates ``L``; its gradient is ``g + alpha * s``. The step is Newton's,
  ``t = -H^{-1} (g + alpha s)``, with the diagonal term clamped at 0 (a negative one is a coefficient the data
  push away from zero: negative curvature of ``F``), Levenberg-Marquardt damping (``lambda * diag(X^T X / n)``,
  raised when the line search had to cut a step, lowered when full steps pass), and an Armijo backtracking line
  search on ``F`` at balanced factors (the lasso objective) along ``theta + eta t``, a coefficient that would
  change sign stopping at 0 (the factors' path goes through the saddle ``U = W = 0``). Near the solution
  ``alpha + s g -> 0``: the steps become Newton's on the quadratic with the signs fixed, so convergence is
  quadratic once the support is found. Gram entries ``X_a^T X_b / n`` are computed once, when ``a`` first
  becomes live, and kept for the fit.
* Exact zeros: between steps, spread's zero pass (``kernels/reference.py``, ``element_zero_pass``) snaps the
  coefficients the step stopped at 0 and holds a dead one (``U = W = 0``, a saddle of ``F``) unless
  ``|g| > alpha``, which revives it by a proximal-gradient step of size ``1/trace(X_S^T X_S / n)``. A round's
  solve starts with this pass alone (no Newton step) where the sets' new members violate ``|g| <= alpha``, so its
  first Newton step already moves them (a Newton step on the last round's live set alone would be wasted).
* Working sets. For each output the set starts with the 10 features that violate ``|g_i| <= alpha`` the most;
  each round adds the worst violators outside (at least 10, at least the widest output's nonzeros, and enough
  for the sets to hold twice those, but no more than the most violators beyond the tolerance of one output: once
  the sets hold the support, the last rounds add a few features),
  solves the sets to a KKT residual of ``max(tol * alpha_max, 0.1 * the largest violation outside)``, and checks
  every feature of every output with one product ``X^T R``; the rounds end when the largest violation of the
  lasso's optimality conditions over all ``d`` features (``kkt_residual_``) is at most ``tol * alpha_max``, with
  ``alpha_max = max |X^T Y| / n`` (so ``tol`` is scale free; it is not scikit-learn's duality-gap ``tol``).
  The outputs are solved as a batch, split into several batches only when their sets' columns would exceed 2^26
  numbers: live blocks of ``PER_OUTPUT`` (64) coefficients or more are gathered and factorised one output at a
  time, each at its own size; narrower ones by batched Cholesky factorisations padded to the widest. An output
  whose set is solved stops moving, and its residual and gradient are no longer recomputed.
* A dense float64 ``X`` on the CPU runs the same solver in NumPy (``_working_set_lasso_numpy``: the same steps
  and rules; LAPACK's Cholesky through SciPy when installed): a small fit is bound by the cost of an operation
  (a torch operation costs several microseconds, ~200 per Newton step), not by its arithmetic. There each output
  has its own working set (grown by its own rule, not the widest output's) and its own Newton solve on its own
  live block, one output after the other; the rounds are shared by the outputs of a batch (one product ``X^T R``
  checks every feature of the outputs that moved), and an output that meets the tolerance leaves them.

With ``working_set=False`` (and for :class:`SpreadGroupLasso`), the coefficients of all outputs are one tensor
handed to ``SpreadOptimizer`` with base ``torch.optim.LBFGS`` (strong-Wolfe line search, 10 iterations per
step; spread snaps and revives exact zeros between steps), stopped when ``optimizer.kkt_residual()`` is at most
``tol * alpha_max`` or when several steps in a row no longer lower the smooth objective (in float64 near a
relative KKT residual of 1e-8 to 1e-9); a fit that stops short of ``tol`` warns.

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
    sparse input."""

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


class _SparseXT:
    """``X.T`` of a :class:`_SparseX`: ``X.T @ R`` (centred: ``X^T R - mean (1^T R)``)."""

    def __init__(self, X: _SparseX):
        self._X = X
        self._At = X._A.t().coalesce()

    def __matmul__(self, R: torch.Tensor) -> torch.Tensor:
        out = torch.sparse.mm(self._At, R)
        return out if self._X.mean is None else out - self._X.mean[:, None] * R.sum(0)


# ----------------------------------------------------------------------------------------------------
# the working-set lasso: Newton steps on spread's factorised objective (module docstring, "Solver")


class _DenseColumns:
    """The working sets of a batch of outputs over a dense (centred) ``X``, held as ``Xw`` (k, m, n): ``Xw[j, i]``
    is the column of ``X`` of output ``j``'s ``i``-th working-set feature. ``Xt``: ``X^T`` (d, n), contiguous."""

    def __init__(self, Xt: torch.Tensor, Yt: torch.Tensor):
        self.Xt, self.Y = Xt, Yt
        self.n = Xt.shape[1]
        self._buffer = Xt.new_zeros(Yt.shape[0], 0, self.n)  # room for the sets to grow into, without copies
        self.Xw = self._buffer
        self._slots = None  # the columns of the Gram's slots (slot_gram)

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """Add the features ``new`` (k, p) to the sets; returns their squared norms / n (the Gram's diagonal)."""
        k, p = new.shape
        m = self.Xw.shape[1]
        if m + p > self._buffer.shape[1]:  # grow the buffer (at least twice, at most d columns): few copies in all
            room = min(self.Xt.shape[0], max(2 * (m + p), 64))
            buffer = self.Xt.new_empty(k, max(room, m + p), self.n)
            buffer[:, :m] = self.Xw
            self._buffer = buffer
        cols = self._buffer[:, m:m + p]
        torch.index_select(self.Xt, 0, new.reshape(-1), out=cols.view(k * p, self.n)) if k == 1 else cols.copy_(
            self.Xt[new.reshape(-1)].reshape(k, p, self.n))
        self.Xw = self._buffer[:, :m + p]
        return cols.pow(2).sum(2) / self.n

    def residual(self, theta: torch.Tensor) -> torch.Tensor:
        """``Y - X theta`` (k, n) for the coefficients ``theta`` (k, m) of the sets."""
        return self.Y - torch.bmm(theta.unsqueeze(1), self.Xw).squeeze(1)

    def grad(self, R: torch.Tensor) -> torch.Tensor:
        """The data term's gradient on the sets, ``-X_ws^T R / n`` (k, m)."""
        return torch.bmm(R.unsqueeze(1), self.Xw.transpose(1, 2)).squeeze(1) / -self.n  # 2x faster than Xw @ R

    def update_rows(self, R: torch.Tensor, g: torch.Tensor, theta: torch.Tensor, rows: list):
        """``(R, g)`` with the rows ``rows`` (outputs) recomputed for ``theta`` (the others are kept): one product
        per output, not a batched one over outputs that did not move."""
        R, g = R.clone(), g.clone()
        for j in rows:
            R[j] = self.Y[j] - torch.mv(self.Xw[j].T, theta[j])
            g[j] = torch.mv(self.Xw[j], R[j]) / -self.n
        return R, g

    def gram(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``X_a^T X_b / n`` (k, P, Q) for working-set positions ``rows`` (k, P) and ``cols`` (k, Q)."""
        batch = torch.arange(rows.shape[0], device=rows.device)[:, None]
        return torch.bmm(self.Xw[batch, rows], self.Xw[batch, cols].transpose(1, 2)) / self.n

    def slot_gram(self, pos: torch.Tensor, slot_pos: torch.Tensor) -> torch.Tensor:
        """The Gram rows of new slots: ``gram(pos, [slot_pos, pos])``, the columns of the earlier slots kept in a buffer
        in slot order (taken once, not again at every call)."""
        k, P = pos.shape
        E = slot_pos.shape[1]
        if self._slots is None or E + P > self._slots.shape[1]:
            room = min(max(2 * (E + P), 64), self.Xw.shape[1] + P)
            buffer = self.Xt.new_empty(k, max(room, E + P), self.n)
            if E:
                buffer[:, :E] = self._slots[:, :E] if self._slots is not None else self.Xw[self._batch(k), slot_pos]
            self._slots = buffer
        new = self._slots[:, E:E + P]
        new.copy_(self.Xw[self._batch(k), pos])
        return torch.bmm(new, self._slots[:, :E + P].transpose(1, 2)) / self.n

    def _batch(self, k: int) -> torch.Tensor:
        return torch.arange(k, device=self.Xt.device)[:, None]

    def full_grad(self, R: torch.Tensor) -> torch.Tensor:
        """The data term's gradient over every feature, ``-X^T R / n`` (d, k)."""
        return (self.Xt @ R.T) / -self.n


class _SparseColumns:
    """:class:`_DenseColumns` for a :class:`_SparseX`: products with the whole sparse ``X`` (never densified), the
    Gram entries by SciPy per output (centred implicitly: ``x_a^T x_b / n - mean_a mean_b``)."""

    def __init__(self, X: "_SparseX", Yt: torch.Tensor):
        self.X, self.Y = X, Yt
        self.n, self.d = X.shape
        self.idx = torch.zeros(Yt.shape[0], 0, dtype=torch.long, device=Yt.device)
        self._csc = X._X.tocsc()
        self._numpy_dtype = np.float64 if Yt.dtype == torch.float64 else np.float32
        sq = np.asarray(self._csc.multiply(self._csc).sum(0), dtype=np.float64).ravel()
        self._sq = torch.as_tensor(sq, dtype=Yt.dtype, device=Yt.device) / self.n
        if X.mean is not None:
            self._sq = self._sq - X.mean.pow(2)

    def append(self, new: torch.Tensor) -> torch.Tensor:
        self.idx = torch.cat([self.idx, new], 1)
        return self._sq[new]

    def _scatter(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.new_zeros(self.d, theta.shape[0]).scatter_(0, self.idx.T, theta.T)

    def residual(self, theta: torch.Tensor) -> torch.Tensor:
        return self.Y - (self.X @ self._scatter(theta)).T

    def grad(self, R: torch.Tensor) -> torch.Tensor:
        return torch.gather(self.full_grad(R).T, 1, self.idx)

    def gram(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        feats_r, feats_c = torch.gather(self.idx, 1, rows).cpu().numpy(), torch.gather(self.idx, 1, cols).cpu().numpy()
        blocks = [(self._csc[:, a].T @ self._csc[:, b]).toarray() for a, b in zip(feats_r, feats_c)]
        G = torch.as_tensor(np.stack(blocks).astype(self._numpy_dtype), device=self.Y.device) / self.n
        if self.X.mean is not None:
            mr, mc = self.X.mean[torch.gather(self.idx, 1, rows)], self.X.mean[torch.gather(self.idx, 1, cols)]
            G = G - mr[:, :, None] * mc[:, None, :]
        return G

    def slot_gram(self, pos: torch.Tensor, slot_pos: torch.Tensor) -> torch.Tensor:
        return self.gram(pos, torch.cat([slot_pos, pos], 1))

    def update_rows(self, R: torch.Tensor, g: torch.Tensor, theta: torch.Tensor, rows: list):
        R = self.residual(theta)
        return R, self.grad(R)

    def full_grad(self, R: torch.Tensor) -> torch.Tensor:
        return (self.X.T @ R.T) / -self.n


def _kkt_rows(theta: torch.Tensor, g: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per output (row), the largest violation of the lasso's optimality conditions (as ``ref.element_kkt``)."""
    at_zero = (g.abs() - alpha).clamp(min=0)
    off_zero = (g + alpha * torch.sign(theta)).abs()
    return torch.where(theta == 0, at_zero, off_zero).amax(1)


class _FactorisedNewton:
    """Spread on the working sets of a batch of ``k`` outputs: factors ``U, W`` (k, m) with ``theta = U*W`` and the
    smooth objective ``||y - X_ws theta||^2/(2n) + kappa*(|U|^2 + |W|^2)``, ``kappa = alpha/2``, minimised by Newton
    steps on the live (nonzero) factors with spread's exact-zero pass between steps (module docstring, "Solver").

    The Gram entries of the live coordinates are computed once, when a coordinate first becomes live, and kept
    for the whole fit (``_gram`` (k, 1 + E, 1 + E) and more, over "slots" 1..E; ``slot_of`` (k, m): a coordinate's slot or -1).
    """

    #: Armijo's sufficient-decrease constant and the most halvings of a step
    ARMIJO, HALVINGS = 1e-4, 30
    #: step sizes of the line search evaluated together
    CANDIDATES = 8
    #: live blocks at least this wide are gathered and factorised one output at a time (each its own size)
    PER_OUTPUT = 64

    def __init__(self, columns, alpha: float):
        self.cols, self.alpha, self.kappa = columns, alpha, alpha / 2
        Y = columns.Y
        k = Y.shape[0]
        self.batch = torch.arange(k, device=Y.device)
        self.U = Y.new_zeros(k, 0)
        self.W = Y.new_zeros(k, 0)
        self.g = Y.new_zeros(k, 0)
        self.R = Y.clone()
        self.sq = Y.new_zeros(k, 0)  # the Gram's diagonal on the sets
        self.slot_of = torch.zeros(k, 0, dtype=torch.long, device=Y.device)
        self.slot_pos = torch.zeros(k, 0, dtype=torch.long, device=Y.device)
        # the Gram entries of the slots, in a buffer with room to grow (k, cap, cap); slot 0 is all zeros (what the
        # padding of a live block reads), the E slots in use are 1..E
        self._gram = Y.new_zeros(k, 1, 1)
        self.E = 0
        self.damping = Y.new_zeros(k)  # Levenberg-Marquardt's lambda per output, 0 while Newton steps succeed
        self._damped = False
        self._block = None  # the last live block (see _live_block)
        self.steps = 0

    @property
    def theta(self) -> torch.Tensor:
        return self.U * self.W

    def append(self, new: torch.Tensor) -> None:
        """Grow every output's working set by the features ``new`` (k, p), entering as exact zeros (dead)."""
        k, p = new.shape
        self.sq = torch.cat([self.sq, self.cols.append(new)], 1)
        zeros = self.U.new_zeros(k, p)
        self.U, self.W = torch.cat([self.U, zeros], 1), torch.cat([self.W, zeros], 1)
        self.g = torch.cat([self.g, self.cols.grad(self.R)[:, -p:]], 1)
        self.slot_of = torch.cat([self.slot_of, self.slot_of.new_full((k, p), -1)], 1)

    def _ensure_gram(self, live: torch.Tensor) -> None:
        """Gram rows for the live coordinates that have none yet (against every slot, and among themselves)."""
        new = live & (self.slot_of < 0)
        count = new.sum(1)
        P = int(count.max())
        if P == 0:
            return
        k, E = self._gram.shape[0], self.E
        pos = torch.argsort((~new).to(torch.int8), dim=1, stable=True)[:, :P]  # the new ones first
        valid = torch.arange(P, device=pos.device)[None, :] < count[:, None]
        pos = torch.where(valid, pos, pos[:, :1])  # padding repeats the first (its Gram rows are never read)
        B = self.cols.slot_gram(pos, self.slot_pos)  # (k, P, E + P): against the slots and the new ones
        size = 1 + E + P
        if size > self._gram.shape[1]:  # grow the buffer (by half at least): few copies of the old entries
            room = max(size + size // 2, 64)
            buffer = self._gram.new_zeros(k, room, room)
            buffer[:, :1 + E, :1 + E] = self._gram[:, :1 + E, :1 + E]
            self._gram = buffer
        self._gram[:, 1 + E:size, 1:size] = B
        self._gram[:, 1:1 + E, 1 + E:size] = B[:, :, :E].transpose(1, 2)
        self.E = E + P
        self.slot_pos = torch.cat([self.slot_pos, pos], 1)
        slots = 1 + E + torch.arange(P, device=pos.device)[None, :].expand(k, P)
        # padding entries (repeats of the first new coordinate, or of position 0 where there is none) write the same
        # value as the entry they repeat, so the scatter is well defined
        first = torch.where(count[:, None] > 0, 1 + E, torch.gather(self.slot_of, 1, pos[:, :1]))
        self.slot_of.scatter_(1, pos, torch.where(valid, slots, first))

    def _live_block(self, live: torch.Tensor, act):
        """The live coordinates of the outputs ``act`` (``None``: all), live first and padded to the widest output:
        ``(order, pad, padded, GL)`` with ``GL`` their Gram block (padding rows and columns 0). Reused while the live
        coordinates do not change (the Gram entries of a coordinate never do)."""
        if self._block is not None and self._block[0] is act and torch.equal(self._block[1], live):
            return self._block[2]
        mask = live if act is None else live[act]
        count = mask.sum(1)
        L = int(count.max())
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :L]  # live first
        pad = torch.arange(L, device=order.device)[None, :] >= count[:, None]
        padded = bool(pad.any())
        slot_of = self.slot_of if act is None else self.slot_of[act]
        slots = torch.gather(slot_of, 1, order)
        if padded:
            slots = slots.masked_fill(pad, 0)  # slot 0: zeros
        G, kb = self._gram, slots.shape[0]
        if kb == 1:  # two index_selects are several times faster than one 3-D advanced index
            i = 0 if act is None else int(act[0])
            GL = G[i].index_select(0, slots[0]).index_select(1, slots[0]).unsqueeze(0)
        elif L >= self.PER_OUTPUT:  # one output at a time (faster than one index_select of a flat index)
            GL = G.new_empty(kb, L, L)
            for j, i in enumerate(range(kb) if act is None else act.tolist()):
                torch.index_select(G[i].index_select(0, slots[j]), 1, slots[j], out=GL[j])
        else:  # one index_select on the flat buffer (half the time of two gathers)
            cap = G.shape[1]
            rows = torch.arange(G.shape[0], device=slots.device) if act is None else act
            flat = (rows[:, None] * (cap * cap) + slots * cap)[:, :, None] + slots[:, None, :]
            GL = G.view(-1).index_select(0, flat.view(-1)).view(kb, L, L)
        block = (order, pad, padded, GL, count.tolist() if kb > 1 and L >= self.PER_OUTPUT else None)
        self._block = (act, live, block) if act is None else None
        return block

    def _newton_direction(self, theta, g, damping, order, pad, padded, GL, counts):
        """The Newton step ``t`` in ``theta`` on the live coordinates ``order`` (rows: the outputs of ``theta``, ``g``),
        and what the line search needs: ``(thL, gL, t, slope)``."""
        alpha = self.alpha
        thL, gL = torch.gather(theta, 1, order), torch.gather(g, 1, order)
        if padded:
            thL, gL = thL.masked_fill(pad, 0.0), gL.masked_fill(pad, 0.0)
        s = torch.sign(thL)
        # the Hessian of the factorised objective at balanced factors, in theta (module docstring):
        # X^T X / n + diag((alpha + g*s) / (2|theta|)), its negative entries (directions of negative curvature of
        # the factors, coefficients that want to grow) set to 0; a tiny ridge, and Levenberg-Marquardt's damping
        size = thL.abs().masked_fill(pad, 1.0) if padded else thL.abs()
        H = GL  # factorised in place of the block's diagonal, restored below (no copy of the block)
        diag = GL.diagonal(dim1=1, dim2=2).clone()
        extra = ((alpha + gL * s) / (2 * size)).clamp(min=0) + 1e-12 * diag.amax(1, keepdim=True) + 1e-300
        if damping is not None:
            extra = extra + damping[:, None] * diag
        H.diagonal(dim1=1, dim2=2).add_(torch.where(pad, 1.0, extra) if padded else extra)
        rhs = -(gL + alpha * s)
        if counts is None:
            t = self._cholesky_solve(H, rhs, diag)
        else:  # each output's live block alone (its top-left corner: live first), not padded to the widest
            t = torch.zeros_like(rhs)
            for j, c in enumerate(counts):
                if c:
                    t[j, :c] = self._cholesky_solve(H[j, :c, :c].unsqueeze(0), rhs[j, :c].unsqueeze(0), diag[j, :c].unsqueeze(0))[0]
        GL.diagonal(dim1=1, dim2=2).copy_(diag)
        t = t.nan_to_num(0.0, 0.0, 0.0)
        return thL, gL, t, -(rhs * t).sum(1)

    @staticmethod
    def _cholesky_solve(H, rhs, diag):
        """``H^{-1} rhs`` for a batch of positive definite ``H`` (k, L, L) (``diag``: the Gram's diagonal, for the
        ridge added where ``H`` is not positive definite in floating point; ``H`` may be changed)."""
        chol, info = torch.linalg.cholesky_ex(H)
        if bool(info.any()):  # not positive definite in floating point: a larger ridge for those outputs
            bump = torch.where((info > 0)[:, None], 1e-8 * diag.amax(1, keepdim=True) + 1e-300, 0.0)
            H.diagonal(dim1=1, dim2=2).add_(bump)
            chol, _ = torch.linalg.cholesky_ex(H)
        # two triangular solves: several times faster than cholesky_solve on a batch
        t = torch.linalg.solve_triangular(chol, rhs.unsqueeze(2), upper=False)
        return torch.linalg.solve_triangular(chol.mT, t, upper=True).squeeze(2)

    def _line_search(self, thL, gL, GL, t, slope):
        """Armijo backtracking on the lasso objective along ``theta + eta*t``, each coefficient stopped at zero where
        it would cross it (the factors' path through the saddle); returns the accepted points, which rows accepted
        one, and the etas. The objective's change is exact for the quadratic data term:
        ``g.D + D^T G D / 2 + alpha*(|theta + D|_1 - |theta|_1)``. The halvings ``eta = 1, 1/2, ..., 2^-(H-1)`` are
        tried ``CANDIDATES`` at a time (one batched product each), the largest accepted ``eta`` winning: the same
        point as trying them one by one, in a few torch operations."""
        k = thL.shape[0]
        accepted = torch.zeros(k, dtype=torch.bool, device=thL.device)
        eta = thL.new_full((k,), 2.0 ** -self.HALVINGS)  # a row that accepts no eta ends as after H halvings
        best = thL
        th, g = thL.unsqueeze(1), gL.unsqueeze(1)
        l1 = thL.abs().sum(1, keepdim=True)
        for start in range(0, self.HALVINGS, self.CANDIDATES):
            count = min(self.CANDIDATES, self.HALVINGS - start)
            etas = torch.pow(0.5, torch.arange(start, start + count, device=thL.device, dtype=thL.dtype))
            trial = torch.addcmul(th, etas[None, :, None], t.unsqueeze(1))  # (k, count, L)
            trial = trial.masked_fill(trial * th < 0, 0.0)
            D = trial - th
            change = ((g + 0.5 * torch.bmm(D, GL)) * D).sum(2) + self.alpha * (trial.abs().sum(2) - l1)
            ok = change <= (self.ARMIJO * slope)[:, None] * etas
            row_ok = ok.any(1) & ~accepted
            if bool(row_ok.any()):
                first = ok.to(torch.int8).argmax(1)  # the largest accepted eta
                pick = trial[torch.arange(k, device=thL.device), first]
                best = torch.where(row_ok[:, None], pick, best)
                eta = torch.where(row_ok, etas[first], eta)
                accepted |= row_ok
                if bool(accepted.all()):
                    break
        return best, accepted, eta

    def solve(self, tol: float, max_steps: int):
        """Newton steps until every output's KKT residual on its set is at most ``tol``, ``max_steps`` steps, or no
        step lowers the objective (those outputs stall and stop). Returns (per-output residuals, stalled)."""
        alpha = self.alpha
        k = self.U.shape[0]
        stalled = torch.zeros(k, dtype=torch.bool, device=self.U.device)
        some_stalled = False
        # the revival's step: 1/trace of the sets' Gram (at most 1/L, a safe proximal-gradient step; its size matters
        # little, as the next Newton step gives a revived coordinate its full step)
        lr = 1.0 / self.sq.sum(1, keepdim=True).clamp(min=torch.finfo(self.sq.dtype).tiny)
        self._block = None
        first = True
        while True:
            theta = self.U * self.W
            kkt = _kkt_rows(theta, self.g, alpha)
            todo = kkt > tol
            if some_stalled:
                todo &= ~stalled
            n_todo = int(todo.sum())
            if self.steps >= max_steps or n_todo == 0:
                return kkt, stalled & (kkt > tol)
            everyone = n_todo == k
            dead = ref.element_dead(self.U, self.W)
            # the first pass of a solve revives the sets' new members that violate |g| <= alpha by the zero pass
            # alone: a Newton step on the old live set (solved in the last round) would leave them to the next step
            revive_only = first and bool((dead & (self.g.abs() > alpha)).any())
            first = False
            if not revive_only:
                self.steps += 1
            live = ~dead if everyone else ~dead & todo[:, None]
            rows_live = live.any(1)
            n_act = 0 if revive_only else int(rows_live.sum())
            new_theta, failed = theta, None
            if n_act:
                self._ensure_gram(live)
                act = None if n_act == k else torch.nonzero(rows_live).squeeze(1)
                order, pad, padded, GL, counts = self._live_block(live, act)
                th, g = (theta, self.g) if act is None else (theta[act], self.g[act])
                damping = None
                if self._damped:
                    damping = self.damping if act is None else self.damping[act]
                thL, gL, t, slope = self._newton_direction(th, g, damping, order, pad, padded, GL, counts)
                best, accepted, eta = self._line_search(thL, gL, GL, t, slope)
                if self._damped or not bool((eta >= 1).all()):
                    # Levenberg-Marquardt: a step the line search had to cut (a near-singular or indefinite model)
                    # raises lambda, a full step lowers it; an output stalls only when even a large lambda fails
                    lam = self.damping if act is None else self.damping[act]
                    lam = torch.where(accepted & (eta >= 1), lam / 10, torch.where(eta < 0.25, (10 * lam).clamp(min=1e-6), lam))
                    lam = lam.masked_fill(lam < 1e-6, 0.0)
                    if act is None:
                        self.damping = lam
                    else:
                        self.damping[act] = lam
                    self._damped = bool(self.damping.any())
                    if not bool(accepted.all()):
                        failed = torch.zeros_like(stalled)
                        failed[slice(None) if act is None else act] = ~accepted & (lam >= 1e6)
                if padded:
                    best = torch.where(pad, torch.gather(th, 1, order), best)
                rows = th.scatter(1, order, best)
                new_theta = rows if act is None else theta.index_copy(0, act, rows)
            # balanced factors of the new theta (|U| = |W| = sqrt|theta|, the penalty's minimum over the
            # factorisations), then spread's exact-zero pass (kernels/reference.py): a coefficient the step stopped
            # at zero is snapped; a dead one is held unless |g| > alpha, which revives it by a proximal-gradient step
            root = new_theta.abs().sqrt()
            U, W = ref.element_zero_pass(torch.sign(new_theta) * root, root, self.g, theta, dead, self.kappa, lr, 0.0)
            if not everyone:  # finished outputs do not move
                keep = ~todo[:, None]
                U, W = torch.where(keep, self.U, U), torch.where(keep, self.W, W)
            if failed is not None:  # stalled: no step lowers the objective and the zero pass changes no zero
                stalled |= failed & ((U == 0) == (self.U == 0)).all(1)
                some_stalled = bool(stalled.any())
            self.U, self.W = U, W
            if everyone:
                self.R = self.cols.residual(U * W)
                self.g = self.cols.grad(self.R)
            else:  # only the outputs that moved
                self.R, self.g = self.cols.update_rows(self.R, self.g, U * W, torch.nonzero(todo).squeeze(1).tolist())


def _output_batches(k: int, n: int, d: int, budget: int = 1 << 26) -> list[slice]:
    """Outputs in batches whose working-set columns (at most ``min(d, 2n)`` per output, ``n`` values each) hold at
    most ``budget`` numbers."""
    per = max(1, budget // (n * min(d, 2 * n)))
    return [slice(i, min(k, i + per)) for i in range(0, k, per)]


@torch.no_grad()
def _working_set_lasso(X, Y, XtY, alpha, tol_abs, max_steps, min_size=10):
    """Lasso on growing per-output working sets; returns ``(W (d, k), kkt, steps, rounds)``.

    ``X``: the (centred) data as a dense tensor or a :class:`_SparseX`. The outputs are solved in batches
    (:func:`_output_batches`); ``steps`` and ``rounds`` are the largest over the batches, each capped at
    ``max_steps``.
    """
    n, d = X.shape
    k = Y.shape[1]
    W = torch.zeros(d, k, dtype=XtY.dtype, device=XtY.device)
    g = -XtY
    sparse = isinstance(X, _SparseX)
    Xt = None if sparse else X.T.contiguous()
    steps, rounds = 0, 0
    for part in _output_batches(k, n, d):
        Yt = Y[:, part].T.contiguous()
        cols = _SparseColumns(X, Yt) if sparse else _DenseColumns(Xt, Yt)
        W[:, part], g[:, part], s, r = _working_sets(cols, W[:, part], g[:, part], alpha, tol_abs, max_steps, min_size)
        steps, rounds = max(steps, s), max(rounds, r)
    kkt = float(ref.element_kkt(W, g, alpha / 2)) if W.numel() else 0.0
    return W, kkt, steps, rounds


def _working_sets(cols, W, g, alpha, tol_abs, max_steps, min_size):
    """The working-set rounds for one batch of outputs (``W``, ``g``: (d, kb)); returns ``(W, g, steps, rounds)``.

    Each round adds to every output's set the features outside it that violate ``|g| <= alpha`` the most (at least
    ``min_size``, and enough for twice the widest output's nonzeros), solves the sets to a KKT residual of
    ``max(tol_abs, 0.1 * the largest violation outside)``, and checks every feature with one product ``X^T R``.
    """
    d, kb = W.shape
    solver = _FactorisedNewton(cols, alpha)
    inside = torch.zeros(kb, d, dtype=torch.bool, device=W.device)
    idx = torch.zeros(kb, 0, dtype=torch.long, device=W.device)
    rounds = 0
    stalled = False
    while True:
        violation = (g.T.abs() - alpha).clamp(min=0)
        kkt = float(ref.element_kkt(W, g, alpha / 2)) if W.numel() else 0.0
        outside = float(violation.masked_fill(inside, 0.0).max()) if W.numel() else 0.0
        m = idx.shape[1]
        if kkt <= tol_abs or solver.steps >= max_steps or rounds >= max_steps or m >= d or (outside <= tol_abs and stalled):
            return W, g, solver.steps, rounds
        # (a solution has at most n nonzeros: more are an inner solve stopped early, not a reason to grow faster)
        nonzeros = min(int((solver.theta != 0).sum(1).max()) if m else 0, cols.n)
        p = min(d - m, max(min_size, 2 * nonzeros - m, nonzeros))
        score = (g.T.abs() - alpha).masked_fill(inside, -math.inf)
        # no more than the violators outside (beyond the tolerance) of the output that has the most: once the sets
        # hold the support, the last rounds add a few features, not another set's worth of inert ones
        p = min(p, max(min_size, int((score > tol_abs).sum(1).max())))
        new = torch.topk(score, p, dim=1).indices  # (kb, p): the worst violators outside the sets
        inside.scatter_(1, new, True)
        idx = torch.cat([idx, new], 1)
        solver.append(new)
        # the sets need not be solved far beyond what the next check of the outside asks (exactly when they are all)
        inner_tol = tol_abs if m + p >= d else max(tol_abs, 0.1 * outside)
        residuals, stalled_rows = solver.solve(inner_tol, max_steps)
        stalled = bool(stalled_rows.any())
        rounds += 1
        W = torch.zeros_like(W).scatter_(0, idx.T, solver.theta.T)
        g = cols.full_grad(solver.R)


# ----------------------------------------------------------------------------------------------------
# one output on the CPU in float64: the same solver in NumPy (a few microseconds per operation, not tens)


def _cholesky_solver():
    """``(factor, solve)`` for a symmetric matrix: LAPACK's ``dpotrf``/``dpotrs`` through SciPy when it is installed
    (a few microseconds a call), else torch's on the same memory."""
    try:
        from scipy.linalg.lapack import dpotrf, dpotrs
    except ImportError:  # SciPy is optional (tests/test_linear.py runs without it)
        def factor(H):
            chol, info = torch.linalg.cholesky_ex(torch.from_numpy(H))
            return chol, int(info)

        def solve(chol, b):
            t = torch.linalg.solve_triangular(chol, torch.from_numpy(b)[:, None], upper=False)
            return torch.linalg.solve_triangular(chol.mT, t, upper=True)[:, 0].numpy()

        return factor, solve

    def factor(H):
        chol, info = dpotrf(H.T, lower=1, clean=0, overwrite_a=1)  # H.T: Fortran order, the same symmetric H
        return chol, info

    def solve(chol, b):
        return dpotrs(chol, b, lower=1)[0]

    return factor, solve


class _NumpyNewton:
    """:class:`_FactorisedNewton` for one output, in NumPy float64: the same steps (the Hessian at balanced factors,
    Levenberg-Marquardt damping, Armijo backtracking stopping coefficients at 0, spread's zero pass), the state held
    as ``theta`` (the factors are balanced after every step: ``U = sign(theta) sqrt|theta|``, ``W = sqrt|theta|``,
    dead where ``theta = 0``). ``Xt``: ``X^T`` (d, n), C-contiguous; ``y``: (n,)."""

    ARMIJO, HALVINGS = _FactorisedNewton.ARMIJO, _FactorisedNewton.HALVINGS

    def __init__(self, Xt: np.ndarray, y: np.ndarray, alpha: float):
        self.Xt, self.y, self.alpha = Xt, y, alpha
        self.n = Xt.shape[1]
        self.idx = np.zeros(0, dtype=np.int64)
        self._cols = np.empty((0, self.n))  # the sets' columns (a buffer with room to grow)
        self.theta = np.zeros(0)
        self.g = np.zeros(0)
        self.sq = np.zeros(0)
        self.R = y.copy()
        self.slot_of = np.zeros(0, dtype=np.int64)
        self._slot_cols = np.empty((0, self.n))
        self._gram = np.zeros((0, 0))
        self.E = 0
        self.damping = 0.0
        self.steps = 0
        self._factor, self._solve = _cholesky_solver()
        self._block = None

    @property
    def Xw(self) -> np.ndarray:
        return self._cols[:self.idx.size]

    def append(self, new: np.ndarray) -> None:
        m, p = self.idx.size, new.size
        if m + p > self._cols.shape[0]:
            cols = np.empty((min(self.Xt.shape[0], max(2 * (m + p), 64)), self.n))
            cols[:m] = self._cols[:m]
            self._cols = cols
        np.take(self.Xt, new, axis=0, out=self._cols[m:m + p])
        fresh = self._cols[m:m + p]
        self.idx = np.concatenate([self.idx, new])
        self.sq = np.concatenate([self.sq, np.einsum("ij,ij->i", fresh, fresh) / self.n])
        self.theta = np.concatenate([self.theta, np.zeros(p)])
        self.g = np.concatenate([self.g, fresh @ self.R / -self.n])
        self.slot_of = np.concatenate([self.slot_of, np.full(p, -1, dtype=np.int64)])

    def _ensure_gram(self, live_pos: np.ndarray) -> None:
        pos = live_pos[self.slot_of[live_pos] < 0]
        P, E = pos.size, self.E
        if P == 0:
            return
        if E + P > self._gram.shape[0]:
            room = max(E + P + (E + P) // 2, 64)
            gram, cols = np.zeros((room, room)), np.empty((room, self.n))
            gram[:E, :E], cols[:E] = self._gram[:E, :E], self._slot_cols[:E]
            self._gram, self._slot_cols = gram, cols
        self._slot_cols[E:E + P] = self.Xw[pos]
        B = self._slot_cols[E:E + P] @ self._slot_cols[:E + P].T / self.n
        self._gram[E:E + P, :E + P] = B
        self._gram[:E, E:E + P] = B[:, :E].T
        self.slot_of[pos] = E + np.arange(P)
        self.E = E + P

    def _live_block(self, live_pos: np.ndarray):
        """``(order, GL)``: the live positions in slot order and their Gram block (a view of the slots' Gram where
        they are consecutive slots, as when no coordinate has died; else two ``take``s). Reused while the live
        coordinates do not change."""
        if self._block is not None and np.array_equal(self._block[0], live_pos):
            return self._block[1]
        slots = self.slot_of[live_pos]
        perm = np.argsort(slots, kind="stable")
        order, slots = live_pos[perm], slots[perm]
        first, L = int(slots[0]), slots.size
        if int(slots[-1]) - first == L - 1:
            GL = self._gram[first:first + L, first:first + L]
        else:
            GL = self._gram.take(slots, 0).take(slots, 1)
        self._block = (live_pos, (order, GL))
        return order, GL

    def _direction(self, thL, gL, GL):
        alpha = self.alpha
        s = np.sign(thL)
        diag = GL.diagonal().copy()
        extra = np.maximum((alpha + gL * s) / (2 * np.abs(thL)), 0.0) + 1e-12 * diag.max() + 1e-300
        if self.damping:
            extra += self.damping * diag
        H = GL.copy()
        H.flat[::H.shape[0] + 1] += extra
        chol, info = self._factor(H)
        if info > 0:  # not positive definite in floating point: a larger ridge
            H = GL.copy()
            H.flat[::H.shape[0] + 1] += extra + (1e-8 * diag.max() + 1e-300)
            chol, info = self._factor(H)
        rhs = -(gL + alpha * s)
        t = np.nan_to_num(self._solve(chol, rhs), nan=0.0, posinf=0.0, neginf=0.0)
        return t, -float(rhs @ t)

    def _line_search(self, thL, gL, GL, t, slope):
        """Armijo backtracking (as :meth:`_FactorisedNewton._line_search`, one halving at a time); returns
        ``(point, accepted, eta)``."""
        l1 = np.abs(thL).sum()
        eta = 1.0
        for _ in range(self.HALVINGS):
            trial = thL + eta * t
            trial[trial * thL < 0] = 0.0
            D = trial - thL
            change = float((gL + 0.5 * (GL @ D)) @ D) + self.alpha * (np.abs(trial).sum() - l1)
            if change <= self.ARMIJO * slope * eta:
                return trial, True, eta
            eta *= 0.5
        return thL, False, 2.0 ** -self.HALVINGS

    def solve(self, tol: float, max_steps: int):
        """Newton steps until the set's KKT residual is at most ``tol`` (as :meth:`_FactorisedNewton.solve`);
        returns ``(kkt, stalled)``."""
        alpha = self.alpha
        lr = 1.0 / max(float(self.sq.sum()), np.finfo(np.float64).tiny)
        self._block = None
        first = True
        while True:
            theta, g = self.theta, self.g
            kkt = _kkt_numpy(theta, g, alpha)
            if self.steps >= max_steps or kkt <= tol:
                return kkt, False
            dead = theta == 0
            revive = dead & (np.abs(g) > alpha)
            revive_only = first and bool(revive.any())
            first = False
            new_theta, failed = theta.copy(), False
            live_pos = np.flatnonzero(~dead)
            if not revive_only:
                self.steps += 1
                if live_pos.size:
                    self._ensure_gram(live_pos)
                    live_pos, GL = self._live_block(live_pos)
                    thL, gL = theta[live_pos], g[live_pos]
                    t, slope = self._direction(thL, gL, GL)
                    best, accepted, eta = self._line_search(thL, gL, GL, t, slope)
                    if self.damping or eta < 1:  # Levenberg-Marquardt, as in _FactorisedNewton.solve
                        lam = self.damping
                        lam = lam / 10 if accepted and eta >= 1 else (max(10 * lam, 1e-6) if eta < 0.25 else lam)
                        self.damping = lam = 0.0 if lam < 1e-6 else lam
                        failed = not accepted and lam >= 1e6
                    new_theta[live_pos] = best
            # spread's zero pass: a coefficient the step stopped at 0 stays there (snapped); a dead one is held unless
            # |g| > alpha, which revives it by a proximal-gradient step
            new_theta[revive] = -np.sign(g[revive]) * (lr * (np.abs(g[revive]) - alpha))
            stalled = failed and np.array_equal(new_theta == 0, dead)
            self.theta = new_theta
            self.R = self.y - self.Xw.T @ new_theta
            self.g = self.Xw @ self.R / -self.n
            if stalled:
                return _kkt_numpy(self.theta, self.g, alpha), True


def _numpy_path(X, Y) -> bool:
    """Whether the fit runs :func:`_working_set_lasso_numpy`: a dense float64 ``X`` on the CPU (where the per-operation
    cost of torch, not the arithmetic, bounds a small fit, and per-output solves need no padding)."""
    return isinstance(X, torch.Tensor) and X.device.type == "cpu" and X.dtype == torch.float64


def _kkt_numpy(theta: np.ndarray, g: np.ndarray, alpha: float) -> float:
    """The largest violation of the lasso's optimality conditions (as :func:`_kkt_rows`, one output)."""
    if theta.size == 0:
        return 0.0
    return float(np.where(theta == 0, np.maximum(np.abs(g) - alpha, 0.0), np.abs(g + alpha * np.sign(theta))).max())


def _working_set_lasso_numpy(Xt: np.ndarray, Yt: np.ndarray, XtY: np.ndarray, alpha, tol_abs, max_steps, min_size=10):
    """:func:`_working_set_lasso` in NumPy float64 (``Xt``: ``X^T`` (d, n) C-contiguous, ``Yt``: ``Y^T`` (k, n),
    ``XtY = X^T Y / n`` (d, k)). Returns ``(W (d, k), kkt, steps, rounds)``. The outputs are solved in the batches of
    :func:`_output_batches`; the rounds of a batch are shared (one product ``X^T R`` checks all its outputs), each
    output's set and solve its own (:func:`_numpy_rounds`)."""
    n, k = Xt.shape[1], Yt.shape[0]
    W, G = np.zeros(XtY.shape), -XtY
    steps = rounds = 0
    for part in _output_batches(k, n, Xt.shape[0]):
        W[:, part], G[:, part], s, r = _numpy_rounds(Xt, Yt[part], G[:, part], alpha, tol_abs, max_steps, min_size)
        steps, rounds = max(steps, s), max(rounds, r)
    kkt = max((_kkt_numpy(W[:, j], G[:, j], alpha) for j in range(k)), default=0.0)
    return W, kkt, steps, rounds


def _numpy_rounds(Xt, Yt, G, alpha, tol_abs, max_steps, min_size):
    """The working-set rounds of :func:`_working_sets` for a batch of outputs, each with its own set (no padding to
    the widest) and its own solve (:class:`_NumpyNewton`); an output stops taking part once it meets ``tol_abs``
    (or its set is every feature, or it stalled with no violator outside). Returns ``(W, G, steps, rounds)``."""
    d, n = Xt.shape
    k = Yt.shape[0]
    solvers = [_NumpyNewton(Xt, Yt[j], alpha) for j in range(k)]
    W, G = np.zeros((d, k)), G.copy()
    inside = np.zeros((k, d), dtype=bool)
    stalled = np.zeros(k, dtype=bool)
    rounds = 0
    while rounds < max_steps:
        moved = []
        for j, solver in enumerate(solvers):
            g = G[:, j]
            kkt = _kkt_numpy(W[:, j], g, alpha)
            score = np.abs(g) - alpha
            score[inside[j]] = -math.inf
            outside = max(float(score.max()), 0.0)
            m = solver.idx.size
            if kkt <= tol_abs or solver.steps >= max_steps or m >= d or (outside <= tol_abs and stalled[j]):
                continue
            # (a solution has at most n nonzeros: more are an inner solve stopped early, not a reason to grow faster)
            nonzeros = min(int(np.count_nonzero(solver.theta)), n)
            p = min(d - m, max(min_size, 2 * nonzeros - m, nonzeros), max(min_size, int((score > tol_abs).sum())))
            new = np.argpartition(-score, p - 1)[:p] if p < d - m else np.flatnonzero(~inside[j])
            new = new[np.argsort(-score[new], kind="stable")]  # the worst first, as torch.topk
            inside[j, new] = True
            solver.append(new)
            inner_tol = tol_abs if m + p >= d else max(tol_abs, 0.1 * outside)
            stalled[j] = solver.solve(inner_tol, max_steps)[1]
            W[:, j] = 0.0
            W[solver.idx, j] = solver.theta
            moved.append(j)
        if not moved:
            break
        rounds += 1
        # one product checks every feature of the outputs that moved
        G[:, moved] = Xt @ np.stack([solvers[j].R for j in moved], 1) / -n
    return W, G, max((s.steps for s in solvers), default=0), rounds


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
            # X^T is kept contiguous, (d, n): a feature's column is one row (the working sets gather rows, X^T R is
            # one product); X is its transposed view. A Fortran-ordered array without centring is used in place.
            Xt = _to_tensor(X, "X", dtype, device).T
            if centre:
                self._x_mean = Xt.mean(1)
                Xt = Xt - self._x_mean[:, None] if Xt.is_contiguous() else Xt.contiguous().sub_(self._x_mean[:, None])
            X = Xt.contiguous().T
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
    """Lasso ``||Y - XW - b||_F^2/(2n) + alpha*||W||_1`` by spread (Newton on the factorised objective over working
    sets, module docstring); ``kappa = alpha/2``.

    ``k`` outputs are ``k`` independent lassos (as ``sklearn.linear_model.Lasso`` with a 2-D ``y``),
    fitted together as one ``(d, k)`` parameter (see the module docstring).

    Args:
        alpha: L1 strength (scikit-learn's ``alpha``; the optimizer's ``2*kappa``), a finite float >= 0; ``0`` is
            least squares (with a warning; module docstring).
        fit_intercept: centre ``X`` and ``Y`` and fit an unpenalised intercept.
        tol: stop when the KKT residual is at most ``tol * alpha_max`` (``alpha_max = max|X^T Y|/n``); >= 0.
        max_iter: cap on Newton steps over all working-set rounds (and on the rounds); without working sets, on
            optimizer steps (each runs up to 10 LBFGS iterations); an int >= 1.
        working_set: Newton steps on growing per-output working sets (module docstring); ``False`` runs
            ``SpreadOptimizer`` with LBFGS on the whole coefficient matrix.
        dtype, device: of the tensors the fit runs on (a floating-point torch or NumPy dtype; a torch device).

    Attributes: ``coef_`` (``(d,)`` or ``(k, d)``), ``intercept_`` (float or ``(k,)``), ``n_iter_``
    (Newton steps; optimizer steps without working sets), ``kkt_residual_`` (the final largest KKT violation,
    absolute), ``n_rounds_`` (working-set rounds; 1 without working sets), ``n_features_in_``
    (``feature_names_in_`` for a DataFrame).
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
        if working_set and alpha > 0 and _numpy_path(X, Y):  # dense, float64, on the CPU
            with torch.no_grad():
                W, kkt, steps, rounds = _working_set_lasso_numpy(
                    X.T.contiguous().numpy(), Y.T.contiguous().numpy(), XtY.numpy(), alpha, tol_abs, max_iter)
            W = torch.from_numpy(W)
        elif working_set and alpha > 0:  # alpha = 0: every feature is in, a working set would only add rounds
            W, kkt, steps, rounds = _working_set_lasso(X, Y, XtY, alpha, tol_abs, max_iter)
        else:
            W0 = torch.zeros(d, Y.shape[1], dtype=XtY.dtype, device=XtY.device)
            W, _, steps, kkt = _solve(lambda P: X @ P, Y, W0, alpha / 2, "element", tol_abs, max_iter, n)
            rounds = 1
        self.n_rounds_ = rounds
        self._finish(W, kkt, tol_abs, steps)
        return self


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
