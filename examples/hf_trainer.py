"""Hugging Face ``Trainer`` with a spread optimizer: a small BERT (built from a config, nothing downloaded) on a
synthetic sequence-classification task, L1 on the weight matrices through ``param_groups``, a checkpoint halfway,
and a resumed run from that checkpoint that must end where the uninterrupted run ended.

    python examples/hf_trainer.py            # 200 steps
    python examples/hf_trainer.py --quick    # 12 steps (CI)
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import spread_optim
from spread_optim import SparsityReport, SpreadAdamW, param_groups, sparsity_report


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the label says whether token 3 occurs more often than token 4."""

    def __init__(self, n: int, length: int = 16, vocab: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, vocab, (n, length), generator=g)
        self.ids[torch.rand(n, length, generator=g) < 0.2] = 3
        self.ids[torch.rand(n, length, generator=g) < 0.2] = 4
        self.labels = ((self.ids == 3).sum(1) > (self.ids == 4).sum(1)).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def new_model(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


def trainer_for(model, out: str, steps: int, kappa: float, lr: float, data) -> Trainer:
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=16, save_steps=steps // 2,
                             logging_steps=max(1, steps // 4), report_to="none", use_cpu=True, seed=0,
                             disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=0)
    # "params" in the kwargs replaces the Trainer's own two groups (kappa would otherwise reach LayerNorm)
    optimizer = (SpreadAdamW, {"params": param_groups(model, kappa, weight_decay=0.01), "lr": lr})
    return Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=optimizer)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 steps (CI)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kappa", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    steps = 12 if args.quick else args.steps
    data = Tokens(512)
    with tempfile.TemporaryDirectory() as out:
        model = new_model()
        trainer = trainer_for(model, out, steps, args.kappa, args.lr, data)
        trainer.train()  # saves checkpoint-<steps/2> on the way
        report = sparsity_report(model, trainer.optimizer)  # trainer.optimizer is accelerate's wrapper
        print(SparsityReport(r for r in report if r.kappa))  # the regularised weights
        batch = data[:64]
        model.zero_grad()
        model(**batch).loss.backward()
        print(f"KKT residual {spread_optim.kkt_residual(trainer.optimizer):.3g}, penalty {spread_optim.penalty(trainer.optimizer):.4g}")

        resumed = new_model(seed=1)  # other initial weights: everything must come from the checkpoint
        trainer_for(resumed, out, steps, args.kappa, args.lr, data).train(resume_from_checkpoint=f"{out}/checkpoint-{steps // 2}")
        same = all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
        print(f"resumed run equals the uninterrupted run: {same}")
        if not same:
            diff = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), resumed.parameters()))
            raise SystemExit(f"the resumed run differs from the uninterrupted one by {diff:.3g}")
    zeros = sum(r.zeros for r in sparsity_report(model) if "LayerNorm" in r.name)
    if zeros:
        raise SystemExit(f"{zeros} LayerNorm entries are exactly zero: kappa reached a dense group")


if __name__ == "__main__":
    main()
