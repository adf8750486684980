"""Neighborhood attention with the first spatial dimension sharded across ranks.

Each rank runs the ordinary fused operator on a *slab*: the rows ``[lo, hi)`` of the first
spatial dimension that cover its own queries and every key they reach. The slab holds this
rank's own rows, the halo rows its windows reach (received from their owners), and zeros
everywhere else; only the own queries' outputs are kept. The slab is chosen so that the
operator's window rule, evaluated on a grid of ``hi - lo`` rows, gives every own query
exactly its global window (same keys, same rpb offsets); :func:`_halo_plan` checks that
for each own query with :func:`~tokenmix.neighborhood.reference.window_bounds`, the
window rule's single source of truth. In the backward, the halo rows' dK/dV go back to
their owners, who add them to their own.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor

from .._utils import unit_feature_stride
from ..neighborhood import ops as na_ops
from ..neighborhood.args import (
    check_tensors,
    normalize_window_args,
    resolve_scale,
    spatial_rank,
)
from ..neighborhood.functional import BoolOrTuple, IntOrTuple, require_kernels
from ..neighborhood.reference import window_bounds
from ._comm import (
    RowExchange,
    all_gather_sizes,
    exchange_rows,
    group_rank_size,
    operator_scope,
)
from .sharding import shard_bounds

__all__ = ["HaloPlan", "halo_plan", "neighborhood_attention"]


class HaloPlan:
    """Per rank: the slab ``[lo, hi)`` and the rows of other ranks it reads (the halo)."""

    def __init__(self, sizes: tuple[int, ...], slabs: list[tuple[int, int]], needed: list[Tensor]):
        self.sizes = sizes
        self.slabs = slabs
        self.bounds = shard_bounds(list(sizes))
        # halo[r][p]: the global rows rank r reads from rank p (ascending).
        self.halo: list[dict[int, Tensor]] = []
        for r, rows in enumerate(needed):
            a, b = self.bounds[r]
            outside = rows[(rows < a) | (rows >= b)]
            per_owner = {}
            for p, (pa, pb) in enumerate(self.bounds):
                mine = outside[(outside >= pa) & (outside < pb)]
                if p != r and mine.numel() > 0:
                    per_owner[p] = mine
            self.halo.append(per_owner)

    def halo_rows(self, rank: int) -> int:
        """Rows rank ``rank`` receives."""
        return sum(int(x.numel()) for x in self.halo[rank].values())

    def exchange(self, rank: int) -> RowExchange:
        a, b = self.bounds[rank]
        lo, hi = self.slabs[rank]
        send = {}
        for p, per_owner in enumerate(self.halo):
            if p != rank and rank in per_owner:
                send[p] = per_owner[rank] - a
        recv = {p: rows - lo for p, rows in self.halo[rank].items()}
        own = torch.arange(b - a, dtype=torch.int64)
        return RowExchange(hi - lo, own, own + (a - lo), send, recv)


def _window_keys(length: int, kernel: int, stride: int, dilation: int, causal: bool):
    """Per query: first key row and key count (the window is every ``dilation``-th row)."""
    start, end = window_bounds(length, kernel, stride, dilation, causal)
    i = torch.arange(length, dtype=torch.int64)
    return start * dilation + i % dilation, end - start


def _needed_rows(a: int, b: int, first: Tensor, count: Tensor, dilation: int) -> Tensor:
    """The rows that queries ``[a, b)`` read, with their own rows."""
    length = first.numel()
    mark = torch.zeros(length, dtype=torch.bool)
    mark[a:b] = True
    span = int(count[a:b].max()) if b > a else 0
    for j in range(span):  # a kernel-sized loop over window slots, vectorized over queries
        live = count[a:b] > j
        mark[(first[a:b] + j * dilation)[live]] = True
    return mark.nonzero().flatten()


def _slab_is_exact(lo, hi, a, b, first, count, kernel, stride, dilation, causal) -> bool:
    """Whether the window rule on ``hi - lo`` rows gives queries ``[a, b)`` their global
    windows (the rpb offsets follow: they are differences of the same rows)."""
    if hi - lo < kernel * dilation:
        return False  # the operator needs kernel * dilation rows
    local_first, local_count = _window_keys(hi - lo, kernel, stride, dilation, causal)
    sl = slice(a - lo, b - lo)
    return bool(
        torch.equal(local_first[sl] + lo, first[a:b]) and torch.equal(local_count[sl], count[a:b])
    )


def _pick_slab(a, b, rows, length, first, count, kernel, stride, dilation, causal):
    """The smallest candidate slab that holds ``rows`` and keeps the windows exact. The whole
    dimension always is (offset 0), so the search ends."""
    lo, hi = int(rows.min()), int(rows.max()) + 1
    period = dilation * stride  # residues and stride groups repeat with this period
    aligned_lo = lo - lo % period
    # Causal windows with a stride start where their stride group's last query (its leader)
    # puts them, which may lie past ``b``: the slab then reaches up to one period further.
    candidates = [
        (c_lo, min(length, hi + extra)) for extra in range(period + 1) for c_lo in (lo, aligned_lo)
    ]
    candidates += [(0, hi), (lo, length), (aligned_lo, length)]
    need = kernel * dilation
    for c_lo, c_hi in candidates:
        if c_hi - c_lo < need:  # grow to the operator's minimum, upwards first
            c_hi = min(length, c_lo + need)
            c_lo = c_hi - need
        if _slab_is_exact(c_lo, c_hi, a, b, first, count, kernel, stride, dilation, causal):
            return c_lo, c_hi
    return 0, length


@functools.lru_cache(maxsize=64)
def halo_plan(
    sizes: tuple[int, ...], kernel: int, stride: int, dilation: int, causal: bool
) -> HaloPlan:
    """The slabs and halos of every rank for shards of these ``sizes`` along a dimension
    with this window rule (cached: it depends on shapes only)."""
    length = sum(sizes)
    first, count = _window_keys(length, kernel, stride, dilation, causal)
    slabs, needed = [], []
    for a, b in shard_bounds(list(sizes)):
        rows = _needed_rows(a, b, first, count, dilation)
        slabs.append(_pick_slab(a, b, rows, length, first, count, kernel, stride, dilation, causal))
        needed.append(rows)
    return HaloPlan(sizes, slabs, needed)


def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: float | None = None,
    rpb: Tensor | None = None,
    additional_keys: Tensor | None = None,
    additional_values: Tensor | None = None,
    return_lse: bool = False,
    *,
    group: dist.ProcessGroup | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`tokenmix.neighborhood_attention` with the first spatial dimension sharded.

    Each rank passes its contiguous piece of ``q``, ``k`` and ``v`` along dimension 1 (ranks
    in order; pieces may differ in length, each at least one row), and the whole ``rpb`` and
    additional tokens. Window arguments refer to the whole (global) grid. Returns this
    rank's piece of the output (and LSE), equal to the single-process operator's. Only the
    halo rows the windows reach travel, in both directions. ``rpb`` and the additional
    tokens are used like parameters: each rank's gradient is its share, and the sum over the
    ranks is the single-process gradient.

    Example (run under ``torchrun --nproc-per-node 2``)::

        import torch, torch.distributed as dist, tokenmix.distributed as tmd
        dist.init_process_group("gloo")
        x = torch.randn(1, 64, 64, 4, 32)           # the same on every rank here
        q = k = v = tmd.shard(x, dim=1)             # this rank's 32 rows
        out = tmd.neighborhood_attention(q, k, v, kernel_size=7)
    """
    rank, _ = group_rank_size(group)
    shaped = isinstance(q, Tensor) and q.dim() in (4, 5, 6)
    dims = q.dim() - 3 if shaped else 0

    def check() -> None:  # everything this rank can check alone, before any communication
        spatial_rank(q)
        check_tensors(q, k, v, dims, None, additional_keys, additional_values)
        big = (1 << 30, *q.shape[2 : 1 + dims])  # the whole first dimension is not known yet
        kernel = normalize_window_args(dims, big, kernel_size, stride, dilation, is_causal)[0]
        check_tensors(q, k, v, dims, rpb, additional_keys, additional_values, kernel_size=kernel)
        resolve_scale(scale, q.shape[-1])
        require_kernels(q, v)

    with operator_scope("neighborhood_attention"):
        sizes = tuple(all_gather_sizes(q.shape[1] if shaped else 0, group, check))
        if min(sizes) < 1:
            raise ValueError(
                f"every rank must hold at least one row of q's dimension 1, got shard lengths "
                f"{list(sizes)}"
            )
        spatial = (sum(sizes), *q.shape[2 : 1 + dims])
        window = normalize_window_args(dims, spatial, kernel_size, stride, dilation, is_causal)
        window = (*window, resolve_scale(scale, q.shape[-1]))
        kernel, strides, dilations, causal, _ = window
        plan = halo_plan(sizes, kernel[0], strides[0], dilations[0], bool(causal[0]))
        lo, hi = plan.slabs[rank]
        a, b = plan.bounds[rank]
        exchange = plan.exchange(rank).to(q.device)
        kv = exchange_rows(torch.cat([k, v], dim=-1), exchange, group)
        k_slab, v_slab = kv.split([k.shape[-1], v.shape[-1]], dim=-1)
        q_slab = _pad_rows(q, a - lo, hi - b)
        out, lse = _SlabAttention.apply(
            q_slab,
            k_slab,
            v_slab,
            rpb,
            additional_keys,
            additional_values,
            window,
            (a - lo, b - lo),
        )
    out, lse = out[:, a - lo : b - lo], lse[:, a - lo : b - lo]
    return (out, lse) if return_lse else out


class _SlabAttention(torch.autograd.Function):
    """The fused operator on the slab, whose backward ignores the padding rows. Their saved
    LSE is ``-inf`` (the kernels' "attended nothing": no gradient flows back through a row),
    so a zero query never carries anything back, not even the NaN of a non-finite key that
    its slab window reaches and its true window does not."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, ek, ev, window, own):
        out, lse = na_ops.forward(q, k, v, rpb, ek, ev, window)
        pad = torch.ones(q.shape[1], dtype=torch.bool, device=q.device)
        pad[own[0] : own[1]] = False
        shape = (1, -1) + (1,) * (lse.dim() - 2)
        saved_lse = lse.masked_fill(pad.view(shape), float("-inf"))
        saved_out = out.masked_fill(pad.view(*shape, 1), 0)
        saved = [unit_feature_stride(t) for t in (q, k, v)]
        ctx.save_for_backward(*saved, saved_out, saved_lse, rpb, ek, ev)
        ctx.window = window
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        grads = na_ops.backward(grad_out, grad_lse, ctx.saved_tensors, ctx.window)
        return (*grads, None, None)


def _pad_rows(x: Tensor, before: int, after: int) -> Tensor:
    parts = [x]
    if before:
        parts.insert(0, x.new_zeros(x.shape[0], before, *x.shape[2:]))
    if after:
        parts.append(x.new_zeros(x.shape[0], after, *x.shape[2:]))
    return torch.cat(parts, dim=1) if len(parts) > 1 else x
