"""tokenmix.block_sparse_attention on the fused CPU kernels: against the reference and Flex.

A seeded sweep over patterns (structured rules, Flex mask_mods turned into bitmasks, random
block patterns, no rule), B/H broadcast, GQA, Tq != Tk, block sizes 16..128 (and sizes that are
not powers of two), ragged lengths and every dtype; outputs, LSE and all gradients. Then the
registration (opcheck, fake kernels, torch.compile), the layer, and the errors.
"""

from __future__ import annotations

import random

import pytest
import tokenmix
import torch
from tokenmix import BlockLayout, ElementMask
from tokenmix.block_sparse import block_sparse_attention_reference as reference
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def doc_ids(t, docs, gen):
    cuts = torch.randperm(max(t - 1, 1), generator=gen)[: docs - 1].sort().values + 1
    ids = torch.zeros(t, dtype=torch.int64)
    ids[cuts[cuts < t]] = 1
    return ids.cumsum(0)


def make_layout(pattern, b, h, tq, tk, block, gen):
    """A layout of the named kind, built the way a user would."""
    off = tk - tq
    if pattern == "causal":
        return BlockLayout.from_element_mask(ElementMask.causal(off), tq, tk, block)
    if pattern == "window":
        left = int(torch.randint(1, 2 * max(block) + 2, (1,), generator=gen))
        return BlockLayout.from_element_mask(
            ElementMask.sliding_window(left, 3, off), tq, tk, block
        )
    if pattern == "prefix":
        return BlockLayout.from_element_mask(ElementMask.prefix_lm(tk // 3, off), tq, tk, block)
    if pattern == "document":
        docs = doc_ids(tq, 3, gen)
        return BlockLayout.from_element_mask(ElementMask.document(docs, docs), tq, tq, block)
    if pattern == "flex-random":
        # A Flex BlockMask with a per-(b, h) element mask_mod: evaluated into bitmasks.
        table = torch.rand(b, h, 11, 13, generator=gen) < 0.6

        def mod(bb, hh, q, k):
            return table[bb, hh, q % 11, k % 13] & (k <= q + off + 40)

        bm = create_block_mask(mod, b, h, tq, tk, device="cpu", BLOCK_SIZE=block)
        return BlockLayout.from_block_mask(bm, batch=b, heads=h)
    if pattern == "blocks":
        # Random partial/full/skipped blocks per (b, h) and no element rule.
        nq, nk = -(-tq // block[0]), -(-tk // block[1])
        status = torch.randint(0, 3, (b, h, nq, nk), generator=gen)
        return BlockLayout.from_block_status(status, block_size=block, seq_lengths=(tq, tk))
    raise AssertionError(pattern)


PATTERNS = ["causal", "window", "prefix", "document", "flex-random", "blocks"]
BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (64, 32), (16, 128), (48, 80)]


def random_case(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pattern = PATTERNS[seed % len(PATTERNS)]
    hkv = rng.choice([1, 2])
    h = hkv * rng.choice([1, 2, 3])
    b = rng.choice([1, 2])
    tq = rng.choice([1, 17, 64, 100, 129, 200])
    tk = tq if pattern == "document" else rng.choice([1, 33, 64, 130, 257])
    block = rng.choice(BLOCKS)
    d = rng.choice([8, 16, 32, 64, 72])
    dv = rng.choice([d, 16, 40])
    layout = make_layout(pattern, b, h, tq, tk, block, gen)
    return pattern, (b, h, hkv, tq, tk, d, dv), layout, gen


def run_both(shape, layout, dtype, gen, with_lse_grad=True):
    b, h, hkv, tq, tk, d, dv = shape
    q = torch.randn(b, tq, h, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, tk, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, tk, hkv, dv, generator=gen, dtype=torch.float64)
    go = torch.randn(b, tq, h, dv, generator=gen, dtype=torch.float64)
    gl = torch.randn(b, tq, h, generator=gen, dtype=torch.float64)
    results = []
    for kind in ("kernel", "reference"):
        # The reference runs in fp64 on the same (rounded) inputs.
        cast = dtype if kind == "kernel" else torch.float64
        xs = [t.to(dtype).to(cast).requires_grad_(True) for t in (q, k, v)]
        fn = tokenmix.block_sparse_attention if kind == "kernel" else reference
        out, lse = fn(*xs, layout, return_lse=True)
        loss = (out.double() * go).sum()
        if with_lse_grad:
            alive = torch.isfinite(lse)
            loss = loss + (torch.where(alive, lse.double(), 0) * gl).sum()
        loss.backward()
        results.append((out.double(), lse.double(), *(x.grad.double() for x in xs)))
    return results


def assert_close(got, want, tol, what):
    if got.numel() == 0:
        return
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), what
    finite = torch.isfinite(want)
    err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    scale = max(1.0, want[finite].abs().max().item()) if finite.any() else 1.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize("seed", range(36))
def test_random_sweep_fp32(seed):
    pattern, shape, layout, gen = random_case(seed)
    got, want = run_both(shape, layout, torch.float32, gen)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert_close(g, w, TOL[torch.float32], f"{pattern} {shape} {layout}: {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seed", range(100, 112))
def test_random_sweep_dtypes(seed, dtype):
    pattern, shape, layout, gen = random_case(seed)
    got, want = run_both(shape, layout, dtype, gen)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert_close(g, w, TOL[dtype], f"{pattern} {shape} {dtype}: {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("heads", [(4, 4, 4), (4, 2, 1)], ids=["per-head", "gqa-broadcast"])
def test_bits_of_whole_squares_run_as_finer_blocks(heads, dtype):
    """A Flex mask of 64 x 64 squares at BLOCK_SIZE 128 (every nonempty block partial) runs as
    a layout of 64 x 64 full blocks (layout.kernel_layout, no bits): outputs, LSE and every
    gradient match the reference on the layout as given."""
    h, hkv, lh = heads
    gen = torch.Generator().manual_seed(3)
    tq, tk = 512, 768
    table = torch.rand(2, lh, tq // 64, tk // 64, generator=gen) < 0.3

    def mod(b, hh, q, k):
        return table[b, hh, q // 64, k // 64]

    bm = create_block_mask(mod, 2, lh, tq, tk, device="cpu", BLOCK_SIZE=128)
    layout = BlockLayout.from_block_mask(bm, batch=2, heads=lh)
    assert layout.mask_bits is not None and layout.kernel_layout.block_size == (64, 64)
    got, want = run_both((2, h, hkv, tq, tk, 32, 48), layout, dtype, gen)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert_close(g, w, TOL[dtype], f"{heads} {dtype}: {name}")


@pytest.mark.parametrize("pattern", ["causal", "window", "document", "flex-random"])
@pytest.mark.parametrize("block", [(16, 16), (64, 64), (128, 128)], ids=str)
def test_matches_flex_attention_forward(pattern, block):
    gen = torch.Generator().manual_seed(7)
    b, h, hkv, t, d = 2, 4, 2, 160, 32
    layout = make_layout(pattern, b, h, t, t, block, gen)
    bm = layout.to_block_mask()
    q = torch.randn(b, t, h, d, generator=gen)
    k = torch.randn(b, t, hkv, d, generator=gen)
    v = torch.randn(b, t, hkv, d, generator=gen)
    out, lse = tokenmix.block_sparse_attention(q, k, v, bm, return_lse=True)
    fout, aux = flex_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=bm,
        return_aux=AuxRequest(lse=True),
        enable_gqa=True,
    )
    torch.testing.assert_close(out, fout.transpose(1, 2), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, aux.lse.transpose(1, 2), atol=2e-5, rtol=2e-5)


def test_layout_with_one_head_per_kv_head():
    # A layout with H_kv heads serves each kv head's GQA group: the same results as the layout
    # expanded to H heads, as the reference, and as flex_attention with the expanded BlockMask.
    gen = torch.Generator().manual_seed(23)
    b, h, hkv, t, d, block = 2, 6, 2, 150, 16, 32
    n = -(-t // block)
    status = torch.randint(0, 3, (1, hkv, n, n), generator=gen)
    status[..., 0] = 2  # every row keeps a key
    layout = BlockLayout.from_block_status(
        status,
        block_size=block,
        seq_lengths=(t, t),
        mask_bits_fn=lambda bb, hh, qi, ki: (qi * 7 + ki * 3 + hh) % 5 != 0,
    )
    assert layout.heads == hkv and layout.mask_bits is not None
    wide = layout.expand_heads(h)
    assert wide.heads == h
    got, want = run_both((b, h, hkv, t, t, d, d), layout, torch.float32, gen)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert_close(g, w, TOL[torch.float32], f"per-kv-head layout: {name}")
    q = torch.randn(b, t, h, d, generator=gen)
    k = torch.randn(b, t, hkv, d, generator=gen)
    v = torch.randn(b, t, hkv, d, generator=gen)
    out = tokenmix.block_sparse_attention(q, k, v, layout)
    torch.testing.assert_close(out, tokenmix.block_sparse_attention(q, k, v, wide))
    bm = layout.to_block_mask(heads=h)
    assert bm.kv_num_blocks.shape[1] == h
    fout = flex_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, enable_gqa=True
    )
    torch.testing.assert_close(out, fout.transpose(1, 2), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="heads"):
        tokenmix.block_sparse_attention(
            q,
            k,
            v,
            BlockLayout.from_block_status(
                torch.ones(1, 3, n, n, dtype=torch.int64) * 2, block_size=block, seq_lengths=(t, t)
            ),
        )


def test_gradcheck_fp64():
    gen = torch.Generator().manual_seed(3)
    layout = make_layout("flex-random", 1, 2, 40, 50, (16, 16), gen)
    q = torch.randn(1, 40, 2, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, 50, 1, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(1, 50, 1, 6, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(q, k, v):
        out, lse = tokenmix.block_sparse_attention(q, k, v, layout, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, 0)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_fully_masked_rows():
    # Query block 1 lists nothing; query block 0's partial block keeps nothing for row 3.
    count = torch.tensor([[[1, 0]]], dtype=torch.int32)
    index = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    bits = torch.full((1, 1, 2, 1, 8, 1), 0xFF, dtype=torch.int32)
    bits[0, 0, 0, 0, 3] = 0
    layout = BlockLayout(count, index, block_size=8, seq_lengths=(16, 16), mask_bits=bits)
    q, k, v = (torch.randn(1, 16, 2, 4, requires_grad=True) for _ in range(3))
    out, lse = tokenmix.block_sparse_attention(q, k, v, layout, return_lse=True)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[8:] = True
    dead[3] = True
    assert torch.equal(out[:, dead], torch.zeros_like(out[:, dead]))
    assert torch.isneginf(lse[:, dead]).all() and torch.isfinite(lse[:, ~dead]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, dead], torch.zeros_like(q.grad[:, dead]))
    assert torch.equal(k.grad[:, 8:], torch.zeros_like(k.grad[:, 8:]))


def test_non_finite_keys_outside_the_layout_do_not_leak():
    layout = BlockLayout.from_element_mask(ElementMask.causal(), 64, 64, block_size=16)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 16, generator=gen) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[:, 40:] = float("inf")
    v2[:, 50:] = float("nan")
    want = tokenmix.block_sparse_attention(q, k, v, layout)
    got = tokenmix.block_sparse_attention(q, k2, v2, layout)
    # Queries before token 40 never see the poisoned keys: bit-identical results.
    assert torch.equal(got[:, :40], want[:, :40])


@pytest.mark.parametrize("threads", [1, 3])
def test_backward_is_deterministic_across_threads(threads):
    gen = torch.Generator().manual_seed(11)
    layout = make_layout("blocks", 1, 2, 300, 300, (32, 32), gen)
    q, k, v = (torch.randn(1, 300, 2, 32, generator=gen) for _ in range(3))

    def grads(n):
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
            tokenmix.block_sparse_attention(*xs, layout).square().sum().backward()
            return [x.grad for x in xs]
        finally:
            torch.set_num_threads(old)

    for a, b in zip(grads(2), grads(threads), strict=True):
        assert torch.equal(a, b)


def test_strided_heads_last_views_without_copies():
    # Flex users pass x.transpose(1, 2) of [B, H, T, D] tensors.
    gen = torch.Generator().manual_seed(2)
    layout = make_layout("window", 1, 4, 96, 96, (32, 32), gen)
    x = torch.randn(3, 1, 4, 96, 32, generator=gen)
    q, k, v = (x[i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    torch.testing.assert_close(
        tokenmix.block_sparse_attention(q, k, v, layout),
        reference(q.contiguous(), k.contiguous(), v.contiguous(), layout),
        atol=2e-5,
        rtol=2e-5,
    )


def test_opcheck():
    gen = torch.Generator().manual_seed(4)
    layout = make_layout("flex-random", 2, 2, 48, 40, (16, 16), gen)
    q = torch.randn(2, 48, 2, 8, generator=gen)
    k = torch.randn(2, 40, 1, 8, generator=gen)
    v = torch.randn(2, 40, 1, 4, generator=gen)
    fwd_args = (
        q,
        k,
        v,
        layout.kv_num_blocks,
        layout.kv_indices,
        layout.full_kv_num_blocks,
        layout.full_kv_indices,
        list(layout.block_size),
        layout.mask_bits,
        None,
        None,
        [],
        0.3,
    )
    torch.library.opcheck(torch.ops.tokenmix.block_sparse_forward, fwd_args)
    out, lse = torch.ops.tokenmix.block_sparse_forward(*fwd_args)
    bwd_args = (
        torch.randn_like(out),
        q,
        k,
        v,
        out,
        lse,
        layout.kv_num_blocks,
        layout.kv_indices,
        layout.full_kv_num_blocks,
        layout.full_kv_indices,
        layout.q_num_blocks,
        layout.q_indices,
        layout.q_slots,
        layout.full_q_num_blocks,
        layout.full_q_indices,
        list(layout.block_size),
        layout.mask_bits,
        None,
        None,
        [],
        0.3,
        torch.randn_like(lse),
        False,
    )
    torch.library.opcheck(torch.ops.tokenmix.block_sparse_backward, bwd_args)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    rule = ElementMask.sliding_window(40)
    layout = BlockLayout.from_element_mask(rule, 128, 128, block_size=32)
    model = tokenmix.nn.BlockSparseAttention(64, 4, layout, num_kv_heads=2)
    x = torch.randn(2, 128, 64)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)


def test_layer_with_a_layout_factory():
    built = []

    def factory(t, device):
        built.append(t)
        return BlockLayout.from_element_mask(ElementMask.causal(), t, t, block_size=16).to(device)

    layer = tokenmix.nn.BlockSparseAttention(32, 2, factory)
    x = torch.randn(1, 50, 32, requires_grad=True)
    y = layer(x)
    layer(torch.randn(3, 50, 32))
    assert y.shape == (1, 50, 32) and built == [50]
    # Causal: the first token's output depends on nothing after it.
    y[0, 0].sum().backward()
    assert torch.equal(x.grad[0, 1:], torch.zeros_like(x.grad[0, 1:]))


def test_errors_name_the_argument():
    layout = BlockLayout.from_element_mask(ElementMask.causal(), 64, 64, block_size=16)
    q = k = v = torch.randn(1, 64, 2, 8)
    with pytest.raises(ValueError, match=r"sequence lengths \(64, 64\) but q and k have \(32"):
        tokenmix.block_sparse_attention(q[:, :32], k[:, :32], v[:, :32], layout)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        tokenmix.block_sparse_attention(torch.randn(1, 64, 3, 8), k, v, layout)
    with pytest.raises(ValueError, match="k head dim"):
        tokenmix.block_sparse_attention(q, torch.randn(1, 64, 2, 4), v, layout)
    with pytest.raises(TypeError, match="block_mask must be"):
        tokenmix.block_sparse_attention(q, k, v, "causal")
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        tokenmix.block_sparse_attention(q.numpy(), k, v, layout)
    with pytest.raises(ValueError, match="dtype"):
        tokenmix.block_sparse_attention(q, k.double(), v, layout)
    wide = make_layout("blocks", 2, 2, 64, 64, (16, 16), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="batch size 2, expected 1 or 1"):
        tokenmix.block_sparse_attention(q, k, v, wide)
    # The raw op checks the layout data too (direct calls must not read out of bounds).
    bad = layout.kv_indices.clone()
    bad[0, 0, 0, 0] = 99

    def raw_forward(kv_indices, band):
        return torch.ops.tokenmix.block_sparse_forward(
            q,
            k,
            v,
            layout.kv_num_blocks,
            kv_indices,
            layout.full_kv_num_blocks,
            layout.full_kv_indices,
            [16, 16],
            None,
            None,
            None,
            band,
            1.0,
        )

    with pytest.raises(RuntimeError, match="kv_indices holds block index 99"):
        raw_forward(bad, layout.element_mask.band_arg())
    with pytest.raises(RuntimeError, match=r"band\[3\] \(prefix_causal\) must be 0 or 1, got 2"):
        raw_forward(layout.kv_indices, [-(2**40), 0, 4, 2])
    with pytest.raises(RuntimeError, match="band must be"):
        raw_forward(layout.kv_indices, [-(2**40), 0])


def test_raw_forward_op_is_not_differentiable_alone():
    layout = BlockLayout.from_element_mask(ElementMask.causal(), 16, 16, block_size=16)
    q = torch.randn(1, 16, 1, 4, requires_grad=True)
    out, _ = torch.ops.tokenmix.block_sparse_forward(
        q,
        q,
        q,
        layout.kv_num_blocks,
        layout.kv_indices,
        layout.full_kv_num_blocks,
        layout.full_kv_indices,
        [16, 16],
        None,
        None,
        None,
        [],
        1.0,
    )
    with pytest.raises(RuntimeError, match="not differentiable by itself"):
        out.sum().backward()


def test_empty_inputs():
    layout = BlockLayout.from_element_mask(ElementMask.causal(), 32, 32, block_size=16)
    q = torch.randn(0, 32, 2, 8, requires_grad=True)
    out = tokenmix.block_sparse_attention(q, q, q, layout)
    assert out.shape == (0, 32, 2, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape
