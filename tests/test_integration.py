"""Integration with the torch.optim ecosystem: dense equivalence, schedulers, GradScaler, closures,
zero_grad, add_param_group, checkpoints, deepcopy/pickle, dtypes, missing gradients, named params.

Oracles: torch.optim itself (dense groups must be bit-identical to it), the factor-gradient formulas of
the spec (kernels/reference.py) written out by hand (``dU = g*W + 2*kappa*U``, ``dW = g*U + 2*kappa*W``), and uninterrupted
runs (a checkpointed / copied / scaled run must equal bit for bit a run that never was).
All on CPU, small models, fixed seeds.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spread_optim import SpreadAdam, SpreadAdamW, SpreadOptimizer, SpreadSGD

D_IN, D_HID, D_OUT = 6, 8, 3
FACTOR_KEYS = ("U", "u", "W")


# ----------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention (10-30x slower on a 2-core runner)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT)).to(dtype)


class Ensemble(nn.Module):
    """Two first layers reading the same input (share one factor per input feature)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(D_IN, D_HID)
        self.b = nn.Linear(D_IN, D_HID)
        self.head = nn.Linear(D_HID, D_OUT)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)) + torch.tanh(self.b(x)))


def batch(step: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1234 + step)
    x = torch.randn(32, D_IN, generator=g, dtype=torch.float64)
    y = torch.randn(32, D_OUT, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def compute_loss(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step, model_dtype(model))
    return F.mse_loss(model(x), y)


def sparse_dense_groups(model: nn.Sequential, kappa: float = 0.02, sparsity="element", **extra):
    """First layer's weight in a sparse group, everything else dense."""
    w = model[0].weight
    return [
        {"params": [w], "kappa": kappa, "sparsity": sparsity, **extra},
        {"params": [p for p in model.parameters() if p is not w]},
    ]


def make_closure(model, opt, step, log=None):
    def closure():
        opt.zero_grad()
        loss = compute_loss(model, step)
        loss.backward()
        if log is not None:
            log.append(loss.detach().clone())
        return loss

    return closure


def train(model, opt, steps, closure=False, sched=None):
    for step in steps:
        if closure:
            opt.step(make_closure(model, opt, step))
        else:
            opt.zero_grad()
            compute_loss(model, step).backward()
            opt.step()
        if sched is not None:
            sched.step()


def all_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone_tree(v) for v in x)
    return copy.deepcopy(x)


def state_snapshot(opt):
    """Deep copy of every parameter's optimizer state (factors and base state), in param order."""
    return [clone_tree(dict(opt.state.get(p, {}))) for p in all_params(opt)]


def params_snapshot(opt):
    return [p.detach().clone() for p in all_params(opt)]


def assert_same(a, b, where="x"):
    """Bit-for-bit equality of nested dicts/lists of tensors (dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: values differ (max |diff| {(a.double() - b.double()).abs().max().item():.3e})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, dict) else b}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_runs_equal(opt_a, opt_b):
    """Same parameters and the same optimizer state (factors, base state), bit for bit."""
    assert_same(params_snapshot(opt_a), params_snapshot(opt_b), "params")
    assert_same(state_snapshot(opt_a), state_snapshot(opt_b), "state")


def theta_of(opt, p, group_dim=None):
    """``U*W`` (element) or ``expand(u)*W`` (row: group_dim=0, column: group_dim=1) from the state."""
    st = opt.state[p]
    if "U" in st:
        return st["U"] * st["W"]
    shape = [1] * p.dim()
    shape[group_dim] = -1
    return st["u"].reshape(shape) * st["W"]


def assert_factor_step(U1, W1, U_exp, W_exp, theta_old, **tol):
    """Factors after a step equal the hand-computed base update, except entries whose theta the update
    flips in sign: those are snapped to exact zero (documented; with zero_threshold=0 nothing else snaps).
    Entries that were exact zeros before the step (hold/revive) must not be passed in."""
    crossed = (U_exp * W_exp) * theta_old.to(U_exp.dtype) < 0
    assert crossed.float().mean() < 0.25, "test set-up: too many sign flips to check the update"
    torch.testing.assert_close(U1[~crossed], U_exp[~crossed], **tol)
    torch.testing.assert_close(W1[~crossed], W_exp[~crossed], **tol)
    assert (U1[crossed] == 0).all() and (W1[crossed] == 0).all()


def checkpoint(obj) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


# ----------------------------------------------------------------------------------------------------
# kappa = 0: exactly the base optimizer


def _dense_groups(model):
    # two groups with different hyperparameters: per-group options must reach the base
    return [
        {"params": list(model[0].parameters()), "lr": 0.03},
        {"params": list(model[2].parameters())},
    ]


DENSE_CASES = {
    "sgd_momentum_wd": (SpreadSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    "sgd_nesterov": (SpreadSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "adam_wd": (SpreadAdam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
    "adam_amsgrad": (SpreadAdam, torch.optim.Adam, dict(lr=0.01, weight_decay=1e-2, amsgrad=True)),
    "adamw": (SpreadAdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "adamw_amsgrad": (SpreadAdamW, torch.optim.AdamW, dict(lr=0.01, amsgrad=True)),
    "rmsprop": (
        functools.partial(SpreadOptimizer, base=torch.optim.RMSprop),
        torch.optim.RMSprop,
        dict(lr=0.01, momentum=0.5, centered=True, weight_decay=1e-3),
    ),
}


@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_kappa_zero_is_bit_identical_to_torch(case):
    spread_cls, torch_cls, kwargs = DENSE_CASES[case]
    model, ref = make_mlp(0), make_mlp(0)
    groups = _dense_groups(model)
    groups[0]["kappa"] = 0.0  # explicit 0 in one group, the default in the other
    opt = spread_cls(groups, **kwargs)
    opt_ref = torch_cls(_dense_groups(ref), **kwargs)
    train(model, opt, range(10))
    train(ref, opt_ref, range(10))
    assert_same(params_snapshot(opt), params_snapshot(opt_ref), "params")
    # a dense parameter's optimizer.state entry is the base's own state
    for p, q in zip(all_params(opt), all_params(opt_ref)):
        assert_same(clone_tree(dict(opt.state[p])), clone_tree(dict(opt_ref.state[q])), "state")
    assert not torch.equal(model[0].weight, make_mlp(0)[0].weight)  # it did train


# ----------------------------------------------------------------------------------------------------
# LR schedulers


def test_scheduler_lr_is_the_lr_the_factors_are_stepped_with():
    """LambdaLR over plain SGD: every step must be ``U -= lr_t*(g*W + 2k*U)`` with the scheduler's lr_t
    (including lr_t = 0, which must leave everything exactly as it was)."""
    kappa, base_lr = 0.05, 0.2
    lams = [1.0, 0.5, 0.0, 2.0, 0.25]
    model = make_mlp(0)
    w = model[0].weight
    opt = SpreadSGD(sparse_dense_groups(model, kappa, zero_threshold=0.0), lr=base_lr)
    train(model, opt, [100])  # first step (constant lr) creates the factors
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lams[t] if t < len(lams) else 1.0)
    dense = [p for p in model.parameters() if p is not w]
    for t, lam in enumerate(lams):
        lr = base_lr * lam
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)  # the scheduler did its job
        U, W = opt.state[w]["U"].clone(), opt.state[w]["W"].clone()
        theta, dense_before = w.detach().clone(), [p.detach().clone() for p in dense]
        opt.zero_grad()
        compute_loss(model, t).backward()
        g = w.grad.clone()
        dense_grads = [p.grad.clone() for p in dense]
        opt.step()
        sched.step()
        U1, W1 = opt.state[w]["U"], opt.state[w]["W"]
        if lam == 0.0:
            assert torch.equal(U1, U) and torch.equal(W1, W) and torch.equal(w, theta)
            assert all(torch.equal(p, q) for p, q in zip(dense, dense_before))
            continue
        assert not ((U == 0) & (W == 0)).any()  # no exact zeros to hold/revive in this set-up
        assert_factor_step(U1, W1, U - lr * (g * W + 2 * kappa * U), W - lr * (g * U + 2 * kappa * W), theta,
                           rtol=1e-6, atol=1e-7)
        assert torch.equal(w, U1 * W1)
        for p, q, gq in zip(dense, dense_before, dense_grads):
            torch.testing.assert_close(p.detach(), q - lr * gq, rtol=1e-6, atol=1e-7)


def test_steplr_equals_manual_lr_and_lr_zero_freezes_adam():
    def run(mode, gamma=0.1):
        model = make_mlp(0)
        opt = SpreadAdam(sparse_dense_groups(model, 0.02), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=gamma) if mode == "sched" else None
        frozen = None
        for step in range(6):
            if mode == "manual":
                for g in opt.param_groups:
                    g["lr"] = 0.05 * gamma ** (step // 2)
            if step == 2:
                frozen = params_snapshot(opt), state_snapshot(opt)
            train(model, opt, [step], sched=sched)
        return opt, frozen

    (scheduled, _), (manual, _) = run("sched"), run("manual")
    assert_runs_equal(scheduled, manual)
    # gamma=0: lr is 0 from step 2 on; Adam's moments keep moving, parameters and factors must not
    opt, (params2, state2) = run("sched", gamma=0.0)
    assert opt.param_groups[0]["lr"] == 0.0
    assert not torch.equal(params2[0], make_mlp(0)[0].weight)  # it did move before
    assert_same(params_snapshot(opt), params2, "params")
    w = opt.param_groups[0]["params"][0]
    for key in ("U", "W"):
        assert torch.equal(opt.state[w][key], state2[0][key])
    assert not torch.equal(opt.state[w]["base"]["U"]["exp_avg"], state2[0]["base"]["U"]["exp_avg"])


# ----------------------------------------------------------------------------------------------------
# GradScaler and non-finite gradients


def test_grad_scaler_skips_inf_step_and_scaled_steps_equal_unscaled():
    model, ref = make_mlp(0), make_mlp(0)
    opt = SpreadAdam(sparse_dense_groups(model, 0.02, sparsity="row"), lr=0.02)
    opt_ref = SpreadAdam(sparse_dense_groups(ref, 0.02, sparsity="row"), lr=0.02)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    scale0 = scaler.get_scale()

    def scaled_step(step, poison=False):
        opt.zero_grad()
        scaler.scale(compute_loss(model, step)).backward()
        if poison:
            model[0].weight.grad[1, 2] = float("inf")
        scaler.step(opt)
        scaler.update()

    scaled_step(0)
    train(ref, opt_ref, [0])
    assert_runs_equal(opt, opt_ref)  # scaling by a power of two and back is exact
    params, state = params_snapshot(opt), state_snapshot(opt)
    scaled_step(1, poison=True)
    assert scaler.get_scale() == scale0 / 2  # the scaler saw the inf and skipped the step
    assert_same(params_snapshot(opt), params, "params")
    assert_same(state_snapshot(opt), state, "state")
    scaled_step(2)
    train(ref, opt_ref, [2])
    assert_runs_equal(opt, opt_ref)
    assert not torch.equal(model[0].weight, params[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("via_closure", [False, True], ids=["step", "closure"])
def test_nonfinite_sparse_grad_raises_and_changes_nothing(bad, via_closure):
    model, ref = make_mlp(0), make_mlp(0)
    opt = SpreadAdam(sparse_dense_groups(model, 0.02), lr=0.02)
    opt_ref = SpreadAdam(sparse_dense_groups(ref, 0.02), lr=0.02)
    train(model, opt, [0])
    train(ref, opt_ref, [0])
    params, state = params_snapshot(opt), state_snapshot(opt)

    def poisoned():
        opt.zero_grad()
        loss = compute_loss(model, 1)
        loss.backward()
        model[0].weight.grad[2, 3] = bad
        return loss

    with pytest.raises(FloatingPointError, match="param group 0"):
        if via_closure:
            opt.step(poisoned)
        else:
            poisoned()
            opt.step()
    # nothing moved: neither the sparse group nor the (finite) dense group, nor any state
    assert_same(params_snapshot(opt), params, "params")
    assert_same(state_snapshot(opt), state, "state")
    # and the optimizer carries on as if the bad batch had never been seen
    train(model, opt, [2], closure=via_closure)
    train(ref, opt_ref, [2], closure=via_closure)
    assert_runs_equal(opt, opt_ref)


def test_nonfinite_grad_at_first_step_then_training_is_unaffected():
    model, ref = make_mlp(0), make_mlp(0)
    opt = SpreadAdam(sparse_dense_groups(model, 0.02), lr=0.02)
    opt_ref = SpreadAdam(sparse_dense_groups(ref, 0.02), lr=0.02)
    theta0 = params_snapshot(opt)
    opt.zero_grad()
    compute_loss(model, 0).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step()
    assert_same(params_snapshot(opt), theta0, "params")
    train(model, opt, range(1, 4))
    train(ref, opt_ref, range(1, 4))
    assert_runs_equal(opt, opt_ref)


def test_lbfgs_nonfinite_grad_mid_step_restores_factors():
    model = make_mlp(0)
    w = model[0].weight
    opt = SpreadOptimizer(sparse_dense_groups(model, 0.01), torch.optim.LBFGS, lr=0.5, max_iter=6)
    train(model, opt, [0], closure=True)
    U, W, theta = opt.state[w]["U"].clone(), opt.state[w]["W"].clone(), w.detach().clone()
    calls = []

    def closure():
        opt.zero_grad()
        loss = compute_loss(model, 1)
        loss.backward()
        calls.append(1)
        if len(calls) == 3:
            w.grad[0, 0] = float("nan")
        return loss

    with pytest.raises(FloatingPointError):
        opt.step(closure)
    assert len(calls) == 3
    assert torch.equal(opt.state[w]["U"], U) and torch.equal(opt.state[w]["W"], W)
    assert torch.equal(w, theta)


# ----------------------------------------------------------------------------------------------------
# closures


def test_lbfgs_closure_sees_theta_equal_factors_and_step_returns_first_loss():
    model = make_mlp(0)
    w0, w2 = model[0].weight, model[2].weight
    biases = [model[0].bias, model[2].bias]
    opt = SpreadOptimizer(
        [
            {"params": [w0], "kappa": 0.01},
            {"params": [w2], "kappa": 0.01, "sparsity": "row"},
            {"params": biases},
        ],
        torch.optim.LBFGS, lr=1.0, max_iter=5, line_search_fn="strong_wolfe",
    )
    for step in range(2):
        seen, losses = [], []

        def closure():
            opt.zero_grad()
            seen.append((w0.detach().clone(), theta_of(opt, w0), w2.detach().clone(), theta_of(opt, w2, 0)))
            loss = compute_loss(model, step)
            loss.backward()
            losses.append(loss.detach().clone())
            return loss

        ret = opt.step(closure)
        assert len(seen) >= 3  # several evaluations, several points
        assert not torch.equal(seen[0][0], seen[-1][0])
        for i, (t0, f0, t2, f2) in enumerate(seen):
            assert torch.equal(t0, f0), f"evaluation {i}: element theta != U*W"
            assert torch.equal(t2, f2), f"evaluation {i}: row theta != u*W"
        # the closure's own loss at the first evaluation (not loss + penalty, not the last loss)
        assert isinstance(ret, torch.Tensor) and torch.equal(ret.detach(), losses[0])
        assert opt.penalty() > 0
        assert torch.equal(w0, theta_of(opt, w0)) and torch.equal(w2, theta_of(opt, w2, 0))


@pytest.mark.parametrize("cls", [SpreadSGD, SpreadAdam], ids=["sgd", "adam"])
def test_closure_step_equals_plain_step_for_sgd_adam(cls):
    kwargs = dict(lr=0.05, momentum=0.9) if cls is SpreadSGD else dict(lr=0.02)
    model, ref = make_mlp(0), make_mlp(0)
    opt = cls(sparse_dense_groups(model, 0.02), **kwargs)
    opt_ref = cls(sparse_dense_groups(ref, 0.02), **kwargs)
    for step in range(4):
        log = []
        ret = opt.step(make_closure(model, opt, step, log))
        assert len(log) == 1 and torch.equal(ret.detach(), log[0])
        train(ref, opt_ref, [step])
    assert_runs_equal(opt, opt_ref)


# ----------------------------------------------------------------------------------------------------
# zero_grad and missing gradients


def test_zero_grad_set_to_none_like_torch():
    model = make_mlp(0)
    opt = SpreadAdam(sparse_dense_groups(model, 0.02), lr=0.02)
    train(model, opt, [0])
    compute_loss(model, 1).backward()
    opt.zero_grad(set_to_none=False)
    for p in model.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    compute_loss(model, 1).backward()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    compute_loss(model, 1).backward()
    opt.zero_grad()  # torch's default is set_to_none=True
    assert all(p.grad is None for p in model.parameters())


def test_none_grads_step_is_a_noop_zero_grads_step_decays_factors():
    kappa, lr = 0.05, 0.1
    model = make_mlp(0)
    w = model[0].weight
    opt = SpreadSGD(sparse_dense_groups(model, kappa, zero_threshold=0.0), lr=lr)
    train(model, opt, [0])
    # all grads None: nothing moves, no state changes
    params, state = params_snapshot(opt), state_snapshot(opt)
    opt.zero_grad(set_to_none=True)
    opt.step()
    assert_same(params_snapshot(opt), params, "params")
    assert_same(state_snapshot(opt), state, "state")
    # all grads zero tensors: the penalty alone shrinks the factors, U <- (1 - 2*kappa*lr) * U
    U, W = opt.state[w]["U"].clone(), opt.state[w]["W"].clone()
    compute_loss(model, 1).backward()
    opt.zero_grad(set_to_none=False)
    assert torch.equal(w.grad, torch.zeros_like(w))
    opt.step()
    torch.testing.assert_close(opt.state[w]["U"], U * (1 - 2 * kappa * lr), rtol=1e-6, atol=0)
    torch.testing.assert_close(opt.state[w]["W"], W * (1 - 2 * kappa * lr), rtol=1e-6, atol=0)
    assert torch.equal(w, opt.state[w]["U"] * opt.state[w]["W"])
    assert (w.abs() <= params[0].abs()).all() and (w.abs() < params[0].abs()).any()
    for p, q in zip(all_params(opt)[1:], params[1:]):  # dense, plain SGD, zero grad: unchanged
        assert torch.equal(p, q)


@pytest.mark.parametrize("sparsity", ["element", "row"])
def test_param_without_grad_is_left_alone(sparsity):
    model = make_mlp(0)
    w0, w2 = model[0].weight, model[2].weight
    opt = SpreadAdam(
        [{"params": [w0, w2], "kappa": 0.02, "sparsity": sparsity}, {"params": [model[0].bias, model[2].bias]}],
        lr=0.02,
    )
    train(model, opt, [0])
    before = {id(p): (p.detach().clone(), clone_tree(dict(opt.state[p]))) for p in (w0, w2)}
    opt.zero_grad()
    compute_loss(model, 1).backward()
    w2.grad = None
    opt.step()
    theta2, state2 = before[id(w2)]
    assert torch.equal(w2, theta2)
    assert_same(clone_tree(dict(opt.state[w2])), state2, "state of the grad-less param")
    theta0, state0 = before[id(w0)]
    assert not torch.equal(w0, theta0)
    assert not torch.equal(opt.state[w0]["W"], state0["W"])
    assert opt.state[w0]["base"]["W"]["step"] == state0["base"]["W"]["step"] + 1


def test_lbfgs_param_without_grad_keeps_theta_equal_factors():
    """LBFGS moves a parameter without a gradient along its history; spread must leave it alone."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    opt = SpreadOptimizer([{"params": [a.weight, b.weight], "kappa": 0.01}], torch.optim.LBFGS, lr=0.5, max_iter=5)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def closure(use_b):
        def c():
            opt.zero_grad()
            loss = F.mse_loss(a(x) + b(x) if use_b else a(x), y)
            loss.backward()
            return loss

        return c

    opt.step(closure(True))
    before = [b.weight.detach().clone(), opt.state[b.weight]["U"].clone(), opt.state[b.weight]["W"].clone()]
    opt.step(closure(False))  # b.weight.grad is None in this step
    for p in (a.weight, b.weight):
        assert torch.equal(p, opt.state[p]["U"] * opt.state[p]["W"])
    after = [b.weight.detach(), opt.state[b.weight]["U"], opt.state[b.weight]["W"]]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


# ----------------------------------------------------------------------------------------------------
# add_param_group


def test_add_param_group_after_some_steps():
    """Two independent models, one loss: the old groups must follow a run that never saw the new ones,
    the new groups a fresh optimizer started at the moment they were added."""
    kw = dict(lr=0.02)
    model_a, model_b = make_mlp(0), make_mlp(1)
    ref_a, ref_b = make_mlp(0), make_mlp(1)
    opt = SpreadAdam(sparse_dense_groups(model_a, 0.02), **kw)
    opt_ref_a = SpreadAdam(sparse_dense_groups(ref_a, 0.02), **kw)
    opt_ref_b = SpreadAdam(sparse_dense_groups(ref_b, 0.03, sparsity="row"), **kw)
    for step in range(3):
        train(model_a, opt, [step])
    for group in sparse_dense_groups(model_b, 0.03, sparsity="row"):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 4 and opt.param_groups[3]["kappa"] == 0.0 and opt.param_groups[2]["lr"] == 0.02
    for step in range(3, 7):
        opt.zero_grad()
        (compute_loss(model_a, step) + compute_loss(model_b, 100 + step)).backward()
        opt.step()
    train(ref_a, opt_ref_a, range(7))
    train(ref_b, opt_ref_b, [100 + s for s in range(3, 7)])
    assert "u" in opt.state[model_b[0].weight] and "W" in opt.state[model_b[0].weight]
    assert "exp_avg" in opt.state[model_b[2].weight]  # dense: the base's own state
    assert_same([p.detach() for p in model_a.parameters()], [p.detach() for p in ref_a.parameters()], "old params")
    assert_same(state_snapshot(opt)[:4], state_snapshot(opt_ref_a), "old state")
    assert_same([p.detach() for p in model_b.parameters()], [p.detach() for p in ref_b.parameters()], "new params")
    assert_same(state_snapshot(opt)[4:], state_snapshot(opt_ref_b), "new state")
    assert not torch.equal(model_b[0].weight, make_mlp(1)[0].weight)


# ----------------------------------------------------------------------------------------------------
# checkpoints


def _with_zeros(model: nn.Module, sparse: list[torch.Tensor], sparsity: str) -> nn.Module:
    """Start the sparse parameters with exact zeros (two entries/rows/columns), so that the hold/revive
    path of exact zeros is live across the checkpoint."""
    with torch.no_grad():
        for w in sparse:
            if sparsity == "column":
                w[:, :2] = 0
            else:
                w[:2] = 0
    return model


def _sgd_momentum_case(seed):
    model = make_mlp(seed)
    _with_zeros(model, [model[0].weight], "element")
    return model, SpreadSGD(sparse_dense_groups(model, 0.02), lr=0.1, momentum=0.9), None


def _adam_case(sparsity, dtype=torch.float32):
    def factory(seed):
        model = make_mlp(seed, dtype)
        _with_zeros(model, [model[0].weight], sparsity)
        return model, SpreadAdam(sparse_dense_groups(model, 0.03, sparsity), lr=0.03), None

    return factory


def _shared_column_case(seed):
    model = Ensemble(seed)
    shared = [model.a.weight, model.b.weight]
    _with_zeros(model, shared, "column")
    rest = [p for p in model.parameters() if all(p is not s for s in shared)]
    groups = [{"params": shared, "kappa": 0.02, "sparsity": "column", "share_groups": True}, {"params": rest}]
    return model, SpreadAdam(groups, lr=0.03), None


def _lbfgs_case(seed):
    model = make_mlp(seed)
    _with_zeros(model, [model[0].weight], "element")
    opt = SpreadOptimizer(
        sparse_dense_groups(model, 0.01), torch.optim.LBFGS, lr=0.5, max_iter=4, history_size=5,
        line_search_fn="strong_wolfe",
    )
    return model, opt, None


def _sgd_steplr_case(seed):
    model = make_mlp(seed)
    _with_zeros(model, [model[0].weight], "element")
    opt = SpreadSGD(sparse_dense_groups(model, 0.02), lr=0.1, momentum=0.9)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


CHECKPOINT_CASES = {
    # name: (factory(seed) -> (model, optimizer, scheduler or None), steps use a closure)
    "sgd_momentum": (_sgd_momentum_case, False),
    "adam_element": (_adam_case("element"), False),
    "adam_row": (_adam_case("row"), False),
    "adam_shared_column": (_shared_column_case, False),
    "lbfgs_closure": (_lbfgs_case, True),
    "bf16_adam": (_adam_case("element", torch.bfloat16), False),
    "sgd_steplr": (_sgd_steplr_case, False),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_checkpoint_resume_is_bit_identical(case):
    factory, closure = CHECKPOINT_CASES[case]
    n, k = 8, 4
    ref_model, ref_opt, ref_sched = factory(0)
    train(ref_model, ref_opt, range(n), closure=closure, sched=ref_sched)

    model, opt, sched = factory(0)
    train(model, opt, range(k), closure=closure, sched=sched)
    ck = checkpoint({
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "sched": sched.state_dict() if sched is not None else None,
    })
    del model, opt, sched
    model2, opt2, sched2 = factory(7)  # fresh model (other init), fresh optimizer, fresh scheduler
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    if sched2 is not None:
        sched2.load_state_dict(ck["sched"])
    sparse_p = opt2.param_groups[0]["params"][0]
    assert "W" in opt2.state[sparse_p] and opt2.state[sparse_p]["W"].dtype == torch.float32
    train(model2, opt2, range(k, n), closure=closure, sched=sched2)

    assert_runs_equal(opt2, ref_opt)
    assert opt2.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


def test_checkpoint_before_first_step_loads():
    ref_model = make_mlp(0)
    ref_opt = SpreadAdam(sparse_dense_groups(ref_model, 0.03), lr=0.03)
    model = make_mlp(0)
    opt = SpreadAdam(sparse_dense_groups(model, 0.03), lr=0.03)
    ck = checkpoint({"model": model.state_dict(), "opt": opt.state_dict()})
    assert ck["opt"]["state"] == {}
    model2 = make_mlp(7)
    opt2 = SpreadAdam(sparse_dense_groups(model2, 0.03), lr=0.03)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    train(model2, opt2, range(5))
    train(ref_model, ref_opt, range(5))
    assert_runs_equal(opt2, ref_opt)


# ----------------------------------------------------------------------------------------------------
# deepcopy and pickling


def _element_row_dense(model):
    return [
        {"params": [model[0].weight], "kappa": 0.03},
        {"params": [model[2].weight], "kappa": 0.03, "sparsity": "row"},
        {"params": [model[0].bias, model[2].bias]},
    ]


def test_deepcopy_continues_identically():
    model = make_mlp(0)
    opt = SpreadAdam(_element_row_dense(model), lr=0.03)
    train(model, opt, range(3))
    clone = copy.deepcopy({"model": model, "opt": opt})
    model2, opt2 = clone["model"], clone["opt"]
    assert all(p is q for p, q in zip(all_params(opt2), [model2[0].weight, model2[2].weight, model2[0].bias, model2[2].bias]))
    assert_runs_equal(opt2, opt)
    train(model, opt, range(3, 7))  # the original first: a shared state would be stepped twice
    train(model2, opt2, range(3, 7))
    assert_runs_equal(opt2, opt)


def test_pickled_state_dict_resumes_identically():
    model, ref = make_mlp(0), make_mlp(0)
    opt = SpreadAdam(_element_row_dense(model), lr=0.03)
    opt_ref = SpreadAdam(_element_row_dense(ref), lr=0.03)
    train(model, opt, range(3))
    sd = pickle.loads(pickle.dumps(opt.state_dict()))
    model_sd = pickle.loads(pickle.dumps(model.state_dict()))
    model2 = make_mlp(5)
    model2.load_state_dict(model_sd)
    opt2 = SpreadAdam(_element_row_dense(model2), lr=0.03)
    opt2.load_state_dict(sd)
    train(model2, opt2, range(3, 6))
    train(ref, opt_ref, range(6))
    assert_runs_equal(opt2, opt_ref)


def test_pickled_model_and_optimizer_continue_identically():
    model = make_mlp(0)
    opt = SpreadAdam(_element_row_dense(model), lr=0.03)
    train(model, opt, range(3))
    clone = pickle.loads(pickle.dumps({"model": model, "opt": opt}))
    train(model, opt, range(3, 6))
    train(clone["model"], clone["opt"], range(3, 6))
    assert_runs_equal(clone["opt"], opt)


def test_isinstance_and_repr():
    model = make_mlp(0)
    opt = SpreadAdam(sparse_dense_groups(model, 0.02), lr=0.02)
    assert isinstance(opt, torch.optim.Optimizer)
    text = repr(opt)
    assert "SpreadAdam" in text and "Adam" in text and "kappa: 0.02" in text and "lr: 0.02" in text
    lbfgs = SpreadOptimizer(model.parameters(), torch.optim.LBFGS)
    assert isinstance(lbfgs, torch.optim.Optimizer) and "LBFGS" in repr(lbfgs)


# ----------------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_dtypes_factor_update_and_theta(dtype):
    kappa, lr = 0.05, 0.1
    factor_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    model = make_mlp(0, dtype)
    w = model[0].weight
    opt = SpreadSGD(sparse_dense_groups(model, kappa, zero_threshold=0.0), lr=lr, momentum=0.5)
    train(model, opt, [0])
    st = opt.state[w]
    assert st["U"].dtype == st["W"].dtype == factor_dtype
    assert st["base"]["U"]["momentum_buffer"].dtype == factor_dtype
    assert torch.equal(w, (st["U"] * st["W"]).to(dtype))
    # second step against the hand-written SGD-with-momentum update of the factors
    U, W = st["U"].clone(), st["W"].clone()
    bU, bW = st["base"]["U"]["momentum_buffer"].clone(), st["base"]["W"]["momentum_buffer"].clone()
    opt.zero_grad()
    compute_loss(model, 1).backward()
    g = w.grad.to(factor_dtype)
    bU = 0.5 * bU + (g * W + 2 * kappa * U)
    bW = 0.5 * bW + (g * U + 2 * kappa * W)
    theta = w.detach().clone()
    opt.step()
    assert not ((U == 0) & (W == 0)).any()
    assert_factor_step(st["U"], st["W"], U - lr * bU, W - lr * bW, theta, **tol)
    assert all(p.dtype == dtype for p in model.parameters())
    assert torch.equal(w, (st["U"] * st["W"]).to(dtype))
    assert opt.state[model[0].bias]["momentum_buffer"].dtype == dtype  # dense: base state in the param's dtype


# ----------------------------------------------------------------------------------------------------
# ways of passing parameters


def test_named_parameters_groups_match_tensor_groups():
    model, ref = make_mlp(0), make_mlp(0)
    named = dict(model.named_parameters())
    opt = SpreadAdam(
        [
            {"params": [("0.weight", named["0.weight"])], "kappa": 0.02},
            {"params": [(n, p) for n, p in model.named_parameters() if n != "0.weight"]},
        ],
        lr=0.02,
    )
    opt_ref = SpreadAdam(sparse_dense_groups(ref, 0.02), lr=0.02)
    train(model, opt, range(3))
    train(ref, opt_ref, range(3))
    assert_runs_equal(opt, opt_ref)
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["0.weight"]
    assert "U" in opt.state[named["0.weight"]]


def test_named_parameters_iterator_at_top_level():
    model, ref = make_mlp(0), make_mlp(0)
    opt = SpreadSGD(model.named_parameters(), lr=0.1, kappa=0.02)
    opt_ref = SpreadSGD(list(ref.parameters()), lr=0.1, kappa=0.02)
    train(model, opt, range(3))
    train(ref, opt_ref, range(3))
    assert len(opt.param_groups[0]["params"]) == 4
    assert_runs_equal(opt, opt_ref)


def test_parameters_as_generator():
    model, ref = make_mlp(0), make_mlp(0)
    opt = SpreadSGD(model.parameters(), lr=0.1, momentum=0.9, kappa=0.02)
    w = model[0].weight
    opt2_model = make_mlp(0)
    opt2 = SpreadSGD(
        [{"params": (p for p in opt2_model.parameters() if p.dim() == 2), "kappa": 0.02},
         {"params": (p for p in opt2_model.parameters() if p.dim() == 1), "kappa": 0.02}],
        lr=0.1, momentum=0.9,
    )
    opt_ref = SpreadSGD(list(ref.parameters()), lr=0.1, momentum=0.9, kappa=0.02)
    assert len(opt.param_groups[0]["params"]) == 4
    assert [len(g["params"]) for g in opt2.param_groups] == [2, 2]
    for m, o in ((model, opt), (opt2_model, opt2), (ref, opt_ref)):
        train(m, o, range(3))
    assert_runs_equal(opt, opt_ref)
    assert_same([p.detach() for p in opt2_model.parameters()], [p.detach() for p in ref.parameters()], "params")
    assert "U" in opt.state[w]


@pytest.mark.parametrize("kappa", [0.0, 0.1])
def test_global_step_hooks_fire_once_with_this_optimizer(kappa):
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = SpreadAdam([p], lr=0.01, kappa=kappa)
    seen = []
    handles = [register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o))),
               register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(("post", o)))]
    try:
        for _ in range(2):
            p.grad = torch.randn(4, 3)
            opt.step()
    finally:
        for h in handles:
            h.remove()
    assert [(when, o is opt) for when, o in seen] == [("pre", True), ("post", True)] * 2
