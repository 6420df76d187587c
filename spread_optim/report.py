"""``sparsity_report``: how sparse a model (or an optimizer's parameters) is, per parameter."""

from __future__ import annotations

from dataclasses import dataclass, asdict

import torch

from spread_optim.distributed import AllReduce, is_dtensor, is_sharded, local, local_rows
from spread_optim.structure import GroupStructure, describe


@dataclass
class ParamSparsity:
    """One row: ``zero_groups``/``num_groups`` count groups whose entries are all exactly zero (for
    element sparsity, entries); ``kappa`` is None for a parameter no optimizer regularises."""

    name: str
    shape: tuple
    kappa: float | None
    sparsity: str
    numel: int
    zeros: int
    zero_groups: int
    num_groups: int

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


class SparsityReport(list):
    """A list of :class:`ParamSparsity` rows that prints as a table."""

    @property
    def total_zero_fraction(self) -> float:
        n = sum(r.numel for r in self)
        return sum(r.zeros for r in self) / n if n else 0.0

    def to_dicts(self) -> list[dict]:
        return [dict(asdict(r), zero_fraction=r.zero_fraction) for r in self]

    def __str__(self) -> str:
        header = ("parameter", "shape", "kappa", "sparsity", "zeros", "zero groups")
        rows = [
            (
                r.name,
                "x".join(map(str, r.shape)) or "scalar",
                "-" if r.kappa is None else f"{r.kappa:g}",
                r.sparsity,
                f"{100 * r.zero_fraction:.1f}%",
                f"{r.zero_groups}/{r.num_groups}",
            )
            for r in self
        ]
        total = sum(r.numel for r in self)
        rows.append(("total", str(total), "", "", f"{100 * self.total_zero_fraction:.1f}%", ""))
        widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [line(header), line(["-" * w for w in widths])]
        out += [line(r) for r in rows[:-1]] + [line(["-" * w for w in widths]), line(rows[-1])]
        return "\n".join(out)

    __repr__ = __str__


def _row(name: str, p: torch.Tensor, kappa, sparsity) -> ParamSparsity:
    data = p.detach()
    zero = data == 0
    kind = describe(sparsity)
    if kind == "element" or data.dim() == 0 or (kind == "column" and data.dim() < 2):
        groups, zero_groups = data.numel(), int(zero.sum())
    else:
        structure = GroupStructure(sparsity, data.shape, data.device)
        nonzero_per_group = structure.reduce((~zero).to(torch.float32))
        groups, zero_groups = structure.num_groups, int((nonzero_per_group == 0).sum())
    return ParamSparsity(name, tuple(data.shape), kappa, kind, data.numel(), int(zero.sum()), zero_groups, groups)


def sparsity_report(model_or_optimizer, optimizer=None) -> SparsityReport:
    """Per parameter: name, shape, kappa, sparsity kind, fraction of exact zeros, groups entirely zero.

    ``sparsity_report(model)`` lists every parameter of a module (names from ``named_parameters``,
    kappa ``-``, entries counted as groups); ``sparsity_report(optimizer)`` lists the parameters of every
    param group with its ``kappa`` and ``sparsity`` (names from ``named_parameters`` passed to the
    optimizer, else ``group<i>.<j>``); ``sparsity_report(model, optimizer)`` combines both. The optimizer may be
    a framework's wrapper (accelerate's ``AcceleratedOptimizer``, as HF ``Trainer.optimizer``, or Lightning's
    ``LightningOptimizer``): the optimizer inside is read.
    ``print()`` the result for a table; rows are :class:`ParamSparsity`.
    """
    from spread_optim.frameworks import innermost  # accelerate's / Lightning's wrappers hold the optimizer

    model_or_optimizer = model_or_optimizer if isinstance(model_or_optimizer, torch.nn.Module) else innermost(model_or_optimizer)
    optimizer = None if optimizer is None else innermost(optimizer)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"sparsity_report's optimizer must be a torch.optim.Optimizer (or a framework's wrapper around one), got {type(optimizer).__name__}")
    if isinstance(model_or_optimizer, torch.optim.Optimizer):
        if optimizer is not None:
            raise TypeError("pass sparsity_report(model, optimizer) or sparsity_report(optimizer)")
        model, optimizer = None, model_or_optimizer
    elif isinstance(model_or_optimizer, torch.nn.Module):
        model = model_or_optimizer
    else:
        raise TypeError(f"sparsity_report expects an nn.Module or a torch.optim.Optimizer, got {type(model_or_optimizer).__name__}")
    settings, names = {}, {}
    if optimizer is not None:
        for i, group in enumerate(optimizer.param_groups):
            group_names = group.get("param_names") or [f"group{i}.{j}" for j in range(len(group["params"]))]
            for p, name in zip(group["params"], group_names):
                settings[p] = (group.get("kappa", 0.0), group.get("sparsity", "element"))
                names[p] = name
    if model is not None:
        entries = [(name, p, *settings.get(p, (None, "element"))) for name, p in model.named_parameters()]
    else:
        entries = [(names[p], p, kappa, sparsity) for p, (kappa, sparsity) in settings.items()]
    if any(is_dtensor(e[1]) for e in entries):  # FSDP2: counts summed over the shards, one all-reduce
        return SparsityReport(_sharded_rows(entries))
    return SparsityReport(_row(*e) for e in entries)


def _sharded_rows(entries) -> list[ParamSparsity]:
    """Rows of DTensor parameters: each rank counts its shard, one all-reduce per mesh sums the counts."""
    rows, pending = [], []
    for name, p, kappa, sparsity in entries:
        data = local(p.detach())
        if not is_sharded(p):
            row = _row(name, data, kappa, sparsity)
            row.shape, row.numel = tuple(p.shape), p.numel()
            rows.append(row)
            continue
        kind = describe(sparsity)
        zeros = (data == 0).sum().to(torch.float64).reshape(1)
        if kind == "element" or p.dim() == 0 or (kind == "column" and p.dim() < 2):
            num_groups, counts, whole = p.numel(), torch.cat([zeros, zeros]), True
        else:
            structure = GroupStructure(sparsity, p.shape, data.device).rows(*local_rows(p))
            nonzero = structure.reduce((data != 0).to(torch.float64))
            if kind == "row":  # whole groups on each rank: count them locally
                num_groups, counts, whole = p.shape[0], torch.cat([zeros, (nonzero == 0).sum().to(torch.float64).reshape(1)]), True
            else:  # column / ids: each group's nonzero count is summed over the shards
                num_groups, counts, whole = structure.num_groups, torch.cat([zeros, nonzero]), False
        row = ParamSparsity(name, tuple(p.shape), kappa, kind, p.numel(), 0, 0, num_groups)
        rows.append(row)
        pending.append((p.device_mesh.get_group(), p.device, counts, row, whole))
    for group in {id(g): g for g, *_ in pending}.values():
        mine = [x for x in pending if x[0] is group]
        totals = AllReduce(group, mine[0][1]).sum([counts for _, _, counts, _, _ in mine])
        for (_, _, _, row, whole), total in zip(mine, totals):
            row.zeros = int(total[0])
            row.zero_groups = int(total[1]) if whole else int((total[1:] == 0).sum())
    return rows
