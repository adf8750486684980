"""Argument checks of block-sparse attention (shapes, dtypes, devices, the layout)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .._checks import (
    check_same_dtype_and_device,
    check_supported_dtype,
    require_tensor,
    resolve_scale,
)
from .layout import BlockLayout

__all__ = ["as_layout", "check_problem", "resolve_scale"]


def as_layout(block_mask: Any, batch: int | None = None, heads: int | None = None) -> BlockLayout:
    """A ``BlockLayout`` as it is; a Flex ``BlockMask`` converted (for q's ``batch`` and
    ``heads``, see :meth:`BlockLayout.from_block_mask`) and cached on the ``BlockMask``, so that
    passing the same mask again costs nothing."""
    if isinstance(block_mask, BlockLayout):
        return block_mask
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:  # pragma: no cover - torch without FlexAttention
        BlockMask = ()  # noqa: N806
    if BlockMask and isinstance(block_mask, BlockMask):
        key = (block_mask.kv_indices, block_mask.mask_mod, batch, heads)
        cache = getattr(block_mask, "_tokenmix_layouts", None)
        if cache is not None:
            for cached_key, layout in cache:
                if all(a is b for a, b in zip(cached_key, key, strict=True)):
                    return layout
        layout = BlockLayout.from_block_mask(block_mask, batch=batch, heads=heads)
        try:
            block_mask._tokenmix_layouts = [*(cache or [])[-3:], (key, layout)]
        except AttributeError:  # a BlockMask with __slots__: no cache
            pass
        return layout
    raise TypeError(
        "block_mask must be a tokenmix.BlockLayout or a torch.nn.attention.flex_attention."
        f"BlockMask, got {type(block_mask).__name__}"
    )


def check_layout_device(layout: BlockLayout, q: Tensor) -> None:
    """The layout must live where q does (moved once, not per call)."""
    if layout.device != q.device:
        raise ValueError(
            f"block_mask is on {layout.device} but q is on {q.device}: move it with "
            "layout.to(q.device) once (not per call)"
        )


def check_problem(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout) -> None:
    """Shapes, dtypes and devices of q, k, v against each other and against the layout."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be [B, T, H, D] (4 dimensions), got shape {tuple(t.shape)}"
            )
    check_supported_dtype(q, "q")
    check_same_dtype_and_device(q, "q", (("k", k), ("v", v)))
    batch, q_len, heads, dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(
            f"k and v must have q's batch size {batch}, got {k.shape[0]} and {v.shape[0]}"
        )
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v has {v.shape[1]} tokens but k has {k.shape[1]}: they must agree")
    if k.shape[3] != dim:
        raise ValueError(f"k head dim {k.shape[3]} must equal q head dim {dim}")
    if dim < 1:
        raise ValueError("the head dim of q and k must be >= 1")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v has {v.shape[2]} heads but k has {k.shape[2]}: they must agree")
    kv_heads = k.shape[2]
    if kv_heads < 1:
        raise ValueError(f"k and v must have at least one head, got {kv_heads}")
    if heads % kv_heads != 0:
        raise ValueError(
            f"q heads ({heads}) must be a multiple of k/v heads ({kv_heads}) (GQA/MQA)"
        )
    if (q_len, k.shape[1]) != layout.seq_lengths:
        raise ValueError(
            f"block_mask has sequence lengths {layout.seq_lengths} but q and k have "
            f"({q_len}, {k.shape[1]}) tokens"
        )
    if layout.batch not in (1, batch):
        raise ValueError(f"block_mask has batch size {layout.batch}, expected 1 or {batch}")
    if layout.heads not in (1, kv_heads, heads):
        raise ValueError(
            f"block_mask has {layout.heads} heads, expected 1, {kv_heads} (one per k/v head, "
            f"shared by its GQA group) or {heads}"
        )
    em = layout.element_mask
    if em is not None:
        em.check_lengths(q_len, k.shape[1], batch)
