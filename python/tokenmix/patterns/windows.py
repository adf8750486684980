"""Sliding windows with attention sinks, per-head windows and MoA's elastic windows.

With ``d = q - k`` (query index minus key index, tokens from 0):

* causal: ``keep(q, k) = 0 <= d and (d < window or k < sinks)``;
* non-causal: ``keep(q, k) = |d| < window or k < sinks``.

``window`` counts the keys a query keeps on one side including itself (causal: the
``window`` keys ``q - window + 1 .. q``, Mistral's and StreamingLLM's convention;
non-causal: ``2 * window - 1`` keys centred on ``q``). ``sinks`` are StreamingLLM's attention
sinks, the first ``sinks`` tokens, kept by every query (causal: by every query at or after
them, so a query never sees the future).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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
    nonnegative_int,
    positive_int,
    real_number,
    structured_layout,
    with_name,
)

__all__ = [
    "elastic_window_sizes",
    "elastic_windows",
    "elastic_windows_mask_mod",
    "per_head_windows",
    "per_head_windows_mask_mod",
    "sliding_window",
    "sliding_window_mask_mod",
]


def _keep(q: Tensor, k: Tensor, window: Any, sinks: Any, causal: bool) -> Tensor:
    """The window-and-sinks rule on broadcasting index tensors (``window``/``sinks`` ints or
    tensors)."""
    d = q - k
    if causal:
        return (d >= 0) & ((d < window) | (k < sinks))
    return (d.abs() < window) | (k < sinks)


def _structured_rule(window: int, sinks: int, causal: bool) -> ElementMask:
    """The rule as an ElementMask (the kernels evaluate it; no bitmask).

    Non-causal: the band ``|k - q| < window`` or a prefix-LM prefix (every query keeps the
    sinks). Causal: the band ``-window < k - q <= 0`` or a causal prefix (``k < sinks and
    k <= q``: a query never keeps a sink after it)."""
    if not causal:
        return ElementMask(band=(-(window - 1), window - 1), prefix=sinks)
    return ElementMask(band=(-(window - 1), 0), prefix=sinks, prefix_causal=sinks > 0)


def sliding_window_mask_mod(window: int, causal: bool = True, sinks: int = 0) -> MaskMod:
    """The Flex ``mask_mod`` of :func:`sliding_window` (same arguments and rule).

    It is the structured rule's :meth:`ElementMask.mask_mod`, so a Flex ``BlockMask`` built
    from it converts back to the structured rule.
    """
    window = positive_int(window, "window")
    sinks = nonnegative_int(sinks, "sinks")
    causal = check_causal(causal)
    return with_name(_structured_rule(window, sinks, causal).mask_mod(), "sliding_window_mask_mod")


def sliding_window(
    T: int,
    window: int,
    causal: bool = True,
    sinks: int = 0,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """A sliding window plus StreamingLLM attention sinks, for ``T`` queries and keys.

    With ``d = q - k``: causal keeps ``0 <= d and (d < window or k < sinks)``; non-causal keeps
    ``|d| < window or k < sinks``. ``window`` counts the keys on one side including the query
    itself; a window of ``T`` or more keeps everything (causal: everything up to the query).

    Representation: structured (:class:`tokenmix.ElementMask`, evaluated in the kernels, no
    bitmask): a band plus a prefix, prefix-LM's when non-causal (every query keeps the sinks),
    a causal prefix when causal (a query keeps only the sinks at or before it). Blocks inside
    the window (or inside the sinks) are full.

    Args:
        T: the sequence length (queries and keys).
        window: keys per side, including the query (>= 1).
        causal: keep no key after the query.
        sinks: the first ``sinks`` tokens are kept by every query (causal: every query at or
            after them).
        block_size: query and key block size of the layout (default 128).
        device: where the layout lives (default: the CPU).

    Example::

        >>> import tokenmix
        >>> layout = tokenmix.patterns.sliding_window(1000, 256, sinks=4, block_size=64)
        >>> layout.seq_lengths, layout.block_size
        ((1000, 1000), (64, 64))
        >>> # each query keeps min(q + 1, 256) window keys and the sinks the window misses
        >>> rows = [min(q + 1, 256) + max(0, min(4, q - 255)) for q in range(1000)]
        >>> layout.kept_pairs() == sum(rows)
        True
    """
    T = check_length(T)
    window = positive_int(window, "window")
    sinks = nonnegative_int(sinks, "sinks")
    causal = check_causal(causal)
    block_size = check_block_size(block_size)
    device = as_device(device)
    return structured_layout(_structured_rule(window, sinks, causal), T, block_size, device)


def _window_tables(
    T: int,
    windows: Tensor,
    sinks: Tensor,
    causal: bool,
    block_size: int,
    device: torch.device,
    mask_mod: MaskMod,
) -> BlockLayout:
    """Per-head block classification of the window-and-sinks rule ([H] windows and sinks)."""
    start, end = block_bounds(T, block_size, device)
    q0, q1 = start.view(1, -1, 1), end.view(1, -1, 1)
    k0, k1 = start.view(1, 1, -1), end.view(1, 1, -1)
    w = windows.view(-1, 1, 1).long()
    s = sinks.view(-1, 1, 1).long()
    if causal:
        band_any, band_all = band_any_all(q0, q1, k0, k1, 0, w - 1)
        # Some (q, k) with k < sinks and k <= q: k = k0 is the best candidate.
        sink_any = (k0 < s) & (k0 <= q1)
        sink_all = (k1 < s) & (k1 <= q0)
    else:
        band_any, band_all = band_any_all(q0, q1, k0, k1, -(w - 1), w - 1)
        sink_any, sink_all = k0 < s, k1 < s
    # "all" of a union is under-approximated (a block covered half by the band and half by the
    # sinks stays partial): exact, at the cost of some mask work.
    return layout_from_tables(
        band_any | sink_any,
        band_all | sink_all,
        block_size=block_size,
        length=T,
        mask_mod=mask_mod,
    )


def _int_list(values: Any, name: str, check) -> list[int]:
    if isinstance(values, Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {tuple(values.shape)}")
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got dtype {values.dtype}")
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"{name} must be a sequence of ints (one per head), got {type(values).__name__}"
        )
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty (one entry per head)")
    return [check(v, f"{name}[{i}]") for i, v in enumerate(values)]


def _per_head(windows: Any, sinks: Any) -> tuple[list[int], list[int]]:
    windows = _int_list(windows, "windows", positive_int)
    if isinstance(sinks, (Sequence, Tensor)) and not isinstance(sinks, (str, bytes)):
        sinks = _int_list(sinks, "sinks", nonnegative_int)
        if len(sinks) != len(windows):
            raise ValueError(
                f"sinks has {len(sinks)} entries but windows has {len(windows)}: give one "
                "per head, or one int for all heads"
            )
    else:
        sinks = [nonnegative_int(sinks, "sinks")] * len(windows)
    return windows, sinks


def per_head_windows_mask_mod(
    windows: Sequence[int] | Tensor,
    sinks: int | Sequence[int] = 0,
    causal: bool = True,
    *,
    device: torch.device | str | None = None,
) -> MaskMod:
    """The Flex ``mask_mod`` of :func:`per_head_windows`: head ``h`` keeps
    :func:`sliding_window`'s rule with ``windows[h]`` and ``sinks[h]``. Use it with
    ``H = len(windows)`` (``create_block_mask(mod, B, len(windows), T, T)``)."""
    windows, sinks = _per_head(windows, sinks)
    causal = check_causal(causal)
    device = as_device(device)
    w_table = torch.tensor(windows, dtype=torch.int64, device=device)
    s_table = torch.tensor(sinks, dtype=torch.int64, device=device)

    def per_head_windows_mask_mod(b, h, q_idx, kv_idx):
        w = w_table.to(q_idx.device)[h]
        s = s_table.to(q_idx.device)[h]
        return _keep(q_idx, kv_idx, w, s, causal)

    return per_head_windows_mask_mod


def per_head_windows(
    T: int,
    windows: Sequence[int] | Tensor,
    sinks: int | Sequence[int] = 0,
    causal: bool = True,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """One sliding window per head: head ``h`` keeps :func:`sliding_window`'s rule with
    ``windows[h]`` keys and ``sinks[h]`` sinks (``sinks`` one int for all heads, or one per
    head). The layout has ``heads == len(windows)``, so attention needs that many query heads
    (K/V may have fewer, GQA).

    Representation: when every head has the same window and sinks, :func:`sliding_window`'s
    structured rule with the lists repeated per head;
    otherwise partial blocks carry a per-head bitmask (evaluated once per partial block and
    head). Blocks inside a head's window are full.

    Example::

        >>> import tokenmix
        >>> layout = tokenmix.patterns.per_head_windows(512, [32, 64, 128, 512], block_size=64)
        >>> layout.heads
        4
        >>> layout.kept_pairs() == sum(min(q + 1, w) for w in (32, 64, 128, 512)
        ...                            for q in range(512))
        True
    """
    T = check_length(T)
    windows, sinks = _per_head(windows, sinks)
    causal = check_causal(causal)
    block_size = check_block_size(block_size)
    device = as_device(device)
    heads = len(windows)
    if len(set(windows)) == 1 and len(set(sinks)) == 1:
        rule = _structured_rule(windows[0], sinks[0], causal)
        return _repeat_heads(structured_layout(rule, T, block_size, device), heads)
    return _window_tables(
        T,
        torch.tensor(windows, device=device),
        torch.tensor(sinks, device=device),
        causal,
        block_size,
        device,
        per_head_windows_mask_mod(windows, sinks, causal, device=device),
    )


def _repeat_heads(layout: BlockLayout, heads: int) -> BlockLayout:
    """A head-broadcast layout with its lists repeated for ``heads`` heads."""

    def rep(t: Tensor) -> Tensor:
        return t.expand(t.shape[0], heads, *t.shape[2:]).contiguous()

    return BlockLayout(
        rep(layout.kv_num_blocks),
        rep(layout.kv_indices),
        rep(layout.full_kv_num_blocks),
        rep(layout.full_kv_indices),
        block_size=layout.block_size,
        seq_lengths=layout.seq_lengths,
        element_mask=layout.element_mask,
    )


def elastic_window_sizes(T: int, alpha: Sequence[float], beta: Sequence[float]) -> list[int]:
    """MoA's elastic per-head spans for length ``T``: ``max(1, floor(alpha[h] + beta[h] * T))``
    (computed in float64, as Python floats)."""
    T = check_length(T)
    if isinstance(alpha, Tensor):
        alpha = alpha.tolist()
    if isinstance(beta, Tensor):
        beta = beta.tolist()
    for value, name in ((alpha, "alpha"), (beta, "beta")):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(
                f"{name} must be a sequence of numbers (one per head), got {type(value).__name__}"
            )
        if len(value) == 0:
            raise ValueError(f"{name} must not be empty (one entry per head)")
    if len(alpha) != len(beta):
        raise ValueError(
            f"alpha has {len(alpha)} entries but beta has {len(beta)}: give one pair per head"
        )
    a = [real_number(x, f"alpha[{i}]") for i, x in enumerate(alpha)]
    b = [real_number(x, f"beta[{i}]") for i, x in enumerate(beta)]
    return [max(1, math.floor(ai + bi * T)) for ai, bi in zip(a, b, strict=True)]


def elastic_windows_mask_mod(
    T: int,
    alpha: Sequence[float],
    beta: Sequence[float],
    sinks: int | Sequence[int] = 0,
    causal: bool = True,
    *,
    device: torch.device | str | None = None,
) -> MaskMod:
    """The Flex ``mask_mod`` of :func:`elastic_windows` for length ``T``."""
    return per_head_windows_mask_mod(
        elastic_window_sizes(T, alpha, beta), sinks, causal, device=device
    )


def elastic_windows(
    T: int,
    alpha: Sequence[float],
    beta: Sequence[float],
    sinks: int | Sequence[int] = 0,
    causal: bool = True,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """MoA's heterogeneous elastic windows: head ``h`` is a :func:`per_head_windows` head with
    ``window_h = max(1, floor(alpha[h] + beta[h] * T))`` keys (its span grows with the input
    length ``T``; see :func:`elastic_window_sizes`) and ``sinks`` sink tokens.

    MoA ("Mixture of Sparse Attention for automatic LLM compression") searches ``alpha_h``,
    ``beta_h`` per head and runs causal sliding windows with a few global (sink) tokens; MoA's
    spans may be negative for short inputs (its ``alpha`` can be negative), which is clamped
    to 1 (the query itself) here. MoA's kernels round spans to blocks; this layout is
    token-exact.

    Example::

        >>> import tokenmix
        >>> tokenmix.patterns.elastic_window_sizes(4096, [0.0, 1024.0, -1024.0], [0.125, 0.0, 0.5])
        [512, 1024, 1024]
        >>> tokenmix.patterns.elastic_windows(4096, [0.0, 1024.0], [0.125, 0.0], sinks=64).heads
        2
    """
    return per_head_windows(
        T,
        elastic_window_sizes(T, alpha, beta),
        sinks,
        causal,
        block_size=block_size,
        device=device,
    )
