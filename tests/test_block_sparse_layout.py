"""BlockLayout, ElementMask and the reference: against FlexAttention and brute force.

The brute-force masks here are built directly from each rule's formula, independently of the
layout code; flex_attention (eager, CPU) is the semantic oracle of the reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from tokenmix import BlockLayout, ElementMask
from tokenmix.block_sparse import block_sparse_attention_reference as reference
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention


def flex(q, k, v, bm, scale=None):
    out, lse = flex_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=bm,
        scale=scale,
        return_aux=AuxRequest(lse=True),
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2), lse.lse.transpose(1, 2)


def rand_qkv(b, tq, tk, h, hkv, d, dv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, h, d, generator=g, dtype=dtype)
    k = torch.randn(b, tk, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(b, tk, hkv, dv, generator=g, dtype=dtype)
    return q, k, v


def doc_ids(t, docs, seed):
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(t - 1, generator=g)[: docs - 1].sort().values + 1
    ids = torch.zeros(t, dtype=torch.int64)
    ids[cuts] = 1
    return ids.cumsum(0)


# Flex mask_mods (the formulas), each with its brute-force twin on index grids.
def mask_mods(tq, tk, seed):
    offset = tk - tq
    docs = doc_ids(max(tq, tk), 3, seed)
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(4, 8, 9, generator=g) < 0.5

    def causal(b, h, q, k):
        return q + offset >= k

    def window(b, h, q, k):
        return (q + offset - k <= 17) & (q + offset >= k)

    def document(b, h, q, k):
        return docs[q] == docs[k]

    def prefix(b, h, q, k):
        return (k < 11) | (q + offset >= k)

    def random_elements(b, h, q, k):
        return table[h % 4, q % 8, k % 9]

    return {
        "causal": causal,
        "window": window,
        "document": document,
        "prefix": prefix,
        "random": random_elements,
    }


def brute(mask_mod, b, h, tq, tk):
    bb = torch.arange(b).view(-1, 1, 1, 1)
    hh = torch.arange(h).view(1, -1, 1, 1)
    qq = torch.arange(tq).view(1, 1, -1, 1)
    kk = torch.arange(tk).view(1, 1, 1, -1)
    return torch.broadcast_to(mask_mod(bb, hh, qq, kk), (b, h, tq, tk))


CASES = [
    # b, h, hkv, tq, tk, block
    (1, 2, 2, 64, 64, (16, 16)),
    (2, 4, 2, 100, 130, (32, 64)),
    (2, 3, 1, 77, 77, (128, 128)),
    (1, 2, 1, 150, 90, (48, 16)),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("name", ["causal", "window", "document", "prefix", "random"])
@pytest.mark.parametrize("broadcast", [False, True], ids=["per-bh", "broadcast"])
def test_reference_matches_flex(case, name, broadcast):
    b, h, hkv, tq, tk, block = case
    mm = mask_mods(tq, tk, seed=tq)[name]
    bm = create_block_mask(
        mm,
        None if broadcast else b,
        None if broadcast else h,
        tq,
        tk,
        device="cpu",
        BLOCK_SIZE=block,
    )
    layout = BlockLayout.from_block_mask(bm, batch=b, heads=h)
    # A user mask_mod is evaluated with the real batch/head indices, as Flex does, so a
    # broadcast BlockMask is expanded to q's B and H.
    assert (layout.batch, layout.heads) == (b, h)
    assert torch.equal(layout.dense_mask(), brute(mm, b, h, tq, tk))
    q, k, v = rand_qkv(b, tq, tk, h, hkv, 16, 24, seed=len(name))
    out, lse = reference(q, k, v, layout, return_lse=True)
    fout, flse = flex(q, k, v, bm)
    # The BlockMask itself is accepted too (converted for q's batch and heads).
    torch.testing.assert_close(reference(q, k, v, bm), fout, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, fout, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, flse, atol=1e-12, rtol=1e-12)
    # to_block_mask round-trips: Flex on the converted layout gives the same result.
    rout, _ = flex(q, k, v, layout.to_block_mask())
    torch.testing.assert_close(rout, fout, atol=1e-12, rtol=1e-12)


def structured_rules(tq, tk):
    off = tk - tq
    docs_q = doc_ids(tq, 4, 1)
    docs_k = docs_q if tq == tk else doc_ids(tk, 4, 1)
    return {
        "causal": (ElementMask.causal(off), lambda q, k: k <= q + off),
        "window": (
            ElementMask.sliding_window(13, 5, off),
            lambda q, k: (k >= q + off - 13) & (k <= q + off + 5),
        ),
        "prefix": (ElementMask.prefix_lm(9, off), lambda q, k: (k <= q + off) | (k < 9)),
        "sinks": (
            ElementMask(band=(off - 11, off), prefix=21, prefix_causal=True),
            lambda q, k: ((k >= q + off - 11) | (k < 21)) & (k <= q + off),
        ),
        # Blocks that straddle the prefix: full where the sinks below it and the band above it
        # are both kept whole (with block size 16 at Tq = Tk = 64, keys 16-31 of queries 32-47).
        "sinks-straddle": (
            ElementMask(band=(off - 29, off), prefix=20, prefix_causal=True),
            lambda q, k: ((k >= q + off - 29) | (k < 20)) & (k <= q + off),
        ),
        "prefix-straddle": (
            ElementMask(band=(off - 29, off), prefix=20),
            lambda q, k: ((k >= q + off - 29) & (k <= q + off)) | (k < 20),
        ),
        "window-sinks": (
            ElementMask(band=(off - 7, off + 3), prefix=12, prefix_causal=True),
            lambda q, k: ((k >= q + off - 7) | (k < 12)) & (k <= q + off + 3),
        ),
        "document": (
            ElementMask.document(docs_q, docs_k),
            lambda q, k: docs_q[q] == docs_k[k],
        ),
        "document-causal": (
            ElementMask.document(docs_q, docs_k, causal=True, offset=off),
            lambda q, k: (docs_q[q] == docs_k[k]) & (k <= q + off),
        ),
    }


# Document ids describe one packed sequence: those rules run with Tq == Tk only.
STRUCTURED = [
    (tq, tk, rule)
    for tq, tk in [(64, 64), (100, 100), (70, 133), (129, 40)]
    for rule in [
        "causal",
        "window",
        "prefix",
        "sinks",
        "sinks-straddle",
        "prefix-straddle",
        "window-sinks",
        "document",
        "document-causal",
    ]
    if tq == tk or not rule.startswith("document")
]


@pytest.mark.parametrize("tq,tk,rule", STRUCTURED)
@pytest.mark.parametrize("block", [(16, 16), (32, 64), (48, 20), (128, 128)], ids=str)
def test_structured_layout_is_exact(tq, tk, block, rule):
    em, formula = structured_rules(tq, tk)[rule]
    layout = BlockLayout.from_element_mask(em, tq, tk, block_size=block)
    want = formula(torch.arange(tq).view(-1, 1), torch.arange(tk).view(1, -1))
    assert torch.equal(layout.dense_mask()[0, 0], want)
    # Full blocks are exactly the blocks the rule keeps whole; skipped blocks keep nothing.
    status = layout.block_status()[0, 0]
    for i in range(layout.num_q_blocks):
        for j in range(layout.num_kv_blocks):
            tile = want[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            if status[i, j] == 0:
                assert not tile.any()
            if tile.all():
                assert status[i, j] == 2
    # The same rule as a Flex mask_mod gives the same attention.
    q, k, v = rand_qkv(1, tq, tk, 2, 2, 8, 8, seed=3)
    bm = create_block_mask(em.mask_mod(), None, None, tq, tk, device="cpu", BLOCK_SIZE=block)
    torch.testing.assert_close(reference(q, k, v, layout), flex(q, k, v, bm)[0])
    # A BlockMask made from the rule's mask_mod converts back to the structured rule.
    assert BlockLayout.from_block_mask(bm).element_mask is not None


def test_band_arg_passes_the_causal_prefix_to_the_ops():
    assert ElementMask.prefix_lm(5).band_arg()[2:] == [5]
    assert ElementMask(band=(-8, 0), prefix=5, prefix_causal=True).band_arg() == [-8, 0, 5, 1]
    # Without a prefix the flag changes nothing, so the ops get the plain band.
    assert ElementMask(band=(-8, 0), prefix_causal=True).band_arg() == [-8, 0, 0]


def test_broadcast_stays_broadcast_without_a_user_mask_mod():
    em = ElementMask.causal()
    bm = create_block_mask(em.mask_mod(), None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    layout = BlockLayout.from_block_mask(bm, batch=3, heads=4)
    assert (layout.batch, layout.heads) == (1, 1) and layout.element_mask is not None
    assert layout.mask_bits is None


def test_q_side_lists_transpose_the_layout():
    g = torch.Generator().manual_seed(5)
    status = torch.randint(0, 3, (2, 3, 7, 9), generator=g)
    layout = BlockLayout.from_block_status(status, block_size=(16, 8), seq_lengths=(100, 70))
    assert torch.equal(layout.block_status().long(), status)
    slots = layout.partial_slots()
    for lb in range(2):
        for lh in range(3):
            for kb in range(9):
                n = int(layout.q_num_blocks[lb, lh, kb])
                rows = layout.q_indices[lb, lh, kb, :n].tolist()
                assert rows == (status[lb, lh, :, kb] == 1).nonzero().flatten().tolist()
                for r, s in zip(rows, layout.q_slots[lb, lh, kb, :n].tolist(), strict=True):
                    assert slots[lb, lh, r, kb] == s
                    assert layout.kv_indices[lb, lh, r, s] == kb
                nf = int(layout.full_q_num_blocks[lb, lh, kb])
                full_rows = layout.full_q_indices[lb, lh, kb, :nf].tolist()
                assert full_rows == (status[lb, lh, :, kb] == 2).nonzero().flatten().tolist()


def test_mask_mod_evaluated_once_per_partial_block():
    calls = []

    def counting(b, h, q, k):
        calls.append(q.numel() * k.numel() // max(q.shape[-1], 1) if q.dim() else 1)
        return (q * 3 + k) % 4 != 0

    t, block = 1024, 64
    status = torch.zeros(1, 1, t // block, t // block, dtype=torch.int64)
    status[0, 0, :, 0] = 1  # one partial block per query block
    status[0, 0, :, 1] = 2
    layout = BlockLayout.from_block_status(
        status, block_size=block, seq_lengths=(t, t), mask_bits_fn=counting
    )
    # 16 partial blocks of 64 x 64: evaluated on 16 * 64 * 64 elements, not t * t.
    assert len(calls) == 1
    assert layout.mask_bits.shape == (1, 1, 16, 1, 64, 2)
    dense = layout.dense_mask()[0, 0]
    qq, kk = torch.arange(t).view(-1, 1), torch.arange(t).view(1, -1)
    want = torch.where(kk < block, (qq * 3 + kk) % 4 != 0, (kk >= block) & (kk < 2 * block))
    assert torch.equal(dense, want)


def test_vmap_only_mask_mod():
    # A mask_mod with Python control flow on a scalar tensor works under vmap only.
    table = torch.tensor([True, False, True])

    def scalar_only(b, h, q, k):
        return table[(q + k) % 3]

    t = 40
    bm = create_block_mask(scalar_only, None, None, t, t, device="cpu", BLOCK_SIZE=16)
    layout = BlockLayout.from_block_mask(bm)
    assert torch.equal(layout.dense_mask()[0, 0], brute(scalar_only, 1, 1, t, t)[0, 0])


def test_layout_errors_name_the_argument():
    c = torch.ones(1, 1, 2, dtype=torch.int32)
    i = torch.zeros(1, 1, 2, 2, dtype=torch.int32)
    i[..., 1] = 1
    kw = dict(block_size=16, seq_lengths=(32, 32))
    BlockLayout(c * 2, i, **kw)  # valid
    with pytest.raises(ValueError, match="kv_indices holds block index 5"):
        BlockLayout(c, i + 5, **kw)
    with pytest.raises(ValueError, match="kv_num_blocks holds 3"):
        BlockLayout(c * 3, i, **kw)
    with pytest.raises(ValueError, match="kv_num_blocks has 2 query blocks"):
        BlockLayout(c, i, block_size=16, seq_lengths=(64, 32))
    with pytest.raises(ValueError, match="listed more than once"):
        BlockLayout(c, i, c, i, **kw)
    with pytest.raises(ValueError, match="mask_bits must have shape"):
        BlockLayout(c, i, **kw, mask_bits=torch.zeros(1, 1, 2, 2, 16, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_indices must be an integer tensor"):
        BlockLayout(c, i.float(), **kw)
    with pytest.raises(ValueError, match="block_size"):
        BlockLayout(c, i, block_size=0, seq_lengths=(32, 32))
    with pytest.raises(ValueError, match="document ids have lengths"):
        ElementMask.document(torch.zeros(10, dtype=torch.int64)).check_lengths(12, 12)
    with pytest.raises(ValueError, match="q_doc must hold integer"):
        ElementMask.document(torch.zeros(10))
    with pytest.raises(TypeError, match="prefix_causal must be a bool"):
        ElementMask(band=(-4, 0), prefix=2, prefix_causal=1)

    def broken(b, h, q, k):
        raise RuntimeError("boom")

    with pytest.raises(ValueError, match="mask_mod failed .*boom"):
        BlockLayout(c, i, **kw).with_mask_mod(broken)


def test_layout_list_values_are_checked_before_int32():
    """int64 lists are range-checked as given: a cast first would wrap 2**32 + 3 to 3."""
    kw = dict(block_size=16, seq_lengths=(64, 64))
    count = torch.ones(1, 1, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="kv_indices holds 4294967299, outside the int32"):
        BlockLayout(count, torch.full((1, 1, 4, 1), 2**32 + 3, dtype=torch.int64), **kw)
    with pytest.raises(ValueError, match="kv_num_blocks holds 4294967297, outside the int32"):
        BlockLayout(count + 2**32, torch.zeros(1, 1, 4, 1, dtype=torch.int64), **kw)
    with pytest.raises(ValueError, match="kv_num_blocks holds -4294967296"):
        BlockLayout(count - 1 - 2**32, torch.zeros(1, 1, 4, 1, dtype=torch.int64), **kw)


def test_layout_counts_above_the_kv_blocks_name_the_count():
    """A count over the number of kv blocks is named as such, also when the index rows are
    padded past it (Flex pads them to num_kv_blocks entries and more)."""
    index = torch.tensor([0, 1, 0, 1, 0, 0], dtype=torch.int32).repeat(1, 1, 2, 1)
    count = torch.full((1, 1, 2), 3, dtype=torch.int32)
    kw = dict(block_size=16, seq_lengths=(32, 32))
    with pytest.raises(ValueError, match="kv_num_blocks holds 3, more than the 2 kv blocks"):
        BlockLayout(count, index, **kw)
    with pytest.raises(ValueError, match="full_kv_num_blocks holds 3, more than the 2 kv"):
        BlockLayout(count * 0, index, count, index, **kw)


def test_empty_query_sequence_layout():
    """Tq = 0 (and layouts with no query blocks) build, and attention over them is empty."""
    import tokenmix

    layout = BlockLayout.from_element_mask(ElementMask.causal(), 0, 64, block_size=16)
    assert layout.num_q_blocks == 0
    empty = BlockLayout(
        torch.zeros(1, 1, 0, dtype=torch.int32),
        torch.zeros(1, 1, 0, 0, dtype=torch.int32),
        block_size=16,
        seq_lengths=(0, 64),
    )
    for lay in (layout, empty):
        q = torch.randn(1, 0, 2, 8, requires_grad=True)
        k = torch.randn(1, 64, 2, 8, requires_grad=True)
        v = torch.randn(1, 64, 2, 8, requires_grad=True)
        out, lse = tokenmix.block_sparse_attention(q, k, v, lay, return_lse=True)
        assert out.shape == (1, 0, 2, 8) and lse.shape == (1, 0, 2)
        out.sum().backward()
        assert q.grad.shape == q.shape
        assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


def test_block_status_table_is_checked_against_the_lengths():
    kw = dict(block_size=16, seq_lengths=(32, 32))
    BlockLayout.from_block_status(torch.full((1, 1, 2, 2), 2), **kw)  # valid
    with pytest.raises(ValueError, match=r"status has 2 x 1 .* give 2 x 2"):
        BlockLayout.from_block_status(torch.full((1, 1, 2, 1), 2), **kw)  # a kv block missing
    with pytest.raises(ValueError, match=r"status has 2 x 5 .* give 2 x 2"):
        BlockLayout.from_block_status(torch.ones(1, 1, 2, 5, dtype=torch.int64), **kw)
    with pytest.raises(ValueError, match=r"status has 1 x 2 .* give 2 x 2"):
        BlockLayout.from_block_status(torch.ones(1, 1, 1, 2, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="status must be a bool or integer tensor"):
        BlockLayout.from_block_status(torch.full((1, 1, 2, 2), 1.5), **kw)


def test_argument_errors_name_what_is_wrong():
    """Messages found unclear by an API audit: each names the argument at fault."""
    import tokenmix

    with pytest.raises(ValueError, match=r"block_size must be an int or \(q_block, kv_block\)"):
        BlockLayout.from_element_mask(ElementMask.causal(), 32, 32, block_size=(16, 16, 16))
    with pytest.raises(TypeError, match="block_size"):
        BlockLayout.from_element_mask(ElementMask.causal(), 32, 32, block_size="16")
    docs = torch.zeros(2, 32, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"document ids \(q_doc, kv_doc\) have batch size 2, "):
        ElementMask.document(docs).check_lengths(32, 32, batch=1)
    q = torch.randn(1, 32, 0, 8)
    layout = BlockLayout.from_element_mask(ElementMask.causal(), 32, 32, block_size=16)
    with pytest.raises(ValueError, match="k and v must have at least one head, got 0"):
        tokenmix.block_sparse_attention(q, q, q, layout)
    with pytest.raises(TypeError, match="dim"):
        tokenmix.nn.BlockSparseAttention(32.0, 4, lambda t: layout)
    with pytest.raises(TypeError, match="num_heads"):
        tokenmix.nn.BlockSparseAttention(32, 4.0, lambda t: layout)


def test_reference_fully_masked_rows_and_gradients():
    # Query block 1 lists no kv block: its rows give 0 and LSE -inf, and no gradient.
    c = torch.tensor([[[1, 0]]], dtype=torch.int32)
    i = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    layout = BlockLayout(c, i, block_size=8, seq_lengths=(16, 16))
    q, k, v = rand_qkv(1, 16, 16, 2, 2, 4, 4)
    q.requires_grad_(True)
    k.requires_grad_(True)
    out, lse = reference(q, k, v, layout, return_lse=True)
    assert torch.equal(out[:, 8:], torch.zeros_like(out[:, 8:]))
    assert torch.isneginf(lse[:, 8:]).all()
    (out.sum() + lse[:, :8].sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.equal(
        q.grad[:, 8:], torch.zeros_like(q.grad[:, 8:])
    )
    assert torch.equal(k.grad[:, 8:], torch.zeros_like(k.grad[:, 8:]))


def test_reference_gradcheck():
    layout = BlockLayout.from_element_mask(ElementMask.sliding_window(5, 2), 20, 20, block_size=8)
    q, k, v = rand_qkv(1, 20, 20, 2, 1, 4, 3)
    for t in (q, k, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: reference(q, k, v, layout, return_lse=True), (q, k, v)
    )


def test_reference_is_memory_bounded(monkeypatch):
    # Chunks of queries: the largest logits tensor stays within the chunk budget.
    import tokenmix.block_sparse.reference as ref_mod

    seen = []
    chunk = ref_mod._chunk

    def spy(q, k, v, keep, scale):
        seen.append(q.shape[1] * k.shape[1] * q.shape[0] * q.shape[2])
        return chunk(q, k, v, keep, scale)

    monkeypatch.setattr(ref_mod, "_CHUNK_BUDGET", 1 << 12)
    monkeypatch.setattr(ref_mod, "_chunk", spy)
    layout = BlockLayout.from_element_mask(ElementMask.causal(), 256, 256, block_size=32)
    q, k, v = rand_qkv(1, 256, 256, 1, 1, 4, 4, dtype=torch.float32)
    reference(q, k, v, layout)
    assert len(seen) == 16 and max(seen) <= 1 << 12
    assert math.prod((256, 256)) > 1 << 12


@pytest.mark.parametrize("rule", ["none", "bits", "bits_and_band", "band"])
def test_to_block_mask_mask_mod_is_exact_outside_the_listed_blocks(rule):
    # Eager flex_attention and create_mask evaluate the mask_mod on every element, so the
    # mask_mod of a layout built from lists must encode the lists themselves (skipped blocks
    # False, full blocks True), not only the rule of partial blocks.
    from torch.nn.attention.flex_attention import create_mask

    gen = torch.Generator().manual_seed(31)
    t, block, heads = 150, 32, 2
    n = math.ceil(t / block)
    status = torch.randint(0, 3, (1, heads, n, n), generator=gen)
    kwargs = {}
    if "band" in rule:
        kwargs["element_mask"] = ElementMask.sliding_window(40, 10)
    layout = BlockLayout.from_block_status(status, block_size=block, seq_lengths=(t, t), **kwargs)
    if "bits" in rule:
        layout = BlockLayout(
            layout.kv_num_blocks,
            layout.kv_indices,
            layout.full_kv_num_blocks,
            layout.full_kv_indices,
            block_size=block,
            seq_lengths=(t, t),
            element_mask=layout.element_mask,
            mask_bits=torch.randint(
                -(2**31), 2**31 - 1, (*layout.kv_indices.shape, block, 1), generator=gen
            ).to(torch.int32),
        )
    bm = layout.to_block_mask()
    dense = create_mask(bm.mask_mod, 1, heads, t, t, device="cpu")
    assert torch.equal(dense, layout.dense_mask().expand(1, heads, t, t))
    q, k, v = (torch.randn(1, t, heads, 16, generator=gen) for _ in range(3))
    want = reference(q, k, v, layout)
    got = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm)
    rows = layout.dense_mask().any(-1).expand(1, heads, t).transpose(1, 2)  # rows with a key
    torch.testing.assert_close(got.transpose(1, 2)[rows], want[rows], atol=2e-5, rtol=2e-5)


def _squares_layout(b, h, tq, tk, block, square, seed=0, density=0.3):
    """A Flex mask of random ``square x square`` blocks (per batch and head), as the
    BlockLayout of its BlockMask at ``block``: a mask finer than its blocks."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(b, h, -(-tq // square), -(-tk // square), generator=gen) < density

    def mod(bb, hh, q, k):
        return table[bb, hh, q // square, k // square]

    bm = create_block_mask(mod, b, h, tq, tk, device="cpu", BLOCK_SIZE=block)
    return BlockLayout.from_block_mask(bm, batch=b, heads=h)


@pytest.mark.parametrize(
    "block, square, tq, tk, want",
    [
        ((128, 128), 64, 1024, 1024, 64),
        ((256, 256), 64, 1024, 768, 64),
        ((256, 128), 64, 512, 1024, 64),
        ((256, 256), 128, 1024, 1024, 128),
        ((128, 128), 64, 320, 448, 64),  # ragged: the last blocks cut to the lengths
    ],
)
def test_bits_of_whole_squares_run_as_finer_blocks(block, square, tq, tk, want):
    """A bitmask made of whole squares of 64 or more (each all kept or all dropped) runs as a
    layout of those squares, with no bits and no partial block: the same mask."""
    layout = _squares_layout(2, 3, tq, tk, block, square)
    assert layout.block_size == block and int(layout.kv_num_blocks.sum()) > 0
    refined = layout.kernel_layout
    assert refined is not layout
    assert refined.block_size == (want, want) and refined.seq_lengths == (tq, tk)
    assert refined.mask_bits is None and int(refined.kv_num_blocks.sum()) == 0
    assert torch.equal(refined.dense_mask(), layout.dense_mask())
    # The layout itself is unchanged: its block size, bits and Flex round trip.
    assert layout.mask_bits is not None
    assert layout.to_block_mask().BLOCK_SIZE == block


def test_bits_that_need_bits_stay():
    """No refinement when a square of every size >= 64 mixes kept and dropped elements, when
    the lengths are not multiples of the square, or with an element rule next to the bits."""
    causal = create_block_mask(lambda b, h, q, k: k <= q, 1, 1, 512, 512, "cpu", BLOCK_SIZE=128)
    layout = BlockLayout.from_block_mask(causal)
    assert layout.kernel_layout is layout
    squares = _squares_layout(1, 2, 1000, 1024, (128, 128), 64)  # 1000 % 64 != 0
    assert squares.mask_bits is not None and squares.kernel_layout is squares
    squares = _squares_layout(1, 1, 512, 512, (128, 128), 32)  # 32 x 32 squares: too fine
    assert squares.kernel_layout is squares
    whole = _squares_layout(1, 1, 512, 512, (128, 128), 64)
    with_rule = BlockLayout(
        whole.kv_num_blocks,
        whole.kv_indices,
        whole.full_kv_num_blocks,
        whole.full_kv_indices,
        block_size=128,
        seq_lengths=(512, 512),
        element_mask=ElementMask.causal(),
        mask_bits=whole.mask_bits,
    )
    assert whole.kernel_layout is not whole and with_rule.kernel_layout is with_rule
