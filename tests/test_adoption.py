"""The model's weights are the truth: whatever a user writes to a sparse parameter between steps is adopted.

Oracle: the written weights themselves. A step at ``lr = 0`` with zero gradients moves nothing, so after it the
weights must still be exactly what was written (before adoption the step rewrote them from the stale factors),
and the factors must reproduce them (``U*W == theta``). A stateless base (SGD without momentum) after a write that
changes every entry must continue exactly as a new optimizer built on the written weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spread_optim import SpreadAdam, SpreadOptimizer, SpreadSGD
from spread_optim.kernels import dispatch

KINDS = ["element", "row", "column", "ids", "shared"]
PATHS = ["cpu", "spec", "triton"]


def _groups(kind, a, b, gen):
    if kind == "ids":
        return [{"params": [a], "sparsity": torch.randint(0, 4, a.shape, generator=gen)},
                {"params": [b], "sparsity": torch.randint(0, 3, b.shape, generator=gen)}]
    if kind == "shared":
        return [{"params": [a, b], "sparsity": "column", "share_groups": True}]
    return [{"params": [a, b], "sparsity": kind}]


def _setup(kind, path, monkeypatch, base="adam", lr=0.02, steps=4, seed=0):
    if path == "triton":
        pytest.importorskip("triton")
    if path == "spec":
        monkeypatch.setattr(dispatch, "compiling", lambda: True)  # the spec runs, as under torch.compile
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(10, 6, generator=gen) * 0.2).requires_grad_()
    b = (torch.randn(7, 6, generator=gen) * 0.2).requires_grad_()
    opt = SpreadOptimizer(_groups(kind, a, b, gen), base, lr=lr, kappa=0.02, fused=path == "triton")
    for _ in range(steps):
        a.grad, b.grad = torch.randn(10, 6, generator=gen) * 0.05, torch.randn(7, 6, generator=gen) * 0.05
        opt.step()
    assert all(p == (["triton"] if path == "triton" else [path]) * len(opt.param_groups) for p in [opt._paths])
    return a, b, opt, gen


def _product(opt, p):
    """``theta`` as the factors give it."""
    st = opt.state[p]
    if "U" in st:
        return st["U"] * st["W"]
    owner = next(q for g in opt.param_groups for q in g["params"] if "u" in opt.state[q] and (q is p or g["share_groups"] and p in g["params"]))
    sparsity = next(g["sparsity"] for g in opt.param_groups if any(q is p for q in g["params"]))
    from spread_optim.structure import GroupStructure

    return GroupStructure(sparsity, p.shape, p.device).expand(opt.state[owner]["u"]) * st["W"]


def _frozen_step(opt, params):
    """A step that moves nothing: lr = 0, zero gradients."""
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()


WRITES = {
    "copy_": lambda p, gen: p.data.copy_(torch.randn(p.shape, generator=gen) * 0.3),
    "data=": lambda p, gen: setattr(p, "data", torch.randn(p.shape, generator=gen) * 0.3),
    "clamp_": lambda p, gen: p.data.clamp_(-0.05, 0.05),
    "mask": lambda p, gen: p.data.mul_((torch.rand(p.shape, generator=gen) > 0.4).to(p.dtype)),
    "zero_": lambda p, gen: p.data.zero_(),
    "nn.init": lambda p, gen: torch.nn.init.normal_(p, std=0.1, generator=gen),
    "few entries": lambda p, gen: p.data.view(-1)[:3].copy_(torch.tensor([2.0, 8.0, -0.5])),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("write", sorted(WRITES))
def test_outside_writes_are_kept(write, kind, path, monkeypatch):
    a, b, opt, gen = _setup(kind, path, monkeypatch)
    WRITES[write](a, gen)
    written, b_before = a.detach().clone(), b.detach().clone()
    _frozen_step(opt, [a, b])
    assert torch.equal(a.detach(), written), "the step overwrote a weight written outside the optimizer"
    assert torch.equal(b.detach(), b_before)
    assert torch.equal(_product(opt, a), written), "the factors do not reproduce the adopted weights"
    if write in ("mask", "zero_"):
        assert (a == 0).any() and not torch.signbit(a.detach()[a == 0]).any()


@pytest.mark.parametrize("kind", ["element", "row"])
def test_written_zeros_are_held_or_revived_by_their_kkt_condition(kind, monkeypatch):
    """A pruning mask: the masked entries become exact zeros on the saddle; a step keeps those whose gradient
    satisfies the L1 condition at zero and revives the others by one proximal-gradient step."""
    a, b, opt, gen = _setup(kind, "cpu", monkeypatch, base="sgd", lr=0.1)
    mask = torch.rand(a.shape, generator=gen) > 0.5
    with torch.no_grad():
        a.mul_(mask)
    a.grad = torch.zeros_like(a)
    a.grad[0] = 1.0  # row 0: |g| = 1 > 2*kappa (revived); elsewhere 0 (held)
    b.grad = None
    opt.step()
    zero_rows = (~mask).all(1) if kind == "row" else ~mask
    held = a.detach()[1:][zero_rows[1:]] if kind == "row" else a.detach()[1:][zero_rows[1:]]
    assert (held == 0).all()
    if kind == "element":
        revived = a.detach()[0][~mask[0]]
        torch.testing.assert_close(revived, torch.full_like(revived, -0.1 * (1.0 - 0.04)))  # -lr*(|g| - 2*kappa)


def test_stateless_base_continues_as_a_new_optimizer_on_the_written_weights(monkeypatch):
    a, b, opt, gen = _setup("element", "cpu", monkeypatch, base="sgd", lr=0.05)
    WRITES["nn.init"](a, gen)  # every entry changes: every factor is rebuilt
    fresh_a, fresh_b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    fresh = SpreadOptimizer([{"params": [fresh_a, fresh_b], "sparsity": "element"}], "sgd", lr=0.05, kappa=0.02, fused=False)
    fresh.step()  # (no gradients: creates the factors from the weights, moves nothing)
    for name in ("U", "W"):
        fresh.state[fresh_b][name].copy_(opt.state[b][name])  # b was not written: its factors are kept
    for _ in range(5):
        grads = [torch.randn(10, 6, generator=gen) * 0.05, torch.randn(7, 6, generator=gen) * 0.05]
        for p, q, g in ((a, fresh_a, grads[0]), (b, fresh_b, grads[1])):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        fresh.step()
        assert torch.equal(a, fresh_a) and torch.equal(b, fresh_b)


def test_adopted_parameter_keeps_its_base_state(monkeypatch):
    """The decision: Adam's moments and step count are kept, as torch.optim keeps them when weights are written."""
    a, b, opt, gen = _setup("element", "cpu", monkeypatch)
    before = copy.deepcopy(opt.state[a]["base"])
    WRITES["clamp_"](a, gen)
    a.grad, b.grad = torch.randn(10, 6, generator=gen) * 0.05, None
    opt.step()
    assert float(opt.state[a]["base"]["U"]["step"]) == float(before["U"]["step"]) + 1


def test_model_checkpoint_newer_than_the_optimizer_checkpoint_is_kept():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    opt = SpreadAdam(model.parameters(), lr=0.05, kappa=1e-3)
    x, y = torch.randn(32, 8), torch.randn(32, 3)

    def train(n):
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    train(5)
    old_optimizer = copy.deepcopy(opt.state_dict())
    train(40)
    best = copy.deepcopy(model.state_dict())
    opt.load_state_dict(old_optimizer)  # an optimizer checkpoint 40 steps older than the model
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, best[name]), f"{name} was rolled back to the optimizer checkpoint"


def test_resume_with_param_groups_in_another_order_does_not_swap_layers():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(5, 5), torch.nn.Linear(5, 5)
    opt = SpreadSGD([{"params": [first.weight]}, {"params": [second.weight]}], lr=0.1, kappa=1e-3)
    for p in (first.weight, second.weight):
        p.grad = torch.randn_like(p)
    opt.step()
    saved, w1, w2 = opt.state_dict(), first.weight.detach().clone(), second.weight.detach().clone()
    resumed = SpreadSGD([{"params": [second.weight]}, {"params": [first.weight]}], lr=0.1, kappa=1e-3)  # other order
    resumed.load_state_dict(saved)
    for group in resumed.param_groups:
        group["lr"] = 0.0
    for p in (first.weight, second.weight):
        p.grad = torch.zeros_like(p)
    resumed.step()
    assert torch.equal(first.weight, w1) and torch.equal(second.weight, w2)


def test_lookahead_slow_weight_sync_is_kept():
    """Lookahead (k=3, alpha=0.5) written by hand: every third step the fast weights move halfway to the slow
    ones; the next step must start from there."""
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(6, 4) * 0.2)
    opt = SpreadAdam([w], lr=0.02, kappa=1e-3)
    slow = w.detach().clone()
    for step in range(1, 10):
        w.grad = torch.randn(6, 4) * 0.05
        opt.step()
        if step % 3 == 0:
            with torch.no_grad():
                slow += 0.5 * (w - slow)
                w.copy_(slow)
            synced = w.detach().clone()
            for group in opt.param_groups:
                lr, group["lr"] = group["lr"], 0.0
            w.grad = torch.zeros_like(w)
            opt.step()
            assert torch.equal(w.detach(), synced)
            for group in opt.param_groups:
                group["lr"] = lr
