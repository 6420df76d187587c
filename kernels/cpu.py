r"""The CPU fast path of the element-sparsity spec: the same numbers as :mod:`.reference`, in fewer passes.

Why it exists: on a CPU, every full-size temporary of the readable spec costs page faults and a pass over
memory, and comparisons producing bool tensors (and their reductions) are 5-10x slower than float arithmetic.
So here

* conditions are 0/1 float masks in the factors' dtype (AND = product, OR = maximum; ``sign(b - a)``
  compares exactly: with gradual underflow ``b - a == 0`` only when ``a == b``);
* contiguous tensors are processed in chunks of ``CHUNK`` elements, so that the temporaries stay in cache;
* results are written in place, and buffers (the dead masks, the factor gradients) are reused between steps.

``tests/test_cpu_path.py`` checks every function here against its spec, bit for bit. The optimizer runs this
path for CPU tensors in eager mode; under ``torch.compile`` it runs the spec, which inductor fuses itself.
"""

from __future__ import annotations

from typing import Sequence

import torch

#: elements per chunk (a few 256 KB temporaries stay in cache)
CHUNK = 1 << 16
#: tensors of at most this many elements are packed into one flat tensor per step (:class:`Pack`)
PACK_MAX = 1 << 13


def chunks(t: torch.Tensor) -> list[torch.Tensor]:
    """Flat views of ``CHUNK`` elements of a contiguous tensor (the tensor itself otherwise)."""
    if not t.is_contiguous() or t.numel() <= CHUNK:
        return [t]
    return list(t.view(-1).split(CHUNK))


class Pack:
    """Small tensors handled as one flat tensor: a step's elementwise ops then cost one call each instead of one per
    tensor (a small model's step is mostly per-call overhead). ``flat`` concatenates tensors shaped like the pack's
    members; ``scatter_`` copies a flat result back into them. Elementwise ops give the same bits either way."""

    def __init__(self, like: Sequence[torch.Tensor]):
        self.sizes = [t.numel() for t in like]

    def flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def views(self, flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [part.view(t.shape) for part, t in zip(flat.split(self.sizes), like)]

    def scatter_(self, flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        torch._foreach_copy_(list(tensors), self.views(flat, tensors))


def nonfinite_probe(g: torch.Tensor) -> torch.Tensor:
    """A scalar that is 0 when every entry of ``g`` is finite and NaN otherwise, in one pass over ``g`` and without
    a bool temporary (on CPU ``isfinite(g).all()`` costs about 10x): ``min*0 + max*0`` (NaN propagates through
    ``aminmax``, and ``inf*0`` is NaN; finite extremes, however large, give 0). ``aminmax`` is the fastest probe at
    every size measured (64 to 1M elements; ``sum(g*0)`` costs 1.1-3x)."""
    low, high = torch.aminmax(g)
    return low.mul(0).add_(high.mul(0))


#: gradients of at most this many elements are probed together (:func:`nonfinite_probes`): one call beats one
#: ``aminmax`` each up to about this size, and loses above it (``torch._foreach_norm`` is slow on larger tensors)
PROBE_TOGETHER_MAX = 512


def nonfinite_probes(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`nonfinite_probe` of many small tensors in one call: ``max |g| * 0`` (``torch._foreach_norm`` with
    ``ord=inf`` propagates NaN and gives inf for an infinite entry; on large tensors it is slower than ``aminmax``)."""
    if not grads:
        return []
    probes = torch._foreach_norm(list(grads), float("inf"))
    torch._foreach_mul_(probes, 0.0)
    return probes


def element_dead(U: torch.Tensor, W: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`.reference.element_dead` as a 0/1 mask in the factors' dtype, written into ``out`` when given."""
    if out is None:
        return U.abs().add_(W.abs()).sign_().neg_().add_(1)
    for u, w, o in zip(*(chunks(t) for t in (U, W, out))):
        torch.abs(u, out=o).add_(w.abs()).sign_().neg_().add_(1)
    return out


def element_adopt_(U: torch.Tensor, W: torch.Tensor, theta: torch.Tensor, scheme: str) -> bool:
    """:func:`.reference.element_adopt`, in place, chunk by chunk: a chunk whose weights all equal ``U*W`` (the
    common case, tested as ``sum |U*W - theta| == 0``, which is NaN when a weight is) costs one product and one
    sum; only a chunk with a changed weight is rebuilt. Returns whether anything was adopted."""
    from spread_optim.kernels.reference import element_adopt

    adopted = False
    for u, w, t in zip(*(chunks(x) for x in (U, W, theta))):
        product = u * w if t.dtype == u.dtype else (u * w).to(t.dtype)
        if float(product.sub_(t).abs_().sum()) != 0:
            new_u, new_w = element_adopt(u, w, t, scheme)
            u.copy_(new_u)
            w.copy_(new_w)
            adopted = True
    return adopted


def element_factor_grads(grads, Us, Ws, kappa: float, out=None):
    """:func:`.reference.element_factor_grads` for lists of tensors (foreach): ``(dUs, dWs)``.

    ``out``: ``(dU buffers, dW buffers)`` from the last step (None entries allocate): large tensors reuse them."""
    if out is None:
        gU = torch._foreach_mul(grads, Ws)
        torch._foreach_add_(gU, Us, alpha=2.0 * kappa)
        gW = torch._foreach_mul(grads, Us)
        torch._foreach_add_(gW, Ws, alpha=2.0 * kappa)
        return gU, gW
    gU, gW = list(out[0]), list(out[1])
    fresh = [i for i, (a, b) in enumerate(zip(gU, gW)) if a is None or b is None]
    if fresh:
        new_U, new_W = element_factor_grads([grads[i] for i in fresh], [Us[i] for i in fresh], [Ws[i] for i in fresh], kappa)
        for i, a, b in zip(fresh, new_U, new_W):
            gU[i], gW[i] = a, b
    for i, (g, U, W) in enumerate(zip(grads, Us, Ws)):
        if i not in fresh:
            torch.mul(g, W, out=gU[i]).add_(U, alpha=2.0 * kappa)
            torch.mul(g, U, out=gW[i]).add_(W, alpha=2.0 * kappa)
    return gU, gW


def element_zero_pass_(U, W, g, theta_old, dead, kappa: float, lr: float, zero_threshold: float) -> None:
    """:func:`.reference.element_zero_pass`, in place on ``U`` and ``W``; ``dead``: the 0/1 mask of
    :func:`element_dead` (a bool mask is accepted)."""
    if dead.dtype == torch.bool:
        dead = dead.to(U.dtype)
    tensors = (U, W, g, theta_old, dead)
    if all(t.is_contiguous() for t in tensors) and U.numel() > CHUNK:
        flat = [t.view(-1) for t in tensors]
        for start in range(0, U.numel(), CHUNK):
            _zero_pass_chunk(*(t[start:start + CHUNK] for t in flat), kappa, lr, zero_threshold)
    else:
        _zero_pass_chunk(U, W, g, theta_old, dead, kappa, lr, zero_threshold)


def _zero_pass_chunk(U, W, g, theta_old, dead, kappa, lr, zero_threshold) -> None:
    theta = U * W
    size = theta.abs()
    excess = g.abs().sub_(2.0 * kappa)
    settled = torch.maximum(_at_most(size, theta_old.abs()), _at_most(excess, 0.0))
    zero = _at_most(size, zero_threshold).mul_(settled)
    zero = torch.maximum(zero, theta.mul_(theta_old).sign_().neg_().clamp_(min=0))  # a sign flip
    keep = torch.maximum(zero, dead).neg_().add_(1)
    revive = excess.sign().clamp_(min=0).mul_(dead)  # dead and |g| > 2*kappa
    U.mul_(keep)
    W.mul_(keep)
    if float(revive.sum()) == 0:  # (+ 0.0 turns a zeroed -0.0 into +0.0, as the spec's where does)
        U.add_(0.0)
        W.add_(0.0)
        return
    # s = sqrt(lr*excess) where revived: 1 is added elsewhere first, then masked to 0 (on x86 CPUs the sqrt of
    # exact zeros, the common case here, runs about 6x slower than of positive numbers)
    s = excess.clamp_(min=0).mul_(lr).add_(revive.neg().add_(1)).sqrt_().mul_(revive)
    U.add_(s)  # U = s where revived, + 0.0 elsewhere
    W.add_(torch.rsub(s.mul_(torch.sign(g)), 0.0))  # W = 0.0 - sign(g)*s where revived, + 0.0 elsewhere


def _at_most(a: torch.Tensor, b) -> torch.Tensor:
    """1 where ``a <= b``, else 0 (``b``: a tensor or a number)."""
    diff = b - a if isinstance(b, torch.Tensor) else a.neg().add_(b)
    return diff.sign_().add_(1).clamp_(max=1)
