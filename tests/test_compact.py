"""``compact``: dead filters / neurons removed with what is coupled to them, outputs unchanged. Oracles: the outputs of
the compacted model equal the original's (max abs difference <= 1e-5) on the example inputs *and on fresh inputs*;
which channels go is known exactly for hand-made dead channels (zero bias, a constant folded into a linear layer or a
1x1 convolution, a constant before a padded convolution that must stay, an unread channel, a residual sum, an output
layer); and a net trained with row sparsity through ``param_groups`` shrinks."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from spread_optim import SpreadAdam, compact, param_groups

pytest.importorskip("torch_pruning")


class CNN(nn.Module):
    """The pruning benchmark's digits CNN (conv-relu-pool twice, three linear layers), 8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(128, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


class ResNetish(nn.Module):
    """Stem, one basic residual block with BatchNorm, a 1x1 convolution, a classifier."""

    def __init__(self, c=8):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c)
        self.mix = nn.Conv2d(2 * c, c, 1)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        x = self.mix(torch.relu(self.bn3(self.conv3(x))))
        return self.fc(x.mean((2, 3)))


def randomize_bn(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def same_outputs(big, small, *inputs, atol=1e-5):
    big.eval(), small.eval()
    with torch.no_grad():
        for x in inputs:
            assert float((big(x) - small(x)).abs().max()) <= atol


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_hand_made_dead_channels_of_the_benchmark_cnn():
    torch.manual_seed(0)
    m = CNN().eval()
    with torch.no_grad():
        m.conv1.weight[[0, 3, 5]] = 0
        m.conv1.bias[[0, 3]] = 0
        m.conv1.bias[5] = 0.7  # relu(0.7) into conv2 with zero padding: differs at the borders, stays
        m.conv2.weight[[1, 2, 9]] = 0
        m.conv2.bias[[1, 2]] = 0
        m.conv2.bias[9] = 0.3  # a constant through pool and flatten into fc1: folded into fc1's bias
        m.fc1.weight[[4, 5, 6]] = 0
        m.fc1.bias[4], m.fc1.bias[5], m.fc1.bias[6] = 0.0, 1.0, -1.0  # 5 folded into fc2; relu(-1) = 0
        m.fc3.weight[:, [7, 8]] = 0  # fc2 neurons 7 and 8 are never read
        m.fc3.weight[2] = 0  # an output row: the model's outputs stay
        m.fc3.bias[2] = 0
    x = torch.randn(16, 1, 8, 8)
    small = compact(m, x)
    widths = [small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features, small.fc2.out_features, small.fc3.out_features]
    assert widths == [14, 29, 125, 62, 10]
    same_outputs(m, small, x, torch.randn(50, 1, 8, 8), 10 * torch.randn(5, 1, 8, 8))
    assert m.conv1.out_channels == 16  # the original is untouched


def test_residual_block_batchnorm_and_1x1_fold():
    torch.manual_seed(0)
    m = ResNetish()
    randomize_bn(m)
    m.eval()
    with torch.no_grad():
        m.conv1.weight[[1, 2, 3]] = 0
        m.bn1.weight[[1, 2, 3]] = 0
        m.bn1.bias[[1, 2]] = 0  # exactly 0 after bn1: removed from conv1, bn1, conv2's inputs
        m.bn1.bias[3] = 0.4  # relu(0.4) into the padded conv2: stays
        m.bn1.weight[[6, 7]] = 0  # BatchNorm scale 0 silences a live filter: the channel is bn1's shift
        m.bn1.bias[6], m.bn1.bias[7] = 0.0, -0.3  # 0, and relu(-0.3) = 0: both removed
        m.conv3.weight[[0, 5]] = 0
        m.bn3.bias[[0, 5]] = 0.25  # a constant into the 1x1 convolution: folded into its bias
        m.conv2.weight[4] = 0  # one member of the residual sum alone: the channel is still alive
    x = torch.randn(4, 3, 10, 10)
    small = compact(m, x)
    assert (small.conv1.out_channels, small.bn1.num_features, small.conv2.in_channels) == (4, 4, 4)
    assert (small.conv3.out_channels, small.bn3.num_features, small.mix.in_channels) == (14, 14, 14)
    assert small.conv2.out_channels == small.stem.out_channels == 8
    same_outputs(m, small, x, torch.randn(3, 3, 12, 12))


def test_trained_with_row_sparsity_through_param_groups():
    torch.manual_seed(0)
    m = ResNetish()
    x = torch.randn(64, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    opt = SpreadAdam(param_groups(m, 5e-3, sparsity="row", exclude=[m.fc]), lr=5e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    dead = sum(int(((bn.weight == 0) & (bn.bias == 0)).sum()) for bn in (m.bn1, m.bn3))  # param_groups' channel groups
    assert dead > 0
    m.eval()
    small = compact(m, x[:8])
    assert small.bn1.num_features + small.bn3.num_features == m.bn1.num_features + m.bn3.num_features - dead
    same_outputs(m, small, x, torch.randn(7, 3, 8, 8))
    assert small.training is False


def test_mlp_with_dense_biases_and_a_layernorm():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 12), nn.LayerNorm(12), nn.Linear(12, 3)).train()
    with torch.no_grad():
        m[0].weight[:5] = 0  # relu(bias): constants folded into the next linear layer
        m[2].weight[:4] = 0  # into a LayerNorm, whose statistics see every channel: they stay
    small = compact(m, torch.randn(6, 10))
    assert [small[0].out_features, small[2].out_features] == [15, 12]
    assert small.training  # returned in the mode the model was in
    same_outputs(m, small, torch.randn(30, 10))


def test_timm_resnet18():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("resnet18", num_classes=10)
    randomize_bn(m)
    m.eval()
    with torch.no_grad():
        for block in (m.layer1[0], m.layer2[1], m.layer4[1]):
            dead = list(range(0, block.conv1.out_channels, 2))
            block.conv1.weight[dead] = 0
            block.bn1.weight[dead] = 0
            block.bn1.bias[dead] = 0
    x = torch.randn(2, 3, 32, 32)
    small = compact(m, x)
    assert [small.layer1[0].conv1.out_channels, small.layer2[1].conv1.out_channels, small.layer4[1].conv1.out_channels] == [32, 64, 256]
    assert small.layer1[1].conv1.out_channels == 64 and small.fc.out_features == 10
    same_outputs(m, small, x, torch.randn(2, 3, 40, 40))


def test_nothing_dead_gives_an_equal_model_and_a_whole_dead_layer_keeps_one_channel():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(5, 4)
    assert n_params(compact(m, x)) == n_params(m)
    with torch.no_grad():
        m[2].weight.zero_()
        m[2].bias.zero_()
    small = compact(m, x)
    assert small[2].out_features == 1 and small[0].out_features == 1  # then nothing reads layer 0's neurons
    same_outputs(m, small, x, torch.randn(9, 4))


def test_missing_torch_pruning_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ImportError, match=r"spread_optim\[compact\]"):
        compact(nn.Linear(2, 2), torch.randn(1, 2))


def test_transformer_mlp_neurons_and_dict_inputs():
    """Dead MLP neurons of a transformer (weights and bias zero; ReLU / GELU of 0 is 0) go; attention, LayerNorm and
    the residual stream stay. HF BERT takes a dict of inputs and returns a ModelOutput."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    with torch.no_grad():
        layer.linear1.weight[:5] = 0
        layer.linear1.bias[:5] = 0
    x = torch.randn(3, 7, 16)
    small = compact(layer, x)
    assert (small.linear1.out_features, small.linear2.in_features, small.self_attn.embed_dim) == (27, 27, 16)
    same_outputs(layer, small, x, torch.randn(2, 9, 16))
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    bert = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        bert.bert.encoder.layer[0].intermediate.dense.weight[:10] = 0
        bert.bert.encoder.layer[0].intermediate.dense.bias[:10] = 0
    small = compact(bert, {"input_ids": torch.randint(0, 32, (2, 16))})
    assert small.bert.encoder.layer[0].intermediate.dense.out_features == 54
    ids = torch.randint(0, 32, (3, 12))
    with torch.no_grad():
        assert float((bert(input_ids=ids).logits - small(input_ids=ids).logits).abs().max()) <= 1e-5
