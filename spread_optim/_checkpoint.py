"""What ``SpreadOptimizer.load_state_dict`` checks and completes before anything is loaded.

A checkpoint is refused with an error naming the param group and parameter when it cannot be this optimizer's:
another number of groups or parameters, spread factors of the wrong shape (another model, another sparsity),
missing factors, non-floating or non-finite factors or base state (a NaN moment would reach the weights at the
next step), spread factors for a dense group. Nothing in the optimizer changes when a load is refused.

Accepted as torch accepts them:

* older state dicts: a param group without a base key takes the base class's default (as torch's own
  ``__setstate__`` does: ``maximize=False``, ``foreach=None``, ``differentiable=False``, ...), a Python-number
  ``step`` becomes a tensor;
* a ``torch.optim`` checkpoint of the base (switching from ``torch.optim.Adam`` to ``SpreadAdam`` mid-training):
  its param groups take this optimizer's spread keys, dense groups keep the base's state as it is, and a sparse
  parameter's moments, which describe theta and not the factors, are dropped: its factors start from the current
  weights at the next step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from spread_optim._base import class_defaults
from spread_optim.options import OPTIONS, check_group, is_sparse
from spread_optim.structure import GroupStructure, describe

#: the state keys of the bases whose state is known: (all keys, the keys every non-empty entry has); an entry
#: without the latter (a checkpoint of another optimizer) is refused at load
_BASE_KEYS = {
    torch.optim.SGD: ({"momentum_buffer"}, set()),
    torch.optim.Adam: ({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}, {"step", "exp_avg", "exp_avg_sq"}),
    torch.optim.AdamW: ({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}, {"step", "exp_avg", "exp_avg_sq"}),
}

#: base-state entries that have the shape of the tensor they belong to
_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum", "grad_avg",
           "ax", "prev", "step_size", "mu_product")


def prepare(state_dict: dict[str, Any], param_groups: list[dict], defaults: dict, base_cls: type) -> dict[str, Any]:
    """A checked and completed copy of ``state_dict`` for an optimizer with these ``param_groups`` and
    ``defaults`` over ``base_cls`` (raises ValueError/TypeError naming the group and parameter)."""
    base_defaults = class_defaults(base_cls)
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("not an optimizer state dict: expected a dict with 'state' and 'param_groups' "
                         f"(got {type(state_dict).__name__}{' with keys ' + str(sorted(map(str, state_dict))) if isinstance(state_dict, dict) else ''})")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"the checkpoint has {len(saved_groups)} param groups, this optimizer {len(param_groups)}")
    groups = []
    for index, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        where = f"param group {index}"
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{where}: the checkpoint has {len(saved['params'])} parameters, this optimizer's group "
                             f"{len(group['params'])}")
        merged = dict(saved)
        for key, value in defaults.items():
            if key not in merged:  # an older or a torch.optim checkpoint: spread keys from this optimizer, the
                # base's keys from the base class's own defaults (as its __setstate__ fills them)
                merged[key] = group[key] if key in OPTIONS else base_defaults.get(key, value)
        check_group(merged, where)
        groups.append(merged)
    state = {}
    for index, (saved, merged, group) in enumerate(zip(saved_groups, groups, param_groups)):
        sparse = is_sparse(merged)
        for position, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            entry = state_dict["state"].get(pid)
            if entry is None:
                continue
            where = f"param group {index}, parameter {position} (shape {tuple(p.shape)})"
            if not isinstance(entry, dict):
                raise TypeError(f"{where}: its state must be a dict, got {type(entry).__name__}")
            entry = _check_entry(entry, p, merged, sparse, where, _BASE_KEYS.get(base_cls))
            if entry is not None:
                state[pid] = entry
        if sparse and not (isinstance(merged["sparsity"], str) and merged["sparsity"] == "element"):
            _check_share_sets(state, saved["params"], merged, index)
    return {**state_dict, "state": state, "param_groups": groups}


def _check_entry(entry: dict, p: torch.Tensor, group: dict, sparse: bool, where: str, keys) -> dict | None:
    has_factors = bool({"U", "u", "W", "base"} & set(entry))
    if not sparse:
        if has_factors:
            raise ValueError(f"{where}: the checkpoint holds spread factors, but the group is dense ('kappa' = 0)")
        _check_state(entry, p.shape, where, keys)
        return _with_tensor_steps(entry, where)
    if not has_factors:
        return None  # a torch.optim entry of a sparse parameter: its moments describe theta, not the factors
    element = isinstance(group["sparsity"], str) and group["sparsity"] == "element"
    names = ("U", "W") if element else ("W",)
    missing = [n for n in (*names, "base") if n not in entry]
    if missing or (not element and "U" in entry) or (element and "u" in entry):
        raise ValueError(f"{where}: the checkpoint's factors {sorted(k for k in entry if k in ('U', 'u', 'W'))} do not "
                         f"fit sparsity {describe(group['sparsity'])!r}" + (f" (missing {missing})" if missing else ""))
    shapes = {n: tuple(p.shape) for n in names}
    if "u" in entry:
        shapes["u"] = (_num_groups(group, p),)
    for name, shape in shapes.items():
        value = entry[name]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{where}: factor {name!r} must be a floating-point tensor, got {_kind(value)}")
        if tuple(value.shape) != shape:
            raise ValueError(f"{where}: factor {name!r} has shape {tuple(value.shape)}, expected {shape} "
                             f"(a checkpoint of another model or another sparsity?)")
        _finite(value, f"{where}: factor {name!r}")
    base = entry["base"]
    if not isinstance(base, dict):
        raise TypeError(f"{where}: the base state must be a dict over the factors {sorted(shapes)}, got {_kind(base)}")
    if not set(base) <= set(shapes):
        raise ValueError(f"{where}: the checkpoint has base state for the factors {sorted(base)} but factors "
                         f"{sorted(shapes)} (a checkpoint of another sparsity or share_groups?)")
    for name, sub in base.items():
        if not isinstance(sub, dict):
            raise TypeError(f"{where}: the base state of factor {name!r} must be a dict, got {_kind(sub)}")
        _check_state(sub, shapes[name], f"{where}, base state of factor {name!r}", keys)
    return {**entry, "base": {name: _with_tensor_steps(sub, f"{where}, base state of factor {name!r}") for name, sub in base.items()}}


def _check_state(entry: dict, shape, where: str, keys=None) -> None:
    if keys is not None and entry:
        known, required = keys
        missing = sorted(required - set(entry))
        if missing:
            raise ValueError(f"{where}: the base state has keys {sorted(entry)}, without {missing} that this base keeps: "
                             "a checkpoint of another optimizer?")
    for key, value in entry.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if key in _SHAPED and tuple(value.shape) != tuple(shape):
                raise ValueError(f"{where}: {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                                 "(a checkpoint of another model?)")
            _finite(value, f"{where}: {key!r}")


def _finite(t: torch.Tensor, where: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where} holds NaN or inf; loading it would write them into the model at the next step")


def _with_tensor_steps(entry: dict, where: str) -> dict:
    """A Python-number ``step`` (an older checkpoint) as torch's optimizers keep it now: a float32 tensor."""
    step = entry.get("step")
    if step is None or isinstance(step, torch.Tensor):
        if isinstance(step, torch.Tensor) and step.is_floating_point() and not bool(torch.isfinite(step).all()):
            raise ValueError(f"{where}: a non-finite 'step' ({step!r})")
        return entry
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise TypeError(f"{where}: 'step' must be a number or a tensor, got {step!r}")
    if not math.isfinite(step):
        raise ValueError(f"{where}: a non-finite 'step' ({step!r})")
    from torch.optim.optimizer import _get_scalar_dtype

    return {**entry, "step": torch.tensor(float(step), dtype=_get_scalar_dtype())}


def _num_groups(group: dict, p: torch.Tensor) -> int:
    return GroupStructure(group["sparsity"], p.shape, p.device).num_groups


def _check_share_sets(state: dict, pids: list, group: dict, index: int) -> None:
    """Each share set's first parameter with factors holds ``u``."""
    sets = [pids] if group["share_groups"] else [[pid] for pid in pids]
    for members in sets:
        with_factors = [pid for pid in members if pid in state]
        if with_factors and "u" not in state[members[0]]:
            raise ValueError(f"param group {index}: the checkpoint lacks the group factor 'u' of parameter "
                             f"{pids.index(members[0])} (a checkpoint of another sparsity or share_groups?)")


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return type(value).__name__
