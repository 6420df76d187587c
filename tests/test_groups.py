"""``param_groups``: kappa on weight layers, biases / norms / embeddings dense, selectors, per-layer kinds, and the
groups as the params of every spread optimizer and of timm's factory. The oracle for the defaults is training: with
``kappa`` on the optimizer itself LayerNorm goes to exact zero; through ``param_groups`` it does not, and the
weights still get exact zeros."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from spread_optim import SpreadAdam, SpreadAdamW, SpreadOptimizer, SpreadSGD, param_groups, sparsity_report


class TinyTransformer(nn.Module):
    """Token + position embeddings, one pre-norm encoder layer (nn.MultiheadAttention), a final LayerNorm, a head."""

    def __init__(self, vocab=20, dim=16, classes=3):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, 8, dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(self.norm(self.layer(self.tok(ids) + self.pos[:, : ids.shape[1]])).mean(1))


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def kinds(groups) -> dict:
    """name -> (kappa, sparsity or None, share_groups)"""
    out = {}
    for g in groups:
        for name, _ in g["params"]:
            assert name not in out, f"{name} in two groups"
            out[name] = (g["kappa"], g.get("sparsity") if g["kappa"] else None, g.get("share_groups", False))
    return out


def test_transformer_defaults_weights_sparse_rest_dense():
    model = TinyTransformer()
    k = kinds(param_groups(model, 1e-3))
    sparse = {n for n, (kappa, _, _) in k.items() if kappa > 0}
    assert sparse == {"layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight", "layer.linear1.weight",
                      "layer.linear2.weight", "head.weight"}
    assert set(k) == {n for n, _ in model.named_parameters()}  # every trainable parameter, once
    assert all(k[n][1] == "element" for n in sparse)
    # embeddings=True makes the token embedding sparse; the position tensor stays dense (not a layer weight)
    k = kinds(param_groups(model, 1e-3, embeddings=True))
    assert k["tok.weight"][0] == 1e-3 and k["pos"][0] == 0.0


def test_cnn_row_sparsity_couples_batchnorm_channels():
    model = TinyCNN()
    groups = param_groups(model, 1e-3, sparsity="row", exclude=[model.fc])
    members = [[n for n, _ in g["params"]] for g in groups if g["kappa"] > 0]
    assert members == [["bn1.weight", "bn1.bias"], ["bn2.weight", "bn2.bias"]]  # one factor per channel
    assert all(g["share_groups"] and g["sparsity"] == "row" for g in groups if g["kappa"] > 0)
    k = kinds(groups)
    for name in ("conv1.weight", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias"):
        assert k[name][0] == 0.0, name  # filters before BatchNorm: scale-free, dense
    # without coupling: the filters alone, one group, BatchNorm dense
    k = kinds(param_groups(model, 1e-3, sparsity="row", couple=False, exclude="fc.*"))
    assert {n for n, v in k.items() if v[0] > 0} == {"conv1.weight", "conv2.weight"}
    assert k["conv1.weight"] == (1e-3, "row", False)


def test_mlp_sparsity_per_layer_type_and_name():
    model = mlp()
    k = kinds(param_groups(model, 1e-3, sparsity={"0.weight": "column", re.compile(r"^4\."): "element", nn.Linear: "output"}))
    assert k["0.weight"][1] == "column" and k["4.weight"][1] == "element"
    assert k["2.weight"] == (1e-3, "row", True) and k["2.bias"] == (1e-3, "row", True)  # coupled with its bias
    assert k["0.bias"][0] == 0.0 and k["4.bias"][0] == 0.0


def test_include_exclude_selectors():
    model = TinyTransformer()
    k = kinds(param_groups(model, 1e-3, include=["pos", nn.LayerNorm], exclude=[re.compile("linear[12]"), model.head]))
    assert k["pos"][0] > 0 and k["norm.weight"][0] > 0 and k["layer.norm1.bias"][0] > 0
    assert k["layer.linear1.weight"][0] == 0 and k["head.weight"][0] == 0
    assert k["layer.self_attn.in_proj_weight"][0] > 0
    k = kinds(param_groups(model, 1e-3, exclude=nn.TransformerEncoderLayer))  # a container type: everything in it
    assert {n for n, v in k.items() if v[0] > 0} == {"head.weight"}
    with pytest.raises(TypeError, match="selector"):
        param_groups(model, 1e-3, exclude=[3])


def test_output_input_follow_the_weight_layout():
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3), nn.Conv2d(6, 5, 3))
    k = kinds(param_groups(model, 1e-3, sparsity="output", couple=False))
    assert k["0.weight"][1] == "column" and k["1.weight"][1] == "row"
    k = kinds(param_groups(model, 1e-3, sparsity="input", couple=False))
    assert k["0.weight"][1] == "row" and k["1.weight"][1] == "column"
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(5, 3)  # GPT-2's linear layer, weight stored (in, out)
    k = kinds(param_groups(nn.Sequential(conv1d), 1e-3, sparsity="output", couple=False))
    assert k["0.weight"][1] == "column"


def test_tied_embedding_stays_dense_and_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as GPT-2's lm_head
    model.add_module("frozen", nn.Linear(4, 4))
    model.frozen.requires_grad_(False)
    k = kinds(param_groups(model, 1e-3))
    assert k == {"0.weight": (0.0, None, False)}


def test_weight_decay_and_options_pass_through():
    model = TinyTransformer()
    groups = param_groups(model, 1e-3, weight_decay=0.05, lr=0.5, zero_threshold=1e-5)
    assert all(g["lr"] == 0.5 and g["zero_threshold"] == 1e-5 for g in groups)
    by_name = {n: g for g in groups for n, _ in g["params"]}
    assert by_name["tok.weight"]["weight_decay"] == 0.05 and by_name["pos"]["weight_decay"] == 0.05  # dense matrices
    assert by_name["norm.weight"]["weight_decay"] == 0.0 and by_name["head.bias"]["weight_decay"] == 0.0
    assert by_name["head.weight"]["weight_decay"] == 0.0  # sparse groups: spread's penalty instead
    assert all("weight_decay" not in g for g in param_groups(model, 1e-3))
    plain = param_groups(model, 1e-3, names=False)
    assert all(isinstance(p, torch.Tensor) for g in plain for p in g["params"])


@pytest.mark.parametrize("make", [
    lambda g: SpreadSGD(g, lr=0.2, momentum=0.9),
    lambda g: SpreadAdam(g, lr=1e-2),
    lambda g: SpreadAdamW(g, lr=1e-2, kappa=0.5),  # a top-level kappa is only the default: the groups set theirs
    lambda g: SpreadOptimizer(g, torch.optim.RMSprop, lr=1e-2),
])
def test_groups_as_params_of_every_optimizer_layernorm_stays_dense(make):
    torch.manual_seed(0)
    model = TinyTransformer()
    ids, y = torch.randint(0, 20, (32, 8)), torch.randint(0, 3, (32,))
    opt = make(param_groups(model, 2e-2))
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids), y).backward()
        opt.step()
    report = {r.name: r for r in sparsity_report(model, opt)}
    for name in ("norm.weight", "norm.bias", "layer.norm1.weight", "layer.norm2.bias", "head.bias"):
        assert report[name].zeros == 0 and report[name].kappa == 0.0, report[name]
    assert report["layer.linear1.weight"].zeros > 0 and report["layer.linear1.weight"].kappa == 2e-2


def test_kappa_on_the_optimizer_zeroes_layernorm():
    """The problem param_groups solves: kappa for every parameter holds LayerNorm's shift (and the biases) at exact
    zero, where they start, until their gradient beats 2*kappa."""
    torch.manual_seed(0)
    model = TinyTransformer()
    ids, y = torch.randint(0, 20, (32, 8)), torch.randint(0, 3, (32,))
    opt = SpreadAdamW(model.parameters(), lr=1e-2, kappa=2e-2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids), y).backward()
        opt.step()
    assert float((model.norm.bias == 0).float().mean()) > 0.5 and float((model.layer.norm1.bias == 0).float().mean()) > 0.5


def test_timm_factory_builds_a_spread_optimizer():
    timm = pytest.importorskip("timm")
    from spread_optim import register_timm

    assert register_timm() == ["spreadsgd", "spreadadam", "spreadadamw"]
    model = TinyCNN()
    opt = timm.optim.create_optimizer_v2(model, opt="spreadadamw", lr=1e-3,
                                         param_group_fn=lambda m: param_groups(m, 1e-3, sparsity="row", exclude=[m.fc]))
    assert isinstance(opt, SpreadAdamW)
    assert [g["kappa"] for g in opt.param_groups] == [1e-3, 1e-3, 0.0]
    opt = timm.optim.create_optimizer_v2(param_groups(model, 1e-3), opt="spreadsgd", lr=0.1)
    assert isinstance(opt, SpreadSGD) and opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
