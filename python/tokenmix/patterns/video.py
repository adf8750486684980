"""Radial Attention's static spatio-temporal mask for video tokens.

Radial Attention (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay
for Long Video Generation"; reference code mit-han-lab/radial-attention, ``attn_mask.py``)
lets each token attend spatially nearby tokens of other frames, with a band that halves each
time the temporal distance doubles, and drops whole frame pairs once the band is narrower than
a threshold (keeping every ``split``-th distance), so total compute is ``O(n log n)``.

Tokens are frame-major: token ``t`` is spatial position ``t % S`` of frame ``t // S``, with
``S = tokens_per_frame``. The exact rule is in :func:`radial`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..block_sparse.layout import BlockLayout, MaskMod
from ._common import (
    DEFAULT_BLOCK_SIZE,
    as_device,
    check_block_size,
    layout_from_tables,
    nonnegative_int,
    positive_int,
    real_number,
)

__all__ = ["radial", "radial_mask_mod", "radial_widths"]

ModelType = Literal["hunyuan", "wan"]

# Bound (elements) on one chunk of the piece-pair classification.
_PAIR_BUDGET = 1 << 22


def _check(frames, tokens_per_frame, decay, sinks, model_type, threshold):
    frames = positive_int(frames, "frames")
    tokens_per_frame = positive_int(tokens_per_frame, "tokens_per_frame")
    decay = real_number(decay, "decay")
    if decay <= 0:
        raise ValueError(f"decay must be > 0, got {decay}")
    sinks = nonnegative_int(sinks, "sinks")
    if sinks > frames:
        raise ValueError(f"sinks (sink frames) must be <= frames ({frames}), got {sinks}")
    if model_type not in ("hunyuan", "wan"):
        raise ValueError(f"model_type must be 'hunyuan' or 'wan', got {model_type!r}")
    threshold = positive_int(threshold, "threshold")
    return frames, tokens_per_frame, decay, sinks, model_type, threshold


def radial_widths(
    frames: int,
    tokens_per_frame: int,
    *,
    decay: float = 1.0,
    model_type: ModelType = "hunyuan",
    threshold: int = 128,
) -> list[int]:
    """The spatial band half-width of each temporal distance ``dt = 0 .. frames - 1``, or -1
    where the frame pair is dropped (see :func:`radial` for the formula)."""
    frames, s, decay, _, model_type, threshold = _check(
        frames, tokens_per_frame, decay, 0, model_type, threshold
    )
    p = 2 ** s.bit_length()
    widths = []
    for dt in range(frames):
        g = dt.bit_length()
        # Frame pairs kept: all while the undecayed band 2^bl(S) / 2^g reaches the threshold,
        # then every split-th distance (integer forms of the reference's float expressions).
        if p >= threshold << g:
            kept = True
        else:
            split = (threshold << g) // p
            kept = dt % split == 0
        if not kept:
            widths.append(-1)
        elif dt == 0 or (dt == 1 and model_type == "hunyuan"):
            widths.append(s)
        elif dt == 1:  # wan
            widths.append(s // 2)
        else:
            widths.append(max(math.floor(p / 2**g * decay), threshold))
    return widths


def radial_mask_mod(
    frames: int,
    tokens_per_frame: int,
    *,
    decay: float = 1.0,
    sinks: int = 0,
    model_type: ModelType = "hunyuan",
    threshold: int = 128,
    device: torch.device | str | None = None,
) -> MaskMod:
    """The Flex ``mask_mod`` of :func:`radial` (same arguments and rule)."""
    frames, s, decay, sinks, model_type, threshold = _check(
        frames, tokens_per_frame, decay, sinks, model_type, threshold
    )
    table = torch.tensor(
        radial_widths(frames, s, decay=decay, model_type=model_type, threshold=threshold),
        dtype=torch.int64,
        device=as_device(device),
    )

    def radial_mask_mod(b, h, q_idx, kv_idx):
        i, j = q_idx // s, kv_idx // s
        width = table.to(q_idx.device)[(i - j).abs().clamp(max=frames - 1)]
        near = ((q_idx - i * s) - (kv_idx - j * s)).abs() <= width
        return (j < sinks) | near

    return radial_mask_mod


def _pieces(length: int, block: int, frame: int, device: torch.device):
    """``[0, length)`` cut at block and frame boundaries: each piece's block, frame and first
    and last spatial position (inclusive)."""
    cuts = torch.cat(
        [
            torch.arange(0, length, block, device=device),
            torch.arange(0, length, frame, device=device),
            torch.tensor([length], device=device),
        ]
    ).unique()  # sorted
    start, end = cuts[:-1], cuts[1:] - 1
    f = start // frame
    return start // block, f, start - f * frame, end - f * frame


def radial(
    frames: int,
    tokens_per_frame: int,
    *,
    decay: float = 1.0,
    sinks: int = 0,
    model_type: ModelType = "hunyuan",
    threshold: int = 128,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """Radial Attention's static mask over ``T = frames * tokens_per_frame`` video tokens.

    Token ``t`` is spatial position ``t % S`` of frame ``t // S`` (``S = tokens_per_frame``).
    Query ``(i, r)`` (frame, position) keeps key ``(j, c)`` when::

        j < sinks  or  |r - c| <= W(|i - j|)

    with ``W(dt) = -1`` (pair dropped) or the band half-width of temporal distance ``dt``
    (:func:`radial_widths`). With ``g = bit_length(dt)`` (``floor(log2 dt) + 1``, 0 for 0) and
    ``P = 2^bit_length(S)`` (the smallest power of two above ``S``):

    * the pair is dropped unless ``P >= threshold * 2^g`` or
      ``dt % floor(threshold * 2^g / P) == 0`` (far frames: every split-th distance);
    * otherwise ``W = S`` (the whole frame) for ``dt == 0``, and for ``dt == 1`` with
      ``model_type='hunyuan'``; ``W = S // 2`` for ``dt == 1`` with ``'wan'``;
    * else ``W = max(floor(P / 2^g * decay), threshold)``.

    This is the token mask of the reference's ``gen_log_mask_shrinked`` (``get_window_width``
    and ``get_diagonal_split_mask``) with ``decay`` its ``decay_factor``, ``threshold`` its
    ``block_size`` width floor (and its hard-coded split threshold 128; both 128 there by
    default), and ``sinks`` sink frames (the reference keeps frame 0 whole for every query
    frame with ``model_type='wan'``, i.e. ``sinks=1``; none for Hunyuan). Differences:

    * the reference then rounds the mask to 128 x 128 blocks with a density heuristic
      (``shrinkMaskStrict``: a block is kept whole when over 60% of its non-empty columns are
      more than 1/3 full) and runs the kept blocks whole; here the token mask is kept exactly
      (partial blocks carry a bitmask), at any ``block_size``;
    * text tokens appended after the video (dense both ways in the reference's Hunyuan path)
      are not part of this layout;
    * ``T`` is exactly ``frames * tokens_per_frame`` (the reference floors
      ``video_token_num / num_frame``).

    Representation: full blocks where every element is kept (inside the sink frames and the
    near-diagonal frame pairs), partial blocks with a bitmask along the bands; the block
    classification cuts the sequence at block and frame boundaries, costing
    ``O((T / block_size + frames)^2)``, never per element.

    Example::

        >>> import tokenmix
        >>> tokenmix.patterns.radial_widths(8, 64, threshold=16)
        [64, 64, 32, 32, 16, 16, 16, 16]
        >>> layout = tokenmix.patterns.radial(8, 64, threshold=16, block_size=32)
        >>> layout.seq_lengths
        (512, 512)
    """
    frames, s, decay, sinks, model_type, threshold = _check(
        frames, tokens_per_frame, decay, sinks, model_type, threshold
    )
    block_size = check_block_size(block_size)
    device = as_device(device)
    T = frames * s
    table = torch.tensor(
        radial_widths(frames, s, decay=decay, model_type=model_type, threshold=threshold),
        dtype=torch.int64,
        device=device,
    )
    blk, frm, r0, r1 = _pieces(T, block_size, s, device)
    n = -(-T // block_size)
    pieces = blk.numel()
    any_flat = torch.zeros(n * n, dtype=torch.int8, device=device)
    all_flat = torch.ones(n * n, dtype=torch.int8, device=device)
    rows = max(1, _PAIR_BUDGET // pieces)
    kb, j, c0, c1 = (x.view(1, -1) for x in (blk, frm, r0, r1))
    for p0 in range(0, pieces, rows):
        qb, i, a0, a1 = (x[p0 : p0 + rows].view(-1, 1) for x in (blk, frm, r0, r1))
        w = table[(i - j).abs()]
        fk = w >= 0
        emin, emax = c0 - a1, c1 - a0  # c - r over the piece pair
        sink = j < sinks
        any_keep = sink | (fk & (emax >= -w) & (emin <= w))
        all_keep = sink | (fk & (emin >= -w) & (emax <= w))
        index = (qb * n + kb).expand_as(any_keep).reshape(-1)
        any_flat.scatter_reduce_(0, index, any_keep.to(torch.int8).reshape(-1), "amax")
        all_flat.scatter_reduce_(0, index, all_keep.to(torch.int8).reshape(-1), "amin")
    return layout_from_tables(
        any_flat.view(n, n).bool(),
        all_flat.view(n, n).bool(),
        block_size=block_size,
        length=T,
        mask_mod=radial_mask_mod(
            frames,
            s,
            decay=decay,
            sinks=sinks,
            model_type=model_type,
            threshold=threshold,
            device=device,
        ),
    )
