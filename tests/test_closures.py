"""``step(closure)`` as torch takes it: closures returning a tensor, a Python number or None; and a failing
evaluation inside LBFGS's line search moves nothing (parameters, factors, LBFGS's history)."""

from __future__ import annotations

import copy

import pytest
import torch

from spread_optim import SpreadAdam, SpreadOptimizer, SpreadSGD


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    y = X[:, :3].sum(1) + 0.1 * torch.randn(40, generator=gen, dtype=torch.float64)
    w = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    return X, y, w, b


@pytest.mark.parametrize("cls", [SpreadSGD, SpreadAdam])
@pytest.mark.parametrize("returns", ["none", "float", "tensor"])
def test_single_evaluation_bases_return_what_the_closure_returns(cls, returns):
    X, y, w, b = _problem()
    opt = cls([{"params": [w], "kappa": 0.01}, {"params": [b]}], lr=0.1)
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    plain = cls([{"params": [w2], "kappa": 0.01}, {"params": [b2]}], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = ((X @ w + b - y) ** 2).mean()
        loss.backward()
        return {"none": None, "float": loss.item(), "tensor": loss}[returns]

    for _ in range(3):
        out = opt.step(closure)
        plain.zero_grad()
        expected = ((X @ w2 + b2 - y) ** 2).mean()
        expected.backward()
        plain.step()
        assert torch.equal(w, w2) and torch.equal(b, b2)
        if returns == "none":
            assert out is None
        else:
            assert float(out) == pytest.approx(float(expected)) and isinstance(out, float if returns == "float" else torch.Tensor)


def _lbfgs(w, b, kappa=0.05, **kw):
    return SpreadOptimizer([{"params": [w], "kappa": kappa}, {"params": [b]}], torch.optim.LBFGS, lr=1.0, max_iter=20,
                           line_search_fn="strong_wolfe", **kw)


def test_lbfgs_closure_returning_a_float_revives_entries():
    X, y, w, b = _problem()
    opt = _lbfgs(w, b)

    def closure():
        opt.zero_grad()
        loss = ((X @ w + b - y) ** 2).mean()
        loss.backward()
        return loss.item()

    out = opt.step(closure)  # w starts at exact zeros: the step revives entries (a float loss is read back)
    assert isinstance(out, float) and bool((w != 0).any())
    for _ in range(5):
        opt.step(closure)
    closure()
    assert opt.kkt_residual() < 1e-4


def _state(opt, params):
    return copy.deepcopy({"params": [p.detach().clone() for p in params], "state": opt.state_dict()["state"]})


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("failure", ["nan gradient", "nan loss"])
def test_lbfgs_failure_inside_the_line_search_moves_nothing(failure):
    """A NaN at the fourth evaluation of a step (inside LBFGS's line search): FloatingPointError, and the dense
    parameter, the factors, the weights and LBFGS's history are as they were before the step."""
    X, y, w, b = _problem(1)
    opt = _lbfgs(w, b)
    calls = [0]
    fail_at = [None]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = ((X @ w + b - y) ** 2).mean()
        loss.backward()
        if calls[0] == fail_at[0]:
            if failure == "nan gradient":
                w.grad[0] = float("nan")
            else:
                return loss * float("nan")  # finite gradients, a NaN loss (LBFGS itself would crash on it)
        return loss

    for _ in range(2):
        opt.step(closure)
    before = _state(opt, [w, b])
    fail_at[0] = calls[0] + 4
    with pytest.raises(FloatingPointError):
        opt.step(closure)
    assert calls[0] >= fail_at[0]
    assert _same(_state(opt, [w, b]), before)
    fail_at[0] = None
    opt.step(closure)  # and training goes on


def test_lbfgs_closure_returning_none_is_refused_and_moves_nothing():
    X, y, w, b = _problem(2)
    opt = _lbfgs(w, b)

    def closure():
        opt.zero_grad()
        ((X @ w + b - y) ** 2).mean().backward()

    opt.step(lambda: (closure(), ((X @ w + b - y) ** 2).mean())[1])
    before = _state(opt, [w, b])
    with pytest.raises(TypeError):
        opt.step(closure)  # torch's LBFGS needs the loss too (it raises the same way)
    after = _state(opt, [w, b])
    assert _same(after["params"], before["params"]) and _same(after["state"][0]["U"], before["state"][0]["U"])
