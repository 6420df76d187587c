"""Lasso speed: time to 1e-6 relative suboptimality with the exact support, SpreadLasso against celer, skglm,
scikit-learn and a batched FISTA in torch.

Objective (per output ``j``, no intercept: ``X`` and ``y`` are centred first)::

    ||y_j - X w_j||^2 / (2n) + lam * ||w_j||_1,    lam = frac * lam_max,  lam_max = max_j ||X^T y_j||_inf / n

Problems (``frac`` in {0.1, 0.01} for each):

* gene sets: every ``*.npz`` in ``../shared/data/genes`` (from the project root; ``--data``): the class label, as a
  number, regressed on the standardised genes (columns centred, unit variance; constant genes left at 0);
* Toeplitz designs: ``n = 1000`` rows drawn from ``N(0, Sigma)``, ``Sigma_ij = 0.5**|i-j|`` (an AR(1) along the
  features), columns standardised, ``d`` in {1e3, 1e4, 1e5}; 20 true nonzeros per output (random signs,
  magnitudes in [1, 2]), noise sd 1; one output at every ``d``, and 100 outputs at ``d = 1e4`` (100 independent
  lassos with one ``lam``).

Reference ``obj*``: scikit-learn's ``Lasso`` at ``tol=1e-12``; its relative duality gap (reported; at most
~1e-10) certifies it, so no solver can be lower by more than that. Where the lasso's solution is not unique
(``d > n`` with collinear genes) another solver can reach the same objective with a different support: that
counts as a mismatch (the exact-support criterion is the reference's). Suboptimality is ``(obj - obj*)/obj*`` per
output; a solver has *reached* the target when its worst output is within 1e-6 **and** its nonzeros are the
reference's (every output); "mismatches" counts the coefficients whose zero/nonzero status differs.

Timing (one thread everywhere: ``torch.set_num_threads(1)`` and ``threadpoolctl`` for NumPy's BLAS; run the
script under ``taskset`` to pin it to one core). Untimed warm-up fits first (numba in skglm, torch's imports):

* solvers with a tolerance (celer, skglm, scikit-learn ``Lasso``, ``SpreadLasso``): tolerances 10x apart, each fit
  from scratch; the time reported is that of the first fit that reached the target (its tolerance is
  reported; under a second, the fastest of 5 fits at that tolerance (``--repeats``)), and the sweep
  stops there or after ``--sweep-budget`` seconds. celer and skglm fit one output per
  call, so with 100 outputs they run as a loop (as scikit-learn's ``Lasso`` does internally for a 2-D ``y``).
  With 100 outputs each sweep starts at the tolerance that reached the target on one output at that ``d``;
* FISTA: the whole ``(d, k)`` coefficient matrix in torch, step ``1/L`` (``L = ||X||_2^2/n`` by power iteration,
  counted), one run from 0; the iterate is judged every 10 iterations (untimed) and the time is that of the
  first iterate that reached the target, or ``--fista-budget`` seconds.

    python benchmarks/lasso_speed.py           # every problem (about 15 minutes on one core)
    python benchmarks/lasso_speed.py --quick   # small sizes (seconds): d=300, 1 and 4 outputs, two gene sets

Writes ``lasso_speed.json`` and ``lasso_speed.png`` (time against ``d``) into ``--out``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from spread_optim.linear import SpreadLasso

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
GENES = ROOT / ".." / "shared" / "data" / "genes"
TARGET = 1e-6
SOLVERS = ("celer", "skglm", "scikit-learn", "FISTA", "SpreadLasso")


# ----------------------------------------------------------------------------------------------------
# problems and objectives


def standardise(X: np.ndarray) -> np.ndarray:
    """Columns centred with unit variance (constant columns: 0), Fortran-ordered (coordinate descent's layout)."""
    sd = X.std(0)
    return np.asfortranarray((X - X.mean(0)) / np.where(sd > 0, sd, 1.0))


def toeplitz_problem(n: int, d: int, outputs: int, rho: float = 0.5, seed: int = 0, nonzeros: int = 20):
    """Rows ``N(0, Sigma)``, ``Sigma_ij = rho**|i-j|``: ``x_i = rho x_{i-1} + sqrt(1 - rho^2) z_i`` along the features."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((d, n))
    Z[0] /= math.sqrt(1 - rho**2)  # x_0 = z_0: the stationary start
    X = standardise(lfilter([math.sqrt(1 - rho**2)], [1.0, -rho], Z, axis=0).T)
    B = np.zeros((d, outputs))
    for j in range(outputs):
        idx = rng.choice(d, min(nonzeros, d), replace=False)
        B[idx, j] = rng.choice([-1.0, 1.0], len(idx)) * rng.uniform(1.0, 2.0, len(idx))
    Y = X @ B + rng.standard_normal((n, outputs))
    return X, Y - Y.mean(0)


def gene_problem(path: Path):
    data = np.load(path)
    y = data["y"].astype(np.float64)
    return standardise(data["X"].astype(np.float64)), (y - y.mean())[:, None]


def objectives(X, Y, W, lam):
    """Per-output objective ``||y_j - X w_j||^2/(2n) + lam*||w_j||_1``."""
    R = Y - X @ W
    return (R * R).sum(0) / (2 * X.shape[0]) + lam * np.abs(W).sum(0)


def duality_gaps(X, Y, W, lam):
    """Per-output duality gap of the lasso (a certificate: ``obj - obj* <= gap``)."""
    n = X.shape[0]
    R = Y - X @ W
    theta = R / np.maximum(np.abs(X.T @ R).max(0), n * lam)  # dual feasible: ||X^T theta||_inf <= 1
    dual = (Y * Y).sum(0) / (2 * n) - (n * lam**2 / 2) * ((theta - Y / (n * lam)) ** 2).sum(0)
    return objectives(X, Y, W, lam) - dual


# ----------------------------------------------------------------------------------------------------
# solvers with a tolerance: fit(X, Y, lam, tol) -> W (d, k)


def sklearn_fit(X, Y, lam, tol):
    from sklearn.linear_model import Lasso

    model = Lasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=1_000_000).fit(X, Y if Y.shape[1] > 1 else Y[:, 0])
    return np.atleast_2d(model.coef_).T


def per_output(make):
    def fit(X, Y, lam, tol):
        return np.stack([make(lam, tol).fit(X, Y[:, j]).coef_ for j in range(Y.shape[1])], 1)
    return fit


def skglm_model(lam, tol):
    from skglm import Lasso

    return Lasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=1000, max_epochs=100_000)


def celer_model(lam, tol):
    from celer import Lasso

    return Lasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=1000, max_epochs=100_000)


def spread_fit(X, Y, lam, tol):
    model = SpreadLasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, Y)
    return np.atleast_2d(model.coef_).T


SWEEPS = {  # name -> (fit, tolerances from loose to tight)
    "celer": (per_output(celer_model), [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10]),
    "skglm": (per_output(skglm_model), [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10]),
    "scikit-learn": (sklearn_fit, [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10]),
    "SpreadLasso": (spread_fit, [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10]),
}


def sweep(fit, tolerances, X, Y, lam, judge, start_tol=None, budget=math.inf, repeats=5):
    """Fits at decreasing tolerances (each from scratch) until one reaches the target, or ``budget`` seconds; the
    fit that reached it is timed ``repeats`` times in all when it took under a second (the fastest counts)."""
    spent, last = 0.0, None
    for tol in tolerances:
        if start_tol is not None and tol > start_tol:
            continue
        t0 = time.perf_counter()
        W = fit(X, Y, lam, tol)
        seconds = time.perf_counter() - t0
        spent += seconds
        last = dict(judge(W), seconds=seconds, setting=f"tol={tol:g}", tol=tol, repeats=1)
        if last["reached"] or spent > budget:
            break
    if last["reached"] and last["seconds"] < 1.0:
        for _ in range(repeats - 1):
            t0 = time.perf_counter()
            fit(X, Y, lam, last["tol"])
            last["seconds"] = min(last["seconds"], time.perf_counter() - t0)
        last["repeats"] = repeats
    return dict(last, swept_seconds=spent)


# ----------------------------------------------------------------------------------------------------
# batched FISTA in torch on the whole (d, k) matrix


def fista(X, Y, lam, judge, budget, check=10):
    """FISTA with step ``1/L`` from 0; the iterate judged every ``check`` iterations (untimed)."""
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(np.ascontiguousarray(Y))
    n, d = Xt.shape
    t0 = time.perf_counter()
    v = torch.ones(d, dtype=Xt.dtype) / math.sqrt(d)
    L = 1.0
    for _ in range(30):  # power iteration for ||X||_2^2 / n
        w = Xt.T @ (Xt @ v) / n
        L = float(w.norm())
        v = w / L
    L *= 1.01
    XtY = Xt.T @ Yt / n
    W = torch.zeros(d, Yt.shape[1], dtype=Xt.dtype)
    Z, t = W.clone(), 1.0
    elapsed, iterations = time.perf_counter() - t0, 0
    while True:
        t0 = time.perf_counter()
        for _ in range(check):
            G = Xt.T @ (Xt @ Z) / n - XtY
            V = Z - G / L
            W_new = torch.sign(V) * (V.abs() - lam / L).clamp(min=0)
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            Z = W_new + ((t - 1) / t_new) * (W_new - W)
            W, t = W_new, t_new
        elapsed += time.perf_counter() - t0
        iterations += check
        result = dict(judge(W.numpy()), seconds=elapsed, setting=f"{iterations} iterations")
        if result["reached"] or elapsed > budget:
            return dict(result, swept_seconds=elapsed)


# ----------------------------------------------------------------------------------------------------
# one problem


def run_problem(name, X, Y, frac, args, start_tols=None):
    n, d = X.shape
    k = Y.shape[1]
    lam = frac * float(np.abs(X.T @ Y).max() / n)
    t0 = time.perf_counter()
    W_ref = sklearn_fit(X, Y, lam, 1e-12)
    reference_seconds = time.perf_counter() - t0
    gaps = duality_gaps(X, Y, W_ref, lam)
    obj_ref, support_ref = objectives(X, Y, W_ref, lam), W_ref != 0

    def judge(W):
        W = np.asarray(W, dtype=np.float64).reshape(d, k)
        sub = (objectives(X, Y, W, lam) - obj_ref) / obj_ref
        mismatches = int(((W != 0) != support_ref).sum())
        return dict(reached=bool(sub.max() <= TARGET and mismatches == 0), subopt=float(sub.max()),
                    nnz=int((W != 0).sum()), support_mismatches=mismatches)

    results = {}
    for solver in SOLVERS:
        if solver == "FISTA":
            results[solver] = fista(X, Y, lam, judge, args.fista_budget)
        else:
            fit, tols = SWEEPS[solver]
            start = (start_tols or {}).get(solver)
            results[solver] = sweep(fit, tols, X, Y, lam, judge, start, args.sweep_budget, args.repeats)
    return dict(problem=name, n=n, d=d, outputs=k, frac=frac, lam=lam, reference_seconds=reference_seconds,
                reference_nnz=int(support_ref.sum()), reference_max_relative_gap=float((gaps / obj_ref).max()),
                solvers=results)


def cases(args):
    """``(name, loader, frac, single_output_key)`` for every problem, in the order of the table."""
    out = []
    genes = sorted(args.data.glob("*.npz")) if args.data.exists() else []
    if args.quick:
        genes = [p for p in genes if p.stem in ("ALLAML", "lymphoma")]
    for path in genes:
        for frac in args.fracs:
            out.append((f"gene set {path.stem}", lambda p=path: gene_problem(p), frac, None))
    n = 200 if args.quick else 1000
    for d in args.dims:
        for frac in args.fracs:
            out.append((f"Toeplitz 0.5, d={d}", lambda d=d: toeplitz_problem(n, d, 1), frac, None))
    for d in args.multi_dims:
        for frac in args.fracs:
            k = args.outputs
            out.append((f"Toeplitz 0.5, d={d}, {k} outputs", lambda d=d, k=k: toeplitz_problem(n, d, k), frac,
                        (f"Toeplitz 0.5, d={d}", frac)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (n=200, d=300, 4 outputs, two gene sets)")
    parser.add_argument("--dims", type=int, nargs="*", default=None, help="Toeplitz d, one output")
    parser.add_argument("--multi-dims", type=int, nargs="*", default=None, help="Toeplitz d, many outputs")
    parser.add_argument("--outputs", type=int, default=None)
    parser.add_argument("--fracs", type=float, nargs="*", default=[0.1, 0.01])
    parser.add_argument("--only", default=None, help="run the problems whose name contains this")
    parser.add_argument("--fista-budget", type=float, default=None, help="seconds per FISTA run (default 60; quick 3)")
    parser.add_argument("--sweep-budget", type=float, default=None, help="seconds per tolerance sweep (default 60; quick 5)")
    parser.add_argument("--repeats", type=int, default=None, help="timings of a fit under 1 s (default 5; quick 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=GENES, help="folder of the gene sets (*.npz with X, y)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    args.dims = args.dims if args.dims is not None else ([300] if args.quick else [1000, 10_000, 100_000])
    args.multi_dims = args.multi_dims if args.multi_dims is not None else ([300] if args.quick else [10_000])
    args.outputs = args.outputs or (4 if args.quick else 100)
    args.fista_budget = args.fista_budget or (3.0 if args.quick else 60.0)
    args.sweep_budget = args.sweep_budget or (5.0 if args.quick else 60.0)
    args.repeats = args.repeats or (1 if args.quick else 5)

    # warm-up (untimed): numba compilation in skglm and celer, torch's lazy imports, BLAS initialisation
    Xw, Yw = toeplitz_problem(50, 30, 2, seed=99)
    for fit, _ in SWEEPS.values():
        fit(Xw, Yw, 0.1, 1e-4)

    records, tols = [], {}
    t_start = time.perf_counter()
    for name, load, frac, single in cases(args):
        if args.only and args.only not in name:
            continue
        X, Y = load()
        start = None
        if single in tols:
            start = {s: r["tol"] for s, r in tols[single].items() if s in SWEEPS and r.get("reached")}
        rec = run_problem(name, X, Y, frac, args, start)
        tols[(name, frac)] = rec["solvers"]
        records.append(rec)
        print_row(rec, flush=True)
        del X, Y
    total = time.perf_counter() - t_start

    machine = platform.machine()
    try:
        machine = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    command = "python " + " ".join(["benchmarks/lasso_speed.py", *(argv if argv is not None else sys.argv[1:])])
    meta = dict(command=command, machine=machine, torch=torch.__version__, threads=args.threads, quick=args.quick,
                fista_budget=args.fista_budget, sweep_budget=args.sweep_budget, repeats=args.repeats, target=TARGET, seconds=total,
                versions=versions(), dtype="float64")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lasso_speed.json").write_text(json.dumps(dict(meta=meta, problems=records), indent=1))
    plot(records, args.out / "lasso_speed.png", meta)
    print_table(records, meta)
    print(f"\nwrote {args.out / 'lasso_speed.json'} and {args.out / 'lasso_speed.png'}")
    return records


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for package in ("torch", "scikit-learn", "skglm", "celer", "numpy"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = None
    return out


def cell(r) -> str:
    """``time`` when reached, else ``-- (subopt, mismatches)``; the mismatches in brackets when any."""
    if r["reached"]:
        return f"{r['seconds']:.3g} s"
    return f"-- ({r['subopt']:.0e}, {r['support_mismatches']} mism.)"


def fastest_cd(rec):
    times = [rec["solvers"][s]["seconds"] for s in ("celer", "skglm") if rec["solvers"][s]["reached"]]
    return min(times) if times else None


def print_row(rec, flush=False):
    cells = " | ".join(cell(rec["solvers"][s]) for s in SOLVERS)
    spread, best = rec["solvers"]["SpreadLasso"], fastest_cd(rec)
    ratio = f"{spread['seconds'] / best:.2f}" if spread["reached"] and best else "-"
    print(f"| {rec['problem']} ({rec['n']} x {rec['d']}) | {rec['frac']:g} | {rec['reference_nnz']} | {cells} | {ratio} |",
          flush=flush)


def print_table(records, meta):
    print(f"\nLasso, time to relative suboptimality {TARGET:g} with the exact support ({meta['machine']}, "
          f"{meta['threads']} thread(s), float64, total {meta['seconds']:.0f} s); versions {meta['versions']}")
    print(f"command: {meta['command']}\n")
    print("| problem | lam / lam_max | nonzeros | " + " | ".join(SOLVERS) + " | SpreadLasso / min(celer, skglm) |")
    print("| --- " * (len(SOLVERS) + 4) + "|")
    for rec in records:
        print_row(rec)
    print("\nsettings (tolerance or iterations) of the reported fits:")
    for rec in records:
        print(f"  {rec['problem']} @ {rec['frac']:g}: " + ", ".join(f"{s} {rec['solvers'][s]['setting']}" for s in SOLVERS))
    print("\nreference's largest relative duality gap: " + ", ".join(
        f"{r['problem']} @ {r['frac']:g}: {r['reference_max_relative_gap']:.0e}" for r in records))


def plot(records, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [r for r in records if r["problem"].startswith("Toeplitz") and r["outputs"] == 1]
    fracs = sorted({r["frac"] for r in single}, reverse=True)
    fig, axes = plt.subplots(1, max(1, len(fracs)), figsize=(6 * max(1, len(fracs)), 4.5), squeeze=False)
    for ax, frac in zip(axes[0], fracs):
        recs = sorted((r for r in single if r["frac"] == frac), key=lambda r: r["d"])
        for s, marker in zip(SOLVERS, "os^vD"):
            ok = [(r["d"], r["solvers"][s]["seconds"]) for r in recs if r["solvers"][s]["reached"]]
            bad = [(r["d"], r["solvers"][s]["swept_seconds"]) for r in recs if not r["solvers"][s]["reached"]]
            line, = ax.plot(*zip(*ok), marker=marker, label=s) if ok else ax.plot([], [], marker=marker, label=s)
            if bad:
                ax.plot(*zip(*bad), ls="none", marker="x", ms=9, color=line.get_color())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("d (features), n = %d" % recs[0]["n"] if recs else "d")
        ax.set_ylabel(f"seconds to suboptimality {TARGET:g} + exact support")
        ax.set_title(f"lam = {frac:g} lam_max (x: not reached, time spent)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"lasso, Toeplitz(0.5) design, one output, {meta['threads']} thread(s) ({meta['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
