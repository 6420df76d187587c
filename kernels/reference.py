r"""Pure-PyTorch reference of the spread update: the definition every other code path must match.

Notation (DESIGN.md §1). A sparse parameter :math:`\theta` is stored as hidden factors

* element sparsity: :math:`\theta = U \odot W` (same shape), penalty :math:`\kappa(\|U\|^2 + \|W\|^2)`;
* group sparsity: :math:`\theta_g = u_g W_g` (one scalar per group), penalty
  :math:`\kappa(\sum_g u_g^2 + \|W\|^2)`.

With :math:`g = \partial L / \partial \theta`, the factor gradients of the smooth objective are

* element: :math:`\partial U = g W + 2\kappa U`, :math:`\partial W = g U + 2\kappa W`;
* group: :math:`\partial u_g = \sum_{i \in g} g_i W_i + 2\kappa u_g`,
  :math:`\partial W_i = u_{g(i)} g_i + 2\kappa W_i`.

Every minimum of the smooth objective is a minimum of :math:`L + 2\kappa\|\theta\|_1` (element) or
:math:`L + 2\kappa\sum_g\|\theta_g\|_2` (group).

Exact zeros. ``U = W = 0`` (group: ``u = 0, W_g = 0``) is a saddle of the smooth objective: both factor
gradients vanish there, so the base rule never moves such an entry. The reference therefore

* *holds* entries that were exactly zero before the step at zero, whatever momentum the base carries,
* *revives* such an entry when its L1 KKT condition is violated (``|g| > 2*kappa``, group:
  ``||g_g|| > 2*kappa``) along the saddle's negative direction ``(1, -sign g)``, to the size of one
  proximal-gradient (ISTA) step: ``|theta| = lr * (|g| - 2*kappa)``, balanced factors;
* *snaps* an entry to exact zero when, after the step, ``|theta| <= zero_threshold`` and it either
  did not grow in this step or its KKT condition says zero is optimal (``|g| <= 2*kappa``), or when
  theta changed sign in this step (group: ``||theta_g||``, ``||g_g||`` and a negative inner product of
  the new and old ``theta_g``). An entry growing away from zero because the L1 problem needs it (a
  fresh revival) is never snapped by the threshold. The sign test catches what no threshold can: adaptive bases (Adam)
  make a dead factor oscillate around zero with an amplitude of about ``lr``, so ``|theta|`` never
  falls under a fixed threshold, but it changes sign. A coefficient that truly has to cross zero is
  snapped on the way and revived on the other side at the next step (its KKT condition is violated),
  so the final support is the L1 solution's, not the threshold's.

Groups are described by a :class:`spread_optim.structure.GroupStructure`; a list of (structure, tensor)
pairs is one *shared* group set when several parameters share the factor ``u``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from spread_optim.structure import GroupStructure


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factors of low-precision parameters (bf16, fp16) are kept in float32."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _balanced_split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t = a * b`` exactly, ``b = 2**round(log2 sqrt|t|) > 0``, so ``|a|/b`` lies in ``[1/2, 2]``.

    A power of two divides exactly in floating point, so ``a * b`` reproduces ``t`` bit for bit (a plain
    ``sqrt|t| * sqrt|t|`` misses in about half the entries). Zeros give ``a = b = 0``.
    """
    nonzero = t != 0
    safe = torch.where(nonzero, t.abs(), torch.ones_like(t))
    b = torch.exp2(torch.round(torch.log2(safe) / 2))
    b = torch.where(nonzero, b, torch.zeros_like(b))
    a = torch.where(nonzero, t / torch.where(nonzero, b, torch.ones_like(b)), torch.zeros_like(t))
    return a, b


def init_element(theta: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(U, W)`` with ``U * W == theta`` exactly.

    ``"balanced"``: ``|U| ~ |W| ~ sqrt|theta|`` (within a factor sqrt 2); zeros start on the saddle
    ``U = W = 0`` and are revived by their KKT condition at the first step (a proximal-gradient step, so
    a zero start is aligned with the first gradient). ``"unbalanced"``: ``U = 1, W = theta``.
    """
    t = theta.detach().to(factor_dtype(theta.dtype))
    if scheme == "balanced":
        return _balanced_split(t)
    if scheme == "unbalanced":
        return torch.ones_like(t), t.clone()
    raise ValueError(f"unknown init scheme {scheme!r}")


def init_group(
    thetas: Sequence[torch.Tensor], structures: Sequence[GroupStructure], scheme: str, sum_groups=None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Shared scalar ``u`` and per-parameter ``W`` with ``expand(u) * W == theta`` exactly.

    ``"balanced"``: ``|u_g| ~ ||W_g|| ~ sqrt||theta_g||``, zero groups on the saddle; ``"unbalanced"``:
    ``u = 1, W = theta``. ``sum_groups`` (default: none) completes per-group sums of the given slices into
    sums over the whole groups, when ``thetas`` hold only slices of groups that span several shards.
    """
    total = sum_groups or (lambda x: x)
    ts = [t.detach().to(factor_dtype(t.dtype)) for t in thetas]
    if scheme == "unbalanced":
        return torch.ones(structures[0].num_groups, dtype=ts[0].dtype, device=ts[0].device), [t.clone() for t in ts]
    if scheme != "balanced":
        raise ValueError(f"unknown init scheme {scheme!r}")
    # the norm only picks a power of two, so float64 (no overflow of the squares) is plenty
    norms = total(group_sq_sums([t.double() for t in ts], structures)).sqrt()
    _, u = _balanced_split(norms)  # u = power of two near sqrt(norm), 0 for zero groups
    u = u.to(ts[0].dtype)
    inv = torch.where(u != 0, 1.0 / torch.where(u != 0, u, torch.ones_like(u)), torch.zeros_like(u))
    Ws = [t * s.expand(inv) for t, s in zip(ts, structures)]
    # a group spanning a huge dynamic range can push W into subnormals (or overflow u): start it at u = 1
    inexact = total(sum(s.reduce((s.expand(u) * W != t).to(t.dtype)) for W, t, s in zip(Ws, ts, structures))) > 0
    if bool(inexact.any()):
        u = torch.where(inexact, torch.ones_like(u), u)
        Ws = [torch.where(s.expand(inexact), t, W) for W, t, s in zip(Ws, ts, structures)]
    return u, Ws


def group_sq_sums(tensors: Sequence[torch.Tensor], structures: Sequence[GroupStructure]) -> torch.Tensor:
    """``sum_p reduce_p(x_p**2)``: squared norm of each (possibly shared) group."""
    return group_dots(tensors, tensors, structures)


def group_dots(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], structures: Sequence[GroupStructure]) -> torch.Tensor:
    """``sum_p reduce_p(x_p * y_p)``: the inner product of ``x`` and ``y`` over each (possibly shared) group."""
    total = None
    for x, y, s in zip(xs, ys, structures):
        part = s.reduce(x * y)
        total = part if total is None else total.add_(part)
    return total


def group_norms(tensors: Sequence[torch.Tensor], structures: Sequence[GroupStructure]) -> torch.Tensor:
    return group_sq_sums(tensors, structures).sqrt()


# ----------------------------------------------------------------------------------------------------
# factor gradients and penalty


def element_factor_grads(
    grads: list[torch.Tensor], Us: list[torch.Tensor], Ws: list[torch.Tensor], kappa: float, out=None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``dU = g*W + 2*kappa*U`` and ``dW = g*U + 2*kappa*W`` for a list of tensors (foreach).

    ``out``: optional ``(dU buffers, dW buffers)`` (None entries allocate): large tensors reuse last step's
    gradient buffers instead of fresh allocations."""
    if out is None:
        gU = torch._foreach_mul(grads, Ws)
        torch._foreach_add_(gU, Us, alpha=2.0 * kappa)
        gW = torch._foreach_mul(grads, Us)
        torch._foreach_add_(gW, Ws, alpha=2.0 * kappa)
        return gU, gW
    fresh = [i for i, (a, b) in enumerate(zip(*out)) if a is None or b is None]
    gU, gW = list(out[0]), list(out[1])
    if fresh:
        new_U, new_W = element_factor_grads([grads[i] for i in fresh], [Us[i] for i in fresh], [Ws[i] for i in fresh], kappa)
        for i, a, b in zip(fresh, new_U, new_W):
            gU[i], gW[i] = a, b
    for i, (g, U, W) in enumerate(zip(grads, Us, Ws)):
        if out[0][i] is not None and out[1][i] is not None:
            torch.mul(g, W, out=gU[i]).add_(U, alpha=2.0 * kappa)
            torch.mul(g, U, out=gW[i]).add_(W, alpha=2.0 * kappa)
    return gU, gW


def group_factor_grads(
    grads: Sequence[torch.Tensor],
    u: torch.Tensor,
    Ws: Sequence[torch.Tensor],
    structures: Sequence[GroupStructure],
    kappa: float,
    gW: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``du_g = sum_{i in g} g_i W_i + 2*kappa*u_g`` and ``dW_i = u_g(i) g_i + 2*kappa*W_i``.

    ``grads``, ``Ws`` and ``structures`` list the parameters sharing ``u`` (one parameter unless the
    group is shared). ``gW``: the sums ``sum_{i in g} g_i W_i`` when given (:func:`group_gW` summed over
    the shards of groups that span several), else computed here.
    """
    du = 2.0 * kappa * u
    if gW is not None:
        du = du + gW
    gWs = []
    for g, W, s in zip(grads, Ws, structures):
        if gW is None:
            du = du + s.reduce(g * W)
        gWs.append(group_W_grad(g, u, W, s, kappa))
    return du, gWs


def group_W_grad(grad: torch.Tensor, u: torch.Tensor, W: torch.Tensor, structure: GroupStructure, kappa: float) -> torch.Tensor:
    """``dW_i = u_g(i) g_i + 2*kappa*W_i`` (local to a shard: needs ``u``, not the group's sums)."""
    return torch.addcmul(W * (2.0 * kappa), structure.expand(u), grad)


def group_gW(grads: Sequence[torch.Tensor], Ws: Sequence[torch.Tensor], structures: Sequence[GroupStructure]) -> torch.Tensor:
    """``sum_{i in g} g_i W_i`` per group (the loss part of ``du``)."""
    return group_dots(grads, Ws, structures)


def penalty(factors: Sequence[torch.Tensor], kappa: float) -> torch.Tensor:
    """``kappa * sum ||factor||^2``."""
    return kappa * sum(f.pow(2).sum() for f in factors)


# ----------------------------------------------------------------------------------------------------
# exact zeros: hold, revive, snap


def element_dead(U: torch.Tensor, W: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Entries on the saddle ``U = W = 0``, as a 0/1 mask in the factors' dtype (see :func:`element_finish`),
    written into ``out`` when given (cache-sized chunks, no full-size temporary)."""
    if out is None:
        return U.abs().add_(W.abs()).sign_().neg_().add_(1)
    for u, w, o in zip(*(_chunks(t) for t in (U, W, out))):
        torch.abs(u, out=o).add_(w.abs()).sign_().neg_().add_(1)
    return out


def nonfinite_probe(g: torch.Tensor) -> torch.Tensor:
    """A scalar that is 0 when every entry of ``g`` is finite and NaN otherwise: ``sum(g*0)`` (two float passes
    over cache-sized chunks; on CPU several times cheaper than ``isfinite(g).all()``)."""
    parts = [c.mul(0).sum() for c in _chunks(g)]
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def _chunks(t: torch.Tensor) -> list[torch.Tensor]:
    """Flat views of ``_CHUNK`` elements of a contiguous tensor (the tensor itself otherwise)."""
    if not t.is_contiguous() or t.numel() <= _CHUNK:
        return [t]
    return list(t.view(-1).split(_CHUNK))


def element_finish(
    U: torch.Tensor,
    W: torch.Tensor,
    grad: torch.Tensor,
    theta_old: torch.Tensor,
    dead: torch.Tensor,
    kappa: float,
    lr: float,
    zero_threshold: float,
) -> None:
    """After the base step: hold, revive and snap (module docstring), in place on ``U`` and ``W``.

    ``zero = dead or snap``, ``snap = |theta| <= zero_threshold and (|theta| <= |theta_old| or |g| <= 2k)
    or theta*theta_old < 0``; ``revive = dead and |g| > 2k``: ``U = s, W = -sign(g)*s``,
    ``s = sqrt(lr*(|g| - 2k))``. ``dead``: the 0/1 mask of :func:`element_dead` (a bool mask is accepted).
    Contiguous tensors are processed in cache-sized chunks (the same numbers, without full-size
    temporaries). A zeroed factor may be ``-0.0``."""
    if dead.dtype == torch.bool:
        dead = dead.to(U.dtype)
    tensors = (U, W, grad, theta_old, dead)
    if all(t.is_contiguous() for t in tensors) and U.numel() > _CHUNK:
        flat = [t.view(-1) for t in tensors]
        for start in range(0, U.numel(), _CHUNK):
            _element_finish_chunk(*(t[start:start + _CHUNK] for t in flat), kappa, lr, zero_threshold)
    else:
        _element_finish_chunk(U, W, grad, theta_old, dead, kappa, lr, zero_threshold)


#: elements per chunk of the CPU reference's exact-zero pass (a few 256 KB temporaries stay in cache)
_CHUNK = 1 << 16


def _element_finish_chunk(U, W, grad, theta_old, dead, kappa, lr, zero_threshold) -> None:
    # Conditions are 0/1 masks in the factors' dtype (AND = product, OR = maximum): on CPU, comparisons
    # producing bool tensors and their reductions are 5-10x slower than float arithmetic. ``sign(b - a)``
    # compares exactly (with gradual underflow ``b - a == 0`` only when ``a == b``).
    theta = U * W
    size = theta.abs()
    excess = grad.abs().sub_(2.0 * kappa)
    settled = torch.maximum(_at_most(size, theta_old.abs()), _at_most(excess, 0.0))  # not growing, or zero optimal
    zero = _at_most(size, zero_threshold).mul_(settled)
    zero = torch.maximum(zero, theta.mul_(theta_old).sign_().neg_().clamp_(min=0))  # a sign flip
    zero = torch.maximum(zero, dead)
    keep = zero.neg_().add_(1)
    U.mul_(keep)
    W.mul_(keep)
    revive = excess.sign().clamp_(min=0).mul_(dead)  # dead and |g| > 2*kappa
    if float(revive.sum()) > 0:
        # sqrt(lr*excess) where revived; 1 is added elsewhere first (then masked to 0): on x86 CPUs
        # ``sqrt`` of exact zeros, the common case here, runs about 6x slower than of positive numbers
        s = excess.clamp_(min=0).mul_(lr).add_(revive.neg().add_(1)).sqrt_().mul_(revive)
        U.add_(s)  # U = W = 0 there: U = s, W = -sign(g)*s
        W.add_(s.mul_(torch.sign(grad)).neg_())


def _at_most(a: torch.Tensor, b) -> torch.Tensor:
    """1 where ``a <= b``, else 0 (``b``: a tensor or a number)."""
    diff = b - a if isinstance(b, torch.Tensor) else a.neg().add_(b)
    return diff.sign_().add_(1).clamp_(max=1)


def group_dead(
    u: torch.Tensor, Ws: Sequence[torch.Tensor], structures: Sequence[GroupStructure], w_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """Groups on the saddle ``u_g = 0, W_g = 0`` (``w_sq``: ``||W_g||^2`` when given)."""
    return (u == 0) & ((group_sq_sums(Ws, structures) if w_sq is None else w_sq) == 0)


def group_finish(
    u: torch.Tensor,
    Ws: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    thetas_old: Sequence[torch.Tensor],
    structures: Sequence[GroupStructure],
    dead: torch.Tensor,
    kappa: float,
    lr: float,
    zero_threshold: float,
    sums: torch.Tensor | None = None,
) -> None:
    """Group version of :func:`element_finish`, in place on ``u`` and every ``W``.

    ``sums``: :func:`group_finish_sums` of the same arguments (summed over the shards of groups that
    span several), else computed here.
    """
    olds = [t.to(u.dtype) for t in thetas_old]
    g_sq, w_sq, old_sq, w_old = group_finish_sums(Ws, grads, olds, structures) if sums is None else sums
    gnorm = g_sq.sqrt()
    excess = gnorm - 2.0 * kappa
    revive = dead & (excess > 0)
    s = torch.sqrt(lr * excess.clamp(min=0))
    theta_norm = u.abs() * w_sq.sqrt()
    old_norm = old_sq.sqrt()
    inner = u * w_old  # <theta_new, theta_old>
    settled = (theta_norm <= old_norm) | (excess <= 0)  # not growing, or zero is optimal
    snap = (~dead) & (((theta_norm <= zero_threshold) & settled) | (inner < 0))
    zero = (dead & ~revive) | snap
    # revived W_g = -s * g_g / ||g_g||, so theta_g = -s^2 g_g/||g_g|| (a proximal-gradient step)
    direction = torch.where(revive, -s / torch.where(revive, gnorm, torch.ones_like(gnorm)), torch.zeros_like(s))
    keep = (~zero & ~revive).to(u.dtype)
    for W, g, st in zip(Ws, grads, structures):
        W.copy_(W * st.expand(keep) + g * st.expand(direction))
    u.copy_(torch.where(revive, s, u * keep))


def group_finish_sums(
    Ws: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], thetas_old: Sequence[torch.Tensor], structures: Sequence[GroupStructure]
) -> torch.Tensor:
    """The per-group sums :func:`group_finish` needs, stacked ``(4, num_groups)``: ``||g_g||^2``,
    ``||W_g||^2``, ``||theta_old_g||^2`` and ``<W_g, theta_old_g>``."""
    olds = [t.to(Ws[0].dtype) for t in thetas_old]
    return torch.stack([
        group_sq_sums(grads, structures),
        group_sq_sums(Ws, structures),
        group_sq_sums(olds, structures),
        group_dots(Ws, olds, structures),
    ])


# ----------------------------------------------------------------------------------------------------
# KKT residual of the L1 / group-lasso problem


def element_kkt(theta: torch.Tensor, grad: torch.Tensor, kappa: float) -> torch.Tensor:
    """Largest violation: ``max(|g|-2k, 0)`` where ``theta = 0``, ``|g + 2k sign(theta)|`` elsewhere."""
    g = grad.to(factor_dtype(grad.dtype))
    at_zero = (g.abs() - 2.0 * kappa).clamp(min=0)
    off_zero = (g + 2.0 * kappa * torch.sign(theta.to(g.dtype))).abs()
    return torch.where(theta == 0, at_zero, off_zero).max()


def group_kkt(
    thetas: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], structures: Sequence[GroupStructure], kappa: float,
    sum_groups=None,
) -> torch.Tensor:
    """``max(||g_g|| - 2k, 0)`` for zero groups, ``||g_g + 2k theta_g/||theta_g|| ||`` elsewhere.

    ``sum_groups``: as in :func:`init_group` (slices of groups that span several shards)."""
    total = sum_groups or (lambda x: x)
    gs = [g.to(factor_dtype(g.dtype)) for g in grads]
    ts = [t.to(g.dtype) for t, g in zip(thetas, gs)]
    tnorm = total(group_sq_sums(ts, structures)).sqrt()
    nonzero = tnorm > 0
    inv = torch.where(nonzero, 2.0 * kappa / torch.where(nonzero, tnorm, torch.ones_like(tnorm)), torch.zeros_like(tnorm))
    res_sq, g_sq = total(torch.stack([
        group_sq_sums([g + t * s.expand(inv) for g, t, s in zip(gs, ts, structures)], structures),
        group_sq_sums(gs, structures),
    ]))
    residual = res_sq.sqrt()
    at_zero = (g_sq.sqrt() - 2.0 * kappa).clamp(min=0)
    return torch.where(nonzero, residual, at_zero).max()
