"""The linear scans on a real CUDA device: tokenmix.linear_attention and delta_rule on CUDA
tensors run the kernels of tokenmix/cuda/linear_scan_kernels.h and delta_rule_kernels.h
(autograd included), against the float64 token-by-token recurrences, every dtype, variant,
varlen batches and states. Skipped (and
reported as skipped) on machines without a GPU, such as this project's build machines, where
tests/test_linear_scan_cuda_emulated.py runs the same kernel source on the SIMT emulator."""

from __future__ import annotations

import pytest
import tokenmix
import torch
import torch.nn.functional as F
from tokenmix.linear_scan import (
    delta_rule,
    functional,
    linear_attention,
    naive_delta_rule,
    naive_linear_attention,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not tokenmix._ops.build_info().get("cuda_built"),
    reason="needs a CUDA device and a tokenmix build with CUDA kernels",
)

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _inputs(b, t, h, kd, vd, dtype, decay, seed, n_seqs=None):
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = {"q": r(b, t, h, kd), "k": r(b, t, h, kd, scale=0.5), "v": r(b, t, h, vd)}
    if decay == "g":
        x["g"] = (-torch.rand(b, t, h, generator=gen, dtype=torch.float64) * 0.3).float()
    elif decay == "gk":
        x["gk"] = (-torch.rand(b, t, h, kd, generator=gen, dtype=torch.float64) * 0.3).float()
    elif decay == "g_gamma":
        x["g_gamma"] = (-torch.rand(h, generator=gen, dtype=torch.float64) * 0.3).float()
    x["initial_state"] = r(b if n_seqs is None else n_seqs, h, kd, vd).float()
    return x


def _run(x, cu):
    return linear_attention(
        x["q"],
        x["k"],
        x["v"],
        g=x.get("g"),
        gk=x.get("gk"),
        g_gamma=x.get("g_gamma"),
        initial_state=x["initial_state"],
        output_final_state=True,
        cu_seqlens=cu,
        scale=0.4,
    )


def _grads(x, cu, weights):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    o, s = (naive_linear_attention if x["q"].dtype == torch.float64 else linear_attention)(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        g=leaves.get("g"),
        gk=leaves.get("gk"),
        g_gamma=leaves.get("g_gamma"),
        initial_state=leaves["initial_state"],
        output_final_state=True,
        cu_seqlens=cu,
        scale=0.4,
    )
    loss = (o.double() * weights[0]).sum() + (s.double() * weights[1]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), s.detach(), dict(zip(leaves, grads, strict=True))


def _rel(got, ref):
    """Largest error relative to the largest reference value."""
    return ((got.cpu().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("decay", [None, "g", "g_gamma", "gk"])
@pytest.mark.parametrize("shape", [(2, 1000, 4, 64, 64), (1, 300, 2, 128, 96), (1, 65, 1, 256, 32)])
def test_linear_attention_matches_float64(dtype, decay, shape):
    host = _inputs(*shape, dtype, decay, seed=sum(shape))
    assert functional._fused(host["q"].cuda(), False, True)
    gen = torch.Generator().manual_seed(1)
    b, t, h, kd, vd = shape
    weights = (
        torch.randn(b, t, h, vd, generator=gen, dtype=torch.float64),
        torch.randn(b, h, kd, vd, generator=gen, dtype=torch.float64),
    )
    dev = {n: v.cuda() for n, v in host.items()}
    o, s, grads = _grads(dev, None, tuple(w.cuda() for w in weights))
    o_ref, s_ref, grads_ref = _grads({n: v.double() for n, v in host.items()}, None, weights)

    errors = {"out": _rel(o, o_ref), "state": _rel(s, s_ref)}
    errors.update({n: _rel(grads[n], grads_ref[n]) for n in grads})
    assert all(e < TOL[dtype] for e in errors.values()), errors


@pytest.mark.parametrize("decay", [None, "g", "gk"])
def test_varlen_matches_float64(decay):
    cu = torch.tensor([0, 1, 65, 130, 1000, 1003])
    host = _inputs(1, 1003, 3, 64, 48, torch.float32, decay, seed=7, n_seqs=5)
    weights = (torch.randn(1, 1003, 3, 48, dtype=torch.float64), torch.randn(5, 3, 64, 48))
    o, s, grads = _grads(
        {n: v.cuda() for n, v in host.items()}, cu.cuda(), tuple(w.double().cuda() for w in weights)
    )
    o_ref, s_ref, grads_ref = _grads(
        {n: v.double() for n, v in host.items()}, cu, tuple(w.double() for w in weights)
    )
    errors = {"out": _rel(o, o_ref), "state": _rel(s, s_ref)}
    errors.update({n: _rel(grads[n], grads_ref[n]) for n in grads})
    assert all(e < 2e-5 for e in errors.values()), errors


def test_backward_is_deterministic():
    host = _inputs(2, 700, 4, 64, 128, torch.bfloat16, "gk", seed=3)
    weights = (torch.randn(2, 700, 4, 128).cuda(), torch.randn(2, 4, 64, 128).cuda())
    dev = {n: v.cuda() for n, v in host.items()}
    first, second = _grads(dev, None, weights)[2], _grads(dev, None, weights)[2]
    for n in first:
        assert torch.equal(first[n], second[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("shape", [(2, 1000, 4, 64, 64), (1, 300, 2, 128, 96), (1, 65, 1, 256, 32)])
def test_delta_rule_matches_float64(dtype, gated, shape):
    b, t, h, kd, vd = shape
    host = _inputs(*shape, dtype, "g" if gated else None, seed=sum(shape) + 1)
    host["k"] = F.normalize(host["k"].double(), dim=-1).to(dtype)
    host["beta"] = torch.rand(b, t, h, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    weights = (
        torch.randn(b, t, h, vd, generator=gen, dtype=torch.float64),
        torch.randn(b, h, kd, vd, generator=gen, dtype=torch.float64),
    )

    def grads(x, w):
        leaves = {n: v.detach().clone().requires_grad_() for n, v in x.items()}
        fn = naive_delta_rule if x["q"].dtype == torch.float64 else delta_rule
        o, s = fn(
            leaves["q"],
            leaves["k"],
            leaves["v"],
            leaves["beta"],
            g=leaves.get("g"),
            initial_state=leaves["initial_state"],
            output_final_state=True,
            scale=0.4,
        )
        loss = (o.double() * w[0]).sum() + (s.double() * w[1]).sum()
        got = torch.autograd.grad(loss, list(leaves.values()))
        return o.detach(), s.detach(), dict(zip(leaves, got, strict=True))

    o, s, g = grads({n: v.cuda() for n, v in host.items()}, tuple(x.cuda() for x in weights))
    o_ref, s_ref, g_ref = grads({n: v.double() for n, v in host.items()}, weights)
    errors = {"out": _rel(o, o_ref), "state": _rel(s, s_ref)}
    errors.update({n: _rel(g[n], g_ref[n]) for n in g})
    assert all(e < TOL[dtype] for e in errors.values()), errors
