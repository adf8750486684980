"""tokenmix.compat.fla against flash-linear-attention 0.6 (fla-core 0.6.0).

fla's ``chunk_*`` / ``fused_recurrent_*`` functions are Triton kernels and do not run on
the CPU, so the shim is compared with fla's pure-PyTorch reference recurrences (the
``naive`` modules), forward and backward, on seeded random cases. Where a reference's
conventions differ from the op function's, the test accounts for it as read from fla's
code:

* ``delta_rule_recurrence`` takes head-first ``[B, H, T, D]`` inputs and ``[B, H, T]``
  (or per value ``[B, H, T, V]``) betas; it and ``naive_recurrent_gla`` have a fixed
  scale ``K ** -0.5``: an explicit scale is applied by scaling q by ``scale * sqrt(K)``;
* ``naive_recurrent_gated_delta_rule`` takes ``beta`` before ``g`` (the op functions:
  ``g`` before ``beta``) and returns o in float32;
* no reference takes ``cu_seqlens``, ``reverse`` or ``state_v_first``: the references
  run per packed sequence (an empty one keeps its initial state, as fla's kernels loop
  over zero tokens), on time-flipped sequences (fla's recurrent kernels walk from the
  last token to the first and decay before adding, so ``reverse`` is the forward scan of
  the flipped sequence), on transposed states;
* fla's normalized linear attention returns ``(kv_state or None, z_state)`` also when
  ``output_final_state=False`` (``chunk.py`` / ``fused_recurrent.py``), while the naive
  one returns None: the reference builds that pair;
* the per-value gates ``gv`` (GLA, gated delta rule) have no naive function: fla's
  recurrent kernels update every value column of the state on its own, so the reference
  runs the naive recurrence once per value column with ``g + gv[..., j]``;
* ``use_qk_l2norm_in_kernel`` is ``x / sqrt(sum(x^2) + 1e-6)`` (fla's l2norm kernels),
  ``use_beta_sigmoid_in_kernel`` ``sigmoid(beta)`` (times 2 with ``allow_neg_eigval``),
  ``use_gate_in_kernel`` fla's ``naive_gdn_gate``.
"""

from __future__ import annotations

import inspect
import pathlib
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

with warnings.catch_warnings():  # fla-core 0.6 is a hard test dependency (Makefile)
    warnings.filterwarnings("ignore", message="Triton is not supported")
    # fla's modules decorate with torch.jit.script_method when imported (not code under test)
    warnings.filterwarnings("ignore", "`torch.jit.script_method` is deprecated", DeprecationWarning)
    import fla.ops as fla_ops
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

from tokenmix.compat import fla

pytestmark = pytest.mark.filterwarnings("ignore:Triton is not supported")

ROOT = pathlib.Path(__file__).resolve().parent.parent
B, T, H, K, V = 2, 23, 2, 6, 5  # K != V
T_LONG = 150
CU = [0, 9, 10, 31, 46]  # packed: 4 sequences of 9, 1, 21, 15 tokens (B = 1, T = 46)
ATOL = RTOL = 1e-4
MAX_DIFF: dict[str, float] = {}  # worst |shim - reference| per family (forward, backward)


@pytest.fixture(autouse=True)
def _fresh_warnings():
    fla._warned.clear()
    yield
    fla._warned.clear()


# --------------------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _logsig(gen, *shape):
    return F.logsigmoid(torch.randn(*shape, generator=gen) + 1.0)


def _flat(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if outputs is None:
        return []
    return [t for x in outputs for t in _flat(x)]


def _forward_backward(fn, inputs: dict[str, torch.Tensor]):
    """Outputs of ``fn(**inputs)`` and the gradients of a fixed random projection of
    them with respect to every input (zeros where an input gets no gradient)."""
    leaves = {n: x.detach().clone().requires_grad_(True) for n, x in inputs.items()}
    outs = _flat(fn(**leaves))
    gen = _gen(1234)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = {
        n: torch.zeros_like(x) if gr is None else gr
        for (n, x), gr in zip(leaves.items(), grads, strict=True)
    }
    return [o.detach() for o in outs], grads


def _compare(family: str, shim, ref, inputs: dict[str, torch.Tensor]) -> None:
    """Shim and reference agree: every output and every input's gradient."""
    outs, grads = _forward_backward(shim, inputs)
    ref_outs, ref_grads = _forward_backward(ref, inputs)
    assert len(outs) == len(ref_outs)
    fwd = bwd = 0.0
    for i, (a, b) in enumerate(zip(outs, ref_outs, strict=True)):
        assert a.shape == b.shape, f"output {i}: {a.shape} vs {b.shape}"
        torch.testing.assert_close(a.float(), b.float(), atol=ATOL, rtol=RTOL, msg=f"out {i}")
        fwd = max(fwd, (a.float() - b.float()).abs().max().item())
    for n in inputs:
        torch.testing.assert_close(
            grads[n].float(), ref_grads[n].float(), atol=ATOL, rtol=RTOL, msg=f"grad of {n}"
        )
        bwd = max(bwd, (grads[n].float() - ref_grads[n].float()).abs().max().item())
    old = MAX_DIFF.get(family, (0.0, 0.0))
    MAX_DIFF[family] = (max(old[0], fwd), max(old[1], bwd))


def teardown_module() -> None:
    for family, (fwd, bwd) in sorted(MAX_DIFF.items()):
        print(f"max |tokenmix.compat.fla - fla naive| {family}: fwd {fwd:.2e}, bwd {bwd:.2e}")


def _cat_states(states):
    if isinstance(states[0], tuple):
        return tuple(torch.cat(s, 0) for s in zip(*states, strict=True))
    return torch.cat(states, 0)


def _per_sequence(step, tokens: dict, cu_seqlens, reverse: bool, empty_state):
    """Runs ``step(tokens, seq)`` on the whole batch (``seq`` None) or once per packed
    sequence (``seq`` its index; an empty one keeps ``empty_state(seq)``), on
    time-flipped tokens when ``reverse``; returns (o, final) with o back in order."""

    def one(toks, seq):
        if reverse:
            toks = {n: x.flip(1) for n, x in toks.items()}
        o, s = step(toks, seq)
        return (o.flip(1) if reverse else o), s

    if cu_seqlens is None:
        return one(tokens, None)
    outs, states = [], []
    for i in range(len(cu_seqlens) - 1):
        a, b = cu_seqlens[i], cu_seqlens[i + 1]
        if a == b:
            states.append(empty_state(i))
            continue
        o, s = one({n: x[:, a:b] for n, x in tokens.items()}, i)
        outs.append(o)
        states.append(s)
    return torch.cat(outs, 1), _cat_states(states)


def _rows(state, seq):
    if state is None or seq is None:
        return state
    return state[seq : seq + 1]


def _tv(state, state_v_first: bool):
    return state.transpose(-1, -2) if (state is not None and state_v_first) else state


def _cu(cu_seqlens):
    return None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int64)


def _shape(varlen: bool, long: bool = False):
    if long:  # several of tokenmix's 64-token chunks
        return (B, T_LONG)
    return (1, CU[-1]) if varlen else (B, T)


def _num(varlen: bool) -> int:
    return len(CU) - 1 if varlen else B


def _combos(cases: dict, fns: list[str], chunk_has) -> list:
    """(function, case) pairs: every case for the fused_recurrent function (listed
    last), the cases ``chunk_has`` accepts for the chunk one."""
    chunk, recurrent = fns
    pairs = [(chunk, c) for c in cases if chunk_has(cases[c])]
    pairs += [(recurrent, c) for c in cases]
    return [pytest.param(f, c, id=f"{f}-{c}") for f, c in pairs]


# --------------------------------------------------------------------------- signatures

FUNCTIONS = [
    ("linear_attn", "chunk_linear_attn"),
    ("linear_attn", "fused_recurrent_linear_attn"),
    ("simple_gla", "chunk_simple_gla"),
    ("simple_gla", "fused_recurrent_simple_gla"),
    ("gla", "chunk_gla"),
    ("gla", "fused_recurrent_gla"),
    ("delta_rule", "chunk_delta_rule"),
    ("delta_rule", "fused_recurrent_delta_rule"),
    ("gated_delta_rule", "chunk_gated_delta_rule"),
    ("gated_delta_rule", "fused_recurrent_gated_delta_rule"),
    ("gated_delta_rule", "chunk_gdn"),
    ("gated_delta_rule", "fused_recurrent_gdn"),
]


@pytest.mark.parametrize("module, name", FUNCTIONS, ids=[f for _, f in FUNCTIONS])
def test_signature_matches_fla(module, name):
    ours = inspect.signature(getattr(fla, name))
    theirs = inspect.signature(getattr(getattr(fla_ops, module), name))

    def params(sig):
        return [(p.name, p.kind, p.default) for p in sig.parameters.values()]

    assert params(ours) == params(theirs)
    assert getattr(fla, name).__doc__


# --------------------------------------------------------------------------- linear attention


def _ref_linear(q, k, v, scale, h0, normalize, output_final_state, cu_seqlens, reverse):
    def step(t, seq):
        init = h0
        if isinstance(h0, tuple):
            init = tuple(_rows(x, seq) for x in h0)
        else:
            init = _rows(h0, seq)
        return naive_recurrent_linear_attn(t["q"], t["k"], t["v"], scale, init, True, normalize)

    def empty(i):
        return tuple(x[i : i + 1] for x in h0) if isinstance(h0, tuple) else h0[i : i + 1]

    tokens = {"q": q, "k": k, "v": v}
    o, final = _per_sequence(step, tokens, cu_seqlens, reverse, empty)
    if normalize:  # fla's op functions: (kv_state or None, z_state), always
        kv, z = final
        return o, (kv if output_final_state else None, z)
    return o, (final if output_final_state else None)


LINEAR_CASES = {
    "plain": {},
    "state": {"h0": True, "final": True},
    "scale": {"scale": 0.3, "final": True},
    "varlen": {"varlen": True, "h0": True, "final": True},
    "reverse": {"reverse": True, "h0": True, "final": True},
    "reverse_varlen": {"reverse": True, "varlen": True, "h0": True, "final": True},
    "long": {"long": True, "h0": True, "final": True},
}


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(
    "fn, case",
    _combos(
        LINEAR_CASES,
        ["chunk_linear_attn", "fused_recurrent_linear_attn"],
        lambda c: not c.get("reverse"),  # chunk_linear_attn has no reverse
    ),
)
def test_linear_attn(fn, case, normalize):
    c = LINEAR_CASES[case]
    gen = _gen(10)
    b, t = _shape(c.get("varlen", False), c.get("long", False))
    n = _num(c.get("varlen", False))
    # positive features keep the normalizer away from zero
    inputs = {
        "q": torch.rand(b, t, H, K, generator=gen),
        "k": torch.rand(b, t, H, K, generator=gen),
        "v": _randn(gen, b, t, H, V),
    }
    if c.get("h0"):
        inputs["kv0"] = _randn(gen, n, H, K, V)
        if normalize:
            inputs["z0"] = torch.rand(n, 1, H, K, generator=gen)
    scale, final = c.get("scale"), c.get("final", False)
    cu = CU if c.get("varlen") else None
    reverse = c.get("reverse", False)

    def state(kv0=None, z0=None):
        if kv0 is None:
            return None
        return (kv0, z0) if normalize else kv0

    def shim(q, k, v, kv0=None, z0=None):
        kw = {"reverse": True} if reverse else {}
        return getattr(fla, fn)(
            q,
            k,
            v,
            scale=scale,
            initial_state=state(kv0, z0),
            output_final_state=final,
            normalize=normalize,
            cu_seqlens=_cu(cu),
            **kw,
        )

    def ref(q, k, v, kv0=None, z0=None):
        h0 = state(kv0, z0)
        if h0 is None:
            h0 = torch.zeros(n, H, K, V)
            h0 = (h0, torch.zeros(n, 1, H, K)) if normalize else h0
        return _ref_linear(q, k, v, scale, h0, normalize, final, cu, reverse)

    _compare("linear_attn", shim, ref, inputs)


def test_linear_attn_defaults_and_state_pairs():
    gen = _gen(11)
    q, k, v = torch.rand(B, T, H, K, generator=gen), torch.rand(B, T, H, K, generator=gen), None
    v = _randn(gen, B, T, H, V)
    # chunk_linear_attn normalizes by default, fused_recurrent_linear_attn does not
    o, (kv, z) = fla.chunk_linear_attn(q, k, v)
    ref, _ = naive_recurrent_linear_attn(q, k, v, normalize=True)
    torch.testing.assert_close(o, ref, atol=ATOL, rtol=RTOL)
    assert kv is None and z.shape == (B, 1, H, K)
    o, final = fla.fused_recurrent_linear_attn(q, k, v)
    ref, _ = naive_recurrent_linear_attn(q, k, v, normalize=False)
    torch.testing.assert_close(o, ref, atol=ATOL, rtol=RTOL)
    assert final is None
    # a plain tensor state with normalize=True is the kv state (z starts at zero)
    kv0 = _randn(gen, B, H, K, V)
    o, (kv, z) = fla.chunk_linear_attn(q, k, v, initial_state=kv0, output_final_state=True)
    ref, (ref_kv, ref_z) = naive_recurrent_linear_attn(
        q, k, v, initial_state=kv0, output_final_state=True, normalize=True
    )
    for a, b in ((o, ref), (kv, ref_kv), (z, ref_z)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    # (None, z0): only the key sum carries over
    z0 = torch.rand(B, 1, H, K, generator=gen)
    o, _ = fla.chunk_linear_attn(q, k, v, initial_state=(None, z0))
    ref, _ = naive_recurrent_linear_attn(q, k, v, initial_state=(None, z0), normalize=True)
    torch.testing.assert_close(o, ref, atol=ATOL, rtol=RTOL)
    with pytest.raises(TypeError, match="initial_state"):
        fla.chunk_linear_attn(q, k, v, initial_state=(kv0, z0), normalize=False)
    with pytest.raises(ValueError, match="z_state"):
        fla.chunk_linear_attn(q, k, v, initial_state=(kv0, z0[:, 0]))


# --------------------------------------------------------------------------- simple GLA


SIMPLE_GLA_CASES = {
    "g": {"g": True, "h0": True, "final": True},
    "g_gamma": {"g_gamma": True, "h0": True, "final": True},
    "no_decay": {},
    "scale": {"g": True, "scale": 0.7, "final": True},
    "varlen": {"g": True, "varlen": True, "h0": True, "final": True},
    "state_v_first": {"g": True, "h0": True, "final": True, "svf": True},
    "reverse": {"g": True, "reverse": True, "h0": True, "final": True},
    "reverse_varlen": {"g": True, "reverse": True, "varlen": True, "h0": True, "final": True},
    "g_and_g_gamma": {"g": True, "g_gamma": True, "h0": True, "final": True},
    "long": {"g": True, "long": True, "h0": True, "final": True},
}


@pytest.mark.parametrize(
    "fn, case",
    _combos(
        SIMPLE_GLA_CASES,
        ["chunk_simple_gla", "fused_recurrent_simple_gla"],
        # reverse and g + g_gamma are fused_recurrent_simple_gla's
        lambda c: not (c.get("reverse") or (c.get("g") and c.get("g_gamma"))),
    ),
)
def test_simple_gla(fn, case):
    c = SIMPLE_GLA_CASES[case]
    gen = _gen(20)
    varlen = c.get("varlen", False)
    b, t = _shape(varlen, c.get("long", False))
    n = _num(varlen)
    inputs = {"q": _randn(gen, b, t, H, K), "k": _randn(gen, b, t, H, K)}
    inputs["v"] = _randn(gen, b, t, H, V)
    if c.get("g"):
        inputs["g"] = _logsig(gen, b, t, H)
    if c.get("h0"):
        inputs["h0"] = _randn(gen, n, H, V, K) if c.get("svf") else _randn(gen, n, H, K, V)
    g_gamma = F.logsigmoid(_randn(gen, H)) if c.get("g_gamma") else None
    scale, final, svf = c.get("scale"), c.get("final", False), c.get("svf", False)
    cu = CU if varlen else None
    reverse = c.get("reverse", False)

    def shim(q, k, v, g=None, h0=None):
        kw = {"reverse": True} if reverse else {}
        return getattr(fla, fn)(
            q,
            k,
            v,
            g,
            g_gamma,
            scale=scale,
            initial_state=h0,
            output_final_state=final,
            state_v_first=svf,
            cu_seqlens=_cu(cu),
            **kw,
        )

    def ref(q, k, v, g=None, h0=None):
        gg = torch.zeros(q.shape[:3]) if g is None else g
        if g_gamma is not None:
            gg = gg + g_gamma
        init = _tv(h0, svf) if h0 is not None else torch.zeros(n, H, K, V)

        def step(tk, seq):
            return naive_recurrent_simple_gla(
                tk["q"], tk["k"], tk["v"], tk["g"], scale, _rows(init, seq), True
            )

        o, s = _per_sequence(step, {"q": q, "k": k, "v": v, "g": gg}, cu, reverse, None)
        return o, (_tv(s, svf) if final else None)

    _compare("simple_gla", shim, ref, inputs)


def test_g_gamma_gets_no_gradient_like_fla():
    # fla's kernels return None for g_gamma's gradient (a fixed decay)
    gen = _gen(21)
    q, k, v = _randn(gen, B, T, H, K), _randn(gen, B, T, H, K), _randn(gen, B, T, H, V)
    g_gamma = F.logsigmoid(_randn(gen, H)).requires_grad_(True)
    q.requires_grad_(True)
    o, _ = fla.chunk_simple_gla(q, k, v, g_gamma=g_gamma)
    o.sum().backward()
    assert g_gamma.grad is None and q.grad is not None


# --------------------------------------------------------------------------- GLA


GLA_CASES = {
    "gk": {"gk": True, "h0": True, "final": True},
    "scale": {"gk": True, "scale": 0.5, "final": True},
    "varlen": {"gk": True, "varlen": True, "h0": True, "final": True},
    "state_v_first": {"gk": True, "h0": True, "final": True, "svf": True},
    "reverse_varlen": {"gk": True, "reverse": True, "varlen": True, "h0": True, "final": True},
    "gv": {"gv": True, "h0": True, "final": True},
    "gk_gv": {"gk": True, "gv": True, "h0": True, "final": True},
    "gk_gv_varlen_reverse": {
        "gk": True,
        "gv": True,
        "varlen": True,
        "reverse": True,
        "h0": True,
        "final": True,
        "svf": True,
    },
    "no_gate": {"final": True},
    "long": {"gk": True, "long": True, "h0": True, "final": True},
    "long_gv": {"gk": True, "gv": True, "long": True, "final": True},
}


@pytest.mark.parametrize(
    "fn, case",
    _combos(
        GLA_CASES,
        ["chunk_gla", "fused_recurrent_gla"],
        # reverse, gv and an optional gk are fused_recurrent_gla's
        lambda c: c.get("gk") and not (c.get("reverse") or c.get("gv")),
    ),
)
def test_gla(fn, case):
    c = GLA_CASES[case]
    recurrent = fn.startswith("fused")
    gen = _gen(30)
    varlen = c.get("varlen", False)
    b, t = _shape(varlen, c.get("long", False))
    n = _num(varlen)
    inputs = {"q": _randn(gen, b, t, H, K), "k": _randn(gen, b, t, H, K)}
    inputs["v"] = _randn(gen, b, t, H, V)
    if c.get("gk"):
        inputs["gk"] = _logsig(gen, b, t, H, K)
    if c.get("gv"):
        inputs["gv"] = _logsig(gen, b, t, H, V)
    if c.get("h0"):
        inputs["h0"] = _randn(gen, n, H, V, K) if c.get("svf") else _randn(gen, n, H, K, V)
    scale, final, svf = c.get("scale"), c.get("final", False), c.get("svf", False)
    cu = CU if varlen else None
    reverse = c.get("reverse", False)

    def shim(q, k, v, gk=None, gv=None, h0=None):
        common = dict(
            scale=scale,
            initial_state=h0,
            output_final_state=final,
            state_v_first=svf,
            cu_seqlens=_cu(cu),
        )
        if recurrent:
            return fla.fused_recurrent_gla(q, k, v, gk, gv, reverse=reverse, **common)
        return fla.chunk_gla(q, k, v, gk, **common)

    def ref(q, k, v, gk=None, gv=None, h0=None):
        # naive_recurrent_gla has the fixed scale K ** -0.5
        qs = q if scale is None else q * (scale * K**0.5)
        gk = torch.zeros(q.shape) if gk is None else gk
        init = _tv(h0, svf) if h0 is not None else torch.zeros(n, H, K, V)

        def step(tk, seq):
            if "gv" not in tk:
                return naive_recurrent_gla(
                    tk["q"], tk["k"], tk["v"], tk["gk"], _rows(init, seq), True
                )
            cols = [  # one value column at a time, decayed by exp(gk + gv_j)
                naive_recurrent_gla(
                    tk["q"],
                    tk["k"],
                    tk["v"][..., j : j + 1],
                    tk["gk"] + tk["gv"][..., j : j + 1],
                    _rows(init, seq)[..., j : j + 1],
                    True,
                )
                for j in range(V)
            ]
            return torch.cat([o for o, _ in cols], -1), torch.cat([s for _, s in cols], -1)

        tokens = {"q": qs, "k": k, "v": v, "gk": gk}
        if gv is not None:
            tokens["gv"] = gv
        o, s = _per_sequence(step, tokens, cu, reverse, None)
        return o, (_tv(s, svf) if final else None)

    _compare("gla", shim, ref, inputs)


# --------------------------------------------------------------------------- delta rule


DELTA_CASES = {
    "plain": {"h0": True, "final": True},
    "scale": {"scale": 0.4, "final": True},
    "varlen": {"varlen": True, "h0": True, "final": True},
    "l2norm": {"l2norm": True, "h0": True, "final": True},
    "beta_none": {"beta": "none", "final": True},
    "beta_per_value": {"beta": "value", "h0": True, "final": True},
    "beta_per_value_varlen": {"beta": "value", "varlen": True, "h0": True, "final": True},
    "long": {"long": True, "h0": True, "final": True},
}


def _l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize(
    "fn, case",
    _combos(
        DELTA_CASES,
        ["chunk_delta_rule", "fused_recurrent_delta_rule"],
        # an optional or per-value beta is fused_recurrent_delta_rule's
        lambda c: not c.get("beta"),
    ),
)
def test_delta_rule(fn, case):
    c = DELTA_CASES[case]
    gen = _gen(40)
    varlen = c.get("varlen", False)
    b, t = _shape(varlen, c.get("long", False))
    n = _num(varlen)
    l2norm = c.get("l2norm", False)
    k = _randn(gen, b, t, H, K)
    inputs = {
        "q": _randn(gen, b, t, H, K),
        "k": k if l2norm else F.normalize(k, dim=-1),
        "v": _randn(gen, b, t, H, V),
    }
    if c.get("beta") == "value":
        inputs["beta"] = torch.rand(b, t, H, V, generator=gen)
    elif c.get("beta") != "none":
        inputs["beta"] = torch.rand(b, t, H, generator=gen)
    if c.get("h0"):
        inputs["h0"] = _randn(gen, n, H, K, V)
    scale, final = c.get("scale"), c.get("final", False)
    cu = CU if varlen else None

    def shim(q, k, v, beta=None, h0=None):
        return getattr(fla, fn)(
            q,
            k,
            v,
            beta,
            scale=scale,
            initial_state=h0,
            output_final_state=final,
            use_qk_l2norm_in_kernel=l2norm,
            cu_seqlens=_cu(cu),
        )

    def ref(q, k, v, beta=None, h0=None):
        if l2norm:
            q, k = _l2(q), _l2(k)
        # delta_rule_recurrence: head-first, fixed scale K ** -0.5
        q = q if scale is None else q * (scale * K**0.5)
        beta = torch.ones(q.shape[:3]) if beta is None else beta
        init = h0 if h0 is not None else torch.zeros(n, H, K, V)

        def step(tk, seq):
            o, s = delta_rule_recurrence(
                *(tk[x].transpose(1, 2) for x in ("q", "k", "v", "beta")),
                initial_state=_rows(init, seq),
                output_final_state=True,
            )
            return o.transpose(1, 2), s

        o, s = _per_sequence(step, {"q": q, "k": k, "v": v, "beta": beta}, cu, False, None)
        return o, (s if final else None)

    _compare("delta_rule", shim, ref, inputs)


# --------------------------------------------------------------------------- gated delta rule


GDN_CASES = {
    "plain": {"h0": True, "final": True},
    "scale": {"scale": 0.6, "final": True},
    "varlen": {"varlen": True, "h0": True, "final": True},
    "state_v_first": {"h0": True, "final": True, "svf": True},
    "gva": {"hv": 2 * H, "h0": True, "final": True},
    "l2norm_gva_varlen": {"l2norm": True, "hv": 2 * H, "varlen": True, "h0": True, "final": True},
    "gate_in_kernel": {"gate": True, "h0": True, "final": True},
    "beta_sigmoid": {"sigmoid": True, "neg": False, "final": True},
    "beta_sigmoid_neg_eigval": {"sigmoid": True, "neg": True, "h0": True, "final": True},
    "gv": {"gv": True, "h0": True, "final": True},
    "gv_no_g": {"gv": True, "no_g": True, "final": True},
    "beta_per_value": {"beta_value": True, "h0": True, "final": True},
    "gv_beta_per_value_gva_varlen": {
        "gv": True,
        "beta_value": True,
        "hv": 2 * H,
        "varlen": True,
        "h0": True,
        "final": True,
        "svf": True,
    },
    "long": {"long": True, "h0": True, "final": True},
    "long_gv_gate": {"long": True, "gv": True, "gate": True, "hv": 2 * H, "final": True},
}


@pytest.mark.parametrize(
    "fn, case",
    _combos(
        GDN_CASES,
        ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"],
        # gv, per-value beta and an optional g are fused_recurrent_gated_delta_rule's
        lambda c: not (c.get("gv") or c.get("beta_value") or c.get("no_g")),
    ),
)
def test_gated_delta_rule(fn, case):
    c = GDN_CASES[case]
    recurrent = fn.startswith("fused")
    gen = _gen(50)
    varlen = c.get("varlen", False)
    b, t = _shape(varlen, c.get("long", False))
    n = _num(varlen)
    hv = c.get("hv", H)
    l2norm = c.get("l2norm", False)
    k = _randn(gen, b, t, H, K)
    inputs = {
        "q": _randn(gen, b, t, H, K),
        "k": k if l2norm else F.normalize(k, dim=-1),
        "v": _randn(gen, b, t, hv, V),
    }
    if not c.get("no_g"):
        inputs["g"] = _randn(gen, b, t, hv) if c.get("gate") else _logsig(gen, b, t, hv)
    if c.get("sigmoid"):
        inputs["beta"] = _randn(gen, b, t, hv)
    elif c.get("beta_value"):
        inputs["beta"] = torch.rand(b, t, hv, V, generator=gen)
    else:
        inputs["beta"] = torch.rand(b, t, hv, generator=gen)
    if c.get("gv"):
        inputs["gv"] = _logsig(gen, b, t, hv, V)
    if c.get("gate"):
        inputs["A_log"] = _randn(gen, hv) * 0.5 - 1.0
        inputs["dt_bias"] = _randn(gen, hv)
    if c.get("h0"):
        inputs["h0"] = _randn(gen, n, hv, V, K) if c.get("svf") else _randn(gen, n, hv, K, V)
    scale, final, svf = c.get("scale"), c.get("final", False), c.get("svf", False)
    cu = CU if varlen else None
    sigmoid, neg = c.get("sigmoid", False), c.get("neg", False)

    def shim(q, k, v, beta, g=None, gv=None, A_log=None, dt_bias=None, h0=None):
        common = dict(
            scale=scale,
            initial_state=h0,
            output_final_state=final,
            use_qk_l2norm_in_kernel=l2norm,
            use_beta_sigmoid_in_kernel=sigmoid,
            allow_neg_eigval=neg,
            state_v_first=svf,
            cu_seqlens=_cu(cu),
        )
        if A_log is not None:
            common.update(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
        if recurrent:
            return fla.fused_recurrent_gated_delta_rule(q, k, v, g, None, gv, beta, **common)
        return fla.chunk_gated_delta_rule(q, k, v, g, beta, **common)

    def ref(q, k, v, beta, g=None, gv=None, A_log=None, dt_bias=None, h0=None):
        if l2norm:
            q, k = _l2(q), _l2(k)
        if hv != H:  # GVA: value head i reads q/k head i // (HV // H)
            q, k = q.repeat_interleave(hv // H, 2), k.repeat_interleave(hv // H, 2)
        if sigmoid:
            beta = beta.sigmoid() * (2.0 if neg else 1.0)
        if A_log is not None:
            g = naive_gdn_gate(g, A_log, dt_bias)
        g = torch.zeros(v.shape[:3]) if g is None else g
        if beta.dim() == 3:
            beta = beta[..., None].expand(v.shape)
        gv = torch.zeros(v.shape) if gv is None else gv
        init = _tv(h0, svf) if h0 is not None else torch.zeros(n, hv, K, V)

        per_column = c.get("gv") or c.get("beta_value")

        def step(tk, seq):
            if not per_column:  # one naive call
                return naive_recurrent_gated_delta_rule(
                    tk["q"],
                    tk["k"],
                    tk["v"],
                    tk["beta"][..., 0],
                    tk["g"],
                    scale,
                    _rows(init, seq),
                    True,
                )
            cols = [  # one value column at a time: beta_j, decay exp(g + gv_j)
                naive_recurrent_gated_delta_rule(
                    tk["q"],
                    tk["k"],
                    tk["v"][..., j : j + 1],
                    tk["beta"][..., j],
                    tk["g"] + tk["gv"][..., j],
                    scale,
                    _rows(init, seq)[..., j : j + 1],
                    True,
                )
                for j in range(V)
            ]
            return torch.cat([o for o, _ in cols], -1), torch.cat([s for _, s in cols], -1)

        tokens = {"q": q, "k": k, "v": v, "beta": beta, "g": g, "gv": gv}
        o, s = _per_sequence(step, tokens, cu, False, None)
        return o, (_tv(s, svf) if final else None)

    _compare("gated_delta_rule", shim, ref, inputs)


# --------------------------------------------------------------------------- packing, dtypes


def test_empty_sequences_keep_their_initial_state():
    # fla's kernels loop over zero tokens for an empty sequence: its final state is its
    # initial state (zeros without one); tokenmix needs no empty sequence, the shim drops them
    gen = _gen(60)
    cu = [0, 0, 7, 7, 19, 19]
    q, k, v = _randn(gen, 1, 19, H, K), _randn(gen, 1, 19, H, K), _randn(gen, 1, 19, H, V)
    g, beta = _logsig(gen, 1, 19, H), torch.rand(1, 19, H, generator=gen)
    kn = F.normalize(k, dim=-1)
    h0 = _randn(gen, 5, H, K, V)

    def shim(q, k, v, g, beta, h0):
        o1, s1 = fla.fused_recurrent_simple_gla(
            q,
            k,
            v,
            g,
            initial_state=h0,
            output_final_state=True,
            cu_seqlens=_cu(cu),
            reverse=True,
        )
        o2, s2 = fla.chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=_cu(cu)
        )
        return o1, s1, o2, s2

    def ref(q, k, v, g, beta, h0):
        def sgla(tk, seq):
            return naive_recurrent_simple_gla(
                tk["q"], tk["k"], tk["v"], tk["g"], None, _rows(h0, seq), True
            )

        def gdn(tk, seq):
            return naive_recurrent_gated_delta_rule(
                tk["q"], tk["k"], tk["v"], tk["beta"], tk["g"], None, _rows(h0, seq), True
            )

        toks = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
        o1, s1 = _per_sequence(sgla, toks, cu, True, lambda i: h0[i : i + 1])
        o2, s2 = _per_sequence(gdn, toks, cu, False, lambda i: h0[i : i + 1])
        return o1, s1, o2, s2

    _compare("packing", shim, ref, {"q": q, "k": kn, "v": v, "g": g, "beta": beta, "h0": h0})
    _, s = fla.chunk_simple_gla(q, k, v, g, output_final_state=True, cu_seqlens=_cu(cu))
    assert s.shape == (5, H, K, V) and not s[[0, 2, 4]].any() and s[[1, 3]].abs().sum() > 0
    o, (kv, z) = fla.chunk_linear_attn(q.sigmoid(), k.sigmoid(), v, cu_seqlens=_cu(cu))
    assert kv is None and z.shape == (5, 1, H, K) and not z[[0, 2, 4]].any()


def test_dtypes_follow_fla():
    # o in q's dtype, final states float32, z_state in k's dtype; gates in any float dtype
    gen = _gen(61)
    q, k = _randn(gen, B, T, H, K).bfloat16(), _randn(gen, B, T, H, K).bfloat16()
    v = _randn(gen, B, T, H, V).bfloat16()
    g = _logsig(gen, B, T, H).double()
    h0 = _randn(gen, B, H, K, V).half()
    o, s = fla.chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ref, ref_s = naive_recurrent_simple_gla(
        q.float(), k.float(), v.float(), g.float(), None, h0.float(), True
    )
    torch.testing.assert_close(o.float(), ref, atol=0.05, rtol=0.05)
    torch.testing.assert_close(s, ref_s, atol=0.05, rtol=0.05)
    o, (kv, z) = fla.chunk_linear_attn(q.sigmoid(), k.sigmoid(), v, output_final_state=True)
    assert o.dtype == torch.bfloat16 and kv.dtype == torch.float32 and z.dtype == torch.bfloat16


# --------------------------------------------------------------------------- errors


def _small(seed=70, hv=H):
    gen = _gen(seed)
    q, k = _randn(gen, B, T, H, K), F.normalize(_randn(gen, B, T, H, K), dim=-1)
    return q, k, _randn(gen, B, T, hv, V), _logsig(gen, B, T, hv), torch.rand(B, T, hv)


def test_unsupported_arguments_raise_not_implemented():
    q, k, v, g, beta = _small()
    with pytest.raises(NotImplementedError, match="gk"):
        fla.fused_recurrent_gated_delta_rule(q, k, v, g, gk=torch.zeros(B, T, H, K), beta=beta)
    with pytest.raises(NotImplementedError, match="cp_context"):
        fla.chunk_gated_delta_rule(q, k, v, g, beta, cp_context=object())


def test_head_first_and_unknown_keywords():
    q, k, v, g, beta = _small()
    # fla 0.6 raises DeprecationWarning for head_first in these (any value)
    for call in (
        lambda **kw: fla.chunk_simple_gla(q, k, v, g, **kw),
        lambda **kw: fla.chunk_delta_rule(q, k, v, beta, **kw),
        lambda **kw: fla.chunk_gated_delta_rule(q, k, v, g, beta, **kw),
    ):
        with pytest.raises(DeprecationWarning, match="head_first"):
            call(head_first=False)
    # fla ignores it in these: head_first=False is harmless, True would be misread
    for call in (
        lambda **kw: fla.fused_recurrent_simple_gla(q, k, v, g, **kw),
        lambda **kw: fla.fused_recurrent_gla(q, k, v, **kw),
        lambda **kw: fla.fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, **kw),
    ):
        call(head_first=False)
        with pytest.raises(DeprecationWarning, match="head_first"):
            call(head_first=True)
    # functions without **kwargs reject it like any unknown keyword, as fla's do
    gk = torch.zeros(B, T, H, K)
    with pytest.raises(TypeError):
        fla_ops.gla.chunk_gla(q, k, v, gk, head_first=False)
    with pytest.raises(TypeError):
        fla.chunk_gla(q, k, v, gk, head_first=False)
    with pytest.raises(TypeError, match="bogus"):
        fla.fused_recurrent_delta_rule(q, k, v, beta, bogus=1)


FLA_MODULE = {name: module for module, name in FUNCTIONS}
# fla's functions with **kwargs ignore the keywords they do not pop (read from fla's code).
WITH_KWARGS = {
    "chunk_simple_gla": lambda q, k, v, g, beta, **kw: fla.chunk_simple_gla(q, k, v, g, **kw),
    "fused_recurrent_simple_gla": lambda q, k, v, g, beta, **kw: fla.fused_recurrent_simple_gla(
        q, k, v, g, **kw
    ),
    "fused_recurrent_gla": lambda q, k, v, g, beta, **kw: fla.fused_recurrent_gla(q, k, v, **kw),
    "chunk_delta_rule": lambda q, k, v, g, beta, **kw: fla.chunk_delta_rule(q, k, v, beta, **kw),
    "chunk_gated_delta_rule": lambda q, k, v, g, beta, **kw: fla.chunk_gdn(q, k, v, g, beta, **kw),
    "fused_recurrent_gated_delta_rule": lambda q, k, v, g, beta, **kw: fla.fused_recurrent_gdn(
        q, k, v, g, beta=beta, **kw
    ),
}


@pytest.mark.parametrize("name", list(WITH_KWARGS))
def test_unknown_keywords_are_ignored_like_fla(name):
    # fla 0.6 takes **kwargs here and ignores unknown keys: code that passes one runs under
    # fla, so it runs under the shim, with the same result and a warning naming the argument.
    params = inspect.signature(getattr(getattr(fla_ops, FLA_MODULE[name]), name)).parameters
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    q, k, v, g, beta = _small()
    call = WITH_KWARGS[name]
    expected = call(q, k, v, g, beta, output_final_state=True)
    with pytest.warns(fla.FlaCompatWarning) as record:
        got = call(q, k, v, g, beta, output_final_state=True, bogus=1, use_gate_in_kerne=True)
    assert [str(r.message).split("'")[1] for r in record] == ["bogus", "use_gate_in_kerne"]
    for r in record:
        assert f"{name}()" in str(r.message) and "fla 0.6's" in str(r.message)
        assert "ignores it too" in str(r.message)
        assert r.filename == __file__  # points at the caller's line
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    with warnings.catch_warnings():  # once per argument name
        warnings.simplefilter("error", fla.FlaCompatWarning)
        call(q, k, v, g, beta, bogus=2)
    with pytest.warns(fla.FlaCompatWarning, match="'other'"):
        call(q, k, v, g, beta, other=None)


def test_keywords_fla_ignores_in_one_function_only():
    # fla's chunk_simple_gla does not read the deprecated transpose_state_layout (its
    # fused_recurrent_simple_gla does): the shim ignores it there too, with the warning.
    q, k, v, g, _ = _small()
    h0 = torch.randn(B, H, K, V)
    expected = fla.chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    with pytest.warns(fla.FlaCompatWarning, match="transpose_state_layout"):
        got = fla.chunk_simple_gla(
            q, k, v, g, initial_state=h0, output_final_state=True, transpose_state_layout=True
        )
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_validation_like_fla():
    q, k, v, g, beta = _small()
    fla.chunk_simple_gla(q, k, v, g, chunk_size=32)  # a performance hint: accepted
    with pytest.raises(ValueError, match="power of 2"):
        fla.chunk_simple_gla(q, k, v, g, chunk_size=48)
    with pytest.raises(ValueError, match="chunk_size"):
        fla.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=128)
    with pytest.raises(ValueError, match="chunk_size"):
        fla.chunk_delta_rule(q, k, v, beta, chunk_size=8)
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        fla.chunk_gated_delta_rule(q, k, v, g, beta, allow_neg_eigval=True)
    with pytest.raises(ValueError, match="A_log"):
        fla.chunk_gated_delta_rule(q, k, v, g, beta, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="A_log"):
        fla.fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="g_gamma"):
        fla.chunk_simple_gla(q, k, v, g, torch.zeros(H))
    with pytest.raises(ValueError, match="batch size must be 1"):
        fla.chunk_gla(q, k, v, torch.zeros(B, T, H, K), cu_seqlens=torch.tensor([0, T]))
    with pytest.raises(ValueError, match="number of initial states"):
        fla.chunk_delta_rule(
            q[:1],
            k[:1],
            v[:1],
            beta[:1],
            initial_state=torch.zeros(3, H, K, V),
            cu_seqlens=torch.tensor([0, 0, T]),
        )
    qg, kg, vg, gg, bg = _small(hv=3)
    with pytest.raises(ValueError, match="divisible"):
        fla.chunk_gated_delta_rule(qg, kg, vg, gg, bg)
    with pytest.raises(ValueError, match="same number of heads"):
        fla.chunk_gated_delta_rule(q, k[:, :, :1], v, g, beta)
    with pytest.warns(DeprecationWarning, match="transpose_state_layout"):
        h0 = torch.randn(B, H, V, K)
        _, s = fla.fused_recurrent_gla(
            q, k, v, initial_state=h0, output_final_state=True, transpose_state_layout=True
        )
    _, s_ref = fla.fused_recurrent_gla(
        q, k, v, initial_state=h0, output_final_state=True, state_v_first=True
    )
    assert torch.equal(s, s_ref) and s.shape == (B, H, V, K)


# --------------------------------------------------------------------------- docs


def test_docs_example_runs():
    text = (ROOT / "docs" / "compat.md").read_text()
    section = text.split("## flash-linear-attention", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the fla section of docs/compat.md has no python example"
    for block in blocks:
        exec(compile(block, "docs/compat.md:fla", "exec"), {})
