"""nn.Module wrapper: qkv projection, block-sparse attention, output projection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .._checks import as_int
from .._context_parallel import global_length, pick_operator
from .args import resolve_scale
from .functional import block_sparse_attention
from .layout import BlockLayout

LayoutFactory = Callable[[int, Any], Any]


class BlockSparseAttention(nn.Module):
    """Block-sparse self-attention over ``[B, T, dim]`` inputs.

    ``layout`` is a :class:`tokenmix.BlockLayout` or Flex ``BlockMask`` for a fixed sequence
    length, or a factory ``layout(T, device)`` returning one for each input length; a factory's
    layouts are cached per ``(T, device)``, so they are built once, outside any compiled region
    after the first call.

    Example::

        >>> import torch, tokenmix
        >>> rule = tokenmix.ElementMask.causal()
        >>> attn = tokenmix.nn.BlockSparseAttention(
        ...     64, 4, lambda t, device: tokenmix.BlockLayout.from_element_mask(
        ...         rule, t, t, block_size=32).to(device))
        >>> attn(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        layout: BlockLayout | Any | LayoutFactory,
        num_kv_heads: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        dim = as_int(dim, "dim")
        num_heads = as_int(num_heads, "num_heads")
        num_kv_heads = as_int(num_kv_heads, "num_kv_heads")
        if dim <= 0 or num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if not callable(layout) and not hasattr(layout, "kv_num_blocks"):
            raise TypeError(
                "layout must be a tokenmix.BlockLayout, a Flex BlockMask or a callable "
                f"layout(T, device), got {type(layout).__name__}"
            )
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.scale = None if scale is None else resolve_scale(scale, self.head_dim)
        self.layout = layout
        self._layouts: dict[tuple[int, str], Any] = {}
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def layout_for(self, length: int, device) -> Any:
        """The layout used for inputs of ``length`` tokens on ``device``."""
        if not callable(self.layout) or hasattr(self.layout, "kv_num_blocks"):
            return self.layout
        key = (int(length), str(device))
        if key not in self._layouts:
            self._layouts[key] = self.layout(int(length), device)
        return self._layouts[key]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"BlockSparseAttention expects x of shape [B, T, {self.dim}], got {tuple(x.shape)}"
            )
        batch, length, _ = x.shape
        attend = pick_operator(self, block_sparse_attention, "block_sparse_attention")
        total = global_length(self, length)  # the layout covers the whole sequence
        hd, h, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = self.qkv(x).split([h * hd, hkv * hd, hkv * hd], dim=-1)
        out = attend(
            q.unflatten(-1, (h, hd)),
            k.unflatten(-1, (hkv, hd)),
            v.unflatten(-1, (hkv, hd)),
            self.layout_for(total, x.device),
            scale=self.scale,
        )
        return self.proj(out.reshape(batch, length, self.dim))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"layout={'fixed' if hasattr(self.layout, 'kv_num_blocks') else 'factory'}"
        )
