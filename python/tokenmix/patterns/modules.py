"""Layers over the pattern builders: :class:`SparseAttention` and :class:`SlidingWindowAttention`.

Both are :class:`tokenmix.nn.BlockSparseAttention` (qkv projection, block-sparse attention,
output projection, GQA), with the layout coming from a pattern: a fixed layout, or a factory
called once per input length and cached.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..block_sparse.layout import BlockLayout
from ..block_sparse.modules import BlockSparseAttention
from ._common import (
    DEFAULT_BLOCK_SIZE,
    check_block_size,
    check_causal,
    nonnegative_int,
    positive_int,
)
from .windows import sliding_window

__all__ = ["SlidingWindowAttention", "SparseAttention"]

PatternFactory = Callable[..., Any]


def _takes_device_keyword(fn: Callable) -> bool:
    """Whether ``fn`` accepts ``device=`` (builders and their partials do)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    if "device" in params:
        return params["device"].kind in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class _PatternFactory:
    """``pattern(T, device)`` for any factory: builders take the device as a keyword (their
    second positional argument is a window, not a device), so
    ``functools.partial(tokenmix.patterns.sliding_window, window=256)`` is called as
    ``pattern(T, device=device)``; other callables get ``pattern(T, device)``."""

    def __init__(self, pattern: PatternFactory) -> None:
        self.pattern = pattern
        self.keyword = _takes_device_keyword(pattern)

    def __call__(self, length: int, device: Any) -> Any:
        layout = (
            self.pattern(length, device=device) if self.keyword else self.pattern(length, device)
        )
        if not isinstance(layout, BlockLayout) and not hasattr(layout, "kv_num_blocks"):
            raise TypeError(
                f"the pattern factory returned {type(layout).__name__}, expected a "
                "tokenmix.BlockLayout or a Flex BlockMask"
            )
        if isinstance(layout, BlockLayout) and layout.device != torch.device(device):
            layout = layout.to(device)
        return layout

    def __repr__(self) -> str:
        return f"_PatternFactory({self.pattern!r})"


class SparseAttention(BlockSparseAttention):
    """Self-attention over ``[B, T, dim]`` with a sparse pattern from :mod:`tokenmix.patterns`.

    ``pattern`` is a :class:`tokenmix.BlockLayout` (or Flex ``BlockMask``) for one length, or a
    factory returning one for each input length: ``pattern(T, device=device)`` when it takes a
    ``device`` keyword (every builder, and ``functools.partial`` of one), else
    ``pattern(T, device)``. Factory layouts are cached per ``(T, device)``
    (:meth:`layout_for`). A layout's heads must be 1 (shared), ``num_kv_heads`` (one per GQA
    group) or ``num_heads``; K/V have ``num_kv_heads`` heads (GQA/MQA).

    Under ``torch.compile(fullgraph=True)`` the layout of each length must already be cached
    (building one is data-dependent): run the layer once eagerly, or call
    ``layer.layout_for(T, device)``, before calling the compiled layer on that length.

    Example::

        >>> import functools, torch, tokenmix
        >>> pattern = functools.partial(tokenmix.patterns.power_attention, window=2, block_size=16)
        >>> layer = tokenmix.nn.SparseAttention(64, 4, pattern, num_kv_heads=2)
        >>> layer(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        pattern: BlockLayout | Any | PatternFactory,
        num_kv_heads: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        scale: float | None = None,
    ) -> None:
        fixed = isinstance(pattern, BlockLayout) or hasattr(pattern, "kv_num_blocks")
        if not fixed and not callable(pattern):
            raise TypeError(
                "pattern must be a tokenmix.BlockLayout, a Flex BlockMask or a callable "
                f"pattern(T, device), got {type(pattern).__name__}"
            )
        layout = pattern if fixed else _PatternFactory(pattern)
        super().__init__(
            dim,
            num_heads,
            layout,
            num_kv_heads=num_kv_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            scale=scale,
        )
        self.pattern = pattern
        if isinstance(pattern, BlockLayout):
            self._check_heads(pattern.heads, "pattern")

    def layout_for(self, length: int, device: Any) -> Any:
        layout = super().layout_for(length, device)
        if isinstance(layout, BlockLayout):
            self._check_heads(layout.heads, f"the pattern's layout for T={length}")
        return layout

    def _check_heads(self, heads: int, what: str) -> None:
        if heads not in (1, self.num_kv_heads, self.num_heads):
            raise ValueError(
                f"{what} has {heads} heads, expected 1, num_kv_heads ({self.num_kv_heads}) or "
                f"num_heads ({self.num_heads})"
            )

    def extra_repr(self) -> str:
        name = getattr(self.pattern, "func", self.pattern)
        name = getattr(name, "__name__", type(name).__name__)
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"pattern={name}"
        )


class SlidingWindowAttention(SparseAttention):
    """Sliding-window self-attention with attention sinks (:func:`tokenmix.patterns.
    sliding_window`): each token keeps the ``window`` keys ending at itself (causal) or
    within ``window - 1`` of it (non-causal), plus the first ``sinks`` tokens; any length.

    Example::

        >>> import torch, tokenmix
        >>> layer = tokenmix.nn.SlidingWindowAttention(64, 4, window=32, sinks=4, block_size=16)
        >>> layer(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        sinks: int = 0,
        causal: bool = True,
        num_kv_heads: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        scale: float | None = None,
    ) -> None:
        window = positive_int(window, "window")
        sinks = nonnegative_int(sinks, "sinks")
        causal = check_causal(causal)
        block_size = check_block_size(block_size)
        super().__init__(
            dim,
            num_heads,
            functools.partial(
                sliding_window, window=window, causal=causal, sinks=sinks, block_size=block_size
            ),
            num_kv_heads=num_kv_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            scale=scale,
        )
        self.window, self.sinks, self.causal, self.block_size = window, sinks, causal, block_size

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"window={self.window}, sinks={self.sinks}, causal={self.causal}, "
            f"block_size={self.block_size}"
        )
