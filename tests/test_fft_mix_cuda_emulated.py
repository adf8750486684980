"""The CUDA kernels of fourier_mix, global_filter and spectral_gate
(tokenmix/cuda/fft_mix_kernels.h: line transforms of any length, Bluestein's algorithm for
lengths that are not powers of two), run on the CPU by the SIMT emulator
(torch.ops.tokenmix_emulated.*), against the float64 torch.fft compositions: outputs and every
gradient, every dtype."""

from __future__ import annotations

import os

import pytest
import tokenmix
import torch
from tokenmix.fft_mix.args import CUDA_MAX_LINE, cuda_line_size
from tokenmix.fft_mix.reference import (
    fourier_mix_reference,
    global_filter_reference,
    spectral_gate_reference,
)

LIBRARY = os.path.join(os.path.dirname(tokenmix.__file__), "_emulated.so")

# Error relative to the largest reference value. float32 arithmetic for every dtype; half
# inputs are rounded before the reference sees them, so their bound covers the output's rounding.
TOL = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def emulated_library():
    assert os.path.exists(LIBRARY), "tokenmix/_emulated.so is not built"
    torch.ops.load_library(LIBRARY)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _check(name, got, want, like, tol):
    assert got.dtype == like.dtype and got.shape == like.shape, name
    assert torch.isfinite(got).all(), name  # outputs start as NaN: every element written
    err = _rel(got, want)
    assert err < tol, (name, err)


ops = torch.ops.tokenmix_emulated


# ---- fourier_mix


def _fourier(b, length, c, dtype, *, strided=False):
    x = _randn(b, length, c, dtype=dtype, seed=1)
    if strided:  # [B, C, L] storage seen as [B, L, C]
        x = _randn(b, c, length, dtype=dtype, seed=1).transpose(1, 2)
    y = ops.fourier_mix(x)
    _check("y", y, fourier_mix_reference(x.double()), x, TOL[dtype])
    return x, y


@pytest.mark.parametrize(
    "length, c",
    [(1, 1), (2, 3), (7, 5), (16, 64), (56, 96), (100, 12), (128, 768), (1000, 6), (2048, 2)],
)
def test_fourier_mix_float32_lengths(length, c):
    # Powers of two direct; 3, 5, 7, 56, 100, 768 and 1000 through Bluestein.
    _fourier(2, length, c, torch.float32)


@pytest.mark.parametrize("dtype", HALF)
def test_fourier_mix_half_precision_and_strided(dtype):
    _fourier(2, 60, 48, dtype, strided=True)  # Bluestein over 128 points: Monarch inside


@pytest.mark.parametrize("dtype", HALF)
def test_fourier_mix_half_precision_power_of_two_lines(dtype):
    # Monarch transforms reordered to natural order (no Bluestein): 128, 256 and 2048 points.
    _fourier(1, 128, 256, dtype)
    _fourier(1, 2048, 3, dtype)


# ---- global_filter


def _filter(b, h, w, c, dtype, *, strided=False, complex_scale=0.2):
    x = _randn(b, h, w, c, dtype=dtype, seed=1)
    if strided:  # [B, C, H, W] storage seen as [B, H, W, C]
        x = _randn(b, c, h, w, dtype=dtype, seed=1).permute(0, 2, 3, 1)
    weight = _randn(h, w // 2 + 1, c, 2, seed=2, scale=complex_scale)
    dy = _randn(b, h, w, c, dtype=dtype, seed=3)
    y = ops.global_filter_forward(x, weight)
    dx, dw = ops.global_filter_backward(dy, x, weight)
    xl, wl = x.double().requires_grad_(), weight.double().requires_grad_()
    want = global_filter_reference(xl, wl)
    want.backward(dy.double())
    tol = TOL[dtype]
    _check("y", y, want.detach(), x, tol)
    _check("dx", dx, xl.grad, x, tol)
    _check("dweight", dw, wl.grad, weight, max(tol, TOL[torch.float32]))


@pytest.mark.parametrize(
    "h, w", [(1, 1), (1, 4), (3, 1), (4, 4), (7, 7), (14, 14), (56, 56), (5, 8), (16, 9)]
)
def test_global_filter_float32_grids(h, w):
    # 56 = 7 * 8 (GFNet-S), odd and even widths (the Nyquist column), Bluestein and direct.
    _filter(2, h, w, 5, torch.float32)


@pytest.mark.parametrize("dtype", HALF)
def test_global_filter_half_precision_and_strided(dtype):
    _filter(2, 14, 14, 8, dtype, strided=True)


@pytest.mark.parametrize("dtype", HALF)
def test_global_filter_half_precision_power_of_two_grid(dtype):
    _filter(1, 128, 256, 2, dtype)  # Monarch rows and columns, float32 backward spectra


def test_global_filter_long_rows():
    _filter(1, 3, 1000, 2, torch.float32)  # Bluestein over 2048 points
    _filter(1, 2048, 2, 1, torch.float32)


# ---- spectral_gate


def _gate(b, length, c, heads, dtype, *, modrelu, bias, shared=False, strided=False):
    x = _randn(b, length, c, dtype=dtype, seed=1)
    if strided:
        x = _randn(b, c, length, dtype=dtype, seed=1).transpose(1, 2)
    bins = length // 2 + 1
    gate = _randn(1 if shared else b, heads, bins, 2, seed=2).expand(b, heads, bins, 2)
    gate = gate.contiguous()
    bi = _randn(heads, bins, seed=4, scale=0.5) if bias else None
    dy = _randn(b, length, c, dtype=dtype, seed=3)
    y = ops.spectral_gate_forward(x, gate, bi, heads, modrelu)
    dx, dg, db = ops.spectral_gate_backward(dy, x, gate, bi, heads, modrelu)
    xl, gl = x.double().requires_grad_(), gate.double().requires_grad_()
    bl = bi.double().requires_grad_() if bias else None
    want = spectral_gate_reference(
        xl, gl, heads=heads, activation="modrelu" if modrelu else None, bias=bl
    )
    want.backward(dy.double())
    tol = TOL[dtype]
    _check("y", y, want.detach(), x, tol)
    _check("dx", dx, xl.grad, x, tol)
    _check("dgate", dg, gl.grad, gate, max(tol, TOL[torch.float32]))
    if bias:
        _check("dbias", db, bl.grad, bi, max(tol, TOL[torch.float32]))
    else:
        assert db.numel() == 0


@pytest.mark.parametrize("length", [1, 2, 3, 8, 31, 64, 100, 257, 1000, 1024, 2048])
def test_spectral_gate_float32_lengths(length):
    _gate(2, length, 6, 3, torch.float32, modrelu=False, bias=False)


@pytest.mark.parametrize("length", [16, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_spectral_gate_modrelu(length, bias):
    _gate(2, length, 8, 2, torch.float32, modrelu=True, bias=bias)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("length", [96, 256, 2048])  # Bluestein over 256; Monarch direct
def test_spectral_gate_half_precision(dtype, length):
    _gate(2, length, 8, 4, dtype, modrelu=True, bias=True, strided=True)


def test_spectral_gate_shared_gate_and_one_channel_heads():
    _gate(3, 50, 4, 4, torch.float32, modrelu=True, bias=True, shared=True)


@pytest.mark.parametrize(
    "dtype, scale", [(torch.bfloat16, 1e30), (torch.bfloat16, 1e-30), (torch.float16, 2e-6)]
)
def test_half_precision_extreme_magnitudes(dtype, scale):
    # fp16/bf16 transforms run on tensor cores with fp16 operands; each block's lines are first
    # scaled by a power of two, so data far outside fp16's range keeps its precision. A large
    # weight keeps fp16 outputs of 2e-6 data out of fp16's subnormal range (whose rounding alone
    # would exceed the bound).
    x = _randn(2, 200, 6, dtype=dtype, seed=1, scale=scale)
    _check("fourier_mix", ops.fourier_mix(x), fourier_mix_reference(x.double()), x, TOL[dtype])
    g = _randn(14, 14 // 2 + 1, 6, 2, seed=2, scale=200.0 if dtype == torch.float16 else 0.2)
    xg = _randn(2, 14, 14, 6, dtype=dtype, seed=3, scale=scale)
    want = global_filter_reference(xg.double(), g.double())
    _check("global_filter", ops.global_filter_forward(xg, g), want, xg, TOL[dtype])


# ---- sizes, refusals, determinism


def test_python_line_rule_matches_the_kernels():
    for n in [0, 1, 2, 3, 5, 56, 768, 1000, 1024, 1025, 2047, 2048, 2049, 4096]:
        assert ops.fft_line_cuda_size(n) == cuda_line_size(n), n
        assert cuda_line_size(n) <= CUDA_MAX_LINE
    assert cuda_line_size(768) == 2048 and cuda_line_size(56) == 128
    assert cuda_line_size(1025) == 0 and cuda_line_size(2048) == 2048


def test_unsupported_problems_are_refused_with_the_reason():
    with pytest.raises(RuntimeError, match="at most 2048 .* or 1023 .* got 1025"):
        ops.fourier_mix(torch.zeros(1, 1025, 2))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.fourier_mix(torch.zeros(1, 4, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="got 4096"):
        ops.global_filter_forward(torch.zeros(1, 2, 4096, 1), torch.zeros(2, 2049, 1, 2))
    with pytest.raises(RuntimeError, match="got 3000"):
        ops.spectral_gate_forward(
            torch.zeros(1, 3000, 2), torch.zeros(1, 1, 1501, 2), None, 1, False
        )


def test_each_operator_checks_its_transformed_axes(monkeypatch):
    # The public functions hand _fused exactly the axes their kernels transform: fourier_mix
    # (L, C), global_filter (H, W), spectral_gate (L). Recorded on CPU tensors, where _fused's
    # answer (False here) only sends them to the torch.fft compositions.
    from tokenmix.fft_mix import functional

    seen = []

    def record(x, *lengths):
        seen.append(lengths)
        return False

    monkeypatch.setattr(functional, "_fused", record)
    tokenmix.fourier_mix(torch.randn(2, 12, 7))
    tokenmix.global_filter(torch.randn(2, 5, 9, 3), torch.randn(5, 5, 3, 2))
    tokenmix.spectral_gate(torch.randn(2, 10, 4), torch.randn(2, 2, 6, 2), heads=2)
    assert seen == [(12, 7), (5, 9), (10,)]


def test_cuda_tensors_reach_the_kernels_exactly_within_the_line_rule(monkeypatch):
    # tokenmix.fourier_mix / global_filter / spectral_gate on CUDA tensors call the CUDA ops
    # when every transformed axis passes cuda_line_size (and the dtype is not float64), and the
    # torch.fft compositions otherwise. No GPU here: the decision is checked on its own.
    from types import SimpleNamespace

    from tokenmix.fft_mix import functional

    monkeypatch.setattr(functional, "_cuda_kernels_usable", lambda: True)
    x = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    assert functional._fused(x, 512, 768)  # FNet-base
    assert functional._fused(x, 56, 56)  # GFNet-S
    assert functional._fused(x, 2048)
    assert not functional._fused(x, 512, 1025)
    assert not functional._fused(x, 4096)
    x.dtype = torch.float64
    assert not functional._fused(x, 64)
    monkeypatch.setattr(functional, "_cuda_kernels_usable", lambda: False)
    x.dtype = torch.float32
    assert not functional._fused(x, 64)
