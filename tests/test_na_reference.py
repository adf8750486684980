"""Tests for the pure-PyTorch neighborhood-attention reference and argument checks."""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch
from na_brute_force import (
    attended_1d,
    brute_force_mask,
    brute_force_rpb_index,
    dense_attention,
    dense_rpb_bias,
)
from tokenmix.neighborhood import reference as ref_mod
from tokenmix.neighborhood.args import check_tensors, normalize_window_args
from tokenmix.neighborhood.reference import (
    neighborhood_attention_reference,
    window_bounds,
    window_table,
)

# --------------------------------------------------------------------------------------
# Hand-computed windows pin the brute force itself.
# --------------------------------------------------------------------------------------

# (length, kernel, stride, dilation, causal, {query: attended keys})
HAND_CASES_1D = [
    # L=7, k=3: edges shift the window inwards.
    (7, 3, 1, 1, False, {0: [0, 1, 2], 3: [2, 3, 4], 6: [4, 5, 6]}),
    # Even kernel: one fewer on the right.
    (8, 4, 1, 1, False, {0: [0, 1, 2, 3], 3: [1, 2, 3, 4], 5: [3, 4, 5, 6], 6: [4, 5, 6, 7]}),
    (8, 4, 1, 1, False, {7: [4, 5, 6, 7]}),
    # Causal.
    (7, 3, 1, 1, True, {0: [0], 1: [0, 1], 5: [3, 4, 5], 6: [4, 5, 6]}),
    # Stride 2: queries 2t and 2t+1 share leader 2t+1.
    (8, 3, 2, 1, False, {0: [0, 1, 2], 1: [0, 1, 2], 2: [2, 3, 4], 3: [2, 3, 4]}),
    (8, 3, 2, 1, False, {4: [4, 5, 6], 5: [4, 5, 6], 6: [5, 6, 7], 7: [5, 6, 7]}),
    # Blocked (stride == kernel), length not a multiple of the kernel.
    (8, 3, 3, 1, False, {0: [0, 1, 2], 2: [0, 1, 2], 3: [3, 4, 5], 5: [3, 4, 5], 7: [5, 6, 7]}),
    (6, 2, 2, 1, False, {0: [0, 1], 1: [0, 1], 4: [4, 5], 5: [4, 5]}),
    # Dilation 2, k=2: groups {0,2,4,6} and {1,3,5,7}.
    (8, 2, 1, 2, False, {0: [0, 2], 2: [0, 2], 4: [2, 4], 7: [5, 7], 1: [1, 3]}),
    # Dilation with uneven group lengths: L=7, d=2 -> groups of length 4 and 3.
    (7, 3, 1, 2, False, {5: [1, 3, 5], 6: [2, 4, 6], 0: [0, 2, 4], 1: [1, 3, 5]}),
    # Causal + stride: leader is the last query of the stride block.
    (8, 3, 2, 1, True, {0: [0], 1: [0, 1], 2: [1, 2], 3: [1, 2, 3], 6: [5, 6], 7: [5, 6, 7]}),
    # Causal blocked.
    (8, 4, 4, 1, True, {0: [0], 3: [0, 1, 2, 3], 4: [4], 5: [4, 5], 7: [4, 5, 6, 7]}),
    # Causal + dilation.
    (9, 2, 1, 3, True, {0: [0], 4: [1, 4], 8: [5, 8]}),
]


@pytest.mark.parametrize("case", HAND_CASES_1D)
def test_hand_computed_1d_windows(case):
    length, kernel, stride, dilation, causal, expected = case
    mask = brute_force_mask((length,), (kernel,), (stride,), (dilation,), (causal,))
    for query, keys in expected.items():
        assert attended_1d(query, length, kernel, stride, dilation, causal) == keys
        assert torch.nonzero(mask[query]).flatten().tolist() == keys, query
    # The reference's window rule agrees on every query.
    keys_t, valid_t, _ = window_table(length, kernel, stride, dilation, causal)
    for query in range(length):
        got = sorted(keys_t[query][valid_t[query]].tolist())
        assert got == torch.nonzero(mask[query]).flatten().tolist(), query


def test_hand_computed_2d_window():
    # shape (3, 4), kernel (2, 3): rows use k=2 (query row 0 -> rows {0, 1}),
    # cols use k=3 (query col 0 -> cols {0, 1, 2}; col 3 -> {1, 2, 3}).
    mask = brute_force_mask((3, 4), (2, 3), (1, 1), (1, 1), (False, False))
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 1, 2, 4, 5, 6]
    # query (2, 3) -> rows {1, 2}, cols {1, 2, 3}
    assert torch.nonzero(mask[11]).flatten().tolist() == [5, 6, 7, 9, 10, 11]
    # causal rows: query (1, 1) -> rows {0, 1}; cols {0, 1, 2}
    mask = brute_force_mask((3, 4), (2, 3), (1, 1), (1, 1), (True, False))
    assert torch.nonzero(mask[5]).flatten().tolist() == [0, 1, 2, 4, 5, 6]
    assert torch.nonzero(mask[1]).flatten().tolist() == [0, 1, 2]


def test_hand_computed_rpb_index():
    # L=7, k=3: query 0 sees keys 0,1,2 at offsets 0,+1,+2 -> indices 2,3,4.
    idx = brute_force_rpb_index((7,), (3,), (1,), (1,), (False,))
    assert idx[0].tolist() == [2, 3, 4, -1, -1, -1, -1]
    assert idx[6].tolist() == [-1, -1, -1, -1, 0, 1, 2]
    # Dilation: offsets are in group coordinates.
    idx = brute_force_rpb_index((8,), (2,), (1,), (2,), (False,))
    assert idx[4].tolist() == [-1, -1, 0, -1, 1, -1, -1, -1]  # offsets -1, 0 (k=2)


def test_window_table_exhaustive_1d():
    # Every (length, kernel, stride, dilation, causal) with length <= 14: the reference's
    # vectorized window rule equals the brute force's scalar one, and rpb indices agree.
    for length in range(2, 15):
        for kernel in range(2, length + 1):
            for dilation in range(1, length // kernel + 1):
                for stride in range(1, kernel + 1):
                    for causal in (False, True):
                        keys, valid, rel = window_table(length, kernel, stride, dilation, causal)
                        for i in range(length):
                            want = attended_1d(i, length, kernel, stride, dilation, causal)
                            got = keys[i][valid[i]].tolist()
                            assert sorted(got) == want, (length, kernel, stride, dilation, i)
                            want_rel = [j // dilation - i // dilation + kernel - 1 for j in got]
                            assert rel[i][valid[i]].tolist() == want_rel


def test_window_sizes():
    for length, kernel, stride, dilation in [(13, 5, 3, 2), (9, 4, 4, 1), (10, 2, 1, 5)]:
        start, end = window_bounds(length, kernel, stride, dilation, False)
        assert ((end - start) == kernel).all()
        start, end = window_bounds(length, kernel, stride, dilation, True)
        size = end - start
        assert (size >= 1).all() and (size <= kernel).all()


# --------------------------------------------------------------------------------------
# Randomized sweep against the brute force.
# --------------------------------------------------------------------------------------


@functools.cache
def _oracle(shape, kernel, stride, dilation, causal):
    return (
        brute_force_mask(shape, kernel, stride, dilation, causal),
        brute_force_rpb_index(shape, kernel, stride, dilation, causal),
    )


def _random_config(seed: int):
    rng = random.Random(seed)
    rank = (seed % 3) + 1
    max_kernel = {1: 7, 2: 4, 3: 3}[rank]
    max_extra_len = {1: 20, 2: 4, 3: 2}[rank]
    kernel, stride, dilation, causal, shape = [], [], [], [], []
    for _ in range(rank):
        k = rng.randint(2, max_kernel)
        d = rng.choice([1, 1, 2, 3]) if rank < 3 else rng.choice([1, 2])
        s = rng.choice([1, 1, rng.randint(1, k), k])
        kernel.append(k)
        dilation.append(d)
        stride.append(s)
        causal.append(rng.random() < 0.3)
        shape.append(k * d + rng.randint(0, max_extra_len))
    heads_kv = rng.choice([1, 2])
    heads = heads_kv * rng.choice([1, 2, 3])
    dim = rng.choice([4, 8])
    dim_v = rng.choice([dim, 3, 6])
    return dict(
        rank=rank,
        shape=tuple(shape),
        kernel=tuple(kernel),
        stride=tuple(stride),
        dilation=tuple(dilation),
        causal=tuple(causal),
        batch=rng.choice([1, 2]),
        heads=heads,
        heads_kv=heads_kv,
        dim=dim,
        dim_v=dim_v,
        use_rpb=rng.random() < 0.6,
        n_extra=rng.choice([0, 0, 1, 3]),
        scale=rng.choice([None, 0.3]),
    )


def _make_inputs(cfg, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    b, shape = cfg["batch"], cfg["shape"]
    q = rand(b, *shape, cfg["heads"], cfg["dim"])
    k = rand(b, *shape, cfg["heads_kv"], cfg["dim"])
    v = rand(b, *shape, cfg["heads_kv"], cfg["dim_v"])
    rpb = rand(cfg["heads"], *(2 * x - 1 for x in cfg["kernel"])) if cfg["use_rpb"] else None
    ak = av = None
    if cfg["n_extra"]:
        ak = rand(b, cfg["n_extra"], cfg["heads_kv"], cfg["dim"])
        av = rand(b, cfg["n_extra"], cfg["heads_kv"], cfg["dim_v"])
    return q, k, v, rpb, ak, av


def _run_both(cfg, tensors, grads=True):
    q, k, v, rpb, ak, av = tensors
    window = (cfg["kernel"], cfg["stride"], cfg["dilation"], cfg["causal"])
    mask, rpb_index = _oracle(cfg["shape"], *window)
    leaves = [t for t in tensors if t is not None]
    if grads:
        for t in leaves:
            t.requires_grad_(True)
    out, lse = neighborhood_attention_reference(
        q, k, v, *window, scale=cfg["scale"], rpb=rpb, additional_keys=ak,
        additional_values=av, return_lse=True,
    )  # fmt: skip
    scale = cfg["scale"] if cfg["scale"] is not None else cfg["dim"] ** -0.5
    bias = dense_rpb_bias(rpb, rpb_index) if rpb is not None else None
    out_d, lse_d = dense_attention(q, k, v, mask, scale, bias, ak, av)
    result = dict(out=out, lse=lse, out_d=out_d, lse_d=lse_d)
    if grads:
        gen = torch.Generator().manual_seed(1234)
        g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
        loss = (out.double() * g_out).sum() + (lse.double() * g_lse).sum()
        loss_d = (out_d * g_out).sum() + (lse_d * g_lse).sum()
        result["grads"] = torch.autograd.grad(loss, leaves)
        result["grads_d"] = torch.autograd.grad(loss_d, leaves)
    return result


SWEEP_SEEDS = list(range(60))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SWEEP_SEEDS)
def test_sweep_fp64(seed):
    cfg = _random_config(seed)
    r = _run_both(cfg, _make_inputs(cfg, torch.float64, seed))
    assert r["out"].dtype == torch.float64 and r["lse"].dtype == torch.float64
    assert r["out"].shape == (cfg["batch"], *cfg["shape"], cfg["heads"], cfg["dim_v"])
    assert r["lse"].shape == (cfg["batch"], *cfg["shape"], cfg["heads"])
    torch.testing.assert_close(r["out"], r["out_d"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(r["lse"], r["lse_d"], rtol=1e-10, atol=1e-10)
    for g, gd in zip(r["grads"], r["grads_d"], strict=True):
        torch.testing.assert_close(g, gd, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", SWEEP_SEEDS[::3])
def test_sweep_fp32(seed):
    cfg = _random_config(seed)
    r = _run_both(cfg, _make_inputs(cfg, torch.float32, seed))
    assert r["out"].dtype == torch.float32 and r["lse"].dtype == torch.float32
    torch.testing.assert_close(r["out"].double(), r["out_d"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r["lse"].double(), r["lse_d"], rtol=1e-4, atol=1e-5)
    for g, gd in zip(r["grads"], r["grads_d"], strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), gd.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype):
    cfg = _random_config(4)
    r = _run_both(cfg, _make_inputs(cfg, dtype, 4), grads=False)
    assert r["out"].dtype == dtype and r["lse"].dtype == torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(r["out"].double(), r["out_d"], rtol=tol, atol=tol)
    torch.testing.assert_close(r["lse"].double(), r["lse_d"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [1, 5, 9])
def test_chunking_matches_single_chunk(monkeypatch, seed):
    cfg = _random_config(seed)
    tensors = _make_inputs(cfg, torch.float64, seed)
    window = (cfg["kernel"], cfg["stride"], cfg["dilation"], cfg["causal"])
    q, k, v, rpb, ak, av = tensors
    kw = dict(rpb=rpb, additional_keys=ak, additional_values=av, return_lse=True)
    out1, lse1 = neighborhood_attention_reference(q, k, v, *window, **kw)
    # A tiny budget forces one query per chunk; a medium one leaves a ragged last chunk.
    for budget in (1, 7 * math.prod(cfg["kernel"]) * 40):
        monkeypatch.setattr(ref_mod, "_CHUNK_BUDGET", budget)
        out2, lse2 = neighborhood_attention_reference(q, k, v, *window, **kw)
        torch.testing.assert_close(out1, out2, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse1, lse2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_full_window_is_full_attention(rank):
    shape = {1: (9,), 2: (4, 5), 3: (3, 2, 4)}[rank]
    gen = torch.Generator().manual_seed(rank)
    b, h, hkv, d, dv = 2, 4, 2, 8, 5
    q = torch.randn(b, *shape, h, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, *shape, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, *shape, hkv, dv, generator=gen, dtype=torch.float64)
    stride = tuple(max(1, x - 1) for x in shape)  # stride does not matter for a full window
    out = neighborhood_attention_reference(q, k, v, shape, stride, (1,) * rank, (False,) * rank)
    n = math.prod(shape)
    qf = q.reshape(b, n, h, d).transpose(1, 2)
    kf = k.reshape(b, n, hkv, d).repeat_interleave(h // hkv, dim=2).transpose(1, 2)
    vf = v.reshape(b, n, hkv, dv).repeat_interleave(h // hkv, dim=2).transpose(1, 2)
    probs = torch.softmax(qf @ kf.transpose(-1, -2) * d**-0.5, dim=-1)
    expected = (probs @ vf).transpose(1, 2).reshape(b, *shape, h, dv)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_causal_full_window_is_causal_attention():
    b, n, h, d = 1, 6, 2, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, generator=gen, dtype=torch.float64) for _ in range(3))
    out = neighborhood_attention_reference(q, k, v, (n,), (1,), (1,), (True,))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_empty_batch_and_no_lse():
    q = torch.randn(0, 5, 6, 2, 4, requires_grad=True)
    k = torch.randn(0, 5, 6, 1, 4, requires_grad=True)
    v = torch.randn(0, 5, 6, 1, 3, requires_grad=True)
    out, lse = neighborhood_attention_reference(
        q, k, v, (3, 3), (1, 2), (1, 2), (False, True), return_lse=True
    )
    assert out.shape == (0, 5, 6, 2, 3) and lse.shape == (0, 5, 6, 2)
    out.sum().backward()
    assert q.grad.shape == q.shape
    out2 = neighborhood_attention_reference(
        q.detach()[:0], k.detach(), v.detach(), (3, 3), (1, 1), (1, 1), (False, False)
    )
    assert isinstance(out2, torch.Tensor)


def test_extra_tokens_only_zero_extra():
    cfg = _random_config(2)
    q, k, v, rpb, _, _ = _make_inputs(cfg, torch.float64, 2)
    b, hkv = cfg["batch"], cfg["heads_kv"]
    ak = torch.zeros(b, 0, hkv, cfg["dim"], dtype=torch.float64)
    av = torch.zeros(b, 0, hkv, cfg["dim_v"], dtype=torch.float64)
    window = (cfg["kernel"], cfg["stride"], cfg["dilation"], cfg["causal"])
    out1 = neighborhood_attention_reference(q, k, v, *window, rpb=rpb)
    out2 = neighborhood_attention_reference(
        q, k, v, *window, rpb=rpb, additional_keys=ak, additional_values=av
    )
    torch.testing.assert_close(out1, out2)


# --------------------------------------------------------------------------------------
# Argument validation.
# --------------------------------------------------------------------------------------


def test_normalize_window_args_ok():
    assert normalize_window_args(2, (8, 9), 3) == ((3, 3), (1, 1), (1, 1), (False, False))
    assert normalize_window_args(3, torch.Size([8, 9, 10]), [2, 3, 4], (1, 3, 2), 2, True) == (
        (2, 3, 4),
        (1, 3, 2),
        (2, 2, 2),
        (True, True, True),
    )
    assert normalize_window_args(1, (5,), (5,), is_causal=[False])[3] == (False,)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(kernel_size=(1, 7)), ValueError, r"kernel_size must be >= 2.*\(1, 7\)"),
        (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size must be .*length 2"),
        (dict(kernel_size=3, stride=(1,)), ValueError, "stride must be .*length 2"),
        (dict(kernel_size=3, dilation=[1, 1, 1]), ValueError, "dilation must be .*length 2"),
        (dict(kernel_size=3, is_causal=(True,)), ValueError, "is_causal must be .*length 2"),
        (dict(kernel_size=(7, 7), stride=(8, 1)), ValueError, r"stride \(8, 1\) must be <="),
        (dict(kernel_size=3, stride=0), ValueError, "stride must be >= 1"),
        (dict(kernel_size=3, dilation=0), ValueError, "dilation must be >= 1"),
        (dict(kernel_size=(3, 5), dilation=(2, 3)), ValueError, r"kernel_size \* dilation"),
        (dict(kernel_size=(9, 3)), ValueError, r"spatial shape \(8, 12\)"),
        (dict(kernel_size=True), TypeError, "kernel_size .*bool"),
        (dict(kernel_size=(3, False)), TypeError, "kernel_size .*bool"),
        (dict(kernel_size=3.0), TypeError, "kernel_size"),
        (dict(kernel_size="33"), TypeError, "kernel_size"),
        (dict(kernel_size=3, stride=1.5), TypeError, "stride"),
        (dict(kernel_size=3, dilation=(1, None)), TypeError, "dilation"),
        (dict(kernel_size=3, is_causal=1), TypeError, "is_causal"),
        (dict(kernel_size=3, is_causal=(True, 0)), TypeError, "is_causal"),
    ],
)
def test_normalize_window_args_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        normalize_window_args(2, (8, 12), **kwargs)


def test_normalize_window_args_rank_and_shape_errors():
    with pytest.raises(ValueError, match="rank"):
        normalize_window_args(4, (8, 8, 8, 8), 3)
    with pytest.raises(ValueError, match="spatial_shape"):
        normalize_window_args(2, (8,), 3)
    with pytest.raises(ValueError, match="spatial_shape"):
        normalize_window_args(1, (0,), 3)


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


def _base():
    # rank 2: q [B=2, 5, 6, H=4, D=8], k/v with H_kv=2, Dv=3
    return dict(q=_t(2, 5, 6, 4, 8), k=_t(2, 5, 6, 2, 8), v=_t(2, 5, 6, 2, 3))


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(q=_t(2, 5, 4, 8)), r"q must be a 5-D tensor"),
        (dict(k=_t(2, 5, 6, 7, 2, 8)), r"k must be a 5-D tensor"),
        (dict(v=_t(5, 6, 2, 3)), r"v must be a 5-D tensor"),
        (dict(k=_t(3, 5, 6, 2, 8)), r"k batch/spatial shape"),
        (dict(k=_t(2, 5, 7, 2, 8)), r"k batch/spatial shape"),
        (dict(v=_t(2, 4, 6, 2, 3)), r"v batch/spatial shape"),
        (dict(k=_t(2, 5, 6, 2, 7)), r"k head dim 7 must equal q head dim 8"),
        (dict(v=_t(2, 5, 6, 1, 3)), r"v head count 1 must equal k head count 2"),
        (dict(k=_t(2, 5, 6, 3, 8), v=_t(2, 5, 6, 3, 3)), r"q head count 4 must be a multiple"),
        (dict(k=_t(2, 5, 6, 2, 8, dtype=torch.float64)), r"k dtype"),
        (dict(v=_t(2, 5, 6, 2, 3, dtype=torch.float16)), r"v dtype"),
        (
            dict(
                q=_t(2, 5, 6, 4, 8, dtype=torch.int32),
                k=_t(2, 5, 6, 2, 8, dtype=torch.int32),
                v=_t(2, 5, 6, 2, 3, dtype=torch.int32),
            ),
            r"q dtype .* not supported",
        ),
        (dict(k=_t(2, 5, 6, 2, 8).to("meta")), r"k device"),
        (dict(v=_t(2, 5, 6, 2, 3).to("meta")), r"v device"),
        (dict(q=_t(2, 0, 6, 4, 8), k=_t(2, 0, 6, 2, 8), v=_t(2, 0, 6, 2, 3)), r"q spatial"),
        (dict(rpb=_t(4, 5, 5, 5)), r"rpb must have shape .*\(4, 5, 5\)"),
        (dict(rpb=_t(2, 5, 5)), r"rpb must have shape"),
        (dict(rpb=_t(4, 5, 3)), r"rpb must have shape"),
        (dict(rpb=_t(4, 5, 5, dtype=torch.float64)), r"rpb dtype"),
        (dict(rpb=_t(4, 5, 5).to("meta")), r"rpb device"),
        (dict(rpb=_t(4, 5, 5), kernel_size=None), r"rpb .*kernel_size"),
        (dict(additional_keys=_t(2, 3, 2, 8)), r"additional_keys was given without"),
        (dict(additional_values=_t(2, 3, 2, 3)), r"additional_values was given without"),
        (
            dict(additional_keys=_t(3, 2, 8), additional_values=_t(2, 3, 2, 3)),
            r"additional_keys must be a 4-D",
        ),
        (
            dict(additional_keys=_t(1, 3, 2, 8), additional_values=_t(2, 3, 2, 3)),
            r"additional_keys batch size",
        ),
        (
            dict(additional_keys=_t(2, 3, 2, 8), additional_values=_t(2, 3, 4, 3)),
            r"additional_values head count",
        ),
        (
            dict(additional_keys=_t(2, 3, 2, 7), additional_values=_t(2, 3, 2, 3)),
            r"additional_keys head dim",
        ),
        (
            dict(additional_keys=_t(2, 3, 2, 8), additional_values=_t(2, 3, 2, 8)),
            r"additional_values head dim",
        ),
        (
            dict(additional_keys=_t(2, 3, 2, 8), additional_values=_t(2, 4, 2, 3)),
            r"same number of tokens",
        ),
        (
            dict(
                additional_keys=_t(2, 3, 2, 8, dtype=torch.float64),
                additional_values=_t(2, 3, 2, 3),
            ),
            r"additional_keys dtype",
        ),
    ],
)
def test_check_tensors_errors(override, match):
    args = dict(_base(), rank=2, kernel_size=(3, 3))
    args.update(override)
    with pytest.raises(ValueError, match=match):
        check_tensors(**args)


def test_check_tensors_ok_and_type_errors():
    check_tensors(**_base(), rank=2)
    check_tensors(
        _t(0, 5, 6, 4, 8),
        _t(0, 5, 6, 2, 8),
        _t(0, 5, 6, 2, 3),
        2,
        rpb=_t(4, 5, 7),
        additional_keys=_t(0, 3, 2, 8),
        additional_values=_t(0, 3, 2, 3),
        kernel_size=(3, 4),
    )
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        check_tensors(None, _t(1, 4, 1, 2), _t(1, 4, 1, 2), 1)
    with pytest.raises(ValueError, match="rank"):
        check_tensors(_t(1, 4, 1, 2), _t(1, 4, 1, 2), _t(1, 4, 1, 2), 0)


def test_reference_validates():
    q = _t(1, 8, 2, 4)
    with pytest.raises(ValueError, match="kernel_size"):
        neighborhood_attention_reference(q, q, q, (9,), (1,), (1,), (False,))
    with pytest.raises(ValueError, match="k head dim"):
        neighborhood_attention_reference(q, _t(1, 8, 2, 3), q, (3,), (1,), (1,), (False,))


def test_reference_is_a_drop_in_for_the_public_function():
    # Same signature and defaults as tokenmix.neighborhood_attention (the error for
    # devices without fused kernels points users to it).
    torch.manual_seed(0)
    q = torch.randn(1, 9, 2, 4, dtype=torch.float64)
    rpb = torch.randn(2, 5, dtype=torch.float64)
    out = neighborhood_attention_reference(q, q, q, 3, rpb=rpb)
    want = neighborhood_attention_reference(q, q, q, (3,), (1,), (1,), (False,), rpb=rpb)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="kernel_size"):
        neighborhood_attention_reference(q, q, q, 1)
