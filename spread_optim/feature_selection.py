r"""``SpreadFeatureSelector``: feature selection by a group lasso over input features, fitted by spread.

A classifier is trained on all features with one *shared* factor per input feature (the paper's ensemble
feature selection):

* ``hidden_sizes=()``: softmax regression ``logits = X A^T + a``; the columns of ``A`` (one per feature,
  across the classes) are the groups;
* ``hidden_sizes=(h1, ...)``: an ensemble of that linear model and an MLP ``X -> h1 -> ... -> classes``
  (ReLU). The column ``j`` of the linear model's weight *and* of the MLP's first-layer weight form one
  group: :class:`~spread_optim.SpreadOptimizer` with ``sparsity="column"``, ``share_groups=True`` gives
  both one scalar ``u_j`` (``theta[:, j] = u_j * W[:, j]`` in both layers), so a feature is kept or dropped
  by both models at once. The loss is the sum of the two models' cross-entropies.

The objective (mean cross-entropy over the samples, summed over the models) is::

    CE(linear) [+ CE(MLP)]  +  2*kappa * sum_j || (A[:, j], B1[:, j]) ||_2

(``B1`` the MLP's first layer), plus ``weight_decay/2 * ||B||^2`` on the MLP's deeper weights ``B`` (an L2
penalty, so that the first layer cannot evade the group lasso by shrinking while the next layer grows: ReLU
is positively homogeneous); the biases are not penalised. Base rule: Adam
(``lr``), full batch (``batch_size=None``) or shuffled mini-batches, for ``max_epochs`` passes. Spread
makes exact zeros: a feature whose group is zero at the end of the fit is not used by the model at all.

Selection: ``feature_importances_[j]`` is the norm of feature ``j``'s group, ``||(A[:, j], B1[:, j])||_2``
(at a minimum of the smooth objective this is ``u_j**2``: ``|u_j| = ||W_g||``). With
``n_features_to_select=None`` every feature with a nonzero group is selected; with an int ``k`` the ``k``
largest (ties by index; if fewer than ``k`` groups are nonzero, zeros fill up the rest and a warning says
so).

Preprocessing. ``standardize=True`` (default) scales every feature to zero mean and unit variance on the
training data inside ``fit`` (the statistics are kept in ``mean_``/``scale_`` and applied by
``predict``); ``kappa`` then means the same for every feature, whatever its units: the statistics are
computed on each feature divided by a power of two near its largest magnitude (exact, and no overflow for
features near 1e300, no false "constant" for features near 1e-14); a feature is constant when its
standard deviation is at most 1e-12 of its largest magnitude (it is then scaled by that magnitude: ~0 once
centred). With ``standardize=False`` the user must
standardise (``make_pipeline(StandardScaler(), SpreadFeatureSelector(standardize=False))``): the group
lasso is not scale invariant, a feature with a large scale is cheaper to keep.

scikit-learn. The selector follows scikit-learn's selector API (``fit``/``transform``/``get_support``/
``inverse_transform``/``get_feature_names_out``, ``clone``, pipelines, grid search). scikit-learn is not a
dependency of the package: when it is importable the class subclasses ``sklearn.base.BaseEstimator`` and
``sklearn.feature_selection.SelectorMixin`` and validates its input with scikit-learn's own checks;
without it a minimal built-in base provides ``get_params``/``set_params``, ``get_support``, ``transform``,
``fit_transform`` and ``inverse_transform`` over NumPy arrays. Parameters are checked at ``fit``; data is
checked by :mod:`spread_optim._estimator_base` (scikit-learn's checks and messages); a ``fit`` that raises
leaves the selector as it was.

Reproducibility. With an int ``random_state`` the fit is deterministic (the initial weights and the
mini-batch order come from one ``torch.Generator``; the global torch RNG is not touched), for a given
number of torch threads.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings

import numpy as np
import torch

from spread_optim._estimator_base import HAS_SKLEARN
from spread_optim._estimator_base import BaseEstimator as _Base
from spread_optim._estimator_base import check_consistent_length, check_is_fitted, check_param, keeps_state_on_error
from spread_optim._estimator_base import validate_fit_data, validate_X
from spread_optim.dropins import SpreadAdam

try:  # scikit-learn is optional (test/bench dependency): with it the selector is a full scikit-learn estimator
    from sklearn.feature_selection import SelectorMixin as _Selector
    from sklearn.utils.multiclass import check_classification_targets as _check_targets
except ImportError:  # pragma: no cover - exercised only without scikit-learn

    class _Selector:  # type: ignore[no-redef]
        """The part of ``sklearn.feature_selection.SelectorMixin`` a NumPy user needs."""

        def get_support(self, indices: bool = False):
            mask = self._get_support_mask()
            return np.flatnonzero(mask) if indices else mask

        def transform(self, X):
            X = validate_X(self, X)
            return X[:, self.get_support()]

        def fit_transform(self, X, y=None, **fit_params):
            return self.fit(X, y, **fit_params).transform(X)

        def inverse_transform(self, X):
            X = np.asarray(X)
            support = self.get_support()
            if X.ndim != 2 or X.shape[1] != support.sum():
                raise ValueError(f"X must have shape (n_samples, {support.sum()}), got {X.shape}")
            out = np.zeros((X.shape[0], support.size), dtype=X.dtype)
            out[:, support] = X
            return out

    def _check_targets(y):
        if np.asarray(y).dtype.kind == "f" and not np.all(np.asarray(y) == np.round(np.asarray(y))):
            raise ValueError("Unknown label type: continuous targets; SpreadFeatureSelector is for classification")


class SpreadFeatureSelector(_Selector, _Base):
    """Select input features with a group lasso over them (one shared spread factor per feature).

    Args:
        n_features_to_select: ``None`` (default): every feature whose group is nonzero after the fit; an
            int ``k >= 1``: the ``k`` features with the largest ``feature_importances_``.
        kappa: strength of the group lasso, ``2*kappa*sum_j ||group_j||`` added to the mean cross-entropy
            (summed over the ensemble's two models). Larger kappa, fewer features.
        hidden_sizes: ``()`` (default): softmax regression only; a tuple of widths: the linear model plus an
            MLP with these hidden layers, their first layers sharing one factor per feature.
        weight_decay: L2 (Adam's coupled ``weight_decay``) on the MLP's weights after its first layer (not on
            biases). Without it the group lasso on the first layer is no constraint for a ReLU network: the
            first layer can shrink while the next one grows. No effect with ``hidden_sizes=()``.
        lr: Adam's learning rate (on the spread factors and on the dense parameters).
        max_epochs: passes over the training data (full batch: optimizer steps).
        batch_size: ``None`` (default): full batch; an int: shuffled mini-batches of that size. Mini-batch
            gradients are noisy: groups near the threshold ``2*kappa`` keep being revived and re-zeroed, so
            fewer features are exactly zero than with full batch (see the README).
        init: ``"zero"`` (default): the shared first layers start at exactly zero, on spread's saddle, and a
            feature enters when its group's gradient norm exceeds ``2*kappa`` (spread's KKT revival), so the
            model is sparse from the first epoch (as a lasso path); ``"random"``: ``torch.nn.Linear``'s
            uniform init, every feature starts in and the penalty drives the useless ones to zero. From zero
            the MLP's first gradient only sees each feature's linear association with the labels (all hidden
            units see the same input); a feature whose effect is purely an interaction (XOR) may need
            ``"random"``.
        standardize: scale the features to zero mean and unit variance on the training data inside ``fit``
            (default). With ``False`` the features are used as given (standardise them yourself).
        warm_start: with ``True`` a second ``fit`` on data with the same features and classes continues from
            the current model and optimizer state for another ``max_epochs`` epochs (as
            ``sklearn.neural_network.MLPClassifier``); e.g. for early stopping on held-out data. ``kappa``,
            ``lr`` and ``weight_decay`` may change between the fits; ``hidden_sizes`` and ``standardize`` may not.
        working_set: ``False`` (default): every epoch updates all features. ``True`` (full batch only): the
            optimizer sees only a working set of features (the nonzero groups plus the zero groups that violate
            their optimality condition ``||g_j|| <= 2*kappa`` most, at most ``max(128, number of nonzero groups)``
            added at a time); every 25 epochs one forward/backward over all features checks the condition of every
            feature and grows the set when one outside it fails. The same objective; much cheaper epochs when few
            features are selected (2-4x faster on the gene sets), slightly different trajectory (the spread
            factors restart, balanced, when the set grows; the dense parameters keep their Adam state). The
            working set's first layers are stacked into one tensor (the linear model's rows over the MLP's: the
            same column groups), so each step handles one shared-factor tensor instead of two: on the small gene
            sets a step is mostly per-tensor overhead, and this makes it 1.2-1.4x faster.
        random_state: ``None``, an int or a ``numpy.random.RandomState``: the initial weights and mini-batch
            order. An int makes ``fit`` deterministic.

    Attributes (after ``fit``): ``feature_importances_`` (``(n_features,)``, the group norms, exactly 0 for
    dropped features), ``n_features_in_``, ``feature_names_in_`` (with a DataFrame), ``classes_``,
    ``n_selected_features_`` (features with a nonzero group), ``mean_``/``scale_`` (standardisation; zeros
    and ones with ``standardize=False``), ``loss_curve_`` (objective = loss + penalty per epoch),
    ``n_iter_`` (epochs run, over all warm-started fits), ``model_`` (the fitted ``torch.nn.Module``; its
    ``forward`` returns the list of the ensemble's logits on standardised inputs).

    ``predict_proba`` averages the ensemble's softmax probabilities, ``predict`` takes their argmax and
    ``score`` is the accuracy: the classifier trained for the selection, on all features (the dropped ones
    have zero weight).
    """

    _param_names = ("n_features_to_select", "kappa", "hidden_sizes", "weight_decay", "lr", "max_epochs", "batch_size", "init",
                    "standardize", "warm_start", "working_set", "random_state")

    def __init__(self, n_features_to_select=None, *, kappa=0.02, hidden_sizes=(), weight_decay=1e-2, lr=0.01,
                 max_epochs=300, batch_size=None, init="zero", standardize=True, warm_start=False, working_set=False,
                 random_state=None):
        self.n_features_to_select = n_features_to_select
        self.kappa = kappa
        self.hidden_sizes = hidden_sizes
        self.weight_decay = weight_decay
        self.lr = lr
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.init = init
        self.standardize = standardize
        self.warm_start = warm_start
        self.working_set = working_set
        self.random_state = random_state

    # ------------------------------------------------------------------------------------------------
    # validation

    def _check_params(self) -> tuple[int, ...]:
        """Every parameter checked (at ``fit``, as scikit-learn does); returns ``hidden_sizes`` as a tuple of ints."""
        check_param(self, "kappa", "real", 0)
        check_param(self, "lr", "real", 0, strict=True)
        check_param(self, "weight_decay", "real", 0)
        check_param(self, "max_epochs", "int", 1)
        check_param(self, "batch_size", "int", 1, allow_none=True)
        check_param(self, "n_features_to_select", "int", 1, allow_none=True)
        for name in ("standardize", "warm_start", "working_set"):
            check_param(self, name, "bool")
        hidden = self.hidden_sizes
        if hidden is None:
            hidden = ()
        if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
            hidden = (hidden,)
        try:
            hidden = tuple(hidden)
        except TypeError:
            raise ValueError(f"hidden_sizes must be a tuple of ints >= 1, got {self.hidden_sizes!r}") from None
        if any(isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1 for h in hidden):
            raise ValueError(f"hidden_sizes must be a tuple of ints >= 1, got {self.hidden_sizes!r}")
        if not isinstance(self.init, str) or self.init not in ("zero", "random"):
            raise ValueError(f"init must be 'zero' or 'random', got {self.init!r}")
        if self.working_set and self.batch_size is not None:
            raise ValueError("working_set=True needs full batch (batch_size=None)")
        return tuple(int(h) for h in hidden)

    # ------------------------------------------------------------------------------------------------
    # fitting

    def _build(self, d: int, k: int, hidden: tuple[int, ...], generator: torch.Generator) -> "_Ensemble":
        model = _Ensemble(d, k, hidden)
        with torch.no_grad():  # nn.Linear's default init (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), from our generator
            for layer in model.modules():
                if isinstance(layer, torch.nn.Linear):
                    bound = 1 / math.sqrt(layer.in_features)
                    layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
                    layer.bias.copy_(torch.rand(layer.bias.shape, generator=generator) * 2 * bound - bound)
            if self.init == "zero":
                for layer in model.first_layers():
                    layer.weight.zero_()
        return model

    def _make_optimizer(self, model: "_Ensemble") -> SpreadAdam:
        shared = [model.first_layers()[i].weight for i in range(len(model.first_layers()))]
        dense = [p for p in model.parameters() if all(p is not s for s in shared)]
        decay = [p for p in dense if p.dim() > 1]  # the MLP's deeper weights: L2, so that the group lasso is
        free = [p for p in dense if p.dim() <= 1]  # not evaded by shrinking the first layer and growing the next
        groups = [{"params": shared, "kappa": self._group_kappa(), "sparsity": "column", "share_groups": True}]
        # the dense groups on CPU: torch's fused Adam (one kernel per group instead of a loop over the tensors;
        # the same update): for the small models of the gene sets the optimizer's per-tensor overhead is most of a step
        cpu = all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in dense)
        fused = {"fused": True} if cpu else {}
        if decay:
            groups.append({"params": decay, "kappa": 0.0, "weight_decay": float(self.weight_decay), **fused})
        if free:
            groups.append({"params": free, "kappa": 0.0, **fused})
        return SpreadAdam(groups, lr=float(self.lr))

    def _group_kappa(self) -> float:
        # kappa=0 in the shared group would make it a dense group: a tiny kappa keeps the factors (and the
        # exact-zero machinery) while being no penalty at all in practice
        return float(self.kappa) if self.kappa > 0 else 1e-12

    def _set_hyperparameters(self, optimizer: SpreadAdam) -> None:
        """``lr``, ``kappa`` and ``weight_decay`` from the current parameters (they may change between warm-started fits)."""
        shared, *dense = optimizer.param_groups
        shared["kappa"] = self._group_kappa()
        for g in optimizer.param_groups:
            g["lr"] = float(self.lr)
        for g in dense:
            if any(p.dim() > 1 for p in g["params"]):  # the MLP's deeper weights
                g["weight_decay"] = float(self.weight_decay)

    @keeps_state_on_error
    def fit(self, X, y):
        """Train the classifier on ``X`` (``(n_samples, n_features)``) and labels ``y``; select features."""
        hidden = self._check_params()
        continuing = self.warm_start and hasattr(self, "model_")
        X, y = validate_fit_data(self, X, y, reset=not continuing)
        _check_targets(y)
        classes, y_idx = np.unique(y, return_inverse=True)
        if continuing:
            same = (np.array_equal(classes, self.classes_) and self._hidden == hidden
                    and getattr(self, "_standardize", self.standardize) == self.standardize)
            if not same:
                raise ValueError("warm_start=True: the classes, hidden_sizes and standardize must be those of the previous fit")
        elif len(classes) < 2:
            raise ValueError(f"y must contain at least 2 classes, got 1 class ({classes.tolist()!r})")
        n, d = X.shape
        if self.n_features_to_select is not None and self.n_features_to_select > d:
            raise ValueError(f"n_features_to_select={self.n_features_to_select} is larger than the number of features ({d})")
        if not continuing:
            self.classes_ = classes
            self._hidden = hidden
            self._standardize = bool(self.standardize)
            self.mean_, self.scale_ = _standardisation(X) if self.standardize else (np.zeros(d), np.ones(d))
            seed = _seed_from(self.random_state)
            self._generator = torch.Generator().manual_seed(seed)
            self.model_ = self._build(d, len(classes), hidden, self._generator)
            self._optimizer = self._make_optimizer(self.model_)
            self.loss_curve_ = []
            self.n_iter_ = 0
            self._ws = None
        else:
            self._set_hyperparameters(self._optimizer)  # they may have been changed by set_params
            self.loss_curve_ = list(self.loss_curve_)  # appended to: a failed fit restores the previous list
        Xt = self._input(X)
        yt = torch.as_tensor(y_idx, dtype=torch.long)
        if self.working_set:
            self._fit_working_set(Xt, yt)
        else:
            self._fit_all(Xt, yt)
        model = self.model_
        with torch.no_grad():
            sq = sum(layer.weight.detach().double().pow(2).sum(0) for layer in model.first_layers())
        self.feature_importances_ = sq.sqrt().numpy()
        self.n_selected_features_ = int((self.feature_importances_ > 0).sum())
        if self.n_features_to_select is not None and self.n_selected_features_ < self.n_features_to_select:
            warnings.warn(
                f"only {self.n_selected_features_} features have a nonzero group, fewer than "
                f"n_features_to_select={self.n_features_to_select}: features with zero importance fill up the "
                "selection (lower kappa to select more)", UserWarning, stacklevel=3,  # fit, keeps_state_on_error
            )
        return self

    def _fit_all(self, Xt: torch.Tensor, yt: torch.Tensor) -> None:
        """``max_epochs`` epochs of the optimizer over all features (full batch or mini-batches)."""
        n = Xt.shape[0]
        batch = n if self.batch_size is None else min(int(self.batch_size), n)
        model, optimizer = self.model_, self._optimizer
        model.train()
        for _ in range(int(self.max_epochs)):
            order = torch.randperm(n, generator=self._generator) if batch < n else None
            total = 0.0
            for start in range(0, n, batch):
                idx = order[start: start + batch] if order is not None else slice(None)
                xb, yb = Xt[idx], yt[idx]
                total += _train_step(model, optimizer, xb, yb) * (xb.shape[0] / n)
            self.loss_curve_.append(total + optimizer.penalty())
            self.n_iter_ += 1

    #: working set: epochs between two KKT checks over all features, and the fewest zero groups added at a time
    _WS_CHECK_EVERY = 25
    _WS_MIN_ADD = 128

    def _fit_working_set(self, Xt: torch.Tensor, yt: torch.Tensor) -> None:
        """``max_epochs`` full-batch epochs on a working set of features (as lasso solvers do).

        The optimizer only sees the columns of a *working set*: the features whose group is nonzero plus the zero
        groups that violate their optimality condition ``||g_j|| <= 2*kappa`` most (``g_j`` the gradient of the
        loss with respect to feature ``j``'s group, from one forward/backward over all features). Every
        ``_WS_CHECK_EVERY`` epochs the condition is checked over all features; when zero groups outside the set
        violate it, the set is rebuilt from the nonzero groups plus the violators, the largest first, at most
        ``max(_WS_MIN_ADD, number of nonzero groups)`` of them (the set at most doubles). A feature outside the set
        has an exactly zero group and no violation at the last check: the fit ends at a point that satisfies the
        optimality conditions of every feature outside the set, up to ``_WS_CHECK_EVERY`` epochs of drift. On a
        rebuild the spread factors restart (balanced, from the current weights: the same model) and the dense
        parameters keep their Adam state.
        """
        epochs, done = int(self.max_epochs), 0
        model = self.model_
        while done < epochs:
            self._ws_update(Xt, yt)
            active, sub, optimizer = self._ws
            self._set_hyperparameters(optimizer)
            xa = Xt[:, active]
            sub.train()
            for _ in range(min(self._WS_CHECK_EVERY, epochs - done)):
                loss = _train_step(sub, optimizer, xa, yt)
                self.loss_curve_.append(loss + optimizer.penalty())
                self.n_iter_ += 1
                done += 1
            sub.write_back(model, active)  # the full model: the working set's columns, exact zeros elsewhere

    def _ws_update(self, Xt: torch.Tensor, yt: torch.Tensor) -> None:
        """Check every feature's optimality condition; rebuild the working set when zero groups outside it violate it."""
        kappa = self._group_kappa()
        model = self.model_
        firsts = model.first_layers()
        for layer in firsts:
            layer.weight.grad = None
        with torch.enable_grad():
            weights = [layer.weight for layer in firsts]
            loss = sum(torch.nn.functional.cross_entropy(out, yt) for out in model(Xt))
            grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            gnorm = torch.sqrt(sum(g.pow(2).sum(0) for g in grads))
            wnorm = torch.sqrt(sum(w.pow(2).sum(0) for w in weights))
            nonzero = wnorm > 0
            inside = torch.zeros_like(nonzero)
            if self._ws is not None:
                inside[self._ws[0]] = True
            violators = torch.nonzero(~nonzero & ~inside & (gnorm > 2 * kappa)).flatten()
        if self._ws is not None and violators.numel() == 0:
            return
        keep = max(self._WS_MIN_ADD, int(nonzero.sum()))
        violators = violators[torch.argsort(gnorm[violators], descending=True, stable=True)[:keep]]
        active = torch.sort(torch.cat([torch.nonzero(nonzero).flatten(), violators])).values
        if active.numel() == 0:  # nothing violates: keep one feature so that the model has an input
            active = torch.argmax(gnorm).reshape(1)
        old = self._ws
        # the stacked sub-model: one first layer (the linear model's rows, then the MLP's) over the working set's
        # columns, its bias kept from the last working set (with its Adam state); the MLP's deeper layers are the
        # full model's modules, trained in place
        bias = old[1].first.bias if old is not None else None
        sub = _Stacked(model, active, bias)
        optimizer = self._make_optimizer(sub)
        if old is not None:  # the dense parameters are the same tensors: keep their Adam state
            for p in sub.parameters():
                if p is not sub.first.weight and p in old[2].state:
                    optimizer.state[p] = old[2].state[p]
        self._ws = (active, sub, optimizer)

    def _input(self, X: np.ndarray) -> torch.Tensor:
        """``X`` standardised with the fitted statistics, as the model's float32 input (a clear error if it overflows)."""
        with np.errstate(over="ignore"):
            Xt = torch.as_tensor((X - self.mean_) / self.scale_, dtype=torch.float32)
        if not torch.isfinite(Xt).all():
            raise ValueError(f"X does not fit the model's float32 input once standardised with mean_ and scale_ (largest "
                             f"|X| = {np.abs(X).max():.3g}): rescale it (or standardize=True)")
        return Xt

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "feature_importances_")
        imp = self.feature_importances_
        if self.n_features_to_select is None:
            return imp > 0
        k = min(int(self.n_features_to_select), imp.size)
        mask = np.zeros(imp.size, dtype=bool)
        mask[np.argsort(-imp, kind="stable")[:k]] = True
        return mask

    # ------------------------------------------------------------------------------------------------
    # the classifier trained for the selection

    def predict_proba(self, X) -> np.ndarray:
        """Mean of the ensemble's softmax probabilities, ``(n_samples, n_classes)``."""
        Xt = self._input(validate_X(self, X))
        self.model_.eval()
        with torch.no_grad():
            probs = [torch.softmax(out, dim=1) for out in self.model_(Xt)]
        return (sum(probs) / len(probs)).double().numpy()

    def predict(self, X) -> np.ndarray:
        """The class of highest mean probability (``classes_`` labels)."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def score(self, X, y) -> float:
        """Accuracy of :meth:`predict`."""
        pred = self.predict(X)
        check_consistent_length(pred, y)
        return float(np.mean(pred == np.asarray(y)))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True  # fit needs labels
        tags.non_deterministic = self.random_state is None
        return tags

    def __getstate__(self):
        state = self.__dict__.copy()
        if "_generator" in state:  # torch.Generator cannot be pickled: keep its state
            state["_generator"] = state["_generator"].get_state()
        return state

    def __setstate__(self, state):
        gen = state.get("_generator")
        if isinstance(gen, torch.Tensor):
            g = torch.Generator()
            g.set_state(gen)
            state["_generator"] = g
        self.__dict__.update(state)

    def __deepcopy__(self, memo):
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone


class _Ensemble(torch.nn.Module):
    """The linear model and (with hidden sizes) the MLP; ``forward`` returns the list of their logits."""

    def __init__(self, d: int, k: int, hidden: tuple[int, ...]):
        super().__init__()
        self.linear = torch.nn.Linear(d, k)
        self.mlp = None
        if hidden:
            layers, width = [], d
            for h in hidden:
                layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
                width = h
            layers.append(torch.nn.Linear(width, k))
            self.mlp = torch.nn.Sequential(*layers)

    def first_layers(self) -> list[torch.nn.Linear]:
        return [self.linear] + ([self.mlp[0]] if self.mlp is not None else [])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.linear(x)] + ([self.mlp(x)] if self.mlp is not None else [])


class _Stacked(torch.nn.Module):
    """The working set's model: the ensemble's first layers restricted to the columns ``active`` and stacked into
    one ``torch.nn.Linear`` (rows ``:k`` the linear model's, the rest the MLP's first layer), so that the optimizer
    steps one shared-factor tensor instead of one per model (the same group lasso: a column of the stacked weight
    is the feature's group); the MLP's deeper layers are the full model's own modules. ``forward`` returns the same
    list of logits as :class:`_Ensemble` on the working set's columns."""

    def __init__(self, full: _Ensemble, active: torch.Tensor, bias: torch.nn.Parameter | None = None):
        super().__init__()
        firsts = full.first_layers()
        self.k = full.linear.out_features
        with torch.device("meta"):
            self.first = torch.nn.Linear(int(active.numel()), sum(layer.out_features for layer in firsts))
        with torch.no_grad():
            self.first.weight = torch.nn.Parameter(torch.cat([layer.weight.detach()[:, active] for layer in firsts]))
            if bias is None:
                bias = torch.nn.Parameter(torch.cat([layer.bias.detach() for layer in firsts]))
            self.first.bias = bias
        self.rest = full.mlp[1:] if full.mlp is not None else None

    def first_layers(self) -> list[torch.nn.Linear]:
        return [self.first]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.first(x)
        if self.rest is None:
            return [z]
        return [z[:, :self.k], self.rest(z[:, self.k:])]

    @torch.no_grad()
    def write_back(self, full: _Ensemble, active: torch.Tensor) -> None:
        """Copy the stacked first layer into the full model's first layers (its columns ``active``)."""
        row = 0
        for layer in full.first_layers():
            rows = layer.out_features
            layer.weight[:, active] = self.first.weight[row: row + rows]
            layer.bias.copy_(self.first.bias[row: row + rows])
            row += rows


def _standardisation(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale (the standard deviation), scale-free and overflow-safe.

    The statistics are computed on each column divided by a power of two near its largest magnitude: exact (the
    same numbers as ``X``'s own statistics wherever those neither overflow nor underflow), and finite for features
    near 1e300, whose variance would overflow. A feature is constant when its deviation is at most 1e-12 of its
    largest magnitude (relative: a feature in units of 1e-14 is not constant); its scale is that magnitude (1 for
    an all-zero feature), so that it stays ~0 once centred (rounding noise of relative size 1e-16) in any units.
    """
    biggest = np.abs(X).max(axis=0).astype(np.float64)
    unit = np.ldexp(1.0, np.frexp(biggest)[1])  # biggest / unit in [0.5, 1); 1 for a zero column
    Xu = X / unit
    mean = Xu.mean(axis=0, dtype=np.float64) * unit
    scale = Xu.std(axis=0, dtype=np.float64) * unit
    constant = scale <= 1e-12 * biggest
    scale[constant] = np.where(biggest > 0, biggest, 1.0)[constant]
    return mean, scale


def _seed_from(random_state) -> int:
    """A torch seed from ``None`` / an int / a ``numpy.random.RandomState`` (scikit-learn's convention)."""
    if random_state is None:
        return int(np.random.randint(0, 2**31 - 1))
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        return int(random_state) % (2**63)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**31 - 1))
    raise ValueError(f"random_state must be None, an int or a numpy.random.RandomState, got {random_state!r}")


def _train_step(model, optimizer, x, y) -> float:
    """One optimizer step on the summed cross-entropies of the model's heads; returns the loss (before the step)."""
    optimizer.zero_grad()
    outs = model(x)
    loss = torch.nn.functional.cross_entropy(outs[0], y)
    for out in outs[1:]:
        loss = loss + torch.nn.functional.cross_entropy(out, y)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError("the training loss became non-finite; lower lr")
    loss.backward()
    optimizer.step()
    return value
