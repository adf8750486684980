"""Fused CPU scan kernels (torch.ops.tokenmix.linear_scan_* / delta_rule_*) against
the token-by-token recurrences of tokenmix.linear_scan.reference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from tokenmix.linear_scan import (
    delta_rule,
    fused_kernels_available,
    linear_attention,
    naive_delta_rule,
    naive_linear_attention,
)

pytestmark = pytest.mark.skipif(
    not fused_kernels_available(),
    reason="fused kernels not built",  # never true in CI
)

TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 2e-2}


def _inputs(b, t, h, kd, vd, dtype, decay, seed, n_seqs=None, strong=False):
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = {"q": r(b, t, h, kd), "k": r(b, t, h, kd, scale=0.5), "v": r(b, t, h, vd)}
    rate = 5.0 if strong else 0.3
    if decay == "g":
        x["g"] = (-torch.rand(b, t, h, generator=gen, dtype=torch.float64) * rate).to(dtype)
    elif decay == "gk":
        x["gk"] = (-torch.rand(b, t, h, kd, generator=gen, dtype=torch.float64) * rate).to(dtype)
    elif decay == "g_gamma":
        x["g_gamma"] = (-torch.rand(h, generator=gen, dtype=torch.float64) * rate).to(dtype)
    n = b if n_seqs is None else n_seqs
    x["initial_state"] = r(n, h, kd, vd).to(
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    return x


def _grads(fn, x, g_out, g_state):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    o, s = fn(leaves)
    loss = (o.float() * g_out).sum() + (s.float() * g_state).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return o.detach(), s.detach(), dict(zip(names, grads, strict=True))


def _compare(fused, naive, x, dtype, vd):
    o_ref, s_ref = naive({k: v.double() for k, v in x.items()})
    g_out = torch.randn(o_ref.shape, dtype=torch.float64).float()
    g_state = torch.randn(s_ref.shape, dtype=torch.float64).float()
    o, s, g = _grads(fused, x, g_out, g_state)
    o2, s2, g2 = _grads(lambda d: naive({k: v.double() for k, v in d.items()}), x, g_out, g_state)
    tol = TOL[dtype]

    def close(a, b, name):
        a, b = a.double(), b.double()
        err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        assert err < tol, f"{name}: relative error {err:.2e} > {tol:.0e}"

    close(o, o2, "out")
    close(s, s2, "final_state")
    for name in g:
        close(g[name], g2[name], f"grad {name}")


def _scan_fn(fn, cu=None):
    """Calls a linear-attention function (fused or naive) on an input dict."""
    return lambda d: fn(
        d["q"],
        d["k"],
        d["v"],
        g=d.get("g"),
        gk=d.get("gk"),
        g_gamma=d.get("g_gamma"),
        initial_state=d["initial_state"],
        output_final_state=True,
        cu_seqlens=cu,
        scale=0.4,
    )


def _linear(x, cu=None):
    return _scan_fn(linear_attention, cu)


def _naive_linear(cu=None):
    return _scan_fn(naive_linear_attention, cu)


def _delta(fn, **options):
    """Calls a delta-rule function (fused or naive) on an input dict."""
    return lambda d: fn(
        d["q"],
        d["k"],
        d["v"],
        d["beta"],
        g=d.get("g"),
        initial_state=d["initial_state"],
        output_final_state=True,
        **options,
    )


@pytest.mark.parametrize("t", [1, 2, 63, 64, 65, 200])
@pytest.mark.parametrize("decay", [None, "g", "gk", "g_gamma"])
def test_linear_scan_matches_recurrence(t, decay):
    x = _inputs(2, t, 2, 24, 40, torch.float64, decay, seed=t)
    _compare(_linear(x), _naive_linear(), x, torch.float64, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decay", [None, "g", "gk"])
def test_linear_scan_dtypes(dtype, decay):
    x = _inputs(1, 130, 2, 16, 16, dtype, decay, seed=3)
    _compare(_linear(x), _naive_linear(), x, dtype, 16)


@pytest.mark.parametrize("decay", [None, "g", "gk"])
def test_linear_scan_varlen(decay):
    cu = torch.tensor([0, 1, 65, 66, 200, 203])
    x = _inputs(1, 203, 2, 8, 12, torch.float64, decay, seed=7, n_seqs=5)
    _compare(_linear(x, cu), _naive_linear(cu), x, torch.float64, 12)


@pytest.mark.parametrize("t", [1, 63, 64, 65, 150])
@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_matches_recurrence(t, gated):
    x = _inputs(2, t, 2, 24, 40, torch.float64, "g" if gated else None, seed=t + 1)
    x["k"] = F.normalize(x["k"], dim=-1)
    x["beta"] = torch.rand(2, t, 2, dtype=torch.float64)

    fused, naive = _delta(delta_rule, scale=0.4), _delta(naive_delta_rule, scale=0.4)

    _compare(fused, naive, x, torch.float64, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_rule_varlen_and_dtypes(dtype):
    cu = torch.tensor([0, 1, 64, 140])
    x = _inputs(1, 140, 2, 16, 8, dtype, "g", seed=11, n_seqs=3)
    x["k"] = F.normalize(x["k"].float(), dim=-1).to(dtype)
    x["beta"] = torch.rand(1, 140, 2).to(dtype)

    fused, naive = _delta(delta_rule, cu_seqlens=cu), _delta(naive_delta_rule, cu_seqlens=cu)

    _compare(fused, naive, x, dtype, 8)


def test_gradcheck_fp64():
    torch.manual_seed(0)
    q, k = (
        torch.randn(1, 70, 1, 4, dtype=torch.float64),
        torch.randn(1, 70, 1, 4, dtype=torch.float64),
    )
    v = torch.randn(1, 70, 1, 3, dtype=torch.float64)
    gk = -torch.rand(1, 70, 1, 4, dtype=torch.float64)
    beta, g = torch.rand(1, 70, 1, dtype=torch.float64), -torch.rand(1, 70, 1, dtype=torch.float64)
    h0 = torch.randn(1, 1, 4, 3, dtype=torch.float64)
    args = [t.requires_grad_() for t in (q, k, v, gk, h0)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, gk, h0: torch.ops.tokenmix.linear_scan_forward(
            q, k, v, None, gk, h0, None, 0.5
        ),
        args,
    )
    kn = F.normalize(k.detach(), dim=-1).requires_grad_()
    args = [q, kn, v, beta.requires_grad_(), g.requires_grad_(), h0]
    assert torch.autograd.gradcheck(
        lambda q, k, v, b, g, h0: torch.ops.tokenmix.delta_rule_forward(
            q, k, v, b, g, h0, None, 0.5
        ),
        args,
    )


def test_opcheck():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 20, 2, 8), torch.randn(1, 20, 2, 8), torch.randn(1, 20, 2, 4)
    g, gk = -torch.rand(1, 20, 2), -torch.rand(1, 20, 2, 8)
    beta, h0 = torch.rand(1, 20, 2), torch.randn(2, 2, 8, 4)
    cu = torch.tensor([0, 7, 20])
    for args in [(q, k, v, g, None, None, None, 0.3), (q, k, v, None, gk, h0, cu, 0.3)]:
        torch.library.opcheck(torch.ops.tokenmix.linear_scan_forward, args)
    for args in [(q, k, v, beta, g, h0, cu, 0.3), (q, k, v, beta, None, None, None, 0.3)]:
        torch.library.opcheck(torch.ops.tokenmix.delta_rule_forward, args)
    o = torch.randn(1, 20, 2, 4)
    torch.library.opcheck(
        torch.ops.tokenmix.linear_scan_backward, (o, None, q, k, v, g, None, None, None, 0.3)
    )
    torch.library.opcheck(
        torch.ops.tokenmix.delta_rule_backward,
        (o, torch.randn(2, 2, 8, 4), q, k, v, beta, g, h0, cu, 0.3),
    )


def test_compile_fullgraph_matches_eager():
    def f(q, k, v, g):
        o, s = linear_attention(q, k, v, g=g, output_final_state=True)
        return o.sum(-1) + s.sum()

    torch.manual_seed(0)
    x = [torch.randn(1, 80, 2, 8, requires_grad=True) for _ in range(3)]
    g = (-torch.rand(1, 80, 2)).requires_grad_()
    want = torch.autograd.grad(f(*x, g).sum(), [*x, g])
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*x, g).sum(), [*x, g])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_strong_decay_long_sequence_is_finite_and_consistent():
    # T = 100k with strong decays: chunk-local accumulation never overflows, and the
    # state after the scan equals a scan of just the tail from the carried state.
    torch.manual_seed(0)
    t = 100_000
    q, k, v = torch.randn(1, t, 1, 8), torch.randn(1, t, 1, 8), torch.randn(1, t, 1, 8)
    for kw in ({"g": torch.full((1, t, 1), -5.0)}, {"gk": torch.full((1, t, 1, 8), -5.0)}):
        o, s = torch.ops.tokenmix.linear_scan_forward(
            q, k, v, kw.get("g"), kw.get("gk"), None, None, 0.3
        )
        assert torch.isfinite(o).all() and torch.isfinite(s).all()
        # with decay e^-5 per step, the last output depends on the last few tokens only
        o_tail, _ = naive_linear_attention(
            q[:, -30:],
            k[:, -30:],
            v[:, -30:],
            scale=0.3,
            **{n: x[:, -30:] for n, x in kw.items()},
        )
        torch.testing.assert_close(o[:, -1], o_tail[:, -1], rtol=1e-4, atol=1e-4)
    beta = torch.rand(1, t, 1)
    kn = F.normalize(k, dim=-1)
    o, s = torch.ops.tokenmix.delta_rule_forward(
        q, kn, v, beta, torch.full((1, t, 1), -5.0), None, None, 0.3
    )
    assert torch.isfinite(o).all() and torch.isfinite(s).all()


def test_backward_deterministic():
    torch.manual_seed(0)
    x = [torch.randn(1, 300, 4, 16, requires_grad=True) for _ in range(3)]
    g = (-torch.rand(1, 300, 4, 16)).requires_grad_()

    def grads():
        o, _ = linear_attention(*x, gk=g)
        return torch.autograd.grad(o.sum(), [*x, g])

    for a, b in zip(grads(), grads(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_forced_instruction_set(isa):
    if isa == "avx2" and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("CPU without AVX2")
    code = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        from tokenmix.linear_scan import linear_attention, naive_linear_attention
        from tokenmix.linear_scan import delta_rule, naive_delta_rule
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 100, 2, 12, dtype=torch.float64) for _ in range(3))
        gk = -torch.rand(1, 100, 2, 12, dtype=torch.float64)
        a, _ = linear_attention(q, k, v, gk=gk)
        b, _ = naive_linear_attention(q, k, v, gk=gk)
        assert (a - b).abs().max() < 1e-9
        beta = torch.rand(1, 100, 2, dtype=torch.float64)
        kn = F.normalize(k, dim=-1)
        a, _ = delta_rule(q, kn, v, beta, g=gk[..., 0])
        b, _ = naive_delta_rule(q, kn, v, beta, g=gk[..., 0])
        assert (a - b).abs().max() < 1e-9
        print(int(torch.ops.tokenmix.cpu_isa()))
        """
    )
    env = dict(os.environ, TOKENMIX_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == {"generic": "0", "avx2": "1"}[isa]


def test_double_backward_raises_instead_of_silently_wrong():
    q = torch.randn(1, 70, 2, 4, dtype=torch.float64, requires_grad=True)
    beta = torch.rand(1, 70, 2, dtype=torch.float64)
    for fn in (
        lambda: linear_attention(q, q, q, g=-torch.rand(1, 70, 2, dtype=torch.float64))[0],
        lambda: delta_rule(q, F.normalize(q, dim=-1), q, beta)[0],
    ):
        (g,) = torch.autograd.grad(fn().pow(2).sum(), q, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(g.sum(), q)


@pytest.mark.parametrize("decay", [None, "g", "gk", "g_gamma"])
def test_linear_scan_t1000(decay):
    x = _inputs(1, 1000, 1, 8, 8, torch.float64, decay, seed=1000)
    _compare(_linear(x), _naive_linear(), x, torch.float64, 8)


@pytest.mark.parametrize("t", [2, 1000])
@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_more_lengths(t, gated):
    x = _inputs(1, t, 1, 8, 8, torch.float64, "g" if gated else None, seed=t + 7)
    x["k"] = F.normalize(x["k"], dim=-1)
    x["beta"] = torch.rand(1, t, 1, dtype=torch.float64)

    fused, naive = _delta(delta_rule), _delta(naive_delta_rule)

    _compare(fused, naive, x, torch.float64, 8)


@pytest.mark.parametrize("decay", ["g", "gk"])
def test_strong_decay_gradients_match_recurrence(decay):
    # log decays of -5 per token: every factor e^{G_i - G_j} spans 0 .. 1 within a chunk
    x = _inputs(1, 150, 2, 8, 8, torch.float64, decay, seed=5, strong=True)
    _compare(_linear(x), _naive_linear(), x, torch.float64, 8)


def test_strong_decay_long_sequence_backward_is_finite():
    torch.manual_seed(0)
    t = 100_000
    q, k, v = (torch.randn(1, t, 1, 8, requires_grad=True) for _ in range(3))
    for kw in ({"g": torch.full((1, t, 1), -5.0)}, {"gk": torch.full((1, t, 1, 8), -5.0)}):
        gates = {n: x.clone().requires_grad_() for n, x in kw.items()}
        o, s = linear_attention(q, k, v, output_final_state=True, **gates)
        grads = torch.autograd.grad(o.sum() + s.sum(), [q, k, v, *gates.values()])
        assert all(torch.isfinite(g_).all() for g_ in grads)
    beta = torch.rand(1, t, 1)
    g = torch.full((1, t, 1), -5.0, requires_grad=True)
    kn = F.normalize(k.detach(), dim=-1).requires_grad_()
    o, _ = delta_rule(q, kn, v, beta, g=g)
    grads = torch.autograd.grad(o.sum(), [q, kn, v, g])
    assert all(torch.isfinite(g_).all() for g_ in grads)


def test_compile_fullgraph_with_cu_seqlens():
    # Packed variable-length batches compile too: offsets are data, checked by the op.
    def f(q, k, v, beta, cu):
        o1, s1 = linear_attention(q, k, v, cu_seqlens=cu, output_final_state=True)
        o2, s2 = delta_rule(
            q, F.normalize(k, dim=-1), v, beta, cu_seqlens=cu, output_final_state=True
        )
        return o1 + o2, s1 + s2

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 70, 2, 8) for _ in range(3))
    beta, cu = torch.rand(1, 70, 2), torch.tensor([0, 5, 70])
    want = f(q, k, v, beta, cu)
    got = torch.compile(f, fullgraph=True)(q, k, v, beta, cu)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
