"""The CUDA neighborhood-attention forward's sm_90a path (wgmma, SwizzledRows tiles), run on the
SIMT emulator with $TOKENMIX_SIMT_ARCH=sm_90a and compared with the float64 reference: every
specialized head dim (32, 64, 128), fp16 and bf16, partial tiles, rpb, additional tokens,
GQA, causal and dilated windows, and non-finite inputs (the exact pass). The emulator checks the
wgmma rules (fence, wait, operands unchanged in flight, descriptors) on every launch. The backward
keeps the mma.sync kernels.

These tests set $TOKENMIX_WGMMA=1 (the wgmma kernel wherever it has an instantiation), except the
tests of the launcher's own choice (auto), which must take the kernel tokenmix.plan reports."""

from __future__ import annotations

import math
import os

import pytest
import tokenmix
import torch
from na_cases import attend, make_cfg, make_inputs, poisoned, window_of
from tokenmix.neighborhood.reference import neighborhood_attention_reference

LIBRARY = os.path.join(os.path.dirname(tokenmix.__file__), "_emulated.so")
INF, NAN = float("inf"), float("nan")
make_case = make_cfg


@pytest.fixture(autouse=True)
def sm90a(monkeypatch):
    assert os.path.exists(LIBRARY), "the build must produce tokenmix/_emulated.so"
    torch.ops.load_library(LIBRARY)
    monkeypatch.setenv("TOKENMIX_SIMT_ARCH", "sm_90a")
    monkeypatch.setenv("TOKENMIX_WGMMA", "1")


CASES = {
    "1d-partial-d32": make_case((70,), 7, dim=32),
    "1d-dilated-causal-d64": make_case((41,), 5, dilation=2, causal=True, dim=64),
    "1d-d128-rpb": make_case((20,), 5, dim=128, rpb=True),
    "2d-d64-extra-gqa": make_case((13, 6), (3, 3), heads=4, heads_kv=2, dim=64, n_extra=5),
    "2d-k7-d64": make_case((20, 20), 7, dim=64, rpb=True),
    "3d-d32-causal": make_case((5, 6, 7), 3, causal=(True, False, False), dim=32),
}
TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}  # as for the mma.sync path


def forward(c, t, scale):
    kernel, stride, dilation, causal = window_of(c)
    return torch.ops.tokenmix_emulated.na_forward(
        t["q"], t["k"], t["v"], t["rpb"], t["additional_keys"], t["additional_values"],
        list(kernel), list(stride), list(dilation), [int(x) for x in causal], scale,
    )  # fmt: skip


def reference(c, t, scale):
    leaves = {n: x.double() for n, x in t.items() if x is not None}
    return attend(neighborhood_attention_reference, c, leaves, scale=scale, return_lse=True)


def whole_chunks(c) -> int:
    """Key chunks the forward visits per (batch, head): every tile's key box in 64-key chunks (the
    warpgroup computes whole chunks), plus the chunks of the additional tokens."""
    kernel, stride, dilation, causal = window_of(c)
    p = tokenmix.plan(c["shape"], kernel, stride, dilation, causal)
    chunks = 0
    for _, _, _, begin, end in p.query_tiles().tolist():
        box = math.prod(e - b for b, e in zip(begin, end, strict=True))
        chunks += -(-box // 64) + -(-(c["n_extra"] or 0) // 64)
    return chunks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype):
    c = CASES[name]
    t = make_inputs(c, dtype, seed=len(name))
    scale = c["dim"] ** -0.5
    ops = torch.ops.tokenmix_emulated
    mma, wgmma = ops.mma_count(), ops.wgmma_count()
    out, lse = forward(c, t, scale)
    mma, wgmma = ops.mma_count() - mma, ops.wgmma_count() - wgmma
    r_out, r_lse = reference(c, t, scale)
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = ((out.double() - r_out).abs().max() / r_out.abs().max().clamp_min(1.0)).item()
    assert err <= TOL[dtype], err
    assert (lse.double() - r_lse).abs().max().item() <= 1e-5
    # The warpgroup path ran: no mma.sync; per chunk, 4 warps x (D / 16 + 64 / 16) wgmma shares.
    assert mma == 0
    assert wgmma == 4 * (c["dim"] // 16 + 4) * whole_chunks(c) * c["batch"] * c["heads"]


@pytest.mark.parametrize("value", [INF, NAN], ids=["inf", "nan"])
@pytest.mark.parametrize("name", ["v", "k"])
def test_nonfinite_key_or_value_stays_in_its_window(name, value):
    """Token 20 is in the windows of queries 20-23 only (kernel 4, causal): the exact pass keeps a
    non-finite K or V row out of the other rows of its 64-query tile."""
    c = make_case((80,), 4, causal=True, heads=2, dim=64)
    t = poisoned(make_inputs(c, torch.float16, 1), name, (0, 20, 0, 3), value)
    out, lse = forward(c, t, 0.125)
    r_out, r_lse = reference(c, t, 0.125)
    bad = (~torch.isfinite(out)).flatten(2).any(-1)[0].nonzero().flatten().tolist()
    want = (~torch.isfinite(r_out)).flatten(2).any(-1)[0].nonzero().flatten().tolist()
    assert bad == want
    if name == "v":
        assert bad == [20, 21, 22, 23]
    ok = torch.isfinite(r_out)
    assert ((out.double() - r_out)[ok].abs().max()).item() <= 4e-3 * r_out[ok].abs().max().item()


@pytest.mark.parametrize(
    ("name", "token_stride", "path"),
    [
        # (token strides of whole 16-byte rows: others are copied into contiguous tensors)
        ("k", 2**25 - 8, "wgmma"),  # one past the last K element: 2^31 - 448
        ("k", 2**25, "mma"),  # ... 2^31 + 64
        ("v", 2**25, "mma"),
    ],
)
def test_key_rows_past_int32_offsets_take_the_mma_sync_kernel(name, token_stride, path):
    """The sm_90a kernel counts key and value rows in int32_t offsets from their (batch, head)'s
    first element; a K or V view reaching 2^31 elements or more into one head takes the mma.sync
    kernel, whose offsets are 64-bit (and both match the reference). The view's rows lie about
    2^25 elements apart in a 4 GiB allocation of which only the touched pages get memory."""
    c = make_case((65,), 5, heads=1, dim=64)
    t = make_inputs(c, torch.float16, 3)
    dense = t[name]
    storage = torch.empty(64 * token_stride + 64, dtype=torch.float16)
    t[name] = storage.as_strided(dense.shape, (0, token_stride, 64, 1))
    t[name].copy_(dense)
    ops = torch.ops.tokenmix_emulated
    mma, wgmma = ops.mma_count(), ops.wgmma_count()
    out, lse = forward(c, t, 0.125)
    mma, wgmma = ops.mma_count() - mma, ops.wgmma_count() - wgmma
    assert (mma > 0, wgmma > 0) == (path == "mma", path == "wgmma")
    r_out, r_lse = reference(c, t, 0.125)
    assert ((out.double() - r_out).abs().max() / r_out.abs().max()).item() <= TOL[torch.float16]
    assert (lse.double() - r_lse).abs().max().item() <= 1e-5


# The launcher's choice on compute capability 9.0 ($TOKENMIX_WGMMA unset): the wgmma kernel where
# the mma.sync kernels' warp groups compute at least wgmma_break_even(D) times the whole chunks'
# pairs (tokenmix/neighborhood_chunking.h), the kernel and the pairs tokenmix.plan reports.
AUTO_CASES = {
    # 1-D window 127 of 150: G/W = 0.848 >= 0.8125 (D = 64): the whole chunks pay
    "1d-k127-d64": (make_case((150,), 127, dim=64), "wgmma"),
    # ... and never at D = 32 (break-even 1.01: the two kernels' chunk costs are within the margin)
    "1d-k127-d32": (make_case((150,), 127, dim=32), "mma.sync"),
    # issue 12's 2-D k7 geometry: G/W = 0.48, the warp groups pay (41.8% useful at 64x64)
    "2d-k7-d64": (make_case((20, 20), 7, dim=64), "mma.sync"),
    "2d-k7-d128": (make_case((20, 20), 7, dim=128), "mma.sync"),
    # 2-D k13: G/W = 0.754, between D = 128's break-even (0.6) and D = 64's (0.8125)
    "2d-k13-d128": (make_case((20, 20), 13, dim=128), "wgmma"),
    "2d-k13-d64": (make_case((20, 20), 13, dim=64), "mma.sync"),
}


@pytest.mark.parametrize("name", list(AUTO_CASES))
@pytest.mark.parametrize("setting", ["unset", "auto"])
def test_auto_takes_the_kernel_the_plan_reports(name, setting, monkeypatch):
    c, kernel_name = AUTO_CASES[name]
    if setting == "unset":
        monkeypatch.delenv("TOKENMIX_WGMMA")
    else:
        monkeypatch.setenv("TOKENMIX_WGMMA", "auto")
    kernel, stride, dilation, causal = window_of(c)
    p = tokenmix.plan(
        c["shape"], kernel, stride, dilation, causal, head_dim=c["dim"], compute_capability=(9, 0)
    )
    assert p.cuda_forward == kernel_name
    t = make_inputs(c, torch.float16, seed=len(name))
    ops = torch.ops.tokenmix_emulated
    mma, wgmma = ops.mma_count(), ops.wgmma_count()
    out, lse = forward(c, t, 0.125)
    mma, wgmma = ops.mma_count() - mma, ops.wgmma_count() - wgmma
    heads = c["batch"] * c["heads"]
    if kernel_name == "wgmma":
        assert p.chunked_pairs == p.whole_chunk_pairs
        assert mma == 0
        assert wgmma == 4 * (c["dim"] // 16 + 4) * whole_chunks(c) * heads
    else:
        # D / 4 mma.sync per (warp, 16-key group): Q K^T D / 16 k-steps x 2, P V D / 8 tiles
        assert p.chunked_pairs < p.whole_chunk_pairs
        assert wgmma == 0
        assert mma == c["dim"] // 4 * (p.chunked_pairs // 256) * heads
    r_out, r_lse = reference(c, t, 0.125)
    assert ((out.double() - r_out).abs().max() / r_out.abs().max()).item() <= TOL[torch.float16]
    assert (lse.double() - r_lse).abs().max().item() <= 1e-5


@pytest.mark.parametrize("setting", ["0", "1"])
def test_setting_overrides_the_choice(setting, monkeypatch):
    # 0 keeps mma.sync where auto takes wgmma, 1 takes wgmma where auto keeps mma.sync
    c, auto = AUTO_CASES["1d-k127-d64" if setting == "0" else "2d-k7-d64"]
    assert auto == ("wgmma" if setting == "0" else "mma.sync")
    monkeypatch.setenv("TOKENMIX_WGMMA", setting)
    t = make_inputs(c, torch.float16, seed=5)
    ops = torch.ops.tokenmix_emulated
    mma, wgmma = ops.mma_count(), ops.wgmma_count()
    forward(c, t, 0.125)
    mma, wgmma = ops.mma_count() - mma, ops.wgmma_count() - wgmma
    assert (mma > 0, wgmma > 0) == (setting == "0", setting == "1")


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [("sm_90a", torch.float16), ("sm_90a", torch.float32), ("sm_80", torch.float16)],
    ids=["sm_90a-f16", "sm_90a-f32", "sm_80-f16"],
)
def test_bad_wgmma_setting_is_an_error(arch, dtype, monkeypatch):
    # whatever the device and dtype, not only where the choice is made
    monkeypatch.setenv("TOKENMIX_SIMT_ARCH", arch)
    monkeypatch.setenv("TOKENMIX_WGMMA", "yes")
    c = CASES["1d-partial-d32"]
    t = make_inputs(c, dtype, 0)
    with pytest.raises(Exception, match="TOKENMIX_WGMMA must be 0, 1 or auto, got 'yes'"):
        forward(c, t, 0.125)


def test_bad_arch_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("TOKENMIX_SIMT_ARCH", "sm_91")
    c = CASES["1d-partial-d32"]
    t = make_inputs(c, torch.float16, 0)
    with pytest.raises(Exception, match="TOKENMIX_SIMT_ARCH must be sm_80 or sm_90a, got 'sm_91'"):
        forward(c, t, 0.125)
