"""tokenmix.patterns.permuted_blocks (PBS-Attn, arXiv 2510.21270).

The brute force below follows the rule in docs/patterns_part_b.md with Python loops: key
order per segment, block scores on the permuted keys, threshold selection, the diagonal
segment and the first key's block, causality on original positions.
"""

from __future__ import annotations

import math
import random

import pytest
import tokenmix
import torch
from tokenmix.patterns import permuted_blocks, permuted_blocks_mask_mod, segment_key_order


def brute_force_order(q, k, b, seg, scale):
    batch, length, heads, _ = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    n = length // seg
    order = torch.arange(length).repeat(batch, kv_heads, 1)
    if n == 0 or length == seg:
        return order
    last = range(max(length - b, 0), length)
    for bb in range(batch):
        for hk in range(kv_heads):
            a = [0.0] * (n * seg)
            count = 0
            for h in range(hk * group, (hk + 1) * group):
                for t in last:
                    logits = [float(q[bb, t, h] @ k[bb, s, hk]) * scale for s in range(n * seg)]
                    top = max(logits)
                    z = sum(math.exp(x - top) for x in logits)
                    for s in range(n * seg):
                        a[s] += math.exp(logits[s] - top) / z
                    count += 1
            for m in range(n):
                idx = sorted(range(m * seg, (m + 1) * seg), key=lambda s: (-a[s], s))
                order[bb, hk, m * seg : (m + 1) * seg] = torch.tensor(idx)
    return order


def brute_force_mask(q, k, b, seg, threshold, force_first, scale=None):
    """(key order [B, Hkv, T], token mask [B, Hkv, T, T] in original key order)."""
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    order = brute_force_order(q, k, b, seg, scale)
    nb = -(-length // b)
    per = seg // b
    mask = torch.zeros(batch, kv_heads, length, length, dtype=torch.bool)
    for bb in range(batch):
        for hk in range(kv_heads):
            perm_k = k[bb, order[bb, hk], hk]  # [T, D] in permuted order
            pos_of = {int(o): p for p, o in enumerate(order[bb, hk])}
            for i in range(nb):
                allowed = [j for j in range(nb) if j // per < i // per]
                probs = {j: 0.0 for j in allowed}
                for h in range(hk * group, (hk + 1) * group):
                    qbar = q[bb, i * b : (i + 1) * b, h].mean(0)
                    logits = {
                        j: float(qbar @ perm_k[j * b : (j + 1) * b].mean(0)) * scale
                        for j in allowed
                    }
                    if not logits:
                        continue
                    top = max(logits.values())
                    z = sum(math.exp(x - top) for x in logits.values())
                    for j in allowed:
                        probs[j] += math.exp(logits[j] - top) / z / group
                ranked = sorted(allowed, key=lambda j: (-probs[j], j))
                if threshold >= 1:
                    kept = set(allowed)
                else:
                    kept, total = set(), 0.0
                    for j in ranked:
                        total += probs[j]
                        kept.add(j)
                        if total >= threshold:
                            break
                    else:
                        kept = set()
                kept |= {j for j in range(nb) if j // per == i // per}
                if force_first:
                    kept.add(pos_of[0] // b)
                for t in range(i * b, min((i + 1) * b, length)):
                    for s in range(t + 1):  # causal on original positions
                        if pos_of[s] // b in kept:
                            mask[bb, hk, t, s] = True
    return order, mask


def to_original(mask_perm, key_order):
    """[B, H, T, T] permuted-key mask -> original key order."""
    out = torch.zeros_like(mask_perm)
    idx = key_order.unsqueeze(2).expand_as(mask_perm)
    return out.scatter(-1, idx, mask_perm)


CASES = [
    # T, block, segment, threshold, heads, kv_heads, force_first
    (96, 8, 32, 0.9, 2, 2, True),
    (100, 8, 32, 0.5, 4, 2, True),
    (77, 4, 16, 0.7, 3, 1, False),
    (64, 8, 64, 0.9, 2, 2, True),  # T == S: identity, dense causal
    (50, 8, 64, 0.9, 2, 1, True),  # T < S
    (90, 6, 18, 1.0, 2, 2, True),  # threshold 1: every allowed block
    (81, 3, 27, 0.3, 4, 4, True),
]


def _random_cases(n, seed=31):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        b = rng.randint(2, 8)
        kv_heads = rng.choice([1, 2])
        out.append(
            (
                rng.randint(10, 90),
                b,
                b * rng.randint(1, 4),
                rng.choice([0.4, 0.8, 0.95, 1.0]),
                kv_heads * rng.choice([1, 2]),
                kv_heads,
                rng.random() < 0.7,
            )
        )
    return out


CASES += _random_cases(5)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_layout_matches_brute_force(case):
    length, b, seg, threshold, heads, kv_heads, force_first = case
    g = torch.Generator().manual_seed(length * 7 + b)
    q = torch.randn(2, length, heads, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, length, kv_heads, 8, generator=g, dtype=torch.float64)
    r = permuted_blocks(q, k, b, seg, threshold, force_first=force_first)
    order, want = brute_force_mask(q, k, b, seg, threshold, force_first)
    assert torch.equal(r.key_order, order)
    assert torch.equal(r.key_order, segment_key_order(q, k, b, seg))
    assert r.layout.heads == kv_heads and r.layout.batch == 2
    got = to_original(r.layout.dense_mask(), r.key_order)
    assert torch.equal(got, want)
    # Earlier segments' blocks are full (no mask work), never partial.
    status = r.layout.block_status()
    per = seg // b
    nb = status.shape[-1]
    blocks = torch.arange(nb)
    earlier = (blocks.view(1, -1) // per) < (blocks.view(-1, 1) // per)
    assert not bool(((status == 1) & earlier).any())


def test_permutation_sorts_within_segments_and_keeps_causality():
    torch.manual_seed(0)
    q, k = torch.randn(1, 100, 2, 8), torch.randn(1, 100, 2, 8)
    r = permuted_blocks(q, k, 10, 40, 0.9)
    order = r.key_order[0, 0]
    assert not torch.equal(order, torch.arange(100))  # it does permute
    for m in range(2):  # each complete segment holds its own keys
        assert sorted(order[m * 40 : (m + 1) * 40].tolist()) == list(range(m * 40, (m + 1) * 40))
    assert torch.equal(order[80:], torch.arange(80, 100))  # the incomplete segment stays
    mask = to_original(r.layout.dense_mask(), r.key_order)
    assert not bool((mask & ~torch.ones(100, 100, dtype=torch.bool).tril()).any())
    assert bool(mask[0, 0].diagonal().all())  # every query sees itself (diagonal segment)


def test_permute_round_trip_exact_and_differentiable():
    torch.manual_seed(1)
    q, k = torch.randn(2, 64, 4, 8), torch.randn(2, 64, 2, 8)
    r = permuted_blocks(q, k, 8, 16)
    x = torch.randn(2, 64, 2, 5, dtype=torch.float64, requires_grad=True)
    y = r.permute(x)
    assert not torch.equal(y, x)
    assert torch.equal(r.unpermute(y), x)
    for bb in range(2):
        for h in range(2):
            assert torch.equal(y[bb, :, h], x[bb, r.key_order[bb, h], h])
    w = torch.randn_like(y)
    (y * w).sum().backward()
    assert torch.equal(x.grad, r.unpermute(w))


def dense_attention(q, k, v, mask):
    heads, kv_heads = q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    mask = mask.repeat_interleave(heads // kv_heads, dim=1)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_equals_dense_masked_attention(kv_heads):
    g = torch.Generator().manual_seed(11 + kv_heads)
    length = 88
    q = torch.randn(2, length, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, length, kv_heads, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, length, kv_heads, 8, generator=g, dtype=torch.float64, requires_grad=True)
    r = permuted_blocks(q, k, 8, 24, 0.6)
    out = tokenmix.block_sparse_attention(q, r.permute(k), r.permute(v), r.layout)
    _, mask = brute_force_mask(q.detach(), k.detach(), 8, 24, 0.6, True)
    ref = dense_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_mask_mod_is_causality_in_permuted_order():
    torch.manual_seed(2)
    q, k = torch.randn(2, 48, 4, 8), torch.randn(2, 48, 2, 8)
    r = permuted_blocks(q, k, 8, 16)
    tq = torch.arange(48).view(1, 1, -1, 1)
    tk = torch.arange(48).view(1, 1, 1, -1)
    b = torch.arange(2).view(-1, 1, 1, 1)
    for group, heads in ((1, 2), (2, 4)):
        mod = permuted_blocks_mask_mod(r.key_order, group)
        got = mod(b, torch.arange(heads).view(1, -1, 1, 1), tq, tk)
        for bb in range(2):
            for h in range(heads):
                orig = r.key_order[bb, h // group]
                want = orig.view(1, -1) <= torch.arange(48).view(-1, 1)
                assert torch.equal(got[bb, h], want)
    # The layout's partial blocks carry exactly this rule.
    assert r.layout.mask_bits is not None


def test_threshold_controls_sparsity():
    torch.manual_seed(4)
    q, k = torch.randn(1, 256, 2, 16), torch.randn(1, 256, 2, 16)
    kept = [permuted_blocks(q, k, 16, 64, t).layout.kept_pairs() for t in (0.2, 0.6, 1.0)]
    assert kept[0] < kept[1] < kept[2]
    assert kept[2] == 256 * 257 // 2 * 2  # threshold 1: full causal attention (2 K/V heads)


def test_errors_name_the_argument():
    q, k = torch.randn(1, 64, 2, 8), torch.randn(1, 64, 2, 8)
    with pytest.raises(ValueError, match=r"segment_size \(20\) must be a positive multiple of"):
        permuted_blocks(q, k, 8, 20)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        permuted_blocks(q, k, 0, 16)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        permuted_blocks(q, k, 8, 16, 0.0)
    with pytest.raises(TypeError, match="threshold must be a float"):
        permuted_blocks(q, k, 8, 16, "0.9")
    with pytest.raises(ValueError, match="same length, got 64 and 32"):
        permuted_blocks(q, k[:, :32], 8, 16)
    with pytest.raises(TypeError, match="force_first must be a bool"):
        permuted_blocks(q, k, 8, 16, force_first=None)
    with pytest.raises(ValueError, match=r"q heads \(2\) must be a multiple of k heads \(3\)"):
        permuted_blocks(q, torch.randn(1, 64, 3, 8), 8, 16)
    r = permuted_blocks(q, k, 8, 16)
    with pytest.raises(ValueError, match=r"x must be \[B, T, H_kv, D\] = \[1, 64, 2, D\]"):
        r.permute(torch.randn(1, 64, 4, 8))
    with pytest.raises(ValueError, match=r"key_order must be \[B, H_kv, T\]"):
        permuted_blocks_mask_mod(r.key_order[0])


def test_layout_runs_on_flex_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, 96, 4, 8, generator=g)
    k = torch.randn(2, 96, 2, 8, generator=g)
    v = torch.randn(2, 96, 2, 8, generator=g)
    r = permuted_blocks(q, k, 16, 32, 0.5)
    kp, vp = r.permute(k), r.permute(v)
    out = tokenmix.block_sparse_attention(q, kp, vp, r.layout)
    bm = r.layout.to_block_mask(heads=4)
    fout = flex.flex_attention(
        q.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), block_mask=bm, enable_gqa=True
    )
    torch.testing.assert_close(out, fout.transpose(1, 2), atol=2e-5, rtol=2e-5)


def test_builder_never_makes_a_t_by_t_tensor():
    from pattern_checks import MaxTensorSize

    T = 8192
    q, k = torch.randn(1, T, 4, 16), torch.randn(1, T, 2, 16)
    with MaxTensorSize() as sizes:
        r = permuted_blocks(q, k, 64, 256, 0.9)
    # The largest are the diagonal segments' bits before packing: T * S * H_kv elements.
    assert r.layout.seq_lengths == (T, T) and r.layout.mask_bits is not None
    assert sizes.largest < T * T // 8, f"a tensor of {sizes.largest} elements (T*T = {T * T})"
