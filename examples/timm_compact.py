"""timm: a ``resnet18`` (built from timm's registry, no weights downloaded) trained briefly on scikit-learn's digits
(upsampled to 32x32) with filter sparsity, built by timm's own optimizer factory, then ``compact()``: the dead
filters, their BatchNorm channels and the next convolutions' input channels are removed. Prints parameters, MACs
(torch-pruning's counter) and CPU inference time (one thread, median) before and after, and the largest output
difference between the two models.

    python examples/timm_compact.py            # resnet18, 8 epochs of 1347 images, batch 64 (168 steps)
    python examples/timm_compact.py --quick    # timm's test_resnet (a small ResNet), 40 steps (CI)
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch_pruning as tp
from sklearn.datasets import load_digits
from torch import nn
from torch.optim.swa_utils import update_bn

from spread_optim import compact, param_groups, register_timm, sparsity_report


def digits_32():
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    X = nn.functional.interpolate(X, size=32, mode="bilinear", align_corners=False)
    return (X - X.mean()) / X.std(), torch.tensor(y)


def cpu_ms(models, x, repeats: int) -> list[float]:
    """Median time (ms) of one forward pass of each model, one thread, measured in turns (so that a busy machine
    slows them alike), after a warm-up."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = [[] for _ in models]
    with torch.inference_mode():
        for i in range(repeats + 3):
            for model, t in zip(models, times):
                model.eval()
                start = time.perf_counter()
                model(x)
                if i >= 3:
                    t.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return [1e3 * statistics.median(t) for t in times]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="test_resnet, 40 steps, few timing repeats (CI)")
    parser.add_argument("--model", default=None, help="a timm model name (default: resnet18; test_resnet with --quick)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: --epochs; 40 with --quick)")
    parser.add_argument("--kappa", type=float, default=None, help="default 5e-3 (1e-2 with --quick); 0 trains the dense reference")
    parser.add_argument("--lr", type=float, default=None, help="default 2e-2 (5e-2 with --quick)")
    parser.add_argument("--timing-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    args.model = args.model or ("test_resnet" if args.quick else "resnet18")
    if args.kappa is None:
        args.kappa = 1e-2 if args.quick else 5e-3  # --quick: strong enough for channels to die in 40 steps
    if args.lr is None:
        args.lr = 5e-2 if args.quick else 2e-2

    X, y = digits_32()
    n_train = 1347
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    train, test = perm[:n_train], perm[n_train:]
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10, in_chans=1)
    register_timm()  # "spreadsgd" / "spreadadam" / "spreadadamw" in timm's optimizer registry
    # one factor per channel: a BatchNorm's scale and shift (filters before BatchNorm stay dense); classifier dense
    optimizer = timm.optim.create_optimizer_v2(
        model, opt="spreadadamw", lr=args.lr,
        param_group_fn=lambda m: param_groups(m, args.kappa, sparsity="row", exclude=[m.get_classifier()]))
    steps = args.steps or (40 if args.quick else args.epochs * (n_train // 64))
    model.train()
    for step in range(steps):
        idx = train[torch.randperm(n_train, generator=torch.Generator().manual_seed(step))[:64]]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")
    # channels that died (or flickered) during training left BatchNorm's running statistics behind: recompute them
    update_bn([X[train[i:i + 64]] for i in range(0, n_train, 64)], model)
    model.eval()
    report = sparsity_report(model, optimizer)
    dead = sum(r.zero_groups for r in report if r.kappa and r.name.endswith("weight"))  # channels at exact zero

    small = compact(model, X[test[:16]])
    xt = X[test[: args.timing_batch]]
    with torch.no_grad():
        diff = float((model(X[test]) - small(X[test])).abs().max())
        acc = [float((m(X[test]).argmax(1) == y[test]).float().mean()) for m in (model, small)]
    repeats = 5 if args.quick else args.repeats
    rows = {}
    for (name, m), ms in zip((("before", model), ("after", small)), cpu_ms([model, small], xt, repeats)):
        macs, params = tp.utils.count_ops_and_params(m, xt[:1])
        rows[name] = dict(params=int(params), macs=int(macs), ms=ms)
    b, a = rows["before"], rows["after"]
    print(f"\n{args.model}, {steps} steps, kappa {args.kappa:g}: {dead} channels exactly zero "
          f"(BatchNorm scale and shift, or filter and bias)\n")
    print(f"| model | parameters | MACs per image | CPU ms (batch {len(xt)}, 1 thread, median of {repeats}) | test accuracy |")
    print("| --- | --- | --- | --- | --- |")
    for (name, r), acc_ in zip(rows.items(), acc):
        print(f"| {name} compact | {r['params']:,} | {r['macs'] / 1e6:.1f} M | {r['ms']:.1f} | {100 * acc_:.1f}% |")
    print(f"\nratios: parameters {b['params'] / a['params']:.2f}x, MACs {b['macs'] / a['macs']:.2f}x, time {b['ms'] / a['ms']:.2f}x; "
          f"max |output difference| on {len(test)} test images {diff:.2e}")
    if not diff <= 1e-5:
        raise SystemExit("compact changed the outputs")
    return dict(rows=rows, diff=diff, accuracy=acc, dead=dead)


if __name__ == "__main__":
    main()
