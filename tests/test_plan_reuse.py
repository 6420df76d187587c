"""A step reuses the last plan only while nothing it read has changed (``SpreadOptimizer._reuse_plan``).

Oracle: the same run with reuse turned off (every step plans from scratch). Two optimizers on identical parameters
take the same steps and the same change between steps (a user's, a scheduler's, a checkpoint's); after every step
their parameters and states must be equal bit for bit, and a change the plan refuses must raise the same error in
both, leaving both as they were.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spread_optim import SpreadOptimizer
from spread_optim.kernels import dispatch


def _grow(opt, params):
    extra = torch.randn(5, 6, generator=torch.Generator().manual_seed(1)).requires_grad_()
    params.append(extra)
    opt.param_groups[0]["params"].append(extra)


def _new_group(opt, params):
    extra = torch.randn(4, 6, generator=torch.Generator().manual_seed(2)).requires_grad_()
    params.append(extra)
    opt.add_param_group({"params": [extra], "kappa": 0.05, "sparsity": "row"})


def _set(key, value):
    def change(opt, params):
        opt.param_groups[0][key] = value
    return change


def _betas_in_place(opt, params):
    group = opt.param_groups[0]
    if "betas" not in group:
        group["momentum"] = 0.5
        return
    group["betas"] = list(group["betas"])  # (first a list the user keeps, then a change of one of its entries)
    group["betas"][0] = 0.5


def _reshape(opt, params):
    params[0].data = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))


def _rewrite(opt, params):
    params[0].data.mul_(-0.5)


def _swap_storage(opt, params):
    params[1].data = params[1].data.clone()  # (the same values in new memory)


def _transpose(opt, params):
    params[0].data = params[0].data.t().contiguous().t()  # (the same shape, not contiguous)


def _clear_state(opt, params):
    opt.state[params[0]].clear()


def _no_grad(opt, params):
    params[1].grad = None
    params[1].requires_grad_(False)


def _double(opt, params):
    params[1].data = params[1].data.double()


def _native_off(opt, params, monkeypatch):
    monkeypatch.setenv("SPREAD_OPTIM_NATIVE", "0")


def _compile_threshold(opt, params, monkeypatch):
    monkeypatch.setattr(dispatch, "COMPILE_MIN_NUMEL", 8)


def _reload(opt, params):
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def _one_cycle(opt, params):
    """A scheduler that moves every group's lr and its momentum (Adam's beta1, SGD's momentum) at each step (the
    dense group's reach the base through the plan's copy)."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20).step


def _kappa_ramp(opt, params):
    """A strength raised at every step (a sparsity warm-up), and the zero threshold with it."""
    def ramp():
        opt.param_groups[0]["kappa"] *= 1.5
        opt.param_groups[0]["zero_threshold"] *= 2.0
    return ramp


CHANGES = {
    "lr": _set("lr", 0.003), "kappa": _set("kappa", 0.2), "zero_threshold": _set("zero_threshold", 0.05),
    "maximize": _set("maximize", True), "sparsity": _set("sparsity", "column"), "init": _set("init", "unbalanced"),
    "fused off": _set("fused", False), "betas in place": _betas_in_place, "grow the group": _grow,
    "new group": _new_group, "reshape": _reshape, "rewrite": _rewrite, "new storage": _swap_storage,
    "not contiguous": _transpose, "cleared state": _clear_state, "no gradient": _no_grad, "float64": _double,
    "native off": _native_off, "compile threshold": _compile_threshold, "reload": _reload, "scheduler": _one_cycle,
    "kappa ramp": _kappa_ramp, "kappa inf": _set("kappa", float("inf")), "kappa int": _set("kappa", 1),
    "bad kappa": _set("kappa", -1.0), "bad lr": _set("lr", float("nan")), "bad sparsity": _set("sparsity", "rows"),
}


def _run(change, base, sparsity, reuse, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    params = [(torch.randn(*shape, generator=gen) * 0.3).requires_grad_() for shape in ((10, 6), (7, 6), (6,))]
    kwargs = dict(lr=0.02, momentum=0.9) if base == "sgd" else dict(lr=0.02)
    opt = SpreadOptimizer([{"params": params[:2], "sparsity": sparsity}, {"params": params[2:], "kappa": 0.0}], base,
                          kappa=0.02, **kwargs)
    if not reuse:
        monkeypatch.setattr(opt, "_reuse_plan", lambda: None)
    outcomes = [_step(opt, params, gen) for _ in range(3)]
    with monkeypatch.context() as patch:
        after = change(opt, params, patch) if change.__code__.co_argcount == 3 else change(opt, params)
        for _ in range(3):
            try:
                outcomes.append(_step(opt, params, gen))
                if after is not None:  # (a scheduler: a change after every step)
                    after()
                    outcomes.append([(g["lr"], g.get("betas", g.get("momentum")), g["kappa"]) for g in opt.param_groups])
            except (ValueError, TypeError, RuntimeError) as error:
                outcomes += [f"{type(error).__name__}: {error}", _snapshot(opt, params)]
                break
    return outcomes


def _step(opt, params, gen):
    for p in params:
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    opt.step()
    return _snapshot(opt, params)


def _snapshot(opt, params):
    state = {i: copy.deepcopy(opt.state[p]) for i, p in enumerate(params) if p in opt.state}
    return [p.detach().clone() for p in params], state


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bool(((a == b) | (a != a) & (b != b)).all()))  # (NaN where the other has NaN)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("sparsity, base", [("element", "adam"), ("row", "adam"), ("row", "sgd"), ("element", "sgd")])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_reused_plan_steps_as_a_new_plan(change, sparsity, base, monkeypatch):
    reused = _run(CHANGES[change], base, sparsity, True, monkeypatch)
    planned = _run(CHANGES[change], base, sparsity, False, monkeypatch)
    assert len(reused) == len(planned)
    for i, (a, b) in enumerate(zip(reused, planned)):
        assert _equal(a, b), (change, i, a if isinstance(a, str) else "", b if isinstance(b, str) else "")


def test_the_plan_is_reused_and_dropped_after_an_error():
    """Without a change the plan is reused (not rebuilt); a step that raises drops it."""
    p = torch.randn(6, 4, requires_grad=True)
    opt = SpreadOptimizer([p], "adam", lr=0.01, kappa=0.01)
    p.grad = torch.randn(6, 4)
    opt.step()
    planned = opt._planned
    assert planned is not None
    opt.step()
    assert opt._planned is planned and opt._reuse_plan() is planned[-1]
    p.grad = torch.full((6, 4), float("nan"))
    with pytest.raises(FloatingPointError):
        opt.step()
    assert opt._planned is None


@pytest.mark.parametrize("base", ["adam", "sgd"])
def test_a_scheduler_does_not_make_every_step_plan(base):
    """A scheduler changes lr and the momentum (a number stays a number): the plan is kept, and the new values
    reach the base's groups (the dense group's step); a change of kind (a number to a string) plans again, and the
    plan's check raises."""
    p, q = torch.randn(6, 4, requires_grad=True), torch.randn(3, requires_grad=True)
    kwargs = dict(momentum=0.9) if base == "sgd" else {}
    opt = SpreadOptimizer([{"params": [p]}, {"params": [q], "kappa": 0.0}], base, lr=0.01, kappa=0.01, **kwargs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    p.grad, q.grad = torch.randn(6, 4), torch.randn(3)
    for _ in range(2):  # (the first step makes the dense group's state: the second plans again)
        opt.step()
        scheduler.step()
    planned = opt._planned[-1]  # (the kinds)
    key = "betas" if base == "adam" else "momentum"
    for _ in range(4):
        opt.step()
        assert opt._planned[-1] is planned
        assert [(g["lr"], g[key]) for g in opt._hidden.param_groups] == [(g["lr"], g[key]) for g in opt.param_groups]
        scheduler.step()
    calls = []  # (a step takes one key; the kinds only where the groups' values changed: a step after the schedule's)
    original_key, original_kinds = opt._plan_key, opt._group_kinds
    opt._plan_key = lambda kept: (calls.append("key"), original_key(kept))[1]
    opt._group_kinds = lambda kept: (calls.append("kinds"), original_kinds(kept))[1]
    opt.step()
    opt.step()
    assert calls == ["key", "kinds", "key"]
    del opt._plan_key, opt._group_kinds
    opt.param_groups[1]["lr"] = "0.1"
    with pytest.raises(TypeError, match="'lr' must be a number"):
        opt.step()


def test_a_kappa_ramp_does_not_make_every_step_plan():
    """kappa raised at every step keeps the plan; a kappa of 0 (a sparse group made dense) or one its check
    refuses (inf) plans again, and the plan raises."""
    p = torch.randn(6, 4, requires_grad=True)
    opt = SpreadOptimizer([p], "adam", lr=0.01, kappa=0.01)
    p.grad = torch.randn(6, 4)
    opt.step()
    planned = opt._planned[-1]  # (the kinds)
    for _ in range(3):
        opt.param_groups[0]["kappa"] *= 1.5
        opt.step()
        assert opt._planned[-1] is planned
    for bad, words in ((0.0, "'kappa' became 0"), (float("inf"), "'kappa' must be a finite float")):
        opt.param_groups[0]["kappa"] = bad
        with pytest.raises(ValueError, match=words):
            opt.step()
        opt.param_groups[0]["kappa"] = 0.01
        opt.step()
