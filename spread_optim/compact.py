"""``compact``: cash filter / neuron sparsity in: a smaller dense model with the same outputs.

After training with ``"row"`` (output) or ``"column"`` (input) group sparsity, whole filters and neurons are exactly
zero but the model keeps its size. :func:`compact` removes them with everything coupled to them (the next layers'
input channels, BatchNorm channels, the other members of a residual sum), using torch-pruning's dependency graph
for the surgery (``pip install "spread_optim[compact]"``), and checks that the outputs did not change.

A channel (one index of one coupled group of torch-pruning) is removed only when its removal provably leaves the
outputs unchanged. Its *producers* are the convolutions / linear layers whose output channel it is; it is
*constant* when every producer is silenced: its filter for the channel is exactly zero, or the BatchNorm right
after it has scale exactly zero there (the channel then carries biases and BatchNorm shifts through BatchNorm in
eval mode, activations and sums: a value that does not depend on the input). For every
*consumer* (a convolution / linear layer reading it), the channel is removable when

* the consumer's weights for it are exactly zero (it is never read: ``"column"`` sparsity), or
* it is constant and exactly 0 where the consumer reads it (a dead neuron whose weights and bias are zero, or a
  channel whose BatchNorm scale and shift are zero, as ``param_groups(..., couple=True)`` arranges; or a constant
  that ReLU sends to 0), or
* it is constant, nonzero, and the consumer can take it into its bias exactly: a linear layer (``bias +=
  W[:, j] * value``; also through a flatten) or a convolution without padding (``bias += value * sum of W[:, j]``).
  A zero filter followed by BatchNorm outputs the BatchNorm's shift; after ReLU that constant reaches the next
  layer, and with zero padding its contribution differs at the borders: such a channel is kept.

Values are read on ``example_inputs`` in eval mode (the constants are input-independent, so one batch shows them
exactly). Channels of grouped / depthwise convolutions, of LayerNorm / GroupNorm (their statistics see every
channel) or of unknown operations are kept, and so are the model's output channels. The returned model is a
copy; its outputs are compared with the original's on ``example_inputs`` (``RuntimeError`` above ``atol``).
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn

_CONV, _LINEAR = nn.modules.conv._ConvNd, nn.Linear


def compact(model: nn.Module, example_inputs, *, ignored_layers=(), atol: float = 1e-5, rtol: float = 1e-6) -> nn.Module:
    """A copy of ``model`` without its dead filters / neurons, with the same outputs (eval mode) on ``example_inputs``.

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs (as torch-pruning takes
    them). ``ignored_layers``: modules whose output channels must stay. The copy is returned in the mode
    ``model`` was in; the check (max abs difference <= ``atol + rtol * max |output|``) runs in eval mode. See the
    module docstring for which channels go.
    """
    tp = _torch_pruning()
    small = copy.deepcopy(model)
    training = small.training
    small.eval()
    frozen = [p for p in small.parameters() if not p.requires_grad]
    for p in frozen:  # torch-pruning traces through autograd
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(small, example_inputs=example_inputs, verbose=False)
        seen, reference = _consumer_inputs(small, example_inputs)
        plans = []
        for group in graph.get_all_groups(ignored_layers=list(_ignored(small, model, ignored_layers)),
                                          root_module_types=(_CONV, _LINEAR)):
            plan = _plan(graph, tp, group, seen)
            if plan is not None:
                plans.append(plan)
        for root, handler, remove, folds in plans:
            for module, delta in folds.items():
                _add_to_bias(module, delta)
        for root, handler, remove, folds in plans:
            pruning = graph.get_pruning_group(root, handler, remove)
            if graph.check_pruning_group(pruning):
                pruning.prune()
    finally:
        for p in frozen:
            p.requires_grad_(False)
    with torch.no_grad():
        diff = _max_diff(reference, _forward(small, example_inputs))
    tol = atol + rtol * max((float(t.abs().max()) for t in _tensors(reference) if t.numel()), default=0.0)
    if not diff <= tol:
        raise RuntimeError(f"compact: the compacted model's outputs differ from the original's by {diff:.3g} > {tol:.3g} "
                           "on example_inputs; please report this model (an operation the dependency graph took for "
                           "channel-wise?), or pass a larger atol/rtol if that is rounding")
    return small.train(training)


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError as e:
        raise ImportError("spread_optim.compact needs torch-pruning (the dependency graph for the surgery): "
                          "pip install \"spread_optim[compact]\"  (or: pip install torch-pruning)") from e
    return torch_pruning


def _ignored(small, model, ignored_layers):
    """The copy's modules matching ``ignored_layers`` (given as modules of ``model`` or of the copy)."""
    names = {id(m): n for n, m in model.named_modules()}
    copies = dict(small.named_modules())
    for layer in ignored_layers:
        yield copies[names[id(layer)]] if id(layer) in names else layer


def _forward(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _max_diff(a, b) -> float:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf")
    return max((float((x.double() - y.double()).abs().max()) for x, y in zip(ta, tb) if x.numel()), default=0.0)


def _consumer_inputs(model, inputs):
    """Inputs of every convolution / linear layer on ``inputs`` (eval mode), and the model's outputs."""
    seen = defaultdict(list)
    hooks = [m.register_forward_pre_hook(lambda m, args: seen[m].append(args[0].detach().clone()))
             for m in model.modules() if isinstance(m, (_CONV, _LINEAR))]
    try:
        with torch.no_grad():
            out = _forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def _plan(graph, tp, group, seen):
    """(root module, its pruning function, root indices to remove, {consumer: bias delta}) or None."""
    passthrough = (tp.ops._ElementWiseOp, tp.ops._ReshapeOp, tp.ops._ConcatOp, tp.ops._SplitOp, nn.modules.batchnorm._BatchNorm)
    root_dep = group[0].dep
    roots = sorted({r for item in group for r in item.root_idxs})
    dead = dict.fromkeys(roots, True)  # every producer is silenced: the channel is constant
    consumers = defaultdict(list)  # root index -> [(module, index)]
    zero_scale = {(item.dep.target.module, r) for item in group if isinstance(item.dep.target.module, nn.modules.batchnorm._BatchNorm)
                  and item.dep.target.module.weight is not None
                  for i, r in zip(item.idxs, item.root_idxs) if item.dep.target.module.weight[i] == 0}
    for item in group:
        dep, module = item.dep, item.dep.target.module
        out_fn, in_fn = graph.is_out_channel_pruning_fn(dep.handler), graph.is_in_channel_pruning_fn(dep.handler)
        if isinstance(module, _CONV) and module.groups != 1:
            return None
        if isinstance(module, (_CONV, _LINEAR)) and out_fn:
            if not dep.target.outputs:
                return None  # a model output
            dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
            after = dep.target.outputs[0].module if len(dep.target.outputs) == 1 else None
            for i, r in zip(item.idxs, item.root_idxs):
                silenced = (after, r) in zero_scale or not bool(module.weight.detach().select(dim, i).any())
                dead[r] = dead[r] and silenced
        elif isinstance(module, (_CONV, _LINEAR)) and in_fn:
            for i, r in zip(item.idxs, item.root_idxs):
                consumers[r].append((module, i))
        elif isinstance(module, passthrough):
            if not dep.target.outputs:
                return None  # the channel is part of the model's output
        else:
            return None  # LayerNorm, GroupNorm, PReLU, embeddings, attention, ...: kept
    remove, folds = [], {}  # folds: root index -> {consumer: bias delta}
    for r in roots:
        steps = [(module, _consumer_step(module, i, dead[r], seen.get(module, []))) for module, i in consumers[r]]
        if all(step is not None for _, step in steps):
            remove.append(r)
            folds[r] = [(module, step) for module, step in steps if isinstance(step, torch.Tensor)]
    remove = remove[1:] if len(remove) == len(roots) else remove  # keep one channel: no layers of width 0
    if not remove:
        return None
    deltas = {}
    for r in remove:
        for module, delta in folds[r]:
            deltas[module] = deltas[module] + delta if module in deltas else delta
    return root_dep.target.module, root_dep.handler, remove, deltas


def _consumer_step(module, i, constant: bool, inputs):
    """What removing input ``i`` of ``module`` needs: True (nothing), a bias delta tensor, or None (impossible)."""
    w = module.weight.detach()
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    if not bool(w.select(0 if transposed else 1, i).any()):
        return True  # never read
    if not constant or not inputs:
        return None
    values = [x.select(-1 if isinstance(module, _LINEAR) else 1, i) for x in inputs]
    if all(not bool(v.any()) for v in values):
        return True  # exactly 0 where it is read
    first = values[0].reshape(-1)[0]
    if any(not bool((v == first).all()) for v in values):
        return None  # not the same value everywhere (zero padding, or an average over borders, upstream)
    if isinstance(module, _LINEAR):
        return w[:, i].double() * float(first)
    padded = any(p != 0 for p in module.padding) if isinstance(module.padding, tuple) else module.padding != "valid"
    if padded or transposed:
        return None  # a constant input channel contributes differently at the borders
    return w[:, i].double().sum(dim=tuple(range(1, w.dim() - 1))) * float(first)


def _add_to_bias(module, delta: torch.Tensor) -> None:
    with torch.no_grad():
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.weight.shape[0], dtype=module.weight.dtype, device=module.weight.device))
        module.bias.copy_((module.bias.double() + delta.to(module.bias.device)).to(module.bias.dtype))
