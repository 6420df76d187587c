r"""``SpreadOptimizer``: exact L1 / group-lasso sparsity for any ``torch.optim`` base rule.

For every parameter group with ``kappa > 0`` the optimizer keeps hidden factors in
``optimizer.state[param]`` (``"U"``, ``"W"`` for element sparsity; ``"u"``, ``"W"`` for groups), hands
them with the gradients of the smooth objective (see :mod:`spread_optim.kernels.reference`) to an
instance of the base optimizer, and rewrites the model's parameter as ``theta = U*W`` (``u_g*W_g``)
after each step. Groups with ``kappa = 0`` are handed to the base unchanged: they are updated exactly as
the base alone would update them.

The base's own state for each factor lives in ``optimizer.state[param]["base"][factor_name]`` (for a
dense parameter, ``optimizer.state[param]`` *is* the base's state), so ``state_dict()`` and
``load_state_dict()`` carry everything and a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from spread_optim import fused
from spread_optim.distributed import check_not_zero_shared, sharded
from spread_optim.kernels import reference as ref
from spread_optim.structure import GroupStructure, describe, validate_sparsity, validate_spec

#: spread's own param-group keys and their defaults
SPREAD_DEFAULTS: dict[str, Any] = {
    "kappa": 0.0,
    "sparsity": "element",
    "share_groups": False,
    "init": "balanced",
    "zero_threshold": 1e-6,
}
INIT_SCHEMES = ("balanced", "unbalanced")
_BASE_BY_NAME = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
#: factor names in the order they are handed to the base
_FACTOR_KEYS = ("U", "u", "W")


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


def _single_group_base(base_cls: type[Optimizer]) -> bool:
    """Bases that refuse several param groups (LBFGS): every group is handed to one base group."""
    return issubclass(base_cls, torch.optim.LBFGS)


class SpreadOptimizer(Optimizer):
    r"""Exact L1 / group-lasso sparsity by redundant factors (*spread*), around any base optimizer.

    Minimises ``loss + sum over groups of 2*kappa*R(theta)``, ``R = ||.||_1`` (``sparsity="element"``) or
    the sum of the groups' Euclidean norms (``"row"``, ``"column"``, or a tensor of group ids), by running
    the base rule on factors ``theta = U*W`` (``theta_g = u_g*W_g``) with the smooth penalty
    ``kappa*(||U||^2 + ||W||^2)``.

    Args:
        params: iterable of tensors, ``(name, tensor)`` pairs, or param-group dicts (as in ``torch.optim``).
        base: the base rule: a ``torch.optim.Optimizer`` subclass (SGD, Adam, AdamW, RMSprop, LBFGS, ...)
            or ``"sgd"`` / ``"adam"`` / ``"adamw"``.
        **defaults: the base's keyword arguments plus spread's param-group keys, each a default for every
            group:

            * ``kappa`` (float >= 0, default 0): strength; the group's penalty is ``2*kappa*R(theta)``.
              ``kappa=0`` is a dense group, updated exactly as by the base alone. Whether a group is
              sparse is fixed at its first step (use a tiny positive kappa to warm up from "almost dense").
            * ``sparsity``: ``"element"`` (default), ``"row"`` (dim-0 slices: output neurons, conv
              filters), ``"column"`` (dim-1 slices: input features/channels) or an integer tensor of
              group ids with the parameter's shape (a group with one id per parameter in the group).
            * ``share_groups`` (bool, default False): with ``"row"``/``"column"``, every parameter of the
              group shares one factor per row/column: group ``j`` is the union of slice ``j`` of all of
              them (the paper's ensemble feature selection). They must agree on that dimension's size.
            * ``init``: ``"balanced"`` (default) or ``"unbalanced"``. Both reproduce theta bit for bit.
              Balanced: ``|U| ~ |W| ~ sqrt|theta|`` (within a factor sqrt 2, a power-of-two split that is
              exact in floating point); zero entries start on the saddle and are revived at the first step
              where their KKT condition asks for it, with a proximal-gradient step (so a zero start is
              aligned with the first gradient). Unbalanced: ``U = 1, W = theta``. Balanced is the default
              because on the lasso problems we measured it needed up to 2.4x fewer steps with Adam,
              up to 1.4x fewer with LBFGS, and at most 10% more in one case (SGD from a zero start)
              (``benchmarks/init_schemes.py``, table in BENCHMARKS.md), and because it starts where the
              smooth penalty already equals ``2*kappa*|theta|``.
            * ``zero_threshold`` (float >= 0, default 1e-6): an entry (group) whose ``|theta|``
              (``||theta_g||``) is at most this after a step *and* did not grow in that step (or has
              ``|g| <= 2*kappa``, zero being optimal) is set to exact zero, and so is one whose theta changed sign in the step (adaptive bases such as Adam
              make dead factors oscillate around zero with amplitude ~lr, so no fixed threshold catches
              them, but the sign flip does). An exact zero is held there until its KKT condition
              ``|g| > 2*kappa`` (``||g_g|| > 2*kappa``) is violated, then revived with one
              proximal-gradient step. With ``zero_threshold=0`` only sign flips snap.

    Behaviour:
        * The penalty enters the factors' gradient (coupled L2) whatever the base; the base's own
          ``weight_decay`` is applied to dense groups only. ``maximize=True`` in a sparse group maximises
          ``loss - 2*kappa*R(theta)``.
        * ``step(closure)``: the closure sees ``theta = U*W`` at every evaluation (LBFGS), and the base
          receives ``loss + penalty``, the smooth objective; ``step`` returns the closure's own loss of the
          first evaluation, as ``torch.optim`` does.
        * A parameter whose ``grad`` is None is left alone (in a shared group, its ``theta`` still follows
          the shared factor, and its own ``W`` does not move).
        * Gradients of sparse groups are checked before anything moves: a NaN/inf gradient raises
          ``FloatingPointError`` naming the parameter and leaves parameters, factors and base state
          exactly as they were (with ``torch.amp.GradScaler`` such steps are skipped before they reach
          the optimizer). Inside a multi-evaluation closure (LBFGS) the factors are restored to their
          values at the start of the step before raising.
        * bf16/fp16 parameters keep float32 factors (and float32 base state for them).
    """

    def __init__(self, params, base, **defaults):
        base_cls = resolve_base(base)
        spread_kwargs = {k: defaults.pop(k) for k in list(defaults) if k in SPREAD_DEFAULTS}
        if defaults.get("differentiable", False):
            raise ValueError("differentiable=True is not supported by SpreadOptimizer")
        # instantiating the base on a dummy tensor validates its keyword arguments and gives its defaults
        probe = base_cls([torch.zeros(1, requires_grad=True)], **defaults)
        self._base_cls = base_cls
        self._base_kwargs = dict(defaults)
        self._base_keys = tuple(probe.defaults)
        self._base: Optimizer | None = None
        self._base_layout: tuple | None = None
        self._structures: dict = {}
        self._dense_stepped: set[int] = set()  # ids of parameters stepped in a dense group (SGD keeps no state)
        self._fused_groups: set[int] = set()  # ids of the param groups the fused kernels step (this step)
        self._buffers: dict = {}  # per-parameter scratch buffers of the reference path (not state)
        self._sharded = None  # FSDP2 (DTensor parameters): spread_optim.distributed.ShardedSpread
        all_defaults = {**probe.defaults, **SPREAD_DEFAULTS, **spread_kwargs}
        super().__init__(params, all_defaults)

    # ------------------------------------------------------------------------------------------------
    # pickling / deepcopy: the base instance and the structure cache are derived, rebuilt on demand

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_base_cls=self._base_cls, _base_kwargs=self._base_kwargs, _base_keys=self._base_keys)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._base = None
        self._base_layout = None
        self._structures = {}
        self._dense_stepped = set()
        self._fused_groups = set()
        self._buffers = {}
        self._sharded = None

    def __repr__(self) -> str:
        return super().__repr__().replace(type(self).__name__ + " (", f"{type(self).__name__}[{self._base_cls.__name__}] (", 1)

    # ------------------------------------------------------------------------------------------------
    # param groups and validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        index = len(self.param_groups)
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):
            param_group["params"] = params = list(params)  # a generator is read once
        tensors = [params] if isinstance(params, torch.Tensor) else [] if isinstance(params, set) else [p[1] if isinstance(p, tuple) else p for p in params]
        seen = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        for p in tensors:
            if isinstance(p, torch.Tensor) and id(p) in seen:
                raise ValueError(
                    f"param group {index}: a parameter of shape {tuple(p.shape)} is already in param group "
                    f"{seen[id(p)]}; each tensor may belong to one group only"
                )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group, index, full=True)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._base_layout = None  # the base is rebuilt at the next step

    def _validate_group(self, group: dict[str, Any], index: int, full: bool) -> None:
        where = f"param group {index}"
        kappa = group["kappa"]
        if isinstance(kappa, torch.Tensor):
            if kappa.numel() != 1:
                raise ValueError(f"{where}: 'kappa' must be a scalar, got a tensor of shape {tuple(kappa.shape)}")
            kappa = group["kappa"] = float(kappa)
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)):
            raise TypeError(f"{where}: 'kappa' must be a float >= 0, got {kappa!r}")
        if math.isnan(kappa) or kappa < 0 or math.isinf(kappa):
            raise ValueError(f"{where}: 'kappa' must be a finite float >= 0, got {kappa!r}")
        threshold = group["zero_threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ValueError(f"{where}: 'zero_threshold' must be a float >= 0, got {threshold!r}")
        if group["init"] not in INIT_SCHEMES:
            raise ValueError(f"{where}: unknown 'init' {group['init']!r}; expected one of {INIT_SCHEMES}")
        if not isinstance(group["share_groups"], bool):
            raise TypeError(f"{where}: 'share_groups' must be a bool, got {group['share_groups']!r}")
        if _single_group_base(self._base_cls) and self.param_groups:
            first = self.param_groups[0]
            for k in self._base_keys:
                if k != "weight_decay" and group.get(k) != first.get(k):
                    raise ValueError(
                        f"{where}: {self._base_cls.__name__} takes one set of options, but '{k}' differs from "
                        f"param group 0 ({group.get(k)!r} vs {first.get(k)!r}); only spread's keys may differ per group"
                    )
        if not full:
            return
        sparsity = group["sparsity"]
        validate_spec(sparsity, where)
        for p in group["params"]:
            if kappa > 0:  # a dense group ignores 'sparsity' (a top-level default may not fit its biases)
                validate_sparsity(sparsity, p, where)
            if kappa > 0 and (p.is_complex() or not p.is_floating_point()):
                raise TypeError(f"{where}: a sparse group ('kappa' > 0) needs real floating-point parameters, got dtype {p.dtype}")
            if kappa > 0 and p.is_sparse:
                raise TypeError(f"{where}: sparse parameter tensors are not supported in a sparse group")
        if group["share_groups"] and kappa > 0:
            check_not_zero_shared(group, where)
            if not isinstance(sparsity, str) or sparsity not in ("row", "column"):
                raise ValueError(f"{where}: 'share_groups'=True needs 'sparsity' 'row' or 'column', got {describe(sparsity)!r}")
            dim = 0 if sparsity == "row" else 1
            sizes = {p.shape[dim] for p in group["params"]}
            if len(sizes) > 1:
                raise ValueError(f"{where}: 'share_groups'=True needs every parameter to have the same size along dim {dim}, got {sorted(sizes)}")

    @staticmethod
    def _is_sparse(group) -> bool:
        return group["kappa"] > 0

    # ------------------------------------------------------------------------------------------------
    # factors

    def _structure(self, p: torch.Tensor, group) -> GroupStructure:
        cached = self._structures.get(p)
        if cached is None or cached[0] is not group["sparsity"]:
            cached = (group["sparsity"], GroupStructure(group["sparsity"], p.shape, p.device))
            self._structures[p] = cached
        return cached[1]

    def _is_element(self, group) -> bool:
        return isinstance(group["sparsity"], str) and group["sparsity"] == "element"

    def _share_sets(self, group) -> list[list[torch.Tensor]]:
        """Parameters that share one ``u``: all of them with ``share_groups``, else one each."""
        return [list(group["params"])] if group["share_groups"] else [[p] for p in group["params"]]

    def _init_factors(self, group, index: int) -> None:
        """Create the factors of every parameter in a sparse group that has none yet (lazily, from theta)."""
        for p in group["params"]:
            st = self.state[p]
            if (st and "W" not in st) or id(p) in self._dense_stepped:
                raise ValueError(
                    f"param group {index}: 'kappa' became > 0 after the group was stepped as a dense group; "
                    "whether a group is sparse is fixed at its first step (start from a tiny kappa instead)"
                )
        for p in group["params"]:
            if ("U" in self.state[p]) != self._is_element(group) and "W" in self.state[p]:
                raise ValueError(f"param group {index}: 'sparsity' changed after the group's first step; the factors cannot follow")
        if self._is_element(group):
            for p in group["params"]:
                if "W" not in self.state[p]:
                    U, W = ref.init_element(p, group["init"])
                    self.state[p].update(U=U, W=W, base={"U": {}, "W": {}})
            return
        for members in self._share_sets(group):
            if all("W" in self.state[p] for p in members):
                continue
            if any("W" in self.state[p] for p in members):
                raise ValueError(f"param group {index}: a shared group cannot gain members after its first step")
            structures = [self._structure(p, group) for p in members]
            u, Ws = self._sharded.init_group(members, group) if self._sharded else ref.init_group(members, structures, group["init"])
            for i, (p, W) in enumerate(zip(members, Ws)):
                self.state[p].update(W=W, base={"W": {}})
                if i == 0:
                    self.state[p]["u"] = u
                    self.state[p]["base"]["u"] = {}

    def _factor_leaves(self, p) -> list[tuple[str, torch.Tensor]]:
        st = self.state[p]
        return [(k, st[k]) for k in _FACTOR_KEYS if k in st]

    # ------------------------------------------------------------------------------------------------
    # the base optimizer over factors (sparse groups) and parameters (dense groups)

    def _prepare(self) -> None:
        """Validate groups, create missing factors, (re)build the base, copy hyperparameters to it."""
        sharded(self)  # sets self._sharded when a sparse parameter is a DTensor (FSDP2)
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, index, full=False)
            if self._is_sparse(group):
                for p in group["params"]:
                    cached = self._structures.get(p)
                    if not self._is_element(group) and (cached is None or cached[0] is not group["sparsity"]):
                        validate_sparsity(group["sparsity"], p, f"param group {index}")
                self._init_factors(group, index)
            else:
                self._dense_stepped.update(id(p) for p in group["params"])
                for p in group["params"]:
                    if "W" in self.state[p]:
                        raise ValueError(
                            f"param group {index}: 'kappa' became 0 after the group was stepped as a sparse group; "
                            "whether a group is sparse is fixed at its first step (use a tiny kappa instead)"
                        )
        layout = tuple(
            tuple(id(t) for p in g["params"] for t in ([p] if not self._is_sparse(g) else [t for _, t in self._factor_leaves(p)]))
            for g in self.param_groups
        )
        if self._base is None or layout != self._base_layout:
            self._build_base()
            self._base_layout = layout
        self._sync_hyperparameters()
        self._fused_groups = {id(g) for i, g in enumerate(self.param_groups) if fused.uses_kernels(self, g, i)}

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """``torch.amp.GradScaler`` hands ``grad_scale``/``found_inf`` to the step (no host sync) when every
        group is fused: sparse groups by the spread kernels, dense ones by the torch base's fused path."""
        return self._base_cls in fused.FUSED_BASES and all(g.get("fused") is True for g in self.param_groups)

    def _build_base(self) -> None:
        groups, links = [], {}
        for group in self.param_groups:
            tensors = []
            for p in group["params"]:
                if self._is_sparse(group):
                    for key, leaf in self._factor_leaves(p):
                        tensors.append(leaf)
                        links[leaf] = self.state[p]["base"][key]
                else:
                    tensors.append(p)
                    links[p] = self.state[p]
            groups.append({"params": tensors})
        if _single_group_base(self._base_cls):
            groups = [{"params": [t for g in groups for t in g["params"]]}]
        base = self._base_cls(groups, **self._base_kwargs)
        for leaf, st in links.items():
            base.state[leaf] = st
        self._base = base

    def _sync_hyperparameters(self) -> None:
        """Copy the base's keys of each group (LR schedulers write ours) to the base's group."""
        pairs = [(self.param_groups[0], self._base.param_groups[0])] if _single_group_base(self._base_cls) else zip(self.param_groups, self._base.param_groups)
        for group, base_group in pairs:
            for k in self._base_keys:
                base_group[k] = group[k]
            if self._is_sparse(group):
                if "weight_decay" in base_group:
                    base_group["weight_decay"] = 0.0  # the spread penalty replaces it (coupled, in the gradient)
                if "maximize" in base_group:
                    base_group["maximize"] = False  # handled by negating g
                if fused.cpu_fused_base(self, group):
                    base_group["fused"] = True  # torch's one-pass CPU kernel for the factors (fused=None)

    # ------------------------------------------------------------------------------------------------
    # one step

    def _sparse_params(self, include_fused: bool = False):
        """``(group, members)`` for each set of parameters sharing factors, sparse groups only (during a
        step, those the reference path updates unless ``include_fused``)."""
        for group in self.param_groups:
            if self._is_sparse(group) and (include_fused or id(group) not in self._fused_groups):
                if self._is_element(group):
                    yield group, list(group["params"])
                else:
                    for members in self._share_sets(group):
                        yield group, members

    def _loss_grad(self, p, group) -> torch.Tensor | None:
        """``dL/dtheta`` as the factors see it (``-grad`` when maximising), in the factors' dtype."""
        g = p.grad
        if g is None:
            return None
        g = g.to(ref.factor_dtype(p.dtype))
        return -g if group.get("maximize", False) else g

    def _check_grads(self) -> None:
        if self._sharded:
            return self._sharded.check_grads()
        flags, names = [], []
        for index, group in enumerate(self.param_groups):
            if not self._is_sparse(group) or (id(group) in self._fused_groups and group.get("capturable")):
                continue  # a capturable step must not synchronise with the host
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"param group {index}: sparse gradients are not supported in a sparse group (parameter of shape {tuple(p.shape)})")
                if p.grad.is_complex():
                    raise TypeError(f"param group {index}: complex gradients are not supported in a sparse group")
                flags.append(ref.nonfinite_probe(p.grad).float())
                names.append((index, tuple(p.shape)))
        if flags:
            ok = torch.stack(flags) == 0
            if not bool(ok.all()):
                bad = [names[i] for i in torch.nonzero(~ok).flatten().tolist()]
                raise FloatingPointError(
                    "non-finite gradient in " + ", ".join(f"param group {i} (parameter of shape {s})" for i, s in bad)
                    + "; nothing was updated (use torch.amp.GradScaler or skip this batch)"
                )

    def _set_factor_grads(self, with_penalty: bool = False):
        """Hand the factor gradients of the smooth objective to the base's leaves; return the penalty
        (when asked: only a closure needs it)."""
        if self._sharded:
            return self._sharded.set_factor_grads(with_penalty)
        total = 0.0
        for group, members in self._sparse_params():
            kappa = group["kappa"]
            grads = [self._loss_grad(p, group) for p in members]
            if self._is_element(group):
                live = [(p, g) for p, g in zip(members, grads) if g is not None]
                for p, g in zip(members, grads):
                    if g is None:
                        self.state[p]["U"].grad = self.state[p]["W"].grad = None
                if live:
                    Us = [self.state[p]["U"] for p, _ in live]
                    Ws = [self.state[p]["W"] for p, _ in live]
                    gU, gW = ref.element_factor_grads([g for _, g in live], Us, Ws, kappa, out=(
                        [_reusable(U.grad, U) for U in Us], [_reusable(W.grad, W) for W in Ws]))
                    for U, W, a, b in zip(Us, Ws, gU, gW):
                        U.grad, W.grad = a, b
                if with_penalty:
                    total = total + sum(ref.penalty([self.state[p]["U"], self.state[p]["W"]], kappa) for p in members)
                continue
            u = self.state[members[0]]["u"]
            Ws = [self.state[p]["W"] for p in members]
            if all(g is None for g in grads):
                u.grad = None
                for W in Ws:
                    W.grad = None
            else:
                structures = [self._structure(p, group) for p in members]
                filled = [torch.zeros_like(W) if g is None else g for g, W in zip(grads, Ws)]
                du, dWs = ref.group_factor_grads(filled, u, Ws, structures, kappa)
                u.grad = du
                for W, dW, g in zip(Ws, dWs, grads):
                    W.grad = None if g is None else dW
            if with_penalty:
                total = total + ref.penalty([u, *Ws], kappa)
        return total

    def _dead_masks(self) -> list:
        if self._sharded:
            return self._sharded.dead_masks()
        masks = []
        for group, members in self._sparse_params():
            if self._is_element(group):
                masks.append([ref.element_dead(self.state[p]["U"], self.state[p]["W"], out=self._scratch(p)) for p in members])
            else:
                structures = [self._structure(p, group) for p in members]
                masks.append(ref.group_dead(self.state[members[0]]["u"], [self.state[p]["W"] for p in members], structures))
        return masks

    def _scratch(self, p: torch.Tensor) -> torch.Tensor | None:
        """A buffer shaped like ``p``'s factors, kept between steps for its dead mask (None for small
        parameters): a fresh full-size tensor per step costs page faults on CPU."""
        U = self.state[p]["U"]
        if U.numel() < 1 << 16 or not U.is_contiguous():
            return None
        buffer = self._buffers.get(p)
        if buffer is None or buffer.shape != U.shape or buffer.dtype != U.dtype or buffer.device != U.device:
            buffer = self._buffers[p] = torch.empty_like(U)
        return buffer

    def _finish(self, dead_masks, theta_start=None, revival_step: float | None = None) -> None:
        """Hold/revive/snap exact zeros, then rewrite theta from the factors.

        ``p.grad`` is the gradient at the step's start (its single evaluation) or at its end (a
        re-evaluation); ``theta_start`` maps parameters to theta at the step's start when ``p`` no longer
        holds it. Revival takes a proximal-gradient step of ``revival_step`` (default: the group's lr; the
        sharded path always uses the lr)."""
        if self._sharded:
            return self._sharded.finish(dead_masks, theta_start)
        old = (lambda p: theta_start[p]) if theta_start is not None else (lambda p: p)
        for (group, members), dead in zip(self._sparse_params(), dead_masks):
            kappa, thr = group["kappa"], group["zero_threshold"]
            lr = float(group.get("lr", 1.0)) if revival_step is None else revival_step
            grads = [self._loss_grad(p, group) for p in members]
            if self._is_element(group):
                for p, g, d in zip(members, grads, dead):
                    if g is None:
                        continue
                    st = self.state[p]
                    ref.element_finish(st["U"], st["W"], g, old(p), d, kappa, lr, thr)
                    _write_product(p, st["U"], st["W"])
                continue
            if all(g is None for g in grads):
                continue
            st0 = self.state[members[0]]
            Ws = [self.state[p]["W"] for p in members]
            structures = [self._structure(p, group) for p in members]
            filled = [torch.zeros_like(W) if g is None else g for g, W in zip(grads, Ws)]
            ref.group_finish(st0["u"], Ws, filled, [old(p) for p in members], structures, dead, kappa, lr, thr)
            for p, W, s in zip(members, Ws, structures):
                p.copy_(s.expand(st0["u"]) * W)

    def _write_theta(self) -> None:
        if self._sharded:
            return self._sharded.write_theta()
        for group, members in self._sparse_params():
            if self._is_element(group):
                for p in members:
                    _write_product(p, self.state[p]["U"], self.state[p]["W"])
            else:
                u = self.state[members[0]]["u"]
                for p in members:
                    p.copy_(self._structure(p, group).expand(u) * self.state[p]["W"])

    def _factor_snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for _, members in self._sparse_params() for p in members for _, t in self._factor_leaves(p)]

    def _restore(self, snapshot) -> None:
        leaves = [t for _, members in self._sparse_params() for p in members for _, t in self._factor_leaves(p)]
        for t, saved in zip(leaves, snapshot):
            t.copy_(saved)
        self._write_theta()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimisation step (see the class docstring for closure semantics)."""
        self._prepare()
        if closure is not None and (self._fused_groups or (self._sharded and self._sharded.one_round(self._base))):
            # the fused bases (SGD, Adam, AdamW), and torch's per-parameter rules under FSDP2, evaluate a
            # closure once, before the update
            with torch.enable_grad():
                loss = closure()
            self._step_without_closure()
            return loss
        if closure is None:
            self._step_without_closure()
            return None
        return self._step_with_closure(closure)

    def _step_without_closure(self) -> None:
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        dead = self._dead_masks()
        if (self._sharded and grad_scale is None and found_inf is None and not self._fused_groups
                and self._sharded.one_round(self._base)):
            return self._sharded.step_one_round(self._base, dead)  # FSDP2 groups spanning shards
        own_flag = None
        if found_inf is None:  # with a GradScaler's found_inf, a step with an inf is skipped on the device
            self._check_grads()  # (a host sync; capturable fused groups check on the device instead)
            own_flag = fused.nonfinite_flag(self)
        self._set_factor_grads()
        gradless = self._gradless_factors()
        for group in self.param_groups:
            if id(group) in self._fused_groups:
                for p in group["params"]:
                    for _, leaf in self._factor_leaves(p):
                        leaf.grad = None  # the base must not step them: the kernels do
        if grad_scale is not None or found_inf is not None:
            self._base.grad_scale, self._base.found_inf = grad_scale, found_inf
        try:
            self._base.step()
        finally:
            for name in ("grad_scale", "found_inf"):
                self._base.__dict__.pop(name, None)
        self._restore_gradless(gradless)
        self._finish(dead)
        for group in self.param_groups:
            if id(group) in self._fused_groups:
                flag = found_inf if found_inf is not None else own_flag if group.get("capturable") else None
                fused.step_group(self, group, grad_scale, flag)

    def _step_with_closure(self, closure):
        dead = self._dead_masks()
        first_loss: list = []
        last_loss: list = [None]  # the closure's own loss at its last evaluation
        gradless: list = []
        theta_start: dict = {}
        versions: list = []  # versions of the factor leaves at each evaluation
        snapshot = self._factor_snapshot() if _single_group_base(self._base_cls) else None

        def spread_closure():
            with torch.no_grad():
                if first_loss:
                    if not theta_start:  # second evaluation: p still holds theta of the step's start
                        theta_start.update((p, p.detach().clone()) for _, members in self._sparse_params() for p in members)
                    self._write_theta()  # the base moved the factors since the last evaluation
            with torch.enable_grad():
                loss = closure()
            last_loss[0] = loss
            with torch.no_grad():
                self._check_grads()
                pen = self._set_factor_grads(with_penalty=True)
            if not first_loss:
                first_loss.append(loss)
                gradless.extend(self._gradless_factors())
            versions.append(self._leaf_versions())
            if isinstance(pen, torch.Tensor):  # the base minimises the smooth objective
                return (loss.detach() if isinstance(loss, torch.Tensor) else loss) + pen
            return loss

        try:
            self._base.step(spread_closure)
        except FloatingPointError:
            if snapshot is not None and first_loss:
                self._restore(snapshot)
            raise
        self._restore_gradless(gradless)
        # where LBFGS left its parameters (factors and dense parameters), before the zero pass
        base_point = [t.detach().clone() for t in self._base.param_groups[0]["params"]] if snapshot is not None else None
        if len(versions) > 1:
            # A multi-evaluation base (LBFGS) may end away from its last evaluation (a rejected line-search
            # trial): the zero pass needs the gradient at the accepted point, and theta at the step's start.
            if versions[-1] != self._leaf_versions():
                self._write_theta()
                with torch.enable_grad():
                    last_loss[0] = closure()
                self._check_grads()
        else:
            theta_start = None
        if base_point is None:
            self._finish(dead, theta_start=theta_start)
        else:
            self._finish_backtracking(dead, theta_start, closure, last_loss[0])
            self._lbfgs_include_zero_pass(base_point)
        return first_loss[0] if first_loss else None

    def _finish_backtracking(self, dead, theta_start, closure, loss) -> None:
        """The zero pass for LBFGS: revival with a proximal-gradient step found by backtracking.

        LBFGS's lr (1 by default) is a step along its quasi-Newton direction, not a step size in theta: as
        the revival step ``|theta| = lr*(|g| - 2*kappa)`` it overshoots by the loss's curvature (a factor
        ~20 on an unscaled Gaussian lasso). So, as ISTA with backtracking (Beck & Teboulle 2009), a revival
        with step ``s`` is kept only if the loss at the new point satisfies the descent-lemma bound
        ``L(theta') <= L(theta) + <g, theta' - theta> + ||theta' - theta||^2 / (2*s)`` from the point
        ``theta`` where ``g = p.grad`` was evaluated (it holds whenever ``s <= 1/Lipschitz``); otherwise
        ``s`` is halved and the pass redone. The accepted ``s`` (never above lr) is where the next revival
        starts, kept with LBFGS's state. One closure evaluation per step that revives something (and one
        per halving); ``p.grad`` is then the gradient at the new point."""
        state = self._base.state[self._base.param_groups[0]["params"][0]]
        lr = float(self.param_groups[0]["lr"])
        step = min(lr, state.get("spread_revival_step", lr))
        refs = [(p, p.grad, p.detach().clone()) for _, members in self._sparse_params() for p in members if p.grad is not None]
        if theta_start is None:  # p holds theta where g was evaluated, until a retry rewrites it
            theta_start = {p: p.detach().clone() for _, members in self._sparse_params() for p in members}
        factors = self._factor_snapshot()
        loss = float(loss)
        for _ in range(60):
            self._finish(dead, theta_start=theta_start, revival_step=step)
            if not self._revived(dead):
                break
            with torch.enable_grad():
                trial = float(closure().detach())
            linear = quadratic = 0.0
            for p, g, theta in refs:
                delta = p.detach().double() - theta.double()
                linear += float((g.double() * delta).sum())
                quadratic += float(delta.pow(2).sum())
            bound = loss + linear + quadratic / (2 * step)
            slack = 32 * torch.finfo(refs[0][2].dtype).eps * (abs(loss) + abs(linear) + quadratic / (2 * step))
            if trial <= bound + slack:  # False for a NaN/inf trial
                break
            step /= 2
            for p, g, _ in refs:  # back to the point and the gradient the zero pass starts from
                p.grad = g
            self._restore(factors)
        state["spread_revival_step"] = step

    def _revived(self, dead) -> bool:
        """Whether the zero pass revived anything (an entry/group dead before it is no longer)."""
        after = self._dead_masks()
        pairs = [(d, a) for ds, As in zip(dead, after) for d, a in (zip(ds, As) if isinstance(ds, list) else [(ds, As)])]
        return any(bool((d.bool() & ~a.bool()).any()) for d, a in pairs)  # (element masks are 0/1 floats)

    def _lbfgs_include_zero_pass(self, base_point) -> None:
        """Tell LBFGS's curvature history about the zero pass's move of the factors.

        At its next iteration LBFGS pairs ``s = t*d`` (its last move, from where it took
        ``prev_flat_grad``) with ``y = grad - prev_flat_grad``. The zero pass moved the factors after
        that: ``s`` missed the move, ``y`` did not, and the bogus pair (tiny ``y.s``) gave directions
        ~1000x too long, which a short line search could not shorten: LBFGS froze far from the optimum.
        So (1) the real displacement goes into ``d`` (with ``t = 1``, which LBFGS reads only to form
        ``s``); if its last iteration stopped before moving (``prev_flat_grad . d > -tolerance_change``,
        its own test) the displacement is the zero pass's alone. (2) Entries held at zero (``U = W = 0``)
        are fixed until revived, as the active set of a bound-constrained quasi-Newton method: their
        coordinates are removed from every stored pair (pairs left with ``y.s <= 1e-10`` are dropped, as
        LBFGS drops them), else the history keeps moving them and the zero pass keeps moving them back.

        LBFGS keeps its whole state in the entry of its first parameter (a factor's
        ``state[p]["base"][key]`` or a dense parameter's ``state[p]``); its counters are untouched.
        """
        params = self._base.param_groups[0]["params"]
        jump = torch.cat([(q.detach() - b).reshape(-1) for q, b in zip(params, base_point)])
        state = self._base.state[params[0]]
        d, t, g = state.get("d"), state.get("t"), state.get("prev_flat_grad")
        if not torch.is_tensor(d) or g is None or not bool(jump.any()):  # no history yet, or nothing moved
            return
        moved = float(g.dot(d)) <= -self._base.param_groups[0]["tolerance_change"]
        state["d"] = d.mul(float(t)).add_(jump) if moved else jump
        state["t"] = 1.0
        factors = {id(f) for _, members in self._sparse_params() for p in members for _, f in self._factor_leaves(p)}
        held = torch.cat([(q.detach() == 0).reshape(-1) if id(q) in factors else torch.zeros(q.numel(), dtype=torch.bool, device=q.device) for q in params])
        if not bool(held.any()):
            return
        keep = (~held).to(g.dtype)  # multiplying by a 0/1 vector is several times faster than masked_fill_ on CPU
        state["d"].mul_(keep)
        g.mul_(keep)  # the gradient there is 0 at the new point: y = 0 on held coordinates
        # in place: only LBFGS's history refers to its pairs (a copy per pair cost ~20% of a sparse-coding batch)
        pairs = [(y.mul_(keep), s.mul_(keep)) for y, s in zip(state["old_dirs"], state["old_stps"])]
        pairs = [(y, s, 1.0 / ys) for y, s in pairs for ys in [float(y.dot(s))] if ys > 1e-10]
        state["old_dirs"], state["old_stps"], state["ro"] = [y for y, _, _ in pairs], [s for _, s, _ in pairs], [r for _, _, r in pairs]

    def _leaf_versions(self) -> list[int]:
        return [leaf._version for _, members in self._sparse_params() for p in members for _, leaf in self._factor_leaves(p)]

    def _gradless_factors(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(param, leaf, copy)`` for the factors whose gradient is None: some bases (LBFGS) move a
        parameter without a gradient along their history; spread leaves it alone."""
        return [(p, leaf, leaf.clone()) for _, members in self._sparse_params() for p in members
                for _, leaf in self._factor_leaves(p) if leaf.grad is None]

    def _restore_gradless(self, saved) -> None:
        """Put those factors back. Theta is left alone: the zero pass compares the new factors with the
        theta that ``p`` still holds from the step's start (after several closure evaluations, which
        rewrite theta, ``_step_with_closure`` evaluates again at the restored point)."""
        for _, leaf, value in saved:
            leaf.copy_(value)

    # ------------------------------------------------------------------------------------------------
    # diagnostics

    def penalty(self) -> float:
        """The smooth penalty ``sum kappa*(||U||^2+||W||^2)`` of the current factors (0 before the first step)."""
        if sharded(self):
            return self._sharded.penalty()
        total = 0.0
        for group, members in self._sparse_params(include_fused=True):
            factors = [t for p in members for _, t in self._factor_leaves(p)]
            if factors:
                total += float(ref.penalty(factors, group["kappa"]))
        return total

    @torch.no_grad()
    def kkt_residual(self) -> float:
        """Largest violation of the L1 / group-lasso optimality conditions over the sparse groups.

        Uses the current ``param.grad``: call it after ``backward()`` at the current parameters. For each
        entry, ``max(|g| - 2*kappa, 0)`` where ``theta = 0`` and ``|g + 2*kappa*sign(theta)|`` elsewhere
        (groups: ``max(||g_g|| - 2*kappa, 0)`` resp. ``||g_g + 2*kappa*theta_g/||theta_g|| ||``). Zero at
        an exact minimum of ``loss + 2*kappa*R(theta)``; parameters without a gradient are skipped.
        Under FSDP2 every rank gets the global answer.
        """
        if sharded(self):
            return self._sharded.kkt_residual()
        worst = 0.0
        for group, members in self._sparse_params(include_fused=True):
            kappa = group["kappa"]
            if self._is_element(group):
                for p in members:
                    g = self._loss_grad(p, group)
                    if g is not None and p.numel():
                        worst = max(worst, float(ref.element_kkt(p, g, kappa)))
                continue
            live = [(p, self._loss_grad(p, group)) for p in members]
            live = [(p, g) for p, g in live if g is not None and p.numel()]
            if live:
                structures = [self._structure(p, group) for p, _ in live]
                worst = max(worst, float(ref.group_kkt([p for p, _ in live], [g for _, g in live], structures, kappa)))
        return worst

    # ------------------------------------------------------------------------------------------------
    # checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; factors and their base state keep the factors' dtype (float32 for
        bf16 parameters), everything is moved to the parameter's device."""
        factor_dtypes = {}
        for group in self.param_groups:
            for p in group["params"]:
                factor_dtypes[p] = ref.factor_dtype(p.dtype) if self._is_sparse(group) else None
        # Optimizer.load_state_dict casts floating state to the parameter's dtype; keep a float32 copy of
        # sparse entries of low-precision parameters and put it back afterwards.
        saved_groups = state_dict["param_groups"]
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        keep = {}
        if len(ids) == len(params):
            for i, p in zip(ids, params):
                entry = state_dict["state"].get(i)
                if entry is not None and "W" in entry and factor_dtypes.get(p) not in (None, p.dtype):
                    keep[p] = _map_tensors(entry, lambda k, t, d=factor_dtypes[p], dev=p.device: t.clone() if k == "step" else t.to(device=dev, dtype=d, copy=True) if t.is_floating_point() else t.to(dev, copy=True))
        super().load_state_dict(state_dict)
        for p, entry in keep.items():
            self.state[p] = entry
        self._base = None
        self._base_layout = None
        self._structures = {}


def _write_product(p: torch.Tensor, U: torch.Tensor, W: torch.Tensor) -> None:
    """``p = U*W`` (no temporary when the dtypes agree: a fresh full-size tensor costs page faults on CPU)."""
    if p.dtype == U.dtype and not _is_dtensor_like(p):
        torch.mul(U, W, out=p)
    else:
        p.copy_(U * W)


def _is_dtensor_like(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, torch.nn.Parameter)


def _reusable(buffer: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Last step's gradient buffer of a large factor, to be overwritten (a fresh large allocation costs
    page faults on CPU); None for small factors (one foreach op for all of them is cheaper)."""
    if buffer is None or like.numel() < 1 << 16 or buffer.shape != like.shape or buffer.dtype != like.dtype:
        return None
    return buffer if buffer.device == like.device and buffer.is_contiguous() else None


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
