"""tokenmix.patterns.radial against the token mask of Radial Attention's reference code.

The expected mask is built here frame pair by frame pair with the reference's own float
expressions (mit-han-lab/radial-attention, attn_mask.py: get_window_width and
get_diagonal_split_mask, before its block rounding), not with the builder's integer forms:
query (i, r) keeps key (j, c) when ``j < sinks`` or the pair is kept by the split rule and
``|r - c| <= width``.
"""

from __future__ import annotations

import random

import pytest
import torch
from pattern_checks import MaxTensorSize, check_attention, check_layout
from tokenmix import patterns


def pair_rule(i, j, s, decay, model_type, threshold):
    """(kept, width) of frame pair (i, j) as the reference computes them."""
    dt = abs(i - j)
    group = dt.bit_length()
    decay_length = 2 ** s.bit_length() / 2**group
    if decay_length >= threshold:
        kept = True
    else:
        kept = dt % int(threshold / decay_length) == 0
    if model_type == "wan" and dt < 1:
        width = s
    elif model_type == "wan" and dt == 1:
        width = s // 2
    elif model_type == "hunyuan" and dt <= 1:
        width = s
    else:
        length = 2 ** s.bit_length() / 2**group * decay
        width = length if length >= threshold else threshold
    return kept, width


def radial_formula(frames, s, decay, sinks, model_type, threshold):
    T = frames * s
    keep = torch.zeros(T, T, dtype=torch.bool)
    r = torch.arange(s).view(-1, 1)
    c = torch.arange(s).view(1, -1)
    for i in range(frames):
        for j in range(frames):
            if j < sinks:
                local = torch.ones(s, s, dtype=torch.bool)
            else:
                kept, width = pair_rule(i, j, s, decay, model_type, threshold)
                local = ((c - r).abs() <= width) & kept
            keep[i * s : (i + 1) * s, j * s : (j + 1) * s] = local
    return keep


def radial_case(seed):
    rng = random.Random(500 + seed)
    frames = rng.randint(1, 12)
    s = rng.randint(1, 60)
    threshold = rng.choice([1, 2, 4, 8, 16, 128, rng.randint(1, 40)])
    return (
        frames,
        s,
        rng.choice([0.5, 1.0, 1.7]),
        rng.randint(0, min(2, frames)),
        rng.choice(["hunyuan", "wan"]),
        threshold,
        rng.choice([16, 32, 64]),
    )


CASES = [radial_case(s) for s in range(12)] + [
    (8, 64, 1.0, 0, "hunyuan", 16, 32),
    (10, 48, 1.0, 1, "wan", 8, 32),  # frames straddle blocks
    (16, 20, 0.5, 0, "hunyuan", 4, 64),  # several frames per block
]


@pytest.mark.parametrize("frames,s,decay,sinks,model_type,threshold,block", CASES, ids=str)
def test_radial_matches_reference_token_mask(frames, s, decay, sinks, model_type, threshold, block):
    kwargs = dict(decay=decay, sinks=sinks, model_type=model_type, threshold=threshold)
    layout = patterns.radial(frames, s, block_size=block, **kwargs)
    expected = radial_formula(frames, s, decay, sinks, model_type, threshold)[None]
    check_layout(layout, expected, patterns.radial_mask_mod(frames, s, **kwargs), block_size=block)


@pytest.mark.parametrize("s,model_type", [(3840, "hunyuan"), (1560, "wan"), (1000, "hunyuan")])
def test_radial_widths_at_model_sizes(s, model_type):
    # Frame sizes of HunyuanVideo (3840 tokens) and Wan 2.1 (1560) at 30 frames.
    widths = patterns.radial_widths(30, s, decay=1.0, model_type=model_type, threshold=128)
    for dt, w in enumerate(widths):
        kept, width = pair_rule(0, dt, s, 1.0, model_type, 128)
        assert w == (int(width) if kept else -1), dt
    # The band halves each time the distance doubles (until the threshold).
    assert widths[2] == 2 ** s.bit_length() // 4 and widths[4] == widths[2] // 2


def test_radial_attention():
    layout = patterns.radial(6, 30, sinks=1, model_type="wan", threshold=4, block_size=32)
    check_attention(layout, radial_formula(6, 30, 1.0, 1, "wan", 4)[None])


def test_radial_is_sparse_far_from_the_diagonal():
    # 16 frames of 256 tokens: dense near the diagonal, bands and dropped pairs far from it.
    layout = patterns.radial(16, 256, threshold=64, block_size=64)
    status = layout.block_status()[0, 0]
    assert bool((status[:8, :8] == 2).all())  # frames 0-1: whole
    assert (status == 0).float().mean() > 0.3
    assert layout.mask_bits is not None


def test_radial_never_makes_a_t_by_t_tensor():
    T = 8 * 1024
    with MaxTensorSize() as sizes:
        layout = patterns.radial(8, 1024, sinks=1, model_type="wan")
    assert layout.seq_lengths == (T, T)
    assert sizes.largest < T * T // 4, f"a tensor of {sizes.largest} elements (T*T = {T * T})"


def test_radial_errors_name_the_argument():
    with pytest.raises(ValueError, match="frames must be >= 1"):
        patterns.radial(0, 16)
    with pytest.raises(ValueError, match="tokens_per_frame must be >= 1"):
        patterns.radial(4, 0)
    with pytest.raises(ValueError, match="decay must be > 0"):
        patterns.radial(4, 16, decay=0.0)
    with pytest.raises(TypeError, match="decay must be a real number"):
        patterns.radial(4, 16, decay="1")
    with pytest.raises(ValueError, match="sinks .* must be <= frames"):
        patterns.radial(4, 16, sinks=5)
    with pytest.raises(ValueError, match="model_type must be 'hunyuan' or 'wan'"):
        patterns.radial(4, 16, model_type="mochi")
    with pytest.raises(ValueError, match="threshold must be >= 1"):
        patterns.radial(4, 16, threshold=0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        patterns.radial(4, 16, block_size=-2)
    with pytest.raises(ValueError, match="frames must be >= 1"):
        patterns.radial_mask_mod(0, 16)
