"""Feature (gene) selection on six gene-expression sets: spread against the usual baselines.

Protocol (the paper's): for each repetition a random stratified 60/20/20 train/dev/test split of each set; the
features are standardised with the training part's mean and standard deviation; every hyperparameter is chosen on
the dev part only (grid below; epochs by early stopping on dev accuracy, checked every ``--check-every`` epochs from
``--min-epochs`` on, 100 by default: spread needs about 100 Adam steps to prune what its first steps let in; up to
``--epochs`` (250) for the MLPs and ``--spread-epochs`` (150) for spread, whose later checkpoints only pruned more
genes on the tuning splits (seeds 100-105) without raising the dev-chosen accuracy; ties
in dev accuracy go to fewer selected genes, then to the earlier checkpoint); the test part is looked at only for the
chosen configuration. Reported per set and method: test accuracy mean +- standard error over the repetitions, the
number of genes the chosen model uses (input columns with a nonzero weight), the wall time of one fit and of the
whole grid. The majority-class rate of the test part is the floor.

Methods (all full batch on one CPU thread; the networks have one hidden ReLU layer of ``--width`` units):

* ``spread linear``: :class:`spread_optim.SpreadFeatureSelector` with ``hidden_sizes=()``: softmax regression with
  a group lasso over the weight's columns (one spread factor per gene), Adam; grid over ``kappa``. Both spread
  methods use ``working_set=True`` (``--no-working-set`` for the plain fit over all genes): the optimizer sees the
  nonzero genes plus the worst violators of the zero genes' optimality condition, checked over all genes every 25
  epochs.
* ``spread linear+MLP``: the same with ``hidden_sizes=(width,)``: the linear model and the MLP share one factor per
  gene (``share_groups=True``), loss = sum of the two cross-entropies; prediction from the two models' averaged
  probabilities (the selector's own ``predict``; ``--spread-head best``: the linear model, the MLP or the average,
  whichever is best on dev); grid over ``kappa``.
* ``spread linear+MLP, then MLP (WD) on its genes`` (a separate row: a two-stage protocol, not the plain method):
  the genes of the dev-chosen ``spread linear+MLP`` model, then the ``MLP (WD)`` grid below on those genes only
  (weight decay and epochs chosen on dev); its fit times are the refit's alone (add the spread grid for the total).
* ``MLP (WD)``: a plain MLP with Adam's L2 ``weight_decay`` on all weights; grid over it.
* ``MLP (naive L1)``: the same MLP with ``lam*||first layer||_1`` added to the loss, minimised by Adam through
  the subgradient (no exact zeros: the genes column counts every column that is not exactly zero); grid over ``lam``.
* ``L1 logistic``: scikit-learn ``LogisticRegression(l1_ratio=1, solver="liblinear")`` (one-vs-rest for more
  than two classes, as liblinear does not fit multinomial models); grid over ``C``.
* ``LassoNet`` (``lassonet`` package, when installed; not in the default ``--methods``: one path took 180 s on
  lymphoma with --quick's budget): ``LassoNetClassifier`` path (hidden layer ``--width``,
  ``path_multiplier`` 1.2 and a short iteration budget to keep it affordable); the point of the path chosen on
  dev accuracy.
* ``HSIC Lasso`` (``pyHSICLasso``, when installed): block HSIC Lasso (``B=10, M=3``) ranks ``max(k)`` genes;
  an L2 logistic regression (``C=1``) on the top ``k`` genes, ``k`` chosen on dev. (pyHSICLasso 1.4's fallback for a
  singular system refers to ``np.linalg.linalg``, gone in NumPy 2: the script aliases it so that the fallback runs.)

    python benchmarks/feature_selection.py                 # default (2 repetitions)
    python benchmarks/feature_selection.py --reps 20       # the paper's 20 repetitions
    python benchmarks/feature_selection.py --quick         # smoke run: one small set, 1 repetition, tiny grids

Data: ``../shared/data/genes/*.npz`` relative to the repository root (``--data``), never copied. Writes
``feature_selection.json`` and ``feature_selection.png`` (test accuracy against the number of genes used) under
``benchmarks/results/`` (``--results``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from spread_optim import SpreadFeatureSelector

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "genes"
RESULTS = Path(__file__).parent / "results"
SETS = ["ALLAML", "GLIOMA", "Prostate_GE", "TOX_171", "lymphoma", "nci9"]
REFIT = "spread linear+MLP, then MLP (WD) on its genes"
METHODS = ["spread linear", "spread linear+MLP", REFIT, "MLP (WD)", "MLP (naive L1)", "L1 logistic", "LassoNet", "HSIC Lasso"]
#: LassoNet's path took 180 s for one fit on lymphoma even with --quick's budget: opt in with --methods
DEFAULT_METHODS = [m for m in METHODS if m != "LassoNet"]


# ----------------------------------------------------------------------------------------------------
# data


def load_set(data: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(data / f"{name}.npz") as f:
        return f["X"].astype(np.float64), f["y"].astype(np.int64)


def split(X: np.ndarray, y: np.ndarray, seed: int):
    """Stratified 60/20/20 train/dev/test, standardised with the training part's statistics."""
    from sklearn.model_selection import train_test_split

    X_tr, X_rest, y_tr, y_rest = train_test_split(X, y, test_size=0.4, stratify=y, random_state=seed)
    # a class with a single sample left in the rest cannot be stratified again: fall back to a plain split
    strat = y_rest if np.bincount(y_rest).max(initial=0) > 1 and (np.bincount(y_rest)[np.unique(y_rest)] >= 2).all() else None
    X_dv, X_te, y_dv, y_te = train_test_split(X_rest, y_rest, test_size=0.5, stratify=strat, random_state=seed)
    mean, std = X_tr.mean(0), X_tr.std(0)
    std[std == 0] = 1.0
    return [((A - mean) / std, b) for A, b in ((X_tr, y_tr), (X_dv, y_dv), (X_te, y_te))]


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(pred == y))


def better(a: dict | None, b: dict) -> bool:
    """Is candidate ``b`` better than ``a`` on dev? Dev accuracy, then fewer genes, then earlier."""
    if a is None:
        return True
    return (b["dev_acc"], -b["genes"]) > (a["dev_acc"], -a["genes"])


# ----------------------------------------------------------------------------------------------------
# methods: each returns the chosen configuration's row (dev_acc, test_acc, genes, config) and fit times


def run_spread(sp, hidden, kappas, args, seed):
    (X_tr, y_tr), (X_dv, y_dv), (X_te, y_te) = sp
    best, fits = None, []
    for kappa in kappas:
        sel = SpreadFeatureSelector(kappa=kappa, hidden_sizes=hidden, weight_decay=args.spread_wd, lr=args.lr,
                                    max_epochs=args.check_every, standardize=False, warm_start=True, random_state=seed,
                                    working_set=args.working_set)
        start = time.perf_counter()
        for epoch in range(args.check_every, args.spread_epochs + 1, args.check_every):
            sel.fit(X_tr, y_tr)
            if epoch < args.min_epochs:
                continue
            with torch.no_grad():
                outs = {}
                for part, X in (("dev", X_dv), ("test", X_te)):
                    probs = [torch.softmax(o, 1).numpy() for o in sel.model_(torch.as_tensor(X, dtype=torch.float32))]
                    if len(probs) == 1:
                        outs[part] = {"linear": probs[0]}
                    elif args.spread_head == "average":  # the selector's own predict: the mean of the probabilities
                        outs[part] = {"average": (probs[0] + probs[1]) / 2}
                    else:
                        outs[part] = {"linear": probs[0], "MLP": probs[1], "average": (probs[0] + probs[1]) / 2}
            for head in outs["dev"]:
                cand = dict(dev_acc=accuracy(sel.classes_[outs["dev"][head].argmax(1)], y_dv),
                            test_acc=accuracy(sel.classes_[outs["test"][head].argmax(1)], y_te),
                            genes=sel.n_selected_features_, config=dict(kappa=kappa, epochs=epoch, head=head))
                if better(best, cand):
                    best = dict(cand, _support=sel.get_support(indices=True))
        fits.append(time.perf_counter() - start)
    return best, fits


class MLP(torch.nn.Module):
    def __init__(self, d, width, k):
        super().__init__()
        self.first = torch.nn.Linear(d, width)
        self.out = torch.nn.Linear(width, k)

    def forward(self, x):
        return self.out(torch.relu(self.first(x)))


def run_mlp(sp, grid, kind, args, seed):
    """Plain MLP, Adam; ``kind="wd"``: grid over weight_decay; ``"l1"``: grid over the L1 strength on the first layer."""
    (X_tr, y_tr), (X_dv, y_dv), (X_te, y_te) = sp
    classes = np.unique(y_tr)
    Xt, Xd, Xs = (torch.as_tensor(A, dtype=torch.float32) for A in (X_tr, X_dv, X_te))
    yt = torch.as_tensor(np.searchsorted(classes, y_tr))
    best, fits = None, []
    for value in grid:
        torch.manual_seed(seed)
        model = MLP(X_tr.shape[1], args.width, len(classes))
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=value if kind == "wd" else 0.0)
        start = time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(Xt), yt)
            if kind == "l1":
                loss = loss + value * model.first.weight.abs().sum()
            loss.backward()
            opt.step()
            if epoch % args.check_every == 0 and epoch >= args.min_epochs:
                with torch.no_grad():
                    genes = int((model.first.weight != 0).any(0).sum())
                    cand = dict(dev_acc=accuracy(classes[model(Xd).argmax(1).numpy()], y_dv),
                                test_acc=accuracy(classes[model(Xs).argmax(1).numpy()], y_te),
                                genes=genes, config={("weight_decay" if kind == "wd" else "lam"): value, "epochs": epoch})
                if better(best, cand):
                    best = cand
        fits.append(time.perf_counter() - start)
    return best, fits


def run_l1_logistic(sp, Cs, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    (X_tr, y_tr), (X_dv, y_dv), (X_te, y_te) = sp
    best, fits = None, []
    for C in Cs:
        base = LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", max_iter=1000, random_state=seed)
        model = base if len(np.unique(y_tr)) == 2 else OneVsRestClassifier(base)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(X_tr, y_tr)
        fits.append(time.perf_counter() - start)
        coef = model.coef_ if hasattr(model, "coef_") else np.vstack([e.coef_ for e in model.estimators_])
        cand = dict(dev_acc=accuracy(model.predict(X_dv), y_dv), test_acc=accuracy(model.predict(X_te), y_te),
                    genes=int((coef != 0).any(0).sum()), config=dict(C=C))
        if better(best, cand):
            best = cand
    return best, fits


def run_lassonet(sp, args, seed):
    from lassonet import LassoNetClassifier

    (X_tr, y_tr), (X_dv, y_dv), (X_te, y_te) = sp
    model = LassoNetClassifier(hidden_dims=(args.width,), path_multiplier=1.2, n_iters=(args.lassonet_iters, 30),
                               patience=(20, 5), verbose=0, random_state=seed, torch_seed=seed)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = model.path(X_tr, y_tr, X_val=X_dv, y_val=y_dv, return_state_dicts=True)
    seconds = time.perf_counter() - start
    best = None
    for item in path:
        model.load(item.state_dict)
        cand = dict(dev_acc=accuracy(model.predict(X_dv), y_dv), test_acc=accuracy(model.predict(X_te), y_te),
                    genes=int(item.selected.sum()), config=dict(lambda_=float(item.lambda_)))
        if cand["genes"] > 0 and better(best, cand):
            best = cand
    return best, [seconds]


def run_hsic(sp, ks, seed):
    from pyHSICLasso import HSICLasso
    from sklearn.linear_model import LogisticRegression

    (X_tr, y_tr), (X_dv, y_dv), (X_te, y_te) = sp
    if not hasattr(np.linalg, "linalg"):  # pyHSICLasso 1.4 catches np.linalg.linalg.LinAlgError (gone in NumPy 2):
        np.linalg.linalg = np.linalg      # let its own singular-matrix fallback (a tiny jitter) run instead of crashing
    hsic = HSICLasso()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # it prints its settings
            hsic.input(X_tr, y_tr + 1)  # labels from 1 (its delta kernel is fine either way)
            hsic.classification(num_feat=max(ks), B=10, M=3, n_jobs=1)
    seconds = time.perf_counter() - start
    order = hsic.get_index()
    best = None
    for k in ks:
        cols = order[:k]
        clf = LogisticRegression(C=1.0, max_iter=2000).fit(X_tr[:, cols], y_tr)
        cand = dict(dev_acc=accuracy(clf.predict(X_dv[:, cols]), y_dv), test_acc=accuracy(clf.predict(X_te[:, cols]), y_te),
                    genes=len(cols), config=dict(k=k))
        if better(best, cand):
            best = cand
    return best, [seconds]


# ----------------------------------------------------------------------------------------------------
# report


def summarize(rows: list[dict]) -> dict:
    acc = np.array([r["test_acc"] for r in rows])
    genes = np.array([r["genes"] for r in rows], dtype=float)
    se = float(acc.std(ddof=1) / math.sqrt(len(acc))) if len(acc) > 1 else float("nan")
    return dict(acc_mean=float(acc.mean()), acc_se=se, genes_mean=float(genes.mean()),
                fit_seconds=float(np.mean([s for r in rows for s in r["fit_seconds"]])),
                grid_seconds=float(np.mean([sum(r["fit_seconds"]) for r in rows])), reps=len(rows))


def plot(summary: dict, sets: list[str], dims: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(sets))
    rows = math.ceil(len(sets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    markers = dict(zip(METHODS, "o s * ^ v D P X".split()))
    for ax, name in zip(axes.flat, sets):
        for method, s in summary[name].items():
            if method == "majority":
                ax.axhline(s["acc_mean"], color="grey", ls=":", lw=1, label="majority class")
                continue
            ax.errorbar(max(s["genes_mean"], 1), s["acc_mean"], yerr=0 if math.isnan(s["acc_se"]) else s["acc_se"],
                        marker=markers.get(method, "o"), ls="none", capsize=3, label=method)
        ax.axvline(0.05 * dims[name], color="k", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_title(f"{name} ({dims[name]} genes)", fontsize=9)
        ax.set_xlabel("genes used (log; dashed: 5%)", fontsize=8)
        ax.set_ylabel("test accuracy", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(sets):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with the gene sets (*.npz)")
    parser.add_argument("--sets", nargs="+", default=None, help="which sets (file names without .npz; default: all six, "
                        "lymphoma with --quick)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="which methods (names as in the table)")
    parser.add_argument("--reps", type=int, default=2, help="random splits per set (the paper: 20)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one small set, 1 repetition, tiny grids")
    parser.add_argument("--kappas", type=float, nargs="+", default=[0.02, 0.03, 0.05], help="spread's kappa grid")
    parser.add_argument("--working-set", action=argparse.BooleanOptionalAction, default=True,
                        help="spread: train on a working set of genes, KKT check over all genes every 25 epochs")
    parser.add_argument("--spread-head", choices=["average", "best"], default="average",
                        help="spread linear+MLP's prediction: the mean of its two models' probabilities (the selector's "
                             "predict), or whichever of linear / MLP / mean is best on dev (more dev choices: worse "
                             "on the tuning splits)")
    parser.add_argument("--spread-wd", type=float, default=1e-2, help="weight_decay of the spread MLP's deeper layer")
    parser.add_argument("--wds", type=float, nargs="+", default=[1e-3, 1e-1], help="MLP (WD) weight_decay grid")
    parser.add_argument("--l1s", type=float, nargs="+", default=[1e-4, 1e-3], help="MLP (naive L1) strength grid")
    parser.add_argument("--Cs", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0, 3.0], help="L1 logistic C grid")
    parser.add_argument("--hsic-ks", type=int, nargs="+", default=[5, 10, 20, 50], help="HSIC Lasso: numbers of genes")
    parser.add_argument("--lassonet-iters", type=int, default=100, help="LassoNet: epochs of the first (dense) fit")
    parser.add_argument("--width", type=int, default=32, help="hidden units of every MLP")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate (spread and the MLPs)")
    parser.add_argument("--epochs", type=int, default=250, help="most epochs of the MLPs (early stopping on dev picks fewer)")
    parser.add_argument("--spread-epochs", type=int, default=150,
                        help="most epochs of the spread models (chosen on the tuning splits, seeds 100-105: more epochs "
                             "only prune more genes there, at no gain in dev-chosen accuracy)")
    parser.add_argument("--min-epochs", type=int, default=100,
                        help="first dev check (every network method): earlier checkpoints are not candidates")
    parser.add_argument("--check-every", type=int, default=25, help="epochs between dev checks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and the figure")
    args = parser.parse_args(argv)
    args.sets = args.sets or (["lymphoma"] if args.quick else SETS)
    if args.quick:
        args.reps, args.kappas, args.wds, args.l1s = 1, [0.1], [1e-2], [1e-3]
        args.Cs, args.hsic_ks, args.epochs, args.check_every, args.lassonet_iters = [0.3], [10], 50, 25, 20
        args.min_epochs, args.spread_epochs = 25, 50
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if REFIT in args.methods and "spread linear+MLP" not in args.methods:
        parser.error(f"{REFIT!r} needs 'spread linear+MLP' in --methods")

    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    torch.set_num_threads(1)
    methods = [m for m in METHODS if m in args.methods]  # the refit needs the spread ensemble's genes first
    skipped = {}
    for method, module in (("LassoNet", "lassonet"), ("HSIC Lasso", "pyHSICLasso")):
        if method in methods:
            try:
                __import__(module)
            except Exception as exc:  # not installed or broken: say so in the table
                skipped[method] = f"{module} not importable: {exc}"
                methods.remove(method)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # the first optimizer imports torch._dynamo (~2 s): not a fit's time

    raw, dims, majority = {}, {}, {}
    jobs = [(name, rep) for name in args.sets for rep in range(args.reps)]
    bar = tqdm(total=len(jobs) * len(methods), desc="fits", unit="method")
    start_all = time.perf_counter()
    data = {name: load_set(args.data, name) for name in args.sets}
    with threadpool_limits(1):
        for name, rep in jobs:
            X, y = data[name]
            dims[name] = X.shape[1]
            seed = args.seed + rep
            sp = split(X, y, seed)
            y_te = sp[2][1]
            majority.setdefault(name, []).append(float(np.bincount(y_te).max() / len(y_te)))
            for method in methods:
                bar.set_postfix_str(f"{name} rep {rep} {method}")
                if method == "spread linear":
                    row, fits = run_spread(sp, (), args.kappas, args, seed)
                elif method == "spread linear+MLP":
                    row, fits = run_spread(sp, (args.width,), args.kappas, args, seed)
                    support = row["_support"]
                elif method == REFIT:  # two-stage: the dev-chosen spread model's genes, then the MLP (WD) grid on them
                    sub = [(A[:, support], b) for A, b in sp]
                    row, fits = run_mlp(sub, args.wds, "wd", args, seed)
                    row["config"]["spread"] = spread_config
                elif method == "MLP (WD)":
                    row, fits = run_mlp(sp, args.wds, "wd", args, seed)
                elif method == "MLP (naive L1)":
                    row, fits = run_mlp(sp, args.l1s, "l1", args, seed)
                elif method == "L1 logistic":
                    row, fits = run_l1_logistic(sp, args.Cs, seed)
                elif method == "LassoNet":
                    row, fits = run_lassonet(sp, args, seed)
                else:
                    row, fits = run_hsic(sp, args.hsic_ks, seed)
                if "_support" in row:
                    row.pop("_support")
                    spread_config = dict(row["config"])
                row.update(rep=rep, fit_seconds=fits)
                raw.setdefault(name, {}).setdefault(method, []).append(row)
                bar.update()
    bar.close()
    total_seconds = time.perf_counter() - start_all

    summary = {}
    for name in args.sets:
        summary[name] = {m: summarize(rows) for m, rows in raw[name].items()}
        summary[name]["majority"] = dict(acc_mean=float(np.mean(majority[name])), acc_se=float("nan"))
    targets = check_targets(summary, args.sets, dims)

    import sklearn

    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    machine = platform.processor() or platform.machine()
    plot(summary, args.sets, dims, out / "feature_selection.png",
         f"test accuracy vs genes used, mean +- se over {args.reps} random 60/20/20 splits")
    result = dict(
        meta=dict(machine=machine, python=platform.python_version(), torch=torch.__version__, sklearn=sklearn.__version__,
                  threads=1, quick=args.quick, total_seconds=total_seconds, skipped=skipped,
                  versions={m: _version(m) for m in ("lassonet", "pyHSICLasso")},
                  args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}),
        dims=dims, summary=summary, targets=targets, runs=raw,
    )
    (out / "feature_selection.json").write_text(json.dumps(result, indent=1, default=float))

    print(f"\nGene selection, {args.reps} random stratified 60/20/20 splits per set, test accuracy mean +- se "
          f"(genes used), one thread, {machine}, {total_seconds / 60:.1f} min in all\n")
    print("| method | " + " | ".join(f"{n} ({dims[n]})" for n in args.sets) + " | fit time (s) | grid time (s) |")
    print("| --- |" + " --- |" * (len(args.sets) + 2))
    print("| majority class (test) | " + " | ".join(f"{summary[n]['majority']['acc_mean']:.3f}" for n in args.sets) + " | | |")
    for method in METHODS:
        if method in skipped:
            print(f"| {method} | " + " | ".join("n/a" for _ in args.sets) + f" | {skipped[method]} | |")
            continue
        if method not in methods:
            continue
        cells = []
        for n in args.sets:
            s = summary[n][method]
            cells.append(f"{s['acc_mean']:.3f} ± {s['acc_se']:.3f} ({s['genes_mean']:.0f})")
        fit = np.mean([summary[n][method]["fit_seconds"] for n in args.sets])
        grid = np.mean([summary[n][method]["grid_seconds"] for n in args.sets])
        print(f"| {method} | " + " | ".join(cells) + f" | {fit:.2f} | {grid:.2f} |")
    print("\nfit time: mean seconds of one fit (one grid point, all its epochs; LassoNet: the whole path; HSIC Lasso: "
          "the ranking); grid time: all grid points of one split (the cost of the dev selection).")
    for key, value in targets.items():
        print(f"{key}: {value}")
    return result


def check_targets(summary: dict, sets: list[str], dims: dict) -> dict:
    """The issue's targets, evaluated on the means (no significance test: say so when reporting)."""
    out = {}
    ens = "spread linear+MLP"
    if all(ens in summary[n] for n in sets):
        for rival in ("MLP (WD)", "MLP (naive L1)"):
            if all(rival in summary[n] for n in sets):
                wins = [n for n in sets if summary[n][ens]["acc_mean"] > summary[n][rival]["acc_mean"]]
                out[f"{ens} beats {rival}"] = f"{len(wins)}/{len(sets)} sets ({', '.join(wins)})"
        if all("L1 logistic" in summary[n] for n in sets):
            ok = [n for n in sets if summary[n][ens]["acc_mean"] >= summary[n]["L1 logistic"]["acc_mean"]]
            out[f"{ens} >= L1 logistic"] = f"{len(ok)}/{len(sets)} sets ({', '.join(ok)})"
        small = [n for n in sets if summary[n][ens]["genes_mean"] <= 0.05 * dims[n]]
        out[f"{ens} selects <= 5% of the genes"] = f"{len(small)}/{len(sets)} sets ({', '.join(small)})"
        if all("HSIC Lasso" in summary[n] for n in sets):
            ratios = {n: summary[n]["HSIC Lasso"]["fit_seconds"] / summary[n][ens]["fit_seconds"] for n in sets}
            out["HSIC Lasso fit time / spread linear+MLP fit time"] = ", ".join(f"{n} {r:.1f}x" for n, r in ratios.items())
    return out


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
