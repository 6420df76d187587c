"""Averaged weights (EMA, SWA, ``torch.optim.swa_utils.AveragedModel``) with spread's exact zeros.

An average of weights over steps is nonzero wherever the weight was nonzero at any averaged step, so an EMA of a
sparse model holds almost no exact zeros even when the live model holds many. Two ways to keep them:

* average as usual, then :func:`apply_support` copies the live model's exact zeros into the averaged model (the
  live model's support is the L1 solution's: its zeros are where the optimality conditions put them);
* or average with :func:`sparse_avg_fn`, an ``avg_fn`` for ``AveragedModel`` that sets an averaged entry to 0
  whenever the live entry is exactly 0 (so the averaged model is sparse at every step, a revived entry's average
  starts again from 0).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def apply_support(averaged: nn.Module, live: nn.Module) -> int:
    """Set to exactly 0 every parameter entry of ``averaged`` where the same parameter of ``live`` is exactly 0.

    ``averaged`` may be an ``AveragedModel`` (or any wrapper with ``.module``, as timm's ``ModelEmaV3``) of ``live``;
    parameters are matched by name. Buffers (BatchNorm statistics) are left alone. Returns the number of averaged
    entries set to 0 that were not 0 before.
    """
    live_params = dict(live.named_parameters())
    target = averaged
    if not set(live_params) <= set(dict(averaged.named_parameters())) and isinstance(getattr(averaged, "module", None), nn.Module):
        target = averaged.module
    target_params = dict(target.named_parameters())
    missing = sorted(set(live_params) - set(target_params))
    if missing:
        raise ValueError(f"apply_support: the averaged model has no parameter(s) {missing[:5]} of the live model")
    changed = 0
    with torch.no_grad():
        for name, p in live_params.items():
            q = target_params[name]
            if q.shape != p.shape:
                raise ValueError(f"apply_support: {name} has shape {tuple(q.shape)} in the averaged model, {tuple(p.shape)} in the live one")
            zero = (p == 0).to(q.device)
            changed += int((zero & (q != 0)).sum())
            q.masked_fill_(zero, 0.0)
    return changed


def sparse_avg_fn(avg_fn: Callable | None = None) -> Callable:
    """An ``avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` that keeps the live model's exact zeros.

    ``avg_fn(averaged_param, current_param, num_averaged)`` is the averaging rule (default: the equal average of
    SWA; for an EMA pass ``torch.optim.swa_utils.get_ema_avg_fn(decay)``); its result is then set to 0 wherever
    ``current_param`` is exactly 0::

        ema = AveragedModel(model, avg_fn=sparse_avg_fn(get_ema_avg_fn(0.999)))
    """
    rule = avg_fn if avg_fn is not None else _swa

    def averaged(averaged_param: torch.Tensor, current_param: torch.Tensor, num_averaged) -> torch.Tensor:
        out = rule(averaged_param, current_param, num_averaged)
        return torch.where(current_param == 0, torch.zeros((), dtype=out.dtype, device=out.device), out)

    return averaged


def _swa(averaged_param, current_param, num_averaged):
    return averaged_param + (current_param - averaged_param) / (num_averaged + 1)
