"""The compiled CPU step (kernels/compiled.py, ``fused=True`` on CPU tensors) against the PyTorch split path.

The split path (the spec's factor gradients, torch's own SGD/Adam on the factors, the spec's exact-zero pass) is the
reference; the compiled step fuses the same spec functions. Each test runs both on the same gradients, with weights
written outside the optimizer mid-run (adopted by the eager rerun of the compiled step), and compares weights,
factors and the base's state. Tolerance: relative 1e-5 (inductor contracts multiply-adds and reorders sums), exact
zeros identical. Each flag combination compiles once (seconds): the cases are few on purpose.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spread_optim import SpreadOptimizer
from spread_optim.kernels import compiled, dispatch

pytestmark = pytest.mark.skipif(compiled.unavailable() is not None, reason=f"torch.compile unavailable: {compiled.unavailable()}")


@pytest.fixture(autouse=True)
def _compiled_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # fused=True on CPU: the compiled step, not Triton's interpreter


def _factor_state(opt, p):
    st = opt.state[p]
    out = {k: st[k] for k in ("U", "u", "W") if k in st}
    for name, base in st.get("base", {}).items():
        for key, value in base.items():
            if isinstance(value, torch.Tensor):
                out[f"{name}.{key}"] = value
    return out


def _same(ref_params, ref_opt, params, opt, rtol=1e-5):
    for a, b in zip(ref_params, params):
        scale = max(float(a.detach().abs().max()), 1e-12)
        torch.testing.assert_close(b.detach(), a.detach(), rtol=rtol, atol=rtol * scale)
        assert torch.equal(a == 0, b == 0), "exact zeros differ"
        x, y = _factor_state(ref_opt, a), _factor_state(opt, b)
        assert x.keys() == y.keys()
        for key in x:
            scale = max(float(x[key].abs().max()), 1e-12)
            torch.testing.assert_close(y[key].float(), x[key].float(), rtol=10 * rtol, atol=10 * rtol * scale, msg=key)


CASES = [
    ("element", "adam", dict(lr=0.02)),
    ("element", "sgd", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("row", "adam", dict(lr=0.02, amsgrad=True, maximize=True)),
    ("column", "sgd", dict(lr=0.05)),
    ("ids", "adamw", dict(lr=0.02, weight_decay=0.1)),
]


@pytest.mark.parametrize("sparsity, base, options", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_compiled_trajectory_equals_the_split_path(sparsity, base, options):
    gen = torch.Generator().manual_seed(0)
    shapes = [(24, 10), (7, 10, 3)] if sparsity != "ids" else [(24, 10)]
    params = [(torch.randn(s, generator=gen) * 0.2).requires_grad_() for s in shapes]
    spec = torch.randint(0, 6, shapes[0], generator=gen) if sparsity == "ids" else sparsity
    runs = []
    for fused in (False, True):
        ps = [p.detach().clone().requires_grad_() for p in params]
        kappa = 0.03 if sparsity == "element" else 0.25  # a group's gradient norm is larger: a larger kappa zeroes groups
        opt = SpreadOptimizer([{"params": ps, "sparsity": spec}], base, kappa=kappa, fused=fused, **options)
        runs.append((ps, opt))
    g2 = torch.Generator().manual_seed(1)
    for step in range(12):
        grads = [torch.randn(p.shape, generator=g2) * 0.05 + 0.3 * p.detach() for p in runs[0][0]]
        for ps, opt in runs:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        if step == 5:  # writes outside the optimizer: a pruning mask and a few new values, on both runs
            mask = torch.rand(shapes[0], generator=g2) > 0.3
            for ps, _ in runs:
                with torch.no_grad():
                    ps[0].mul_(mask)
                    ps[0][2:5] = 0.0  # whole rows, a whole column, a whole id group: held at zero as groups
                    ps[0][:, 1] = 0.0
                    if sparsity == "ids":
                        ps[0][spec == 0] = 0.0
                    ps[0][0, 3:6] = torch.tensor([0.5, -0.25, 2.0])
    assert runs[0][1]._paths == ["cpu"] and runs[1][1]._paths == ["compiled"]
    _same(*runs[0], *runs[1])
    assert bool((runs[1][0][0] == 0).any()), "the case made no exact zeros"


def test_bf16_parameters_and_a_checkpoint_across_paths():
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(30, 8, generator=gen) * 0.2).to(torch.bfloat16).requires_grad_()
    ref_w = w.detach().clone().requires_grad_()
    opt = SpreadOptimizer([w], "adam", lr=0.02, kappa=0.02, fused=True)
    ref = SpreadOptimizer([ref_w], "adam", lr=0.02, kappa=0.02, fused=False)
    for step in range(6):
        g = (torch.randn(30, 8, generator=gen) * 0.05).to(torch.bfloat16)
        w.grad, ref_w.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert opt.state[w]["U"].dtype == torch.float32
    torch.testing.assert_close(w.float(), ref_w.float(), rtol=1e-2, atol=1e-3)
    resumed_w = w.detach().clone().requires_grad_()
    resumed = SpreadOptimizer([resumed_w], "adam", lr=0.02, kappa=0.02, fused=False)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # the compiled run's checkpoint on the split path
    g = (torch.randn(30, 8, generator=gen) * 0.05).to(torch.bfloat16)
    w.grad, resumed_w.grad = g.clone(), g.clone()
    opt.step()
    resumed.step()
    torch.testing.assert_close(w.float(), resumed_w.float(), rtol=1e-2, atol=1e-3)


def test_grad_scaler_hands_scale_and_inf_to_the_compiled_step():
    torch.manual_seed(3)
    models = [torch.nn.Linear(12, 5) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [SpreadOptimizer([{"params": [m.weight], "kappa": 0.01}, {"params": [m.bias]}], "adam", lr=0.01, fused=f)
            for m, f in zip(models, (False, True))]
    assert opts[1]._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = torch.randn(20, 12), torch.randn(20, 5)
    for step in range(5):
        for m, opt in zip(models, opts):
            opt.zero_grad()
            loss = ((m(x) - y) ** 2).mean()
            if opt is opts[0]:
                loss.backward()
                if step != 2:
                    opt.step()
                continue
            scaler.scale(loss).backward()
            if step == 2:
                m.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert float(opts[1].state[models[1].weight]["base"]["U"]["step"]) == 4.0  # the skipped step does not count


def test_eager_and_compiled_step_functions_agree():
    """The compiled function against the same function run eagerly (one element step, Adam, with writes)."""
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(1000, generator=gen) * 0.1
    U, W = (t.contiguous() for t in compiled.ref.init_element(p, "balanced"))
    p[:10] = 0.0  # written outside: left by the compiled step, adopted by the eager one
    g = torch.randn(1000, generator=gen) * 0.05
    states = [tuple(torch.rand(1000, generator=gen) * s for s in (0.01, 1e-4)) + (None,) for _ in range(2)]
    hyper = torch.tensor([0.01, 0.02, 1e-6, 0.02 / 0.1, 0.01**0.5, 0.02 / 0.1, 0.01**0.5, 0.9, 0.999, 1e-8, 0, 0, 1],
                         dtype=torch.float64)
    flags = dict(rule="adam")
    outs = []
    for fn in (compiled.compiled("element", **flags), lambda *a: compiled.element_step(*a, **flags)):
        args = [t.clone() for t in (g, p, U, W)] + [tuple(None if t is None else t.clone() for t in s) for s in states] + [hyper]
        count = fn(*args)
        outs.append((int(count), [a for a in args[:4]], args[4:6]))
    assert outs[0][0] == outs[1][0] == 10
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert torch.equal(outs[0][1][1][:10], torch.zeros(10))  # the written weights stay as written


def test_dispatch_to_the_compiled_step(monkeypatch):
    big = torch.randn(64, 32, requires_grad=True)
    opt = SpreadOptimizer([big], "adam", kappa=0.01)
    big.grad = torch.randn(64, 32)
    opt.step()
    assert opt._paths == ["compiled"]  # fused=None, element sparsity of float32: the native loop, at any size
    monkeypatch.setenv("SPREAD_OPTIM_NATIVE", "0")
    opt.step()
    assert opt._paths == ["cpu"]  # fused=None, no native loop, a small group: the split path
    monkeypatch.setattr(dispatch, "COMPILE_MIN_NUMEL", 1000)
    opt.step()
    assert opt._paths == ["compiled"]  # fused=None, a group of at least COMPILE_MIN_NUMEL elements
    a, b = torch.randn(8, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    shared = SpreadOptimizer([a, b], "adam", kappa=0.01, sparsity="column", share_groups=True)
    a.grad, b.grad = torch.randn(8, 4), torch.randn(3, 4)
    shared.step()
    assert shared._paths == ["cpu"]  # shared factors: the split path
    with pytest.raises(RuntimeError, match="param group 0: fused=True.*share_groups"):
        SpreadOptimizer([a, b], "adam", kappa=0.01, sparsity="column", share_groups=True, fused=True).step()
    monkeypatch.setattr(compiled, "unavailable", lambda: "torch.compile cannot build CPU code here (no compiler)")
    with pytest.raises(RuntimeError, match="no compiler"):
        SpreadOptimizer([big], "adam", kappa=0.01, fused=True).step()
    fallback = SpreadOptimizer([big], "adam", kappa=0.01)
    fallback.step()
    assert fallback._paths == ["cpu"]


@pytest.mark.parametrize("sparsity, limit", [("element", None), ("row", None), ("column", None), ("element", 1), ("row", 1)])
def test_many_layouts_in_one_group(sparsity, limit, monkeypatch, request):
    """A model's many shapes (1-D to 4-D, size-1 dims, a transposed parameter) in one group match the split path
    (element and row: the native loops; column: inductor). The compiled step takes canonical views, so a model's
    shapes share a few graphs; should torch.compile still reach its recompilation limit (forced here with
    ``limit``, on inductor's engine; under fullgraph it fails hard), the remaining layouts run the same step
    eagerly, with a warning."""
    import warnings

    torch._dynamo.reset()
    if limit is not None:
        from spread_optim import _fused

        patch = torch._dynamo.config.patch(recompile_limit=limit)
        patch.__enter__()
        request.addfinalizer(lambda: patch.__exit__(None, None, None))
        monkeypatch.setattr(_fused, "_warned_recompile", False)
        monkeypatch.setenv("SPREAD_OPTIM_NATIVE", "0")  # (inductor's engine: the native loops do not compile)
    shapes = [(16, 3, 7, 7), (16, 16, 3, 3), (32, 16, 3, 3), (32, 16, 1, 1), (64, 32, 3, 3), (64, 32), (10, 64),
              (48, 8, 5), (5, 40), (40, 5), (33, 17), (9, 9, 2, 2), (12, 1), (1, 12)]
    if sparsity == "element":
        shapes += [(16,), (7,), (100,)]
    gen = torch.Generator().manual_seed(4)
    base = [torch.randn(s, generator=gen) * 0.2 for s in shapes] + [torch.randn(30, 20, generator=gen) * 0.2]
    runs = []
    for fused in (False, True):
        ps = [t.clone().requires_grad_() for t in base[:-1]]
        ps.append(torch.empty(20, 30).t().copy_(base[-1]).requires_grad_())  # not contiguous
        assert not ps[-1].is_contiguous()
        # (SGD: Adam's first step divides by |gradient| + eps, which turns the last-bit differences of a gradient
        # that cancels to ~1e-7, met among this many entries, into visible ones)
        opt = SpreadOptimizer([{"params": ps, "sparsity": sparsity}], "sgd", kappa=0.05 if sparsity == "element" else 0.3,
                              lr=0.05, momentum=0.9, fused=fused)
        runs.append((ps, opt))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for step in range(8):
            grads = [torch.randn(p.shape, generator=gen) * 0.05 + 0.3 * p.detach() for p in runs[0][0]]
            for ps, opt in runs:
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
                opt.step()
                if step == 2:  # a pruning mask written outside the optimizer: the first rows (or entries) set to 0
                    with torch.no_grad():
                        for p in ps:
                            p[: max(1, p.shape[0] // 4)] = 0.0
    assert runs[1][1]._paths == ["compiled"]
    limited = [w for w in caught if "recompilation limit" in str(w.message)]
    assert bool(limited) == (limit is not None), [str(w.message) for w in caught]
    _same(*runs[0], *runs[1])
    assert any(bool((p == 0).any()) for p in runs[1][0]), "the case made no exact zeros"
