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


# ====================================================================================================
# depth-k factors: the non-convex penalties L_{2/k} (L_{2/3}, L_{1/2}, ...) with exact zeros
#
# The same smooth trick with more factors (Kolb, Mueller, Bischl & Ruegamer 2023, "Smoothing the Edges: Smooth
# Optimization for Sparse Regularization using Hadamard Overparametrization"; Hoff 2017 for L_{1/2}):
#
# * element sparsity, depth k: theta = U_1 * ... * U_{k-1} * W (elementwise), penalty kappa * sum_j ||factor_j||^2;
# * group sparsity, depth k: theta_g = u_{1,g} * ... * u_{k-1,g} * W_g (k-1 scalars per group), penalty
#   kappa * (sum_j ||u_j||^2 + ||W||^2).
#
# By AM-GM, min kappa * sum_j u_j^2 subject to prod_j |u_j| = a is k * kappa * a^(2/k), at |u_j| = a^(1/k) for every
# j (balanced). So every minimum of the smooth objective is a minimum of  L + k*kappa*sum|theta|^q  (element) or
# L + k*kappa*sum_g ||theta_g||^q  (group), q = 2/k: k = 2 is the lasso (the functions above), k = 3 is L_{2/3},
# k = 4 is L_{1/2}. Storage: the k-1 factors U stacked in one tensor of shape (k-1, *theta.shape) (groups: u of
# shape (k-1, num_groups)), W of theta's shape. Depth 2 keeps the functions above: nothing here runs at depth 2.
#
# Exact zeros for q < 1. Zero is a local minimum of |theta|^q, and U = W = 0 a local minimum of the smooth objective
# for k >= 3 (the loss's part of the Hessian vanishes there, the penalty's is 2*kappa*I): a zero never leaves by
# itself, and "zero satisfies its optimality condition" always holds. The rule that replaces the lasso's KKT test is
# the proximal-gradient one (the L_q thresholding rule): a dead entry is revived exactly when one proximal-gradient
# step from zero, x+ = prox_{lr * k*kappa * |.|^q}(-lr * g), leaves zero, i.e. when |g| > revival_threshold(kappa,
# k, lr) (:func:`lq_threshold`, derived there), and it is revived *to* that step's value (:func:`lq_prox`). At q = 1
# that is the lasso's rule: |g| > 2*kappa, |theta| = lr*(|g| - 2*kappa). Hold and snap are depth 2's, with "zero is
# optimal" read as "the thresholding condition holds" (|g| <= the threshold). Unlike q = 1, the threshold depends on
# the step: the fixed points of proximal gradient for a non-convex penalty do (a larger step sees further past the
# hump of the penalty). The step is the group's lr (with LBFGS: the backtracked revival step).


def lq_exponent(depth: int) -> float:
    """``q = 2/depth``: the penalty ``depth*kappa*|theta|^q`` of depth-``depth`` factors."""
    return 2.0 / depth


def penalty_name(depth: int, grouped: bool = False) -> str:
    """``"L1"``, ``"L2/3"``, ``"L1/2"``, ... (``q = 2/depth`` as a reduced fraction); ``"group L2/3"`` for groups."""
    from fractions import Fraction

    q = Fraction(2, depth)
    name = "L1" if q == 1 else f"L{q.numerator}/{q.denominator}"
    return f"group {name}" if grouped else name


def lq_threshold(mu: float, q: float) -> float:
    r"""The threshold of the prox of ``mu*|x|^q`` at zero (``mu >= 0``, ``0 < q <= 1``): the global minimiser of
    ``h(x) = (x - z)^2 / 2 + mu*|x|^q`` is nonzero iff ``|z| > lq_threshold(mu, q)`` (at equality ``0`` and a nonzero
    point tie; the rule keeps zero).

    Derivation (q < 1; z > 0, so x >= 0). A nonzero minimiser solves ``h'(x) = x - z + mu*q*x^(q-1) = 0``; it is
    global iff ``h(x) <= h(0) = z^2/2``. At the threshold both hold with equality: from the first,
    ``z = x + mu*q*x^(q-1)``; substituted into ``h(x) - h(0) = x^2/2 - x*z + mu*x^q = 0``:
    ``-x^2/2 + mu*(1-q)*x^q = 0``, so ``x_bar = (2*mu*(1-q))^(1/(2-q))`` (the smallest nonzero value the prox takes)
    and ``tau = x_bar + mu*q*x_bar^(q-1) = x_bar * (1 + q/(2*(1-q))) = ((2-q)/(2-2q)) * (2*mu*(1-q))^(1/(2-q))``.
    For ``|z| > tau``, ``h(x) - h(0)`` at the larger root of ``h'`` is negative (it decreases in ``|z|``).
    ``q = 1`` is the limit ``tau = mu`` (soft thresholding). q = 1/2: ``tau = 1.5*mu^(2/3)`` (Xu et al. 2012, with
    their lambda = 2*mu); q = 2/3: ``tau = 2*(2*mu/3)^(3/4)`` (Cao et al. 2013).
    """
    if q == 1:
        return float(mu)
    return (2 - q) / (2 - 2 * q) * (2 * mu * (1 - q)) ** (1 / (2 - q))


def revival_threshold(kappa: float, depth: int, step: float) -> float:
    r"""The gradient above which a dead entry (group: ``||g_g||``) is revived, for step size ``step``.

    One proximal-gradient step from ``theta = 0`` on ``L + depth*kappa*|theta|^q`` is
    ``prox_{step*depth*kappa*|.|^q}(-step*g)``, nonzero iff ``step*|g| > lq_threshold(step*depth*kappa, q)``:
    ``|g| > ((2-q)/(2-2q)) * (2*depth*kappa*(1-q))^(1/(2-q)) * step^((q-1)/(2-q))``. Depth 2 (q = 1): ``2*kappa``,
    whatever the step. ``step <= 0``: ``inf`` (a zero step leaves nothing)."""
    if depth == 2:
        return 2 * kappa
    if not step > 0:
        return float("inf")
    return lq_threshold(step * depth * kappa, lq_exponent(depth)) / step


def lq_prox_magnitude(a: torch.Tensor, mu: float, q: float) -> torch.Tensor:
    r"""``|prox_{mu*|.|^q}(z)|`` for ``a = |z|`` (a tensor, computed in float64): ``0`` where
    ``a <= lq_threshold(mu, q)``, else the larger root of ``x + mu*q*x^(q-1) = a``.

    The root by Newton's method from ``x = a``: ``phi(x) = x + mu*q*x^(q-1) - a`` is convex for ``x > 0``
    (``q < 1``), positive at ``a`` and increasing from its minimum at ``(mu*q*(1-q))^(1/(2-q)) < x_bar``, so Newton
    from the right decreases monotonically to the larger root (which is ``>= x_bar``, where
    ``phi' = 1 - q/2 > 0``: no slow convergence at the threshold). ``q = 1``: ``max(a - mu, 0)``."""
    a = a.to(torch.float64)
    if q == 1:
        return (a - mu).clamp(min=0)
    tau = lq_threshold(mu, q)
    alive = a > tau
    x = torch.where(alive, a, torch.ones_like(a))
    target = torch.where(alive, a, torch.ones_like(a))
    for _ in range(100):
        phi = x + mu * q * x.pow(q - 1) - target
        slope = 1 - mu * q * (1 - q) * x.pow(q - 2)
        new = torch.maximum(x - phi / slope, torch.zeros_like(x))
        done = bool(((new - x).abs() <= 4e-16 * x).all())
        x = new
        if done:
            break
    return torch.where(alive, x, torch.zeros_like(x))


def lq_prox(z: torch.Tensor, mu: float, q: float) -> torch.Tensor:
    """The prox of ``mu*|x|^q`` (the L_q thresholding operator: half thresholding at q = 1/2, two-thirds
    thresholding at q = 2/3, soft thresholding at q = 1), elementwise, in float64."""
    return torch.sign(z.to(torch.float64)) * lq_prox_magnitude(z.abs(), mu, q)


def deep_exponents(e: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """``floor((e + j) / depth)`` for ``j = 0..depth-2``: the exponents of the ``depth - 1`` power-of-two factors.
    With the remaining ``ceil(e / depth)`` they sum to ``e`` (Hermite's identity), so all ``depth`` factors sit
    within a factor of 2 of one another."""
    return [torch.div(e + j, depth, rounding_mode="floor") for j in range(depth - 1)]


def deep_split(t: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``t = U_1 * ... * U_{k-1} * W`` exactly, balanced: ``(U stacked (k-1, *t.shape), W)``, ``k = depth``.

    For ``|t| = m * 2**e`` (``m`` in ``[1/2, 1)``): ``U_{j+1} = 2**floor((e+j)/k)`` (``j = 0..k-2``, powers of two) and
    ``W = t / prod_j U_j = sign(t) * m * 2**ceil(e/k)`` (the exponents sum to ``e``: Hermite's identity). Every
    factor is within a factor ``2**((k-1)/k) < 2`` of ``|t|^(1/k)`` (the balanced point).

    Exactness: the product of powers of two is a power of two, exact (for the smallest float32 subnormals at
    ``k >= 7`` it is itself subnormal, ``2**-127``: still exact, so it is multiplied out, not built from its bits),
    dividing by it is exact (``W`` is a normal number), and
    :func:`element_product` multiplies ``W`` by powers of two whose every partial product lies between ``|W|`` and
    ``|t|``, so ``element_product(*deep_split(t, k)) == t`` bit for bit. Zeros give all factors ``0`` (the dead
    point). At ``k = 2`` this is :func:`balanced_split` with the roles swapped (``U = b``, ``W = a``).
    """
    nonzero = t != 0
    exps = deep_exponents(exponent(t), depth)
    zero = torch.zeros((), dtype=t.dtype, device=t.device)
    U = torch.stack([torch.where(nonzero, power_of_two(c, t.dtype), zero) for c in exps])
    scale = deep_scale(U)
    W = torch.where(nonzero, t / torch.where(nonzero, scale, torch.ones_like(scale)), zero)
    return U, W


def deep_scale(U: torch.Tensor) -> torch.Tensor:
    """``U_1 * U_2 * ... * U_{k-1}`` over the stacked first dimension, left to right (a fixed order: the product
    written into the model and the one the adoption test recomputes round alike)."""
    P = U[0]
    for j in range(1, U.shape[0]):
        P = P * U[j]
    return P


def element_product(U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``theta = (U_1 * ... * U_{k-1}) * W`` (see :func:`deep_scale` for the order)."""
    return deep_scale(U) * W


def leave_one_out(U: torch.Tensor) -> torch.Tensor:
    """Stacked ``prod_{i != j} U_i`` for each ``j`` (ones when there is one factor); no division, so exact zeros
    are fine."""
    m = U.shape[0]
    out = []
    for j in range(m):
        others = [U[i] for i in range(m) if i != j]
        prod = torch.ones_like(U[0]) if not others else others[0]
        for o in others[1:]:
            prod = prod * o
        out.append(prod)
    return torch.stack(out)


def deep_init_element(theta: torch.Tensor, depth: int, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(U (k-1, ...), W)`` with ``element_product(U, W) == theta`` exactly: ``"balanced"`` by
    :func:`deep_split` (zeros on the dead point, revived by the thresholding rule), ``"unbalanced"``: ``U = 1``,
    ``W = theta``."""
    t = theta.detach().to(factor_dtype(theta.dtype))
    if scheme == "balanced":
        return deep_split(t, depth)
    if scheme == "unbalanced":
        return torch.ones((depth - 1, *t.shape), dtype=t.dtype, device=t.device), t.clone()
    raise ValueError(f"unknown init scheme {scheme!r}")


def deep_element_adopt(U: torch.Tensor, W: torch.Tensor, theta: torch.Tensor, depth: int, scheme: str):
    """:func:`element_adopt` at depth k: entries whose weight is no longer ``element_product(U, W)`` are rebuilt."""
    changed = element_product(U, W).to(theta.dtype) != theta
    if not bool(changed.any()):  # (the usual case: no split of the whole tensor)
        return U, W
    new_U, new_W = deep_init_element(theta, depth, scheme)
    return torch.where(changed, new_U, U), torch.where(changed, new_W, W)


def deep_init_group(thetas: Sequence[torch.Tensor], structures: Sequence[GroupStructure], depth: int, scheme: str,
                    total: Sum = _local) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stacked scalars ``u`` (``(k-1, num_groups)``) and per-parameter ``W`` with ``expand(deep_scale(u)) * W ==
    theta`` exactly. ``"balanced"``: ``u_j`` powers of two from :func:`deep_exponents` of ``||theta_g||`` (so
    ``|u_j| ~ ||W_g|| ~ ||theta_g||^(1/k)``), zero groups dead; a group whose split is not exact (a huge dynamic
    range inside it) starts at ``u = 1``, as :func:`init_group` does. ``"unbalanced"``: ``u = 1``, ``W = theta``."""
    ts = [t.detach().to(factor_dtype(t.dtype)) for t in thetas]
    G = structures[0].num_groups
    ones = torch.ones(depth - 1, G, dtype=ts[0].dtype, device=ts[0].device)
    if scheme == "unbalanced":
        return ones, [t.clone() for t in ts]
    if scheme != "balanced":
        raise ValueError(f"unknown init scheme {scheme!r}")
    norms = total(group_dots([t.double() for t in ts], [t.double() for t in ts], structures)).sqrt()
    nonzero = norms != 0
    exps = deep_exponents(exponent(norms), depth)
    zero = torch.zeros((), dtype=ts[0].dtype, device=ts[0].device)
    u = torch.stack([torch.where(nonzero, power_of_two(c, ts[0].dtype), zero) for c in exps])
    scale = torch.where(nonzero, deep_scale(u), zero)  # (multiplied out: exact, subnormal ones too, see deep_split)
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, scale, torch.ones_like(scale)), zero)
    Ws = [t * s.expand(inv) for t, s in zip(ts, structures)]
    P = deep_scale(u)
    misses = sum(s.reduce((s.expand(P) * W != t).to(t.dtype)) for W, t, s in zip(Ws, ts, structures))
    inexact = total(misses) > 0
    if bool(inexact.any()):
        u = torch.where(inexact, ones, u)
        Ws = [torch.where(s.expand(inexact), t, W) for W, t, s in zip(Ws, ts, structures)]
    return u, Ws


def deep_group_adopt(u, Ws, thetas, structures, depth: int, scheme: str, changed: torch.Tensor, total: Sum = _local):
    """:func:`group_adopt` at depth k (``changed``: :func:`group_changed` with ``deep_scale(u)`` for ``u``)."""
    new_u, new_Ws = deep_init_group(thetas, structures, depth, scheme, total)
    pick = changed > 0
    return torch.where(pick, new_u, u), [torch.where(s.expand(pick), nW, W) for W, nW, s in zip(Ws, new_Ws, structures)]


# 1. factor gradients


def deep_element_factor_grads(g: torch.Tensor, U: torch.Tensor, W: torch.Tensor, kappa: float):
    """``dU_j = g * W * prod_{i != j} U_i + 2*kappa*U_j``, ``dW = g * prod_j U_j + 2*kappa*W``."""
    return (g * W) * leave_one_out(U) + 2 * kappa * U, g * deep_scale(U) + 2 * kappa * W


def deep_group_factor_grads(grads: Sequence[torch.Tensor], u: torch.Tensor, Ws: Sequence[torch.Tensor],
                            structures: Sequence[GroupStructure], kappa: float):
    """``du_{j,g} = (sum_{i in g} g_i W_i) * prod_{l != j} u_{l,g} + 2*kappa*u_{j,g}``,
    ``dW_i = (prod_j u_{j,g(i)}) * g_i + 2*kappa*W_i``."""
    gW = group_dots(grads, Ws, structures)
    P = deep_scale(u)
    return gW * leave_one_out(u) + 2 * kappa * u, [group_W_grad(g, P, W, s, kappa) for g, W, s in zip(grads, Ws, structures)]


# 3. exact zeros


def deep_element_dead(U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Entries with every factor exactly zero."""
    return (U == 0).all(0) & (W == 0)


def deep_element_zero_pass(U: torch.Tensor, W: torch.Tensor, g: torch.Tensor, theta_old: torch.Tensor, dead: torch.Tensor,
                           kappa: float, lr: float, zero_threshold: float, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact-zero rule at depth k (section comment): hold, revive when ``|g| > revival_threshold(kappa, k, lr)``
    to ``theta = -sign(g) * |prox_{lr*k*kappa*|.|^q}(lr*|g|)|`` split exactly by :func:`deep_split`, snap as at
    depth 2 with "zero is optimal" read as ``|g| <= revival_threshold``. Returns the new ``(U, W)``."""
    theta = element_product(U, W)
    threshold = revival_threshold(kappa, depth, lr)
    ag = g.abs()
    revive = dead & (ag > threshold)
    settled = (theta.abs() <= theta_old.abs()) | (ag <= threshold)
    snap = ~dead & (((theta.abs() <= zero_threshold) & settled) | (theta * theta_old < 0))
    zero = (dead & ~revive) | snap
    U, W = torch.where(zero, 0.0, U), torch.where(zero, 0.0, W)
    if not bool(revive.any()):
        return U, W
    new = torch.zeros_like(W)
    mag = lq_prox_magnitude(lr * ag[revive].double(), lr * depth * kappa, lq_exponent(depth))
    new[revive] = (0.0 - torch.sign(g[revive]).double() * mag).to(W.dtype)  # (0.0 - x: never -0.0)
    new_U, new_W = deep_split(new, depth)
    return torch.where(revive, new_U, U), torch.where(revive, new_W, W)


def deep_group_dead(u: torch.Tensor, w_sq: torch.Tensor) -> torch.Tensor:
    """Groups with every ``u_{j,g} = 0`` and ``W_g = 0``."""
    return (u == 0).all(0) & (w_sq == 0)


def deep_group_zero_pass(u: torch.Tensor, Ws: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], sums: torch.Tensor,
                         structures: Sequence[GroupStructure], dead: torch.Tensor, kappa: float, lr: float,
                         zero_threshold: float, depth: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`group_zero_pass` at depth k. ``sums``: :func:`group_finish_sums`. A revived group gets
    ``theta_g = -r g_g/||g_g||`` with ``r = |prox_{lr*k*kappa*||.||^q}(lr*||g_g||)|`` (the prox of a norm's power acts
    on the norm), as ``u_{j,g} = r^(1/k)``, ``W_g = -r^(1/k) g_g/||g_g||``; the sign test is on
    ``<theta_new_g, theta_old_g> = prod_j u_{j,g} * <W_g, theta_old_g>``."""
    g_sq, w_sq, old_sq, w_old = sums
    gnorm = g_sq.sqrt()
    threshold = revival_threshold(kappa, depth, lr)
    revive = dead & (gnorm > threshold)
    P = deep_scale(u)
    theta_norm = P.abs() * w_sq.sqrt()
    settled = (theta_norm <= old_sq.sqrt()) | (gnorm <= threshold)
    snap = ~dead & (((theta_norm <= zero_threshold) & settled) | (P * w_old < 0))
    zero = (dead & ~revive) | snap
    r = torch.zeros_like(gnorm)
    if bool(revive.any()):
        r[revive] = lq_prox_magnitude(lr * gnorm[revive].double(), lr * depth * kappa, lq_exponent(depth)).to(r.dtype)
    s = r.pow(1.0 / depth)
    direction = torch.where(revive, -s / torch.where(revive, gnorm, torch.ones_like(gnorm)), torch.zeros_like(s))
    keep = ~zero & ~revive
    new_Ws = [torch.where(st.expand(keep), W, 0.0) + g * st.expand(direction) for W, g, st in zip(Ws, grads, structures)]
    return torch.where(revive, s, torch.where(keep, u, 0.0)), new_Ws


# the optimality conditions of the L_q problem (q < 1), a stopping rule


def deep_element_kkt(theta: torch.Tensor, g: torch.Tensor, kappa: float, depth: int, step: float) -> torch.Tensor:
    """Largest violation of the conditions of ``L + k*kappa*sum|theta|^q`` (``q = 2/k``): on nonzeros the first-order
    condition ``|g + k*kappa*q*|theta|^(q-1)*sign(theta)|`` (``k*kappa*q = 2*kappa``); on zeros the thresholding
    condition ``max(|g| - revival_threshold(kappa, k, step), 0)`` (zero is a fixed point of proximal gradient with
    this step). At ``k = 2`` it is :func:`element_kkt`."""
    g = g.to(factor_dtype(g.dtype))
    t = theta.to(g.dtype)
    q = lq_exponent(depth)
    nonzero = t != 0
    a = torch.where(nonzero, t.abs(), torch.ones_like(t))
    at_zero = (g.abs() - revival_threshold(kappa, depth, step)).clamp(min=0)
    off_zero = (g + 2 * kappa * a.pow(q - 1) * torch.sign(t)).abs()
    return torch.where(nonzero, off_zero, at_zero).max()


def deep_group_kkt(thetas: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], structures: Sequence[GroupStructure],
                   kappa: float, depth: int, step: float, total: Sum = _local) -> torch.Tensor:
    """``||g_g + 2*kappa*||theta_g||^(q-2) theta_g||`` on nonzero groups (``k*kappa*q = 2*kappa``),
    ``max(||g_g|| - revival_threshold(kappa, k, step), 0)`` on zero groups."""
    gs = [g.to(factor_dtype(g.dtype)) for g in grads]
    ts = [t.to(g.dtype) for t, g in zip(thetas, gs)]
    q = lq_exponent(depth)
    tnorm = total(group_dots(ts, ts, structures)).sqrt()
    nonzero = tnorm > 0
    scale = torch.where(nonzero, 2 * kappa * torch.where(nonzero, tnorm, torch.ones_like(tnorm)).pow(q - 2), torch.zeros_like(tnorm))
    residuals = [g + t * s.expand(scale) for g, t, s in zip(gs, ts, structures)]
    res_sq, g_sq = total(torch.stack([group_dots(residuals, residuals, structures), group_dots(gs, gs, structures)]))
    at_zero = (g_sq.sqrt() - revival_threshold(kappa, depth, step)).clamp(min=0)
    return torch.where(nonzero, res_sq.sqrt(), at_zero).max()


def lq_penalty(theta: torch.Tensor, kappa: float, depth: int) -> torch.Tensor:
    """``k*kappa*sum|theta|^(2/k)`` (float64): the penalty the depth-k smooth one equals at balance."""
    return depth * kappa * theta.detach().double().abs().pow(lq_exponent(depth)).sum()
