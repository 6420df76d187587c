"""Small tensors on the CPU: spread's default step (the native loops, all tensors in one call) and its split path,
packed into one flat tensor per step (``kernels/cpu.py``'s ``Pack``) or not.

Three lists of small tensors (a 40-64-4 MLP; 62 tensors of 64 elements; ResNet-18's 62 shapes divided by 16 per
dim) in one element-sparse group of ``SpreadAdam`` (and the MLP column-sparse: its 1-D tensors in a second, row-sparse
group, as ``step_speed.py`` has it): ``default`` (``fused=None``), the split path (``fused=False``,
torch's fused Adam on the factors) with packing on and off (``cpu.PACK_MAX = 0``), and torch's fused Adam; and the
default step and torch's with a learning-rate scheduler (``OneCycleLR``, which changes lr and beta1 at every step:
the optimizer keeps its plan of the step, as it does when nothing changes), each step followed by the scheduler's.
All timed in turns; fixed random gradients, one thread, median of 55 steps after 5.

    python benchmarks/small_tensors.py
    python benchmarks/small_tensors.py --rounds 8   # smoke run (CI)
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from spread_optim import SpreadAdam
from spread_optim.kernels import cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import _groups, resnet18_shapes  # noqa: E402


def with_grads(shapes):
    params = [torch.randn(s).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape) * 0.01
    return params


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds (the first 5 are warm-up)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    mlp = [(64, 40), (64,), (4, 64), (4,)]
    cases = {"MLP 40-64-4": (mlp, "element"), "MLP 40-64-4, column": (mlp, "column"), "62 x 64": ([(64,)] * 62, "element"),
             "ResNet-18 / 16": ([tuple(max(1, s // 4) for s in shape) for shape in resnet18_shapes()], "element")}
    default = cpu.PACK_MAX
    print(f"torch {torch.__version__}, 1 thread; ms per step (x torch fused Adam)")
    print("| tensors | default | split, unpacked | split, packed | torch Adam fused | default, scheduled | torch, scheduled |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (shapes, sparsity) in cases.items():
        def spread(**kwargs):
            return SpreadAdam(_groups(with_grads(shapes), sparsity), lr=1e-3, kappa=1e-4, **kwargs)

        runs = {"default": (spread(), default), "unpacked": (spread(fused=False), 0), "packed": (spread(fused=False), default),
                "torch": (torch.optim.Adam(with_grads(shapes), lr=1e-3, fused=True), default),
                "scheduled": (scheduled(spread(), args.rounds), default),
                "torch scheduled": (scheduled(torch.optim.Adam(with_grads(shapes), lr=1e-3, fused=True), args.rounds), default)}
        times = {k: [] for k in runs}
        for round_ in range(args.rounds):
            for k, (opt, pack_max) in runs.items():
                cpu.PACK_MAX = pack_max
                t0 = time.perf_counter()
                opt.step()
                if round_ >= 5:
                    times[k].append(time.perf_counter() - t0)
        cpu.PACK_MAX = default
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        cells = " | ".join(f"{ms[k]:.2f} ({ms[k] / ms['torch']:.1f}x)" for k in ("default", "unpacked", "packed"))
        print(f"| {name} | {cells} | {ms['torch']:.2f} | {ms['scheduled']:.2f} ({ms['scheduled'] / ms['torch scheduled']:.1f}x)"
              f" | {ms['torch scheduled']:.2f} |")


class scheduled:
    """``optimizer`` whose every step is followed by a ``OneCycleLR`` step (lr and beta1 change every step)."""

    def __init__(self, optimizer, rounds: int):
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=rounds + 1)

    def step(self):
        self.optimizer.step()
        self.scheduler.step()


if __name__ == "__main__":
    main()
