"""The FFT-mixing operators on a real CUDA device: fft_conv's kernels (tokenmix/cuda/fft_conv.h,
one fused kernel up to 2048-point transforms, and fft_conv_multipass.h beyond) and those of
fourier_mix, global_filter and spectral_gate (fft_mix_kernels.h), through the public API
(autograd included) against the float64 torch.fft compositions, every dtype.
Skipped (and reported as skipped) on machines without a GPU, such as this project's build
machines, where tests/test_fft_cuda_emulated.py runs the same kernel source on the SIMT
emulator instead."""

from __future__ import annotations

import pytest
import tokenmix
import torch
from tokenmix.fft_mix.reference import (
    fft_conv_reference,
    fourier_mix_reference,
    global_filter_reference,
    spectral_gate_reference,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not tokenmix._ops.build_info().get("cuda_built"),
    reason="needs a CUDA device and a tokenmix build with CUDA kernels",
)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "length, taps, causal",
    [
        (1000, 1000, True),
        (2048, 300, True),
        (4096, 4096, False),
        (3000, 1000, False),  # circular, not a power of two: a folded linear convolution
        (5000, 5000, True),
        (40000, 30000, True),
    ],
)
def test_fft_conv_matches_float64(dtype, length, taps, causal):
    # 4096 and more points take the multi-pass kernels (131072 at L = 40000).
    gen = torch.Generator().manual_seed(length)
    b, c = 2, 24

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    host = [r(b, length, c), r(c, taps, scale=taps**-0.5), r(c), r(b, length, c), r(b, length, c)]
    dy = r(b, length, c)
    dev = [
        t.to("cuda", dtype if i != 1 and i != 2 else torch.float32).requires_grad_()
        for i, t in enumerate(host)
    ]
    y = tokenmix.fft_conv(
        dev[0], dev[1], causal=causal, bias=dev[2], pre_gate=dev[3], post_gate=dev[4]
    )
    y.backward(dy.to("cuda", dtype))
    ref_in = [t.to(d.dtype).double().requires_grad_() for t, d in zip(host, dev, strict=True)]
    want = fft_conv_reference(
        ref_in[0], ref_in[1], causal=causal, bias=ref_in[2], pre_gate=ref_in[3], post_gate=ref_in[4]
    )
    want.backward(dy.to(dtype).double())

    def rel(got, ref):
        return ((got.double().cpu() - ref).abs().max() / ref.abs().max()).item()

    assert rel(y.detach(), want.detach()) < TOL[dtype]
    for d, w in zip(dev, ref_in, strict=True):
        assert rel(d.grad, w.grad) < TOL[dtype]


def _compare_on_device(fn, reference, host, dtype, grad_shape):
    """Runs fn on CUDA copies of the float64 host tensors (the first in dtype, the others
    float32) and reference on the rounded host copies; compares outputs and every gradient."""
    dev = [
        t.to("cuda", dtype if i == 0 else torch.float32).requires_grad_()
        for i, t in enumerate(host)
    ]
    dy = torch.randn(grad_shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y = fn(*dev)
    y.backward(dy.to("cuda", dtype))
    ref_in = [t.to(d.dtype).double().requires_grad_() for t, d in zip(host, dev, strict=True)]
    want = reference(*ref_in)
    want.backward(dy.to(dtype).double())

    def rel(got, ref):
        return ((got.double().cpu() - ref).abs().max() / ref.abs().max()).item()

    assert rel(y.detach(), want.detach()) < TOL[dtype]
    for d, w in zip(dev, ref_in, strict=True):
        assert rel(d.grad, w.grad) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length, c", [(512, 768), (1000, 64)])
def test_fourier_mix_matches_float64(dtype, length, c):
    x = torch.randn(2, length, c, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _compare_on_device(tokenmix.fourier_mix, fourier_mix_reference, [x], dtype, x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h, w", [(56, 56), (14, 14), (32, 17)])
def test_global_filter_matches_float64(dtype, h, w):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, h, w, 96, generator=gen, dtype=torch.float64)
    weight = torch.randn(h, w // 2 + 1, 96, 2, generator=gen, dtype=torch.float64) * 0.2
    _compare_on_device(tokenmix.global_filter, global_filter_reference, [x, weight], dtype, x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length", [1024, 1000])
def test_spectral_gate_matches_float64(dtype, length):
    gen = torch.Generator().manual_seed(3)
    bins = length // 2 + 1
    x = torch.randn(2, length, 64, generator=gen, dtype=torch.float64)
    gate = torch.randn(2, 4, bins, 2, generator=gen, dtype=torch.float64)
    bias = torch.randn(4, bins, generator=gen, dtype=torch.float64) * 0.3

    def fn(x, gate, bias):
        return tokenmix.spectral_gate(x, gate, heads=4, activation="modrelu", bias=bias)

    def ref(x, gate, bias):
        return spectral_gate_reference(x, gate, heads=4, activation="modrelu", bias=bias)

    _compare_on_device(fn, ref, [x, gate, bias], dtype, x.shape)
