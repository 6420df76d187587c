"""Bad input, the way users produce it: a clear error that names the problem and moves nothing, or a right result.

The project's rule: bad input gets an error that names the problem (the param group, the key, the parameter) and
nothing moves (parameters, ``optimizer.state`` and ``param_groups`` compared before/after, tensors bit for bit);
no silent acceptance where torch would complain, no internal KeyError, no hang, no refusal of a valid value (numpy
scalars included); the model's weights are the truth, nothing a user wrote or trained is lost. Where
``torch.optim`` silently accepts something, silence is fine (and the result must then be torch's).

Every case is a function returning ``(outcome, detail)``; the outcome is one of :data:`OUTCOMES`:

* ``clear error``: raised, the message names the problem, nothing moved;
* ``handled``: works, and the result is right (checked against ``torch.optim`` on the same input where torch takes
  it, or against an obvious oracle: the same run with the plain float value, a fresh optimizer on the same weights);
* ``silently accepted``: no error where torch or the docs say the input is invalid;
* ``corrupted``: wrong numbers, NaN reaching the weights, state changed by a refused call, a user's write lost;
* ``obscure``: raised, but the error does not name the problem (KeyError, IndexError, AttributeError, a torch
  internal error, a misleading message);
* ``hang``: no answer within the time limit;
* ``false rejection``: a valid input refused.

Each test asserts that its case's outcome is ``clear error`` or ``handled``. Cases the current code gets wrong are
``xfail(strict=True)`` with the defect in one line: the file is green now and turns red when a defect is fixed.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import signal
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np
import pytest
import torch

from spread_optim import SpreadAdam, SpreadAdamW, SpreadOptimizer, SpreadSGD, sparsity_report

OUTCOMES = ("clear error", "handled", "silently accepted", "corrupted", "obscure", "hang", "false rejection")
GOOD = ("clear error", "handled")
TIMEOUT_S = 20
#: exception types that never name a problem by themselves
OBSCURE_TYPES = (KeyError, IndexError, AttributeError, UnboundLocalError, NameError, AssertionError, ZeroDivisionError)
NAN = float("nan")
INF = float("inf")


class Hang(BaseException):
    """Raised by the alarm: a case ran past :data:`TIMEOUT_S`."""


# ---------------------------------------------------------------------------------------------------------------
# snapshots: what must not move


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return copy.copy(value)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device or a.is_sparse != b.is_sparse:
        return False
    if a.device.type == "meta":
        return True
    if a.is_sparse:
        a, b = a.to_dense(), b.to_dense()
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def difference(a, b, path: str = "") -> str | None:
    """Where two snapshots differ (None when equal; tensors bit for bit, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or not _same_tensor(a, b):
            return path or "a tensor"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path} keys {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            d = difference(a[k], b[k], f"{path}[{k!r}]")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path} length {len(a)} -> {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if type(a) is not type(b):
        return f"{path} type {type(a).__name__} -> {type(b).__name__}"
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return None
    try:
        return None if a == b else f"{path} {a!r} -> {b!r}"
    except Exception:  # noqa: BLE001 (objects without ==)
        return None


def snapshot(opt=None, params=(), grads: bool = True) -> dict:
    """Parameters (values, dtype, shape; ``grads``: their gradients too), ``optimizer.state`` (keyed by position)
    and ``param_groups`` (parameters by position)."""
    tensors = list(params)
    if opt is not None:
        for g in opt.param_groups:
            tensors += [p for p in g["params"] if all(p is not q for q in tensors)]
    index = {id(p): i for i, p in enumerate(tensors)}
    snap = {"params": [_clone(p) for p in tensors]}
    if grads:  # a closure writes gradients: then they are the user's, not something the optimizer moved
        snap["grads"] = [None if p.grad is None else _clone(p.grad) for p in tensors]
    if opt is not None:
        snap["state"] = {index.get(id(k), repr(k)): _clone(v) for k, v in opt.state.items() if not (isinstance(v, dict) and not v)}
        snap["groups"] = [{k: ([index[id(p)] for p in v] if k == "params" else _clone(v)) for k, v in g.items()}
                          for g in opt.param_groups]
    return snap


def _all_finite(snap) -> bool:
    return all(not p.is_floating_point() or bool(torch.isfinite(p).all()) for p in snap["params"] if p.device.type != "meta" and not p.is_sparse)


# ---------------------------------------------------------------------------------------------------------------
# the three ways a case can be judged


def _message(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _names(msg: str, words, group) -> list:
    need = [w.lower() for w in words]
    missing = [w for w in need if w not in msg.lower()]
    if group is not None and not re.search(rf"param group {group}\b", msg):
        missing.append(f"param group {group}")
    return missing


def _judge_error(e, before, opt, params, words, group, exc, grads=True) -> tuple[str, str]:
    msg = _message(e)
    moved = difference(before, snapshot(opt, params, grads))
    if moved:
        return "corrupted", f"raised {msg[:200]}, but {moved} changed"
    if isinstance(e, OBSCURE_TYPES) and not isinstance(e, exc) or not isinstance(e, exc):
        return "obscure", msg[:300]
    missing = _names(str(e), words, group)
    if missing:
        return "obscure", f"{msg[:300]} (does not name {missing})"
    return "clear error", msg[:300]


def refuse(action: Callable, *, opt=None, params=(), words=(), group=None, exc=(TypeError, ValueError),
           then: Callable | None = None, grads: bool = True) -> tuple[str, str]:
    """``action`` must raise one of ``exc`` naming ``words`` (and ``param group <group>``), and move nothing.
    ``then``: run when nothing was raised, to see whether the accepted input did damage later (a step);
    ``grads=False``: the gradients may change (a closure's backward)."""
    before = snapshot(opt, params, grads)
    try:
        action()
    except Exception as e:  # noqa: BLE001
        return _judge_error(e, before, opt, params, words, group, exc, grads)
    if then is not None:
        try:
            then()
        except Exception as e:  # noqa: BLE001
            return "obscure", f"accepted, then the next call raised {_message(e)[:250]}"
    if not _all_finite(snapshot(opt, params, grads)) and _all_finite(before):
        return "corrupted", "no error, and NaN/inf reached the weights"
    return "silently accepted", "no error"


def accept(action: Callable, check: Callable | None = None) -> tuple[str, str]:
    """``action`` must work (any exception: a false rejection) and ``check(result)`` must pass (an assertion
    failing there: corrupted)."""
    try:
        result = action()
    except Exception as e:  # noqa: BLE001
        return "false rejection", _message(e)[:300]
    return _check(check, result)


def _check(check, result) -> tuple[str, str]:
    if check is None:
        return "handled", ""
    try:
        check(result)
    except AssertionError as e:
        return "corrupted", str(e)[:300] or "check failed"
    except Exception as e:  # noqa: BLE001
        return "false rejection", f"(while checking the result) {_message(e)[:280]}"
    return "handled", ""


def either(action: Callable, check: Callable | None = None, *, opt=None, params=(), words=(), group=None,
           exc=(TypeError, ValueError), grads: bool = True) -> tuple[str, str]:
    """A clear error (as :func:`refuse`) or a right result (as :func:`accept`): both are fine."""
    before = snapshot(opt, params, grads)
    try:
        result = action()
    except Exception as e:  # noqa: BLE001
        return _judge_error(e, before, opt, params, words, group, exc, grads)
    return _check(check, result)


# ---------------------------------------------------------------------------------------------------------------
# building blocks


def P(*shape, seed=0, dtype=torch.float32, scale=1.0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter((torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype), requires_grad=requires_grad)


def same_values(ps):
    return [torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in ps]


def set_grads(params, seed=1, scale=1.0):
    for i, p in enumerate(params):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)


def run(make, ps, steps=2, seed=1):
    opt = make(ps)
    for t in range(steps):
        set_grads(ps, seed + t)
        opt.step()
    return opt


def values(ps):
    return [p.detach().clone() for p in ps]


def assert_same(a, b, what="parameters"):
    d = difference(list(a), list(b))
    assert d is None, f"{what} differ from the oracle at {d}"


def ensure(condition, message="") -> None:
    assert condition, message


def assert_finite(ps):
    for i, p in enumerate(ps):
        assert bool(torch.isfinite(p.detach()).all()), f"parameter {i} is not finite"


def trajectory_equal(make, oracle, shapes, steps=2, dtype=torch.float32):
    """``make`` and ``oracle`` on equal parameters and gradients end at the same weights, bit for bit."""
    a = [P(*s, seed=i, dtype=dtype) for i, s in enumerate(shapes)]
    b = same_values(a)

    def action():
        run(make, a, steps)
        return a

    def check(_):
        run(oracle, b, steps)
        assert_same(values(a), values(b))
    return action, check


def three(bad: dict, shapes=((3,), (4,), (2, 3))):
    """Groups 0 (dense) and 1 (sparse) are fine; group 2 carries ``bad``."""
    a, b, c = (P(*s, seed=i) for i, s in enumerate(shapes))
    return [a, b, c], [{"params": [a]}, {"params": [b], "kappa": 0.1}, {"params": [c], "kappa": 0.1, **bad}]


def stepped(make=None, shapes=((3,), (4, 2)), kappas=(0.0, 0.1), steps=1, **extra):
    """An optimizer with one group per shape (``kappas``), stepped ``steps`` times."""
    ps = [P(*s, seed=i) for i, s in enumerate(shapes)]
    groups = [{"params": [p], "kappa": k, **extra} for p, k in zip(ps, kappas)]
    opt = (make or (lambda g: SpreadSGD(g, lr=0.1, momentum=0.9)))(groups)
    for t in range(steps):
        set_grads(ps, 1 + t)
        opt.step()
    set_grads(ps, 10)
    return opt, ps


@dataclass
class Case:
    family: str
    name: str
    fn: Callable[[], tuple[str, str]]
    defect: str | None = None  # the current code's defect (the test is xfail(strict=True))


CASES: list[Case] = []


def case(family: str, name: str, defect: str | None = None):
    def register(fn):
        CASES.append(Case(family, name, fn, defect))
        return fn
    return register


def add(family: str, name: str, fn, defect: str | None = None) -> None:
    CASES.append(Case(family, name, fn, defect))


def judge(c: Case, timeout: float = TIMEOUT_S) -> tuple[str, str]:
    """Run one case under an alarm; its outcome and a detail."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome, detail = c.fn()
    except Hang:
        outcome, detail = "hang", f"no answer within {timeout} s"
    except Exception as e:  # noqa: BLE001  (the valid setup around the bad input failed)
        outcome, detail = "false rejection", f"(setup) {_message(e)[:280]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert outcome in OUTCOMES, outcome
    return outcome, detail


def _on_alarm(signum, frame):
    raise Hang()


# ===============================================================================================================
# constructor


C = "constructor"

# ---- params


@case(C, "params: empty list")
def _():
    return refuse(lambda: SpreadSGD([], lr=0.1, kappa=0.1), words=["empty"])


@case(C, "params: a generator of parameters")
def _():
    m = torch.nn.Linear(4, 3)
    ref = same_values(list(m.parameters()))

    def action():
        opt = SpreadSGD((p for p in m.parameters()), lr=0.1, kappa=0.1)
        set_grads(list(m.parameters()))
        opt.step()
        return opt

    def check(opt):
        assert len(opt.param_groups[0]["params"]) == 2
        run(lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1), ref, steps=1)
        assert_same(values(m.parameters()), values(ref))
    return accept(action, check)


@case(C, "params: a single tensor instead of an iterable")
def _():
    p = P(3)
    return refuse(lambda: SpreadSGD(p, lr=0.1, kappa=0.1), params=[p], words=["iterable"])


@case(C, "params: the same tensor twice in one group")
def _():
    p = P(3, 2)
    ref = same_values([p])

    def action():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt = SpreadSGD([p, p], lr=0.1, kappa=0.1)
        assert any("duplicate" in str(x.message) for x in w), "no warning about the duplicate (torch warns)"
        set_grads([p])
        opt.step()
        return opt

    def check(_):  # stepped once, as the parameter listed once
        run(lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1), ref, steps=1)
        assert_same(values([p]), values(ref))
    return either(action, check, params=[p], words=["duplicate"])


@case(C, "params: the same tensor in two groups")
def _():
    a, b = P(3), P(4)
    return refuse(lambda: SpreadSGD([{"params": [a, b]}, {"params": [b], "kappa": 0.1}], lr=0.1), params=[a, b],
                  words=["param group 0"], group=1, exc=(ValueError,))


@case(C, "params: a non-leaf tensor")
def _():
    w = torch.ones(3, requires_grad=True)
    return refuse(lambda: SpreadSGD([w * 2], lr=0.1, kappa=0.1), words=["leaf"])


@case(C, "params: an integer tensor in a dense group")
def _():
    n, w = torch.zeros(3, dtype=torch.long), P(2)

    def action():
        opt = SpreadSGD([{"params": [n]}, {"params": [w], "kappa": 0.1}], lr=0.1)
        w.grad = torch.ones_like(w)
        opt.step()
        return opt

    def check(_):
        assert torch.equal(n, torch.zeros(3, dtype=torch.long))
    return accept(action, check)


for _dtype, _word in [(torch.int64, "int64"), (torch.int32, "int32"), (torch.bool, "bool"), (torch.complex64, "complex")]:
    def _make(dtype=_dtype, word=_word):
        t = torch.zeros(3, dtype=dtype) if not dtype.is_complex else torch.nn.Parameter(torch.randn(3, dtype=dtype))
        return refuse(lambda: SpreadSGD([{"params": [P(2)]}, {"params": [t], "kappa": 0.1}], lr=0.1), params=[t],
                      words=[word], group=1)
    add(C, f"params: a {_word} tensor in a sparse group", _make)


@case(C, "params: a complex parameter in a dense group (torch's SGD)")
def _():
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    action, check = trajectory_equal(lambda ps: SpreadSGD(ps, lr=0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), [(3,)], dtype=torch.complex64)
    return accept(action, check)


@case(C, "params: a sparse COO tensor in a sparse group")
def _():
    s = torch.randn(3, 3).to_sparse().requires_grad_()
    return refuse(lambda: SpreadSGD([{"params": [s], "kappa": 0.1}], lr=0.1), params=[s], words=["sparse"], group=0)


@case(C, "params: a group dict without 'params'")
def _():
    return refuse(lambda: SpreadSGD([{"kappa": 0.1}], lr=0.1), words=["'params'"], group=0)


@case(C, "params: (name, tensor) pairs from named_parameters()")
def _():
    m = torch.nn.Linear(3, 2)
    ref = same_values(list(m.parameters()))

    def action():
        opt = SpreadSGD(m.named_parameters(), lr=0.1, kappa=0.1)
        set_grads(list(m.parameters()))
        opt.step()
        return opt

    def check(opt):
        assert opt.param_groups[0]["param_names"] == ["weight", "bias"], opt.param_groups[0].get("param_names")
        assert [r.name for r in sparsity_report(opt)] == ["weight", "bias"]
        run(lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1), ref, steps=1)
        assert_same(values(m.parameters()), values(ref))
    return accept(action, check)


@case(C, "params: group dicts of (name, tensor) pairs")
def _():
    a, b = P(3), P(2, 2)

    def action():
        opt = SpreadSGD([{"params": [("a", a)], "kappa": 0.1}, {"params": [("b", b)], "sparsity": "row", "kappa": 0.1}], lr=0.1)
        set_grads([a, b])
        opt.step()
        return opt

    def check(opt):
        assert [g["param_names"] for g in opt.param_groups] == [["a"], ["b"]]
        assert "U" in opt.state[a] and "u" in opt.state[b]
    return accept(action, check)


@case(C, "params: names for some tensors only")
def _():
    a, b = P(3), P(2)
    return refuse(lambda: SpreadSGD([("a", a), b], lr=0.1, kappa=0.1), params=[a, b], words=["names"])


@case(C, "params: a set at top level (torch takes it)")
def _():
    a = P(3)
    return accept(lambda: SpreadSGD({a}, lr=0.1, kappa=0.1), lambda opt: ensure(opt.param_groups[0]["params"] == [a], "set not taken"))


@case(C, "params: a set inside a group dict")
def _():
    a = P(3)
    return refuse(lambda: SpreadSGD([{"params": {a}, "kappa": 0.1}], lr=0.1), params=[a], words=["set"])


@case(C, "params: a dict of name -> tensor")
def _():
    a = P(3)
    return refuse(lambda: SpreadSGD({"a": a}, lr=0.1, kappa=0.1), params=[a], words=["tensor"])


@case(C, "params: None")
def _():
    return refuse(lambda: SpreadSGD(None, lr=0.1, kappa=0.1), words=["none"])


@case(C, "params: a list holding None")
def _():
    return refuse(lambda: SpreadSGD([P(2), None], lr=0.1, kappa=0.1), words=["none"])


@case(C, "params: a nested list [[p]]")
def _():
    a = P(3)
    return refuse(lambda: SpreadSGD([[a]], lr=0.1, kappa=0.1), params=[a], words=["list"])


@case(C, "params: requires_grad=False (no grad, left alone)")
def _():
    a, b = P(3, requires_grad=False), P(3, seed=1)

    def action():
        opt = SpreadSGD([a, b], lr=0.1, kappa=0.1)
        b.grad = torch.ones(3)
        opt.step()
        return opt

    def check(_):
        assert torch.equal(a, P(3, requires_grad=False))
    return accept(action, check)


@case(C, "params: a meta-device parameter in a sparse group")
def _():
    m = torch.nn.Parameter(torch.empty(3, device="meta"))
    m.grad = torch.ones(3, device="meta")

    def action():
        opt = SpreadSGD([m], lr=0.1, kappa=0.1)
        opt.step()
        return opt
    return either(action, None, params=[m], words=["meta"])


# ---- kappa

BAD_KAPPA = [
    ("-1.0", -1.0, ValueError), ("-1e-12", -1e-12, ValueError), ("nan", NAN, ValueError), ("inf", INF, ValueError),
    ("'0.1' (a string)", "0.1", TypeError), ("None", None, TypeError), ("[0.1] (a list)", [0.1], TypeError),
    ("True (a bool)", True, TypeError), ("np.bool_(True)", np.bool_(True), TypeError),
    ("np.float64(nan)", np.float64(NAN), ValueError), ("np.float32(-1)", np.float32(-1), ValueError),
    ("tensor([0.1, 0.2])", torch.tensor([0.1, 0.2]), ValueError), ("tensor(nan)", torch.tensor(NAN), ValueError),
    ("tensor(True)", torch.tensor(True), ValueError), ("0.1j (complex)", 0.1j, TypeError),
    ("tensor(0.1j) (complex)", torch.tensor(0.1j), ValueError), ("np.array([0.1, 0.2])", np.array([0.1, 0.2]), TypeError),
]

for _label, _value, _exc in BAD_KAPPA:
    def _make(value=_value):
        ps, groups = three({"kappa": value})
        return refuse(lambda: SpreadSGD(groups, lr=0.1), params=ps, words=["kappa"], group=2, exc=(TypeError, ValueError))
    add(C, f"kappa={_label} in group 2", _make)


@case(C, "kappa=-1 as the optimizer's default")
def _():
    p = P(3)
    return refuse(lambda: SpreadSGD([p], lr=0.1, kappa=-1), params=[p], words=["kappa"], group=0)


GOOD_KAPPA = [
    ("0 (int)", 0), ("1 (int)", 1), ("np.float32(0.1)", np.float32(0.1)), ("np.float64(0.1)", np.float64(0.1)),
    ("np.int64(1)", np.int64(1)), ("tensor(0.1)", torch.tensor(0.1)), ("tensor([0.1])", torch.tensor([0.1])),
    ("tensor(0.1, float64)", torch.tensor(0.1, dtype=torch.float64)), ("Fraction(1, 10)", Fraction(1, 10)),
    ("tensor(0.1, requires_grad=True)", torch.tensor(0.1, requires_grad=True)),
]

for _label, _value in GOOD_KAPPA:
    def _make(value=_value):
        plain = float(value.item() if hasattr(value, "item") else value)
        action, check = trajectory_equal(lambda ps: SpreadSGD(ps, lr=0.1, kappa=value), lambda ps: SpreadSGD(ps, lr=0.1, kappa=plain), [(4, 3)])
        return accept(action, check)
    add(C, f"kappa={_label} (valid)", _make)


@case(C, "kappa=np.array(0.1) (a 0-d array; torch takes one as lr)")
def _():
    action, check = trajectory_equal(lambda ps: SpreadSGD(ps, lr=0.1, kappa=np.array(0.1)), lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1), [(4, 3)])
    return accept(action, check)


# ---- sparsity

def _ids(dtype=torch.long, shape=(2, 3), device="cpu"):
    return (torch.arange(math.prod(shape)) % 2).reshape(shape).to(dtype=dtype, device=device)


BAD_SPARSITY = [
    ("'rows' (typo)", "rows", ["rows"]), ("'ROW' (upper case)", "ROW", ["ROW"]), ("None", None, ["sparsity"]),
    ("0 (an int)", 0, ["sparsity"]), ("['row'] (a list)", ["row"], ["sparsity"]), ("'' (empty)", "", ["sparsity"]),
    ("float ids", _ids(torch.float32), ["sparsity", "float32"]), ("bool ids", _ids(torch.bool), ["sparsity", "bool"]),
    ("complex ids", _ids(torch.complex64), ["sparsity", "complex"]),
    ("ids of another shape", _ids(shape=(3, 2)), ["sparsity", "(3, 2)", "(2, 3)"]),
    ("ids of the same numel, flat", _ids(shape=(6,)), ["sparsity", "(6,)"]),
    ("negative ids", _ids() - 1, ["sparsity", ">= 0"]),
    ("ids on the meta device", _ids(device="meta"), ["sparsity", "meta"]),
]

for _label, _value, _words in BAD_SPARSITY:
    def _make(value=_value, words=_words):
        ps, groups = three({"sparsity": value})
        return refuse(lambda: SpreadSGD(groups, lr=0.1), params=ps, words=words, group=2)
    add(C, f"sparsity={_label} in group 2", _make)


@case(C, "sparsity: numpy int array of ids")
def _():
    ps, groups = three({"sparsity": np.array([[0, 1, 0], [1, 0, 1]])})

    def action():
        opt = SpreadSGD(groups, lr=0.1)
        set_grads(ps)
        opt.step()
        return opt

    def check(_):
        ref = same_values(ps)
        run(lambda q: SpreadSGD([{"params": [q[0]]}, {"params": [q[1]], "kappa": 0.1}, {"params": [q[2]], "kappa": 0.1, "sparsity": _ids()}], lr=0.1), ref, steps=1)
        assert_same(values(ps), values(ref))
    return either(action, check, params=ps, words=["sparsity"], group=2)


@case(C, "sparsity='row' on a scalar parameter")
def _():
    s = torch.nn.Parameter(torch.tensor(1.5))
    return refuse(lambda: SpreadSGD([{"params": [P(2, 2)]}, {"params": [s]}], lr=0.1, kappa=0.1, sparsity="row"), params=[s], words=["row"], group=1)


@case(C, "sparsity='column' on a vector parameter")
def _():
    v = P(5)
    return refuse(lambda: SpreadSGD([v], lr=0.1, kappa=0.1, sparsity="column"), params=[v], words=["column", "(5,)"], group=0)


@case(C, "sparsity: one ids tensor for two parameters of different shapes")
def _():
    a, b = P(2, 3), P(3, 2)
    return refuse(lambda: SpreadSGD([{"params": [a, b], "kappa": 0.1, "sparsity": _ids()}], lr=0.1), params=[a, b], words=["sparsity", "(3, 2)"], group=0)


GOOD_IDS = [("int32 ids", _ids(torch.int32)), ("int8 ids", _ids(torch.int8)), ("uint8 ids", _ids(torch.uint8)),
            ("ids with gaps (0, 7, 40)", (_ids() * 7 + (_ids() == 0).long() * 40))]

for _label, _value in GOOD_IDS:
    def _make(value=_value):
        compact = torch.unique(value.long(), return_inverse=True)[1].reshape(value.shape)
        action, check = trajectory_equal(lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1, sparsity=value),
                                         lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1, sparsity=compact), [(2, 3)])
        return accept(action, check)
    add(C, f"sparsity: {_label} (valid)", _make)


@case(C, "sparsity=np.str_('row') (valid)")
def _():
    action, check = trajectory_equal(lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1, sparsity=np.str_("row")),
                                     lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1, sparsity="row"), [(3, 2)])
    return accept(action, check)


@case(C, "sparsity='column' default reaching a dense group's bias (ignored)")
def _():
    w, b = P(3, 2), P(3, seed=1)

    def action():
        opt = SpreadSGD([{"params": [w], "kappa": 0.1}, {"params": [b], "kappa": 0.0}], lr=0.1, sparsity="column")
        set_grads([w, b])
        opt.step()
        return opt

    def check(_):
        ref = P(3, seed=1)
        set_grads([P(3, 2), ref])
        torch.optim.SGD([ref], lr=0.1).step()
        assert_same([b.detach()], [ref.detach()])
    return accept(action, check)


# ---- share_groups

@case(C, "share_groups=True with element sparsity")
def _():
    ps, groups = three({"share_groups": True})
    return refuse(lambda: SpreadSGD(groups, lr=0.1), params=ps, words=["share_groups"], group=2)


@case(C, "share_groups=True with group ids")
def _():
    ps, groups = three({"share_groups": True, "sparsity": _ids()})
    return refuse(lambda: SpreadSGD(groups, lr=0.1), params=ps, words=["share_groups"], group=2)


for _label, _value in [("'yes' (a string)", "yes"), ("None", None), ("[True] (a list)", [True]), ("tensor([True, False])", torch.tensor([True, False]))]:
    def _make(value=_value):
        ps, groups = three({"share_groups": value, "sparsity": "column"})
        return refuse(lambda: SpreadSGD(groups, lr=0.1), params=ps, words=["share_groups"], group=2)
    add(C, f"share_groups={_label}", _make)


@case(C, "share_groups=1 (an int, as torch takes for its flags)")
def _():
    a, b = P(3, 2), P(4, 2, seed=1)
    action, check = trajectory_equal(lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1, sparsity="column", share_groups=1),
                                     lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1, sparsity="column", share_groups=True), [(3, 2), (4, 2)])
    return either(action, check, words=["share_groups"], group=0)


@case(C, "share_groups=True, column counts differ")
def _():
    a, b = P(3, 2), P(3, 4)
    return refuse(lambda: SpreadSGD([a, b], lr=0.1, kappa=0.1, sparsity="column", share_groups=True), params=[a, b], words=["share_groups", "[2, 4]"], group=0)


@case(C, "share_groups=True, row counts differ")
def _():
    a, b = P(3, 2), P(4, 2)
    return refuse(lambda: SpreadSGD([a, b], lr=0.1, kappa=0.1, sparsity="row", share_groups=True), params=[a, b], words=["share_groups", "[3, 4]"], group=0)


@case(C, "share_groups='column' on a vector in the set")
def _():
    a, b = P(3, 2), P(2)
    return refuse(lambda: SpreadSGD([a, b], lr=0.1, kappa=0.1, sparsity="column", share_groups=True), params=[a, b], words=["column"], group=0)


for _label, _value in [("np.bool_(True)", np.bool_(True)), ("tensor(True)", torch.tensor(True))]:
    def _make(value=_value):
        action, check = trajectory_equal(lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1, sparsity="column", share_groups=value),
                                         lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1, sparsity="column", share_groups=True), [(3, 2), (4, 2)])
        return accept(action, check)
    add(C, f"share_groups={_label} (valid)", _make)


@case(C, "share_groups=True in a dense group (ignored)")
def _():
    action, check = trajectory_equal(lambda ps: SpreadSGD(ps, lr=0.1, share_groups=True), lambda ps: torch.optim.SGD(ps, lr=0.1), [(3,), (2, 2)])
    return accept(action, check)


# ---- init, zero_threshold

for _label, _value in [("'random'", "random"), ("None", None), ("'Balanced'", "Balanced"), ("1", 1), ("['balanced']", ["balanced"])]:
    def _make(value=_value):
        ps, groups = three({"init": value})
        return refuse(lambda: SpreadSGD(groups, lr=0.1), params=ps, words=["init"], group=2)
    add(C, f"init={_label}", _make)


@case(C, "init=np.str_('unbalanced') (valid)")
def _():
    action, check = trajectory_equal(lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1, init=np.str_("unbalanced")),
                                     lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1, init="unbalanced"), [(3, 2)])
    return accept(action, check)


BAD_THRESHOLD = [("-1e-6", -1e-6), ("nan", NAN), ("-inf", -INF), ("'1e-6' (a string)", "1e-6"), ("None", None),
                 ("True (a bool)", True), ("[1e-6] (a list)", [1e-6]), ("tensor([1e-6, 1e-6])", torch.tensor([1e-6, 1e-6])),
                 ("np.float64(-1)", np.float64(-1))]

for _label, _value in BAD_THRESHOLD:
    def _make(value=_value):
        ps, groups = three({"zero_threshold": value})
        return refuse(lambda: SpreadSGD(groups, lr=0.1), params=ps, words=["zero_threshold"], group=2)
    add(C, f"zero_threshold={_label} in group 2", _make)


for _label, _value in [("0 (int)", 0), ("inf", INF), ("np.float32(1e-4)", np.float32(1e-4)), ("tensor(1e-4)", torch.tensor(1e-4)), ("np.int64(0)", np.int64(0))]:
    def _make(value=_value):
        plain = float(value.item() if hasattr(value, "item") else value)
        action, check = trajectory_equal(lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1, zero_threshold=value),
                                         lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1, zero_threshold=plain), [(4, 3)], steps=3)
        return accept(action, check)
    add(C, f"zero_threshold={_label} (valid)", _make)


# ---- base

@case(C, "base: an optimizer instance")
def _():
    p = P(3)
    return refuse(lambda: SpreadOptimizer([p], torch.optim.SGD([p], lr=0.1), lr=0.1, kappa=0.1), params=[p], words=["base", "instance"])


for _label, _value, _words in [("'sgdd' (typo)", "sgdd", ["sgdd"]), ("'rmsprop' (not a name it knows)", "rmsprop", ["rmsprop"]),
                               ("42", 42, ["base"]), ("None", None, ["base"]), ("torch.nn.Linear (not an optimizer)", torch.nn.Linear, ["base"]),
                               ("SpreadOptimizer itself", SpreadOptimizer, ["base", "SpreadOptimizer"]), ("SpreadAdam", SpreadAdam, ["base"]),
                               ("a lambda", lambda ps, **kw: torch.optim.SGD(ps, **kw), ["base"])]:
    def _make(value=_value, words=_words):
        p = P(3)
        return refuse(lambda: SpreadOptimizer([p], value, lr=0.1, kappa=0.1), params=[p], words=words)
    add(C, f"base={_label}", _make)


@case(C, "base='SGD' (upper case, valid)")
def _():
    action, check = trajectory_equal(lambda ps: SpreadOptimizer(ps, "SGD", lr=0.1, kappa=0.1), lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1), [(3, 2)])
    return accept(action, check)


@case(C, "base: a user's own Optimizer subclass")
def _():
    class PlainSGD(torch.optim.Optimizer):
        def __init__(self, params, lr=0.1):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-g["lr"])

    action, check = trajectory_equal(lambda ps: SpreadOptimizer(ps, PlainSGD, lr=0.1, kappa=0.1), lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1, foreach=False, fused=False), [(3, 2)])
    return accept(action, check)


BAD_BASE_KW = [
    ("SGD lr=-1", lambda ps: SpreadSGD(ps, lr=-1, kappa=0.1), ["learning rate"]),
    ("Adam lr=nan", lambda ps: SpreadAdam(ps, lr=NAN, kappa=0.1), ["learning rate"]),
    ("Adam betas=(1.5, 0.999)", lambda ps: SpreadAdam(ps, betas=(1.5, 0.999), kappa=0.1), ["beta"]),
    ("Adam betas=(0.9, -0.1)", lambda ps: SpreadAdam(ps, betas=(0.9, -0.1), kappa=0.1), ["beta"]),
    ("Adam eps=-1", lambda ps: SpreadAdam(ps, eps=-1, kappa=0.1), ["epsilon"]),
    ("SGD weight_decay=-1", lambda ps: SpreadSGD(ps, lr=0.1, weight_decay=-1, kappa=0.1), ["weight_decay"]),
    ("SGD momentum=-0.1", lambda ps: SpreadSGD(ps, lr=0.1, momentum=-0.1, kappa=0.1), ["momentum"]),
    ("SGD nesterov without momentum", lambda ps: SpreadSGD(ps, lr=0.1, nesterov=True, kappa=0.1), ["nesterov"]),
    ("SGD nesterov with dampening", lambda ps: SpreadSGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True, kappa=0.1), ["nesterov"]),
    ("an unknown keyword", lambda ps: SpreadOptimizer(ps, "sgd", lr=0.1, kappa=0.1, not_an_option=1), ["not_an_option"]),
    ("a near miss of a spread keyword (kapa=)", lambda ps: SpreadOptimizer(ps, "sgd", lr=0.1, kapa=0.1), ["kapa"]),
    ("differentiable=True in a sparse group", lambda ps: SpreadSGD(ps, lr=0.1, differentiable=True, kappa=0.1), ["differentiable"]),
]

for _label, _make_opt, _words in BAD_BASE_KW:
    def _make(make=_make_opt, words=_words):
        p = P(3)
        return refuse(lambda: make([p]), params=[p], words=words)
    add(C, f"base kwargs: {_label}", _make)


for _label, _lr in [("lr='0.1' (a string)", "0.1"), ("lr=None", None)]:
    def _make(lr=_lr):
        p = P(3)
        return refuse(lambda: SpreadSGD([p], lr=lr, kappa=0.1), params=[p], words=["lr"])
    add(C, f"base kwargs: SGD {_label}", _make)


@case(C, "base kwargs: lr=np.float32(0.01) (valid)")
def _():
    action, check = trajectory_equal(lambda ps: SpreadAdam(ps, lr=np.float32(0.01)), lambda ps: torch.optim.Adam(ps, lr=np.float32(0.01)), [(3, 2)])
    return accept(action, check)


@case(C, "base kwargs: Adam lr=tensor(0.01), foreach=False (valid in torch)")
def _():
    action, check = trajectory_equal(lambda ps: SpreadAdam([{"params": ps[:1]}, {"params": ps[1:], "kappa": 0.01}], lr=torch.tensor(0.01), foreach=False),
                                     lambda ps: SpreadAdam([{"params": ps[:1]}, {"params": ps[1:], "kappa": 0.01}], lr=0.01, foreach=False), [(3,), (3, 2)])
    return accept(action, check)


@case(C, "base kwargs: Adam betas as tensors (valid in torch)")
def _():
    betas = (torch.tensor(0.9), torch.tensor(0.999))
    action, check = trajectory_equal(lambda ps: SpreadAdam([{"params": ps[:1]}, {"params": ps[1:], "kappa": 0.01}], lr=0.01, betas=betas),
                                     lambda ps: SpreadAdam([{"params": ps[:1]}, {"params": ps[1:], "kappa": 0.01}], lr=0.01), [(3,), (3, 2)])
    return accept(action, check)


@case(C, "base kwargs: SGD nesterov=1 (an int flag, torch takes it)")
def _():
    action, check = trajectory_equal(lambda ps: SpreadSGD(ps, lr=0.1, momentum=0.9, nesterov=1), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=1), [(3,)], steps=3)
    return accept(action, check)


@case(C, "base kwargs: maximize=True in a sparse group")
def _():
    a = P(4, 3)
    b = same_values([a])

    def action():
        opt = SpreadSGD([a], lr=0.1, kappa=0.05, maximize=True)
        set_grads([a])
        a.grad.neg_()
        opt.step()
        return opt

    def check(_):
        opt = SpreadSGD(b, lr=0.1, kappa=0.05)
        set_grads(b)
        opt.step()
        assert_same(values([a]), values(b))
    return accept(action, check)


@case(C, "base kwargs: SpreadAdamW weight_decay=0.1 on a dense group (torch's AdamW)")
def _():
    action, check = trajectory_equal(lambda ps: SpreadAdamW([{"params": ps[:1]}, {"params": ps[1:], "kappa": 0.01}], lr=0.01, weight_decay=0.1),
                                     lambda ps: _Pair(torch.optim.AdamW(ps[:1], lr=0.01, weight_decay=0.1), SpreadAdamW(ps[1:], lr=0.01, weight_decay=0.1, kappa=0.01)),
                                     [(3,), (3, 2)], steps=3)
    return accept(action, check)


class _Pair:
    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def step(self):
        for o in self.optimizers:
            o.step()


@case(C, "LBFGS: lr differs per group")
def _():
    a, b = P(3, dtype=torch.float64), P(3, seed=1, dtype=torch.float64)
    return refuse(lambda: SpreadOptimizer([{"params": [a]}, {"params": [b], "lr": 0.5}], torch.optim.LBFGS, lr=1.0, kappa=0.1), params=[a, b], words=["lr"], group=1)


@case(C, "LBFGS: history_size differs per group")
def _():
    a, b = P(3, dtype=torch.float64), P(3, seed=1, dtype=torch.float64)
    return refuse(lambda: SpreadOptimizer([{"params": [a]}, {"params": [b], "history_size": 3}], torch.optim.LBFGS, kappa=0.1), params=[a, b], words=["history_size"], group=1)


@case(C, "LBFGS: line_search_fn differs per group")
def _():
    a, b = P(3, dtype=torch.float64), P(3, seed=1, dtype=torch.float64)
    return refuse(lambda: SpreadOptimizer([{"params": [a]}, {"params": [b], "line_search_fn": "strong_wolfe"}], torch.optim.LBFGS, kappa=0.1), params=[a, b], words=["line_search_fn"], group=1)


@case(C, "LBFGS: kappa differs per group (valid)")
def _():
    a, b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def action():
        opt = SpreadOptimizer([{"params": [a], "kappa": 0.1}, {"params": [b], "kappa": 0.0}], torch.optim.LBFGS, lr=1.0, max_iter=50,
                              tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = ((a - 1) ** 2).sum() + ((b + 1) ** 2).sum()
            loss.backward()
            return loss
        for _ in range(3):
            opt.step(closure)

    def check(_):
        assert torch.allclose(a.detach(), torch.full((3,), 0.9, dtype=torch.float64), atol=1e-6), a
        assert torch.allclose(b.detach(), torch.full((3,), -1.0, dtype=torch.float64), atol=1e-6), b
    return accept(action, check)


# ===============================================================================================================
# runtime


R = "runtime"


@case(R, "step without any gradient")
def _():
    a, b = P(3), P(4, 2, seed=1)
    before = values([a, b])

    def action():
        opt = SpreadAdam([{"params": [a]}, {"params": [b], "kappa": 0.1}], lr=0.1)
        opt.step()
        opt.step()
        return opt

    return accept(action, lambda _: assert_same(values([a, b]), before))


@case(R, "step with a gradient for some parameters of a sparse group")
def _():
    a, b = P(3, 2), P(4, seed=1)
    ref = same_values([a])
    before_b = b.detach().clone()

    def action():
        opt = SpreadSGD([a, b], lr=0.1, kappa=0.1)
        set_grads([a])
        opt.step()

    def check(_):
        assert torch.equal(b, before_b), "the parameter without a gradient moved"
        run(lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1), ref, 1)
        assert_same(values([a]), values(ref))
    return accept(action, check)


@case(R, "grad of another shape assigned (torch refuses)")
def _():
    a = P(3, 2)

    def action():
        a.grad = torch.ones(2, 3)
    return refuse(action, params=[a], words=["size"], exc=(RuntimeError,))


@case(R, "grad of another dtype assigned (torch refuses)")
def _():
    a = P(3, 2)

    def action():
        a.grad = torch.ones(3, 2, dtype=torch.float64)
    return refuse(action, params=[a], words=["type"], exc=(RuntimeError,))


@case(R, "grad on another device assigned (torch refuses)")
def _():
    a = P(3, 2)

    def action():
        a.grad = torch.ones(3, 2, device="meta")
    return refuse(action, params=[a], words=["device"], exc=(RuntimeError,))


def _swapped_grad(kind):
    """A gradient whose tensor was swapped under autograd's check (``p.grad.data = ...``)."""
    def fn():
        a, b = P(3, 2), P(3, seed=1)
        opt = SpreadSGD([{"params": [b]}, {"params": [a], "kappa": 0.1}], lr=0.1, momentum=0.9)
        set_grads([b, a])
        opt.step()
        set_grads([b, a], 2)
        ref_grad = a.grad.clone()
        if kind == "shape":
            a.grad.data = torch.ones(2, 3)
        elif kind == "float64":
            a.grad.data = a.grad.data.double()
        else:
            a.grad.data = a.grad.data.to(torch.complex64)
        twin_ps = same_values([b, a])
        twin = SpreadSGD([{"params": [twin_ps[0]]}, {"params": [twin_ps[1]], "kappa": 0.1}], lr=0.1, momentum=0.9)
        twin.load_state_dict(copy.deepcopy(opt.state_dict()))
        twin_ps[0].grad, twin_ps[1].grad = b.grad.clone(), ref_grad

        def check(_):  # a float64 gradient is the float32 one, rounded: as that step
            twin.step()
            assert_same(values([b, a]), values(twin_ps))
        return either(opt.step, check, opt=opt, words=[{"shape": "shape", "float64": "float64", "complex": "complex"}[kind]], group=1)
    return fn


add(R, "grad tensor swapped to another shape (p.grad.data = ...)", _swapped_grad("shape"))
add(R, "grad tensor swapped to float64 on a float32 parameter", _swapped_grad("float64"))
add(R, "grad tensor swapped to complex on a real parameter", _swapped_grad("complex"))


def _nonfinite_case(value, sparsity="element", which=1, share=False, lbfgs=False):
    def fn():
        a, b, c = P(3), P(4, 2, seed=1), P(4, 2, seed=2)
        groups = [{"params": [a]}, {"params": [b, c] if share else [b], "kappa": 0.1, "sparsity": sparsity, "share_groups": share}]
        if not share:
            groups.append({"params": [c], "kappa": 0.1})
        opt = SpreadSGD(groups, lr=0.1, momentum=0.9)
        set_grads([a, b, c])
        opt.step()
        set_grads([a, b, c], 2)
        target = [a, b, c][which]
        target.grad.view(-1)[1] = value
        group = 1 if (share and which in (1, 2)) else which
        return refuse(opt.step, opt=opt, words=["non-finite"], group=group, exc=(FloatingPointError,))
    return fn


for _label, _args in [("nan, element group", (NAN,)), ("inf, element group", (INF,)), ("-inf, element group", (-INF,)),
                      ("nan, row group", (NAN, "row")), ("nan, column group", (NAN, "column")),
                      ("nan, group ids", (NAN, _ids(shape=(4, 2)))), ("nan, second member of a shared column set", (NAN, "column", 2, True)),
                      ("nan in the last sparse group (earlier groups must not move)", (NAN, "element", 2))]:
    add(R, f"non-finite grad: {_label}", _nonfinite_case(*_args))


@case(R, "non-finite grad in a dense group (torch writes it, as torch)")
def _():
    a, b = P(3), P(3)
    ref = same_values([a])

    def action():
        opt = SpreadSGD([{"params": [a]}, {"params": [b], "kappa": 0.1}], lr=0.1)
        a.grad = torch.tensor([NAN, 1.0, 1.0])
        b.grad = torch.ones(3)
        opt.step()

    def check(_):
        ref[0].grad = torch.tensor([NAN, 1.0, 1.0])
        torch.optim.SGD(ref, lr=0.1).step()
        assert_same(values([a]), values(ref))
    return accept(action, check)


@case(R, "non-finite grad with LBFGS (restores)")
def _():
    a = P(4, dtype=torch.float64)
    opt = SpreadOptimizer([a], torch.optim.LBFGS, lr=1, max_iter=5, kappa=0.01)
    calls = [-100]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = ((a - 1) ** 2).sum()
        loss.backward()
        if calls[0] == 3:
            a.grad[0] = NAN
        return loss
    opt.step(closure)
    calls[0] = 0
    return refuse(lambda: opt.step(closure), opt=opt, words=["non-finite"], group=0, exc=(FloatingPointError,), grads=False)


@case(R, "sparse gradient in a sparse group (after a dense-gradient step)")
def _():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SpreadSGD([{"params": [P(3)]}, {"params": emb.parameters(), "kappa": 0.1}], lr=0.1)
    emb.weight.grad = torch.ones(10, 4)
    opt.step()
    emb.weight.grad = None
    emb(torch.tensor([1, 2])).sum().backward()
    return refuse(opt.step, opt=opt, words=["sparse"], group=1)


@case(R, "sparse gradient in a sparse group at the first step")
def _():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SpreadSGD([{"params": [P(3)]}, {"params": emb.parameters(), "kappa": 0.1}], lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    return refuse(opt.step, opt=opt, words=["sparse"], group=1)


@case(R, "NaN gradient at the first step: nothing in optimizer.state")
def _():
    a, b = P(3), P(4, 2, seed=1)
    opt = SpreadAdam([{"params": [a]}, {"params": [b], "kappa": 0.1}], lr=0.1)
    set_grads([a, b])
    b.grad[0, 0] = NAN
    return refuse(opt.step, opt=opt, words=["non-finite"], group=1, exc=(FloatingPointError,))


@case(R, "after a refused first step, the group can still be made dense")
def _():
    a = P(4, 2)
    ref = same_values([a])
    opt = SpreadSGD([a], lr=0.1, kappa=0.1)
    a.grad = torch.full((4, 2), NAN)
    try:
        opt.step()
    except FloatingPointError:
        pass

    def action():
        opt.param_groups[0]["kappa"] = 0.0
        set_grads([a])
        opt.step()

    def check(_):
        set_grads(ref)
        torch.optim.SGD(ref, lr=0.1).step()
        assert_same(values([a]), values(ref))
    return accept(action, check)


@case(R, "sparse gradient in a dense group (torch's SGD takes it)")
def _():
    emb, emb2 = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Embedding(10, 4, sparse=True)
    emb2.weight.data.copy_(emb.weight.data)

    def action():
        opt = SpreadSGD(emb.parameters(), lr=0.1)
        emb(torch.tensor([1, 2, 2])).sum().backward()
        opt.step()

    def check(_):
        emb2(torch.tensor([1, 2, 2])).sum().backward()
        torch.optim.SGD(emb2.parameters(), lr=0.1).step()
        assert_same([emb.weight.detach()], [emb2.weight.detach()])
    return accept(action, check)


# ---- keys changed between steps

BETWEEN = [
    ("kappa", -1.0, ["kappa"]), ("kappa", NAN, ["kappa"]), ("kappa", "0.1", ["kappa"]), ("kappa", None, ["kappa"]),
    ("kappa", True, ["kappa"]), ("kappa", torch.tensor([0.1, 0.2]), ["kappa"]),
    ("sparsity", "rows", ["sparsity"]), ("sparsity", None, ["sparsity"]), ("sparsity", torch.zeros(4, 2), ["sparsity"]),
    ("sparsity", torch.zeros(2, 4, dtype=torch.long), ["sparsity", "(2, 4)"]), ("sparsity", "column-on-vector", ["sparsity", "column"]),
    ("share_groups", "yes", ["share_groups"]), ("share_groups", True, ["share_groups"]),
    ("init", "random", ["init"]), ("zero_threshold", -1.0, ["zero_threshold"]), ("zero_threshold", "small", ["zero_threshold"]),
]

BETWEEN_DEFECTS: dict = {}  # (key, value) -> a defect of the current code, none at present

for _key, _value, _words in BETWEEN:
    def _make(key=_key, value=_value, words=_words):
        opt, ps = stepped(shapes=((3,), (4, 2), (5,)), kappas=(0.1, 0.1, 0.1))
        if value == "column-on-vector":
            opt.param_groups[2]["sparsity"] = "column"
            return refuse(opt.step, opt=opt, words=words, group=2)
        opt.param_groups[1][key] = value
        return refuse(opt.step, opt=opt, words=words, group=1)
    _shown = f"a {tuple(_value.shape)} {_value.dtype} tensor" if isinstance(_value, torch.Tensor) else repr(_value)
    add(R, f"between steps: {_key}={_shown}", _make,
        defect=BETWEEN_DEFECTS.get((_key, _value)) if not isinstance(_value, torch.Tensor) else None)


for _label, _value in [("'0.1' (a string)", "0.1"), ("None", None)]:
    def _make(value=_value):
        opt, ps = stepped(shapes=((3,), (4, 2), (5,)), kappas=(0.1, 0.0, 0.1))
        opt.param_groups[2]["lr"] = value
        return refuse(opt.step, opt=opt, words=["lr"], group=2, exc=(TypeError, ValueError))
    add(R, f"between steps: lr={_label} in the last group", _make)


for _label, _value in [("-1 (torch steps uphill)", -1.0), ("nan (torch writes NaN)", NAN)]:
    def _make(value=_value):
        a = P(3, 2)
        ref = same_values([a])

        def action():
            opt = SpreadSGD([a], lr=0.1, momentum=0.9)
            set_grads([a])
            opt.step()
            opt.param_groups[0]["lr"] = value
            set_grads([a], 2)
            opt.step()

        def check(_):
            opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
            set_grads(ref)
            opt.step()
            opt.param_groups[0]["lr"] = value
            set_grads(ref, 2)
            opt.step()
            assert_same(values([a]), values(ref))
        return accept(action, check)
    add(R, f"between steps: lr={_label} in a dense group", _make)


@case(R, "kappa 0 -> positive after stepping")
def _():
    opt, ps = stepped(kappas=(0.1, 0.0))
    opt.param_groups[1]["kappa"] = 0.1
    return refuse(opt.step, opt=opt, words=["kappa"], group=1)


@case(R, "kappa positive -> 0 after stepping")
def _():
    opt, ps = stepped(kappas=(0.0, 0.1))
    opt.param_groups[1]["kappa"] = 0.0
    return refuse(opt.step, opt=opt, words=["kappa"], group=1)


@case(R, "kappa 0 -> positive before the first step (valid)")
def _():
    a = P(4, 3)
    action, check = trajectory_equal(lambda ps: _set(SpreadSGD(ps, lr=0.1), kappa=0.1), lambda ps: SpreadSGD(ps, lr=0.1, kappa=0.1), [(4, 3)])
    return accept(action, check)


def _set(opt, **kw):
    opt.param_groups[0].update(kw)
    return opt


@case(R, "kappa changed to another positive value between steps (valid)")
def _():
    opt, ps = stepped(kappas=(0.1, 0.1))
    twin_ps = same_values(ps)
    twin = SpreadSGD([{"params": [twin_ps[0]], "kappa": 0.1}, {"params": [twin_ps[1]], "kappa": 0.1}], lr=0.1, momentum=0.9)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][1]["kappa"] = 0.3
    twin.load_state_dict(sd)
    for p, q in zip(ps, twin_ps):
        q.grad = p.grad.clone()

    def action():
        opt.param_groups[1]["kappa"] = 0.3
        opt.step()

    def check(_):
        twin.step()
        assert_same(values(ps), values(twin_ps))
    return accept(action, check)


for _old, _new in [("element", "row"), ("row", "element"), ("row", "ids")]:
    def _make(old=_old, new=_new):
        spec = lambda s: _ids(shape=(4, 2)) if s == "ids" else s  # noqa: E731
        a = P(4, 2)
        opt = SpreadSGD([a], lr=0.1, kappa=0.1, sparsity=spec(old), momentum=0.9)
        set_grads([a])
        opt.step()
        set_grads([a], 2)
        ref = same_values([a])
        ref[0].grad = a.grad.clone()

        def action():
            opt.param_groups[0]["sparsity"] = spec(new)
            opt.step()

        def check(_):  # new factors from the current weights: a fresh optimizer on them
            SpreadSGD(ref, lr=0.1, kappa=0.1, sparsity=spec(new), momentum=0.9).step()
            assert_same(values([a]), values(ref))
        return accept(action, check)
    add(R, f"between steps: sparsity {_old} -> {_new} (valid, refactored from the weights)", _make)


@case(R, "between steps: share_groups False -> True on a column group (valid)")
def _():
    a, b = P(3, 2), P(4, 2, seed=1)
    opt = SpreadSGD([a, b], lr=0.1, kappa=0.1, sparsity="column")
    set_grads([a, b])
    opt.step()
    set_grads([a, b], 2)
    ref = same_values([a, b])
    for p, q in zip([a, b], ref):
        q.grad = p.grad.clone()

    def action():
        opt.param_groups[0]["share_groups"] = True
        opt.step()

    def check(_):
        SpreadSGD(ref, lr=0.1, kappa=0.1, sparsity="column", share_groups=True).step()
        assert_same(values([a, b]), values(ref))
    return accept(action, check)


# ---- closures

def _closure_problem(cls=SpreadSGD, **kw):
    a = P(4, 3)
    opt = cls([a], lr=0.1, kappa=0.05, **kw)
    return a, opt


@case(R, "closure returning None (SGD)")
def _():
    a, opt = _closure_problem()
    ref = same_values([a])

    def closure():
        opt.zero_grad()
        (a ** 2).sum().backward()

    def check(result):
        assert result is None
        r_opt = SpreadSGD(ref, lr=0.1, kappa=0.05)
        (ref[0] ** 2).sum().backward()
        r_opt.step()
        assert_same(values([a]), values(ref))
    return accept(lambda: opt.step(closure), check)


@case(R, "closure returning a float (SGD)")
def _():
    a, opt = _closure_problem()

    def closure():
        opt.zero_grad()
        loss = (a ** 2).sum()
        loss.backward()
        return float(loss)
    expected = float((a.detach() ** 2).sum())
    return accept(lambda: opt.step(closure), lambda r: ensure(r == expected, f"{r} != {expected}"))


@case(R, "closure returning a tensor (SGD): the same tensor back")
def _():
    a, opt = _closure_problem(SpreadAdam)
    box = []

    def closure():
        opt.zero_grad()
        loss = (a ** 2).sum()
        loss.backward()
        box.append(loss)
        return loss

    def check(r):
        assert r is box[0], "step did not return the closure's loss"
    return accept(lambda: opt.step(closure), check)


@case(R, "closure raising (SGD): the user's error, nothing moved")
def _():
    a, opt = _closure_problem(momentum=0.9)
    set_grads([a])
    opt.step()

    def closure():
        raise ValueError("user's closure failed")
    return refuse(lambda: opt.step(closure), opt=opt, words=["user's closure failed"])


@case(R, "closure returning a NaN loss (SGD: returned, as torch)")
def _():
    a, opt = _closure_problem()

    def closure():
        opt.zero_grad()
        (a ** 2).sum().backward()
        return torch.tensor(NAN)
    return accept(lambda: opt.step(closure), lambda r: ensure(math.isnan(float(r)), "loss not returned"))


def _lbfgs(shape=(4,), **kw):
    a = P(*shape, dtype=torch.float64)
    opt = SpreadOptimizer([a], torch.optim.LBFGS, lr=1, max_iter=5, kappa=0.01, **kw)
    return a, opt


def _lbfgs_closure(a, opt):
    def closure():
        opt.zero_grad()
        loss = ((a - 1) ** 2).sum()
        loss.backward()
        return loss
    return closure


@case(R, "LBFGS closure returning None")
def _():
    a, opt = _lbfgs()
    opt.step(_lbfgs_closure(a, opt))

    def closure():
        opt.zero_grad()
        ((a - 1) ** 2).sum().backward()
    return refuse(lambda: opt.step(closure), opt=opt, words=["none", "closure"], grads=False)


@case(R, "LBFGS closure returning None at the first step")
def _():
    a, opt = _lbfgs()

    def closure():
        opt.zero_grad()
        ((a - 1) ** 2).sum().backward()
    return refuse(lambda: opt.step(closure), opt=opt, words=["none", "closure"], grads=False)


@case(R, "LBFGS closure raising at the first evaluation")
def _():
    a, opt = _lbfgs()
    opt.step(_lbfgs_closure(a, opt))

    def closure():
        raise RuntimeError("data loader failed")
    return refuse(lambda: opt.step(closure), opt=opt, words=["data loader failed"], exc=(RuntimeError,))


@case(R, "LBFGS closure raising at a later evaluation (the line search's trial)")
def _():
    a, opt = _lbfgs()
    opt.step(_lbfgs_closure(a, opt))
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("data loader failed")
        opt.zero_grad()
        loss = ((a - 1) ** 2).sum()
        loss.backward()
        return loss
    return refuse(lambda: opt.step(closure), opt=opt, words=["data loader failed"], exc=(RuntimeError,), grads=False)


@case(R, "LBFGS closure returning NaN at a later evaluation")
def _():
    a, opt = _lbfgs()
    opt.step(_lbfgs_closure(a, opt))
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = ((a - 1) ** 2).sum()
        loss.backward()
        return loss * NAN if calls[0] == 3 else loss
    return refuse(lambda: opt.step(closure), opt=opt, words=["non-finite"], exc=(FloatingPointError,), grads=False)


@case(R, "LBFGS closure returning a float (valid)")
def _():
    a, opt = _lbfgs()
    b, opt_b = _lbfgs()

    def make(x, o, as_float):
        def closure():
            o.zero_grad()
            loss = ((x - 1) ** 2).sum()
            loss.backward()
            return float(loss) if as_float else loss
        return closure

    def action():
        for _ in range(2):
            opt.step(make(a, opt, True))

    def check(_):
        for _ in range(2):
            opt_b.step(make(b, opt_b, False))
        assert_same(values([a]), values([b]))
    return accept(action, check)


@case(R, "step() without a closure on LBFGS")
def _():
    a, opt = _lbfgs()
    opt.step(_lbfgs_closure(a, opt))
    a.grad = torch.ones_like(a)
    return refuse(opt.step, opt=opt, words=["closure"], exc=(TypeError, ValueError, RuntimeError))


# ---- weights written by the user

@case(R, "p.data replaced with another shape (element group)")
def _():
    a = P(4, 3)
    opt = SpreadSGD([a], lr=0.1, kappa=0.1, momentum=0.9)
    set_grads([a])
    opt.step()
    new = torch.randn(5, 2, generator=torch.Generator().manual_seed(5))
    ref = [torch.nn.Parameter(new.clone())]
    a.data = new.clone()
    a.grad = None
    set_grads([a], 2)

    def action():
        opt.step()

    def check(_):  # the written weights are the truth: a fresh optimizer on them
        set_grads(ref, 2)
        SpreadSGD(ref, lr=0.1, kappa=0.1, momentum=0.9).step()
        assert_same(values([a]), values(ref))
    return either(action, check, opt=opt, words=["shape"], group=0, exc=(TypeError, ValueError, RuntimeError))


@case(R, "p.data replaced with another shape (row group)")
def _():
    a = P(4, 3)
    opt = SpreadSGD([a], lr=0.1, kappa=0.1, sparsity="row")
    set_grads([a])
    opt.step()
    new = torch.randn(5, 3, generator=torch.Generator().manual_seed(5))
    ref = [torch.nn.Parameter(new.clone())]
    a.data = new.clone()
    a.grad = None
    set_grads([a], 2)

    def action():
        opt.step()

    def check(_):
        set_grads(ref, 2)
        SpreadSGD(ref, lr=0.1, kappa=0.1, sparsity="row").step()
        assert_same(values([a]), values(ref))
    return either(action, check, opt=opt, words=["shape"], group=0, exc=(TypeError, ValueError, RuntimeError))


@case(R, "p.data replaced with new values of the same shape (adopted)")
def _():
    a = P(4, 3)
    opt = SpreadSGD([a], lr=0.1, kappa=0.1)
    set_grads([a])
    opt.step()
    new = torch.randn(4, 3, generator=torch.Generator().manual_seed(5)) + 3.0  # every entry changed
    ref = [torch.nn.Parameter(new.clone())]

    def action():
        a.data = new.clone()
        set_grads([a], 2)
        opt.step()

    def check(_):
        set_grads(ref, 2)
        SpreadSGD(ref, lr=0.1, kappa=0.1).step()
        assert_same(values([a]), values(ref))
    return accept(action, check)


@case(R, "p.data replaced with float64 (model.double() after a step)")
def _():
    m = torch.nn.Linear(3, 2)
    opt = SpreadSGD(m.parameters(), lr=0.1, kappa=0.01)
    set_grads(list(m.parameters()))
    opt.step()
    ref = [torch.nn.Parameter(p.detach().double().clone()) for p in m.parameters()]
    m.double()
    set_grads(list(m.parameters()), 2)

    def action():
        opt.step()

    def check(_):
        set_grads(ref, 2)
        SpreadSGD(ref, lr=0.1, kappa=0.01).step()
        for p, q in zip(m.parameters(), ref):
            assert p.dtype == torch.float64
            assert torch.allclose(p.detach(), q.detach(), rtol=1e-6, atol=1e-7), (p, q)
    return either(action, check, opt=opt, words=["dtype"], group=0, exc=(TypeError, ValueError, RuntimeError))


@case(R, "model.half() after a step (fp16 weights, float32 factors)")
def _():
    m = torch.nn.Linear(3, 2)
    opt = SpreadSGD(m.parameters(), lr=0.1, kappa=0.01)
    set_grads(list(m.parameters()))
    opt.step()
    m.half()
    set_grads(list(m.parameters()), 2)

    def action():
        opt.step()

    def check(_):
        for p in m.parameters():
            assert p.dtype == torch.float16
            st = opt.state[p]
            assert st["U"].dtype == torch.float32, st["U"].dtype
            assert torch.equal(p.detach(), (st["U"] * st["W"]).half()), "theta != U*W"
    return either(action, check, opt=opt, words=["dtype"], group=0, exc=(TypeError, ValueError, RuntimeError))


def _written_nonfinite(value, sparsity):
    def fn():
        a = P(4, 3)
        twin = same_values([a])
        opt = SpreadSGD([a], lr=0.1, kappa=0.05, sparsity=sparsity)
        topt = SpreadSGD(twin, lr=0.1, kappa=0.05, sparsity=sparsity)
        for o, ps in ((opt, [a]), (topt, twin)):
            set_grads(ps)
            o.step()

        def action():
            with torch.no_grad():
                a[0, 1] = value
                twin[0][0, 1] = 0.5
            for o, ps in ((opt, [a]), (topt, twin)):
                set_grads(ps, 2)
                o.step()

        def check(_):
            # the write is kept (as torch keeps it), and it does not leak into the other entries (element) / rows (row)
            assert not math.isfinite(float(a[0, 1])), f"the written {value} was replaced by {float(a[0, 1])}"
            rows = slice(1, None)
            if sparsity == "element":
                mask = torch.ones(4, 3, dtype=torch.bool)
                mask[0, 1] = False
                assert_same([a.detach()[mask]], [twin[0].detach()[mask]], "the other entries")
            else:
                assert_same([a.detach()[rows]], [twin[0].detach()[rows]], "the other rows")
        return either(action, check, opt=opt, words=["finite"], group=0, exc=(TypeError, ValueError, FloatingPointError))
    return fn


for _v, _s in [(NAN, "element"), (INF, "element"), (NAN, "row"), (-INF, "row")]:
    add(R, f"weight set to {_v} by the user ({_s} group)", _written_nonfinite(_v, _s))


@case(R, "all weights of a column group set to NaN (shared set, other parameter)")
def _():
    a, b = P(3, 2), P(4, 2, seed=1)
    opt = SpreadSGD([a, b], lr=0.1, kappa=0.05, sparsity="column", share_groups=True)
    set_grads([a, b])
    opt.step()
    before_b_col1 = None

    def action():
        with torch.no_grad():
            a[:, 0] = NAN
        set_grads([a, b], 2)
        opt.step()

    def check(_):
        assert bool(torch.isfinite(b.detach()[:, 1]).all()) and bool(torch.isfinite(a.detach()[:, 1]).all()), "NaN leaked into another column"
    return either(action, check, opt=opt, words=["finite"], group=0, exc=(TypeError, ValueError, FloatingPointError))


# ---- zero_grad, add_param_group

@case(R, "zero_grad(set_to_none=True) then step: nothing moves")
def _():
    opt, ps = stepped(make=lambda g: SpreadAdam(g, lr=0.1))
    before = values(ps)

    def action():
        opt.zero_grad(set_to_none=True)
        opt.step()
    return accept(action, lambda _: assert_same(values(ps), before))


@case(R, "zero_grad(set_to_none=False) then step: as zero gradients")
def _():
    opt, ps = stepped(make=lambda g: SpreadAdam(g, lr=0.1))
    twin_ps = same_values(ps)
    twin = SpreadAdam([{"params": [twin_ps[0]], "kappa": 0.0}, {"params": [twin_ps[1]], "kappa": 0.1}], lr=0.1)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))

    def action():
        opt.zero_grad(set_to_none=False)
        opt.step()

    def check(_):
        for q in twin_ps:
            q.grad = torch.zeros_like(q)
        twin.step()
        assert_same(values(ps), values(twin_ps))
    return accept(action, check)


@case(R, "add_param_group: a tensor already in another group")
def _():
    opt, ps = stepped()
    return refuse(lambda: opt.add_param_group({"params": [P(2), ps[1]]}), opt=opt, words=["param group 1"], group=2)


for _label, _bad, _words in [("kappa=-1", {"kappa": -1.0}, ["kappa"]), ("sparsity='rows'", {"kappa": 0.1, "sparsity": "rows"}, ["sparsity"]),
                             ("share_groups with element", {"kappa": 0.1, "share_groups": True}, ["share_groups"]),
                             ("zero_threshold=nan", {"kappa": 0.1, "zero_threshold": NAN}, ["zero_threshold"])]:
    def _make(bad=_bad, words=_words):
        opt, ps = stepped()
        new = P(2, 2, seed=7)

        def action():
            opt.add_param_group({"params": [new], **bad})
        out = refuse(action, opt=opt, params=[new], words=words, group=2)
        if out[0] == "clear error":  # the refused group is not left behind: the same tensor can be added again
            try:
                opt.add_param_group({"params": [new], "kappa": 0.1})
            except Exception as e:  # noqa: BLE001
                return "corrupted", f"after the refusal the tensor cannot be added again: {_message(e)}"
        return out
    add(R, f"add_param_group: {_label}", _make)


@case(R, "add_param_group: a dict without 'params'")
def _():
    opt, ps = stepped()
    return refuse(lambda: opt.add_param_group({"kappa": 0.1}), opt=opt, words=["'params'"], group=2)


@case(R, "add_param_group: not a dict")
def _():
    opt, ps = stepped()
    return refuse(lambda: opt.add_param_group([P(2)]), opt=opt, words=["dict"])


@case(R, "add_param_group: LBFGS with another lr")
def _():
    a, opt = _lbfgs()
    return refuse(lambda: opt.add_param_group({"params": [P(2, dtype=torch.float64)], "lr": 0.5}), opt=opt, words=["lr"], group=1)


@case(R, "add_param_group after steps: a new sparse group from a generator (valid)")
def _():
    opt, ps = stepped()
    new = P(3, 2, seed=7)
    ref = same_values([new])
    before = snapshot(opt)

    def action():
        opt.add_param_group({"params": (p for p in [new]), "kappa": 0.1, "momentum": 0.9})
        for p in ps:
            p.grad = None
        set_grads([new], 3)
        opt.step()

    def check(_):
        assert difference(before["params"], snapshot(opt)["params"][:2]) is None, "old groups moved without gradients"
        set_grads(ref, 3)
        SpreadSGD(ref, lr=0.1, kappa=0.1, momentum=0.9).step()
        assert_same(values([new]), values(ref))
    return accept(action, check)


@case(R, "add_param_group: an empty params list")
def _():
    opt, ps = stepped()

    def action():
        opt.add_param_group({"params": [], "kappa": 0.1})
        opt.step()
    return either(action, None, opt=opt, words=["empty"], group=2)


@case(R, "a parameter appended to a sparse group's list after a step (valid)")
def _():
    a, b = P(3, 2), P(4, 2, seed=1)
    opt = SpreadSGD([a], lr=0.1, kappa=0.1)
    set_grads([a])
    opt.step()
    ref = same_values([b])

    def action():
        opt.param_groups[0]["params"].append(b)
        a.grad = None
        set_grads([b], 2)
        opt.step()

    def check(_):
        set_grads(ref, 2)
        SpreadSGD(ref, lr=0.1, kappa=0.1).step()
        assert_same(values([b]), values(ref))
    return accept(action, check)


@case(R, "a parameter appended to a shared set's list after a step")
def _():
    a, b, c = P(3, 2), P(4, 2, seed=1), P(5, 2, seed=2)
    opt = SpreadSGD([a, b], lr=0.1, kappa=0.1, sparsity="column", share_groups=True)
    set_grads([a, b])
    opt.step()
    opt.param_groups[0]["params"].append(c)
    set_grads([a, b, c], 2)
    return refuse(opt.step, opt=opt, words=["shared"], group=0)


@case(R, "the same tensor appended twice to a sparse group's list after a step")
def _():
    a = P(3, 2)
    opt = SpreadSGD([a], lr=0.1, kappa=0.1)
    set_grads([a])
    opt.step()
    twin = same_values([a])
    topt = SpreadSGD(twin, lr=0.1, kappa=0.1)
    topt.load_state_dict(copy.deepcopy(opt.state_dict()))

    opt.param_groups[0]["params"].append(a)  # the user's own edit: a refused step keeps it, and moves nothing else
    set_grads([a], 2)

    def action():
        opt.step()

    def check(_):
        set_grads(twin, 2)
        topt.step()
        assert_same(values([a]), values(twin))
    return either(action, check, opt=opt, words=["duplicate"], group=0)


@case(R, "a raw dict appended to param_groups (no add_param_group)")
def _():
    a, b = P(3, 2), P(4, seed=1)
    opt = SpreadSGD([a], lr=0.1, kappa=0.1)
    set_grads([a])
    opt.step()
    opt.param_groups.append({"params": [b], "kappa": 0.1})
    set_grads([a, b], 2)
    return refuse(opt.step, opt=opt, words=["sparsity"], group=1)


@case(R, "add_param_group: a typo in a spread key warns")
def _():
    opt, ps = stepped()

    def action():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.add_param_group({"params": [P(2)], "kapa": 0.1})
        return w

    def check(w):
        assert any("kapa" in str(x.message) and "kappa" in str(x.message) for x in w), "no warning about 'kapa'"
    return accept(action, check)


# ---- dtypes and empty parameters

for _dtype in (torch.bfloat16, torch.float16, torch.float64):
    for _sp in ("element", "row"):
        def _make(dtype=_dtype, sparsity=_sp):
            a = P(4, 3, dtype=dtype)

            def action():
                return run(lambda ps: SpreadAdam(ps, lr=0.05, kappa=0.02, sparsity=sparsity), [a], steps=3)

            def check(opt):
                st = opt.state[a]
                factor = torch.float64 if dtype == torch.float64 else torch.float32
                assert st["W"].dtype == factor, st["W"].dtype
                theta = st["U"] * st["W"] if sparsity == "element" else st["u"][:, None] * st["W"]
                assert torch.equal(a.detach(), theta.to(dtype)), "theta != U*W"
                assert_finite([a])
            return accept(action, check)
        add(R, f"{str(_dtype).replace('torch.', '')} parameters, {_sp} group", _make)


for _shape, _sp in [((0,), "element"), ((0, 3), "row"), ((3, 0), "column"), ((0, 3), "column"), ((0,), "dense")]:
    def _make(shape=_shape, sparsity=_sp):
        a, b = P(*shape), P(3, 2, seed=1)
        ref = same_values([b])
        set_grads([b, a])
        ref[0].grad = b.grad.clone()

        def action():
            group = {"params": [a]} if sparsity == "dense" else {"params": [a], "kappa": 0.1, "sparsity": sparsity}
            opt = SpreadAdam([group, {"params": [b], "kappa": 0.1}], lr=0.1)
            opt.step()
            return opt

        def check(opt):
            assert a.shape == shape
            assert opt.kkt_residual() >= 0
            assert opt.penalty() >= 0
            rows = sparsity_report(opt)
            assert rows[0].numel == 0 and rows[0].zero_fraction == 0.0
            str(rows)
            SpreadAdam(ref, lr=0.1, kappa=0.1).step()
            assert_same([b.detach()], values(ref))
        return accept(action, check)
    add(R, f"empty parameter {_shape} ({_sp})", _make)


# ---- diagnostics

def _kkt_oracle(theta, g, kappa):
    zero = theta == 0
    off = (g.abs() - 2 * kappa).clamp(min=0)
    on = (g + 2 * kappa * theta.sign()).abs()
    return float(torch.where(zero, off, on).max())


@case(R, "kkt_residual() before any step, after backward (element)")
def _():
    a = P(4, 3)
    with torch.no_grad():
        a[0] = 0
    opt = SpreadSGD([a], lr=0.1, kappa=0.1)
    set_grads([a])
    expected = _kkt_oracle(a.detach(), a.grad, 0.1)
    return accept(opt.kkt_residual, lambda r: ensure(abs(r - expected) < 1e-6, f"{r} != {expected}"))


@case(R, "kkt_residual() before any step, after backward (row)")
def _():
    a = P(4, 3)
    with torch.no_grad():
        a[0] = 0
    opt = SpreadSGD([a], lr=0.1, kappa=0.1, sparsity="row")
    set_grads([a])
    g, t = a.grad.double(), a.detach().double()
    norms = t.norm(dim=1, keepdim=True)
    expected = max(max(0.0, float(g[0].norm()) - 0.2), float((g[1:] + 0.2 * t[1:] / norms[1:]).norm(dim=1).max()))
    return accept(opt.kkt_residual, lambda r: ensure(abs(r - expected) < 1e-5, f"{r} != {expected}"))


@case(R, "kkt_residual() before backward")
def _():
    opt = SpreadSGD([P(3)], lr=0.1, kappa=0.1)
    return refuse(opt.kkt_residual, opt=opt, words=["backward"], exc=(RuntimeError,))


@case(R, "kkt_residual() with a NaN gradient is NaN")
def _():
    a = P(3)
    opt = SpreadSGD([a], lr=0.1, kappa=0.1)
    a.grad = torch.tensor([NAN, 0.0, 0.0])
    return accept(opt.kkt_residual, lambda r: ensure(math.isnan(r), f"{r} is not NaN"))


@case(R, "kkt_residual() with only dense groups is 0")
def _():
    a = P(3)
    opt = SpreadSGD([a], lr=0.1)
    a.grad = torch.ones(3)
    return accept(opt.kkt_residual, lambda r: ensure(r == 0.0, r))


DIAG_DEFECTS = {  # (method, kappa) -> a defect of the current code, None when there is none
    ("kkt_residual", -1.0): None,
    ("kkt_residual", "0.1"): None,
    ("penalty", -1.0): None,
    ("penalty", "0.1"): None,
}

for (_method, _kappa), _defect in DIAG_DEFECTS.items():
    def _make(method=_method, kappa=_kappa):
        opt, ps = stepped(kappas=(0.1, 0.1))
        opt.param_groups[1]["kappa"] = kappa
        return refuse(getattr(opt, method), opt=opt, words=["kappa"], group=1)
    add(R, f"{_method}() after kappa was set to {_kappa!r}", _make, defect=_defect)


@case(R, "penalty() before any step is 0.0")
def _():
    opt = SpreadSGD([P(3)], lr=0.1, kappa=0.1)
    return accept(opt.penalty, lambda r: ensure(r == 0.0, r))


@case(R, "penalty() after a step: kappa*(|U|^2 + |W|^2)")
def _():
    opt, ps = stepped(kappas=(0.0, 0.1))

    def check(r):
        st = opt.state[ps[1]]
        expected = 0.1 * float(st["U"].double().pow(2).sum() + st["W"].double().pow(2).sum())
        assert abs(r - expected) <= 1e-6 * abs(expected), (r, expected)
    return accept(opt.penalty, check)


@case(R, "sparsity_report(optimizer) before any step")
def _():
    a, b = P(4, 3), P(3, seed=1)
    with torch.no_grad():
        a[1] = 0
        a[2, 0] = 0
    opt = SpreadSGD([{"params": [a], "kappa": 0.1, "sparsity": "row"}, {"params": [b]}], lr=0.1)

    def check(rep):
        assert rep[0].zeros == 4 and rep[0].zero_groups == 1 and rep[0].num_groups == 4, rep[0]
        assert rep[1].kappa == 0.0 and rep[1].zeros == 0
        str(rep)
    return accept(lambda: sparsity_report(opt), check)


@case(R, "sparsity_report(model, optimizer) with NaN gradients")
def _():
    m = torch.nn.Linear(3, 2)
    opt = SpreadSGD(m.parameters(), lr=0.1, kappa=0.1)
    for p in m.parameters():
        p.grad = torch.full_like(p, NAN)
    return accept(lambda: sparsity_report(m, opt), lambda rep: ensure([r.name for r in rep] == ["weight", "bias"], rep))


@case(R, "sparsity_report(optimizer, optimizer)")
def _():
    opt = SpreadSGD([P(3)], lr=0.1, kappa=0.1)
    return refuse(lambda: sparsity_report(opt, opt), opt=opt, words=["sparsity_report"])


@case(R, "sparsity_report(a list of tensors)")
def _():
    return refuse(lambda: sparsity_report([P(3)]), words=["module", "optimizer"])


@case(R, "step twice on the same gradients (as torch)")
def _():
    action, check = trajectory_equal(lambda ps: _twice(SpreadSGD(ps, lr=0.1, momentum=0.9)), lambda ps: _twice(torch.optim.SGD(ps, lr=0.1, momentum=0.9)), [(3,)])
    return accept(action, check)


class _twice:
    def __init__(self, opt):
        self.opt = opt

    def step(self):
        self.opt.step()
        self.opt.step()


# ===============================================================================================================
# checkpoint


K = "checkpoint"


def _ck_model(seed=0, width=4):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 2))


def _ck_groups(m, sparsity="element", share=False):
    return [{"params": [m[0].weight], "kappa": 0.01, "sparsity": sparsity, "share_groups": share},
            {"params": [m[2].weight], "kappa": 0.02},
            {"params": [m[0].bias, m[2].bias]}]


def _ck_train(m, opt, steps=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()


def _ck_trained(sparsity="element", cls=SpreadAdam, steps=2, width=4, **kw):
    m = _ck_model(width=width)
    opt = cls(_ck_groups(m, sparsity), lr=0.05, **kw)
    _ck_train(m, opt, steps)
    return m, opt


def _ck_twin(m, sparsity="element", cls=SpreadAdam, **kw):
    """A fresh optimizer on a copy of ``m``'s weights, stepped once (so it has state of its own to lose)."""
    twin = copy.deepcopy(m)
    opt = cls(_ck_groups(twin, sparsity), lr=0.05, **kw)
    _ck_train(twin, opt, 1, seed=3)
    return twin, opt


def _bad_load(edit, words, group=None, exc=(TypeError, ValueError), sparsity="element", defect=None, cls=SpreadAdam, **kw):
    def fn():
        m, opt = _ck_trained(sparsity, cls=cls, **kw)
        sd = copy.deepcopy(opt.state_dict())
        sd = edit(sd, opt) or sd
        twin, topt = _ck_twin(m, sparsity, cls=cls, **kw)

        def then():
            _ck_train(twin, topt, 1, seed=4)
        return refuse(lambda: topt.load_state_dict(sd), opt=topt, words=words, group=group, exc=exc, then=then)
    return fn


def _entry(sd, opt, group, position=0):
    pid = sd["param_groups"][group]["params"][position]
    return sd["state"][pid]


def _edit(fn):
    def edit(sd, opt):
        fn(sd, opt)
    return edit


for _label, _fn, _words, _group in [
    ("one param group fewer", lambda sd, o: sd.update(param_groups=sd["param_groups"][:2]), ["param groups", "2", "3"], None),
    ("one parameter fewer in a group", lambda sd, o: sd["param_groups"][2].update(params=sd["param_groups"][2]["params"][:1]), ["parameters"], 2),
    ("NaN in a factor U", lambda sd, o: _entry(sd, o, 0)["U"].view(-1).__setitem__(0, NAN), ["'U'", "nan"], 0),
    ("inf in a factor W", lambda sd, o: _entry(sd, o, 1)["W"].view(-1).__setitem__(0, INF), ["'W'", "inf"], 1),
    ("NaN in the base's exp_avg of a factor", lambda sd, o: _entry(sd, o, 0)["base"]["W"]["exp_avg"].view(-1).__setitem__(0, NAN), ["exp_avg"], 0),
    ("inf in a dense parameter's exp_avg_sq", lambda sd, o: _entry(sd, o, 2)["exp_avg_sq"].view(-1).__setitem__(0, INF), ["exp_avg_sq"], 2),
    ("missing U", lambda sd, o: _entry(sd, o, 0).pop("U"), ["U"], 0),
    ("missing W", lambda sd, o: _entry(sd, o, 1).pop("W"), ["W"], 1),
    ("missing base", lambda sd, o: _entry(sd, o, 0).pop("base"), ["base"], 0),
    ("integer factors", lambda sd, o: _entry(sd, o, 0).update(U=_entry(sd, o, 0)["U"].long()), ["'U'", "int64"], 0),
    ("a factor as a list", lambda sd, o: _entry(sd, o, 0).update(U=_entry(sd, o, 0)["U"].tolist()), ["'U'", "list"], 0),
    ("the base state as a list", lambda sd, o: _entry(sd, o, 0).update(base=[1, 2]), ["base"], 0),
    ("a factor's base state as a tensor", lambda sd, o: _entry(sd, o, 0)["base"].update(U=torch.zeros(3)), ["'U'"], 0),
    ("a state entry that is a tensor", lambda sd, o: sd["state"].update({sd["param_groups"][2]["params"][0]: torch.zeros(4)}), ["dict"], 2),
    ("kappa=-1 in a saved group", lambda sd, o: sd["param_groups"][1].update(kappa=-1.0), ["kappa"], 1),
    ("kappa='0.02' in a saved group", lambda sd, o: sd["param_groups"][1].update(kappa="0.02"), ["kappa"], 1),
    ("kappa=0 in a saved group that holds factors", lambda sd, o: sd["param_groups"][1].update(kappa=0.0), ["dense"], 1),
    ("sparsity='rows' in a saved group", lambda sd, o: sd["param_groups"][0].update(sparsity="rows"), ["sparsity"], 0),
    ("exp_avg of another shape for a factor", lambda sd, o: _entry(sd, o, 0)["base"]["U"].update(exp_avg=torch.zeros(2)), ["exp_avg", "shape"], 0),
    ("exp_avg of another shape for a dense parameter", lambda sd, o: _entry(sd, o, 2).update(exp_avg=torch.zeros(7)), ["exp_avg", "shape"], 2),
]:
    add(K, f"load_state_dict: {_label}", _bad_load(_edit(_fn), _words, _group))


add(K, "load_state_dict: step='3' (a string)", _bad_load(_edit(lambda sd, o: _entry(sd, o, 2).update(step="3")), ["step"], 2))
add(K, "load_state_dict: step=nan (a float)", _bad_load(_edit(lambda sd, o: _entry(sd, o, 0)["base"]["U"].update(step=NAN)), ["step"], 0))


@case(K, "load_state_dict: a checkpoint of another model's shapes")
def _():
    _, other = _ck_trained(width=5)
    m, opt = _ck_trained()
    return refuse(lambda: opt.load_state_dict(other.state_dict()), opt=opt, words=["shape", "(5, 3)"], group=0)


for _saved, _now, _words in [("element", "row", ["sparsity"]), ("row", "element", ["sparsity"]), ("column", "row", ["shape"])]:
    def _make(saved=_saved, now=_now, words=_words):
        m, opt = _ck_trained(saved)
        sd = copy.deepcopy(opt.state_dict())
        sd["param_groups"][0]["sparsity"] = now  # the group says 'now', the factors are of 'saved'
        twin, topt = _ck_twin(m, now)
        return refuse(lambda: topt.load_state_dict(sd), opt=topt, words=words, group=0)
    add(K, f"load_state_dict: {_saved} factors under a group that says {_now}", _make)


@case(K, "load_state_dict: a shared-set checkpoint into a per-parameter optimizer")
def _():
    a, b = P(3, 2), P(4, 2, seed=1)
    opt = SpreadSGD([{"params": [a, b], "kappa": 0.1, "sparsity": "column", "share_groups": True}], lr=0.1)
    set_grads([a, b])
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["share_groups"] = False
    c, d = same_values([a, b])
    topt = SpreadSGD([{"params": [c, d], "kappa": 0.1, "sparsity": "column"}], lr=0.1)
    return refuse(lambda: topt.load_state_dict(sd), opt=topt, words=["'u'"], group=0)


for _label, _value, _words in [("None", None, ["dict"]), ("a string", "optimizer.pt", ["dict"]), ("a list", [1, 2], ["dict"]),
                               ("an empty dict", {}, ["state", "param_groups"]), ("a dict without 'state'", "no-state", ["state"]),
                               ("a model's state_dict", "model", ["state", "param_groups"])]:
    def _make(value=_value, words=_words):
        m, opt = _ck_trained()
        sd = value
        if value == "no-state":
            sd = {"param_groups": copy.deepcopy(opt.state_dict()["param_groups"])}
        elif value == "model":
            sd = m.state_dict()
        return refuse(lambda: opt.load_state_dict(sd), opt=opt, words=words)
    add(K, f"load_state_dict: {_label}", _make)


def _resume_equal(edit_sd, sparsity="element", cls=SpreadAdam, **kw):
    """Loading the edited checkpoint continues exactly as loading the unedited one."""
    def fn():
        m, opt = _ck_trained(sparsity, cls=cls, **kw)
        sd = copy.deepcopy(opt.state_dict())
        edited = edit_sd(copy.deepcopy(sd))
        a, aopt = _ck_twin(m, sparsity, cls=cls, **kw)
        b, bopt = _ck_twin(m, sparsity, cls=cls, **kw)

        def action():
            aopt.load_state_dict(edited)
            _ck_train(a, aopt, 2, seed=5)

        def check(_):
            bopt.load_state_dict(sd)
            _ck_train(b, bopt, 2, seed=5)
            assert_same(values(a.parameters()), values(b.parameters()))
        return accept(action, check)
    return fn


def _older(sd):
    for g in sd["param_groups"]:
        for k in ("maximize", "foreach", "differentiable", "fused", "capturable", "decoupled_weight_decay"):
            g.pop(k, None)
    return sd


def _number_steps(sd):
    def walk(entry):
        for k, v in list(entry.items()):
            if k == "step" and isinstance(v, torch.Tensor):
                entry[k] = int(v.item())
            elif isinstance(v, dict):
                walk(v)
    for entry in sd["state"].values():
        walk(entry)
    return sd


def _extra_keys(sd):
    sd["extra"] = {"note": "from a newer version"}
    for entry in sd["state"].values():
        entry["custom"] = 1
    return sd


def _no_spread_keys(sd):
    for g in sd["param_groups"]:
        for k in ("init", "zero_threshold", "share_groups"):
            g.pop(k, None)
    return sd


add(K, "load_state_dict: an older state dict (maximize/foreach/differentiable/fused/capturable missing)", _resume_equal(_older))
add(K, "load_state_dict: Python-number steps", _resume_equal(_number_steps))
add(K, "load_state_dict: extra keys (top level and per entry)", _resume_equal(_extra_keys))
add(K, "load_state_dict: an older spread version (no init/zero_threshold/share_groups)", _resume_equal(_no_spread_keys))
add(K, "load_state_dict: round trip of a row-sparsity checkpoint", _resume_equal(lambda sd: sd, "row"))
add(K, "load_state_dict: round trip with group ids", _resume_equal(lambda sd: sd, _ids(shape=(4, 3))))
add(K, "load_state_dict: round trip of SpreadSGD with momentum", _resume_equal(lambda sd: sd, cls=SpreadSGD, momentum=0.9))


@case(K, "load_state_dict: a float64 checkpoint into a float32 optimizer")
def _():
    m, opt = _ck_trained()
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        for k in ("U", "W"):
            if k in entry:
                entry[k] = entry[k].double()
    twin, topt = _ck_twin(m)

    def action():
        topt.load_state_dict(sd)
        _ck_train(twin, topt, 1)

    def check(_):
        st = topt.state[twin[0].weight]
        assert st["U"].dtype == torch.float32 and twin[0].weight.dtype == torch.float32
        assert torch.equal(twin[0].weight.detach(), st["U"] * st["W"])
    return accept(action, check)


@case(K, "load_state_dict: a torch.optim.Adam checkpoint (switching mid-training)")
def _():
    m = _ck_model()
    adam = torch.optim.Adam([{"params": g["params"]} for g in _ck_groups(m)], lr=0.05)
    _ck_train(m, adam, 2)
    ref = copy.deepcopy(m)
    ref_adam = torch.optim.Adam([{"params": g["params"]} for g in _ck_groups(ref)], lr=0.05)
    ref_adam.load_state_dict(copy.deepcopy(adam.state_dict()))
    opt = SpreadAdam(_ck_groups(m), lr=0.05)

    def action():
        opt.load_state_dict(copy.deepcopy(adam.state_dict()))
        _ck_train(m, opt, 1, seed=6)

    def check(_):
        # dense group: continues as torch's Adam; sparse groups: new factors from the weights (a fresh SpreadAdam)
        fresh = SpreadAdam(_ck_groups(ref)[:2], lr=0.05)
        _ck_train(ref, _Both(ref_adam, fresh), 1, seed=6)
        assert_same(values(m.parameters()), values(ref.parameters()))
    return accept(action, check)


class _Both:
    """Steps a torch optimizer for the dense biases and a fresh spread optimizer for the sparse weights."""

    def __init__(self, dense, sparse):
        self.dense, self.sparse = dense, sparse

    def zero_grad(self):
        self.dense.zero_grad()

    def step(self):
        grads = {id(p): p.grad for g in self.dense.param_groups for p in g["params"]}
        sparse_ids = {id(p) for g in self.sparse.param_groups for p in g["params"]}
        for g in self.dense.param_groups:
            for p in g["params"]:
                if id(p) in sparse_ids:
                    p.grad = None
        self.dense.step()
        for g in self.dense.param_groups:
            for p in g["params"]:
                p.grad = grads[id(p)]
        self.sparse.step()


@case(K, "load_state_dict: a torch.optim.SGD momentum checkpoint into a dense SpreadSGD")
def _():
    a = P(3, 2)
    ref = same_values([a])
    sgd = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    set_grads(ref)
    sgd.step()
    with torch.no_grad():
        a.copy_(ref[0])
    opt = SpreadSGD([a], lr=0.1, momentum=0.9)

    def action():
        opt.load_state_dict(copy.deepcopy(sgd.state_dict()))
        set_grads([a], 2)
        opt.step()

    def check(_):
        set_grads(ref, 2)
        sgd.step()
        assert_same(values([a]), values(ref))
    return accept(action, check)


@case(K, "load_state_dict: a SpreadSGD (momentum) checkpoint into SpreadAdam")
def _():
    m, sgd = _ck_trained(cls=SpreadSGD, momentum=0.9)
    sd = copy.deepcopy(sgd.state_dict())
    for g in sd["param_groups"]:  # the group keys of Adam, as a user merging configs would have them
        g.update(betas=(0.9, 0.999), eps=1e-8, amsgrad=False, capturable=False, decoupled_weight_decay=False)
    twin, topt = _ck_twin(m)
    return refuse(lambda: topt.load_state_dict(sd), opt=topt, words=["momentum_buffer"], group=0,
                  then=lambda: _ck_train(twin, topt, 1, seed=4))


@case(K, "load_state_dict: a SpreadAdam checkpoint into SpreadSGD (momentum)")
def _():
    m, adam = _ck_trained()
    sd = copy.deepcopy(adam.state_dict())
    twin, topt = _ck_twin(m, cls=SpreadSGD, momentum=0.9)

    def action():
        topt.load_state_dict(sd)
        _ck_train(twin, topt, 1, seed=4)
    return either(action, lambda _: assert_finite(twin.parameters()), opt=topt, words=["exp_avg"], group=0, grads=False)


@case(K, "load_state_dict: a checkpoint of a fresh optimizer into a trained one")
def _():
    m, opt = _ck_trained()
    fresh_sd = SpreadAdam(_ck_groups(_ck_model()), lr=0.05).state_dict()
    ref = copy.deepcopy(m)

    def action():
        opt.load_state_dict(fresh_sd)
        _ck_train(m, opt, 1, seed=7)

    def check(_):  # as a new optimizer on the current weights
        _ck_train(ref, SpreadAdam(_ck_groups(ref), lr=0.05), 1, seed=7)
        assert_same(values(m.parameters()), values(ref.parameters()))
    return accept(action, check)


@case(K, "torch.save / torch.load(weights_only=True) round trip")
def _():
    m, opt = _ck_trained("row")
    a, aopt = _ck_twin(m, "row")
    b, bopt = _ck_twin(m, "row")

    def action():
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        aopt.load_state_dict(torch.load(buf, weights_only=True))
        _ck_train(a, aopt, 2, seed=5)

    def check(_):
        bopt.load_state_dict(copy.deepcopy(opt.state_dict()))
        _ck_train(b, bopt, 2, seed=5)
        assert_same(values(a.parameters()), values(b.parameters()))
    return accept(action, check)


@case(K, "torch.save / torch.load(weights_only=True) with group ids")
def _():
    m, opt = _ck_trained(_ids(shape=(4, 3)))
    a, aopt = _ck_twin(m, _ids(shape=(4, 3)))

    def action():
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        aopt.load_state_dict(torch.load(buf, weights_only=True))
        _ck_train(a, aopt, 1)
    return accept(action, lambda _: assert_finite(a.parameters()))


for _label, _clone_fn in [("copy.deepcopy", lambda mo: copy.deepcopy(mo)), ("pickle", lambda mo: pickle.loads(pickle.dumps(mo)))]:
    def _make(clone=_clone_fn):
        m, opt = _ck_trained("column")
        original = snapshot(opt)

        def action():
            m2, opt2 = clone((m, opt))
            _ck_train(m2, opt2, 2, seed=8)
            return m2

        def check(m2):
            assert difference(original, snapshot(opt)) is None, "the original moved"
            _ck_train(m, opt, 2, seed=8)
            assert_same(values(m2.parameters()), values(m.parameters()))
        return accept(action, check)
    add(K, f"{_label} of model and optimizer continues identically", _make)


@case(K, "bf16 checkpoint keeps float32 factors")
def _():
    m = _ck_model().to(torch.bfloat16)
    opt = SpreadAdam(_ck_groups(m), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
    opt.step()
    twin = copy.deepcopy(m)
    topt = SpreadAdam(_ck_groups(twin), lr=0.05)

    def action():
        topt.load_state_dict(copy.deepcopy(opt.state_dict()))

    def check(_):
        st = topt.state[twin[0].weight]
        assert st["U"].dtype == torch.float32 and st["base"]["U"]["exp_avg"].dtype == torch.float32, st["U"].dtype
    return accept(action, check)


@case(K, "LBFGS state round trip")
def _():
    def make():
        a = P(5, dtype=torch.float64)
        return a, SpreadOptimizer([a], torch.optim.LBFGS, lr=1, max_iter=4, kappa=0.05)

    def closure_for(x, o):
        def closure():
            o.zero_grad()
            loss = ((x - 0.5) ** 2).sum()
            loss.backward()
            return loss
        return closure
    a, opt = make()
    opt.step(closure_for(a, opt))
    b, bopt = make()
    with torch.no_grad():
        b.copy_(a)

    def action():
        bopt.load_state_dict(copy.deepcopy(opt.state_dict()))
        bopt.step(closure_for(b, bopt))

    def check(_):
        opt.step(closure_for(a, opt))
        assert_same([b.detach()], [a.detach()])
    return accept(action, check)


@case(K, "load_state_dict: a user pre-hook that fixes the checkpoint runs first")
def _():
    m, opt = _ck_trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][1]["kappa"] = -1.0
    twin, topt = _ck_twin(m)

    def hook(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][1]["kappa"] = 0.02
        return state_dict
    topt.register_load_state_dict_pre_hook(hook)
    return accept(lambda: topt.load_state_dict(sd), lambda _: ensure(topt.param_groups[1]["kappa"] == 0.02, ""))


# ===============================================================================================================
# integration


I = "integration"

SCHEDULERS = [
    ("StepLR", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5), False),
    ("MultiStepLR", lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[1, 3], gamma=0.5), False),
    ("ExponentialLR", lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9), False),
    ("CosineAnnealingLR", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4), False),
    ("CosineAnnealingWarmRestarts", lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2), False),
    ("LambdaLR", lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e)), False),
    ("MultiplicativeLR", lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda e: 0.8), False),
    ("LinearLR", lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=3), False),
    ("ConstantLR", lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2), False),
    ("PolynomialLR", lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=4, power=2.0), False),
    ("OneCycleLR (Adam betas cycle)", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=6), False),
    ("CyclicLR (SGD momentum cycles)", lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2), True),
    ("SequentialLR", lambda o: torch.optim.lr_scheduler.SequentialLR(o, [torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
                                                                         torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[2]), False),
    ("ChainedScheduler", lambda o: torch.optim.lr_scheduler.ChainedScheduler([torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
                                                                              torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)]), False),
    ("ReduceLROnPlateau", "plateau", False),
    ("SWALR", lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.02, anneal_epochs=3), False),
]


def _scheduled(make_opt, make_sched, ps, steps=5):
    opt = make_opt(ps)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5) if make_sched == "plateau" else make_sched(opt)
    history = []
    for t in range(steps):
        set_grads(ps, 1 + t)
        history.append([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
        opt.step()
        sched.step(1.0) if make_sched == "plateau" else sched.step()
    return opt, history


for _label, _make_sched, _sgd in SCHEDULERS:
    def _make(make_sched=_make_sched, sgd=_sgd):
        shapes = [(3,), (4, 3)]
        a = [P(*s, seed=i) for i, s in enumerate(shapes)]
        t = same_values(a)
        twin = same_values(a)
        if sgd:
            spread = lambda ps: SpreadSGD([{"params": ps[:1]}, {"params": ps[1:], "kappa": 0.02}], lr=0.05, momentum=0.9)  # noqa: E731
            torch_opt = lambda ps: torch.optim.SGD([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.05, momentum=0.9)  # noqa: E731
        else:
            spread = lambda ps: SpreadAdam([{"params": ps[:1]}, {"params": ps[1:], "kappa": 0.02}], lr=0.05)  # noqa: E731
            torch_opt = lambda ps: torch.optim.Adam([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.05)  # noqa: E731

        def action():
            return _scheduled(spread, make_sched, a)

        def check(result):
            _, history = result
            _, torch_history = _scheduled(torch_opt, make_sched, t)
            for mine, theirs in zip(history, torch_history):
                for g, h in zip(mine, theirs):
                    for k in ("lr", "momentum", "betas"):
                        if k in h:
                            assert difference(g[k], h[k]) is None, f"{k}: {g[k]} != torch's {h[k]}"
            assert_same([a[0].detach()], [t[0].detach()], "the dense group")
            # the sparse group was stepped with the scheduled values: a twin with them set by hand
            topt = spread(twin)
            for step, groups in enumerate(history):
                set_grads(twin, 1 + step)
                for g, saved in zip(topt.param_groups, groups):
                    g.update(copy.deepcopy(saved))
                topt.step()
            assert_same([a[1].detach()], [twin[1].detach()], "the sparse group")
        return accept(action, check)
    add(I, f"LR scheduler: {_label}", _make)


@case(I, "LR scheduler state_dict round trip with the optimizer's")
def _():
    a = [P(4, 3)]
    b = same_values(a)

    def action():
        opt = SpreadAdam(a, lr=0.05, kappa=0.02)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for t in range(2):
            set_grads(a, 1 + t)
            opt.step()
            sched.step()
        opt2 = SpreadAdam(b, lr=0.05, kappa=0.02)
        with torch.no_grad():
            b[0].copy_(a[0])
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
        sched2.load_state_dict(sched.state_dict())
        for o, s, ps in ((opt, sched, a), (opt2, sched2, b)):
            set_grads(ps, 9)
            o.step()
            s.step()
        return opt, opt2

    def check(r):
        assert r[0].param_groups[0]["lr"] == r[1].param_groups[0]["lr"] == 0.05 / 8
        assert_same(values(a), values(b))
    return accept(action, check)


def _scaler_run():
    m = _ck_model()
    opt = SpreadAdam(_ck_groups(m), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)
    return m, opt, scaler, x, y


@case(I, "GradScaler: inf gradient in a sparse group skips the step, nothing moves")
def _():
    m, opt, scaler, x, y = _scaler_run()
    _ck_train(m, opt, 1)

    def action():
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
        m[0].weight.grad[0, 0] = INF
        before = snapshot(opt, grads=False)  # unscale_ divides the gradients: only they may change
        scaler.step(opt)
        scaler.update()
        return before

    def check(before):
        d = difference(before, snapshot(opt, grads=False))
        assert d is None, f"a skipped step changed {d}"
        assert scaler.get_scale() == 512.0, scaler.get_scale()
    return accept(action, check)


@case(I, "GradScaler: NaN gradient in a dense group skips the step")
def _():
    m, opt, scaler, x, y = _scaler_run()

    def action():
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
        m[0].bias.grad[0] = NAN
        before = snapshot(opt, grads=False)
        scaler.step(opt)
        scaler.update()
        return before

    def check(before):
        d = difference(before, snapshot(opt, grads=False))
        assert d is None, f"a skipped step changed {d}"
        assert scaler.get_scale() == 512.0, scaler.get_scale()
    return accept(action, check)


@case(I, "GradScaler: a finite scaled step equals the unscaled step")
def _():
    m, opt, scaler, x, y = _scaler_run()
    ref = copy.deepcopy(m)
    ref_opt = SpreadAdam(_ck_groups(ref), lr=0.05)

    def action():
        for _ in range(2):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            scaler.step(opt)
            scaler.update()

    def check(_):
        _ck_train(ref, ref_opt, 2)
        assert_same(values(m.parameters()), values(ref.parameters()))
    return accept(action, check)


@case(I, "GradScaler: unscale_ + clip_grad_norm_ + step")
def _():
    m, opt, scaler, x, y = _scaler_run()
    ref = copy.deepcopy(m)
    ref_opt = SpreadAdam(_ck_groups(ref), lr=0.05)

    def action():
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
        scaler.step(opt)
        scaler.update()

    def check(_):
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()
        for p, q in zip(m.parameters(), ref.parameters()):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), (p, q)
    return accept(action, check)


@case(I, "step hooks fire once per step")
def _():
    opt, ps = stepped(kappas=(0.0, 0.1))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    return accept(opt.step, lambda _: ensure(calls == ["pre", "post"], calls))


@case(I, "swa_utils.AveragedModel over a spread-trained model")
def _():
    m = _ck_model()
    opt = SpreadAdam(_ck_groups(m), lr=0.05)
    swa = torch.optim.swa_utils.AveragedModel(m)
    snaps = []

    def action():
        for s in range(3):
            _ck_train(m, opt, 1, seed=s)
            swa.update_parameters(m)
            snaps.append(values(m.parameters()))

    def check(_):
        mean = [torch.stack([s[i] for s in snaps]).mean(0) for i in range(len(snaps[0]))]
        for p, q in zip(swa.module.parameters(), mean):
            assert torch.allclose(p, q, atol=1e-6), (p, q)
    return accept(action, check)


# ---------------------------------------------------------------------------------------------------------------
# the tests


def _params_of(family: str):
    out = []
    for c in CASES:
        if c.family != family:
            continue
        marks = [pytest.mark.xfail(strict=True, reason=c.defect)] if c.defect else []
        out.append(pytest.param(c, id=c.name, marks=marks))
    return out


def _assert_good(c: Case) -> None:
    outcome, detail = judge(c)
    assert outcome in GOOD, f"{c.family} / {c.name}: {outcome}: {detail}"


@pytest.mark.parametrize("c", _params_of(C))
def test_constructor(c):
    _assert_good(c)


@pytest.mark.parametrize("c", _params_of(R))
def test_runtime(c):
    _assert_good(c)


@pytest.mark.parametrize("c", _params_of(K))
def test_checkpoint(c):
    _assert_good(c)


@pytest.mark.parametrize("c", _params_of(I))
def test_integration(c):
    _assert_good(c)


def test_the_judge_can_fail():
    """The harness itself: a silent acceptance, a moved parameter and an obscure error are seen as such."""
    p = P(3)
    assert refuse(lambda: None, params=[p])[0] == "silently accepted"

    def move_then_raise():
        with torch.no_grad():
            p.add_(1)
        raise ValueError("param group 0: bad 'kappa'")
    assert refuse(move_then_raise, params=[p], words=["kappa"], group=0)[0] == "corrupted"
    assert refuse(lambda: {}["kappa"], params=[p], words=["kappa"])[0] == "obscure"
    assert refuse(lambda: int("bad value"), words=["kappa"])[0] == "obscure"
    assert accept(lambda: 1, lambda r: assert_same([torch.ones(1)], [torch.zeros(1)]))[0] == "corrupted"
    assert accept(lambda: len(None))[0] == "false rejection"
    assert judge(Case("x", "hang", lambda: (time.sleep(5), ("handled", ""))[1]), timeout=0.1)[0] == "hang"
