"""tokenmix: fused token-mixing kernels for PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

from . import nn  # noqa: E402
from ._info import info  # noqa: E402
from .neighborhood import (  # noqa: E402
    na1d,
    na2d,
    na3d,
    neighborhood_attention,
    neighborhood_attention_reference,
)

__all__ = [
    "__version__",
    "info",
    "na1d",
    "na2d",
    "na3d",
    "neighborhood_attention",
    "neighborhood_attention_reference",
    "nn",
]
