"""``param_groups``: spread's param groups for any ``nn.Module``, in the spirit of timm's ``param_groups_weight_decay``.

Passing ``kappa`` to the optimizer itself regularises every parameter, LayerNorm scales and biases included (they
go to exact zero). ``param_groups(model, kappa)`` puts kappa where sparsity means something and leaves the rest dense:

* **sparse** (by default): the ``weight`` of every layer with a weight matrix or filter bank: ``nn.Linear``,
  convolutions (``nn.Conv*d``, ``nn.ConvTranspose*d``), Hugging Face's ``Conv1D``, and any other parameter of two or
  more dims whose name ends in ``weight`` (``nn.MultiheadAttention.in_proj_weight``, a custom layer's ``weight``);
* **dense** (``kappa=0``): biases, every parameter of one dim, normalisation layers (BatchNorm, LayerNorm,
  GroupNorm, RMSNorm, InstanceNorm and any module whose class name contains ``Norm``), embeddings (``nn.Embedding``,
  ``nn.EmbeddingBag``; ``embeddings=True`` makes them sparse), other tensors (position embeddings, class tokens,
  bias tables), and a parameter tied to a dense one (GPT-2's ``lm_head.weight`` is its token embedding).

``include`` makes parameters sparse, ``exclude`` makes them dense (``exclude`` wins). Each entry is a parameter name
pattern (a string: ``fnmatch`` glob, ``*`` crosses dots; or a compiled ``re`` pattern, ``search``-ed), a module type
(matches the parameters of every module of that type and of everything inside one), or a module instance (its
parameters).

``sparsity`` is one kind for every sparse parameter or a dict ``{key: kind}`` (keys as in ``include``; the first
match in the dict's order wins; unmatched parameters get ``"element"``). Kinds are the optimizer's (``"element"``,
``"row"`` = dim-0 slices, ``"column"`` = dim-1 slices, an integer tensor of group ids) plus two that follow the layer's
meaning rather than its layout: ``"output"`` (output neurons, conv filters) and ``"input"`` (input features or
channels); ``"output"`` is ``"row"`` for ``nn.Linear`` and convolutions and ``"column"`` for transposed convolutions
and ``Conv1D``, whose weights are stored the other way round.

With ``couple=True`` (default) every layer with row-wise output groups gets a param group of its own in which
whole channels share one factor (``share_groups=True``), so that a channel that dies is exactly 0 downstream and
:func:`spread_optim.compact` can remove it:

* without BatchNorm after it, its filters (rows) and its bias: a dead neuron has zero weights and zero bias;
* with a BatchNorm right after it (the next module with parameters, in registration order, a BatchNorm over as
  many channels), the BatchNorm's scale and shift, and the layer's weights stay dense: BatchNorm makes a filter's
  scale free, so a penalty on the filters would only shrink them (the batch statistics then move faster than the
  running ones, and eval-mode outputs drift); a channel whose scale and shift are zero outputs exactly 0 whatever
  its filter (network slimming's criterion, with exact zeros).

``weight_decay=None`` (default) sets no weight decay (the optimizer's own default applies to dense groups; spread
ignores a base's weight decay in sparse groups); a float gives it to dense parameters of two or more dims and 0 to
biases, one-dim parameters and norms, as timm does. Other keyword arguments (``lr``, ``zero_threshold``, ``init``,
...) are copied into every group. Parameters with ``requires_grad=False`` are left out.
"""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache

import torch
from torch import nn

WEIGHT_LAYERS = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
NORM_LAYERS = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                getattr(nn, "RMSNorm", None), nn.LocalResponseNorm) if t is not None)
EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def param_groups(model: nn.Module, kappa: float, sparsity="element", *, include=(), exclude=(), embeddings=False,
                 couple=True, weight_decay=None, names=True, **options) -> list[dict]:
    """Param groups for a spread optimizer (or a framework's optimizer factory) with ``kappa`` on the weight layers.

    See the module docstring for the rules. Returns a list of dicts with ``params`` (``(name, tensor)`` pairs when
    ``names`` and torch >= 2.6, so that reports and checkpoints carry the names), ``kappa`` (0 in dense groups),
    ``sparsity``, ``share_groups`` and ``options``: sparse groups first, one per kind, or one per coupled layer.
    """
    include, exclude = _as_tuple(include), _as_tuple(exclude)
    params = _parameters(model)
    sparse = {}  # id(param) -> kind
    for pid, (p, pnames, owners, ancestors) in params.items():
        default = all(_sparse_by_default(p, n, m, embeddings) for n, m in zip(pnames, owners))
        key = (p, pnames, ancestors)
        if (default or _matches(include, *key)) and not _matches(exclude, *key) and p.dim() >= 1:
            sparse[pid] = _resolve(_kind_for(sparsity, *key), owners[0], p)
    coupled, densified = _couple(model, params, sparse, exclude) if couple else ({}, set())
    for pid in densified:
        del sparse[pid]
    member_of = {id(q): key for key, members in coupled.items() for q in members}
    nodecay = {} if weight_decay is None else {"weight_decay": 0.0}
    groups, by_kind, dense_decay, dense_rest, done = [], {}, [], [], set()
    for pid, (p, pnames, owners, _) in params.items():
        if pid in member_of:
            if member_of[pid] not in done:
                done.add(member_of[pid])
                groups.append(_group(coupled[member_of[pid]], params, names, kappa=kappa, sparsity="row",
                                     share_groups=True, **nodecay))
        elif pid in sparse:
            kind = sparse[pid]
            by_kind.setdefault(("ids", id(kind)) if isinstance(kind, torch.Tensor) else kind, (kind, []))[1].append(p)
        elif weight_decay is not None and p.dim() >= 2 and not any(_is_bias(n) for n in pnames) \
                and not any(_is_norm(m) for m in owners):
            dense_decay.append(p)
        else:
            dense_rest.append(p)
    for kind, members in by_kind.values():
        groups.append(_group(members, params, names, kappa=kappa, sparsity=kind, share_groups=False, **nodecay))
    if dense_decay:
        groups.append(_group(dense_decay, params, names, kappa=0.0, weight_decay=weight_decay))
    if dense_rest:
        groups.append(_group(dense_rest, params, names, kappa=0.0, **nodecay))
    for g in groups:
        for k, v in options.items():
            g.setdefault(k, v)
    return groups


# ----------------------------------------------------------------------------------------------------


def _parameters(model: nn.Module) -> dict:
    """id -> (param, its names, the modules holding it directly, every module containing it), registration order."""
    out = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{mname}.{pname}" if mname else pname
            entry = out.setdefault(id(p), (p, [], [], []))
            if full not in entry[1]:
                entry[1].append(full)
                entry[2].append(module)
    for module in model.modules():
        for p in module.parameters():
            if id(p) in out and not any(m is module for m in out[id(p)][3]):
                out[id(p)][3].append(module)
    return {pid: (p, tuple(n), tuple(o), tuple(a)) for pid, (p, n, o, a) in out.items()}


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1].endswith("bias")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_LAYERS) or "norm" in type(module).__name__.lower()


def _is_conv1d_transposed(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _sparse_by_default(p, name: str, module: nn.Module, embeddings: bool) -> bool:
    local = name.rsplit(".", 1)[-1]
    if p.dim() < 2 or _is_bias(name) or _is_norm(module):
        return False
    if isinstance(module, EMBEDDINGS) or "embedding" in type(module).__name__.lower():
        return embeddings and local == "weight"
    return local.endswith("weight")


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    if isinstance(x, (str, re.Pattern, type, nn.Module)):
        return (x,)
    return tuple(x)


def _matches(selectors, p, pnames, ancestors) -> bool:
    return any(_match(s, p, pnames, ancestors) for s in selectors)


def _match(selector, p, pnames, ancestors) -> bool:
    if isinstance(selector, str):
        return any(fnmatch.fnmatchcase(n, selector) for n in pnames)
    if isinstance(selector, re.Pattern):
        return any(selector.search(n) for n in pnames)
    if isinstance(selector, nn.Module):
        return any(m is selector for m in ancestors)
    if isinstance(selector, type) or (isinstance(selector, tuple) and all(isinstance(t, type) for t in selector)):
        return any(isinstance(m, selector) for m in ancestors)
    raise TypeError(f"param_groups: a selector is a name pattern (str or re.Pattern), a module type or a module, got {selector!r}")


def _kind_for(sparsity, p, pnames, ancestors):
    if not isinstance(sparsity, dict):
        return sparsity
    for key, kind in sparsity.items():
        if _match(key, p, pnames, ancestors):
            return kind
    return "element"


def _resolve(kind, module: nn.Module, p):
    """``"output"``/``"input"`` to ``"row"``/``"column"`` for this layer's weight layout."""
    if isinstance(kind, str) and kind in ("output", "input"):
        flipped = isinstance(module, nn.modules.conv._ConvTransposeNd) or _is_conv1d_transposed(module)
        kind = ("column" if flipped else "row") if kind == "output" else ("row" if flipped else "column")
    if kind == "column" and p.dim() < 2:
        raise ValueError(f"param_groups: 'column' sparsity needs a parameter of 2 or more dims, got shape {tuple(p.shape)}")
    return kind


def _couple(model, params, sparse, exclude) -> tuple[dict, set]:
    """Row-sparse weight layers' groups (see the module doc): id(layer weight) -> the members sharing one factor per
    channel (the layer's weight and bias, or the BatchNorm's scale and shift after it), and the ids made dense."""
    holders = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    coupled, dense = {}, set()
    usable = lambda q, n: isinstance(q, torch.Tensor) and id(q) in params and id(q) not in sparse and q.dim() == 1 \
        and q.shape[0] == n and len(params[id(q)][1]) == 1 and not _matches(exclude, q, *params[id(q)][1::2])
    for i, layer in enumerate(holders):
        w = getattr(layer, "weight", None)
        if not isinstance(w, torch.Tensor) or not isinstance(sparse.get(id(w)), str) or sparse[id(w)] != "row" \
                or not isinstance(layer, WEIGHT_LAYERS) or w.dim() < 2 or len(params[id(w)][1]) > 1:
            continue
        bias = getattr(layer, "bias", None)
        nxt = holders[i + 1] if i + 1 < len(holders) else None
        if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.num_features == w.shape[0] \
                and usable(nxt.weight, w.shape[0]) and usable(nxt.bias, w.shape[0]):
            coupled[id(w)] = [nxt.weight, nxt.bias]  # the channel's scale and shift decide; the filter's scale is free
            dense.add(id(w))
        elif usable(bias, w.shape[0]):
            coupled[id(w)] = [w, bias]
    return coupled, dense


def _group(members, params, names, **keys) -> dict:
    tensors = [(params[id(p)][1][0], p) for p in members] if names and _named_params_supported() else list(members)
    return {"params": tensors, **keys}


@lru_cache(maxsize=1)
def _named_params_supported() -> bool:
    """torch >= 2.6 takes ``(name, tensor)`` pairs in a param group and keeps the names in ``param_names``."""
    try:
        torch.optim.SGD([("probe", torch.zeros(1, requires_grad=True))])
        return True
    except (TypeError, ValueError):
        return False
