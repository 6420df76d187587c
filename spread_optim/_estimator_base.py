"""The base of spread's scikit-learn-style estimators and their one set of input checks.

scikit-learn is a test and benchmark dependency only. When it is installed the estimators subclass its
``BaseEstimator`` (clone, pipelines, grid search) and their data goes through its own ``validate_data`` /
``check_array`` (its messages, ``n_features_in_``, ``feature_names_in_``, sparse formats); ``predict`` before
``fit`` raises its ``NotFittedError``. Without it, minimal stand-ins keep the same conventions and messages.

The checks the estimators share, each in one place:

* :func:`check_param`: a constructor parameter, at ``fit`` (as scikit-learn validates): its type, range and
  finiteness, NumPy scalars included; returns it as a plain Python ``float``/``int``/``bool``;
* :func:`validate_fit_data` / :func:`validate_X`: ``X`` (and ``y``) at ``fit`` / after it;
* :func:`keeps_state_on_error`: a ``fit`` that raises leaves the estimator's attributes as they were (a
  previous fit's results included).
"""

from __future__ import annotations

import functools
import math
import numbers
import sys

import numpy as np
import torch

try:
    from sklearn.base import BaseEstimator
    from sklearn.exceptions import ConvergenceWarning, NotFittedError
    from sklearn.utils import check_array as _check_array
    from sklearn.utils import check_consistent_length
    from sklearn.utils.validation import check_is_fitted
    from sklearn.utils.validation import validate_data as _validate_data

    HAS_SKLEARN = True
except ImportError:  # pragma: no cover - exercised in a subprocess without scikit-learn
    HAS_SKLEARN = False

    class BaseEstimator:  # type: ignore[no-redef]
        """``get_params``/``set_params`` over the names in ``_param_names`` (scikit-learn's convention)."""

        def get_params(self, deep: bool = True) -> dict:
            return {k: getattr(self, k) for k in self._param_names}

        def set_params(self, **params):
            for k, v in params.items():
                if k not in self._param_names:
                    raise ValueError(f"invalid parameter {k!r} for {type(self).__name__}")
                setattr(self, k, v)
            return self

        def __repr__(self) -> str:
            return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    class NotFittedError(ValueError, AttributeError):  # type: ignore[no-redef]
        """scikit-learn's: raised by ``predict``/``transform`` before ``fit``."""

    class ConvergenceWarning(UserWarning):  # type: ignore[no-redef]
        """scikit-learn's: the solver stopped before its tolerance."""

    def check_is_fitted(estimator, attributes=None):  # type: ignore[no-redef]
        names = [attributes] if isinstance(attributes, str) else attributes
        fitted = (all(hasattr(estimator, a) for a in names) if names is not None
                  else any(v.endswith("_") and not v.startswith("__") for v in vars(estimator)))
        if not fitted:
            raise NotFittedError(f"This {type(estimator).__name__} instance is not fitted yet. Call 'fit' with "
                                 "appropriate arguments before using this estimator.")

    def check_consistent_length(*arrays):  # type: ignore[no-redef]
        lengths = [a.shape[0] if hasattr(a, "shape") else len(a) for a in arrays if a is not None]
        if len(set(lengths)) > 1:
            raise ValueError(f"Found input variables with inconsistent numbers of samples: {lengths}")

    def _check_array(A, *, accept_sparse=False, ensure_2d=True, dtype=None, input_name="", estimator=None):
        """The part of scikit-learn's ``check_array`` these estimators use (numeric, 1-D/2-D, non-empty, finite)."""
        who = f" by {type(estimator).__name__}" if estimator is not None else ""
        sparse = issparse(A)
        if sparse and not accept_sparse:
            raise TypeError(f"Sparse data was passed for {input_name}, but dense data is required. Use '.toarray()' "
                            "to convert to a dense numpy array.")
        A = (A if A.format in accept_sparse else A.tocsr()) if sparse else np.asarray(A)
        values = A.data if sparse else A
        if values.dtype.kind == "c":
            raise ValueError("Complex data not supported")
        if dtype is not None and values.dtype != np.float32:
            try:
                A = A.astype(np.float64)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{input_name} must be numeric: {e}") from None
            values = A.data if sparse else A
        if A.ndim == 0 or A.ndim > 2 or (ensure_2d and A.ndim != 2):
            raise ValueError(f"Expected {'a 2D' if ensure_2d else 'a 1D or 2D'} array for {input_name}, got a "
                             f"{A.ndim}D array (shape={A.shape}) instead")
        if A.shape[0] < 1:
            raise ValueError(f"Found array with 0 sample(s) (shape={A.shape}) while a minimum of 1 is required{who}.")
        if A.ndim == 2 and A.shape[1] < 1:
            raise ValueError(f"Found array with 0 feature(s) (shape={A.shape}) while a minimum of 1 is required{who}.")
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            kind = "NaN" if np.isnan(values).any() else f"infinity or a value too large for {values.dtype!r}"
            raise ValueError(f"Input {input_name} contains {kind}.")
        return A


def issparse(A) -> bool:
    """Whether ``A`` is a SciPy sparse matrix/array (without importing SciPy: if it is not loaded, ``A`` is not one)."""
    sparse = sys.modules.get("scipy.sparse")
    return sparse is not None and sparse.issparse(A)


# ----------------------------------------------------------------------------------------------------
# parameters


class InvalidParameterError(ValueError, TypeError):
    """A constructor parameter with a wrong type or value (as scikit-learn's, a ``ValueError`` and a ``TypeError``)."""


def check_param(estimator, name: str, kind: str, low=None, *, strict: bool = False, allow_none: bool = False):
    """Parameter ``name`` of ``estimator`` checked and returned as a plain Python value (NumPy scalars accepted).

    ``kind``: ``"real"`` (a finite real number, not a bool), ``"int"`` (an integral number, not a bool) or ``"bool"``
    (``bool`` or ``numpy.bool_``); ``low``: the smallest value allowed (excluded with ``strict``); ``allow_none``:
    ``None`` passes (and is returned).
    """
    value = getattr(estimator, name)
    if value is None and allow_none:
        return None
    is_bool = isinstance(value, (bool, np.bool_))
    if kind == "bool":
        ok, what = is_bool, "a bool"
    elif kind == "int":
        ok, what = isinstance(value, numbers.Integral) and not is_bool, "an int"
    else:
        ok = isinstance(value, numbers.Real) and not is_bool and math.isfinite(value)
        what = "a finite float"
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low}"
        none = "None or " if allow_none else ""
        raise InvalidParameterError(f"The {name!r} parameter of {type(estimator).__name__} must be {none}{what}{bound}. "
                                    f"Got {value!r} instead.")
    return {"bool": bool, "int": int, "real": float}[kind](value)


# ----------------------------------------------------------------------------------------------------
# data

#: the float dtypes data is validated to (float32 stays float32, everything else becomes float64)
FLOATS = [np.float64, np.float32]


def as_numpy(A):
    """A torch tensor as a NumPy array (detached, on the CPU; bfloat16 as float64); anything else unchanged."""
    if not isinstance(A, torch.Tensor):
        return A
    if A.layout != torch.strided:
        raise TypeError(f"torch sparse tensors ({A.layout}) are not supported: pass a scipy.sparse matrix or a dense tensor")
    A = A.detach().cpu().resolve_conj()
    return (A.double() if A.dtype == torch.bfloat16 else A).numpy()  # NumPy has no bfloat16


def _check_n_features(estimator, X, reset: bool) -> None:
    """``n_features_in_``: set (``reset``) or compared with ``X`` (scikit-learn's message); without scikit-learn."""
    if reset:
        estimator.n_features_in_ = X.shape[1]
    elif X.shape[1] != estimator.n_features_in_:
        raise ValueError(f"X has {X.shape[1]} features, but {type(estimator).__name__} is expecting "
                         f"{estimator.n_features_in_} features as input.")


def validate_fit_data(estimator, X, y, *, reset: bool = True, accept_sparse: bool = False, regression: bool = False):
    """``(X, y)`` for ``fit``, or a ``ValueError`` (``TypeError`` for sparse data where dense is needed) naming the problem.

    ``X``: a 2-D array-like (NumPy, torch tensor, pandas, lists; SciPy sparse with ``accept_sparse``, as CSR or CSC)
    of numbers, at least one sample and one feature, finite; returned as float64 (float32 stays float32). ``y``:
    required, one entry per sample, finite; ``regression``: numbers, shape ``(n,)`` or ``(n, k)``, returned as
    float64; else class labels, shape ``(n,)``. ``reset``: ``n_features_in_`` (and ``feature_names_in_``) are set
    from ``X``, else ``X`` must have the fitted number of features.
    """
    X, y = as_numpy(X), as_numpy(y)
    sparse = ["csr", "csc"] if accept_sparse else False
    if HAS_SKLEARN:
        X, y = _validate_data(estimator, X, y, reset=reset, accept_sparse=sparse, dtype=FLOATS,
                              multi_output=regression, y_numeric=regression)
    else:
        if y is None:
            raise ValueError(f"{type(estimator).__name__} requires y to be passed, but the target y is None.")
        X = _check_array(X, accept_sparse=sparse, dtype=FLOATS, input_name="X", estimator=estimator)
        y = _check_array(y, ensure_2d=False, input_name="y", estimator=estimator)
        if y.ndim != 1 and not regression:
            raise ValueError(f"y should be a 1d array, got an array of shape {y.shape} instead.")
        check_consistent_length(X, y)
        _check_n_features(estimator, X, reset)
    if regression:  # numbers as floats (strings fail here, as in scikit-learn's Lasso), at least one output
        y = _check_array(y, ensure_2d=False, dtype=FLOATS, input_name="y", estimator=estimator).astype(np.float64, copy=False)
    return X, y


def validate_X(estimator, X, *, accept_sparse: bool = False):
    """``X`` for ``predict``/``transform``: ``NotFittedError`` before ``fit``, then the checks of
    :func:`validate_fit_data` and the fitted number of features."""
    check_is_fitted(estimator)
    X = as_numpy(X)
    sparse = ["csr", "csc"] if accept_sparse else False
    if HAS_SKLEARN:
        return _validate_data(estimator, X, reset=False, accept_sparse=sparse, dtype=FLOATS)
    X = _check_array(X, accept_sparse=sparse, dtype=FLOATS, input_name="X", estimator=estimator)
    _check_n_features(estimator, X, reset=False)
    return X


def keeps_state_on_error(fit):
    """Decorate ``fit``: when it raises (bad input, a diverging fit, an interrupt) the estimator's attributes are
    restored to what they were before the call, so a previously fitted estimator is left exactly as it was.

    The restore is of the attributes themselves (a shallow copy). Every check runs before any training, so bad
    input moves nothing; but a warm-started fit that fails *while training* (a diverging loss, an interrupt) leaves
    the updates its model and optimizer, trained in place, received before the error.
    """

    @functools.wraps(fit)
    def guarded(self, *args, **kwargs):
        saved = dict(self.__dict__)
        try:
            return fit(self, *args, **kwargs)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    return guarded
