"""The fused paths of a sparse param group: torch's state layout around the Triton launchers (GPU) and the
compiled CPU step (:mod:`spread_optim.kernels.compiled`).

Both compute the same numbers as the split path (the spec's factor gradients, the torch base rule on the factors,
the exact-zero pass) and read and write the same state: ``state[p]["base"][factor]`` holds torch's own keys
(``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; ``momentum_buffer``), so a run can switch between paths
and checkpoints load either way. :func:`step_element` and :func:`step_grouped` take a param group's tensors and
state, never the optimizer; :mod:`spread_optim.kernels.dispatch` decides which path runs.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from spread_optim.kernels import compiled, dispatch, native
from spread_optim.kernels import reference as ref
from spread_optim.kernels.dispatch import FUSED_RULES, kernels


# ----------------------------------------------------------------------------------------------------
# base state, in torch's own layout


def _new_step(device: torch.device, on_device: bool) -> torch.Tensor:
    from torch.optim.optimizer import _get_scalar_dtype

    if on_device:
        return torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=device)
    return torch.tensor(0.0, dtype=_get_scalar_dtype())


def _adam_state(st: dict, leaf: torch.Tensor, amsgrad: bool, steps_on_device: bool) -> list[torch.Tensor | None]:
    if not st:
        st["step"] = _new_step(leaf.device, steps_on_device)
        st["exp_avg"] = torch.zeros_like(leaf, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(leaf, memory_format=torch.preserve_format)
    if amsgrad and "max_exp_avg_sq" not in st:
        st["max_exp_avg_sq"] = torch.zeros_like(leaf, memory_format=torch.preserve_format)
    step = st["step"]
    if not (step.is_cpu and leaf.is_cpu) and step.device != (leaf.device if steps_on_device else torch.device("cpu")):
        st["step"] = step.to(leaf.device if steps_on_device else "cpu", dtype=torch.float32 if steps_on_device else step.dtype)  # e.g. a checkpoint of the other path
    return [st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq") if amsgrad else None]


def _sgd_state(st: dict, leaf: torch.Tensor, momentum: float) -> tuple[list[torch.Tensor | None], int]:
    if momentum == 0:
        return [None, None, None], 0
    first = st.get("momentum_buffer") is None
    if first:
        st["momentum_buffer"] = torch.empty_like(leaf, memory_format=torch.preserve_format)
    return [st["momentum_buffer"], None, None], int(first)


class _Rule:
    """The base rule's options of one group, and the per-tensor scalars of one step."""

    def __init__(self, base_cls: type, group: dict, device: torch.device):
        self.name = FUSED_RULES[base_cls]
        self.adam = self.name == "adam"
        self.group = group
        self.device = device
        lr = group["lr"]
        self.lr = float(lr) if isinstance(lr, torch.Tensor) else lr
        if self.adam:
            self.beta1, self.beta2 = (float(b) for b in group["betas"])
            self.options = dict(beta1=self.beta1, beta2=self.beta2, eps=group["eps"], amsgrad=group["amsgrad"])
            self.steps_on_device = bool(group.get("capturable")) or bool(group.get("fused"))
        else:
            self.options = dict(momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"])
            self.steps_on_device = False

    def states(self, states: list[dict], leaves: list[torch.Tensor]) -> tuple[list[list], list[int]]:
        """Create missing state; return the state slots and the SGD first-step flags of each leaf."""
        if self.adam:
            return [_adam_state(st, leaf, self.group["amsgrad"], self.steps_on_device) for st, leaf in zip(states, leaves)], [0] * len(leaves)
        pairs = [_sgd_state(st, leaf, self.group["momentum"]) for st, leaf in zip(states, leaves)]
        return [s for s, _ in pairs], [f for _, f in pairs]

    def hyper(self, states: list[dict]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Advance the step counters; return ``(step_size, sqrt(bc2))`` per leaf (float32, on the device)
        and the device step tensors (to be rolled back when a scaler finds an inf)."""
        if not self.adam:
            return _table([[self.lr, 1.0]] * len(states), torch.float32, self.device), []
        steps = [st["step"] for st in states]
        if not steps:
            return torch.zeros(0, 2, dtype=torch.float32, device=self.device), []
        torch._foreach_add_(steps, 1)
        if self.steps_on_device:  # no host synchronisation (CUDA graphs): the bias corrections on the device
            t = torch.stack(steps).double()
            lr = self.group["lr"].reshape(()).double() if isinstance(self.group["lr"], torch.Tensor) else self.lr
            values = torch.stack([lr / (1 - self.beta1 ** t), (1 - self.beta2 ** t).sqrt()], dim=1)
            return values.float(), steps
        rows = []
        for s in steps:
            n = s.item()
            rows.append([self.lr / (1 - self.beta1 ** n), math.sqrt(1 - self.beta2 ** n)])
        return torch.tensor(rows, dtype=torch.float32, device=self.device), []


def nonfinite_flag(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """For capturable groups (no host synchronisation allowed): a device flag, 1 when one of ``grads`` has a NaN
    or inf. The kernels then skip the step on the device, as with GradScaler's ``found_inf``: nothing moves, step
    counters included."""
    if not grads:
        return None
    flag = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    # checks every gradient (and multiplies it by 1: unchanged bit for bit) in one fused pass
    torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, torch.ones(1, device=flag.device))
    return flag


def _table(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small device table, cached on its values: uploaded once, not at every step (a step that uploads
    nothing can be captured in a CUDA graph)."""
    from spread_optim.kernels import tables

    rows = [v if isinstance(v, (list, tuple)) else [v] for v in values]
    table = tables.value_table(rows, dtype, device)
    return table if values and isinstance(values[0], (list, tuple)) else table.view(-1)


def _grad(p: torch.Tensor) -> torch.Tensor | None:
    g = p.grad
    if g is None:
        return None
    return g if g.is_contiguous() else g.contiguous()


def _options(rule: "_Rule", group):
    rules = kernels()["rules"]
    return rules.StepOptions(rule=rules.ADAM if rule.adam else rules.SGD, kappa=group["kappa"], balanced=group["init"] == "balanced",
                                         lr_revive=float(group["lr"]),
                                         zero_threshold=group["zero_threshold"], maximize=bool(group.get("maximize", False)),
                                         **rule.options)


def triton_element(base_cls: type, group: dict, params, state, grad_scale, found_inf) -> None:
    """One Triton step of an element-sparse param group (``state``: the optimizer's state mapping)."""
    live = [(p, _grad(p)) for p in params if p.grad is not None]
    if not live:
        return
    device = live[0][0].device
    rule = _Rule(base_cls, group, device)
    sts = [state[p] for p, _ in live]
    leaf_states = [st["base"][k] for st in sts for k in ("U", "W")]
    slots, firsts = rule.states(leaf_states, [st[k] for st in sts for k in ("U", "W")])
    hyper, device_steps = rule.hyper(leaf_states)
    kernels()["element"].element_step(
        [g for _, g in live], [p for p, _ in live], [st["U"] for st in sts], [st["W"] for st in sts],
        [slots[2 * i] + slots[2 * i + 1] for i in range(len(live))], hyper.reshape(-1, 4).contiguous(),
        _table([firsts[2 * i:2 * i + 2] for i in range(len(live))], torch.int32, device),
        _options(rule, group), grad_scale=grad_scale, found_inf=found_inf,
    )
    _uncount_skipped(device_steps, found_inf)


def triton_grouped(base_cls: type, group: dict, sets, structures: dict, state, grad_scale, found_inf) -> None:
    """One Triton step of a group-sparse param group: ``sets`` lists the parameters sharing each ``u``."""
    sets = [m for m in sets if any(p.grad is not None for p in m)]
    if not sets:
        return
    device = sets[0][0].device
    rule = _Rule(base_cls, group, device)
    Ws, thetas, grads, structs, share_index, w_states, us, u_states = [], [], [], [], [], [], [], []
    for k, members in enumerate(sets):
        st0 = state[members[0]]
        us.append(st0["u"])
        u_states.append(st0["base"]["u"])
        for p in members:
            Ws.append(state[p]["W"])
            w_states.append(state[p]["base"]["W"])
            thetas.append(p)
            grads.append(_grad(p))
            structs.append(structures[p])
            share_index.append(k)
    live = [i for i, g in enumerate(grads) if g is not None]
    w_slots, w_firsts = [[None, None, None] for _ in Ws], [0] * len(Ws)
    live_slots, live_firsts = rule.states([w_states[i] for i in live], [Ws[i] for i in live])
    for i, slot, first in zip(live, live_slots, live_firsts):
        w_slots[i], w_firsts[i] = slot, first
    u_slots, u_firsts = rule.states(u_states, us)
    live_hyper, w_steps = rule.hyper([w_states[i] for i in live])
    w_hyper = torch.ones(len(Ws), 2, dtype=torch.float32, device=device)
    if live:
        w_hyper[_table(live, torch.int64, device)] = live_hyper
    u_hyper, u_steps = rule.hyper(u_states)
    kernels()["group"].group_step(
        grads, thetas, Ws, structs, share_index, w_slots, w_hyper, _table(w_firsts, torch.int32, device), us, u_slots,
        u_hyper.contiguous(), _table(u_firsts, torch.int32, device), _options(rule, group),
        grad_scale=grad_scale, found_inf=found_inf,
    )
    _uncount_skipped(w_steps + u_steps, found_inf)


def _uncount_skipped(device_steps: list[torch.Tensor], found_inf: torch.Tensor | None) -> None:
    """A step skipped for an inf does not count (as torch's fused Adam)."""
    if found_inf is not None and device_steps:
        torch._foreach_sub_(device_steps, [found_inf.reshape(()).to(device_steps[0].dtype)] * len(device_steps))


# ----------------------------------------------------------------------------------------------------
# the compiled CPU step, one tensor at a time


def _compiled_flags(rule: _Rule, group: dict, grad_scale) -> dict:
    return dict(rule=rule.name, amsgrad=bool(group.get("amsgrad", False)) and rule.adam, nesterov=bool(group.get("nesterov", False)),
                momentum=not rule.adam and group.get("momentum", 0) != 0, maximize=bool(group.get("maximize", False)),
                scaled=grad_scale is not None, scheme=group["init"])


def _hypers(rule: _Rule, group: dict, leaves: list[dict], grad_scale, counter: bool) -> list[list[float]]:
    """The float64 numbers of each tensor's step (:data:`spread_optim.kernels.compiled.HYPER`; ``leaves``: the base
    states of the tensors' two factors, in pairs); advances Adam's step counters (one call for the group; in one native
    call when ``counter``: the native library is built)."""
    scale = float(grad_scale) if grad_scale is not None else 1.0
    if not rule.adam:
        return hyper_rows(group, len(leaves) // 2, None, scale)
    steps = [st["step"] for st in leaves]
    counts = native.count_steps(steps) if counter else None  # (one call, no dispatch per tensor)
    if counts is None:
        if steps:
            torch._foreach_add_(steps, 1)
        counts = [float(n) for n in steps]
    return hyper_rows(group, len(leaves) // 2, counts, scale)


def hyper_rows(group: dict, count: int, counts: list[float] | None, scale: float = 1.0) -> list[list[float]]:
    """The float64 numbers of the steps of ``count`` tensors of ``group`` (:data:`spread_optim.kernels.compiled.HYPER`):
    under Adam from their two factors' new step counts (``counts``, in pairs), under SGD (``counts`` None) all alike."""
    lr = float(group["lr"])
    head = [float(group["kappa"]), lr, float(group["zero_threshold"])]
    if counts is None:
        row = head + [lr, 1.0, lr, 1.0] + [0.0, 0.0, 0.0, float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0)), scale]
        return [row] * count
    beta1, beta2 = (float(b) for b in group["betas"])
    tail = [beta1, beta2, float(group["eps"]), 0.0, 0.0, scale]
    if counts and counts.count(counts[0]) == len(counts):  # (one count for all, as usual: one row)
        return [head + [*ref.adam_step_sizes(counts[0], lr, beta1, beta2)] * 2 + tail] * count
    sizes: dict = {}  # step count -> (step size, sqrt(bias correction 2)): a model's tensors mostly share one
    for n in counts:
        if n not in sizes:
            sizes[n] = ref.adam_step_sizes(n, lr, beta1, beta2)
    return [head + [*sizes[counts[i]], *sizes[counts[i + 1]]] + tail for i in range(0, 2 * count, 2)]


def _compiled_run(kind: str, args: tuple, values: list[float], extra: tuple, flags: dict) -> None:
    """The one-pass CPU step of one tensor: the native loop (:mod:`spread_optim.kernels.native`) where
    :func:`dispatch.cpu_engine` chooses it, else the compiled step; then, only where weights were written outside
    the optimizer, the same step eagerly with adoption (see :mod:`spread_optim.kernels.compiled`). Should
    torch.compile refuse to compile another graph (its recompilation limit, when a group holds more layouts than
    expected), the same function runs eagerly."""
    global _warned_recompile
    step = compiled.element_step if kind == "element" else compiled.grouped_step
    layout = flags.get("groups", "element")
    if dispatch.cpu_engine(layout, args[0], args[1], args[2], flags, dispatch.native_ready(flags["rule"])) == "native":
        if native.batch_step(native.KERNEL_OF[layout], [(*args, values)], **flags)[0]:
            _adopt(kind, args, values, extra, flags)
        return
    hyper = torch.tensor(values, dtype=torch.float64)
    try:
        changed = int(compiled.compiled(kind, **flags)(*args, hyper, *extra))
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        if not _warned_recompile:
            _warned_recompile = True
            warnings.warn("spread_optim: torch.compile reached its recompilation limit for the compiled CPU step; "
                          "the remaining layouts run the same step eagerly", RuntimeWarning,
                          stacklevel=dispatch.user_stacklevel())
        changed = int(step(*args, hyper, *extra, **flags))
    if changed:
        _adopt(kind, args, values, extra, flags)


def _adopt(kind: str, args: tuple, values: list[float], extra: tuple, flags: dict) -> None:
    """After a one-pass step left the entries (groups) whose weights were written outside the optimizer as they
    were: the spec's step, eagerly, with adoption, which steps just those (see :mod:`spread_optim.kernels.compiled`)."""
    step = compiled.element_step if kind == "element" else compiled.grouped_step
    step(*args, torch.tensor(values, dtype=torch.float64), *extra, **flags, adopt=True)


def _canonical(kind: str, g, p, factor, W, state_factor, state_W) -> tuple[tuple, Callable[[], None] | None]:
    """The compiled step's tensors in their canonical views (:func:`compiled.canonical`; the group factor and its
    state stay as they are), and a function to call after the step (None when there is nothing to do): a tensor
    without such a view (not contiguous) is stepped as a contiguous copy, which it then copies back."""
    written = [t for t in (p, factor, W, *state_factor, *state_W) if t is not None]
    copies = {id(t): t.contiguous() for t in (g, *written) if not t.is_contiguous()}

    def view(t, shaped: bool = True):
        if t is None:
            return None
        t_ = copies.get(id(t), t)
        return compiled.canonical(kind, t_) if shaped else t_

    element = kind == "element"
    args = (view(g), view(p), view(factor, element), view(W), tuple(view(t, element) for t in state_factor),
            tuple(view(t) for t in state_W))

    def write_back() -> None:
        for t in written:
            if id(t) in copies:
                t.copy_(copies[id(t)])

    return args, (write_back if copies else None)


_warned_recompile = False


def _compiled_step(kind: str, base_cls: type, group: dict, params, state, grad_scale, found_inf, structures=None) -> None:
    """The compiled CPU step of a param group (``kind``: ``"element"``, or ``"grouped"`` for parameters that each
    have their own ``u``) on tensors in canonical views (element and ids flat, rows ``(groups, -1)``, columns
    ``(d0, groups, -1)``): the tensors the native loops take in one call per dtype (:func:`native.batch_step`),
    the others one call each (:func:`_compiled_run`)."""
    if found_inf is not None and float(found_inf) != 0:
        return  # a step GradScaler skips: nothing moves, step counters included
    rule = _Rule(base_cls, group, torch.device("cpu"))
    flags = _compiled_flags(rule, group, grad_scale)
    ready = dispatch.native_ready(rule.name)
    factor = "U" if kind == "element" else "u"
    width = 3 if rule.adam else 1
    batches: dict = {}  # (dtype, first, layout): the tensors the native loops step in one call
    live = [p for p in params if p.grad is not None]
    sts = [state[p] for p in live]
    leaves = [leaf for st in sts for leaf in (st["base"][factor], st["base"]["W"])]  # (each tensor's two, in pairs)
    factors = [t for st in sts for t in (st[factor], st["W"])]
    slots, firsts = rule.states(leaves, factors)
    for i, (p, values) in enumerate(zip(live, _hypers(rule, group, leaves, grad_scale, ready))):
        if p.numel() == 0:
            continue  # (the step counts advance, as torch's own step on an empty tensor)
        layout, extra = ("element", ()) if kind == "element" else (structures[p].kind, (structures[p].ids,))
        f, W, slots_f, slots_W, first = factors[2 * i], factors[2 * i + 1], slots[2 * i], slots[2 * i + 1], bool(firsts[2 * i])
        # (a gradient swapped to another dtype under autograd's check is rounded to the factors', as the spec does)
        g = p.grad if p.grad.dtype == p.dtype else p.grad.to(W.dtype)
        if dispatch.cpu_engine(layout, g, p, f, flags, ready) == "native" and _contiguous(g, p, f, W, *slots_f, *slots_W):
            batches.setdefault((p.dtype, first, layout), []).append((g, p, f, W, slots_f, slots_W, values, layout, extra))
            continue
        step_flags = {**flags, "first": first} if kind == "element" else {**flags, "first": first, "groups": layout}
        args, write_back = _canonical(layout, g, p.detach(), f, W, tuple(slots_f[:width]), tuple(slots_W[:width]))
        _compiled_run(kind, args, values, extra, step_flags)
        if write_back is not None:
            write_back()
    for (_, first, layout), entries in batches.items():
        left = native.batch_step(native.KERNEL_OF[layout], [entry[:7] for entry in entries], **flags, first=first)
        for entry, changed in zip(entries, left):
            if changed:
                adopt_native(kind, flags, first, *entry)


def adopt_native(kind: str, flags: dict, first: bool, g, p, f, W, slots_f, slots_W, values, layout: str, extra) -> None:
    """After the native loops left entries (groups) of ``p`` for adoption (``kind``: ``"element"`` or
    ``"grouped"``; ``flags``: :func:`_compiled_flags`): the spec's step on them, eagerly, with adoption."""
    width = 3 if flags["rule"] == "adam" else 1
    step_flags = {**flags, "first": first} if kind == "element" else {**flags, "first": first, "groups": layout}
    args = _canonical(layout, g, p.detach(), f, W, tuple(slots_f[:width]), tuple(slots_W[:width]))[0]
    _adopt(kind, args, values, extra, step_flags)


def _contiguous(*tensors) -> bool:
    """Whether the tensors (None for a state the rule lacks) are all contiguous."""
    for t in tensors:
        if t is not None and not t.is_contiguous():
            return False
    return True


def compiled_element(base_cls: type, group: dict, params, state, grad_scale, found_inf) -> None:
    """The compiled CPU step of an element-sparse param group."""
    _compiled_step("element", base_cls, group, params, state, grad_scale, found_inf)


def compiled_grouped(base_cls: type, group: dict, sets, structures: dict, state, grad_scale, found_inf) -> None:
    """The compiled CPU step of a group-sparse param group whose parameters each have their own ``u``."""
    _compiled_step("grouped", base_cls, group, [p for (p,) in sets], state, grad_scale, found_inf, structures)


_ELEMENT = {"triton": triton_element, "compiled": compiled_element}
_GROUPED = {"triton": triton_grouped, "compiled": compiled_grouped}


def step_element(path: str, base_cls: type, group: dict, params, state, grad_scale, found_inf) -> None:
    """The fused step of an element-sparse param group on ``path`` (``"triton"`` or ``"compiled"``)."""
    _ELEMENT[path](base_cls, group, params, state, grad_scale, found_inf)


def step_grouped(path: str, base_cls: type, group: dict, sets, structures: dict, state, grad_scale, found_inf) -> None:
    """The fused step of a group-sparse param group on ``path``."""
    _GROUPED[path](base_cls, group, sets, structures, state, grad_scale, found_inf)
