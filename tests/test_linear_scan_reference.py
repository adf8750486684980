"""The chunked pure-PyTorch linear scans against the per-token recurrences.

``tokenmix.linear_scan.reference`` is the definition; ``tokenmix.linear_scan.chunked``
must agree with it on outputs, final states and every gradient, for every decay kind,
sequence lengths around the chunk size, packed (varlen) batches, initial states and
dtypes, and must stay finite at long lengths with strong decays. Argument errors
are checked here too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenmix.linear_scan import chunked_delta_rule, chunked_linear_attention
from tokenmix.linear_scan.reference import naive_delta_rule, naive_linear_attention

DECAYS = ("none", "g", "g_gamma", "gk")


def make_inputs(
    batch=2,
    seq=65,
    heads=2,
    dim_k=24,
    dim_v=40,
    decay="none",
    strength="weak",
    dtype=torch.float64,
    state=False,
    num_states=None,
    delta=False,
    seed=0,
):
    """Random inputs as keyword arguments of the linear-attention / delta-rule calls."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def log_decay(*shape):
        if strength == "strong":  # exp(g) in [exp(-6), exp(-1)]
            return -1.0 - 5.0 * torch.rand(*shape, generator=gen, dtype=torch.float64)
        return F.logsigmoid(randn(*shape) + 3.0) / 4.0  # close to 1

    kw = {
        "q": randn(batch, seq, heads, dim_k),
        "k": randn(batch, seq, heads, dim_k),
        "v": randn(batch, seq, heads, dim_v),
    }
    if delta:
        kw["k"] = F.normalize(kw["k"], dim=-1)
        kw["beta"] = torch.rand(batch, seq, heads, generator=gen, dtype=torch.float64)
    if decay == "g":
        kw["g"] = log_decay(batch, seq, heads)
    elif decay == "g_gamma":
        kw["g_gamma"] = log_decay(heads)
    elif decay == "gk":
        kw["gk"] = log_decay(batch, seq, heads, dim_k)
    if state:
        n = batch if num_states is None else num_states
        kw["initial_state"] = randn(n, heads, dim_k, dim_v)
    return {name: t.to(dtype) for name, t in kw.items()}


def run(fn, inputs: dict, grads: bool = True, **options):
    """Call ``fn``; return the output, the final state and the gradients of a random
    projection of both with respect to every tensor input (computed in float64)."""
    leaves = {n: t.detach().clone().requires_grad_(grads) for n, t in inputs.items()}
    o, state = fn(**leaves, output_final_state=True, **options)
    result = {"o": o.detach().double(), "state": state.detach().double()}
    if grads:
        gen = torch.Generator().manual_seed(123)
        w_o = torch.randn(o.shape, generator=gen, dtype=torch.float64)
        w_s = torch.randn(state.shape, generator=gen, dtype=torch.float64)
        loss = (o.double() * w_o).sum() + (state.double() * w_s).sum()
        names = list(leaves)
        for name, grad in zip(names, torch.autograd.grad(loss, list(leaves.values())), strict=True):
            result["d" + name] = grad.double()
    return result


def assert_close(got: dict, expected: dict, rtol: float, atol: float = 0.0):
    assert set(got) == set(expected)
    for name, exp in expected.items():
        out = got[name]
        assert out.shape == exp.shape, name
        assert torch.isfinite(out).all(), name
        err = (out - exp).abs().max().item()
        bound = atol + rtol * max(exp.abs().max().item(), 1.0)
        assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e}"


# --------------------------------------------------------------------------------------
# Chunked == naive, float64, tight
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [1, 2, 63, 64, 65])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("state", [False, True])
def test_linear_chunked_matches_naive(seq, decay, state):
    inputs = make_inputs(seq=seq, decay=decay, state=state, seed=seq)
    assert_close(run(chunked_linear_attention, inputs), run(naive_linear_attention, inputs), 1e-10)


@pytest.mark.parametrize("seq", [1, 2, 63, 64, 65])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("state", [False, True])
def test_delta_chunked_matches_naive(seq, gated, state):
    inputs = make_inputs(seq=seq, decay="g" if gated else "none", state=state, delta=True)
    assert_close(run(chunked_delta_rule, inputs), run(naive_delta_rule, inputs), 1e-10)


@pytest.mark.parametrize("decay", DECAYS)
def test_linear_strong_decay(decay):
    inputs = make_inputs(seq=100, decay=decay, strength="strong", state=True)
    assert_close(run(chunked_linear_attention, inputs), run(naive_linear_attention, inputs), 1e-10)


def test_delta_strong_decay_unnormalized_keys():
    inputs = make_inputs(seq=100, decay="g", strength="strong", state=True, delta=True)
    inputs["k"] = inputs["k"] * 1.5  # |beta k k^T| up to 2.25: still exact algebra
    assert_close(run(chunked_delta_rule, inputs), run(naive_delta_rule, inputs), 1e-9)


@pytest.mark.parametrize("decay", ["g", "gk"])
def test_linear_long_sequence(decay):
    # T=1000: many chunks; small dims keep the per-token loop fast.
    inputs = make_inputs(batch=1, seq=1000, heads=1, dim_k=8, dim_v=8, decay=decay, state=True)
    assert_close(run(chunked_linear_attention, inputs), run(naive_linear_attention, inputs), 1e-9)


def test_delta_long_sequence():
    inputs = make_inputs(
        batch=1, seq=1000, heads=1, dim_k=8, dim_v=8, decay="g", state=True, delta=True
    )
    assert_close(run(chunked_delta_rule, inputs), run(naive_delta_rule, inputs), 1e-9)


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("chunk_size,subchunk_size", [(16, 4), (8, 8), (32, 1)])
def test_linear_other_chunk_sizes(decay, chunk_size, subchunk_size):
    inputs = make_inputs(seq=70, dim_k=8, dim_v=12, decay=decay, state=True)
    got = run(
        chunked_linear_attention,
        inputs,
        chunk_size=chunk_size,
        subchunk_size=subchunk_size,
    )
    assert_close(got, run(naive_linear_attention, inputs), 1e-10)


@pytest.mark.parametrize("chunk_size", [1, 7, 16])
def test_delta_other_chunk_sizes(chunk_size):
    inputs = make_inputs(seq=40, dim_k=8, dim_v=12, decay="g", state=True, delta=True)
    got = run(chunked_delta_rule, inputs, chunk_size=chunk_size)
    assert_close(got, run(naive_delta_rule, inputs), 1e-10)


# --------------------------------------------------------------------------------------
# Packed sequences
# --------------------------------------------------------------------------------------

# Lengths 1, 64, 1, 65, 70 and 3: single tokens, exact chunks, chunk crossings.
CU_SEQLENS = [0, 1, 65, 66, 131, 201, 204]


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("state", [False, True])
def test_linear_varlen(decay, state):
    n = len(CU_SEQLENS) - 1
    inputs = make_inputs(
        batch=1, seq=CU_SEQLENS[-1], decay=decay, state=state, num_states=n, dim_k=16, dim_v=8
    )
    cu = torch.tensor(CU_SEQLENS)
    expected = run(naive_linear_attention, inputs, cu_seqlens=cu)
    assert_close(run(chunked_linear_attention, inputs, cu_seqlens=cu), expected, 1e-10)
    # Every packed sequence equals the same sequence run on its own.
    for i in range(n):
        s, e = CU_SEQLENS[i], CU_SEQLENS[i + 1]
        alone = {
            name: (
                t[i : i + 1] if name == "initial_state" else t if name == "g_gamma" else t[:, s:e]
            )
            for name, t in inputs.items()
        }
        single = run(chunked_linear_attention, alone, grads=False)
        torch.testing.assert_close(single["o"], expected["o"][:, s:e], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            single["state"], expected["state"][i : i + 1], rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("gated", [False, True])
def test_delta_varlen(gated):
    n = len(CU_SEQLENS) - 1
    inputs = make_inputs(
        batch=1,
        seq=CU_SEQLENS[-1],
        decay="g" if gated else "none",
        state=True,
        num_states=n,
        delta=True,
        dim_k=16,
        dim_v=8,
    )
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    assert_close(
        run(chunked_delta_rule, inputs, cu_seqlens=cu),
        run(naive_delta_rule, inputs, cu_seqlens=cu),
        1e-10,
    )


# --------------------------------------------------------------------------------------
# Bidirectional and normalized linear attention
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_bidirectional(normalize, varlen):
    inputs = make_inputs(batch=1 if varlen else 2, seq=70, state=not normalize, num_states=2)
    if normalize:  # positive features keep the normalizer away from zero
        inputs["q"], inputs["k"] = inputs["q"].abs(), inputs["k"].abs()
    options = {"causal": False, "normalize": normalize}
    if varlen:
        options["cu_seqlens"] = torch.tensor([0, 30, 70])
    expected = run(naive_linear_attention, inputs, **options)
    assert_close(run(chunked_linear_attention, inputs, **options), expected, 1e-10)
    # Every token sees the whole sequence: the output of token t is q_t^T S_T.
    q = inputs["q"] * inputs["q"].shape[-1] ** -0.5
    if not normalize and not varlen:
        o = torch.einsum("bthk,bhkv->bthv", q, expected["state"])
        torch.testing.assert_close(o, expected["o"])


@pytest.mark.parametrize("decay", DECAYS)
def test_normalize(decay):
    inputs = make_inputs(seq=130, decay=decay, dim_k=8, dim_v=8)
    inputs["q"], inputs["k"] = F.elu(inputs["q"]) + 1, F.elu(inputs["k"]) + 1
    expected = run(naive_linear_attention, inputs, normalize=True)
    assert_close(run(chunked_linear_attention, inputs, normalize=True), expected, 1e-10)
    if decay == "none":
        # flash-linear-attention's formula: o / ((q * scale * cumsum(k)).sum(-1) + 1e-10).
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        o_plain, _ = naive_linear_attention(q, k, v)
        z = (q * q.shape[-1] ** -0.5 * k.cumsum(1)).sum(-1, keepdim=True)
        torch.testing.assert_close(expected["o"], o_plain / (z + 1e-10))


# --------------------------------------------------------------------------------------
# Dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,rtol",
    [(torch.float32, 2e-5), (torch.float16, 2e-2), (torch.bfloat16, 8e-2)],
)
@pytest.mark.parametrize("decay", DECAYS)
def test_linear_dtypes(dtype, rtol, decay):
    inputs = make_inputs(seq=70, dim_k=16, dim_v=24, decay=decay, state=True)
    low = {n: t.to(dtype) for n, t in inputs.items()}
    # Oracle: the recurrence in float64 on the same (rounded) inputs.
    expected = run(naive_linear_attention, {n: t.double() for n, t in low.items()})
    got = run(chunked_linear_attention, low)
    assert got["o"].shape == expected["o"].shape
    out, state = chunked_linear_attention(**low, output_final_state=True)
    assert out.dtype == dtype and state.dtype == torch.float32
    assert_close(got, expected, rtol)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.bfloat16, 8e-2)])
def test_delta_dtypes(dtype, rtol):
    inputs = make_inputs(seq=70, dim_k=16, dim_v=24, decay="g", state=True, delta=True)
    low = {n: t.to(dtype) for n, t in inputs.items()}
    expected = run(naive_delta_rule, {n: t.double() for n, t in low.items()})
    assert_close(run(chunked_delta_rule, low), expected, rtol)


def test_float32_gates_with_bfloat16_inputs():
    inputs = make_inputs(seq=40, decay="gk", state=True)
    low = {
        n: t.to(torch.bfloat16 if n in ("q", "k", "v") else torch.float32)
        for n, t in inputs.items()
    }
    expected = run(naive_linear_attention, {n: t.double() for n, t in low.items()})
    got = run(chunked_linear_attention, low)
    assert got["dgk"].shape == inputs["gk"].shape
    assert_close(got, expected, 8e-2)


def test_reference_output_dtypes():
    inputs = make_inputs(seq=5, decay="g", dtype=torch.float16)
    o, s = naive_linear_attention(**inputs, output_final_state=True)
    assert o.dtype == torch.float16 and s.dtype == torch.float32
    o, s = naive_linear_attention(**make_inputs(seq=5), output_final_state=True)
    assert o.dtype == torch.float64 and s.dtype == torch.float64
    o, s = naive_linear_attention(**inputs)
    assert s is None


# --------------------------------------------------------------------------------------
# gradcheck of the chunked path (tiny, several chunks and sub-chunks)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", DECAYS)
def test_gradcheck_linear(decay):
    inputs = make_inputs(batch=1, seq=7, heads=1, dim_k=3, dim_v=2, decay=decay, state=True)
    names = list(inputs)
    tensors = [t.detach().clone().requires_grad_() for t in inputs.values()]

    def fn(*ts):
        o, s = chunked_linear_attention(
            **dict(zip(names, ts, strict=True)),
            output_final_state=True,
            chunk_size=4,
            subchunk_size=2,
        )
        return o, s

    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("gated", [False, True])
def test_gradcheck_delta(gated):
    inputs = make_inputs(
        batch=1,
        seq=7,
        heads=1,
        dim_k=3,
        dim_v=2,
        decay="g" if gated else "none",
        state=True,
        delta=True,
    )
    names = list(inputs)
    tensors = [t.detach().clone().requires_grad_() for t in inputs.values()]

    def fn(*ts):
        return chunked_delta_rule(
            **dict(zip(names, ts, strict=True)), output_final_state=True, chunk_size=3
        )

    assert torch.autograd.gradcheck(fn, tensors)


def test_gradcheck_normalized_varlen():
    inputs = make_inputs(batch=1, seq=6, heads=1, dim_k=2, dim_v=2)
    inputs["q"], inputs["k"] = inputs["q"].abs() + 0.5, inputs["k"].abs() + 0.5
    tensors = [t.detach().clone().requires_grad_() for t in inputs.values()]
    cu = torch.tensor([0, 2, 6])

    def fn(q, k, v):
        return chunked_linear_attention(q, k, v, normalize=True, cu_seqlens=cu, chunk_size=2)[0]

    assert torch.autograd.gradcheck(fn, tensors)


# --------------------------------------------------------------------------------------
# Stability: long sequences, strong decays
# --------------------------------------------------------------------------------------

LONG = 100_000
TAIL = 20


@pytest.mark.parametrize("kind", ["g", "gk", "gated_delta"])
def test_long_strong_decay_is_finite_and_consistent(kind):
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, LONG, 1, 8, generator=gen) for _ in range(3))
    if kind == "gated_delta":
        k = F.normalize(k, dim=-1)
        extra = {"beta": torch.rand(1, LONG, 1, generator=gen), "g": torch.full((1, LONG, 1), -5.0)}

        def chunked(q, k, v, ex, **kw):
            return chunked_delta_rule(q, k, v, ex["beta"], g=ex["g"], **kw)

        def naive(q, k, v, ex, **kw):
            return naive_delta_rule(q, k, v, ex["beta"], g=ex["g"], **kw)
    else:
        shape = (1, LONG, 1) if kind == "g" else (1, LONG, 1, 8)
        extra = {kind: torch.full(shape, -5.0)}

        def chunked(q, k, v, ex, **kw):
            return chunked_linear_attention(q, k, v, **ex, **kw)

        def naive(q, k, v, ex, **kw):
            return naive_linear_attention(q, k, v, **ex, **kw)

    o, state = chunked(q, k, v, extra, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    # A different chunking gives the same result.
    kw = {"chunk_size": 32} if kind == "gated_delta" else {"chunk_size": 32, "subchunk_size": 8}
    o2, state2 = chunked(q, k, v, extra, output_final_state=True, **kw)
    torch.testing.assert_close(o2, o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state2, state, rtol=1e-5, atol=1e-5)
    # The tail equals the per-token recurrence started from the chunked state.
    head = slice(0, LONG - TAIL)
    tail = slice(LONG - TAIL, LONG)
    _, mid = chunked(
        q[:, head],
        k[:, head],
        v[:, head],
        {n: t[:, head] for n, t in extra.items()},
        output_final_state=True,
    )
    o_tail, state_tail = naive(
        q[:, tail],
        k[:, tail],
        v[:, tail],
        {n: t[:, tail] for n, t in extra.items()},
        initial_state=mid,
        output_final_state=True,
    )
    torch.testing.assert_close(o[:, tail], o_tail, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_tail, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decay", ["g", "gk"])
def test_extreme_decay_is_finite(decay):
    inputs = make_inputs(batch=1, seq=300, heads=1, dim_k=4, dim_v=4, decay=decay)
    inputs[decay] = inputs[decay] * 0 - 80.0  # exp(-80 * 64) underflows to exactly 0
    got = run(chunked_linear_attention, {n: t.float() for n, t in inputs.items()})
    for name, t in got.items():
        assert torch.isfinite(t).all(), name
    # With such decay only the current token counts: o_t = (scale q_t . k_t) v_t.
    q, k, v = (inputs[n].float() for n in "qkv")
    expected = (q * k).sum(-1, keepdim=True) * 0.5 * v
    torch.testing.assert_close(got["o"].float(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------

IMPLS = [naive_linear_attention, chunked_linear_attention]


def _small(**kw):
    return make_inputs(batch=1, seq=8, heads=2, dim_k=4, dim_v=3, dtype=torch.float32, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.update(k=d["k"][:, :7]), "k shape"),
        (lambda d: d.update(v=d["v"][:, :, :1]), "v batch/time/head"),
        (lambda d: d.update(q=d["q"][0]), "q must be a 4-D"),
        (lambda d: d.update(v=d["v"].double()), "v dtype"),
        (lambda d: d.update(q=d["q"].int(), k=d["k"].int(), v=d["v"].int()), "q dtype"),
        (lambda d: d.update(g=torch.zeros(1, 8, 3)), "g must have shape"),
        (lambda d: d.update(gk=torch.zeros(1, 8, 2, 3)), "gk must have shape"),
        (lambda d: d.update(g_gamma=torch.zeros(1, 2)), "g_gamma must have shape"),
        (lambda d: d.update(g=torch.zeros(1, 8, 2, dtype=torch.float16)), "g dtype"),
        (lambda d: d.update(g=torch.zeros(1, 8, 2), gk=torch.zeros(1, 8, 2, 4)), "at most one"),
        (lambda d: d.update(g=torch.zeros(1, 8, 2), g_gamma=torch.zeros(2)), "at most one"),
        (lambda d: d.update(initial_state=torch.zeros(1, 2, 3, 4)), "initial_state must have"),
        (lambda d: d.update(initial_state=torch.zeros(2, 2, 4, 3)), "initial_state must have"),
        (lambda d: d.update(g=torch.zeros(1, 8, 2), causal=False), "bidirectional"),
        (lambda d: d.update(gk=torch.zeros(1, 8, 2, 4), causal=False), "bidirectional"),
        (lambda d: d.update(g_gamma=torch.zeros(2), causal=False), "bidirectional"),
        (
            # a normalized state is [N, H, K, V + 1] (the key sum rides along)
            lambda d: d.update(initial_state=torch.zeros(1, 2, 4, 3), normalize=True),
            "initial_state must have",
        ),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 5, 5, 8])), "strictly increasing"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 6, 4, 8])), "strictly increasing"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0, 4, 7])), "must end at T=8"),
        (lambda d: d.update(cu_seqlens=torch.tensor([1, 4, 8])), "must start at 0"),
        (lambda d: d.update(cu_seqlens=torch.tensor([0.0, 8.0])), "cu_seqlens must be an int"),
        (lambda d: d.update(cu_seqlens=torch.tensor([[0, 8]])), "cu_seqlens must be a 1-D"),
        (
            lambda d: d.update(
                cu_seqlens=torch.tensor([0, 3, 8]), initial_state=torch.zeros(1, 2, 4, 3)
            ),
            "initial_state must have shape",
        ),
    ],
)
def test_bad_arguments(impl, mutate, match):
    kw = _small()
    mutate(kw)
    with pytest.raises(ValueError, match=match):
        impl(**kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_cu_seqlens_needs_batch_one(impl):
    kw = make_inputs(batch=2, seq=8, dim_k=4, dim_v=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch size must be 1"):
        impl(**kw, cu_seqlens=torch.tensor([0, 3, 8]))


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_argument_types(impl):
    kw = _small()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        impl(**{**kw, "q": kw["q"].tolist()})
    with pytest.raises(TypeError, match="scale"):
        impl(**kw, scale="0.5")
    with pytest.raises(TypeError, match="causal must be a bool"):
        impl(**kw, causal=0)
    with pytest.raises(ValueError, match="scale must be finite"):
        impl(**kw, scale=float("nan"))


@pytest.mark.parametrize("impl", [naive_delta_rule, chunked_delta_rule])
def test_delta_bad_arguments(impl):
    kw = _small(delta=True)
    with pytest.raises(ValueError, match="beta must have shape"):
        impl(**{**kw, "beta": kw["beta"][..., None]})
    with pytest.raises(ValueError, match="g must have shape"):
        impl(**kw, g=torch.zeros(1, 8, 2, 4))
    with pytest.raises(TypeError, match="beta must be a torch.Tensor"):
        impl(**{**kw, "beta": None})
    with pytest.raises(ValueError, match="initial_state must have shape"):
        impl(**kw, initial_state=torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="must end at T"):
        impl(**kw, cu_seqlens=torch.tensor([0, 9]))


def test_bad_chunk_sizes():
    kw = _small(decay="gk")
    with pytest.raises(ValueError, match="multiple of subchunk_size"):
        chunked_linear_attention(**kw, chunk_size=24, subchunk_size=16)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_linear_attention(**kw, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        chunked_delta_rule(**_small(delta=True), chunk_size=16.0)


@pytest.mark.parametrize(
    "impl", [naive_linear_attention, chunked_linear_attention, naive_delta_rule, chunked_delta_rule]
)
@pytest.mark.parametrize("batch,seq", [(0, 5), (2, 0)])
def test_empty_inputs(impl, batch, seq):
    delta = impl in (naive_delta_rule, chunked_delta_rule)
    kw = make_inputs(batch=batch, seq=seq, dim_k=4, dim_v=3, state=True, delta=delta)
    kw["initial_state"].requires_grad_()
    o, state = impl(**kw, output_final_state=True)
    assert o.shape == (batch, seq, 2, 3) and state.shape == (batch, 2, 4, 3)
    torch.testing.assert_close(state, kw["initial_state"].detach())
    state.sum().backward()  # the final state is the initial state, gradient included
    torch.testing.assert_close(kw["initial_state"].grad, torch.ones_like(state))
