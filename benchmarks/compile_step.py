"""``torch.compile(optimizer.step)`` against the eager step, per sparsity kind, on the CPU.

Workload: the weights of an MLP 1000-1000-10 (1.01M parameters; the weight matrices in one sparse group, the biases
dense), fixed random gradients. Per row: the eager step's median time, the compiled step's median time after
warm-up (the two timed in turns), the first call's compile time, the number of graphs and graph breaks (``torch._dynamo.explain``), and
whether the compiled run's weights equal the eager run's after the same steps (the step is correct under compile).
Plain ``torch.optim.Adam`` (foreach) is the anchor, measured in the same process.

    python benchmarks/compile_step.py            # element, row, column and torch Adam, 20 timed steps each
    python benchmarks/compile_step.py --quick    # element only, a small model (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from spread_optim import SpreadAdam

RESULTS = Path(__file__).resolve().parent / "results"


def make(kind: str, width: int, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    if kind == "torch Adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    else:
        opt = SpreadAdam([{"params": weights, "kappa": 1e-4, "sparsity": kind}, {"params": biases}], lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 0.01
    return model, opt


def measure(kind: str, width: int, repeats: int) -> dict:
    import torch._dynamo

    torch._dynamo.reset()
    model_c, opt_c = make(kind, width)
    explained = torch._dynamo.explain(opt_c.step)()
    torch._dynamo.reset()
    model_e, opt_e = make(kind, width)
    model_c, opt_c = make(kind, width)
    step = torch.compile(opt_c.step)
    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    opt_e.step()  # as the compiled run's first (compiling) call
    # timed in turns (one eager step, one compiled step per round), so that the machine's drift hits both alike
    times = {"eager": [], "compiled": []}
    for round_ in range(2 + repeats):
        for name, fn in (("eager", opt_e.step), ("compiled", step)):
            t0 = time.perf_counter()
            fn()
            if round_ >= 2:
                times[name].append((time.perf_counter() - t0) * 1e3)
    eager_ms, compiled_ms = statistics.median(times["eager"]), statistics.median(times["compiled"])
    # correctness: the same number of steps on both (1 + 2 + repeats each); atol 1e-6 = lr/1000 (torch Adam itself
    # differs by ~2e-7 between its compiled and eager steps after 23 steps), exact zeros the same
    same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) and torch.equal(a == 0, b == 0)
               for a, b in zip(model_e.parameters(), model_c.parameters()))
    return dict(kind=kind, eager_ms=eager_ms, compiled_ms=compiled_ms, ratio=compiled_ms / eager_ms,
                first_compile_s=compile_s, graphs=explained.graph_count, graph_breaks=max(explained.graph_break_count, 0),
                break_reasons=sorted({str(r.reason).splitlines()[0][:120] for r in explained.break_reasons}), same=same)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="element only, width 200, 3 repeats (CI)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kinds", nargs="*", help="a subset of: torch Adam, element, row, column")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kinds = ["element"] if args.quick else (args.kinds or ["torch Adam", "element", "row", "column"])
    width = 200 if args.quick else 1000
    rows = [measure(kind, width, 3 if args.quick else args.repeats) for kind in kinds]
    print(f"CPU: {platform.processor() or platform.machine()}; torch {torch.__version__}; 1 thread; MLP {width}-{width}-10")
    print("| step | eager ms | compiled ms | compiled / eager | first compile s | graphs | graph breaks | same weights |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['kind']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['ratio']:.2f} | {r['first_compile_s']:.1f} | "
              f"{r['graphs']} | {r['graph_breaks']} | {r['same']} |")
    for r in rows:
        if r["break_reasons"]:
            print(f"{r['kind']}: graph breaks from: " + "; ".join(r["break_reasons"]))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "compile_step.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
