"""Sparse-attention pattern library: builders of :class:`tokenmix.BlockLayout` layouts.

Every builder returns a :class:`tokenmix.BlockLayout` (``layout.to_block_mask()`` gives the
FlexAttention ``BlockMask``) in the cheapest exact representation: full blocks where every
element is kept, a structured :class:`tokenmix.ElementMask` where it expresses the pattern,
else partial blocks with a bitmask from the pattern's ``mask_mod`` (evaluated once per partial
block, never over ``T x T``). Each builder has a matching Flex ``mask_mod`` factory named
``<builder>_mask_mod`` where the pattern is a rule of the indices. ``multi_axis`` and
``permuted_blocks`` also return token permutations, ``topk_blocks`` and ``permuted_blocks``
select blocks from the data. Exact rules: docs/patterns.md and each builder's docstring.
"""

from .documents import document, document_mask_mod, prefix_lm, prefix_lm_mask_mod
from .grid import MultiAxisPattern, multi_axis, multi_axis_mask_mod
from .layers_b import MultiAxisAttention2D, TopKBlockAttention
from .modules import SlidingWindowAttention, SparseAttention
from .offsets import dilated, dilated_mask_mod, power_attention, power_attention_mask_mod
from .permuted import PermutedBlocks, permuted_blocks, permuted_blocks_mask_mod, segment_key_order
from .topk import select_topk_blocks, topk_block_scores, topk_blocks
from .video import radial, radial_mask_mod, radial_widths
from .windows import (
    elastic_window_sizes,
    elastic_windows,
    elastic_windows_mask_mod,
    per_head_windows,
    per_head_windows_mask_mod,
    sliding_window,
    sliding_window_mask_mod,
)

__all__ = [
    "MultiAxisAttention2D",
    "MultiAxisPattern",
    "PermutedBlocks",
    "SlidingWindowAttention",
    "SparseAttention",
    "TopKBlockAttention",
    "dilated",
    "dilated_mask_mod",
    "document",
    "document_mask_mod",
    "elastic_window_sizes",
    "elastic_windows",
    "elastic_windows_mask_mod",
    "multi_axis",
    "multi_axis_mask_mod",
    "per_head_windows",
    "per_head_windows_mask_mod",
    "permuted_blocks",
    "permuted_blocks_mask_mod",
    "power_attention",
    "power_attention_mask_mod",
    "prefix_lm",
    "prefix_lm_mask_mod",
    "radial",
    "radial_mask_mod",
    "radial_widths",
    "segment_key_order",
    "select_topk_blocks",
    "sliding_window",
    "sliding_window_mask_mod",
    "topk_block_scores",
    "topk_blocks",
]
