"""tokenmix.patterns.multi_axis and tokenmix.nn.MultiAxisAttention2D (MaxViT block + grid).

The masks here are written from the documented formula on raster coordinates, independently of
the builder: block attention keeps (q, k) in the same block window, grid attention keeps (q, k)
with the same (y mod H/Gh, x mod W/Gw).
"""

from __future__ import annotations

import doctest
import pathlib
import random

import pytest
import tokenmix
import torch
from pattern_checks import check_compiled_matches_eager, check_layer_against
from tokenmix.patterns import multi_axis, multi_axis_mask_mod

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (height, width, block, grid): square and ragged (non-square, unequal block/grid) grids.
CASES = [
    (4, 4, 2, 2),
    (8, 12, (2, 3), (4, 2)),
    (6, 15, (3, 5), (2, 3)),
    (9, 6, (3, 2), (3, 3)),
    (10, 4, (5, 1), (2, 4)),
    (7, 7, 7, 1),
]


def _random_cases(n, seed=2024):
    """Seeded random grids: block and grid sizes are random divisors of random extents."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        height, width = rng.randint(2, 12), rng.randint(2, 12)
        divs_h = [d for d in range(1, height + 1) if height % d == 0]
        divs_w = [d for d in range(1, width + 1) if width % d == 0]
        block = (rng.choice(divs_h), rng.choice(divs_w))
        grid = (rng.choice(divs_h), rng.choice(divs_w))
        out.append((height, width, block, grid))
    return out


CASES += _random_cases(6)


def brute_force_mask(height, width, block, grid, axis):
    """Bool [T, T] in raster order, straight from the formula."""
    ph, pw = (block, block) if isinstance(block, int) else block
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    t = height * width
    keep = torch.zeros(t, t, dtype=torch.bool)
    for a in range(t):
        ya, xa = divmod(a, width)
        for b in range(t):
            yb, xb = divmod(b, width)
            if axis == "block":
                keep[a, b] = ya // ph == yb // ph and xa // pw == xb // pw
            else:
                keep[a, b] = ya % (height // gh) == yb % (height // gh) and xa % (
                    width // gw
                ) == xb % (width // gw)
    return keep


def dense_attention(q, k, v, mask, scale=None):
    """Plain softmax attention: q [B, T, H, D], k/v [B, T, Hkv, D], mask [H or 1, T, T]."""
    heads, kv_heads = q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_layouts_are_the_formula_under_the_permutation(case):
    height, width, block, grid = case
    pat = multi_axis(height, width, block, grid)
    for axis in ("block", "grid"):
        layout = getattr(pat, f"{axis}_layout")
        # Dense diagonal blocks only: nothing partial, every listed block full.
        assert int(layout.kv_num_blocks.sum()) == 0
        permuted = layout.dense_mask()[0, 0]
        order = pat.order[axis]
        raster = torch.zeros_like(permuted)
        raster[order.view(-1, 1), order.view(1, -1)] = permuted
        assert torch.equal(raster, brute_force_mask(height, width, block, grid, axis)), axis


@pytest.mark.parametrize("case", CASES, ids=str)
def test_orders_are_the_documented_positions(case):
    height, width, block, grid = case
    ph, pw = (block, block) if isinstance(block, int) else block
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    sh, sw = height // gh, width // gw
    pat = multi_axis(height, width, block, grid)
    for y in range(height):
        for x in range(width):
            pos_b = ((y // ph) * (width // pw) + x // pw) * ph * pw + (y % ph) * pw + x % pw
            pos_g = ((y % sh) * sw + x % sw) * gh * gw + (y // sh) * gw + x // sw
            assert int(pat.order["block"][pos_b]) == y * width + x
            assert int(pat.order["grid"][pos_g]) == y * width + x


@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_mask_mods_are_the_formula(case):
    height, width, block, grid = case
    t = height * width
    idx = torch.arange(t)
    zero = torch.zeros((), dtype=torch.long)
    for axis in ("block", "grid"):
        mod = multi_axis_mask_mod(height, width, block, grid, axis)
        got = mod(zero, zero, idx.view(-1, 1), idx.view(1, -1))
        assert torch.equal(got, brute_force_mask(height, width, block, grid, axis))


def test_mask_mod_works_with_flex_create_block_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    mod = multi_axis_mask_mod(8, 8, 4, 2, "grid")
    bm = flex.create_block_mask(mod, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    layout = tokenmix.BlockLayout.from_block_mask(bm)
    assert torch.equal(layout.dense_mask()[0, 0], brute_force_mask(8, 8, 4, 2, "grid"))


@pytest.mark.parametrize("axes", ["block", "grid", ("block", "grid"), ("grid", "block", "grid")])
def test_permutation_round_trip_is_exact_and_differentiable(axes):
    torch.manual_seed(0)
    pat = multi_axis(6, 15, (3, 5), (2, 3))
    heads = 6
    x = torch.randn(2, 90, heads, 5, dtype=torch.float64, requires_grad=True)
    y = pat.permute(x, axes)
    assert not torch.equal(y, x)  # it does move tokens
    assert torch.equal(pat.unpermute(y, axes), x)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    assert torch.equal(x.grad, pat.unpermute(w, axes))
    # Per head: head h of the permuted tensor is head h of x in its axis' order.
    names = [axes] * heads if isinstance(axes, str) else list(axes)
    per = heads // len(names) if not isinstance(axes, str) else 1
    for h in range(heads):
        axis = names[h // per] if not isinstance(axes, str) else axes
        assert torch.equal(y[:, :, h], x[:, pat.order[axis], h])


def test_permute_on_another_dimension():
    pat = multi_axis(4, 6, 2, 2)
    x = torch.randn(3, 5, 24)
    y = pat.permute(x, "grid", dim=-1)
    assert torch.equal(y, x[..., pat.order["grid"]])
    assert torch.equal(pat.unpermute(y, "grid", dim=-1), x)


@pytest.mark.parametrize("case", CASES[1:4], ids=str)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_under_the_permutation_equals_dense_block_and_grid(case, kv_heads):
    height, width, block, grid = case
    g = torch.Generator().manual_seed(sum(map(hash, map(str, case))) % 1000 + kv_heads)
    heads, dim = 4, 8
    t = height * width
    q = torch.randn(2, t, heads, dim, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, t, kv_heads, dim, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, t, kv_heads, dim, generator=g, dtype=torch.float64, requires_grad=True)
    pat = multi_axis(height, width, block, grid)
    axes = (["block", "grid"] * kv_heads)[:kv_heads]
    axes = sorted(axes)  # block K/V heads first
    layout = pat.layout(axes)
    assert layout.heads == kv_heads
    out = pat.unpermute(
        tokenmix.block_sparse_attention(
            pat.permute(q, axes), pat.permute(k, axes), pat.permute(v, axes), layout
        ),
        axes,
    )
    group = heads // kv_heads
    masks = torch.stack(
        [brute_force_mask(height, width, block, grid, axes[h // group]) for h in range(heads)]
    )
    ref = dense_attention(q, k, v, masks)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_layout_block_size_option():
    pat = multi_axis(8, 8, 4, 4)  # 16-token groups
    layout = pat.layout("block", block_size=4)
    assert layout.block_size == (4, 4)
    assert int(layout.full_kv_num_blocks.min()) == 4
    reference = pat.block_layout.dense_mask()
    assert torch.equal(layout.dense_mask(), reference)
    mixed = multi_axis(8, 8, 4, 2).layout(["block", "grid"])  # 16 and 4: gcd 4
    assert mixed.block_size == (4, 4) and mixed.heads == 2


def layer_reference(layer, x):
    """MultiAxisAttention2D written densely: projections, per-head raster masks, softmax."""
    batch, height, width, dim = x.shape
    t = height * width
    hd, h, hkv = layer.head_dim, layer.num_heads, layer.num_kv_heads
    qkv = torch.nn.functional.linear(x.reshape(batch, t, dim), layer.qkv.weight, layer.qkv.bias)
    q, k, v = qkv.split([h * hd, hkv * hd, hkv * hd], dim=-1)
    q, k, v = q.unflatten(-1, (h, hd)), k.unflatten(-1, (hkv, hd)), v.unflatten(-1, (hkv, hd))
    block = brute_force_mask(height, width, layer.block, layer.grid, "block")
    grid = brute_force_mask(height, width, layer.block, layer.grid, "grid")
    masks = torch.stack([grid if i >= h - layer.grid_heads else block for i in range(h)])
    out = dense_attention(q, k, v, masks, layer.scale)
    return torch.nn.functional.linear(
        out.reshape(batch, height, width, dim), layer.proj.weight, layer.proj.bias
    )


@pytest.mark.parametrize(
    "heads,kv_heads,grid_heads", [(4, 4, None), (4, 2, None), (6, 3, 2), (4, 1, 0), (4, 2, 4)]
)
def test_layer_forward_backward_against_dense(heads, kv_heads, grid_heads):
    torch.manual_seed(heads * 10 + kv_heads)
    dim = 8 * heads
    layer = tokenmix.nn.MultiAxisAttention2D(
        dim, heads, block=(2, 3), grid=(3, 2), num_kv_heads=kv_heads, grid_heads=grid_heads
    ).double()
    expected_grid = (kv_heads // 2) * (heads // kv_heads) if grid_heads is None else grid_heads
    assert layer.grid_heads == expected_grid
    x = torch.randn(2, 6, 12, dim, dtype=torch.float64, requires_grad=True)
    check_layer_against(layer(x), layer_reference(layer, x), x, layer)


def test_layer_compiles_fullgraph_with_gqa():
    torch.manual_seed(1)
    layer = tokenmix.nn.MultiAxisAttention2D(64, 4, block=4, grid=2, num_kv_heads=2)
    x = torch.randn(2, 8, 8, 64)
    check_compiled_matches_eager(layer, x, fullgraph=True)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"height \(10\) must be a multiple of block \(4\)"):
        multi_axis(10, 8, 4, 2)
    with pytest.raises(ValueError, match=r"width \(9\) must be a multiple of grid \(2\)"):
        multi_axis(8, 9, (4, 3), 2)
    with pytest.raises(ValueError, match="block must be >= 1"):
        multi_axis(8, 8, 0, 2)
    with pytest.raises(ValueError, match="grid must be an int or a sequence of length 2"):
        multi_axis(8, 8, 2, (2, 2, 2))
    with pytest.raises(TypeError, match="height must be an int"):
        multi_axis(8.0, 8, 2, 2)
    pat = multi_axis(8, 8, 4, 2)
    with pytest.raises(ValueError, match="axis must be 'block' or 'grid'"):
        pat.permute(torch.randn(1, 64, 2), "rows")
    with pytest.raises(ValueError, match="x has 63 tokens"):
        pat.permute(torch.randn(1, 63, 2))
    with pytest.raises(ValueError, match=r"heads \(3\) must be a multiple of len\(axes\) \(2\)"):
        pat.permute(torch.randn(1, 64, 3, 4), ["block", "grid"])
    with pytest.raises(ValueError, match=r"block_size \(3\) must divide the block group size"):
        pat.layout("block", block_size=3)
    with pytest.raises(ValueError, match="grid_heads"):
        tokenmix.nn.MultiAxisAttention2D(32, 4, 2, 2, num_kv_heads=2, grid_heads=1)
    with pytest.raises(ValueError, match="grid_heads must be given with one K/V head"):
        tokenmix.nn.MultiAxisAttention2D(32, 4, 2, 2, num_kv_heads=1)
    layer = tokenmix.nn.MultiAxisAttention2D(32, 4, 2, 2)
    with pytest.raises(ValueError, match=r"expects x of shape \[B, H, W, 32\]"):
        layer(torch.randn(1, 16, 32))
    with pytest.raises(ValueError, match=r"height \(5\) must be a multiple of block \(2\)"):
        layer(torch.randn(1, 5, 4, 32))


# ---- docstring examples (docs/patterns.md runs in tests/test_docs.py) -------------------


@pytest.mark.parametrize(
    "module",
    ["grid", "topk", "permuted", "layers_b"],
)
def test_docstring_examples(module):
    import importlib

    mod = importlib.import_module(f"tokenmix.patterns.{module}")
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(mod, mod.__name__)
    assert sum(len(t.examples) for t in tests) > 0
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0


def test_per_head_layout_runs_on_flex_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(9)
    pat = multi_axis(8, 12, (2, 3), (4, 2))
    axes = ["block", "grid"]
    q = pat.permute(torch.randn(2, 96, 4, 8, generator=g), axes)
    k = pat.permute(torch.randn(2, 96, 2, 8, generator=g), axes)
    v = pat.permute(torch.randn(2, 96, 2, 8, generator=g), axes)
    layout = pat.layout(axes)
    out = tokenmix.block_sparse_attention(q, k, v, layout)
    bm = layout.to_block_mask(heads=4)
    fout = flex.flex_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, enable_gqa=True
    )
    torch.testing.assert_close(out, fout.transpose(1, 2), atol=2e-5, rtol=2e-5)


def test_builder_never_makes_a_t_by_t_tensor():
    from pattern_checks import MaxTensorSize

    height = width = 96
    T = height * width
    with MaxTensorSize() as sizes:
        pat = multi_axis(height, width, 8, 8)
        layout = pat.layout(["block", "grid"])
    assert layout.seq_lengths == (T, T)
    assert sizes.largest < T * T // 8, f"a tensor of {sizes.largest} elements (T*T = {T * T})"
