"""nn.Module wrappers: qkv projection, neighborhood attention, output projection."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._context_parallel import pick_operator
from .args import normalize_window_args, resolve_scale
from .functional import BoolOrTuple, IntOrTuple, neighborhood_attention


class _NeighborhoodAttentionND(nn.Module):
    rank: int = 0

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        dilation: IntOrTuple = 1,
        is_causal: BoolOrTuple = False,
        num_kv_heads: int | None = None,
        qkv_bias: bool = True,
        rel_pos_bias: bool = False,
        proj_bias: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim <= 0 or num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        # Validate the window arguments now (shape-independent checks) so a bad
        # module fails at construction, not at the first forward.
        big = (1 << 30,) * self.rank
        self.kernel_size, self.stride, self.dilation, self.is_causal = normalize_window_args(
            self.rank, big, kernel_size, stride, dilation, is_causal
        )
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        # Checked now (a number, finite) so a bad module fails at construction.
        self.scale = None if scale is None else resolve_scale(scale, self.head_dim)
        qkv_out = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.qkv = nn.Linear(dim, qkv_out, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        if rel_pos_bias:
            shape = (num_heads, *(2 * k - 1 for k in self.kernel_size))
            self.rpb = nn.Parameter(torch.zeros(shape))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.rank + 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects x of shape [B, *spatial ({self.rank}), "
                f"{self.dim}], got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        qkv = self.qkv(x)
        hd, h, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = qkv.split([h * hd, hkv * hd, hkv * hd], dim=-1)
        q = q.unflatten(-1, (h, hd))
        k = k.unflatten(-1, (hkv, hd))
        v = v.unflatten(-1, (hkv, hd))
        rpb = self.rpb.to(q.dtype) if self.rpb is not None else None
        attend = pick_operator(self, neighborhood_attention, "neighborhood_attention")
        out = attend(
            q,
            k,
            v,
            self.kernel_size,
            self.stride,
            self.dilation,
            self.is_causal,
            scale=self.scale,
            rpb=rpb,
        )
        return self.proj(out.reshape(*lead, self.dim))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, "
            f"is_causal={self.is_causal}, rel_pos_bias={self.rpb is not None}"
        )


class NeighborhoodAttention1D(_NeighborhoodAttentionND):
    """Neighborhood attention layer over ``[B, L, dim]`` inputs."""

    rank = 1


class NeighborhoodAttention2D(_NeighborhoodAttentionND):
    """Neighborhood attention layer over ``[B, H, W, dim]`` inputs."""

    rank = 2


class NeighborhoodAttention3D(_NeighborhoodAttentionND):
    """Neighborhood attention layer over ``[B, T, H, W, dim]`` inputs."""

    rank = 3
