"""Time per optimizer step: torch Adam (fused / foreach) against spread-Adam (its default path, the split path, the
GPU kernels).

Workloads: one tensor of 1M, 16M or 128M parameters; the 62 parameter tensors of ResNet-18 (11.7M); a small MLP
40-64-4 (the Python overhead per step); ~200 tensors totalling 1B parameters (GPU, where memory allows). Sparsity:
element (every entry its own factor pair), row (one ``u`` per output row) and column (one ``u`` per input column; the
1-D tensors, which have no columns, row-sparse). Every tensor is in one sparse group (spread; column: two) or one
group (torch). Gradients are fixed random tensors set once; the timed call is ``optimizer.step()``.

Spread's rows: ``default`` is ``fused=None`` (on a CPU: the compiled step; for these float32 element and row groups
its native C loops, ``kernels/native.py``); ``inductor`` is the compiled step with the native loops off (inductor's
code, ``kernels/compiled.py``); ``split`` is ``fused=False`` (the base's own step on the factors, then the
exact-zero pass of ``kernels/cpu.py``); ``kernels`` is ``fused=True`` on a GPU. All methods of a workload are built
first and then timed in turns (one step each per round), so that the machine's drift hits them alike; the first
step (which compiles, where something does) is reported apart.

Per row: median time per step (CUDA events on a GPU, ``perf_counter`` on CPU), the bytes a step has to move at the
least (torch Adam fp32: read p, g, m, v and write p, m, v = 28 B/element; spread element: g, U, W, 4 states read,
U, W, 4 states, theta written = 56 B/element; spread row and column: 48 B/element, see ``kernels/group.py``), the achieved
bandwidth for those bytes, the ratio to torch's fused Adam (CPU and GPU) and, on a GPU, the device-to-device copy
bandwidth measured in the same run (the ceiling).

    python benchmarks/step_speed.py --threads 1   # CPU: 1M, ResNet-18 and the small MLP
    python benchmarks/step_speed.py --full        # GPU: all workloads incl. 16M, 128M and 1B
    python benchmarks/step_speed.py --quick       # smoke run (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from spread_optim import SpreadAdam

RESULTS = Path(__file__).resolve().parent / "results"
BYTES = {"torch": 28, "element": 56, "row": 48, "column": 48}


def resnet18_shapes() -> list[tuple[int, ...]]:
    """The 62 parameter tensors of torchvision's ResNet-18 (conv, batch-norm weight and bias, fc)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first = block == 0
            shapes += [(out_ch, in_ch if first else out_ch, 3, 3), (out_ch,), (out_ch,), (out_ch, out_ch, 3, 3), (out_ch,), (out_ch,)]
            if first and (stride != 1 or in_ch != out_ch):
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
        in_ch = out_ch
    shapes += [(1000, 512), (1000,)]
    return shapes


def workloads(full: bool, quick: bool, device: torch.device) -> dict[str, list[tuple[int, ...]]]:
    if quick:
        return {"1 tensor, 64K": [(256, 256)], "ResNet-18 shapes / 16": [tuple(max(1, s // 4) for s in shape) for shape in resnet18_shapes()]}
    out = {"MLP 40-64-4 (4 tensors, 2.9K)": [(64, 40), (64,), (4, 64), (4,)], "1 tensor, 1M": [(1024, 1024)]}
    if device.type == "cuda" or full:
        out["1 tensor, 16M"] = [(4096, 4096)]
    if device.type == "cuda":
        out["1 tensor, 128M"] = [(16384, 8192)]
    out["ResNet-18 (62 tensors, 11.7M)"] = resnet18_shapes()
    if device.type == "cuda" and full:
        out["200 tensors, 1.0B"] = [(4096, 4096)] * 60 + [(4096,)] * 140
    return out


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def once_ms(self, fn) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def median_ms(self, fn, warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        return statistics.median(self.once_ms(fn) for _ in range(repeats))


def copy_bandwidth(timer: Timer, device: torch.device) -> float | None:
    """GB/s of ``dst.copy_(src)`` on 1 GiB (read + write counted)."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src), 3, 20)
    del src, dst
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def make_params(shapes, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, device=device, generator=gen) * 0.1).requires_grad_()
        p.grad = torch.randn(shape, device=device, generator=gen) * 0.01
        params.append(p)
    return params


class Inductor:
    """A spread optimizer whose compiled CPU step runs inductor's code (``SPREAD_OPTIM_NATIVE=0`` during its step):
    the engine the native loops replaced, timed beside them."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        os.environ["SPREAD_OPTIM_NATIVE"] = "0"
        try:
            self.optimizer.step()
        finally:
            del os.environ["SPREAD_OPTIM_NATIVE"]


def methods(device: torch.device):
    """(name, bytes key, factory(params) -> optimizer)."""
    out = [("torch Adam fused", "torch", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
           ("torch Adam foreach", "torch", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True))]
    paths = [("default", None), ("inductor", True), ("split", False)] if device.type == "cpu" else [("split", False), ("kernels", True)]
    for sparsity in ("element", "row", "column"):
        for label, fused in paths:
            wrap = Inductor if label == "inductor" else (lambda opt: opt)
            out.append((f"spread {label} ({sparsity})", sparsity,
                        lambda ps, sp=sparsity, f=fused, w=wrap: w(SpreadAdam(_groups(ps, sp), lr=1e-3, kappa=1e-4, fused=f))))
    return out


def _groups(params, sparsity: str) -> list[dict]:
    """One sparse group; for column sparsity the 1-D tensors (biases, norms: no columns) in a row-sparse group."""
    if sparsity != "column":
        return [{"params": params, "sparsity": sparsity}]
    flat = [p for p in params if p.dim() < 2]
    return [{"params": [p for p in params if p.dim() >= 2], "sparsity": "column"}] + ([{"params": flat, "sparsity": "row"}] if flat else [])


def time_in_turns(timer: "Timer", optimizers: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Median ms per step of each optimizer, timed one step each per round; and each one's first step in s."""
    first = {}
    for name, opt in optimizers.items():
        t0 = time.perf_counter()
        opt.step()
        if timer.device.type == "cuda":
            torch.cuda.synchronize()
        first[name] = time.perf_counter() - t0
    times: dict = {name: [] for name in optimizers}
    for round_ in range(warmup + repeats):
        for name, opt in optimizers.items():
            ms = timer.once_ms(opt.step)
            if round_ >= warmup:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}, first


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny workloads, few repeats (CI smoke run)")
    parser.add_argument("--full", action="store_true", help="also the 16M (CPU) and 1B (GPU) workloads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 20)
    timer = Timer(device)
    bandwidth = copy_bandwidth(timer, device)
    rows = []
    for workload, shapes in tqdm(workloads(args.full, args.quick, device).items(), desc="step speed"):
        numel = sum(torch.Size(s).numel() for s in shapes)
        try:
            built = [(name, key, factory(make_params(shapes, device))) for name, key, factory in methods(device)]
            medians, first = time_in_turns(timer, {name: opt for name, _, opt in built}, 2 if args.quick else 5, repeats)
            for name, key, _ in built:
                rows.append({"workload": workload, "method": name, "tensors": len(shapes), "numel": numel,
                             "bytes_per_step": BYTES[key] * numel, "ms": medians[name], "first_step_s": first[name],
                             "GB/s": BYTES[key] * numel / (medians[name] * 1e-3) / 1e9})
        except torch.OutOfMemoryError:
            rows.append({"workload": workload, "method": "all", "tensors": len(shapes), "numel": numel,
                         "bytes_per_step": 0, "ms": None, "note": "out of memory"})
        finally:
            built = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for row in rows:
        base = next((r for r in rows if r["workload"] == row["workload"] and r["method"] == "torch Adam fused"), None)
        row["ratio_to_torch"] = row["ms"] / base["ms"] if base and base.get("ms") and row.get("ms") else None
        if bandwidth and row.get("GB/s"):
            row["fraction_of_copy_bandwidth"] = row["GB/s"] / bandwidth

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    header = f"device: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}"
    if bandwidth:
        header += f"; device-to-device copy {bandwidth:.0f} GB/s"
    print(header)
    print("| workload | method | ms/step | first step s | bytes/step | GB/s | x torch fused |" + (" of copy BW |" if bandwidth else ""))
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if bandwidth else ""))
    for r in rows:
        ms = f"{r['ms']:.3f}" if r.get("ms") else r.get("note", "-")
        gbs = f"{r['GB/s']:.1f}" if r.get("GB/s") else "-"
        ratio = f"{r['ratio_to_torch']:.2f}" if r.get("ratio_to_torch") else "-"
        first = f"{r['first_step_s']:.2f}" if r.get("first_step_s") is not None else "-"
        line = f"| {r['workload']} | {r['method']} | {ms} | {first} | {r['bytes_per_step'] / 1e6:.2f} MB | {gbs} | {ratio} |"
        if bandwidth:
            line += f" {r.get('fraction_of_copy_bandwidth', 0):.0%} |"
        print(line)
    result = {"meta": {"args": {k: str(v) for k, v in vars(args).items()}, "device": name, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "copy_GBps": bandwidth, "machine": platform.machine()}, "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "step_speed.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
