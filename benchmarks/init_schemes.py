"""Which factor initialisation converges faster? ``init="balanced"`` vs ``init="unbalanced"``.

For each problem, base optimizer and starting point, counts the steps (wall time goes to the JSON only: the
decision rests on step counts, which do not depend on the machine) until the lasso KKT residual (``optimizer.kkt_residual()``, no reference needed) falls below ``--tol``, and reports the largest distance to
the answer: the closed form (orthogonal design) or scikit-learn's coordinate descent (correlated design).

    python benchmarks/init_schemes.py            # full table (a few minutes on a 2-core CPU)
    python benchmarks/init_schemes.py --quick    # smoke run

Writes ``benchmarks/results/init_schemes.json`` and prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from spread_optim import SpreadAdam, SpreadOptimizer, SpreadSGD


def orthogonal_problem(seed, n=200, d=50):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    X = Q * n**0.5
    truth = torch.randn(d, generator=g, dtype=torch.float64) * (torch.rand(d, generator=g) < 0.3)
    y = X @ truth + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y


def correlated_problem(seed, n=100, d=200):
    rng = np.random.default_rng(seed)
    cov = 0.6 ** np.abs(np.subtract.outer(np.arange(d), np.arange(d)))
    X = rng.standard_normal((n, d)) @ np.linalg.cholesky(cov).T
    truth = np.zeros(d)
    truth[rng.choice(d, 10, replace=False)] = rng.choice([-2.0, 2.0], 10)
    y = X @ truth + 0.5 * rng.standard_normal(n)
    return torch.from_numpy(X), torch.from_numpy(y)


def reference(X, y, kappa, problem):
    """The answer: soft-thresholding (orthogonal design) or scikit-learn's coordinate descent at tol 1e-14."""
    n = X.shape[0]
    if problem == "orthogonal":
        z = X.T @ y / n
        return torch.sign(z) * (z.abs() - 2 * kappa).clamp(min=0)
    from sklearn.linear_model import Lasso

    coef = Lasso(alpha=2 * kappa, fit_intercept=False, tol=1e-14, max_iter=10**6).fit(X.numpy(), y.numpy()).coef_
    return torch.from_numpy(coef)


def run(X, y, kappa, make, start, max_steps, tol, closure_steps):
    n, d = X.shape
    if start == "zeros":
        b0 = torch.zeros(d, dtype=X.dtype)
    else:  # ridge solution: dense, the kind of start a warm-started model gives
        b0 = torch.linalg.solve(X.T @ X / n + 0.1 * torch.eye(d, dtype=X.dtype), X.T @ y / n)
    b = b0.clone().requires_grad_(True)
    opt = make([b])

    def closure():
        opt.zero_grad()
        loss = ((y - X @ b) ** 2).sum() / (2 * n)
        loss.backward()
        return loss

    t0 = time.perf_counter()
    for step in range(1, max_steps + 1):
        if closure_steps:
            opt.step(closure)
        else:
            closure()
            opt.step()
        closure()
        if opt.kkt_residual() < tol:
            return step, time.perf_counter() - t0, b.detach()
    return None, time.perf_counter() - t0, b.detach()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps (smoke run)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tol", type=float, default=1e-6)
    args = parser.parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    scale = 0.2 if args.quick else 1.0
    lbfgs = lambda k: (lambda p, init: SpreadOptimizer(p, torch.optim.LBFGS, kappa=k, init=init, line_search_fn="strong_wolfe",
                                                       tolerance_grad=1e-14, tolerance_change=1e-16, max_iter=20), True)
    cases = [
        ("orthogonal", 0.15, "SGD(lr=0.3)", lambda k: (lambda p, init: SpreadSGD(p, lr=0.3, kappa=k, init=init), False), int(5000 * scale)),
        ("orthogonal", 0.15, "Adam(lr=0.02)", lambda k: (lambda p, init: SpreadAdam(p, lr=0.02, kappa=k, init=init), False), int(20000 * scale)),
        ("orthogonal", 0.15, "LBFGS", lbfgs, 200),
        ("correlated", 0.05, "LBFGS", lbfgs, 500),
        ("correlated", 0.05, "Adam(lr=0.01)", lambda k: (lambda p, init: SpreadAdam(p, lr=0.01, kappa=k, init=init), False), int(20000 * scale)),
    ]
    rows = []
    for problem, kappa, base, factory, max_steps in cases:
        for start in ("zeros", "ridge"):
            for init in ("balanced", "unbalanced"):
                steps, secs, errors, solved = [], [], [], 0
                for seed in range(seeds):
                    X, y = (orthogonal_problem if problem == "orthogonal" else correlated_problem)(seed)
                    make, closure_steps = factory(kappa)
                    k, s, b = run(X, y, kappa, lambda p: make(p, init), start, max_steps, args.tol, closure_steps)
                    errors.append(float((b - reference(X, y, kappa, problem)).abs().max()))
                    steps.append(k if k is not None else max_steps)
                    secs.append(s)
                    solved += k is not None
                rows.append(dict(problem=problem, base=base, start=start, init=init, median_steps=int(np.median(steps)),
                                 median_seconds=float(np.median(secs)), solved=f"{solved}/{seeds}",
                                 max_error_to_reference=max(errors)))
                print(f"{problem:<11} {base:<14} start={start:<6} init={init:<10} steps {rows[-1]['median_steps']:>6}  "
                      f"{rows[-1]['median_seconds']:.2f}s  reached KKT<{args.tol:g}: {rows[-1]['solved']}  "
                      f"max|b - reference| {max(errors):.1e}", flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    meta = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__, tol=args.tol, seeds=seeds, quick=args.quick)
    (out / "init_schemes.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print("\n| problem | base | start | balanced: median steps (reached) | unbalanced: median steps (reached) |\n| --- | --- | --- | --- | --- |")
    for a, b in zip(rows[::2], rows[1::2]):
        print(f"| {a['problem']} | {a['base']} | {a['start']} | {a['median_steps']} ({a['solved']}) | {b['median_steps']} ({b['solved']}) |")


if __name__ == "__main__":
    main()
