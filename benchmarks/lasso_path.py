"""Lasso path on an orthogonal design: exact zeros from spread, none from (sub)gradient L1.

One output, ``X = sqrt(n) Q`` (``X^T X / n = I``), loss ``||y - X b||^2 / (2n)`` and penalty
``lambda * ||b||_1`` with ``lambda = 2*kappa``: the solution is the soft-thresholding of ``z = X^T y / n``
at ``lambda``. For each ``lambda`` on a grid from "no zeros" to "all zeros" (placed between consecutive
sorted ``|z_i|``, so that the closed form has 0, 1/(K-1), ..., 1 of the coefficients at zero), from ``b = 0``:

* spread: ``SpreadSGD`` (Nesterov momentum), ``SpreadAdam`` (exponentially decaying LR) and
  ``SpreadOptimizer(LBFGS)`` with ``kappa = lambda/2``;
* naive: ``torch.optim.SGD`` / ``torch.optim.Adam`` with the same settings on
  ``loss + lambda*||b||_1`` through autograd (the subgradient ``sign(b)``, 0 at 0): iterates oscillate
  around zero and never land on it. (All values of lambda are run at once as the columns of one
  parameter: SGD and Adam act element by element, so that is exactly one run per lambda.)

Reports, per point and optimizer, the fraction of exact zeros, the max error to the closed form and whether
the support is exact.

    python benchmarks/lasso_path.py            # n=200, d=50, 16 values of lambda (about a minute on one CPU core)
    python benchmarks/lasso_path.py --quick    # n=48, d=12, 6 values, 2000 SGD / 1000 Adam steps (smoke run, ~25 s)

Writes ``benchmarks/results/lasso_path.json`` and ``benchmarks/results/lasso_sparsity.png`` and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from spread_optim import SpreadAdam, SpreadOptimizer, SpreadSGD

RESULTS = Path(__file__).parent / "results"
DT = torch.float64


def problem(n: int, d: int, seed: int):
    """Orthogonal design and a response with about 30% strong coefficients plus noise."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=DT))
    X = Q * math.sqrt(n)
    truth = 2 * torch.randn(d, generator=g, dtype=DT) * (torch.rand(d, generator=g) < 0.3)
    y = X @ truth + torch.randn(n, generator=g, dtype=DT)
    return X, y


def lambda_grid(z: torch.Tensor, points: int) -> list[float]:
    """``lambda`` values with 0, 1/(points-1), ..., 1 of the closed form's coefficients at zero: midway
    between consecutive sorted ``|z|`` (below the smallest for "no zeros", above the largest for "all")."""
    a = torch.sort(z.abs()).values.tolist()
    d = len(a)
    grid = []
    for i in range(points):
        c = round(i * d / (points - 1))  # coefficients at zero
        if c == 0:
            grid.append(a[0] / 2)
        elif c == d:
            grid.append(a[-1] * 1.2)
        else:
            grid.append((a[c - 1] + a[c]) / 2)
    return grid


# ----------------------------------------------------------------------------------------------------
# optimizers


def settings(z: torch.Tensor, quick: bool) -> dict:
    """The same base settings for spread and naive, and for every lambda.

    SGD's step is set by the largest curvature: the factorised problem's curvature along a coefficient is
    about ``1 + 2|b|`` (times the loss's, 1 here), and ``|b| <= max|z|`` on this design. Its momentum is set
    by the smallest: a coefficient ``b`` converges along a mode of curvature about ``2|b|``, and while
    ``lr*2|b| << (1 - momentum)^2`` (heavy ball overdamped) that mode shrinks by about
    ``lr*2|b| / (1 - momentum)`` per step. The smallest nonzero coefficient on the default path is 9.7e-5
    (``lr*2|b|`` about 2e-5): with momentum 0.98 that is 1e-3 per step, 3 e-folds in 3000 steps, and the
    error stayed at 2.5e-5; with 0.99 the rate doubles and the error is below 1e-6 at every point in the
    same 3000 steps (0.99 keeps ``(1 - momentum)^2 = 1e-4`` above ``lr*2|b|``, so that mode stays
    overdamped; larger momenta slow the decay of the fast, oscillating modes, ``momentum^(t/2)``). Those
    fast modes are why the smoke run (``--quick``) gives SGD 2000 steps: with momentum 0.99, 1000 steps
    left errors up to 2e-5 there (momentum 0.98 had needed only 1000)."""
    steps_sgd, steps_adam = (2000, 1000) if quick else (3000, 2000)
    return dict(
        sgd=dict(lr=1.0 / (1.0 + 2.0 * float(z.abs().max())), momentum=0.99, nesterov=True, steps=steps_sgd),
        adam=dict(lr=0.05, gamma=math.exp(math.log(1e-4) / steps_adam), steps=steps_adam),  # LR falls 1e4-fold
        lbfgs=dict(max_iter=20, steps=20),
    )


def spread_fit(X, y, lam, base: str, cfg: dict) -> torch.Tensor:
    """One spread fit from ``b = 0`` with ``kappa = lam/2``."""
    n, d = X.shape
    b = torch.zeros(d, dtype=DT, requires_grad=True)
    kappa = lam / 2
    sched = None
    if base == "sgd":
        c = cfg["sgd"]
        opt = SpreadSGD([b], lr=c["lr"], momentum=c["momentum"], nesterov=c["nesterov"], kappa=kappa)
    elif base == "adam":
        c = cfg["adam"]
        opt = SpreadAdam([b], lr=c["lr"], kappa=kappa)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, c["gamma"])
    else:
        c = cfg["lbfgs"]
        opt = SpreadOptimizer([b], torch.optim.LBFGS, kappa=kappa, line_search_fn="strong_wolfe", tolerance_grad=0.0,
                              tolerance_change=0.0, max_iter=c["max_iter"])

    def closure():
        opt.zero_grad()
        loss = (y - X @ b).pow(2).sum() / (2 * n)
        loss.backward()
        return loss

    for _ in range(c["steps"]):
        if base == "lbfgs":
            opt.step(closure)
        else:
            closure()
            opt.step()
            if sched:
                sched.step()
    return b.detach()


def naive_fit(X, y, lams, base: str, cfg: dict) -> torch.Tensor:
    """torch.optim.SGD/Adam on ``loss + lam*||b||_1`` through autograd, from ``b = 0``, every ``lam`` at once:
    column ``j`` of ``B`` is the fit at ``lams[j]``. The objective is a sum over columns and SGD/Adam update
    element by element, so this is exactly ``len(lams)`` separate runs."""
    n, d = X.shape
    lam = torch.tensor(lams, dtype=DT)
    B = torch.zeros(d, len(lams), dtype=DT, requires_grad=True)
    if base == "sgd":
        c = cfg["sgd"]
        opt = torch.optim.SGD([B], lr=c["lr"], momentum=c["momentum"], nesterov=c["nesterov"])
        sched = None
    else:
        c = cfg["adam"]
        opt = torch.optim.Adam([B], lr=c["lr"])
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, c["gamma"])
    for _ in range(c["steps"]):
        opt.zero_grad()
        loss = (y[:, None] - X @ B).pow(2).sum() / (2 * n) + (lam * B.abs()).sum()
        loss.backward()
        opt.step()
        if sched:
            sched.step()
    return B.detach()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n=48, d=12, 6 values of lambda, 2000 SGD / 1000 Adam steps (smoke run)")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--d", type=int, default=None)
    parser.add_argument("--points", type=int, default=None, help="values of lambda (default 16; --quick: 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the problem is tiny)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    n = args.n or (48 if args.quick else 200)
    d = args.d or (12 if args.quick else 50)
    points = args.points or (6 if args.quick else 16)
    if points < 3:
        parser.error("--points must be at least 3 (the default run uses 16)")
    X, y = problem(n, d, args.seed)
    z = X.T @ y / n
    grid = lambda_grid(z, points)
    cfg = settings(z, args.quick)
    spread_names = {"spread SGD": "sgd", "spread Adam": "adam", "spread LBFGS": "lbfgs"}
    naive_names = {"naive SGD": "sgd", "naive Adam": "adam"}

    rows = [dict(lam=lam, kappa=lam / 2, methods={}) for lam in grid]
    closed = [torch.sign(z) * (z.abs() - lam).clamp(min=0) for lam in grid]
    fits: dict[str, list[torch.Tensor]] = {}
    method_seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    with tqdm(total=len(grid) * len(spread_names) + len(naive_names), desc="lasso path", unit="fit") as bar:
        for name, base in spread_names.items():
            fits[name] = []
            t = time.perf_counter()
            for lam in grid:
                fits[name].append(spread_fit(X, y, lam, base, cfg))
                bar.update()
            method_seconds[name] = time.perf_counter() - t
        for name, base in naive_names.items():
            t = time.perf_counter()
            B = naive_fit(X, y, grid, base, cfg)
            method_seconds[name] = time.perf_counter() - t
            fits[name] = list(B.T)
            bar.update()
    seconds = time.perf_counter() - t0
    for i, row in enumerate(rows):
        c = closed[i]
        row["closed_form_zero_fraction"] = float((c == 0).double().mean())
        for name, bs in fits.items():
            b = bs[i]
            row["methods"][name] = dict(
                zero_fraction=float((b == 0).double().mean()),
                max_error=float((b - c).abs().max()),
                exact_support=bool(((b != 0) == (c != 0)).all()),
                max_abs_where_closed_form_is_zero=float(b[c == 0].abs().max()) if bool((c == 0).any()) else None,
            )

    names = [*spread_names, *naive_names]
    summary = {
        name: dict(
            max_error=max(r["methods"][name]["max_error"] for r in rows),
            exact_support_everywhere=all(r["methods"][name]["exact_support"] for r in rows),
            exact_zeros_total=int(sum(round(r["methods"][name]["zero_fraction"] * d) for r in rows)),
            seconds_all_points=method_seconds[name],
        )
        for name in names
    }
    meta = dict(
        command="python " + " ".join(["benchmarks/lasso_path.py", *(argv if argv is not None else sys.argv[1:])]),
        machine=_machine(), torch=torch.__version__, threads=args.threads, quick=args.quick,
        n=n, d=d, points=points, seed=args.seed, seconds=seconds,
        settings=dict(
            cfg,
            note="spread: SpreadSGD / SpreadAdam / SpreadOptimizer(torch.optim.LBFGS, strong_wolfe, tolerances 0) with "
                 "kappa = lambda/2; naive: torch.optim.SGD / torch.optim.Adam with the same lr, momentum, schedule and "
                 "steps on loss + lambda*|b|_1 through autograd; every fit starts at b = 0. SGD lr = 1/(1 + 2 max|z|), "
                 "Nesterov momentum 0.99 (see settings()); "
                 "Adam: ExponentialLR with gamma such that the LR falls 1e4-fold over the run.",
        ),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lasso_path.json").write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1))
    plot(rows, names, args.out / "lasso_sparsity.png", n, d)

    print(f"\nLasso path, orthogonal design n={n}, d={d}, {points} values of lambda = 2*kappa "
          f"({meta['machine']}, torch {torch.__version__}, {args.threads} thread(s), {seconds:.1f}s)\ncommand: {meta['command']}\n")
    print("| lambda | closed form zeros | " + " | ".join(f"{m}: zeros / max err" for m in names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for r in rows:
        cells = [f"{r['methods'][m]['zero_fraction']:.2f} / {r['methods'][m]['max_error']:.1e}{'' if r['methods'][m]['exact_support'] else ' *'}"
                 for m in names]
        print(f"| {r['lam']:.4g} | {r['closed_form_zero_fraction']:.2f} | " + " | ".join(cells) + " |")
    print("\n(* = support differs from the closed form's)\n")
    print("| optimizer | max error over the path | exact support at every point | exact zeros in total | seconds (all points) |")
    print("| --- | --- | --- | --- | --- |")
    total = sum(round(r["closed_form_zero_fraction"] * d) for r in rows)
    for name in names:
        s = summary[name]
        print(f"| {name} | {s['max_error']:.1e} | {'yes' if s['exact_support_everywhere'] else 'no'} | {s['exact_zeros_total']} (closed form {total}) | {s['seconds_all_points']:.1f} |")
    print("(naive SGD/Adam: every value of lambda in one run, see the module docstring)")
    print(f"\nwrote {args.out / 'lasso_path.json'} and {args.out / 'lasso_sparsity.png'}")
    return summary


def _machine() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def plot(rows, names, path, n, d):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [r["lam"] for r in rows]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax0.plot(lam, [r["closed_form_zero_fraction"] for r in rows], "k-", lw=3, alpha=0.3, label="closed form")
    styles = {"spread SGD": "o-", "spread Adam": "s-", "spread LBFGS": "^-", "naive SGD": "x--", "naive Adam": "+--"}
    for name in names:
        ax0.plot(lam, [r["methods"][name]["zero_fraction"] for r in rows], styles.get(name, ".-"), ms=5, label=name)
        ax1.semilogy(lam, [max(r["methods"][name]["max_error"], 1e-17) for r in rows], styles.get(name, ".-"), ms=5, label=name)
    for ax in (ax0, ax1):
        ax.set_xscale("log")
        ax.set_xlabel("lambda = 2*kappa")
    ax0.set_ylabel("fraction of exact zeros")
    ax0.set_title(f"sparsity along the path (orthogonal design, n={n}, d={d})")
    ax1.axhline(1e-6, color="gray", ls=":", lw=1)
    ax1.set_ylabel("max |b - closed form|")
    ax1.set_title("error to the closed form (dotted: 1e-6)")
    ax0.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
