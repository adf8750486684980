"""tokenmix: fused token-mixing kernels for PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

from . import block_sparse, distributed, fft_mix, linear_scan, neighborhood, nn, patterns  # noqa: E402
from ._info import info  # noqa: E402
from ._memory import cpu_cached_bytes, empty_cpu_cache  # noqa: E402
from .block_sparse import (  # noqa: E402
    BlockLayout,
    ElementMask,
    block_sparse_attention,
    block_sparse_attention_reference,
)
from .fft_mix import fft_conv, fourier_mix, global_filter, spectral_gate  # noqa: E402
from .linear_scan import (  # noqa: E402
    delta_rule,
    delta_rule_step,
    linear_attention,
    linear_attention_step,
)
from .neighborhood import (  # noqa: E402
    na1d,
    na2d,
    na3d,
    neighborhood_attention,
    neighborhood_attention_reference,
)
from .neighborhood.plan import NeighborhoodPlan, plan  # noqa: E402

__all__ = [
    "BlockLayout",
    "ElementMask",
    "NeighborhoodPlan",
    "__version__",
    "block_sparse",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "cpu_cached_bytes",
    "delta_rule",
    "delta_rule_step",
    "distributed",
    "empty_cpu_cache",
    "fft_conv",
    "fft_mix",
    "fourier_mix",
    "global_filter",
    "info",
    "linear_attention",
    "linear_attention_step",
    "linear_scan",
    "na1d",
    "na2d",
    "na3d",
    "neighborhood_attention",
    "neighborhood",
    "neighborhood_attention_reference",
    "nn",
    "patterns",
    "plan",
    "spectral_gate",
]
