"""tokenmix.patterns: document (packed sequences, cu_seqlens) and prefix_lm.

Expected masks from the documented formulas: ``doc(q) == doc(k)`` (document ``n`` holds
``cu_seqlens[n] <= t < cu_seqlens[n + 1]``; padding past ``cu_seqlens[-1]`` keeps nothing),
with ``k <= q`` when causal and ``q - k < window`` / ``|q - k| < window`` when a window is
given; prefix-LM ``k <= q or k < prefix_len``.
"""

from __future__ import annotations

import random

import pytest
import torch
from pattern_checks import MaxTensorSize, check_attention, check_layout
from tokenmix import patterns


def document_formula(cu, causal, window, T):
    doc = torch.full((T,), -1)
    for n in range(len(cu) - 1):
        doc[cu[n] : cu[n + 1]] = n
    q = torch.arange(T).view(-1, 1)
    k = torch.arange(T).view(1, -1)
    keep = (doc.view(-1, 1) == doc.view(1, -1)) & (doc.view(-1, 1) >= 0)
    if causal:
        keep &= k <= q
    if window is not None:
        keep &= (q - k < window) if causal else ((q - k).abs() < window)
    return keep


def document_case(seed):
    rng = random.Random(600 + seed)
    total = rng.randint(1, 280)
    docs = rng.randint(1, 8)
    cuts = sorted(rng.randint(0, total) for _ in range(docs - 1))  # repeats: empty documents
    cu = [0, *cuts, total]
    T = total + rng.choice([0, 0, rng.randint(1, 40)])
    window = rng.choice([None, None, rng.randint(1, 50)])
    return cu, rng.random() < 0.5, window, T, rng.choice([16, 32, 64])


DOCS = [document_case(s) for s in range(10)] + [
    ([0, 100, 250, 300], True, None, 300, 64),
    ([0, 64, 128, 256], False, None, 256, 64),  # documents on block boundaries: full blocks
    ([0, 50, 50, 120], True, 16, 150, 32),  # an empty document, a window, padding
]


@pytest.mark.parametrize("cu,causal,window,T,block", DOCS, ids=str)
def test_document_matches_formula(cu, causal, window, T, block):
    layout = patterns.document(cu, causal, window, T=T, block_size=block)
    check_layout(
        layout,
        document_formula(cu, causal, window, T)[None],
        patterns.document_mask_mod(cu, causal, window, T=T),
        block_size=block,
    )
    assert layout.element_mask is not None or not layout.kv_num_blocks.any()
    assert layout.mask_bits is None


def test_document_blocks_inside_one_document_are_full():
    layout = patterns.document([0, 64, 128, 256], block_size=64)
    status = layout.block_status()[0, 0]
    assert status.tolist() == [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]]


def test_document_accepts_a_tensor_and_is_structured_in_flex():
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    a = patterns.document(cu, causal=True, block_size=16)
    b = patterns.document([0, 30, 70], causal=True, block_size=16)
    assert torch.equal(a.dense_mask(), b.dense_mask())
    # The mask_mod is the structured rule's: a Flex BlockMask made from it converts back to it.
    from tokenmix import BlockLayout
    from torch.nn.attention.flex_attention import create_block_mask

    mod = patterns.document_mask_mod(cu, causal=True)
    layout = BlockLayout.from_block_mask(create_block_mask(mod, None, None, 70, 70, "cpu", 16))
    assert layout.element_mask is not None and layout.mask_bits is None


@pytest.mark.parametrize("causal", [True, False])
def test_document_attention(causal):
    cu, T = [0, 40, 41, 130], 150  # a one-token document and padding rows
    layout = patterns.document(cu, causal, T=T, block_size=32)
    check_attention(layout, document_formula(cu, causal, None, T)[None])


def prefix_formula(T, prefix):
    q = torch.arange(T).view(-1, 1)
    k = torch.arange(T).view(1, -1)
    return (k <= q) | (k < prefix)


PREFIX = [(300, 100, 64), (1, 0, 16), (77, 0, 16), (130, 200, 32), (257, 31, 32), (90, 45, 128)]


@pytest.mark.parametrize("T,prefix,block", PREFIX, ids=str)
def test_prefix_lm_matches_formula(T, prefix, block):
    layout = patterns.prefix_lm(T, prefix, block_size=block)
    check_layout(
        layout,
        prefix_formula(T, prefix)[None],
        patterns.prefix_lm_mask_mod(prefix),
        block_size=block,
    )
    assert layout.mask_bits is None


def test_prefix_lm_attention():
    layout = patterns.prefix_lm(140, 50, block_size=32)
    check_attention(layout, prefix_formula(140, 50)[None])


def test_prefix_is_not_attention_sinks():
    # Prefix-LM keeps later prefix keys for earlier queries; causal sinks never do.
    prefix = patterns.prefix_lm(64, 8, block_size=16).dense_mask()[0, 0]
    sinks = patterns.sliding_window(64, 64, sinks=8, block_size=16).dense_mask()[0, 0]
    assert bool(prefix[0, 7]) and not bool(sinks[0, 7])
    assert torch.equal(prefix[8:], sinks[8:])


@pytest.mark.parametrize(
    "build",
    [
        lambda T: patterns.document([0, 1000, 5000, T - 7], causal=True, T=T),
        lambda T: patterns.document([0, 3000, T], window=512),
        lambda T: patterns.prefix_lm(T, 1000),
    ],
    ids=["causal-docs", "window-docs", "prefix"],
)
def test_builders_never_make_a_t_by_t_tensor(build):
    T = 8192
    with MaxTensorSize() as sizes:
        layout = build(T)
    assert layout.seq_lengths == (T, T)
    assert sizes.largest < T * T // 4, f"a tensor of {sizes.largest} elements (T*T = {T * T})"


def test_document_errors_name_the_argument():
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        patterns.document([1, 5])
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        patterns.document([0, 5, 3])
    with pytest.raises(ValueError, match="cu_seqlens must have at least 2 entries"):
        patterns.document([0])
    with pytest.raises(ValueError, match="cu_seqlens must be one-dimensional"):
        patterns.document(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="cu_seqlens must hold integers"):
        patterns.document(torch.tensor([0.0, 4.0]))
    with pytest.raises(TypeError, match="cu_seqlens must be a sequence"):
        patterns.document(5)
    with pytest.raises(ValueError, match=r"cu_seqlens\[1\] must be >= 0"):
        patterns.document([0, -4])
    with pytest.raises(ValueError, match="cu_seqlens must hold at least one token"):
        patterns.document([0, 0])
    with pytest.raises(ValueError, match=r"T \(5\) must be >= cu_seqlens\[-1\] \(8\)"):
        patterns.document([0, 8], T=5)
    with pytest.raises(ValueError, match="window must be >= 1"):
        patterns.document([0, 8], window=0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        patterns.document([0, 8], causal=None)
    with pytest.raises(ValueError, match="prefix_len must be >= 0"):
        patterns.prefix_lm(100, -1)
    with pytest.raises(ValueError, match="T must be >= 1"):
        patterns.prefix_lm(0, 4)
    with pytest.raises(ValueError, match="prefix_len must be >= 0"):
        patterns.prefix_lm_mask_mod(-2)
