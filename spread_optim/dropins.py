"""``SpreadSGD``, ``SpreadAdam``, ``SpreadAdamW``: drop-ins with the exact signatures of ``torch.optim``.

Each is ``SpreadOptimizer(params, base=<torch class>, ...)`` with the base's own arguments plus the
keyword-only spread keys (``kappa``, ``sparsity``, ``share_groups``, ``init``, ``zero_threshold``,
``depth``); see
:class:`spread_optim.SpreadOptimizer` for their meaning. ``kappa=0`` (the default) is the base optimizer.
"""

from __future__ import annotations

import torch

from spread_optim.optimizer import SpreadOptimizer


class SpreadSGD(SpreadOptimizer):
    """``torch.optim.SGD`` on spread factors: ``loss + 2*kappa*||theta||_1`` (or group norms)."""

    def __init__(
        self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
        maximize=False, foreach=None, differentiable=False, fused=None,
        kappa=0.0, sparsity="element", share_groups=False, init="balanced", zero_threshold=1e-6, depth=2,
    ):
        super().__init__(
            params, torch.optim.SGD, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, foreach=foreach,
            differentiable=differentiable, fused=fused, kappa=kappa, sparsity=sparsity,
            share_groups=share_groups, init=init, zero_threshold=zero_threshold,
            depth=depth,
        )


class SpreadAdam(SpreadOptimizer):
    """``torch.optim.Adam`` on spread factors: ``loss + 2*kappa*||theta||_1`` (or group norms).

    The spread penalty is coupled (it enters the factors' gradient); ``weight_decay`` applies to dense
    groups (``kappa=0``) only.
    """

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
        foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
        decoupled_weight_decay=False,
        kappa=0.0, sparsity="element", share_groups=False, init="balanced", zero_threshold=1e-6, depth=2,
    ):
        super().__init__(
            params, torch.optim.Adam, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=decoupled_weight_decay,
            kappa=kappa, sparsity=sparsity, share_groups=share_groups, init=init, zero_threshold=zero_threshold,
            depth=depth,
        )


class SpreadAdamW(SpreadOptimizer):
    """``torch.optim.AdamW`` on spread factors. Its decoupled ``weight_decay`` (default 1e-2) applies to
    dense groups only; sparse groups get the spread penalty in the gradient instead."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
        maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
        kappa=0.0, sparsity="element", share_groups=False, init="balanced", zero_threshold=1e-6, depth=2,
    ):
        super().__init__(
            params, torch.optim.AdamW, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
            kappa=kappa, sparsity=sparsity, share_groups=share_groups, init=init, zero_threshold=zero_threshold,
            depth=depth,
        )
