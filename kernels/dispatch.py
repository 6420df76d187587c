"""The one place that decides which implementation steps a sparse param group.

:func:`choose` takes the group's tensors and options (never the optimizer) and returns a :class:`Choice`:

* ``"triton"``: the fused kernels (:mod:`.element`, :mod:`.group`), one pass over memory for the factor
  gradients, the base rule (SGD, Adam, AdamW), the exact-zero pass and theta;
* ``"compiled"``: the same fused step on CPU tensors, one tensor at a time: the native C loop (:mod:`.native`)
  where :func:`cpu_engine` takes it, else the spec compiled by ``torch.compile`` (:mod:`.compiled`);
* ``"cpu"``: the spec's CPU fast path (:mod:`.cpu`) around the torch base, for CPU tensors in eager mode;
* ``"spec"``: the spec itself (:mod:`.reference`) around the torch base: on other devices, on sharded
  (DTensor) parameters, and under ``torch.compile``, which fuses the spec's plain operations itself.

On the two split paths the factors are moved by the torch base; ``Choice.base_fused`` says whether that base is
asked for torch's one-pass fused CPU kernel (``fused=None`` and ``foreach=None`` on CPU tensors).

The base's own keyword ``fused`` chooses for SGD, Adam and AdamW:

* ``None`` (default): the kernels for CUDA tensors (when Triton is not installed, a one-time warning says so and the
  split path runs); on CPU the compiled step for an element-, row- or column-sparse group of float32/float64 parameters
  under SGD, Adam or AdamW (its native loops, :func:`native_takes`: built once per machine, seconds), and for any other
  group of at least :data:`COMPILE_MIN_NUMEL` elements (its first step compiles it: seconds, once per process and
  option set; inductor caches it on disk); the split path otherwise;
* ``False``: the split path;
* ``True``: the fused path, or an error that says why it cannot run: the kernels on CUDA, the compiled step on
  CPU (the Triton kernels in their interpreter when ``TRITON_INTERPRET=1``, which is how the tests run them).

Groups whose parameters share one factor (``share_groups``) take the compiled step's place on the split path.
Groups with ``depth > 2`` (:mod:`spread_optim.deep`) always run the spec: ``fused=True`` raises for them, and where
``fused=None`` would have chosen a fused path or the CPU fast path a one-time warning says the spec runs instead.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from spread_optim.kernels import native

#: the base rules with a fused path (exact classes: a subclass may change the rule)
FUSED_RULES = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}
_CPU_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: the smallest param group (elements) that fused=None compiles on CPU: below it the compile time outweighs the gain
COMPILE_MIN_NUMEL = 1 << 20
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_kernels: dict = {}
_warned = False


#: the paths that step a group in one fused pass (the torch base does not move their factors)
FUSED_PATHS = ("triton", "compiled")


@dataclass(frozen=True)
class Choice:
    path: str  # "triton", "compiled", "cpu" or "spec"
    base_fused: bool = False  # the split path's torch base runs its fused CPU kernel
    why_not_triton: str | None = None


def kernels() -> dict:
    """The Triton kernel modules, imported on first use (Triton is optional: ``{"error": ...}`` without it)."""
    if not _kernels:
        try:
            from spread_optim.kernels import element, group, rules

            _kernels.update(element=element, group=group, rules=rules)
        except Exception as error:  # pragma: no cover - depends on the installation
            _kernels["error"] = error
    return _kernels


def settings() -> tuple:
    """What :func:`choose` reads besides its arguments and this process's installation: an optimizer may reuse its
    choices while these stay the same (the switches ``SPREAD_OPTIM_NATIVE`` and ``TRITON_INTERPRET``,
    :data:`COMPILE_MIN_NUMEL`)."""
    return os.environ.get("SPREAD_OPTIM_NATIVE"), os.environ.get("TRITON_INTERPRET"), COMPILE_MIN_NUMEL


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called right here (the caller's frame is level 1) that names the
    user's line: the first frame outside this package (``spread_optim``, its ``kernels``) and torch."""
    import os
    import sys

    import spread_optim

    inside = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, spread_optim.__file__, torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _on_cuda(tensors: Sequence[torch.Tensor]) -> bool:
    return any(t.is_cuda for t in tensors)


def why_not_triton(params: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], one_dtype: bool, sharded: bool) -> str | None:
    """Why the kernels cannot step a group with these parameters (and all their factors, ``tensors``)."""
    if sharded:
        return "the parameters are sharded DTensors (FSDP2): the spec runs on their local shards"
    if not tensors:
        return None
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"the group's tensors are on several devices ({sorted(map(str, devices))})"
    device = next(iter(devices))
    if device.type != "cuda" and not interpreting():
        return f"its tensors are on {device.type} (the kernels run on CUDA devices, or on CPU under TRITON_INTERPRET=1)"
    error = kernels().get("error")
    if error is not None:
        return f"Triton is not available ({type(error).__name__}: {error})"
    if any(p.dtype not in _KERNEL_DTYPES for p in params):
        return "the kernels take float32, bfloat16 or float16 parameters (float64 runs the spec)"
    if any(not t.is_contiguous() for t in tensors):
        return "a parameter or factor is not contiguous"
    if one_dtype and len({p.dtype for p in params}) > 1:
        return "a group-sparse param group mixes parameter dtypes"
    return None


def why_not_compiled(params: Sequence[torch.Tensor], shared: bool, sharded: bool) -> str | None:
    """Why the compiled CPU step cannot step a group with these parameters."""
    if sharded:
        return "the parameters are sharded DTensors (FSDP2): the spec runs on their local shards"
    if not all(p.device.type == "cpu" for p in params):
        return "its tensors are not all on the CPU"
    if shared:
        return "its parameters share one factor per group (share_groups): the split path steps them"
    if any(p.dtype not in _CPU_FUSED_DTYPES for p in params):
        return "the compiled step takes float32, float64, bfloat16 or float16 parameters"
    from spread_optim.kernels import compiled

    return compiled.unavailable()


#: the layouts the native CPU loops step (:mod:`.native`): element sparsity, and one group factor per row or column
NATIVE_LAYOUTS = ("element", "row", "column")


def native_takes(params: Sequence[torch.Tensor], base_cls: type, layout: str | None) -> bool:
    """Whether the native CPU loops (:mod:`.native`) step every parameter of a sparse group: an element-, row- or
    column-sparse group (``layout``; each parameter with its own ``u``), float32 or float64 CPU tensors, torch's SGD,
    Adam or AdamW, and a C compiler to build them."""
    return (layout in NATIVE_LAYOUTS and base_cls in FUSED_RULES and bool(params)
            and all(p.device.type == "cpu" and p.dtype in native.DTYPES for p in params) and native.unavailable() is None)


def native_ready(rule: str) -> bool:
    """Whether the native loops can step a group under ``rule`` (``"sgd"``, ``"adam"``) on this machine (asked once per
    group and step: :func:`cpu_engine` then only looks at each tensor)."""
    return rule in ("sgd", "adam") and native.unavailable() is None


def cpu_engine(layout: str, g: torch.Tensor, p: torch.Tensor, factor: torch.Tensor, flags: dict, ready: bool | None = None) -> str:
    """Which engine runs the compiled CPU step of one tensor (canonical, contiguous views; ``layout``: ``"element"``
    or the grouped layout, ``"row"``, ``"column"``, ``"ids"``): ``"native"`` (:mod:`.native`: element, row or
    column sparsity, ``g``, ``p`` and the factors of one float32/float64 dtype, SGD or Adam) or ``"inductor"``
    (:mod:`.compiled`, everything else). ``ready``: :func:`native_ready` of ``flags["rule"]``, when already asked."""
    if ready is None:
        ready = native_ready(flags["rule"])
    if ready and layout in NATIVE_LAYOUTS and p.dtype in native.DTYPES and g.dtype == p.dtype == factor.dtype:
        return "native"
    return "inductor"


def choose(
    params: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], options: dict, *, base_cls: type,
    one_dtype: bool, shared: bool, sharded: bool, where: str, layout: str | None = None,
) -> Choice:
    """The implementation of one sparse param group (module docstring). ``params``: its parameters;
    ``tensors``: those and their factors; ``options``: the param group; ``one_dtype``: its kind's kernels need
    one parameter dtype; ``shared``: its parameters share factors; ``layout``: ``"element"``, ``"row"`` (every
    parameter row-sparse with its own ``u``) or None. Raises for ``fused=True`` when no fused path can run."""
    global _warned
    if options.get("depth", 2) != 2:  # depth-k factors: the PyTorch path only (see _deep_choice)
        return _deep_choice(params, tensors, options, base_cls=base_cls, one_dtype=one_dtype, shared=shared,
                            sharded=sharded, where=where)
    rule = FUSED_RULES.get(base_cls)
    fused = options.get("fused")
    on_cpu = bool(params) and all(p.device.type == "cpu" for p in params)
    if rule is not None and fused is True and on_cpu and not interpreting():
        reason = None if not sharded and native_takes(params, base_cls, layout) else why_not_compiled(params, shared, sharded)
        if reason is not None:
            raise RuntimeError(f"{where}: fused=True, but {reason}; use fused=None or False for the PyTorch path")
        return Choice("compiled")
    if rule is not None and (fused is True or (fused is None and _on_cuda(tensors))):
        reason = why_not_triton(params, tensors, one_dtype, sharded)
        if reason is None:
            return Choice("triton")
        if fused is True:
            raise RuntimeError(f"{where}: fused=True, but {reason}; use fused=None or False for the reference path")
        if "error" in kernels() and not _warned:  # (the other reasons are the user's choice: no warning)
            _warned = True
            warnings.warn(f"spread_optim: the fused kernels are off, {reason}; the reference path runs instead",
                          RuntimeWarning, stacklevel=user_stacklevel())
    if (rule is not None and fused is None and on_cpu and not compiling() and not sharded
            and (native_takes(params, base_cls, layout)
                 or sum(p.numel() for p in params) >= COMPILE_MIN_NUMEL and why_not_compiled(params, shared, sharded) is None)):
        return Choice("compiled")
    path = "cpu" if on_cpu and not sharded and not compiling() else "spec"
    base_fused = (rule is not None and fused is None and options.get("foreach") is None and not sharded
                  and not options.get("differentiable") and on_cpu and all(p.dtype in _CPU_FUSED_DTYPES for p in params))
    return Choice(path, base_fused, None)


# ----------------------------------------------------------------------------------------------------
# depth-k factors (spread_optim/deep.py): the fused paths take depth 2 only

_warned_depth = False


def _deep_choice(params, tensors, options: dict, *, base_cls: type, one_dtype: bool, shared: bool, sharded: bool,
                 where: str) -> Choice:
    """A group with ``depth > 2`` runs the spec (:mod:`spread_optim.deep`), never a fused path (the Triton kernels,
    the compiled CPU step) nor the CPU fast path: where one of those would have run at depth 2 (``fused=None``), a
    one-time ``RuntimeWarning`` says so; ``fused=True`` raises, on every device, as for any group no fused path can
    step. The torch base on the factors keeps its own fused CPU kernel."""
    global _warned_depth
    reason = (f"'depth'={options['depth']}: the fused paths (Triton kernels, compiled CPU step) and the CPU fast path "
              "take depth 2 only")
    if options.get("fused") is True and base_cls in FUSED_RULES:
        raise RuntimeError(f"{where}: fused=True, but {reason}; use fused=None or False for the reference path")
    at_depth_2 = choose(params, tensors, {**options, "depth": 2}, base_cls=base_cls, one_dtype=one_dtype,
                        shared=shared, sharded=sharded, where=where)
    if at_depth_2.path != "spec" and not _warned_depth:
        _warned_depth = True
        warnings.warn(f"spread_optim: {reason}; the PyTorch reference path runs instead (this note is shown once)",
                      RuntimeWarning, stacklevel=user_stacklevel())
    return Choice("spec", at_depth_2.base_fused, reason)
