"""Block-sparse test problems built directly as the ops' arguments (the layout tensors of
csrc/block_sparse/bs_schemas.h), and a dense float64 masked softmax that defines the expected
results. Shared by the emulated-kernel tests and the GPU tests."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

NONE, PARTIAL, FULL = 0, 1, 2
FAR = 1 << 40  # an unbounded band side


@dataclass
class Case:
    batch: int = 1
    heads: int = 2
    kv_heads: int = 1
    q_len: int = 100
    kv_len: int = 100
    dim: int = 32
    vdim: int = 32
    q_block: int = 32
    kv_block: int = 32
    layout_batch: int = 1  # 1 or batch
    layout_heads: int = 1  # 1, kv_heads or heads
    band: list = field(default_factory=list)  # [], [lo, hi, prefix] or [lo, hi, prefix, 1]
    docs: bool = False
    bits: bool = False
    # 0: bitmask elements drawn one by one; R > 0: per R x R region of (query, key) positions,
    # the bits are all 0, all 1 or drawn one by one (a third each).
    bits_regions: int = 0
    # "random": random block states; "derived": blocks from the element rule (full where every
    # element is kept); both then drop some blocks.
    pattern: str = "random"
    density: float = 0.5
    empty_query_blocks: bool = False  # some query blocks list nothing (rows without keys)
    full_blocks: bool = True  # False: every listed block is partial
    seed: int = 0


def _pack_bits(dense: torch.Tensor) -> torch.Tensor:
    """[..., rows, cols] bool -> [..., rows, ceil(cols / 32)] int32, bit c % 32 of word c // 32."""
    cols = dense.shape[-1]
    words = (cols + 31) // 32
    pad = torch.zeros(*dense.shape[:-1], words * 32, dtype=torch.int64)
    pad[..., :cols] = dense.to(torch.int64)
    pad = pad.reshape(*dense.shape[:-1], words, 32)
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    packed = (pad * weights).sum(-1)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)
    return packed.to(torch.int32)


def _structured(c: Case, q_doc, kv_doc) -> torch.Tensor:
    """The band and document parts of the element rule: [LBd, Tq, Tk] bool (LBd = doc batch)."""
    q = torch.arange(c.q_len)[:, None]
    k = torch.arange(c.kv_len)[None, :]
    rule = torch.ones(c.q_len, c.kv_len, dtype=torch.bool)
    if c.band:
        lo, hi, prefix = c.band[:3]
        d = k - q
        sinks = (k < prefix) & (d <= hi) if c.band[3:] == [1] else k < prefix
        rule = ((d >= lo) & (d <= hi)) | sinks
    if q_doc is not None:
        return rule[None] & (q_doc[:, :, None] == kv_doc[:, None, :])
    return rule[None]


def make_layout(c: Case):
    """The ops' layout arguments and the dense keep mask [B, H, Tq, Tk]."""
    rng = random.Random(c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    nq = -(-c.q_len // c.q_block)
    nk = -(-c.kv_len // c.kv_block)
    lb, lh = c.layout_batch, c.layout_heads
    q_doc = kv_doc = None
    if c.docs:
        db = c.batch if lb > 1 else 1
        q_doc = torch.stack([_doc_ids(c.q_len, rng) for _ in range(db)])
        kv_doc = torch.stack([_doc_ids(c.kv_len, rng) for _ in range(db)])
        if c.q_len == c.kv_len:
            kv_doc = q_doc.clone()
    rule = _structured(c, q_doc, kv_doc)  # [LBd, Tq, Tk]
    state = torch.zeros(lb, lh, nq, nk, dtype=torch.int64)
    for b in range(lb):
        r = rule[b if rule.shape[0] > 1 else 0]
        for h in range(lh):
            for i in range(nq):
                for j in range(nk):
                    rows = slice(i * c.q_block, (i + 1) * c.q_block)
                    blk = r[rows, j * c.kv_block : (j + 1) * c.kv_block]
                    if c.pattern == "random":
                        x = rng.random()
                        s = NONE if x > c.density else (FULL if x < c.density / 2 else PARTIAL)
                    else:
                        s = FULL if bool(blk.all()) else PARTIAL if bool(blk.any()) else NONE
                        if s != NONE and rng.random() > c.density:
                            s = NONE if rng.random() < 0.5 else PARTIAL
                    if s == FULL and ((c.bits and rng.random() < 0.3) or not c.full_blocks):
                        s = PARTIAL
                    state[b, h, i, j] = s
            if c.empty_query_blocks:
                state[b, h, rng.randrange(nq)] = NONE
    # kv-side lists in random order; unused slots hold valid-looking garbage.
    maxp = max(int((state == PARTIAL).sum(-1).max()), 0)
    maxf = max(int((state == FULL).sum(-1).max()), 0)
    kv_num = torch.zeros(lb, lh, nq, dtype=torch.int32)
    kv_idx = torch.randint(0, nk, (lb, lh, nq, maxp), generator=gen, dtype=torch.int32)
    full_num = torch.zeros(lb, lh, nq, dtype=torch.int32)
    full_idx = torch.randint(0, nk, (lb, lh, nq, maxf), generator=gen, dtype=torch.int32)
    slot_of = {}
    for b in range(lb):
        for h in range(lh):
            for i in range(nq):
                part = [j for j in range(nk) if state[b, h, i, j] == PARTIAL]
                full = [j for j in range(nk) if state[b, h, i, j] == FULL]
                rng.shuffle(part)
                rng.shuffle(full)
                kv_num[b, h, i] = len(part)
                full_num[b, h, i] = len(full)
                for s, j in enumerate(part):
                    kv_idx[b, h, i, s] = j
                    slot_of[b, h, i, j] = s
                for s, j in enumerate(full):
                    full_idx[b, h, i, s] = j
    # q-side lists (the transposed layout), with each partial entry's slot.
    maxqp = max(int((state == PARTIAL).sum(-2).max()), 0)
    maxqf = max(int((state == FULL).sum(-2).max()), 0)
    q_num = torch.zeros(lb, lh, nk, dtype=torch.int32)
    q_idx = torch.zeros(lb, lh, nk, maxqp, dtype=torch.int32)
    q_slot = torch.zeros(lb, lh, nk, maxqp, dtype=torch.int32)
    fq_num = torch.zeros(lb, lh, nk, dtype=torch.int32)
    fq_idx = torch.zeros(lb, lh, nk, maxqf, dtype=torch.int32)
    for b in range(lb):
        for h in range(lh):
            for j in range(nk):
                part = [i for i in range(nq) if state[b, h, i, j] == PARTIAL]
                full = [i for i in range(nq) if state[b, h, i, j] == FULL]
                rng.shuffle(part)
                q_num[b, h, j] = len(part)
                fq_num[b, h, j] = len(full)
                for s, i in enumerate(part):
                    q_idx[b, h, j, s] = i
                    q_slot[b, h, j, s] = slot_of[b, h, i, j]
                for s, i in enumerate(full):
                    fq_idx[b, h, j, s] = i
    # Bitmasks of the partial blocks, and the dense keep mask.
    bits = None
    dense_bits = torch.ones(lb, lh, nq * c.q_block, nk * c.kv_block, dtype=torch.bool)
    if c.bits and c.bits_regions:
        r = c.bits_regions
        regions = (lb, lh, -(-nq * c.q_block // r), -(-nk * c.kv_block // r))
        kind = torch.randint(0, 3, regions, generator=gen)
        kind = kind.repeat_interleave(r, -2).repeat_interleave(r, -1)
        drawn = torch.rand(kind.shape, generator=gen) < 0.6
        region = torch.where(kind == 2, drawn, kind == 1)
        blockbits = torch.zeros(lb, lh, nq, max(maxp, 0), c.q_block, c.kv_block, dtype=torch.bool)
        for (b, h, i, j), s in slot_of.items():
            rows = slice(i * c.q_block, (i + 1) * c.q_block)
            blockbits[b, h, i, s] = region[b, h, rows, j * c.kv_block : (j + 1) * c.kv_block]
    elif c.bits:
        blockbits = torch.rand(lb, lh, nq, max(maxp, 0), c.q_block, c.kv_block, generator=gen) < 0.6
    if c.bits:
        bits = _pack_bits(blockbits)
        for (b, h, i, j), s in slot_of.items():
            dense_bits[
                b, h, i * c.q_block : (i + 1) * c.q_block, j * c.kv_block : (j + 1) * c.kv_block
            ] = blockbits[b, h, i, s]
    dense_bits = dense_bits[:, :, : c.q_len, : c.kv_len]
    qb = torch.arange(c.q_len) // c.q_block
    kb = torch.arange(c.kv_len) // c.kv_block
    st = state[:, :, qb][:, :, :, kb]  # [LB, LH, Tq, Tk]
    keep = (st == FULL) | ((st == PARTIAL) & rule[:, None] & dense_bits)
    if 1 < lh < c.heads:  # one layout head per kv head: shared by its GQA group
        keep = keep.repeat_interleave(c.heads // lh, dim=1)
    keep = keep.expand(c.batch, c.heads, c.q_len, c.kv_len)
    args = dict(
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        q_slots=q_slot,
        full_q_num_blocks=fq_num,
        full_q_indices=fq_idx,
        block_size=[c.q_block, c.kv_block],
        mask_bits=bits,
        q_doc=q_doc.to(torch.int32) if q_doc is not None else None,
        kv_doc=kv_doc.to(torch.int32) if kv_doc is not None else None,
        band=list(c.band),
    )
    return args, keep, state


def _doc_ids(n: int, rng: random.Random) -> torch.Tensor:
    cuts = sorted(rng.sample(range(1, n), min(3, n - 1))) if n > 1 else []
    ids = torch.zeros(n, dtype=torch.int64)
    for c in cuts:
        ids[c:] += 1
    return ids


def make_inputs(c: Case, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(c.seed + 1)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    return dict(
        q=rnd(c.batch, c.q_len, c.heads, c.dim),
        k=rnd(c.batch, c.kv_len, c.kv_heads, c.dim),
        v=rnd(c.batch, c.kv_len, c.kv_heads, c.vdim),
        grad_out=rnd(c.batch, c.q_len, c.heads, c.vdim),
        grad_lse=rnd(c.batch, c.q_len, c.heads).float(),
    )


def dense_reference(q, k, v, keep, scale, grad_out, grad_lse):
    """Masked softmax attention in float64 with autograd: (out, lse, dq, dk, dv). A row without a
    kept key gives output 0, LSE -inf and no gradient."""
    q, k, v = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(groups, dim=2)
    vv = v.repeat_interleave(groups, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    keep = keep.cpu()
    alive = keep.any(-1, keepdim=True)
    s = s.masked_fill(~keep, -math.inf).masked_fill(~alive, 0.0)
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse) * keep
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    lse = lse.squeeze(-1).masked_fill(~alive.squeeze(-1), -math.inf).permute(0, 2, 1)
    loss = (out * grad_out.double().cpu()).sum()
    if grad_lse is not None:
        loss = loss + (lse.masked_fill(lse == -math.inf, 0.0) * grad_lse.double().cpu()).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return out.detach(), lse.detach(), dq, dk, dv
