"""Lasso speed: time to a relative suboptimality of 1e-6, spread against scikit-learn, skglm and celer.

Problems (``min_W ||Y - X W||_F^2/(2n) + lambda*||W||_1``, no intercept, ``lambda = 2*kappa``):

* dense Gaussian designs, ``n = 1000``, ``d`` in {1e3, 1e4, 1e5}, 20 true nonzeros per output (signs
  random, magnitudes in [1, 2], supports drawn independently per output), noise sd 0.5; one output, and
  100 outputs fitted as 100 independent lassos with one ``lambda``; ``lambda = 0.1 * lambda_max`` with
  ``lambda_max = max_j ||X^T y_j||_inf / n``. ``X`` is float64 and Fortran-ordered (column-major, the layout
  coordinate descent wants; torch reads the same memory), so no solver pays for a copy. 100 outputs at
  ``d = 1e5`` are skipped by default (scikit-learn's loop alone would take several minutes); ``--full`` runs them;
* ``ALLAML`` (72 samples x 7129 genes, ``../shared/data/genes/ALLAML.npz`` from the project root):
  the 0/1 label regressed on the standardised genes (label centred, no intercept), ``lambda = 0.1*lambda_max``.

Reference ``obj*``: per output, scikit-learn's ``Lasso`` at ``tol=1e-12``; its relative duality gap is
reported as a certificate (``obj - obj* <= gap``).
Suboptimality is ``(obj - obj*)/obj*`` per output. A solver has *reached* the target when its worst output
is within 1e-6 **and** its exact nonzeros are the reference's (for every output); the time to 1e-6 alone
is reported too (in brackets in the table when it came earlier).

Timing protocol (single thread everywhere by default: ``torch.set_num_threads(1)`` and
``threadpoolctl`` for NumPy's BLAS; ``--threads`` to change). Untimed warm-up fits first (numba
compilation in skglm, torch's lazy imports):

* solvers with a tolerance (scikit-learn ``Lasso``, skglm, celer, ``SpreadLasso``): decreasing tolerances
  (10x apart), each fit from scratch; the reported time is that of the first fit that reached the target
  (its tolerance is reported), the sweep stops there or after ``--sweep-budget`` seconds. With 100
  outputs the sweep starts at the tolerance that succeeded on one output at the same ``d``. skglm and
  celer fit one output per call, so with 100 outputs they run as a loop, as scikit-learn's ``Lasso`` does
  internally for a 2-D ``y``;
* ``LassoLars`` (exact homotopy): one fit, skipped when one output at that ``d`` took so long that the
  100-output loop would exceed ``--budget``;
* spread on the whole ``(d, k)`` parameter with the SGD, Adam and LBFGS bases: one run from ``W = 0``, its
  objective checked after every step; the time is the optimizer's own time up to the first step whose
  result reached the target (checking is not counted), the run stops there or after ``--budget`` seconds
  (SGD, Adam) or ``--lbfgs-budget`` seconds (LBFGS).
  SGD: Nesterov momentum 0.9, ``lr = 1/L`` (``L = ||X||_2^2/n`` by power iteration, counted), halved and
  restarted on divergence (the failed runs count). Adam: ``lr = 0.03``, ``ExponentialLR(0.998)``. LBFGS:
  strong-Wolfe line search, 10 iterations per step, history 20, tolerances 0;
* ``SpreadLasso`` (``spread_optim.linear``): spread + LBFGS on growing per-output working sets, with
  ``tol`` swept like the other solvers' (its ``tol`` is a relative KKT residual).

    python benchmarks/lasso_speed.py           # default sizes (about 4-5 minutes on one loaded core)
    python benchmarks/lasso_speed.py --quick   # tiny sizes (seconds)
    python benchmarks/lasso_speed.py --full    # also 100 outputs at d = 1e5 (long)

Writes ``benchmarks/results/lasso_speed.json`` and ``benchmarks/results/lasso_speed.png``; prints markdown tables.
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

from spread_optim import SpreadAdam, SpreadOptimizer, SpreadSGD
from spread_optim.linear import SpreadLasso

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
ALLAML = ROOT / ".." / "shared" / "data" / "genes" / "ALLAML.npz"
TARGET = 1e-6


# ----------------------------------------------------------------------------------------------------
# problems and objectives


def gaussian_problem(n: int, d: int, outputs: int, seed: int = 0, nonzeros: int = 20):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((d, n)).T  # Fortran-ordered (n, d)
    B = np.zeros((d, outputs))
    for j in range(outputs):
        idx = rng.choice(d, min(nonzeros, d), replace=False)
        B[idx, j] = rng.choice([-1.0, 1.0], len(idx)) * rng.uniform(1.0, 2.0, len(idx))
    Y = X @ B + 0.5 * rng.standard_normal((n, outputs))
    return X, Y, B


def allaml_problem(path: Path):
    data = np.load(path)
    X = data["X"].astype(np.float64)
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    y = data["y"].astype(np.float64)
    return np.asfortranarray(X), (y - y.mean())[:, None]


def objectives(X, Y, W, lam):
    """Per-output objective ``||y_j - X w_j||^2/(2n) + lam*||w_j||_1`` in float64."""
    n = X.shape[0]
    R = Y - X @ W
    return (R * R).sum(0) / (2 * n) + lam * np.abs(W).sum(0)


def duality_gaps(X, Y, W, lam):
    """Per-output duality gap of the lasso (a certificate: ``obj - obj* <= gap``)."""
    n = X.shape[0]
    R = Y - X @ W
    scale = np.maximum(np.abs(X.T @ R).max(0), n * lam)
    theta = R / scale  # dual feasible: ||X^T theta||_inf <= 1
    primal = (R * R).sum(0) / (2 * n) + lam * np.abs(W).sum(0)
    dual = (Y * Y).sum(0) / (2 * n) - (n * lam**2 / 2) * ((theta - Y / (n * lam)) ** 2).sum(0)
    return primal - dual


# ----------------------------------------------------------------------------------------------------
# solvers with a tolerance: sweeps


def sklearn_lasso(X, Y, lam, tol):
    from sklearn.linear_model import Lasso

    model = Lasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=1_000_000)
    model.fit(X, Y if Y.shape[1] > 1 else Y[:, 0])
    return np.atleast_2d(model.coef_).T


def per_output(make):
    def fit(X, Y, lam, tol):
        return np.stack([make(lam, tol).fit(X, Y[:, j]).coef_ for j in range(Y.shape[1])], 1)
    return fit


def skglm_lasso(lam, tol):
    from skglm import Lasso

    return Lasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=1000, max_epochs=100_000)


def celer_lasso(lam, tol):
    from celer import Lasso

    return Lasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=1000, max_epochs=100_000)


def spread_lasso(X, Y, lam, tol):
    model = SpreadLasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, Y)
    return np.atleast_2d(model.coef_).T


def lars(X, Y, lam, tol=None):
    from sklearn.linear_model import LassoLars

    model = LassoLars(alpha=lam, fit_intercept=False, max_iter=5000, fit_path=False)
    model.fit(X, Y if Y.shape[1] > 1 else Y[:, 0])
    return np.atleast_2d(model.coef_).T


SWEEPS = {  # name -> (fit(X, Y, lam, tol) -> W (d, k), tolerances from loose to tight)
    "sklearn Lasso (CD)": (sklearn_lasso, [1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-8, 1e-10]),
    "skglm": (per_output(skglm_lasso), [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-8, 1e-10]),
    "celer": (per_output(celer_lasso), [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-8, 1e-10]),
    "spread LBFGS + working sets": (spread_lasso, [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8]),
}


class Firsts:
    """Records the first result within the target objective, and the first also with the reference's support."""

    def __init__(self):
        self.objective = None  # first result with subopt <= TARGET
        self.exact = None  # first result with subopt <= TARGET and the reference's support
        self.last = None

    def add(self, result: dict) -> bool:
        self.last = result
        if result["within"] and self.objective is None:
            self.objective = result
        if result["within"] and result["support_mismatches"] == 0 and self.exact is None:
            self.exact = result
        return self.exact is not None

    def summary(self, **extra) -> dict:
        main = self.exact or self.last
        out = {k: v for k, v in main.items() if k != "W"}
        out["reached"] = self.exact is not None
        out["objective_only"] = None if self.objective is None else dict(seconds=self.objective["seconds"], setting=self.objective["setting"],
                                                                          support_mismatches=self.objective["support_mismatches"])
        out.update(extra)
        return out


def sweep(fit, tolerances, X, Y, lam, judge, start_tol=None, budget=math.inf):
    """Fits at decreasing tolerances (each from scratch) until one is within the target with the
    reference's support, or the time spent exceeds ``budget``."""
    spent, firsts = 0.0, Firsts()
    for tol in tolerances:
        if start_tol is not None and tol > start_tol:
            continue
        t0 = time.perf_counter()
        W = fit(X, Y, lam, tol)
        seconds = time.perf_counter() - t0
        spent += seconds
        if firsts.add(dict(judge(W), seconds=seconds, setting=f"tol={tol:g}", tol=tol)) or spent > budget:
            break
    return firsts.summary(swept_seconds=spent)


# ----------------------------------------------------------------------------------------------------
# spread on the whole parameter: one run, objective checked after every step


def lipschitz(X: torch.Tensor, iters: int = 30) -> float:
    """``||X||_2^2 / n`` by power iteration."""
    n = X.shape[0]
    v = torch.ones(X.shape[1], dtype=X.dtype) / math.sqrt(X.shape[1])
    value = 1.0
    for _ in range(iters):
        w = X.T @ (X @ v) / n
        value = float(w.norm())
        v = w / value
    return value


def trajectory(base, Xt, Yt, lam, judge, budget, max_steps):
    """Spread with ``base`` on ``W (d, k)`` from 0; returns a result dict (time of the first good step).

    SGD/Adam: the objective of the current ``W`` is read off the next forward pass (which the next step
    needs anyway), so checking costs nothing; LBFGS: one extra, untimed evaluation after each step.
    """
    n, d = Xt.shape
    k = Yt.shape[1]
    setup = 0.0
    lr_scale = 1.0
    if base == "sgd":
        t0 = time.perf_counter()
        L = lipschitz(Xt)
        setup = time.perf_counter() - t0
    elapsed = setup
    for _ in range(4):  # SGD: lr halved after a divergence (the failed runs' time counts)
        W = torch.zeros(d, k, dtype=Xt.dtype, requires_grad=True)
        sched = None
        if base == "sgd":
            opt = SpreadSGD([W], lr=lr_scale / L, momentum=0.9, nesterov=True, kappa=lam / 2)
            setting = f"lr={lr_scale:g}/L, Nesterov 0.9"
        elif base == "adam":
            opt = SpreadAdam([W], lr=0.03, kappa=lam / 2)
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.998)
            setting = "lr=0.03, ExponentialLR(0.998)"
        else:
            opt = SpreadOptimizer([W], torch.optim.LBFGS, kappa=lam / 2, line_search_fn="strong_wolfe", max_iter=10,
                                  history_size=20, tolerance_grad=0.0, tolerance_change=0.0)
            setting = "strong_wolfe, 10 iterations/step"
        box = [None]

        def closure():
            opt.zero_grad()
            R = Yt - Xt @ W
            per_output = R.pow(2).sum(0) / (2 * n)
            loss = per_output.sum()
            loss.backward()
            box[0] = per_output.detach()
            return loss

        firsts, diverged = Firsts(), False
        try:
            for step in range(max_steps + 1):
                if base == "lbfgs":
                    if step:
                        t0 = time.perf_counter()
                        opt.step(closure)
                        elapsed += time.perf_counter() - t0
                    Wn = W.detach().numpy().copy()
                    last = dict(judge(Wn), seconds=elapsed, setting=f"{setting}, {step} steps")
                    done = firsts.add(last)
                else:
                    t0 = time.perf_counter()
                    closure()  # at the W that `step` steps produced
                    forward = time.perf_counter() - t0
                    Wn = W.detach().numpy().copy()
                    obj = box[0].numpy() + lam * np.abs(Wn).sum(0)
                    last = dict(judge(Wn, obj), seconds=elapsed, setting=f"{setting}, {step} steps")
                    done = firsts.add(last)
                    if not done and last["subopt"] < 1e6 and elapsed <= budget:
                        t0 = time.perf_counter()
                        opt.step()
                        if sched:
                            sched.step()
                        elapsed += forward + time.perf_counter() - t0
                if not np.isfinite(Wn).all() or last["subopt"] > 1e6:
                    diverged = True
                    break
                if done or elapsed > budget:
                    break
        except FloatingPointError:  # spread refuses a non-finite gradient
            diverged = True
        if diverged and base == "sgd":
            lr_scale /= 2
            continue
        if diverged:
            return dict(reached=False, subopt=math.inf, seconds=elapsed, setting=f"{setting}: diverged", nnz=None,
                        support_mismatches=None, objective_only=None)
        return firsts.summary()
    return dict(reached=False, subopt=math.inf, seconds=elapsed, setting="diverged at lr = 1/L ... 1/(8L)", nnz=None,
                support_mismatches=None, objective_only=None)


# ----------------------------------------------------------------------------------------------------
# one problem


def run_problem(name, X, Y, lam, args, bar, single_output_tols=None):
    n, d = X.shape
    k = Y.shape[1]
    # reference: scikit-learn's coordinate descent at tol 1e-12 (certified below by the duality gap)
    t0 = time.perf_counter()
    W_ref = sklearn_lasso(X, Y, lam, 1e-12)
    reference_seconds = time.perf_counter() - t0
    obj_ref = objectives(X, Y, W_ref, lam)
    support_ref = W_ref != 0

    def judge(W, obj=None):
        W = np.asarray(W, dtype=np.float64).reshape(d, k)
        sub = ((objectives(X, Y, W, lam) if obj is None else obj) - obj_ref) / obj_ref
        return dict(within=bool(sub.max() <= TARGET), subopt=float(sub.max()), nnz=int((W != 0).sum()),
                    support_mismatches=int(((W != 0) != support_ref).sum()))

    results = {}
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(np.ascontiguousarray(Y))
    for solver, (fit, tols) in SWEEPS.items():
        start = single_output_tols.get(solver) if single_output_tols else None
        results[solver] = sweep(fit, tols, X, Y, lam, judge, start_tol=start, budget=args.sweep_budget)
        bar.update()
    # LassoLars: exact homotopy, one fit
    lars_key = "sklearn LassoLars"
    estimate = args.lars_seconds.get(d, 0.0) * k if k > 1 else 0.0
    if estimate > args.budget:
        results[lars_key] = dict(skipped=f"estimated {estimate:.0f}s (> --budget {args.budget:g}s) from one output at this d")
    else:
        t0 = time.perf_counter()
        W = lars(X, Y, lam)
        seconds = time.perf_counter() - t0
        firsts = Firsts()
        firsts.add(dict(judge(W), seconds=seconds, setting="one fit"))
        results[lars_key] = firsts.summary()
        if k == 1:
            args.lars_seconds[d] = seconds
    bar.update()
    for base in ("sgd", "adam", "lbfgs"):
        budget = args.lbfgs_budget if base == "lbfgs" else args.budget
        results[f"spread {base.upper() if base != 'adam' else 'Adam'} (full W)"] = trajectory(
            base, Xt, Yt, lam, judge, budget, args.max_steps)
        bar.update()
    gaps = duality_gaps(X, Y, W_ref, lam)
    record = dict(
        problem=name, n=n, d=d, outputs=k, lam=lam, reference_seconds=reference_seconds,
        reference_nnz=int(support_ref.sum()), reference_objective=float(obj_ref.sum()),
        reference_max_relative_gap=float((gaps / obj_ref).max()),
        solvers=results,
    )
    return record


def fmt_time(r):
    if r is None:
        return "-"
    if "skipped" in r:
        return "skipped"
    text = f"{r['seconds']:.3g}" if r["reached"] else f"> {r.get('swept_seconds', r['seconds']):.3g} (not reached)"
    first = r.get("objective_only")
    if first and (not r["reached"] or first["seconds"] < r["seconds"]):
        text += f" ({first['seconds']:.3g})"
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (n=200, d=300, 1 and 4 outputs, and ALLAML; seconds)")
    parser.add_argument("--full", action="store_true", help="also 100 outputs at d=1e5 (long)")
    parser.add_argument("--dims", type=int, nargs="*", default=None)
    parser.add_argument("--outputs", type=int, nargs="*", default=None)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds per spread SGD / Adam run on the full W (default 15; quick 1.5)")
    parser.add_argument("--lbfgs-budget", type=float, default=None, help="seconds per spread LBFGS run on the full W (default 60; quick 5)")
    parser.add_argument("--sweep-budget", type=float, default=None, help="seconds per tolerance sweep (default 120; quick 5)")
    parser.add_argument("--max-steps", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-allaml", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    n = args.n or (200 if args.quick else 1000)
    dims = args.dims or ([300] if args.quick else [1000, 10_000, 100_000])
    outputs = args.outputs or ([1, 4] if args.quick else [1, 100])
    args.budget = args.budget or (1.5 if args.quick else 15.0)
    args.lbfgs_budget = args.lbfgs_budget or (5.0 if args.quick else 60.0)
    args.sweep_budget = args.sweep_budget or (5.0 if args.quick else 120.0)
    args.lars_seconds = {}
    skipped = []
    cases = []
    for k in outputs:
        for d in dims:
            if k >= 100 and d >= 100_000 and not args.full:
                skipped.append(f"{k} outputs at d={d}: skipped by default (scikit-learn's per-output loop alone takes "
                               "minutes; the design is 800 MB in float64); run with --full")
                continue
            cases.append((k, d))
    allaml = not args.no_allaml and ALLAML.exists()
    if not args.no_allaml and not ALLAML.exists():
        skipped.append(f"ALLAML: {ALLAML} not found")

    # warm-up (untimed): numba compilation in skglm, torch's lazy imports, BLAS initialisation
    Xw, Yw, _ = gaussian_problem(50, 30, 2, seed=99)
    for fit, _ in SWEEPS.values():
        fit(Xw, Yw, 0.1, 1e-4)
    lars(Xw, Yw, 0.1)
    for base in ("sgd", "adam", "lbfgs"):
        trajectory(base, torch.from_numpy(Xw), torch.from_numpy(np.ascontiguousarray(Yw)), 0.1,
                   lambda W, obj=None: dict(within=False, subopt=1.0, nnz=0, support_mismatches=0), 1.0, 5)

    per_problem = 4 + 1 + 3
    records = []
    t_start = time.perf_counter()
    with tqdm(total=per_problem * (len(cases) + allaml), desc="lasso speed", unit="solver") as bar:
        single_tols = {}
        for k, d in cases:
            bar.set_postfix_str(f"d={d}, {k} output(s)")
            X, Y, _ = gaussian_problem(n, d, k)
            lam = 0.1 * float(np.abs(X.T @ Y).max() / n)
            start = single_tols.get(d) if k > 1 else None
            rec = run_problem(f"gaussian d={d}, {k} output(s)", X, Y, lam, args, bar, start)
            if k == 1:
                single_tols[d] = {s: r["tol"] for s, r in rec["solvers"].items() if s in SWEEPS and r.get("reached")}
            records.append(rec)
            del X, Y
        if allaml:
            bar.set_postfix_str("ALLAML")
            X, Y = allaml_problem(ALLAML)
            lam = 0.1 * float(np.abs(X.T @ Y).max() / X.shape[0])
            records.append(run_problem("ALLAML (72 x 7129)", X, Y, lam, args, bar))
    total = time.perf_counter() - t_start

    machine = platform.processor() or platform.machine()
    try:
        machine = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    command = "python " + " ".join(["benchmarks/lasso_speed.py", *(argv if argv is not None else sys.argv[1:])])
    meta = dict(command=command, machine=machine, torch=torch.__version__, threads=args.threads, quick=args.quick, n=n,
                dims=dims, outputs=outputs, budget=args.budget, lbfgs_budget=args.lbfgs_budget,
                sweep_budget=args.sweep_budget, target=TARGET, seconds=total, skipped=skipped, dtype="float64")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lasso_speed.json").write_text(json.dumps(dict(meta=meta, problems=records), indent=1))
    plot(records, args.out / "lasso_speed.png", meta)
    print_tables(records, meta)
    print(f"\nwrote {args.out / 'lasso_speed.json'} and {args.out / 'lasso_speed.png'}")
    return records


def print_tables(records, meta):
    print(f"\nLasso, time (s) to relative suboptimality {TARGET:g} in the worst output ({meta['machine']}, torch "
          f"{meta['torch']}, {meta['threads']} thread(s), float64, total {meta['seconds']:.0f}s)")
    print(f"command: {meta['command']}")
    for line in meta["skipped"]:
        print(f"  note: {line}")
    print("\ntime: to suboptimality <= 1e-6 *and* the reference's support; in brackets, to suboptimality <= 1e-6 alone "
          "when that came earlier. Ratio: scikit-learn Lasso's time / this solver's (> 1: faster than scikit-learn).")
    print("\n| problem | solver | time (s) | how | suboptimality | nonzeros (ref) | support = ref | sklearn CD time / this |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for rec in records:
        base = rec["solvers"].get("sklearn Lasso (CD)")
        base_t = base["seconds"] if base and base.get("reached") else None
        for solver, r in rec["solvers"].items():
            if r is None:
                continue
            if "skipped" in r:
                print(f"| {rec['problem']} | {solver} | skipped | {r['skipped']} | | | | |")
                continue
            ratio = f"{base_t / r['seconds']:.2f}x" if base_t and r.get("reached") else ""
            support = "yes" if r["support_mismatches"] == 0 else (f"no ({r['support_mismatches']} differ)" if r["support_mismatches"] is not None else "-")
            print(f"| {rec['problem']} | {solver} | {fmt_time(r)} | {r['setting']} | {r['subopt']:.1e} | "
                  f"{r['nnz']} ({rec['reference_nnz']}) | {support} | {ratio} |")
    print("\nreference: scikit-learn Lasso at tol=1e-12; its largest relative duality "
          "gap: " + ", ".join(f"{r['problem']}: {r['reference_max_relative_gap']:.0e}" for r in records))


def plot(records, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gauss = [r for r in records if r["problem"].startswith("gaussian")]
    outputs = sorted({r["outputs"] for r in gauss})
    fig, axes = plt.subplots(1, max(1, len(outputs)), figsize=(6 * max(1, len(outputs)), 4.5), squeeze=False)
    solvers = list(gauss[0]["solvers"]) if gauss else []
    markers = dict(zip(solvers, "os^vD<>ph*"))
    for ax, k in zip(axes[0], outputs):
        recs = sorted((r for r in gauss if r["outputs"] == k), key=lambda r: r["d"])
        for s in solvers:
            pts = [(r["d"], r["solvers"][s]) for r in recs if r["solvers"].get(s) and "skipped" not in r["solvers"][s]]
            ok = [(d, r["seconds"]) for d, r in pts if r["reached"]]
            bad = [(d, r["seconds"]) for d, r in pts if not r["reached"]]
            line, = ax.plot(*zip(*ok), marker=markers[s], label=s) if ok else ax.plot([], [], marker=markers[s], label=s)
            if bad:
                ax.plot(*zip(*bad), ls="none", marker="x", ms=9, color=line.get_color())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("d (features), n = %d" % recs[0]["n"] if recs else "d")
        ax.set_ylabel(f"seconds to suboptimality {TARGET:g} + exact support")
        ax.set_title(f"{k} output(s) ({meta['threads']} thread(s); x = not reached, time spent)")
        ax.grid(True, which="both", alpha=0.3)
    if solvers:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(f"lasso, lambda = 0.1 lambda_max, dense Gaussian X ({meta['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
