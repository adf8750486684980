"""tokenmix.compat.natten against the real NATTEN 0.21.7.

NATTEN's CPU path is PyTorch FlexAttention without torch.compile: it runs the forward in
float32, float16 and bfloat16, but not float64, and it has no backward on the CPU ("FlexAttention
does not support backward on CPU"). So:

* forward outputs and LSEs are compared with ``natten.na1d/na2d/na3d`` directly;
* gradients are compared with a dense float64 softmax reference whose mask is the very Flex
  ``mask_mod`` NATTEN built for that call (captured from ``natten.backends.flex``), and the
  reference's forward is checked against NATTEN's output too, so it stands for NATTEN.

Eager Flex traces every call with Dynamo (about a second per new window configuration);
``_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG`` runs the same dense Flex math without that tracing,
which makes the many random cases affordable. ``test_flex_shortcut_changes_nothing`` checks
that NATTEN's results are the same both ways.
"""

from __future__ import annotations

import inspect
import math
import pathlib
import random
import re
import warnings

import natten
import natten.backends.flex as natten_flex
import pytest
import torch
import torch.nn.attention.flex_attention as flex_attention_module
from natten.types import KernelSchedule
from tokenmix.compat import natten as shim
from torch.nn.attention.flex_attention import create_mask

pytestmark = pytest.mark.filterwarnings(
    # NATTEN's Flex calls on the CPU (noise, not about the code under test).
    "ignore:flex_attention called without torch",
    "ignore:return_lse is deprecated",
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOL = {
    torch.float32: dict(out=2e-5, lse=2e-5, grad=5e-5),
    torch.float16: dict(out=3e-3, lse=2e-3, grad=1e-2),
    torch.bfloat16: dict(out=2.5e-2, lse=1e-2, grad=6e-2),
}


@pytest.fixture(autouse=True)
def _fresh_warnings():
    shim._warned.clear()
    yield
    shim._warned.clear()


@pytest.fixture(autouse=True)
def _flex_without_dynamo(monkeypatch):
    monkeypatch.setattr(flex_attention_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


@pytest.mark.parametrize(
    "layout, kw",
    [
        ((13,), dict(kernel_size=4, stride=2, dilation=2, is_causal=True)),
        ((6, 9), dict(kernel_size=(3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(False, True))),
        ((4, 5, 4), dict(kernel_size=(2, 3, 2), is_causal=(True, False, False))),
    ],
)
def test_flex_shortcut_changes_nothing(monkeypatch, layout, kw):
    # NATTEN's results with Flex traced by Dynamo (what users run) and without (the tests).
    q, k, v = _qkv(2, *layout, 4, 8, heads_kv=2)
    ak, av = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    kw = dict(kw, additional_keys=ak, additional_values=av, return_lse=True)
    fn = getattr(natten, f"na{len(layout)}d")
    fast = fn(q, k, v, **kw)
    monkeypatch.setattr(flex_attention_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", False)
    traced = fn(q, k, v, **kw)
    for a, b in zip(fast, traced, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


# ---- a NATTEN-derived reference with gradients ---------------------------------------------


def _natten_forward(monkeypatch, fn, *args, **kwargs):
    """Calls a NATTEN function; returns its result and the Flex mask_mods it built."""
    masks = []
    original = natten_flex.get_na_flex_mask

    def spy(*a, **kw):
        block_mask = original(*a, **kw)
        masks.append(block_mask.mask_mod)
        return block_mask

    with monkeypatch.context() as m:
        m.setattr(natten_flex, "get_na_flex_mask", spy)
        result = fn(*args, **kwargs)
    return result, masks


def _dense_mask(mask_mods, tokens):
    """The element mask [tokens, tokens] of NATTEN's call (all keys when it built none: its
    self-attention fast path)."""
    if not mask_mods:
        return torch.ones(tokens, tokens, dtype=torch.bool)
    (mask_mod,) = mask_mods
    return create_mask(mask_mod, 1, 1, tokens, tokens, device="cpu")[0, 0]


def _reference(q, k, v, mask, scale, ak=None, av=None):
    """Dense softmax attention in float64: q [B, *S, H, D], k/v [B, *S, Hkv, D/Dv], mask
    [N, N] over the flattened tokens, extra tokens ak/av [B, M, Hkv, D/Dv] unmasked."""
    batch, *layout, heads, _ = q.shape
    heads_kv = k.shape[-2]

    def heads_first(t):
        return t.reshape(batch, -1, t.shape[-2], t.shape[-1]).transpose(1, 2).double()

    qf = heads_first(q)
    kf = heads_first(k).repeat_interleave(heads // heads_kv, dim=1)
    vf = heads_first(v).repeat_interleave(heads // heads_kv, dim=1)
    logits = (qf @ kf.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    if ak is not None:
        akf = heads_first(ak).repeat_interleave(heads // heads_kv, dim=1)
        avf = heads_first(av).repeat_interleave(heads // heads_kv, dim=1)
        logits = torch.cat([logits, qf @ akf.transpose(-1, -2) * scale], dim=-1)
        vf = torch.cat([vf, avf], dim=-2)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.exp(logits - lse.unsqueeze(-1)) @ vf
    out = out.transpose(1, 2).reshape(batch, *layout, heads, vf.shape[-1])
    return out, lse.transpose(1, 2).reshape(batch, *layout, heads)


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ---- the comparison of one case ------------------------------------------------------------


def _run_case(monkeypatch, case, dtype=torch.float32, seed=0):
    """Shim vs NATTEN forward (out, lse) and shim vs the NATTEN-mask reference backward.
    Returns the largest differences seen."""
    rank, layout, heads, heads_kv, dim, n_add, batch, kw = (
        case[x] for x in ("rank", "layout", "heads", "heads_kv", "dim", "n_add", "batch", "kw")
    )
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q = rand(batch, *layout, heads, dim)
    k = rand(batch, *layout, heads_kv, dim)
    v = rand(batch, *layout, heads_kv, dim)
    extra = {}
    if n_add:
        extra = dict(additional_keys=rand(batch, n_add, heads_kv, dim))
        extra["additional_values"] = rand(batch, n_add, heads_kv, dim)
    name = f"na{rank}d"
    (out_n, lse_n), masks = _natten_forward(
        monkeypatch, getattr(natten, name), q, k, v, **extra, **kw, return_lse=True
    )

    leaves = [t.clone().requires_grad_() for t in (q, k, v, *extra.values())]
    extra_s = dict(zip(extra, leaves[3:], strict=True))
    out_s, lse_s = getattr(shim, name)(*leaves[:3], **extra_s, **kw, return_lse=True)
    assert out_s.shape == out_n.shape and out_s.dtype == out_n.dtype
    assert lse_s.shape == lse_n.shape and lse_s.dtype == lse_n.dtype == torch.float32
    tol = TOL[dtype]
    diffs = dict(out=_max_diff(out_s, out_n), lse=_max_diff(lse_s, lse_n))
    assert diffs["out"] <= tol["out"], (case, diffs)
    assert diffs["lse"] <= tol["lse"], (case, diffs)

    tokens = math.prod(layout)
    mask = _dense_mask(masks, tokens)
    scale = kw.get("scale") or dim**-0.5
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    out_r, lse_r = _reference(*ref_leaves[:3], mask, scale, *ref_leaves[3:])
    # The reference is NATTEN's forward (so its gradients stand for NATTEN's).
    assert _max_diff(out_r, out_n) <= tol["out"] and _max_diff(lse_r, lse_n) <= tol["lse"]

    go = torch.randn(out_s.shape, generator=gen)
    gl = torch.randn(lse_s.shape, generator=gen)
    ((out_s.float() * go).sum() + (lse_s * gl).sum()).backward()
    ((out_r * go.double()).sum() + (lse_r * gl.double()).sum()).backward()
    grad_diff = 0.0
    for a, r in zip(leaves, ref_leaves, strict=True):
        assert a.grad is not None and a.grad.dtype == dtype
        scale_r = max(1.0, r.grad.abs().max().item())
        grad_diff = max(grad_diff, _max_diff(a.grad, r.grad) / scale_r)
    diffs["grad"] = grad_diff
    assert grad_diff <= tol["grad"], (case, diffs)
    return diffs


def _case(rank, layout, kw, heads=2, heads_kv=None, dim=16, n_add=0, batch=1):
    return dict(
        rank=rank,
        layout=tuple(layout),
        heads=heads,
        heads_kv=heads if heads_kv is None else heads_kv,
        dim=dim,
        n_add=n_add,
        batch=batch,
        kw=kw,
    )


def _random_cases(rank, count, seed):
    """Random valid NATTEN problems: odd and even kernels, strides up to the kernel,
    dilation, per-dimension causal masks, GQA/MQA, extra tokens, int or tuple arguments."""
    rng = random.Random(seed)
    max_size = {1: 24, 2: 10, 3: 6}[rank]
    cases = []
    for _ in range(count):
        layout, kernel, stride, dilation, causal = [], [], [], [], []
        for _ in range(rank):
            n = rng.randint(4, max_size)
            d = rng.choice([1, 1, 2])
            kernel.append(rng.randint(2, n // d))
            stride.append(rng.randint(1, kernel[-1]))
            dilation.append(d)
            causal.append(rng.random() < 0.35)
            layout.append(n)
        heads_kv = rng.choice([1, 2])
        n_add = rng.choice([0, 0, 3])
        if rank == 1 and kernel[0] == layout[0] and not n_add:
            causal[0] = False  # NATTEN's CPU path has no causal full attention (tested below)
        kw = dict(
            kernel_size=tuple(kernel),
            stride=tuple(stride),
            dilation=tuple(dilation),
            is_causal=tuple(causal),
        )
        for name in ("kernel_size", "stride", "dilation", "is_causal"):
            if len(set(kw[name])) == 1 and rng.random() < 0.5:
                kw[name] = kw[name][0]  # the int / bool form
        cases.append(
            _case(
                rank,
                layout,
                kw,
                heads=heads_kv * rng.choice([1, 2]),
                heads_kv=heads_kv,
                dim=rng.choice([8, 16]),
                n_add=n_add,
                batch=rng.choice([1, 2]),
            )
        )
    return cases


def _case_id(case):
    kw = ",".join(f"{k[:3]}={v}" for k, v in case["kw"].items())
    return (
        f"{case['rank']}d{list(case['layout'])}-{kw}-h{case['heads']}/{case['heads_kv']}"
        f"-add{case['n_add']}"
    ).replace(" ", "")


EXPLICIT_CASES = [
    _case(1, [16], dict(kernel_size=5, scale=0.0)),  # NATTEN: `scale or head_dim ** -0.5`
    _case(1, [16], dict(kernel_size=4, stride=4)),  # even kernel, blocked attention
    _case(1, [17], dict(kernel_size=4, dilation=3, is_causal=True, stride=2)),
    _case(1, [12], dict(kernel_size=12), n_add=3),  # NATTEN's self-attention fast path
    _case(1, [12], dict(kernel_size=12, is_causal=True), n_add=3),
    _case(2, [7, 12], dict(kernel_size=(3, 6), stride=(1, 3), dilation=(2, 1),
                           is_causal=(True, False))),
    _case(2, [6, 9], dict(kernel_size=(6, 9)), heads=4, heads_kv=1, n_add=4),  # fast path, MQA
    _case(2, [6, 9], dict(kernel_size=(6, 9), is_causal=(False, True)), heads=4, heads_kv=2),
    _case(2, [8, 8], dict(kernel_size=4, scale=0.37), batch=2),
    _case(3, [4, 5, 6], dict(kernel_size=(2, 3, 4), stride=(1, 2, 3), dilation=(2, 1, 1),
                             is_causal=(False, True, False))),
    _case(3, [4, 4, 5], dict(kernel_size=(4, 4, 5), scale=0), n_add=2),
]  # fmt: skip

RANDOM_CASES = (
    _random_cases(1, 40, seed=1) + _random_cases(2, 40, seed=2) + _random_cases(3, 20, seed=3)
)


@pytest.mark.parametrize("case", EXPLICIT_CASES + RANDOM_CASES, ids=_case_id)
def test_matches_natten_fp32(monkeypatch, case):
    _run_case(monkeypatch, case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "case",
    [
        _case(1, [20], dict(kernel_size=7, dilation=2, is_causal=True), heads=4, heads_kv=2),
        _case(2, [6, 10], dict(kernel_size=(3, 4), stride=(2, 1)), n_add=3, dim=32),
    ],
    ids=_case_id,
)
def test_matches_natten_half_precision(monkeypatch, case, dtype):
    # NATTEN's CPU path runs float16/bfloat16 forwards; the gradients are compared with the
    # float64 reference (relative to the largest gradient).
    _run_case(monkeypatch, case, dtype=dtype)


# ---- semantics NATTEN fixes that tokenmix's own API spells differently ----------------------


def _qkv(*shape, heads_kv=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, generator=gen, dtype=dtype)
    kv_shape = (*shape[:-2], heads_kv or shape[-2], shape[-1])
    k = torch.randn(*kv_shape, generator=gen, dtype=dtype)
    v = torch.randn(*kv_shape, generator=gen, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=3, scale=0.0),  # NATTEN: `scale or head_dim ** -0.5`
        dict(kernel_size=3, scale=None),
        dict(kernel_size=3, scale=1.7),
        dict(kernel_size=[3, 5], stride=None, dilation=None, is_causal=None),
        dict(kernel_size=(3, 5), stride=[2, 1], is_causal=[False, True]),
    ],
    ids=str,
)
def test_argument_forms_and_scale_follow_natten(kw):
    q, k, v = _qkv(1, 6, 7, 2, 16)
    out_n, lse_n = natten.na2d(q, k, v, **kw, return_lse=True)
    out_s, lse_s = shim.na2d(q, k, v, **kw, return_lse=True)
    assert _max_diff(out_s, out_n) <= 2e-5 and _max_diff(lse_s, lse_n) <= 2e-5


def test_positional_arguments_follow_natten_order():
    q, k, v = _qkv(1, 9, 10, 2, 8)
    ak, av = (torch.randn(1, 3, 2, 8) for _ in range(2))
    args = (q, k, v, (3, 4), (1, 2), (2, 1), (True, False), 0.5, ak, av)
    out_n = natten.na2d(*args)
    assert _max_diff(shim.na2d(*args), out_n) <= 2e-5


def test_rank_comes_from_the_tensors_like_natten():
    # NATTEN's na1d on 5-D tensors runs 2-D attention (the rank is the tensors'); so does the
    # shim, instead of refusing code that runs under NATTEN.
    q, k, v = _qkv(1, 6, 7, 2, 8)
    assert _max_diff(shim.na1d(q, k, v, kernel_size=3), natten.na1d(q, k, v, kernel_size=3)) < 2e-5
    with pytest.raises(ValueError):
        natten.na1d(q, k, v, kernel_size=(3,))
    with pytest.raises(ValueError):
        shim.na1d(q, k, v, kernel_size=(3,))


def test_value_head_dim_may_differ():
    # NATTEN's CPU (Flex) backend needs head_dim_v == head_dim; its CUDA backends and tokenmix
    # do not. Output channels are independent, so NATTEN with v zero-padded to head_dim gives
    # the same first channels.
    q, k, v = _qkv(2, 9, 10, 4, 16, heads_kv=2)
    v8 = v[..., :8].contiguous()
    ak, av = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    av8 = av[..., :8].contiguous()
    kw = dict(kernel_size=(3, 5), dilation=(2, 1), return_lse=True)
    pad = torch.nn.functional.pad
    out_n, lse_n = natten.na2d(
        q, k, pad(v8, (0, 8)), additional_keys=ak, additional_values=pad(av8, (0, 8)), **kw
    )
    out_s, lse_s = shim.na2d(q, k, v8, additional_keys=ak, additional_values=av8, **kw)
    assert out_s.shape == (2, 9, 10, 4, 8)
    assert _max_diff(out_s, out_n[..., :8]) <= 2e-5 and _max_diff(lse_s, lse_n) <= 2e-5


def test_float64_runs_where_natten_cpu_has_no_backend():
    q, k, v = _qkv(1, 20, 2, 8)
    with pytest.raises(NotImplementedError):
        natten.na1d(q.double(), k.double(), v.double(), kernel_size=5)
    out_s, lse_s = shim.na1d(q.double(), k.double(), v.double(), kernel_size=5, return_lse=True)
    out_n, lse_n = natten.na1d(q, k, v, kernel_size=5, return_lse=True)
    assert out_s.dtype == torch.float64 and lse_s.dtype == torch.float64
    assert _max_diff(out_s, out_n) <= 2e-6 and _max_diff(lse_s, lse_n) <= 2e-6


def test_causal_full_window_1d_is_causal_attention():
    # NATTEN sends 1-D kernel_size == seqlen to its causal FMHA, which its CPU path lacks; the
    # window rule gives the same causal attention, which the shim computes.
    q, k, v = _qkv(2, 12, 2, 8)
    with pytest.raises(NotImplementedError):
        natten.na1d(q, k, v, kernel_size=12, is_causal=True)
    out, lse = shim.na1d(q, k, v, kernel_size=12, is_causal=True, return_lse=True)
    mask = torch.ones(12, 12, dtype=torch.bool).tril()
    out_r, lse_r = _reference(q, k, v, mask, 8**-0.5)
    assert _max_diff(out, out_r) <= 2e-6 and _max_diff(lse, lse_r) <= 2e-6


# ---- attention, merge_attentions, layers ---------------------------------------------------


def test_attention_matches_natten():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 10, 4, 16, generator=gen)
    k, v = (torch.randn(2, 7, 2, 16, generator=gen) for _ in range(2))
    out_n, lse_n = natten.attention(q, k, v, return_lse=True, scale=0.0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out_s, lse_s = shim.attention(*leaves, return_lse=True, scale=0.0)
    assert _max_diff(out_s, out_n) <= 2e-5 and _max_diff(lse_s, lse_n) <= 2e-5
    assert out_s.dtype == out_n.dtype and lse_s.dtype == lse_n.dtype
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    # The reference takes [B, *S, H, D]; attention's Tq != Tk is one "1-D layout" per side.
    qf, kf, vf = ref
    logits = torch.einsum("bqhd,bkhd->bhqk", qf, kf.repeat_interleave(2, 2)) * 16**-0.5
    out_r = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), vf.repeat_interleave(2, 2))
    assert _max_diff(out_r, out_n) <= 2e-5
    go = torch.randn(out_s.shape, generator=gen)
    (out_s * go).sum().backward()
    (out_r * go.double()).sum().backward()
    for a, r in zip(leaves, ref, strict=True):
        assert _max_diff(a.grad, r.grad) <= 5e-5


def test_attention_value_head_dim_may_differ():
    # As for na*d: NATTEN's CPU backend needs head_dim_v == head_dim, tokenmix does not.
    q, k, v = _qkv(2, 9, 4, 16, heads_kv=2)
    k, v8 = k[:, :5], v[:, :5, :, :8]
    with pytest.raises(NotImplementedError):
        natten.attention(q, k, v8)
    out_n, lse_n = natten.attention(q, k, torch.nn.functional.pad(v8, (0, 8)), return_lse=True)
    out_s, lse_s = shim.attention(q, k, v8, return_lse=True)
    assert out_s.shape == (2, 9, 4, 8)
    assert _max_diff(out_s, out_n[..., :8]) <= 2e-5 and _max_diff(lse_s, lse_n) <= 2e-5


def test_attention_causal_equal_lengths():
    # NATTEN's CPU path has no causal FMHA; its CUDA backends do (query i sees keys <= i).
    q, k, v = _qkv(1, 9, 2, 8)
    with pytest.raises(NotImplementedError):
        natten.attention(q, k, v, is_causal=True)
    out, lse = shim.attention(q, k, v, is_causal=True, return_lse=True)
    out_r, lse_r = _reference(q, k, v, torch.ones(9, 9, dtype=torch.bool).tril(), 8**-0.5)
    assert _max_diff(out, out_r) <= 2e-6 and _max_diff(lse, lse_r) <= 2e-6


def test_merge_attentions_matches_natten():
    gen = torch.Generator().manual_seed(4)
    outs = [torch.randn(2, 5, 3, 8, generator=gen) for _ in range(3)]
    lses = [torch.randn(2, 5, 3, generator=gen) * 3 for _ in range(3)]
    out_n, lse_n = natten.merge_attentions(outs, lses, torch_compile=False, use_autograd_fix=False)
    out_s, lse_s = shim.merge_attentions(outs, lses)
    assert _max_diff(out_s, out_n) <= 1e-6 and _max_diff(lse_s, lse_n) <= 1e-6
    assert lse_s.dtype == lse_n.dtype
    half = [o.half() for o in outs]
    out_n, _ = natten.merge_attentions(half, lses, torch_compile=False, use_autograd_fix=False)
    assert shim.merge_attentions(half, lses)[0].dtype == out_n.dtype == torch.float16


def test_merge_attentions_gradients_are_exact():
    # Neighborhood attention + attention over extra tokens, merged, is neighborhood attention
    # with additional_keys/values: forward and gradients (plain autograd through the LSE).
    q, k, v = _qkv(1, 6, 7, 4, 8, heads_kv=2)
    ak, av = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
    a = [t.clone().requires_grad_() for t in (q, k, v, ak, av)]
    b = [t.clone().requires_grad_() for t in (q, k, v, ak, av)]
    out_a, lse_a = shim.na2d(*a[:3], kernel_size=3, return_lse=True)
    out_x, lse_x = shim.attention(a[0].flatten(1, 2), a[3], a[4], return_lse=True)
    out_m, lse_m = shim.merge_attentions([out_a.flatten(1, 2), out_x], [lse_a.flatten(1, 2), lse_x])
    out_b, lse_b = shim.na2d(
        *b[:3], kernel_size=3, additional_keys=b[3], additional_values=b[4], return_lse=True
    )
    assert _max_diff(out_m.reshape(out_b.shape), out_b) <= 2e-6
    assert _max_diff(lse_m.reshape(lse_b.shape), lse_b) <= 2e-6
    go, gl = torch.randn(out_b.shape), torch.randn(lse_b.shape)
    ((out_m.reshape(out_b.shape) * go).sum() + (lse_m.reshape(lse_b.shape) * gl).sum()).backward()
    ((out_b * go).sum() + (lse_b * gl).sum()).backward()
    for x, y in zip(a, b, strict=True):
        assert _max_diff(x.grad, y.grad) <= 1e-5


def test_merge_attentions_empty_rows_are_zero():
    outs = [torch.randn(1, 2, 1, 4) for _ in range(2)]
    lses = [torch.tensor([[[0.5], [float("-inf")]]]), torch.full((1, 2, 1), float("-inf"))]
    out, lse = shim.merge_attentions(outs, lses)
    assert torch.equal(out[0, 1], torch.zeros(1, 4)) and lse[0, 1, 0] == float("-inf")
    assert torch.allclose(out[0, 0], outs[0][0, 0]) and lse[0, 0, 0] == 0.5


@pytest.mark.parametrize(
    "rank, layout, kw",
    [
        (1, (14,), dict(kernel_size=5, dilation=2, is_causal=True)),
        (2, (6, 9), dict(kernel_size=(3, 4), stride=(1, 2), qkv_bias=False, qk_scale=0.2)),
        (3, (4, 5, 4), dict(kernel_size=(2, 3, 3), is_causal=(True, False, False))),
    ],
)
def test_layers_load_natten_weights_and_match(monkeypatch, rank, layout, kw):
    torch.manual_seed(5)
    layer_n = getattr(natten, f"NeighborhoodAttention{rank}D")(embed_dim=16, num_heads=2, **kw)
    layer_s = getattr(shim, f"NeighborhoodAttention{rank}D")(embed_dim=16, num_heads=2, **kw)
    layer_s.load_state_dict(layer_n.state_dict())  # same parameter names and shapes
    assert repr(layer_s) == repr(layer_n).replace("natten.", "")
    x = torch.randn(2, *layout, 16)
    with torch.no_grad():  # NATTEN has no CPU backward
        y_n, masks = _natten_forward(monkeypatch, layer_n, x)
    y_s = layer_s(x)
    assert _max_diff(y_s, y_n) <= 2e-5
    # Gradients: the same layer with the reference attention over NATTEN's mask.
    y_s.square().sum().backward()
    q, k, v = layer_n.qkv(x).reshape(2, *layout, 3, 2, 8).unbind(rank + 1)
    out_r, _ = _reference(q, k, v, _dense_mask(masks, math.prod(layout)), layer_n.scale)
    layer_n.proj(out_r.float().reshape(2, *layout, 16)).square().sum().backward()
    for (name, p_s), p_n in zip(layer_s.named_parameters(), layer_n.parameters(), strict=True):
        assert _max_diff(p_s.grad, p_n.grad) <= 1e-4 * max(1.0, p_n.grad.abs().max()), name


# ---- signatures ----------------------------------------------------------------------------

PUBLIC = [
    "na1d",
    "na2d",
    "na3d",
    "attention",
    "merge_attentions",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
]


@pytest.mark.parametrize("name", PUBLIC)
def test_signature_matches_natten(name):
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(getattr(shim, name)) == params(getattr(natten, name))
    assert getattr(shim, name).__doc__


def test_exports():
    assert natten.__version__ == shim._NATTEN_VERSION
    assert set(shim.__all__) == set(PUBLIC) | {"NattenCompatWarning"}
    # Every name the shim exports from NATTEN's namespace exists there.
    assert all(hasattr(natten, name) for name in PUBLIC)


# ---- errors: the kinds NATTEN raises --------------------------------------------------------


def _bad_calls():
    """what -> (error, function name, positional args, keyword args)."""
    q, k, v = _qkv(1, 6, 8, 2, 8)
    ak, av = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
    add = dict(additional_keys=ak, additional_values=av)
    lens = torch.tensor([3], dtype=torch.int32)
    value_error, not_implemented, type_error = ValueError, NotImplementedError, TypeError
    calls = {}

    def na(what, error, tensors=(q, k, v), fn="na2d", **kw):
        calls[what] = (error, fn, tensors, {"kernel_size": 3, **kw})

    def other(what, error, fn, args, **kw):
        calls[what] = (error, fn, args, kw)

    na("kernel_size=1", value_error, kernel_size=1)
    na("kernel_size=3.0", value_error, kernel_size=3.0)
    na("kernel_size of the wrong length", value_error, kernel_size=(3,))
    na("kernel_size > input", value_error, kernel_size=(7, 3))
    na("kernel_size * dilation > input", value_error, dilation=(3, 1))
    na("stride > kernel_size", value_error, stride=(1, 4))
    na("stride=0", value_error, stride=0)
    na("dilation=0", value_error, dilation=0)
    na("is_causal=1", value_error, is_causal=1)
    na("is_causal of the wrong length", value_error, is_causal=(True,))
    na("dtype mismatch", value_error, (q, k.half(), v))
    na("batch mismatch", value_error, (q, k.repeat(2, 1, 1, 1, 1), v))
    na("layout mismatch", value_error, (q, k[:, :5], v))
    na("head dim mismatch", value_error, (q, k[..., :4], v))
    na("heads not divisible", value_error, (q.repeat(1, 1, 1, 2, 1)[..., :3, :], k, v))
    na("k/v heads differ", value_error, (q, k, v[..., :1, :]))
    na("3-D tensors", value_error, (q[0, 0], k[0, 0], v[0, 0]), fn="na1d")
    na("additional_keys alone", value_error, additional_keys=ak)
    na("additional head dim", value_error, additional_keys=ak[..., :4], additional_values=av)
    na(
        "additional batch",
        value_error,
        additional_keys=ak.repeat(2, 1, 1, 1),
        additional_values=av.repeat(2, 1, 1, 1),
    )
    na("additional token counts", value_error, additional_keys=ak[:, :2], additional_values=av)
    na("kernel_schedule='xx'", value_error, kernel_schedule="xx")
    na("backend='foo'", not_implemented, backend="foo")
    na("backend='cutlass-fmha' (an FMHA backend)", not_implemented, backend="cutlass-fmha")
    na("q_tile_shape alone", value_error, q_tile_shape=(8, 8))
    na("tile shapes of the wrong rank", value_error, q_tile_shape=(64,), kv_tile_shape=(64,))
    na("attention_kwargs sets scale", type_error, **add, attention_kwargs={"scale": 1.0})
    na("attention_kwargs unknown key", type_error, **add, attention_kwargs={"bogus": 1})
    na("attention_kwargs not a dict", type_error, **add, attention_kwargs=[("backend", None)])
    na(
        "attention_kwargs varlen",
        not_implemented,
        **add,
        attention_kwargs={"seqlens_Q": lens * 16, "seqlens_KV": lens},
    )
    # NATTEN's self-attention shortcut (the window is the whole input) passes attention_kwargs
    # to natten.attention too, also without additional tokens.
    full = dict(kernel_size=(6, 8))
    na("full window: attention_kwargs unknown key", type_error, **full, attention_kwargs={"x": 1})
    na(
        "full window: attention_kwargs sets return_lse",
        type_error,
        **full,
        attention_kwargs={"return_lse": True},
    )
    na("full window: attention_kwargs not a dict", type_error, **full, attention_kwargs=[("a", 1)])
    na(
        "full window: attention_kwargs FNA backend",
        not_implemented,
        **full,
        attention_kwargs={"backend": "flex-fna"},
    )
    na(
        "full window: attention_kwargs q_tile_size alone",
        value_error,
        **full,
        attention_kwargs={"q_tile_size": 64},
    )
    na(
        "1-D full window: attention_kwargs unknown key",
        type_error,
        (ak, ak, av),
        fn="na1d",
        attention_kwargs={"bogus": 1},
    )
    na("fp8", not_implemented, tuple(t.to(torch.float8_e4m3fn) for t in (q, k, v)))
    other("attention rank 5", value_error, "attention", (q, k, v))
    other("attention k/v lengths", value_error, "attention", (ak, ak, av[:, :2]))
    other(
        "attention backend='flex-fna'",
        not_implemented,
        "attention",
        (ak, ak, av),
        backend="flex-fna",
    )
    other("attention q_tile_size alone", value_error, "attention", (ak, ak, av), q_tile_size=64)
    other(
        "attention varlen",
        not_implemented,
        "attention",
        (ak, ak, av),
        seqlens_Q=lens,
        seqlens_KV=lens,
    )
    other(
        "attention causal, unequal lengths",
        not_implemented,
        "attention",
        (ak, ak[:, :2], av[:, :2]),
        is_causal=True,
    )
    lse = ak[..., 0]
    other("merge one output", value_error, "merge_attentions", ([ak], [lse]))
    other("merge counts differ", value_error, "merge_attentions", ([ak, ak], [lse]))
    other("merge shapes differ", value_error, "merge_attentions", ([ak, ak[:, :2]], [lse, lse]))
    other("merge lse shape", value_error, "merge_attentions", ([ak, ak], [ak, ak]))
    return calls


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("what", list(BAD_CALLS))
def test_errors_have_natten_kinds(what):
    error, name, args, kw = BAD_CALLS[what]
    with pytest.raises(Exception) as from_natten:
        getattr(natten, name)(*args, **kw)
    with pytest.raises(Exception) as from_shim:
        getattr(shim, name)(*args, **kw)
    assert from_natten.type is error, from_natten.value
    assert from_shim.type is error, from_shim.value


def test_error_messages_name_the_argument():
    q, k, v = _qkv(1, 6, 8, 2, 8)
    cases = {
        "backend": dict(backend="foo"),
        "kernel_schedule": dict(kernel_schedule="fast"),
        "q_tile_shape": dict(q_tile_shape=(8, 8, 8), kv_tile_shape=(8, 8)),
        "kv_tile_shape": dict(kv_tile_shape=(8, 8)),
        "backward_kv_splits": dict(backward_kv_splits=[2, 2]),
        "backward_q_tile_shape": dict(backward_q_tile_shape=(0, 8), backward_kv_tile_shape=(8, 8)),
        "kernel_size": dict(kernel_size=1),
        "stride": dict(stride=(1, 2, 3)),
        "dilation": dict(dilation=-1),
        "is_causal": dict(is_causal="yes"),
    }
    for name, kw in cases.items():
        kw = {"kernel_size": 3, **kw}
        with pytest.raises((ValueError, NotImplementedError), match=name):
            shim.na2d(q, k, v, **kw)
    with pytest.raises(NotImplementedError, match="seqlens_Q, seqlens_KV"):
        shim.attention(q[0], k[0], v[0], seqlens_Q=torch.tensor([8]), seqlens_KV=torch.tensor([8]))


# ---- accepted-but-inapplicable arguments: one warning each, same result ---------------------

IGNORED = {
    "backend": dict(backend="cutlass-fna"),
    "q_tile_shape": dict(q_tile_shape=(4, 8), kv_tile_shape=(4, 8)),
    "backward_kv_tile_shape": dict(backward_q_tile_shape=(8, 8), backward_kv_tile_shape=(8, 8)),
    "backward_kv_splits": dict(backward_kv_splits=(2, 1)),
    "backward_use_pt_reduction": dict(backward_use_pt_reduction=True),
    "run_persistent_kernel": dict(run_persistent_kernel=False),
    "kernel_schedule": dict(kernel_schedule="coop"),
    "kernel_schedule=KernelSchedule": dict(kernel_schedule=KernelSchedule.WarpSpecializedPingpong),
    "torch_compile": dict(torch_compile=True),
    "attention_kwargs.backend": dict(attention_kwargs={"backend": "flex-fmha"}),
    "attention_kwargs.q_tile_size": dict(attention_kwargs={"q_tile_size": 64, "kv_tile_size": 64}),
}


def _warned_names(record):
    return [str(r.message).split(": ", 1)[1].split("=", 1)[0] for r in record]


@pytest.mark.parametrize("what", list(IGNORED))
def test_inapplicable_arguments_warn_once_and_change_nothing(what):
    q, k, v = _qkv(1, 8, 8, 2, 8)
    ak, av = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
    base = dict(kernel_size=3, additional_keys=ak, additional_values=av, return_lse=True)
    expected = shim.na2d(q, k, v, **base)
    with pytest.warns(shim.NattenCompatWarning) as record:
        got = shim.na2d(q, k, v, **base, **IGNORED[what])
    prefix = "attention_kwargs." if what.startswith("attention_kwargs") else ""
    given = IGNORED[what].get("attention_kwargs", IGNORED[what])
    # One warning per argument given, naming it and saying that it is ignored and why.
    assert sorted(_warned_names(record)) == sorted(prefix + name for name in given)
    assert all("is ignored: " in str(r.message) for r in record)
    assert all(r.filename == __file__ for r in record)  # points at the caller's line
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", shim.NattenCompatWarning)
        shim.na2d(q, k, v, **base, **IGNORED[what])  # once per process


def test_attention_inapplicable_arguments_warn():
    q, k, v = _qkv(1, 6, 2, 8)
    expected = shim.attention(q, k, v)
    for kw in (
        dict(backend="flex-fmha"),
        dict(q_tile_size=32, kv_tile_size=32),
        dict(backward_q_tile_size=32, backward_kv_tile_size=32),
        dict(backward_kv_splits=2),
        dict(torch_compile=True),
        dict(kernel_schedule="pp"),
    ):
        with pytest.warns(shim.NattenCompatWarning) as record:
            assert torch.equal(shim.attention(q, k, v, **kw), expected)
        assert sorted(_warned_names(record)) == sorted(kw)


# ---- arguments NATTEN does not use in a call: accepted, as NATTEN accepts them -------------

# attention_kwargs that NATTEN's attention() (and so the shim) refuses where NATTEN uses them.
UNUSABLE_ATTENTION_KWARGS = {
    "unknown key": {"bogus": 1},
    "sets scale": {"scale": 1.0},
    "not a dict": [("backend", None)],
    "varlen": {"seqlens_Q": torch.tensor([3]), "seqlens_KV": torch.tensor([3])},
    "FNA backend": {"backend": "flex-fna"},
    "q_tile_size alone": {"q_tile_size": 64},
}
# Calls where NATTEN never passes attention_kwargs to attention(): no additional tokens and a
# window smaller than the input (or causal along a dimension, 2-D/3-D).
UNUSED_ATTENTION_KWARGS_CALLS = {
    "2-D": ("na2d", (1, 6, 8, 2, 8), dict(kernel_size=3, dilation=(2, 1))),
    "2-D full window, causal along Y": ("na2d", (1, 6, 8, 2, 8),
                                        dict(kernel_size=(6, 8), is_causal=(False, True))),
    "1-D": ("na1d", (2, 12, 2, 8), dict(kernel_size=5, stride=2, is_causal=True)),
    "3-D": ("na3d", (1, 4, 5, 6, 2, 8), dict(kernel_size=(2, 3, 4))),
}  # fmt: skip


@pytest.mark.parametrize("call", list(UNUSED_ATTENTION_KWARGS_CALLS))
@pytest.mark.parametrize("attention_kwargs", list(UNUSABLE_ATTENTION_KWARGS))
def test_attention_kwargs_natten_does_not_use_are_accepted(call, attention_kwargs):
    # NATTEN reads attention_kwargs only with additional tokens or for a whole-input window;
    # elsewhere any value runs under NATTEN, so it must run under the shim: ignored, with a
    # warning that names it, and the same result.
    name, shape, kw = UNUSED_ATTENTION_KWARGS_CALLS[call]
    given = UNUSABLE_ATTENTION_KWARGS[attention_kwargs]
    q, k, v = _qkv(*shape)
    kw = dict(kw, return_lse=True)
    out_n, lse_n = getattr(natten, name)(q, k, v, **kw, attention_kwargs=given)
    expected = getattr(shim, name)(q, k, v, **kw)
    with pytest.warns(shim.NattenCompatWarning) as record:
        got = getattr(shim, name)(q, k, v, **kw, attention_kwargs=given)
    assert _warned_names(record) == ["attention_kwargs"]
    assert "NATTEN ignores it in this call too" in str(record[0].message)
    assert record[0].filename == __file__
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert _max_diff(got[0], out_n) <= 2e-5 and _max_diff(got[1], lse_n) <= 2e-5


@pytest.mark.parametrize("falsy", [[], 0, (), {}], ids=repr)
@pytest.mark.parametrize("where", ["additional tokens", "full window"])
def test_falsy_attention_kwargs_mean_none_like_natten(falsy, where):
    # NATTEN calls attention(..., **(attention_kwargs or {})).
    q, k, v = _qkv(1, 6, 8, 2, 8)
    if where == "full window":
        kw = dict(kernel_size=(6, 8))
    else:
        ak, av = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
        kw = dict(kernel_size=3, additional_keys=ak, additional_values=av)
    out_n = natten.na2d(q, k, v, **kw, attention_kwargs=falsy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", shim.NattenCompatWarning)
        out_s = shim.na2d(q, k, v, **kw, attention_kwargs=falsy)
    assert torch.equal(out_s, shim.na2d(q, k, v, **kw))
    assert _max_diff(out_s, out_n) <= 2e-5


FULL_WINDOW_UNCHECKED = {
    "backend": dict(backend="cutlass-fmha"),  # an FMHA name: NotImplementedError elsewhere
    "q_tile_shape": dict(q_tile_shape=(8, 8)),  # without kv_tile_shape: ValueError elsewhere
    "backward_q_tile_shape": dict(backward_q_tile_shape=(0, 8), backward_kv_tile_shape=(8, 8)),
    "backward_kv_splits": dict(backward_kv_splits=(2, 2, 2)),
}


@pytest.mark.parametrize("additional", [False, True], ids=["alone", "additional tokens"])
@pytest.mark.parametrize("what", list(FULL_WINDOW_UNCHECKED))
def test_full_window_does_not_check_fna_arguments_like_natten(what, additional):
    # For a whole-input window NATTEN calls natten.attention and never reads the FNA
    # kernel-choice arguments: values it would refuse elsewhere run, so the shim accepts them
    # (ignored, with a warning) and gives the same result.
    q, k, v = _qkv(1, 6, 8, 2, 8)
    kw = dict(kernel_size=(6, 8), return_lse=True)
    if additional:
        kw.update(
            additional_keys=torch.randn(1, 3, 2, 8), additional_values=torch.randn(1, 3, 2, 8)
        )
    given = FULL_WINDOW_UNCHECKED[what]
    out_n, lse_n = natten.na2d(q, k, v, **kw, **given)
    expected = shim.na2d(q, k, v, **kw)
    with pytest.warns(shim.NattenCompatWarning) as record:
        got = shim.na2d(q, k, v, **kw, **given)
    assert sorted(_warned_names(record)) == sorted(given)
    assert all("the neighborhood is the whole input" in str(r.message) for r in record)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert _max_diff(got[0], out_n) <= 2e-5 and _max_diff(got[1], lse_n) <= 2e-5
    with pytest.raises((ValueError, NotImplementedError)):  # checked where NATTEN checks them
        shim.na2d(q, k, v, **dict(kw, kernel_size=(6, 7)), **given)


def test_defaults_do_not_warn():
    q, k, v = _qkv(1, 6, 8, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shim.na2d(q, k, v, kernel_size=3, run_persistent_kernel=True, attention_kwargs={})
        shim.attention(q[0], k[0], v[0], max_seqlen_Q=0, max_seqlen_KV=0)
        shim.merge_attentions([q[0], k[0]], [q[0, ..., 0], k[0, ..., 0]])


# ---- docs ----------------------------------------------------------------------------------


def test_docs_example_runs():
    text = (ROOT / "docs" / "compat.md").read_text()
    section = text.split("## NATTEN", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "docs/compat.md's NATTEN section has no python example"
    for block in blocks:
        exec(compile(block, "docs/compat.md:natten", "exec"), {})
