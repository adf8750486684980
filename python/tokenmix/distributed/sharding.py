"""How tokenmix shards a token dimension across the ranks of a process group."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from .._checks import as_int
from ._comm import group_rank_size

__all__ = ["shard", "shard_bounds", "shard_sizes"]


def shard_sizes(length: int, world_size: int, multiple_of: int = 1) -> list[int]:
    """Balanced shard lengths: ``length`` split into ``world_size`` contiguous pieces, the
    first ones one unit longer where it does not divide. With ``multiple_of`` (a block
    size), every shard but the last is a multiple of it.

    >>> shard_sizes(10, 4)
    [3, 3, 2, 2]
    >>> shard_sizes(1000, 3, multiple_of=128)
    [384, 384, 232]
    """
    length, world_size = as_int(length, "length"), as_int(world_size, "world_size")
    multiple_of = as_int(multiple_of, "multiple_of")
    if world_size < 1 or multiple_of < 1 or length < 0:
        raise ValueError(
            f"need length >= 0, world_size >= 1 and multiple_of >= 1, got {length}, "
            f"{world_size}, {multiple_of}"
        )
    units = -(-length // multiple_of)
    base, extra = divmod(units, world_size)
    sizes, left = [], length
    for r in range(world_size):
        n = min(left, (base + (r < extra)) * multiple_of)
        sizes.append(n)
        left -= n
    return sizes


def shard_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of contiguous shards with these lengths."""
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    return bounds


def shard(
    x: Tensor,
    dim: int = 1,
    group: dist.ProcessGroup | None = None,
    sizes: list[int] | None = None,
) -> Tensor:
    """This rank's contiguous piece of a tensor every rank holds whole (a view, no copy):
    ``sizes`` (default :func:`shard_sizes`) along ``dim``. The distributed operators take
    such pieces, along dimension 1 (the first token/spatial dimension)."""
    rank, world = group_rank_size(group)
    sizes = shard_sizes(x.shape[dim], world) if sizes is None else list(sizes)
    if len(sizes) != world or sum(sizes) != x.shape[dim]:
        raise ValueError(
            f"sizes must have one length per rank ({world}) summing to x.shape[{dim}] = "
            f"{x.shape[dim]}, got {sizes}"
        )
    start, end = shard_bounds(sizes)[rank]
    return x.narrow(dim, start, end - start)
