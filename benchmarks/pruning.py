"""Pruning a small CNN: spread (exact L1 / group lasso) vs global magnitude pruning vs naive L1, then filter removal.

The paper's section 5.2 at CPU scale. A LeNet-5-like CNN for scikit-learn's 8x8 digits (stratified 75/25 split,
pixels standardised with the training mean and deviation):

    conv 3x3 (1 -> 16, padding 1), ReLU, max-pool 2   ->  16 x 4 x 4
    conv 3x3 (16 -> 32, padding 1), ReLU, max-pool 2  ->  32 x 2 x 2 = 128 features
    linear 128 -> 128, ReLU;  linear 128 -> 64, ReLU;  linear 64 -> 10

The prunable weights are the five layers' weight tensors (29,968 entries); biases stay dense and are not counted.
Compression ratio = prunable weights / nonzero prunable weights (counted after finetuning).

**Unstructured pruning.** Three ways to reach a compression ratio R, each from the same initial weights and the same
mini-batches (Adam, cosine learning-rate decay):

* *magnitude*: dense training with Adam's coupled ``weight_decay`` (each of ``--weight-decays``), then
  ``torch.nn.utils.prune.global_unstructured(..., pruning_method=L1Unstructured, amount=N - N/R)``;
* *naive L1*: training on ``loss + lam*sum|w|`` (autograd's subgradient of ``abs``) with ``lam = 2*kappa``, then
  the same global magnitude pruning;
* *spread*: ``SpreadAdam(kappa=kappa, sparsity="element")`` on the five weights (the same objective as naive L1,
  ``loss + 2*kappa*|w|_1``), which ends with exact zeros, then the same global magnitude pruning (the exact zeros go
  first; where spread left fewer nonzeros than N/R, the pruning keeps some zeros trainable).

Every trained net (each weight decay, each kappa) is pruned to each target ratio and finetuned for
``--finetune-epochs`` with plain Adam (no penalty) under the pruning masks (``torch.nn.utils.prune`` keeps pruned
weights at exactly zero). Each method then gets, at each ratio, its candidate with the lowest *training* loss after
finetuning (no test data in the choice; every method has as many candidates); all candidates are in the JSON.
Test accuracies before and after finetuning are reported.

**Filter sparsity.** ``SpreadAdam`` with ``sparsity="row"`` (one group per conv filter / hidden neuron, the bias in
the same group via ``share_groups=True``) on conv1, conv2, fc1 and fc2, and ``sparsity="column"`` on fc3 (one group
per fc2 neuron's outgoing weights: with ReLU, penalising only a neuron's incoming side is not well posed, since
rescaling moves the norm to its unpenalised outgoing side). ``spread_optim.compact`` then removes every filter /
neuron whose weights and bias are exactly zero (it outputs ``relu(0) = 0``) together with the matching input
channels of the next layer, and every channel whose outgoing weights are all zero (torch-pruning's dependency graph
does the surgery; ``compact`` checks that the outputs are unchanged). The script reports parameter counts, MACs per
image (torch-pruning's counter), test accuracy and CPU inference time (median over ``--timing-repeats`` forward
passes of a batch of ``--timing-batch`` test images, one thread, the two nets timed in turns) against the big net.

    python benchmarks/pruning.py            # default size (a few minutes on 2 CPU cores)
    python benchmarks/pruning.py --quick    # smoke run (well under a minute)

Writes ``benchmarks/results/pruning.json`` and ``pruning.png`` (test accuracy against compression ratio; layer
widths before and after filter removal) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from spread_optim import SpreadAdam, compact, sparsity_report

RESULTS = Path(__file__).parent / "results"
LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")


def load_digits_images(seed: int = 0, test_size: float = 0.25):
    """Digits as 1x8x8 images, stratified split, pixels standardised with the training statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(X_train)
    f = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32).reshape(-1, 1, 8, 8)
    return f(X_train), torch.tensor(y_train), f(X_test), torch.tensor(y_test)


class DigitsCNN(nn.Module):
    """LeNet-5-like CNN for 8x8 inputs; widths are arguments so that a pruned copy can be built."""

    def __init__(self, c1: int = 16, c2: int = 32, h1: int = 128, h2: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 4, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)

    def widths(self) -> dict:
        return dict(conv1=self.conv1.out_channels, conv2=self.conv2.out_channels, fc1=self.fc1.out_features,
                    fc2=self.fc2.out_features)


def new_model(seed: int, **widths) -> DigitsCNN:
    torch.manual_seed(seed)  # the same initial weights for every method
    return DigitsCNN(**widths)


def prunable(model: DigitsCNN) -> list[tuple[nn.Module, str]]:
    return [(getattr(model, name), "weight") for name in LAYERS]


def weight_counts(model: DigitsCNN) -> tuple[int, int]:
    """(prunable weights, nonzero prunable weights), on the effective weights (``weight_orig * mask``)."""
    ws = [getattr(model, name).weight.detach() for name in LAYERS]
    return sum(w.numel() for w in ws), sum(int((w != 0).sum()) for w in ws)


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def mean_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(X), y))


def make_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    per_epoch = n // batch_size
    return [b for _ in range(epochs)
            for b in torch.randperm(n, generator=gen)[: per_epoch * batch_size].reshape(per_epoch, batch_size)]


def train(model, optimizer, X, y, batches, desc: str, l1: float = 0.0) -> float:
    """Mini-batch training with cosine learning-rate decay to 0; ``l1 > 0`` adds ``l1*sum|w|`` (subgradient)."""
    from tqdm import tqdm

    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(batches))
    weights = [getattr(model, name).weight for name in LAYERS]
    start = time.perf_counter()
    bar = tqdm(batches, desc=desc, unit="step", mininterval=2.0)
    for i, idx in enumerate(bar):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        if l1 > 0:
            loss = loss + l1 * sum(w.abs().sum() for w in weights)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if i % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return time.perf_counter() - start


def prune_and_finetune(trained: DigitsCNN, ratio: float, X, y, X_test, y_test, batches, lr: float, desc: str) -> dict:
    """Global magnitude pruning to ``total/ratio`` remaining weights, then finetuning under the masks."""
    model = copy.deepcopy(trained)
    total, nonzero_before = weight_counts(model)
    keep = max(1, round(total / ratio))
    magnitudes = torch.cat([w.detach().abs().reshape(-1) for w in (getattr(model, n).weight for n in LAYERS)])
    threshold = float(torch.topk(magnitudes, keep).values[-1])  # the smallest kept magnitude
    prune.global_unstructured(prunable(model), pruning_method=prune.L1Unstructured, amount=total - keep)
    masked = sum(int((getattr(model, n).weight_mask == 0).sum()) for n in LAYERS)
    acc_pruned = accuracy(model, X_test, y_test)
    finetune_seconds = 0.0
    if batches:
        finetune_seconds = train(model, torch.optim.Adam(model.parameters(), lr=lr), X, y, batches, desc)
    for module, name in prunable(model):
        prune.remove(module, name)  # make the zeros permanent: the weight is a plain tensor again
    total, nonzero = weight_counts(model)
    return dict(target_ratio=ratio, kept_by_mask=total - masked, masked=masked, threshold=threshold,
                prunable_weights=total, nonzero_weights=nonzero, zero_weights=total - nonzero,
                compression=total / max(nonzero, 1), nonzero_before_pruning=nonzero_before,
                test_accuracy_pruned=acc_pruned, test_accuracy=accuracy(model, X_test, y_test),
                train_loss=mean_loss(model, X, y), train_accuracy=accuracy(model, X, y),
                finetune_seconds=finetune_seconds)


# ----------------------------------------------------------------------------------------------------
# filter sparsity: removing dead filters and neurons


def row_spread_optimizer(model: DigitsCNN, kappa: float, lr: float) -> SpreadAdam:
    groups = [{"params": [getattr(model, n).weight, getattr(model, n).bias], "kappa": kappa, "sparsity": "row",
               "share_groups": True} for n in ("conv1", "conv2", "fc1", "fc2")]
    groups += [{"params": [model.fc3.weight], "kappa": kappa, "sparsity": "column"}, {"params": [model.fc3.bias]}]
    return SpreadAdam(groups, lr=lr)


def compact_cnn(model: DigitsCNN, X: torch.Tensor) -> tuple[DigitsCNN, dict]:
    """``spread_optim.compact`` on the CNN, and per hidden layer the filters/neurons whose incoming weights and bias
    are all exactly zero (``dead_in``), those whose outgoing weights are all exactly zero (``dead_out``) and the
    width kept."""
    m = model
    zero_in = {n: ((getattr(m, n).weight.detach() == 0).reshape(getattr(m, n).weight.shape[0], -1).all(1)
                   & (getattr(m, n).bias.detach() == 0)) for n in ("conv1", "conv2", "fc1", "fc2")}
    # outgoing weights of each hidden unit: the next layer's input slice (conv2's feature c is fc1 columns 4c..4c+3)
    zero_out = {
        "conv1": (m.conv2.weight.detach() == 0).all(0).reshape(m.conv1.out_channels, -1).all(1),
        "conv2": (m.fc1.weight.detach() == 0).all(0).reshape(m.conv2.out_channels, 4).all(1),
        "fc1": (m.fc2.weight.detach() == 0).all(0),
        "fc2": (m.fc3.weight.detach() == 0).all(0),
    }
    small = compact(model, X)
    kept = small.widths()
    info = {n: dict(dead_in=int(zero_in[n].sum()), dead_out=int(zero_out[n].sum()), kept=kept[n]) for n in zero_in}
    return small, info


def inference_ms(models: list[nn.Module], X: torch.Tensor, repeats: int) -> list[float]:
    """Median wall time of one forward pass (ms) of each model on the current thread setting, after a warm-up; the
    models are timed in turns, so that a busy machine slows them alike."""
    times = [[] for _ in models]
    with torch.inference_mode():
        for i in range(max(3, repeats // 10) + repeats):
            for model, t in zip(models, times):
                model.eval()
                start = time.perf_counter()
                model(X)
                t.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t[max(3, repeats // 10):]) for t in times]


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of one image (torch-pruning's counter)."""
    import torch_pruning as tp

    return int(tp.utils.count_ops_and_params(model, x[:1])[0])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------


def save_figure(points: list[dict], structured: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw=dict(width_ratios=[1.4, 1]))
    ax = axes[0]
    styles = {"spread": ("C0", "o"), "magnitude": ("C1", "s"), "naive_l1": ("C2", "^")}
    for method, (color, marker) in styles.items():
        ps = sorted((p for p in points if p["method"] == method), key=lambda p: p["compression"])
        if ps:
            ax.plot([p["compression"] for p in ps], [100 * p["test_accuracy"] for p in ps], marker=marker, color=color,
                    label=f"{method}, finetuned")
            ax.plot([p["compression"] for p in ps], [100 * p["test_accuracy_pruned"] for p in ps], marker=marker,
                    color=color, ls=":", alpha=0.6, mfc="none", label=f"{method}, pruned, before finetuning")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (prunable weights / nonzero weights)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("unstructured: global magnitude pruning of each trained net")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[1]
    layers = list(structured["widths_original"])
    x = np.arange(len(layers))
    ax.bar(x - 0.2, [structured["widths_original"][n] for n in layers], 0.4, label="original")
    ax.bar(x + 0.2, [structured["widths_small"][n] for n in layers], 0.4, label="after removing dead filters/neurons")
    ax.set_xticks(x, layers)
    ax.set_ylabel("filters / neurons")
    s = structured
    ax.set_title(f"filter sparsity (spread row, kappa={s['kappa']:g}): params {s['params_original']} -> "
                 f"{s['params_small']}\nacc {100 * s['test_accuracy_original']:.1f}% (dense wd) / "
                 f"{100 * s['test_accuracy_small']:.1f}% (small); {s['timing_batch']}-image batch "
                 f"{s['inference_ms_original']:.2f} -> {s['inference_ms_small']:.2f} ms", fontsize=8)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run for CI (fewer epochs, ratios and kappas)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (every method)")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="finetuning epochs after pruning")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's initial learning rate (cosine decay to 0)")
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3],
                        help="magnitude baseline: Adam's coupled L2 values")
    parser.add_argument("--kappas", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3],
                        help="spread's kappa (element sparsity); naive L1 uses lam = 2*kappa")
    parser.add_argument("--ratios", type=float, nargs="+", default=[10, 20, 50, 100],
                        help="target compression ratios")
    parser.add_argument("--row-kappa", type=float, default=5e-3, help="spread kappa for filter/neuron sparsity")
    parser.add_argument("--row-epochs", type=int, default=None, help="training epochs of the filter-sparsity net "
                        "(default: --epochs)")
    parser.add_argument("--timing-batch", type=int, default=256)
    parser.add_argument("--timing-repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and the figure")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.finetune_epochs, args.timing_repeats = 6, 1, 30
        args.weight_decays, args.kappas, args.ratios = [1e-4], [3e-4], [10, 50]
        args.row_epochs = 20  # groups need a few hundred steps to reach exact zero

    torch.set_num_threads(args.threads)
    X_train, y_train, X_test, y_test = load_digits_images(args.seed)
    batches = make_batches(len(X_train), args.batch_size, args.epochs, args.seed)
    ft_batches = make_batches(len(X_train), args.batch_size, args.finetune_epochs, args.seed + 1)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # the first optimizer of a process imports torch._dynamo

    # -------- training
    trained = {}
    for wd in args.weight_decays:
        model = new_model(args.seed)
        secs = train(model, torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=wd),
                     X_train, y_train, batches, f"dense wd={wd:g}")
        trained[("magnitude", wd)] = (model, secs)
    for kappa in args.kappas:
        model = new_model(args.seed)
        weights = [getattr(model, n).weight for n in LAYERS]
        rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
        optimizer = SpreadAdam([{"params": weights, "kappa": kappa}, {"params": rest}], lr=args.lr)
        secs = train(model, optimizer, X_train, y_train, batches, f"spread kappa={kappa:g}")
        trained[("spread", kappa)] = (model, secs)
        model = new_model(args.seed)
        secs = train(model, torch.optim.Adam(model.parameters(), lr=args.lr), X_train, y_train, batches,
                     f"naive L1 lam={2 * kappa:g}", l1=2 * kappa)
        trained[("naive_l1", kappa)] = (model, secs)
    runs = []
    for (method, strength), (model, secs) in trained.items():
        total, nonzero = weight_counts(model)
        runs.append(dict(method=method, kappa=None if method == "magnitude" else strength,
                         weight_decay=strength if method == "magnitude" else 0.0, train_loss=mean_loss(model, X_train, y_train),
                         test_accuracy=accuracy(model, X_test, y_test), train_accuracy=accuracy(model, X_train, y_train),
                         prunable_weights=total, nonzero_weights=nonzero, compression=total / max(nonzero, 1),
                         train_seconds=secs))

    # -------- unstructured pruning + finetuning at each target ratio
    candidates, points = [], []
    for ratio in args.ratios:
        for (method, strength), (model, _) in trained.items():
            point = prune_and_finetune(model, ratio, X_train, y_train, X_test, y_test, ft_batches, args.finetune_lr,
                                       f"{method} {strength:g} {ratio:g}x finetune")
            candidates.append(dict(method=method, kappa=None if method == "magnitude" else strength,
                                   weight_decay=strength if method == "magnitude" else 0.0, **point))
        for method in ("spread", "magnitude", "naive_l1"):
            # each method's candidate with the lowest training loss after finetuning: no test data in the choice
            best = min((c for c in candidates if c["method"] == method and c["target_ratio"] == ratio),
                       key=lambda c: c["train_loss"])
            best["selected"] = True
            points.append(best)
    for c in candidates:
        c.setdefault("selected", False)

    # -------- filter sparsity: remove dead filters / neurons, build the smaller dense network
    big = new_model(args.seed)
    optimizer = row_spread_optimizer(big, args.row_kappa, args.lr)
    row_batches = batches if args.row_epochs in (None, args.epochs) else make_batches(
        len(X_train), args.batch_size, args.row_epochs, args.seed)
    row_secs = train(big, optimizer, X_train, y_train, row_batches, f"spread row kappa={args.row_kappa:g}")
    report = sparsity_report(big, optimizer)
    big.eval()
    small, layer_info = compact_cnn(big, X_test[:64])
    with torch.no_grad():
        out_big, out_small = big(X_test), small(X_test)
    max_diff = float((out_big - out_small).abs().max())
    dense = min((r for r in runs if r["method"] == "magnitude"), key=lambda r: r["train_loss"])  # reference dense net
    dense_model = trained[("magnitude", dense["weight_decay"])][0]
    Xt = X_test.repeat(-(-args.timing_batch // len(X_test)), 1, 1, 1)[: args.timing_batch]
    structured = dict(
        kappa=args.row_kappa, train_seconds=row_secs,
        widths_original=big.widths(), widths_small=small.widths(), layers=layer_info,
        report=[dict(name=r.name, zero_groups=r.zero_groups, num_groups=r.num_groups, zero_fraction=r.zero_fraction)
                for r in report],
        params_original=n_params(big), params_small=n_params(small),
        nonzero_params_original=sum(int((p != 0).sum()) for p in big.parameters()),
        dense_weight_decay=dense["weight_decay"],  # the dense net of the same shape with the lowest training loss
        test_accuracy_original=accuracy(dense_model, X_test, y_test),
        test_accuracy_big=accuracy(big, X_test, y_test), test_accuracy_small=accuracy(small, X_test, y_test),
        max_abs_output_difference=max_diff,
        outputs_equal=bool(torch.allclose(out_big, out_small, rtol=1e-5, atol=1e-5)),
        predictions_equal=bool((out_big.argmax(1) == out_small.argmax(1)).all()),
        timing_batch=args.timing_batch, timing_repeats=args.timing_repeats,
        macs_original=macs(big, Xt), macs_small=macs(small, Xt),
    )
    structured["inference_ms_original"], structured["inference_ms_small"] = inference_ms([big, small], Xt, args.timing_repeats)
    structured["speedup"] = structured["inference_ms_original"] / structured["inference_ms_small"]
    structured["param_ratio"] = structured["params_original"] / structured["params_small"]
    structured["macs_ratio"] = structured["macs_original"] / structured["macs_small"]

    import sklearn

    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    title = (f"CNN on digits ({len(X_train)} train / {len(X_test)} test), Adam lr={args.lr:g} cosine, {args.epochs} epochs "
             f"of {args.batch_size}; finetune {args.finetune_epochs} epochs")
    save_figure(points, structured, out / "pruning.png", title)
    result = dict(
        meta=dict(machine=platform.processor() or platform.machine(), python=platform.python_version(),
                  torch=torch.__version__, sklearn=sklearn.__version__, threads=args.threads, quick=args.quick,
                  args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}),
        data=dict(dataset="sklearn.datasets.load_digits", n_train=len(X_train), n_test=len(X_test), image="1x8x8",
                  classes=10, preprocessing="stratified 75/25 split (random_state=seed), StandardScaler on train"),
        architecture=dict(layers=LAYERS, widths=DigitsCNN().widths(), prunable_weights=runs[0]["prunable_weights"]),
        trained=runs, points=points, candidates=candidates, structured=structured,
    )
    (out / "pruning.json").write_text(json.dumps(result, indent=1))

    print(f"\n{title}, {args.threads} thread(s), {result['meta']['machine']}\n")
    print("Trained nets (before pruning):\n")
    print("| method | kappa / weight decay | test acc | exact zeros -> compression | train s |")
    print("| --- | --- | --- | --- | --- |")
    for r in runs:
        strength = f"wd {r['weight_decay']:g}" if r["kappa"] is None else f"kappa {r['kappa']:g}"
        print(f"| {r['method']} | {strength} | {100 * r['test_accuracy']:.1f}% | "
              f"{r['prunable_weights'] - r['nonzero_weights']} -> {r['compression']:.2f}x | {r['train_seconds']:.1f} |")
    print("\nGlobal magnitude pruning to each target ratio, then finetuning under the masks "
          "(test accuracy: pruned -> finetuned):\n")
    print("| target | spread | magnitude | naive L1 | spread >= magnitude |")
    print("| --- | --- | --- | --- | --- |")
    for ratio in args.ratios:
        p = {q["method"]: q for q in points if q["target_ratio"] == ratio}
        cell = lambda q: (f"{100 * q['test_accuracy_pruned']:.1f}% -> {100 * q['test_accuracy']:.1f}% "
                          f"({q['compression']:.1f}x, " + (f"wd {q['weight_decay']:g})" if q["kappa"] is None
                                                          else f"kappa {q['kappa']:g})"))
        ok = p["spread"]["test_accuracy"] >= p["magnitude"]["test_accuracy"]
        print(f"| {ratio:g}x | {cell(p['spread'])} | {cell(p['magnitude'])} | {cell(p['naive_l1'])} | "
              f"{'yes' if ok else 'no'} |")
    print("\nEvery candidate (test accuracy after finetuning):\n")
    names = sorted({(c["method"], c["kappa"] if c["kappa"] is not None else c["weight_decay"]) for c in candidates},
                   key=lambda t: (t[0], t[1]))
    print("| method | strength | " + " | ".join(f"{r:g}x" for r in args.ratios) + " |")
    print("| --- | --- |" + " --- |" * len(args.ratios))
    for method, strength in names:
        cs = {c["target_ratio"]: c for c in candidates if c["method"] == method
              and (c["kappa"] if c["kappa"] is not None else c["weight_decay"]) == strength}
        label = "wd" if method == "magnitude" else "kappa"
        print(f"| {method} | {label} {strength:g} | " + " | ".join(
            f"{100 * cs[r]['test_accuracy']:.1f}%" + ("*" if cs[r]["selected"] else "") for r in args.ratios) + " |")
    print("(* selected: lowest training loss after finetuning)")
    s = structured
    print(f"\nFilter/neuron sparsity (SpreadAdam, row groups, kappa={s['kappa']:g}):\n")
    print("| net | conv1 | conv2 | fc1 | fc2 | parameters | MACs per image | test acc | inference ms (batch "
          f"{s['timing_batch']}, median of {s['timing_repeats']}) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    w0, w1 = s["widths_original"], s["widths_small"]
    print(f"| original shape, dense (weight decay) | {w0['conv1']} | {w0['conv2']} | {w0['fc1']} | {w0['fc2']} | "
          f"{s['params_original']} | {s['macs_original']:,} | {100 * s['test_accuracy_original']:.1f}% | - |")
    print(f"| original shape, spread row (zeros kept) | {w0['conv1']} | {w0['conv2']} | {w0['fc1']} | {w0['fc2']} | "
          f"{s['params_original']} ({s['nonzero_params_original']} nonzero) | {s['macs_original']:,} | "
          f"{100 * s['test_accuracy_big']:.1f}% | "
          f"{s['inference_ms_original']:.2f} |")
    print(f"| compact() | {w1['conv1']} | {w1['conv2']} | {w1['fc1']} | {w1['fc2']} | {s['params_small']} | "
          f"{s['macs_small']:,} | {100 * s['test_accuracy_small']:.1f}% | {s['inference_ms_small']:.2f} |")
    print(f"\nsmall net vs big net with zeros: max |output difference| {s['max_abs_output_difference']:.2e}, "
          f"same predictions: {s['predictions_equal']}; parameters {s['param_ratio']:.1f}x fewer, MACs "
          f"{s['macs_ratio']:.1f}x fewer, "
          f"inference {s['speedup']:.1f}x faster")
    return result


if __name__ == "__main__":
    main()
