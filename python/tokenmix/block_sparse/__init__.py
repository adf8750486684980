"""Block-sparse attention (FlexAttention ``BlockMask`` semantics) on fused CPU and CUDA kernels."""

from .functional import block_sparse_attention
from .layout import BlockLayout
from .mask import ElementMask
from .modules import BlockSparseAttention
from .reference import block_sparse_attention_reference

__all__ = [
    "BlockLayout",
    "BlockSparseAttention",
    "ElementMask",
    "block_sparse_attention",
    "block_sparse_attention_reference",
]
