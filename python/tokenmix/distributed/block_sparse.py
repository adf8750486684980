"""Block-sparse attention with the token dimension sharded across ranks.

Each rank holds a run of query blocks and a run of key blocks. Its queries attend only the key
blocks that its rows of the layout list (partial or full), so it fetches exactly those from
their owners and packs them, in ascending block order, into one compact K/V; the kernel then
takes all of a query's keys in one softmax, so the output and LSE are the single-process ones
with no partial results to merge. The compact layout keeps the blocks' classification; its
partial blocks get their element mask as bits, evaluated once from the global layout's exact
``mask_mod`` at the blocks' global positions (structured rules such as causal or document masks
refer to global positions, which the packing moves). In the backward, dK/dV of fetched blocks
go back to their owners, who add them to their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..block_sparse.args import as_layout, check_layout_device
from ..block_sparse.functional import block_sparse_attention as _local_block_sparse_attention
from ..block_sparse.layout import BlockLayout
from ._comm import RowExchange, all_gather_sizes, exchange_rows, group_rank_size, operator_scope
from .sharding import shard_bounds

__all__ = ["KeyBlockPlan", "block_sparse_attention", "key_block_plan"]


@dataclass(frozen=True)
class KeyBlockPlan:
    """For every rank: its query blocks, its key blocks and the key blocks its queries use."""

    q_bounds: list[tuple[int, int]]
    kv_bounds: list[tuple[int, int]]
    needed: list[Tensor]  # per rank, ascending global key-block indices
    kv_block: int
    kv_len: int

    def owner(self, block: int) -> int:
        start = block * self.kv_block
        for p, (a, b) in enumerate(self.kv_bounds):
            if a <= start < b:
                return p
        raise AssertionError(f"key block {block} has no owner")

    def block_rows(self, block: int) -> tuple[int, int]:
        start = block * self.kv_block
        return start, min(start + self.kv_block, self.kv_len)

    def exchange(self, rank: int) -> RowExchange:
        """The compact K/V of ``rank``: its needed blocks, in order, each at its length."""
        own_src, own_dst, recv = [], [], {}
        pos = 0
        for blk in self.needed[rank].tolist():
            s, e = self.block_rows(blk)
            p = self.owner(blk)
            dst = torch.arange(pos, pos + e - s)
            if p == rank:
                a = self.kv_bounds[rank][0]
                own_src.append(torch.arange(s - a, e - a))
                own_dst.append(dst)
            else:
                recv.setdefault(p, []).append(dst)
            pos += e - s
        send = {}
        a = self.kv_bounds[rank][0]
        for p, blocks in enumerate(self.needed):
            if p == rank:
                continue
            rows = [
                torch.arange(*self.block_rows(blk)) - a
                for blk in blocks.tolist()
                if self.owner(blk) == rank
            ]
            if rows:
                send[p] = torch.cat(rows)
        empty = torch.zeros(0, dtype=torch.int64)
        return RowExchange(
            pos,
            torch.cat(own_src) if own_src else empty,
            torch.cat(own_dst) if own_dst else empty,
            send,
            {p: torch.cat(d) for p, d in recv.items()},
        )


def _query_blocks(a: int, b: int, block: int) -> tuple[int, int]:
    """The query blocks of the token range ``[a, b)`` (none for an empty shard)."""
    return (a // block, -(-b // block)) if b > a else (0, 0)


def key_block_plan(layout: BlockLayout, q_sizes: list[int], kv_sizes: list[int]) -> KeyBlockPlan:
    """Which key blocks each rank's query blocks use (the union over the layout's batch and
    heads of their partial and full lists)."""
    qbs, kbs = layout.block_size
    q_bounds, kv_bounds = shard_bounds(q_sizes), shard_bounds(kv_sizes)
    for name, bounds, block, total in (
        ("q", q_bounds, qbs, layout.q_len),
        ("k", kv_bounds, kbs, layout.kv_len),
    ):
        if bounds[-1][1] != total:
            raise ValueError(
                f"the shards of {name} hold {bounds[-1][1]} tokens in all, but the layout's "
                f"length is {total}"
            )
        for a, b in bounds[1:]:
            if b > a and a % block != 0:  # an empty shard holds no block
                raise ValueError(
                    f"{name} shard boundaries must be multiples of the layout's block size "
                    f"{block} (a block must not straddle two ranks), got shard lengths "
                    f"{[e - s for s, e in bounds]}; tokenmix.distributed.shard_sizes(length, "
                    f"world_size, multiple_of={block}) gives such lengths"
                )
    used = layout.block_status() > 0  # [LB, LH, nq, nk]
    needed = []
    for a, b in q_bounds:
        rows = used[:, :, slice(*_query_blocks(a, b, qbs))]
        needed.append(rows.flatten(0, 2).any(0).nonzero().flatten().cpu())
    return KeyBlockPlan(q_bounds, kv_bounds, needed, kbs, layout.kv_len)


def _compact_layout(layout: BlockLayout, plan: KeyBlockPlan, rank: int) -> BlockLayout:
    """The layout of this rank's queries over its compact K/V."""
    qbs, kbs = layout.block_size
    a, b = plan.q_bounds[rank]
    blocks = plan.needed[rank].to(layout.device)
    status = layout.block_status()[:, :, slice(*_query_blocks(a, b, qbs))].index_select(3, blocks)
    em = layout.element_mask
    doc_batch = em.q_doc.shape[0] if em is not None and em.q_doc is not None else 1
    if doc_batch > status.shape[0]:  # per-batch documents: the bits differ per batch
        status = status.expand(doc_batch, *status.shape[1:])
    global_keep = layout.layout_mask_mod()

    def keep(bb, h, q_idx, kv_idx):
        k_abs = blocks[kv_idx // kbs] * kbs + kv_idx % kbs
        return global_keep(bb, h, q_idx + a, k_abs) & (k_abs < layout.kv_len)

    compact_len = sum(e - s for s, e in map(plan.block_rows, plan.needed[rank].tolist()))
    return BlockLayout.from_block_status(
        status.contiguous(),
        block_size=(qbs, kbs),
        seq_lengths=(b - a, compact_len),
        mask_bits_fn=keep,
    )


def _cached(layout: BlockLayout, key: tuple, build):
    cache = layout.__dict__.setdefault("_tokenmix_context_parallel", {})
    if key not in cache:
        if len(cache) >= 8:
            cache.pop(next(iter(cache)))
        cache[key] = build()
    return cache[key]


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: Any,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    group: dist.ProcessGroup | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`tokenmix.block_sparse_attention` with the token dimension sharded across ranks.

    Each rank passes its contiguous piece (dimension 1, ranks in order) of ``q`` and of
    ``k``/``v``, with shard boundaries on the layout's block boundaries
    (:func:`~tokenmix.distributed.shard_sizes` with ``multiple_of=block``), and the whole
    layout (a :class:`tokenmix.BlockLayout` or Flex ``BlockMask`` for the global lengths).
    Returns this rank's piece of the output (and LSE). Only the key blocks that this rank's
    query rows list travel.

    Example (under ``torchrun --nproc-per-node 2``)::

        import torch, torch.distributed as dist, tokenmix, tokenmix.distributed as tmd
        dist.init_process_group("gloo")
        layout = tokenmix.BlockLayout.from_element_mask(
            tokenmix.ElementMask.sliding_window(256), q_len=4096, kv_len=4096, block_size=128)
        x = torch.randn(1, 4096, 4, 64)
        q = k = v = tmd.shard(x, sizes=tmd.shard_sizes(4096, 2, multiple_of=128))
        out = tmd.block_sparse_attention(q, k, v, layout)
    """
    rank, _ = group_rank_size(group)
    layout = None

    def check():
        nonlocal layout
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor [B, T_shard, heads, head_dim]")
        if k.shape[:3] != v.shape[:3] or k.dtype != v.dtype or q.dtype != k.dtype:
            raise ValueError(
                f"k and v must be [B, Tk_shard, H_kv, D/Dv] tensors of q's dtype, got shapes "
                f"{tuple(k.shape)}, {tuple(v.shape)} and dtypes {q.dtype}, {k.dtype}, {v.dtype}"
            )
        layout = as_layout(block_mask, q.shape[0], q.shape[2])
        check_layout_device(layout, q)

    with operator_scope("block_sparse_attention"):
        ok = isinstance(q, Tensor) and isinstance(k, Tensor) and q.dim() == 4 and k.dim() == 4
        q_sizes = all_gather_sizes(q.shape[1] if ok else 0, group, check)
        kv_sizes = all_gather_sizes(k.shape[1], group)
        compact, exchange = _cached(
            layout,
            (tuple(q_sizes), tuple(kv_sizes), rank, q.device),
            lambda: _build(layout, q_sizes, kv_sizes, rank, q.device),
        )
        kv = exchange_rows(torch.cat([k, v], dim=-1), exchange, group)
        k_c, v_c = kv.split([k.shape[-1], v.shape[-1]], dim=-1)
        return _local_block_sparse_attention(
            q, k_c, v_c, compact, scale=scale, return_lse=return_lse
        )


def _build(layout, q_sizes, kv_sizes, rank, device):
    plan = key_block_plan(layout, q_sizes, kv_sizes)
    return _compact_layout(layout, plan, rank), plan.exchange(rank).to(device)
