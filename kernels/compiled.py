r"""The fused CPU path: the spec's whole step of one tensor, compiled by ``torch.compile`` (inductor).

:func:`element_step` and :func:`grouped_step` compose the spec's functions (:mod:`.reference`) into one step of one
parameter: adopt outside writes, the factor gradients, the base rule (SGD or Adam, as torch's), the exact-zero pass
and theta. Compiled, inductor fuses them into a few vectorised C++ loops, one pass over memory where the PyTorch
path makes a dozen; the same functions run eagerly as the reference of the compiled ones (tests).

Adoption stays out of the compiled loop, since splitting a weight into factors (the exponent's bits) does not
vectorise there: the compiled step (``adopt=False``) steps every entry (group) whose weight still equals its
factors' product, leaves the others exactly as they were, and returns how many it left. Only then (a weight was
written outside the optimizer) the same function runs eagerly with ``adopt=True``, which adopts those entries and
steps them, and writes nothing else. Together the two give the spec's step.

``hyper`` carries the numbers as one float64 tensor (a changed learning rate or bias correction is a new value, not
a recompilation): ``kappa, lr, zero_threshold, step_size, bc2_sqrt`` for each factor (SGD: ``lr, 1``),
``beta1, beta2, eps, momentum, dampening, grad_scale`` (:data:`HYPER`). The flags (the rule and its options) are
Python values: each combination is compiled once, for every shape (``dynamic=True``).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from spread_optim.kernels import reference as ref
from spread_optim.structure import GroupStructure

#: the entries of ``hyper`` (two factors: element ``U, W``; grouped ``u, W``)
HYPER = ("kappa", "lr", "zero_threshold", "step_size_0", "bc2_sqrt_0", "step_size_1", "bc2_sqrt_1",
         "beta1", "beta2", "eps", "momentum", "dampening", "grad_scale")


def _loss_grad(g, dtype, hyper, maximize: bool, scaled: bool):
    g = g.to(dtype)
    if scaled:
        g = g / hyper[12]
    return -g if maximize else g


def _rule(x, d, state: Sequence, hyper, which: int, rule: str, amsgrad: bool, nesterov: bool, momentum: bool, first: bool):
    """The base rule on factor ``which`` (0 or 1): returns the moved factor and its new state (same layout)."""
    if rule == "adam":
        m, v, vmax = state
        x, m, v, vmax = ref.adam_rule(x, d, m, v, v if vmax is None else vmax, hyper[3 + 2 * which], hyper[4 + 2 * which],
                                      hyper[7], hyper[8], hyper[9], amsgrad)
        return x, (m, v, vmax if amsgrad else None)
    (buf,) = state
    x, buf = ref.sgd_rule(x, d, buf, hyper[1], hyper[10] if momentum else None, hyper[11], nesterov, first)
    return x, (buf,)


def _write(write: torch.Tensor, pairs) -> None:
    """``old <- new`` where ``write`` (broadcast), in place; ``None`` entries are skipped."""
    for old, new in pairs:
        if old is not None:
            old.copy_(torch.where(write, new, old))


def element_step(g, p, U, W, state_U: Sequence, state_W: Sequence, hyper, *, rule: str, amsgrad: bool = False,
                 nesterov: bool = False, momentum: bool = False, first: bool = False, maximize: bool = False,
                 scaled: bool = False, scheme: str = "balanced", adopt: bool = False) -> torch.Tensor:
    """One fused step of an element-sparse parameter ``p`` (module docstring); returns how many entries were
    written outside the optimizer (``adopt=False`` left them as they were; ``adopt=True`` stepped only them)."""
    kappa, lr, threshold = hyper[0], hyper[1], hyper[2]
    g = _loss_grad(g, U.dtype, hyper, maximize, scaled)
    changed = (U * W).to(p.dtype) != p
    U0, W0 = ref.element_adopt(U, W, p, scheme) if adopt else (U, W)
    dead = ref.element_dead(U0, W0)
    dU, dW = ref.element_factor_grads(g, U0, W0, kappa)
    flags = dict(rule=rule, amsgrad=amsgrad, nesterov=nesterov, momentum=momentum, first=first)
    U1, new_state_U = _rule(U0, dU, state_U, hyper, 0, **flags)
    W1, new_state_W = _rule(W0, dW, state_W, hyper, 1, **flags)
    U2, W2 = ref.element_zero_pass(U1, W1, g, U0 * W0, dead, kappa, lr, threshold)
    write = changed if adopt else ~changed
    _write(write, [(U, U2), (W, W2), (p, (U2 * W2).to(p.dtype)), *zip(state_U, new_state_U), *zip(state_W, new_state_W)])
    return changed.sum()


def grouped_step(g, p, u, W, state_u: Sequence, state_W: Sequence, hyper, structure: GroupStructure, *, rule: str,
                 amsgrad: bool = False, nesterov: bool = False, momentum: bool = False, first: bool = False,
                 maximize: bool = False, scaled: bool = False, scheme: str = "balanced", adopt: bool = False) -> torch.Tensor:
    """:func:`element_step` for a parameter with its own group factor ``u`` (one per row, column or id);
    ``adopt`` acts per group. Returns how many groups hold a weight written outside the optimizer."""
    kappa, lr, threshold = hyper[0], hyper[1], hyper[2]
    s = structure
    g = _loss_grad(g, W.dtype, hyper, maximize, scaled)
    changed = ref.group_changed(u, [W], [p], [s]) > 0
    if adopt:
        u0, (W0,) = ref.group_adopt(u, [W], [p], [s], scheme, changed.to(u.dtype))
    else:
        u0, W0 = u, W
    dead = ref.group_dead(u0, ref.group_dots([W0], [W0], [s]))
    du, (dW,) = ref.group_factor_grads([g], u0, [W0], [s], kappa)
    flags = dict(rule=rule, amsgrad=amsgrad, nesterov=nesterov, momentum=momentum, first=first)
    u1, new_state_u = _rule(u0, du, state_u, hyper, 0, **flags)
    W1, new_state_W = _rule(W0, dW, state_W, hyper, 1, **flags)
    theta_old = s.expand(u0) * W0
    sums = ref.group_finish_sums([W1], [g], [theta_old], [s])
    u2, (W2,) = ref.group_zero_pass(u1, [W1], [g], sums, [s], dead, kappa, lr, threshold)
    write = changed if adopt else ~changed
    write_W = s.expand(write)
    _write(write, [(u, u2), *zip(state_u, new_state_u)])
    _write(write_W, [(W, W2), (p, (s.expand(u2) * W2).to(p.dtype)), *zip(state_W, new_state_W)])
    return changed.sum()


@functools.lru_cache(maxsize=None)
def compiled(kind: str, **flags):
    """The compiled step of ``kind`` (``"element"`` or ``"grouped"``) for these flags (compiled on first call).

    Each flag combination gets a function of its own (a code object of its own): torch.compile keeps its compiled
    graphs per code object, and a shared one would count every combination against its recompilation limit."""
    namespace = {"step": element_step if kind == "element" else grouped_step, "flags": {**flags, "adopt": False}}
    exec("def fused_step(*args):\n    return step(*args, **flags)\n", namespace)  # a new code object
    # (emulate_precision_casts: a product rounded to a bf16 weight stays rounded, as eagerly; else inductor keeps it in float32)
    return torch.compile(namespace["fused_step"], dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


@functools.lru_cache(maxsize=None)
def unavailable() -> str | None:
    """Why ``torch.compile`` cannot build CPU code here (no C++ compiler, no inductor), or None when it can."""
    try:
        out = torch.compile(lambda x: x * 2 + 1, dynamic=True, fullgraph=True)(torch.ones(4))
        if not torch.equal(out, torch.full((4,), 3.0)):
            return "torch.compile gave a wrong result on a test function"
    except Exception as error:  # a missing C++ compiler shows up here, not at import
        return f"torch.compile cannot build CPU code here ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return None
