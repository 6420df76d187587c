"""Sparsity structures: which entries of a parameter form one L1 / group-lasso group.

A structure is data, not code. Each sparse parameter gets a :class:`GroupStructure` that knows two
things, enough for every update rule:

* ``reduce(x)`` sums a tensor of the parameter's shape over each group, giving one value per group
  (shape ``(num_groups,)``);
* ``expand(u)`` broadcasts one value per group back to the parameter's shape.

``"element"`` sparsity has no groups (every entry is its own group) and is handled without a structure.
``"row"`` groups are slices along dim 0 (output neurons, conv filters), ``"column"`` slices along dim 1
(input features, input channels), and an integer tensor of group ids (the parameter's shape) names the
groups explicitly.
"""

from __future__ import annotations

import torch

SPARSITY_KINDS = ("element", "row", "column")


def describe(sparsity) -> str:
    """A short human-readable name of a sparsity spec (for reports and messages)."""
    if isinstance(sparsity, torch.Tensor):
        return "ids"
    return str(sparsity)


def validate_spec(sparsity, where: str) -> None:
    """Raise ValueError/TypeError unless ``sparsity`` is a known kind or an integer tensor of ids."""
    if isinstance(sparsity, torch.Tensor):
        if sparsity.dtype.is_floating_point or sparsity.dtype.is_complex or sparsity.dtype == torch.bool:
            raise TypeError(f"{where}: 'sparsity' group ids must be an integer tensor, got dtype {sparsity.dtype}")
    elif not isinstance(sparsity, str) or sparsity not in SPARSITY_KINDS:
        raise ValueError(
            f"{where}: unknown 'sparsity' {sparsity!r}; expected one of {SPARSITY_KINDS} "
            "or an integer tensor of group ids"
        )


def validate_sparsity(sparsity, param: torch.Tensor, where: str) -> None:
    """Raise ValueError/TypeError when ``sparsity`` does not fit ``param``; ``where`` names the group."""
    validate_spec(sparsity, where)
    if isinstance(sparsity, torch.Tensor):
        if sparsity.device.type == "meta" and param.device.type != "meta":
            raise ValueError(f"{where}: 'sparsity' group ids are on the meta device (no values), the parameter on {param.device}")
        if tuple(sparsity.shape) != tuple(param.shape):
            raise ValueError(
                f"{where}: 'sparsity' group ids have shape {tuple(sparsity.shape)}, "
                f"but the parameter has shape {tuple(param.shape)}"
            )
        if sparsity.numel() and int(sparsity.min()) < 0:
            raise ValueError(f"{where}: 'sparsity' group ids must be >= 0")
        return
    if sparsity == "row" and param.dim() < 1:
        raise ValueError(f"{where}: 'sparsity'='row' needs a parameter with >= 1 dim, got a scalar")
    if sparsity == "column" and param.dim() < 2:
        raise ValueError(
            f"{where}: 'sparsity'='column' needs a parameter with >= 2 dims, got shape {tuple(param.shape)}"
        )


class GroupStructure:
    """Groups of one parameter: ``theta[group j] = u[j] * W[group j]``."""

    def __init__(self, sparsity, shape: torch.Size, device: torch.device):
        self.shape = torch.Size(shape)
        self.kind = describe(sparsity)
        self.ids = None
        if self.kind == "row":
            self.dim = 0
        elif self.kind == "column":
            self.dim = 1
        elif self.kind == "ids":
            # compact the ids to 0..G-1 so that every group has at least one member
            _, inverse = torch.unique(sparsity.to(device), return_inverse=True)
            self.ids = inverse.reshape(-1)
            self.dim = None
        else:
            raise ValueError(f"no group structure for sparsity {sparsity!r}")
        self.num_groups = self.shape[self.dim] if self.dim is not None else int(self.ids.max()) + 1 if self.ids.numel() else 0
        self._other_dims = [d for d in range(len(self.shape)) if d != self.dim]

    def rows(self, start: int, length: int) -> "GroupStructure":
        """The structure of the slice ``[start, start+length)`` along dim 0 (a dim-0 shard, as FSDP2 keeps):
        for ``"row"`` the groups of those rows; otherwise every group, of which the slice holds a part
        (``reduce`` then gives the slice's part of each group's sum)."""
        part = object.__new__(GroupStructure)
        part.__dict__.update(self.__dict__)
        part.shape = torch.Size([length, *self.shape[1:]])
        if self.kind == "row":
            part.num_groups = length
        elif self.ids is not None:
            part.ids = self.ids.reshape(self.shape)[start:start + length].reshape(-1)
        return part

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` (parameter-shaped) over each group: shape ``(num_groups,)``."""
        if self.ids is not None:
            out = torch.zeros(self.num_groups, dtype=x.dtype, device=x.device)
            return out.index_add_(0, self.ids, x.reshape(-1))
        if not self._other_dims:
            return x.clone()
        return x.sum(dim=self._other_dims)

    def expand(self, u: torch.Tensor) -> torch.Tensor:
        """``u`` (one value per group) broadcast to the parameter's shape (a view where possible)."""
        if self.ids is not None:
            return u[self.ids].reshape(self.shape)
        view = [1] * len(self.shape)
        view[self.dim] = self.shape[self.dim]
        return u.reshape(view)
