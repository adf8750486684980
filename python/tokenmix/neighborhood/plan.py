"""The planner: the tile schedule of neighborhood attention, as the kernels run it.

:func:`plan` reports, for a problem (spatial shape and window arguments) and a query
tile shape, how many query tiles the fused kernels process per (batch, head), which
key box each tile visits, and three pair counts per (batch, head):

* ``useful_pairs``: query-key pairs inside the windows (the work attention needs),
* ``computed_pairs``: pairs the tiled kernel computes, i.e. every tile's rows
  (padding included) times the keys of its key box,
* ``chunked_pairs``: the pairs the CUDA forward computes: each key box cut into
  chunks of ``key_chunk`` keys (the kernels linearize the box and take it 64 keys at
  a time for fp16/bf16, 32 for float32), in which the mma.sync kernels' warps skip
  the 16-key groups none of their 16 rows keeps, and the sm_90a (wgmma) kernel
  computes every chunk whole (``whole_chunk_pairs``; see ``cuda_forward``),
* ``dense_pairs``: ``tokens ** 2``, what dense attention computes.

The numbers come from ``torch.ops.tokenmix.na_plan`` (csrc/neighborhood/na_plan_ops.cpp),
which calls the same C++ header functions the kernels use
(``csrc/include/tokenmix/neighborhood_schedule.h``), so there is one definition of the
schedule. See docs/neighborhood_attention.md ("Planner").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .. import _ops
from .._checks import as_int, int_tuple
from .args import MAX_SPATIAL_LENGTH, normalize_window_args

__all__ = ["NeighborhoodPlan", "PlanFlops", "plan", "wgmma_break_even"]

# The query-tile volume of the CUDA kernels (queries per tile).
DEFAULT_TILE_VOLUME = 64
# Keys per chunk of the CUDA fp16/bf16 kernels (E::kKeys in cuda/warp_gemm.h; 32 for float32).
DEFAULT_KEY_CHUNK = 64
# The op's limit on tiles (it keeps the schedule's 32-bit arithmetic in range, as
# MAX_SPATIAL_LENGTH does for the input): far beyond any real tile.
_MAX_TILE = 1 << 20

_TILE_ROWS = ("group", "first", "count", "key_begin", "key_end")


class PlanFlops(NamedTuple):
    """Forward FLOPs per (batch, head): ``2 * (D + Dv)`` per query-key pair."""

    useful: int
    computed: int
    dense: int


def _x(values: Sequence[Any]) -> str:
    return "x".join(str(int(v)) for v in values)


@dataclass(frozen=True)
class NeighborhoodPlan:
    """The tile schedule of one neighborhood-attention problem (see :func:`plan`).

    Pair counts are per (batch, head); every field is a plain Python value, so plans
    compare, hash and pickle like tuples.
    """

    input_shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    tile_shape: tuple[int, ...]
    num_query_tiles: int
    useful_pairs: int
    computed_pairs: int
    dense_pairs: int
    key_chunk: int
    chunked_pairs: int
    whole_chunk_pairs: int
    cuda_forward: str | None

    @property
    def rank(self) -> int:
        """Number of spatial dimensions (1, 2 or 3)."""
        return len(self.input_shape)

    @property
    def tokens(self) -> int:
        """Tokens per (batch, head): the product of ``input_shape``."""
        return math.prod(self.input_shape)

    @property
    def flop_bound(self) -> float:
        """``dense_pairs / useful_pairs``: the upper bound on the speedup over dense
        attention that the FLOPs allow (a kernel computing only the useful pairs)."""
        return self.dense_pairs / self.useful_pairs

    @property
    def tile_bound(self) -> float:
        """``dense_pairs / computed_pairs``: the same bound at tile granularity, for a
        kernel that computes whole tiles times whole key boxes (as tokenmix's do)."""
        return self.dense_pairs / self.computed_pairs

    @property
    def tile_efficiency(self) -> float:
        """``useful_pairs / computed_pairs``: the fraction of computed pairs that count."""
        return self.useful_pairs / self.computed_pairs

    @property
    def chunk_efficiency(self) -> float:
        """``useful_pairs / chunked_pairs``: the fraction of the pairs that the CUDA
        forward (``cuda_forward``) computes that count."""
        return self.useful_pairs / self.chunked_pairs

    def flops(self, head_dim: int, value_dim: int | None = None) -> PlanFlops:
        """Forward FLOPs per (batch, head) as ``PlanFlops(useful, computed, dense)``.

        Each pair costs ``2 * head_dim`` FLOPs for ``QK^T`` and ``2 * value_dim`` for
        ``PV`` (``value_dim`` defaults to ``head_dim``). Multiply by ``B * H`` for a whole
        call.
        """
        d = as_int(head_dim, "head_dim")
        dv = d if value_dim is None else as_int(value_dim, "value_dim")
        if d < 1:
            raise ValueError(f"head_dim must be >= 1, got {d}")
        if dv < 1:
            raise ValueError(f"value_dim must be >= 1, got {dv}")
        per_pair = 2 * (d + dv)
        return PlanFlops(
            self.useful_pairs * per_pair,
            self.computed_pairs * per_pair,
            self.dense_pairs * per_pair,
        )

    def query_tiles(self) -> torch.Tensor:
        """The query tiles, an int64 tensor ``[num_query_tiles, 5, rank]``.

        Row ``r`` of tile ``i`` is, per spatial dimension: ``r = 0`` the dilation group,
        ``1`` the first query, ``2`` the number of queries (the tile shape, less at the
        end of a dimension), ``3`` / ``4`` the key box ``[key_begin, key_end)`` the tile
        visits. Queries and keys are in dilation-group coordinates: group coordinate
        ``c`` is the real coordinate ``group + c * dilation``. Tiles are listed in the
        kernels' order (dilation groups outermost, then tiles in row-major order).
        """
        problem = (self.input_shape, self.kernel_size, self.stride, self.dilation, self.is_causal)
        *_, tiles = _run_op(problem, self.tile_shape, DEFAULT_TILE_VOLUME, self.key_chunk, True, 0)
        return tiles

    def _chunking(self) -> str:
        if self.cuda_forward is None:
            return "whole key boxes"
        return f"CUDA forward ({self.cuda_forward})"

    def summary(self) -> str:
        """A few readable lines: the problem, the tiles and the bounds."""
        causal = "no" if not any(self.is_causal) else "x".join(str(int(c)) for c in self.is_causal)
        return "\n".join(
            [
                f"NeighborhoodPlan: input {_x(self.input_shape)}, kernel {_x(self.kernel_size)}, "
                f"stride {_x(self.stride)}, dilation {_x(self.dilation)}, causal {causal}",
                f"  query tiles: {self.num_query_tiles} of {_x(self.tile_shape)} "
                f"({math.prod(self.tile_shape)} queries) per batch-head",
                f"  pairs per batch-head: useful {self.useful_pairs:,}, computed "
                f"{self.computed_pairs:,}, dense {self.dense_pairs:,}",
                f"  flop bound (dense/useful) {self.flop_bound:.4g}x, tile bound "
                f"(dense/computed) {self.tile_bound:.4g}x, tile efficiency "
                f"{100 * self.tile_efficiency:.1f}%",
                f"  {self._chunking()}, {self.key_chunk}-key chunks: computed "
                f"{self.chunked_pairs:,}, efficiency {100 * self.chunk_efficiency:.1f}%",
            ]
        )

    def __str__(self) -> str:
        return self.summary()


def _run_op(
    problem: tuple[tuple[int, ...], ...],
    tile_shape: tuple[int, ...],
    tile_volume: int,
    key_chunk: int,
    tiles: bool,
    wgmma_head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.tokenmix.na_plan`` on ``(input_shape, kernel, stride, dilation, causal)``."""
    shape, kernel, stride, dilation, causal = problem
    _ops.require_library()
    return torch.ops.tokenmix.na_plan(
        list(shape),
        list(kernel),
        list(stride),
        list(dilation),
        [int(c) for c in causal],
        list(tile_shape),
        tile_volume,
        key_chunk,
        tiles,
        wgmma_head_dim,
    )


def _input_shape(input_shape: Any) -> tuple[int, ...]:
    if isinstance(input_shape, Sequence) and not isinstance(input_shape, (str, bytes)):
        if not 1 <= len(input_shape) <= 3:
            raise ValueError(
                "input_shape must be the spatial shape, 1 to 3 ints (no batch or head "
                f"dimensions), got {tuple(input_shape)!r}"
            )
        shape = int_tuple(input_shape, "input_shape", len(input_shape))
    else:
        shape = (as_int(input_shape, "input_shape"),)
    if any(n < 1 for n in shape):
        raise ValueError(f"input_shape must be >= 1 in every dimension, got {shape}")
    if any(n > MAX_SPATIAL_LENGTH for n in shape):
        raise ValueError(f"input_shape must be <= 2**30 in every dimension, got {shape}")
    if math.prod(shape) ** 2 >= 2**63:
        raise ValueError(f"input_shape {shape} is too large: tokens**2 must fit in int64")
    return shape


def plan(
    input_shape: int | Sequence[int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
    *,
    tile_shape: int | Sequence[int] | None = None,
    tile_volume: int = DEFAULT_TILE_VOLUME,
    key_chunk: int = DEFAULT_KEY_CHUNK,
    head_dim: int | None = None,
    value_dim: int | None = None,
    compute_capability: tuple[int, int] | None = None,
) -> NeighborhoodPlan:
    """Plans neighborhood attention over ``input_shape`` the way the fused kernels run it.

    ``input_shape`` is the spatial shape only (an int for 1-D, or 1 to 3 ints, without
    batch and heads); ``kernel_size``, ``stride``, ``dilation`` and ``is_causal`` are
    those of :func:`tokenmix.neighborhood_attention` and are checked the same way.

    Queries are processed in tiles: boxes of ``tile_shape`` queries of one dilation
    group. By default the tile shape is the one the CUDA kernels choose: ``tile_volume``
    queries (a power of two) split into a power of two per dimension so that the
    fewest pairs are computed. An explicit ``tile_shape`` (any positive ints, one per
    dimension or one for all) is analysed as given and ``tile_volume`` is ignored.
    ``key_chunk`` is the kernel's key granularity for ``chunked_pairs``: 64 (the CUDA
    fp16/bf16 kernels, the default), 32 (CUDA float32); 1 gives ``computed_pairs``.

    ``compute_capability`` (``torch.cuda.get_device_capability()``), ``head_dim`` and
    ``value_dim`` (default ``head_dim``) name the device and head dims the CUDA forward
    runs with, for the kernels' own tiles (no ``tile_shape``, ``tile_volume`` 64). On
    compute capability 9.0 with 64-key chunks (fp16/bf16) and ``head_dim == value_dim``
    in 32, 64 or 128, the launcher chooses between the mma.sync kernels and the sm_90a
    (wgmma) kernel, which computes whole chunks at a lower cost per chunk: it takes the
    wgmma kernel when the mma.sync kernels' pairs are at least
    ``wgmma_break_even(head_dim)`` times the whole chunks' pairs. The plan makes the same
    choice and reports it in ``cuda_forward``, with ``chunked_pairs`` counted for that
    kernel. Without ``compute_capability`` it describes the mma.sync kernels, which
    every other device runs. What the plan cannot see: a build without sm_90a code and
    K/V views whose heads span 2**31 elements or more keep the mma.sync kernels, and
    ``$TOKENMIX_WGMMA`` (0 or 1) overrides the launcher. ``cuda_forward`` is None for
    a ``key_chunk`` no kernel uses (not a multiple of 16).

    Example::

        >>> import tokenmix
        >>> p = tokenmix.plan(32768, kernel_size=2048)
        >>> p.tile_shape, p.flop_bound
        ((64,), 16.0)
    """
    shape = _input_shape(input_shape)
    rank = len(shape)
    kernel, strides, dils, causal = normalize_window_args(
        rank, shape, kernel_size, stride, dilation, is_causal
    )
    volume = as_int(tile_volume, "tile_volume")
    if not 1 <= volume <= _MAX_TILE or volume & (volume - 1):
        raise ValueError(f"tile_volume must be a power of two between 1 and 2**20, got {volume}")
    tiles: tuple[int, ...] = ()
    if tile_shape is not None:
        tiles = int_tuple(tile_shape, "tile_shape", rank)
        if any(t < 1 for t in tiles):
            raise ValueError(f"tile_shape must be >= 1 in every dimension, got {tiles}")
        if any(t > _MAX_TILE for t in tiles):
            raise ValueError(f"tile_shape must be <= 2**20 in every dimension, got {tiles}")

    chunk = as_int(key_chunk, "key_chunk")
    if not 1 <= chunk <= _MAX_TILE:
        raise ValueError(f"key_chunk must be between 1 and 2**20, got {chunk}")
    wgmma_dim = _wgmma_head_dim(
        head_dim,
        value_dim,
        compute_capability,
        chunk,
        tile_shape is not None or volume != DEFAULT_TILE_VOLUME,
    )
    problem = (shape, kernel, strides, dils, causal)
    chosen, counts, _ = _run_op(problem, tiles, volume, chunk, False, wgmma_dim)
    num_tiles, useful, computed, dense, chunked, whole, took_wgmma = counts.tolist()
    return NeighborhoodPlan(
        input_shape=shape,
        kernel_size=kernel,
        stride=strides,
        dilation=dils,
        is_causal=causal,
        tile_shape=tuple(chosen.tolist()),
        num_query_tiles=num_tiles,
        useful_pairs=useful,
        computed_pairs=computed,
        dense_pairs=dense,
        key_chunk=chunk,
        chunked_pairs=chunked,
        whole_chunk_pairs=whole,
        cuda_forward=(None if chunk % _GROUP_KEYS else "wgmma" if took_wgmma else "mma.sync"),
    )


# The head dims the sm_90a forward is instantiated for (D = Dv), and its key chunk.
WGMMA_HEAD_DIMS = (32, 64, 128)
_WGMMA_KEY_CHUNK = 64
# Keys per group that the mma.sync kernels' warps skip (a kernel's chunk is a multiple of it).
_GROUP_KEYS = 16


def _wgmma_head_dim(
    head_dim: Any, value_dim: Any, compute_capability: Any, key_chunk: int, own_tiles: bool
) -> int:
    """The head dim for the sm_90a choice, or 0 where the wgmma kernel cannot run."""
    dims = {}
    for name, value in (("head_dim", head_dim), ("value_dim", value_dim)):
        if value is not None:
            dims[name] = as_int(value, name)
            if dims[name] < 1:
                raise ValueError(f"{name} must be >= 1, got {dims[name]}")
    if compute_capability is None:
        if dims:
            raise ValueError(
                f"{' and '.join(dims)} only matter with compute_capability (the device the "
                "CUDA forward runs on)"
            )
        return 0
    if (
        isinstance(compute_capability, (str, bytes))
        or not hasattr(compute_capability, "__len__")
        or len(compute_capability) != 2
    ):
        raise ValueError(
            "compute_capability must be (major, minor), as torch.cuda.get_device_capability() "
            f"gives, got {compute_capability!r}"
        )
    cc = int_tuple(tuple(compute_capability), "compute_capability", 2)
    if "head_dim" not in dims:
        raise ValueError(
            "plan() needs head_dim with compute_capability: the CUDA forward's kernel depends on it"
        )
    if own_tiles:
        raise ValueError(
            "compute_capability describes the CUDA forward, which uses its own tiles: leave "
            "tile_shape and tile_volume at their defaults"
        )
    d = dims["head_dim"]
    if cc != (9, 0) or key_chunk != _WGMMA_KEY_CHUNK or dims.get("value_dim", d) != d:
        return 0
    return d if d in WGMMA_HEAD_DIMS else 0


def wgmma_break_even(head_dim: int) -> float:
    """The threshold of the compute capability 9.0 choice: the sm_90a (wgmma) forward
    is taken when the mma.sync kernels' pairs (warp groups) are at least this times the
    whole chunks' pairs. It is the wgmma kernel's cost per 64-key chunk relative to the
    mma.sync kernel's in the static SASS model, over a margin of 0.8 for what the model
    ignores (docs/cuda_engine.md). ``head_dim`` is 32, 64 or 128."""
    d = as_int(head_dim, "head_dim")
    if d not in WGMMA_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {WGMMA_HEAD_DIMS}, got {d}")
    _ops.require_library()
    return float(torch.ops.tokenmix.na_wgmma_break_even(d))
