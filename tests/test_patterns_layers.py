"""tokenmix.nn.SparseAttention and SlidingWindowAttention: against the reference (forward and
backward, GQA), layout factories and their cache, torch.compile(fullgraph=True), errors."""

from __future__ import annotations

import functools

import pytest
import tokenmix
import torch
from pattern_checks import check_compiled_matches_eager
from tokenmix import patterns
from tokenmix.block_sparse import block_sparse_attention_reference


def reference_layer(layer, x):
    """The layer's computation with the reference attention on the layer's own layout."""
    batch, length, dim = x.shape
    hd, h, hkv = layer.head_dim, layer.num_heads, layer.num_kv_heads
    q, k, v = layer.qkv(x).split([h * hd, hkv * hd, hkv * hd], dim=-1)
    out = block_sparse_attention_reference(
        q.unflatten(-1, (h, hd)),
        k.unflatten(-1, (hkv, hd)),
        v.unflatten(-1, (hkv, hd)),
        layer.layout_for(length, x.device),
        scale=layer.scale,
    )
    return layer.proj(out.reshape(batch, length, dim))


def check_against_reference(layer, x):
    x1 = x.clone().requires_grad_(True)
    y = layer(x1)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    x2 = x.clone().requires_grad_(True)
    y_ref = reference_layer(layer, x2)
    (y_ref * g).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for a, p in zip(grads, layer.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-5)
    layer.zero_grad()


def test_sparse_attention_with_a_partial_builder_and_gqa():
    torch.manual_seed(0)
    pattern = functools.partial(
        patterns.per_head_windows, windows=[4, 16, 40, 70], sinks=2, block_size=16
    )
    layer = tokenmix.nn.SparseAttention(64, 4, pattern, num_kv_heads=2)
    check_against_reference(layer, torch.randn(2, 70, 64))
    # One layout per length, built once.
    first = layer.layout_for(70, torch.device("cpu"))
    assert layer.layout_for(70, "cpu") is first and first.heads == 4
    assert layer.layout_for(33, "cpu").seq_lengths == (33, 33)
    check_against_reference(layer, torch.randn(1, 33, 64))


@pytest.mark.parametrize(
    "pattern",
    [
        functools.partial(patterns.power_attention, window=2, block_size=16),
        functools.partial(patterns.dilated, window=6, dilation=3, causal=False, block_size=16),
        functools.partial(patterns.elastic_windows, alpha=[2.0, 8.0], beta=[0.25, 0.0], sinks=1),
        lambda t, device: patterns.prefix_lm(t, t // 3, block_size=16, device=device),
    ],
    ids=["power", "dilated", "elastic", "lambda"],
)
def test_sparse_attention_with_builders(pattern):
    torch.manual_seed(1)
    layer = tokenmix.nn.SparseAttention(32, 2, pattern, num_kv_heads=1)
    check_against_reference(layer, torch.randn(2, 57, 32))


def test_sparse_attention_with_a_fixed_layout():
    torch.manual_seed(2)
    layout = patterns.radial(5, 12, sinks=1, model_type="wan", threshold=2, block_size=16)
    layer = tokenmix.nn.SparseAttention(32, 4, layout, num_kv_heads=2)
    assert layer.layout_for(60, "cpu") is layout
    check_against_reference(layer, torch.randn(2, 60, 32))


def test_sliding_window_attention_layer():
    torch.manual_seed(3)
    layer = tokenmix.nn.SlidingWindowAttention(
        32, 4, window=9, sinks=3, num_kv_heads=2, block_size=16
    )
    check_against_reference(layer, torch.randn(2, 45, 32))
    layout = layer.layout_for(45, "cpu")
    expected = patterns.sliding_window(45, 9, sinks=3, block_size=16).dense_mask()
    assert torch.equal(layout.dense_mask(), expected)
    assert "window=9" in repr(layer) and "sinks=3" in repr(layer)
    # Causal: the first outputs depend on no later token.
    x = torch.randn(1, 45, 32, requires_grad=True)
    layer(x)[0, :5].sum().backward()
    assert torch.equal(x.grad[0, 5:], torch.zeros_like(x.grad[0, 5:]))


def test_non_causal_sliding_window_layer_sees_both_sides():
    torch.manual_seed(4)
    layer = tokenmix.nn.SlidingWindowAttention(16, 2, window=4, causal=False, block_size=8)
    check_against_reference(layer, torch.randn(1, 30, 16))
    x = torch.randn(1, 30, 16, requires_grad=True)
    layer(x)[0, 10].sum().backward()
    touched = (x.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert touched == list(range(7, 14))  # |q - k| < 4


@pytest.mark.parametrize("kind", ["sparse", "sliding"])
def test_layers_compile_fullgraph(kind):
    torch.manual_seed(5)
    if kind == "sparse":
        pattern = functools.partial(patterns.per_head_windows, windows=[5, 20], block_size=16)
        layer = tokenmix.nn.SparseAttention(32, 2, pattern, num_kv_heads=1)
    else:
        layer = tokenmix.nn.SlidingWindowAttention(
            32, 4, window=12, sinks=2, num_kv_heads=2, block_size=16
        )
    x = torch.randn(2, 50, 32)
    check_compiled_matches_eager(layer, x, fullgraph=True)


def test_layer_errors():
    with pytest.raises(TypeError, match="pattern must be a tokenmix.BlockLayout"):
        tokenmix.nn.SparseAttention(32, 2, "sliding_window")
    three_heads = patterns.per_head_windows(40, [4, 8, 16], block_size=8)
    with pytest.raises(
        ValueError, match=r"pattern has 3 heads, expected 1, num_kv_heads \(2\) or num_heads \(2\)"
    ):
        tokenmix.nn.SparseAttention(32, 2, three_heads)
    layer = tokenmix.nn.SparseAttention(
        32, 2, functools.partial(patterns.per_head_windows, windows=[4, 8, 16])
    )
    with pytest.raises(ValueError, match=r"layout for T=40 has 3 heads, expected 1, num_kv_heads"):
        layer(torch.randn(1, 40, 32))
    bad = tokenmix.nn.SparseAttention(32, 2, lambda t, device: "not a layout")
    with pytest.raises(TypeError, match="the pattern factory returned str"):
        bad(torch.randn(1, 40, 32))
    with pytest.raises(ValueError, match="window must be >= 1"):
        tokenmix.nn.SlidingWindowAttention(32, 2, window=0)
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        tokenmix.nn.SlidingWindowAttention(32, 2, window=4, sinks=-1)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tokenmix.nn.SlidingWindowAttention(32, 4, window=4, num_kv_heads=3)
