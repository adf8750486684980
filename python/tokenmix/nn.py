"""tokenmix layers (``torch.nn.Module``)."""

from .block_sparse.modules import BlockSparseAttention
from .fft_mix.modules import (
    FNetMixing,
    GlobalFilter2D,
    HyenaFilter,
    HyenaOperator,
    SpectralGate,
)
from .linear_scan.modules import GatedDeltaNet, LinearAttention
from .neighborhood.modules import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
from .patterns.layers_b import MultiAxisAttention2D, TopKBlockAttention
from .patterns.modules import SlidingWindowAttention, SparseAttention

__all__ = [
    "BlockSparseAttention",
    "FNetMixing",
    "GatedDeltaNet",
    "GlobalFilter2D",
    "HyenaFilter",
    "HyenaOperator",
    "LinearAttention",
    "MultiAxisAttention2D",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "SlidingWindowAttention",
    "SparseAttention",
    "SpectralGate",
    "TopKBlockAttention",
]
