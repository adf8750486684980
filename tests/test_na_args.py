"""Arguments of neighborhood attention: the raw ops' integer checks, ``scale``, zero-size
problems, allocation failures and ``torch.compile(dynamic=True)`` (issue 9, items 7, 9, 10).

Calls that crashed the process before their fix run in a subprocess, so a regression fails
one test instead of killing pytest.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import textwrap

import pytest
import tokenmix
import torch
from tokenmix.neighborhood.reference import neighborhood_attention_reference

pytestmark = pytest.mark.skipif(
    tokenmix._ops.load_error is not None, reason="tokenmix's compiled library is not available"
)

op = torch.ops.tokenmix

# --------------------------------------------------------------------------------------
# Item 7: integer arguments of the raw ops, checked without overflow
# --------------------------------------------------------------------------------------

_RAW_INT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, tokenmix

    torch.ops.load_library(os.path.join(os.path.dirname(tokenmix.__file__), "_emulated.so"))
    BIG = 2**62
    MAX = 2**63 - 1
    q = torch.randn(1, 16, 2, 8)
    q2 = torch.randn(1, 16, 12, 2, 8)
    out, lse = torch.ops.tokenmix.na_forward(q, q, q, None, None, None, [3], [1], [1], [0], 1.0)
    # (label, kernel_size, stride, dilation, is_causal, the argument the error must name)
    windows = [
        ("kernel 2^62 dilation 4", [BIG], [1], [4], [0], "kernel_size[0]"),
        ("kernel 2^62+3 dilation 4", [BIG + 3], [1], [4], [0], "kernel_size[0]"),
        ("kernel max dilation 2", [MAX], [1], [2], [0], "kernel_size[0]"),
        ("kernel 2^32+3", [2**32 + 3], [1], [1], [0], "kernel_size[0]"),
        ("kernel negative", [-5], [1], [1], [0], "kernel_size[0]"),
        ("dilation 2^62", [3], [1], [BIG], [0], "dilation[0]"),
        ("dilation 2^61+1 kernel 8", [8], [1], [2**61 + 1], [0], "dilation[0]"),
        ("dilation 0", [3], [1], [0], [0], "dilation[0]"),
        ("dilation min", [3], [1], [-(2**63)], [0], "dilation[0]"),
        ("stride 2^62", [3], [BIG], [1], [0], "stride[0]"),
        ("stride negative", [3], [-BIG], [1], [0], "stride[0]"),
        ("is_causal 2", [3], [1], [1], [2], "is_causal[0]"),
        ("is_causal -1", [3], [1], [1], [-1], "is_causal[0]"),
    ]
    ops, emulated = torch.ops.tokenmix, torch.ops.tokenmix_emulated
    calls = []
    for label, kern, st, dil, cau, name in windows:
        a = (kern, st, dil, cau)
        calls += [
            ("na_forward " + label, name,
             lambda a=a: ops.na_forward(q, q, q, None, None, None, *a, 1.0)),
            ("na_backward " + label, name,
             lambda a=a: ops.na_backward(out, q, q, q, out, lse, None, None, None, *a, 1.0)),
            ("emulated na_forward " + label, name,
             lambda a=a: emulated.na_forward(q, q, q, None, None, None, *a, 1.0)),
            ("emulated na_backward " + label, name,
             lambda a=a: emulated.na_backward(out, q, q, q, out, lse, None, None, None, *a, 1.0)),
            ("na_plan " + label, name, lambda a=a: ops.na_plan([16], *a, [], 64, 64, False)),
        ]
    calls.append(("na_forward 2-D kernel 2^62 in dim 1", "kernel_size[1]", lambda:
        torch.ops.tokenmix.na_forward(
            q2, q2, q2, None, None, None, [3, BIG], [1, 1], [1, 4], [0, 0], 1.0)))
    # A spatial size beyond the kernels' 32-bit window math (a stride-0 view, no memory).
    huge = 2**31 + 8
    qh = torch.empty(1, huge, 0, 8)
    kh = torch.zeros(1, 1, 1, 8).expand(1, huge, 1, 8)
    calls.append(("na_forward spatial 2^31+8", "q spatial size", lambda:
        torch.ops.tokenmix.na_forward(qh, kh, kh, None, None, None, [3], [1], [1], [0], 1.0)))
    calls.append(("na_plan input_shape 2^62", "input_shape", lambda:
        torch.ops.tokenmix.na_plan([BIG], [3], [1], [1], [0], [], 64, 64, False)))
    calls.append(("na_plan tile_volume 2^62", "tile_volume", lambda:
        torch.ops.tokenmix.na_plan([16], [3], [1], [1], [0], [], BIG, 64, False)))
    calls.append(("na_plan tile_shape 2^62", "tile_shape[0]", lambda:
        torch.ops.tokenmix.na_plan([16], [3], [1], [1], [0], [BIG], 64, 64, False)))
    calls.append(("na_plan key_chunk 2^62", "key_chunk", lambda:
        torch.ops.tokenmix.na_plan([16], [3], [1], [1], [0], [], 64, BIG, False)))
    calls.append(("na_plan wgmma_head_dim 96", "wgmma_head_dim", lambda:
        torch.ops.tokenmix.na_plan([16], [3], [1], [1], [0], [], 64, 64, False, 96)))
    calls.append(("na_plan wgmma_head_dim with key_chunk 32", "key_chunk", lambda:
        torch.ops.tokenmix.na_plan([16], [3], [1], [1], [0], [], 64, 32, False, 64)))
    calls.append(("na_plan wgmma_head_dim with tile_volume 16", "tile_volume", lambda:
        torch.ops.tokenmix.na_plan([16], [3], [1], [1], [0], [], 16, 64, False, 64)))
    calls.append(("na_wgmma_break_even 96", "head_dim", lambda:
        torch.ops.tokenmix.na_wgmma_break_even(96)))

    results = {}
    for label, name, call in calls:
        print("CALL", label, flush=True)  # the last line printed names a crashing call
        try:
            call()
            results[label] = "returned without an error"
        except RuntimeError as e:
            msg = str(e)
            results[label] = "ok" if name in msg else "error without " + repr(name) + ": " + msg
    print("RESULTS" + json.dumps(results))
    """
)


def test_raw_op_integer_arguments_raise_without_overflow():
    # kernel_size=[2**62], dilation=[4] used to overflow kernel*dilation to 0 and kill the
    # process with SIGFPE; other values wrapped around and ran a different window.
    lines = _run_isolated(_RAW_INT_SCRIPT)
    results = json.loads(lines[-1].removeprefix("RESULTS"))
    bad = {label: r for label, r in results.items() if r != "ok"}
    assert not bad, json.dumps(bad, indent=1)


def test_spatial_size_limit_in_python():
    # The public API refuses what the ops would: spatial sizes beyond the 32-bit window math.
    from tokenmix.neighborhood.args import normalize_window_args

    with pytest.raises(ValueError, match=r"spatial_shape must be <= 2\*\*30"):
        normalize_window_args(1, (2**30 + 1,), 3)
    assert normalize_window_args(1, (2**30,), 3)[0] == (3,)


# --------------------------------------------------------------------------------------
# Item 9: scale
# --------------------------------------------------------------------------------------


def _small():
    torch.manual_seed(0)
    return torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_scale_must_be_finite(scale):
    q, k, v = _small()
    with pytest.raises(ValueError, match="scale must be finite"):
        tokenmix.na1d(q, k, v, 3, scale=scale)
    with pytest.raises(ValueError, match="scale must be finite"):
        neighborhood_attention_reference(q, k, v, 3, scale=scale)
    with pytest.raises(ValueError, match="scale must be finite"):
        tokenmix.nn.NeighborhoodAttention1D(8, 2, 3, scale=scale)
    # The raw ops check it too (a RuntimeError naming scale instead of nan outputs).
    out, lse = op.na_forward(q, k, v, None, None, None, [3], [1], [1], [0], 0.5)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        op.na_forward(q, k, v, None, None, None, [3], [1], [1], [0], scale)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        op.na_backward(out, q, k, v, out, lse, None, None, None, [3], [1], [1], [0], scale)


@pytest.mark.parametrize(
    "scale",
    ["0.5", [0.5], torch.tensor(0.5), True, 1j, object()],
    ids=["str", "list", "tensor", "bool", "complex", "object"],
)
def test_scale_must_be_a_number(scale):
    q, k, v = _small()
    with pytest.raises(TypeError, match="scale must be a Python float or None"):
        tokenmix.na1d(q, k, v, 3, scale=scale)
    with pytest.raises(TypeError, match="scale must be a Python float or None"):
        tokenmix.nn.NeighborhoodAttention1D(8, 2, 3, scale=scale)


def test_scale_numbers_accepted():
    # Ints and numpy-style reals are numbers: they keep working.
    q, k, v = _small()
    want = tokenmix.na1d(q, k, v, 3, scale=2.0)
    torch.testing.assert_close(tokenmix.na1d(q, k, v, 3, scale=2), want)
    default = tokenmix.na1d(q, k, v, 3)
    torch.testing.assert_close(default, tokenmix.na1d(q, k, v, 3, scale=4**-0.5))


# --------------------------------------------------------------------------------------
# Item 9: zero-size problems never return uninitialized memory
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _uninitialized_is_nan():
    """torch fills fresh tensors with NaN in deterministic mode: anything an op leaves
    unwritten then shows up as NaN."""
    old = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


def _raw(q, k, v, rpb, ek, ev, g_out, g_lse, kernel):
    """Raw forward + backward with all-NaN fresh memory; returns (out, lse, grads)."""
    w = (list(kernel), [1] * len(kernel), [1] * len(kernel), [0] * len(kernel), 0.7)
    with _uninitialized_is_nan():
        out, lse = op.na_forward(q, k, v, rpb, ek, ev, *w)
        grads = op.na_backward(g_out, q, k, v, out, lse, rpb, ek, ev, *w, g_lse)
    return out, lse, grads


def _reference(q, k, v, rpb, ek, ev, g_out, g_lse, kernel):
    """fp64 reference output, lse and gradients of (q, k, v, rpb, ek, ev)."""
    leaves = [x.double().requires_grad_() for x in (q, k, v, rpb, ek, ev)]
    out, lse = neighborhood_attention_reference(
        *leaves[:3], kernel, scale=0.7, rpb=leaves[3], additional_keys=leaves[4],
        additional_values=leaves[5], return_lse=True,
    )  # fmt: skip
    grads = torch.autograd.grad((out, lse), leaves, (g_out.double(), g_lse.double()))
    return out, lse, grads


ZERO_DTYPES = [torch.float64, torch.float32, torch.bfloat16]
ZERO_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}


def _close(got, want, dtype, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert not got.isnan().any(), f"{what}: uninitialized (NaN) elements"
    tol = ZERO_TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, msg=what)


@pytest.mark.parametrize("dtype", ZERO_DTYPES, ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("spatial", [(9,), (5, 6)], ids=["1d", "2d"])
def test_value_dim_zero(spatial, dtype):
    # Dv = 0: the output is empty, but the LSE and the gradients through it are defined.
    g = torch.Generator().manual_seed(1)
    kernel = (3,) * len(spatial)
    b, h, hkv, d, n = 2, 4, 2, 8, 3

    def rand(*s):
        return torch.randn(*s, generator=g).to(dtype)

    q, k = rand(b, *spatial, h, d), rand(b, *spatial, hkv, d)
    rpb, ek = rand(h, *(5,) * len(spatial)), rand(b, n, hkv, d)
    v0, ev0 = rand(b, *spatial, hkv, 0), rand(b, n, hkv, 0)
    g_out, g_lse = rand(b, *spatial, h, 0), rand(b, *spatial, h).float()
    if dtype == torch.float64:
        g_lse = g_lse.double()
    out, lse, (dq, dk, dv, drpb, dek, dev) = _raw(q, k, v0, rpb, ek, ev0, g_out, g_lse, kernel)
    # The reference needs Dv >= 1: with a zero output gradient, v does not matter.
    v1, ev1 = rand(b, *spatial, hkv, 1), rand(b, n, hkv, 1)
    want_out, want_lse, want = _reference(
        q, k, v1, rpb, ek, ev1, torch.zeros(*g_out.shape[:-1], 1), g_lse, kernel
    )
    assert out.shape == (b, *spatial, h, 0)
    _close(lse, want_lse, dtype, "lse")
    for name, got, w in zip(
        ("dq", "dk", "drpb", "dek"),
        (dq, dk, drpb, dek),
        [want[i] for i in (0, 1, 3, 4)],
        strict=True,
    ):
        _close(got, w, dtype, name)
    assert dv.shape == v0.shape and dev.shape == ev0.shape


_HEAD_DIM_ZERO_SCRIPT = textwrap.dedent(
    """
    import torch, tokenmix

    ops = torch.ops.tokenmix
    w = ([3], [1], [1], [0], 1.0)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        q, k = torch.randn(2, 9, 4, 0, dtype=dtype), torch.randn(2, 9, 2, 0, dtype=dtype)
        v, g = torch.randn(2, 9, 2, 8, dtype=dtype), torch.randn(2, 9, 4, 8, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        lse = torch.zeros(2, 9, 4, dtype=acc)
        for name, call in (
            ("na_forward", lambda: ops.na_forward(q, k, v, None, None, None, *w)),
            ("na_backward", lambda: ops.na_backward(g, q, k, v, g, lse, None, None, None, *w)),
        ):
            print("CALL", name, dtype, flush=True)
            try:
                call()
                print("RESULT returned without an error")
            except RuntimeError as e:
                print("RESULT", "ok" if "head dim of q and k (D) must be >= 1" in str(e) else e)
    """
)


def _run_isolated(script: str) -> list[str]:
    """Runs ``script`` in a fresh interpreter (a crash fails the test, not pytest)."""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, (
        f"the process died (rc {proc.returncode}) in: {lines[-1:]}\n{proc.stderr[-2000:]}"
    )
    return lines


def test_head_dim_zero_raises():
    # D = 0 used to crash the CPU backward (and the forward ran, so autograd crashed later):
    # both raw ops refuse it, naming the head dim. (The public API already did.)
    lines = _run_isolated(_HEAD_DIM_ZERO_SCRIPT)
    results = [line for line in lines if line.startswith("RESULT")]
    assert results == ["RESULT ok"] * 6, "\n".join(lines)
    q = torch.randn(1, 9, 2, 0)
    with pytest.raises(ValueError, match="head dim"):
        tokenmix.na1d(q, q, torch.randn(1, 9, 2, 4), 3)


@pytest.mark.parametrize("dtype", ZERO_DTYPES, ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("case", ["no query heads", "empty batch"], ids=["H=0,H_kv=1", "B=0"])
def test_empty_problems_zero_gradients(case, dtype):
    # No query attends anything: the gradients of k, v, rpb and the additional tokens are
    # zero (H=0 with H_kv=1 used to return uninitialized dk/dv).
    b, h = (2, 0) if case == "no query heads" else (0, 4)
    q = torch.randn(b, 9, h, 8, dtype=dtype)
    k, v = torch.randn(b, 9, 1, 8, dtype=dtype), torch.randn(b, 9, 1, 6, dtype=dtype)
    rpb = torch.randn(h, 5, dtype=dtype)
    ek, ev = torch.randn(b, 3, 1, 8, dtype=dtype), torch.randn(b, 3, 1, 6, dtype=dtype)
    g_out = torch.randn(b, 9, h, 6, dtype=dtype)
    g_lse = torch.randn(b, 9, h, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    out, lse, grads = _raw(q, k, v, rpb, ek, ev, g_out, g_lse, (3,))
    assert out.shape == (b, 9, h, 6) and lse.shape == (b, 9, h)
    for name, got, x in zip(
        ("dq", "dk", "dv", "drpb", "dek", "dev"), grads, (q, k, v, rpb, ek, ev), strict=True
    ):
        assert got.shape == x.shape, name
        assert torch.equal(got, torch.zeros_like(got)), f"{name} is not zero: {got.flatten()[:4]}"


def test_empty_spatial_raises():
    q = torch.randn(1, 0, 2, 8)
    with pytest.raises(RuntimeError, match="q spatial size 0"):
        op.na_forward(q, q, q, None, None, None, [1], [1], [1], [0], 1.0)
    with pytest.raises(ValueError, match="spatial"):
        tokenmix.na1d(q, q, q, 2)


# --------------------------------------------------------------------------------------
# Item 9: allocation failures say that memory ran out and how much was asked for
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, message",
    [
        # 2^34 * 1024 * 8 fp32 = 2^49 bytes: beyond any machine's address space.
        (2**34, "562949953421312 bytes"),
        # 2^49 * 1024 * 8 fp32 = 2^64 bytes: the byte count itself leaves int64.
        (2**49, "more than 2^63 bytes"),
    ],
    ids=["2^49 bytes", "2^64 bytes"],
)
def test_allocation_failure_says_out_of_memory(batch, message):
    # Inputs expanded from one row (no memory), whose output cannot be allocated.
    q = torch.zeros(1, 1, 1, 8).expand(batch, 1024, 1, 8)
    with pytest.raises(RuntimeError, match="out of memory") as info:
        op.na_forward(q, q, q, None, None, None, [3], [1], [1], [0], 1.0)
    msg = str(info.value)
    assert message in msg and "the output" in msg and f"[{batch}, 1024, 1, 8]" in msg, msg


# --------------------------------------------------------------------------------------
# Item 10: torch.compile(fullgraph=True, dynamic=True)
# --------------------------------------------------------------------------------------

# (B, spatial, H, H_kv, D, Dv, N_extra) of two calls. Sizes of a call are distinct, never
# 0 or 1 and never one of the rpb's 2k-1 extents, so that torch's duck sizing and 0/1
# specialization add no guard that the second call fails. D is the same in both calls: the
# default scale D ** -0.5 is a float argument of the op, and torch specializes those.
_COMPILE_SHAPES = {
    1: ((2, (23,), 8, 4, 16, 12, 6), (3, (31,), 10, 5, 16, 20, 9)),
    2: ((2, (10, 9), 8, 4, 16, 12, 6), (3, (11, 13), 10, 5, 16, 20, 9)),
    3: ((2, (6, 8, 9), 12, 4, 16, 10, 11), (4, (10, 11, 12), 15, 5, 16, 20, 13)),
}
_COMPILE_FNS = {1: tokenmix.na1d, 2: tokenmix.na2d, 3: tokenmix.na3d}


def _compile_inputs(b, spatial, h, hkv, d, dv, n, kernel, seed):
    g = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, generator=g).requires_grad_()

    rpb = rand(h, *(2 * x - 1 for x in kernel))
    return (
        rand(b, *spatial, h, d),
        rand(b, *spatial, hkv, d),
        rand(b, *spatial, hkv, dv),
        rpb,
        rand(b, n, hkv, d),
        rand(b, n, hkv, dv),
    )


@pytest.mark.parametrize("scale", [None, 0.3], ids=["default-scale", "scale"])
@pytest.mark.parametrize("rank", [1, 2, 3], ids=["na1d", "na2d", "na3d"])
def test_compile_dynamic_fullgraph(rank, scale):
    from torch._dynamo.testing import CompileCounterWithBackend

    kernel = {1: (4,), 2: (3, 4), 3: (2, 3, 4)}[rank]
    fn = _COMPILE_FNS[rank]

    def f(q, k, v, rpb, ek, ev):
        out, lse = fn(
            q, k, v, kernel, stride=(2,) * rank, dilation=(1,) * (rank - 1) + (2,),
            is_causal=(True,) + (False,) * (rank - 1), scale=scale, rpb=rpb,
            additional_keys=ek, additional_values=ev, return_lse=True,
        )  # fmt: skip
        return out.sin().sum() + lse.cos().sum()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for seed, sizes in enumerate(_COMPILE_SHAPES[rank]):
        args = _compile_inputs(*sizes, kernel, seed)
        got = compiled(*args)
        got_grads = torch.autograd.grad(got, args)
        frames.append(counter.frame_count)
        want = f(*args)
        want_grads = torch.autograd.grad(want, args)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        for a, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
    # The second sizes reuse the first graph: the sizes stayed symbolic (no recompile).
    assert frames[0] >= 1 and frames[1] == frames[0], frames


def test_compile_dynamic_inductor():
    # The default backend, forward and backward, on two sizes.
    def f(q, k, v):
        return tokenmix.na2d(q, k, v, (3, 5), dilation=(2, 1)).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for seed, (b, s0, s1) in enumerate([(2, 7, 9), (3, 10, 11)]):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(b, s0, s1, 4, 8, generator=g).requires_grad_() for _ in range(3))
        got = compiled(q, k, v)
        got_grads = torch.autograd.grad(got, (q, k, v))
        want = f(q, k, v)
        want_grads = torch.autograd.grad(want, (q, k, v))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        for a, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
