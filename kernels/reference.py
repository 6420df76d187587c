r"""The spread update, written once for a reader: the definition every other implementation must match.

Plain functions of tensors, no speed tricks. The CPU fast path (:mod:`spread_optim.kernels.cpu`) and the
Triton kernels (:mod:`spread_optim.kernels.element`, :mod:`spread_optim.kernels.group`) compute the same
numbers and are tested against these functions.

**Factors.** A sparse parameter :math:`\theta` is stored as hidden factors

* element sparsity: :math:`\theta = U \odot W` (same shape), penalty :math:`\kappa(\|U\|^2 + \|W\|^2)`;
* group sparsity: :math:`\theta_g = u_g W_g` (one scalar per group), penalty
  :math:`\kappa(\sum_g u_g^2 + \|W\|^2)`.

Every minimum of the smooth objective is a minimum of :math:`L + 2\kappa\|\theta\|_1` (element) or
:math:`L + 2\kappa\sum_g\|\theta_g\|_2` (group). Groups are described by a
:class:`~spread_optim.structure.GroupStructure` (``reduce``: sum over each group, ``expand``: one value per
group back to the parameter's shape); several parameters may share ``u`` (lists of them below).

**One step** of a sparse param group, in order:

1. :func:`element_factor_grads` / :func:`group_factor_grads`: with :math:`g = \partial L/\partial\theta`,
   :math:`\partial U = gW + 2\kappa U`, :math:`\partial W = gU + 2\kappa W` (group:
   :math:`\partial u_g = \sum_{i\in g} g_i W_i + 2\kappa u_g`, :math:`\partial W_i = u_{g(i)} g_i + 2\kappa W_i`);
2. the base rule moves the factors (any ``torch.optim`` rule; :func:`sgd_rule` and :func:`adam_rule` are what
   torch's SGD and Adam do to one tensor, and what the fused paths compute);
3. the exact-zero pass, :func:`element_zero_pass` / :func:`group_zero_pass`;
4. :math:`\theta = U W` (:math:`u_g W_g`) is written into the model's parameter.

**The exact-zero rule** (hold, revive, snap). ``U = W = 0`` (group: ``u_g = 0, W_g = 0``) is a saddle of the
smooth objective: both factor gradients vanish there, so no base rule moves such an entry ("dead").

* *hold*: an entry dead before the step stays exactly zero, whatever momentum the base carries;
* *revive*: a dead entry whose L1 optimality condition fails, ``|g| > 2*kappa`` (group ``||g_g|| > 2*kappa``),
  leaves the saddle along its negative direction ``(1, -sign g)`` by one proximal-gradient (ISTA) step:
  ``|theta| = lr*(|g| - 2*kappa)``, as balanced factors ``U = s, W = -sign(g)*s``, ``s = sqrt(lr*(|g| - 2*kappa))``;
* *snap*: a live entry becomes exactly zero when, after the step, ``|theta| <= zero_threshold`` and it did not
  grow in the step or zero is optimal for it (``|g| <= 2*kappa``), or when theta changed sign in the step
  (group: ``||theta_g||`` and a negative inner product of the new and old ``theta_g``).

The sign test catches what no threshold can: adaptive bases (Adam) make a dead factor oscillate around zero with
an amplitude of about ``lr``, but it changes sign. A coefficient that truly has to cross zero is snapped on the way
and revived on the other side at the next step, so the final support is the L1 solution's, not the threshold's.
Zeros are written as ``+0.0``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from spread_optim.structure import GroupStructure

Sum = Callable[[torch.Tensor], torch.Tensor]


def _local(x: torch.Tensor) -> torch.Tensor:
    return x


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factors of low-precision parameters (bf16, fp16) are kept in float32."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


# ----------------------------------------------------------------------------------------------------
# factors from theta


def exponent(t: torch.Tensor) -> torch.Tensor:
    """The exponent ``e`` of ``|t| = m * 2**e`` with ``m`` in ``[1/2, 1)``, as ``torch.frexp`` gives it, read from
    the bits of float32 / float64 ``t`` (``frexp`` does not vectorise under ``torch.compile``; this does).
    Subnormals are scaled by ``2**64`` first. Meaningful for finite nonzero ``t``."""
    ints, shift, field_mask, bias = (torch.int64, 52, 0x7FF, 1022) if t.dtype == torch.float64 else (torch.int32, 23, 0xFF, 126)
    tiny = t.abs() < 2.0**-100
    bits = torch.where(tiny, t * 2.0**64, t).view(ints)
    return ((bits >> shift) & field_mask) - bias - torch.where(tiny, 64, 0)


def power_of_two(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2**k`` (integer ``k``, a normal number of ``dtype``), built from its bits."""
    ints, shift, bias = (torch.int64, 52, 1023) if dtype == torch.float64 else (torch.int32, 23, 127)
    return ((k.to(ints) + bias) << shift).view(dtype)


def balanced_split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t = a * b`` exactly with ``b = 2**floor(e/2)`` for ``|t| = m * 2**e`` (``m`` in ``[1/2, 1)``), so that
    ``|a| / b = m * 2**(e mod 2)`` lies in ``[1/2, 2)``: both factors near ``sqrt|t|``.

    A power of two divides exactly in floating point, so ``a * b`` reproduces ``t`` bit for bit (a plain
    ``sqrt|t| * sqrt|t|`` misses in about half the entries). Zeros give ``a = b = 0``.
    """
    nonzero = t != 0
    b = torch.where(nonzero, power_of_two(torch.div(exponent(t), 2, rounding_mode="floor"), t.dtype), 0.0)
    a = torch.where(nonzero, t / torch.where(nonzero, b, 1.0), 0.0)
    return a, b


def init_element(theta: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(U, W)`` with ``U * W == theta`` exactly.

    ``"balanced"``: ``|U| ~ |W| ~ sqrt|theta|`` (within a factor sqrt 2); zeros start on the saddle
    ``U = W = 0`` and are revived by their KKT condition (a proximal-gradient step, so a zero start is aligned
    with the first gradient). ``"unbalanced"``: ``U = 1, W = theta``.
    """
    t = theta.detach().to(factor_dtype(theta.dtype))
    if scheme == "balanced":
        return balanced_split(t)
    if scheme == "unbalanced":
        return torch.ones_like(t), t.clone()
    raise ValueError(f"unknown init scheme {scheme!r}")


def init_group(
    thetas: Sequence[torch.Tensor], structures: Sequence[GroupStructure], scheme: str, total: Sum = _local
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Shared scalar ``u`` and per-parameter ``W`` with ``expand(u) * W == theta`` exactly.

    ``"balanced"``: ``|u_g| ~ ||W_g|| ~ sqrt||theta_g||``, zero groups on the saddle; ``"unbalanced"``:
    ``u = 1, W = theta``. ``total`` completes per-group sums of the given slices into sums over whole groups
    (identity in one process; a sum across ranks when groups span shards).
    """
    ts = [t.detach().to(factor_dtype(t.dtype)) for t in thetas]
    if scheme == "unbalanced":
        return torch.ones(structures[0].num_groups, dtype=ts[0].dtype, device=ts[0].device), [t.clone() for t in ts]
    if scheme != "balanced":
        raise ValueError(f"unknown init scheme {scheme!r}")
    # the norm only picks a power of two, so float64 (no overflow of the squares) is plenty
    norms = total(group_dots([t.double() for t in ts], [t.double() for t in ts], structures)).sqrt()
    u = balanced_split(norms)[1].to(ts[0].dtype)  # a power of two near sqrt(norm), 0 for zero groups
    inv = torch.where(u != 0, 1.0 / torch.where(u != 0, u, torch.ones_like(u)), torch.zeros_like(u))
    Ws = [t * s.expand(inv) for t, s in zip(ts, structures)]
    # a group spanning a huge dynamic range can push W into subnormals (or overflow u): start it at u = 1
    misses = sum(s.reduce((s.expand(u) * W != t).to(t.dtype)) for W, t, s in zip(Ws, ts, structures))
    inexact = total(misses) > 0
    if bool(inexact.any()):
        u = torch.where(inexact, torch.ones_like(u), u)
        Ws = [torch.where(s.expand(inexact), t, W) for W, t, s in zip(Ws, ts, structures)]
    return u, Ws


def element_adopt(U: torch.Tensor, W: torch.Tensor, theta: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's weights are the truth: entries whose weight no longer equals ``U*W`` (a checkpoint loaded, a
    pruning mask, clipping: any write outside the optimizer) get their factors rebuilt from the weight, as
    :func:`init_element` builds them (an exact zero lands on the saddle, where it is held until its KKT condition
    revives it). Returns the new ``(U, W)``; the other entries keep theirs."""
    changed = (U * W).to(theta.dtype) != theta
    new_U, new_W = init_element(theta, scheme)
    return torch.where(changed, new_U, U), torch.where(changed, new_W, W)


def group_changed(u: torch.Tensor, Ws: Sequence[torch.Tensor], thetas: Sequence[torch.Tensor],
                  structures: Sequence[GroupStructure]) -> torch.Tensor:
    """Per group, the number of entries whose weight no longer equals ``u_g*W`` (partial over shards)."""
    return sum(s.reduce(((s.expand(u) * W).to(t.dtype) != t).to(u.dtype)) for W, t, s in zip(Ws, thetas, structures))


def group_adopt(u: torch.Tensor, Ws: Sequence[torch.Tensor], thetas: Sequence[torch.Tensor], structures: Sequence[GroupStructure],
                scheme: str, changed: torch.Tensor, total: Sum = _local) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`element_adopt` per group: the groups with ``changed > 0`` (:func:`group_changed`, summed over shards)
    get ``u_g`` and ``W_g`` rebuilt from the weights, as :func:`init_group` builds them."""
    new_u, new_Ws = init_group(thetas, structures, scheme, total)
    pick = changed > 0
    return torch.where(pick, new_u, u), [torch.where(s.expand(pick), nW, W) for W, nW, s in zip(Ws, new_Ws, structures)]


def group_dots(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], structures: Sequence[GroupStructure]) -> torch.Tensor:
    """``sum_p reduce_p(x_p * y_p)``: the inner product of ``x`` and ``y`` over each (possibly shared) group."""
    total = None
    for x, y, s in zip(xs, ys, structures):
        part = s.reduce(x * y)
        total = part if total is None else total + part
    return total


# ----------------------------------------------------------------------------------------------------
# 1. the smooth objective's factor gradients, and its penalty


def element_factor_grads(g: torch.Tensor, U: torch.Tensor, W: torch.Tensor, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``dU = g*W + 2*kappa*U``, ``dW = g*U + 2*kappa*W``."""
    return g * W + 2 * kappa * U, g * U + 2 * kappa * W


def group_factor_grads(
    grads: Sequence[torch.Tensor], u: torch.Tensor, Ws: Sequence[torch.Tensor], structures: Sequence[GroupStructure],
    kappa: float, gW: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``du_g = sum_{i in g} g_i W_i + 2*kappa*u_g`` and ``dW_i = u_g(i) g_i + 2*kappa*W_i``.

    ``grads``, ``Ws`` and ``structures`` list the parameters sharing ``u``. ``gW``: the sums
    ``sum_{i in g} g_i W_i`` when given (summed over shards for groups that span several), else computed here.
    """
    if gW is None:
        gW = group_dots(grads, Ws, structures)
    return gW + 2 * kappa * u, [group_W_grad(g, u, W, s, kappa) for g, W, s in zip(grads, Ws, structures)]


def group_W_grad(g: torch.Tensor, u: torch.Tensor, W: torch.Tensor, structure: GroupStructure, kappa: float) -> torch.Tensor:
    """``dW_i = u_g(i) g_i + 2*kappa*W_i`` (local to a shard: it needs ``u``, not the group's sums)."""
    return torch.addcmul(2 * kappa * W, structure.expand(u), g)


def penalty(factors: Sequence[torch.Tensor], kappa: float) -> torch.Tensor:
    """``kappa * sum ||factor||^2``."""
    return kappa * sum(f.pow(2).sum() for f in factors)


# ----------------------------------------------------------------------------------------------------
# 2. the base rules of the fused paths, on one tensor (torch.optim's single-tensor SGD and Adam)


def sgd_rule(x, d, buf, lr, momentum=None, dampening=0.0, nesterov: bool = False, first: bool = False):
    """``torch.optim.SGD`` on one tensor ``x`` with gradient ``d`` (weight decay and maximize are already in
    ``d``): returns ``(x, buf)``. ``momentum=None``: plain SGD, no buffer; ``first``: the momentum buffer is
    created (it becomes ``d``)."""
    if momentum is None:
        return x - lr * d, buf
    buf = d.clone() if first else buf * momentum + (1 - dampening) * d
    step = d + momentum * buf if nesterov else buf
    return x - lr * step, buf


def adam_step_sizes(step: int, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    """Adam's bias corrections at step count ``step`` (>= 1): ``(lr / (1 - beta1**step), sqrt(1 - beta2**step))``."""
    return lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


def adam_rule(x, d, m, v, vmax, step_size, bc2_sqrt, beta1: float, beta2: float, eps: float, amsgrad: bool):
    """``torch.optim.Adam`` on one tensor ``x`` with gradient ``d``: returns ``(x, m, v, vmax)``; ``step_size``
    and ``bc2_sqrt`` from :func:`adam_step_sizes`. AdamW's decoupled decay is not here: a sparse group has none
    (the spread penalty replaces it)."""
    m = m + (1 - beta1) * (d - m)  # torch's lerp
    v = v * beta2 + (1 - beta2) * d * d
    if amsgrad:
        vmax = torch.maximum(vmax, v)
    denom = (vmax if amsgrad else v).sqrt() / bc2_sqrt + eps
    return x - step_size * (m / denom), m, v, vmax


# ----------------------------------------------------------------------------------------------------
# 3. exact zeros: hold, revive, snap


def element_dead(U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Entries on the saddle ``U = W = 0``."""
    return (U == 0) & (W == 0)


def element_zero_pass(
    U: torch.Tensor, W: torch.Tensor, g: torch.Tensor, theta_old: torch.Tensor, dead: torch.Tensor,
    kappa: float, lr: float, zero_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact-zero rule (module docstring) after the base moved the factors to ``U, W``; returns the new
    ``(U, W)``. ``theta_old``: theta at the step's start; ``dead``: :func:`element_dead` at the step's start."""
    theta = U * W
    excess = g.abs() - 2 * kappa
    revive = dead & (excess > 0)
    settled = (theta.abs() <= theta_old.abs()) | (excess <= 0)  # not growing, or zero is optimal
    snap = ~dead & (((theta.abs() <= zero_threshold) & settled) | (theta * theta_old < 0))
    zero = (dead & ~revive) | snap
    s = torch.sqrt(lr * excess.clamp(min=0))
    U = torch.where(revive, s, torch.where(zero, 0.0, U))
    W = torch.where(revive, 0.0 - torch.sign(g) * s, torch.where(zero, 0.0, W))  # (0.0 - x: never -0.0)
    return U, W


def group_dead(u: torch.Tensor, w_sq: torch.Tensor) -> torch.Tensor:
    """Groups on the saddle ``u_g = 0, W_g = 0`` (``w_sq``: ``||W_g||^2``)."""
    return (u == 0) & (w_sq == 0)


def group_finish_sums(
    Ws: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], thetas_old: Sequence[torch.Tensor],
    structures: Sequence[GroupStructure],
) -> torch.Tensor:
    """The per-group sums :func:`group_zero_pass` needs, stacked ``(4, num_groups)``: ``||g_g||^2``,
    ``||W_g||^2`` (the moved ``W``), ``||theta_old_g||^2`` and ``<W_g, theta_old_g>``."""
    olds = [t.to(Ws[0].dtype) for t in thetas_old]
    return torch.stack([
        group_dots(grads, grads, structures), group_dots(Ws, Ws, structures),
        group_dots(olds, olds, structures), group_dots(Ws, olds, structures),
    ])


def group_zero_pass(
    u: torch.Tensor, Ws: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], sums: torch.Tensor,
    structures: Sequence[GroupStructure], dead: torch.Tensor, kappa: float, lr: float, zero_threshold: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The exact-zero rule per group after the base moved ``u`` and ``W``; returns the new ``(u, Ws)``.

    ``sums``: :func:`group_finish_sums` (summed over shards for groups that span several); ``dead``:
    :func:`group_dead` at the step's start. A revived group gets ``u = s``, ``W_g = -s*g_g/||g_g||``, so
    ``theta_g = -s^2 g_g/||g_g||``: one group proximal-gradient step."""
    g_sq, w_sq, old_sq, w_old = sums
    gnorm = g_sq.sqrt()
    excess = gnorm - 2 * kappa
    revive = dead & (excess > 0)
    theta_norm = u.abs() * w_sq.sqrt()
    settled = (theta_norm <= old_sq.sqrt()) | (excess <= 0)
    snap = ~dead & (((theta_norm <= zero_threshold) & settled) | (u * w_old < 0))
    zero = (dead & ~revive) | snap
    s = torch.sqrt(lr * excess.clamp(min=0))
    direction = torch.where(revive, -s / torch.where(revive, gnorm, torch.ones_like(gnorm)), torch.zeros_like(s))
    keep = ~zero & ~revive
    new_Ws = [torch.where(st.expand(keep), W, 0.0) + g * st.expand(direction) for W, g, st in zip(Ws, grads, structures)]
    return torch.where(revive, s, torch.where(keep, u, 0.0)), new_Ws


# ----------------------------------------------------------------------------------------------------
# the KKT residual of the L1 / group-lasso problem (a stopping rule that needs no reference solution)


def element_kkt(theta: torch.Tensor, g: torch.Tensor, kappa: float) -> torch.Tensor:
    """Largest violation: ``max(|g|-2k, 0)`` where ``theta = 0``, ``|g + 2k sign(theta)|`` elsewhere (NaN when
    ``g`` has a NaN)."""
    g = g.to(factor_dtype(g.dtype))
    at_zero = (g.abs() - 2 * kappa).clamp(min=0)
    off_zero = (g + 2 * kappa * torch.sign(theta.to(g.dtype))).abs()
    return torch.where(theta == 0, at_zero, off_zero).max()


def group_kkt(
    thetas: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], structures: Sequence[GroupStructure], kappa: float,
    total: Sum = _local,
) -> torch.Tensor:
    """``max(||g_g|| - 2k, 0)`` for zero groups, ``||g_g + 2k theta_g/||theta_g|| ||`` elsewhere (``total`` as
    in :func:`init_group`)."""
    gs = [g.to(factor_dtype(g.dtype)) for g in grads]
    ts = [t.to(g.dtype) for t, g in zip(thetas, gs)]
    tnorm = total(group_dots(ts, ts, structures)).sqrt()
    nonzero = tnorm > 0
    scale = torch.where(nonzero, 2 * kappa / torch.where(nonzero, tnorm, torch.ones_like(tnorm)), torch.zeros_like(tnorm))
    residuals = [g + t * s.expand(scale) for g, t, s in zip(gs, ts, structures)]
    res_sq, g_sq = total(torch.stack([group_dots(residuals, residuals, structures), group_dots(gs, gs, structures)]))
    return torch.where(nonzero, res_sq.sqrt(), (g_sq.sqrt() - 2 * kappa).clamp(min=0)).max()
