"""Launch tables for multi-tensor kernels: one launch covers many tensors of different sizes.

A kernel program handles ``BLOCK`` consecutive elements of one tensor. Two small device tables say
which: ``block_tensor[pid]`` (the tensor's row) and ``block_start[pid]`` (the first element). A third
table holds, per tensor, the raw addresses of everything the kernel reads or writes (gradient,
parameter, factors, base states), loaded inside the kernel and cast to typed pointers.

Why pointer tables (and not flat buffers or one launch per tensor): the gradients and the parameters
belong to the model, so packing them into flat buffers would cost an extra read and write of each per
step (16 of the 56 bytes per element of fused spread-Adam in fp32); one launch per tensor costs a
launch (~4 us on a GPU) per tensor, more than the arithmetic for the ~60 small tensors of a ResNet.
The tables are cached on the tuple of addresses: with PyTorch's caching allocator the gradients of
consecutive steps usually reuse the same addresses, so a step usually uploads nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64


def _cached(key, make):
    value = _CACHE.get(key)
    if value is None:
        value = make()
        _CACHE[key] = value
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return value


def block_table(numels: Sequence[int], block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_tensor int32, block_start int64)``: one entry per program, tensors in order."""

    def make():
        counts = [(n + block - 1) // block for n in numels]
        tensor_ids = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), torch.tensor(counts, dtype=torch.int64))
        starts = torch.cat([torch.arange(c, dtype=torch.int64) * block for c in counts]) if counts else torch.zeros(0, dtype=torch.int64)
        return tensor_ids.to(device), starts.to(device)

    return _cached(("blocks", tuple(numels), block, device), make)


def address(t: torch.Tensor | None) -> int:
    """The data address of ``t`` (0 for a slot the kernel never reads)."""
    return 0 if t is None else t.data_ptr()


def pointer_table(rows: Sequence[Sequence[torch.Tensor | None]], device: torch.device) -> torch.Tensor:
    """int64 ``(len(rows), len(rows[0]))`` table of addresses."""
    values = tuple(tuple(address(t) for t in row) for row in rows)
    return _cached(("pointers", values, device), lambda: torch.tensor(values, dtype=torch.int64, device=device))


def value_table(rows: Sequence[Sequence[float | int]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small per-tensor table of scalars (hyperparameters, flags), cached on its values."""
    values = tuple(tuple(row) for row in rows)
    return _cached(("values", values, dtype, device), lambda: torch.tensor(values, dtype=dtype, device=device))
