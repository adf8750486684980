"""Packed documents (FlashAttention varlen ``cu_seqlens``) and prefix-LM masks.

Both are structured rules evaluated inside the kernels (:class:`tokenmix.ElementMask`): no
bitmask, full blocks wherever a block pair lies inside one document (or inside the prefix /
below the diagonal).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..block_sparse.layout import BlockLayout, MaskMod
from ..block_sparse.mask import UNBOUNDED, ElementMask
from ._common import (
    DEFAULT_BLOCK_SIZE,
    as_device,
    check_block_size,
    check_causal,
    check_length,
    layout_from_tables,
    nonnegative_int,
    positive_int,
    structured_layout,
    with_name,
)

__all__ = ["document", "document_mask_mod", "prefix_lm", "prefix_lm_mask_mod"]


def _offsets(cu_seqlens: Sequence[int] | Tensor) -> list[int]:
    if isinstance(cu_seqlens, Tensor):
        if cu_seqlens.dim() != 1:
            raise ValueError(
                f"cu_seqlens must be one-dimensional, got shape {tuple(cu_seqlens.shape)}"
            )
        if (
            cu_seqlens.dtype.is_floating_point
            or cu_seqlens.dtype.is_complex
            or cu_seqlens.dtype == torch.bool
        ):
            raise ValueError(f"cu_seqlens must hold integers, got dtype {cu_seqlens.dtype}")
        cu_seqlens = cu_seqlens.tolist()
    if isinstance(cu_seqlens, (str, bytes)) or not isinstance(cu_seqlens, Sequence):
        raise TypeError(
            f"cu_seqlens must be a sequence or 1-D tensor of ints, got {type(cu_seqlens).__name__}"
        )
    cu = [nonnegative_int(x, f"cu_seqlens[{i}]") for i, x in enumerate(cu_seqlens)]
    if len(cu) < 2:
        raise ValueError(f"cu_seqlens must have at least 2 entries (0 and the end), got {cu}")
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    for a, b in zip(cu, cu[1:], strict=False):
        if b < a:
            raise ValueError(f"cu_seqlens must be non-decreasing, got {a} then {b}")
    if cu[-1] < 1:
        raise ValueError("cu_seqlens must hold at least one token (its last entry is 0)")
    return cu


def _document_rule(cu_seqlens, causal, window, T, device) -> tuple[ElementMask, int]:
    cu = _offsets(cu_seqlens)
    causal = check_causal(causal)
    total = cu[-1]
    T = total if T is None else check_length(T)
    if T < total:
        raise ValueError(f"T ({T}) must be >= cu_seqlens[-1] ({total}), the packed length")
    band = None
    if window is not None:
        window = positive_int(window, "window")
        band = (-(window - 1), 0 if causal else window - 1)
    elif causal:
        band = (-UNBOUNDED, 0)
    bounds = torch.tensor(cu[1:], dtype=torch.int64, device=device)
    ids = torch.searchsorted(bounds, torch.arange(T, device=device), right=True)
    # Padding past cu_seqlens[-1]: ids no document has, different for queries and keys, so
    # padding keeps nothing and is kept by nothing (still ascending, so block ranges stay tight).
    docs = len(cu) - 1
    pad = torch.arange(T, device=device) >= total
    q_doc = torch.where(pad, docs, ids)
    kv_doc = torch.where(pad, docs + 1, ids)
    return ElementMask(band=band, q_doc=q_doc, kv_doc=kv_doc), T


def document_mask_mod(
    cu_seqlens: Sequence[int] | Tensor,
    causal: bool = False,
    window: int | None = None,
    *,
    T: int | None = None,
    device: torch.device | str | None = None,
) -> MaskMod:
    """The Flex ``mask_mod`` of :func:`document` (same arguments and rule); it is
    :meth:`ElementMask.mask_mod`, so a ``BlockMask`` made from it converts back to the
    structured rule."""
    rule, _ = _document_rule(cu_seqlens, causal, window, T, as_device(device))
    return with_name(rule.mask_mod(), "document_mask_mod")


def document(
    cu_seqlens: Sequence[int] | Tensor,
    causal: bool = False,
    window: int | None = None,
    *,
    T: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """Packed documents: document ``n`` holds tokens ``cu_seqlens[n] <= t < cu_seqlens[n + 1]``
    (FlashAttention's varlen convention: ``cu_seqlens = [0, len_0, len_0 + len_1, ...]``).

    ``keep(q, k) = doc(q) == doc(k)``, and also ``k <= q`` when ``causal``, and also
    ``q - k < window`` (causal) or ``|q - k| < window`` (non-causal) when ``window`` is given
    (a sliding window inside each document). ``T`` defaults to ``cu_seqlens[-1]``; tokens from
    ``cu_seqlens[-1]`` to ``T`` are padding: they keep no key (output 0) and no query keeps
    them. Empty documents (repeated offsets) are allowed.

    Representation: structured (document ids and an optional band, evaluated in the kernels);
    block pairs inside one document (and inside the band) are full, pairs of different
    documents are skipped.

    Example::

        >>> import tokenmix
        >>> layout = tokenmix.patterns.document([0, 100, 250, 300], causal=True, block_size=64)
        >>> layout.kept_pairs() == sum(n * (n + 1) // 2 for n in (100, 150, 50))
        True
    """
    device = as_device(device)
    block_size = check_block_size(block_size)
    rule, T = _document_rule(cu_seqlens, causal, window, T, device)
    if rule.band is None:
        # Document ids alone: from_element_mask's per-block id ranges are exact for sorted ids.
        return structured_layout(rule, T, block_size, device)
    any_keep, all_keep = _document_blocks(_offsets(cu_seqlens), rule.band, T, block_size, device)
    return layout_from_tables(
        any_keep,
        all_keep,
        block_size=block_size,
        length=T,
        mask_mod=None,
        element_mask=rule,
    )


def _document_blocks(
    cu: list[int], band: tuple[int, int], T: int, block: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Exact block classification of documents AND a band (``lo <= k - q <= hi``).

    Per-block document ranges and the band are each exact, but their AND is not (a block pair
    may share a document and meet the band, yet only in different places). So the sequence is
    cut at block and document boundaries, and only pieces of one same document are paired:
    a block pair keeps something iff one such piece pair meets the band. Cost: the number of
    same-document piece pairs, at most ``(T / block + documents)^2``, never per element."""
    lo, hi = band
    total = cu[-1]
    cuts = torch.cat(
        [
            torch.arange(0, total, block, device=device),
            torch.tensor(cu, device=device),
        ]
    ).unique()
    cuts = cuts[cuts <= total]
    start, end = cuts[:-1], cuts[1:] - 1  # pieces, inclusive; none is empty
    bounds = torch.tensor(cu[1:], dtype=torch.int64, device=device)
    doc = torch.searchsorted(bounds, start, right=True)
    # The pieces of each document are contiguous: pair every piece with its document's.
    first = torch.searchsorted(doc, doc, right=False)
    count = torch.searchsorted(doc, doc, right=True) - first
    qi = torch.repeat_interleave(torch.arange(doc.numel(), device=device), count)
    offset = torch.arange(qi.numel(), device=device) - torch.repeat_interleave(
        torch.cumsum(count, 0) - count, count
    )
    ki = first[qi] + offset
    q0, q1, k0, k1 = start[qi], end[qi], start[ki], end[ki]
    # The band on k - q over the piece pair: k - q spans [k0 - q1, k1 - q0].
    hit = (k1 - q0 >= lo) & (k0 - q1 <= hi)
    n = -(-T // block)
    any_flat = torch.zeros(n * n, dtype=torch.int8, device=device)
    index = (q0 // block) * n + k0 // block
    any_flat.scatter_reduce_(0, index, hit.to(torch.int8), "amax")
    any_keep = any_flat.view(n, n).bool()
    # Full: both blocks inside one same document and inside the band.
    b0 = torch.arange(n, device=device) * block
    b1 = torch.clamp(b0 + block, max=T) - 1
    d0 = torch.searchsorted(bounds, b0, right=True)
    d1 = torch.searchsorted(bounds, b1, right=True)
    single = torch.where((d0 == d1) & (b1 < total), d0, -1)
    same = (single.view(-1, 1) == single.view(1, -1)) & (single.view(-1, 1) >= 0)
    inside = ((b0.view(1, -1) - b1.view(-1, 1)) >= lo) & ((b1.view(1, -1) - b0.view(-1, 1)) <= hi)
    return any_keep, same & inside


def prefix_lm_mask_mod(prefix_len: int) -> MaskMod:
    """The Flex ``mask_mod`` of :func:`prefix_lm` (:meth:`ElementMask.mask_mod`)."""
    rule = ElementMask.prefix_lm(nonnegative_int(prefix_len, "prefix_len"))
    return with_name(rule.mask_mod(), "prefix_lm_mask_mod")


def prefix_lm(
    T: int,
    prefix_len: int,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """Prefix-LM: ``keep(q, k) = k <= q or k < prefix_len``. The prefix attends itself
    bidirectionally, the rest is causal (and sees the whole prefix). ``prefix_len = 0`` is
    causal attention; ``prefix_len >= T`` keeps everything.

    Representation: structured (:meth:`ElementMask.prefix_lm`, evaluated in the kernels);
    blocks below the diagonal or inside the prefix are full.

    Example::

        >>> import tokenmix
        >>> layout = tokenmix.patterns.prefix_lm(300, 100, block_size=64)
        >>> layout.kept_pairs() == 100 * 100 + sum(q + 1 for q in range(100, 300))
        True
    """
    T = check_length(T)
    prefix_len = nonnegative_int(prefix_len, "prefix_len")
    block_size = check_block_size(block_size)
    return structured_layout(ElementMask.prefix_lm(prefix_len), T, block_size, as_device(device))
