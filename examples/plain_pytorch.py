"""A plain PyTorch loop: an MLP on scikit-learn's digits with neuron sparsity (group lasso per hidden neuron), an EMA
of the weights that keeps the exact zeros, the KKT residual as a progress measure, and ``compact()`` at the end: a
smaller dense MLP with the same outputs.

    python examples/plain_pytorch.py            # 60 epochs
    python examples/plain_pytorch.py --quick    # 8 epochs (CI)
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

from spread_optim import SpreadAdam, compact, param_groups, sparse_avg_fn, sparsity_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 epochs (CI)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--kappa", type=float, default=2e-3)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)
    epochs = 8 if args.quick else args.epochs

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    # hidden layers: one group per output neuron (its weights and bias share a factor); the last layer: one group
    # per input (the last hidden neuron's outgoing weights), so that no neuron escapes by rescaling
    optimizer = SpreadAdam(param_groups(model, args.kappa, sparsity={model[4]: "column", nn.Linear: "row"}), lr=args.lr)
    ema = AveragedModel(model, avg_fn=sparse_avg_fn(get_ema_avg_fn(0.99)))
    for epoch in range(epochs):
        for idx in torch.randperm(len(X)).split(128):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            optimizer.step()
            ema.update_parameters(model)
        if epoch % 5 == 4 or epoch == epochs - 1:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(X), y)
            loss.backward()
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, KKT residual {optimizer.kkt_residual():.3g}")
    print(sparsity_report(model, optimizer))
    zeros = lambda m: sum(int((p == 0).sum()) for p in m.parameters())
    print(f"exact zeros: live model {zeros(model)}, EMA {zeros(ema.module)}")

    small = compact(model, X[:256])
    with torch.no_grad():
        diff = float((model(X) - small(X)).abs().max())
    n = lambda m: sum(p.numel() for p in m.parameters())
    print(f"compact: widths {[l.out_features for l in model if isinstance(l, nn.Linear)]} -> "
          f"{[l.out_features for l in small if isinstance(l, nn.Linear)]}, parameters {n(model)} -> {n(small)}, "
          f"max |output difference| {diff:.2e}, accuracy {(small(X).argmax(1) == y).float().mean():.3f}")
    if not diff <= 1e-5 or zeros(ema.module) < zeros(model):
        raise SystemExit("compact changed the outputs, or the EMA lost exact zeros")


if __name__ == "__main__":
    main()
