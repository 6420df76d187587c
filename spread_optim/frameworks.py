"""Spread optimizers inside training frameworks: unwrapping their optimizer wrappers, timm's optimizer factory.

Hugging Face ``Trainer`` (through accelerate) hands out ``trainer.optimizer`` as an ``AcceleratedOptimizer`` whose
``.optimizer`` is yours; Lightning's ``self.optimizers()`` is a ``LightningOptimizer`` whose ``._optimizer`` is
yours. Neither forwards unknown attributes, so ``trainer.optimizer.kkt_residual()`` raises ``AttributeError``: use
``spread_optim.kkt_residual(trainer.optimizer)`` and ``spread_optim.penalty(...)``, which unwrap first
(``sparsity_report`` unwraps too).
"""

from __future__ import annotations

from spread_optim.optimizer import SpreadOptimizer

_WRAPPED = ("optimizer", "_optimizer")  # accelerate / transformers / ZeRO-style wrappers, Lightning


def innermost(optimizer):
    """The object inside framework wrappers, followed through ``.optimizer`` / ``._optimizer`` as deep as they nest
    (the argument itself when it wraps nothing)."""
    current, seen = optimizer, {id(optimizer)}
    while hasattr(current, "__dict__"):
        inner = next((x for x in (vars(current).get(a) for a in _WRAPPED) if x is not None and id(x) not in seen), None)
        if inner is None:
            break
        seen.add(id(inner))
        current = inner
    return current


def unwrap(optimizer) -> SpreadOptimizer:
    """The :class:`SpreadOptimizer` inside framework wrappers (:func:`innermost`); ``TypeError`` when there is
    none. (A ``LightningOptimizer`` passes ``isinstance`` checks for the class it wraps without being it, so
    wrappers are followed before the type is looked at.)"""
    current = innermost(optimizer)
    if not isinstance(current, SpreadOptimizer):
        raise TypeError(f"expected a spread optimizer or a wrapper around one, got {type(optimizer).__name__}")
    return current


def kkt_residual(optimizer) -> float:
    """:meth:`SpreadOptimizer.kkt_residual` of ``optimizer`` or of the spread optimizer inside a framework wrapper."""
    return unwrap(optimizer).kkt_residual()


def penalty(optimizer) -> float:
    """:meth:`SpreadOptimizer.penalty` of ``optimizer`` or of the spread optimizer inside a framework wrapper."""
    return unwrap(optimizer).penalty()


def register_timm() -> list[str]:
    """Register ``spreadsgd``, ``spreadadam`` and ``spreadadamw`` in timm's optimizer registry, so that
    ``timm.optim.create_optimizer_v2(model, opt="spreadadamw", param_group_fn=...)`` builds a spread optimizer
    (timm reads the last ``_``-separated word of ``opt`` as the name, hence no underscore). Uses timm's registry
    object (``timm.optim._optim_factory.default_registry``, not a public name); returns the names registered."""
    from timm.optim import OptimInfo
    from timm.optim._optim_factory import default_registry

    from spread_optim.dropins import SpreadAdam, SpreadAdamW, SpreadSGD

    infos = [
        OptimInfo("spreadsgd", SpreadSGD, "spread (exact L1 / group lasso) on torch.optim.SGD with Nesterov momentum",
                  has_eps=False, has_momentum=True, defaults={"nesterov": True}),
        OptimInfo("spreadadam", SpreadAdam, "spread (exact L1 / group lasso) on torch.optim.Adam", has_betas=True),
        OptimInfo("spreadadamw", SpreadAdamW, "spread (exact L1 / group lasso) on torch.optim.AdamW", has_betas=True),
    ]
    for info in infos:
        if info.name not in default_registry._optimizers:
            default_registry.register(info)
    return [info.name for info in infos]
