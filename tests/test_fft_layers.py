"""tokenmix.nn FFT-mixing layers (HyenaFilter, HyenaOperator, FNetMixing, GlobalFilter2D,
SpectralGate): each trained for a few steps side by side with a plain ``torch.fft``
re-implementation of its math (float64, same initial parameters), plus causality, dtype
smoke tests, the docstring examples and argument errors."""

from __future__ import annotations

import doctest
import math

import pytest
import tokenmix
import torch
import torch.nn.functional as F
from tokenmix.fft_mix import modules as fft_modules

TOL = {"rtol": 1e-9, "atol": 1e-12}

# ---------------------------------------------------------------------------------------
# Plain-torch re-implementations, on a {name: tensor} dict of the layer's parameters
# ---------------------------------------------------------------------------------------


def ref_hyena_filter(
    p,
    length,
    *,
    max_length,
    emb_dim=3,
    fast=0.3,
    slow=1.5,
    target=1e-2,
    modulate=True,
    shift=0.0,
    prefix="",
):
    """Hyena's implicit filter ``[C, length]``: FFN(z) * (exp(-t |delta|) + shift)."""
    t = torch.linspace(0.0, 1.0, max_length, dtype=torch.float64)
    bands = torch.arange((emb_dim - 1) // 2, dtype=torch.float64)
    rho = torch.exp(
        -2j * math.pi * torch.arange(max_length, dtype=torch.float64)[:, None] * bands / max_length
    )
    z = torch.cat([t[:, None], rho.real, rho.imag], dim=-1)[:length]
    h = torch.sin(
        p[prefix + "mlp.1.freq"] * (z @ p[prefix + "mlp.0.weight"].T + p[prefix + "mlp.0.bias"])
    )
    h = torch.sin(
        p[prefix + "mlp.3.freq"] * (h @ p[prefix + "mlp.2.weight"].T + p[prefix + "mlp.2.bias"])
    )
    h = h @ p[prefix + "mlp.4.weight"].T  # [length, C]
    if modulate:
        channels = h.shape[1]
        deltas = torch.linspace(
            math.log(target) / slow, math.log(target) / fast, channels, dtype=torch.float64
        )
        h = h * (torch.exp(-t[:length, None] * deltas.abs()) + shift)
    return h.T


def ref_long_conv(v, k, causal):
    """``y[t] = sum_s k[t - s] v[s]`` over dim 1 of ``v`` ``[B, L, C]``, ``k`` ``[C, L]``;
    linear (zero padded) when causal, else circular."""
    length = v.shape[1]
    n = 2 * length if causal else length
    spec = torch.fft.rfft(v, n=n, dim=1) * torch.fft.rfft(k, n=n, dim=1).T
    return torch.fft.irfft(spec, n=n, dim=1)[:, :length]


def ref_hyena_operator(p, x, *, d_model, order, max_length, causal, short):
    length = x.shape[1]
    u = x @ p["in_proj.weight"].T + p["in_proj.bias"]  # [B, L, (N + 1) d]
    # Depthwise causal short conv: y[t] = b + sum_j w[j] u[t - (K - 1) + j].
    padded = F.pad(u, (0, 0, short - 1, 0))
    w = p["short_filter.weight"][:, 0, :]  # [(N + 1) d, K]
    u = p["short_filter.bias"] + sum(padded[:, j : j + length] * w[:, j] for j in range(short))
    chunks = u.split(d_model, dim=-1)
    v = chunks[0]
    k = ref_hyena_filter(p, length, max_length=max_length, prefix="filter.")
    for i in range(order):
        h = k[i * d_model : (i + 1) * d_model]
        v = chunks[i + 1] * (ref_long_conv(v, h, causal) + p["D"][i] * v)
    return v @ p["out_proj.weight"].T + p["out_proj.bias"]


def ref_fnet_model(p, x):
    h = x @ p["0.weight"].T + p["0.bias"]
    h = torch.fft.fftn(h, dim=(1, 2)).real
    return h @ p["2.weight"].T + p["2.bias"]


def ref_global_filter(p, x, height, width):
    flat = x.dim() == 3
    if flat:
        x = x.reshape(x.shape[0], height, width, x.shape[-1])
    spec = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")
    y = torch.fft.irfft2(
        spec * torch.view_as_complex(p["weight"]), s=(height, width), dim=(1, 2), norm="ortho"
    )
    return y.reshape(x.shape[0], height * width, -1) if flat else y


def ref_spectral_gate(p, x, *, heads, max_length, activation):
    b, length, dim = x.shape
    bins, max_bins = length // 2 + 1, max_length // 2 + 1
    hidden = F.gelu(x.mean(dim=1) @ p["mlp.0.weight"].T + p["mlp.0.bias"])
    mod = (hidden @ p["mlp.2.weight"].T + p["mlp.2.bias"]).reshape(b, heads, max_bins, 2)
    gate = torch.complex(
        p["base_filter"][None, :, :bins, 0] + mod[:, :, :bins, 0],
        p["base_filter"][None, :, :bins, 1] + mod[:, :, :bins, 1],
    )  # [B, heads, F]
    spec = torch.fft.rfft(x, dim=1).reshape(b, bins, heads, dim // heads)
    spec = spec * gate.transpose(1, 2)[..., None]
    if activation == "modrelu":
        mag = spec.abs()
        bias = p["bias"][:, :bins].T[None, :, :, None]
        spec = spec * (torch.relu(mag + bias) / mag)
    return torch.fft.irfft(spec.reshape(b, bins, dim), n=length, dim=1)


# ---------------------------------------------------------------------------------------
# Training side by side
# ---------------------------------------------------------------------------------------


def perturb_(module, scale=0.3, seed=0):
    """Random offsets on every parameter: zero-initialised ones must not hide mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def train_side_by_side(layer, ref_fn, inputs, steps=3, lr=0.05):
    """Trains ``layer`` and ``ref_fn`` (on a copy of the layer's parameters) with SGD on
    ``mean((y - target)^2)`` over ``inputs`` (one per step); outputs, losses, gradients and
    the final parameters must agree."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9)
    opt_ref = torch.optim.SGD(params.values(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(123)
    losses = []
    for step in range(steps):
        x = inputs[step % len(inputs)]
        y = layer(x)
        y_ref = ref_fn(params, x)
        torch.testing.assert_close(y, y_ref, **TOL)
        target = torch.randn(y.shape, generator=gen, dtype=y.dtype)
        loss, loss_ref = ((y - target) ** 2).mean(), ((y_ref - target) ** 2).mean()
        torch.testing.assert_close(loss, loss_ref, **TOL)
        opt.zero_grad()
        opt_ref.zero_grad()
        loss.backward()
        loss_ref.backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().max() > 0, f"no gradient for {name}"
            torch.testing.assert_close(p.grad, params[name].grad, **TOL, msg=name)
        opt.step()
        opt_ref.step()
        losses.append(loss.item())
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p, params[name], **TOL, msg=name)
    return losses


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------
# HyenaFilter
# ---------------------------------------------------------------------------------------


class _FilterAsLayer(torch.nn.Module):
    """A HyenaFilter driven by an input tensor (its length) for train_side_by_side."""

    def __init__(self, filt):
        super().__init__()
        self.f = filt

    def forward(self, x):
        return self.f(x.shape[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"emb_dim": 7, "w": 3.0, "fast_decay_pct": 0.1, "slow_decay_pct": 2.0, "target": 1e-3},
        {"modulate": False},
        {"shift": 0.25, "order": 8},
    ],
    ids=["default", "bands", "unmodulated", "shift"],
)
def test_hyena_filter_trains_like_reference(kwargs):
    torch.manual_seed(0)
    max_length = 40
    filt = tokenmix.nn.HyenaFilter(6, max_length, **kwargs).double()
    perturb_(filt)
    ref_kw = {
        "max_length": max_length,
        "emb_dim": kwargs.get("emb_dim", 3),
        "fast": kwargs.get("fast_decay_pct", 0.3),
        "slow": kwargs.get("slow_decay_pct", 1.5),
        "target": kwargs.get("target", 1e-2),
        "modulate": kwargs.get("modulate", True),
        "shift": kwargs.get("shift", 0.0),
        "prefix": "f.",
    }
    lengths = [torch.empty(n) for n in (40, 17, 1)]
    train_side_by_side(
        _FilterAsLayer(filt), lambda p, x: ref_hyena_filter(p, x.shape[0], **ref_kw), lengths
    )


def test_hyena_filter_prefix_and_decay():
    torch.manual_seed(0)
    filt = tokenmix.nn.HyenaFilter(8, 64).double()
    full = filt(64)
    assert full.shape == (8, 64)
    torch.testing.assert_close(filt(10), full[:, :10], **TOL)
    window = filt.decay_window(64)
    # Channel 0 decays slowest, the last channel fastest; the fastest reaches the target at
    # t = fast_decay_pct.
    assert (window[0, 1:] > window[-1, 1:]).all()
    torch.testing.assert_close(window[:, 0], torch.ones(8, dtype=torch.float64), **TOL)
    expected = math.exp(math.log(1e-2) / 0.3 * 63 / 63)
    torch.testing.assert_close(window[-1, -1].item(), expected, **TOL)
    assert filt.positional_encoding(64)[1].shape == (64, 3)
    assert tokenmix.nn.HyenaFilter(8, 1)(1).shape == (8, 1)


# ---------------------------------------------------------------------------------------
# HyenaOperator
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "order,causal,short",
    [(2, True, 3), (1, False, 1), (3, True, 4)],
    ids=["order2-causal", "order1-circular", "order3-short4"],
)
def test_hyena_operator_trains_like_reference(order, causal, short):
    torch.manual_seed(1)
    d, max_length = 8, 24
    layer = tokenmix.nn.HyenaOperator(
        d, max_length, order=order, filter_order=16, short_filter_order=short, causal=causal
    ).double()
    perturb_(layer, scale=0.1)
    inputs = [randn(2, 24, d, seed=1), randn(3, 13, d, seed=2), randn(1, 1, d, seed=3)]
    train_side_by_side(
        layer,
        lambda p, x: ref_hyena_operator(
            p, x, d_model=d, order=order, max_length=max_length, causal=causal, short=short
        ),
        inputs,
    )


def test_hyena_operator_is_causal_and_dropout_only_in_training():
    torch.manual_seed(2)
    layer = tokenmix.nn.HyenaOperator(8, 32, dropout=0.5).double().eval()
    x = randn(2, 32, 8, seed=4)
    y = layer(x)
    x2 = x.clone()
    x2[:, 20:] += 1.0
    y2 = layer(x2)
    torch.testing.assert_close(y2[:, :20], y[:, :20], **TOL)
    assert (y2[:, 20:] - y[:, 20:]).abs().max() > 1e-3
    torch.testing.assert_close(layer(x), y, **TOL)
    layer.train()
    assert (layer(x) - y).abs().max() > 1e-6
    assert tokenmix.nn.HyenaOperator(8, 32).filters(32).shape == (2, 8, 32)


# ---------------------------------------------------------------------------------------
# FNetMixing, GlobalFilter2D, SpectralGate
# ---------------------------------------------------------------------------------------


def test_fnet_mixing_trains_like_reference():
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 10), tokenmix.nn.FNetMixing(), torch.nn.Linear(10, 6)
    ).double()
    assert list(tokenmix.nn.FNetMixing().parameters()) == []
    inputs = [randn(2, 15, 6, seed=5), randn(1, 8, 6, seed=6)]
    train_side_by_side(model, ref_fnet_model, inputs, lr=0.002)


@pytest.mark.parametrize("flat", [False, True], ids=["grid", "tokens"])
def test_global_filter_trains_like_reference(flat):
    torch.manual_seed(4)
    h, w, c = 5, 7, 6
    layer = tokenmix.nn.GlobalFilter2D(h, w, c).double()
    assert layer.weight.shape == (h, w // 2 + 1, c, 2)
    assert 0.01 < layer.weight.std().item() < 0.04
    perturb_(layer)
    shape = (2, h * w, c) if flat else (2, h, w, c)
    inputs = [randn(*shape, seed=7), randn(*shape, seed=8)]
    train_side_by_side(layer, lambda p, x: ref_global_filter(p, x, h, w), inputs, lr=0.5)


@pytest.mark.parametrize("activation", ["modrelu", None])
def test_spectral_gate_trains_like_reference(activation):
    torch.manual_seed(5)
    dim, heads, max_length = 12, 3, 20
    layer = tokenmix.nn.SpectralGate(dim, heads, max_length, activation=activation).double()
    assert layer.mlp[0].out_features == 4 and (layer.bias is None) == (activation is None)
    x = randn(2, 20, dim, seed=9)
    torch.testing.assert_close(layer(x), x, **TOL)  # identity at initialisation
    perturb_(layer)
    inputs = [x, randn(3, 13, dim, seed=10), randn(2, 1, dim, seed=11)]
    train_side_by_side(
        layer,
        lambda p, x: ref_spectral_gate(
            p, x, heads=heads, max_length=max_length, activation=activation
        ),
        inputs,
    )


# ---------------------------------------------------------------------------------------
# Low precision, docstrings
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_run_in_low_precision(dtype):
    torch.manual_seed(6)
    cases = [
        (tokenmix.nn.HyenaOperator(16, 64), (2, 50, 16)),
        (tokenmix.nn.FNetMixing(), (2, 50, 16)),
        (tokenmix.nn.GlobalFilter2D(6, 8, 16), (2, 6, 8, 16)),
        (tokenmix.nn.SpectralGate(16, 4, 64), (2, 50, 16)),
    ]
    for layer, shape in cases:
        x = torch.randn(shape, dtype=torch.float64)
        y64 = layer.double()(x)
        layer = layer.to(dtype)
        xl = x.to(dtype).requires_grad_(True)
        y = layer(xl)
        assert y.dtype == dtype and y.shape == x.shape
        y.float().square().sum().backward()
        assert xl.grad is not None and torch.isfinite(xl.grad).all()
        tol = 1e-4 if dtype == torch.float32 else 0.1
        torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol * y64.abs().max().item())


def test_docstring_examples():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(fft_modules, fft_modules.__name__)
    assert sum(len(t.examples) for t in tests) > 0
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------

nn = tokenmix.nn


@pytest.mark.parametrize(
    "build,error,match",
    [
        (lambda: nn.HyenaFilter(0, 8), ValueError, "channels"),
        (lambda: nn.HyenaFilter(4, 0), ValueError, "max_length"),
        (lambda: nn.HyenaFilter(4, 8, order=2.0), TypeError, "order"),
        (lambda: nn.HyenaFilter(4, 8, emb_dim=4), ValueError, "emb_dim"),
        (lambda: nn.HyenaFilter(4, 8, emb_dim=1), ValueError, "emb_dim"),
        (lambda: nn.HyenaFilter(4, 8, w="1"), TypeError, "w must"),
        (lambda: nn.HyenaFilter(4, 8, fast_decay_pct=0), ValueError, "fast_decay_pct"),
        (lambda: nn.HyenaFilter(4, 8, slow_decay_pct=-1), ValueError, "slow_decay_pct"),
        (lambda: nn.HyenaFilter(4, 8, target=1.0), ValueError, "target"),
        (lambda: nn.HyenaFilter(4, 8, target=0.0), ValueError, "target"),
        (lambda: nn.HyenaFilter(4, 8, modulate=1), TypeError, "modulate"),
        (lambda: nn.HyenaFilter(4, 8, shift=math.nan), ValueError, "shift"),
        (lambda: nn.HyenaFilter(4, 8)(9), ValueError, "length must be <= max_length"),
        (lambda: nn.HyenaFilter(4, 8)(0), ValueError, "length"),
        (lambda: nn.HyenaFilter(4, 8)(True), TypeError, "length"),
        (lambda: nn.HyenaOperator(0, 8), ValueError, "d_model"),
        (lambda: nn.HyenaOperator(4, True), TypeError, "max_length"),
        (lambda: nn.HyenaOperator(4, 8, order=0), ValueError, "order"),
        (lambda: nn.HyenaOperator(4, 8, filter_order=0), ValueError, "filter_order"),
        (lambda: nn.HyenaOperator(4, 8, dropout=1.0), ValueError, "dropout"),
        (lambda: nn.HyenaOperator(4, 8, short_filter_order=0), ValueError, "short_filter_order"),
        (lambda: nn.HyenaOperator(4, 8, causal="yes"), TypeError, "causal"),
        (lambda: nn.HyenaOperator(4, 8)(torch.randn(2, 9, 4)), ValueError, "max_length = 8"),
        (
            lambda: nn.HyenaOperator(4, 8)(torch.randn(2, 8, 5)),
            ValueError,
            r"x must be \[B, L, 4\]",
        ),
        (lambda: nn.HyenaOperator(4, 8)(torch.randn(8, 4)), ValueError, r"x must be \[B, L, 4\]"),
        (lambda: nn.HyenaOperator(4, 8)(torch.randn(2, 0, 4)), ValueError, "x must have at least"),
        (lambda: nn.HyenaOperator(4, 8)([1.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: nn.FNetMixing()(torch.randn(4, 4)), ValueError, r"x must be \[B, L, C\]"),
        (lambda: nn.FNetMixing()(None), TypeError, "x must be a torch.Tensor"),
        (lambda: nn.GlobalFilter2D(0, 4, 4), ValueError, "height"),
        (lambda: nn.GlobalFilter2D(4, 0, 4), ValueError, "width"),
        (lambda: nn.GlobalFilter2D(4, 4, 0), ValueError, "channels"),
        (lambda: nn.GlobalFilter2D(4, 4.0, 4), TypeError, "width"),
        (
            lambda: nn.GlobalFilter2D(4, 6, 3)(torch.randn(2, 6, 4, 3)),
            ValueError,
            r"\[B, 4, 6, 3\]",
        ),
        (lambda: nn.GlobalFilter2D(4, 6, 3)(torch.randn(2, 23, 3)), ValueError, r"\[B, 24, 3\]"),
        (lambda: nn.GlobalFilter2D(4, 6, 3)(torch.randn(2, 4, 6, 2)), ValueError, "x must be"),
        (lambda: nn.GlobalFilter2D(4, 6, 3)("x"), TypeError, "x must be a torch.Tensor"),
        (lambda: nn.SpectralGate(6, 4, 16), ValueError, "heads must divide dim"),
        (lambda: nn.SpectralGate(8, 0, 16), ValueError, "heads"),
        (lambda: nn.SpectralGate(0, 1, 16), ValueError, "dim"),
        (lambda: nn.SpectralGate(8, 2, 0), ValueError, "max_length"),
        (lambda: nn.SpectralGate(8, 2, 16, activation="gelu"), ValueError, "activation"),
        (lambda: nn.SpectralGate(8, 2, 16)(torch.randn(1, 17, 8)), ValueError, "max_length = 16"),
        (lambda: nn.SpectralGate(8, 2, 16)(torch.randn(1, 16, 4)), ValueError, r"\[B, L, 8\]"),
    ],
)
def test_errors_name_the_argument(build, error, match):
    with pytest.raises(error, match=match):
        build()
