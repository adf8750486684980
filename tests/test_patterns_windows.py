"""tokenmix.patterns: sliding_window, per_head_windows, elastic_windows.

Expected masks come from the documented formulas, written here on token index grids:
causal ``0 <= q - k and (q - k < window or k < sinks)``, non-causal
``|q - k| < window or k < sinks``; MoA's windows ``max(1, floor(alpha + beta * T))``.
"""

from __future__ import annotations

import math
import random

import pytest
import tokenmix
import torch
from pattern_checks import MaxTensorSize, check_attention, check_layout
from tokenmix import patterns


def window_formula(T: int, window: int, sinks: int, causal: bool) -> torch.Tensor:
    q = torch.arange(T).view(-1, 1)
    k = torch.arange(T).view(1, -1)
    if causal:
        return (k <= q) & ((q - k < window) | (k < sinks))
    return ((q - k).abs() < window) | (k < sinks)


def window_case(seed: int):
    rng = random.Random(seed)
    T = rng.randint(1, 300)
    block = rng.choice([16, 32, 64, 128])
    window = rng.choice([1, rng.randint(1, 40), rng.randint(1, T + 20)])
    sinks = rng.choice([0, 1, 2, rng.randint(0, 50)])
    causal = rng.random() < 0.7
    return T, window, sinks, causal, block


CASES = [window_case(s) for s in range(12)] + [
    (200, 50, 0, True, 32),  # structured band
    (200, 50, 1, True, 32),  # one sink: still structured
    (203, 37, 9, True, 16),  # sinks across a block boundary: causal prefix
    (100, 8, 40, True, 16),  # more sinks than the window, inside the diagonal blocks
    (130, 20, 5, False, 64),  # non-causal with sinks: structured prefix
    (97, 500, 3, True, 32),  # window longer than the sequence
]


@pytest.mark.parametrize("T,window,sinks,causal,block", CASES, ids=str)
def test_sliding_window_matches_formula(T, window, sinks, causal, block):
    layout = patterns.sliding_window(T, window, causal, sinks, block_size=block)
    expected = window_formula(T, window, sinks, causal)[None]
    check_layout(
        layout,
        expected,
        patterns.sliding_window_mask_mod(window, causal, sinks),
        block_size=block,
    )
    # The representation the docstring promises: a structured rule, never a bitmask.
    assert layout.mask_bits is None
    if layout.kv_num_blocks.any():
        assert layout.element_mask.prefix_causal == (causal and sinks > 0)


@pytest.mark.parametrize(
    "T,window,sinks,causal,block", [(203, 37, 9, True, 16), (150, 30, 4, False, 32)], ids=str
)
def test_sliding_window_attention(T, window, sinks, causal, block):
    layout = patterns.sliding_window(T, window, causal, sinks, block_size=block)
    check_attention(layout, window_formula(T, window, sinks, causal)[None])


def test_sliding_window_default_block_size_and_device():
    layout = patterns.sliding_window(300, 64)
    assert layout.block_size == (128, 128) and layout.device == torch.device("cpu")
    layout = patterns.sliding_window(300, 64, sinks=4, device="cpu")
    assert layout.device == torch.device("cpu")


def per_head_formula(T, windows, sinks, causal):
    sinks = sinks if isinstance(sinks, list) else [sinks] * len(windows)
    return torch.stack(
        [window_formula(T, w, s, causal) for w, s in zip(windows, sinks, strict=True)]
    )


def per_head_case(seed: int):
    rng = random.Random(100 + seed)
    T = rng.randint(1, 260)
    block = rng.choice([16, 32, 64])
    heads = rng.choice([1, 2, 4])
    windows = [rng.randint(1, T + 10) for _ in range(heads)]
    sinks = rng.choice([0, rng.randint(0, 20), [rng.randint(0, 20) for _ in range(heads)]])
    causal = rng.random() < 0.7
    return T, windows, sinks, causal, block


PER_HEAD = [per_head_case(s) for s in range(8)] + [
    (190, [24, 24, 24], 1, True, 32),  # equal windows: structured, repeated per head
    (190, [16, 48, 190, 1], [0, 3, 40, 2], True, 32),
]


@pytest.mark.parametrize("T,windows,sinks,causal,block", PER_HEAD, ids=str)
def test_per_head_windows_matches_formula(T, windows, sinks, causal, block):
    layout = patterns.per_head_windows(T, windows, sinks, causal, block_size=block)
    expected = per_head_formula(T, windows, sinks, causal)
    mask_mod = patterns.per_head_windows_mask_mod(windows, sinks, causal)
    check_layout(layout, expected, mask_mod, block_size=block)


def test_per_head_windows_equal_heads_are_structured():
    layout = patterns.per_head_windows(190, [24, 24, 24], 1, block_size=32)
    assert layout.heads == 3 and layout.element_mask is not None and layout.mask_bits is None
    layout = patterns.per_head_windows(190, [24, 25, 24], 1, block_size=32)
    assert layout.element_mask is None and layout.mask_bits is not None


def test_per_head_windows_attention():
    T, windows, sinks = 150, [8, 40, 150, 1], [0, 3, 2, 5]
    layout = patterns.per_head_windows(T, windows, sinks, block_size=32)
    check_attention(layout, per_head_formula(T, windows, sinks, True))


def test_per_head_windows_from_a_tensor():
    a = patterns.per_head_windows(100, torch.tensor([4, 9]), block_size=16)
    b = patterns.per_head_windows(100, [4, 9], block_size=16)
    assert torch.equal(a.dense_mask(), b.dense_mask())


def moa_windows(T, alpha, beta):
    return [max(1, math.floor(a + b * T)) for a, b in zip(alpha, beta, strict=True)]


@pytest.mark.parametrize("seed", range(6))
def test_elastic_windows_matches_formula(seed):
    rng = random.Random(200 + seed)
    T = rng.randint(1, 260)
    heads = rng.choice([1, 2, 3, 4])
    alpha = [rng.choice([0.0, rng.uniform(-64, 64), -1024.0, 16.0]) for _ in range(heads)]
    beta = [rng.choice([0.0, 0.125, 0.5, 0.875, 1.0, rng.random()]) for _ in range(heads)]
    sinks = rng.choice([0, 4])
    causal = rng.random() < 0.8
    block = rng.choice([16, 32, 64])
    layout = patterns.elastic_windows(T, alpha, beta, sinks, causal, block_size=block)
    windows = moa_windows(T, alpha, beta)
    assert patterns.elastic_window_sizes(T, alpha, beta) == windows
    expected = per_head_formula(T, windows, sinks, causal)
    mask_mod = patterns.elastic_windows_mask_mod(T, alpha, beta, sinks, causal)
    check_layout(layout, expected, mask_mod, block_size=block)


def test_elastic_window_sizes_grow_with_length():
    # MoA-style (alpha, beta): spans at 2k, 4k and 8k tokens.
    alpha, beta = [-1024.0, 0.0, 4096.0], [0.875, 0.125, 0.0]
    assert patterns.elastic_window_sizes(2048, alpha, beta) == [768, 256, 4096]
    assert patterns.elastic_window_sizes(4096, alpha, beta) == [2560, 512, 4096]
    assert patterns.elastic_window_sizes(8192, alpha, beta) == [6144, 1024, 4096]
    # Negative spans are clamped to the query itself.
    assert patterns.elastic_window_sizes(100, [-1024.0], [0.5]) == [1]


def test_elastic_windows_attention():
    T, alpha, beta = 140, [2.0, -30.0, 0.0, 8.0], [0.1, 0.5, 1.0, 0.0]
    layout = patterns.elastic_windows(T, alpha, beta, sinks=3, block_size=32)
    check_attention(layout, per_head_formula(T, moa_windows(T, alpha, beta), 3, True))


@pytest.mark.parametrize(
    "build",
    [
        lambda T: patterns.sliding_window(T, 1000, sinks=4),
        lambda T: patterns.sliding_window(T, 1000, causal=False),
        lambda T: patterns.per_head_windows(T, [100, 700], sinks=[4, 0]),
        lambda T: patterns.elastic_windows(T, [0.0, 64.0], [0.05, 0.0], sinks=64),
    ],
    ids=["sinks", "non-causal", "per-head", "elastic"],
)
def test_builders_never_make_a_t_by_t_tensor(build):
    T = 8192
    with MaxTensorSize() as sizes:
        layout = build(T)
    assert layout.seq_lengths == (T, T)
    assert sizes.largest < T * T // 4, f"a tensor of {sizes.largest} elements (T*T = {T * T})"


def test_window_errors_name_the_argument():
    sw = patterns.sliding_window
    with pytest.raises(ValueError, match="T must be >= 1"):
        sw(0, 4)
    with pytest.raises(ValueError, match="window must be >= 1"):
        sw(100, 0)
    with pytest.raises(TypeError, match="window must contain ints, not bool"):
        sw(100, True)
    with pytest.raises(TypeError, match="window must be an int"):
        sw(100, 2.5)
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        sw(100, 4, sinks=-1)
    with pytest.raises(TypeError, match="causal must be a bool"):
        sw(100, 4, causal="yes")
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        sw(100, 4, block_size=0)
    with pytest.raises(TypeError, match="block_size must be one int"):
        sw(100, 4, block_size=(32, 32))
    with pytest.raises(ValueError, match="device must be"):
        sw(100, 4, device="nowhere")
    with pytest.raises(ValueError, match="window must be >= 1"):
        patterns.sliding_window_mask_mod(0)
    ph = patterns.per_head_windows
    with pytest.raises(ValueError, match="windows must not be empty"):
        ph(100, [])
    with pytest.raises(ValueError, match=r"windows\[1\] must be >= 1"):
        ph(100, [4, 0])
    with pytest.raises(TypeError, match="windows must be a sequence"):
        ph(100, 4)
    with pytest.raises(ValueError, match="windows must be one-dimensional"):
        ph(100, torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="sinks has 3 entries but windows has 2"):
        ph(100, [4, 8], [0, 1, 2])
    with pytest.raises(ValueError, match=r"sinks\[0\] must be >= 0"):
        ph(100, [4, 8], [-1, 1])
    ew = patterns.elastic_windows
    with pytest.raises(ValueError, match="alpha has 2 entries but beta has 1"):
        ew(100, [0.0, 1.0], [0.5])
    with pytest.raises(ValueError, match=r"beta\[0\] must be finite"):
        ew(100, [0.0], [float("nan")])
    with pytest.raises(TypeError, match=r"alpha\[0\] must be a real number"):
        ew(100, ["a"], [0.5])
    with pytest.raises(ValueError, match="alpha must not be empty"):
        ew(100, [], [])
    with pytest.raises(ValueError, match="T must be >= 1"):
        patterns.elastic_window_sizes(0, [1.0], [0.0])


def test_patterns_is_a_tokenmix_attribute():
    assert tokenmix.patterns is patterns
    assert callable(tokenmix.patterns.sliding_window)
