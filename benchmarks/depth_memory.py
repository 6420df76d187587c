"""Memory per element of a sparse parameter, by depth and base (CPU, float32, the split path).

For each (depth, base, sparsity) a fresh process builds one float32 parameter of 2^22 elements with its gradient,
takes three optimizer steps on the split path (depth 2: the CPU fast path, with the compiled step, which
``fused=None`` picks for a group this large, switched off; the fused paths keep no factor gradients: 8 bytes less)
and reports, per element of the parameter:

* ``state``: what the optimizer keeps between steps, counted from its tensors: the factors, their ``.grad`` buffers
  (set each step, read by the base) and the base's state for them (the parameter and its own gradient are not
  counted: torch's optimizers need those too);
* ``peak``: the largest resident memory during the steps minus what the process held before the first step
  (parameter and gradient included), from ``getrusage``: state plus the step's temporaries.

    python benchmarks/depth_memory.py            # depths 2, 3, 4; SGD, SGD with momentum, Adam; element and row

Prints a markdown table (the README's, "Non-convex penalties").
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N = 1 << 22

CHILD = r"""
import resource, sys, warnings, json
sys.path.insert(0, {root!r})
import torch
from spread_optim import SpreadOptimizer
from spread_optim.kernels import dispatch
dispatch.COMPILE_MIN_NUMEL = 1 << 62  # depth 2 on the split path too (the compiled step would take this size)
torch.set_num_threads(1)
warnings.simplefilter("ignore")
depth, base, sparsity, n = {depth}, {base!r}, {sparsity!r}, {n}
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
shape = (n // 64, 64)
p = torch.randn(shape).requires_grad_(True)
p.grad = torch.randn(shape) * 1e-3
kw = dict(lr=1e-3, momentum=0.9) if base == "sgd-momentum" else dict(lr=1e-3)
opt = SpreadOptimizer([p], "sgd" if base.startswith("sgd") else base, kappa=1e-4, depth=depth, sparsity=sparsity, **kw)
before = rss()
for _ in range(3):
    opt.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
state = 0
for value in opt.state[p].values():
    tensors = [value] if torch.is_tensor(value) else [t for sub in value.values() for t in sub.values() if torch.is_tensor(t)] if isinstance(value, dict) else []
    for t in tensors:
        state += t.numel() * t.element_size()
        if t.grad is not None:
            state += t.grad.numel() * t.grad.element_size()
print(json.dumps(dict(state=state / n, peak=peak / n, path=opt._paths[0])))
"""


def measure(depth: int, base: str, sparsity: str) -> dict:
    code = CHILD.format(root=str(ROOT), depth=depth, base=base, sparsity=sparsity, n=N)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="*", default=[2, 3, 4])
    args = parser.parse_args(argv)
    print(f"bytes per element of a float32 parameter ({N} elements), CPU, the split path (depth 2: the spec's CPU fast "
          "path, the compiled step switched off; depth > 2: the spec); state / peak of a step\n")
    bases = ["sgd", "sgd-momentum", "adam"]
    print("| sparsity | depth | " + " | ".join(bases) + " | path |")
    print("|---|---|" + "---|" * len(bases) + "---|")
    for sparsity in ("element", "row"):
        for depth in args.depths:
            cells = [measure(depth, b, sparsity) for b in bases]
            print(f"| {sparsity} | {depth} | " + " | ".join(f"{c['state']:.0f} / {c['peak']:.0f}" for c in cells)
                  + f" | {cells[0]['path']} |", flush=True)
    print(f"\n(peak: resident memory over the steps minus the process before them: the state, the step's temporaries "
          f"and allocator slack; the parameter and its gradient, 8 bytes, are there before; max RSS "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
