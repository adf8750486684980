"""Sparse-attention pattern builders: block-sparse layouts for the mechanisms in PAPERS.md."""

from .grid import MultiAxisPattern, multi_axis, multi_axis_mask_mod
from .permuted import PermutedBlocks, permuted_blocks, permuted_blocks_mask_mod, segment_key_order
from .topk import select_topk_blocks, topk_block_scores, topk_blocks

__all__ = [
    "MultiAxisPattern",
    "PermutedBlocks",
    "multi_axis",
    "multi_axis_mask_mod",
    "permuted_blocks",
    "permuted_blocks_mask_mod",
    "segment_key_order",
    "select_topk_blocks",
    "topk_block_scores",
    "topk_blocks",
]
