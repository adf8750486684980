"""The public linear-attention API: functions, decode steps, dispatch, modules.

Everything is compared with the per-token recurrences of
``tokenmix.linear_scan.reference``, so these tests hold whichever implementation
the public functions dispatch to (the fused CPU kernels when they are built, the
chunked pure-PyTorch scan otherwise).
"""

from __future__ import annotations

import doctest
import pathlib
import re
import types

import pytest
import torch
import torch.nn.functional as F
from tokenmix import linear_scan
from tokenmix.linear_scan import (
    GatedDeltaNet,
    LinearAttention,
    delta_rule,
    delta_rule_step,
    linear_attention,
    linear_attention_step,
    naive_delta_rule,
    naive_linear_attention,
)
from tokenmix.linear_scan import functional as functional_mod
from tokenmix.linear_scan.chunked import chunked_delta_scan, chunked_linear_scan

DECAYS = ("none", "g", "g_gamma", "gk")
VARIANTS = DECAYS + ("delta", "gated_delta")


def make_inputs(
    variant,
    batch=2,
    seq=70,
    heads=2,
    dim_k=24,
    dim_v=40,
    dtype=torch.float32,
    state=False,
    num_states=None,
    seed=0,
):
    """Keyword arguments of a ``linear_attention`` / ``delta_rule`` call."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    kw = {
        "q": randn(batch, seq, heads, dim_k),
        "k": randn(batch, seq, heads, dim_k),
        "v": randn(batch, seq, heads, dim_v),
    }
    if variant in ("delta", "gated_delta"):
        kw["k"] = F.normalize(kw["k"], dim=-1)
        kw["beta"] = torch.rand(batch, seq, heads, generator=gen)
    if variant in ("g", "gated_delta"):
        kw["g"] = F.logsigmoid(randn(batch, seq, heads) + 2.0)
    elif variant == "g_gamma":
        kw["g_gamma"] = F.logsigmoid(randn(heads) + 3.0)
    elif variant == "gk":
        kw["gk"] = F.logsigmoid(randn(batch, seq, heads, dim_k) + 3.0)
    if state:
        kw["initial_state"] = randn(
            batch if num_states is None else num_states, heads, dim_k, dim_v
        )
    return {n: t.to(dtype) for n, t in kw.items()}


def is_delta(variant):
    return variant in ("delta", "gated_delta")


def public(variant):
    return delta_rule if is_delta(variant) else linear_attention


def naive(variant):
    return naive_delta_rule if is_delta(variant) else naive_linear_attention


def run(fn, inputs, **options):
    """Output, final state and gradients of a random projection of both (float64)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    o, state = fn(**leaves, output_final_state=True, **options)
    gen = torch.Generator().manual_seed(1)
    w_o = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    w_s = torch.randn(state.shape, generator=gen, dtype=torch.float64)
    loss = (o.double() * w_o).sum() + (state.double() * w_s).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    result = {"o": o.detach().double(), "state": state.detach().double()}
    result.update({"d" + n: g.double() for n, g in zip(leaves, grads, strict=True)})
    return result


def assert_close(got, expected, rtol):
    assert set(got) == set(expected)
    for name, exp in expected.items():
        out = got[name]
        assert out.shape == exp.shape, name
        assert torch.isfinite(out).all(), name
        err = (out - exp).abs().max().item()
        bound = rtol * max(exp.abs().max().item(), 1.0)
        assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e}"


def oracle(variant, inputs, **options):
    """The recurrence in float64 on the same inputs."""
    return run(naive(variant), {n: t.double() for n, t in inputs.items()}, **options)


# --------------------------------------------------------------------------------------
# Public functions against the recurrence
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seq", [1, 63, 65])
def test_public_matches_reference(variant, seq):
    inputs = make_inputs(variant, seq=seq, state=True, seed=seq)
    assert_close(run(public(variant), inputs), oracle(variant, inputs), 1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_public_varlen(variant):
    cu = [0, 1, 65, 66, 140, 143]
    inputs = make_inputs(
        variant, batch=1, seq=cu[-1], dim_k=16, dim_v=8, state=True, num_states=len(cu) - 1
    )
    cu_t = torch.tensor(cu)
    assert_close(
        run(public(variant), inputs, cu_seqlens=cu_t),
        oracle(variant, inputs, cu_seqlens=cu_t),
        1e-4,
    )


def test_public_long_sequence():
    inputs = make_inputs("gated_delta", batch=1, seq=1000, heads=1, dim_k=8, dim_v=8, state=True)
    assert_close(run(delta_rule, inputs), oracle("gated_delta", inputs), 1e-4)
    inputs = make_inputs("gk", batch=1, seq=1000, heads=1, dim_k=8, dim_v=8)
    assert_close(run(linear_attention, inputs), oracle("gk", inputs), 1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
def test_public_low_precision(variant, dtype, rtol):
    inputs = make_inputs(variant, seq=70, dim_k=16, dim_v=16, state=True, dtype=dtype)
    got = run(public(variant), inputs)
    assert_close(got, oracle(variant, inputs), rtol)
    o, state = public(variant)(**inputs, output_final_state=True)
    assert o.dtype == dtype and state.dtype == torch.float32


@pytest.mark.parametrize("variant", ["g", "gk", "gated_delta"])
def test_float32_gates_with_bfloat16_inputs(variant):
    inputs = make_inputs(variant, seq=40, dim_k=16, dim_v=16, state=True)
    low = {n: t.to(torch.bfloat16) if n in ("q", "k", "v") else t for n, t in inputs.items()}
    got = run(public(variant), low)
    assert_close(got, oracle(variant, low), 8e-2)


@pytest.mark.parametrize("variant", ["none", "gk", "gated_delta"])
def test_float64(variant):
    inputs = make_inputs(variant, seq=70, state=True, dtype=torch.float64)
    got = run(public(variant), inputs)
    assert_close(got, oracle(variant, inputs), 1e-10)
    o, state = public(variant)(**inputs, output_final_state=True)
    assert o.dtype == torch.float64 and state.dtype == torch.float64


def test_final_state_optional_and_inputs_untouched():
    inputs = make_inputs("gk", state=True)
    before = {n: t.clone() for n, t in inputs.items()}
    o, state = linear_attention(**inputs)
    assert state is None and o.shape == (2, 70, 2, 40)
    o, state = delta_rule(**make_inputs("gated_delta", state=True))
    assert state is None
    for name, t in inputs.items():
        assert torch.equal(t, before[name]), name


def test_strided_inputs():
    # q, k, v as views of one fused projection, gates transposed in memory.
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 50, 3, 2, 16, generator=gen)
    q, k, v = qkv.unbind(2)
    gk = F.logsigmoid(torch.randn(2, 2, 50, 16, generator=gen)).transpose(1, 2)
    g = F.logsigmoid(torch.randn(2, 50, 2, generator=gen).mT.contiguous().mT)
    o, s = linear_attention(q, k, v, gk=gk, output_final_state=True)
    o_ref, s_ref = naive_linear_attention(q, k, v, gk=gk, output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)
    beta = torch.rand(2, 50, 2, generator=gen)
    kn = F.normalize(k, dim=-1)
    o, _ = delta_rule(q, kn, v, beta, g=g)
    torch.testing.assert_close(o, naive_delta_rule(q, kn, v, beta, g=g)[0], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# Bidirectional, normalize
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_public_bidirectional(normalize, varlen):
    inputs = make_inputs("none", batch=1 if varlen else 2, state=not normalize, num_states=2)
    if normalize:
        inputs["q"], inputs["k"] = F.elu(inputs["q"]) + 1, F.elu(inputs["k"]) + 1
    options = {"causal": False, "normalize": normalize}
    if varlen:
        options["cu_seqlens"] = torch.tensor([0, 30, 70])
    assert_close(run(linear_attention, inputs, **options), oracle("none", inputs, **options), 1e-4)


@pytest.mark.parametrize("variant", DECAYS)
@pytest.mark.parametrize("varlen", [False, True])
def test_public_normalize(variant, varlen):
    inputs = make_inputs(variant, batch=1 if varlen else 2, seq=100)
    inputs["q"], inputs["k"] = F.elu(inputs["q"]) + 1, F.elu(inputs["k"]) + 1
    options = {"normalize": True}
    if varlen:
        options["cu_seqlens"] = torch.tensor([0, 1, 70, 100])
    assert_close(run(linear_attention, inputs, **options), oracle(variant, inputs, **options), 1e-4)


def test_public_errors():
    inputs = make_inputs("g")
    with pytest.raises(ValueError, match="bidirectional"):
        linear_attention(**inputs, causal=False)
    with pytest.raises(ValueError, match="at most one of g, g_gamma and gk"):
        linear_attention(**inputs, g_gamma=torch.zeros(2))
    with pytest.raises(ValueError, match="initial_state"):
        # a normalized scan's state has V + 1 columns (the key sum rides along)
        linear_attention(**make_inputs("none", state=True), normalize=True)
    with pytest.raises(ValueError, match="not increasing|strictly increasing"):
        linear_attention(**make_inputs("none", batch=1), cu_seqlens=torch.tensor([0, 40, 40, 70]))
    with pytest.raises(ValueError, match="batch size must be 1"):
        delta_rule(**make_inputs("delta"), cu_seqlens=torch.tensor([0, 70]))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        delta_rule(**make_inputs("delta"), initial_state=torch.zeros(2, 2, 40, 24))


# --------------------------------------------------------------------------------------
# Decode steps
# --------------------------------------------------------------------------------------


def _token(inputs, t):
    """Per-token arguments of a step call (g_gamma is per head, not per token)."""
    return {n: x if n == "g_gamma" else x[:, t] for n, x in inputs.items() if n != "initial_state"}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prefill_then_steps_equals_scan(variant, dtype):
    inputs = make_inputs(variant, seq=70, state=True, dtype=dtype)
    prefix = 66
    full_o, full_s = public(variant)(**inputs, output_final_state=True)
    head = {n: x if n in ("g_gamma", "initial_state") else x[:, :prefix] for n, x in inputs.items()}
    o, state = public(variant)(**head, output_final_state=True)
    outs = [o]
    for t in range(prefix, 70):
        tok = _token(inputs, t)
        before = state.clone()
        if is_delta(variant):
            o_t, new_state = delta_rule_step(
                tok["q"], tok["k"], tok["v"], tok["beta"], state, g=tok.get("g")
            )
        else:
            o_t, new_state = linear_attention_step(
                tok["q"],
                tok["k"],
                tok["v"],
                state,
                **{n: tok[n] for n in ("g", "g_gamma", "gk") if n in tok},
            )
        assert torch.equal(state, before), "the step modified its input state"
        assert o_t.dtype == dtype and new_state.dtype == state.dtype
        outs.append(o_t[:, None])
        state = new_state
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(torch.cat(outs, 1), full_o, rtol=tol, atol=tol)
    torch.testing.assert_close(state, full_s, rtol=tol, atol=tol)


def test_steps_from_zero_state_and_varlen_prefill():
    # state=None starts from zeros; prefill of packed sequences gives one state each.
    inputs = make_inputs("gated_delta", batch=1, seq=50)
    cu = torch.tensor([0, 20, 50])
    _, states = delta_rule(**inputs, cu_seqlens=cu, output_final_state=True)
    o1, s1 = delta_rule(**{n: x[:, :20] for n, x in inputs.items()}, output_final_state=True)
    o2, s2 = delta_rule(**{n: x[:, 20:] for n, x in inputs.items()}, output_final_state=True)
    torch.testing.assert_close(states, torch.cat([s1, s2]), rtol=1e-5, atol=1e-5)
    tok = _token(inputs, 0)
    o, s = delta_rule_step(tok["q"], tok["k"], tok["v"], tok["beta"], None, g=tok["g"])
    torch.testing.assert_close(o, o1[:, 0], rtol=1e-5, atol=1e-5)
    o, s = linear_attention_step(tok["q"], tok["k"], tok["v"], None)
    torch.testing.assert_close(o, linear_attention(*(inputs[n][:, :1] for n in "qkv"))[0][:, 0])


def test_step_errors():
    q = torch.randn(2, 3, 4)
    v = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="state must have shape"):
        linear_attention_step(q, q, v, torch.zeros(2, 3, 5, 4))
    with pytest.raises(ValueError, match="q must be a 3-D"):
        linear_attention_step(q[None], q[None], v[None], None)
    with pytest.raises(ValueError, match="at most one"):
        linear_attention_step(q, q, v, None, g=torch.zeros(2, 3), gk=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="gk must have shape"):
        linear_attention_step(q, q, v, None, gk=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="beta must have shape"):
        delta_rule_step(q, q, v, torch.zeros(2, 3, 1), None)
    with pytest.raises(TypeError, match="beta must be a torch.Tensor"):
        delta_rule_step(q, q, v, None, None)


# --------------------------------------------------------------------------------------
# Dispatch to the fused kernels (a stand-in ops module checks the contract)
# --------------------------------------------------------------------------------------


def _fake_ops(calls, available=True):
    mod = types.ModuleType("tokenmix.linear_scan.ops")
    mod.kernels_available = lambda: available

    def fused_linear_scan(q, k, v, g, gk, initial_state, cu_seqlens, scale):
        calls.append(("linear", q, k, v, g, gk, initial_state, cu_seqlens, scale))
        return chunked_linear_scan(q, k, v, g, gk, initial_state, cu_seqlens, scale)

    def fused_delta_rule(q, k, v, beta, g, initial_state, cu_seqlens, scale):
        calls.append(("delta", q, k, v, beta, g, initial_state, cu_seqlens, scale))
        return chunked_delta_scan(q, k, v, beta, g, initial_state, cu_seqlens, scale)

    mod.fused_linear_scan = fused_linear_scan
    mod.fused_delta_rule = fused_delta_rule
    return mod


def test_dispatch_contract(monkeypatch):
    calls = []
    monkeypatch.setattr(functional_mod, "ops", _fake_ops(calls))
    assert linear_scan.fused_kernels_available()
    inputs = make_inputs("g_gamma", batch=1, seq=30, dtype=torch.bfloat16, state=True, num_states=2)
    inputs["g_gamma"] = inputs["g_gamma"].float()
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    o, s = linear_attention(**inputs, cu_seqlens=cu, output_final_state=True)
    ((_, q, k, v, g, gk, h0, cu_arg, scale),) = calls
    # g_gamma [H] arrives as a stride-0 [B, T, H] view in float32; gates, states in fp32.
    assert g.shape == (1, 30, 2) and g.stride(1) == 0 and g.dtype == torch.float32
    assert gk is None and h0.dtype == torch.float32 and q.dtype == torch.bfloat16
    assert cu_arg.dtype == torch.int64 and isinstance(scale, float)
    assert scale == pytest.approx(24**-0.5)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32

    calls.clear()
    inputs = make_inputs("gated_delta", dtype=torch.float16)
    delta_rule(**inputs, scale=0.3)
    ((_, q, k, v, beta, g, h0, cu_arg, scale),) = calls
    assert beta.dtype == torch.float32 and g.dtype == torch.float32
    assert h0 is None and cu_arg is None and scale == 0.3

    # normalize runs one scan over [v | 1] (the key sum as an extra value column).
    calls.clear()
    linear_attention(**make_inputs("none"), normalize=True)
    assert [c[3].shape[-1] for c in calls] == [41]

    # Bidirectional needs no scan.
    calls.clear()
    linear_attention(**make_inputs("none"), causal=False)
    assert calls == []


def test_dispatch_falls_back(monkeypatch):
    calls = []
    monkeypatch.setattr(functional_mod, "ops", _fake_ops(calls, False))
    assert not linear_scan.fused_kernels_available()
    linear_attention(**make_inputs("g"))
    assert calls == []
    inputs = make_inputs("gk", seq=20)
    torch.testing.assert_close(
        linear_attention(**inputs)[0], naive_linear_attention(**inputs)[0], rtol=1e-4, atol=1e-4
    )


def test_docstring_examples():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(functional_mod, "tokenmix.linear_scan.functional")
    assert sum(len(t.examples) for t in tests) > 0
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------

LINEAR_CONFIGS = [
    {"decay": None},
    {"decay": None, "feature_map": "elu+1", "normalize": True},
    {"decay": None, "feature_map": "relu", "causal": False},
    {"decay": "fixed"},
    {"decay": "scalar", "feature_map": "elu+1"},
    {"decay": "gated", "qkv_bias": True},
]


def _modules():
    torch.manual_seed(0)
    mods = [LinearAttention(32, 4, **cfg) for cfg in LINEAR_CONFIGS]
    mods += [
        GatedDeltaNet(32, 4),
        GatedDeltaNet(32, 2, head_dim=8, expand_v=2.0, use_gate=False, allow_neg_eigval=True),
    ]
    return mods


@pytest.mark.parametrize("index", range(len(LINEAR_CONFIGS) + 2))
def test_module_shapes_and_grads(index):
    module = _modules()[index]
    x = torch.randn(2, 67, 32, requires_grad=True)
    y, state = module(x)
    assert y.shape == x.shape and state is None
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    y, state = module(x, output_final_state=True)
    assert state.dtype == torch.float32 and state.shape[:2] == (2, module.num_heads)


def _decodes(module) -> bool:
    return getattr(module, "causal", True)


_ALL_MODULES = range(len(LINEAR_CONFIGS) + 2)
_DECODING = [i for i in _ALL_MODULES if _decodes(_modules()[i])]


@pytest.mark.parametrize("index", _DECODING)
def test_module_decoding_equals_full_sequence(index):
    module = _modules()[index]
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        full, full_state = module(x, output_final_state=True)
        y, state = module(x[:, :36], output_final_state=True)
        outs = [y]
        for t in range(36, 40):
            y, state = module(x[:, t : t + 1], state=state, output_final_state=True)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, full_state, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("index", [0, 3, 5, 6])
def test_module_varlen_equals_separate(index):
    module = _modules()[index]
    a, b = torch.randn(1, 30, 32), torch.randn(1, 45, 32)
    with torch.no_grad():
        packed, states = module(
            torch.cat([a, b], 1), output_final_state=True, cu_seqlens=torch.tensor([0, 30, 75])
        )
        ya, sa = module(a, output_final_state=True)
        yb, sb = module(b, output_final_state=True)
    torch.testing.assert_close(packed, torch.cat([ya, yb], 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(states, torch.cat([sa, sb]), rtol=1e-4, atol=1e-5)


def test_module_low_precision():
    for module in (LinearAttention(32, 4, decay="gated"), GatedDeltaNet(32, 4)):
        module = module.to(torch.bfloat16)
        y, s = module(torch.randn(2, 20, 32, dtype=torch.bfloat16), output_final_state=True)
        assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
        assert torch.isfinite(y.float()).all()


def test_module_errors():
    with pytest.raises(ValueError, match="bidirectional"):
        LinearAttention(32, 4, decay="scalar", causal=False)
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttention(32, 4, feature_map="softmax")
    with pytest.raises(ValueError, match="decay"):
        LinearAttention(32, 4, decay="exp")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        LinearAttention(30, 4)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        GatedDeltaNet(30, 4)
    with pytest.raises(ValueError, match="expects x of shape"):
        GatedDeltaNet(32, 4)(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="batch size 1"):
        LinearAttention(32, 4)(torch.randn(2, 5, 32), cu_seqlens=torch.tensor([0, 5]))
    module = LinearAttention(32, 4, normalize=True, feature_map="elu+1")
    with pytest.raises(ValueError, match="initial_state|state"):
        module(torch.randn(1, 5, 32), state=torch.zeros(1, 4, 8, 8))  # needs [.., K, V + 1]


@pytest.mark.parametrize("variant", ["g", "gated_delta"])
@pytest.mark.parametrize("batch,seq", [(0, 5), (2, 0)])
def test_empty_inputs(variant, batch, seq):
    inputs = make_inputs(variant, batch=batch, seq=seq, state=True)
    o, state = public(variant)(**inputs, output_final_state=True)
    assert o.shape == (batch, seq, 2, 40) and state.dtype == torch.float32
    torch.testing.assert_close(state, inputs["initial_state"])
    q = torch.zeros(0, 2, 8)
    o, s = linear_attention_step(q, q, torch.zeros(0, 2, 3), None)
    assert o.shape == (0, 2, 3) and s.shape == (0, 2, 8, 3)


def test_docs_examples_run():
    doc = pathlib.Path(__file__).resolve().parent.parent / "docs" / "linear_attention.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        exec(compile(block, f"linear_attention.md:block{i}", "exec"), {})


def test_infinite_log_decay_is_an_exact_reset():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 70, 2, 4, dtype=torch.float64) for _ in range(3))
    g = -torch.rand(1, 70, 2, dtype=torch.float64)
    for value in (float("-inf"), -100.0):
        reset = g.clone()
        reset[:, 10] = value
        o, _ = linear_attention(q, k, v, g=reset)
        o_tail, _ = naive_linear_attention(q[:, 10:], k[:, 10:], v[:, 10:], g=reset[:, 10:])
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o[:, 10:], o_tail, rtol=1e-10, atol=1e-10)
        o, _ = linear_attention(q, k, v, gk=reset[..., None].expand(1, 70, 2, 4))
        torch.testing.assert_close(o[:, 10:], o_tail, rtol=1e-10, atol=1e-10)


def test_gated_delta_net_float64_gradcheck():
    torch.manual_seed(0)
    layer = GatedDeltaNet(16, 2).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], [x])


@pytest.mark.parametrize("decay", ["none", "g", "gk"])
def test_normalized_prefill_then_steps_equals_full_scan(decay):
    torch.manual_seed(0)
    q, k, v = (torch.rand(2, 40, 2, 8, dtype=torch.float64) for _ in range(3))
    gates = {}
    if decay == "g":
        gates["g"] = -torch.rand(2, 40, 2, dtype=torch.float64)
    elif decay == "gk":
        gates["gk"] = -torch.rand(2, 40, 2, 8, dtype=torch.float64)
    full, full_state = linear_attention(q, k, v, normalize=True, output_final_state=True, **gates)
    ref, _ = naive_linear_attention(q, k, v, normalize=True, **gates)
    torch.testing.assert_close(full, ref)
    assert full_state.shape == (2, 2, 8, 9)  # [N, H, K, V + 1]
    o, state = linear_attention(
        q[:, :30],
        k[:, :30],
        v[:, :30],
        normalize=True,
        output_final_state=True,
        **{n: t[:, :30] for n, t in gates.items()},
    )
    outs = [o]
    for t in range(30, 40):
        o_t, state = linear_attention_step(
            q[:, t],
            k[:, t],
            v[:, t],
            state,
            normalize=True,
            **{n: x[:, t] for n, x in gates.items()},
        )
        outs.append(o_t[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full)
    torch.testing.assert_close(state, full_state)
    # and resuming the scan itself from the state
    o2, _ = linear_attention(
        q[:, 30:],
        k[:, 30:],
        v[:, 30:],
        normalize=True,
        initial_state=linear_attention(
            q[:, :30],
            k[:, :30],
            v[:, :30],
            normalize=True,
            output_final_state=True,
            **{n: t[:, :30] for n, t in gates.items()},
        )[1],
        **{n: t[:, 30:] for n, t in gates.items()},
    )
    torch.testing.assert_close(o2, full[:, 30:])


def test_compiled_graphs_check_cu_seqlens_on_the_device():
    # Inside a compiled graph the offsets are data: device-side asserts check them (the CUDA
    # ops never read them on the host), with the eager checks' rules.
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v, cu):
        return linear_attention(q, k, v, cu_seqlens=cu)[0]

    q, k, v = (torch.randn(1, 70, 2, 8) for _ in range(3))
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    compiled(q, k, v, torch.tensor([0, 5, 70]))
    assert graphs[0].code.count("_assert_async") >= 3
    with pytest.raises(RuntimeError, match="cu_seqlens must end at T"):
        compiled(q, k, v, torch.tensor([0, 5, 60]))
    with pytest.raises(RuntimeError, match="cu_seqlens must be strictly increasing"):
        compiled(q, k, v, torch.tensor([0, 50, 40, 70]))
