"""tokenmix.patterns: dilated and power_attention.

Expected masks from the documented formulas on token index grids: dilated keeps
``0 <= q - k < window * dilation`` (non-causal ``|q - k| < window * dilation``) with
``(q - k) % dilation == 0``; PowerAttention keeps ``d < window or d in {1, 2, 4, ...}`` with
``d = |u(q) - u(k)|`` in units (blocks or tokens), and ``k <= q`` when causal.
"""

from __future__ import annotations

import random

import pytest
import torch
from pattern_checks import MaxTensorSize, check_attention, check_layout
from tokenmix import patterns

POWERS = torch.tensor([2**i for i in range(24)])


def dilated_formula(T, window, dilation, causal):
    q = torch.arange(T).view(-1, 1)
    k = torch.arange(T).view(1, -1)
    d = q - k
    near = (d >= 0) & (d < window * dilation) if causal else d.abs() < window * dilation
    return near & (torch.remainder(d, dilation) == 0)


def dilated_case(seed):
    rng = random.Random(300 + seed)
    T = rng.randint(1, 260)
    return (
        T,
        rng.randint(1, 30),
        rng.choice([1, 2, 3, rng.randint(1, 40)]),
        rng.random() < 0.6,
        rng.choice([16, 32, 64]),
    )


DILATED = [dilated_case(s) for s in range(10)] + [(200, 8, 4, True, 32), (77, 5, 7, False, 16)]


@pytest.mark.parametrize("T,window,dilation,causal,block", DILATED, ids=str)
def test_dilated_matches_formula(T, window, dilation, causal, block):
    layout = patterns.dilated(T, window, dilation, causal, block_size=block)
    check_layout(
        layout,
        dilated_formula(T, window, dilation, causal)[None],
        patterns.dilated_mask_mod(window, dilation, causal),
        block_size=block,
    )
    if layout.kv_num_blocks.any():
        assert (layout.element_mask is not None) == (dilation == 1)


def test_dilated_attention():
    layout = patterns.dilated(150, 6, 5, False, block_size=32)
    check_attention(layout, dilated_formula(150, 6, 5, False)[None])


def power_formula(T, window, causal, granularity, block):
    q = torch.arange(T).view(-1, 1)
    k = torch.arange(T).view(1, -1)
    unit = block if granularity == "block" else 1
    d = (q // unit - k // unit).abs()
    keep = (d < window) | torch.isin(d, POWERS)
    return keep & (k <= q) if causal else keep


def power_case(seed):
    rng = random.Random(400 + seed)
    granularity = rng.choice(["block", "token"])
    block = rng.choice([8, 16, 32])
    T = rng.randint(1, 300)
    window = rng.randint(1, 4) if granularity == "block" else rng.randint(1, 40)
    return T, window, rng.random() < 0.7, granularity, block


POWER = [power_case(s) for s in range(10)] + [
    (1024, 2, True, "block", 64),
    (1000, 1, False, "block", 32),
    (300, 10, True, "token", 32),
]


@pytest.mark.parametrize("T,window,causal,granularity,block", POWER, ids=str)
def test_power_attention_matches_formula(T, window, causal, granularity, block):
    layout = patterns.power_attention(T, window, causal, granularity=granularity, block_size=block)
    expected = power_formula(T, window, causal, granularity, block)[None]
    mask_mod = patterns.power_attention_mask_mod(
        window, causal, granularity=granularity, block_size=block
    )
    check_layout(layout, expected, mask_mod, block_size=block)


def test_power_attention_block_granularity_needs_no_bits():
    # Full off-diagonal blocks and the structured causal rule on the diagonal: no bitmask.
    layout = patterns.power_attention(1000, 2, block_size=32)
    assert layout.mask_bits is None and layout.element_mask is not None
    status = layout.block_status()[0, 0]
    assert torch.equal((status == 1).nonzero()[:, 0], (status == 1).nonzero()[:, 1])
    assert patterns.power_attention(1000, 2, False, block_size=32).kv_num_blocks.sum() == 0
    # Each query block keeps O(window + log2(blocks)) key blocks.
    assert int((status > 0).sum(-1).max()) <= 2 + 5


def test_power_attention_reaches_two_to_the_d():
    # Token granularity, window 1: after d layers (d-fold boolean product) query T-1 reaches
    # every key within distance 2^d - 1.
    T = 130
    m = power_formula(T, 1, True, "token", 1).to(torch.int64)
    layout = patterns.power_attention(T, 1, granularity="token", block_size=16)
    assert torch.equal(layout.dense_mask()[0, 0].to(torch.int64), m)
    reach = m.clone()
    for depth in range(1, 8):
        row = reach[T - 1]
        assert bool((row[T - 1 - min(2**depth - 1, T - 1) :] > 0).all()), depth
        reach = (reach @ m).clamp(max=1)


@pytest.mark.parametrize("granularity", ["block", "token"])
def test_power_attention_attention(granularity):
    layout = patterns.power_attention(200, 2, granularity=granularity, block_size=16)
    check_attention(layout, power_formula(200, 2, True, granularity, 16)[None])


@pytest.mark.parametrize(
    "build",
    [
        lambda T: patterns.dilated(T, 64, 3),
        lambda T: patterns.power_attention(T, 2),
        lambda T: patterns.power_attention(T, 64, granularity="token"),
    ],
    ids=["dilated", "power-block", "power-token"],
)
def test_builders_never_make_a_t_by_t_tensor(build):
    T = 8192
    with MaxTensorSize() as sizes:
        layout = build(T)
    assert layout.seq_lengths == (T, T)
    assert sizes.largest < T * T // 4, f"a tensor of {sizes.largest} elements (T*T = {T * T})"


def test_offset_errors_name_the_argument():
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        patterns.dilated(100, 4, 0)
    with pytest.raises(ValueError, match="window must be >= 1"):
        patterns.dilated(100, 0, 2)
    with pytest.raises(ValueError, match="T must be >= 1"):
        patterns.dilated(-3, 4, 2)
    with pytest.raises(TypeError, match="causal must be a bool"):
        patterns.dilated(100, 4, 2, causal=1)
    with pytest.raises(ValueError, match="granularity must be 'block' or 'token'"):
        patterns.power_attention(100, 2, granularity="tokens")
    with pytest.raises(ValueError, match="window must be >= 1"):
        patterns.power_attention(100, 0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        patterns.power_attention_mask_mod(2, block_size=0)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        patterns.dilated_mask_mod(2, -1)
