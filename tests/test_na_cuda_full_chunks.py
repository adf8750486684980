"""NeighborhoodPolicy's full chunks on the emulated CUDA kernels: windows large enough that every
query of a tile keeps a whole chunk of keys (the key box's inner box, visited first) and every key
of a key tile is seen by a whole chunk of queries (dK/dV). Those chunks skip the window rule, so
these cases check that the inner boxes are right, in 1-D, 2-D and 3-D, with rpb (whose
deterministic gradient maps keys to chunk columns through the same order), additional tokens and
GQA, against the float64 reference."""

from __future__ import annotations

import os

import pytest
import tokenmix
import torch
from na_cases import attend, make_cfg, make_inputs, window_of
from tokenmix.neighborhood.reference import neighborhood_attention_reference

LIBRARY = os.path.join(os.path.dirname(tokenmix.__file__), "_emulated.so")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.fixture(scope="module", autouse=True)
def emulated_library():
    torch.ops.load_library(LIBRARY)


def run_emulated(c, t, scale, grad_out, deterministic):
    kernel, stride, dilation, causal = window_of(c)
    window = [list(kernel), list(stride), list(dilation), [int(x) for x in causal]]
    ops = torch.ops.tokenmix_emulated
    args = (t["rpb"], t["additional_keys"], t["additional_values"], *window, scale)
    out, lse = ops.na_forward(t["q"], t["k"], t["v"], *args)
    grads = ops.na_backward(grad_out, t["q"], t["k"], t["v"], out, lse, *args, None, deterministic)
    return out, lse, grads


CASES = {
    "1d-wide": make_cfg((200,), 151, dim=32),
    "2d-wide-rpb": make_cfg((24, 20), (17, 15), dim=16, rpb=True),
    "3d-wide-gqa-extra": make_cfg((9, 10, 9), (7, 9, 7), heads=2, heads_kv=1, dim=8, n_extra=40),
    "2d-causal-dilated": make_cfg((30, 24), (13, 11), dilation=(2, 1), causal=(True, False)),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,deterministic",
    [(torch.float16, False), (torch.float32, True)],
    ids=["fp16", "fp32-deterministic"],
)
@pytest.mark.parametrize("name", list(CASES))
def test_full_chunks_match_reference(name, dtype, deterministic):
    c = CASES[name]
    t = make_inputs(c, dtype, seed=len(name))
    scale = c["dim"] ** -0.5
    out_shape = (c["batch"], *c["shape"], c["heads"], c["dim_v"])
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, lse, grads = run_emulated(c, t, scale, grad_out, deterministic)
    leaves = {n: x.double().requires_grad_() for n, x in t.items() if x is not None}
    r_out, r_lse = attend(neighborhood_attention_reference, c, leaves, scale=scale, return_lse=True)
    r_grads = torch.autograd.grad([r_out], list(leaves.values()), [grad_out.double()])
    names = ("q", "k", "v", "rpb", "additional_keys", "additional_values")
    got = dict(zip(names, grads, strict=True))
    pairs = [("out", out, r_out), ("lse", lse, r_lse)]
    pairs += [(n, got[n], g) for n, g in zip(leaves, r_grads, strict=True)]
    for what, x, want in pairs:
        assert torch.isfinite(x).all(), what
        err = ((x.double() - want).abs().max() / want.abs().max().clamp_min(1.0)).item()
        assert err <= TOL[dtype], f"{what}: max error {err:.3e}"
