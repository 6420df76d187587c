"""Averaged weights keep spread's exact zeros: ``apply_support`` after averaging, ``sparse_avg_fn`` while averaging.
Oracles: an ordinary EMA / SWA of a sparse model has (almost) no exact zeros; after ``apply_support`` its zeros are
exactly the live model's; ``sparse_avg_fn`` equals the rule computed by hand (average, then zero where live is 0)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

from spread_optim import SpreadAdam, apply_support, param_groups, sparse_avg_fn


def run(averagers, steps=60):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    x = torch.randn(64, 8)
    y = x[:, :2].sum(1, keepdim=True)
    opt = SpreadAdam(param_groups(model, 3e-3), lr=2e-2)
    averaged = [AveragedModel(model, **kw) for kw in averagers]
    history = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        for a in averaged:
            a.update_parameters(model)
        history.append([p.detach().clone() for p in model.parameters()])
    return model, averaged, history


def zero_fraction(module, names=("0.weight", "2.weight")):
    params = dict(module.named_parameters())
    return sum(int((params[n] == 0).sum()) for n in names) / sum(params[n].numel() for n in names)


def test_plain_averages_lose_the_zeros_apply_support_restores_them():
    model, (ema, swa), _ = run([dict(multi_avg_fn=get_ema_multi_avg_fn(0.9)), {}])
    assert zero_fraction(model) > 0.3
    for averaged in (ema, swa):
        assert zero_fraction(averaged.module) < 0.5 * zero_fraction(model)
        changed = apply_support(averaged, model)  # AveragedModel: its .module is matched by name
        assert changed > 0 and apply_support(averaged.module, model) == 0
        for (name, p), q in zip(model.named_parameters(), averaged.module.parameters()):
            assert torch.equal(p == 0, q == 0) or name.endswith("bias"), name  # the live support, exactly
    assert ema.n_averaged == 60


def test_sparse_avg_fn_matches_the_rule_by_hand():
    decay = 0.9
    model, (ema, swa), history = run([dict(avg_fn=sparse_avg_fn(get_ema_avg_fn(decay))), dict(avg_fn=sparse_avg_fn())])
    manual_ema, manual_swa = [p.clone() for p in history[0]], [p.clone() for p in history[0]]
    for n, current in enumerate(history[1:], start=1):
        for a, b, p in zip(manual_ema, manual_swa, current):
            a.copy_(torch.where(p == 0, 0.0, decay * a + (1 - decay) * p))
            b.copy_(torch.where(p == 0, 0.0, b + (p - b) / (n + 1)))
    for got, want in ((ema, manual_ema), (swa, manual_swa)):
        for q, w, p in zip(got.module.parameters(), want, model.parameters()):
            torch.testing.assert_close(q, w, rtol=1e-6, atol=1e-7)
            assert bool((q[p == 0] == 0).all())  # every live zero is a zero of the average
    assert zero_fraction(ema.module) >= zero_fraction(model)


def test_apply_support_refuses_another_model():
    model, _, _ = run([], steps=1)
    with pytest.raises(ValueError, match="no parameter"):
        apply_support(nn.Linear(8, 32), model)
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    with pytest.raises(ValueError, match="shape"):
        apply_support(other, model)
