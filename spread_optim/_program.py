"""The step of a kept plan on the native CPU loops: every sparse group's tensors gathered in one pass and stepped in
one call per dtype, loop and flags (:mod:`spread_optim.kernels.native`).

A small model's step is mostly Python: per group its rule and options, per tensor its state and engine, looked up
again at every step. While the optimizer keeps its plan (nothing the plan reads has changed:
:meth:`SpreadOptimizer._reuse_plan`), the answers are known but for what a step may change without changing the
plan: the gradients, the tensors' data pointers, the base's state entries and step counters, and the numbers a
schedule moves (lr, kappa, ...). A :class:`NativeProgram` keeps the rest and reads just those.

It computes what :func:`spread_optim._fused.compiled_element` and ``compiled_grouped`` compute, the same loops on the
same tensors with the same numbers (:func:`spread_optim._fused.hyper_rows`), and declines a step (the full path then
runs it, and the optimizer builds the program again) wherever they would do something else: a gradient not of its
parameter's dtype, shape and strided contiguous layout, a base state created or replaced since the program was built
(or no longer contiguous), a momentum turned on or off, a non-finite gradient (the full path raises), a step scaled
by ``GradScaler``. The states it steps are checked once, when it is built: tensors of their factor's size, dtype and
device (the loops write through their pointers), step counters that the native counter advances.

The non-finite-gradient check reads every gradient before anything moves. The columns loop's first pass reads its
tensors' gradients too, and moves nothing: where one call steps every columns tensor on one thread, that call goes
first and its sums are those tensors' check (an inf or a NaN makes a sum ``g*W`` non-finite), which saves a read of
them (about 0.3 ns per element, 15% of a column-sparse ResNet-18's step on an Intel Xeon). A sum that is not finite
declines the step, with the step counters put back: the full path's own check then raises, or, where finite gradients
only overflowed a sum, takes the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from spread_optim import _fused
from spread_optim.kernels import dispatch, native
from spread_optim.sparsity import Element, Grouped, Kind

@dataclass
class _Tensor:
    """One parameter of the program: what the plan fixed (its factors, loop and sizes) and the base states it found
    (``cells``: per rule state in the loops' order, ``(dict, key, tensor)``, None where the rule keeps none;
    ``counters``: ``(dict, step tensor)`` of both factors, Adam)."""

    p: torch.Tensor
    factor: torch.Tensor
    W: torch.Tensor
    kernel: str
    layout: str
    extra: tuple
    shape: torch.Size
    extents: tuple
    dicts: tuple  # (the base's dict, factor key, the factor's base state, W's)
    cells: tuple
    counters: tuple  # (dict, step tensor, its dtype)
    counter_sizes: tuple  # (their bytes)
    check: tuple  # (entries, bytes per entry) of the gradient, for the non-finite check


class NativeProgram:
    """The native step of every sparse group of a kept plan (see the module docstring): :meth:`of` builds it when
    every group takes the native loops, :meth:`prepare` gathers a step (None: decline it), :meth:`run` steps it."""

    def __init__(self, base_cls: type, groups: list[tuple[dict, str, bool, list[_Tensor], list[torch.Tensor]]]):
        self.base_cls, self.rule = base_cls, dispatch.FUSED_RULES[base_cls]
        self.groups = groups  # (param group, "element" or "grouped", momentum on (SGD), tensors, parameters never stepped)

    @classmethod
    def of(cls, kinds: list[Kind], base_cls: type, state) -> "NativeProgram | None":
        """The program of ``kinds`` (the plan's sparse groups, stepped since the plan was made: their states exist),
        or None when one of their tensors takes another path or a state is not as the loops need it."""
        rule = dispatch.FUSED_RULES.get(base_cls)
        if not kinds or rule is None or not dispatch.native_ready(rule):
            return None
        groups = []
        for kind in kinds:
            if kind.path != "compiled" or not (type(kind) is Element or type(kind) is Grouped and not kind.shared):
                return None  # (a deeper factorisation's kinds are subclasses: not these loops)
            name, key = ("element", "U") if type(kind) is Element else ("grouped", "u")
            group = kind.group
            momentum = rule == "sgd" and group.get("momentum", 0) != 0
            names = (("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[:3 if group.get("amsgrad", False) else 2] if rule == "adam"
                     else ("momentum_buffer",) if momentum else ())
            tensors, absent = [], []
            for p in kind.params:
                layout = "element" if name == "element" else kind.structures[p].kind
                found = _found(state.get(p), key, names, rule == "adam")
                if found is None and p.grad is None:
                    absent.append(p)  # (not stepped yet: while its gradient stays None, nothing of it moves)
                    continue
                if found is None or not p.is_cpu or not p.numel() or not p.is_contiguous():
                    return None
                factor, W, dicts, cells, counters = found
                # (the engine the full path would choose: the gradient's dtype is checked at every step)
                if dispatch.cpu_engine(layout, p, p, factor, {"rule": rule}, True) != "native":
                    return None
                if not (_fits(factor, p, factor.shape) and _fits(W, p, p.shape)
                        and all(_fits(c[2], p, (factor if i < 3 else W).shape) for i, c in enumerate(cells) if c is not None)):
                    return None
                kernel = native.KERNEL_OF[layout]
                tensors.append(_Tensor(p, factor, W, kernel, layout, () if name == "element" else (kind.structures[p].ids,),
                                       p.shape, native.extents(kernel, p), dicts, cells,
                                       tuple((d, s, s.dtype) for d, s in counters),
                                       tuple(s.element_size() for _, s in counters), (p.numel(), p.element_size())))
            groups.append((group, name, momentum, tensors, absent))
        return cls(base_cls, groups)

    def prepare(self) -> tuple | None:
        """This step's calls, ``[(dtype, kernel, flags, group, kind's name, tensors, sizes, pointers, where their
        step counts are, their gradients' check sizes and pointers)]``, the step counters' ``(sizes, pointers)`` and
        whether the first call checks its own gradients (:meth:`run`), or None (decline) when the full path must run
        it. Nothing moves."""
        adam = self.rule == "adam"
        calls, check_sizes, check_ptrs, counter_sizes, counter_ptrs = [], [], [], [], []
        for group, name, momentum, tensors, absent in self.groups:
            if not adam and (group.get("momentum", 0) != 0) != momentum:
                return None
            for p in absent:
                if p.grad is not None:
                    return None  # (its first step creates its state)
            flags = native.flags(self.rule, adam and bool(group.get("amsgrad", False)), bool(group.get("nesterov", False)),
                                 momentum, False, bool(group.get("maximize", False)))
            batches: dict = {}
            for t in tensors:
                p = t.p
                g = p.grad
                if g is None:
                    continue
                if g.dtype != p.dtype or g.shape != t.shape or g.layout != torch.strided or not g.is_contiguous():
                    return None
                base, key, fs, ws = t.dicts
                if base.get(key) is not fs or base.get("W") is not ws:
                    return None
                g_ptr = g.data_ptr()
                ptrs = [g_ptr, p.data_ptr(), t.factor.data_ptr(), t.W.data_ptr()]
                for cell in t.cells:
                    if cell is None:
                        ptrs.append(0)
                        continue
                    d, entry, s = cell
                    if d.get(entry) is not s or not s.is_contiguous():
                        return None
                    ptrs.append(s.data_ptr())
                batch = batches.setdefault((p.dtype, t.kernel), ([], [], [], [], [], []))
                for d, s, dtype in t.counters:
                    if d.get("step") is not s or s.dtype != dtype:
                        return None
                    batch[3].append(len(counter_ptrs))  # (where its count will be: one call advances them all)
                    counter_ptrs.append(s.data_ptr())
                counter_sizes += t.counter_sizes
                batch[0].append(t)
                batch[1].extend(t.extents)
                batch[2].extend(ptrs)
                batch[4].extend(t.check)
                batch[5].append(g_ptr)
            calls += [(dtype, kernel, flags, group, name, *batch) for (dtype, kernel), batch in batches.items()]
        columns = [i for i, c in enumerate(calls) if c[1] == "columns"]
        checked = len(columns) == 1 and native.one_call("columns", len(calls[columns[0]][5]), calls[columns[0]][6])
        if checked:  # (that call first)
            calls.insert(0, calls.pop(columns[0]))
        for call in calls[1 if checked else 0:]:
            check_sizes += call[9]
            check_ptrs += call[10]
        if native.nonfinite_at(check_sizes, check_ptrs):
            return None  # (the full path raises, naming the parameter)
        return calls, (counter_sizes, counter_ptrs), checked

    def run(self, prepared: tuple, dense=None) -> bool:
        """Step what :meth:`prepare` gathered: advance Adam's step counters (one call), then each call's loop; the
        entries a loop left for adoption (weights written outside the optimizer) take the spec's step with adoption.
        ``dense``: the dense groups' step, taken before the loops (after the first, where that one checks its own
        gradients). Where one columns call steps every columns tensor in one thread, it goes first and its sums pass
        is their non-finite check (:func:`native.launch_checked`): when it finds one, the counters are put back and
        False returned, with nothing moved (the full path then raises, naming the parameter)."""
        calls, counters, checked = prepared
        before: list[float] = []
        counts = native.advance(*counters, before) if self.rule == "adam" else None
        if checked and not self._launch(calls[0], counts, checked=True):
            native.set_counts(*counters, before)
            return False
        if dense is not None:
            dense()
        for call in calls[1 if checked else 0:]:
            self._launch(call, counts)
        return True

    def _launch(self, call: tuple, counts: list[float] | None, checked: bool = False) -> bool:
        """One call's loop and the adoption of what it left; False (nothing moved) when a checked call declines."""
        dtype, kernel, flags, group, name, tensors, sizes, ptrs, at = call[:9]
        rows = _fused.hyper_rows(group, len(tensors), None if counts is None else [counts[i] for i in at])
        h = list(chain.from_iterable(rows))
        left = (native.launch_checked(dtype, len(tensors), sizes, ptrs, h, flags) if checked
                else native.launch(kernel, dtype, len(tensors), sizes, ptrs, h, flags))
        if left is None:
            return False
        for t, changed, values in zip(tensors, left, rows):
            if changed:
                self._adopt(group, name, t, values)
        return True

    def _adopt(self, group: dict, name: str, t: _Tensor, values: list[float]) -> None:
        """The spec's step with adoption of the entries of ``t`` the loop left (see :func:`_fused.adopt_native`)."""
        flags = _fused._compiled_flags(_fused._Rule(self.base_cls, group, torch.device("cpu")), group, None)
        states = [None if c is None else c[2] for c in t.cells]
        _fused.adopt_native(name, flags, False, t.p.grad, t.p, t.factor, t.W, states[:3], states[3:], values, t.layout, t.extra)


def _found(st: dict | None, key: str, names: tuple, adam: bool) -> tuple | None:
    """``(factor, W, dicts, cells, counters)`` of :class:`_Tensor` from one parameter's state ``st`` (rule states
    ``names``; the cells in the order of :func:`native.pointers`' last six), or None when one is missing (the full
    path creates it)."""
    base = st.get("base") if st else None
    fs, ws = (base.get(key), base.get("W")) if isinstance(base, dict) else (None, None)
    if not isinstance(fs, dict) or not isinstance(ws, dict) or key not in st or "W" not in st:
        return None
    pad = (None,) * (3 - len(names))
    cells = (*((fs, n, fs.get(n)) for n in names), *pad, *((ws, n, ws.get(n)) for n in names), *pad)
    counters = ((fs, fs.get("step")), (ws, ws.get("step"))) if adam else ()
    if any(c is not None and not isinstance(c[2], torch.Tensor) for c in cells) or any(
            not isinstance(s, torch.Tensor) or not s.is_cpu or s.dtype not in native.DTYPES or s.ndim for _, s in counters):
        return None
    return st[key], st["W"], (base, key, fs, ws), cells, counters


def _fits(t: torch.Tensor, p: torch.Tensor, shape) -> bool:
    """Whether ``t`` is a contiguous CPU tensor of ``p``'s dtype and of ``shape``, as the loops read and write it."""
    return t.is_cpu and t.dtype == p.dtype and t.shape == shape and t.is_contiguous()
