"""The base class of spread's scikit-learn-style estimators: scikit-learn's ``BaseEstimator`` when it is
installed (clone, pipelines, grid search), else a minimal stand-in with the same parameter convention
(scikit-learn is a test and benchmark dependency only)."""

from __future__ import annotations

try:
    from sklearn.base import BaseEstimator

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
