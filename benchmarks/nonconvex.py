"""Non-convex sparse regression: depth-k spread (L1, L2/3, L1/2) against skglm's L1, L2_3, L0_5 and MCP.

The objective, as skglm writes it (``Quadratic`` datafit, ``fit_intercept=False`` on centred data)::

    ||y - X w||^2 / (2n)  +  alpha * sum_j |w_j|^q,      q = 1, 2/3, 1/2   (MCP: its own penalty, gamma = 3)

Spread runs :class:`spread_optim.SpreadLq` (depth 2, 3, 4; LBFGS on factors, from zero); skglm runs
``GeneralizedLinearEstimator(Quadratic(), penalty, AndersonCD(...))`` from zero (working sets by ``"fixpoint"`` for
the non-convex penalties: its default ``"subdiff"`` scores every zero coefficient 0 there and returns w = 0). Both
are local solvers of a non-convex problem: for the same penalty and alpha the script reports both objectives (the
same function at each one's solution), the support's F1 against the truth, the relative estimation error
``||w - w*|| / ||w*||`` and the wall time (skglm's numba compilation excluded by a warm-up fit).

Problems (columns of X standardised, y centred, ``s`` true nonzeros with random signs and magnitudes in [0.5, 2],
noise at signal-to-noise ratio ``SNR = var(X w*) / sigma^2``):

* ``toeplitz``: Gaussian rows with covariance ``rho^|i-j|`` (rho = 0.6), n = 500, d = 2000, s = 20, SNR 1, 3, 10;
* ``genes``: the six gene-expression matrices of ``../shared/data/genes`` (real correlated designs, n = 50..171,
  d = 4026..9712) as X, a synthetic w* with s = 20 (SNR 3): semi-synthetic, so the truth is known.

The strengths: a grid of threshold levels ``t = r * max|X^T y|/n`` (r from 0.7 down to 0.02) mapped to each
penalty's alpha by the coordinate-wise thresholding rule at unit step (``t = ((2-q)/(2-2q)) (2 alpha (1-q))^(1/(2-q))``,
``t = alpha`` for L1 and MCP), so every method sweeps from a few to a few hundred nonzeros.

    python benchmarks/nonconvex.py            # the problems above (about 12 minutes on one CPU core)
    python benchmarks/nonconvex.py --quick    # n=120, d=300, s=5, one SNR, 4 strengths, no gene sets (< 1 min)

Writes ``nonconvex.json`` and ``nonconvex.png`` (F1 and error against the number of nonzeros) into ``--out``
(default ``benchmarks/results``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's spread_optim, also when run as a script

from spread_optim.kernels import reference as ref  # noqa: E402
from spread_optim.nonconvex import SpreadLq  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GENES = ROOT.parent / "shared" / "data" / "genes"
#: (label, penalty name of SpreadLq, q) of the spread runs and (label, skglm penalty, q) of skglm's
SPREAD = [("spread depth 2 (L1)", "L1", 1.0), ("spread depth 3 (L2/3)", "L2/3", 2 / 3), ("spread depth 4 (L1/2)", "L1/2", 0.5)]
SKGLM = [("skglm L1", "L1", 1.0), ("skglm L2_3", "L2_3", 2 / 3), ("skglm L0_5", "L0_5", 0.5), ("skglm MCP", "MCP", None)]


def alpha_for(t: float, q: float | None) -> float:
    """The alpha whose coordinate-wise threshold at unit step is ``t`` (the inverse of ``reference.lq_threshold``)."""
    if q is None or q == 1:
        return t
    return (t * (2 - 2 * q) / (2 - q)) ** (2 - q) / (2 * (1 - q))


def objective(X, y, w, alpha, q) -> float:
    n = X.shape[0]
    return float(((y - X @ w) ** 2).sum() / (2 * n) + alpha * (np.abs(w) ** q).sum())


def support_f1(w, truth) -> float:
    found, real = w != 0, truth != 0
    tp = int((found & real).sum())
    return 2 * tp / (int(found.sum()) + int(real.sum())) if found.any() or real.any() else 1.0


def make_problem(X: np.ndarray, s: int, snr: float, seed: int):
    rng = np.random.default_rng(seed)
    X = X.astype(np.float64)
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    d = X.shape[1]
    truth = np.zeros(d)
    support = rng.choice(d, s, replace=False)
    truth[support] = rng.choice([-1.0, 1.0], s) * rng.uniform(0.5, 2.0, s)
    signal = X @ truth
    y = signal + np.sqrt(signal.var() / snr) * rng.standard_normal(X.shape[0])
    return X, y - y.mean(), truth


def toeplitz_design(n: int, d: int, rho: float, seed: int) -> np.ndarray:
    """Rows N(0, C), ``C_ij = rho^|i-j|``: an AR(1) recursion along the features (no d x d matrix)."""
    rng = np.random.default_rng(seed)
    E = rng.standard_normal((n, d))
    X = np.empty_like(E)
    X[:, 0] = E[:, 0]
    for j in range(1, d):
        X[:, j] = rho * X[:, j - 1] + np.sqrt(1 - rho**2) * E[:, j]
    return X


def skglm_estimator(name: str, alpha: float, tol: float):
    from skglm import GeneralizedLinearEstimator
    from skglm.datafits import Quadratic
    from skglm.penalties import L0_5, L1, L2_3, MCPenalty
    from skglm.solvers import AndersonCD

    penalty = {"L1": lambda: L1(alpha), "L2_3": lambda: L2_3(alpha), "L0_5": lambda: L0_5(alpha),
               "MCP": lambda: MCPenalty(alpha, 3.0)}[name]()
    strategy = "subdiff" if name in ("L1", "MCP") else "fixpoint"
    return GeneralizedLinearEstimator(Quadratic(), penalty, AndersonCD(tol=tol, fit_intercept=False, ws_strategy=strategy,
                                                                       max_iter=1000))


def warm_up_skglm() -> None:
    """Fit each penalty once on a tiny problem: numba compiles there, not inside the timings."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 8)), rng.standard_normal(20)
    for _, name, _ in SKGLM:
        skglm_estimator(name, 0.1, 1e-6).fit(X, y)


def run_problem(label: str, X, y, truth, levels, args) -> dict:
    n = X.shape[0]
    amax = float(np.abs(X.T @ y).max() / n)
    rows = {}
    norm = float(np.linalg.norm(truth))

    def record(method, alpha, q, w, seconds, extra=None):
        row = dict(alpha=alpha, nnz=int((w != 0).sum()), f1=support_f1(w, truth), error=float(np.linalg.norm(w - truth)) / norm,
                   seconds=seconds, objective=objective(X, y, w, alpha, q) if q is not None else None, **(extra or {}))
        rows.setdefault(method, []).append(row)
        return row

    for r in levels:
        t = r * amax
        solutions = {}
        for (s_label, penalty, q), (k_label, k_name, k_q) in zip(SPREAD, SKGLM):
            alpha = alpha_for(t, q)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = SpreadLq(alpha, penalty=penalty, fit_intercept=False, tol=args.tol, max_iter=args.max_steps).fit(X, y)
            seconds = time.perf_counter() - start
            solutions[q] = est.coef_
            record(s_label, alpha, q, est.coef_, seconds, dict(steps=est.n_iter_, kkt=est.kkt_residual_, level=r))
            if args.no_skglm:
                continue
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w = skglm_estimator(k_name, alpha, args.skglm_tol).fit(X, y).coef_
            seconds = time.perf_counter() - start
            # the same penalty at both solutions: each side's objective, and the other's
            record(k_label, alpha, q, w, seconds, dict(level=r, spread_objective=objective(X, y, solutions[q], alpha, q)))
        if not args.no_skglm:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w = skglm_estimator("MCP", t, args.skglm_tol).fit(X, y).coef_
            record("skglm MCP", t, None, w, time.perf_counter() - start, dict(level=r))
    return dict(problem=label, n=n, d=X.shape[1], s=int((truth != 0).sum()), alpha_max=amax, methods=rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small Toeplitz problem, 4 strengths (< 1 min)")
    parser.add_argument("--snr", type=float, nargs="*", default=None, help="signal-to-noise ratios (default 1 3 10; quick 3)")
    parser.add_argument("--levels", type=int, default=None, help="number of strengths (default 8; quick 4)")
    parser.add_argument("--no-genes", action="store_true")
    parser.add_argument("--no-skglm", action="store_true")
    parser.add_argument("--data", type=Path, default=GENES)
    parser.add_argument("--tol", type=float, default=1e-6, help="SpreadLq's tol (KKT residual relative to max|X^T y|/n)")
    parser.add_argument("--skglm-tol", type=float, default=1e-8)
    parser.add_argument("--max-steps", type=int, default=300, help="SpreadLq's max_iter (LBFGS steps of 10 iterations)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    snrs = args.snr or ([3.0] if args.quick else [1.0, 3.0, 10.0])
    levels = np.geomspace(0.7, 0.02, args.levels or (4 if args.quick else 8)).tolist()
    t_start = time.perf_counter()
    if not args.no_skglm:
        try:
            warm_up_skglm()
        except ImportError:
            print("skglm is not installed: spread only")
            args.no_skglm = True
    records = []
    n, d, s = (120, 300, 5) if args.quick else (500, 2000, 20)
    for i, snr in enumerate(snrs):
        X, y, truth = make_problem(toeplitz_design(n, d, 0.6, seed=i), s, snr, seed=100 + i)
        records.append(run_problem(f"toeplitz rho=0.6 n={n} d={d} s={s} SNR={snr:g}", X, y, truth, levels, args))
        print(f"  {records[-1]['problem']}: {time.perf_counter() - t_start:.0f}s", flush=True)
    skipped = []
    if not args.quick and not args.no_genes:
        files = sorted(args.data.glob("*.npz")) if args.data.is_dir() else []
        if not files:
            skipped.append(f"no gene sets in {args.data}")
        for j, path in enumerate(files):
            X, y, truth = make_problem(np.load(path)["X"], 20, 3.0, seed=200 + j)
            records.append(run_problem(f"{path.stem} ({X.shape[0]} x {X.shape[1]}) s=20 SNR=3", X, y, truth, levels, args))
            print(f"  {records[-1]['problem']}: {time.perf_counter() - t_start:.0f}s", flush=True)
    machine = platform.processor() or platform.machine()
    try:
        machine = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    command = "python " + " ".join(["benchmarks/nonconvex.py", *(argv if argv is not None else sys.argv[1:])])
    meta = dict(command=command, machine=machine, torch=torch.__version__, threads=args.threads, quick=args.quick,
                levels=levels, snrs=snrs, seconds=time.perf_counter() - t_start, skipped=skipped, dtype="float64")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nonconvex.json").write_text(json.dumps(dict(meta=meta, problems=records), indent=1))
    plot(records, args.out / "nonconvex.png", meta)
    print_tables(records, meta)
    print(f"\nwrote {args.out / 'nonconvex.json'} and {args.out / 'nonconvex.png'}")
    return records


def comparison(problem) -> list[tuple]:
    """Per penalty: spread's objective against skglm's, over the strengths (relative differences)."""
    out = []
    for (s_label, _, q), (k_label, _, _) in zip(SPREAD, SKGLM):
        theirs = problem["methods"].get(k_label)
        if not theirs:
            continue
        ours = problem["methods"][s_label]
        rel = [(a["objective"] - b["objective"]) / abs(b["objective"]) for a, b in zip(ours, theirs)]
        out.append((ref.penalty_name(int(round(2 / q))), rel))
    return out


def print_tables(records, meta):
    print(f"\nNon-convex sparse regression ({meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), "
          f"float64, total {meta['seconds']:.0f}s)\ncommand: {meta['command']}")
    for line in meta["skipped"]:
        print(f"  note: {line}")
    print("\nBest support F1 over the strengths (its nonzeros, its relative error), and the smallest error:\n")
    methods = [m for m, _, _ in SPREAD] + [m for m, _, _ in SKGLM]
    print("| problem | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for p in records:
        cells = []
        for m in methods:
            rows = p["methods"].get(m)
            if not rows:
                cells.append("-")
                continue
            best = max(rows, key=lambda r: (r["f1"], -r["error"]))
            cells.append(f"F1 {best['f1']:.2f} ({best['nnz']}, err {best['error']:.2f}); min err {min(r['error'] for r in rows):.2f}")
        print(f"| {p['problem']} | " + " | ".join(cells) + " |")
    print("\nObjective reached, same penalty and alpha: (spread - skglm) / |skglm| at each strength (negative: spread "
          "lower), and total wall time (s) over the strengths, spread / skglm:\n")
    print("| problem | penalty | relative differences, strongest first | spread lower / equal (1e-9) / higher | time spread / skglm |")
    print("|---|---|---|---|---|")
    for p in records:
        for (name, rel), (s_label, _, _), (k_label, _, _) in zip(comparison(p), SPREAD, SKGLM):
            lower = sum(r < -1e-9 for r in rel)
            equal = sum(abs(r) <= 1e-9 for r in rel)
            ts = sum(r["seconds"] for r in p["methods"][s_label])
            tk = sum(r["seconds"] for r in p["methods"][k_label])
            print(f"| {p['problem']} | {name} | {' '.join(f'{r:+.1e}' for r in rel)} | {lower} / {equal} / "
                  f"{len(rel) - lower - equal} | {ts:.1f} / {tk:.1f} |")


def plot(records, path: Path, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_row = min(3, len(records))
    blocks = -(-len(records) // per_row)
    fig, axes = plt.subplots(2 * blocks, per_row, figsize=(4 * per_row, 3.2 * blocks * 2 / 1.3), squeeze=False)
    styles = {m: dict(color=c, marker=mk, ls=ls) for (m, c, mk, ls) in [
        ("spread depth 2 (L1)", "C0", "o", "-"), ("spread depth 3 (L2/3)", "C1", "o", "-"), ("spread depth 4 (L1/2)", "C2", "o", "-"),
        ("skglm L1", "C0", "x", "--"), ("skglm L2_3", "C1", "x", "--"), ("skglm L0_5", "C2", "x", "--"), ("skglm MCP", "C3", "s", ":")]}
    for i in range(blocks * per_row):
        top, bottom = axes[2 * (i // per_row), i % per_row], axes[2 * (i // per_row) + 1, i % per_row]
        if i >= len(records):
            top.axis("off")
            bottom.axis("off")
            continue
        p = records[i]
        for m, rows in p["methods"].items():
            rows = sorted(rows, key=lambda r: r["nnz"])
            nnz = [max(r["nnz"], 0.8) for r in rows]
            top.plot(nnz, [r["f1"] for r in rows], label=m, ms=4, lw=1, **styles[m])
            bottom.plot(nnz, [r["error"] for r in rows], label=m, ms=4, lw=1, **styles[m])
        top.set_title(p["problem"], fontsize=8)
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.axvline(p["s"], color="gray", lw=0.5)
        top.set_ylabel("support F1", fontsize=8)
        bottom.set_ylabel("||w - w*|| / ||w*||", fontsize=8)
        bottom.set_xlabel("nonzeros", fontsize=8)
        bottom.set_ylim(0, 1.5)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"non-convex sparse regression: spread depth 2/3/4 vs skglm ({meta['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
