"""Lightning with a spread optimizer: an MLP on scikit-learn's digits with one group-lasso factor per input pixel
(feature selection), trained with automatic optimization and with manual optimization (``optimizer.step(closure)``,
the closure returning the loss or None). The three runs see the same batches and must end with the same weights.

    python examples/lightning_example.py            # 20 epochs
    python examples/lightning_example.py --quick    # 1 epoch (CI)
"""

from __future__ import annotations

import argparse
import logging

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn

import spread_optim
from spread_optim import SpreadAdam, param_groups, sparsity_report


class DigitsMLP(pl.LightningModule):
    def __init__(self, kappa: float, lr: float, mode: str = "automatic"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.kappa, self.lr, self.mode = kappa, lr, mode
        self.automatic_optimization = mode == "automatic"

    def loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self.loss(batch)
        opt = self.optimizers()  # Lightning's wrapper around the spread optimizer

        def closure():
            opt.zero_grad()
            loss = self.loss(batch)
            self.manual_backward(loss)
            return loss if self.mode == "manual" else None  # a closure may return None

        opt.step(closure)

    def on_train_end(self):
        x, y = self.trainer.train_dataloader.dataset.tensors
        self.net.zero_grad()
        self.loss((x, y)).backward()
        print(f"{self.mode}: KKT residual {spread_optim.kkt_residual(self.trainer.optimizers[0]):.3g}")

    def configure_optimizers(self):
        # first layer: one factor per input pixel (column); the rest element-wise L1; biases dense
        return SpreadAdam(param_groups(self, self.kappa, sparsity={self.net[0]: "column"}), lr=self.lr)


def train(mode: str, epochs: int, kappa: float, lr: float) -> DigitsMLP:
    X, y = load_digits(return_X_y=True)
    data = torch.utils.data.TensorDataset(torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y))
    torch.manual_seed(0)
    model = DigitsMLP(kappa, lr, mode)
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    print(sparsity_report(model, trainer.optimizers[0]))
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch (CI)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--kappa", type=float, default=2e-3)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--modes", nargs="+", default=["automatic", "manual", "manual-none"])
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banners
    epochs = 1 if args.quick else args.epochs
    models = {mode: train(mode, epochs, args.kappa, args.lr) for mode in args.modes}
    first = next(iter(models.values()))
    for mode, model in models.items():
        same = all(torch.equal(p, q) for p, q in zip(first.parameters(), model.parameters()))
        print(f"{mode}: same weights as {args.modes[0]}: {same}")
        if not same:
            raise SystemExit(f"{mode} optimization ended elsewhere than {args.modes[0]}")
    pixels = int((first.net[0].weight != 0).any(0).sum())
    print(f"pixels in use: {pixels} of 64")


if __name__ == "__main__":
    main()
