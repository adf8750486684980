"""The CUDA neighborhood-attention kernels (csrc/include/tokenmix/cuda/attention_engine.h), run
on the SIMT emulator through torch.ops.tokenmix_emulated.na_forward / na_backward and compared
with the float64 reference: outputs, LSE and every gradient.

The emulated ops poison every output with NaN before the kernels run, so an element the kernels
fail to write fails the finiteness checks. The emulator itself stops a launch at any
out-of-bounds access, shared-memory race, uninitialized shared read or barrier divergence.

Every test runs twice: with exact exp2/log2 and in the emulator's numeric mode that gives them the
PTX ISA's maximum errors ($TOKENMIX_SIMT_MATH=approx), so the kernels cannot depend on exact math.
"""

from __future__ import annotations

import os
import random
import warnings

import pytest
import tokenmix
import torch
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

LIBRARY = os.path.join(os.path.dirname(tokenmix.__file__), "_emulated.so")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(scope="module", autouse=True)
def emulated_library():
    assert os.path.exists(LIBRARY), "the build must produce tokenmix/_emulated.so"
    torch.ops.load_library(LIBRARY)


@pytest.fixture(scope="module", autouse=True, params=["exact", "approx"])
def math_mode(request):
    """The emulator's numeric mode for the module's tests (read by each launch)."""
    saved = {k: os.environ.get(k) for k in ("TOKENMIX_SIMT_MATH", "TOKENMIX_SIMT_MATH_SEED")}
    os.environ["TOKENMIX_SIMT_MATH"] = request.param
    os.environ["TOKENMIX_SIMT_MATH_SEED"] = "0"
    yield request.param
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_case(*args, dim=32, **kwargs):
    return make_cfg(*args, dim=dim, **kwargs)


def window_args(c):
    """The window as the ops take it: int lists, causal flags as ints."""
    kernel, stride, dilation, causal = window_of(c)
    return [list(kernel), list(stride), list(dilation), [int(x) for x in causal]]


def emulated(c, t, scale, grad_out, grad_lse, deterministic=False):
    ops = torch.ops.tokenmix_emulated
    out, lse = ops.na_forward(
        t["q"], t["k"], t["v"], t["rpb"], t["additional_keys"], t["additional_values"],
        *window_args(c), scale,
    )  # fmt: skip
    grads = ops.na_backward(
        grad_out, t["q"], t["k"], t["v"], out, lse, t["rpb"], t["additional_keys"],
        t["additional_values"], *window_args(c), scale, grad_lse, deterministic,
    )  # fmt: skip
    return (
        out,
        lse,
        dict(
            zip(("q", "k", "v", "rpb", "additional_keys", "additional_values"), grads, strict=True)
        ),
    )


def reference(c, t, scale, grad_out, grad_lse):
    leaves = {n: x.double().requires_grad_() for n, x in t.items() if x is not None}
    out, lse = attend(neighborhood_attention_reference, c, leaves, scale=scale, return_lse=True)
    outputs, cotangents = [out], [grad_out.double()]
    if grad_lse is not None:
        outputs.append(lse)
        cotangents.append(grad_lse.double())
    g = torch.autograd.grad(outputs, list(leaves.values()), cotangents)
    return out.detach(), lse.detach(), dict(zip(leaves, g, strict=True))


def assert_close(got, want, tol, what):
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {got.shape} != {want.shape}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element was not written)"
    if want.numel() == 0:
        return
    err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1.0)).item()
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.1e}"


def check(c, dtype, seed=0, with_grad_lse=False, deterministic=False):
    t = make_inputs(c, dtype, seed)
    scale = c.get("scale") or c["dim"] ** -0.5
    out_shape = (c["batch"], *c["shape"], c["heads"], c["dim_v"])
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype)
    grad_lse = None
    if with_grad_lse:
        grad_lse = torch.randn(out_shape[:-1], generator=gen, dtype=torch.float64).float()
    out, lse, g = emulated(c, t, scale, grad_out, grad_lse, deterministic)
    r_out, r_lse, r_g = reference(c, t, scale, grad_out, grad_lse)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, r_out, TOL[dtype], "out")
    assert_close(lse, r_lse, 1e-5, "lse")
    for name, want in r_g.items():
        got = g[name]
        want_dtype = torch.float32 if name == "rpb" else dtype
        assert got.dtype == want_dtype, f"grad {name} dtype {got.dtype}"
        assert_close(got, want, TOL[dtype], f"grad {name}")
    return out, lse, g


# One case per branch of the kernels: tile shapes and partial tiles in every dimension, each
# head-dim path (specialized 32/64/128, general with D != Dv and D = 256), causal / dilated /
# strided windows, rpb, additional tokens, GQA/MQA.
CASES = {
    "1d-partial-d32": make_case((70,), 7),
    "1d-dilated-causal-d64": make_case((41,), 5, dilation=2, causal=True, dim=64),
    "1d-d128-rpb": make_case((20,), 5, dim=128, rpb=True),
    # D = 128: one dQ block for all 128 columns, dP in parts, and dK/dV in warp pairs that trade
    # their halves of P^T and dS^T (with rpb and its gradient, partial 2-D chunks, GQA steps over
    # the group's heads, additional-token key tiles)
    "2d-d128-gqa-extra-rpb": make_case(
        (10, 9), (5, 3), heads=4, heads_kv=2, dim=128, rpb=True, n_extra=5
    ),
    # D = 128 causal over several key tiles: steps where one warp of a dK/dV pair has no kept
    # query group in its half (it skips its products) while its partner has some
    "1d-d128-causal-gqa": make_case((150,), 9, causal=True, heads=4, heads_kv=2, dim=128),
    "1d-d256-general": make_case((9,), 3, dim=256, heads=1),
    "2d-strided-rpb-general": make_case((9, 11), (3, 5), stride=(2, 1), dim=16, rpb=True),
    "2d-blocked": make_case((12, 8), (4, 4), stride=(4, 4), dim=32),
    "2d-causal-dilated": make_case((10, 9), (3, 3), dilation=(2, 1), causal=(True, False)),
    "3d-mixed": make_case(
        (5, 6, 7),
        3,
        dilation=(1, 2, 1),
        causal=(True, False, False),
        dim=8,
        stride=(1, 1, 2),
        rpb=True,
    ),  # fmt: skip
    "gqa-extra-dv": make_case((13, 6), (3, 3), heads=4, heads_kv=2, dim=24, dim_v=40, n_extra=5),
    "mqa-extra-rpb": make_case((30,), 9, heads=3, heads_kv=1, rpb=True, n_extra=70, batch=2),
    # a negative scale: the forward applies it before the max (mask_scores' fold needs a positive
    # one), the backward leaves it to the exponent's FFMA
    "negative-scale": make_case((70,), 7, dim=64, heads=1, scale=-0.7),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype):
    check(CASES[name], dtype, seed=len(name))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=DTYPE_IDS.get)
def test_lse_gradient(dtype):
    check(make_case((6, 7), 3, rpb=True, n_extra=3), dtype, seed=3, with_grad_lse=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
def test_deterministic_mode(dtype):
    """deterministic=True sums the rpb gradient without atomics; it matches the reference and
    repeats bit for bit."""
    c = make_case((9, 10), (5, 3), stride=(2, 1), dilation=(1, 2), rpb=True, heads=2, batch=2,
                  n_extra=4)  # fmt: skip
    _, _, g1 = check(c, dtype, seed=5, deterministic=True)
    _, _, g2 = check(c, dtype, seed=5, deterministic=True)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_non_contiguous_and_misaligned_inputs():
    """Views whose rows are not 16-byte aligned are copied before the kernels run."""
    c = make_case((11,), 3, heads=2, dim=16)
    base = make_inputs(c, torch.float16, 9)
    t = dict(base)
    # q: a transposed-then-transposed-back view (non-contiguous strides)
    t["q"] = base["q"].transpose(1, 2).contiguous().transpose(1, 2)
    # k: a view at a storage offset of one element (misaligned rows)
    storage = torch.empty(base["k"].numel() + 1, dtype=torch.float16)
    storage[1:] = base["k"].flatten()
    t["k"] = storage[1:].view(base["k"].shape)
    assert t["k"].data_ptr() % 16 != 0
    scale = 0.25
    grad_out = torch.randn(1, 11, 2, 16, dtype=torch.float64).half()
    out, lse, g = emulated(c, t, scale, grad_out, None)
    r_out, _, r_g = reference(c, base, scale, grad_out, None)
    assert_close(out, r_out, TOL[torch.float16], "out")
    for name in ("q", "k", "v"):
        assert_close(g[name], r_g[name], TOL[torch.float16], f"grad {name}")


def test_approx_math_mode_moves_results(monkeypatch):
    """$TOKENMIX_SIMT_MATH=approx changes the kernels' exp2/log2 results by up to the PTX ISA's
    maximum errors: outputs move (a little), the same seed repeats them bit for bit, another seed
    moves them differently."""
    c = make_case((20,), 5, dim=32, rpb=True)
    t = make_inputs(c, torch.float32, 4)

    def forward(mode, seed="0"):
        monkeypatch.setenv("TOKENMIX_SIMT_MATH", mode)
        monkeypatch.setenv("TOKENMIX_SIMT_MATH_SEED", seed)
        return torch.ops.tokenmix_emulated.na_forward(
            t["q"], t["k"], t["v"], t["rpb"], None, None, *window_args(c), 0.125
        )

    exact, approx, again = forward("exact"), forward("approx"), forward("approx")
    other = forward("approx", "7")
    for e, a, b, o, what in zip(exact, approx, again, other, ("out", "lse"), strict=True):
        assert not torch.equal(a, e), f"{what}: the approx mode left every result exact"
        assert torch.equal(a, b), f"{what}: not reproducible for one seed"
        assert not torch.equal(a, o), f"{what}: the seed changes nothing"
        assert_close(a, e.double(), 1e-5, what)


def test_empty_batch():
    c = make_case((8,), 3, batch=0)
    t = make_inputs(c, torch.float16, 0)
    out, lse = torch.ops.tokenmix_emulated.na_forward(
        t["q"], t["k"], t["v"], None, None, None, *window_args(c), 1.0
    )
    assert out.shape == (0, 8, 2, 32) and lse.shape == (0, 8, 2)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_logit_overflow_from_the_scale(scale, arch, monkeypatch):
    """Query 10's score against key 11 is 3e38, finite in fp32 (bf16 for the sm_90a path), and 0
    against its other keys. Times scale * log2(e) it overflows at scale 1: the +inf logit must make
    the row non-finite, as an inf input does, not vanish in the exp2 (the kernels fold the scale
    into the exp2 only when that cannot overflow). At scale 0.5 it stays finite and the row is
    key 11's value, as in the float64 reference. The window is the whole sequence, so the chunk
    is full: the path where the scale is folded."""
    monkeypatch.setenv("TOKENMIX_SIMT_ARCH", arch)
    monkeypatch.setenv("TOKENMIX_WGMMA", "1")  # on sm_90a, the wgmma kernel whatever the window
    dtype = torch.float32 if arch == "sm_80" else torch.bfloat16
    c = make_case((33,), 33, dim=64)
    t = make_inputs(c, dtype, 3)
    t["k"][..., 0] = 0
    t["q"][0, 10, 0] = 0
    t["q"][0, 10, 0, 0] = 3e38
    t["k"][0, 11, 0, 0] = 1.0
    out, lse = torch.ops.tokenmix_emulated.na_forward(
        t["q"], t["k"], t["v"], None, None, None, *window_args(c), scale
    )
    others = torch.ones(33, dtype=torch.bool)
    others[10] = False
    assert torch.isfinite(out[0, others]).all() and torch.isfinite(lse[0, others]).all()
    if scale == 1.0:
        assert not torch.isfinite(out[0, 10, 0]).any(), out[0, 10, 0]
        assert lse[0, 10, 0] == float("inf")
    else:
        torch.testing.assert_close(out[0, 10, 0], t["v"][0, 11, 0], rtol=0, atol=0)
        assert torch.isfinite(lse[0, 10, 0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,dtype",
    [("sm_80", torch.float16), ("sm_80", torch.float32), ("sm_90a", torch.bfloat16)],
    ids=["sm_80-fp16", "sm_80-fp32", "sm_90a-bf16"],
)
def test_running_max_climbs_across_chunks(arch, dtype, monkeypatch):
    """The normal pass keeps a warp's running maxima until some row's chunk maximum passes its own
    by more than 8 (log2 units), and rescales O and l only then (online_softmax.h). Row i's
    logits climb by (i % 8) * 0.9 per level over the key chunks' levels 0, 2, 1, 3, 4: steps of up
    to 9.1 (log2) that some rows of a warp take and others do not, two steps that stay under the
    slack adding up to one that passes it, and P up to 2^18 of the kept maximum should a rescale
    be skipped (past fp16's range). Output, LSE and gradients against the float64 reference."""
    monkeypatch.setenv("TOKENMIX_SIMT_ARCH", arch)
    monkeypatch.setenv("TOKENMIX_WGMMA", "1")  # on sm_90a, the wgmma kernel whatever the window
    c = make_case((320,), 320, heads=1, dim=64)
    t = make_inputs(c, dtype, 5)
    levels = torch.tensor([0.0, 2.0, 1.0, 3.0, 4.0]).repeat_interleave(64)
    slopes = (torch.arange(320) % 8).double() * 0.9
    for name in ("q", "k"):
        t[name] = (t[name].double() * 0.1).to(dtype)
    t["q"][0, :, 0, 0] = slopes.to(dtype)
    t["k"][0, :, 0, 0] = levels.to(dtype)
    gen = torch.Generator().manual_seed(6)
    grad_out = torch.randn((1, 320, 1, 64), generator=gen, dtype=torch.float64).to(dtype)
    out, lse, g = emulated(c, t, 1.0, grad_out, None)
    r_out, r_lse, r_g = reference(c, t, 1.0, grad_out, None)
    assert_close(out, r_out, TOL[dtype], "out")
    assert_close(lse, r_lse, 1e-5, "lse")
    for name in ("q", "k", "v"):
        assert_close(g[name], r_g[name], TOL[dtype], f"grad {name}")


def test_rejects_what_the_kernels_cannot_run():
    c = make_case((8,), 3, dim=12)
    t = make_inputs(c, torch.float16, 0)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.tokenmix_emulated.na_forward(
            t["q"], t["k"], t["v"], None, None, None, *window_args(c), 1.0
        )
    t = make_inputs(make_case((8,), 3), torch.float64, 0)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.tokenmix_emulated.na_forward(
            t["q"], t["k"], t["v"], None, None, None, *window_args(c), 1.0
        )


def test_planner_tile_shapes_drive_the_kernels():
    """A problem whose best tile is not the default 1-D strip still matches (2-D tiles of a
    tall-thin input, 3-D tiles of a cube)."""
    check(make_case((40, 3), (5, 3), dim=32, heads=1), torch.float16, seed=11)
    check(make_case((4, 4, 5), (3, 3, 3), dim=32, heads=1), torch.float16, seed=12)


@pytest.fixture
def public_api_on_emulated_kernels():
    """Routes torch.ops.tokenmix.na_forward / na_backward on CPU tensors to the emulated CUDA
    kernels for one test, so the public API (tokenmix.na2d, its autograd formula, torch.compile,
    the deterministic flag) drives the CUDA engine's code exactly as it does on a GPU. Records the
    `deterministic` argument of each backward call."""
    calls: list[bool] = []
    lib = torch.library.Library("tokenmix", "IMPL")

    def forward(*args):
        return torch.ops.tokenmix_emulated.na_forward(*args)

    def backward(*args, grad_lse=None, deterministic=False):
        # trailing arguments left at their defaults may be dropped by the dispatcher
        names = ("grad_lse", "deterministic")
        extra = dict(zip(names, args[14:], strict=False))
        grad_lse = extra.get("grad_lse", grad_lse)
        deterministic = bool(extra.get("deterministic", deterministic))
        calls.append(deterministic)
        return torch.ops.tokenmix_emulated.na_backward(*args[:14], grad_lse, deterministic)

    with warnings.catch_warnings():  # "overriding a previously registered kernel" is the point
        warnings.simplefilter("ignore")
        lib.impl("na_forward", forward, "CPU")
        lib.impl("na_backward", backward, "CPU")
    try:
        yield calls
    finally:
        lib._destroy()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_public_api_autograd_and_deterministic_flag(public_api_on_emulated_kernels, compiled):
    calls = public_api_on_emulated_kernels
    c = make_case((7, 9), (3, 5), dilation=(2, 1), rpb=True, heads=2, dim=32)
    t = make_inputs(c, torch.float16, 21)

    def attend(q, k, v, rpb):
        return tokenmix.na2d(q, k, v, (3, 5), dilation=(2, 1), rpb=rpb)

    fn = torch.compile(attend, fullgraph=True, backend="aot_eager") if compiled else attend
    grad_out = torch.randn(1, 7, 9, 2, 32, dtype=torch.float64).half()
    _, _, r_g = reference(c, t, 32**-0.5, grad_out, None)
    for deterministic in (False, True):
        leaves = [t[n].clone().requires_grad_() for n in ("q", "k", "v", "rpb")]
        torch.use_deterministic_algorithms(deterministic)
        try:
            out = fn(*leaves)
            grads = torch.autograd.grad(out, leaves, grad_out)
        finally:
            torch.use_deterministic_algorithms(False)
        assert calls[-1] is deterministic
        for name, got in zip(("q", "k", "v", "rpb"), grads, strict=True):
            assert_close(got, r_g[name], TOL[torch.float16], f"grad {name}")
    # Routed back to the C++ CPU kernels afterwards (the fixture's registrations are gone).
    assert len(calls) == 2


CUDA_HEAD_DIMS = [8, 16, 24, 32, 40, 64, 72, 128]
SWEEP_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(24))
def test_random_sweep(seed):
    """Random windows, shapes, head dims, GQA, rpb and extra tokens; the dtype rotates with the
    seed, and every third seed runs the deterministic backward."""
    c = random_case(seed, CUDA_HEAD_DIMS, CUDA_HEAD_DIMS, [(1, 1), (2, 2), (4, 2), (3, 1)],
                    max_pad={1: 40, 2: 8, 3: 3})  # fmt: skip
    check(c, SWEEP_DTYPES[seed % 3], seed=seed, deterministic=seed % 3 == 1)


# ---- non-finite inputs and fully masked rows ---------------------------------------------------

INF, NAN = float("inf"), float("nan")


def check_nonfinite(c, t, grad_out, dtype, grad_lse=None, deterministic=False):
    """Outputs and gradients of the emulated kernels are non-finite exactly where the float64
    reference's are, and match it elsewhere."""
    scale = c.get("scale") or c["dim"] ** -0.5
    out, lse, g = emulated(c, t, scale, grad_out, grad_lse, deterministic)
    r_out, r_lse, r_g = reference(c, t, scale, grad_out, grad_lse)
    assert_same_nonfinite(out, r_out, TOL[dtype], "out")
    assert_same_nonfinite(lse, r_lse, 1e-5, "lse")
    for name, want in r_g.items():
        assert_same_nonfinite(g[name], want, TOL[dtype], f"grad {name}")
    return out, lse, g


def _bad_rows(x):
    return (~torch.isfinite(x)).flatten(2).any(-1)[0].nonzero().flatten().tolist()


@pytest.mark.parametrize("value", [INF, NAN], ids=["inf", "nan"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", ["v", "k"])
def test_nonfinite_key_or_value_stays_in_its_window(name, dtype, value):
    """na1d, kernel 4, causal: token 20 is in the windows of queries 20-23 only; the tile of 64
    queries around it must not see a non-finite K or V row through 0 * inf (forward P V,
    dQ += dS K) nor through masked dS."""
    c = make_case((80,), 4, causal=True, heads=2)
    t = poisoned(make_inputs(c, dtype, 1), name, (0, 20, 0, 3), value)
    grad_out = torch.randn(1, 80, 2, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    out, _, g = check_nonfinite(c, t, grad_out, dtype)
    assert _bad_rows(g["q"]) == [20, 21, 22, 23]
    if name == "v":
        assert _bad_rows(out) == [20, 21, 22, 23]
        assert _bad_rows(g["k"]) == list(range(17, 24))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", ["q", "k", "v", "grad_out"])
def test_nonfinite_row_at_d128(name, dtype):
    """D = 128, where one dQ block computes all 128 columns (dP in parts on sm_80 and in the
    emulator): a NaN in one row of Q, K, V or dO, in a column past the first 64 (the B tile of one
    of the four P/dS products), reaches exactly the reference's non-finite entries. na1d, kernel
    4, causal: token 20 is in the windows of queries 20-23 and sees keys 17-20."""
    c = make_case((80,), 4, causal=True, heads=2, dim=128)
    t = make_inputs(c, dtype, 1)
    gen = torch.Generator().manual_seed(2)
    t["grad_out"] = torch.randn(1, 80, 2, 128, generator=gen, dtype=torch.float64).to(dtype)
    t = poisoned(t, name, (0, 20, 0, 100), NAN)
    grad_out = t.pop("grad_out")
    out, _, g = check_nonfinite(c, t, grad_out, dtype)
    queries = [20] if name in ("q", "grad_out") else [20, 21, 22, 23]
    assert _bad_rows(g["q"]) == queries
    if name == "v":
        assert _bad_rows(out) == [20, 21, 22, 23]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
def test_nonfinite_inputs_match_reference(seed):
    """Random problems with inf, -inf or NaN planted in q, k, v, rpb, the additional tokens or
    the output gradient (the B tiles of all four P/dS products: V, K, Q and dO)."""
    c = random_case(seed, CUDA_HEAD_DIMS[:6], CUDA_HEAD_DIMS[:4], [(1, 1), (2, 2), (4, 2), (3, 1)],
                    max_pad={1: 40, 2: 8, 3: 3})  # fmt: skip
    dtype = SWEEP_DTYPES[seed % 3]
    t = make_inputs(c, dtype, seed)
    out_shape = (c["batch"], *c["shape"], c["heads"], c["dim_v"])
    gen = torch.Generator().manual_seed(seed + 1)
    t["grad_out"] = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype)
    rng = random.Random(seed)
    names = [n for n, x in t.items() if x is not None]
    for _ in range(1 + seed % 3):
        name = rng.choice(names)
        index = tuple(rng.randrange(n) for n in t[name].shape)
        t = poisoned(t, name, index, rng.choice([INF, -INF, NAN]))
    grad_out = t.pop("grad_out")
    check_nonfinite(c, t, grad_out, dtype, deterministic=seed % 2 == 1)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    "c",
    [
        make_case((24,), 5, heads=2, heads_kv=1, rpb=True),
        make_case((7, 9), (3, 4), causal=(False, True), heads=1, dim=16, dim_v=24, rpb=True),
    ],
    ids=["1d-gqa", "2d"],
)
def test_fully_masked_rows(c, dtype, deterministic):
    """Head 0's rpb is all -inf: its rows have every logit -inf. Output 0, LSE -inf, and the
    gradients of q, k, v and rpb are finite (0 for head 0's queries and bias): the dK/dV kernel
    must not form exp2(-inf - -inf) from the -inf logit and LSE of such a row."""
    t = make_inputs(c, dtype, 4)
    t["rpb"][0] = -INF
    out_shape = (c["batch"], *c["shape"], c["heads"], c["dim_v"])
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn(out_shape, generator=gen).to(dtype)
    grad_lse = torch.randn(out_shape[:-1], generator=gen)
    out, lse, g = check_nonfinite(c, t, grad_out, dtype, grad_lse, deterministic)
    assert (out[..., 0, :] == 0).all() and (lse[..., 0] == -INF).all()
    for name in ("q", "k", "v", "rpb"):
        assert torch.isfinite(g[name]).all(), name
    assert (g["q"][..., 0, :] == 0).all() and (g["rpb"][0] == 0).all()
    if c["heads"] == 1:
        assert (g["k"] == 0).all() and (g["v"] == 0).all()
