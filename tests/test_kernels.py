"""Fused Triton kernels (``fused=True``) against the reference path (``fused=False``).

The reference path is the definition: factor gradients, torch's own SGD/Adam/AdamW on the factors, then
the exact-zero pass (hold, revive, snap). Each test brings two copies of the same optimizer to the same
state (a few reference steps, so that states, exact zeros and revivals exist), steps one copy with the
kernels and the other with the reference on the same gradients, and compares parameters, factors and the
base's state. On a CPU-only machine the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set
in conftest). Tolerance: relative 1e-6 on float32 factors and states (the two paths round differently).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from spread_optim import SpreadOptimizer  # noqa: E402
from spread_optim.kernels import dispatch  # noqa: E402
from spread_optim.kernels import tables  # noqa: E402

BASES = [
    ("sgd", dict(lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("adam", dict(lr=0.02, eps=1e-4)),
    ("adam", dict(lr=0.02, eps=1e-4, amsgrad=True, maximize=True)),
    ("adamw", dict(lr=0.02, eps=1e-4, weight_decay=0.1, betas=(0.8, 0.99))),
]
# Adam moves a factor by lr*m/(sqrt(v)+eps): a factor gradient that nearly cancels (|g| ~ eps) turns a one-ulp
# difference of the two paths (an FMA, an order of additions) into a move of up to lr. With bf16 gradients such
# near-ties of g*W and -2*kappa*U occur (seen: |dU| ~ 5e-10 -> 1e-3 apart at eps=1e-8), so these one-step
# comparisons use eps=1e-4, where the same difference moves a factor by ~1e-7; the formula (and the kernel code)
# do not depend on eps's value. The trajectory tests below use the default eps with float32.
#: (sparsity, share_groups, shapes): shapes cover 1 element, odd sizes, one block + 1 (1025), several
#: tensors per launch, 1-D rows, conv-shaped columns (an inner size > 1)
STRUCTURES = [
    ("element", False, [(1,), (7,), (1025,)]),
    ("element", False, [(33, 31), (3, 5, 7)]),
    ("row", False, [(5,), (9, 7), (2, 600)]),
    ("column", False, [(7, 5), (4, 3, 3, 3)]),
    ("ids", False, [(11, 6), (1,)]),
    ("column", True, [(7, 5), (3, 5)]),
    ("row", True, [(5, 7), (5, 2, 3)]),
]
#: each example runs the interpreter for seconds: no shrinking (a failure prints its inputs)
QUICK = dict(deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KAPPA = 0.05  # 2*kappa = 0.1: about a third of the N(0, 0.1^2) gradients violate KKT at zero


def _params(shapes, dtype, gen):
    params = []
    for shape in shapes:
        theta = torch.randn(shape, generator=gen) * 0.3
        theta[torch.rand(shape, generator=gen) < 0.3] = 0.0  # dead entries: held or revived
        theta[torch.rand(shape, generator=gen) < 0.1] = 1e-7  # under zero_threshold: snapped unless growing
        params.append(theta.to(dtype).requires_grad_())
    return params


def _grads(params, gen, scale=0.1):
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in params]


def make_pair(sparsity, share, shapes, base, options, dtype=torch.float32, warm=2, seed=0):
    """Two optimizers in the same state: ``(reference params, reference opt, kernel params, kernel opt)``."""
    gen = torch.Generator().manual_seed(seed)
    params = _params(shapes, dtype, gen)
    spec = sparsity
    if sparsity == "ids":
        spec = None
    groups = []
    for p in ([params] if sparsity != "ids" else [[p] for p in params]):
        ids = torch.randint(0, 4, p[0].shape, generator=gen) if sparsity == "ids" else None
        groups.append({"params": p, "sparsity": ids if ids is not None else spec, "share_groups": share})
    opt = SpreadOptimizer(groups, base, kappa=KAPPA, fused=False, **options)
    for _ in range(warm):
        for p, g in zip(params, _grads(params, gen)):
            p.grad = g
        opt.step()
    copied = copy.deepcopy({"params": params, "opt": opt})
    for group in copied["opt"].param_groups:
        group["fused"] = True
    return params, opt, copied["params"], copied["opt"], gen


def _factor_state(opt, p):
    st = opt.state[p]
    out = {k: st[k] for k in ("U", "u", "W") if k in st}
    for k, base in st.get("base", {}).items():
        for name, value in base.items():
            if isinstance(value, torch.Tensor):
                out[f"{k}.{name}"] = value
    return out


def assert_same_state(ref_params, ref_opt, ker_params, ker_opt, rtol=1e-6):
    # Each state entry is compared up to rtol of the largest entry of that state over all the parameters:
    # a factor gradient g*W + 2*kappa*U may cancel to far below its terms (seen: a one-element parameter
    # whose first SGD momentum buffer, 3e-3, differed by 3e-6 relative after the kernel's unscaling of a
    # 1024-scaled gradient), and its rounding error is relative to the terms, whose size the other
    # parameters' entries show.
    scales: dict = {}
    for p_ref in ref_params:
        for key, x in _factor_state(ref_opt, p_ref).items():
            if x.numel():
                scales[key] = max(scales.get(key, 0.0), float(x.abs().max()))
    for p_ref, p_ker in zip(ref_params, ker_params):
        a, b = p_ref.detach().float(), p_ker.detach().float()
        theta_rtol = rtol if p_ref.dtype == torch.float32 else 1e-2
        # (atol relative to the parameter's largest entry: a group's u, summed in another order, scales it whole)
        torch.testing.assert_close(b, a, rtol=theta_rtol, atol=theta_rtol * max(float(a.abs().max()), 1e-30))
        assert torch.equal(a == 0, b == 0), "exact zeros differ"
        ref_state, ker_state = _factor_state(ref_opt, p_ref), _factor_state(ker_opt, p_ker)
        assert ref_state.keys() == ker_state.keys()
        for key in ref_state:
            x, y = ref_state[key], ker_state[key]
            if key.endswith("step"):
                assert float(x) == float(y), key
            else:
                scale = scales.get(key, 1.0)
                # a group's u is moved by a sum over the group, accumulated in another order by the kernel
                # (block sums and atomic adds): its rounding error is relative to the terms, not the sum
                tol = rtol * (10 if key.startswith("u") else 1)
                # (atol: a few roundings of the largest terms; the kernel contracts multiply-adds, torch does not)
                torch.testing.assert_close(y, x, rtol=tol, atol=4 * tol * max(scale, 1e-30), msg=key)


def step_both(ref_params, ref_opt, ker_params, ker_opt, grads, *, grad_scale=None, found_inf=None, transpose=False):
    for p, g in zip(ref_params, grads):
        p.grad = g.clone()
    for p, g in zip(ker_params, grads):
        g = g.clone() * (grad_scale if grad_scale is not None else 1.0)
        if transpose and g.dim() == 2:  # a non-contiguous gradient of the right shape
            g = g.t().contiguous().t()
            assert not g.is_contiguous()
        p.grad = g
    if found_inf is None or float(found_inf) == 0:
        ref_opt.step()
    else:
        with torch.no_grad():
            for p_ref, p_ker in zip(ref_params, ker_params):
                p_ker.copy_(p_ref)  # a skipped step writes nothing: compare with the unchanged state
    if grad_scale is not None:
        ker_opt.grad_scale = torch.tensor(grad_scale)
    if found_inf is not None:
        ker_opt.found_inf = torch.tensor(float(found_inf))
    ker_opt.step()
    for name in ("grad_scale", "found_inf"):
        ker_opt.__dict__.pop(name, None)
    assert "triton" in ker_opt._paths, "the kernels did not run"


@settings(max_examples=25, **QUICK)
@given(
    base=st.sampled_from(BASES),
    structure=st.sampled_from(STRUCTURES),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    warm=st.sampled_from([0, 2]),
    transpose=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_step_equals_reference(base, structure, dtype, warm, transpose, seed):
    sparsity, share, shapes = structure
    ref_params, ref_opt, ker_params, ker_opt, gen = make_pair(sparsity, share, shapes, *base, dtype=dtype, warm=warm, seed=seed)
    step_both(ref_params, ref_opt, ker_params, ker_opt, _grads(ref_params, gen), transpose=transpose)
    assert_same_state(ref_params, ref_opt, ker_params, ker_opt)


@settings(max_examples=12, **QUICK)
@given(
    base=st.sampled_from([BASES[1], BASES[3], BASES[4]]),
    structure=st.sampled_from([STRUCTURES[0], STRUCTURES[3], STRUCTURES[5]]),
    found=st.sampled_from([None, 0.0, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_grad_scaler_inputs(base, structure, found, seed):
    """``grad_scale`` unscales inside the kernel; ``found_inf = 1`` leaves everything as it was (steps too)."""
    sparsity, share, shapes = structure
    ref_params, ref_opt, ker_params, ker_opt, gen = make_pair(sparsity, share, shapes, *base, seed=seed)
    grads = _grads(ref_params, gen)
    if found:
        grads[0].view(-1)[0] = float("inf") / 1024.0
    step_both(ref_params, ref_opt, ker_params, ker_opt, grads, grad_scale=1024.0, found_inf=found)
    assert_same_state(ref_params, ref_opt, ker_params, ker_opt)


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: f"{s[0]}{'-shared' if s[1] else ''}-{len(s[2])}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_adopts_outside_writes_as_the_reference(structure, dtype):
    """Weights written between steps (a pruning mask, a few new values, a whole tensor replaced) are adopted by the
    kernels as by the PyTorch path: the same factors, states and weights after the next step."""
    sparsity, share, shapes = structure
    ref_params, ref_opt, ker_params, ker_opt, gen = make_pair(sparsity, share, shapes, "adam", dict(lr=0.02, eps=1e-4), dtype=dtype)
    masks = [torch.rand(p.shape, generator=gen) > 0.3 for p in ref_params]
    new = (torch.randn(ref_params[0].shape, generator=gen) * 0.3).to(dtype)
    for params in (ref_params, ker_params):
        with torch.no_grad():
            for p, m in zip(params, masks):
                p.mul_(m.to(dtype))
            params[0].view(-1)[:1].fill_(0.75)
            if len(params) > 1:
                params[-1].copy_(new if params[-1].shape == new.shape else params[-1] * 2)
    step_both(ref_params, ref_opt, ker_params, ker_opt, _grads(ref_params, gen))
    assert_same_state(ref_params, ref_opt, ker_params, ker_opt)


def test_device_and_host_step_counters(monkeypatch):
    """``fused=None`` dispatch (as on CUDA) keeps torch's host step counter; ``fused=True`` a device one."""
    ref_params, ref_opt, ker_params, ker_opt, gen = make_pair("element", False, [(50,)], "adam", dict(lr=0.02))
    for group in ker_opt.param_groups:
        group["fused"] = None
    monkeypatch.setattr(dispatch, "_on_cuda", lambda tensors: True)  # fused=None picks the kernels, as on CUDA
    step_both(ref_params, ref_opt, ker_params, ker_opt, _grads(ref_params, gen))
    assert_same_state(ref_params, ref_opt, ker_params, ker_opt)
    assert ker_opt.state[ker_params[0]]["base"]["U"]["step"].device.type == "cpu"


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(13, 37)
        self.b = torch.nn.Linear(13, 37)
        self.head = torch.nn.Linear(37, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)) + torch.relu(self.b(x)))


@pytest.mark.parametrize("base,options", [
    ("sgd", dict(lr=0.2, momentum=0.9)), ("adam", dict(lr=0.05)), ("adam", dict(lr=0.05, amsgrad=True, maximize=True))], ids=["sgd-momentum", "adam", "adam-amsgrad-max"])
def test_trajectories_agree(base, options):
    """25 whole-model steps with element, shared-column and row groups: fused=True follows fused=False."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 13, generator=gen), torch.randn(64, 5, generator=gen)
    runs = []
    for use_kernels in (False, True):
        model = MLP()
        groups = [
            {"params": [model.a.weight, model.b.weight], "sparsity": "column", "share_groups": True, "kappa": 0.1},
            {"params": [model.head.weight], "kappa": 0.03},
            {"params": [model.a.bias, model.b.bias], "sparsity": "row", "kappa": 0.03},
            {"params": [model.head.bias]},
        ]
        opt = SpreadOptimizer(groups, base, fused=use_kernels, **options)
        for _ in range(25):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            (-loss if options.get("maximize") else loss).backward()
            opt.step()
        assert ("triton" in opt._paths) == use_kernels
        runs.append(model)
    zeros = {}
    for (name, a), b in zip(runs[0].named_parameters(), runs[1].parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(a == 0, b == 0)
        zeros[name] = int((a == 0).sum())
    # the zero pass must have acted in the element group and in the shared column group
    assert zeros["head.weight"] > 0 and zeros["a.weight"] > 0, zeros


def test_checkpoints_cross_paths():
    """A fused run's state_dict resumes on the reference path (same state layout): the model's weights and the
    kernel run's optimizer checkpoint, loaded into a reference optimizer, step as the kernel run steps."""
    ref_params, ref_opt, ker_params, ker_opt, gen = make_pair("column", True, [(7, 5), (3, 5)], "adam", dict(lr=0.02))
    step_both(ref_params, ref_opt, ker_params, ker_opt, _grads(ref_params, gen))
    resumed = copy.deepcopy({"params": ker_params, "opt": ker_opt})  # the kernel run's weights and checkpoint
    resumed["opt"].load_state_dict(copy.deepcopy(ker_opt.state_dict()))
    for group in resumed["opt"].param_groups:
        group["fused"] = False
    grads = _grads(ref_params, gen)
    for p, g in zip(resumed["params"], grads):
        p.grad = g.clone()
    resumed["opt"].step()
    assert resumed["opt"]._paths == ["cpu"]
    step_both(ref_params, ref_opt, ker_params, ker_opt, grads)
    assert_same_state(resumed["params"], resumed["opt"], ker_params, ker_opt)


def test_dispatch_rules(monkeypatch):
    p = torch.randn(4, 3, requires_grad=True)
    p.grad = torch.randn(4, 3)
    opt = SpreadOptimizer([p], "adam", kappa=0.1)  # fused=None on CPU tensors: the native loop (tests/test_native.py)
    opt.step()
    assert opt._paths == ["compiled"]
    monkeypatch.setenv("SPREAD_OPTIM_NATIVE", "0")  # without it, a small group: the reference
    opt.step()
    assert opt._paths == ["cpu"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # fused=True on CPU tensors: the compiled CPU step (tests/test_compiled.py)
    assert dispatch.choose([p], [p], {"fused": True}, base_cls=torch.optim.Adam, one_dtype=False, shared=False,
                           sharded=False, where="param group 0").path == "compiled"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(3, dtype=torch.float64, requires_grad=True)
    q.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        SpreadOptimizer([q], "sgd", lr=0.1, kappa=0.1, fused=True).step()
    # another base's own `fused` option is its own business: spread runs the generic path around it
    adagrad = SpreadOptimizer([p], torch.optim.Adagrad, kappa=0.1, fused=True)
    adagrad.step()
    assert adagrad._paths == ["cpu"] and "U" in adagrad.state[p]
    monkeypatch.setattr(dispatch, "_kernels", {"error": ImportError("No module named 'triton'")})
    with pytest.raises(RuntimeError, match="Triton is not available"):
        SpreadOptimizer([p], "adam", kappa=0.1, fused=True).step()


def test_capturable_checks_on_the_device():
    """capturable=True: no host synchronisation, so no FloatingPointError; a NaN gradient skips the step on
    the device instead (nothing moves, step counters included), and a finite one equals the reference."""
    ref_params, ref_opt, ker_params, ker_opt, gen = make_pair("column", True, [(7, 5), (3, 5)], "adam", dict(lr=0.02))
    for group in ker_opt.param_groups:
        group["capturable"] = True
    step_both(ref_params, ref_opt, ker_params, ker_opt, _grads(ref_params, gen))
    assert_same_state(ref_params, ref_opt, ker_params, ker_opt)
    before = copy.deepcopy({"params": ker_params, "state": ker_opt.state_dict()})
    grads = _grads(ker_params, gen)
    grads[1][0, 0] = float("nan")
    for p, g in zip(ker_params, grads):
        p.grad = g
    ker_opt.step()  # no exception
    for p, q in zip(ker_params, before["params"]):
        assert torch.equal(p, q)
    after = ker_opt.state_dict()["state"]
    for key, entry in before["state"]["state"].items():
        for name in ("u", "W"):
            if name in entry:
                assert torch.equal(after[key][name], entry[name])
                assert float(after[key]["base"][name]["step"]) == float(entry["base"][name]["step"])


def test_missing_triton_warns_once_and_runs_the_reference(monkeypatch):
    """fused=None on a GPU without Triton: the reference runs, and one warning says why."""
    import warnings

    monkeypatch.setattr(dispatch, "_on_cuda", lambda tensors: True)  # as if the tensors were on a GPU
    monkeypatch.setattr(dispatch, "_kernels", {"error": ImportError("No module named 'triton'")})
    monkeypatch.setattr(dispatch, "_warned", False)
    p = torch.randn(4, 3, requires_grad=True)
    opt = SpreadOptimizer([p], "sgd", lr=0.1, kappa=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            p.grad = torch.randn(4, 3)
            opt.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "Triton is not available" in messages[0] and "reference" in messages[0]
    assert "triton" not in opt._paths and "U" in opt.state[p]


def test_grad_scaler_end_to_end():
    """torch.amp.GradScaler hands grad_scale/found_inf to a fully fused optimizer (no unscale pass);
    the numbers equal an unscaled reference run, and a step with an inf changes nothing."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 13, generator=gen), torch.randn(32, 5, generator=gen)
    models, opts = [], []
    for use_kernels in (False, True):
        model = MLP()
        opt = SpreadOptimizer([{"params": [model.a.weight, model.head.weight], "kappa": 0.01},
                               {"params": [model.a.bias, model.b.weight, model.b.bias, model.head.bias]}],
                              "adam", lr=0.01, fused=use_kernels)
        models.append(model)
        opts.append(opt)
    assert opts[1]._step_supports_amp_scaling and not opts[0]._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(6):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            if opt is opts[0]:
                loss.backward()
                if step != 3:
                    opt.step()
                continue
            scaler.scale(loss).backward()
            if step == 3:
                model.a.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-7)
    step = opts[1].state[models[1].a.weight]["base"]["U"]["step"]
    assert float(step) == 5.0  # the skipped step does not count


def test_block_table():
    blocks, starts = tables.block_table([1, 2048, 0, 1025], 1024, torch.device("cpu"))
    assert blocks.tolist() == [0, 1, 1, 3, 3]
    assert starts.tolist() == [0, 0, 1024, 0, 1024]


@pytest.mark.parametrize("lr", [torch.tensor(0.02), torch.tensor([0.02]), torch.tensor([[0.02]])], ids=["0-d", "1-d", "2-d"])
@pytest.mark.parametrize("capturable", [False, True])
def test_tensor_lr_of_any_one_element_shape(lr, capturable):
    """torch accepts a one-element tensor lr of any shape; the kernels take it as the float does."""
    ref_params, ref_opt, ker_params, ker_opt, gen = make_pair("element", False, [(9, 4)], "adam", dict(lr=0.02, eps=1e-4))
    for group in ker_opt.param_groups:
        group["lr"], group["capturable"] = lr.clone(), capturable
    step_both(ref_params, ref_opt, ker_params, ker_opt, _grads(ref_params, gen))
    assert_same_state(ref_params, ref_opt, ker_params, ker_opt)
