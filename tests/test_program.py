"""A kept plan's native program (``spread_optim._program``) steps as the full path does.

Oracle: the same run with the program never built (every step takes the full path: its checks, the per-group
compiled step, the same native loops). Two runs on identical parameters take the same steps and the same change
between steps (a user's, a scheduler's); after every step their parameters and states must be equal bit for bit,
and a step one refuses must raise the same error in the other, leaving both as they were. Each run also counts the
steps the program took, so that a program that always declines fails.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from spread_optim import SpreadOptimizer
from spread_optim._program import NativeProgram
from spread_optim.kernels import native

sys.path.insert(0, str(Path(__file__).parent))
from test_plan_reuse import _equal  # noqa: E402  (bit for bit, NaN where the other has NaN)

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason="the native loops are not built here")


def _none(opt, params):
    pass


def _write_weights(opt, params):
    with torch.no_grad():
        params[0][1:3] = 0.25  # (a pruning mask, a clip: adopted by the next step)


def _swap_storage(opt, params):
    params[1].data = params[1].data.clone()


def _drop_grad(opt, params):
    params[3].grad = None  # (only for the next step: see _step)


def _replace_state(opt, params):
    st = opt.state[params[0]]["base"]["W"]
    key = "exp_avg" if "exp_avg" in st else "momentum_buffer" if "momentum_buffer" in st else None
    if key is not None:
        st[key] = st[key].clone() * 0.5


def _replace_base_dict(opt, params):
    base = opt.state[params[0]]["base"]
    base["W"] = {key: value.clone() for key, value in base["W"].items()}  # (a copy: the old dict's tensors no longer count)


def _new_counter(opt, params):
    st = opt.state[params[1]]["base"]["W"]
    if "step" in st:
        st["step"] = torch.tensor(100.0)


def _momentum(value):
    def change(opt, params):
        for group in opt.param_groups:
            if "momentum" in group:
                group["momentum"] = value
    return change


def _schedule(opt, params):
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)

    def after():
        scheduler.step()
        opt.param_groups[0]["kappa"] *= 1.3
    return after


def _nan_grad(opt, params):
    params[2].grad = None  # (set by _step: a NaN)


def _strided_grad(opt, params):
    pass  # (set by _step: a gradient that is not contiguous)


CHANGES = {
    "none": _none, "write weights": _write_weights, "new storage": _swap_storage, "no gradient": _drop_grad,
    "replace a state": _replace_state, "replace a base dict": _replace_base_dict,
    "new step counter": _new_counter, "momentum on": _momentum(0.9),
    "momentum off": _momentum(0.0), "schedule": _schedule, "non-finite gradient": _nan_grad,
    "strided gradient": _strided_grad,
}

SETUPS = {
    "adam element": ("adam", "element", {}), "adam column": ("adam", "column", {}), "adam row": ("adam", "row", {}),
    "adamw amsgrad row": ("adamw", "row", dict(amsgrad=True, weight_decay=0.1)),
    "adam maximize column": ("adam", "column", dict(maximize=True)),
    "sgd element": ("sgd", "element", {}), "sgd momentum column": ("sgd", "column", dict(momentum=0.5)),
    "sgd nesterov row": ("sgd", "row", dict(momentum=0.5, nesterov=True, dampening=0.0)),
    "sgd damped element": ("sgd", "element", dict(momentum=0.5, dampening=0.3)),
}


def _run(setup, change, use_program, monkeypatch):
    base, sparsity, kwargs = SETUPS[setup]
    gen = torch.Generator().manual_seed(0)
    shapes = ((10, 6), (7, 3, 2), (6,), (5, 4))
    params = [(torch.randn(*shape, generator=gen) * 0.3).requires_grad_() for shape in shapes]
    params[3].data = params[3].data.double()
    # (a float64 tensor between two float32 ones: one group, two calls; its step count falls behind when its gradient
    # is dropped)
    opt = SpreadOptimizer([{"params": [params[0], params[3], params[1]], "sparsity": sparsity},
                           {"params": params[2:3], "sparsity": "row", "kappa": 0.05},
                           {"params": [torch.randn(3, generator=gen).requires_grad_()], "kappa": 0.0}],
                          base, lr=0.05, kappa=0.02, **kwargs)
    dense = opt.param_groups[2]["params"][0]
    ran = []
    with monkeypatch.context() as patch:
        if use_program:
            run = NativeProgram.run
            patch.setattr(NativeProgram, "run", lambda self, *args: _counted(ran, 1, run(self, *args)))
        else:
            patch.setattr(NativeProgram, "of", classmethod(lambda cls, *args: None))
        outcomes = [_step(opt, params, dense, gen, None) for _ in range(3)]
        after = CHANGES[change](opt, params)
        for i in range(3):
            try:
                outcomes.append(_step(opt, params, dense, gen, change if i == 0 else None))
            except (FloatingPointError, ValueError) as error:
                outcomes += [f"{type(error).__name__}: {error}", _snapshot(opt, params, dense)]
                outcomes.append(_step(opt, params, dense, gen, None))  # (and the run goes on)
            if after is not None:
                after()
    return outcomes, len(ran)


def _counted(ran: list, entry, took: bool) -> bool:
    """A wrapper's record of a step the program took (:meth:`NativeProgram.run` returns False where it declines)."""
    if took:
        ran.append(entry)
    return took


def _step(opt, params, dense, gen, change):
    for p in (*params, dense):
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    if change == "no gradient":
        params[3].grad = None
    if change == "non-finite gradient":
        params[2].grad[1] = float("nan")
    if change == "strided gradient":
        params[0].grad = torch.randn(6, 10, generator=gen).t()
    opt.step()
    return _snapshot(opt, params, dense)


def _snapshot(opt, params, dense):
    state = {i: copy.deepcopy(opt.state[p]) for i, p in enumerate((*params, dense)) if p in opt.state}
    return [p.detach().clone() for p in (*params, dense)], state


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_the_program_steps_as_the_full_path(setup, change, monkeypatch):
    programmed, ran = _run(setup, change, True, monkeypatch)
    full, none = _run(setup, change, False, monkeypatch)
    assert none == 0
    assert len(programmed) == len(full)
    for i, (a, b) in enumerate(zip(programmed, full)):
        assert _equal(a, b), (setup, change, i, a if isinstance(a, str) else "", b if isinstance(b, str) else "")
    # (step 1 plans; so does step 2 where step 1 made the dense group's state, which the plan reads (not under SGD
    # without momentum); the program is built after the last step that planned)
    assert ran == (2 if setup == "sgd element" else 1) + _program_steps_after(setup, change)


def _program_steps_after(setup, change) -> int:
    """How many of the steps after the change the program takes: three, but for a step it declines (the full path
    takes it; the program is built again after it) or a change that makes a new plan (one full step)."""
    base, _, kwargs = SETUPS[setup]
    momentum = bool(kwargs.get("momentum"))
    declines = {
        "replace a state": base != "sgd" or momentum,  # (SGD without momentum keeps no state)
        "replace a base dict": True,
        "new step counter": base != "sgd",  # (Adam's)
        "momentum on": base == "sgd" and not momentum,  # (SGD's momentum turned on: a state to create)
        "momentum off": momentum,  # (turned off: one fewer state)
        "schedule": True,  # (the scheduler adds a key to every group: a new plan)
        "non-finite gradient": True,  # (the full path raises; the step after plans again)
        "strided gradient": True,
    }.get(change, False)
    if change == "momentum on" and base == "sgd" and not momentum:
        return 1  # (and the next step plans too: the dense group's first momentum buffer is state its plan reads)
    return 2 if declines else 3


def test_a_program_is_kept_while_the_plan_is():
    """The program is built once after the plan and reused; a new plan (a change the plan reads) builds another."""
    p = torch.randn(6, 4, requires_grad=True)
    opt = SpreadOptimizer([p], "adam", lr=0.01, kappa=0.01, sparsity="column")
    p.grad = torch.randn(6, 4)
    opt.step()
    kinds, program = opt._program
    assert kinds is opt._planned[-1] and isinstance(program, NativeProgram)
    opt.step()
    assert opt._program[1] is program
    opt.param_groups[0]["sparsity"] = "row"
    opt.step()
    assert opt._program[1] is not program and opt._program[0] is opt._planned[-1]


def test_no_program_where_a_tensor_takes_another_path():
    """A bfloat16 parameter (float32 factors: the compiled step's inductor code) gets no program; its steps take the
    full path."""
    p = torch.randn(6, 4).bfloat16().requires_grad_()
    opt = SpreadOptimizer([p], "adam", lr=0.01, kappa=0.01)
    p.grad = torch.randn(6, 4).bfloat16()
    opt.step()
    opt.step()
    assert opt._program[1] is None


def test_a_parameter_not_stepped_yet_keeps_the_program_until_it_has_a_gradient():
    """A parameter of a sparse group whose gradient has been None so far has factors but no base state: the program
    leaves it out while its gradient stays None, and declines the step that gives it one (the full path creates its
    state; the program is built again after it)."""
    p, q = torch.randn(6, 4, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    opt = SpreadOptimizer([p, q], "adam", lr=0.01, kappa=0.01, sparsity="row")
    ran = []
    run = NativeProgram.run
    for step in range(6):
        p.grad = torch.randn(6, 4)
        q.grad = torch.randn(5, 3) if step >= 3 else None
        program = opt._program[1]
        if program is not None:
            program.run = lambda *args, program=program: _counted(ran, step, run(program, *args))
        opt.step()
    # step 0 plans; the program takes steps 1 and 2; it declines step 3 (q's first gradient: the full path creates
    # q's base state), is built again after it and takes steps 4 and 5 (the plan is kept: q's factors were there)
    assert ran == [1, 2, 4, 5]
    assert opt.state[q]["base"]["W"]["step"] == 3


def test_a_scaled_step_takes_the_full_path_and_keeps_the_program(monkeypatch):
    """GradScaler hands ``grad_scale``/``found_inf`` to the step: the full path takes it (the program is not built
    again for it), and the next unscaled step is the program's; the scaled step equals the run without a program."""
    results = []
    for use_program in (True, False):
        if not use_program:
            monkeypatch.setattr(NativeProgram, "of", classmethod(lambda cls, *args: None))
        p = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
        opt = SpreadOptimizer([p], "adam", lr=0.01, kappa=0.01)  # (GradScaler's attributes set by hand below)
        p.grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
        opt.step()
        program = opt._program[1]
        assert (program is not None) == use_program
        ran = []
        if use_program:
            monkeypatch.setattr(program, "run", lambda *args, run=program.run: _counted(ran, 1, run(*args)))
        opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)
        opt.step()
        del opt.grad_scale, opt.found_inf
        assert ran == [] and opt._program[1] is program
        opt.step()
        assert ran == ([1] if use_program else [])
        results.append((p.detach().clone(), copy.deepcopy(opt.state[p])))
    assert _equal(results[0], results[1])


def _columns_run(use_program: bool, bad, monkeypatch) -> tuple[list, list]:
    """Three steps of a column-sparse group of float32 tensors (one columns call: its sums pass is their check), a
    row group and a dense group; then ``bad`` sets the next gradients of the first columns tensor; that step, and
    one more with clean gradients. Returns the outcomes and the checked calls made."""
    gen = torch.Generator().manual_seed(3)
    params = [(torch.randn(*shape, generator=gen) * 0.3).requires_grad_() for shape in ((8, 6), (5, 3, 3), (6,))]
    dense = torch.randn(3, generator=gen).requires_grad_()
    opt = SpreadOptimizer([{"params": params[:2], "sparsity": "column"}, {"params": params[2:], "sparsity": "row"},
                           {"params": [dense], "kappa": 0.0}], "adam", lr=0.05, kappa=0.02)
    checked = []
    launch_checked = native.launch_checked
    monkeypatch.setattr(native, "launch_checked", lambda *args: (checked.append(1), launch_checked(*args))[1])
    if not use_program:
        monkeypatch.setattr(NativeProgram, "of", classmethod(lambda cls, *args: None))
    outcomes = []
    for step in range(5):
        for p in (*params, dense):
            p.grad = torch.randn(p.shape, generator=gen)
        if step == 3:
            bad(params[0].grad)
        try:
            opt.step()
        except FloatingPointError as error:
            outcomes.append(str(error))
        outcomes.append(_snapshot(opt, params, dense))
    monkeypatch.undo()
    return outcomes, checked


def _overflow(g):
    g[:, 1] = 3e38  # (finite: only the sum g*W of column 1 overflows; the full path's check lets it through)


@pytest.mark.parametrize("bad", [lambda g: g.__setitem__((7, 5), float("nan")), lambda g: g.__setitem__((0, 0), float("inf")),
                                 _overflow], ids=["nan", "inf", "overflow"])
def test_the_columns_call_checks_its_gradients_as_the_full_path(bad, monkeypatch):
    """Where one columns call steps every columns tensor, its sums pass is their non-finite check: a NaN or an inf
    raises the full path's error with nothing moved (the dense group, the step counters: put back); sums that
    overflow on finite gradients make the full path take the step. Both bit for bit as the run without a program."""
    programmed, checked = _columns_run(True, bad, monkeypatch)
    full, none = _columns_run(False, bad, monkeypatch)
    # (steps 0 and 1 plan (step 0 makes the dense group's state, which the plan reads); the program's calls at steps
    # 2 and 3; after a refused step the next plans again, after an overflow the program takes step 4 too)
    assert none == [] and len(checked) == (3 if bad is _overflow else 2)
    assert len(programmed) == len(full)
    for i, (a, b) in enumerate(zip(programmed, full)):
        assert _equal(a, b), (i, a if isinstance(a, str) else "", b if isinstance(b, str) else "")
    raised = [o for o in programmed if isinstance(o, str)]
    if bad is _overflow:
        assert raised == []
    else:
        assert len(raised) == 1 and "shape (8, 6)" in raised[0]
        assert _equal(programmed[2], programmed[4])  # (the refused step moved nothing)
