"""The CPU block-sparse kernels, called through the raw ops.

torch.ops.tokenmix.block_sparse_forward / block_sparse_backward are compared with a
dense masked softmax computed here from the same layout (independent of the kernel
code and of tokenmix's Python layer): random layouts of partial and full blocks, every
part of the element rule, GQA, Tq != Tk, ragged lengths, block sizes from 16 to 128
and non-multiples of the vector width, layout broadcast, fp64 gradcheck, determinism
across thread counts, fully masked rows and non-finite K/V where nothing keeps them.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import tokenmix  # noqa: F401  (loads the ops)
import torch

OPS = torch.ops.tokenmix
NONE, PARTIAL, FULL = 0, 1, 2


class Layout:
    """A block layout as the ops take it, plus the dense mask it stands for."""

    def __init__(
        self,
        kinds,
        q_block,
        kv_block,
        q_len,
        kv_len,
        *,
        bits=None,
        band=None,
        q_doc=None,
        kv_doc=None,
        shuffle=None,
    ):
        # kinds: int tensor [LB, LH, nq, nk] of NONE / PARTIAL / FULL.
        self.kinds = kinds
        self.q_block, self.kv_block = q_block, kv_block
        self.q_len, self.kv_len = q_len, kv_len
        lb, lh, nq, nk = kinds.shape
        assert nq == math.ceil(q_len / q_block) and nk == math.ceil(kv_len / kv_block)
        lists = {PARTIAL: [], FULL: []}
        for kind in (PARTIAL, FULL):
            for b in range(lb):
                for h in range(lh):
                    for i in range(nq):
                        idx = [j for j in range(nk) if int(kinds[b, h, i, j]) == kind]
                        if shuffle is not None:
                            perm = torch.randperm(len(idx), generator=shuffle).tolist()
                            idx = [idx[p] for p in perm]
                        lists[kind].append(idx)
        self.partial_lists, self.full_lists = lists[PARTIAL], lists[FULL]

        def pack(rows, shape, width):
            num = torch.zeros(shape, dtype=torch.int32)
            ind = torch.zeros(shape + (max(1, width),), dtype=torch.int32)
            flat_n, flat_i = num.view(-1), ind.view(-1, max(1, width))
            for r, idx in enumerate(rows):
                flat_n[r] = len(idx)
                if idx:
                    flat_i[r, : len(idx)] = torch.tensor(idx, dtype=torch.int32)
            return num, ind

        max_p = max(len(x) for x in self.partial_lists)
        max_f = max(len(x) for x in self.full_lists)
        self.kv_num_blocks, self.kv_indices = pack(self.partial_lists, (lb, lh, nq), max_p)
        self.full_kv_num_blocks, self.full_kv_indices = pack(self.full_lists, (lb, lh, nq), max_f)
        # q side: which query blocks visit each kv block (and the slot of a partial one).
        q_partial, q_slots, q_full = [], [], []
        for b in range(lb):
            for h in range(lh):
                for j in range(nk):
                    qp, qs, qf = [], [], []
                    for i in range(nq):
                        r = (b * lh + h) * nq + i
                        if j in self.partial_lists[r]:
                            qp.append(i)
                            qs.append(self.partial_lists[r].index(j))
                        if j in self.full_lists[r]:
                            qf.append(i)
                    q_partial.append(qp)
                    q_slots.append(qs)
                    q_full.append(qf)
        mq = max(len(x) for x in q_partial)
        self.q_num_blocks, self.q_indices = pack(q_partial, (lb, lh, nk), mq)
        _, self.q_slots = pack(q_slots, (lb, lh, nk), mq)
        mf = max(len(x) for x in q_full)
        self.full_q_num_blocks, self.full_q_indices = pack(q_full, (lb, lh, nk), mf)

        self.words = math.ceil(kv_block / 32)
        self.bits = bits  # bool [LB, LH, nq, max_p, q_block, kv_block] or None
        self.mask_bits = None
        if bits is not None:
            assert bits.shape == (lb, lh, nq, max(1, max_p), q_block, kv_block)
            padded = torch.zeros(bits.shape[:-1] + (self.words * 32,), dtype=torch.int64)
            padded[..., :kv_block] = bits.long()
            weights = 2 ** torch.arange(32, dtype=torch.int64)
            words = (padded.view(bits.shape[:-1] + (self.words, 32)) * weights).sum(-1)
            self.mask_bits = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        self.band = band  # (lo, hi, prefix), (lo, hi, prefix, 1) or None
        self.q_doc, self.kv_doc = q_doc, kv_doc

    def dense(self, batch, heads):
        """bool [B, H, Tq, Tk]: the elements the layout keeps."""
        lb, lh, nq, _ = self.kinds.shape
        qb, kb = self.q_block, self.kv_block
        m = torch.zeros(batch, heads, self.q_len, self.kv_len, dtype=torch.bool)
        qi = torch.arange(self.q_len)[:, None]
        ki = torch.arange(self.kv_len)[None, :]
        rule = torch.ones(batch, self.q_len, self.kv_len, dtype=torch.bool)
        if self.band is not None:
            lo, hi, prefix = self.band[:3]
            d = ki - qi
            sinks = (ki < prefix) & (d <= hi) if self.band[3:] == (1,) else ki < prefix
            rule &= (((d >= lo) & (d <= hi)) | sinks)[None]
        if self.q_doc is not None:
            qd = self.q_doc.expand(batch, -1)
            kd = self.kv_doc.expand(batch, -1)
            rule &= qd[:, :, None] == kd[:, None, :]
        for b in range(batch):
            for h in range(heads):
                lbi, lhi = (b if lb > 1 else 0), (h // (heads // lh) if lh > 1 else 0)
                for i in range(nq):
                    r = (lbi * lh + lhi) * nq + i
                    q0, q1 = i * qb, min((i + 1) * qb, self.q_len)
                    for s, j in enumerate(self.partial_lists[r]):
                        k0, k1 = j * kb, min((j + 1) * kb, self.kv_len)
                        blk = rule[b, q0:q1, k0:k1].clone()
                        if self.bits is not None:
                            blk &= self.bits[lbi, lhi, i, s, : q1 - q0, : k1 - k0]
                        m[b, h, q0:q1, k0:k1] |= blk
                    for j in self.full_lists[r]:
                        k0, k1 = j * kb, min((j + 1) * kb, self.kv_len)
                        m[b, h, q0:q1, k0:k1] = True
        return m

    def kv_args(self):
        return (self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices)

    def q_args(self):
        return (
            self.q_num_blocks,
            self.q_indices,
            self.q_slots,
            self.full_q_num_blocks,
            self.full_q_indices,
        )

    def rule_args(self):
        band = list(self.band) if self.band is not None else []
        return (self.mask_bits, self.q_doc, self.kv_doc, band)


def forward(q, k, v, lay, scale):
    return OPS.block_sparse_forward(
        q, k, v, *lay.kv_args(), [lay.q_block, lay.kv_block], *lay.rule_args(), scale
    )


def backward(grad_out, q, k, v, out, lse, lay, scale, grad_lse=None):
    return OPS.block_sparse_backward(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        *lay.kv_args(),
        *lay.q_args(),
        [lay.q_block, lay.kv_block],
        *lay.rule_args(),
        scale,
        grad_lse,
    )


def dense_attention(q, k, v, mask, scale):
    """Masked softmax attention in the inputs' dtype: out [B, Tq, H, Dv], lse [B, Tq, H].
    A row that keeps nothing gives 0 and -inf; differentiable (no NaN from such rows)."""
    heads, kv_heads = q.shape[2], k.shape[2]
    kk = k.repeat_interleave(heads // kv_heads, dim=2)
    vv = v.repeat_interleave(heads // kv_heads, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    s = s.masked_fill(~mask, -math.inf)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    has = total > 0
    safe = torch.where(has, total, torch.ones_like(total))
    out = torch.einsum("bhqk,bkhd->bqhd", e / safe, vv)
    lse = torch.where(has, torch.log(safe) + m, torch.full_like(m, -math.inf))
    return out, lse.squeeze(-1).transpose(1, 2)


def random_kinds(gen, lb, lh, nq, nk, p_partial=0.3, p_full=0.3):
    u = torch.rand(lb, lh, nq, nk, generator=gen)
    kinds = torch.zeros(lb, lh, nq, nk, dtype=torch.int64)
    kinds[u < p_partial + p_full] = FULL
    kinds[u < p_partial] = PARTIAL
    return kinds


def random_bits(gen, kinds, q_block, kv_block, p=0.6):
    lb, lh, nq, _ = kinds.shape
    max_p = max(1, int((kinds == PARTIAL).sum(-1).max()))
    return torch.rand(lb, lh, nq, max_p, q_block, kv_block, generator=gen) < p


def inputs(gen, b, tq, tk, h, hkv, d, dv, dtype):
    q = torch.randn(b, tq, h, d, generator=gen).to(dtype)
    k = torch.randn(b, tk, hkv, d, generator=gen).to(dtype)
    v = torch.randn(b, tk, hkv, dv, generator=gen).to(dtype)
    return q, k, v


def check_against_dense(q, k, v, lay, scale, atol, *, grad_lse=True, gen=None):
    b, tq, h, _ = q.shape
    mask = lay.dense(b, h)
    out, lse = forward(q, k, v, lay, scale)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = dense_attention(q64, k64, v64, mask, scale)
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=atol, rtol=atol)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=atol, rtol=atol)
    go = torch.randn(out.shape, generator=gen).to(q.dtype)
    gl = torch.randn(lse.shape, generator=gen).to(lse.dtype) if grad_lse else None
    dq, dk, dv = backward(go, q, k, v, out, lse, lay, scale, gl)
    loss = (ref_out * go.double()).sum()
    if gl is not None:
        live = torch.isfinite(ref_lse)
        loss = loss + (torch.where(live, ref_lse, 0) * gl.double()).sum()
    rq, rk, rv = torch.autograd.grad(loss, (q64, k64, v64))
    for got, ref in ((dq, rq), (dk, rk), (dv, rv)):
        assert got.dtype == q.dtype and got.shape == ref.shape and got.is_contiguous()
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=atol)
    return out, lse, mask


ATOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


@pytest.mark.parametrize(
    "block", [(16, 16), (32, 64), (64, 64), (128, 128), (64, 128), (128, 32), (24, 40), (17, 50)]
)
def test_random_layout_bits(block):
    qb, kb = block
    gen = torch.Generator().manual_seed(qb * 1000 + kb)
    tq, tk = 3 * qb - 5, 2 * kb + 7
    nq, nk = math.ceil(tq / qb), math.ceil(tk / kb)
    kinds = random_kinds(gen, 1, 1, nq, nk)
    lay = Layout(kinds, qb, kb, tq, tk, bits=random_bits(gen, kinds, qb, kb))
    q, k, v = inputs(gen, 2, tq, tk, 2, 2, 40, 24, torch.float32)
    check_against_dense(q, k, v, lay, 0.3, ATOL[torch.float32], gen=gen)


def cell_bits(gen, kinds, q_block, kv_block, cell):
    """Bits made of cell x cell regions, each empty, all kept or random: a coarse pattern given
    as larger blocks (the kernels skip the empty key words of a tile and treat all-kept ones as
    full)."""
    lb, lh, nq, _ = kinds.shape
    max_p = max(1, int((kinds == PARTIAL).sum(-1).max()))
    cq, ck = math.ceil(q_block / cell[0]), math.ceil(kv_block / cell[1])
    kind = torch.randint(0, 3, (lb, lh, nq, max_p, cq, ck), generator=gen)
    kind = kind.repeat_interleave(cell[0], -2)[..., :q_block, :]
    kind = kind.repeat_interleave(cell[1], -1)[..., :kv_block]
    noise = torch.rand(kind.shape, generator=gen) < 0.5
    return (kind == 1) | ((kind == 2) & noise)


@pytest.mark.parametrize(
    "block, cell, rule, dtype",
    [
        ((128, 128), (64, 64), None, torch.float32),
        ((128, 128), (64, 32), "band", torch.float32),
        ((128, 96), (32, 48), None, torch.float32),
        ((160, 200), (64, 40), "docs", torch.float32),
        ((64, 128), (16, 64), None, torch.float64),
    ],
)
def test_coarse_bits_in_large_blocks(block, cell, rule, dtype):
    qb, kb = block
    gen = torch.Generator().manual_seed(qb + kb + cell[1])
    tq, tk = 3 * qb - 9, 3 * kb - 11
    nq, nk = math.ceil(tq / qb), math.ceil(tk / kb)
    kinds = random_kinds(gen, 1, 1, nq, nk, p_partial=0.6, p_full=0.2)
    bits = cell_bits(gen, kinds, qb, kb, cell)
    extra = {}
    if rule == "band":
        extra["band"] = (-(2**40), 30, 0)
    elif rule == "docs":
        doc = (torch.arange(tk) * 4 // tk).to(torch.int32).view(1, tk)
        extra.update(q_doc=doc[:, :tq].contiguous(), kv_doc=doc)
    lay = Layout(kinds, qb, kb, tq, tk, bits=bits, **extra)
    # 4 query heads on 2 kv heads with a layout shared by all heads: tiles hold both heads
    q, k, v = inputs(gen, 2, tq, tk, 4, 2, 24, 16, dtype)
    check_against_dense(q, k, v, lay, 0.25, ATOL[dtype], gen=gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    gen = torch.Generator().manual_seed(7)
    qb, kb, tq, tk = 32, 32, 100, 90
    kinds = random_kinds(gen, 2, 1, 4, 3)
    lay = Layout(kinds, qb, kb, tq, tk, bits=random_bits(gen, kinds, qb, kb))
    q, k, v = inputs(gen, 2, tq, tk, 4, 2, 32, 48, dtype)
    check_against_dense(q, k, v, lay, 1 / math.sqrt(32), ATOL[dtype], gen=gen)


@pytest.mark.parametrize(
    "band",
    [
        (-(2**62), 0, 0),  # causal
        (-(2**62), 5, 0),  # causal with an offset
        (-40, 0, 16),  # sliding window with sink tokens
        (-30, 30, 0),  # symmetric window
        (-(2**62), 2**62, 0),  # everything
        (3, 2, 0),  # empty band: only the prefix could keep
        (-(2**62), 0, 70),  # prefix-LM
        (-40, 0, 16, 1),  # causal sliding window with attention sinks (causal prefix)
        (-30, 5, 50, 1),  # sinks up to an offset diagonal, more sinks than the window
        (3, 2, 20, 1),  # empty band: only the causal prefix keeps
        (-(2**62), 0, 0, 1),  # causal prefix of length 0: plain causal
    ],
)
def test_band_rule(band):
    gen = torch.Generator().manual_seed(11)
    qb, kb, tq, tk = 32, 16, 96, 112
    kinds = random_kinds(gen, 1, 1, 3, 7, p_partial=0.6, p_full=0.2)
    lay = Layout(kinds, qb, kb, tq, tk, band=band)
    q, k, v = inputs(gen, 1, tq, tk, 2, 1, 64, 64, torch.float32)
    check_against_dense(q, k, v, lay, 0.125, ATOL[torch.float32], gen=gen)


def test_document_rule_with_bits_and_band():
    gen = torch.Generator().manual_seed(12)
    qb, kb, tq, tk = 64, 64, 200, 200
    kinds = random_kinds(gen, 1, 1, 4, 4, p_partial=0.7, p_full=0.1)
    doc = torch.sort(torch.randint(0, 5, (2, tq), generator=gen), dim=1).values.to(torch.int32)
    lay = Layout(
        kinds,
        qb,
        kb,
        tq,
        tk,
        bits=random_bits(gen, kinds, qb, kb, p=0.8),
        band=(-(2**40), 0, 0),
        q_doc=doc,
        kv_doc=doc.clone(),
    )
    q, k, v = inputs(gen, 2, tq, tk, 2, 2, 32, 32, torch.float32)
    check_against_dense(q, k, v, lay, 0.2, ATOL[torch.float32], gen=gen)


def test_document_rule_broadcast_batch_tq_ne_tk():
    gen = torch.Generator().manual_seed(13)
    qb, kb, tq, tk = 16, 32, 70, 130
    kinds = random_kinds(gen, 1, 1, 5, 5, p_partial=0.8, p_full=0.1)
    q_doc = torch.randint(0, 3, (1, tq), generator=gen).to(torch.int32)
    kv_doc = torch.randint(0, 3, (1, tk), generator=gen).to(torch.int32)
    lay = Layout(kinds, qb, kb, tq, tk, q_doc=q_doc, kv_doc=kv_doc)
    q, k, v = inputs(gen, 3, tq, tk, 1, 1, 16, 16, torch.float32)
    check_against_dense(q, k, v, lay, 0.25, ATOL[torch.float32], gen=gen)


@pytest.mark.parametrize("layout_heads", ["broadcast", "per_kv_head", "per_head"])
@pytest.mark.parametrize("layout_batch", ["broadcast", "per_batch"])
def test_gqa_and_layout_broadcast(layout_heads, layout_batch):
    gen = torch.Generator().manual_seed(14)
    b, h, hkv = 2, 6, 2
    qb, kb, tq, tk = 32, 48, 150, 170
    lb = 1 if layout_batch == "broadcast" else b
    lh = {"broadcast": 1, "per_kv_head": hkv, "per_head": h}[layout_heads]
    kinds = random_kinds(gen, lb, lh, math.ceil(tq / qb), math.ceil(tk / kb))
    lay = Layout(
        kinds, qb, kb, tq, tk, bits=random_bits(gen, kinds, qb, kb), shuffle=gen
    )  # lists in random order
    q, k, v = inputs(gen, b, tq, tk, h, hkv, 24, 40, torch.float32)
    check_against_dense(q, k, v, lay, 0.3, ATOL[torch.float32], gen=gen)


def test_mqa_many_heads_large_blocks():
    gen = torch.Generator().manual_seed(15)
    b, h, hkv = 1, 8, 1
    qb, kb, tq, tk = 128, 128, 300, 400
    kinds = random_kinds(gen, 1, 1, 3, 4, p_partial=0.4, p_full=0.4)
    lay = Layout(kinds, qb, kb, tq, tk, band=(-(2**40), 100, 0))
    q, k, v = inputs(gen, b, tq, tk, h, hkv, 64, 64, torch.float32)
    check_against_dense(q, k, v, lay, 0.125, ATOL[torch.float32], gen=gen)


def test_strided_inputs():
    gen = torch.Generator().manual_seed(16)
    qb, kb, tq, tk = 32, 32, 64, 96
    kinds = random_kinds(gen, 1, 1, 2, 3)
    lay = Layout(kinds, qb, kb, tq, tk, bits=random_bits(gen, kinds, qb, kb))
    q = torch.randn(1, 2, tq, 32, generator=gen).transpose(1, 2)
    k = torch.randn(1, 2, tk, 64, generator=gen).transpose(1, 2)[..., :32]
    v = torch.randn(1, tk, 2, 80, generator=gen)[..., 16:48]
    check_against_dense(q, k, v, lay, 0.2, ATOL[torch.float32], gen=gen)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_heads_last_and_head_major_kv_agree(dense, dtype):
    # The forward copies heads-last K/V with several kv heads into head-major rows when the
    # tiles read each kv block at least twice (dense) and reads them in place otherwise (one
    # block per query block); head-major views and the backward always read in place. The same
    # values in the same GEMM order: the results must agree bit for bit, and with the dense
    # reference.
    gen = torch.Generator().manual_seed(21)
    qb = kb = 32
    tq, tk, h, hkv = 64, 256, 4, 2
    if dense:
        kinds = torch.full((1, 1, 2, 8), FULL, dtype=torch.int64)
        kinds[0, 0, 1, 3] = PARTIAL
    else:
        kinds = torch.zeros(1, 1, 2, 8, dtype=torch.int64)
        kinds[0, 0, 0, 5] = FULL
        kinds[0, 0, 1, 2] = PARTIAL
    lay = Layout(kinds, qb, kb, tq, tk, bits=random_bits(gen, kinds, qb, kb))
    # Two batches: the copy's rows are indexed by (batch, kv head, token).
    q, k, v = inputs(gen, 2, tq, tk, h, hkv, 64, 48, dtype)
    out, lse, _ = check_against_dense(q, k, v, lay, 0.125, ATOL[dtype], gen=gen)
    k_hm, v_hm = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
    out_hm, lse_hm = forward(q, k_hm, v_hm, lay, 0.125)
    assert torch.equal(out, out_hm) and torch.equal(lse, lse_hm)
    go = torch.randn(out.shape, generator=gen).to(dtype)
    grads = backward(go, q, k, v, out, lse, lay, 0.125)
    grads_hm = backward(go, q, k_hm, v_hm, out, lse, lay, 0.125)
    for got, want in zip(grads, grads_hm, strict=True):
        assert torch.equal(got, want)


def test_fully_masked_rows():
    gen = torch.Generator().manual_seed(17)
    qb, kb, tq, tk = 32, 32, 96, 64
    kinds = torch.zeros(1, 1, 3, 2, dtype=torch.int64)
    kinds[0, 0, 0, 0] = PARTIAL  # rows whose bits are all 0 keep nothing
    kinds[0, 0, 1, :] = FULL
    # query block 2 visits nothing
    bits = random_bits(gen, kinds, qb, kb)
    bits[0, 0, 0, 0, 5:9] = False
    lay = Layout(kinds, qb, kb, tq, tk, bits=bits)
    q, k, v = inputs(gen, 1, tq, tk, 2, 2, 16, 16, torch.float32)
    out, lse, mask = check_against_dense(q, k, v, lay, 0.3, ATOL[torch.float32], gen=gen)
    empty = ~mask.any(-1).transpose(1, 2)  # [B, Tq, H]
    assert empty[0, 64:].all() and empty[0, 5:9].all()
    assert (out[empty] == 0).all() and (lse[empty] == -math.inf).all()
    go = torch.randn(out.shape, generator=gen)
    gl = torch.randn(lse.shape, generator=gen)
    dq, _, _ = backward(go, q, k, v, out, lse, lay, 0.3, gl)
    assert (dq[empty] == 0).all()


def test_keys_past_kv_len_never_read():
    # The last kv block is ragged and its bits are all set: keys at or past kv_len live in
    # memory (NaN) right after the tensor's rows and must not be read.
    gen = torch.Generator().manual_seed(18)
    qb, kb, tq, tk = 64, 64, 64, 100
    kinds = torch.tensor([[[[PARTIAL, FULL]]]])
    bits = torch.ones(1, 1, 1, 1, qb, kb, dtype=torch.bool)
    lay = Layout(kinds, qb, kb, tq, tk, bits=bits)
    big_k = torch.full((1, 128, 1, 32), math.nan)
    big_v = torch.full((1, 128, 1, 32), math.nan)
    big_k[:, :tk] = torch.randn(1, tk, 1, 32, generator=gen)
    big_v[:, :tk] = torch.randn(1, tk, 1, 32, generator=gen)
    k, v = big_k[:, :tk], big_v[:, :tk]
    q = torch.randn(1, tq, 1, 32, generator=gen)
    check_against_dense(q, k, v, lay, 0.2, ATOL[torch.float32], gen=gen)
    lay2 = Layout(torch.tensor([[[[FULL, FULL]]]]), qb, kb, tq, tk)
    check_against_dense(q, k, v, lay2, 0.2, ATOL[torch.float32], gen=gen)


@pytest.mark.parametrize("poison", [math.inf, -math.inf, math.nan])
def test_non_finite_kv_where_nothing_keeps_them(poison):
    gen = torch.Generator().manual_seed(19)
    qb, kb, tq, tk = 32, 32, 64, 128
    kinds = torch.tensor([[[[PARTIAL, FULL, NONE, PARTIAL], [NONE, PARTIAL, NONE, FULL]]]])
    bits = random_bits(gen, kinds, qb, kb)
    # keys 3 and 17 (kv block 0) are dropped by every row of the one query block visiting it
    bits[0, 0, 0, 0, :, 3] = False
    bits[0, 0, 0, 0, :, 17] = False
    lay = Layout(kinds, qb, kb, tq, tk, bits=bits)
    q, k, v = inputs(gen, 1, tq, tk, 2, 1, 32, 32, torch.float32)
    mask = lay.dense(1, 2)
    assert not mask[..., 64:96].any() and not mask[..., 3].any() and not mask[..., 17].any()
    kp, vp = k.clone(), v.clone()
    for rows in (slice(64, 96), slice(3, 4)):  # unvisited block 2, masked key 3
        kp[:, rows] = poison
        vp[:, rows] = poison
    vp[:, 17] = poison  # masked key 17: V only
    out, lse = forward(q, kp, vp, lay, 0.2)
    ref_out, ref_lse = forward(q, k, v, lay, 0.2)
    assert torch.isfinite(out).all() and torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    go = torch.randn(out.shape, generator=gen)
    dq, dk, dv = backward(go, q, kp, vp, out, lse, lay, 0.2)
    rq, rk, rv = backward(go, q, k, v, ref_out, ref_lse, lay, 0.2)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    torch.testing.assert_close(dq, rq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dk, rk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dv, rv, atol=1e-5, rtol=1e-5)
    assert (dk[:, 64:96] == 0).all() and (dv[:, 3] == 0).all() and (dv[:, 17] == 0).all()


def test_non_finite_key_kept_by_some_rows():
    # Rows that keep a non-finite key get non-finite results (IEEE, as the reference);
    # the other rows of the same tile are exact.
    gen = torch.Generator().manual_seed(20)
    qb, kb, tq, tk = 64, 64, 64, 64
    kinds = torch.tensor([[[[PARTIAL]]]])
    lay = Layout(kinds, qb, kb, tq, tk, band=(-(2**40), 0, 0))  # causal
    q, k, v = inputs(gen, 1, tq, tk, 1, 1, 32, 32, torch.float32)
    kp, vp = k.clone(), v.clone()
    kp[:, 40] = math.inf
    vp[:, 40] = math.nan
    out, lse = forward(q, kp, vp, lay, 0.2)
    ref_out, ref_lse = forward(q, k, v, lay, 0.2)
    clean = slice(0, 40)  # causal rows before key 40 never keep it
    assert not torch.isfinite(out[:, 40:]).any()
    torch.testing.assert_close(out[:, clean], ref_out[:, clean], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[:, clean], ref_lse[:, clean], atol=1e-5, rtol=1e-5)
    go = torch.randn(out.shape, generator=gen)
    dq, _, _ = backward(go, q, kp, vp, out, lse, lay, 0.2)
    rq, _, _ = backward(go, q, k, v, ref_out, ref_lse, lay, 0.2)
    torch.testing.assert_close(dq[:, clean], rq[:, clean], atol=1e-5, rtol=1e-5)


class RawBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lay, scale):
        out, lse = forward(q, k, v, lay, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lay, ctx.scale = lay, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(
            grad_out.contiguous(), q, k, v, out, lse, ctx.lay, ctx.scale, grad_lse.contiguous()
        )
        return dq, dk, dv, None, None


@pytest.mark.parametrize("case", ["bits_gqa", "band_docs"])
def test_gradcheck_fp64(case):
    gen = torch.Generator().manual_seed(21)
    qb, kb, tq, tk = 8, 16, 20, 37
    kinds = random_kinds(gen, 1, 1, 3, 3, p_partial=0.5, p_full=0.2)
    kinds[..., 0] = FULL  # every row keeps a key: the LSE stays finite
    if case == "bits_gqa":
        lay = Layout(kinds, qb, kb, tq, tk, bits=random_bits(gen, kinds, qb, kb))
        h, hkv = 4, 2
    else:
        doc = torch.randint(0, 2, (1, tk), generator=gen).to(torch.int32)
        lay = Layout(kinds, qb, kb, tq, tk, band=(-6, 30, 3), q_doc=doc[:, :tq], kv_doc=doc)
        h, hkv = 2, 2
    q, k, v = inputs(gen, 1, tq, tk, h, hkv, 5, 7, torch.float64)
    for x in (q, k, v):
        x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c: RawBlockSparse.apply(a, b, c, lay, 0.7), (q, k, v), atol=1e-7
    )


def test_backward_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(22)
    qb, kb, tq, tk = 32, 32, 512, 512
    kinds = random_kinds(gen, 1, 1, 16, 16, p_partial=0.3, p_full=0.3)
    lay = Layout(kinds, qb, kb, tq, tk, bits=random_bits(gen, kinds, qb, kb))
    results = []
    saved = torch.get_num_threads()
    try:
        for b, h, hkv in ((1, 2, 1), (3, 2, 2)):  # fewer (batch, kv head) pairs than tasks, more
            q, k, v = inputs(gen, b, tq, tk, h, hkv, 32, 32, torch.float32)
            go = torch.randn(b, tq, h, 32, generator=gen)
            per_threads = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                out, lse = forward(q, k, v, lay, 0.2)
                per_threads.append((out, lse) + tuple(backward(go, q, k, v, out, lse, lay, 0.2)))
            results.append(per_threads)
    finally:
        torch.set_num_threads(saved)
    for per_threads in results:
        for other in per_threads[1:]:
            for a, b in zip(per_threads[0], other, strict=True):
                assert torch.equal(a, b)


_BACKWARD_MEMORY_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys, torch, tokenmix
    threads, batch, heads, kv_heads = (int(x) for x in sys.argv[1:5])
    torch.set_num_threads(threads)

    def kib(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])

    gen = torch.Generator().manual_seed(0)
    t, d, blk = 4096, 64, 64
    nb = t // blk
    table = torch.rand(nb, nb, generator=gen) < 0.1
    table |= torch.eye(nb, dtype=torch.bool)
    order = torch.sort((~table).int(), dim=-1, stable=True).indices.int()
    full_n = table.sum(-1).int().view(1, 1, nb).contiguous()
    full_i = order.view(1, 1, nb, nb).contiguous()
    q_order = torch.sort((~table.T).int(), dim=-1, stable=True).indices.int()
    full_qn = table.T.sum(-1).int().view(1, 1, nb).contiguous()
    full_qi = q_order.view(1, 1, nb, nb).contiguous()
    zn = torch.zeros(1, 1, nb, dtype=torch.int32)
    zi = torch.zeros(1, 1, nb, 1, dtype=torch.int32)
    q = torch.randn(batch, t, heads, d, generator=gen)
    k, v = (torch.randn(batch, t, kv_heads, d, generator=gen) for _ in range(2))
    rule = (None, None, None, [])
    out, lse = torch.ops.tokenmix.block_sparse_forward(
        q, k, v, zn, zi, full_n, full_i, [blk, blk], *rule, 0.125)
    grad_out = torch.randn(out.shape, generator=gen)

    def backward():
        return torch.ops.tokenmix.block_sparse_backward(
            grad_out, q, k, v, out, lse, zn, zi, full_n, full_i, zn, zi, zi, full_qn, full_qi,
            [blk, blk], *rule, 0.125)

    backward()  # the thread pool and its allocator arenas exist from here on
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    grads = backward()
    peak = kib("VmHWM")
    outputs = sum(g.numel() * g.element_size() for g in grads)
    print("EXTRA", (peak - base) * 1024 - outputs, "KV", batch * kv_heads * 2 * t * d * 4)
"""
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux VmHWM reset")
@pytest.mark.parametrize(
    "batch,heads,kv_heads,slices",
    [(4, 2, 2, 1), (1, 2, 1, 4)],  # 8 (batch, kv head) pairs: one slice; 1 pair: four
)
def test_backward_memory_does_not_grow_with_threads(batch, heads, kv_heads, slices):
    """Extra memory of the backward: its dK/dV accumulators (slices x K + V in fp32) and work
    tiles, the same at 1, 8 and 32 threads, and nothing of Tq x Tk."""
    slack = 4 << 20
    extra = {}
    for threads in (1, 8, 32):
        # Without the large-block cache: its blocks would stay in the baseline RSS, out of
        # the measured peak.
        proc = subprocess.run(
            [sys.executable, "-c", _BACKWARD_MEMORY_SCRIPT, str(threads)]
            + [str(x) for x in (batch, heads, kv_heads)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "TOKENMIX_CPU_BLOCK_CACHE_MB": "0"},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        fields = proc.stdout.split()
        extra[threads] = int(fields[fields.index("EXTRA") + 1])
        kv = int(fields[fields.index("KV") + 1])
        assert extra[threads] <= slices * kv + slack, (threads, extra, kv)
    assert max(extra.values()) - min(extra.values()) <= slack, (extra, kv)


_BLOCK_CACHE_SCRIPT = textwrap.dedent(
    """
    import ctypes, torch, tokenmix

    def rss():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024

    libc = ctypes.CDLL("libc.so.6")
    torch.set_num_threads(2)

    def call(t, batch):
        gen = torch.Generator().manual_seed(t)
        # Heads-last K/V with 4 kv heads, each kv block read 3 times: the forward copies K and
        # V head-major, batch x 4 x t x 64 fp32 each.
        blk, heads, d = 64, 4, 64
        nb = t // blk
        idx = torch.stack([(torch.arange(nb) + s) % nb for s in (0, 5, 17)], -1)
        full_i = idx.int().view(1, 1, nb, 3).contiguous()
        full_n = torch.full((1, 1, nb), 3, dtype=torch.int32)
        zn = torch.zeros(1, 1, nb, dtype=torch.int32)
        zi = torch.zeros(1, 1, nb, 1, dtype=torch.int32)
        q, k, v = (torch.randn(batch, t, heads, d, generator=gen) for _ in range(3))
        out, lse = torch.ops.tokenmix.block_sparse_forward(
            q, k, v, zn, zi, full_n, full_i, [blk, blk], None, None, None, [], 0.125)
        return float(out.double().sum()) + float(lse.double().sum())

    call(512, 1)  # thread pool and small buffers: copies below the cache's 2 MiB
    libc.malloc_trim(0)
    base = rss()
    sums = [call(8192, 2)]
    libc.malloc_trim(0)
    first = rss() - base
    sums.append(call(8192, 2))
    libc.malloc_trim(0)
    second = rss() - base
    held = tokenmix.cpu_cached_bytes()
    freed = tokenmix.empty_cpu_cache()
    libc.malloc_trim(0)
    emptied = rss() - base
    print("RETAINED", first, second, emptied, "HELD", held, freed, tokenmix.cpu_cached_bytes())
    print("COPIES", 2 * 2 * 4 * 8192 * 64 * 4, "SUMS", *sums)
    """
)


@pytest.mark.skipif(
    not os.path.exists("/proc/self/status") or platform.libc_ver()[0] != "glibc",
    reason="needs Linux VmRSS and glibc's malloc_trim",
)
def test_large_buffers_kept_for_the_next_call():
    """The forward's K/V copies (16 MiB each here) go back to the large-block cache and the next
    call of the same size takes them (no new pages, RSS does not grow) until
    tokenmix.empty_cpu_cache() frees them; with TOKENMIX_CPU_BLOCK_CACHE_MB=0 they are freed
    after each call. Results are the same either way."""
    runs = {}
    for cap in (None, "0"):
        env = dict(os.environ)
        env.pop("TOKENMIX_CPU_BLOCK_CACHE_MB", None)
        if cap is not None:
            env["TOKENMIX_CPU_BLOCK_CACHE_MB"] = cap
        proc = subprocess.run(
            [sys.executable, "-c", _BLOCK_CACHE_SCRIPT],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        fields = proc.stdout.split()
        at = fields.index("RETAINED")
        rss = [int(x) for x in fields[at + 1 : at + 4]]
        at = fields.index("HELD")
        held = [int(x) for x in fields[at + 1 : at + 4]]
        copies = int(fields[fields.index("COPIES") + 1])
        sums = fields[fields.index("SUMS") + 1 :]
        runs[cap] = (rss, held, copies, sums)
    (first, second, emptied), held, copies, sums = runs[None]
    assert first >= 0.9 * copies, runs  # kept after the call
    assert second - first <= 0.1 * copies, runs  # and taken again, not allocated anew
    # K and V copies of 16 MiB each (multiples of 2 MiB): held, freed by empty_cpu_cache()
    assert held == [copies, copies, 0], runs
    assert emptied <= 0.25 * copies, runs
    (first, second, emptied), held, copies, sums_off = runs["0"]
    assert max(first, second, emptied) <= 0.25 * copies, runs  # freed after each call
    assert held == [0, 0, 0], runs
    assert sums == sums_off and sums[0] == sums[1]
