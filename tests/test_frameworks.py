"""``kkt_residual``, ``penalty`` and ``sparsity_report`` through the real wrappers of accelerate (what HF
``Trainer.optimizer`` is) and Lightning: the same answers as on the optimizer inside."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spread_optim
from spread_optim import SpreadAdam, param_groups, sparsity_report


def trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    opt = SpreadAdam(param_groups(model, 2e-2, sparsity={model[0]: "column"}), lr=5e-2)
    x, y = torch.randn(40, 6), torch.randn(40, 2)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    return model, opt


def check_wrapper(model, opt, wrapped):
    assert spread_optim.kkt_residual(wrapped) == opt.kkt_residual() > 0
    assert spread_optim.penalty(wrapped) == opt.penalty() > 0
    assert spread_optim.unwrap(wrapped) is opt
    assert sparsity_report(model, wrapped).to_dicts() == sparsity_report(model, opt).to_dicts()
    assert sparsity_report(wrapped).to_dicts() == sparsity_report(opt).to_dicts()
    assert any(r.zeros for r in sparsity_report(model, wrapped))


def test_accelerate_wrapper():
    accelerate = pytest.importorskip("accelerate")
    model, opt = trained()
    _, wrapped = accelerate.Accelerator(cpu=True).prepare(model, opt)
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    with pytest.raises(AttributeError):
        wrapped.kkt_residual()  # what users met: the wrapper does not forward it
    check_wrapper(model, opt, wrapped)


def test_lightning_wrapper():
    optimizer_module = pytest.importorskip("lightning.pytorch.core.optimizer")
    model, opt = trained()
    wrapped = optimizer_module.LightningOptimizer(opt)
    check_wrapper(model, opt, wrapped)


def test_nested_wrappers_and_refusals():
    model, opt = trained()

    class Outer:
        def __init__(self, inner):
            self.optimizer = inner

    class Middle:
        def __init__(self, inner):
            self._optimizer = inner

    assert spread_optim.unwrap(Outer(Middle(opt))) is opt
    assert spread_optim.kkt_residual(opt) == opt.kkt_residual()
    with pytest.raises(TypeError, match="spread optimizer"):
        spread_optim.kkt_residual(torch.optim.Adam(model.parameters()))
    with pytest.raises(TypeError, match="spread optimizer"):
        spread_optim.penalty(Outer(None))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        sparsity_report(model, Outer(object()))
