"""Nanoseconds per element of the native loops (``kernels/native.py``: element, rows, columns) against torch's fused
CPU Adam, from in-cache to out-of-cache sizes: where a loop is compute-bound and where it is memory-bound.

One float32 tensor of ``n`` elements (rows and columns: ``(n / 1024, 1024)``); each loop's Adam step on it (no
optimizer around it), ``torch.optim.Adam(fused=True).step()``, and the non-finite-gradient check the optimizer adds
(``native.nonfinite``; ``torch.aminmax``, the check without the native library), timed in turns, median per size.
Bytes per element: torch 28, element 56, rows 36, columns 48 (a sums pass and a move pass over the tensor).

Then the columns loop on ResNet-18's 2-D and 4-D tensors (conv filters as ``(out, in, kh*kw)``, the fc layer), all
in one call as the optimizer makes it, against torch's fused Adam on the same tensors, in turns (ms per step); and the
columns loop in a step where half the columns snap to zero against one where none does.

    python benchmarks/native_step.py            # 16K, 64K, 1M, 4M elements; ResNet-18's tensors
    python benchmarks/native_step.py --quick    # smoke run (CI)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from spread_optim.kernels import native

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (step_speed's shapes)

HYPER = [1e-3, 1e-3, 1e-6, 1e-2, 0.1, 1e-2, 0.1, 0.9, 0.999, 1e-8, 0.0, 0.0, 1.0]  # compiled.HYPER's order
LOOPS = ("element", "rows", "columns")


def _args(kind: str, n: int, gen: torch.Generator) -> list:
    shape = (n,) if kind == "element" else (n // 1024, 1024)
    groups = n if kind == "element" else shape[0] if kind == "rows" else shape[1]
    factor = torch.rand(groups, generator=gen) + 0.5
    W = torch.randn(shape, generator=gen)
    theta = factor * W if kind == "element" else factor[:, None] * W if kind == "rows" else factor[None, :] * W
    zeros = lambda size: (torch.zeros(size), torch.zeros(size), None)  # noqa: E731
    args = [torch.randn(shape, generator=gen) * 0.01, theta, factor, W, zeros(groups), zeros(shape)]
    return args if kind != "columns" else [t.view(*shape, 1) if t.dim() == 2 else t for t in args[:4]] + args[4:5] + [
        tuple(s.view(*shape, 1) if s is not None else None for s in args[5])]


def in_turns(steps: dict, rounds: int) -> dict[str, float]:
    """Each of ``steps`` (name: callable) once per round, in turns, three warm-up rounds first; the median seconds
    of each."""
    times: dict = {k: [] for k in steps}
    for round_ in range(rounds + 3):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            if round_ >= 3:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def time_per_element(n: int, rounds: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    args = {kind: _args(kind, n, gen) for kind in LOOPS}
    q = torch.randn(n, generator=gen).requires_grad_()
    q.grad = torch.randn(n, generator=gen) * 0.01
    adam = torch.optim.Adam([q], lr=1e-3, fused=True)
    step = {"element": native.element_step, "rows": native.rows_step, "columns": native.columns_step}
    steps = {kind: (lambda k=kind: step[k](*args[k], HYPER, rule="adam")) for kind in LOOPS}
    steps |= {"torch Adam fused": adam.step, "native check": lambda: native.nonfinite([q.grad]),
              "aminmax check": lambda: torch.aminmax(q.grad)}
    return {k: seconds / n * 1e9 for k, seconds in in_turns(steps, rounds).items()}


def time_resnet_columns(rounds: int, quick: bool) -> tuple[int, int, float, float, float, float]:
    """ResNet-18's tensors of two or more dimensions (the first three with ``quick``): the columns loop on all of
    them in one call, the same after the non-finite check of their gradients (the full path's step), the checked
    call (the kept plan's: every tensor's sums pass first, which is their check), and torch's fused Adam on the same
    shapes, in turns. Returns (tensors, elements, loop ms, torch ms, check + loop ms, checked call ms), medians."""
    from step_speed import resnet18_shapes

    shapes = [s for s in resnet18_shapes() if len(s) >= 2][: 3 if quick else None]
    gen = torch.Generator().manual_seed(0)
    items, qs = [], []
    for shape in shapes:
        rows, columns = shape[0], shape[1]
        view = (rows, columns, math.prod(shape[2:]))
        u, W = torch.rand(columns, generator=gen) + 0.5, torch.randn(view, generator=gen)
        states = ((torch.zeros(columns), torch.zeros(columns), None), (torch.zeros(view), torch.zeros(view), None))
        items.append((torch.randn(view, generator=gen) * 0.01, u[None, :, None] * W, u, W, *states, HYPER))
        q = torch.randn(shape, generator=gen).requires_grad_()
        q.grad = torch.randn(shape, generator=gen) * 0.01
        qs.append(q)
    adam = torch.optim.Adam(qs, lr=1e-3, fused=True)
    grads = [item[0] for item in items]
    steps = {"loop": lambda: native.batch_step("columns", items, rule="adam"), "torch": adam.step,
             "check + loop": lambda: (native.nonfinite(grads), native.batch_step("columns", items, rule="adam")),
             "checked": lambda: native.batch_step("columns", items, rule="adam", checked=True)}
    t = {k: v * 1e3 for k, v in in_turns(steps, rounds).items()}
    return len(shapes), sum(q.numel() for q in qs), t["loop"], t["torch"], t["check + loop"], t["checked"]


def time_snapping(rows: int, rounds: int) -> tuple[float, float, int]:
    """The columns loop on a ``(rows, 1024)`` tensor in a step where no column snaps to zero, and in one where every
    column takes the whole snap test and about half of them snap (a zero threshold above every column's norm), each
    on a fresh copy; returns the two medians in ms and how many columns snapped in the second."""
    gen = torch.Generator().manual_seed(0)
    u, W = torch.rand(1024, generator=gen) + 0.5, torch.randn(rows, 1024, 1, generator=gen)
    g = torch.randn(rows, 1024, 1, generator=gen) * 0.01
    out = []
    for threshold in (HYPER[2], 1e9):
        hyper = HYPER[:2] + [threshold] + HYPER[3:]
        times = []
        for _ in range(rounds):
            states = ((torch.zeros(1024), torch.zeros(1024), None), (torch.zeros_like(W), torch.zeros_like(W), None))
            args = [g, u[None, :, None] * W, u.clone(), W.clone(), *states]
            t0 = time.perf_counter()
            native.columns_step(*args, hyper, rule="adam")
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times) * 1e3)
    return out[0], out[1], int((args[2] == 0).sum())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if native.unavailable() is not None:
        raise SystemExit(f"the native loops are unavailable here: {native.unavailable()}")
    sizes = [1 << 12] if args.quick else [1 << 14, 1 << 16, 1 << 20, 1 << 22]
    print(f"torch {torch.__version__}, 1 thread; ns per element (median), x torch fused Adam in brackets")
    print("| elements | element loop | rows loop | columns loop | torch Adam fused | native check | aminmax check |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in sizes:
        r = time_per_element(n, 5 if args.quick else max(10, (1 << 25) // n))
        base = r["torch Adam fused"]
        loops = " | ".join(f"{r[k]:.3f} ({r[k] / base:.2f})" for k in LOOPS)
        print(f"| {n} | {loops} | {base:.3f} | {r['native check']:.3f} | {r['aminmax check']:.3f} |")
    count, elements, loop, adam, both, checked = time_resnet_columns(3 if args.quick else 25, args.quick)
    print(f"\nResNet-18's {count} column tensors ({elements} elements), one call: columns loop {loop:.4f} ms, "
          f"torch Adam fused {adam:.4f} ms, {loop / adam:.2f}x; with the non-finite check before it {both:.4f} ms "
          f"({both / adam:.2f}x), the checked call (the check in its sums pass) {checked:.4f} ms ({checked / adam:.2f}x)")
    rows = 64 if args.quick else 4096
    none, half, snapped = time_snapping(rows, 3 if args.quick else 7)
    print(f"A ({rows}, 1024) tensor, columns loop: {none:.3f} ms when no column snaps, {half:.3f} ms when {snapped} of "
          f"the 1024 do")


if __name__ == "__main__":
    main()
