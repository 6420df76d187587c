"""Nanoseconds per element of the native element loop (``kernels/native.py``) against torch's fused CPU Adam, from
in-cache to out-of-cache sizes: where the loop is compute-bound and where it is memory-bound.

One tensor of ``n`` float32 elements; the native loop's Adam step on it (``native.element_step``, no optimizer
around it) and ``torch.optim.Adam(fused=True).step()``, and the non-finite-gradient probe the optimizer adds
(``torch.aminmax`` of the gradient), timed in turns, median per size. Bytes per element: torch 28, spread 56.

    python benchmarks/native_step.py            # 16K, 64K, 1M, 4M elements
    python benchmarks/native_step.py --quick    # smoke run (CI)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spread_optim.kernels import native

HYPER = [1e-3, 1e-3, 1e-6, 1e-2, 0.1, 1e-2, 0.1, 0.9, 0.999, 1e-8, 0.0, 0.0, 1.0]  # compiled.HYPER's order


def time_per_element(n: int, rounds: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    U, W = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * 0.01
    args = [g, U * W, U, W, (torch.zeros(n), torch.zeros(n), None), (torch.zeros(n), torch.zeros(n), None)]
    q = torch.randn(n, generator=gen).requires_grad_()
    q.grad = torch.randn(n, generator=gen) * 0.01
    adam = torch.optim.Adam([q], lr=1e-3, fused=True)
    steps = {"native loop": lambda: native.element_step(*args, HYPER, rule="adam"), "torch Adam fused": adam.step,
             "aminmax probe": lambda: torch.aminmax(g)}
    times: dict = {k: [] for k in steps}
    for round_ in range(rounds + 3):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            if round_ >= 3:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) / n * 1e9 for k, v in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if native.unavailable() is not None:
        raise SystemExit(f"the native loop is unavailable here: {native.unavailable()}")
    sizes = [1 << 12] if args.quick else [1 << 14, 1 << 16, 1 << 20, 1 << 22]
    print(f"torch {torch.__version__}, 1 thread; ns per element (median)")
    print("| elements | native loop | torch Adam fused | ratio | aminmax probe |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in sizes:
        r = time_per_element(n, 5 if args.quick else max(10, (1 << 25) // n))
        print(f"| {n} | {r['native loop']:.3f} | {r['torch Adam fused']:.3f} | "
              f"{r['native loop'] / r['torch Adam fused']:.2f} | {r['aminmax probe']:.3f} |")


if __name__ == "__main__":
    main()
