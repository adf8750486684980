"""The CUDA fft_conv kernels (tokenmix/cuda/fft_conv.h), run on the CPU by the SIMT emulator
(torch.ops.tokenmix_emulated.fft_conv_forward / fft_conv_backward), against the float64
torch.fft composition: outputs and every gradient, every dtype and option."""

from __future__ import annotations

import os

import pytest
import tokenmix
import torch
from tokenmix.fft_mix.args import CUDA_MAX_TRANSFORM, cuda_transform_size
from tokenmix.fft_mix.reference import fft_conv_reference

LIBRARY = os.path.join(os.path.dirname(tokenmix.__file__), "_emulated.so")

# Error relative to the largest reference value. Half-precision inputs are rounded before the
# reference sees them, so the bound covers the kernels' float32 arithmetic and the output's
# rounding.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module", autouse=True)
def emulated_library():
    assert os.path.exists(LIBRARY), "tokenmix/_emulated.so is not built"
    torch.ops.load_library(LIBRARY)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _compare(
    b,
    length,
    c,
    taps,
    causal,
    dtype,
    *,
    bias=False,
    pre=False,
    post=False,
    k_dtype=torch.float32,
    strided=False,
):
    u = _randn(b, length, c, dtype=dtype, seed=1)
    if strided:  # [B, C, L] storage seen as [B, L, C]
        u = _randn(b, c, length, dtype=dtype, seed=1).transpose(1, 2)
    k = _randn(c, taps, dtype=k_dtype, seed=2, scale=taps**-0.5)
    bi = _randn(c, dtype=k_dtype, seed=3) if bias else None
    pg = _randn(b, length, c, dtype=dtype, seed=4) if pre else None
    po = _randn(b, length, c, dtype=dtype, seed=5) if post else None
    dy = _randn(b, length, c, dtype=dtype, seed=6)
    ops = torch.ops.tokenmix_emulated
    y = ops.fft_conv_forward(u, k, bi, pg, po, causal)
    grads = ops.fft_conv_backward(dy, u, k, bi, pg, po, causal)

    leaves = [None if t is None else t.double().requires_grad_() for t in (u, k, bi, pg, po)]
    want = fft_conv_reference(
        leaves[0],
        leaves[1],
        causal=causal,
        bias=leaves[2],
        pre_gate=leaves[3],
        post_gate=leaves[4],
    )
    want.backward(dy.double())
    tol = TOL[dtype]
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert _rel(y, want.detach()) < tol, ("out", _rel(y, want.detach()))
    for name, g, leaf, src in zip(
        ("du", "dk", "dbias", "dpre", "dpost"), grads, leaves, (u, k, bi, pg, po), strict=True
    ):
        if leaf is None:
            assert g.numel() == 0, name
            continue
        assert g.dtype == src.dtype and g.shape == src.shape, name
        assert torch.isfinite(g).all(), name  # outputs start as NaN: every element written
        assert _rel(g, leaf.grad) < tol, (name, _rel(g, leaf.grad))


@pytest.mark.parametrize(
    "length, taps",
    [(1, 1), (2, 1), (3, 2), (31, 31), (64, 5), (100, 100), (1000, 300), (1024, 1024)],
)
def test_causal_lengths_float32(length, taps):
    _compare(2, length, 3, taps, True, torch.float32, bias=True)


@pytest.mark.parametrize("length", [2, 16, 256, 2048])
def test_circular_power_of_two_float32(length):
    _compare(1, length, 4, max(1, length // 3), False, torch.float32, bias=True)


@pytest.mark.parametrize(
    "length, taps", [(1, 1), (3, 2), (5, 5), (100, 37), (100, 100), (1000, 1), (1000, 1000)]
)
def test_circular_any_length_float32(length, taps):
    # L not a power of two: the linear convolution folded back (y[t] += z[t + L], t < Lk - 1).
    _compare(2, length, 3, taps, False, torch.float32, bias=True, pre=True, post=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_circular_any_length_half_precision(dtype):
    _compare(2, 300, 4, 200, False, dtype, bias=True, post=True)


@pytest.mark.parametrize(
    "length, taps, dtype",
    [(3000, 50, torch.float32), (2500, 2500, torch.float32), (3000, 1500, torch.bfloat16)],
)
def test_circular_any_length_multipass(length, taps, dtype):
    _compare(1, length, 3, taps, False, dtype, bias=True, pre=True, post=True)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pre", [False, True])
@pytest.mark.parametrize("post", [False, True])
def test_options_float32(bias, pre, post):
    _compare(3, 70, 5, 40, True, torch.float32, bias=bias, pre=pre, post=post)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k_dtype", ["same", torch.float32])
def test_half_precision(dtype, k_dtype):
    _compare(
        2,
        200,
        6,
        150,
        True,
        dtype,
        bias=True,
        pre=True,
        post=True,
        k_dtype=dtype if k_dtype == "same" else k_dtype,
    )


# fp16/bf16 transforms of 128 points and more run the Monarch plan on tensor cores (n = 16^a r,
# r = 8, 1, 2, 4, 8 for n = 128 ... 2048); shorter ones the radix-2 FMA plan. Transform sizes
# here: 64, 64, 128, 256, 512, 512, 1024, 1024, 2048, 2048.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "length, taps, causal",
    [
        (40, 20, True),
        (64, 64, True),
        (128, 128, False),
        (256, 100, False),
        (300, 200, True),
        (512, 512, False),
        (600, 425, True),
        (1024, 300, False),
        (1000, 1000, True),
        (2048, 700, False),
    ],
)
def test_half_precision_every_plan(dtype, length, taps, causal):
    _compare(2, length, 4, taps, causal, dtype, bias=True, post=True)


@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float16, 1e4), (torch.float16, 2e-6), (torch.bfloat16, 1e30), (torch.bfloat16, 1e-30)],
)
def test_half_precision_extreme_magnitudes(dtype, scale):
    # The tensor-core transforms round their operands to fp16: without the per-transform
    # power-of-two normalization, bf16 data of 1e30 overflows, 1e-30 flushes to zero, and fp16
    # data of 2e-6 (subnormal inside the transform) loses its precision. A large filter keeps
    # fp16 outputs out of the subnormal range.
    u = _randn(2, 1024, 4, dtype=dtype, seed=1, scale=scale)
    k_scale = 1e3 if dtype == torch.float16 and scale < 1 else 1.0
    k = _randn(4, 1024, seed=2, scale=k_scale * 1024**-0.5)
    dy_scale = 1.0 if dtype == torch.float16 else 1 / scale  # dk stays finite
    dy = _randn(2, 1024, 4, dtype=dtype, seed=6, scale=dy_scale)
    ops = torch.ops.tokenmix_emulated
    y = ops.fft_conv_forward(u, k, None, None, None, True)
    du, dk, _, _, _ = ops.fft_conv_backward(dy, u, k, None, None, None, True)
    leaves = [u.double().requires_grad_(), k.double().requires_grad_()]
    want = fft_conv_reference(*leaves, causal=True)
    want.backward(dy.double())
    for got, ref in ((y, want.detach()), (du, leaves[0].grad), (dk, leaves[1].grad)):
        assert torch.isfinite(got).all()
        assert _rel(got, ref) < TOL[dtype], _rel(got, ref)


# Transforms beyond 2048 points take more passes (tokenmix/cuda/fft_conv_multipass.h): n = 4096
# (64 x 64, radix-2 in both passes), 8192 (128 x 64: Monarch columns for fp16/bf16), 16384
# (128 x 128). The emulator's build holds 64 KiB of spectra per chunk: a pair of channels of
# 8192 points or more is a chunk of its own (3 channels: 2 pair chunks), and batch entries go
# one per chunk beyond 4096 points (dk summed across chunks).
@pytest.mark.slow
@pytest.mark.parametrize(
    "b, length, taps, causal, dtype",
    [
        (3, 3000, 1097, True, torch.float32),
        (2, 4096, 4096, False, torch.float32),
        (3, 5000, 3000, True, torch.float16),
        (1, 8192, 2000, False, torch.bfloat16),
        (2, 9000, 7000, True, torch.float16),
    ],
)
def test_multipass(b, length, taps, causal, dtype):
    _compare(b, length, 3, taps, causal, dtype, bias=True, pre=True, post=True)


def test_multipass_batch_chunks_of_several_entries():
    # One channel pair of 4096 points is 32 KiB: 2 entries per chunk, a batch of 5 in chunks of
    # 2, 2 and 1.
    _compare(5, 3000, 2, 1000, True, torch.float32, bias=True, pre=True, post=True)
    _compare(5, 4096, 1, 1000, False, torch.float16, bias=True, post=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "length, taps, causal, dtype",
    [(40000, 20000, True, torch.bfloat16), (131072, 5000, False, torch.float16)],
)
def test_multipass_monarch_stages(length, taps, causal, dtype):
    # n = 65536: 256 x 256 (two radix-16 stages in each pass); n = 131072: 512 x 256 (radix-16,
    # radix-16 and radix-2 columns).
    _compare(1, length, 2, taps, causal, dtype, bias=True)


def test_multipass_strided_input_and_float32_filter_with_bfloat16():
    _compare(
        2,
        2500,
        4,
        2500,
        True,
        torch.bfloat16,
        bias=True,
        post=True,
        k_dtype=torch.float32,
        strided=True,
    )


def test_odd_channel_count_and_strided_input():
    # The last channel pair has one channel; u is a transposed view.
    _compare(2, 90, 7, 33, True, torch.float32, bias=True, post=True, strided=True)


def test_unsupported_problems_are_refused_with_the_reason():
    ops = torch.ops.tokenmix_emulated
    u = torch.randn(1, 3000, 2)
    with pytest.raises(RuntimeError, match="at most 4194304 points"):
        ops.fft_conv_forward(
            torch.zeros(1, 2**21 + 1, 1), torch.zeros(1, 2**21 + 1), None, None, None, True
        )
    with pytest.raises(RuntimeError, match="at most 4194304 points"):  # folded: 2^23 points
        length = 3 * 2**20
        ops.fft_conv_forward(
            torch.zeros(1, length, 1), torch.zeros(1, length), None, None, None, False
        )
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.fft_conv_forward(u.double()[:, :10], torch.randn(2, 5).double(), None, None, None, True)


@pytest.mark.parametrize("causal", [True, False])
def test_python_size_rule_matches_the_kernels(causal):
    # tokenmix.fft_mix.args.cuda_transform_size decides which CUDA problems reach the kernels;
    # it must accept exactly what the kernels accept (fft_conv_cuda_size is their rule).
    ops = torch.ops.tokenmix_emulated
    lengths = (1, 2, 3, 5, 64, 100, 1024, 1025, 2048, 2049, 4096, 5000, 2**21, 2**21 + 1, 2**22)
    for length in lengths:
        for taps in sorted({1, max(1, length // 2), length}):
            n = cuda_transform_size(length, taps, causal)
            assert ops.fft_conv_cuda_size(length, taps, causal) == n, (length, taps, causal)
            assert n <= CUDA_MAX_TRANSFORM
            if length > 5000:
                continue
            accepted = True  # and the kernels run exactly those problems
            try:
                ops.fft_conv_forward(
                    torch.zeros(1, length, 1), torch.zeros(1, taps), None, None, None, causal
                )
            except RuntimeError as exc:
                assert "fft_conv on CUDA" in str(exc)
                accepted = False
            assert accepted == (n > 0), (length, taps, causal)


@pytest.mark.parametrize("length", [300, 3000])  # one fused kernel; multi-pass in 3 chunks
def test_deterministic(length):
    u, k = _randn(3, length, 4, seed=1), _randn(4, 100, seed=2)
    dy = _randn(3, length, 4, seed=3)
    ops = torch.ops.tokenmix_emulated
    first = ops.fft_conv_backward(dy, u, k, torch.ones(4), None, None, True)
    second = ops.fft_conv_backward(dy, u, k, torch.ones(4), None, None, True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
