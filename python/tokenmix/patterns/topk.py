"""Dynamic top-k block selection from pooled block scores (NSA, SeerAttention).

Query block ``i`` covers queries ``[i*b, min((i+1)*b, Tq))`` and kv block ``j`` keys
``[j*b, min((j+1)*b, Tk))``. Query ``t`` sits at key position ``t + off`` with
``off = Tk - Tq`` (bottom-right alignment; 0 for self-attention).

**Scores** (:func:`topk_block_scores`, under ``torch.no_grad``, float32 or float64):

* ``qbar[b, h, i]``: the mean of ``q[b, t, h]`` over the valid queries of block ``i``;
* ``pooling='mean'`` (NSA with mean-pooled keys):
  ``s[b, h, i, j] = scale * qbar[b, h, i] . kbar[b, h // g, j]``, ``kbar`` the mean key of
  block ``j`` (``g = H / H_kv``);
* ``pooling='avg_maxmin'`` (SeerAttention's ``Qavg_Kmaxmin`` gate without its learned
  projection): ``s = scale * sum_d max(qbar_d * kmax_d, qbar_d * kmin_d)`` with ``kmax`` /
  ``kmin`` the per-channel max / min of block ``j``'s keys: the largest ``qbar . k`` any key of
  the block can reach (Quest's bound);
* ``p[b, h, i, :] = softmax_j(s[b, h, i, j])`` over the allowed blocks (below); a row without
  allowed blocks is all 0;
* ``group_heads=True`` (NSA): ``P[b, hk, i, j] = sum_{h : h // g == hk} p[b, h, i, j]``, one
  score per K/V head; ``group_heads=False``: ``P = p``, one per query head.

**Allowed, current, forced** (per query block ``i``, ``qf = i*b + off``, ``ql = last query of
block i + off``; ``last(j) = min((j+1)*b, Tk) - 1``):

* causal: allowed ``j <= L = floor(ql / b)``; full ``last(j) <= qf``; partial otherwise (the
  element rule ``k <= t + off``); ``F`` = the number of full blocks, ``C0 = min(F, L)``;
  current = ``[C0, L]``; local = ``[C0 - local, C0 - 1]``;
* not causal: every block is allowed and full; current = the blocks holding the positions
  ``[max(qf, 0), min(ql, Tk - 1)]`` (``C0..C1``, none when that range is empty); local =
  ``[C0 - local, C0 - 1]`` and ``[C1 + 1, C1 + local]``;
* forced = (current ∪ local ∪ ``{j < sinks}``) ∩ allowed.

**Selection**: the forced blocks, then the allowed blocks with the largest ``P`` (ties: the
lower block index first) until ``max(|forced|, min(topk, |allowed|))`` blocks are kept. Future
blocks are never kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import as_int, require_bool, require_tensor, resolve_scale
from ..block_sparse.layout import BlockLayout
from ..block_sparse.mask import ElementMask
from ._selection import block_pool, check_qk

__all__ = ["POOLINGS", "select_topk_blocks", "topk_block_scores", "topk_blocks"]

POOLINGS = ("mean", "avg_maxmin")


def _block_geometry(q_len: int, kv_len: int, block: int, causal: bool, device) -> dict:
    """Per query block: allowed / full / current ranges as ``[nq, nk]`` bool tables."""
    nq, nk = -(-q_len // block), -(-kv_len // block)
    off = kv_len - q_len
    i = torch.arange(nq, device=device)
    j = torch.arange(nk, device=device)
    qf = (i * block + off).view(-1, 1)
    ql = (torch.clamp((i + 1) * block, max=q_len) - 1 + off).view(-1, 1)
    last = (torch.clamp((j + 1) * block, max=kv_len) - 1).view(1, -1)
    jj = j.view(1, -1)
    if causal:
        big_l = torch.div(ql, block, rounding_mode="floor")
        allowed = jj <= big_l
        full = allowed & (last <= qf)
        n_full = full.sum(-1, keepdim=True)
        c0 = torch.minimum(n_full, big_l)
        c1 = big_l
        current = (jj >= c0) & (jj <= c1)
    else:
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=device)
        full = allowed
        lo, hi = qf.clamp(min=0), ql.clamp(max=kv_len - 1)
        c0 = torch.div(lo, block, rounding_mode="floor")
        c1 = torch.div(hi, block, rounding_mode="floor")
        current = (lo <= hi) & (jj >= c0) & (jj <= c1)
    return {
        "allowed": allowed,
        "full": full,
        "current": current,
        "c0": c0,
        "c1": c1,
        "nonempty": current.any(-1, keepdim=True),
    }


def _check_common(block_size, topk, sinks, local, causal) -> tuple[int, int, int, int]:
    block_size = as_int(block_size, "block_size")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    topk = as_int(topk, "topk")
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")
    sinks = as_int(sinks, "sinks")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    local = as_int(local, "local")
    if local < 0:
        raise ValueError(f"local must be >= 0, got {local}")
    require_bool(causal, "causal")
    return block_size, topk, sinks, local


@torch.no_grad()
def topk_block_scores(
    q: Tensor,
    k: Tensor,
    block_size: int,
    *,
    pooling: str = "mean",
    causal: bool = True,
    group_heads: bool = True,
    scale: float | None = None,
) -> Tensor:
    """The block scores ``P`` of :func:`topk_blocks` (see the module docstring): float32
    (float64 for float64 inputs) ``[B, H_kv or H, num_q_blocks, num_kv_blocks]``, 0 where a
    block is not allowed."""
    batch, q_len, kv_len, heads, kv_heads, dim = check_qk(q, k)
    block_size = as_int(block_size, "block_size")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    require_bool(causal, "causal")
    require_bool(group_heads, "group_heads")
    scale = resolve_scale(scale, dim)
    group = heads // kv_heads
    qbar = block_pool(q, block_size, "mean")  # [B, H, nq, D]
    qbar = qbar.reshape(batch, kv_heads, group, qbar.shape[2], dim)
    if pooling == "mean":
        kbar = block_pool(k, block_size, "mean")  # [B, Hkv, nk, D]
        s = torch.einsum("bkgid,bkjd->bkgij", qbar, kbar)
    else:
        kmax = block_pool(k, block_size, "max")
        kmin = block_pool(k, block_size, "min")
        s = torch.einsum("bkgid,bkjd->bkgij", qbar.clamp(min=0), kmax) - torch.einsum(
            "bkgid,bkjd->bkgij", (-qbar).clamp(min=0), kmin
        )
    s = s * scale
    geo = _block_geometry(q_len, kv_len, block_size, causal, q.device)
    s = s.masked_fill(~geo["allowed"], float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows without allowed blocks
    if group_heads:
        return p.sum(2)
    return p.flatten(1, 2)


@torch.no_grad()
def select_topk_blocks(
    scores: Tensor,
    topk: int,
    *,
    block_size: int,
    seq_lengths: tuple[int, int],
    sinks: int = 0,
    local: int = 0,
    causal: bool = True,
) -> BlockLayout:
    """The layout that keeps, per query block, the forced blocks and the best-scoring allowed
    blocks (see the module docstring) for any ``[B or 1, LH, num_q_blocks, num_kv_blocks]``
    ``scores`` (e.g. a learned gate's): the selection step of :func:`topk_blocks`."""
    require_tensor(scores, "scores")
    block_size, topk, sinks, local = _check_common(block_size, topk, sinks, local, causal)
    if not isinstance(seq_lengths, (tuple, list)) or len(seq_lengths) != 2:
        raise ValueError(f"seq_lengths must be (q_len, kv_len), got {seq_lengths!r}")
    q_len, kv_len = (as_int(x, "seq_lengths") for x in seq_lengths)
    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    if scores.dim() != 4 or tuple(scores.shape[2:]) != (nq, nk):
        raise ValueError(
            f"scores must be [B, heads, {nq}, {nk}] (query blocks x kv blocks), got shape "
            f"{tuple(scores.shape)}"
        )
    if not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be a floating tensor, got dtype {scores.dtype}")
    device = scores.device
    geo = _block_geometry(q_len, kv_len, block_size, causal, device)
    allowed = geo["allowed"]
    j = torch.arange(nk, device=device).view(1, -1)
    c0, c1 = geo["c0"], geo["c1"]
    forced = geo["current"] | (j < sinks)
    if local > 0:
        has = geo["nonempty"]
        forced = forced | (has & (j >= c0 - local) & (j < c0))
        if not causal:
            forced = forced | (has & (j > c1) & (j <= c1 + local))
    forced = forced & allowed
    key = torch.where(allowed, scores.float(), float("-inf"))
    key = torch.where(forced, float("inf"), key)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    n_forced = forced.sum(-1)
    n_allowed = allowed.sum(-1)
    keep_n = torch.maximum(n_forced, torch.clamp(n_allowed, max=topk))  # [nq]
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nk, device=device).expand_as(order).contiguous())
    selected = rank < keep_n.view(-1, 1)
    status = torch.where(geo["full"], 2, 1) * selected
    rule = ElementMask.causal(kv_len - q_len) if causal else None
    return BlockLayout.from_block_status(
        status.to(torch.int8),
        block_size=block_size,
        seq_lengths=(q_len, kv_len),
        element_mask=rule,
    )


@torch.no_grad()
def topk_blocks(
    q: Tensor,
    k: Tensor,
    block_size: int,
    topk: int,
    *,
    pooling: str = "mean",
    sinks: int = 0,
    local: int = 0,
    causal: bool = True,
    group_heads: bool = True,
    scale: float | None = None,
) -> BlockLayout:
    """Dynamic top-k block selection from pooled block scores (NSA / SeerAttention).

    Args:
        q: ``[B, Tq, H, D]`` queries; k: ``[B, Tk, H_kv, D]`` keys (``H % H_kv == 0``).
        block_size: query and kv block size ``b`` (also the layout's block size).
        topk: kv blocks kept per query block, forced ones included (more only when the
            forced blocks alone exceed it).
        pooling: ``'mean'`` (NSA, mean-pooled keys) or ``'avg_maxmin'`` (SeerAttention's
            mean-pooled queries with max/min-pooled keys, as an upper bound).
        sinks: the first ``sinks`` kv blocks are always kept (attention sinks).
        local: the ``local`` kv blocks before the current block(s) are always kept (and after
            them when ``causal=False``).
        causal: keys ``k <= t + Tk - Tq`` only; the current (diagonal) blocks are forced and
            partial with that rule, earlier blocks full, future blocks never kept.
        group_heads: one selection per K/V head from scores summed over its query heads (NSA;
            layout heads ``H_kv``), or one per query head (layout heads ``H``).
        scale: the score scale (default ``D ** -0.5``).

    Returns:
        A :class:`tokenmix.BlockLayout` with batch ``B`` and heads ``H_kv`` (``group_heads``)
        or ``H``. See the module docstring for the exact rule. No gradient flows through the
        selection; run :func:`tokenmix.block_sparse_attention` with the layout for that.

    Example::

        >>> import torch, tokenmix
        >>> q, k = torch.randn(1, 256, 4, 32), torch.randn(1, 256, 2, 32)
        >>> layout = tokenmix.patterns.topk_blocks(q, k, 32, topk=3, sinks=1)
        >>> layout.heads, layout.block_size, int((layout.kv_num_blocks
        ...     + layout.full_kv_num_blocks).max())
        (2, (32, 32), 3)
    """
    batch, q_len, kv_len, heads, kv_heads, dim = check_qk(q, k)
    block_size, topk, sinks, local = _check_common(block_size, topk, sinks, local, causal)
    scores = topk_block_scores(
        q,
        k,
        block_size,
        pooling=pooling,
        causal=causal,
        group_heads=group_heads,
        scale=scale,
    )
    return select_topk_blocks(
        scores,
        topk,
        block_size=block_size,
        seq_lengths=(q_len, kv_len),
        sinks=sinks,
        local=local,
        causal=causal,
    )
