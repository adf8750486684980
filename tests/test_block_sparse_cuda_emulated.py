"""The block-sparse CUDA kernels (BlockSparsePolicy on the CUDA attention engine), run on the SIMT
emulator through torch.ops.tokenmix_emulated.block_sparse_forward / block_sparse_backward and
compared with a dense float64 masked softmax: output, LSE, dQ, dK and dV.

The layouts are built here as the ops' tensors (tests/bs_cases.py): random block states or blocks
derived from the element rule (full where every element is kept), lists in random order with
garbage past their counts, every element-rule part (band: causal with an offset, sliding window,
prefix; document ids; bitmasks), GQA, Tq != Tk, ragged lengths, block sizes from 16 to 128 and
non-multiples of the kernels' tiles, layout broadcast, and query rows that keep no key.

The emulated ops poison every output with NaN first, and the emulator stops a launch at any
out-of-bounds access, shared-memory race, uninitialized shared read or barrier divergence.
"""

from __future__ import annotations

import math
import os

import pytest
import tokenmix
import torch
from bs_cases import FAR, Case, dense_reference, make_inputs, make_layout

LIBRARY = os.path.join(os.path.dirname(tokenmix.__file__), "_emulated.so")
TOL = {torch.float32: 2e-4, torch.float16: 1.5e-2, torch.bfloat16: 5e-2}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(scope="module", autouse=True)
def emulated_library():
    assert os.path.exists(LIBRARY), "the build must produce tokenmix/_emulated.so"
    torch.ops.load_library(LIBRARY)


def run(t, a, scale, grad_lse=None, deterministic=False):
    ops = torch.ops.tokenmix_emulated
    fwd = [a[n] for n in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")]
    tail = [a["block_size"], a["mask_bits"], a["q_doc"], a["kv_doc"], a["band"], scale]
    out, lse = ops.block_sparse_forward(t["q"], t["k"], t["v"], *fwd, *tail)
    bwd = [a[n] for n in ("q_num_blocks", "q_indices", "q_slots", "full_q_num_blocks")]
    grads = ops.block_sparse_backward(
        t["grad_out"], t["q"], t["k"], t["v"], out, lse, *fwd, *bwd, a["full_q_indices"], *tail,
        grad_lse, deterministic,
    )  # fmt: skip
    return (out, lse, *grads)


def close(name, got, want, tol):
    want = want.to(torch.float64)
    got = got.to(torch.float64)
    assert torch.isfinite(got).all() or (~torch.isfinite(want)).any(), f"{name}: non-finite"
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite pattern differs"
    assert torch.equal(got[~finite], want[~finite]), f"{name}: infinities differ"
    scale = max(want[finite].abs().max().item(), 1.0) if finite.any() else 1.0
    err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol * scale:.3g}"


def check(c: Case, dtype=torch.float32, grad_lse=True, deterministic=False):
    a, keep, _ = make_layout(c)
    t = make_inputs(c, dtype)
    scale = 1.0 / math.sqrt(c.dim)
    g_lse = t["grad_lse"] if grad_lse else None
    got = run(t, a, scale, g_lse, deterministic)
    want = dense_reference(t["q"], t["k"], t["v"], keep, scale, t["grad_out"], g_lse)
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        close(name, x, y, TOL[dtype])
    dead = ~keep.any(-1).permute(0, 2, 1)  # [B, Tq, H]: rows without a kept key
    assert (got[1][dead] == -math.inf).all() and (got[0][dead] == 0).all()
    return got, keep


# The sweep. Sizes stay small: the emulator runs every thread of every block.
DERIVED = dict(pattern="derived")
CASES = {
    "random_gqa_ragged": Case(heads=4, kv_heads=2, q_len=150, kv_len=97, q_block=32, kv_block=48),
    "random_bcast_heads": Case(
        heads=2, layout_heads=2, q_len=80, kv_len=130, q_block=64, kv_block=16, seed=1
    ),
    "layout_per_kv_head": Case(
        heads=6,
        kv_heads=2,
        layout_heads=2,
        bits=True,
        q_len=90,
        kv_len=110,
        q_block=32,
        kv_block=48,
        seed=21,
    ),
    "direct_layout_per_kv_head": Case(
        heads=4,
        kv_heads=2,
        layout_heads=2,
        bits=True,
        q_len=130,
        kv_len=140,
        q_block=64,
        kv_block=64,
        seed=22,
    ),
    "causal_offset": Case(
        q_len=70, kv_len=130, band=[-FAR, 60, 0], q_block=16, kv_block=32, seed=2, **DERIVED
    ),
    "causal_prefix": Case(
        q_len=128,
        kv_len=128,
        band=[-FAR, 0, 20],
        q_block=64,
        kv_block=64,
        seed=3,
        density=1.0,
        **DERIVED,
    ),
    "sliding_window": Case(
        q_len=140, kv_len=140, band=[-40, 8, 0], q_block=20, kv_block=24, seed=4, **DERIVED
    ),
    "documents": Case(
        batch=2,
        layout_batch=2,
        q_len=96,
        kv_len=96,
        docs=True,
        q_block=32,
        kv_block=32,
        seed=5,
        density=1.0,
        **DERIVED,
    ),
    "bits": Case(q_len=90, kv_len=75, bits=True, q_block=16, kv_block=37, seed=6),
    "bits_band_docs": Case(
        q_len=100,
        kv_len=100,
        bits=True,
        docs=True,
        band=[-FAR, 0, 0],
        q_block=48,
        kv_block=40,
        seed=7,
        **DERIVED,
    ),
    "big_blocks": Case(q_len=200, kv_len=180, q_block=128, kv_block=100, seed=8),
    "small_q_big_kv": Case(
        heads=3, q_len=66, kv_len=160, q_block=16, kv_block=128, seed=9, empty_query_blocks=True
    ),
    "dv_differs": Case(dim=40, vdim=24, q_len=70, kv_len=70, seed=10),
    # Block sizes multiples of the kernels' tiles and chunks: the kernels walk the lists directly.
    "direct_bits_ragged": Case(
        heads=2, layout_heads=2, q_len=150, kv_len=170, bits=True, q_block=64, kv_block=128, seed=19
    ),
    "direct_docs_gqa": Case(
        heads=4,
        kv_heads=2,
        q_len=130,
        kv_len=140,
        docs=True,
        band=[-FAR, 10, 0],
        q_block=128,
        kv_block=64,
        seed=20,
        **DERIVED,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_dense_reference(name):
    check(CASES[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    "case",
    [
        Case(
            q_len=130,
            kv_len=100,
            dim=64,
            vdim=64,
            band=[-FAR, 0, 0],
            q_block=64,
            kv_block=64,
            seed=11,
            **DERIVED,
        ),
        Case(q_len=90, kv_len=120, dim=40, vdim=24, bits=True, q_block=16, kv_block=32, seed=12),
        Case(q_len=64, kv_len=64, docs=True, q_block=32, kv_block=16, seed=13, **DERIVED),
        Case(q_len=150, kv_len=170, bits=True, q_block=64, kv_block=128, seed=21),
    ],
    ids=["causal_d64", "bits_general", "docs_d32", "bits_direct"],
)
def test_half_types_match_dense_reference(case, dtype):
    check(case, dtype)


def test_deterministic_mode_is_bitwise_repeatable_and_equal():
    c = Case(heads=4, kv_heads=1, q_len=100, kv_len=100, q_block=32, kv_block=32, seed=14)
    a, _, _ = make_layout(c)
    t = make_inputs(c, torch.float32)
    first = run(t, a, 0.2, t["grad_lse"], deterministic=True)
    second = run(t, a, 0.2, t["grad_lse"], deterministic=True)
    plain = run(t, a, 0.2, t["grad_lse"], deterministic=False)
    for x, y, z in zip(first, second, plain, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_rows_without_keys_give_zero_and_no_gradient():
    """A query block that lists nothing and partial blocks whose rule keeps nothing."""
    c = Case(q_len=96, kv_len=96, band=[FAR // 2, FAR, 0], q_block=32, kv_block=32, seed=15)
    c.full_blocks = False
    c.empty_query_blocks = True
    a, _, _ = make_layout(c)
    assert a["kv_num_blocks"].sum() > 0 and a["full_kv_num_blocks"].sum() == 0
    got, keep = check(c)
    assert not keep.any()
    assert (got[2] == 0).all() and (got[3] == 0).all() and (got[4] == 0).all()


def test_empty_layout_and_full_only_layout():
    c = Case(q_len=50, kv_len=40, density=0.0, seed=16)
    got, _ = check(c)
    assert (got[1] == -math.inf).all()
    check(Case(q_len=130, kv_len=130, q_block=64, kv_block=64, seed=17, density=1.0, **DERIVED))


def test_strided_inputs_are_accepted():
    """Heads-first tensors viewed as [B, T, H, D] (what Flex users pass) give the same results."""
    c = Case(heads=2, q_len=70, kv_len=70, q_block=32, kv_block=32, seed=18)
    a, keep, _ = make_layout(c)
    t = make_inputs(c, torch.float32)
    strided = {
        n: x.transpose(1, 2).contiguous().transpose(1, 2) if x.dim() == 4 else x
        for n, x in t.items()
    }
    assert not strided["q"].is_contiguous()
    pairs = zip(run(t, a, 0.3, t["grad_lse"]), run(strided, a, 0.3, t["grad_lse"]), strict=True)
    for x, y in pairs:
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ---- through tokenmix.BlockLayout (its q-side lists, bitmasks from Flex) and the reference ----


def run_layout(q, k, v, layout, scale, grad_out, grad_lse):
    """The emulated ops with the arguments tokenmix.block_sparse_attention passes."""
    em = layout.element_mask
    t = dict(q=q, k=k, v=v, grad_out=grad_out)
    a = dict(
        kv_num_blocks=layout.kv_num_blocks,
        kv_indices=layout.kv_indices,
        full_kv_num_blocks=layout.full_kv_num_blocks,
        full_kv_indices=layout.full_kv_indices,
        q_num_blocks=layout.q_num_blocks,
        q_indices=layout.q_indices,
        q_slots=layout.q_slots,
        full_q_num_blocks=layout.full_q_num_blocks,
        full_q_indices=layout.full_q_indices,
        block_size=list(layout.block_size),
        mask_bits=layout.mask_bits,
        q_doc=em.q_doc if em is not None else None,
        kv_doc=em.kv_doc if em is not None else None,
        band=em.band_arg() if em is not None else [],
    )
    return run(t, a, scale, grad_lse)


def reference_of(q, k, v, layout, scale, grad_out, grad_lse):
    from tokenmix.block_sparse.reference import block_sparse_attention_reference

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = block_sparse_attention_reference(*leaves, layout, scale=scale, return_lse=True)
    live = torch.isfinite(lse)
    loss = (out * grad_out.double()).sum() + (torch.where(live, lse, 0) * grad_lse).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, leaves))


def _layouts():
    from tokenmix.block_sparse.layout import BlockLayout
    from tokenmix.block_sparse.mask import ElementMask
    from torch.nn.attention.flex_attention import create_block_mask

    docs = torch.tensor([[0] * 30 + [1] * 50 + [2] * 16, [0] * 70 + [1] * 26])
    yield (
        "causal_offset",
        2,
        70,
        130,
        BlockLayout.from_element_mask(
            ElementMask.causal(offset=60), q_len=70, kv_len=130, block_size=(32, 48)
        ),
    )
    yield (
        "sliding",
        1,
        150,
        150,
        BlockLayout.from_element_mask(
            ElementMask.sliding_window(left=50, right=3), q_len=150, kv_len=150, block_size=64
        ),
    )
    yield (
        "prefix_lm",
        1,
        100,
        100,
        BlockLayout.from_element_mask(
            ElementMask.prefix_lm(prefix=24), q_len=100, kv_len=100, block_size=(16, 128)
        ),
    )
    yield (
        "documents_causal",
        2,
        96,
        96,
        BlockLayout.from_element_mask(
            ElementMask.document(docs, causal=True), q_len=96, kv_len=96, block_size=32
        ),
    )

    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx * 7 + kv_idx * 3 + h) % 5 != 0) & (kv_idx <= q_idx + 20)

    bm = create_block_mask(mask_mod, 1, 2, 90, 110, device="cpu", BLOCK_SIZE=(16, 32))
    yield "flex_bits", 1, 90, 110, BlockLayout.from_block_mask(bm, batch=1, heads=2)


@pytest.mark.parametrize("index", range(5))
def test_matches_tokenmix_reference_through_block_layout(index):
    name, batch, q_len, kv_len, layout = list(_layouts())[index]
    gen = torch.Generator().manual_seed(index)
    heads = 2
    q = torch.randn(batch, q_len, heads, 32, generator=gen)
    k = torch.randn(batch, kv_len, 1, 32, generator=gen)
    v = torch.randn(batch, kv_len, 1, 24, generator=gen)
    grad_out = torch.randn(batch, q_len, heads, 24, generator=gen)
    grad_lse = torch.randn(batch, q_len, heads, generator=gen)
    got = run_layout(q, k, v, layout, 0.2, grad_out, grad_lse)
    want = reference_of(q, k, v, layout, 0.2, grad_out, grad_lse)
    for what, x, y in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        close(f"{name}: {what}", x, y, TOL[torch.float32])
