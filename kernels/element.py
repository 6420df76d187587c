r"""Fused spread step for element sparsity: one pass, one launch for many tensors.

Reference: :func:`spread_optim.kernels.reference.element_factor_grads`, the base rule
(:mod:`spread_optim.kernels.rules`) and :func:`spread_optim.kernels.reference.element_zero_pass`, in that
order, as ``SpreadOptimizer`` runs them with ``fused=False``. Per element, in the factors' dtype:

    U0, W0 = split(theta) where theta != U0*W0 (a weight written outside the optimizer is adopted)
    g  = grad / grad_scale (negated when maximising)
    dU = g*W0 + 2*kappa*U0,   dW = g*U0 + 2*kappa*W0        -> base rule -> U1, W1 (and states)
    dead   = U0 == 0 and W0 == 0
    revive = dead and |g| > 2*kappa:  U = s, W = -sign(g)*s, s = sqrt(lr*(|g| - 2*kappa))
    snap   = not dead and (|U1*W1| <= zero_threshold and (|U1*W1| <= |U0*W0| or |g| <= 2*kappa)
                           or U1*W1 * U0*W0 < 0)
    U, W = +0.0 where snap or (dead and not revive);  theta = U*W (parameter dtype)

Bytes per element (fp32, Adam): read g, theta, U, W, 4 states (32), write U, W, 4 states, theta (28) = 60 (the
read of theta, to adopt outside writes, is 4 of them).
``theta_old`` is ``U0*W0`` in the factors' dtype (the reference reads the parameter: the same value for
float32 parameters, the rounded one for bf16).

With ``found_inf`` (``torch.amp.GradScaler``) every load and store is masked off when it is nonzero:
nothing moves, no host synchronisation.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from spread_optim.kernels import tables
from spread_optim.kernels.rules import StepOptions, factor_update, split, to_param

BLOCK = 1024
#: pointer slots per tensor: gradient, parameter, U, W, 3 base-state slots for U, 3 for W
SLOTS = tl.constexpr(10)


@triton.jit
def _element_step_kernel(
    pointers, numels, block_tensor, block_start, hyper, firsts, scale_ptr, found_ptr,
    lr_revive, zero_threshold, kappa, one_minus_beta1, beta2, one_minus_beta2, eps, momentum, one_minus_dampening,
    RULE: tl.constexpr, AMSGRAD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, BALANCED: tl.constexpr,
    G_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, F_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid).to(tl.int64)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    if HAS_FOUND:
        mask = mask & ((offs * 0 + tl.load(found_ptr)) == 0)
    row = pointers + t * SLOTS
    g = tl.load(tl.load(row + 0).to(tl.pointer_type(G_DTYPE)) + offs, mask=mask, other=0.0).to(F_DTYPE)
    if HAS_SCALE:
        g = g / tl.load(scale_ptr).to(F_DTYPE)
    if MAXIMIZE:
        g = -g
    U_ptr = tl.load(row + 2).to(tl.pointer_type(F_DTYPE))
    W_ptr = tl.load(row + 3).to(tl.pointer_type(F_DTYPE))
    P_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    U0 = tl.load(U_ptr + offs, mask=mask, other=0.0)
    W0 = tl.load(W_ptr + offs, mask=mask, other=0.0)
    # the weights are the truth: an entry written outside the optimizer gets its factors rebuilt from it
    weight = tl.load(P_ptr + offs, mask=mask, other=0.0).to(F_DTYPE)
    # (compared in the factors' dtype: theta is exact there; Triton's interpreter cannot compare bf16 blocks)
    changed = to_param(U0 * W0, P_DTYPE).to(F_DTYPE) != weight
    U_new, W_new = split(weight, BALANCED)
    U0 = tl.where(changed, U_new, U0)
    W0 = tl.where(changed, W_new, W0)
    step_size_U = tl.load(hyper + t * 4 + 0).to(F_DTYPE)
    bc2_U = tl.load(hyper + t * 4 + 1).to(F_DTYPE)
    step_size_W = tl.load(hyper + t * 4 + 2).to(F_DTYPE)
    bc2_W = tl.load(hyper + t * 4 + 3).to(F_DTYPE)
    first_U = tl.load(firsts + t * 2 + 0)
    first_W = tl.load(firsts + t * 2 + 1)

    two_kappa = 2.0 * kappa
    dU = g * W0 + two_kappa * U0
    dW = g * U0 + two_kappa * W0
    U1 = factor_update(row, 4, U0, dU, offs, mask, step_size_U, bc2_U, first_U, one_minus_beta1, beta2,
                       one_minus_beta2, eps, momentum, one_minus_dampening, RULE, AMSGRAD, HAS_MOMENTUM, NESTEROV, F_DTYPE)
    W1 = factor_update(row, 7, W0, dW, offs, mask, step_size_W, bc2_W, first_W, one_minus_beta1, beta2,
                       one_minus_beta2, eps, momentum, one_minus_dampening, RULE, AMSGRAD, HAS_MOMENTUM, NESTEROV, F_DTYPE)

    # exact zeros: hold, revive, snap
    excess = tl.abs(g) - two_kappa
    dead = (U0 == 0.0) & (W0 == 0.0)
    revive = dead & (excess > 0.0)
    s = tl.sqrt(lr_revive * tl.maximum(excess, 0.0))
    theta = U1 * W1
    theta_old = U0 * W0
    settled = (tl.abs(theta) <= tl.abs(theta_old)) | (excess <= 0.0)
    snap = (~dead) & (((tl.abs(theta) <= zero_threshold) & settled) | (theta * theta_old < 0.0))
    zero = (dead & ~revive) | snap
    sign_g = tl.where(g > 0.0, 1.0, tl.where(g < 0.0, -1.0, 0.0)).to(F_DTYPE)
    U = tl.where(revive, s, tl.where(zero, 0.0, U1))
    W = tl.where(revive, 0.0 - sign_g * s, tl.where(zero, 0.0, W1))  # (0.0 - x: never -0.0)
    tl.store(U_ptr + offs, U, mask=mask)
    tl.store(W_ptr + offs, W, mask=mask)
    tl.store(P_ptr + offs, to_param(U * W, P_DTYPE), mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tl_dtype(dtype: torch.dtype):
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"the fused kernels support float16, bfloat16, float32 and float64 tensors, got {dtype}") from None


def element_step(
    grads: Sequence[torch.Tensor],
    thetas: Sequence[torch.Tensor],
    Us: Sequence[torch.Tensor],
    Ws: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor | None]],
    hyper: torch.Tensor,
    firsts: torch.Tensor,
    options: StepOptions,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One fused spread step for the tensors listed (all on one device, each contiguous).

    ``states[i]``: the 6 base-state tensors of tensor ``i`` (3 for ``U`` then 3 for ``W``; Adam:
    ``exp_avg, exp_avg_sq, max_exp_avg_sq``, SGD: ``momentum_buffer, None, None``; None where unused).
    ``hyper``: float32 ``(n, 4)``: ``step_size, sqrt(bc2)`` for ``U`` then for ``W`` (SGD: ``lr, 1``).
    ``firsts``: int32 ``(n, 2)``: 1 where an SGD momentum buffer is written for the first time.
    Tensors of different dtypes are launched separately (one launch per dtype combination).
    """
    if not grads:
        return
    device = Us[0].device
    launches: dict = {}
    for i, (g, p, U) in enumerate(zip(grads, thetas, Us)):
        launches.setdefault((g.dtype, p.dtype, U.dtype), []).append(i)
    for (g_dtype, p_dtype, f_dtype), index in launches.items():
        rows = [[grads[i], thetas[i], Us[i], Ws[i], *states[i]] for i in index]
        numels = [Us[i].numel() for i in index]
        blocks, starts = tables.block_table(numels, BLOCK, device)
        if blocks.numel() == 0:
            continue
        sel = None if len(index) == len(grads) else tables.value_table([[i] for i in index], torch.int64, device).view(-1)
        _element_step_kernel[(blocks.numel(),)](
            tables.pointer_table(rows, device), tables.value_table([[n] for n in numels], torch.int64, device),
            blocks, starts, hyper if sel is None else hyper[sel].contiguous(),
            firsts if sel is None else firsts[sel].contiguous(),
            grad_scale if grad_scale is not None else hyper, found_inf if found_inf is not None else firsts,
            float(options.lr_revive), float(options.zero_threshold), *options.rule_args(), **options.rule_flags(),
            MAXIMIZE=bool(options.maximize), HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None,
            BALANCED=options.balanced,
            G_DTYPE=tl_dtype(g_dtype), P_DTYPE=tl_dtype(p_dtype), F_DTYPE=tl_dtype(f_dtype), BLOCK=BLOCK,
        )
