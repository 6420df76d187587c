"""Dispatch of sparse param groups to the fused Triton kernels (``spread_optim.kernels.element`` / ``.group``).

The kernels compute the same numbers as the reference path (factor gradients, the torch base rule on the
factors, the exact-zero pass; see :mod:`spread_optim.kernels.reference`), and read and write the same
state: ``optimizer.state[p]["base"][factor]`` holds torch's own keys (``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``; ``momentum_buffer``), so a run can switch between ``fused=True`` and
``fused=False`` and checkpoints load either way.

``fused`` (the base's own keyword of SGD, Adam and AdamW) chooses, per param group:

* ``None`` (default): the kernels for sparse groups whose tensors are on a CUDA device, the reference
  otherwise (and when Triton is not installed: then a one-time warning says so);
* ``False``: the reference;
* ``True``: the kernels, or an error that says why they cannot run (on CPU tensors they run only under
  the Triton interpreter, ``TRITON_INTERPRET=1``, which is how the tests run them).

Dense groups (``kappa = 0``) are always stepped by the torch base itself, with the same ``fused``.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

#: the bases with a fused path and their rule (exact classes: a subclass may change the rule)
FUSED_BASES = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}
_warned = False
_kernels: dict = {}


def kernels() -> dict:
    """The kernel modules, imported on first use (Triton is optional: ``{"error": ...}`` without it)."""
    if not _kernels:
        try:
            from spread_optim.kernels import element, group, rules

            _kernels.update(element=element, group=group, rules=rules)
        except Exception as error:  # pragma: no cover - depends on the installation
            _kernels["error"] = error
    return _kernels


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _group_tensors(optimizer, group) -> list[torch.Tensor]:
    tensors = []
    for p in group["params"]:
        tensors.append(p)
        tensors.extend(t for _, t in optimizer._factor_leaves(p))
    return tensors


def unsupported(optimizer, group) -> str | None:
    """Why the kernels cannot step this sparse group (None when they can)."""
    if optimizer._base_cls not in FUSED_BASES:
        return f"there is no fused spread kernel for base {optimizer._base_cls.__name__} (only SGD, Adam, AdamW)"
    if getattr(optimizer, "_sharded", None):
        return "the parameters are sharded DTensors (FSDP2): the sharded reference path runs them"
    tensors = _group_tensors(optimizer, group)
    if not tensors:
        return None
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"the group's tensors are on several devices ({sorted(map(str, devices))})"
    device = tensors[0].device
    if device.type != "cuda" and not interpreting():
        return f"its tensors are on {device.type} (the kernels run on CUDA devices, or on CPU under TRITON_INTERPRET=1)"
    error = kernels().get("error")
    if error is not None:
        return f"Triton is not available ({type(error).__name__}: {error})"
    params = list(group["params"])
    if any(p.dtype not in (torch.float32, torch.bfloat16, torch.float16) for p in params):
        return "the kernels take float32, bfloat16 or float16 parameters (float64 runs the reference)"
    if any(not t.is_contiguous() for t in tensors):
        return "a parameter or factor is not contiguous"
    if not optimizer._is_element(group) and len({p.dtype for p in params}) > 1:
        return "a group-sparse param group mixes parameter dtypes"
    return None


def _on_cuda(group) -> bool:
    return any(p.is_cuda for p in group["params"])


def uses_kernels(optimizer, group, index: int) -> bool:
    """The dispatch rule of the module docstring (raises for ``fused=True`` when the kernels cannot run)."""
    global _warned
    if not optimizer._is_sparse(group) or optimizer._base_cls not in FUSED_BASES:
        return False
    fused = group.get("fused")
    if fused is False or (fused is None and not _on_cuda(group)):
        return False
    reason = unsupported(optimizer, group)
    if fused:
        if reason is not None:
            raise RuntimeError(f"param group {index}: fused=True, but {reason}; use fused=None or False for the reference path")
        return True
    if reason is None:
        return True
    if "error" in kernels() and not _warned:  # (the other reasons are the user's choice: no warning)
        _warned = True
        warnings.warn(f"spread_optim: the fused kernels are off, {reason}; the reference path runs instead", RuntimeWarning, stacklevel=4)
    return False


def cpu_fused_base(optimizer, group) -> bool:
    """Whether the factors of a sparse group on the reference path go to torch's fused CPU SGD/Adam/AdamW
    (one pass instead of several; the same formulas): with ``fused=None`` and ``foreach=None`` on CPU
    tensors (not sharded), when the base has such a kernel. ``fused=False`` keeps torch's default."""
    if optimizer._base_cls not in FUSED_BASES or group.get("fused") is not None or group.get("foreach") is not None:
        return False
    if getattr(optimizer, "_sharded", None) or group.get("differentiable"):
        return False
    params = group["params"]
    return bool(params) and all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) for p in params)


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
    wanted = leaf.device if steps_on_device else torch.device("cpu")
    if st["step"].device != wanted:  # e.g. a checkpoint of the other path
        st["step"] = st["step"].to(wanted, dtype=torch.float32 if steps_on_device else st["step"].dtype)
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

    def __init__(self, optimizer, group, device: torch.device):
        self.adam = FUSED_BASES[optimizer._base_cls] == "adam"
        self.rule = kernels()["rules"].ADAM if self.adam else kernels()["rules"].SGD
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
            lr = self.group["lr"].double() if isinstance(self.group["lr"], torch.Tensor) else self.lr
            values = torch.stack([lr / (1 - self.beta1 ** t), (1 - self.beta2 ** t).sqrt()], dim=1)
            return values.float(), steps
        rows = []
        for s in steps:
            n = s.item()
            rows.append([self.lr / (1 - self.beta1 ** n), math.sqrt(1 - self.beta2 ** n)])
        return torch.tensor(rows, dtype=torch.float32, device=self.device), []


def nonfinite_flag(optimizer) -> torch.Tensor | None:
    """For the capturable fused groups (no host synchronisation allowed): a device flag, 1 when a gradient
    of theirs has a NaN or inf. The kernels then skip the step on the device, as with GradScaler's
    ``found_inf``: nothing moves, step counters included."""
    grads = [p.grad for g in optimizer.param_groups if id(g) in optimizer._fused_groups and g.get("capturable")
             for p in g["params"] if p.grad is not None]
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
    return kernels()["rules"].StepOptions(rule=rule.rule, kappa=group["kappa"], lr_revive=float(group["lr"]),
                                         zero_threshold=group["zero_threshold"], maximize=bool(group.get("maximize", False)),
                                         **rule.options)


def step_group(optimizer, group, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    """Step one sparse param group with the kernels."""
    params = [p for p in group["params"]]
    if not params:
        return
    device = params[0].device
    rule = _Rule(optimizer, group, device)
    scaler = dict(grad_scale=grad_scale, found_inf=found_inf)
    if optimizer._is_element(group):
        live = [(p, _grad(p)) for p in params if p.grad is not None]
        if not live:
            return
        sts = [optimizer.state[p] for p, _ in live]
        leaf_states = [st["base"][k] for st in sts for k in ("U", "W")]
        slots, firsts = rule.states(leaf_states, [st[k] for st in sts for k in ("U", "W")])
        hyper, device_steps = rule.hyper(leaf_states)
        kernels()["element"].element_step(
            [g for _, g in live], [p for p, _ in live], [st["U"] for st in sts], [st["W"] for st in sts],
            [slots[2 * i] + slots[2 * i + 1] for i in range(len(live))], hyper.reshape(-1, 4).contiguous(),
            _table([firsts[2 * i:2 * i + 2] for i in range(len(live))], torch.int32, device),
            _options(rule, group), **scaler,
        )
    else:
        share_sets = [m for m in optimizer._share_sets(group) if any(p.grad is not None for p in m)]
        if not share_sets:
            return
        Ws, thetas, grads, structures, share_index, w_states = [], [], [], [], [], []
        us, u_states = [], []
        for k, members in enumerate(share_sets):
            st0 = optimizer.state[members[0]]
            us.append(st0["u"])
            u_states.append(st0["base"]["u"])
            for p in members:
                Ws.append(optimizer.state[p]["W"])
                w_states.append(optimizer.state[p]["base"]["W"])
                thetas.append(p)
                grads.append(_grad(p))
                structures.append(optimizer._structure(p, group))
                share_index.append(k)
        live = [i for i, g in enumerate(grads) if g is not None]
        w_slots = [[None, None, None] for _ in Ws]
        w_firsts = [0] * len(Ws)
        live_slots, live_firsts = rule.states([w_states[i] for i in live], [Ws[i] for i in live])
        for i, s, f in zip(live, live_slots, live_firsts):
            w_slots[i], w_firsts[i] = s, f
        u_slots, u_firsts = rule.states(u_states, us)
        live_hyper, w_steps = rule.hyper([w_states[i] for i in live])
        w_hyper = torch.ones(len(Ws), 2, dtype=torch.float32, device=device)
        if live:
            w_hyper[_table(live, torch.int64, device)] = live_hyper
        u_hyper, u_steps = rule.hyper(u_states)
        device_steps = w_steps + u_steps
        kernels()["group"].group_step(
            grads, thetas, Ws, structures, share_index, w_slots, w_hyper,
            _table(w_firsts, torch.int32, device), us, u_slots, u_hyper.contiguous(), _table(u_firsts, torch.int32, device),
            _options(rule, group), **scaler,
        )
    if found_inf is not None and device_steps:  # a skipped step does not count (as torch's fused Adam)
        torch._foreach_sub_(device_steps, [found_inf.reshape(()).to(device_steps[0].dtype)] * len(device_steps))
