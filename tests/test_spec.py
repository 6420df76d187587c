"""The spec (kernels/reference.py) against independent oracles: torch's own SGD and Adam for the base rules the
fused paths follow, and properties of the exact-zero rule that hold on every implementation."""

from __future__ import annotations

import pytest
import torch

from spread_optim import SpreadOptimizer
from spread_optim.kernels import dispatch
from spread_optim.kernels import reference as ref


def _torch_steps(cls, options, x0, grads):
    x = x0.clone().requires_grad_()
    opt = cls([x], foreach=False, **options)
    for g in grads:
        x.grad = g.clone()
        opt.step()
    return x.detach()


@pytest.mark.parametrize("options", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.2),
                                     dict(lr=0.1, momentum=0.9, nesterov=True)])
def test_sgd_rule_is_torch_sgd(options):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(50, generator=gen, dtype=torch.float64)
    grads = [torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(5)]
    x, buf = x0, None
    for i, g in enumerate(grads):
        x, buf = ref.sgd_rule(x, g, buf, options["lr"], options.get("momentum"), options.get("dampening", 0.0),
                              options.get("nesterov", False), first=i == 0)
    torch.testing.assert_close(x, _torch_steps(torch.optim.SGD, options, x0, grads), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_rule_is_torch_adam(amsgrad):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(50, generator=gen, dtype=torch.float64)
    grads = [torch.randn(50, generator=gen, dtype=torch.float64) * (1 + i) for i in range(6)]
    x, m, v, vmax = x0, torch.zeros_like(x0), torch.zeros_like(x0), torch.zeros_like(x0)
    for step, g in enumerate(grads, start=1):
        x, m, v, vmax = ref.adam_rule(x, g, m, v, vmax, *ref.adam_step_sizes(step, 0.01, 0.9, 0.99), 0.9, 0.99, 1e-8, amsgrad)
    expected = _torch_steps(torch.optim.Adam, dict(lr=0.01, betas=(0.9, 0.99), amsgrad=amsgrad), x0, grads)
    torch.testing.assert_close(x, expected, rtol=1e-13, atol=1e-15)


def test_group_zero_pass_writes_positive_zeros():
    """A snapped group whose W holds negative entries, and a revived one with lr = 0 (s = 0): +0.0 only."""
    from spread_optim.structure import GroupStructure

    s = GroupStructure("row", torch.Size([3, 2]), torch.device("cpu"))
    u = torch.tensor([1e-9, 0.0, 2.0])
    W = torch.tensor([[-1.0, -2.0], [0.0, 0.0], [1.0, -1.0]])
    g = torch.tensor([[0.01, -0.01], [-3.0, 2.0], [0.1, 0.1]])
    sums = ref.group_finish_sums([W], [g], [s.expand(u) * W], [s])
    dead = ref.group_dead(u, ref.group_dots([W], [W], [s]))
    for lr in (0.1, 0.0):
        new_u, (new_W,) = ref.group_zero_pass(u, [W], [g], sums, [s], dead, 0.05, lr, 1e-6)
        theta = s.expand(new_u) * new_W
        assert (theta[0] == 0).all() and not torch.signbit(theta[theta == 0]).any()
        assert not torch.signbit(new_W[new_W == 0]).any() and not torch.signbit(new_u[new_u == 0]).any()


PATHS = [pytest.param(False, id="split"), pytest.param(True, id="triton")]


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("sparsity", ["element", "row", "column", "ids"])
def test_every_exact_zero_is_positive(fused, sparsity, monkeypatch):
    """After steps that snap, hold and revive, no exact zero of a weight is -0.0 (a product of opposite-signed
    zero factors used to leave 35-69% of them negative)."""
    if fused:
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(12, 8, generator=gen) * 0.05).requires_grad_()
    with torch.no_grad():
        w[:, :3] = -0.0
    spec = torch.randint(0, 5, (12, 8), generator=gen) if sparsity == "ids" else sparsity
    kappa = 0.02 if sparsity == "element" else 0.1  # a group's gradient norm is larger: a larger kappa zeroes groups
    opt = SpreadOptimizer([w], "adam", lr=0.05, kappa=kappa, sparsity=spec, fused=fused)
    zeros = 0
    for _ in range(12):
        w.grad = torch.randn(12, 8, generator=gen) * 0.05
        opt.step()
        zeros += int((w == 0).sum())
        assert not torch.signbit(w.detach()[w == 0]).any()
    assert zeros > 0
    assert ("triton" in opt._paths) == fused


@pytest.mark.parametrize("sparsity", ["element", "row"])
def test_spec_path_equals_cpu_path(sparsity, monkeypatch):
    """The optimizer on the spec (as under torch.compile) and on the CPU fast path: the same trajectory."""
    runs = []
    for compiling in (False, True):
        monkeypatch.setattr(dispatch, "compiling", lambda c=compiling: c)
        gen = torch.Generator().manual_seed(3)
        w = (torch.randn(40, 30, generator=gen) * 0.1).requires_grad_()
        opt = SpreadOptimizer([w], "adam", lr=0.05, kappa=0.01, sparsity=sparsity, fused=False)
        for _ in range(15):
            w.grad = torch.randn(40, 30, generator=gen) * 0.05 + 0.3 * w.detach()
            opt.step()
        assert opt._paths == ["spec" if compiling else "cpu"]
        runs.append(w.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-7)
    assert torch.equal(runs[0] == 0, runs[1] == 0) and bool((runs[0] == 0).any())
