"""Node sparsity of a one-hidden-layer MLP: weight decay (L2) vs spread's group lasso on each hidden neuron.

The paper's section 5.1 at CPU scale. An MLP 64-1000-10 (``Linear, act, Linear``, ``act`` = ReLU or SiLU) is
trained on scikit-learn's digits (8x8 images, 1797 samples; stratified 75/25 train/test split, features
standardised with the training set's mean and deviation) by mini-batch Adam.

* **Weight decay.** ``torch.optim.Adam(weight_decay=wd)`` (coupled L2: ``wd*theta`` is added to the gradient, the
  L2 penalty ``wd/2*||theta||^2`` on every weight and bias), ``wd`` swept over several decades. A hidden neuron is
  *dead* when all its outgoing weights (its column of the second layer's weight) are below ``--threshold``
  (1e-4) in absolute value: it no longer contributes to the output, whatever its input. Reported next to it: the
  fraction of neurons whose incoming weights, bias and outgoing weights are *all* below the threshold, and the
  weight sparsity (fraction of the two weight matrices' entries below the threshold). With ReLU, L2 on the
  weights is a penalty on products (``relu(a*x)*b = relu(x)*a*b`` for ``a > 0``: rescaling a neuron's incoming and
  outgoing weights leaves the function unchanged, and L2 is smallest when the two norms are equal, where it equals
  ``wd*||in_j||*||out_j||``), so weight decay acts like a sparsity penalty on neurons; SiLU has no such symmetry.
* **Spread.** ``SpreadAdam`` with group-lasso penalty ``2*kappa*(||in_j|| + ||out_j||)`` per hidden neuron ``j``:
  one param group ``[fc1.weight, fc1.bias]`` with ``sparsity="row", share_groups=True`` (one group per neuron:
  its incoming weights and its bias) and one ``[fc2.weight]`` with ``sparsity="column"`` (one group per neuron:
  its outgoing weights); the output bias is dense. Penalising only one side would not be well posed for ReLU:
  the rescaling above moves the whole norm to the unpenalised side, so the penalty can be made arbitrarily small
  without changing the function. With both sides penalised, rescaling makes the penalty
  ``4*kappa*sqrt(||in_j||*||out_j||)``, and a neuron is removed when one side reaches zero: with its incoming
  group zero its activation is ``act(0) = 0`` (ReLU and SiLU), so its outgoing weights get no gradient and the
  penalty drives them to zero too, and vice versa; a neuron with both sides exactly zero has an exactly zero
  gradient and stays dead. Dead neurons here are *exact* zeros: a neuron is removed exactly when its incoming
  group (weights and bias) or its outgoing group is entirely 0 (both are reported; the outgoing side of a neuron
  whose incoming side died decays only under the penalty, slowly with Adam, whose running second moment still
  remembers the larger gradients of earlier steps); ``spread_optim.sparsity_report`` gives the zero rows/columns.

Every run uses the same initial weights and mini-batches (seed ``--seed``), a constant learning rate ``--lr``
and ``--steps`` mini-batch steps of ``--batch-size``.

    python benchmarks/node_sparsity.py            # default size (a few minutes on 2 CPU cores)
    python benchmarks/node_sparsity.py --quick    # smoke run (well under a minute)

Writes ``benchmarks/results/node_sparsity.json`` and ``node_sparsity.png`` (dead-neuron fraction against weight
decay, weight sparsity against node sparsity, spread's dead neurons against kappa with test accuracy) and prints
markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from spread_optim import SpreadAdam, sparsity_report

RESULTS = Path(__file__).parent / "results"
ACTIVATIONS = {"relu": torch.nn.ReLU, "silu": torch.nn.SiLU}


def load_digits_split(seed: int = 0, test_size: float = 0.25):
    """scikit-learn's digits, stratified train/test split, standardised with the training statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(X_train)  # constant pixels keep scale 1
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    return f(scaler.transform(X_train)), torch.tensor(y_train), f(scaler.transform(X_test)), torch.tensor(y_test)


def make_mlp(activation: str, hidden: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)  # the same initial weights for every run of one activation
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), ACTIVATIONS[activation](), torch.nn.Linear(hidden, 10))


def accuracy(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def neuron_stats(model: torch.nn.Sequential, threshold: float) -> dict:
    """Dead neurons and weight sparsity, by threshold (``|w| < threshold``) and by exact zeros."""
    w1, b1, w2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()
    small_out = (w2.abs() < threshold).all(0)
    small_all = small_out & (w1.abs() < threshold).all(1) & (b1.abs() < threshold)
    zero_out = (w2 == 0).all(0)
    zero_in = (w1 == 0).all(1) & (b1 == 0)
    zero_all = zero_out & zero_in
    weights = torch.cat([w1.reshape(-1), w2.reshape(-1)])
    n = w1.shape[0]
    return dict(
        dead_fraction=float(small_out.sum()) / n,  # all outgoing weights below the threshold
        dead_in_out_fraction=float(small_all.sum()) / n,  # incoming, bias and outgoing all below
        weight_sparsity=float((weights.abs() < threshold).float().mean()),
        exact_dead_fraction=float(zero_out.sum()) / n,  # outgoing weights exactly zero
        exact_dead_in_out_fraction=float(zero_all.sum()) / n,
        # removed exactly: incoming weights and bias all 0 (activation act(0) = 0) or outgoing weights all 0
        exact_removable_fraction=float((zero_in | zero_out).sum()) / n,
        exact_zero_weight_fraction=float((weights == 0).float().mean()),
        dead_neurons=int(small_out.sum()),
        exact_dead_neurons=int(zero_all.sum()),
        exact_removable_neurons=int((zero_in | zero_out).sum()),
    )


def train(model, optimizer, X, y, batches, desc: str) -> float:
    from tqdm import tqdm

    start = time.perf_counter()
    bar = tqdm(batches, desc=desc, unit="step", leave=False, mininterval=1.0)
    for i, idx in enumerate(bar):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        optimizer.step()
        if i % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return time.perf_counter() - start


def spread_optimizer(model, kappa: float, lr: float) -> SpreadAdam:
    fc1, fc2 = model[0], model[2]
    return SpreadAdam([
        {"params": [fc1.weight, fc1.bias], "kappa": kappa, "sparsity": "row", "share_groups": True},  # incoming
        {"params": [fc2.weight], "kappa": kappa, "sparsity": "column"},  # outgoing
        {"params": [fc2.bias]},  # dense
    ], lr=lr)


def save_figure(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"relu": "C0", "silu": "C1"}
    wd_rows = [r for r in rows if r["method"] == "weight_decay"]
    sp_rows = [r for r in rows if r["method"] == "spread"]
    ax = axes[0]
    for act in ACTIVATIONS:
        rs = [r for r in wd_rows if r["activation"] == act and r["weight_decay"] > 0]
        if rs:
            ax.plot([r["weight_decay"] for r in rs], [r["dead_fraction"] for r in rs], "o-", color=colors[act],
                    label=f"{act}: outgoing weights all < threshold")
            ax.plot([r["weight_decay"] for r in rs], [r["dead_in_out_fraction"] for r in rs], "s--",
                    color=colors[act], alpha=0.6, label=f"{act}: in, bias and out all < threshold")
            for r in rs:
                ax.annotate(f"{100 * r['test_accuracy']:.0f}%", (r["weight_decay"], r["dead_fraction"]),
                            textcoords="offset points", xytext=(0, 6), fontsize=7, color=colors[act], ha="center")
    ax.set_xscale("log")
    ax.set_xlabel("Adam weight_decay (coupled L2)")
    ax.set_ylabel("fraction of dead hidden neurons")
    ax.set_title("weight decay (labels: test accuracy)")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7)

    ax = axes[1]
    for method, marker, fill in (("weight_decay", "o", True), ("spread", "^", False)):
        for act in ACTIVATIONS:
            rs = [r for r in rows if r["method"] == method and r["activation"] == act]
            if rs:
                node = [r["exact_removable_fraction"] if method == "spread" else r["dead_fraction"] for r in rs]
                ax.scatter(node, [r["weight_sparsity"] for r in rs], marker=marker,
                           facecolors=colors[act] if fill else "none", edgecolors=colors[act],
                           label=f"{method}, {act}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("node sparsity (dead neurons: outgoing < threshold; spread: exactly removed)")
    ax.set_ylabel("weight sparsity (fraction of weights < threshold)")
    ax.set_title("weight sparsity vs node sparsity")
    ax.legend(fontsize=7)

    ax = axes[2]
    for act in ACTIVATIONS:
        rs = [r for r in sp_rows if r["activation"] == act]
        if rs:
            ax.plot([r["kappa"] for r in rs], [r["exact_removable_fraction"] for r in rs], "^-", color=colors[act],
                    label=f"{act}: in+bias or out exactly 0")
            ax.plot([r["kappa"] for r in rs], [r["exact_dead_in_out_fraction"] for r in rs], "v--", color=colors[act],
                    alpha=0.6, label=f"{act}: in+bias and out exactly 0")
            for r in rs:
                ax.annotate(f"{100 * r['test_accuracy']:.1f}%", (r["kappa"], r["exact_removable_fraction"]),
                            textcoords="offset points", xytext=(0, 6), fontsize=7, color=colors[act], ha="center")
    ax.set_xscale("log")
    ax.set_xlabel("spread kappa (group lasso 2*kappa*(|in_j| + |out_j|))")
    ax.set_ylabel("fraction of dead hidden neurons")
    ax.set_title("spread, SpreadAdam (labels: test accuracy)")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run for CI (a narrower net, fewer steps and points)")
    parser.add_argument("--hidden", type=int, default=1000, help="hidden width")
    parser.add_argument("--activations", nargs="+", choices=sorted(ACTIVATIONS), default=["relu", "silu"])
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
                        help="Adam's (coupled) weight_decay values")
    parser.add_argument("--kappas", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
                        help="spread's kappa values (group lasso per hidden neuron)")
    parser.add_argument("--steps", type=int, default=1000, help="mini-batch steps per run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate (constant)")
    parser.add_argument("--threshold", type=float, default=1e-4, help="a weight counts as zero below this")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and the figure")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.steps = 200, 300
        args.weight_decays, args.kappas = [1e-4, 1e-2, 1e-1], [1e-3, 3e-3]

    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    X_train, y_train, X_test, y_test = load_digits_split(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    per_epoch = len(X_train) // args.batch_size
    epochs = -(-args.steps // per_epoch)
    batches = [b for _ in range(epochs) for b in torch.randperm(len(X_train), generator=gen)[: per_epoch * args.batch_size]
               .reshape(per_epoch, args.batch_size)][: args.steps]
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # the first optimizer of a process imports torch._dynamo

    configs = [("weight_decay", act, wd) for act in args.activations for wd in [0.0, *args.weight_decays]]
    configs += [("spread", act, k) for act in args.activations for k in args.kappas]
    rows = []
    for method, act, strength in tqdm(configs, desc="runs", unit="run"):
        model = make_mlp(act, args.hidden, args.seed)
        if method == "weight_decay":
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=strength)
            row = dict(method=method, activation=act, weight_decay=strength)
        else:
            optimizer = spread_optimizer(model, strength, args.lr)
            row = dict(method=method, activation=act, kappa=strength)
        seconds = train(model, optimizer, X_train, y_train, batches, f"{method} {act} {strength:g}")
        row.update(neuron_stats(model, args.threshold), train_accuracy=accuracy(model, X_train, y_train),
                   test_accuracy=accuracy(model, X_test, y_test), train_seconds=seconds)
        if method == "spread":
            report = sparsity_report(model, optimizer)
            by_name = {r.name: r for r in report}
            # sparsity_report names parameters by the model's own names: '0.weight' (fc1), '2.weight' (fc2)
            row["report_zero_groups"] = {name: [r.zero_groups, r.num_groups] for name, r in by_name.items()}
            row["report_dead_fc1_rows"] = by_name["0.weight"].zero_groups
            row["report_dead_fc2_columns"] = by_name["2.weight"].zero_groups
        rows.append(row)

    import sklearn

    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    title = (f"MLP 64-{args.hidden}-10 on digits ({len(X_train)} train / {len(X_test)} test), Adam lr={args.lr:g}, "
             f"{args.steps} steps of {args.batch_size}; dead: |w| < {args.threshold:g} (weight decay), exact zeros (spread)")
    save_figure(rows, out / "node_sparsity.png", title)
    result = dict(
        meta=dict(machine=platform.processor() or platform.machine(), python=platform.python_version(),
                  torch=torch.__version__, sklearn=sklearn.__version__, threads=args.threads, quick=args.quick,
                  args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}),
        data=dict(dataset="sklearn.datasets.load_digits", n_train=len(X_train), n_test=len(X_test), features=64,
                  classes=10, preprocessing="stratified 75/25 split (random_state=seed), StandardScaler on train"),
        rows=rows,
    )
    (out / "node_sparsity.json").write_text(json.dumps(result, indent=1))

    print(f"\n{title}, {args.threads} thread(s), {result['meta']['machine']}\n")
    print("Weight decay (Adam, coupled L2):\n")
    print("| activation | weight decay | dead neurons (out < thr) | dead (in, bias, out < thr) | weights < thr | "
          "train acc | test acc | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["method"] == "weight_decay":
            print(f"| {r['activation']} | {r['weight_decay']:g} | {100 * r['dead_fraction']:.1f}% | "
                  f"{100 * r['dead_in_out_fraction']:.1f}% | {100 * r['weight_sparsity']:.1f}% | "
                  f"{100 * r['train_accuracy']:.1f}% | {100 * r['test_accuracy']:.1f}% | {r['train_seconds']:.1f} |")
    print("\nSpread (SpreadAdam, group lasso per hidden neuron: fc1 rows + bias, fc2 columns):\n")
    print("| activation | kappa | dead neurons (in+bias or out exactly 0) | in+bias and out exactly 0 | "
          "fc1 zero rows | fc2 zero columns | exact-zero weights | train acc | test acc | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["method"] == "spread":
            print(f"| {r['activation']} | {r['kappa']:g} | {100 * r['exact_removable_fraction']:.1f}% | "
                  f"{100 * r['exact_dead_in_out_fraction']:.1f}% | "
                  f"{r['report_dead_fc1_rows']} | {r['report_dead_fc2_columns']} | "
                  f"{100 * r['exact_zero_weight_fraction']:.1f}% | {100 * r['train_accuracy']:.1f}% | "
                  f"{100 * r['test_accuracy']:.1f}% | {r['train_seconds']:.1f} |")
    for act in args.activations:
        rs = [r for r in rows if r["method"] == "weight_decay" and r["activation"] == act]
        dead = [r["dead_fraction"] for r in rs]
        rising = all(b >= a for a, b in zip(dead, dead[1:]))
        print(f"\n{act}: dead-neuron fraction over weight decay {[f'{d:.3f}' for d in dead]}: "
              f"{'non-decreasing' if rising else 'NOT monotone'}")
    return result


if __name__ == "__main__":
    main()
