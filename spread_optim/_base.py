"""The hidden instance of the base optimizer: it moves the factors of sparse groups and the parameters of dense ones.

Its param groups mirror the optimizer's (a sparse group contributes its factors, a dense group its parameters;
LBFGS, which takes one group, gets all of them in one). Its state is the optimizer's own, routed: a dense
parameter's state is ``optimizer.state[p]`` (created only when the base creates it, as torch does), a factor's
is ``optimizer.state[p]["base"][name]``; so ``state_dict()`` carries everything. Its hyperparameters are copied
from the optimizer's groups before every step (LR schedulers write those), with three changes for sparse groups:
no ``weight_decay`` and no ``maximize`` (the spread penalty and a negated gradient replace them), and ``fused``
as :func:`spread_optim.kernels.dispatch.choose` says. Its ``step`` runs without the global optimizer hooks:
those fire once, for the spread optimizer.
"""

from __future__ import annotations

import functools
from collections.abc import MutableMapping
from typing import Iterable

import torch
from torch.optim import Optimizer


def class_defaults(base_cls: type[Optimizer]) -> dict:
    """The keyword defaults of the base class's constructor (``maximize=False``, ``foreach=None``, ...)."""
    import inspect

    try:
        parameters = inspect.signature(base_cls.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - a constructor without a signature
        return {}
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def single_group(base_cls: type[Optimizer]) -> bool:
    """Bases that refuse several param groups (LBFGS): every group is handed to one base group."""
    return issubclass(base_cls, torch.optim.LBFGS)


#: the code of torch's hook wrapper around an optimizer class's ``step`` (``Optimizer.profile_hook_step``)
_HOOK_CODE = Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__


@functools.lru_cache(maxsize=64)
def without_hooks(step):
    """A class's ``step`` without torch's hook wrapper, which runs the global step hooks. The wrapper may sit under
    others: once dynamo runs, it wraps LBFGS's step in ``torch.compiler.disable`` (which copies the wrapper's
    ``hooked`` mark); what lay above the hook wrapper is then kept as ``torch.compiler.disable`` of what lies below."""
    above, f = 0, step
    while f is not None and getattr(f, "__code__", None) is not _HOOK_CODE:
        above, f = above + 1, getattr(f, "__wrapped__", None)
    if f is None:
        return step  # (a class torch never hooked)
    return torch.compiler.disable(f.__wrapped__) if above else f.__wrapped__


def per_parameter(base_cls: type[Optimizer]) -> bool:
    """torch's own per-parameter rules: stepping two subsets of their parameters in two calls is the same as one
    call, they leave a parameter without a gradient alone, and they evaluate a closure once, before the update."""
    return base_cls.__module__.startswith("torch.optim.") and not single_group(base_cls)


class _RoutedState(MutableMapping):
    """The base's ``state``: each tensor's entry lives where the optimizer keeps it (module docstring)."""

    def __init__(self, routes: dict):
        self.routes = routes  # id(tensor) -> (tensor, container, key)

    def _route(self, tensor):
        route = self.routes.get(id(tensor))
        if route is None:
            raise KeyError(tensor)
        return route

    def __getitem__(self, tensor):
        _, container, key = self._route(tensor)
        return container[key]  # a dense parameter's entry is created here, on first use, as in torch

    def __setitem__(self, tensor, value):
        _, container, key = self._route(tensor)
        container[key] = value

    def __delitem__(self, tensor):
        _, container, key = self._route(tensor)
        del container[key]

    def __contains__(self, tensor):
        route = self.routes.get(id(tensor))
        return route is not None and route[2] in route[1]

    def __iter__(self):
        return (t for t, container, key in self.routes.values() if key in container)

    def __len__(self):
        return sum(1 for _ in self)


class HiddenBase:
    """Builds, syncs and steps the base optimizer (module docstring)."""

    def __init__(self, base_cls: type[Optimizer], kwargs: dict, keys: tuple[str, ...]):
        self.cls, self.kwargs, self.keys = base_cls, kwargs, keys
        self.optimizer: Optimizer | None = None
        self._layout: tuple | None = None

    def sync(self, param_groups: list[dict], tensors: list[list[tuple]], sparse: list[bool], base_fused: list[bool]) -> None:
        """(Re)build the base when the tensors changed, then copy hyperparameters.

        ``tensors[i]``: ``(tensor, container, key)`` of param group ``i``'s tensors, where the base's state for
        each lives (``container[key]``)."""
        layout = tuple(tuple(id(t) for t, _, _ in group) for group in tensors)
        if self.optimizer is None or layout != self._layout:
            groups = [{"params": [t for t, _, _ in group]} for group in tensors]
            if single_group(self.cls):
                groups = [{"params": [t for g in groups for t in g["params"]]}]
            self.optimizer = self.cls(groups, **self.kwargs)
            self.optimizer.state = _RoutedState({id(t): route for group in tensors for route in group for t in [route[0]]})
            self._layout = layout
        self.copy_values(param_groups, sparse, base_fused)

    def copy_values(self, param_groups: list[dict], sparse: list[bool], base_fused: list[bool]) -> None:
        """Copy the param groups' hyperparameters to the base's groups (a sparse group's as its factors take them)."""
        pairs = ([(param_groups[0], self.optimizer.param_groups[0], sparse[0], base_fused[0])] if single_group(self.cls)
                 else zip(param_groups, self.optimizer.param_groups, sparse, base_fused))
        for group, base_group, is_sparse, fused in pairs:
            for k in self.keys:
                base_group[k] = group[k]
            if is_sparse:
                if "weight_decay" in base_group:
                    base_group["weight_decay"] = 0.0  # the spread penalty replaces it (coupled, in the gradient)
                if "maximize" in base_group:
                    base_group["maximize"] = False  # handled by negating g
                if fused:
                    base_group["fused"] = True  # torch's one-pass CPU kernel for the factors

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def step(self, closure=None, only: Iterable[torch.Tensor] | None = None, grad_scale=None, found_inf=None):
        """``base.step(closure)`` without the global step hooks. ``only``: step just these tensors (the others'
        gradients are hidden for the call); ``grad_scale``/``found_inf``: GradScaler's, handed on."""
        base = self.optimizer
        hidden = []
        if only is not None:
            keep = {id(t) for t in only}
            hidden = [(p, p.grad) for g in base.param_groups for p in g["params"] if p.grad is not None and id(p) not in keep]
            for p, _ in hidden:
                p.grad = None
        if grad_scale is not None or found_inf is not None:
            base.grad_scale, base.found_inf = grad_scale, found_inf
        unhooked = without_hooks(type(base).step)
        try:
            return unhooked(base) if closure is None else unhooked(base, closure)
        finally:
            for name in ("grad_scale", "found_inf"):
                base.__dict__.pop(name, None)
            for p, grad in hidden:
                p.grad = grad

    def first_state(self) -> dict:
        """The state entry of the base's first tensor (where LBFGS keeps its whole state)."""
        return self.optimizer.state[self.optimizer.param_groups[0]["params"][0]]
