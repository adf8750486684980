"""tokenmix.patterns.topk_blocks and tokenmix.nn.TopKBlockAttention (NSA / SeerAttention).

The brute force below scores and selects block by block with Python loops, from the rule in
docs/patterns.md, independently of the vectorised builder.
"""

from __future__ import annotations

import math
import random

import pytest
import tokenmix
import torch
from pattern_checks import check_compiled_matches_eager, check_layer_against
from tokenmix.patterns import select_topk_blocks, topk_block_scores, topk_blocks


def ceil_div(a, b):
    return -(-a // b)


def block_info(q_len, kv_len, b, causal):
    """Per query block i: (allowed set, full set, forced-free geometry c0, c1) by the rule."""
    nq, nk = ceil_div(q_len, b), ceil_div(kv_len, b)
    off = kv_len - q_len
    info = []
    for i in range(nq):
        qf = i * b + off
        ql = min((i + 1) * b, q_len) - 1 + off
        if causal:
            big_l = math.floor(ql / b)
            allowed = {j for j in range(nk) if j <= big_l}
            full = {j for j in allowed if min((j + 1) * b, kv_len) - 1 <= qf}
            c0, c1 = min(len(full), big_l), big_l
            current = set(range(max(c0, 0), c1 + 1)) if big_l >= 0 else set()
        else:
            allowed = set(range(nk))
            full = set(allowed)
            lo, hi = max(qf, 0), min(ql, kv_len - 1)
            c0, c1 = lo // b, hi // b
            current = set(range(c0, c1 + 1)) if lo <= hi else set()
        info.append((allowed, full, current, c0, c1))
    return info


def brute_force_scores(q, k, b, pooling, causal, group_heads, scale=None):
    """[B, H_kv or H, nq, nk] float64: pooled scores, softmax over allowed, sum over group."""
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    nq, nk = ceil_div(q_len, b), ceil_div(kv_len, b)
    scale = dim**-0.5 if scale is None else scale
    info = block_info(q_len, kv_len, b, causal)
    group = heads // kv_heads
    out = torch.zeros(batch, kv_heads if group_heads else heads, nq, nk, dtype=torch.float64)
    for bb in range(batch):
        for h in range(heads):
            hk = h // group
            for i in range(nq):
                qbar = q[bb, i * b : (i + 1) * b, h].double().mean(0)
                allowed = info[i][0]
                logits = {}
                for j in allowed:
                    keys = k[bb, j * b : (j + 1) * b, hk].double()
                    if pooling == "mean":
                        s = float(qbar @ keys.mean(0))
                    else:
                        kmax, kmin = keys.max(0).values, keys.min(0).values
                        s = float(torch.maximum(qbar * kmax, qbar * kmin).sum())
                    logits[j] = s * scale
                if not logits:
                    continue
                top = max(logits.values())
                z = sum(math.exp(v - top) for v in logits.values())
                for j, v in logits.items():
                    out[bb, hk if group_heads else h, i, j] += math.exp(v - top) / z
    return out


def brute_force_select(scores, q_len, kv_len, b, topk, sinks, local, causal):
    """{(b, h, i): (set of kept blocks, set of full blocks)} from scores, by the rule."""
    info = block_info(q_len, kv_len, b, causal)
    result = {}
    for bb in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            for i, (allowed, full, current, c0, c1) in enumerate(info):
                forced = set(current) | set(range(sinks))
                if current and local > 0:
                    forced |= set(range(c0 - local, c0))
                    if not causal:
                        forced |= set(range(c1 + 1, c1 + local + 1))
                forced &= allowed
                want = max(len(forced), min(topk, len(allowed)))
                rest = sorted(allowed - forced, key=lambda j: (-float(scores[bb, h, i, j]), j))
                kept = forced | set(rest[: want - len(forced)])
                result[(bb, h, i)] = (kept, kept & full)
    return result


def layout_sets(layout):
    status = layout.block_status()
    out = {}
    for bb in range(status.shape[0]):
        for h in range(status.shape[1]):
            for i in range(status.shape[2]):
                row = status[bb, h, i]
                kept = {int(j) for j in torch.nonzero(row).flatten()}
                full = {int(j) for j in torch.nonzero(row == 2).flatten()}
                out[(bb, h, i)] = (kept, full)
    return out


CASES = [
    # q_len, kv_len, block, topk, sinks, local, causal, pooling, heads, kv_heads, group_heads
    (64, 64, 8, 3, 1, 1, True, "mean", 4, 2, True),
    (70, 70, 8, 4, 0, 0, True, "avg_maxmin", 4, 2, True),
    (53, 77, 8, 3, 2, 1, True, "mean", 2, 1, True),
    (77, 53, 8, 2, 1, 2, True, "avg_maxmin", 3, 3, True),
    (60, 60, 7, 3, 1, 1, False, "mean", 4, 2, True),
    (45, 61, 8, 5, 0, 1, False, "avg_maxmin", 4, 4, True),
    (66, 66, 8, 2, 1, 1, True, "mean", 4, 2, False),
    (40, 40, 1, 6, 2, 2, True, "mean", 2, 2, True),
    (48, 48, 16, 0, 0, 0, True, "avg_maxmin", 2, 1, True),
    (50, 61, 8, 2, 0, 0, True, "mean", 2, 1, True),  # off = 11: two current blocks
    (50, 61, 8, 3, 1, 1, True, "avg_maxmin", 2, 2, True),
    (61, 50, 8, 3, 0, 2, False, "mean", 2, 2, True),  # off = -11, not causal
]


def _random_cases(n, seed=77):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kv_heads = rng.choice([1, 2])
        out.append(
            (
                rng.randint(5, 70),
                rng.randint(5, 70),
                rng.randint(1, 12),
                rng.randint(0, 5),
                rng.randint(0, 2),
                rng.randint(0, 2),
                rng.random() < 0.7,
                rng.choice(["mean", "avg_maxmin"]),
                kv_heads * rng.choice([1, 2]),
                kv_heads,
                rng.random() < 0.8,
            )
        )
    return out


CASES += _random_cases(6)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_selection_matches_brute_force(case):
    q_len, kv_len, b, topk, sinks, local, causal, pooling, heads, kv_heads, grouped = case
    g = torch.Generator().manual_seed(q_len * 100 + kv_len)
    q = torch.randn(2, q_len, heads, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_len, kv_heads, 8, generator=g, dtype=torch.float64)
    layout = topk_blocks(
        q,
        k,
        b,
        topk,
        pooling=pooling,
        sinks=sinks,
        local=local,
        causal=causal,
        group_heads=grouped,
    )
    assert layout.heads == (kv_heads if grouped else heads) and layout.batch == 2
    scores = brute_force_scores(q, k, b, pooling, causal, grouped)
    got_scores = topk_block_scores(q, k, b, pooling=pooling, causal=causal, group_heads=grouped)
    torch.testing.assert_close(got_scores, scores, atol=1e-12, rtol=1e-12)
    want = brute_force_select(scores, q_len, kv_len, b, topk, sinks, local, causal)
    assert layout_sets(layout) == want
    # Token level: the layout keeps exactly the kept blocks' pairs, cut by causality.
    off = kv_len - q_len
    tq = torch.arange(q_len).view(-1, 1)
    tk = torch.arange(kv_len).view(1, -1)
    dense = layout.dense_mask()
    for (bb, h, i), (kept, _) in list(want.items())[:: max(1, len(want) // 12)]:
        rows = slice(i * b, min((i + 1) * b, q_len))
        expect = torch.zeros(kv_len, dtype=torch.bool)
        for j in kept:
            expect[j * b : (j + 1) * b] = True
        expect = expect.view(1, -1) & ((tk <= tq[rows] + off) if causal else True)
        assert torch.equal(dense[bb, h, rows], expect.expand(dense[bb, h, rows].shape))


def test_forced_blocks_and_no_future():
    torch.manual_seed(3)
    q_len = kv_len = 128
    b = 16
    q = torch.randn(1, q_len, 2, 8)
    # Keys that make every block but the future ones look best: the future must still lose.
    k = torch.randn(1, kv_len, 2, 8)
    k[:, 64:] = q[:, :64].mean(1, keepdim=True) * 50
    layout = topk_blocks(q, k, b, topk=2, sinks=1, local=2, causal=True)
    status = layout.block_status()[0]
    nb = q_len // b
    for i in range(nb):
        kept = set(torch.nonzero(status[0, i]).flatten().tolist())
        assert all(j <= i for j in kept), (i, kept)  # never the future
        assert i in kept and int(status[0, i, i]) == 1  # current block, partial
        assert 0 in kept  # sink
        assert set(range(max(0, i - 2), i)) <= kept  # local blocks
        for j in kept - {i}:
            assert int(status[0, i, j]) == 2  # earlier blocks are full
    # More forced blocks than topk: all forced blocks kept, nothing else.
    assert int((status[0, 6] > 0).sum()) == 4  # sink 0, local 4 and 5, current 6


def test_scores_change_the_selection():
    # A key block aligned with the queries is chosen; move it and the choice follows.
    torch.manual_seed(0)
    q = torch.randn(1, 64, 1, 16) * 0.1
    q[..., 0] = 3.0
    for hot in (1, 2):
        k = torch.randn(1, 64, 1, 16) * 0.1
        k[:, hot * 8 : hot * 8 + 8, :, 0] = 3.0
        layout = topk_blocks(q, k, 8, topk=2, causal=True)
        kept = set(torch.nonzero(layout.block_status()[0, 0, 7]).flatten().tolist())
        assert kept == {hot, 7}


def test_select_topk_blocks_takes_any_scores():
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(2, 3, 5, 5, generator=g)
    layout = select_topk_blocks(
        scores, 2, block_size=10, seq_lengths=(50, 50), sinks=1, local=0, causal=True
    )
    want = brute_force_select(scores.double(), 50, 50, 10, 2, 1, 0, True)
    assert layout_sets(layout) == want


def dense_attention(q, k, v, mask, scale=None):
    heads, kv_heads = q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def brute_force_token_mask(want, batch, heads_layout, heads, q_len, kv_len, b, causal):
    """[B, H, Tq, Tk] token mask (query heads) of a brute-force block selection."""
    group = heads // heads_layout
    mask = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.bool)
    off = kv_len - q_len
    tq = torch.arange(q_len).view(-1, 1)
    tk = torch.arange(kv_len).view(1, -1)
    for (bb, h, i), (kept, _) in want.items():
        for j in kept:
            mask[bb, h * group : (h + 1) * group, i * b : (i + 1) * b, j * b : (j + 1) * b] = True
    if causal:
        mask &= tk <= tq + off
    return mask


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_with_the_layout_against_dense(kv_heads):
    g = torch.Generator().manual_seed(kv_heads)
    q_len = kv_len = 90
    b = 8
    q = torch.randn(2, q_len, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_len, kv_heads, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_len, kv_heads, 8, generator=g, dtype=torch.float64, requires_grad=True)
    layout = topk_blocks(q, k, b, 3, sinks=1, local=1)
    out = tokenmix.block_sparse_attention(q, k, v, layout)
    scores = brute_force_scores(q.detach(), k.detach(), b, "mean", True, True)
    want = brute_force_select(scores, q_len, kv_len, b, 3, 1, 1, True)
    mask = brute_force_token_mask(want, 2, kv_heads, 4, q_len, kv_len, b, True)
    ref = dense_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)


def layer_reference(layer, x):
    batch, length, dim = x.shape
    hd, h, hkv = layer.head_dim, layer.num_heads, layer.num_kv_heads
    qkv = torch.nn.functional.linear(x, layer.qkv.weight, layer.qkv.bias)
    q, k, v = qkv.split([h * hd, hkv * hd, hkv * hd], dim=-1)
    q, k, v = q.unflatten(-1, (h, hd)), k.unflatten(-1, (hkv, hd)), v.unflatten(-1, (hkv, hd))
    scores = brute_force_scores(
        q.detach(), k.detach(), layer.block_size, layer.pooling, layer.causal, True, layer.scale
    )
    want = brute_force_select(
        scores,
        length,
        length,
        layer.block_size,
        layer.topk,
        layer.sinks,
        layer.local,
        layer.causal,
    )
    mask = brute_force_token_mask(
        want, batch, hkv, h, length, length, layer.block_size, layer.causal
    )
    out = dense_attention(q, k, v, mask, layer.scale)
    return torch.nn.functional.linear(
        out.reshape(batch, length, dim), layer.proj.weight, layer.proj.bias
    )


@pytest.mark.parametrize(
    "heads,kv_heads,pooling,causal",
    [(4, 4, "mean", True), (4, 2, "avg_maxmin", True), (6, 2, "mean", False)],
)
def test_layer_forward_backward_against_dense(heads, kv_heads, pooling, causal):
    torch.manual_seed(heads + kv_heads)
    dim = 8 * heads
    layer = tokenmix.nn.TopKBlockAttention(
        dim, heads, block_size=8, topk=3, num_kv_heads=kv_heads, pooling=pooling, causal=causal
    ).double()
    x = torch.randn(2, 75, dim, dtype=torch.float64, requires_grad=True)
    check_layer_against(layer(x), layer_reference(layer, x), x, layer)


def test_layer_compiles_with_a_graph_break_at_the_selection():
    torch.manual_seed(2)
    layer = tokenmix.nn.TopKBlockAttention(64, 4, block_size=16, topk=2, num_kv_heads=2)
    x = torch.randn(2, 96, 64)
    compiled = check_compiled_matches_eager(layer, x, fullgraph=False)
    # A second input of another length compiles and runs too (new selection, same code).
    assert compiled(torch.randn(1, 50, 64)).shape == (1, 50, 64)


def test_no_gradient_through_the_selection():
    q = torch.randn(1, 32, 2, 8, requires_grad=True)
    k = torch.randn(1, 32, 2, 8, requires_grad=True)
    scores = topk_block_scores(q, k, 8)
    assert not scores.requires_grad
    layout = topk_blocks(q, k, 8, 2)
    assert not layout.kv_num_blocks.requires_grad and q.grad is None


def test_errors_name_the_argument():
    q = torch.randn(1, 32, 4, 8)
    k = torch.randn(1, 32, 2, 8)
    with pytest.raises(ValueError, match="pooling must be one of"):
        topk_blocks(q, k, 8, 2, pooling="max")
    with pytest.raises(ValueError, match="topk must be >= 0"):
        topk_blocks(q, k, 8, -1)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        topk_blocks(q, k, 0, 2)
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        topk_blocks(q, k, 8, 2, sinks=-1)
    with pytest.raises(ValueError, match="local must be >= 0"):
        topk_blocks(q, k, 8, 2, local=-2)
    with pytest.raises(TypeError, match="causal must be a bool"):
        topk_blocks(q, k, 8, 2, causal=1)
    with pytest.raises(TypeError, match="group_heads must be a bool"):
        topk_blocks(q, k, 8, 2, group_heads="yes")
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k heads \(3\)"):
        topk_blocks(q, torch.randn(1, 32, 3, 8), 8, 2)
    with pytest.raises(ValueError, match="k head dim 4 must equal q head dim 8"):
        topk_blocks(q, torch.randn(1, 32, 2, 4), 8, 2)
    with pytest.raises(ValueError, match=r"q must be \[B, T, H, D\]"):
        topk_blocks(q[0], k, 8, 2)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        topk_blocks(q, None, 8, 2)
    with pytest.raises(ValueError, match=r"scores must be \[B, heads, 4, 4\]"):
        select_topk_blocks(torch.rand(1, 1, 4, 3), 2, block_size=8, seq_lengths=(32, 32))
    with pytest.raises(ValueError, match="dim .* must be a positive multiple of num_heads"):
        tokenmix.nn.TopKBlockAttention(30, 4, 8, 2)
    with pytest.raises(ValueError, match="pooling must be one of"):
        tokenmix.nn.TopKBlockAttention(32, 4, 8, 2, pooling="sum")
    layer = tokenmix.nn.TopKBlockAttention(32, 4, 8, 2)
    with pytest.raises(ValueError, match=r"expects x of shape \[B, T, 32\]"):
        layer(torch.randn(1, 4, 4, 32))


def test_layout_runs_on_flex_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 100, 4, 8, generator=g)
    k = torch.randn(2, 100, 2, 8, generator=g)
    v = torch.randn(2, 100, 2, 8, generator=g)
    layout = topk_blocks(q, k, 16, 3, sinks=1, local=1)
    out = tokenmix.block_sparse_attention(q, k, v, layout)
    bm = layout.to_block_mask(heads=4)
    fout = flex.flex_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, enable_gqa=True
    )
    torch.testing.assert_close(out, fout.transpose(1, 2), atol=2e-5, rtol=2e-5)


def test_builder_never_makes_a_t_by_t_tensor():
    from pattern_checks import MaxTensorSize

    T = 8192
    q, k = torch.randn(1, T, 4, 16), torch.randn(1, T, 2, 16)
    with MaxTensorSize() as sizes:
        layout = topk_blocks(q, k, 64, 8, sinks=1, local=2, pooling="avg_maxmin")
    assert layout.seq_lengths == (T, T) and layout.heads == 2
    assert sizes.largest < T * T // 8, f"a tensor of {sizes.largest} elements (T*T = {T * T})"
