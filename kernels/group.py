r"""Fused spread step for group sparsity (rows, columns, explicit ids, groups shared by several tensors).

Reference: :func:`spread_optim.kernels.reference.group_factor_grads`, the base rule
(:mod:`spread_optim.kernels.rules`) and :func:`spread_optim.kernels.reference.group_zero_pass`. With
``theta_g = u_g * W_g`` and ``g`` the loss gradient (unscaled, negated when maximising), five launches
per step cover every tensor of a param group, whatever the number of groups (no Python loop over groups):

1. reduce (over the ``W`` tensors): per group ``sum g*W0``, ``sum g^2``, ``sum W0^2``;
2. ``u`` (over the ``u`` vectors): ``du = sum g*W0 + 2*kappa*u0`` -> base rule -> ``u1``;
3. ``W``: ``dW = u0*g + 2*kappa*W0`` -> base rule -> ``W1``; per group ``sum W1^2``, ``sum W1*W0``;
4. decide per group (over the ``u`` vectors), as ``group_zero_pass``: ``dead = u0 == 0 and ||W0_g|| == 0``;
   revive when dead and ``||g_g|| > 2*kappa`` (``u = s``, ``W_g = -s*g_g/||g_g||``,
   ``s = sqrt(lr*(||g_g|| - 2*kappa))``); snap when not dead and (``||theta1_g|| <= zero_threshold`` and
   (``||theta1_g|| <= ||theta0_g||`` or ``||g_g|| <= 2*kappa``), or ``<theta1_g, theta0_g> < 0``),
   with ``||theta_g|| = |u|*||W_g||``;
5. finish (over the ``W`` tensors): ``W = (W1 if keep else 0) + direction*g``, ``theta = u*W`` (zeros are +0.0).

Per-group sums are accumulated with atomic adds into one scratch buffer (a program whose block lies in
one group, e.g. inside one long row, adds its block sum once). A parameter without a gradient keeps its
``W`` and contributes ``g = 0``. Bytes per element (fp32 Adam): 12 (reduce: g, W, theta) + 28 (update: g, W, 2 states
read; W, 2 states written) + 12 (finish: W read, W and theta written) = 52, plus a few per group.

The weights are the truth: the reduce pass also counts, per group, the weights that no longer equal ``u0*W0``
(written outside the optimizer) and sums ``theta^2`` and ``g*theta``; the ``u`` pass adopts such a group (``u0`` from
the weights' norm, as :func:`spread_optim.kernels.reference.init_group`, whose sums of ``W0 = theta/u0`` follow from
those of theta) and the ``W`` pass reads theta again in adopted groups only, to write ``W0 = theta/u0``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from spread_optim.kernels import tables
from spread_optim.kernels.element import tl_dtype
from spread_optim.kernels.rules import StepOptions, factor_update, split, to_param

BLOCK = 1024
#: structure kinds in the per-tensor table
ROW, COLUMN, IDS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
#: scratch rows, each ``num_groups`` long: sum g*W0, sum g^2, sum W0^2, sum W1^2, sum W1*W0, the number of
#: weights written outside the optimizer, sum theta^2, sum g*theta (accumulated); u0, keep, direction and the final
#: u (written per group)
S_GW, S_GG, S_WW0, S_WW1, S_W1W0, S_CHANGED, S_PP, S_GP, S_U0, S_KEEP, S_DIRECTION, S_U = (tl.constexpr(i) for i in range(12))
SCRATCH_ROWS = 12
#: pointer slots of a W tensor: gradient, parameter, W, 3 base-state slots, group ids, its u vector
W_SLOTS = tl.constexpr(8)
#: pointer slots of a u vector: u, 3 base-state slots
U_SLOTS = tl.constexpr(4)
#: integer slots of a W tensor: numel, kind, inner size, size of dim 1, offset of its groups, has a gradient
W_META = tl.constexpr(6)


@triton.jit
def _w_block(meta, block_tensor, block_start, found_ptr, HAS_FOUND: tl.constexpr, BLOCK: tl.constexpr):
    """Tensor row, offsets, mask, group index (into the scratch rows) of this program's block."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid).to(tl.int64)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    info = meta + t * W_META
    mask = offs < tl.load(info + 0)
    if HAS_FOUND:
        mask = mask & ((offs * 0 + tl.load(found_ptr)) == 0)
    return t, offs, mask, info


@triton.jit
def _u_block(meta, block_tensor, block_start, found_ptr, HAS_FOUND: tl.constexpr, BLOCK: tl.constexpr):
    """Tensor row, offsets, mask and group index (into the scratch rows) of a block of a ``u`` vector."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid).to(tl.int64)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(meta + t * 2 + 0)
    if HAS_FOUND:
        mask = mask & ((offs * 0 + tl.load(found_ptr)) == 0)
    return t, offs, mask, tl.load(meta + t * 2 + 1) + offs


@triton.jit
def _group_index(info, row, offs, mask):
    kind = offs * 0 + tl.load(info + 1)  # a block, not a scalar: the interpreter masks with blocks only
    inner = tl.load(info + 2)
    size1 = tl.load(info + 3)
    by_dim = tl.where(kind == ROW, offs // inner, (offs // inner) % size1)
    ids_ptr = tl.load(row + 6).to(tl.pointer_type(tl.int64))
    ids = tl.load(ids_ptr + offs, mask=mask & (kind == IDS), other=0)
    return tl.load(info + 4) + tl.where(kind == IDS, ids, by_dim)


@triton.jit
def _accumulate(ptr, gidx, value, mask):
    """``ptr[gidx] += value`` (one atomic per block when the whole block lies in one group)."""
    lo = tl.min(tl.where(mask, gidx, 9223372036854775807), axis=0)
    hi = tl.max(tl.where(mask, gidx, -1), axis=0)
    if lo == hi:
        tl.atomic_add(ptr + lo, tl.sum(tl.where(mask, value, 0.0), axis=0))
    else:
        tl.atomic_add(ptr + gidx, value, mask=mask)


@triton.jit
def _loss_grad(row, offs, mask, scale_ptr, G_DTYPE: tl.constexpr, F_DTYPE: tl.constexpr,
               MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr):
    g = tl.load(tl.load(row + 0).to(tl.pointer_type(G_DTYPE)) + offs, mask=mask, other=0.0).to(F_DTYPE)
    if HAS_SCALE:
        g = g / tl.load(scale_ptr).to(F_DTYPE)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _w_inputs(pointers, meta, block_tensor, block_start, scale_ptr, found_ptr, MAXIMIZE: tl.constexpr,
              HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, G_DTYPE: tl.constexpr, F_DTYPE: tl.constexpr,
              BLOCK: tl.constexpr):
    """What the reduce and update passes read of a ``W`` block: the loss gradient (0 for a tensor without
    one, ``mask_g`` off there), ``W`` and each element's group index."""
    t, offs, mask, info = _w_block(meta, block_tensor, block_start, found_ptr, HAS_FOUND, BLOCK)
    row = pointers + t * W_SLOTS
    mask_g = mask & ((offs * 0 + tl.load(info + 5)) != 0)
    g = _loss_grad(row, offs, mask_g, scale_ptr, G_DTYPE, F_DTYPE, MAXIMIZE, HAS_SCALE)
    W_ptr = tl.load(row + 2).to(tl.pointer_type(F_DTYPE))
    W0 = tl.load(W_ptr + offs, mask=mask, other=0.0)
    return t, offs, mask, row, mask_g, g, W_ptr, W0, _group_index(info, row, offs, mask)


@triton.jit
def _reduce_kernel(pointers, meta, block_tensor, block_start, scratch, num_groups, scale_ptr, found_ptr,
                   MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
                   G_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, F_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask, row, mask_g, g, W_ptr, W0, gidx = _w_inputs(
        pointers, meta, block_tensor, block_start, scale_ptr, found_ptr, MAXIMIZE, HAS_SCALE, HAS_FOUND, G_DTYPE,
        F_DTYPE, BLOCK)
    # the weights are the truth: count the weights written outside the optimizer, per group (one read of theta)
    weight = tl.load(tl.load(row + 1).to(tl.pointer_type(P_DTYPE)) + offs, mask=mask, other=0.0)
    u_ptr = tl.load(row + 7).to(tl.pointer_type(F_DTYPE))
    u0 = tl.load(u_ptr + gidx - tl.load(meta + t * W_META + 4), mask=mask, other=0.0)
    theta = weight.to(F_DTYPE)
    # (compared in the factors' dtype: theta is exact there; Triton's interpreter cannot compare bf16 blocks)
    changed = (to_param(u0 * W0, P_DTYPE).to(F_DTYPE) != theta).to(F_DTYPE)
    _accumulate(scratch + S_CHANGED * num_groups, gidx, changed, mask)
    _accumulate(scratch + S_PP * num_groups, gidx, theta * theta, mask)
    _accumulate(scratch + S_GP * num_groups, gidx, g * theta, mask)
    _accumulate(scratch + S_GW * num_groups, gidx, g * W0, mask)
    _accumulate(scratch + S_GG * num_groups, gidx, g * g, mask)
    _accumulate(scratch + S_WW0 * num_groups, gidx, W0 * W0, mask)


@triton.jit
def _u_update_kernel(pointers, meta, block_tensor, block_start, hyper, firsts, scratch, num_groups, found_ptr,
                     kappa, one_minus_beta1, beta2, one_minus_beta2, eps, momentum, one_minus_dampening,
                     RULE: tl.constexpr, AMSGRAD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                     HAS_FOUND: tl.constexpr, BALANCED: tl.constexpr, F_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask, gidx = _u_block(meta, block_tensor, block_start, found_ptr, HAS_FOUND, BLOCK)
    row = pointers + t * U_SLOTS
    u_ptr = tl.load(row + 0).to(tl.pointer_type(F_DTYPE))
    u0 = tl.load(u_ptr + offs, mask=mask, other=0.0)
    gW = tl.load(scratch + S_GW * num_groups + gidx, mask=mask, other=0.0)
    # a group with a weight written outside the optimizer is adopted: u0 from the weights' norm (as init_group),
    # W0 = theta/u0 (written by the W pass), and the sums of W0 follow from those of theta
    adopt = tl.load(scratch + S_CHANGED * num_groups + gidx, mask=mask, other=0.0) > 0.0
    pp = tl.load(scratch + S_PP * num_groups + gidx, mask=mask, other=0.0)
    if BALANCED:
        _, u_new = split(tl.sqrt(pp), BALANCED)
    else:
        u_new = tl.zeros_like(pp) + 1.0
    inv = tl.where(u_new != 0.0, 1.0 / tl.where(u_new != 0.0, u_new, 1.0), 0.0)
    u0 = tl.where(adopt, u_new, u0)
    gW = tl.where(adopt, tl.load(scratch + S_GP * num_groups + gidx, mask=mask, other=0.0) * inv, gW)
    ww0 = tl.load(scratch + S_WW0 * num_groups + gidx, mask=mask, other=0.0)
    tl.store(scratch + S_WW0 * num_groups + gidx, tl.where(adopt, pp * inv * inv, ww0), mask=mask)
    du = gW + 2.0 * kappa * u0
    u1 = factor_update(row, 1, u0, du, offs, mask, tl.load(hyper + t * 2).to(F_DTYPE),
                       tl.load(hyper + t * 2 + 1).to(F_DTYPE), tl.load(firsts + t), one_minus_beta1, beta2,
                       one_minus_beta2, eps, momentum, one_minus_dampening, RULE, AMSGRAD, HAS_MOMENTUM,
                       NESTEROV, F_DTYPE)
    tl.store(u_ptr + offs, u1, mask=mask)
    tl.store(scratch + S_U0 * num_groups + gidx, u0, mask=mask)


@triton.jit
def _w_update_kernel(pointers, meta, block_tensor, block_start, hyper, firsts, scratch, num_groups, scale_ptr,
                     found_ptr, kappa, one_minus_beta1, beta2, one_minus_beta2, eps, momentum, one_minus_dampening,
                     RULE: tl.constexpr, AMSGRAD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                     MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
                     G_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, F_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask, row, mask_g, g, W_ptr, W0, gidx = _w_inputs(
        pointers, meta, block_tensor, block_start, scale_ptr, found_ptr, MAXIMIZE, HAS_SCALE, HAS_FOUND, G_DTYPE,
        F_DTYPE, BLOCK)
    u0 = tl.load(scratch + S_U0 * num_groups + gidx, mask=mask, other=0.0)
    adopt = mask & (tl.load(scratch + S_CHANGED * num_groups + gidx, mask=mask, other=0.0) > 0.0)
    weight = tl.load(tl.load(row + 1).to(tl.pointer_type(P_DTYPE)) + offs, mask=adopt, other=0.0).to(F_DTYPE)
    W0 = tl.where(adopt, weight * tl.where(u0 != 0.0, 1.0 / tl.where(u0 != 0.0, u0, 1.0), 0.0), W0)
    dW = u0 * g + 2.0 * kappa * W0
    W1 = factor_update(row, 3, W0, dW, offs, mask_g, tl.load(hyper + t * 2).to(F_DTYPE),
                       tl.load(hyper + t * 2 + 1).to(F_DTYPE), tl.load(firsts + t), one_minus_beta1, beta2,
                       one_minus_beta2, eps, momentum, one_minus_dampening, RULE, AMSGRAD, HAS_MOMENTUM,
                       NESTEROV, F_DTYPE)
    W1 = tl.where(mask_g, W1, W0)
    tl.store(W_ptr + offs, W1, mask=mask_g | adopt)
    _accumulate(scratch + S_WW1 * num_groups, gidx, W1 * W1, mask)
    _accumulate(scratch + S_W1W0 * num_groups, gidx, W1 * W0, mask)


@triton.jit
def _decide_kernel(pointers, meta, block_tensor, block_start, scratch, num_groups, found_ptr,
                   kappa, lr_revive, zero_threshold, HAS_FOUND: tl.constexpr, F_DTYPE: tl.constexpr,
                   BLOCK: tl.constexpr):
    t, offs, mask, gidx = _u_block(meta, block_tensor, block_start, found_ptr, HAS_FOUND, BLOCK)
    u_ptr = tl.load(pointers + t * U_SLOTS).to(tl.pointer_type(F_DTYPE))
    u1 = tl.load(u_ptr + offs, mask=mask, other=0.0)
    u0 = tl.load(scratch + S_U0 * num_groups + gidx, mask=mask, other=0.0)
    gnorm = tl.sqrt(tl.load(scratch + S_GG * num_groups + gidx, mask=mask, other=0.0))
    ww0 = tl.load(scratch + S_WW0 * num_groups + gidx, mask=mask, other=0.0)
    w1norm = tl.sqrt(tl.load(scratch + S_WW1 * num_groups + gidx, mask=mask, other=0.0))
    w1w0 = tl.load(scratch + S_W1W0 * num_groups + gidx, mask=mask, other=0.0)

    excess = gnorm - 2.0 * kappa
    dead = (u0 == 0.0) & (ww0 == 0.0)
    revive = dead & (excess > 0.0)
    s = tl.sqrt(lr_revive * tl.maximum(excess, 0.0))
    theta_norm = tl.abs(u1) * w1norm
    old_norm = tl.abs(u0) * tl.sqrt(ww0)
    inner = u1 * u0 * w1w0
    settled = (theta_norm <= old_norm) | (excess <= 0.0)
    snap = (~dead) & (((theta_norm <= zero_threshold) & settled) | (inner < 0.0))
    zero = (dead & ~revive) | snap
    direction = tl.where(revive, -s / tl.where(revive, gnorm, 1.0), 0.0)
    keep = tl.where(zero | revive, 0.0, 1.0)
    u = tl.where(revive, s, tl.where(keep != 0.0, u1, 0.0))
    tl.store(u_ptr + offs, u, mask=mask)
    tl.store(scratch + S_KEEP * num_groups + gidx, keep, mask=mask)
    tl.store(scratch + S_DIRECTION * num_groups + gidx, direction, mask=mask)
    tl.store(scratch + S_U * num_groups + gidx, u, mask=mask)


@triton.jit
def _finish_kernel(pointers, meta, block_tensor, block_start, scratch, num_groups, scale_ptr, found_ptr,
                   MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
                   G_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, F_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask, info = _w_block(meta, block_tensor, block_start, found_ptr, HAS_FOUND, BLOCK)
    row = pointers + t * W_SLOTS
    gidx = _group_index(info, row, offs, mask)
    direction = tl.load(scratch + S_DIRECTION * num_groups + gidx, mask=mask, other=0.0)
    # the gradient is read only where a group is revived
    g = _loss_grad(row, offs, mask & ((offs * 0 + tl.load(info + 5)) != 0) & (direction != 0.0), scale_ptr, G_DTYPE, F_DTYPE,
                   MAXIMIZE, HAS_SCALE)
    W_ptr = tl.load(row + 2).to(tl.pointer_type(F_DTYPE))
    W1 = tl.load(W_ptr + offs, mask=mask, other=0.0)
    keep = tl.load(scratch + S_KEEP * num_groups + gidx, mask=mask, other=0.0)
    W = tl.where(keep != 0.0, W1, 0.0) + g * direction  # (where, not W1*keep: never -0.0)
    u = tl.load(scratch + S_U * num_groups + gidx, mask=mask, other=0.0)
    tl.store(W_ptr + offs, W, mask=mask)
    tl.store(tl.load(row + 1).to(tl.pointer_type(P_DTYPE)) + offs, to_param(u * W, P_DTYPE), mask=mask)


def structure_row(structure, numel: int, group_offset: int, has_grad: bool) -> list[int]:
    """The integer table row of one ``W`` tensor (see ``W_META``)."""
    shape = structure.shape
    if structure.kind == "row":
        kind, inner, size1 = ROW.value, (numel // shape[0]) if shape[0] else 1, 1
    elif structure.kind == "column":
        kind, inner, size1 = COLUMN.value, max(1, numel // (shape[0] * shape[1])) if shape[0] * shape[1] else 1, shape[1]
    else:
        kind, inner, size1 = IDS.value, 1, 1
    return [numel, kind, inner, size1, group_offset, int(has_grad)]


def group_step(
    grads: Sequence[torch.Tensor | None],
    thetas: Sequence[torch.Tensor],
    Ws: Sequence[torch.Tensor],
    structures: Sequence,
    share_index: Sequence[int],
    w_states: Sequence[Sequence[torch.Tensor | None]],
    w_hyper: torch.Tensor,
    w_firsts: torch.Tensor,
    us: Sequence[torch.Tensor],
    u_states: Sequence[Sequence[torch.Tensor | None]],
    u_hyper: torch.Tensor,
    u_firsts: torch.Tensor,
    options: StepOptions,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One fused spread step of a param group with group sparsity.

    ``Ws[i]`` (parameter ``thetas[i]``, gradient ``grads[i]`` or None, ``structures[i]`` a
    :class:`~spread_optim.structure.GroupStructure`) belongs to the shared vector ``us[share_index[i]]``.
    States, ``hyper`` (float32 ``(n, 2)``: ``step_size, sqrt(bc2)``) and ``firsts`` (int32 ``(n,)``) as in
    :func:`spread_optim.kernels.element.element_step`, 3 state slots per tensor; a ``W`` without a
    gradient has no hyper/state entries that are read. All tensors share one parameter dtype, one
    gradient dtype and one factor dtype; every tensor is contiguous.
    """
    if not Ws:
        return
    device = Ws[0].device
    f_dtype = Ws[0].dtype
    g_dtype = next((g.dtype for g in grads if g is not None), thetas[0].dtype)
    offsets, total = [], 0
    for u in us:
        offsets.append(total)
        total += u.numel()
    if total == 0:
        return
    scratch = torch.zeros(SCRATCH_ROWS, total, dtype=f_dtype, device=device)
    w_rows = [[g if g is not None else W, p, W, *st, s.ids, us[k]]
              for g, p, W, st, s, k in zip(grads, thetas, Ws, w_states, structures, share_index)]
    w_pointers = tables.pointer_table(w_rows, device)
    w_meta = tables.value_table(
        [structure_row(s, W.numel(), offsets[k], g is not None) for g, W, s, k in zip(grads, Ws, structures, share_index)],
        torch.int64, device,
    )
    w_blocks, w_starts = tables.block_table([W.numel() for W in Ws], BLOCK, device)
    u_pointers = tables.pointer_table([[u, *st] for u, st in zip(us, u_states)], device)
    u_meta = tables.value_table([[u.numel(), off] for u, off in zip(us, offsets)], torch.int64, device)
    u_blocks, u_starts = tables.block_table([u.numel() for u in us], BLOCK, device)
    scale = grad_scale if grad_scale is not None else scratch
    found = found_inf if found_inf is not None else scratch
    flags = dict(HAS_FOUND=found_inf is not None, F_DTYPE=tl_dtype(f_dtype), BLOCK=BLOCK)
    grad_flags = dict(MAXIMIZE=bool(options.maximize), HAS_SCALE=grad_scale is not None, G_DTYPE=tl_dtype(g_dtype))
    rule_flags = options.rule_flags()
    rule_args = options.rule_args()
    w_grid = (w_blocks.numel(),)
    u_grid = (u_blocks.numel(),)
    p_dtype = tl_dtype(thetas[0].dtype)
    if w_grid[0]:
        _reduce_kernel[w_grid](w_pointers, w_meta, w_blocks, w_starts, scratch, total, scale, found, **grad_flags,
                               P_DTYPE=p_dtype, **flags)
    _u_update_kernel[u_grid](u_pointers, u_meta, u_blocks, u_starts, u_hyper, u_firsts, scratch, total, found,
                             *rule_args, **rule_flags, BALANCED=options.balanced, **flags)
    if w_grid[0]:
        _w_update_kernel[w_grid](w_pointers, w_meta, w_blocks, w_starts, w_hyper, w_firsts, scratch, total, scale, found,
                                 *rule_args, **rule_flags, **grad_flags, P_DTYPE=p_dtype, **flags)
    _decide_kernel[u_grid](u_pointers, u_meta, u_blocks, u_starts, scratch, total, found,
                           float(options.kappa), float(options.lr_revive), float(options.zero_threshold), **flags)
    if w_grid[0]:
        _finish_kernel[w_grid](w_pointers, w_meta, w_blocks, w_starts, scratch, total, scale, found,
                               **grad_flags, P_DTYPE=p_dtype, **flags)
