"""``BlockLayout``: which key blocks each query block attends, and how partial blocks are masked.

The layout is FlexAttention's ``BlockMask`` in tokenmix's terms (and converts both ways):

* per (batch, head, query block): the *partial* kv blocks (``kv_num_blocks`` /
  ``kv_indices``), where an element rule decides per element, and the *full* kv blocks
  (``full_kv_num_blocks`` / ``full_kv_indices``), kept whole with no mask work;
* the block sizes ``(q_block, kv_block)`` and the sequence lengths ``(q_len, kv_len)``;
* the element rule of partial blocks: none (kept whole), an :class:`ElementMask` evaluated
  inside the kernels, and/or ``mask_bits``, one bit per element of each partial block (what a
  Flex ``mask_mod`` becomes, evaluated once per partial block).

The batch and head dimensions of the lists broadcast when their size is 1. Keys at or past
``kv_len`` are never kept, and a query row that keeps no key gets output 0 and LSE ``-inf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import as_int
from .mask import ElementMask

__all__ = ["BlockLayout", "MaskMod"]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# Upper bound (elements) on the index tensors of one mask_mod evaluation.
_EVAL_BUDGET = 1 << 24

# The smallest square a bitmask layout is refined into (see _refined_layout): the kernels' query
# tiles and key chunks are 64 wide, so finer squares would cost more than the bits they save.
_REFINE_MIN = 64
# Upper bound (entries) on the refined layout's dense block table, which building it holds
# about 40 bytes per entry of at once (int64 table and its sorts, the duplicate check, the
# q-side lists): 2^22 entries, for example T=65536 with 4 layout heads at g=64.
_REFINE_BUDGET = 1 << 22


def _refined_layout(layout: BlockLayout) -> BlockLayout | None:
    """The same mask as ``g x g`` blocks without bits, when every partial block's bits are whole
    ``g x g`` squares (each all kept or all dropped); None otherwise. ``g`` is the first of the
    smaller block size, its half, its quarter, ... (down to 64) that is a multiple of 32,
    divides both block sizes and both sequence lengths and whose squares are all whole. None
    too without bits, with an element rule next to them, or when the refined block table would
    exceed _REFINE_BUDGET entries.

    A Flex mask at BLOCK_SIZE 128 over a pattern of 64 x 64 blocks has every nonempty block
    partial: the kernels would read 2 KiB of bits per block on every call (12.6 MiB at T=8192
    for four heads at 10% density) to find what the refined layout lists as full blocks.
    """
    bits = layout.mask_bits
    if bits is None or layout.element_mask is not None or bits.shape[3] == 0:
        return None  # no bits, an element rule too, or no partial block anywhere
    qbs, kbs = layout.block_size
    lb, lh, nq, m = bits.shape[:4]
    used = torch.arange(m, device=bits.device) < layout.kv_num_blocks.unsqueeze(-1)
    g = min(qbs, kbs)
    while g >= _REFINE_MIN:
        fits = qbs % g == 0 and kbs % g == 0 and g % 32 == 0
        fits = fits and layout.q_len % g == 0 and layout.kv_len % g == 0
        fits = fits and lb * lh * (layout.q_len // g) * (layout.kv_len // g) <= _REFINE_BUDGET
        if fits:
            # [LB, LH, nq, M, rows, g, cols, g / 32]: square (i, j) of each partial slot.
            squares = bits.view(lb, lh, nq, m, qbs // g, g, kbs // g, g // 32)
            kept = (squares == -1).all(5).all(-1)  # [LB, LH, nq, M, rows, cols]
            dropped = (squares == 0).all(5).all(-1)
            if not bool((~(kept | dropped) & used[..., None, None]).any()):
                break  # every square all kept or all dropped
        g //= 2
    else:
        return None  # some square mixes kept and dropped elements at every size: bits needed
    rows, cols = qbs // g, kbs // g
    # Per (query block, kv block) and square: kept when the block is full, or partial with that
    # square kept; then [LB, LH, nq * rows, nk * cols], cut to the lengths.
    slots = layout.partial_slots()  # [LB, LH, nq, nk], -1 where not partial
    index = slots.clamp(min=0).long()[..., None, None].expand(*slots.shape, rows, cols)
    kept_here = kept.gather(3, index) & (slots >= 0)[..., None, None]
    full = (layout.block_status() == 2)[..., None, None]
    status = torch.where(full | kept_here, 2, 0).to(torch.int8)  # [LB, LH, nq, nk, rows, cols]
    status = status.permute(0, 1, 2, 4, 3, 5).reshape(lb, lh, nq * rows, -1)
    status = status[:, :, : layout.q_len // g, : layout.kv_len // g]
    return BlockLayout.from_block_status(
        status.contiguous(), block_size=g, seq_lengths=(layout.q_len, layout.kv_len)
    )


def _block_pair(block_size: Any) -> tuple[int, int]:
    """``(q_block, kv_block)`` of a ``block_size`` given as an int or a pair (the callers check
    the range)."""
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(
                f"block_size must be an int or (q_block, kv_block), got {block_size!r}"
            )
        q_block, kv_block = (as_int(x, "block_size") for x in block_size)
        return q_block, kv_block
    q_block = as_int(block_size, "block_size")
    return q_block, q_block


def _int_tensor(x: Any, name: str, dims: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")
    if x.numel() > 0 and x.dtype == torch.int64:
        # Checked before the cast: int32 would wrap 2**32 + 3 around to a valid-looking 3.
        lo, hi = int(x.min()), int(x.max())
        if lo < -(2**31) or hi >= 2**31:
            raise ValueError(f"{name} holds {lo if lo < -(2**31) else hi}, outside the int32 range")
    return x.to(torch.int32).contiguous()


def _check_lists(count: Tensor, index: Tensor, limit: int, count_name: str, index_name: str):
    if count.shape != index.shape[:3]:
        raise ValueError(
            f"{count_name} has shape {tuple(count.shape)} but {index_name} has shape "
            f"{tuple(index.shape)}: their first three dimensions must agree"
        )
    m = index.shape[3]
    if count.numel() > 0:
        lo, hi = int(count.min()), int(count.max())
        if lo < 0 or hi > m:
            raise ValueError(
                f"{count_name} holds {lo if lo < 0 else hi}, outside [0, {m}] ({index_name} "
                f"has {m} entries per row)"
            )
        if hi > limit:  # a kv block can be listed once per query block at most
            raise ValueError(f"{count_name} holds {hi}, more than the {limit} kv blocks")
    valid = torch.arange(m, device=index.device) < count.unsqueeze(-1)
    listed = index[valid]
    if listed.numel() > 0:
        lo, hi = int(listed.min()), int(listed.max())
        if lo < 0 or hi >= limit:
            raise ValueError(
                f"{index_name} holds block index {lo if lo < 0 else hi}, outside [0, {limit})"
            )
    return valid


def _transpose_lists(count: Tensor, index: Tensor, num_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row lists ``[LB, LH, R, M]`` -> column lists ``[LB, LH, num_cols, M']``: for each column,
    the rows that list it (ascending) and the slot each row lists it in."""
    lb_n, lh_n, rows, m = index.shape
    device = index.device
    valid = torch.arange(m, device=device) < count.unsqueeze(-1).long()
    lb, lh, r, slot = valid.nonzero(as_tuple=True)
    col = index[lb, lh, r, slot].long()
    group = (lb * lh_n + lh) * num_cols + col
    order = torch.argsort(group * max(rows, 1) + r)
    group, r, slot = group[order], r[order], slot[order]
    groups = lb_n * lh_n * num_cols
    ncount = torch.bincount(group, minlength=groups)
    start = torch.cumsum(ncount, 0) - ncount
    pos = torch.arange(group.numel(), device=device) - start[group]
    width = int(ncount.max()) if group.numel() > 0 else 0
    out_index = torch.zeros(groups, width, dtype=torch.int32, device=device)
    out_slot = torch.zeros(groups, width, dtype=torch.int32, device=device)
    out_index[group, pos] = r.to(torch.int32)
    out_slot[group, pos] = slot.to(torch.int32)
    shape = (lb_n, lh_n, num_cols)
    return (
        ncount.to(torch.int32).view(shape).contiguous(),
        out_index.view(*shape, width),
        out_slot.view(*shape, width),
    )


def _pack_bits(keep: Tensor, words: int) -> Tensor:
    """``[..., n]`` bools -> ``[..., words]`` int32, bit ``c % 32`` of word ``c // 32``."""
    n = keep.shape[-1]
    pad = words * 32 - n
    if pad:
        keep = torch.nn.functional.pad(keep, (0, pad))
    weights = torch.ones(32, dtype=torch.int64, device=keep.device) << torch.arange(
        32, device=keep.device
    )
    packed = (keep.view(*keep.shape[:-1], words, 32).long() * weights).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def _unpack_bit(words: Tensor, col: Tensor) -> Tensor:
    """Bit ``col`` of a packed row (``words`` already gathered at ``col // 32``)."""
    return ((words.long() & 0xFFFFFFFF) >> (col % 32)) & 1 == 1


def _is_noop(mask_mod: Any) -> bool:
    if mask_mod is None:
        return True
    try:
        from torch.nn.attention.flex_attention import noop_mask
    except ImportError:  # pragma: no cover - torch without FlexAttention
        return False
    return mask_mod is noop_mask


def _evaluate_mask_mod(mask_mod: MaskMod, b, h, q, k, shape) -> Tensor:
    """``mask_mod`` on broadcasting index tensors, falling back to torch.vmap for mask_mods
    written for scalar indices (as Flex evaluates them)."""
    try:
        out = mask_mod(b, h, q, k)
        if isinstance(out, Tensor) and out.dtype == torch.bool:
            return torch.broadcast_to(out, shape)
        problem = f"returned {type(out).__name__} {getattr(out, 'dtype', '')}, not a bool tensor"
    except Exception as exc:  # a mask_mod written for vmap only: try that
        problem = f"{type(exc).__name__}: {exc}"
        try:
            flat = [torch.broadcast_to(x, shape).reshape(-1) for x in (b, h, q, k)]
            out = torch.vmap(mask_mod)(*flat)
            if isinstance(out, Tensor) and out.dtype == torch.bool:
                return out.view(shape)
        except Exception as exc2:
            problem = f"{problem}; under torch.vmap: {type(exc2).__name__}: {exc2}"
    raise ValueError(f"mask_mod failed when evaluated on the partial blocks: {problem}")


class BlockLayout:
    """A block-sparse attention layout (see the module docstring).

    Args:
        kv_num_blocks: ``[LB, LH, num_q_blocks]`` counts of partial kv blocks.
        kv_indices: ``[LB, LH, num_q_blocks, M]`` their indices (entries past the count are
            ignored).
        full_kv_num_blocks, full_kv_indices: the same for full blocks (optional).
        block_size: ``(q_block, kv_block)``, or one int for both.
        seq_lengths: ``(q_len, kv_len)``; ``num_q_blocks`` must be ``ceil(q_len / q_block)``.
        element_mask: the structured rule of partial blocks (optional).
        mask_bits: int32 ``[LB, LH, num_q_blocks, M, q_block, ceil(kv_block / 32)]`` bitmask of
            each partial block (optional; see :meth:`from_block_mask`).
        mask_mod: the Flex ``mask_mod`` the bits came from, kept for :meth:`to_block_mask`.

    Example::

        >>> import torch, tokenmix
        >>> layout = tokenmix.BlockLayout.from_element_mask(
        ...     tokenmix.ElementMask.causal(), q_len=256, kv_len=256, block_size=64)
        >>> layout.kv_num_blocks.flatten().tolist(), layout.full_kv_num_blocks.flatten().tolist()
        ([1, 1, 1, 1], [0, 1, 2, 3])
    """

    # Set by from_element_mask: the blocks are the rule's own classification, so the rule's
    # mask_mod is exact everywhere (see to_block_mask).
    _blocks_follow_rule = False

    def __init__(
        self,
        kv_num_blocks: Tensor,
        kv_indices: Tensor,
        full_kv_num_blocks: Tensor | None = None,
        full_kv_indices: Tensor | None = None,
        *,
        block_size: int | tuple[int, int],
        seq_lengths: tuple[int, int],
        element_mask: ElementMask | None = None,
        mask_bits: Tensor | None = None,
        mask_mod: MaskMod | None = None,
    ) -> None:
        q_block, kv_block = _block_pair(block_size)
        if q_block < 1 or kv_block < 1 or q_block > 1 << 20 or kv_block > 1 << 20:
            raise ValueError(f"block_size must be in [1, 2^20], got ({q_block}, {kv_block})")
        if not isinstance(seq_lengths, (tuple, list)) or len(seq_lengths) != 2:
            raise ValueError(f"seq_lengths must be (q_len, kv_len), got {seq_lengths!r}")
        q_len, kv_len = (as_int(x, "seq_lengths") for x in seq_lengths)
        if q_len < 0 or kv_len < 0:
            raise ValueError(f"seq_lengths must be >= 0, got ({q_len}, {kv_len})")
        self.q_block, self.kv_block = q_block, kv_block
        self.q_len, self.kv_len = q_len, kv_len
        self.num_q_blocks = math.ceil(q_len / q_block)
        self.num_kv_blocks = math.ceil(kv_len / kv_block)

        count = _int_tensor(kv_num_blocks, "kv_num_blocks", 3)
        index = _int_tensor(kv_indices, "kv_indices", 4)
        if count.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"kv_num_blocks has {count.shape[2]} query blocks, but q_len {q_len} with "
                f"q_block {q_block} gives {self.num_q_blocks}"
            )
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must be given together")
        if full_kv_num_blocks is None:
            full_count = torch.zeros_like(count)
            full_index = torch.zeros(*count.shape, 0, dtype=torch.int32, device=count.device)
        else:
            full_count = _int_tensor(full_kv_num_blocks, "full_kv_num_blocks", 3)
            full_index = _int_tensor(full_kv_indices, "full_kv_indices", 4)
            if full_count.shape != count.shape:
                raise ValueError(
                    f"full_kv_num_blocks has shape {tuple(full_count.shape)}, kv_num_blocks "
                    f"{tuple(count.shape)}: they must agree"
                )
        for t, name in ((index, "kv_indices"), (full_count, "full_kv_num_blocks")):
            if t.device != count.device:
                raise ValueError(f"{name} must be on kv_num_blocks' device {count.device}")
        valid = _check_lists(count, index, self.num_kv_blocks, "kv_num_blocks", "kv_indices")
        full_valid = _check_lists(
            full_count, full_index, self.num_kv_blocks, "full_kv_num_blocks", "full_kv_indices"
        )
        # A kv block listed twice for one query block would be attended twice.
        nk = self.num_kv_blocks
        seen = torch.zeros(*count.shape, nk + 1, dtype=torch.int32, device=count.device)
        seen.scatter_add_(-1, torch.where(valid, index, nk).long(), valid.to(torch.int32))
        seen.scatter_add_(
            -1, torch.where(full_valid, full_index, nk).long(), full_valid.to(torch.int32)
        )
        if seen[..., :nk].numel() > 0 and int(seen[..., :nk].max()) > 1:
            raise ValueError(
                "a kv block is listed more than once for one query block (in kv_indices and/or "
                "full_kv_indices)"
            )
        self.kv_num_blocks, self.kv_indices = count, index
        self.full_kv_num_blocks, self.full_kv_indices = full_count, full_index

        if element_mask is not None:
            if not isinstance(element_mask, ElementMask):
                kind = type(element_mask).__name__
                raise TypeError(f"element_mask must be a tokenmix.ElementMask, got {kind}")
            element_mask.check_lengths(q_len, kv_len)
            element_mask = element_mask.to(count.device)
        self.element_mask = element_mask
        if mask_bits is not None:
            words = math.ceil(kv_block / 32)
            expect = (*index.shape, q_block, words)
            if not isinstance(mask_bits, Tensor) or mask_bits.dtype != torch.int32:
                raise ValueError("mask_bits must be an int32 tensor")
            if tuple(mask_bits.shape) != expect:
                raise ValueError(
                    f"mask_bits must have shape {expect} ([LB, LH, num_q_blocks, M, q_block, "
                    f"ceil(kv_block / 32)]), got {tuple(mask_bits.shape)}"
                )
            if mask_bits.device != count.device:
                raise ValueError(f"mask_bits must be on kv_num_blocks' device {count.device}")
        # Lists as wide as their longest row: Flex's BlockMask rows have num_kv_blocks entries
        # however few are used, and the bitmask and the kernels' slot tables scale with the
        # width (32 MiB of bits at T=8192 for a handful of partial blocks per row).
        width = int(count.max()) if count.numel() else 0
        if width < index.shape[-1]:
            index = index[..., :width].contiguous()
            self.kv_indices = index
            if mask_bits is not None:
                mask_bits = mask_bits[..., :width, :, :]
        full_width = int(full_count.max()) if full_count.numel() else 0
        if full_width < full_index.shape[-1]:
            self.full_kv_indices = full_index = full_index[..., :full_width].contiguous()
        if mask_bits is not None:
            mask_bits = mask_bits.contiguous()
        self.mask_bits = mask_bits
        self.mask_mod = mask_mod
        # The q-side lists of the backward (dK/dV), computed once here so that calls (and
        # compiled graphs) never do data-dependent work.
        self.q_num_blocks, self.q_indices, self.q_slots = _transpose_lists(count, index, nk)
        self.full_q_num_blocks, full_q_indices, _ = _transpose_lists(full_count, full_index, nk)
        self.full_q_indices = full_q_indices
        # The same mask in finer blocks without bits, when the bits allow it (_refined_layout),
        # built once here like the q-side lists: what the kernels run (kernel_layout).
        self._refined = _refined_layout(self)

    # ---- properties --------------------------------------------------------------------------

    @property
    def kernel_layout(self) -> BlockLayout:
        """The layout the kernels run: the same mask as blocks of ``g x g`` without bits when
        every partial block's bits are whole ``g x g`` squares (``g >= 64``; see
        docs/block_sparse_attention.md), else this layout."""
        return getattr(self, "_refined", None) or self

    @property
    def block_size(self) -> tuple[int, int]:
        return (self.q_block, self.kv_block)

    @property
    def seq_lengths(self) -> tuple[int, int]:
        return (self.q_len, self.kv_len)

    @property
    def batch(self) -> int:
        """The layout's batch size (1: broadcast over the batch)."""
        return self.kv_num_blocks.shape[0]

    @property
    def heads(self) -> int:
        """The layout's head count: 1 (broadcast over the heads), the query head count, or
        the k/v head count (each layout head serves its kv head's GQA group)."""
        return self.kv_num_blocks.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def __repr__(self) -> str:
        rule = []
        if self.element_mask is not None:
            rule.append("element_mask")
        if self.mask_bits is not None:
            rule.append("mask_bits")
        return (
            f"BlockLayout(batch={self.batch}, heads={self.heads}, seq_lengths={self.seq_lengths}, "
            f"block_size={self.block_size}, partial={int(self.kv_num_blocks.sum())}, "
            f"full={int(self.full_kv_num_blocks.sum())}, rule={'+'.join(rule) or 'none'})"
        )

    def to(self, device: torch.device | str) -> BlockLayout:
        """The same layout with its tensors on ``device``."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = BlockLayout(
            self.kv_num_blocks.to(device),
            self.kv_indices.to(device),
            self.full_kv_num_blocks.to(device),
            self.full_kv_indices.to(device),
            block_size=self.block_size,
            seq_lengths=self.seq_lengths,
            element_mask=self.element_mask.to(device) if self.element_mask is not None else None,
            mask_bits=self.mask_bits.to(device) if self.mask_bits is not None else None,
            mask_mod=self.mask_mod,
        )
        moved._blocks_follow_rule = self._blocks_follow_rule
        return moved

    # ---- dense views (tests, the reference, statistics) --------------------------------------

    def block_status(self) -> Tensor:
        """int8 ``[LB, LH, num_q_blocks, num_kv_blocks]``: 0 skipped, 1 partial, 2 full."""
        nk = self.num_kv_blocks
        status = torch.zeros(
            *self.kv_num_blocks.shape, nk + 1, dtype=torch.int8, device=self.device
        )
        for count, index, value in (
            (self.kv_num_blocks, self.kv_indices, 1),
            (self.full_kv_num_blocks, self.full_kv_indices, 2),
        ):
            valid = torch.arange(index.shape[-1], device=self.device) < count.unsqueeze(-1)
            status.scatter_(-1, torch.where(valid, index, nk).long(), value)
        return status[..., :nk]

    def partial_slots(self) -> Tensor:
        """int32 ``[LB, LH, num_q_blocks, num_kv_blocks]``: the slot of each partial block in
        its query block's list (-1 where the block is not partial)."""
        nk = self.num_kv_blocks
        slots = torch.full(
            (*self.kv_num_blocks.shape, nk + 1), -1, dtype=torch.int32, device=self.device
        )
        m = self.kv_indices.shape[-1]
        valid = torch.arange(m, device=self.device) < self.kv_num_blocks.unsqueeze(-1)
        src = torch.arange(m, dtype=torch.int32, device=self.device).expand_as(self.kv_indices)
        slots.scatter_(-1, torch.where(valid, self.kv_indices, nk).long(), src.contiguous())
        return slots[..., :nk]

    def element_keep(self, q: Tensor, k: Tensor, b: Tensor | None = None) -> Tensor:
        """Bool ``[LB', LH, len(q), len(k)]``: whether query ``q`` keeps key ``k`` (absolute
        int64 token indices) for each layout batch/head; ``LB'`` is the layout batch, or the
        document ids' batch when that is larger (then ``b`` indexes it)."""
        device = self.device
        q = q.to(device).long()
        k = k.to(device).long()
        status = self.block_status().long()
        qb, kb = q // self.q_block, k // self.kv_block
        st = status[:, :, qb][:, :, :, kb]  # [LB, LH, nq, nk]
        partial = st == 1
        if self.mask_bits is not None and self.mask_bits.shape[3] > 0:  # (else nothing partial)
            slot = self.partial_slots()[:, :, qb][:, :, :, kb].long().clamp_min(0)
            lb = torch.arange(self.batch, device=device).view(-1, 1, 1, 1)
            lh = torch.arange(self.heads, device=device).view(1, -1, 1, 1)
            rows = (q % self.q_block).view(1, 1, -1, 1)
            cols = (k % self.kv_block).view(1, 1, 1, -1)
            words = self.mask_bits[lb, lh, qb.view(1, 1, -1, 1), slot, rows, cols // 32]
            partial = partial & _unpack_bit(words, cols)
        keep_rule = torch.ones((), dtype=torch.bool, device=device)
        if self.element_mask is not None:
            em = self.element_mask
            doc_b = em.q_doc.shape[0] if em.q_doc is not None else 1
            bb = torch.arange(doc_b, device=device).view(-1, 1, 1, 1)
            keep_rule = em.keeps(bb, q.view(1, 1, -1, 1), k.view(1, 1, 1, -1))
        keep = (st == 2) | (partial & keep_rule)
        return keep & (k < self.kv_len).view(1, 1, 1, -1)

    def dense_mask(self) -> Tensor:
        """Bool ``[LB', LH, q_len, kv_len]``: the whole element mask (small problems only)."""
        return self.element_keep(
            torch.arange(self.q_len, device=self.device),
            torch.arange(self.kv_len, device=self.device),
        )

    def kept_pairs(self, batch: int = 1, heads: int = 1) -> int:
        """Kept (query, key) pairs over ``batch x heads`` (broadcast layouts count once per
        batch/head), counted in query chunks."""
        total = 0
        step = max(1, _EVAL_BUDGET // max(1, self.kv_len * self.batch * self.heads))
        ks = torch.arange(self.kv_len, device=self.device)
        for q0 in range(0, self.q_len, step):
            qs = torch.arange(q0, min(q0 + step, self.q_len), device=self.device)
            keep = self.element_keep(qs, ks)
            keep = keep.expand(
                batch if keep.shape[0] == 1 else keep.shape[0],
                heads if keep.shape[1] == 1 else keep.shape[1],
                *keep.shape[2:],
            )
            total += int(keep.sum())
        return total

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_element_mask(
        cls,
        element_mask: ElementMask,
        q_len: int,
        kv_len: int,
        block_size: int | tuple[int, int] = 128,
    ) -> BlockLayout:
        """The layout of a structured rule: blocks where the rule keeps every element are
        full, blocks where it may keep some are partial, the rest are skipped. Costs one
        evaluation per block, never per element."""
        if not isinstance(element_mask, ElementMask):
            raise TypeError(
                f"element_mask must be a tokenmix.ElementMask, got {type(element_mask).__name__}"
            )
        q_len, kv_len = as_int(q_len, "q_len"), as_int(kv_len, "kv_len")
        qbs, kbs = _block_pair(block_size)
        if qbs < 1 or kbs < 1:
            raise ValueError(f"block_size must be >= 1, got ({qbs}, {kbs})")
        element_mask.check_lengths(q_len, kv_len)
        device = element_mask.q_doc.device if element_mask.q_doc is not None else "cpu"
        nq, nk = math.ceil(q_len / qbs), math.ceil(kv_len / kbs)
        q0 = torch.arange(nq, device=device) * qbs
        q1 = torch.clamp(q0 + qbs, max=q_len)  # exclusive
        k0 = torch.arange(nk, device=device) * kbs
        k1 = torch.clamp(k0 + kbs, max=kv_len)
        q0, q1 = q0.view(1, -1, 1), q1.view(1, -1, 1)
        k0, k1 = k0.view(1, 1, -1), k1.view(1, 1, -1)
        any_keep = torch.ones(1, nq, nk, dtype=torch.bool, device=device)
        all_keep = torch.ones(1, nq, nk, dtype=torch.bool, device=device)
        em = element_mask
        if em.band is not None:
            lo, hi = em.band
            dmin, dmax = k0 - (q1 - 1), (k1 - 1) - q0  # k - q over the block, an interval
            band_any = (dmax >= lo) & (dmin <= hi)
            band_all = (dmin >= lo) & (dmax <= hi)
            if em.prefix > 0:
                # Any: the block's first key is a sink (causal: kept where d <= hi, and d is
                # smallest there). All: the keys below the prefix are all kept (causal: up to
                # hi) and the keys from the prefix on are all inside the band.
                p = em.prefix
                sink_any = k0 < p
                ks, kn = torch.clamp(k1, max=p), torch.clamp(k0, min=p)  # sinks [k0, ks)
                sinks_all = True
                if em.prefix_causal:
                    sink_any = sink_any & (dmin <= hi)
                    sinks_all = (ks <= k0) | ((ks - 1) - q0 <= hi)
                rest_all = (kn >= k1) | ((kn - (q1 - 1) >= lo) & (dmax <= hi))
                band_any = band_any | sink_any
                band_all = band_all | (sinks_all & rest_all)
            any_keep, all_keep = any_keep & band_any, all_keep & band_all
        if em.q_doc is not None:
            # Per-block min/max ids: overlapping ranges may share a document (exact for sorted
            # ids, conservative otherwise); a block pair is full when both hold one same id.
            def block_range(doc: Tensor, length: int, block: int, n: int):
                pad = n * block - length
                d = doc.long()
                lo = torch.nn.functional.pad(d, (0, pad), value=2**40).view(-1, n, block)
                hi = torch.nn.functional.pad(d, (0, pad), value=-(2**40)).view(-1, n, block)
                return lo.amin(-1), hi.amax(-1)

            qlo, qhi = block_range(em.q_doc, q_len, qbs, nq)
            klo, khi = block_range(em.kv_doc, kv_len, kbs, nk)
            qlo, qhi = qlo.unsqueeze(-1), qhi.unsqueeze(-1)
            klo, khi = klo.unsqueeze(-2), khi.unsqueeze(-2)
            doc_any = (qlo <= khi) & (klo <= qhi)
            doc_all = (qlo == qhi) & (klo == khi) & (qlo == klo)
            any_keep, all_keep = any_keep & doc_any, all_keep & doc_all
        status = torch.where(all_keep, 2, torch.where(any_keep, 1, 0)).unsqueeze(1)
        layout = cls.from_block_status(
            status, block_size=(qbs, kbs), seq_lengths=(q_len, kv_len), element_mask=em
        )
        layout._blocks_follow_rule = True  # only blocks the rule keeps nothing of are skipped
        return layout

    @classmethod
    def from_block_status(
        cls,
        status: Tensor,
        *,
        block_size: int | tuple[int, int],
        seq_lengths: tuple[int, int],
        element_mask: ElementMask | None = None,
        mask_bits_fn: MaskMod | None = None,
    ) -> BlockLayout:
        """From a dense ``[LB, LH, num_q_blocks, num_kv_blocks]`` block table: 0 skipped,
        1 partial, 2 full (a bool table means partial where true). ``mask_bits_fn``, a Flex
        ``mask_mod``, is evaluated once per partial block into ``mask_bits``."""
        if not isinstance(status, Tensor) or status.dim() != 4:
            raise ValueError("status must be a [LB, LH, num_q_blocks, num_kv_blocks] tensor")
        if status.dtype.is_floating_point or status.dtype.is_complex:
            raise ValueError(f"status must be a bool or integer tensor, got dtype {status.dtype}")
        # The table's width against the lengths (the layout's constructor checks the rest, but
        # would take a narrow table's missing columns as skipped blocks).
        q_block, kv_block = _block_pair(block_size)
        lengths = seq_lengths if isinstance(seq_lengths, (tuple, list)) else ()
        lengths = tuple(as_int(x, "seq_lengths") for x in lengths)
        # Sizes the constructor would refuse are left to its messages.
        if q_block >= 1 and kv_block >= 1 and len(lengths) == 2 and min(lengths) >= 0:
            q_len, kv_len = lengths
            want = (math.ceil(q_len / q_block), math.ceil(kv_len / kv_block))
            if tuple(status.shape[2:]) != want:
                raise ValueError(
                    f"status has {status.shape[2]} x {status.shape[3]} (query x kv) blocks, "
                    f"but seq_lengths {tuple(seq_lengths)} with block_size {block_size} give "
                    f"{want[0]} x {want[1]}"
                )
        status = status.to(torch.int64)
        if status.numel() > 0 and (int(status.min()) < 0 or int(status.max()) > 2):
            raise ValueError("status must hold 0 (skipped), 1 (partial) or 2 (full)")

        def lists(table: Tensor) -> tuple[Tensor, Tensor]:
            count = table.sum(-1).to(torch.int32)
            index = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True)
            width = int(count.max()) if count.numel() > 0 else 0
            return count.contiguous(), index[..., :width].to(torch.int32).contiguous()

        count, index = lists(status == 1)
        full_count, full_index = lists(status == 2)
        layout = cls(
            count,
            index,
            full_count,
            full_index,
            block_size=block_size,
            seq_lengths=seq_lengths,
            element_mask=element_mask,
        )
        if mask_bits_fn is not None and not _is_noop(mask_bits_fn):
            layout = layout.with_mask_mod(mask_bits_fn)
        return layout

    def with_mask_mod(self, mask_mod: MaskMod) -> BlockLayout:
        """This layout with ``mask_mod`` evaluated once per partial block into ``mask_bits``
        (cost proportional to the partial blocks, never q_len x kv_len). A ``mask_mod`` made by
        :meth:`ElementMask.mask_mod` becomes that structured rule instead."""
        rule = getattr(mask_mod, "_tokenmix_element_mask", None)
        if rule is not None:
            return BlockLayout(
                self.kv_num_blocks,
                self.kv_indices,
                self.full_kv_num_blocks,
                self.full_kv_indices,
                block_size=self.block_size,
                seq_lengths=self.seq_lengths,
                element_mask=rule,
                mask_mod=mask_mod,
            )
        if not callable(mask_mod):
            raise TypeError(f"mask_mod must be callable, got {type(mask_mod).__name__}")
        device = self.device
        qbs, kbs = self.block_size
        words = math.ceil(kbs / 32)
        m = self.kv_indices.shape[-1]
        bits = torch.zeros(*self.kv_indices.shape, qbs, words, dtype=torch.int32, device=device)
        valid = torch.arange(m, device=device) < self.kv_num_blocks.unsqueeze(-1)
        lb, lh, qb, slot = valid.nonzero(as_tuple=True)
        kb = self.kv_indices[lb, lh, qb, slot].long()
        rows = torch.arange(qbs, device=device)
        cols = torch.arange(kbs, device=device)
        step = max(1, _EVAL_BUDGET // (qbs * kbs))
        for s in range(0, lb.numel(), step):
            e = min(s + step, lb.numel())
            q_idx = (qb[s:e] * qbs).view(-1, 1, 1) + rows.view(1, -1, 1)
            kv_idx = (kb[s:e] * kbs).view(-1, 1, 1) + cols.view(1, 1, -1)
            inside = (q_idx < self.q_len) & (kv_idx < self.kv_len)
            shape = (e - s, qbs, kbs)
            with torch.no_grad():
                keep = _evaluate_mask_mod(
                    mask_mod,
                    lb[s:e].view(-1, 1, 1),
                    lh[s:e].view(-1, 1, 1),
                    q_idx.clamp(max=max(self.q_len - 1, 0)),
                    kv_idx.clamp(max=max(self.kv_len - 1, 0)),
                    shape,
                )
            bits[lb[s:e], lh[s:e], qb[s:e], slot[s:e]] = _pack_bits(keep & inside, words)
        return BlockLayout(
            self.kv_num_blocks,
            self.kv_indices,
            self.full_kv_num_blocks,
            self.full_kv_indices,
            block_size=self.block_size,
            seq_lengths=self.seq_lengths,
            mask_bits=bits,
            mask_mod=mask_mod,
        )

    @classmethod
    def from_block_mask(
        cls, block_mask: Any, *, batch: int | None = None, heads: int | None = None
    ) -> BlockLayout:
        """From a FlexAttention ``BlockMask``: its lists, block sizes and sequence lengths; its
        ``mask_mod`` is evaluated once per partial block (see :meth:`with_mask_mod`).

        Flex evaluates a ``mask_mod`` with the real batch and head indices even where the
        ``BlockMask`` broadcasts (``B`` or ``H`` of 1). Give ``batch`` / ``heads`` (the sizes of
        q) to get the same here: the lists are then expanded to those sizes before the
        ``mask_mod`` is evaluated (cost proportional to partial blocks x B x H). Without them a
        broadcast ``BlockMask``'s ``mask_mod`` is evaluated at batch 0 / head 0.
        :func:`tokenmix.block_sparse_attention` passes them.
        """
        try:
            from torch.nn.attention.flex_attention import BlockMask
        except ImportError as exc:  # pragma: no cover - torch without FlexAttention
            raise TypeError("this torch has no FlexAttention BlockMask") from exc
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a BlockMask, got {type(block_mask).__name__}")
        if block_mask.kv_num_blocks.dim() != 3:
            raise ValueError(
                "block_mask must have [B, H, num_q_blocks] lists, got kv_num_blocks of shape "
                f"{tuple(block_mask.kv_num_blocks.shape)}"
            )
        lists = [
            block_mask.kv_num_blocks,
            block_mask.kv_indices,
            block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices,
        ]
        mask_mod = block_mask.mask_mod
        generic = not _is_noop(mask_mod) and not hasattr(mask_mod, "_tokenmix_element_mask")
        lb, lh = lists[0].shape[:2]
        want_b = batch if generic and batch is not None and lb == 1 else lb
        want_h = heads if generic and heads is not None and lh == 1 else lh
        if (want_b, want_h) != (lb, lh):
            lists = [
                t.expand(want_b, want_h, *t.shape[2:]).contiguous() if t is not None else None
                for t in lists
            ]
        layout = cls(
            *lists,
            block_size=tuple(block_mask.BLOCK_SIZE),
            seq_lengths=tuple(block_mask.seq_lengths),
        )
        if _is_noop(mask_mod):
            return layout
        return layout.with_mask_mod(mask_mod)

    def layout_mask_mod(self) -> MaskMod:
        """A Flex ``mask_mod`` that is exact everywhere: the block lists (skipped, partial,
        full), the bitmask and the structured rule. Eager ``flex_attention`` and ``create_mask``
        evaluate a ``mask_mod`` on every element, so a rule that only holds inside the listed
        blocks would disagree with the layout there."""
        status = self.block_status()
        has_bits = self.mask_bits is not None and self.mask_bits.shape[3] > 0
        bits = self.bits_mask_mod() if has_bits else None
        rule = self.element_mask
        qbs, kbs = self.block_size
        batch, heads = self.batch, self.heads

        def layout_mod(b, h, q_idx, kv_idx):
            lb = b if batch > 1 else torch.zeros_like(b)
            lh = h if heads > 1 else torch.zeros_like(h)
            st = status[lb, lh, q_idx // qbs, kv_idx // kbs]
            partial = st == 1
            if bits is not None:
                partial = partial & bits(b, h, q_idx, kv_idx)
            if rule is not None:
                partial = partial & rule.keeps(b, q_idx, kv_idx)
            return (st == 2) | partial

        return layout_mod

    def bits_mask_mod(self) -> MaskMod:
        """A Flex ``mask_mod`` that reads ``mask_bits`` (for layouts built from raw bits)."""
        slots = self.partial_slots().long().clamp_min(0)
        bits = self.mask_bits
        qbs, kbs = self.block_size
        batch, heads = self.batch, self.heads

        def mask_bits_mod(b, h, q_idx, kv_idx):
            if bits.shape[3] == 0:  # no partial block anywhere
                return torch.zeros_like(q_idx + kv_idx, dtype=torch.bool)
            lb = b if batch > 1 else torch.zeros_like(b)
            lh = h if heads > 1 else torch.zeros_like(h)
            qb, kb = q_idx // qbs, kv_idx // kbs
            word = bits[lb, lh, qb, slots[lb, lh, qb, kb], q_idx % qbs, (kv_idx % kbs) // 32]
            return _unpack_bit(word, kv_idx % kbs)

        return mask_bits_mod

    def expand_heads(self, heads: int) -> BlockLayout:
        """This layout with ``heads`` heads: a layout with one head per k/v head (or one head)
        repeated over each GQA group of query heads. The bitmask is copied; a ``mask_mod`` is
        not kept (it was evaluated with kv-head indices), the bits stand for it."""
        heads = as_int(heads, "heads")
        if heads < 1 or heads % self.heads != 0:
            raise ValueError(f"heads ({heads}) must be a multiple of the layout's {self.heads}")
        if heads == self.heads:
            return self
        group = heads // self.heads

        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat_interleave(group, dim=1)

        return BlockLayout(
            rep(self.kv_num_blocks),
            rep(self.kv_indices),
            rep(self.full_kv_num_blocks),
            rep(self.full_kv_indices),
            block_size=self.block_size,
            seq_lengths=self.seq_lengths,
            element_mask=self.element_mask,
            mask_bits=rep(self.mask_bits),
            mask_mod=self.mask_mod if self.mask_bits is None else None,
        )

    def to_block_mask(self, heads: int | None = None) -> Any:
        """The equivalent FlexAttention ``BlockMask``. Flex wants 1 or H (query) heads: give
        ``heads`` to expand a layout with one head per k/v head (:meth:`expand_heads`)."""
        from torch.nn.attention.flex_attention import BlockMask

        if heads is not None and self.heads > 1:
            layout = self.expand_heads(heads)
            if layout is not self:
                return layout.to_block_mask()

        nk = self.num_kv_blocks

        def wide(index: Tensor) -> Tensor:  # Flex expects num_kv_blocks entries per row
            index = index[..., :nk]
            pad = nk - index.shape[-1]
            return torch.nn.functional.pad(index, (0, pad)).contiguous() if pad else index

        if self.mask_mod is not None:
            mask_mod = self.mask_mod  # the caller's own (a round trip gives it back)
        elif self.mask_bits is None and self.element_mask is not None and self._blocks_follow_rule:
            mask_mod = self.element_mask.mask_mod()  # exact, and tagged as the structured rule
        else:
            mask_mod = self.layout_mask_mod()
        return BlockMask.from_kv_blocks(
            self.kv_num_blocks,
            wide(self.kv_indices),
            self.full_kv_num_blocks,
            wide(self.full_kv_indices),
            BLOCK_SIZE=self.block_size,
            mask_mod=mask_mod,
            seq_lengths=self.seq_lengths,
        )
