r"""Per-element base rules shared by the fused kernels (Triton ``@jit`` helpers, inlined by the compiler).

Each helper moves one factor ``x`` given its gradient ``grad`` of the smooth objective, as the spec's
:func:`spread_optim.kernels.reference.sgd_rule` / :func:`~spread_optim.kernels.reference.adam_rule` (torch's
``_single_tensor_sgd`` / ``_single_tensor_adam`` on one leaf tensor), in the factors' dtype:

* SGD: ``buf = grad`` at the first step, else ``buf = momentum*buf + (1-dampening)*grad``;
  ``d = grad + momentum*buf`` (Nesterov) or ``d = buf``; ``x -= lr*d`` (``d = grad`` without momentum).
* Adam: ``m = m + (1-beta1)*(grad-m)`` (torch's ``lerp``), ``v = beta2*v + (1-beta2)*grad^2``,
  AMSGrad ``vmax = max(vmax, v)``; ``x -= step_size * m / (sqrt(v)/sqrt(bc2) + eps)`` with
  ``step_size = lr/bc1`` and ``bc_i = 1 - beta_i**step`` (computed per tensor by the launcher).
  AdamW is Adam here: a sparse group's decoupled weight decay is zero (the spread penalty replaces it).

``maximize`` and weight decay never reach these helpers: the caller negates ``g`` and the penalty
``2*kappa*x`` is already in ``grad``.
"""

from dataclasses import dataclass

import triton
import triton.language as tl

#: rule ids (a ``tl.constexpr`` of the kernels)
SGD = 0
ADAM = 1


@dataclass(frozen=True)
class StepOptions:
    """A param group's options as the kernels take them: the spread keys and the base rule's."""

    rule: int
    kappa: float
    balanced: bool  # init "balanced" (else "unbalanced"): how an adopted weight is split into factors
    lr_revive: float  # the proximal step of a revival (the group's lr)
    zero_threshold: float
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    amsgrad: bool = False
    nesterov: bool = False
    maximize: bool = False

    def rule_args(self) -> tuple:
        """Runtime scalars of :func:`factor_update` after ``kappa`` (``1 - beta`` computed in float64: in
        float32 ``1 - 0.999`` would be off by 3e-5 relative)."""
        return (float(self.kappa), 1.0 - self.beta1, float(self.beta2), 1.0 - self.beta2, float(self.eps),
                float(self.momentum), 1.0 - self.dampening)

    def rule_flags(self) -> dict:
        return dict(RULE=self.rule, AMSGRAD=bool(self.amsgrad), HAS_MOMENTUM=self.momentum != 0, NESTEROV=bool(self.nesterov))


@triton.jit
def to_param(x, P_DTYPE: tl.constexpr):
    """``x`` (float32 factors' product) in the parameter's dtype, rounded to nearest even as ``torch``'s
    ``.to()``. For bf16 the rounding is done on the bits (Triton's interpreter truncates fp32 -> bf16)."""
    if P_DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(P_DTYPE)


@triton.jit
def split(t, BALANCED: tl.constexpr):
    """:func:`spread_optim.kernels.reference.init_element` of one float32 block: ``(a, b)`` with ``a*b == t``
    exactly; balanced: ``b = 2**floor(e/2)`` for ``|t| = m * 2**e``, ``m`` in ``[1/2, 1)`` (the exponent read
    from the bits, subnormals scaled by ``2**64`` first), 0 for zeros; else ``(1, t)``."""
    if BALANCED:
        nonzero = t != 0.0
        tiny = tl.abs(t) < 7.888609052210118e-31  # 2**-100
        bits = tl.where(tiny, t * 18446744073709551616.0, t).to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 126 - tl.where(tiny, 64, 0)
        half = tl.where(e >= 0, e // 2, -((1 - e) // 2))  # floor(e / 2)
        b = tl.where(nonzero, ((half + 127) << 23).to(tl.float32, bitcast=True), 0.0)
        a = tl.where(nonzero, t / tl.where(nonzero, b, 1.0), 0.0)
    else:
        a = tl.zeros_like(t) + 1.0
        b = t
    return a, b


@triton.jit
def sgd_rule(x, grad, buf, first, lr, momentum, one_minus_dampening, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    if HAS_MOMENTUM:
        buf = tl.where(first, grad, buf * momentum + one_minus_dampening * grad)
        if NESTEROV:
            d = grad + momentum * buf
        else:
            d = buf
    else:
        d = grad
    return x - lr * d, buf


@triton.jit
def adam_rule(x, grad, m, v, vmax, step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
              AMSGRAD: tl.constexpr):
    m = m + one_minus_beta1 * (grad - m)
    v = v * beta2 + one_minus_beta2 * (grad * grad)
    if AMSGRAD:
        vmax = tl.maximum(vmax, v)
        denom = tl.sqrt(vmax) / bc2_sqrt + eps
    else:
        denom = tl.sqrt(v) / bc2_sqrt + eps
    return x - step_size * (m / denom), m, v, vmax


@triton.jit
def load_state(row, slot, offs, mask, F_DTYPE: tl.constexpr):
    """Load state ``slot`` of the tensor whose pointers start at ``row`` (0 where masked)."""
    ptr = tl.load(row + slot).to(tl.pointer_type(F_DTYPE))
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def store_state(row, slot, offs, value, mask, F_DTYPE: tl.constexpr):
    ptr = tl.load(row + slot).to(tl.pointer_type(F_DTYPE))
    tl.store(ptr + offs, value, mask=mask)


@triton.jit
def factor_update(row, first_slot, x, grad, offs, mask, step_size, bc2_sqrt, first, one_minus_beta1, beta2,
                  one_minus_beta2, eps, momentum, one_minus_dampening, RULE: tl.constexpr, AMSGRAD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                  NESTEROV: tl.constexpr, F_DTYPE: tl.constexpr):
    """Load the base state of one factor (slots ``first_slot..first_slot+2``), apply the rule, store the
    state back; return the moved factor."""
    if RULE == 1:
        m = load_state(row, first_slot, offs, mask, F_DTYPE)
        v = load_state(row, first_slot + 1, offs, mask, F_DTYPE)
        if AMSGRAD:
            vmax = load_state(row, first_slot + 2, offs, mask, F_DTYPE)
        else:
            vmax = v
        x, m, v, vmax = adam_rule(x, grad, m, v, vmax, step_size, bc2_sqrt, one_minus_beta1, beta2,
                                  one_minus_beta2, eps, AMSGRAD)
        store_state(row, first_slot, offs, m, mask, F_DTYPE)
        store_state(row, first_slot + 1, offs, v, mask, F_DTYPE)
        if AMSGRAD:
            store_state(row, first_slot + 2, offs, vmax, mask, F_DTYPE)
    else:
        if HAS_MOMENTUM:
            buf = load_state(row, first_slot, offs, mask & ((offs * 0 + first) == 0), F_DTYPE)
        else:
            buf = grad
        x, buf = sgd_rule(x, grad, buf, first != 0, step_size, momentum, one_minus_dampening, HAS_MOMENTUM, NESTEROV)
        if HAS_MOMENTUM:
            store_state(row, first_slot, offs, buf, mask, F_DTYPE)
    return x
