"""spread's own param-group keys, defined once: name, default, check, one line of doc.

Every key may be given as a keyword of the optimizer (the default for every group) or per param group, as
``torch.optim`` does with its own hyperparameters. Values are checked when a group is added and again at each
step (a key may be changed between steps); numpy scalars and one-element tensors are accepted where torch
accepts them for its own hyperparameters.
"""

from __future__ import annotations

import difflib
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from spread_optim.structure import describe, validate_spec

INIT_SCHEMES = ("balanced", "unbalanced")


@dataclass(frozen=True)
class Option:
    default: Any
    doc: str
    check: Callable[[Any, str], Any]  # (value, where) -> the value to keep; raises TypeError/ValueError


def _real(value, key: str, where: str) -> float:
    """A finite or infinite real number (bool refused); one-element tensors and arrays, numpy scalars accepted."""
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        value = value.item()
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{where}: '{key}' must be a real number, got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: '{key}' must be a float, got {value!r}")
    return float(value)


def _check_kappa(value, where: str) -> float:
    kappa = _real(value, "kappa", where)
    if not (0 <= kappa < math.inf):
        raise ValueError(f"{where}: 'kappa' must be a finite float >= 0, got {value!r}")
    return kappa


def _check_threshold(value, where: str) -> float:
    threshold = _real(value, "zero_threshold", where)
    if not threshold >= 0:
        raise ValueError(f"{where}: 'zero_threshold' must be a float >= 0, got {value!r}")
    return threshold


def _check_sparsity(value, where: str):
    validate_spec(value, where)
    return value


def _check_share(value, where: str) -> bool:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype == torch.bool:
        value = bool(value)
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: 'share_groups' must be a bool, got {value!r}")
    return bool(value)


def _check_init(value, where: str) -> str:
    if value not in INIT_SCHEMES:
        raise ValueError(f"{where}: unknown 'init' {value!r}; expected one of {INIT_SCHEMES}")
    return value


OPTIONS: dict[str, Option] = {
    "kappa": Option(0.0, "strength: the group's penalty is 2*kappa*R(theta); 0 is a dense group", _check_kappa),
    "sparsity": Option("element", "'element', 'row', 'column' or an integer tensor of group ids", _check_sparsity),
    "share_groups": Option(False, "with 'row'/'column': every parameter of the group shares one factor per slice", _check_share),
    "init": Option("balanced", "how factors start from the weights: 'balanced' or 'unbalanced'", _check_init),
    "zero_threshold": Option(1e-6, "|theta| at or below this (and not growing) becomes an exact zero", _check_threshold),
}
DEFAULTS: dict[str, Any] = {key: option.default for key, option in OPTIONS.items()}


def check_group(group: dict, where: str) -> None:
    """Check spread's keys of one param group, in place (normalised values are written back)."""
    for key, option in OPTIONS.items():
        group[key] = option.check(group[key], where)


def check_share_groups(group: dict, where: str) -> None:
    """``share_groups`` with row or column slices of one size (checked at every step: keys may change)."""
    if not group["share_groups"]:
        return
    sparsity = group["sparsity"]
    if not isinstance(sparsity, str) or sparsity not in ("row", "column"):
        raise ValueError(f"{where}: 'share_groups'=True needs 'sparsity' 'row' or 'column', got {describe(sparsity)!r}")
    dim = 0 if sparsity == "row" else 1
    sizes = {p.shape[dim] for p in group["params"] if p.dim() > dim}
    if len(sizes) > 1:
        raise ValueError(f"{where}: 'share_groups'=True needs every parameter to have the same size along dim {dim}, got {sorted(sizes)}")


def check_base_numbers(group: dict, base_defaults: dict, where: str) -> None:
    """The base's numeric hyperparameters (lr, momentum, betas, ...) are numbers or tensors: torch itself fails on
    a string or None deep inside its step, after other groups have moved."""
    for key, default in base_defaults.items():
        if key not in group or isinstance(default, bool) or not isinstance(default, (int, float, tuple)):
            continue
        values = group[key] if isinstance(group[key], tuple) and isinstance(default, tuple) else (group[key],)
        for value in values:
            if isinstance(value, torch.Tensor):  # (torch checks tensors itself: one element, real)
                continue
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise TypeError(f"{where}: '{key}' must be a number (or a one-element tensor), got {value!r}")


def is_sparse(group: dict) -> bool:
    return group["kappa"] > 0


def warn_near_misses(group: dict, known: set[str], where: str) -> None:
    """torch keeps unknown keys of a param group; a key one edit away from a spread option (``"kapa"``) is
    almost surely a typo that would leave the group dense, so say so."""
    for key in group:
        if key in known or not isinstance(key, str):
            continue
        close = [name for name in OPTIONS if _one_edit(key, name)]
        if close:
            warnings.warn(f"{where}: unknown key {key!r} is kept as torch.optim does; did you mean {close[0]!r}?", UserWarning, stacklevel=4)


def _one_edit(a: str, b: str) -> bool:
    """Whether ``a`` becomes ``b`` by one insertion, deletion, substitution or swap of neighbours."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    ops = [op for op in difflib.SequenceMatcher(None, a, b).get_opcodes() if op[0] != "equal"]
    if len(ops) == 1:
        tag, i1, i2, j1, j2 = ops[0]
        return max(i2 - i1, j2 - j1) == 1
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 2 and sorted(a) == sorted(b) and any(
        a[i] == b[i + 1] and a[i + 1] == b[i] for i in range(len(a) - 1))


def describe_sparsity(group: dict) -> str:
    return describe(group["sparsity"])
