"""The CPU fast path (kernels/cpu.py) computes the spec's numbers (kernels/reference.py), bit for bit.

Inputs cover every branch of the exact-zero rule (dead entries held or revived, snaps under the threshold, sign
flips, entries growing from tiny values, ties ``|theta| == |theta_old|``), sizes below and above one chunk, a
non-contiguous tensor, float32 and float64.
"""

from __future__ import annotations

import pytest
import torch

from spread_optim.kernels import cpu
from spread_optim.kernels import reference as ref

KAPPA, LR, THRESHOLD = 0.05, 0.1, 1e-3


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values and equal signs of zeros (``torch.equal`` counts -0.0 == 0.0)."""
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def _case(n: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda: torch.randn(n, generator=gen, dtype=torch.float64)  # noqa: E731
    U0, W0 = rand(), rand()
    pick = torch.rand(n, generator=gen)
    U0[pick < 0.2] = 0.0
    W0[pick < 0.2] = 0.0  # dead: held or revived
    W0[(pick >= 0.2) & (pick < 0.25)] = -0.0
    U0[(pick >= 0.2) & (pick < 0.25)] = 0.0  # dead with a negative zero
    theta_old = U0 * W0
    U, W = U0 + 0.1 * rand(), W0 + 0.1 * rand()  # where the base moved them
    U[(pick >= 0.25) & (pick < 0.35)] = 1e-4  # tiny: snapped unless growing
    U[(pick >= 0.35) & (pick < 0.4)] = -U0[(pick >= 0.35) & (pick < 0.4)]  # sign flips
    U[(pick >= 0.4) & (pick < 0.45)] = U0[(pick >= 0.4) & (pick < 0.45)]  # ties |theta| == |theta_old|
    W[(pick >= 0.4) & (pick < 0.45)] = W0[(pick >= 0.4) & (pick < 0.45)]
    g = 0.1 * rand()
    g[(pick >= 0.45) & (pick < 0.5)] = 2 * KAPPA  # exactly on the KKT boundary
    return [t.to(dtype) for t in (U0, W0, theta_old, U, W, g)]


@pytest.mark.parametrize("n", [1, 1000, cpu.CHUNK + 4321])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_element_zero_pass_equals_spec(n, dtype, seed):
    U0, W0, theta_old, U, W, g = _case(n, dtype, seed)
    dead = ref.element_dead(U0, W0)
    spec_U, spec_W = ref.element_zero_pass(U, W, g, theta_old, dead, KAPPA, LR, THRESHOLD)
    fast_U, fast_W = U.clone(), W.clone()
    cpu.element_zero_pass_(fast_U, fast_W, g, theta_old, cpu.element_dead(U0, W0), KAPPA, LR, THRESHOLD)
    assert _same_bits(fast_U, spec_U) and _same_bits(fast_W, spec_W)
    # the case exercises every branch
    revived = dead & (spec_U != 0)
    snapped = ~dead & (spec_U == 0)
    assert n < 1000 or (revived.any() and snapped.any() and (dead & (spec_U == 0)).any())
    # zeros are +0.0, in the factors and in theta
    assert not torch.signbit(spec_U[spec_U == 0]).any() and not torch.signbit(spec_W[spec_W == 0]).any()
    theta = spec_U * spec_W
    assert not torch.signbit(theta[theta == 0]).any()


def test_element_zero_pass_non_contiguous_and_bool_mask():
    U0, W0, theta_old, U, W, g = _case(2 * 300, torch.float32, 3)
    view = lambda t: t.view(300, 2).t()  # noqa: E731  (non-contiguous)
    U0, W0, theta_old, U, W, g = map(view, (U0, W0, theta_old, U, W, g))
    dead = ref.element_dead(U0, W0)
    spec_U, spec_W = ref.element_zero_pass(U, W, g, theta_old, dead, KAPPA, LR, THRESHOLD)
    fast_U, fast_W = U.clone(), W.clone()
    cpu.element_zero_pass_(fast_U, fast_W, g, theta_old, dead, KAPPA, LR, THRESHOLD)  # a bool mask is accepted
    assert _same_bits(fast_U, spec_U) and _same_bits(fast_W, spec_W)


@pytest.mark.parametrize("n", [7, cpu.CHUNK + 1])
def test_element_dead_equals_spec(n):
    U0, W0, *_ = _case(n, torch.float32, 4)
    expected = ref.element_dead(U0, W0)
    assert torch.equal(cpu.element_dead(U0, W0).bool(), expected)
    out = torch.full_like(U0, 7.0)
    assert cpu.element_dead(U0, W0, out=out) is out and torch.equal(out.bool(), expected)


def test_factor_grads_equal_spec_with_and_without_buffers():
    """Equal up to rounding: the fast path's ``add_(U, alpha=2*kappa)`` may fuse a multiply-add."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(3,), (cpu.CHUNK + 10,)]
    grads, Us, Ws = ([torch.randn(s, generator=gen) for s in shapes] for _ in range(3))
    expected = [ref.element_factor_grads(g, U, W, KAPPA) for g, U, W in zip(grads, Us, Ws)]
    for out in (None, ([None, torch.empty(shapes[1])], [None, torch.empty(shapes[1])])):
        dUs, dWs = cpu.element_factor_grads(grads, Us, Ws, KAPPA, out=out)
        for (eU, eW), dU, dW in zip(expected, dUs, dWs):
            torch.testing.assert_close(dU, eU, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(dW, eW, rtol=1e-6, atol=1e-7)
        if out is not None:
            assert dUs[1] is out[0][1] and dWs[1] is out[1][1]  # the buffers are reused


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("n", [5, cpu.CHUNK + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nonfinite_probe(bad, n, dtype):
    g = torch.randn(n, dtype=dtype)
    g[0], g[1] = torch.finfo(dtype).max, torch.finfo(dtype).min  # finite, however large: no false alarm
    assert float(cpu.nonfinite_probe(g)) == 0
    for where in (0, n // 2, -1):
        h = g.clone()
        h[where] = bad
        assert float(cpu.nonfinite_probe(h)) != 0  # NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_small_tensors_step_like_single_ones(monkeypatch, dtype):
    """Small tensors packed into one flat tensor per step (``cpu.Pack``) take the same steps, bit for bit, as when
    each runs alone: exact zeros and revivals, weights written between steps, a parameter without a gradient in some
    steps, and a large tensor beside them (never packed)."""
    from spread_optim import SpreadAdam

    def run(pack_max: int):
        monkeypatch.setattr(cpu, "PACK_MAX", pack_max)
        gen = torch.Generator().manual_seed(0)
        shapes = [(8, 5), (7,), (3, 4), (40, 40), (100, 100)]  # the last has more than PACK_MAX elements
        params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
        opt = SpreadAdam(params, lr=0.05, kappa=0.02, zero_threshold=1e-3)
        zeros = revived = 0
        for step in range(40):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=gen) * 0.05 + 0.05 * p.detach().float()
                p.grad = None if (i == 1 and step % 5 == 2) else g.to(dtype)
            if step == 20:
                with torch.no_grad():
                    params[0][0, :3] = torch.tensor([1.5, 0.0, -2.0]).to(dtype)  # written outside the optimizer
            before = [p.detach() == 0 for p in params]
            opt.step()
            zeros += sum(int((p.detach() == 0).sum()) for p in params)
            revived += sum(int((b & (p.detach() != 0)).sum()) for b, p in zip(before, params))
        return params, opt, zeros, revived

    default = cpu.PACK_MAX
    single, opt_s, zeros, revived = run(0)
    packed, opt_p, _, _ = run(default)
    assert zeros > 0 and revived > 0  # the rule's branches ran
    for a, b in zip(single, packed):
        assert _same_bits(a.detach(), b.detach())
        assert _same_bits(opt_s.state[a]["U"], opt_p.state[b]["U"]) and _same_bits(opt_s.state[a]["W"], opt_p.state[b]["W"])
