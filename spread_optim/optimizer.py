r"""``SpreadOptimizer``: exact L1 / group-lasso sparsity for any ``torch.optim`` base rule.

The class owns param groups, state and validation, and the outline of one step; the math lives in
:mod:`spread_optim.kernels.reference` (the spec), the sparsity kinds in :mod:`spread_optim.sparsity`, the choice
of implementation in :mod:`spread_optim.kernels.dispatch`, the hidden base optimizer in :mod:`spread_optim._base`
and multi-evaluation closures (LBFGS) in :mod:`spread_optim._closure`.

One step, top to bottom (:meth:`SpreadOptimizer.step`):

1. plan: check every group, create missing factors, choose each sparse group's implementation, sync the base;
2. evaluate the closure, if any (a multi-evaluation base such as LBFGS takes the closure path instead);
3. non-finite guard: a NaN/inf gradient in a sparse group raises before anything moves;
4. factor gradients of the smooth objective, then the base step on factors and dense parameters;
5. the exact-zero pass and ``theta = U*W`` (``u_g*W_g``); fused groups do 4-5 in one kernel pass.

For every param group with ``kappa > 0`` the factors live in ``optimizer.state[param]`` (``"U"``, ``"W"`` for
element sparsity; ``"u"``, ``"W"`` for groups) and the base's state for each factor in
``optimizer.state[param]["base"][factor]``; a dense parameter's state is the base's own. So ``state_dict()``
and ``load_state_dict()`` carry everything and a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from spread_optim import _checkpoint, _closure
from spread_optim._base import HiddenBase, class_defaults, per_parameter, single_group
from spread_optim._fused import nonfinite_flag
from spread_optim._program import NativeProgram
from spread_optim.distributed import LOCAL, check_not_zero_shared, communicator, is_dtensor
from spread_optim.kernels import dispatch
from spread_optim.kernels import reference as ref
from spread_optim.options import DEFAULTS, OPTIONS, check_base_numbers, check_group, check_share_groups, is_sparse, warn_near_misses
from spread_optim.sparsity import Element, Grouped, Kind, make_kind, probes
from spread_optim.structure import describe, validate_sparsity

_BASE_BY_NAME = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def resolve_base(base) -> type[Optimizer]:
    """``"sgd"``/``"adam"``/``"adamw"`` or a ``torch.optim.Optimizer`` subclass."""
    if isinstance(base, str):
        try:
            return _BASE_BY_NAME[base.lower()]
        except KeyError:
            raise ValueError(f"unknown base {base!r}; expected one of {sorted(_BASE_BY_NAME)} or an Optimizer class") from None
    if isinstance(base, Optimizer):
        raise TypeError(f"'base' must be an Optimizer class, not an instance: pass {type(base).__name__}, not {type(base).__name__}(...)")
    if not (isinstance(base, type) and issubclass(base, Optimizer)):
        raise TypeError(f"'base' must be a torch.optim.Optimizer subclass or one of {sorted(_BASE_BY_NAME)}, got {base!r}")
    if issubclass(base, SpreadOptimizer):
        raise TypeError("'base' cannot itself be a SpreadOptimizer")
    return base


class SpreadOptimizer(Optimizer):
    r"""Exact L1 / group-lasso sparsity by redundant factors (*spread*), around any base optimizer.

    Minimises ``loss + sum over groups of 2*kappa*R(theta)``, ``R = ||.||_1`` (``sparsity="element"``) or the
    sum of the groups' Euclidean norms (``"row"``, ``"column"``, or a tensor of group ids), by running the base
    rule on factors ``theta = U*W`` (``theta_g = u_g*W_g``) with the smooth penalty ``kappa*(||U||^2 + ||W||^2)``.

    Args:
        params: iterable of tensors, ``(name, tensor)`` pairs, or param-group dicts (as in ``torch.optim``).
        base: the base rule: a ``torch.optim.Optimizer`` subclass (SGD, Adam, AdamW, RMSprop, LBFGS, ...) or
            ``"sgd"`` / ``"adam"`` / ``"adamw"``.
        **defaults: the base's keyword arguments plus spread's param-group keys, each a default for every group:

            * ``kappa`` (float >= 0, default 0): strength; the group's penalty is ``2*kappa*R(theta)``.
              ``kappa=0`` is a dense group, updated exactly as by the base alone. Whether a group is sparse is
              fixed at its first step (use a tiny positive kappa to warm up from "almost dense").
            * ``sparsity``: ``"element"`` (default), ``"row"`` (dim-0 slices: output neurons, conv filters),
              ``"column"`` (dim-1 slices: input features/channels) or an integer tensor of group ids with the
              parameter's shape (a group with one id per parameter in the group).
            * ``share_groups`` (bool, default False): with ``"row"``/``"column"``, every parameter of the group
              shares one factor per row/column: group ``j`` is the union of slice ``j`` of all of them (the
              paper's ensemble feature selection). They must agree on that dimension's size.
            * ``init``: ``"balanced"`` (default) or ``"unbalanced"``. Both reproduce theta bit for bit.
              Balanced: ``|U| ~ |W| ~ sqrt|theta|`` (within a factor sqrt 2, a power-of-two split that is exact
              in floating point); zero entries start on the saddle and are revived at the first step where
              their KKT condition asks for it, with a proximal-gradient step (so a zero start is aligned with
              the first gradient). Unbalanced: ``U = 1, W = theta``. Balanced is the default because on the
              lasso problems we measured it needed up to 2.4x fewer steps with Adam, up to 1.4x fewer with
              LBFGS, and at most 10% more in one case (SGD from a zero start) (``benchmarks/init_schemes.py``),
              and because it starts where the smooth penalty already equals ``2*kappa*|theta|``.
            * ``zero_threshold`` (float >= 0, default 1e-6): the exact-zero rule of
              :mod:`spread_optim.kernels.reference` (snap when ``|theta|`` is at most this and not growing, or
              on a sign flip; hold; revive when ``|g| > 2*kappa``). With ``zero_threshold=0`` only sign flips
              snap.
            * ``depth`` (int >= 2, default 2): the number of factors ``k``; the penalty is
              ``k*kappa*R(theta)^(2/k)`` elementwise (``2``: L1, ``3``: L2/3, ``4``: L1/2; groups: of their norms),
              non-convex for ``k > 2``, with zeros revived by the L_q thresholding rule (:mod:`spread_optim.deep`).

    Behaviour:
        * The penalty enters the factors' gradient (coupled L2) whatever the base; the base's own
          ``weight_decay`` is applied to dense groups only. ``maximize=True`` in a sparse group maximises
          ``loss - 2*kappa*R(theta)``.
        * ``step(closure)`` returns what the closure returned at its first evaluation, as ``torch.optim`` does.
          Per-parameter bases (SGD, Adam, ...) evaluate it once, before the update. A multi-evaluation base
          (LBFGS) sees ``theta = U*W`` at every evaluation and receives ``loss + penalty``, the smooth objective.
        * A parameter whose ``grad`` is None is left alone (in a shared group, its ``theta`` still follows the
          shared factor, and its own ``W`` does not move).
        * Gradients of sparse groups are checked before anything moves: a NaN/inf gradient raises
          ``FloatingPointError`` naming the parameter and leaves parameters, factors and base state exactly as
          they were (with ``torch.amp.GradScaler`` such steps are skipped before they reach the optimizer).
        * bf16/fp16 parameters keep float32 factors (and float32 base state for them).
    """

    def __init__(self, params, base, **defaults):
        base_cls = resolve_base(base)
        spread_kwargs = {k: defaults.pop(k) for k in list(defaults) if k in OPTIONS}
        check_base_numbers(defaults, class_defaults(base_cls), f"{base_cls.__name__}'s keyword arguments")
        # instantiating the base on a dummy tensor validates its keyword arguments and gives its defaults
        probe = base_cls([torch.zeros(1, requires_grad=True)], **defaults)
        self._base_cls = base_cls
        self._base_kwargs = dict(defaults)
        self._base_keys = tuple(probe.defaults)
        self._base_defaults = dict(probe.defaults)
        self._init_derived()
        super().__init__(params, {**probe.defaults, **DEFAULTS, **spread_kwargs})

    def _init_derived(self) -> None:
        """What is rebuilt from the param groups on demand (never pickled)."""
        self._hidden = HiddenBase(self._base_cls, self._base_kwargs, self._base_keys)
        self._structures: dict = {}  # (param, id(sparsity), shape) -> GroupStructure of its local rows
        self._scratch: dict = {}  # per-parameter buffers of the CPU fast path (not state)
        self._kinds: list[Kind] = []  # the sparse groups' kinds of the last plan
        self._paths: list[str] = []  # per param group: "base" (dense), "cpu", "spec" or "triton"
        self._comm = LOCAL
        self._dense_stepped: set[int] = set()  # ids of parameters stepped in a dense group (SGD keeps no state)
        self._created: list = []
        self._built_for: dict = {}  # param -> the sparsity its factors were built for (see _refactor_if_changed)
        self._planned: tuple | None = None  # (key, groups' values, their kinds, kept, kinds): the last plan and what it read (_reuse_plan)
        self._synced: tuple = ()  # (sparse, base_fused) of the last plan's groups: the base's copy of their values
        self._program: tuple = (None, None)  # (kinds, their NativeProgram or None): the kept plan's native step
        # the numbers a schedule changes, which the plan only checks (the base's lr, momentum, betas, ...; a
        # scheduler's initial_lr; spread's kappa and zero_threshold): in the plan's key by kind (key -> its kind),
        # so that a schedule does not make every step plan again (one base of a single group, LBFGS, compares the
        # base's numbers across groups: by value)
        self._step_numbers: dict = {} if single_group(self._base_cls) else {
            **{k: _number_kind for k, v in self._base_defaults.items() if isinstance(v, (int, float, tuple)) and not isinstance(v, bool)},
            "initial_lr": _number_kind, "kappa": _checked_number_kind, "zero_threshold": _checked_number_kind}

    # ------------------------------------------------------------------------------------------------
    # pickling / deepcopy: the base instance, the caches and the plan are derived

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_base_cls=self._base_cls, _base_kwargs=self._base_kwargs, _base_keys=self._base_keys,
                     _base_defaults=self._base_defaults)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_derived()

    def __repr__(self) -> str:
        return super().__repr__().replace(type(self).__name__ + " (", f"{type(self).__name__}[{self._base_cls.__name__}] (", 1)

    # ------------------------------------------------------------------------------------------------
    # param groups and validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        index = len(self.param_groups)
        if "params" not in param_group:
            raise ValueError(f"param group {index} has no 'params' (got the keys {sorted(map(str, param_group))})")
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):
            param_group["params"] = params = list(params)  # a generator is read once
        tensors = [params] if isinstance(params, torch.Tensor) else [] if isinstance(params, set) else [p[1] if isinstance(p, tuple) else p for p in params]
        seen = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        for p in tensors:
            if isinstance(p, torch.Tensor) and id(p) in seen:
                raise ValueError(
                    f"some parameters appear in more than one parameter group: param group {index} repeats a "
                    f"parameter of shape {tuple(p.shape)} from param group {seen[id(p)]} (each tensor may belong to one group only)"
                )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group, index, full=True)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        warn_near_misses(param_group, set(self.defaults) | {"params", "param_names"}, f"param group {index}")

    def _check_group(self, group: dict[str, Any], index: int, full: bool) -> None:
        """Check a group's keys, before anything moves (``full``: also what only changes with its parameters,
        checked when it is added; the rest is checked again at every step, since a key may change between steps)."""
        where = f"param group {index}"
        missing = [k for k in OPTIONS if k not in group]
        if missing:
            raise ValueError(f"{where} lacks {missing}: add param groups with add_param_group, which fills the defaults")
        check_group(group, where)
        check_base_numbers(group, self._base_defaults, where)
        if single_group(self._base_cls) and self.param_groups and group is not self.param_groups[0]:
            first = self.param_groups[0]
            for k in self._base_keys:
                if k != "weight_decay" and group.get(k) != first.get(k):
                    raise ValueError(
                        f"{where}: {self._base_cls.__name__} takes one set of options, but '{k}' differs from "
                        f"param group 0 ({group.get(k)!r} vs {first.get(k)!r}); only spread's keys may differ per group"
                    )
        if not is_sparse(group):  # a dense group ignores 'sparsity' (a top-level default may not fit its biases)
            return
        params = group["params"]
        if group.get("differentiable"):
            raise ValueError(f"{where}: differentiable=True is not supported in a sparse group ('kappa' > 0); dense groups pass it to the base")
        check_share_groups(group, where)
        if not full:
            return
        if single_group(self._base_cls) and any(is_dtensor(p) for p in params):
            communicator([(p, where) for p in params], multi_evaluation=True)  # raises: LBFGS on DTensors
        for p in params:
            validate_sparsity(group["sparsity"], p, where)
            if p.is_complex() or not p.is_floating_point():
                raise TypeError(f"{where}: a sparse group ('kappa' > 0) needs real floating-point parameters, got dtype {p.dtype}")
            if p.is_sparse:
                raise TypeError(f"{where}: sparse parameter tensors are not supported in a sparse group")
            if p.device.type == "meta":
                raise ValueError(f"{where}: a sparse group needs parameters with data; got one on the meta device "
                                 "(materialise the model, e.g. with to_empty() and an init, before building the optimizer)")
        if group["share_groups"]:
            check_not_zero_shared(where)

    # ------------------------------------------------------------------------------------------------
    # the plan of a step: checks, factors, the implementation of each group, the base

    def _plan(self) -> list[Kind]:
        """Check every group, create missing factors, choose implementations, sync the base; return the kinds."""
        named = [(p, f"param group {i}") for i, g in enumerate(self.param_groups) if _sparse_now(g) for p in g["params"]]
        self._comm = communicator(named, multi_evaluation=single_group(self._base_cls))
        kinds, paths, routes, sparse, base_fused = [], [], [], [], []
        for index, group in enumerate(self.param_groups):
            self._check_group(group, index, full=False)
            if not is_sparse(group):
                self._check_stays_dense(group, index)
                paths.append("base")
                routes.append([(p, self.state, p) for p in group["params"]])
                sparse.append(False)
                base_fused.append(False)
                continue
            for p in group["params"]:
                if (p, id(group["sparsity"]), tuple(p.shape)) not in self._structures:
                    validate_sparsity(group["sparsity"], p, f"param group {index}")
            self._check_stays_sparse(group, index)
            self._refactor_if_changed(group)
            choice, kind = self._make_kind(group, index)
            kinds.append(kind)
            paths.append(choice.path)
            routes.append([(leaf, self.state[p]["base"], key) for p, key, leaf in kind.factor_leaves()])
            sparse.append(True)
            base_fused.append(choice.base_fused)
        self._hidden.sync(self.param_groups, routes, sparse, base_fused)
        self._kinds, self._paths, self._synced = kinds, paths, (sparse, base_fused)
        return kinds

    def _reuse_plan(self) -> list[Kind] | None:
        """The last step's kinds when nothing the plan reads has changed since (the same groups with the same values,
        the same parameters with the same shape, dtype, device and layout, the same state entries and factors, the
        same :func:`dispatch.settings`): a step of a small model is then mostly its kernels. None otherwise (the full plan runs);
        sharded parameters and steps under ``torch.compile`` always plan. When only the groups' values differ, the
        numbers that a schedule changes (lr, momentum, betas; kappa, zero_threshold) are compared by kind
        (:meth:`_group_kinds`) and, where only those changed, the plan is kept and the base's new values copied to the
        base, as the plan does."""
        if self._planned is None or dispatch.compiling():
            return None
        key, values, by_kind, kept, kinds = self._planned
        now, now_values = self._plan_key(None)
        if now_values == values and now == key:
            return kinds
        if now != key or not self._step_numbers or self._group_kinds(None) != by_kind:
            return None
        self._hidden.copy_values(self.param_groups, *self._synced)
        self._planned = (key, now_values, by_kind, kept, kinds)  # (the same objects behind the ids: only numbers changed)
        return kinds

    def _remember_plan(self, kinds: list[Kind]) -> None:
        kept: list = []
        self._planned = None if self._comm.distributed or dispatch.compiling() else (
            *self._plan_key(kept), self._group_kinds(kept), kept, kinds)

    def _plan_key(self, kept: list | None) -> tuple[tuple, tuple]:
        """What :meth:`_plan` reads, as values and ids: the groups' values apart (the second tuple). ``kept`` (when
        remembering) receives the objects behind the ids, which the cache keeps alive, so that an id is not reused
        while it is compared."""
        state = self.state
        entries: list = [id(state), dispatch.settings()]
        values: list = []
        for group in self.param_groups:
            params = group["params"]
            entries.append((id(group), tuple(group)))
            values.append(tuple(v if type(v) in _ATOMS else _frozen(v, kept) for k, v in group.items() if k != "params"))
            for p in params:
                st = state.get(p)
                entries.append((id(p), p.shape, p.dtype, p.device, p.is_contiguous(), id(st), *map(id, st.values())) if st else
                               (id(p), p.shape, p.dtype, p.device, p.is_contiguous()))
                if kept is not None and st:
                    kept.append(st)
                    kept += st.values()
            if kept is not None:
                kept += params
        if kept is not None:
            kept.append(state)
        return tuple(entries), tuple(values)

    def _group_kinds(self, kept: list | None) -> tuple:
        """The groups' values as :meth:`_plan_key` has them, but the numbers a schedule changes by kind
        (:data:`_step_numbers`)."""
        numbers_ = self._step_numbers
        return tuple(tuple(numbers_[k](v, kept) if k in numbers_ else v if type(v) in _ATOMS else _frozen(v, kept)
                           for k, v in group.items() if k != "params") for group in self.param_groups)

    def _make_kind(self, group, index):
        comm = self._comm
        sharded = comm.distributed and any(is_dtensor(p) for p in group["params"])
        kind = make_kind(group, index, self.state, "spec", comm, self._scratch, self._structures)
        fresh = [p for p in kind.params if not self.state.get(p)]
        kind.ensure_factors()
        self._created += fresh
        tensors = [*kind.params, *(leaf for _, _, leaf in kind.factor_leaves())]
        choice = dispatch.choose(kind.params, tensors, group, base_cls=self._base_cls, one_dtype=kind.one_dtype,
                                 shared=kind.shared, sharded=sharded, where=f"param group {index}", layout=_layout(kind))
        kind.path, kind.fast = choice.path, choice.path == "cpu"
        return choice, kind

    def _check_stays_dense(self, group, index) -> None:
        fresh = [id(p) for p in group["params"] if id(p) not in self._dense_stepped]
        self._dense_stepped.update(fresh)
        self._created += fresh
        for p in group["params"]:
            if "W" in self.state.get(p, {}):
                raise ValueError(
                    f"param group {index}: 'kappa' became 0 after the group was stepped as a sparse group; "
                    "whether a group is sparse is fixed at its first step (use a tiny kappa instead)"
                )

    def _check_stays_sparse(self, group, index) -> None:
        for p in group["params"]:
            st = self.state.get(p)
            if (st and "W" not in st) or id(p) in self._dense_stepped:
                raise ValueError(
                    f"param group {index}: 'kappa' became > 0 after the group was stepped as a dense group; "
                    "whether a group is sparse is fixed at its first step (start from a tiny kappa instead)"
                )

    def _refactor_if_changed(self, group) -> None:
        """Factors that no longer describe the group's parameters are rebuilt from the current weights: after a
        change of ``sparsity`` or ``share_groups``, or of a parameter's shape or dtype (``p.data = ...``,
        ``model.double()``). The base's state for the old factors goes with them (it describes other tensors)."""
        sparsity = group["sparsity"]
        built_for = (describe(sparsity), id(sparsity) if isinstance(sparsity, torch.Tensor) else None, group["share_groups"],
                     group.get("depth", 2))  # (a change of depth rebuilds the factors too)
        params = group["params"]
        element = built_for[0] == "element"

        def stale(p) -> bool:
            st = self.state.get(p, {})
            if "W" not in st:
                return False
            W = st["W"]
            return (self._built_for.get(p, built_for) != built_for or ("U" in st) != element
                    or W.shape != p.shape or W.dtype != ref.factor_dtype(p.dtype))

        if any(stale(p) for p in params):
            for p in params:
                if "W" in self.state.get(p, {}):
                    self.state[p].clear()
        for p in params:
            self._built_for[p] = built_for

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """``torch.amp.GradScaler`` hands ``grad_scale``/``found_inf`` to the step (no host sync) when every
        group is fused: sparse groups by the spread kernels, dense ones by the torch base's fused path."""
        return self._base_cls in dispatch.FUSED_RULES and all(g.get("fused") is True for g in self.param_groups)

    # ------------------------------------------------------------------------------------------------
    # one step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimisation step (see the class docstring for closure semantics). A step that raises leaves
        nothing behind: factors it created from the weights are dropped again.

        Inside ``torch.compile``, an optimizer whose sparse groups all take the native CPU loops runs its step as
        one opaque eager call (the loops are C code, faster than what inductor makes of the spec); any other is
        traced, its sparse groups on the spec."""
        if dispatch.compiling() and _native_everywhere(self):
            return _eager_step(self, closure)
        return self._guarded_step(closure)

    def _guarded_step(self, closure):
        self._created: list = []  # what this step's plan created: (param, had state) and dense-stepped ids
        try:
            return self._step(closure)
        except BaseException:
            self._planned = None
            for p in self._created:
                if isinstance(p, int):
                    self._dense_stepped.discard(p)
                else:
                    self.state.pop(p, None)
            raise

    def _step(self, closure):
        kinds = self._reuse_plan()
        if kinds is None:
            kinds = self._plan()
            self._remember_plan(kinds)
        if closure is not None and per_parameter(self._base_cls):
            with torch.enable_grad():
                loss = closure()
            self._step_once(kinds)
            return loss
        if closure is None:
            self._step_once(kinds)
            return None
        if not kinds:  # all dense: the base as it is
            return self._hidden.step(closure)
        return _closure.step(kinds, self._hidden, closure, factor_grads=self._factor_grads, penalty=self._penalty,
                             zero_pass=self._zero_pass, lbfgs=single_group(self._base_cls),
                             lr=float(self.param_groups[0].get("lr", 1.0)))

    def _step_once(self, kinds: list[Kind]) -> None:
        """Factor gradients, base step, exact-zero pass and theta, for the gradients in ``p.grad``: a kept plan whose
        sparse groups all take the native CPU loops runs its program (:mod:`spread_optim._program`), where it takes
        the step; the full path runs every other step, and makes the kept plan's program."""
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        made, program = self._program
        scaled = grad_scale is not None or found_inf is not None  # (GradScaler's steps: the full path's)
        if made is kinds and program is not None and not scaled:
            calls = program.prepare()
            # (dense groups move once every gradient is checked, as in the full path: see NativeProgram.run)
            if calls is not None and program.run(calls, self._hidden.step if self._base_has_work() else None):
                return
        self._full_step(kinds, grad_scale, found_inf)
        if self._planned is not None and self._planned[-1] is kinds and (made is not kinds or program is not None and not scaled):
            self._program = (kinds, NativeProgram.of(kinds, self._base_cls, self.state))  # (new, or after it declined)

    def _full_step(self, kinds: list[Kind], grad_scale, found_inf) -> None:
        """Check the gradients, then the factor gradients and base step of the split groups and the fused groups'
        kernels (see :meth:`_step_rest`)."""
        split = [k for k in kinds if k.path not in dispatch.FUSED_PATHS]
        fused = [k for k in kinds if k.path in dispatch.FUSED_PATHS]
        spans = any(k.spans_shards for k in split)
        begin = [k.begin() for k in split]
        flags, names = self._nonfinite(kinds) if found_inf is None else ([], [])
        device_flag = nonfinite_flag([p.grad for k in fused if _on_device_check(k) for p in k.params if p.grad is not None]) if found_inf is None else None
        if self._comm.distributed and spans and per_parameter(self._base_cls) and grad_scale is None and found_inf is None and not fused:
            return self._step_one_round(split, begin, flags, names)
        self._factor_grads(split, begin, (flags, names))
        self._step_rest(split, fused, grad_scale, found_inf, device_flag)

    def _step_two_rounds(self, split, begin, flags) -> None:
        self._factor_grads(split, begin, flags)
        self._step_rest(split, [], None, None, None)

    def _step_rest(self, split, fused, grad_scale, found_inf, device_flag) -> None:
        """After the factor gradients: the base step, the zero pass and theta; the fused kinds' kernels."""
        for k in fused:
            if not k.factor_grads_dropped:  # (once per plan: only a split step, which another plan runs, sets them)
                for _, _, leaf in k.factor_leaves():
                    leaf.grad = None  # the base must not step them: the kernels do
                k.factor_grads_dropped = True
        gradless = _closure.gradless_factors(split) if not per_parameter(self._base_cls) else []
        if self._base_has_work():
            self._hidden.step(grad_scale=grad_scale, found_inf=found_inf)
        _closure.restore(gradless)
        if split:
            self._zero_pass(split)
        for k in fused:
            flag = found_inf if found_inf is not None else device_flag if _on_device_check(k) else None
            k.fused_step(self._base_cls, grad_scale, flag)

    def _base_has_work(self) -> bool:
        """Whether the base has anything to step: torch's SGD, Adam and AdamW leave a tensor without a gradient as it
        is, so with every gradient on the fused paths their step is skipped (any other base always steps)."""
        if self._base_cls not in dispatch.FUSED_RULES:
            return True
        return any(p.grad is not None for g in self._hidden.param_groups for p in g["params"])

    def _factor_grads(self, split: list[Kind], begin=None, flags=None) -> None:
        """Check the gradients (raise before anything moves) and set the factor gradients; one exchange carries
        the non-finite counts, ``begin``'s parts (the kinds' :meth:`begin`, first evaluation only) and ``sum g*W``.
        ``flags``: ``(probes, names)`` when already taken. A set spanning shards whose weights were written outside
        the optimizer (on any rank) is adopted, and the exchange repeated (only in such a step)."""
        flags, names = self._nonfinite(split) if flags is None else flags
        begin = [[] for _ in split] if begin is None else begin
        while True:
            reduced_flags, reduced_begin, reduced_grads = self._exchange(flags, begin, [k.grad_sums() for k in split])
            self._raise_if_nonfinite(reduced_flags, names)
            adopted = [k.end_begin(parts) for k, parts in zip(split, reduced_begin) if parts]
            if not any(adopted):
                break
            flags, begin = [], [k.begin() for k in split]
        for k, sums in zip(split, reduced_grads):
            k.set_factor_grads(sums)

    def _penalty(self, kinds: list[Kind]) -> torch.Tensor:
        """The smooth penalty of ``kinds`` as a tensor, summed over ranks."""
        parts = [k.penalty() for k in kinds]
        total = sum(parts) if parts else torch.zeros(())
        return self._comm.sum([total])[0] if self._comm.distributed else total

    def _zero_pass(self, split: list[Kind], theta_old=None, revival_step: float | None = None) -> None:
        """The exact-zero pass of the split kinds (sums across ranks in one round) and theta."""
        extra = {} if theta_old is None else {"theta_old": theta_old}
        (finish,) = self._exchange(None, [k.finish_sums(**extra) for k in split])
        for k, sums in zip(split, finish):
            lr = revival_step if revival_step is not None else float(k.group.get("lr", 1.0))
            k.zero_pass(lr, reduced=sums, **extra)

    def _step_one_round(self, split, begin, flags, names) -> None:
        """FSDP2 with groups spanning shards and a per-parameter torch base: one all-reduce per step.

        ``W``'s gradient ``u*g + 2*kappa*W`` needs only local data (``u`` is replicated), so the base moves the
        spanning sets' ``W`` first, after a copy of them and their state. One exchange then carries the
        non-finite counts, the saddle norms, ``sum g*W_old`` and the exact-zero sums of the moved ``W``. On a
        non-finite gradient on any rank the first move is undone and every rank raises. Else the base moves
        everything else and the zero pass finishes."""
        grad_sums = [k.grad_sums() for k in split]  # with W_old
        first = [leaf for k in split for leaf in k.set_W_grads_first()]
        saved = [(leaf, leaf.detach().clone(), {n: v.clone() if torch.is_tensor(v) else v for n, v in self._hidden.optimizer.state[leaf].items()})
                 for leaf in first]
        self._hidden.step(only=first)
        finish = [k.finish_sums() for k in split]
        reduced_flags, reduced_begin, reduced_grads, reduced_finish = self._exchange(flags, begin, grad_sums, finish)
        nonfinite = _any_nonfinite(reduced_flags)
        adopted = not nonfinite and any([k.end_begin(parts) for k, parts in zip(split, reduced_begin) if parts])
        if nonfinite or adopted:
            for leaf, value, state in saved:
                leaf.detach().copy_(value)
                self._hidden.optimizer.state[leaf] = state
            self._raise_if_nonfinite(reduced_flags, names)
            # weights written outside the optimizer were adopted: this step takes the two-round way
            return self._step_two_rounds(split, [k.begin() for k in split], ([], names))
        del saved
        for k, sums in zip(split, reduced_grads):
            k.set_factor_grads(sums, skip_W=True)
        self._hidden.step()
        for k, sums in zip(split, reduced_finish):
            k.zero_pass(float(k.group.get("lr", 1.0)), reduced=sums)

    def _exchange(self, flags, *per_kind):
        """Sum the non-finite counts and every kind's parts over ranks in one round (identity in one process).

        ``flags``: a list of scalars or None; ``per_kind``: lists (one per kind) of lists of tensors. Returns the
        reduced flags (unless None: a tensor, or the list itself when every flag is a host int in one process) and the
        reduced lists in the same nesting."""
        on_host = bool(flags) and not self._comm.distributed and all(type(f) is int for f in flags)
        parts = [] if not flags or on_host else [torch.stack([_as_tensor(f).reshape(()).to(torch.float64) for f in flags])]
        for lists in per_kind:
            for kind_parts in lists:
                parts += kind_parts
        reduced = iter(self._comm.sum(parts))
        out = [] if flags is None else [flags if on_host else next(reduced) if flags else None]
        for lists in per_kind:
            out.append([[next(reduced) for _ in kind_parts] for kind_parts in lists])
        return out

    def _nonfinite(self, kinds):
        """Probes of the sparse groups' gradients (nonzero: a NaN/inf) and ``(where, parameter)`` of each (named
        only when one raises); capturable fused groups check on the device instead (no host synchronisation)."""
        grads, names = [], []
        for k in kinds:
            if _on_device_check(k):
                continue
            for p, g in k.checked_grads():
                grads.append(g)
                names.append((k.where, p))
        return probes(grads), names  # (every group's gradients in one call)

    @staticmethod
    def _raise_if_nonfinite(reduced, names) -> None:
        if not _any_nonfinite(reduced):
            return
        indices = [i for i, f in enumerate(reduced) if f] if isinstance(reduced, list) else torch.nonzero(reduced != 0).flatten().tolist()
        bad = [names[i] for i in indices]
        raise FloatingPointError(
            "non-finite gradient in " + ", ".join(f"{where} (parameter of shape {tuple(p.shape)})" for where, p in bad)
            + "; nothing was updated (use torch.amp.GradScaler or skip this batch)"
        )

    # ------------------------------------------------------------------------------------------------
    # diagnostics

    def _sparse_kinds(self) -> list[Kind]:
        """The kinds of every sparse group (without planning a step: factors may not exist yet)."""
        for index, group in enumerate(self.param_groups):
            self._check_group(group, index, full=False)
        named = [(p, f"param group {i}") for i, g in enumerate(self.param_groups) if _sparse_now(g) for p in g["params"]]
        self._comm = communicator(named, multi_evaluation=single_group(self._base_cls))
        return [make_kind(group, index, self.state, "spec", self._comm, self._scratch, self._structures)
                for index, group in enumerate(self.param_groups) if _sparse_now(group)]

    def penalty(self) -> float:
        """The smooth penalty ``sum kappa*(||U||^2+||W||^2)`` of the current factors (0 before the first step).
        Under FSDP2 every rank gets the global answer."""
        return float(self._penalty(self._sparse_kinds()))

    @torch.no_grad()
    def kkt_residual(self) -> float:
        """Largest violation of the L1 / group-lasso optimality conditions over the sparse groups.

        Uses the current ``param.grad``: call it after ``backward()`` at the current parameters. For each entry,
        ``max(|g| - 2*kappa, 0)`` where ``theta = 0`` and ``|g + 2*kappa*sign(theta)|`` elsewhere (groups:
        ``max(||g_g|| - 2*kappa, 0)`` resp. ``||g_g + 2*kappa*theta_g/||theta_g|| ||``). Zero at an exact
        minimum of ``loss + 2*kappa*R(theta)``; parameters without a gradient are skipped. NaN when a gradient
        holds a NaN (so that ``kkt_residual() < tol`` never stops on one); ``RuntimeError`` when no parameter of
        a sparse group has a gradient (before any ``backward()``). Under FSDP2 every rank gets the global answer.

        Groups with ``depth=k > 2`` (penalty ``k*kappa*sum|theta|^q``, ``q = 2/k``): on nonzeros the first-order
        condition ``|g + k*kappa*q*|theta|^(q-1)*sign(theta)|`` (groups: ``||g_g + 2*kappa*||theta_g||^(q-2)*theta_g||``);
        on zeros the thresholding condition ``max(|g| - tau/step, 0)`` (groups: ``||g_g||``), ``tau`` the threshold
        of the prox of ``step*k*kappa*|.|^q`` at zero (``reference.revival_threshold``): zero is a fixed point of
        one proximal-gradient step of this size, at the step the last zero pass used (the group's lr; LBFGS's
        backtracked revival step).
        """
        kinds = self._sparse_kinds()
        if kinds and not any(p.grad is not None for k in kinds for p in k.params):
            raise RuntimeError("kkt_residual() reads the gradients of the sparse groups, and none has one: call it after loss.backward()")
        worst = 0.0
        for k in kinds:
            value = k.kkt()
            worst = value if value != value or value > worst else worst
        return self._comm.max(worst)

    # ------------------------------------------------------------------------------------------------
    # checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (checked first: see :mod:`spread_optim._checkpoint`; a refused checkpoint
        changes nothing). Factors and their base state keep the factors' dtype (float32 for bf16 parameters);
        everything is moved to the parameter's device. Weights that differ from the loaded factors (a model
        checkpoint newer than this one) are adopted at the next step: the model's weights stay the truth."""
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for hook in self._optimizer_load_state_dict_pre_hooks.values():  # (torch runs them before its checks)
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = _checkpoint.prepare(state_dict, self.param_groups, self.defaults, self._base_cls)
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        # Optimizer.load_state_dict casts floating state to the parameter's dtype; keep a float32 copy of sparse
        # entries of low-precision parameters and put it back afterwards.
        keep = {}
        for i, p in zip(ids, params):
            entry = state_dict["state"].get(i)
            if entry is not None and "W" in entry and ref.factor_dtype(p.dtype) != p.dtype:
                dtype = ref.factor_dtype(p.dtype)
                keep[p] = _map_tensors(entry, lambda k, t, d=dtype, dev=p.device: t.clone() if k == "step" else t.to(device=dev, dtype=d, copy=True) if t.is_floating_point() else t.to(dev, copy=True))
        hooks, self._optimizer_load_state_dict_pre_hooks = self._optimizer_load_state_dict_pre_hooks, type(self._optimizer_load_state_dict_pre_hooks)()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks
        for p, entry in keep.items():
            self.state[p] = entry
        self._init_derived()


def _on_device_check(kind: Kind) -> bool:
    """Capturable groups on the kernels check their gradients on the device (no host synchronisation)."""
    return kind.path == "triton" and bool(kind.group.get("capturable"))


def _layout(kind: Kind) -> str | None:
    """The layout the dispatch may hand to the native CPU loops: ``"element"``, ``"row"`` or ``"column"`` (a
    group-sparse kind whose parameters each have their own ``u``, one per row, resp. column), else None."""
    if isinstance(kind, Element):
        return "element"
    if isinstance(kind, Grouped) and not kind.shared:
        layouts = {s.kind for s in kind.structures.values()}
        if len(layouts) == 1 and layouts <= {"row", "column"}:
            return layouts.pop()
    return None


@torch.compiler.disable
def _native_everywhere(opt: "SpreadOptimizer") -> bool:
    """Whether every sparse group of ``opt`` (at least one) takes the native CPU loops when stepped eagerly: element
    sparsity, or row or column sparsity with a ``u`` per parameter, at depth 2, of float32/float64 CPU parameters under SGD,
    Adam or AdamW, ``fused`` not False (decided eagerly: dynamo sees one opaque call)."""
    sparse = [g for g in opt.param_groups if _sparse_now(g)]
    return bool(sparse) and all(
        g.get("fused") is not False and g.get("depth", 2) == 2 and isinstance(g["sparsity"], str)
        and (g["sparsity"] == "element" or g["sparsity"] in ("row", "column") and not g["share_groups"])
        and dispatch.native_takes(g["params"], opt._base_cls, g["sparsity"]) for g in sparse)


@torch.compiler.disable
def _eager_step(opt: "SpreadOptimizer", closure):
    """``opt``'s step, run eagerly inside ``torch.compile`` (see :meth:`SpreadOptimizer.step`)."""
    return opt._guarded_step(closure)


def _sparse_now(group) -> bool:
    """A sparse group, judged before its keys are checked (a bad kappa is not sparse)."""
    kappa = group.get("kappa", 0.0)
    try:
        return float(kappa) > 0
    except (TypeError, ValueError, RuntimeError):
        return False


def _any_nonfinite(reduced) -> bool:
    """Whether reduced flags (a tensor, or a list of host ints) mark a non-finite gradient."""
    if isinstance(reduced, list):
        return any(reduced)
    return reduced is not None and bool((reduced != 0).any())


_ATOMS = frozenset((float, int, bool, str, type(None)))  # param group values compared as they are


def _number_kind(value, kept: list | None):
    """A base number in the plan's key (see ``SpreadOptimizer._step_numbers``): a real number (not a bool) as its
    type, a tuple of them as their types, anything else as :func:`_frozen` does (a change to it plans again, and
    the plan's checks see it)."""
    if type(value) in (float, int):
        return type(value)
    if type(value) is tuple and all(type(v) in (float, int) for v in value):
        return tuple(type(v) for v in value)
    return _frozen(value, kept)


def _checked_number_kind(value, kept: list | None):
    """``kappa`` or ``zero_threshold`` in the plan's key: a float that its check keeps as it is (finite, >= 0) as
    whether it is 0 (a kappa of 0 is a dense group); anything else by value (:func:`_frozen`: the plan checks it)."""
    if type(value) is float and 0 <= value < math.inf:
        return "float", value > 0
    return _frozen(value, kept)


def _frozen(value, kept: list | None):
    """A param group's value as something ``==`` compares by value (numbers, strings, their lists and tuples), a
    tensor by identity and version (an in-place change counts), anything else as never equal (no reuse)."""
    if value is None or isinstance(value, (numbers.Number, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value), tuple(_frozen(v, kept) for v in value)
    if isinstance(value, torch.Tensor):
        if kept is not None:
            kept.append(value)
        return "tensor", id(value), value._version
    return object()


def _as_tensor(flag) -> torch.Tensor:
    return flag if isinstance(flag, torch.Tensor) else torch.tensor(float(flag))


def _map_tensors(value, fn, key=None):
    """Copy of nested dicts/lists/tuples with ``fn(key, tensor)`` applied to every tensor (``key``: the
    innermost dict key above it, as ``torch.optim`` keeps ``"step"`` apart)."""
    if isinstance(value, torch.Tensor):
        return fn(key, value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn, key) for v in value)
    return value
