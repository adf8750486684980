"""Generalized neighborhood attention (sliding, strided and blocked windows)."""

from .functional import na1d, na2d, na3d, neighborhood_attention
from .reference import neighborhood_attention_reference

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "neighborhood_attention_reference"]
