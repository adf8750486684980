"""The block-sparse CUDA kernels (BlockSparsePolicy on the CUDA attention engine), run on the SIMT
emulator through torch.ops.tokenmix_emulated.block_sparse_forward / block_sparse_backward and
compared with a dense float64 masked softmax: output, LSE, dQ, dK and dV.

The layouts are built here as the ops' tensors (tests/bs_cases.py): random block states or blocks
derived from the element rule (full where every element is kept), lists in random order with
garbage past their counts, every element-rule part (band: causal with an offset, sliding window,
prefix; document ids; bitmasks), GQA, Tq != Tk, ragged lengths, block sizes from 16 to 192 and
non-multiples of the kernels' tiles, layout broadcast, and query rows that keep no key. Bitmasks
that are all 0, all 1 or mixed per region exercise the schedule's classification of each tile x
chunk, and torch.ops.tokenmix_emulated.block_sparse_schedule shows the schedule itself: the chunks
each tile visits and which of them are full.

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
    # Attention sinks: a causal prefix longer than the diagonal block (early queries must not
    # see later sinks), direct mode and schedule mode.
    "causal_sinks_direct": Case(
        q_len=160, kv_len=160, band=[-40, 0, 50, 1], q_block=32, kv_block=32, seed=41, **DERIVED
    ),
    "causal_sinks_schedule": Case(
        q_len=150, kv_len=170, band=[-30, 20, 45, 1], q_block=48, kv_block=40, seed=42, **DERIVED
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
    # Multiples of the tiles and chunks, but with bitmasks under blocks larger than them: the
    # schedule (classifying the bits per tile x chunk), not direct mode.
    "bits_64_128_ragged": Case(
        heads=2, layout_heads=2, q_len=150, kv_len=170, bits=True, q_block=64, kv_block=128, seed=19
    ),
    # Blocks larger than the tile or chunk whose bits are all 0, all 1 or mixed per 64x64 (32x32)
    # region: the schedule drops the empty tile x chunk pieces and makes the all-one ones full.
    "bits_regions_128_gqa_ragged": Case(
        heads=4,
        kv_heads=2,
        q_len=200,
        kv_len=190,
        bits=True,
        bits_regions=64,
        q_block=128,
        kv_block=128,
        seed=22,
    ),
    "bits_regions_128_heads": Case(
        heads=2,
        layout_heads=2,
        q_len=256,
        kv_len=256,
        bits=True,
        bits_regions=64,
        q_block=128,
        kv_block=128,
        density=0.8,
        seed=23,
    ),
    "bits_regions_96_192_causal": Case(
        q_len=200,
        kv_len=230,
        band=[-FAR, 20, 0],
        bits=True,
        bits_regions=64,
        q_block=96,
        kv_block=192,
        seed=24,
        **DERIVED,
    ),
    "bits_regions_192_96_docs": Case(
        batch=2,
        layout_batch=2,
        q_len=210,
        kv_len=200,
        docs=True,
        bits=True,
        bits_regions=32,
        q_block=192,
        kv_block=96,
        seed=25,
        **DERIVED,
    ),
    "bits_regions_48_40": Case(
        q_len=200,
        kv_len=190,
        bits=True,
        bits_regions=64,
        q_block=48,
        kv_block=40,
        density=0.9,
        seed=38,
    ),
    # Block sizes multiples of the kernels' tiles and chunks: the kernels walk the lists directly;
    # with bitmasks only blocks of one tile x one chunk do (here the query side).
    "bits_direct_64_32": Case(
        q_len=140, kv_len=200, bits=True, q_block=64, kv_block=32, density=0.8, seed=26
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


@pytest.mark.slow
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
        # D = 128: one dQ block for all 128 columns, dP in parts (dK/dV: two 64-column blocks)
        Case(
            heads=4,
            kv_heads=2,
            q_len=140,
            kv_len=150,
            dim=128,
            vdim=128,
            band=[-FAR, 10, 0],
            bits=True,
            q_block=64,
            kv_block=32,
            seed=31,
            **DERIVED,
        ),
        Case(q_len=90, kv_len=120, dim=40, vdim=24, bits=True, q_block=16, kv_block=32, seed=12),
        Case(q_len=64, kv_len=64, docs=True, q_block=32, kv_block=16, seed=13, **DERIVED),
        Case(q_len=150, kv_len=170, bits=True, q_block=64, kv_block=128, seed=21),
        Case(q_len=130, kv_len=140, bits=True, q_block=64, kv_block=64, seed=27),
        Case(
            heads=4,
            kv_heads=2,
            q_len=200,
            kv_len=260,
            dim=64,
            vdim=64,
            bits=True,
            bits_regions=64,
            q_block=128,
            kv_block=128,
            seed=28,
        ),
        Case(
            q_len=150,
            kv_len=200,
            dim=40,
            vdim=24,
            band=[-FAR, 30, 0],
            bits=True,
            bits_regions=64,
            q_block=96,
            kv_block=192,
            seed=29,
            **DERIVED,
        ),
    ],
    ids=[
        "causal_d64",
        "bits_gqa_d128",
        "bits_general",
        "docs_d32",
        "bits_64_128",
        "bits_direct_64",
        "bits_regions_128_d64",
        "bits_regions_96_192_causal",
    ],
)
def test_half_types_match_dense_reference(case, dtype):
    check(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_d128_dkdv_fits_a_99_kib_device(monkeypatch, dtype):
    """Blocks of one token at D=128: the key-side schedule's 64 x 64 tables (16 KiB) beside the
    dK/dV warp pairs' exchange (17 KiB) need 101.9 KiB of shared memory, past the 99 KiB of
    sm_86, sm_89 and sm_120. The emulated device stands in for one ($TOKENMIX_SIMT_MAX_SHARED),
    and the launcher takes the 64-column dK/dV blocks there instead of failing."""
    monkeypatch.setenv("TOKENMIX_SIMT_MAX_SHARED", str(99 * 1024))
    case = Case(q_len=70, kv_len=70, dim=128, vdim=128, q_block=1, kv_block=1, density=0.3, seed=5)
    check(case, dtype)


@pytest.mark.parametrize("value", ["abc", "-5", "0", "12k"])
def test_emulated_device_size_setting_is_checked(monkeypatch, value):
    monkeypatch.setenv("TOKENMIX_SIMT_MAX_SHARED", value)
    with pytest.raises(RuntimeError, match="TOKENMIX_SIMT_MAX_SHARED is"):
        check(Case(q_len=40, kv_len=40), torch.float16)


def test_deterministic_mode_is_bitwise_repeatable_and_equal():
    c = Case(heads=4, kv_heads=1, q_len=100, kv_len=100, q_block=32, kv_block=32, seed=14)
    a, _, _ = make_layout(c)
    t = make_inputs(c, torch.float32)
    first = run(t, a, 0.2, t["grad_lse"], deterministic=True)
    second = run(t, a, 0.2, t["grad_lse"], deterministic=True)
    plain = run(t, a, 0.2, t["grad_lse"], deterministic=False)
    for x, y, z in zip(first, second, plain, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_deterministic_mode_with_classified_bits():
    """128-blocks whose bits drop and fill 64x64 pieces, GQA, ragged: deterministic mode is
    bitwise repeatable, equal to the default mode and matches the reference."""
    c = Case(
        heads=4,
        kv_heads=2,
        q_len=190,
        kv_len=170,
        bits=True,
        bits_regions=64,
        q_block=128,
        kv_block=128,
        seed=30,
    )
    first, _ = check(c, deterministic=True)
    a, _, _ = make_layout(c)
    t = make_inputs(c, torch.float32)
    scale = 1.0 / math.sqrt(c.dim)
    second = run(t, a, scale, t["grad_lse"], deterministic=True)
    plain = run(t, a, scale, t["grad_lse"], deterministic=False)
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


def layout_args(layout):
    """The ops' layout arguments of a tokenmix.BlockLayout, as tokenmix.block_sparse_attention
    passes them."""
    em = layout.element_mask
    return dict(
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


def run_layout(q, k, v, layout, scale, grad_out, grad_lse):
    """The emulated ops with the arguments tokenmix.block_sparse_attention passes."""
    t = dict(q=q, k=k, v=v, grad_out=grad_out)
    return run(t, layout_args(layout), scale, grad_lse)


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


# ---- the schedule itself: which chunks a tile visits and which are full ----

LIST_NAMES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
Q_LIST_NAMES = ("q_num_blocks", "q_indices", "q_slots", "full_q_num_blocks", "full_q_indices")


def schedules(t, a):
    """torch.ops.tokenmix_emulated.block_sparse_schedule: the tile schedules the kernels would
    use, per side {"query": ..., "key": ...}, each [head rows][tiles] -> [(chunk, full)], or None
    for a side in direct mode."""
    lists = [a[n] for n in LIST_NAMES + Q_LIST_NAMES]
    tail = [a["block_size"], a["mask_bits"], a["q_doc"], a["kv_doc"], a["band"]]
    got = torch.ops.tokenmix_emulated.block_sparse_schedule(t["q"], t["k"], t["v"], *lists, *tail)
    out = {}
    for side, (count, entry) in zip(("query", "key"), (got[:2], got[2:]), strict=True):
        if count.numel() == 0:
            out[side] = None
            continue
        out[side] = [
            [
                [(int(e) >> 1, bool(int(e) & 1)) for e in entry[r, i, : count[r, i]]]
                for i in range(count.shape[1])
            ]
            for r in range(count.shape[0])
        ]
    return out


def listed_elements(a, q_len, kv_len):
    """From the ops' arguments alone, per layout head row [LB * LH, Tq, Tk]: the elements under a
    listed block, those its bits keep (full blocks: all of them; the structured rule is left
    out), and those under a block listed full."""
    qbs, kbs = a["block_size"]
    count, index = a["kv_num_blocks"], a["kv_indices"]
    lb, lh, nq = count.shape
    nk = -(-kv_len // kbs)
    shape = (lb * lh, nq * qbs, nk * kbs)
    listed, bits, full = (torch.zeros(shape, dtype=torch.bool) for _ in range(3))
    shifts = torch.arange(32, dtype=torch.int32)
    for b in range(lb):
        for h in range(lh):
            r = b * lh + h
            for i in range(nq):
                rows = slice(i * qbs, (i + 1) * qbs)
                for s in range(int(count[b, h, i])):
                    cols = slice(int(index[b, h, i, s]) * kbs, (int(index[b, h, i, s]) + 1) * kbs)
                    listed[r, rows, cols] = True
                    words = a["mask_bits"][b, h, i, s]  # [qbs, words]
                    unpacked = ((words[..., None] >> shifts) & 1).flatten(-2)[:, :kbs] == 1
                    bits[r, rows, cols] = unpacked
                for s in range(int(a["full_kv_num_blocks"][b, h, i])):
                    j = int(a["full_kv_indices"][b, h, i, s])
                    cols = slice(j * kbs, (j + 1) * kbs)
                    listed[r, rows, cols] = bits[r, rows, cols] = full[r, rows, cols] = True
    return tuple(x[:, :q_len, :kv_len] for x in (listed, bits, full))


def expected_schedule(kept, full, chunk):
    """[tiles] -> [(chunk, full)] of one head row and side: kept / full are [rows, cols] (rows:
    the side's tiles). A chunk is visited where the bits keep an element under the tile x chunk,
    full where every element is kept (`full` holds what may count as full) and it lies inside
    the sequence."""
    rows, cols = kept.shape
    out = []
    for r0 in range(0, rows, 64):
        tile = []
        for c in range(-(-cols // chunk)):
            region = (slice(r0, r0 + 64), slice(c * chunk, (c + 1) * chunk))
            if kept[region].any():
                tile.append((c, bool(full[region].all()) and (c + 1) * chunk <= cols))
        out.append(tile)
    return out


def check_schedules(t, a, q_len, kv_len, structured, chunk):
    """Both sides' schedules equal the expected ones; returns how many tile x chunk pieces under
    listed blocks were dropped and how many partial ones became full."""
    listed, kept, full_listed = listed_elements(a, q_len, kv_len)
    full_ok = full_listed if structured else kept
    got = schedules(t, a)
    dropped = made_full = 0
    for side in ("query", "key"):
        assert got[side] is not None, f"{side} side: schedule mode expected"
        if side == "key":  # rows are keys
            listed, kept, full_ok, full_listed = (
                x.transpose(1, 2) for x in (listed, kept, full_ok, full_listed)
            )
        for r in range(listed.shape[0]):
            want = expected_schedule(kept[r], full_ok[r], chunk)
            assert got[side][r] == want, f"{side} side, head row {r}"
            visits = expected_schedule(listed[r], full_listed[r], chunk)
            dropped += sum(len(v) for v in visits) - sum(len(w) for w in want)
            made_full += sum(f for w in want for _, f in w) - sum(f for v in visits for _, f in v)
    return dropped, made_full


SCHEDULE_CASES = {
    "128_ragged": Case(
        heads=2,
        layout_heads=2,
        q_len=300,
        kv_len=270,
        bits=True,
        bits_regions=64,
        q_block=128,
        kv_block=128,
        seed=31,
    ),
    "96_192": Case(
        q_len=290, kv_len=400, bits=True, bits_regions=64, q_block=96, kv_block=192, seed=32
    ),
    "192_96": Case(
        q_len=400, kv_len=300, bits=True, bits_regions=64, q_block=192, kv_block=96, seed=34
    ),
    # Blocks smaller than a tile and not multiples of 32 keys: a chunk combines several pairs
    # (full only if all are), whose bits under it start and end inside bitmask words.
    "48_40_partial_words": Case(
        q_len=260,
        kv_len=250,
        bits=True,
        bits_regions=64,
        q_block=48,
        kv_block=40,
        density=0.95,
        full_blocks=False,
        seed=37,
    ),
    "16_16_shared_chunks": Case(
        q_len=200,
        kv_len=200,
        bits=True,
        bits_regions=32,
        q_block=16,
        kv_block=16,
        density=0.9,
        seed=35,
    ),
    "128_causal": Case(
        q_len=300,
        kv_len=300,
        band=[-FAR, 0, 0],
        bits=True,
        bits_regions=64,
        q_block=128,
        kv_block=128,
        seed=35,
        **DERIVED,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(SCHEDULE_CASES))
def test_schedule_drops_empty_chunks_and_fills_all_one_chunks(name, dtype):
    """The bits under each tile x chunk decide: no kept element, the chunk is not visited (not
    in the tile's list, so never loaded); every element kept and no structured rule, it is full;
    otherwise partial. Both sides, compared with the classification computed here from the ops'
    arguments."""
    c = SCHEDULE_CASES[name]
    a, _, _ = make_layout(c)
    t = make_inputs(c, dtype)
    chunk = 32 if dtype == torch.float32 else 64
    dropped, made_full = check_schedules(t, a, c.q_len, c.kv_len, bool(c.band), chunk)
    assert dropped > 0, "the case must have listed pieces whose bits keep nothing"
    if c.band:
        assert made_full == 0
    else:
        assert made_full > 0, "the case must have partial pieces whose bits keep everything"


def test_flex_random_64_blocks_at_block_size_128():
    """A random pattern of 64x64 blocks at 10% given to Flex create_block_mask(BLOCK_SIZE=128):
    every 128-block is partial and most of its quarters are empty. The kernels visit only the
    non-empty quarters (each then full), and match the reference."""
    from tokenmix.block_sparse.layout import BlockLayout
    from torch.nn.attention.flex_attention import create_block_mask

    n = 512
    gen = torch.Generator().manual_seed(36)
    table = torch.rand(n // 64, n // 64, generator=gen) < 0.1
    table[:, 0] = True  # every query keeps a key

    def mask_mod(b, h, q_idx, kv_idx):
        return table[q_idx // 64, kv_idx // 64]

    bm = create_block_mask(mask_mod, 1, 1, n, n, device="cpu", BLOCK_SIZE=128)
    layout = BlockLayout.from_block_mask(bm)
    assert layout.full_kv_num_blocks.sum() == 0 and layout.mask_bits is not None
    q = torch.randn(1, n, 2, 32, generator=gen)
    k = torch.randn(1, n, 1, 32, generator=gen)
    v = torch.randn(1, n, 1, 32, generator=gen)
    grad_out = torch.randn(1, n, 2, 32, generator=gen)
    grad_lse = torch.randn(1, n, 2, generator=gen)
    got = run_layout(q, k, v, layout, 0.2, grad_out, grad_lse)
    want = reference_of(q, k, v, layout, 0.2, grad_out, grad_lse)
    for what, x, y in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        close(what, x, y, TOL[torch.float32])
    # Query tiles x 64-key chunks (fp16) are the quarters: exactly the kept ones, all full.
    a = layout_args(layout)
    sched = schedules(dict(q=q.half(), k=k.half(), v=v.half()), a)
    for side, tab in (("query", table), ("key", table.T)):
        want = [[(int(c), True) for c in row.nonzero().flatten()] for row in tab]
        assert sched[side][0] == want, side
