r"""Spread under ``torch.distributed``: a communicator for the one step, and DTensor helpers.

**DDP** (``DistributedDataParallel``): every rank holds whole parameters and the same all-reduced gradient, so
every rank computes the same update in one process's way (:class:`Local`); spread adds no collective.

**FSDP2** (``torch.distributed.fsdp.fully_shard``): a parameter is a DTensor sharded on dim 0 of a 1-D device
mesh. Its factors are DTensors laid out like it (``u`` of row groups sharded like the rows; ``u`` of column and
group-id groups, which span shards, replicated), so ``state_dict()`` holds sharded tensors that
``torch.distributed.checkpoint`` saves and reshards. The step is the one-process step on the local shards, with
:class:`AllReduce` as the communicator: the per-group sums of groups that span shards, and the non-finite
gradient counts (every rank raises, or none), are summed across ranks in one flat all-reduce per round. With a
per-parameter torch base and groups that span shards the step takes one round (it moves those groups' ``W``
first, see :mod:`spread_optim.step`); otherwise two. LBFGS under FSDP2 is refused (its line search and the
exact-zero pass's backtracking would have to agree across ranks).

**ZeRO** (``ZeroRedundancyOptimizer(params, optimizer_class=SpreadAdam, ...)``): each rank keeps the factors of
the parameters it owns, which is exact for per-parameter groups; ``share_groups`` is refused there (ZeRO may give
the parameters sharing a factor to different ranks).
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
import torch.distributed as dist


def _dtensor_cls():
    """``DTensor`` if ``torch.distributed.tensor`` is loaded (if not, no tensor can be one: importing it here
    would add seconds to ``import spread_optim``)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_dtensor(t) -> bool:
    if type(t) in _PLAIN:  # the common case, without a look-up
        return False
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t):
    """The local shard of a DTensor (a view: writing to it writes the DTensor), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(t) -> bool:
    """Sharded on dim 0 (as ``fully_shard`` shards)."""
    return is_dtensor(t) and t.placements[0].is_shard(0)


def like(local_tensor: torch.Tensor, template):
    """``local_tensor`` as a DTensor laid out as ``template`` (of which it is the local shard), or as is."""
    if not is_dtensor(template):
        return local_tensor
    return _dtensor_cls().from_local(local_tensor, template.device_mesh, template.placements, run_check=False,
                                     shape=template.shape, stride=template.stride())


def vector_like(u: torch.Tensor, template, rows: bool):
    """A per-group vector ``u`` laid out for ``template``: sharded like its rows (``rows``) or replicated."""
    if not is_dtensor(template):
        return u
    from torch.distributed.tensor import Replicate, Shard

    row_sharded = rows and is_sharded(template)
    n = template.shape[0] if row_sharded else u.shape[0]
    return _dtensor_cls().from_local(u, template.device_mesh, [Shard(0) if row_sharded else Replicate()],
                                     run_check=False, shape=(n,), stride=(1,))


def local_rows(p) -> tuple[int, int]:
    """``(offset, length)`` of this rank's dim-0 shard of ``p`` (the whole of a plain tensor)."""
    if not is_sharded(p):
        return 0, p.shape[0] if p.dim() else 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0], shape[0]


class Local:
    """One process (or DDP, where every rank is the same process): sums are already whole."""

    distributed = False

    def sum(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(parts)

    def max(self, value: float) -> float:
        return value

    def owns_replicated(self) -> bool:
        """Whether this rank counts replicated tensors in a sum over ranks (so that each counts once)."""
        return True


class AllReduce(Local):
    """Ranks of a process group, each holding dim-0 shards: sums over ranks, one flat all-reduce per call."""

    distributed = True

    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device

    def sum(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not parts:
            return []
        flat = torch.cat([x.reshape(-1).to(device=self.device, dtype=torch.float64) for x in parts])
        dist.all_reduce(flat, group=self.group)
        out, i = [], 0
        for x in parts:
            out.append(flat[i:i + x.numel()].reshape(x.shape).to(device=x.device, dtype=x.dtype))
            i += x.numel()
        return out

    def max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t)

    def owns_replicated(self) -> bool:
        return dist.get_rank(self.group) == 0


LOCAL = Local()


def communicator(named: Sequence[tuple[torch.Tensor, str]], multi_evaluation: bool) -> Local:
    """The communicator for sparse parameters ``(param, where)``: :data:`LOCAL` unless some are DTensors.

    Refuses layouts spread does not support: DTensors other than dim-0 shards (or replicas) of a 1-D mesh,
    several meshes, and multi-evaluation bases (LBFGS) on sharded parameters."""
    meshes, device = [], None
    for p, where in named:
        if not is_dtensor(p):
            continue
        mesh = p.device_mesh
        if mesh.ndim != 1 or not (p.placements[0].is_shard(0) or p.placements[0].is_replicate()):
            raise ValueError(
                f"{where}: spread supports DTensor parameters sharded on dim 0 of a 1-D device mesh (FSDP2's "
                f"fully_shard) or replicated, got placements {tuple(p.placements)} on a {mesh.ndim}-D mesh"
            )
        if multi_evaluation:
            raise ValueError(
                f"{where}: LBFGS (a base that evaluates the closure several times per step) is not supported on "
                "sharded parameters (FSDP2): its line search and spread's exact-zero pass would have to agree "
                "across ranks; use a per-parameter base (SGD, Adam, ...) or an unsharded model"
            )
        device = device or p.device
        if p.placements[0].is_shard(0) and all(m.get_group() is not mesh.get_group() for m in meshes):
            meshes.append(mesh)
    if len(meshes) > 1:
        raise ValueError("the sharded parameters of spread's sparse groups must share one device mesh")
    return AllReduce(meshes[0].get_group(), device) if meshes else LOCAL


def inside_zero() -> bool:
    """Whether the optimizer being built is the local optimizer of a ``ZeroRedundancyOptimizer``."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is None:
        return False
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return False
        if isinstance(frame.f_locals.get("self"), zero.ZeroRedundancyOptimizer):
            return True
        frame = frame.f_back
    return False


def check_not_zero_shared(where: str) -> None:
    """``share_groups`` cannot be split over ranks: refuse it under ZeRO, naming the alternatives."""
    if inside_zero():
        raise ValueError(
            f"{where}: 'share_groups'=True is not supported under ZeroRedundancyOptimizer (it may place the "
            "parameters that share a factor on different ranks); use FSDP2 (torch.distributed.fsdp.fully_shard) "
            "or DistributedDataParallel with the plain optimizer"
        )
