"""tokenmix layers (``torch.nn.Module``)."""

from .linear_scan.modules import GatedDeltaNet, LinearAttention
from .neighborhood.modules import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)

__all__ = [
    "GatedDeltaNet",
    "LinearAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
]
