"""Fused CPU FFT mixing (torch.ops.tokenmix.fft_conv_* / fourier_mix / global_filter_* /
spectral_gate_*) against the torch.fft compositions of tokenmix.fft_mix.reference, which
define the operators, and against direct sums where the composition itself is in question."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import tokenmix
import torch
from tokenmix.fft_mix import (
    fft_conv,
    fft_conv_reference,
    fourier_mix,
    fourier_mix_reference,
    fused_kernels_available,
    global_filter,
    global_filter_reference,
    spectral_gate,
    spectral_gate_reference,
)

pytestmark = pytest.mark.skipif(not fused_kernels_available(), reason="fused kernels not built")

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest reference value (complex: both parts)."""
    if want.is_complex():
        got, want = torch.view_as_real(got), torch.view_as_real(want)
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _check(fn, ref, inputs, dtype, tol=None, grad_seed=0):
    """fn and ref agree in the output and in every input's gradient."""
    tol = tol or TOL[dtype]
    gen = torch.Generator().manual_seed(grad_seed)
    out_ref = ref(*inputs)
    dy = torch.randn(out_ref.shape, generator=gen, dtype=torch.float64).to(out_ref.dtype)
    got, got_grads = _grads(fn, inputs, dy)
    want, want_grads = _grads(ref, inputs, dy)
    assert _rel(got, want) < tol, ("output", _rel(got, want))
    for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype and g.shape == w.shape
        assert _rel(g, w) < tol, (f"grad {i}", _rel(g, w))


def _randn(*shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


# Lengths for every path of the engine: radix 4, 2, 3, 5 and the direct odd primes (7 ... 61),
# Bluestein for larger primes (alone and times smooth factors), and the tiny cases.
LENGTHS = [1, 2, 3, 4, 5, 7, 8, 12, 16, 30, 49, 61, 64, 67, 97, 100, 134, 243, 250, 1009, 1024]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("causal", [True, False])
def test_fft_conv_lengths_float64(length, causal):
    u = _randn(2, length, 5, seed=length)
    k = _randn(5, max(1, length // 2 + 1), seed=length + 1)
    _check(
        lambda u, k: fft_conv(u, k, causal=causal),
        lambda u, k: fft_conv_reference(u, k, causal=causal),
        [u, k],
        torch.float64,
    )


@pytest.mark.parametrize(
    "length, taps, causal",
    [
        (6000, 6000, True),  # transform length 12000: the four-step (cache-blocked) path
        (4099, 100, False),  # a prime: Bluestein around a four-step convolution of 8640
        (16384, 16384, True),  # 32768 = 128 x 256
    ],
)
def test_fft_conv_long_float64(length, taps, causal):
    u = _randn(1, length, 3, seed=length)
    k = _randn(3, taps, seed=length + 1) / taps
    _check(
        lambda u, k: fft_conv(u, k, causal=causal),
        lambda u, k: fft_conv_reference(u, k, causal=causal),
        [u, k],
        torch.float64,
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pre", [False, True])
@pytest.mark.parametrize("post", [False, True])
def test_fft_conv_options_float64(causal, bias, pre, post):
    b, length, c = 3, 45, 19
    inputs = [
        _randn(b, length, c, seed=1),
        _randn(c, 31, seed=2),
        _randn(c, seed=3) if bias else None,
        _randn(b, length, c, seed=4) if pre else None,
        _randn(b, length, c, seed=5) if post else None,
    ]

    def run(fn):
        return lambda u, k, bi, pr, po: fn(u, k, causal=causal, bias=bi, pre_gate=pr, post_gate=po)

    _check(run(fft_conv), run(fft_conv_reference), inputs, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fft_conv_dtypes(dtype):
    b, length, c = 2, 300, 40
    inputs = [
        _randn(b, length, c, dtype=dtype, seed=1),
        _randn(c, 300, dtype=torch.float32, seed=2) / 30,  # an fp32 filter with half inputs
        _randn(c, dtype=dtype, seed=3),
        _randn(b, length, c, dtype=dtype, seed=4),
        _randn(b, length, c, dtype=dtype, seed=5),
    ]

    def run(fn):
        return lambda u, k, bi, pr, po: fn(u, k, bias=bi, pre_gate=pr, post_gate=po)

    _check(run(fft_conv), run(fft_conv_reference), inputs, dtype)


def test_fft_conv_float32_accuracy_at_65536_against_direct_float64():
    # The documented bound: float32 within 1e-5 (of the largest output) of a float64 direct,
    # term-by-term convolution. The direct sums are evaluated at 512 positions (a full direct
    # convolution is 4e9 terms per channel); everywhere else the float64 composition stands
    # in, after being checked against those same direct sums.
    length, c = 65536, 2
    u = _randn(1, length, c, seed=7)
    k = _randn(c, length, seed=8) * torch.exp(-torch.arange(length) / 8000.0)
    got = fft_conv(u.float(), k.float())[0].double()
    gen = torch.Generator().manual_seed(9)
    ts = torch.cat(
        [torch.randint(0, length, (500,), generator=gen), torch.arange(length - 12, length)]
    )
    direct = torch.stack(
        [(k[:, : t + 1].flip(-1) * u[0, : t + 1].t()).sum(-1) for t in ts.tolist()]
    )
    full64 = fft_conv_reference(u, k)[0]
    scale = full64.abs().max()
    assert ((full64[ts] - direct).abs().max() / scale).item() < 1e-12
    assert ((got[ts] - direct).abs().max() / scale).item() < 1e-5
    assert ((got - full64).abs().max() / scale).item() < 1e-5


def test_fft_conv_strided_and_broadcast_inputs():
    # [B, C, L] storage seen as [B, L, C], a transposed filter and a broadcast gate.
    u_bcl = _randn(2, 24, 70, seed=1)
    k_lc = _randn(50, 24, seed=2)
    gate = _randn(1, 70, 1, seed=3)
    u, k = u_bcl.transpose(1, 2), k_lc.t()
    assert not u.is_contiguous() and not k.is_contiguous()
    _check(
        lambda u, k, g: fft_conv(u, k, post_gate=g),
        lambda u, k, g: fft_conv_reference(u, k, post_gate=g.expand(2, 70, 24)),
        [u, k, gate],
        torch.float64,
    )


def test_fft_conv_small_channel_count_many_batches():
    # 1 channel block, 37 batch entries: dk and d_bias are summed over batch chunks.
    inputs = [_randn(37, 40, 3, seed=1), _randn(3, 40, seed=2), _randn(3, seed=3)]
    _check(
        lambda u, k, b: fft_conv(u, k, bias=b, causal=False),
        lambda u, k, b: fft_conv_reference(u, k, bias=b, causal=False),
        inputs,
        torch.float64,
    )


def test_gradcheck_all_ops():
    d = torch.float64
    u, k = _randn(2, 9, 3, seed=1).requires_grad_(), _randn(3, 5, seed=2).requires_grad_()
    bias, gate = _randn(3, seed=3).requires_grad_(), _randn(2, 9, 3, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda u, k, b, g: fft_conv(u, k, bias=b, pre_gate=g, post_gate=g), (u, k, bias, gate)
    )
    x = _randn(2, 7, 5, seed=5, dtype=d).requires_grad_()
    assert torch.autograd.gradcheck(fourier_mix, (x,))
    xg = _randn(1, 5, 6, 2, seed=6).requires_grad_()
    w = _randn(5, 4, 2, 2, seed=7).requires_grad_()
    assert torch.autograd.gradcheck(global_filter, (xg, w))
    xs = _randn(2, 11, 4, seed=8).requires_grad_()
    gs = _randn(2, 2, 6, 2, seed=9).requires_grad_()
    bs = _randn(2, 6, seed=10).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, g, b: spectral_gate(x, g, heads=2, activation="modrelu", bias=b), (xs, gs, bs)
    )


@pytest.mark.parametrize("shape", [(2, 16, 8), (1, 17, 5), (2, 67, 9), (1, 1, 1), (3, 30, 134)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fourier_mix(shape, dtype):
    _check(fourier_mix, fourier_mix_reference, [_randn(*shape, dtype=dtype)], dtype)


@pytest.mark.parametrize(
    "shape",
    [(2, 8, 8, 5), (1, 7, 9, 3), (2, 56, 56, 20), (1, 1, 1, 1), (1, 5, 2, 17), (1, 67, 3, 2)],
)
@pytest.mark.parametrize("complex_weight", [False, True])
def test_global_filter_float64(shape, complex_weight):
    b, h, w, c = shape
    weight = _randn(h, w // 2 + 1, c, 2, seed=1)
    if complex_weight:
        weight = torch.view_as_complex(weight)
    _check(global_filter, global_filter_reference, [_randn(*shape), weight], torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_global_filter_dtypes(dtype):
    x = _randn(3, 14, 14, 40, dtype=dtype)
    weight = _randn(14, 8, 40, 2, dtype=torch.float32, seed=1)
    _check(global_filter, global_filter_reference, [x, weight], dtype)


def test_global_filter_many_batches_small_channels():
    x = _randn(33, 6, 5, 2)
    weight = _randn(6, 3, 2, 2, seed=1)
    _check(global_filter, global_filter_reference, [x, weight], torch.float64)


@pytest.mark.parametrize("length", [1, 2, 16, 17, 67, 100])
@pytest.mark.parametrize("activation", [None, "modrelu"])
def test_spectral_gate_float64(length, activation):
    b, heads, c = 2, 3, 12
    bins = length // 2 + 1
    inputs = [_randn(b, length, c, seed=1), _randn(b, heads, bins, 2, seed=2)]
    if activation:
        inputs.append(_randn(heads, bins, seed=3) * 0.5)

    def run(fn):
        return lambda x, g, bias=None: fn(x, g, heads=heads, activation=activation, bias=bias)

    _check(run(spectral_gate), run(spectral_gate_reference), inputs, torch.float64)


def test_spectral_gate_broadcast_gate_and_bias():
    x = _randn(3, 40, 8, seed=1)
    gate = torch.view_as_complex(_randn(1, 2, 21, 2, seed=2))
    bias = _randn(2, 1, seed=3)

    def run(fn):
        return lambda x, g, b: fn(x, g, heads=2, activation="modrelu", bias=b)

    _check(
        run(spectral_gate),
        lambda x, g, b: spectral_gate_reference(
            x, g.expand(3, 2, 21), heads=2, activation="modrelu", bias=b.expand(2, 21)
        ),
        [x, gate, bias],
        torch.float64,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spectral_gate_dtypes(dtype):
    x = _randn(2, 64, 32, dtype=dtype)
    gate = _randn(2, 4, 33, 2, dtype=torch.float32, seed=1)
    _check(
        lambda x, g: spectral_gate(x, g, heads=4),
        lambda x, g: spectral_gate_reference(x, g, heads=4),
        [x, gate],
        dtype,
    )


def test_modrelu_at_zero_is_zero_with_zero_gradient():
    x = torch.zeros(1, 8, 2, dtype=torch.float64, requires_grad=True)
    gate = torch.ones(1, 1, 5, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.full((1, 5), 0.5, dtype=torch.float64, requires_grad=True)
    y = spectral_gate(x, gate, heads=1, activation="modrelu", bias=bias)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    for t in (x, gate, bias):
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


def test_opcheck():
    ops = torch.ops.tokenmix
    u, k, bias = _randn(2, 20, 6, dtype=torch.float32), _randn(6, 9, dtype=torch.float32), None
    gate = _randn(2, 20, 6, dtype=torch.float32, seed=3)
    for args in [(u, k, bias, None, None, True), (u, k, _randn(6).float(), gate, gate, False)]:
        torch.library.opcheck(ops.fft_conv_forward, args)
        torch.library.opcheck(ops.fft_conv_backward, (gate, *args))
    torch.library.opcheck(ops.fourier_mix, (u,))
    x, w = _randn(2, 6, 7, 3).float(), _randn(6, 4, 3, 2).float()
    torch.library.opcheck(ops.global_filter_forward, (x, w))
    torch.library.opcheck(ops.global_filter_backward, (x, x, w))
    g, b = _randn(2, 2, 11, 2).float(), _randn(2, 11).float()
    for args in [(u, g, None, 2, False), (u, g, b, 2, True)]:
        torch.library.opcheck(ops.spectral_gate_forward, args)
        torch.library.opcheck(ops.spectral_gate_backward, (u, *args))


def test_compile_fullgraph_matches_eager():
    def f(u, k, bias, gate, xg, w, xs, g):
        y = fft_conv(u, k, bias=bias, post_gate=gate)
        y = y + fourier_mix(y)
        z = global_filter(xg, w)
        s = spectral_gate(xs, g, heads=2, activation="modrelu")
        return y.square().sum() + z.square().sum() + s.square().sum()

    inputs = [
        _randn(2, 30, 4, dtype=torch.float32, seed=1),
        _randn(4, 30, dtype=torch.float32, seed=2),
        _randn(4, dtype=torch.float32, seed=3),
        _randn(2, 30, 4, dtype=torch.float32, seed=4),
        _randn(1, 6, 6, 3, dtype=torch.float32, seed=5),
        torch.view_as_complex(_randn(6, 4, 3, 2, dtype=torch.float32, seed=6)),
        _randn(2, 20, 4, dtype=torch.float32, seed=7),
        _randn(2, 2, 11, 2, dtype=torch.float32, seed=8),
    ]
    leaves = [t.requires_grad_() for t in inputs]
    want = torch.autograd.grad(f(*leaves), leaves)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*leaves), leaves)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_thread_count():
    u, k, bias = _randn(5, 200, 3, dtype=torch.float32), _randn(3, 50).float(), _randn(3).float()
    x, w = _randn(9, 10, 12, 3).float(), _randn(10, 7, 3, 2).float()
    old = torch.get_num_threads()

    def run():
        outs = []
        for fn, args in [
            (lambda u, k, b: fft_conv(u, k, bias=b), [u, k, bias]),
            (global_filter, [x, w]),
        ]:
            leaves = [t.clone().requires_grad_() for t in args]
            y = fn(*leaves)
            y.square().sum().backward()
            outs += [y.detach()] + [t.grad for t in leaves]
        return outs

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_empty_batch():
    u = torch.zeros(0, 10, 3, requires_grad=True)
    k = torch.randn(3, 4, requires_grad=True)
    y = fft_conv(u, k)
    assert y.shape == (0, 10, 3)
    y.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_lower_instruction_sets_match(isa):
    code = textwrap.dedent(
        """
        import torch, tokenmix
        from tokenmix.fft_mix import reference as r
        torch.manual_seed(0)
        d = torch.float64
        u, k = torch.randn(2, 97, 21, dtype=d), torch.randn(21, 40, dtype=d)
        x, w = torch.randn(2, 9, 10, 21, dtype=d), torch.randn(9, 6, 21, 2, dtype=d)
        g = torch.randn(2, 3, 49, 2, dtype=d)
        # 18000-point transforms: four-step with AVX2's vectors as well.
        ul, kl = torch.randn(1, 9000, 3, dtype=d), torch.randn(3, 9000, dtype=d) / 9000
        errs = [
            (tokenmix.fft_conv(u, k) - r.fft_conv_reference(u, k)).abs().max(),
            (tokenmix.fft_conv(ul, kl) - r.fft_conv_reference(ul, kl)).abs().max(),
            (tokenmix.fourier_mix(u) - r.fourier_mix_reference(u)).abs().max(),
            (tokenmix.global_filter(x, w) - r.global_filter_reference(x, w)).abs().max(),
            (tokenmix.spectral_gate(u, g, heads=3, activation="modrelu")
             - r.spectral_gate_reference(u, g, heads=3, activation="modrelu")).abs().max(),
        ]
        print(int(torch.ops.tokenmix.cpu_isa()), max(float(e) for e in errs))
        """
    )
    env = dict(os.environ, TOKENMIX_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    isa_code, err = out.stdout.split()
    assert isa_code == {"generic": "0", "avx2": "1"}[isa]
    assert float(err) < 1e-11


def test_double_backward_raises():
    u = _randn(1, 20, 2).requires_grad_()
    k = _randn(2, 5)
    (g,) = torch.autograd.grad(fft_conv(u, k).square().sum(), u, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), u)


def test_fourier_mix_double_backward_is_exact():
    # fourier_mix is linear; its backward is the op itself, so second derivatives work.
    x = _randn(1, 6, 4).requires_grad_()
    assert torch.autograd.gradgradcheck(fourier_mix, (x,))


# ---- argument errors ----------------------------------------------------------------------


def test_fft_conv_errors():
    u, k = torch.randn(2, 10, 3), torch.randn(3, 10)
    with pytest.raises(ValueError, match="u must be"):
        fft_conv(torch.randn(10, 3), k)
    with pytest.raises(ValueError, match="u must have at least one token"):
        fft_conv(torch.randn(2, 0, 3), k)
    with pytest.raises(ValueError, match=r"k must be \[C, Lk\]"):
        fft_conv(u, torch.randn(4, 10))
    with pytest.raises(ValueError, match="1 <= Lk <= L"):
        fft_conv(u, torch.randn(3, 11))
    with pytest.raises(ValueError, match="k dtype"):
        fft_conv(u, k.double())
    with pytest.raises(TypeError, match="causal"):
        fft_conv(u, k, causal=1)
    with pytest.raises(ValueError, match="bias must be"):
        fft_conv(u, k, bias=torch.randn(4))
    with pytest.raises(ValueError, match="pre_gate must broadcast"):
        fft_conv(u, k, pre_gate=torch.randn(2, 9, 3))
    with pytest.raises(ValueError, match="post_gate dtype"):
        fft_conv(u, k, post_gate=torch.randn(2, 10, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        fft_conv([1.0], k)
    with pytest.raises(ValueError, match="u dtype"):
        fft_conv(u.int(), k)


def test_other_op_errors():
    with pytest.raises(ValueError, match="x must be"):
        fourier_mix(torch.randn(3, 4))
    x = torch.randn(1, 6, 6, 3)
    with pytest.raises(ValueError, match=r"weight must be complex \[6, 4, 3\]"):
        global_filter(x, torch.randn(6, 6, 3, 2))
    with pytest.raises(ValueError, match="weight must be complex"):
        global_filter(x, torch.randn(6, 4, 3, dtype=torch.complex64).unsqueeze(0))
    with pytest.raises(ValueError, match=r"x must be \[B, H, W, C\]"):
        global_filter(torch.randn(6, 6, 3), torch.randn(6, 4, 3, 2))
    xs, g = torch.randn(2, 10, 6), torch.randn(2, 3, 6, 2)
    with pytest.raises(ValueError, match="heads must be a positive divisor"):
        spectral_gate(xs, g, heads=4)
    with pytest.raises(ValueError, match="activation must be"):
        spectral_gate(xs, g, heads=3, activation="relu")
    with pytest.raises(ValueError, match="bias is modReLU's bias"):
        spectral_gate(xs, g, heads=3, bias=torch.zeros(3, 6))
    with pytest.raises(ValueError, match="bias must broadcast"):
        spectral_gate(xs, g, heads=3, activation="modrelu", bias=torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"gate must be complex \[2, 3, 6\]"):
        spectral_gate(xs, torch.randn(2, 3, 7, 2), heads=3)


def test_top_level_exports():
    for name in ("fft_conv", "fourier_mix", "global_filter", "spectral_gate"):
        assert getattr(tokenmix, name) is getattr(tokenmix.fft_mix, name)
