"""Pieces shared by the pattern builders: argument checks, block geometry, layout assembly.

A builder classifies every (query block, key block) pair as *skipped* (the rule keeps no
element), *full* (it keeps every element) or *partial*, from interval arithmetic on the block's
corners (never per element), then hands the table to :meth:`BlockLayout.from_block_status`.
Partial blocks get their elements either from a structured :class:`ElementMask` (evaluated in the
kernels) or from the pattern's ``mask_mod``, evaluated once per partial block into a bitmask.

The classification may be conservative in one direction only: a pair is *full* only when every
element is kept and *skipped* only when none is; anything else is *partial*, and the element
rule then decides exactly. So the layouts are exact whatever the classification misses; it
only costs mask work.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import as_int, require_bool
from ..block_sparse.layout import BlockLayout, MaskMod
from ..block_sparse.mask import ElementMask

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "as_device",
    "band_any_all",
    "block_bounds",
    "check_block_size",
    "check_causal",
    "check_length",
    "layout_from_tables",
    "nonnegative_int",
    "positive_int",
    "real_number",
    "structured_layout",
    "with_name",
]

# The block size of every builder unless given: FlexAttention's default BLOCK_SIZE and the
# natural tile of the CUDA kernels (and Radial Attention's reference block).
DEFAULT_BLOCK_SIZE = 128


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1, else an error naming ``name``."""
    value = as_int(value, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def nonnegative_int(value: Any, name: str) -> int:
    """``value`` as an int >= 0, else an error naming ``name``."""
    value = as_int(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def real_number(value: Any, name: str) -> float:
    """``value`` as a finite Python float (ints and numpy floats accepted; not bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_length(value: Any, name: str = "T") -> int:
    """A sequence length: an int >= 1."""
    return positive_int(value, name)


def check_block_size(value: Any) -> int:
    """``block_size``: an int >= 1 (one size for query and key blocks)."""
    if isinstance(value, (tuple, list)):
        raise TypeError(
            f"block_size must be one int (the same for query and key blocks), got {value!r}"
        )
    return positive_int(value, "block_size")


def check_causal(value: Any) -> bool:
    return require_bool(value, "causal")


def as_device(device: Any) -> torch.device:
    """``device`` (None: the CPU) as a ``torch.device``."""
    if device is None:
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"device must be a torch.device or a device string: {exc}") from None


def block_bounds(length: int, block: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """First and last (inclusive) token of each block of ``[0, length)``, as int64."""
    start = torch.arange(math.ceil(length / block), device=device, dtype=torch.int64) * block
    return start, torch.clamp(start + block, max=length) - 1


def band_any_all(
    q0: Tensor, q1: Tensor, k0: Tensor, k1: Tensor, lo: Any, hi: Any
) -> tuple[Tensor, Tensor]:
    """Whether the rule ``lo <= q - k <= hi`` keeps any / every element of the rectangles
    ``[q0, q1] x [k0, k1]`` (inclusive bounds, broadcasting tensors; ``lo``/``hi`` numbers or
    tensors). ``q - k`` takes every integer between its extremes on a rectangle, so both are
    exact."""
    dmin, dmax = q0 - k1, q1 - k0
    return (dmax >= lo) & (dmin <= hi), (dmin >= lo) & (dmax <= hi)


def layout_from_tables(
    any_keep: Tensor,
    all_keep: Tensor,
    *,
    block_size: int,
    length: int,
    mask_mod: MaskMod | None,
    element_mask: ElementMask | None = None,
) -> BlockLayout:
    """A layout from ``[num_q_blocks, num_kv_blocks]`` or ``[H, nq, nk]`` block tables: full
    where ``all_keep``, partial where only ``any_keep``, skipped elsewhere. Partial blocks use
    ``element_mask`` if given, else ``mask_mod`` evaluated once per partial block into bits."""
    all_keep = all_keep & any_keep
    status = torch.where(all_keep, 2, torch.where(any_keep, 1, 0)).to(torch.int8)
    while status.dim() < 4:
        status = status.unsqueeze(0)
    has_partial = bool((status == 1).any())
    return BlockLayout.from_block_status(
        status,
        block_size=block_size,
        seq_lengths=(length, length),
        element_mask=element_mask if has_partial else None,
        mask_bits_fn=mask_mod if has_partial and element_mask is None else None,
    )


def structured_layout(
    rule: ElementMask, length: int, block_size: int, device: torch.device
) -> BlockLayout:
    """The layout of a structured rule (full blocks where it keeps everything), on ``device``."""
    if rule.q_doc is not None:
        rule = rule.to(device)
    return BlockLayout.from_element_mask(rule, length, length, block_size=block_size).to(device)


def with_name(fn: Callable, name: str, doc: str | None = None) -> Callable:
    """``fn`` renamed (mask_mods show their pattern's name in errors and reprs)."""
    fn.__name__ = fn.__qualname__ = name
    if doc is not None:
        fn.__doc__ = doc
    return fn
