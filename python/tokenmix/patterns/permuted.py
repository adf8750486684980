"""Permuted block-sparse attention (PBS-Attn, arXiv 2510.21270): a segment-wise key permutation
that keeps causality, with block selection on the permuted key order.

For causal self-attention on ``T`` tokens, block size ``b`` and segment size ``S``
(a multiple of ``b``), following the authors' reference implementation
(github.com/xinghaow99/pbs-attn, ``pbs_attn/src``):

1. **Key permutation** (per batch and K/V head). With ``n = T // S`` complete segments: when
   ``n == 0`` or ``T == S`` the order is the identity. Otherwise the last ``b`` queries score
   the keys of the complete segments, ``a[t] = mean over those queries (and over the K/V head's
   query heads) of softmax_t'(scale * q . k_t')[t]`` for ``t < n*S`` (no causal mask, as PBS);
   within each complete segment the keys are sorted by decreasing ``a`` (ties: lower index
   first); the keys of the incomplete last segment keep their places.
   ``key_order[b, h, p]`` is the original index of the key at permuted position ``p``.
   Queries are not permuted (the reference implementation's choice; the output needs no
   unpermutation).
2. **Block selection** on the permuted keys, query block ``i`` (segment ``i // (S/b)``) and kv
   block ``j``: allowed when ``j``'s segment is earlier than ``i``'s; ``s[i, j] = scale *
   qbar_i . kbar_j`` (means over the blocks' valid tokens), ``p = softmax_j`` over the allowed
   blocks, averaged over the K/V head's query heads; the kept blocks are the smallest set of
   highest ``p`` (ties: lower index first) whose sum reaches ``threshold`` (all allowed blocks
   when ``threshold >= 1``).
3. **Always kept**: every block of the query block's own segment (the "diagonal segment",
   after the query block too: permuted keys there may precede the queries) and, with
   ``force_first``, the block that holds original key 0.
4. **Element rule**: query ``t`` keeps the key at permuted position ``p`` when
   ``key_order[p] <= t`` (causality on original positions). Blocks of earlier segments are full;
   diagonal-segment blocks are full, skipped or partial (a bitmask) by that rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._checks import as_int, require_bool, require_tensor, resolve_scale
from .._utils import accumulation_dtype
from ..block_sparse.layout import BlockLayout, MaskMod
from ._selection import block_pool, check_qk

__all__ = ["PermutedBlocks", "permuted_blocks", "permuted_blocks_mask_mod", "segment_key_order"]


def permuted_blocks_mask_mod(key_order: Tensor, heads_per_kv_head: int = 1) -> MaskMod:
    """Causality on original positions for keys in permuted order: query ``q_idx`` keeps the
    key at permuted position ``kv_idx`` when ``key_order[b, h // heads_per_kv_head, kv_idx] <=
    q_idx``. ``key_order`` is ``[B, H_kv, T]``; pass ``heads_per_kv_head = H / H_kv`` when
    ``h`` is a query head (FlexAttention), 1 when it is a K/V head (a per-K/V-head layout)."""
    require_tensor(key_order, "key_order")
    if key_order.dim() != 3:
        raise ValueError(f"key_order must be [B, H_kv, T], got shape {tuple(key_order.shape)}")
    group = as_int(heads_per_kv_head, "heads_per_kv_head")
    if group < 1:
        raise ValueError(f"heads_per_kv_head must be >= 1, got {group}")
    order = key_order.long()

    def permuted_blocks_causal(b, h, q_idx, kv_idx):
        return order[b, h // group, kv_idx] <= q_idx

    return permuted_blocks_causal


@torch.no_grad()
def segment_key_order(
    q: Tensor, k: Tensor, block_size: int, segment_size: int, *, scale: float | None = None
) -> Tensor:
    """Step 1 of :func:`permuted_blocks`: int64 ``[B, H_kv, T]`` original key index at each
    permuted position (see the module docstring)."""
    batch, length, kv_len, heads, kv_heads, dim = check_qk(q, k)
    block_size, segment_size = _check_sizes(block_size, segment_size)
    scale = resolve_scale(scale, dim)
    device = q.device
    identity = torch.arange(kv_len, device=device).expand(batch, kv_heads, kv_len)
    n = kv_len // segment_size
    if n == 0 or (n == 1 and kv_len == segment_size):
        return identity.contiguous()
    complete = n * segment_size
    acc = accumulation_dtype(q.dtype)
    group = heads // kv_heads
    last = q[:, max(length - block_size, 0) :].to(acc)  # [B, b, H, D]
    last = last.reshape(batch, last.shape[1], kv_heads, group, dim)
    keys = k[:, :complete].to(acc)  # [B, n*S, Hkv, D]
    logits = torch.einsum("bqkgd,btkd->bkgqt", last, keys) * scale
    a = torch.softmax(logits, dim=-1).mean(dim=(2, 3))  # [B, Hkv, n*S]
    a = a.view(batch, kv_heads, n, segment_size)
    within = torch.sort(a, dim=-1, descending=True, stable=True).indices
    starts = (torch.arange(n, device=device) * segment_size).view(1, 1, n, 1)
    order = (within + starts).view(batch, kv_heads, complete)
    return torch.cat([order, identity[..., complete:]], dim=-1).contiguous()


def _check_sizes(block_size, segment_size) -> tuple[int, int]:
    block_size = as_int(block_size, "block_size")
    segment_size = as_int(segment_size, "segment_size")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if segment_size < 1 or segment_size % block_size != 0:
        raise ValueError(
            f"segment_size ({segment_size}) must be a positive multiple of block_size "
            f"({block_size})"
        )
    return block_size, segment_size


@dataclass(frozen=True, eq=False)
class PermutedBlocks:
    """The result of :func:`permuted_blocks`.

    Attributes:
        key_order: int64 ``[B, H_kv, T]``: the original index of the key at each permuted
            position, per batch and K/V head.
        inverse: int64 ``[B, H_kv, T]``: the permuted position of each original key.
        layout: the :class:`tokenmix.BlockLayout` (batch ``B``, heads ``H_kv``) of the
            original-order queries against the permuted keys.
        block_size, segment_size: as given.
    """

    key_order: Tensor = field(repr=False)
    inverse: Tensor = field(repr=False)
    layout: BlockLayout
    block_size: int
    segment_size: int

    def _gather(self, x: Tensor, index: Tensor, name: str) -> Tensor:
        require_tensor(x, name)
        batch, kv_heads, length = index.shape
        if x.dim() != 4 or tuple(x.shape[:3]) != (batch, length, kv_heads):
            raise ValueError(
                f"{name} must be [B, T, H_kv, D] = [{batch}, {length}, {kv_heads}, D], got shape "
                f"{tuple(x.shape)}"
            )
        idx = index.transpose(1, 2).to(x.device).unsqueeze(-1).expand(x.shape)
        return torch.gather(x, 1, idx)

    def permute(self, x: Tensor) -> Tensor:
        """Keys or values ``[B, T, H_kv, D]`` in permuted order (per K/V head); differentiable,
        :meth:`unpermute` is its exact inverse."""
        return self._gather(x, self.key_order, "x")

    def unpermute(self, x: Tensor) -> Tensor:
        """Permuted order -> original order (``[B, T, H_kv, D]``)."""
        return self._gather(x, self.inverse, "x")

    def mask_mod(self, heads_per_kv_head: int = 1) -> MaskMod:
        """:func:`permuted_blocks_mask_mod` of this ``key_order``."""
        return permuted_blocks_mask_mod(self.key_order, heads_per_kv_head)


@torch.no_grad()
def permuted_blocks(
    q: Tensor,
    k: Tensor,
    block_size: int,
    segment_size: int,
    threshold: float = 0.9,
    *,
    force_first: bool = True,
    scale: float | None = None,
) -> PermutedBlocks:
    """PBS-Attn's permuted block-sparse layout for causal self-attention.

    Args:
        q: ``[B, T, H, D]`` queries; k: ``[B, T, H_kv, D]`` keys (``H % H_kv == 0``).
        block_size: the block size ``b`` (query and kv blocks).
        segment_size: the permutation segment ``S``, a multiple of ``b``.
        threshold: the block-selection mass in ``(0, 1]`` (PBS uses 0.9).
        force_first: always keep the block holding the first key (an attention sink).
        scale: the score scale (default ``D ** -0.5``).

    Returns:
        :class:`PermutedBlocks`: run ``tokenmix.block_sparse_attention(q, r.permute(k),
        r.permute(v), r.layout)`` for the attention output, in the original query order.

    Example::

        >>> import torch, tokenmix
        >>> q, k = torch.randn(1, 512, 4, 32), torch.randn(1, 512, 2, 32)
        >>> r = tokenmix.patterns.permuted_blocks(q, k, block_size=32, segment_size=128)
        >>> r.key_order.shape, r.layout.heads
        (torch.Size([1, 2, 512]), 2)
    """
    batch, length, kv_len, heads, kv_heads, dim = check_qk(q, k)
    if kv_len != length:
        raise ValueError(
            f"permuted_blocks is causal self-attention: q and k must have the same length, got "
            f"{length} and {kv_len}"
        )
    block_size, segment_size = _check_sizes(block_size, segment_size)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
    threshold = float(threshold)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    require_bool(force_first, "force_first")
    scale = resolve_scale(scale, dim)
    device = q.device
    key_order = segment_key_order(q, k, block_size, segment_size, scale=scale)
    inverse = torch.argsort(key_order, dim=-1)

    # Step 2: block scores on the permuted keys, per K/V head (mean over its query heads).
    group = heads // kv_heads
    nb = -(-length // block_size)
    per_seg = segment_size // block_size
    seg = torch.arange(nb, device=device) // per_seg
    allowed = seg.view(1, -1) < seg.view(-1, 1)  # [nq, nk]: kv segment earlier
    perm_k = torch.gather(k, 1, key_order.transpose(1, 2).unsqueeze(-1).expand(k.shape))
    qbar = block_pool(q, block_size, "mean").reshape(batch, kv_heads, group, nb, dim)
    kbar = block_pool(perm_k, block_size, "mean")  # [B, Hkv, nk, D]
    s = torch.einsum("bkgid,bkjd->bkgij", qbar, kbar) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0).mean(2)  # [B, Hkv, nq, nk]
    if threshold >= 1.0:
        selected = allowed.expand(p.shape)
    else:
        sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
        reach = torch.cumsum(sorted_p, dim=-1) >= threshold
        n_keep = torch.where(reach.any(-1), reach.int().argmax(-1) + 1, 0)
        ranks = torch.arange(nb, device=device)
        keep_sorted = ranks.view(1, 1, 1, -1) < n_keep.unsqueeze(-1)
        selected = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted) & allowed

    # Step 3: the diagonal segment and the block holding key 0.
    diagonal = seg.view(1, -1) == seg.view(-1, 1)
    keep = selected | diagonal
    if force_first:
        first = inverse[..., 0] // block_size  # [B, Hkv]
        keep = keep | (torch.arange(nb, device=device) == first[..., None, None])

    # Step 4: full / partial / skipped by causality on the original key positions.
    pad = nb * block_size - length
    padded = torch.nn.functional.pad(key_order, (0, pad), value=-1) if pad else key_order
    kmax = padded.view(batch, kv_heads, nb, block_size).amax(-1)
    big = torch.iinfo(torch.int64).max
    kmin = torch.where(padded >= 0, padded, big).view(batch, kv_heads, nb, block_size).amin(-1)
    q_first = torch.arange(nb, device=device) * block_size
    q_last = torch.clamp(q_first + block_size, max=length) - 1
    full = kmax.unsqueeze(-2) <= q_first.view(-1, 1)
    empty = kmin.unsqueeze(-2) > q_last.view(-1, 1)
    status = torch.where(full, 2, 1) * (keep & ~empty)
    layout = BlockLayout.from_block_status(
        status.to(torch.int8), block_size=block_size, seq_lengths=(length, length)
    )
    if layout.kv_indices.shape[-1] > 0:
        # The bits of rule 4, once per partial block. The mask_mod is not kept on the layout:
        # it holds inside the partial blocks only, and to_block_mask() then derives a mask_mod
        # that is exact everywhere from the lists and the bits.
        bits = layout.with_mask_mod(permuted_blocks_mask_mod(key_order)).mask_bits
        layout = BlockLayout(
            layout.kv_num_blocks,
            layout.kv_indices,
            layout.full_kv_num_blocks,
            layout.full_kv_indices,
            block_size=block_size,
            seq_lengths=(length, length),
            mask_bits=bits,
        )
    return PermutedBlocks(
        key_order=key_order,
        inverse=inverse,
        layout=layout,
        block_size=block_size,
        segment_size=segment_size,
    )
