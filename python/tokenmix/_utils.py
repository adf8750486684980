"""Small tensor helpers shared by the operator families."""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and accumulations are kept in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_feature_stride(x: Tensor) -> Tensor:
    """``x`` itself when its last dimension has unit stride, else a contiguous copy.

    The kernels take any other strides (views of a fused projection need no copy).
    """
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()
