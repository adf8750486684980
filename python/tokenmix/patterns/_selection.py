"""Helpers shared by the data-dependent builders (top-k blocks, permuted blocks)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_supported_dtype, require_tensor
from .._utils import accumulation_dtype

__all__ = ["block_pool", "check_qk"]


def check_qk(q: Tensor, k: Tensor) -> tuple[int, int, int, int, int, int]:
    """``q`` ``[B, Tq, H, D]`` and ``k`` ``[B, Tk, H_kv, D]`` with ``H % H_kv == 0``; returns
    ``(B, Tq, Tk, H, H_kv, D)``."""
    for name, t in (("q", q), ("k", k)):
        require_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be [B, T, H, D] (4 dimensions), got shape {tuple(t.shape)}"
            )
        check_supported_dtype(t, name)
    batch, q_len, heads, dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k must have q's batch size {batch}, got {k.shape[0]}")
    if k.shape[3] != dim:
        raise ValueError(f"k head dim {k.shape[3]} must equal q head dim {dim}")
    if k.device != q.device:
        raise ValueError(f"k device {k.device} must match q device {q.device}")
    kv_heads = k.shape[2]
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(f"q heads ({heads}) must be a multiple of k heads ({kv_heads}) (GQA/MQA)")
    return batch, q_len, k.shape[1], heads, kv_heads, dim


def block_pool(x: Tensor, block: int, how: str) -> Tensor:
    """``[B, T, H, D]`` -> ``[B, H, ceil(T / block), D]`` pooled over each block's valid tokens
    (the last block may be short): ``how`` is ``'mean'``, ``'max'`` or ``'min'``. Computed in
    float32 (float64 for float64 inputs)."""
    batch, length, heads, dim = x.shape
    n = -(-length // block)
    x = x.to(accumulation_dtype(x.dtype))
    pad = n * block - length
    if how == "mean":
        fill = 0.0
    elif how == "max":
        fill = float("-inf")
    else:
        fill = float("inf")
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad), value=fill)
    x = x.reshape(batch, n, block, heads, dim)
    if how == "mean":
        counts = torch.clamp(length - torch.arange(n, device=x.device) * block, max=block)
        out = x.sum(2) / counts.to(x.dtype).view(1, n, 1, 1)
    elif how == "max":
        out = x.amax(2)
    else:
        out = x.amin(2)
    return out.transpose(1, 2)
