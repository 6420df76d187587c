r"""The CPU step in one pass over memory: ``native_step.c``, built on first use with the machine's C compiler and
called through ``ctypes``. Three kernels, for float32 and float64 parameters under the SGD and Adam rules:

* :func:`element_step`: the spec's element step of one tensor (:func:`spread_optim.kernels.compiled.element_step`,
  composed of :mod:`.reference`), bit for bit: the factor gradients, the base rule, the exact-zero pass and theta
  in one loop;
* :func:`rows_step`: the spec's row-sparse step (:func:`~spread_optim.kernels.compiled.grouped_step`, rows), each
  row swept three times while it stays in cache (its sums first, since the zero pass needs the moved row's norms),
  the next row fetched meanwhile (rows of one entry, biases and norms' scales, side by side in one vectorised loop);
  equal to the spec to rounding (its sums are taken in another order);
* :func:`columns_step`: the same for column sparsity (dim-1 slices, whose sums span every row): two passes over the
  tensor (the few sums needed before anything moves; then the move, with a dead column's zero pass decided before
  it), rows over 4 KB two at a time, and one more sweep over the rows only for the rare columns that snap to zero;
  equal to the spec to rounding.

Entries (rows) whose weight no longer equals their factors' product were written outside the optimizer: both leave
them as they are and count them, and the caller adopts them (as after the compiled step). Against the compiled step
(inductor) they save the separate pass that counts those entries, about half of the instructions per entry (no mask
conversions), the row kernel two of its three passes over memory, and both the per-call guards of
``torch.compile``.

The library is built once per source, compiler and CPU (``-O3 -march=native``, no fast-math and no contraction into
fused multiply-adds, so the numbers are the spec's) into a cache folder: ``$SPREAD_OPTIM_CACHE`` or
``~/.cache/spread_optim``; without a C compiler (or with ``SPREAD_OPTIM_NATIVE=0``) :func:`unavailable` says why,
and the compiled step runs inductor's code instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from array import array
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native_step.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-std=c99", "-shared", "-fPIC")
#: the driver's options whose value names the target CPU or one of its features (clang)
TARGET_OPTIONS = ("-target-cpu", "-target-feature", "-tune-cpu")
#: the parameter dtypes it steps (factors of the same dtype)
DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_RULES = {"sgd": 0, "sgd_momentum": 1, "adam": 2}
#: the loops: one factor per entry, per row (dim-0 slice), per column (dim-1 slice)
KERNELS = ("element", "rows", "columns")
#: the kernel of each layout of the compiled step (:func:`spread_optim.kernels.compiled.canonical`)
KERNEL_OF = {"element": "element", "row": "rows", "column": "columns"}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    root = os.environ.get("SPREAD_OPTIM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "spread_optim"


def _target(cc: str) -> str:
    """What ``-march=native`` means to this compiler on this machine, from the driver's expanded command (``-###``,
    nothing compiled): gcc's ``-march=<cpu>`` and every ``-m`` feature, clang's ``-target-cpu`` and
    ``-target-feature`` list. A cache folder shared by machines of different CPUs (a home folder on a cluster) then
    holds one library per CPU, and none is loaded where its instructions do not exist."""
    try:
        done = subprocess.run([cc, *FLAGS[:2], "-###", "-E", "-x", "c", os.devnull], capture_output=True, text=True,
                              timeout=60)
        words = [w.strip('"') for w in (done.stdout + done.stderr).split()]
    except (OSError, subprocess.SubprocessError) as error:
        words = [type(error).__name__]
    named = [w for i, w in enumerate(words) if w.startswith("-m") or i and words[i - 1] in TARGET_OPTIONS]
    return " ".join((platform.machine(), *(named or words)))


def _build_key(cc: str) -> str:
    """The library's name in the cache: a hash of the source, the compiler and its flags, and the CPU they target."""
    material = SOURCE.read_bytes() + "\n".join((cc, *FLAGS, _target(cc))).encode()
    return hashlib.sha256(material).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | str:
    """The loaded library, or why it cannot be built here (a string)."""
    if sys.platform == "win32":
        return "the native CPU step is built on Linux and macOS only"
    cc = _compiler()
    if cc is None:
        return "no C compiler found (set CC, or install cc, gcc or clang)"
    if not SOURCE.is_file():
        return f"the native loops' source is missing from the installation ({SOURCE})"
    target = _cache_dir() / f"native_step_{_build_key(cc)}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then moved: safe across processes
                out = Path(tmp) / target.name
                done = subprocess.run([cc, *FLAGS, "-o", str(out), str(SOURCE)], capture_output=True, text=True)
                if done.returncode != 0:
                    return f"the C compiler failed ({cc}): {done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else done.returncode}"
                os.replace(out, target)
        lib = ctypes.CDLL(str(target))
    except OSError as error:
        return f"the native CPU step could not be built or loaded ({type(error).__name__}: {error})"
    lib.spread_nonfinite_batch.restype = ctypes.c_int64
    lib.spread_nonfinite_batch.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 3]
    for name in ("spread_count_steps", "spread_set_counts"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 3]
    for suffix in DTYPES.values():
        for kernel in (*KERNELS, "columns_checked"):
            batch = getattr(lib, f"spread_{kernel}_batch_{suffix}")
            batch.restype = None
            batch.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 3, *[ctypes.c_int] * 6, ctypes.c_void_p]
    return lib


def unavailable() -> str | None:
    """Why the native step cannot run here, or None when it can (``SPREAD_OPTIM_NATIVE=0`` turns it off: the
    compiled step then runs inductor's code)."""
    if os.environ.get("SPREAD_OPTIM_NATIVE") == "0":
        return "turned off by SPREAD_OPTIM_NATIVE=0"
    lib = _library()
    return lib if isinstance(lib, str) else None


def nonfinite(grads: list[torch.Tensor]) -> list[int]:
    """For each contiguous float32/float64 CPU tensor, 1 when it holds an inf or a NaN, else 0: one read of each, in
    one call (about twice as fast as ``torch.aminmax`` out of cache)."""
    sizes = [n for g in grads for n in (g.numel(), g.element_size())]
    return _check(sizes, [g.data_ptr() for g in grads])[1].tolist()


def nonfinite_at(sizes: list[int], ptrs: list[int]) -> int:
    """:func:`nonfinite` of the tensors at ``ptrs`` (``sizes``: entries and bytes per entry of each, checked by the
    caller): how many hold an inf or a NaN."""
    return _check(sizes, ptrs)[0]


def _check(sizes: list[int], ptrs: list[int]) -> tuple[int, array]:
    bad = array("q", bytes(8 * len(ptrs)))
    if not ptrs:
        return 0, bad
    sizes, ptrs = array("q", sizes), array("q", ptrs)
    return _library().spread_nonfinite_batch(len(bad), sizes.buffer_info()[0], ptrs.buffer_info()[0], bad.buffer_info()[0]), bad


def count_steps(steps: list[torch.Tensor]) -> list[float] | None:
    """Advance torch's step counters (0-dimensional float32/float64 CPU tensors) by one in place, in one call, and
    return the new counts; None, with nothing advanced, when one of them is not such a tensor."""
    for s in steps:
        if s.dtype not in DTYPES or not s.is_cpu or s.ndim:
            return None
    return advance([s.element_size() for s in steps], [s.data_ptr() for s in steps])


def advance(sizes: list[int], ptrs: list[int], before: list[float] | None = None) -> list[float]:
    """:func:`count_steps` of the counters at ``ptrs`` (``sizes``: their bytes, 4 or 8), checked by the caller;
    ``before`` receives the counts they had (for :func:`set_counts`)."""
    count = len(ptrs)
    out = array("d", bytes(16 * count))
    if ptrs:
        sizes, ptrs = array("q", sizes), array("q", ptrs)
        _library().spread_count_steps(count, sizes.buffer_info()[0], ptrs.buffer_info()[0], out.buffer_info()[0])
    if before is not None:
        before[:] = out[count:].tolist()
    return out[:count].tolist()


def set_counts(sizes: list[int], ptrs: list[int], values: list[float]) -> None:
    """Put the counters at ``ptrs`` back to ``values`` (:func:`advance`'s ``before``)."""
    if ptrs:
        sizes, ptrs, values = array("q", sizes), array("q", ptrs), array("d", values)
        _library().spread_set_counts(len(ptrs), sizes.buffer_info()[0], ptrs.buffer_info()[0], values.buffer_info()[0])


def _code(rule: str, momentum: bool) -> int:
    return _RULES["adam"] if rule == "adam" else _RULES["sgd_momentum"] if momentum else _RULES["sgd"]


#: a step of at least this many elements is split across torch's CPU threads (``torch.get_num_threads()``): each
#: runs the C loop on its share without the GIL; below it one thread is faster
PARALLEL_MIN = 1 << 18
#: which of the ten pointers of a rows item point at one value per row (the group factor ``u`` and its states)
_PER_ROW = (2, 4, 5, 6)
_pool: list = []  # [ThreadPoolExecutor, (its size, the process it belongs to)]
_NO_SCRATCH = "the native columns step could not allocate its scratch memory; the tensor it stopped at was not moved"


def batch_step(kernel: str, items: list[tuple], *, rule: str, amsgrad: bool = False, nesterov: bool = False,
               momentum: bool = False, first: bool = False, maximize: bool = False, scaled: bool = False,
               checked: bool = False, **_) -> list[int] | None:
    """Many tensors of one dtype in one call (``kernel``: ``"element"``, ``"rows"`` or ``"columns"``): ``items``
    are the arguments of :func:`element_step` / :func:`rows_step` / :func:`columns_step` without the flags, ``(g, p,
    factor, W, state_factor, state_W, hyper)``; returns what each of those calls would return (:func:`launch`;
    ``checked``, columns only: :func:`launch_checked`, None where it declines)."""
    sizes, ptrs, h = [], [], []
    for g, p, factor, W, state_factor, state_W, hyper in items:
        sizes += extents(kernel, p)
        ptrs += pointers(g, p, factor, W, state_factor, state_W)
        h += hyper
    codes = flags(rule, amsgrad, nesterov, momentum, first, maximize, scaled)
    if checked:
        assert kernel == "columns", "only the columns loop checks its gradients in its sums pass"
        return launch_checked(items[0][1].dtype, len(items), sizes, ptrs, h, codes)
    return launch(kernel, items[0][1].dtype, len(items), sizes, ptrs, h, codes)


def extents(kernel: str, p: torch.Tensor) -> tuple[int, int, int]:
    """The three sizes of ``p`` for ``kernel``: entries (element) or rows, the row's width, and the entries per row
    and column (columns; else 1)."""
    if kernel == "element":
        return p.numel(), 1, 1
    width = p.numel() // p.shape[0] if p.shape[0] else 0
    return p.shape[0], width, width // p.shape[1] if kernel == "columns" and p.shape[1] else 1


def pointers(g, p, factor, W, state_factor, state_W) -> tuple[int, ...]:
    """The ten pointers of one tensor's step (0 for a state the rule lacks: ``state_factor``/``state_W`` list up to
    three tensors or None)."""
    a0, a1, a2 = (*state_factor, None, None, None)[:3]
    b0, b1, b2 = (*state_W, None, None, None)[:3]
    return (g.data_ptr(), p.data_ptr(), factor.data_ptr(), W.data_ptr(),
            0 if a0 is None else a0.data_ptr(), 0 if a1 is None else a1.data_ptr(), 0 if a2 is None else a2.data_ptr(),
            0 if b0 is None else b0.data_ptr(), 0 if b1 is None else b1.data_ptr(), 0 if b2 is None else b2.data_ptr())


def flags(rule: str, amsgrad: bool = False, nesterov: bool = False, momentum: bool = False, first: bool = False,
          maximize: bool = False, scaled: bool = False) -> tuple[int, ...]:
    """The six flags of the C entry points: rule code, amsgrad, nesterov, first, maximize, scaled."""
    return _code(rule, momentum), int(amsgrad), int(nesterov), int(first), int(maximize), int(scaled)


def launch(kernel: str, dtype: torch.dtype, count: int, sizes, ptrs, h, flags: tuple[int, ...]) -> list[int]:
    """Step ``count`` tensors of ``dtype`` in one call of ``kernel``: ``sizes`` (3 per tensor, :func:`extents`),
    ``ptrs`` (10 per tensor, :func:`pointers`) and ``h`` (13 per tensor, :data:`.compiled.HYPER`) as flat sequences,
    ``flags`` from :func:`flags`; returns per tensor the entries (rows, columns) it left for adoption. A large step is
    cut into shares, one per torch CPU thread: equal shares of entries (rows); columns tensors stay whole (a column's
    sums span all rows), several of them shared out by size. Every entry (row, column) is stepped once, by the same
    loop, so the numbers do not depend on the thread count."""
    fn = getattr(_library(), f"spread_{kernel}_batch_{DTYPES[dtype]}")
    sizes, ptrs, h = array("q", sizes), array("q", ptrs), array("d", h)  # (flat C arrays: built faster than ctypes')
    if one_call(kernel, count, sizes):
        return _call(fn, count, sizes, ptrs, h, flags).tolist()
    threads, total = torch.get_num_threads(), sum(sizes[3 * i] * sizes[3 * i + 1] for i in range(count))
    records = [(i, sizes[3 * i:3 * i + 3], ptrs[10 * i:10 * i + 10], h[13 * i:13 * i + 13]) for i in range(count)]
    shares = _whole_shares(records, threads) if kernel == "columns" else _shares(records, threads, total, dtype.itemsize, kernel)

    def run(share) -> array:
        sizes, ptrs, h = array("q"), array("q"), array("d")
        for _, size, pointers, hyper in share:
            sizes.extend(size)
            ptrs.extend(pointers)
            h.extend(hyper)
        changed = array("q", bytes(8 * len(share)))
        fn(len(share), sizes.buffer_info()[0], ptrs.buffer_info()[0], h.buffer_info()[0], *flags, changed.buffer_info()[0])
        return changed

    left = [0] * count
    for share, changed in zip(shares, _executor(len(shares)).map(run, shares)):
        for (i, *_), c in zip(share, changed):
            if c < 0:
                raise MemoryError(_NO_SCRATCH)
            left[i] += c
    return left


def one_call(kernel: str, count: int, sizes) -> bool:
    """Whether :func:`launch` steps these tensors in one call on one thread (else: one per torch CPU thread)."""
    if torch.get_num_threads() == 1 or kernel == "columns" and count == 1:  # (a columns tensor is not cut: its sums span all rows)
        return True
    return sum(sizes[3 * i] * sizes[3 * i + 1] for i in range(count)) < PARALLEL_MIN


def launch_checked(dtype: torch.dtype, count: int, sizes, ptrs, h, flags: tuple[int, ...]) -> list[int] | None:
    """:func:`launch` of the columns loop with the optimizer's non-finite-gradient check taken by its sums pass
    (which reads every gradient anyway), where :func:`one_call` holds: every tensor's sums first, then the rest of
    every step. None, with nothing moved, when a sum ``g*W`` is not finite (an inf or a NaN in a gradient always
    makes it so; the caller's own check then decides, and names the parameter) or the sums found no memory (the
    caller's plain step then raises where it finds none too)."""
    fn = getattr(_library(), f"spread_columns_checked_batch_{DTYPES[dtype]}")
    changed = _call(fn, count, array("q", sizes), array("q", ptrs), array("d", h), flags)
    return None if -2 in changed or -3 in changed else changed.tolist()


def _call(fn, count: int, sizes: array, ptrs: array, h: array, flags: tuple[int, ...]) -> array:
    """One call of a batch entry point: per tensor what it left for adoption (-1: no scratch memory, raised; -2, -3:
    a checked call's non-finite sums, or no memory for them: nothing moved)."""
    changed = array("q", bytes(8 * count))
    fn(count, sizes.buffer_info()[0], ptrs.buffer_info()[0], h.buffer_info()[0], *flags, changed.buffer_info()[0])
    if -1 in changed:
        raise MemoryError(_NO_SCRATCH)
    return changed


def _shares(records: list, threads: int, total: int, itemsize: int, kernel: str) -> list[list]:
    """``records`` ``(i, sizes, pointers, hyper)`` cut into ``threads`` shares of about equal entries, a tensor split
    where a share ends (pointers moved by the entries, or rows, before the cut)."""
    target = -(-total // threads)
    shares, share, room = [], [], target
    for i, (n, width, inner), ptrs, hyper in records:
        done = 0
        while done < n:
            take = min(n - done, max(1, room // width))
            moved = [0 if q == 0 else q + itemsize * done * (1 if kernel == "rows" and k in _PER_ROW else width)
                     for k, q in enumerate(ptrs)]
            share.append((i, (take, width, inner), moved, hyper))
            done += take
            room -= take * width
            if room <= 0 and len(shares) < threads - 1:
                shares.append(share)
                share, room = [], target
    if share:
        shares.append(share)
    return shares


def _whole_shares(records: list, threads: int) -> list[list]:
    """``records`` in ``threads`` shares of whole tensors (a columns tensor's sums span all its rows), the largest
    first, each to the share with the fewest entries so far."""
    shares: list[list] = [[] for _ in range(threads)]
    loads = [0] * threads
    for record in sorted(records, key=lambda r: -r[1][0] * r[1][1]):
        k = loads.index(min(loads))
        shares[k].append(record)
        loads[k] += record[1][0] * record[1][1]
    return [share for share in shares if share]


def _executor(workers: int):
    """The pool of the shares' threads, made again for another size or in a forked child (whose copy of the pool
    has no threads)."""
    from concurrent.futures import ThreadPoolExecutor

    if not _pool or _pool[1] != (workers, os.getpid()):
        if _pool and _pool[1][1] == os.getpid():
            _pool[0].shutdown(wait=False)
        _pool[:] = [ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spread_native"), (workers, os.getpid())]
    return _pool[0]


def element_step(g, p, U, W, state_U, state_W, hyper: list[float], *, rule: str, amsgrad: bool = False,
                 nesterov: bool = False, momentum: bool = False, first: bool = False, maximize: bool = False,
                 scaled: bool = False, **_) -> int:
    """:func:`spread_optim.kernels.compiled.element_step` (``adopt=False``) on contiguous tensors of one dtype
    (``g`` of ``p``'s dtype; states as there, ``None`` for the ones the rule lacks); returns how many entries it left
    for adoption. ``hyper``: the numbers of :data:`.compiled.HYPER`."""
    return batch_step("element", [(g, p, U, W, state_U, state_W, hyper)], rule=rule, amsgrad=amsgrad,
                      nesterov=nesterov, momentum=momentum, first=first, maximize=maximize, scaled=scaled)[0]


def rows_step(g, p, u, W, state_u, state_W, hyper: list[float], *, rule: str, amsgrad: bool = False,
              nesterov: bool = False, momentum: bool = False, first: bool = False, maximize: bool = False,
              scaled: bool = False, **_) -> int:
    """:func:`spread_optim.kernels.compiled.grouped_step` with ``groups="row"`` (``adopt=False``): ``g``, ``p``,
    ``W`` and its states contiguous ``(rows, width)``, ``u`` and its states ``(rows,)``, one dtype; returns how many
    rows it left for adoption."""
    return batch_step("rows", [(g, p, u, W, state_u, state_W, hyper)], rule=rule, amsgrad=amsgrad,
                      nesterov=nesterov, momentum=momentum, first=first, maximize=maximize, scaled=scaled)[0]


def columns_step(g, p, u, W, state_u, state_W, hyper: list[float], *, rule: str, amsgrad: bool = False,
                 nesterov: bool = False, momentum: bool = False, first: bool = False, maximize: bool = False,
                 scaled: bool = False, **_) -> int:
    """:func:`spread_optim.kernels.compiled.grouped_step` with ``groups="column"`` (``adopt=False``): ``g``, ``p``,
    ``W`` and its states contiguous ``(rows, columns, r)``, ``u`` and its states ``(columns,)``, one dtype; returns how
    many columns it left for adoption."""
    return batch_step("columns", [(g, p, u, W, state_u, state_W, hyper)], rule=rule, amsgrad=amsgrad,
                      nesterov=nesterov, momentum=momentum, first=first, maximize=maximize, scaled=scaled)[0]
