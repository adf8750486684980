"""Tests of the fused CPU neighborhood-attention kernel (``torch.ops.tokenmix.na_*``).

The kernel is compared against the pure-PyTorch reference run in float64 on the same
(dtype-rounded) inputs, against the independent brute-force oracle of
``tests/na_brute_force.py`` and against ``scaled_dot_product_attention`` where the
window covers everything. Every comparison runs the kernel on decoy inputs of the same
shapes first, so an output that is not rewritten on every call cannot pass.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap

import pytest
import tokenmix
import torch
import torch.nn.functional as F
from na_brute_force import brute_force_mask, brute_force_rpb_index, dense_attention, dense_rpb_bias
from na_cases import (
    assert_same_nonfinite,
    attend,
    make_cfg,
    make_inputs,
    poisoned,
    random_case,
    window_of,
)
from tokenmix.neighborhood.reference import neighborhood_attention_reference
from torch import nn

pytestmark = pytest.mark.skipif(
    tokenmix._ops.load_error is not None, reason="tokenmix's compiled library is not available"
)

# Max error relative to max(1, max |expected|) (see _rel_err).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp64", "fp32", "fp16", "bf16"]
HEAD_DIMS = [8, 12, 16, 24, 40, 64, 72, 128, 256]
NAMES = ("q", "k", "v", "rpb", "additional_keys", "additional_values")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def run_kernel(cfg, t, grad_out=None):
    """Public API forward (+ backward through torch.autograd.grad).

    Returns ``(out, lse, grads)`` with grads a name -> tensor dict. ``.grad`` fields are
    NaN-poisoned and must stay untouched by ``torch.autograd.grad``.
    """
    leaves = {
        n: x.detach().clone().requires_grad_(grad_out is not None)
        for n, x in t.items()
        if x is not None
    }
    for x in leaves.values():
        x.grad = torch.full_like(x, float("nan"))
    out, lse = attend(tokenmix.neighborhood_attention, cfg, leaves, return_lse=True)
    grads = {}
    if grad_out is not None:
        g = torch.autograd.grad(out, list(leaves.values()), grad_out)
        grads = dict(zip(leaves, g, strict=True))
        for x in leaves.values():
            assert torch.isnan(x.grad).all()
    return out.detach(), lse.detach(), grads


def run_reference(cfg, t, grad_out=None):
    """The reference in float64 on the same (rounded) inputs."""
    leaves = {
        n: x.detach().double().requires_grad_(grad_out is not None)
        for n, x in t.items()
        if x is not None
    }
    out, lse = attend(neighborhood_attention_reference, cfg, leaves, return_lse=True)
    grads = {}
    if grad_out is not None:
        g = torch.autograd.grad(out, list(leaves.values()), grad_out.double())
        grads = dict(zip(leaves, g, strict=True))
    return out.detach(), lse.detach(), grads


def _rel_err(got, want) -> float:
    if want.numel() == 0:
        return 0.0
    diff = (got.double() - want.double()).abs().max()
    return (diff / want.double().abs().max().clamp_min(1.0)).item()


def assert_close(got, want, dtype, what, tol=None):
    tol = TOL[dtype] if tol is None else tol
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {got.shape} != {want.shape}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = _rel_err(got, want)
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.1e}"


def check_against_reference(cfg, dtype, seed, grads=True):
    """Kernel vs the float64 reference: output, LSE and every gradient."""
    # A decoy call of the same shapes first: stale outputs/gradients cannot pass.
    out_shape = (cfg["batch"], *cfg["shape"], cfg["heads"], cfg["dim_v"])
    decoy = make_inputs(cfg, dtype, seed + 7919)
    d_grad = torch.ones(out_shape, dtype=dtype) if grads else None
    d_out, _, _ = run_kernel(cfg, decoy, d_grad)
    t = make_inputs(cfg, dtype, seed)
    g_out = None
    if grads:
        gen = torch.Generator().manual_seed(seed + 1)
        g_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype)
    out, lse, g = run_kernel(cfg, t, g_out)
    r_out, r_lse, r_g = run_reference(cfg, t, g_out)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and lse.dtype == acc
    assert tuple(lse.shape) == (cfg["batch"], *cfg["shape"], cfg["heads"])
    assert_close(out, r_out, dtype, "out")
    # The LSE is computed and stored in fp32 for every non-fp64 dtype.
    assert_close(lse, r_lse, dtype, "lse", tol=TOL[acc])
    if cfg["batch"] > 0 and out.numel() > 0:
        assert not torch.equal(out, d_out), "output did not change with the inputs"
    for name in r_g:
        assert g[name].dtype == t[name].dtype, name
        assert_close(g[name], r_g[name], dtype, f"grad {name}")


# --------------------------------------------------------------------------------------
# Randomized sweep
# --------------------------------------------------------------------------------------

GQA_CHOICES = [(1, 1), (2, 2), (4, 2), (6, 1), (32, 2), (3, 1), (6, 3)]


def random_cfg(seed):
    return random_case(seed, HEAD_DIMS, HEAD_DIMS[:6], GQA_CHOICES)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("seed", range(40))
def test_sweep(seed, dtype):
    check_against_reference(random_cfg(seed), dtype, seed)


# --------------------------------------------------------------------------------------
# Targeted code paths
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("dim", HEAD_DIMS)
def test_head_dims(dim, dtype):
    # Same dtype, no extra tokens: K/V read in place when dim is a multiple of the
    # SIMD width, converted otherwise.
    cfg = make_cfg((7, 6), (3, 4), heads=2, dim=dim, rpb=True)
    check_against_reference(cfg, dtype, dim)
    # Dv != D and extra tokens: always the converted copy.
    dim_v = 24 if dim != 24 else 40
    cfg = make_cfg((9,), 4, stride=2, heads=2, dim=dim, dim_v=dim_v, n_extra=3)
    check_against_reference(cfg, dtype, dim + 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("dim", [8, 12, 64, 72])
def test_head_dims_half(dim, dtype):
    cfg = make_cfg((6, 5), 3, heads=2, dim=dim, dim_v=dim if dim != 12 else 40, rpb=True)
    check_against_reference(cfg, dtype, dim)


@pytest.mark.parametrize("extra", [False, True], ids=["plain", "rpb+extra"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads,heads_kv", [(4, 2), (6, 1), (32, 2), (20, 1)])
def test_gqa(heads, heads_kv, dtype, extra):
    # Group sizes 2, 6 (MQA), 16 and 20: the last two fill / exceed a SIMD vector.
    cfg = make_cfg(
        (6, 7),
        (3, 4),
        causal=(False, True),
        heads=heads,
        heads_kv=heads_kv,
        dim=16,
        rpb=extra,
        n_extra=3 if extra else None,
    )
    check_against_reference(cfg, dtype, heads * 10 + heads_kv)


WINDOW_CASES = [
    # (shape, kernel, stride, dilation, causal)
    ((37,), 7, 1, 1, False),
    ((37,), 6, 6, 1, False),  # blocked, length not a multiple of the kernel
    ((37,), 5, 3, 3, True),
    ((40,), 8, 8, 2, True),
    ((11, 13), (4, 3), (2, 3), (2, 1), (True, False)),
    ((9, 10), (3, 5), (3, 5), 1, (False, True)),  # blocked 2-D
    ((5, 7, 6), (2, 3, 3), (2, 1, 3), (2, 1, 1), (False, True, False)),
    ((4, 5, 9), (3, 4, 2), (1, 4, 2), (1, 1, 3), (True, False, True)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=[str(i) for i in range(len(WINDOW_CASES))])
def test_window_cases(case, dtype):
    shape, kernel, stride, dilation, causal = case
    cfg = make_cfg(
        shape,
        kernel,
        stride,
        dilation,
        causal,
        heads=4,
        heads_kv=2,
        dim=12,
        dim_v=16,
        batch=2,
        rpb=True,
        n_extra=2,
    )
    check_against_reference(cfg, dtype, len(shape))


def test_zero_extra_tokens():
    cfg = make_cfg((10,), 3, n_extra=0, rpb=True)
    check_against_reference(cfg, torch.float32, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_many_extra_tokens(dtype):
    # More additional tokens than one chunk of keys.
    cfg = make_cfg((12,), 3, heads=2, dim=16, n_extra=200)
    check_against_reference(cfg, dtype, 3)


@pytest.mark.parametrize(
    "cfg",
    [
        make_cfg((300,), 200, heads=1, dim=16),
        make_cfg((300,), 200, causal=True, heads=2, heads_kv=1, dim=16, rpb=True),
        make_cfg((300,), 200, stride=100, heads=1, dim=24, n_extra=3, rpb=True),
        make_cfg((20, 20), 13, heads=1, dim=16, rpb=True),  # 169 keys / query
    ],
    ids=["1d", "1d-causal-gqa-rpb", "1d-stride-extra", "2d-13x13"],
)
def test_chunked_windows(cfg):
    # More than 128 keys per query tile: the keys are visited in several chunks.
    check_against_reference(cfg, torch.float32, 11)


_CAUSAL_LAST_DIM_SCRIPT = textwrap.dedent(
    """
    import torch, tokenmix
    from tokenmix.neighborhood.reference import neighborhood_attention_reference as ref
    torch.manual_seed(0)
    shape, kernel, causal = (150, 3), (140, 2), (False, True)
    q, k, v = (torch.randn(1, *shape, 1, 16, requires_grad=True) for _ in range(3))
    out = tokenmix.na2d(q, k, v, kernel, is_causal=causal)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = ref(qd, kd, vd, kernel, (1, 1), (1, 1), causal)
    gw = torch.autograd.grad(want.sum(), (qd, kd, vd))
    err = max([(out.double() - want).abs().max().item()]
              + [(a.double() - b).abs().max().item() for a, b in zip(g, gw)])
    print("MAXERR", err)
    """
)


def test_causal_last_dim_many_key_rows():
    # Causal last dimension: the tile at last-dim coordinate 0 sees exactly one key
    # column per key row, and a long first dimension gives it more than 128 such rows
    # (140 + tile - 1). Runs in a subprocess because a kernel fault would kill pytest.
    proc = subprocess.run(
        [sys.executable, "-c", _CAUSAL_LAST_DIM_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"kernel crashed (rc {proc.returncode}): {proc.stderr[-2000:]}{proc.stdout[-500:]}"
    )
    err = float(proc.stdout.split("MAXERR")[-1])
    assert err < 1e-4, err


# --------------------------------------------------------------------------------------
# Independent oracles: brute-force mask and SDPA
# --------------------------------------------------------------------------------------

BRUTE_CASES = [
    make_cfg((11,), 4, 2, 2, True, heads=2, dim=8, rpb=True, n_extra=2),
    make_cfg((9,), 5, 5, 1, False, heads=4, heads_kv=2, dim=12, dim_v=8, rpb=True),
    make_cfg((6, 7), (3, 2), (1, 2), (2, 1), (False, True), heads=2, dim=16, rpb=True),
    make_cfg(
        (4, 5, 4),
        (2, 3, 2),
        (2, 1, 1),
        1,
        (True, False, False),
        heads=3,
        heads_kv=1,
        dim=8,
        rpb=True,
        n_extra=1,
    ),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cfg", BRUTE_CASES, ids=["1d", "1d-blocked", "2d", "3d"])
def test_brute_force_oracle(cfg, dtype):
    t = make_inputs(cfg, dtype, 5)
    mask = brute_force_mask(cfg["shape"], *window_of(cfg))
    bias_index = brute_force_rpb_index(cfg["shape"], *window_of(cfg))
    g_out = torch.randn(
        (cfg["batch"], *cfg["shape"], cfg["heads"], cfg["dim_v"]), dtype=torch.float64
    ).to(dtype)
    out, lse, grads = run_kernel(cfg, t, g_out)

    leaves = {n: x.double().requires_grad_() for n, x in t.items() if x is not None}
    scale = cfg["dim"] ** -0.5
    bias = dense_rpb_bias(leaves["rpb"], bias_index) if cfg["rpb"] else None
    want, want_lse = dense_attention(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        mask,
        scale,
        bias,
        leaves.get("additional_keys"),
        leaves.get("additional_values"),
    )
    want_grads = torch.autograd.grad(want, list(leaves.values()), g_out.double())
    assert_close(out, want, dtype, "out")
    assert_close(lse, want_lse, dtype, "lse")
    for name, wg in zip(leaves, want_grads, strict=True):
        assert_close(grads[name], wg, dtype, f"grad {name}")


def _sdpa(q, k, v, is_causal=False):
    """SDPA over flattened tokens with heads-last tensors (GQA by repetition)."""
    b, h, hkv = q.shape[0], q.shape[-2], k.shape[-2]
    qf = q.reshape(b, -1, h, q.shape[-1]).transpose(1, 2)
    kf = k.reshape(b, -1, hkv, k.shape[-1]).transpose(1, 2).repeat_interleave(h // hkv, 1)
    vf = v.reshape(b, -1, hkv, v.shape[-1]).transpose(1, 2).repeat_interleave(h // hkv, 1)
    out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=is_causal)
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", [(13,), (5, 6), (3, 4, 5)], ids=["1d", "2d", "3d"])
def test_full_window_is_full_attention(shape, dtype):
    gen = torch.Generator().manual_seed(len(shape))
    q = torch.randn(2, *shape, 4, 16, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(2, *shape, 2, 16, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(2, *shape, 2, 24, generator=gen, dtype=dtype, requires_grad=True)
    out = tokenmix.neighborhood_attention(q, k, v, kernel_size=shape)
    want = _sdpa(q, k, v)
    g_out = torch.randn_like(want)
    grads = torch.autograd.grad(out, (q, k, v), g_out)
    want_grads = torch.autograd.grad(want, (q, k, v), g_out)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_close(out, want, dtype, "out", tol)
    for name, a, b in zip("qkv", grads, want_grads, strict=True):
        assert_close(a, b, dtype, f"grad {name}", tol)


def test_causal_full_window_is_causal_attention():
    q, k, v = (torch.randn(1, 21, 2, 16, dtype=torch.float64) for _ in range(3))
    out = tokenmix.na1d(q, k, v, kernel_size=21, is_causal=True)
    assert_close(out, _sdpa(q, k, v, is_causal=True), torch.float64, "out")


# --------------------------------------------------------------------------------------
# Autograd: gradcheck, accumulation, partial requires_grad
# --------------------------------------------------------------------------------------

GRADCHECK_CASES = {
    "1d": make_cfg((7,), 3, heads=2, dim=4),
    "2d-rpb-extra": make_cfg((5, 4), (3, 2), heads=2, dim=4, dim_v=3, rpb=True, n_extra=2),
    "3d": make_cfg((3, 4, 3), 2, heads=1, dim=4),
    "causal-dilation-stride": make_cfg(
        (10, 4), (3, 2), (2, 2), (2, 1), (True, False), heads=1, dim=3, rpb=True
    ),
    "gqa": make_cfg((6,), 3, heads=4, heads_kv=2, dim=4, rpb=True, n_extra=1),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck(name):
    cfg = GRADCHECK_CASES[name]
    t = make_inputs(cfg, torch.float64, 3)
    names = [n for n in NAMES if t[n] is not None]
    inputs = tuple(t[n].requires_grad_() for n in names)

    def fn(*xs):
        return attend(tokenmix.neighborhood_attention, cfg, dict(zip(names, xs, strict=True)))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_backward_accumulates_into_grad():
    cfg = make_cfg((8, 6), 3, heads=2, dim=16, rpb=True, n_extra=2)
    t = make_inputs(cfg, torch.float32, 1)
    g_out = torch.randn(1, 8, 6, 2, 16)
    _, _, want = run_kernel(cfg, t, g_out)
    leaves = {n: x.clone().requires_grad_() for n, x in t.items() if x is not None}
    for x in leaves.values():
        x.grad = torch.zeros_like(x)  # zeroed: backward must add, not overwrite garbage
    for _ in range(2):
        out = tokenmix.neighborhood_attention(
            leaves["q"],
            leaves["k"],
            leaves["v"],
            3,
            rpb=leaves["rpb"],
            additional_keys=leaves["additional_keys"],
            additional_values=leaves["additional_values"],
        )
        out.backward(g_out)
    for n, x in leaves.items():
        torch.testing.assert_close(x.grad, 2 * want[n], rtol=1e-5, atol=1e-6, msg=n)


def test_partial_requires_grad_and_bf16_rpb():
    cfg = make_cfg((9, 7), 3, heads=2, dim=16, rpb=True)
    t = make_inputs(cfg, torch.bfloat16, 2)
    rpb = t["rpb"].clone().requires_grad_()
    out = tokenmix.na2d(t["q"], t["k"], t["v"], 3, rpb=rpb)
    g_out = torch.randn_like(out)
    (g_rpb,) = torch.autograd.grad(out, rpb, g_out)
    assert g_rpb.dtype == torch.bfloat16
    _, _, r_g = run_reference(cfg, t, g_out)
    assert_close(g_rpb, r_g["rpb"], torch.bfloat16, "grad rpb")
    # Only v requires grad.
    v = t["v"].clone().requires_grad_()
    out = tokenmix.na2d(t["q"], t["k"], v, 3, rpb=t["rpb"])
    (g_v,) = torch.autograd.grad(out, v, g_out)
    assert_close(g_v, r_g["v"], torch.bfloat16, "grad v")


def test_lse_dtype_and_return_types():
    for dtype, acc in [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ]:
        q = torch.randn(1, 6, 5, 2, 8, dtype=dtype)
        out = tokenmix.na2d(q, q, q, 3)
        assert isinstance(out, torch.Tensor) and out.dtype == dtype
        out2, lse = tokenmix.na2d(q, q, q, 3, return_lse=True)
        assert torch.equal(out, out2)
        assert lse.dtype == acc and lse.shape == (1, 6, 5, 2)


# --------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile
# --------------------------------------------------------------------------------------


def _opcheck_samples():
    gen = torch.Generator().manual_seed(0)

    def r(*s, dtype=torch.float32, grad=False):
        return torch.randn(*s, generator=gen, dtype=dtype).requires_grad_(grad)

    plain = (
        r(1, 8, 2, 8, grad=True),
        r(1, 8, 2, 8, grad=True),
        r(1, 8, 2, 8, grad=True),
        None,
        None,
        None,
        [3],
        [1],
        [1],
        [0],
        0.35,
    )
    d = torch.float64
    full = (
        r(2, 5, 4, 4, 8, dtype=d, grad=True),
        r(2, 5, 4, 2, 8, dtype=d, grad=True),
        r(2, 5, 4, 2, 6, dtype=d, grad=True),
        r(4, 5, 3, dtype=d, grad=True),
        r(2, 3, 2, 8, dtype=d, grad=True),
        r(2, 3, 2, 6, dtype=d, grad=True),
        [3, 2],
        [2, 1],
        [1, 2],
        [1, 0],
        0.3,
    )
    return {"plain": plain, "rpb-extra-gqa": full}


@pytest.mark.parametrize("sample", ["plain", "rpb-extra-gqa"])
def test_opcheck_forward(sample):
    torch.library.opcheck(torch.ops.tokenmix.na_forward, _opcheck_samples()[sample])


@pytest.mark.parametrize("sample", ["plain", "rpb-extra-gqa"])
def test_opcheck_backward(sample):
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _opcheck_samples()[sample]]
    q, k, v, rpb, ak, av, *window = args
    out, lse = torch.ops.tokenmix.na_forward(*args)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.tokenmix.na_backward, (grad_out, q, k, v, out, lse, rpb, ak, av, *window)
    )


def test_opcheck_backward_permuted_q():
    # q a dense but permuted view (heads-first storage): autograd hands it to
    # na_backward as is. The real op returns a contiguous dq; the fake kernel must
    # predict the same strides.
    base = torch.randn(1, 2, 8, 8, dtype=torch.float64)  # [B, H, L, D]
    q = base.permute(0, 2, 1, 3)
    k, v = (
        torch.randn(1, 8, 2, 8, dtype=torch.float64),
        torch.randn(1, 8, 2, 8, dtype=torch.float64),
    )
    window = ([3], [1], [1], [0], 0.3)
    out, lse = torch.ops.tokenmix.na_forward(q, k, v, None, None, None, *window)
    args = (torch.randn_like(out), q, k, v, out, lse, None, None, None, *window)
    torch.library.opcheck(torch.ops.tokenmix.na_backward, args)


class _Block(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = tokenmix.nn.NeighborhoodAttention2D(
            dim, 4, (3, 5), num_kv_heads=2, rel_pos_bias=True
        )
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _Block()
    x = torch.randn(2, 6, 7, 32, requires_grad=True)
    g_out = torch.randn(2, 6, 7, 32)
    params = [x, *model.parameters()]
    want = model(x)
    want_grads = torch.autograd.grad(want, params, g_out)
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(x)
    got_grads = torch.autograd.grad(got, params, g_out)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_permuted_query_backward():
    # The user-facing consequence of a wrong fake na_backward: a compiled function that
    # takes q as a permuted view of a heads-first tensor must still backprop.
    def f(x, k, v):
        q = x.permute(0, 2, 1, 3)
        return tokenmix.na1d(q, k, v, 5).sin()

    torch.manual_seed(1)
    x = torch.randn(1, 2, 12, 16, requires_grad=True)
    k, v = (torch.randn(1, 12, 2, 16, requires_grad=True) for _ in range(2))
    g_out = torch.randn(1, 12, 2, 16)
    want_grads = torch.autograd.grad(f(x, k, v), (x, k, v), g_out)
    got_grads = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, k, v), (x, k, v), g_out)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Layouts: non-contiguous inputs, empty batch
# --------------------------------------------------------------------------------------


def _na_with_grads(q, k, v, leaves, g_out, **kw):
    out = tokenmix.neighborhood_attention(q, k, v, **kw)
    return out, torch.autograd.grad(out, leaves, g_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_fused_qkv_views(dtype):
    qkv = torch.randn(2, 7, 9, 3, 4, 16, dtype=dtype, requires_grad=True)
    g_out = torch.randn(2, 7, 9, 4, 16, dtype=dtype)
    q, k, v = qkv.unbind(dim=-3)
    out, (g,) = _na_with_grads(q, k, v, [qkv], g_out, kernel_size=(3, 5), rpb=None)
    ref_leaves = [x.detach().contiguous().requires_grad_() for x in (q, k, v)]
    want, want_g = _na_with_grads(*ref_leaves, ref_leaves, g_out, kernel_size=(3, 5))
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, torch.stack(want_g, dim=-3), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"]
)
def test_strided_views(dtype):
    gen = torch.Generator().manual_seed(4)

    def r(*s):
        return torch.randn(*s, generator=gen).to(dtype).requires_grad_()

    qh = r(2, 4, 6, 5, 16)  # heads-first [B, H, X, Y, D]
    kt = r(2, 5, 6, 2, 16)  # spatial dims swapped
    vw = r(2, 6, 5, 2, 72)  # feature stride 3 after slicing
    ak = r(2, 2, 3, 16)  # [B, H_kv, N, D]
    av = r(1, 3, 2, 24)  # expanded over the batch
    rpb = r(4, 9, 5)  # transposed below
    q = qh.permute(0, 2, 3, 1, 4)
    k = kt.transpose(1, 2)
    v = vw[..., ::3]
    ak_v = ak.transpose(1, 2)
    av_v = av.expand(2, 3, 2, 24)
    rpb_v = rpb.transpose(1, 2)
    kw = dict(kernel_size=(3, 5), stride=(1, 2), is_causal=(True, False))
    g_out = torch.randn(2, 6, 5, 4, 24, generator=gen).to(dtype)
    leaves = [qh, kt, vw, ak, av, rpb]
    out, grads = _na_with_grads(
        q, k, v, leaves, g_out, rpb=rpb_v, additional_keys=ak_v, additional_values=av_v, **kw
    )
    views = (q, k, v, ak_v, av_v, rpb_v)
    contig = [x.detach().contiguous().requires_grad_() for x in views]
    want, want_grads = _na_with_grads(
        *contig[:3],
        contig,
        g_out,
        rpb=contig[5],
        additional_keys=contig[3],
        additional_values=contig[4],
        **kw,
    )
    tol = 1e-6 if dtype != torch.bfloat16 else 1e-2
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    # Map the contiguous gradients back onto the original leaves.
    mapped = [
        want_grads[0].permute(0, 3, 1, 2, 4),
        want_grads[1].transpose(1, 2),
        torch.zeros_like(vw).index_copy_(-1, torch.arange(0, 72, 3), want_grads[2]),
        want_grads[3].transpose(1, 2),
        want_grads[4].sum(0, keepdim=True),
        want_grads[5].transpose(1, 2),
    ]
    for i, (a, b) in enumerate(zip(grads, mapped, strict=True)):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=tol, atol=tol, msg=f"grad {i}")


def test_expanded_batch():
    q = torch.randn(3, 10, 2, 16, requires_grad=True)
    kv = torch.randn(1, 10, 2, 16, requires_grad=True)
    g_out = torch.randn(3, 10, 2, 16)
    out, (gq, gkv) = _na_with_grads(
        q, kv.expand(3, -1, -1, -1), kv.expand(3, -1, -1, -1), [q, kv], g_out, kernel_size=4
    )
    kvc = kv.detach().expand(3, -1, -1, -1).contiguous().requires_grad_()
    want, (wq, wk) = _na_with_grads(q, kvc, kvc, [q, kvc], g_out, kernel_size=4)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gq, wq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gkv, wk.sum(0, keepdim=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(9,), (5, 6)], ids=["1d", "2d"])
def test_empty_batch(shape, dtype):
    rank = len(shape)
    q = torch.randn(0, *shape, 4, 8, dtype=dtype, requires_grad=True)
    k = torch.randn(0, *shape, 2, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(0, *shape, 2, 12, dtype=dtype, requires_grad=True)
    rpb = torch.randn(4, *(5,) * rank, dtype=dtype, requires_grad=True)
    ak = torch.randn(0, 2, 2, 8, dtype=dtype, requires_grad=True)
    av = torch.randn(0, 2, 2, 12, dtype=dtype, requires_grad=True)
    out, lse = tokenmix.neighborhood_attention(
        q, k, v, 3, rpb=rpb, additional_keys=ak, additional_values=av, return_lse=True
    )
    assert out.shape == (0, *shape, 4, 12) and out.dtype == dtype
    assert lse.shape == (0, *shape, 4) and lse.dtype == torch.float32
    grads = torch.autograd.grad(out.sum(), (q, k, v, rpb, ak, av))
    for g, x in zip(grads, (q, k, v, rpb, ak, av), strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype
    assert torch.equal(grads[3], torch.zeros_like(rpb))


# --------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------


def _good():
    return dict(
        q=torch.randn(1, 8, 4, 8),
        k=torch.randn(1, 8, 2, 8),
        v=torch.randn(1, 8, 2, 6),
        kernel_size=3,
    )


ERROR_CASES = [
    ("wrong rank", dict(q=torch.randn(8, 4, 8)), ValueError, r"q must be"),
    ("rank 4", dict(q=torch.randn(1, 2, 2, 2, 2, 4, 8)), ValueError, r"q must be"),
    ("kernel too large", dict(kernel_size=9), ValueError, r"kernel_size"),
    ("kernel*dilation too large", dict(kernel_size=3, dilation=3), ValueError, r"dilation"),
    ("stride > kernel", dict(stride=4), ValueError, r"stride"),
    ("kernel < 2", dict(kernel_size=1), ValueError, r"kernel_size"),
    ("kernel wrong length", dict(kernel_size=(3, 3)), ValueError, r"kernel_size"),
    ("causal not bool", dict(is_causal=1), TypeError, r"is_causal"),
    ("heads not multiple", dict(q=torch.randn(1, 8, 3, 8)), ValueError, r"head count"),
    ("k head dim", dict(k=torch.randn(1, 8, 2, 4)), ValueError, r"k head dim"),
    ("v heads", dict(v=torch.randn(1, 8, 1, 6)), ValueError, r"v head count"),
    ("k shape", dict(k=torch.randn(1, 7, 2, 8)), ValueError, r"k batch/spatial shape"),
    (
        "dtype mismatch",
        dict(k=torch.randn(1, 8, 2, 8, dtype=torch.float64)),
        ValueError,
        r"k dtype",
    ),
    ("int dtype", dict(q=torch.ones(1, 8, 4, 8, dtype=torch.int32)), ValueError, r"q dtype"),
    ("rpb shape", dict(rpb=torch.randn(4, 3)), ValueError, r"rpb must have shape"),
    ("rpb dtype", dict(rpb=torch.randn(4, 5, dtype=torch.float64)), ValueError, r"rpb dtype"),
    (
        "only additional_keys",
        dict(additional_keys=torch.randn(1, 2, 2, 8)),
        ValueError,
        r"additional_keys was given without additional_values",
    ),
    (
        "only additional_values",
        dict(additional_values=torch.randn(1, 2, 2, 6)),
        ValueError,
        r"additional_values was given without additional_keys",
    ),
    (
        "additional_keys dim",
        dict(additional_keys=torch.randn(1, 2, 2, 7), additional_values=torch.randn(1, 2, 2, 6)),
        ValueError,
        r"additional_keys head dim",
    ),
    (
        "additional tokens differ",
        dict(additional_keys=torch.randn(1, 2, 2, 8), additional_values=torch.randn(1, 3, 2, 6)),
        ValueError,
        r"additional_keys and additional_values",
    ),
    ("q not a tensor", dict(q=[1.0]), TypeError, r"q must be a torch.Tensor"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_argument_errors(case):
    _, override, exc, match = case
    kw = _good()
    kw.update(override)
    with pytest.raises(exc, match=match):
        tokenmix.neighborhood_attention(**kw)


def test_fixed_rank_functions():
    q = torch.randn(1, 6, 5, 2, 8)
    with pytest.raises(ValueError, match="na1d"):
        tokenmix.na1d(q, q, q, 3)
    with pytest.raises(ValueError, match="na3d"):
        tokenmix.na3d(q, q, q, 3)
    torch.testing.assert_close(
        tokenmix.na2d(q, q, q, 3), tokenmix.neighborhood_attention(q, q, q, 3)
    )


def test_direct_op_errors_raise():
    # The op's own checks guard direct calls (no crash, an error naming tokenmix).
    q = torch.randn(1, 8, 2, 8)
    k3 = torch.randn(1, 8, 3, 8)
    w = ([3], [1], [1], [0], 1.0)
    bad = [
        (q, q, q, None, None, None, [3], [1, 1], [1], [0], 1.0),  # list lengths differ
        (q, q, q, None, None, None, [9], [1], [1], [0], 1.0),  # window larger than input
        (q, q, q, None, None, None, [3], [4], [1], [0], 1.0),  # stride > kernel
        (q, q, q, torch.randn(2, 4), None, None, *w),  # rpb shape
        (q, q, q, None, torch.randn(1, 2, 2, 8), None, *w),  # lone additional_keys
        (q, q.double(), q, None, None, None, *w),  # dtype
        (q, k3, k3, None, None, None, *w),  # heads not a multiple of kv heads
    ]
    for args in bad:
        with pytest.raises(RuntimeError, match="tokenmix"):
            torch.ops.tokenmix.na_forward(*args)
    # Tensors of the wrong rank for the window lists: an error (its message comes from
    # the stable-ABI size accessor, which make_problem calls before checking ranks).
    for args in [
        (q[..., 0], q, q, None, None, None, *w),
        (q, q[..., 0], q, None, None, None, *w),
        (q, q, q, None, None, None, [3, 3], [1, 1], [1, 1], [0, 0], 1.0),
    ]:
        with pytest.raises(RuntimeError):
            torch.ops.tokenmix.na_forward(*args)


# --------------------------------------------------------------------------------------
# Non-finite inputs and fully masked rows
# --------------------------------------------------------------------------------------

INF, NAN = float("inf"), float("nan")


def check_nonfinite(cfg, t, g_out, dtype):
    """Output, LSE and every gradient are non-finite exactly where the float64 reference's are
    (and match it elsewhere). Returns the kernel's (out, lse, grads)."""
    out, lse, g = run_kernel(cfg, t, g_out)
    r_out, r_lse, r_g = run_reference(cfg, t, g_out)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_same_nonfinite(out, r_out, TOL[dtype], "out")
    assert_same_nonfinite(lse, r_lse, TOL[acc], "lse")
    for name in r_g:
        assert_same_nonfinite(g[name], r_g[name], TOL[dtype], f"grad {name}")
    return out, lse, g


def _bad_rows(x):
    return (~torch.isfinite(x)).flatten(2).any(-1)[0].nonzero().flatten().tolist()


@pytest.mark.parametrize("value", [INF, -INF, NAN], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"]
)
@pytest.mark.parametrize("name", ["v", "k"])
def test_nonfinite_key_or_value_stays_in_its_window(name, dtype, value):
    # na1d, kernel 4, causal: token 20 is in the windows of queries 20-23 only. Before the fix a
    # non-finite value reached every query of the tile (rows 16-31) through 0 * inf.
    cfg = make_cfg((48,), 4, causal=True, heads=2, dim=16)
    t = poisoned(make_inputs(cfg, dtype, 1), name, (0, 20, 0, 3), value)
    g_out = torch.randn(1, 48, 2, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    out, _, g = check_nonfinite(cfg, t, g_out, dtype)
    assert _bad_rows(g["q"]) == [20, 21, 22, 23]
    if name == "v":
        assert _bad_rows(out) == [20, 21, 22, 23]
        assert _bad_rows(g["k"]) == list(range(17, 24))


@pytest.mark.parametrize("seed", range(18))
def test_nonfinite_inputs_match_reference(seed):
    """Random problems with inf, -inf or NaN planted in q, k, v, rpb, the additional tokens or
    the output gradient: every output and gradient is non-finite exactly where the reference's
    is."""
    cfg = random_case(seed, [8, 16, 24, 40], [8, 16], GQA_CHOICES[:5])
    dtype = [torch.float32, torch.float64, torch.bfloat16][seed % 3]
    t = make_inputs(cfg, dtype, seed)
    out_shape = (cfg["batch"], *cfg["shape"], cfg["heads"], cfg["dim_v"])
    gen = torch.Generator().manual_seed(seed + 1)
    t["grad_out"] = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype)
    rng = random.Random(seed)
    names = [n for n, x in t.items() if x is not None]
    for _ in range(1 + seed % 3):
        name = rng.choice(names)
        index = tuple(rng.randrange(n) for n in t[name].shape)
        t = poisoned(t, name, index, rng.choice([INF, -INF, NAN]))
    g_out = t.pop("grad_out")
    check_nonfinite(cfg, t, g_out, dtype)


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"]
)
@pytest.mark.parametrize(
    "cfg",
    [
        make_cfg((24,), 5, heads=2, heads_kv=1, dim=16, rpb=True),
        make_cfg((7, 9), (3, 4), causal=(False, True), heads=1, dim=16, dim_v=24, rpb=True),
        make_cfg((5, 4, 6), 3, heads=4, heads_kv=2, dim=8, rpb=True, batch=2),
    ],
    ids=["1d-gqa", "2d", "3d"],
)
def test_fully_masked_rows(cfg, dtype):
    """Head 0's rpb is all -inf, so every logit of its rows is -inf: output 0, LSE -inf, and
    the gradients of q, k, v and rpb are finite (0 for head 0's queries and bias), as in the
    reference. The other heads are unaffected."""
    t = make_inputs(cfg, dtype, 4)
    t["rpb"][0] = -INF
    out_shape = (cfg["batch"], *cfg["shape"], cfg["heads"], cfg["dim_v"])
    g_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    out, lse, g = check_nonfinite(cfg, t, g_out, dtype)
    assert (out[..., 0, :] == 0).all() and (lse[..., 0] == -INF).all()
    assert torch.isfinite(lse[..., 1:]).all()
    for name in ("q", "k", "v", "rpb"):
        assert torch.isfinite(g[name]).all(), name
    assert (g["q"][..., 0, :] == 0).all() and (g["rpb"][0] == 0).all()
    if cfg["heads"] == 1:
        assert (g["k"] == 0).all() and (g["v"] == 0).all()


# --------------------------------------------------------------------------------------
# Threads, determinism, instruction sets
# --------------------------------------------------------------------------------------


def _fwd_bwd(t, cfg, g_out):
    out, lse, grads = run_kernel(cfg, t, g_out)
    return [out, lse, *grads.values()]


@pytest.mark.parametrize(
    "cfg",
    [
        make_cfg((16, 15), (5, 4), heads=4, heads_kv=1, dim=24, rpb=True, n_extra=3),
        make_cfg((70,), 7, dilation=2, heads=2, heads_kv=1, dim=16, rpb=True, n_extra=130),
        make_cfg((9, 8, 10), 3, causal=(False, False, True), heads=1, dim=32, dim_v=8),
    ],
    ids=["2d", "1d-dilated-many-extra", "3d"],
)
def test_deterministic_and_thread_count_independent(cfg):
    # B * H_kv = 1 < threads: the backward's work on one (batch, kv head) runs in parallel
    # stripes; their partition depends on the problem only, so every gradient is the same
    # bit for bit at any thread count.
    t = make_inputs(cfg, torch.float32, 9)
    g_out = torch.randn(1, *cfg["shape"], cfg["heads"], cfg["dim_v"])
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = _fwd_bwd(t, cfg, g_out)
        second = _fwd_bwd(t, cfg, g_out)
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)
        for threads in (1, 3, 8):
            torch.set_num_threads(threads)
            other = _fwd_bwd(t, cfg, g_out)
            for a, b in zip(first, other, strict=True):
                assert torch.equal(a, b), threads
    finally:
        torch.set_num_threads(old)


_BACKWARD_MEMORY_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys, torch, tokenmix
    threads, dtype = int(sys.argv[1]), getattr(torch, sys.argv[2])
    torch.set_num_threads(threads)

    def kib(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])

    gen = torch.Generator().manual_seed(0)
    n, d = 128, 64  # one query head and one kv head on a 128 x 128 image
    q, k, v = (torch.randn(1, n, n, 1, d, generator=gen).to(dtype) for _ in range(3))
    window = ([7, 7], [1, 1], [1, 1], [0, 0], d**-0.5)
    out, lse = torch.ops.tokenmix.na_forward(q, k, v, None, None, None, *window)
    grad_out = torch.randn(out.shape, generator=gen).to(dtype)

    def backward():
        return torch.ops.tokenmix.na_backward(grad_out, q, k, v, out, lse, None, None, None,
                                              *window)

    backward()  # the thread pool and its allocator arenas exist from here on
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    grads = backward()
    peak = kib("VmHWM")
    outputs = sum(g.numel() * g.element_size() for g in grads)
    print("EXTRA", (peak - base) * 1024 - outputs, "KV", 2 * n * n * d * 4)
"""
)


def _backward_extra_memory(threads, dtype):
    proc = subprocess.run(
        [sys.executable, "-c", _BACKWARD_MEMORY_SCRIPT, str(threads), dtype],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    fields = proc.stdout.split()
    return int(fields[fields.index("EXTRA") + 1]), int(fields[fields.index("KV") + 1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux VmHWM reset")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backward_memory_does_not_grow_with_threads(dtype):
    """Peak memory the backward allocates beyond its outputs stays within about twice K + V in
    fp32 (for bf16: the fp32 copy of K and V plus the dK/dV accumulator), at 1, 8 or 32
    threads."""
    slack = 4 << 20  # allocator rounding, per-thread work tiles, the K/V row flags
    extra = {}
    for threads in (1, 8, 32):
        extra[threads], kv = _backward_extra_memory(threads, dtype)
        assert extra[threads] <= 2 * kv + slack, (threads, extra, kv)
    assert max(extra.values()) - min(extra.values()) <= slack, (extra, kv)


def test_default_isa_matches_cpu():
    if os.environ.get("TOKENMIX_CPU_ISA"):
        pytest.skip("TOKENMIX_CPU_ISA is set")
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    expected = 0
    if {"avx2", "fma"} <= flags:
        expected = 1
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            expected = 2
    assert torch.ops.tokenmix.cpu_isa() == expected


_ISA_SCRIPT = textwrap.dedent(
    """
    import json, torch, tokenmix
    from tokenmix.neighborhood.reference import neighborhood_attention_reference as ref
    cases = [
        dict(shape=(19,), kernel=(5,), stride=(2,), dilation=(2,), causal=(True,), h=4, hkv=2,
             d=12, dv=16, rpb=True, extra=2),
        dict(shape=(7, 6), kernel=(3, 4), stride=(1, 2), dilation=(2, 1), causal=(False, True),
             h=6, hkv=1, d=16, dv=16, rpb=True, extra=0),
        dict(shape=(4, 5, 4), kernel=(2, 3, 2), stride=(1, 1, 2), dilation=(1, 1, 1),
             causal=(True, False, False), h=2, hkv=2, d=8, dv=24, rpb=False, extra=3),
        dict(shape=(140,), kernel=(130,), stride=(1,), dilation=(1,), causal=(False,), h=2,
             hkv=2, d=16, dv=16, rpb=True, extra=0),
    ]
    errs = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        worst = 0.0
        for i, c in enumerate(cases):
            g = torch.Generator().manual_seed(i)
            r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
            t = [r(2, *c["shape"], c["h"], c["d"]), r(2, *c["shape"], c["hkv"], c["d"]),
                 r(2, *c["shape"], c["hkv"], c["dv"]),
                 r(c["h"], *(2 * k - 1 for k in c["kernel"])) if c["rpb"] else None,
                 r(2, c["extra"], c["hkv"], c["d"]) if c["extra"] else None,
                 r(2, c["extra"], c["hkv"], c["dv"]) if c["extra"] else None]
            win = (c["kernel"], c["stride"], c["dilation"], c["causal"])
            go = r(2, *c["shape"], c["h"], c["dv"])
            res = []
            for ts, fn in ((t, tokenmix.neighborhood_attention),
                           ([x.double() if x is not None else None for x in t],
                            lambda *a, **k: ref(*a[:3], *win, **k))):
                leaves = [x.clone().requires_grad_() if x is not None else None for x in ts]
                live = [x for x in leaves if x is not None]
                out, lse = fn(*leaves[:3], *(win if fn is tokenmix.neighborhood_attention
                                             else ()), rpb=leaves[3],
                              additional_keys=leaves[4], additional_values=leaves[5],
                              return_lse=True)
                res.append([out, lse, *torch.autograd.grad(out, live, go.to(out.dtype))])
            for a, b in zip(*res):
                e = ((a.double() - b.double()).abs().max()
                     / b.double().abs().max().clamp_min(1.0)).item()
                worst = max(worst, e)
        errs[str(dtype)] = worst
    print("RESULT " + json.dumps({"isa": int(torch.ops.tokenmix.cpu_isa()), "errs": errs}))
    """
)


@pytest.mark.parametrize("isa,level", [("generic", 0), ("avx2", 1)])
def test_forced_isa(isa, level, tmp_path):
    if isa == "avx2" and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("CPU lacks AVX2/FMA")
    env = dict(os.environ, TOKENMIX_CPU_ISA=isa)
    proc = subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    assert result["isa"] == level
    tol = {"torch.float64": 1e-10, "torch.float32": 2e-5, "torch.bfloat16": 3e-2}
    for dtype, err in result["errs"].items():
        assert math.isfinite(err) and err <= tol[dtype], (dtype, err)


# --------------------------------------------------------------------------------------
# nn modules
# --------------------------------------------------------------------------------------


def _module_reference(mod, x):
    lead = x.shape[:-1]
    hd, h, hkv = mod.head_dim, mod.num_heads, mod.num_kv_heads
    q, k, v = mod.qkv(x).split([h * hd, hkv * hd, hkv * hd], dim=-1)
    out = neighborhood_attention_reference(
        q.unflatten(-1, (h, hd)).double(),
        k.unflatten(-1, (hkv, hd)).double(),
        v.unflatten(-1, (hkv, hd)).double(),
        mod.kernel_size,
        mod.stride,
        mod.dilation,
        mod.is_causal,
        scale=mod.scale,
        rpb=mod.rpb.double() if mod.rpb is not None else None,
    )
    return mod.proj(out.float().reshape(*lead, mod.dim))


@pytest.mark.parametrize(
    "cls,shape,kw",
    [
        (tokenmix.nn.NeighborhoodAttention1D, (2, 17, 32), dict(num_heads=4, kernel_size=5)),
        (
            tokenmix.nn.NeighborhoodAttention2D,
            (2, 9, 10, 32),
            dict(num_heads=4, kernel_size=(3, 5), dilation=(2, 1), rel_pos_bias=True),
        ),
        (
            tokenmix.nn.NeighborhoodAttention2D,
            (1, 8, 8, 48),
            dict(num_heads=6, num_kv_heads=2, kernel_size=4, stride=2, is_causal=(True, False)),
        ),
        (
            tokenmix.nn.NeighborhoodAttention3D,
            (1, 4, 5, 6, 24),
            dict(
                num_heads=3,
                kernel_size=3,
                stride=(1, 2, 1),
                is_causal=(True, False, False),
                rel_pos_bias=True,
                qkv_bias=False,
                scale=0.2,
            ),
        ),
    ],
    ids=["1d", "2d-rpb", "2d-gqa", "3d"],
)
def test_modules(cls, shape, kw):
    torch.manual_seed(0)
    mod = cls(shape[-1], **kw)
    x = torch.randn(*shape, requires_grad=True)
    y = mod(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, _module_reference(mod, x), rtol=2e-5, atol=2e-5)
    heads_kv = kw.get("num_kv_heads", kw["num_heads"])
    assert mod.qkv.out_features == (kw["num_heads"] + 2 * heads_kv) * mod.head_dim
    y.square().sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    if kw.get("rel_pos_bias"):
        assert mod.rpb.shape == (kw["num_heads"], *(2 * k - 1 for k in mod.kernel_size))
    else:
        assert mod.rpb is None
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "kw",
    [
        dict(dim=30, num_heads=4, kernel_size=3),  # dim not a multiple of heads
        dict(dim=32, num_heads=0, kernel_size=3),
        dict(dim=32, num_heads=4, num_kv_heads=3, kernel_size=3),
        dict(dim=32, num_heads=4, num_kv_heads=0, kernel_size=3),
        dict(dim=32, num_heads=4, kernel_size=1),
        dict(dim=32, num_heads=4, kernel_size=3, stride=4),
        dict(dim=32, num_heads=4, kernel_size=3, dilation=0),
        dict(dim=32, num_heads=4, kernel_size=(3, 3, 3)),
    ],
)
def test_module_bad_arguments(kw):
    with pytest.raises(ValueError):
        tokenmix.nn.NeighborhoodAttention2D(**kw)


def test_module_bad_input():
    mod = tokenmix.nn.NeighborhoodAttention2D(16, 2, 3)
    with pytest.raises(ValueError, match="NeighborhoodAttention2D"):
        mod(torch.randn(1, 8, 16))
    with pytest.raises(ValueError, match="NeighborhoodAttention2D"):
        mod(torch.randn(1, 8, 8, 12))
    with pytest.raises(ValueError, match="kernel_size"):
        mod(torch.randn(1, 2, 8, 16))  # window larger than the input


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lse_gradient_matches_reference(dtype):
    # The LSE output is differentiable (d lse / d logits = P), like the reference's.
    torch.manual_seed(5)
    q = torch.randn(1, 9, 7, 2, 8, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 9, 7, 1, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 9, 7, 1, 12, dtype=dtype, requires_grad=True)
    rpb = torch.randn(2, 5, 5, dtype=dtype, requires_grad=True)
    args = dict(kernel_size=(3, 3), stride=(1, 2), dilation=(2, 1), is_causal=(False, True))
    out, lse = tokenmix.neighborhood_attention(q, k, v, rpb=rpb, return_lse=True, **args)
    r_out, r_lse = neighborhood_attention_reference(
        q, k, v, (3, 3), (1, 2), (2, 1), (False, True), rpb=rpb, return_lse=True
    )
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v, rpb))
    want = torch.autograd.grad(
        (r_out * g_out).sum() + (r_lse.to(lse.dtype) * g_lse).sum(), (q, k, v, rpb)
    )
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, a, b in zip("q k v rpb".split(), got, want, strict=True):
        assert torch.allclose(a, b, atol=tol, rtol=tol), name


def test_double_backward_raises_instead_of_silently_wrong():
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(
        tokenmix.na1d(q, q, q, kernel_size=3).pow(2).sum(), q, create_graph=True
    )
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), q)
