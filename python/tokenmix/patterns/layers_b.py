"""Layers over the part-B patterns: multi-axis (MaxViT) attention and dynamic top-k blocks.

Both reuse :class:`tokenmix.nn.BlockSparseAttention` (its fused qkv projection, output
projection, GQA checks and scale) and change only what happens between the projections.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import as_int, int_tuple, require_bool
from ..block_sparse.functional import block_sparse_attention
from ..block_sparse.layout import BlockLayout
from ..block_sparse.modules import BlockSparseAttention
from .grid import MultiAxisPattern, multi_axis
from .topk import POOLINGS, topk_blocks

__all__ = ["MultiAxisAttention2D", "TopKBlockAttention"]


def _no_layout(length: int, device: Any) -> None:  # the parent's factory slot (unused)
    raise RuntimeError("this layer builds its layouts itself")


class MultiAxisAttention2D(BlockSparseAttention):
    """MaxViT's block and grid attention over ``[B, H, W, dim]`` inputs, as two head groups.

    The first ``num_heads - grid_heads`` heads attend their ``block`` window, the last
    ``grid_heads`` heads their grid group (:func:`tokenmix.patterns.multi_axis`). One fused
    qkv projection, one gather that moves every head's tokens into its axis' order, one
    block-sparse attention call over a per-head layout of dense diagonal blocks, one gather
    back, one output projection. ``grid_heads`` must be a multiple of
    ``num_heads / num_kv_heads`` (each K/V head serves one axis); it defaults to half the K/V
    heads' query heads. ``grid_heads=0`` (block only) and ``grid_heads=num_heads`` (grid only)
    give MaxViT's two separate attention layers.

    Layouts are built once per ``(H, W, device)`` and cached: run the layer once eagerly
    before ``torch.compile(fullgraph=True)`` (as for :class:`BlockSparseAttention` factories).

    Example::

        >>> import torch, tokenmix
        >>> layer = tokenmix.nn.MultiAxisAttention2D(64, 4, block=4, grid=4, num_kv_heads=2)
        >>> layer(torch.randn(2, 8, 12, 64)).shape
        torch.Size([2, 8, 12, 64])
    """

    # Its token permutation mixes rows of the whole grid: no sharded form yet.
    context_parallel_unsupported = "it permutes tokens across the whole grid"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        block: int | Sequence[int],
        grid: int | Sequence[int],
        num_kv_heads: int | None = None,
        grid_heads: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            _no_layout,
            num_kv_heads=num_kv_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            scale=scale,
        )
        group = self.num_heads // self.num_kv_heads
        if grid_heads is None:
            if self.num_kv_heads == 1 and self.num_heads > 0:
                raise ValueError(
                    "grid_heads must be given with one K/V head (MQA): 0 (block attention) or "
                    f"num_heads ({self.num_heads}, grid attention)"
                )
            grid_heads = (self.num_kv_heads // 2) * group
        grid_heads = as_int(grid_heads, "grid_heads")
        if not 0 <= grid_heads <= self.num_heads or grid_heads % group != 0:
            raise ValueError(
                f"grid_heads ({grid_heads}) must be in [0, num_heads={self.num_heads}] and a "
                f"multiple of num_heads / num_kv_heads = {group} (each K/V head serves one axis)"
            )
        # The window and grid are checked now, their fit to the image per input size.
        self.block = int_tuple(block, "block", 2)
        self.grid = int_tuple(grid, "grid", 2)
        if min(self.block) < 1 or min(self.grid) < 1:
            raise ValueError(f"block and grid must be >= 1, got {self.block} and {self.grid}")
        self.grid_heads = grid_heads
        kv_grid = grid_heads // group
        self.axes = ["block"] * (self.num_kv_heads - kv_grid) + ["grid"] * kv_grid
        self._patterns: dict[tuple[int, int, str], tuple[Any, ...]] = {}

    def pattern_for(self, height: int, width: int, device: Any) -> MultiAxisPattern:
        """The :class:`MultiAxisPattern` used for ``height x width`` inputs on ``device``."""
        return self._state(height, width, device)[0]

    def _state(self, height: int, width: int, device: Any) -> tuple[Any, ...]:
        key = (int(height), int(width), str(device))
        if key not in self._patterns:
            pat = multi_axis(height, width, self.block, self.grid, device=device)
            h, hkv = self.num_heads, self.num_kv_heads
            axes = self.axes
            if len(set(axes)) == 1:
                layout = pat.layout(axes[0])
            else:
                layout = pat.layout(axes)
            fwd = torch.cat(
                [pat.head_order(axes, h), pat.head_order(axes, hkv), pat.head_order(axes, hkv)],
                dim=1,
            )
            inv = pat.head_inverse(axes, h)
            self._patterns[key] = (pat, layout, fwd, inv)
        return self._patterns[key]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(
                f"MultiAxisAttention2D expects x of shape [B, H, W, {self.dim}], got "
                f"{tuple(x.shape)}"
            )
        batch, height, width, _ = x.shape
        length = height * width
        _, layout, fwd, inv = self._state(height, width, x.device)
        hd, h, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        qkv = self.qkv(x.reshape(batch, length, self.dim)).view(batch, length, h + 2 * hkv, hd)
        qkv = torch.gather(qkv, 1, fwd.view(1, length, -1, 1).expand(qkv.shape))
        q, k, v = qkv.split([h, hkv, hkv], dim=2)
        out = block_sparse_attention(q, k, v, layout, scale=self.scale)
        out = torch.gather(out, 1, inv.view(1, length, h, 1).expand(out.shape))
        return self.proj(out.reshape(batch, height, width, self.dim))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"block={self.block}, grid={self.grid}, grid_heads={self.grid_heads}"
        )


class TopKBlockAttention(BlockSparseAttention):
    """Self-attention over ``[B, T, dim]`` inputs on dynamically selected key blocks.

    Each forward pass selects, per query block and K/V head, ``topk`` key blocks from pooled
    block scores (:func:`tokenmix.patterns.topk_blocks`, no gradient through the selection)
    and runs :func:`tokenmix.block_sparse_attention` on them; the layout has ``H_kv`` heads
    (``group_heads=True``) and serves each K/V head's query heads.

    ``torch.compile``: the selection builds a layout from data-dependent block lists, so it
    runs outside the graph (a graph break, ``fullgraph=False``); the projections and the
    attention call compile.

    Example::

        >>> import torch, tokenmix
        >>> layer = tokenmix.nn.TopKBlockAttention(64, 4, block_size=16, topk=3, num_kv_heads=2)
        >>> layer(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    # Its layout is chosen from every query and key block: no sharded form yet.
    context_parallel_unsupported = "it selects key blocks from the whole sequence"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        block_size: int,
        topk: int,
        num_kv_heads: int | None = None,
        pooling: str = "mean",
        sinks: int = 1,
        local: int = 1,
        causal: bool = True,
        group_heads: bool = True,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            _no_layout,
            num_kv_heads=num_kv_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            scale=scale,
        )
        self.block_size = as_int(block_size, "block_size")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        self.topk = as_int(topk, "topk")
        if self.topk < 0:
            raise ValueError(f"topk must be >= 0, got {self.topk}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.sinks, self.local = as_int(sinks, "sinks"), as_int(local, "local")
        if self.sinks < 0 or self.local < 0:
            raise ValueError(f"sinks and local must be >= 0, got {self.sinks} and {self.local}")
        self.causal = require_bool(causal, "causal")
        self.group_heads = require_bool(group_heads, "group_heads")

    @torch.compiler.disable
    def select(self, q: Tensor, k: Tensor) -> BlockLayout:
        """The layout for queries ``q`` ``[B, T, H, D]`` and keys ``k`` ``[B, T, H_kv, D]``."""
        return topk_blocks(
            q.detach(),
            k.detach(),
            self.block_size,
            self.topk,
            pooling=self.pooling,
            sinks=self.sinks,
            local=self.local,
            causal=self.causal,
            group_heads=self.group_heads,
            scale=self.scale,
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"TopKBlockAttention expects x of shape [B, T, {self.dim}], got {tuple(x.shape)}"
            )
        batch, length, _ = x.shape
        hd, h, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = self.qkv(x).split([h * hd, hkv * hd, hkv * hd], dim=-1)
        q, k, v = q.unflatten(-1, (h, hd)), k.unflatten(-1, (hkv, hd)), v.unflatten(-1, (hkv, hd))
        layout = self.select(q, k)
        out = block_sparse_attention(q, k, v, layout, scale=self.scale)
        return self.proj(out.reshape(batch, length, self.dim))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"block_size={self.block_size}, topk={self.topk}, pooling={self.pooling!r}, "
            f"sinks={self.sinks}, local={self.local}, causal={self.causal}"
        )
