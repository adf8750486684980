"""Dilated sliding windows and PowerAttention's power-of-two offsets.

* :func:`dilated`: ``window`` keys spaced ``dilation`` apart (LongNet / dilated sliding
  window), token-level.
* :func:`power_attention`: a local window plus keys at power-of-two distances (PowerAttention,
  arXiv 2503.03588), so that ``d`` stacked layers reach ``2^d`` units back; at block level by
  default, as the paper implements it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..block_sparse.layout import BlockLayout, MaskMod
from ..block_sparse.mask import ElementMask
from ._common import (
    DEFAULT_BLOCK_SIZE,
    as_device,
    band_any_all,
    block_bounds,
    check_block_size,
    check_causal,
    check_length,
    layout_from_tables,
    positive_int,
    structured_layout,
)

__all__ = ["dilated", "dilated_mask_mod", "power_attention", "power_attention_mask_mod"]

Granularity = Literal["block", "token"]


def dilated_mask_mod(window: int, dilation: int, causal: bool = True) -> MaskMod:
    """The Flex ``mask_mod`` of :func:`dilated` (same arguments and rule)."""
    window = positive_int(window, "window")
    dilation = positive_int(dilation, "dilation")
    causal = check_causal(causal)
    span = window * dilation

    def dilated_mask_mod(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        near = (d >= 0) & (d < span) if causal else d.abs() < span
        return near & (d % dilation == 0)

    return dilated_mask_mod


def dilated(
    T: int,
    window: int,
    dilation: int,
    causal: bool = True,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """A dilated sliding window: ``window`` keys per side spaced ``dilation`` tokens apart.

    With ``d = q - k``: causal keeps ``0 <= d < window * dilation and d % dilation == 0``
    (the keys ``q, q - dilation, ..., q - (window - 1) * dilation``); non-causal keeps
    ``|d| < window * dilation and d % dilation == 0``. ``dilation = 1`` is
    :func:`sliding_window` without sinks. Unlike NATTEN's dilated windows, the window is not
    shifted at the sequence borders (queries near the start keep fewer keys).

    Representation: structured (a band) for ``dilation == 1``; otherwise every block the band
    touches is partial (a block never holds only multiples of ``dilation``) and carries a
    bitmask; blocks outside the band are skipped.

    Example::

        >>> import tokenmix
        >>> layout = tokenmix.patterns.dilated(256, window=8, dilation=4, block_size=32)
        >>> layout.kept_pairs() == sum(min(8, q // 4 + 1) for q in range(256))
        True
    """
    T = check_length(T)
    window = positive_int(window, "window")
    dilation = positive_int(dilation, "dilation")
    causal = check_causal(causal)
    block_size = check_block_size(block_size)
    device = as_device(device)
    span = window * dilation
    lo, hi = (0, span - 1) if causal else (-(span - 1), span - 1)
    if dilation == 1:
        return structured_layout(ElementMask(band=(-hi, -lo)), T, block_size, device)
    start, end = block_bounds(T, block_size, device)
    q0, q1 = start.view(-1, 1), end.view(-1, 1)
    k0, k1 = start.view(1, -1), end.view(1, -1)
    band_any, _ = band_any_all(q0, q1, k0, k1, lo, hi)
    # d takes every integer of [q0 - k1, q1 - k0]; clip to the band, then look for a multiple.
    a = torch.clamp(q0 - k1, min=lo)
    b = torch.clamp(q1 - k0, max=hi)
    multiple = torch.div(b, dilation, rounding_mode="floor") * dilation >= a
    any_keep = band_any & multiple & (a <= b)
    # A block holds a single d only when it is 1 x 1.
    single = (q0 == q1) & (k0 == k1)
    all_keep = any_keep & single
    return layout_from_tables(
        any_keep,
        all_keep,
        block_size=block_size,
        length=T,
        mask_mod=dilated_mask_mod(window, dilation, causal),
    )


def _check_granularity(granularity: str) -> str:
    if granularity not in ("block", "token"):
        raise ValueError(f"granularity must be 'block' or 'token', got {granularity!r}")
    return granularity


def _is_power_of_two(x: Tensor) -> Tensor:
    return (x > 0) & ((x & (x - 1)) == 0)


def power_attention_mask_mod(
    window: int,
    causal: bool = True,
    *,
    granularity: Granularity = "block",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> MaskMod:
    """The Flex ``mask_mod`` of :func:`power_attention` (same arguments and rule; with
    ``granularity='block'`` the rule depends on ``block_size``)."""
    window = positive_int(window, "window")
    causal = check_causal(causal)
    granularity = _check_granularity(granularity)
    unit = check_block_size(block_size) if granularity == "block" else 1

    def power_attention_mask_mod(b, h, q_idx, kv_idx):
        d = (q_idx // unit - kv_idx // unit).abs()
        keep = (d < window) | _is_power_of_two(d)
        return keep & (kv_idx <= q_idx) if causal else keep

    return power_attention_mask_mod


def power_attention(
    T: int,
    window: int,
    causal: bool = True,
    *,
    granularity: Granularity = "block",
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """PowerAttention: a local window plus keys at power-of-two distances.

    Distances are counted in *units*: blocks of ``block_size`` tokens with
    ``granularity='block'`` (the default), tokens with ``'token'``. With
    ``u(x) = x // block_size`` (block) or ``u(x) = x`` (token) and ``d = |u(q) - u(k)|``::

        keep(q, k) = (d < window or d in {1, 2, 4, 8, ...}) and (k <= q if causal)

    so ``window`` is a number of blocks (block granularity) or tokens (token granularity),
    counting the query's own, and ``d`` layers reach ``2^d`` units back.

    Why blocks by default: the paper (arXiv 2503.03588) states the pattern on tokens but runs
    it on blocks in a block-sparse kernel, and at token level a power-of-two stripe touches a
    whole key block for one key per query row, so each row would pay for ``log2 T`` blocks
    while keeping ``log2 T`` keys. At block level every kept block is full except the diagonal
    blocks of a causal layout, which use the structured causal rule: no bitmask at all. Token
    granularity is exact too (partial blocks carry a bitmask) but costs far more mask work.

    Example::

        >>> import tokenmix
        >>> layout = tokenmix.patterns.power_attention(1024, window=2, block_size=64)
        >>> # query block 12 keeps blocks 12 and 11 (window 2), 10, 8 and 4 (distances 2, 4, 8)
        >>> layout.block_status()[0, 0, 12].nonzero().flatten().tolist()
        [4, 8, 10, 11, 12]
    """
    T = check_length(T)
    window = positive_int(window, "window")
    causal = check_causal(causal)
    granularity = _check_granularity(granularity)
    block_size = check_block_size(block_size)
    device = as_device(device)
    mask_mod = power_attention_mask_mod(
        window, causal, granularity=granularity, block_size=block_size
    )
    if granularity == "block":
        n = -(-T // block_size)
        qb = torch.arange(n, device=device).view(-1, 1)
        kb = torch.arange(n, device=device).view(1, -1)
        d = (qb - kb).abs()
        keep = (d < window) | _is_power_of_two(d)
        if not causal:
            return layout_from_tables(
                keep, keep, block_size=block_size, length=T, mask_mod=mask_mod
            )
        keep = keep & (kb <= qb)
        return layout_from_tables(
            keep,
            keep & (kb < qb),
            block_size=block_size,
            length=T,
            mask_mod=mask_mod,
            element_mask=ElementMask.causal(),
        )
    start, end = block_bounds(T, block_size, device)
    q0, q1 = start.view(-1, 1), end.view(-1, 1)
    k0, k1 = start.view(1, -1), end.view(1, -1)
    lo, hi = (0, window - 1) if causal else (-(window - 1), window - 1)
    any_keep, all_keep = band_any_all(q0, q1, k0, k1, lo, hi)
    dmin, dmax = q0 - k1, q1 - k0
    p = 1
    while p < T:
        any_keep = any_keep | ((dmin <= p) & (p <= dmax))
        if not causal:
            any_keep = any_keep | ((dmin <= -p) & (-p <= dmax))
        p *= 2
    return layout_from_tables(
        any_keep, all_keep, block_size=block_size, length=T, mask_mod=mask_mod
    )
