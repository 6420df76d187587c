"""``load_state_dict`` checks what it loads: a checkpoint that cannot be this optimizer's is refused with an error
naming the group and parameter, and nothing changes; what torch accepts (older state dicts, the base's own
checkpoint) is accepted."""

from __future__ import annotations

import copy

import pytest
import torch

from spread_optim import SpreadAdam, SpreadOptimizer, SpreadSGD


def _model(seed=0, width=6):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))


def _groups(m, sparsity="element"):
    return [{"params": [m[0].weight], "kappa": 0.01, "sparsity": sparsity},
            {"params": [m[2].weight], "kappa": 0.02},
            {"params": [m[0].bias, m[2].bias]}]


def _train(m, opt, steps=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()


def _trained(sparsity="element", cls=SpreadAdam, **kw):
    m = _model()
    opt = cls(_groups(m, sparsity), lr=0.05, **kw)
    _train(m, opt)
    return m, opt


def _same(a: dict, b: dict) -> bool:
    """Deep equality of two state dicts (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _refused(opt, checkpoint, exc, *words):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(exc) as e:
        opt.load_state_dict(checkpoint)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert _same(opt.state_dict(), before), "a refused load changed the optimizer"
    return str(e.value)


def test_another_number_of_groups_or_parameters():
    m, opt = _trained()
    saved = opt.state_dict()
    fewer = {**saved, "param_groups": saved["param_groups"][:2]}
    _refused(opt, fewer, ValueError, "has 2 param groups, this optimizer 3")
    short = copy.deepcopy(saved)
    short["param_groups"][2]["params"] = short["param_groups"][2]["params"][:1]
    _refused(opt, short, ValueError, "param group 2", "1 parameters")


def test_a_checkpoint_of_another_model_is_refused_naming_group_and_parameter():
    _, other = _trained()
    m = _model(width=7)
    opt = SpreadAdam(_groups(m), lr=0.05)
    _train(m, opt)
    _refused(opt, other.state_dict(), ValueError, "param group 0, parameter 0", "'U'", "shape")


def test_a_checkpoint_of_another_sparsity():
    """The checkpoint's param groups come with it, spread's keys too (as torch restores lr): a 'row' checkpoint
    makes the group 'row'. Factors that do not fit the checkpoint's own sparsity are refused."""
    _, rows = _trained("row")
    m = _model()
    opt = SpreadAdam(_groups(m, "column"), lr=0.05)
    _train(m, opt)
    opt.load_state_dict(rows.state_dict())
    assert opt.param_groups[0]["sparsity"] == "row"
    _train(m, opt)
    inconsistent = copy.deepcopy(rows.state_dict())
    inconsistent["param_groups"][0]["sparsity"] = "column"
    _refused(opt, inconsistent, ValueError, "param group 0, parameter 0", "'u'", "(6,)", "(5,)")
    _, elements = _trained("element")
    mixed = copy.deepcopy(elements.state_dict())
    mixed["param_groups"][0]["sparsity"] = "column"
    _refused(opt, mixed, ValueError, "param group 0", "do not fit sparsity 'column'")


@pytest.mark.parametrize("where", ["U", "W", "exp_avg", "exp_avg_sq", "dense"])
def test_non_finite_state_is_refused(where):
    m, opt = _trained()
    bad = copy.deepcopy(opt.state_dict())
    entry = bad["state"][0]
    if where in ("U", "W"):
        entry[where][0, 0] = float("nan")
    elif where == "dense":
        bad["state"][2]["exp_avg"][0] = float("inf")
    else:
        entry["base"]["W"][where][1, 1] = float("inf")
    _refused(opt, bad, ValueError, "NaN or inf", "param group 2" if where == "dense" else "param group 0, parameter 0")


@pytest.mark.parametrize("missing", ["U", "W", "base"])
def test_missing_factors_are_refused(missing):
    m, opt = _trained()
    bad = copy.deepcopy(opt.state_dict())
    del bad["state"][0][missing]
    _refused(opt, bad, ValueError, "param group 0, parameter 0", missing)


def test_a_shared_set_without_its_u_is_refused():
    m = _model()
    other = torch.nn.Parameter(torch.randn(4, 5))
    opt = SpreadAdam([{"params": [m[0].weight, other], "kappa": 0.01, "sparsity": "column", "share_groups": True}], lr=0.05)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()
    bad = copy.deepcopy(opt.state_dict())
    del bad["state"][0]["u"]
    _refused(opt, bad, ValueError, "param group 0", "'u'")


def test_spread_factors_into_a_dense_group_are_refused():
    m, opt = _trained()
    saved = opt.state_dict()
    m2 = _model()
    dense = SpreadAdam([{"params": [m2[0].weight]}, {"params": [m2[2].weight], "kappa": 0.02},
                        {"params": [m2[0].bias, m2[2].bias]}], lr=0.05)
    saved = copy.deepcopy(saved)
    saved["param_groups"][0]["kappa"] = 0.0  # the checkpoint says dense, its state says sparse
    _refused(dense, saved, ValueError, "param group 0", "dense")


def test_not_a_state_dict():
    _, opt = _trained()
    _refused(opt, {"weight": torch.zeros(3)}, ValueError, "not an optimizer state dict")


def test_an_older_state_dict_loads_and_continues_identically():
    """As torch's own test: the keys added since (maximize, foreach, differentiable, fused, capturable,
    decoupled_weight_decay) removed from the groups and the steps turned into Python numbers."""
    m, opt = _trained()
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in ("maximize", "foreach", "differentiable", "fused", "capturable", "decoupled_weight_decay"):
            group.pop(key, None)
    for entry in old["state"].values():
        for sub in [entry, *entry.get("base", {}).values()]:
            if "step" in sub:
                sub["step"] = int(sub["step"])
    m2 = copy.deepcopy(m)
    resumed = SpreadAdam(_groups(m2), lr=0.05)
    resumed.load_state_dict(old)
    _train(m, opt, steps=4, seed=5)
    _train(m2, resumed, steps=4, seed=5)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_a_torch_adam_checkpoint_is_adopted():
    """Switching from torch.optim.Adam to SpreadAdam mid-training: dense groups continue with Adam's moments, the
    sparse parameters start their factors from the weights, and the groups keep their kappa."""
    m = _model()
    adam = torch.optim.Adam([{"params": [m[0].weight]}, {"params": [m[2].weight]}, {"params": [m[0].bias, m[2].bias]}], lr=0.05)
    _train(m, adam)
    plain = copy.deepcopy(m)
    plain_adam = torch.optim.Adam([{"params": [plain[0].weight]}, {"params": [plain[2].weight]},
                                   {"params": [plain[0].bias, plain[2].bias]}], lr=0.05)
    plain_adam.load_state_dict(copy.deepcopy(adam.state_dict()))  # (a copy each: torch shares the step tensors)
    spread = SpreadAdam(_groups(m), lr=0.05)
    spread.load_state_dict(copy.deepcopy(adam.state_dict()))
    assert [g["kappa"] for g in spread.param_groups] == [0.01, 0.02, 0.0]
    assert "exp_avg" in spread.state[m[0].bias] and "exp_avg" not in spread.state[m[0].weight]
    _train(m, spread, steps=1, seed=7)  # (one step: after it the sparse weights, and so the biases' gradients, differ)
    _train(plain, plain_adam, steps=1, seed=7)
    assert torch.equal(m[0].bias, plain[0].bias) and torch.equal(m[2].bias, plain[2].bias)  # dense: Adam itself
    assert "U" in spread.state[m[0].weight] and spread.state[m[0].weight]["base"]["U"]["step"] == 1
    _train(m, spread, steps=20, seed=8)
    assert bool((m[0].weight == 0).any())


def test_changed_sparsity_refactorises_from_the_current_weights():
    """'row' -> 'column' (and share_groups switched on) after some steps: the weights are kept, the factors are
    rebuilt for the new structure, training goes on."""
    m = _model()
    opt = SpreadAdam([{"params": [m[0].weight], "kappa": 0.01, "sparsity": "row"}], lr=0.05)
    for _ in range(3):
        m[0].weight.grad = torch.randn_like(m[0].weight)
        opt.step()
    weights = m[0].weight.detach().clone()
    opt.param_groups[0]["sparsity"] = "column"
    opt.param_groups[0]["lr"] = 0.0
    m[0].weight.grad = torch.zeros_like(m[0].weight)
    opt.step()
    assert torch.equal(m[0].weight, weights)
    assert opt.state[m[0].weight]["u"].shape == (5,)
    opt.param_groups[0]["sparsity"] = "element"
    opt.step()
    assert torch.equal(m[0].weight, weights) and "U" in opt.state[m[0].weight]
    opt.param_groups[0]["lr"] = 0.05
    for _ in range(3):
        m[0].weight.grad = torch.randn_like(m[0].weight)
        opt.step()
    assert not torch.equal(m[0].weight, weights)


def test_bf16_factors_stay_float32_through_a_checkpoint():
    p = torch.nn.Parameter(torch.randn(4, 3).to(torch.bfloat16))
    opt = SpreadSGD([p], lr=0.1, kappa=0.01, momentum=0.9)
    p.grad = torch.randn(4, 3).to(torch.bfloat16)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt2 = SpreadSGD([p], lr=0.1, kappa=0.01, momentum=0.9)
    opt2.load_state_dict(saved)
    assert opt2.state[p]["U"].dtype == torch.float32 and opt2.state[p]["base"]["U"]["momentum_buffer"].dtype == torch.float32


def test_user_pre_hooks_run_before_the_checks():
    """torch runs load_state_dict pre-hooks first: a hook that repairs a checkpoint makes it loadable."""
    m, opt = _trained()
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["U"][0, 0] = float("nan")
    fixed = copy.deepcopy(opt.state_dict())
    opt.register_load_state_dict_pre_hook(lambda optimizer, sd: fixed)
    opt.load_state_dict(bad)
    assert torch.isfinite(opt.state[m[0].weight]["U"]).all()


def test_lbfgs_state_round_trips():
    torch.manual_seed(3)
    X, y = torch.randn(30, 8, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    b = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    opt = SpreadOptimizer([b], torch.optim.LBFGS, kappa=0.05, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((X @ b - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    saved = copy.deepcopy(opt.state_dict())
    b2 = b.detach().clone().requires_grad_()
    opt2 = SpreadOptimizer([b2], torch.optim.LBFGS, kappa=0.05, line_search_fn="strong_wolfe")
    opt2.load_state_dict(saved)
    assert _same(opt2.state_dict()["state"], opt.state_dict()["state"])
