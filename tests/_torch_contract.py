"""The ``OptimizerInfo``-like entries of ``test_torch_contract.py`` and the helpers its ported tests share.

Modelled on ``torch/testing/_internal/common_optimizers.py`` (``OptimizerInput``, ``optim_inputs_func_*``,
the entries' support flags, ``TensorTracker``) and on the helpers of torch's ``test/test_optim.py``.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ConstantLR, ExponentialLR, LinearLR, PolynomialLR, ReduceLROnPlateau, StepLR

from spread_optim import SpreadAdam, SpreadAdamW, SpreadOptimizer, SpreadSGD


def _has_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


#: spread's fused kernels take CPU tensors only in Triton's interpreter (conftest sets TRITON_INTERPRET=1 on
#: a machine without CUDA): there a sparse entry supports fused on CPU, tens of ms per step
HAS_TRITON = _has_triton()
SPREAD_KERNELS_ON_CPU = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRETED = SPREAD_KERNELS_ON_CPU
KAPPA = 0.05
CLIQUEY = ("foreach", "fused", "differentiable")
#: spread's own param-group keys (README, "Param-group keys"): the param groups are torch's plus these
SPREAD_KEYS = ("kappa", "sparsity", "share_groups", "init", "zero_threshold")


# ----------------------------------------------------------------------------------------------------
# OptimizerInfo-like entries


@dataclass
class OptimizerInput:
    """Keyword arguments for the constructor (never the global-cliquey flags: tests add those)."""

    kwargs: dict
    desc: str


def optim_inputs_func_sgd(dtype=None) -> list[OptimizerInput]:
    """torch's ``optim_inputs_func_sgd`` (CPU)."""
    return [
        OptimizerInput({}, "default"),
        OptimizerInput({"lr": 1e-2}, "non-default lr"),
        OptimizerInput({"lr": torch.tensor(0.001)}, "tensor lr"),
        OptimizerInput({"weight_decay": 0.5}, "non-zero weight_decay"),
        OptimizerInput({"momentum": 0.9}, "momentum"),
        OptimizerInput({"weight_decay": 0.1, "maximize": True}, "maximize"),
        OptimizerInput({"momentum": 0.9, "dampening": 0.5}, "dampening"),
        OptimizerInput({"momentum": 0.9, "weight_decay": 0.1}, "weight_decay w/ momentum"),
        OptimizerInput({"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, "nesterov"),
    ]


def optim_inputs_func_adam(dtype=None) -> list[OptimizerInput]:
    """torch's ``optim_inputs_func_adam`` on CPU (its capturable and tensor-beta inputs are CUDA-only there;
    float16 gets eps=0.1, as there: 1e-8 vanishes in float16 and the denominator becomes 0)."""
    inputs = [
        OptimizerInput({}, "default"),
        OptimizerInput({"lr": 0.01}, "non-default lr"),
        OptimizerInput({"weight_decay": 0.1}, "nonzero weight_decay"),
        OptimizerInput({"weight_decay": 0.1, "maximize": True}, "maximize"),
        OptimizerInput({"weight_decay": 0.1, "amsgrad": True}, "amsgrad"),
    ]
    if dtype == torch.float16:
        for oi in inputs:
            oi.kwargs["eps"] = 0.1
    return inputs


def optim_inputs_func_lbfgs(dtype=None) -> list[OptimizerInput]:
    """torch's ``optim_inputs_func_lbfgs``."""
    return [
        OptimizerInput({}, "default"),
        OptimizerInput({"lr": 0.01}, "non-default lr"),
        OptimizerInput({"lr": torch.tensor(0.001)}, "Tensor lr"),
        OptimizerInput({"tolerance_grad": 1e-6}, "tolerance_grad"),
        OptimizerInput({"line_search_fn": "strong_wolfe"}, "strong_wolfe"),
    ]


DEFAULT_SCHEDULERS = ([lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],)
SGD_SCHEDULERS = (  # torch's OptimizerInfo for SGD
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
    [lambda opt: LinearLR(opt, start_factor=0.4, end_factor=0.8, total_iters=4)],
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: LinearLR(opt, start_factor=0.4, end_factor=0.6, total_iters=4)],
    [lambda opt: StepLR(opt, gamma=0.99, step_size=10), lambda opt: ExponentialLR(opt, gamma=0.99), lambda opt: ReduceLROnPlateau(opt)],
    [lambda opt: ConstantLR(opt, factor=0.4, total_iters=4)],
    [lambda opt: PolynomialLR(opt, power=0.9, total_iters=4)],
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],
)
ADAM_SCHEDULERS = (  # torch's OptimizerInfo for Adam
    [lambda opt: ExponentialLR(opt, gamma=0.9)],
    [lambda opt: LinearLR(opt, start_factor=0.4, total_iters=4)],
    [lambda opt: ConstantLR(opt, factor=0.4, total_iters=4), lambda opt: ExponentialLR(opt, gamma=0.9)],
    [lambda opt: ExponentialLR(opt, gamma=0.9), lambda opt: ReduceLROnPlateau(opt)],
    [lambda opt: ConstantLR(opt, factor=0.4, total_iters=4)],
    [lambda opt: PolynomialLR(opt, power=0.9, total_iters=4)],
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],
)


@dataclass
class SpreadInfo:
    """An ``OptimizerInfo`` for one spread class at one spread setting."""

    base: type  # the torch class that is the contract
    spread_cls: Callable  # our class, called as spread_cls(params, **kwargs)
    spread: dict  # the spread keys this entry adds to every construction
    optim_inputs_func: Callable[[], list[OptimizerInput]]
    scheduler_inputs: tuple = DEFAULT_SCHEDULERS
    supported_impls: tuple = ()
    not_og_supported_flags: tuple = ("foreach", "differentiable", "maximize", "capturable")
    supports_fused_on: tuple = ()
    #: the parameter dtypes fused=True takes (torch's CPU kernels: every float; spread's: no float64)
    fused_dtypes: tuple = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    supports_sparse: bool = False  # sparse gradients
    supports_complex: bool = True
    step_requires_closure: bool = False
    supports_param_groups: bool = True  # param groups that differ in the base's own options
    has_capturable_arg: bool = False
    error_inputs: Callable[[], list] = field(default=lambda: [])

    @property
    def kappa(self) -> float:
        return self.spread.get("kappa", 0.0)

    @property
    def sparsity(self) -> str:
        return self.spread.get("sparsity", "dense") if self.kappa else "dense"

    @property
    def name(self) -> str:
        return f"{self.base.__name__}-{self.sparsity}"

    def optim_cls(self, params, **kwargs):
        return self.spread_cls(params, **{**self.spread, **kwargs})

    def impls(self, skip=()) -> list[str]:
        """The global-cliquey variants torch's tests run: all flags False ("forloop"), then each flag True
        (``_get_optim_inputs_including_global_cliquey_kwargs``); "default" where the optimizer has none."""
        flags = [f for f in self.supported_impls if f not in skip and (f != "fused" or "cpu" in self.supports_fused_on)]
        return ["forloop", *flags] if self.supported_impls else ["default"]

    def inputs(self, impl: str, dtype=None) -> list[OptimizerInput]:
        """This entry's inputs with the flags of one variant set (fresh tensors at every call)."""
        out = []
        for oi in self.optim_inputs_func(dtype):
            kwargs = dict(oi.kwargs)
            if impl != "default":
                for flag in self.supported_impls:
                    kwargs[flag] = flag == impl
            out.append(OptimizerInput(kwargs, f"{oi.desc} & {impl}"))
        return out

    def penalty(self, params) -> float:
        """``2*kappa*R(theta)`` at the current parameters (0 for a dense entry)."""
        if not self.kappa:
            return 0.0
        with torch.no_grad():
            if self.sparsity == "element":
                r = sum(float(p.abs().sum()) for p in params)
            else:
                r = sum(float(p.reshape(p.shape[0], -1).norm(dim=1).sum()) if p.dim() else float(p.abs()) for p in params)
        return 2 * self.kappa * r

    def objective(self, loss, params, maximize: bool = False) -> float:
        """What the optimizer moves: ``loss + 2*kappa*R`` (``loss - 2*kappa*R`` when maximising)."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        return value - self.penalty(params) if maximize else value + self.penalty(params)

    def scalar_shape(self) -> tuple:
        """torch's tests add a 0-dim parameter; 'row' sparsity needs a dim 0 (a 0-dim tensor has no rows and
        is refused by validation), so row entries get a one-element vector instead."""
        return (1,) if self.sparsity == "row" else ()


def _lbfgs(params, **kwargs):
    return SpreadOptimizer(params, torch.optim.LBFGS, **kwargs)


def _error_inputs_all(sample, sample2):
    """torch's ``get_error_inputs_for_all_optims`` (CPU): (desc, params, kwargs, error type, regex, known bug
    key: the test file maps it to its BUG_* reason)."""
    return [
        ("invalid param type", sample, {}, TypeError,
         "params argument given to the optimizer should be an iterable of Tensors or dicts", None),
        ("duplicate parameters in a group", [sample, sample], {}, UserWarning,
         ".*a parameter group with duplicate parameters.*", None),
        ("duplicate parameters across groups", [{"params": sample}, {"params": sample}], {}, ValueError,
         "some parameters appear in more than one parameter group", "dup_message"),
        ("tensor lr must be 1-element", None, {"lr": torch.tensor([0.001, 0.001])}, ValueError,
         "Tensor lr must be 1-element", None),
        ("params with and without names", [("weight", sample), sample2], {}, ValueError,
         "all optimizer params should be with/without names. Some param names are missing", None),
        ("groups with and without names", [{"params": [sample], "lr": 1e-2}, {"params": [("weight", sample2)]}], {},
         ValueError, "all optimizer param groups should be with/without names. cannot add param group with names to the optimizer", None),
    ]


def _error_inputs_sgd(dense: bool):
    out = [("momentum must be >= 0", None, {"lr": 1e-2, "momentum": -0.5}, ValueError, "Invalid momentum value: -0.5", None),
           ("fused and foreach", None, {"foreach": True, "fused": True}, RuntimeError, "`fused` and `foreach` cannot be `True` together", None)]
    if dense:  # (a sparse group declares differentiable unsupported: test_declared_unsupported_differentiable)
        out.append(("fused and differentiable", None, {"fused": True, "differentiable": True}, RuntimeError,
                    "`fused` does not support `differentiable`", "differentiable"))
    return out


def _error_inputs_adam(dense: bool):
    """torch's ``optim_error_inputs_func_adam`` (CPU, plus the fused pairs it checks on CUDA, which torch also
    raises on CPU)."""
    return [
        ("beta1 in [0, 1)", None, {"lr": 1e-2, "betas": (1.0, 0.0)}, ValueError, "Invalid beta parameter at index 0: 1.0", None),
        ("weight_decay >= 0", None, {"lr": 1e-2, "weight_decay": -1}, ValueError, "Invalid weight_decay value: -1", None),
        ("tensor lr with foreach", None, {"lr": torch.tensor(0.001), "foreach": True}, ValueError,
         "lr as a Tensor is not supported for capturable=False and foreach=True", None),
        ("betas float and tensor", None, {"lr": 1e-2, "betas": (0.9, torch.tensor(0.99))}, ValueError,
         "betas must be either both floats or both Tensors", None),
        ("betas tensor and float", None, {"lr": 1e-2, "betas": (torch.tensor(0.9), 0.99)}, ValueError,
         "betas must be either both floats or both Tensors", None),
        ("tensor betas with foreach", None, {"lr": 1e-2, "betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True},
         ValueError, r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True", None),
    ] + _error_inputs_sgd(dense)[1:]


def _entries() -> list[SpreadInfo]:
    out = []
    sparse_fused_on = ("cuda", "cpu") if SPREAD_KERNELS_ON_CPU else ("cuda",)
    bases = [
        (torch.optim.SGD, SpreadSGD, dict(optim_inputs_func=optim_inputs_func_sgd, scheduler_inputs=SGD_SCHEDULERS,
                                          not_og_supported_flags=("foreach", "differentiable", "fused", "maximize", "capturable")),
         lambda dense: _error_inputs_sgd(dense)),
        (torch.optim.Adam, SpreadAdam, dict(optim_inputs_func=optim_inputs_func_adam, scheduler_inputs=ADAM_SCHEDULERS, has_capturable_arg=True,
                                            not_og_supported_flags=("foreach", "differentiable", "fused", "maximize", "capturable", "decoupled_weight_decay")),
         _error_inputs_adam),
        (torch.optim.AdamW, SpreadAdamW, dict(optim_inputs_func=optim_inputs_func_adam, has_capturable_arg=True,
                                              not_og_supported_flags=("foreach", "differentiable", "fused", "maximize", "capturable", "decoupled_weight_decay")),
         _error_inputs_adam),
        (torch.optim.LBFGS, _lbfgs, dict(optim_inputs_func=optim_inputs_func_lbfgs, step_requires_closure=True,
                                         supports_param_groups=False), lambda dense: []),
    ]
    for base, cls, common, errors in bases:
        per_param = base is not torch.optim.LBFGS
        out.append(SpreadInfo(
            base, cls, {"kappa": 0.0}, **common, error_inputs=functools.partial(errors, True),
            supported_impls=("foreach", "differentiable", "fused") if per_param else (),
            supports_fused_on=("cpu", "cuda") if per_param else (),
            supports_sparse=base is torch.optim.SGD,
        ))
        for sparsity in ("element", "row"):
            out.append(SpreadInfo(
                base, cls, {"kappa": KAPPA, "sparsity": sparsity}, **common, error_inputs=functools.partial(errors, False),
                supported_impls=("foreach", "fused") if per_param else (),  # no differentiable: declared
                supports_fused_on=sparse_fused_on if per_param else (),
                fused_dtypes=(torch.float32, torch.bfloat16, torch.float16),
                supports_sparse=False, supports_complex=False,
            ))
    return out


ENTRIES = _entries()
BY_NAME = {info.name: info for info in ENTRIES}
DENSE = [i for i in ENTRIES if not i.kappa]
SPARSE = [i for i in ENTRIES if i.kappa]


# ----------------------------------------------------------------------------------------------------
# comparisons


def assert_tree_equal(a, b, path: str = "", exact: bool = True, **tol) -> None:
    """Nested dicts/lists/tuples of tensors and Python values: same structure, same values (tensors: same
    dtype, shape and bits when ``exact``, else ``torch.testing.assert_close`` with ``tol``)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if exact:
            assert torch.equal(a, b), f"{path}: {a} != {b}"
        else:
            torch.testing.assert_close(a, b, msg=lambda m: f"{path}: {m}", **tol)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, dict) else b}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}[{k!r}]", exact, **tol)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]", exact, **tol)
    elif isinstance(a, float) and not exact:
        assert b == pytest.approx(a, rel=tol.get("rtol", 1e-6), abs=tol.get("atol", 1e-6)), f"{path}: {a} vs {b}"
    else:
        assert type(a) is type(b) and (a == b or (a != a and b != b)), f"{path}: {a!r} vs {b!r}"


def without_param_names(state_dict):
    sd = copy.deepcopy(state_dict)
    for group in sd["param_groups"]:
        group.pop("param_names", None)
    return sd


def steps_to_numbers(state) -> None:
    """Every tensor ``step`` counter in (nested) optimizer state becomes a Python number, as in a state dict
    saved by an older torch. Spread keeps torch's per-tensor state of a sparse parameter's factors under
    ``state[p]["base"][factor]``: those counters are converted too."""
    for key, value in list(state.items()):
        if key == "step" and torch.is_tensor(value):
            state[key] = value.item()
        elif isinstance(value, dict):
            steps_to_numbers(value)


def linear_problem(contiguous: bool = True, dtype=torch.float32):
    """torch's test problem ``||W x + b||^2`` (W 10x5)."""
    if contiguous:
        weight = Parameter(torch.randn((10, 5), dtype=dtype))
        bias = Parameter(torch.randn(10, dtype=dtype))
    else:
        weight = Parameter(torch.randn((10, 5, 2), dtype=dtype)[..., 0])
        bias = Parameter(torch.randn((10, 2), dtype=dtype)[..., 0])
    return weight, bias, torch.randn(5, dtype=dtype)


def assert_goes_right_direction(info, step, value, maximize: bool, steps: int = 20, desc: str = "") -> None:
    """``steps`` calls of ``step()``; the objective ``value()`` must end below where it started (above, when
    maximising).

    Adaptation, sparse entries with ``maximize=True`` only: torch's convex problem has no maximum, and spread's
    ascent on the factors is superlinear (the step in theta scales with |theta|, theta = U*W), so within 20
    steps it can overflow; the library then raises FloatingPointError on the non-finite gradient, by design
    (torch writes inf/NaN into the parameters). Such a run passes if the objective rose at every step until
    then (its last finite values included)."""
    trajectory = [value()]
    try:
        for _ in range(steps):
            step()
            trajectory.append(value())
    except FloatingPointError as error:
        if not (maximize and info.kappa):
            raise
        assert "non-finite gradient" in str(error)
        finite = trajectory[:next((i for i, v in enumerate(trajectory) if not math.isfinite(v)), len(trajectory))]
        assert len(finite) > 1 and all(b > a for a, b in zip(finite, finite[1:])), (desc, trajectory)
        return
    initial, final = trajectory[0], trajectory[-1]
    assert (final > initial) if maximize else (final < initial), (desc, initial, final)


class TensorTracker:
    """torch's ``TensorTracker``: the reference run's tensors, popped in order, compared with the other run's
    and then copied into them (so that rounding differences do not accumulate over the iterations)."""

    def __init__(self, **tol):
        self.tol = tol
        self.tensors = []

    def add(self, tensor):
        self.tensors.append(tensor.detach().clone())

    def pop_check_set(self, tensor, what: str = ""):
        ref = self.tensors.pop(0)
        torch.testing.assert_close(tensor.detach(), ref, msg=lambda m: f"{what}: {m}", **self.tol)
        with torch.no_grad():
            tensor.copy_(ref)

    def all_popped(self) -> bool:
        return not self.tensors


def align_tree(reference, other, tracker: TensorTracker, path: str = "") -> None:
    """Every tensor of ``other`` (nested state) checked against ``reference`` and set to it; other values equal."""
    if isinstance(reference, torch.Tensor):
        assert isinstance(other, torch.Tensor), path
        tracker.add(reference)
        tracker.pop_check_set(other, path)
    elif isinstance(reference, dict):
        assert isinstance(other, dict) and set(reference) == set(other), f"{path}: {sorted(map(str, reference))} vs {other}"
        for k in reference:
            align_tree(reference[k], other[k], tracker, f"{path}[{k!r}]")
    elif isinstance(reference, (list, tuple)):
        assert type(reference) is type(other) and len(reference) == len(other), path
        for i, (a, b) in enumerate(zip(reference, other)):
            align_tree(a, b, tracker, f"{path}[{i}]")
    else:
        assert reference == other, f"{path}: {reference!r} vs {other!r}"


def step_once(info, optimizer, closure):
    """One step as torch's tests take it: ``step(closure)`` for LBFGS, else ``closure(); step()``."""
    if info.step_requires_closure:
        return optimizer.step(closure)
    loss = closure()
    optimizer.step()
    return loss


def rosenbrock(t):
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def drosenbrock(t):
    x, y = t
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))
