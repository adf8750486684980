"""tokenmix.distributed on gloo: 2 and 4 processes against the single-process operators.

All cases of one world size run in one spawn (module-scoped fixtures); each case is then
compared here. Float64 cases must agree to 1e-12 (the math is the same, only the rounding order
differs); float32 cases within 1e-6 relative to the largest magnitude of each tensor;
neighborhood attention's outputs, LSE and dQ bitwise.
"""

from __future__ import annotations

import distributed_harness as harness
import pytest
import tokenmix.distributed as tmd
import torch
from tokenmix.neighborhood.reference import window_table

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

F64 = torch.float64


def _na_cases() -> list[dict]:
    base = dict(kind="na", batch=1, heads=2, heads_kv=1, dim=8)
    return [
        dict(base, spatial=(13,), kernel_size=5, rpb=True, extra=3, batch=2),
        dict(base, spatial=(17,), kernel_size=4, dilation=2, rpb=True),
        dict(base, spatial=(19,), kernel_size=5, stride=3, is_causal=True),
        dict(base, spatial=(23,), kernel_size=7, stride=2, dilation=3),
        # windows wider than a shard: rows come from ranks two and three away
        dict(base, spatial=(20,), kernel_size=13, rpb=True, sizes={2: [3, 17], 4: [5, 5, 5, 5]}),
        dict(
            base, spatial=(22,), kernel_size=9, is_causal=True, sizes={2: [20, 2], 4: [2, 3, 16, 1]}
        ),
        dict(
            base,
            spatial=(11, 6),
            kernel_size=(7, 3),
            dilation=(1, 2),
            is_causal=(True, False),
            stride=(2, 1),
            rpb=True,
        ),
        dict(
            base, spatial=(12, 5), kernel_size=(3, 5), is_causal=(False, True), extra=2, heads_kv=2
        ),
        dict(
            base,
            spatial=(9, 4, 3),
            kernel_size=(7, 3, 2),
            rpb=True,
            sizes={2: [1, 8], 4: [1, 2, 5, 1]},
        ),
        dict(
            base,
            spatial=(10, 3, 4),
            kernel_size=(4, 2, 3),
            dilation=(2, 1, 1),
            is_causal=(True, True, False),
        ),
        dict(base, spatial=(15, 4), kernel_size=(5, 3), rpb=True, extra=2, dtype=F64),
        dict(
            base,
            spatial=(14, 3, 3),
            kernel_size=(3, 3, 3),
            dilation=(3, 1, 1),
            is_causal=(True, False, False),
            dtype=F64,
        ),
    ]


def _scan_cases() -> list[dict]:
    lin = dict(kind="linear", batch=1, heads=2, dim_k=8, dim_v=6)
    cu = [0, 5, 30, 31, 50]  # a sequence across 3 of 4 ranks, one of a single token
    cu_long = [0, 3, 60, 70]  # one sequence through every rank's boundary
    cu_edges = [
        0,
        25,
        38,
        50,
    ]  # sequences ending on shard boundaries (2 ranks; 4 ranks: 13, 26, 38)
    delta = dict(lin, kind="delta", dim_k=16, dim_v=8)
    return [
        dict(lin, length=37, batch=2, initial_state=True),
        dict(lin, length=50, cu_seqlens=cu, initial_state=True),
        dict(lin, length=50, cu_seqlens=cu_edges),
        dict(lin, length=41, batch=2, decay="g_gamma", initial_state=True),
        dict(lin, length=70, decay="g", cu_seqlens=cu_long, initial_state=True),
        dict(lin, length=50, decay="gk", cu_seqlens=cu, initial_state=True),
        dict(lin, length=33, batch=2, decay="gk"),
        dict(lin, length=50, normalize=True, cu_seqlens=cu, initial_state=True),
        dict(lin, length=50, decay="g_gamma", normalize=True, cu_seqlens=[0, 45, 50]),
        dict(lin, length=50, causal=False, cu_seqlens=cu, initial_state=True),
        dict(lin, length=30, batch=2, causal=False, normalize=True),
        dict(delta, length=70, cu_seqlens=cu_long, initial_state=True),
        dict(delta, length=40, batch=2),
        dict(delta, length=70, decay="g", cu_seqlens=[0, 3, 60, 70], initial_state=True),
        dict(delta, length=50, decay="g", cu_seqlens=cu, initial_state=True, dim_v=24),
        dict(lin, length=45, batch=2, decay="g", initial_state=True),
        dict(lin, length=39, batch=2, normalize=True, initial_state=True),
        dict(delta, length=43, batch=2, decay="g", initial_state=True),
        dict(lin, length=50, decay="gk", cu_seqlens=cu, initial_state=True, dtype=F64),
        dict(delta, length=50, decay="g", cu_seqlens=cu_edges, initial_state=True, dtype=F64),
    ]


def _bs_cases() -> list[dict]:
    bs = dict(kind="bs", batch=1, heads=2, heads_kv=1, dim=8)
    docs = [0] * 20 + [1] * 30 + [2] * 14
    return [
        dict(bs, length=96, block=16, rule="causal"),
        dict(bs, length=100, block=16, rule="window", window=24),
        dict(bs, length=64, block=8, rule="documents", doc_ids=docs, heads_kv=2),
        dict(
            bs,
            length=100,
            block=16,
            rule="random",
            layout_batch=2,
            layout_heads=2,
            batch=2,
            heads_kv=2,
        ),
        dict(bs, length=90, block=16, rule="random", layout_batch=1, layout_heads=1),
        dict(bs, length=80, block=16, rule="causal", sizes={2: [16, 64], 4: [48, 16, 0, 16]}),
        dict(bs, length=72, block=8, rule="window", window=9, dtype=F64),
        dict(bs, length=40, block=16, rule="causal"),  # 4 ranks: [16, 16, 8, 0]
    ]


def _module_cases() -> list[dict]:
    layer = dict(kind="module", dim=16, heads=2, dtype=F64)
    return [
        dict(layer, layer="na2d", length=11, extra_spatial=(10,)),
        dict(layer, layer="natten2d", length=9, extra_spatial=(4,)),
        dict(layer, layer="linear", length=29),
        dict(layer, layer="gdn", length=29),
        dict(layer, layer="bs", length=64, block=16),
        dict(layer, layer="gdn", length=24, dtype=torch.float32),
    ]


def _nonfinite_cases() -> list[dict]:
    """A NaN in an input: the NaNs of the outputs and gradients land where they land in one
    process (``far``: the first rank's outputs stay finite)."""
    return [
        dict(_scan_cases()[4], poison=("v", (0, 66, 1, 2)), far=True),
        dict(_scan_cases()[11], poison=("k", (0, 65, 0, 3)), far=True),
        # Backward too: the slab's padding queries reach the NaN key, and must carry nothing.
        dict(_na_cases()[0], poison=("k", (1, 12, 0, 1)), far=True),
        dict(_na_cases()[4], poison=("k", (0, 9, 0, 2))),
        dict(_bs_cases()[1], poison=("v", (0, 99, 0, 0)), far=True),
    ]


def _final_state_loss_cases() -> list[dict]:
    """A loss of the final states alone: ranks where no sequence ends still run the backward
    (and its collective)."""
    return [
        dict(_scan_cases()[4], loss_of="final"),
        dict(_scan_cases()[9], loss_of="final"),
        dict(_scan_cases()[11], loss_of="final"),
    ]


CASES = [
    dict(case, seed=100 + i)
    for i, case in enumerate(
        _na_cases()
        + _scan_cases()
        + _bs_cases()
        + _module_cases()
        + _nonfinite_cases()
        + _final_state_loss_cases()
    )
]


def _case_id(case: dict) -> str:
    keys = ("kind", "layer", "spatial", "kernel_size", "decay", "rule", "cu_seqlens", "causal")
    keys += ("normalize", "poison", "loss_of")
    parts = [f"{case[k]}" for k in keys if case.get(k) is not None]
    if case.get("dtype") == F64:
        parts.append("f64")
    return "-".join(parts).replace(" ", "")


# One rank passes a bad argument: it raises its error, and the others raise too instead of
# waiting in a collective.
ERROR_CASES = [
    dict(_na_cases()[0], bad_rank=1, bad=("rpb", (2, 8)), expect="rpb must have shape"),
    dict(_scan_cases()[1], bad_rank=1, bad=("initial_state", (3, 2, 8, 6)), expect="initial_state"),
    dict(_scan_cases()[12], bad_rank=0, bad=("beta", (1, 3)), expect="beta"),
    dict(_bs_cases()[0], bad_rank=1, bad=("k", (1, 48, 1)), expect="k must be a 4-D tensor"),
    dict(_na_cases()[1], bad_rank=0, bad=("q", (8, 4)), expect="1 to 3 spatial dimensions"),
]


@pytest.fixture(scope="module")
def results():
    cases = CASES + [dict(c, seed=1) for c in ERROR_CASES]
    return {world: harness.run_ranks(world, cases) for world in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("index", range(len(ERROR_CASES)), ids=[c["expect"] for c in ERROR_CASES])
def test_a_bad_argument_on_one_rank_stops_every_rank(results, world, index):
    case = ERROR_CASES[index]
    for rank, res in enumerate(results[world]):
        raised = res[len(CASES) + index].get("raised")
        assert raised is not None, f"rank {rank} did not raise"
        if rank == case["bad_rank"]:
            assert case["expect"] in raised, raised
        else:
            assert raised.startswith("RuntimeError") and "rejected their arguments" in raised


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_matches_single_process(results, world, index):
    case = CASES[index]
    per_rank = [r[index] for r in results[world]]
    diffs = harness.compare(case, per_rank)
    for name, (err, noise) in diffs.items():
        limit = 1e-12 if case.get("dtype") == F64 else 1e-6
        if case["kind"] == "module" and name not in ("y", "dx") and limit < 2 * noise:
            limit = 2 * noise  # a parameter's shares summed over the ranks (see the harness)
        assert err <= limit, (
            f"{name}: relative difference {err:.2e} > {limit:.1e} (the single-process float32 "
            f"error against float64 is {noise:.1e}; all: {diffs})"
        )
    # Bitwise where the reduction order is the same as in one process: each query's
    # neighborhood window, or block list with bitmasks, goes through the same kernel in the
    # same order. dK/dV add the halo's contributions in another order.
    if case["kind"] == "na" or (case["kind"] == "bs" and case["rule"] == "random"):
        for name in ("out", "lse", "dq"):
            if name in diffs:
                assert diffs[name][0] == 0, f"{name} is not bitwise equal: {diffs[name][0]:.2e}"
    if not case.get("forward_only"):
        assert any(n.startswith("d") for n in diffs), "no gradient was compared"
    if case.get("poison") and case.get("far"):
        name = "out" if case["kind"] in ("na", "bs") else "o"
        first = per_rank[0]["outputs"][name]
        assert torch.isfinite(first).all(), "a NaN on the last rank reached rank 0"


def _rows_read(case: dict, sizes: list[int]) -> list[dict[int, int]]:
    """Per rank: how many rows of dimension 1 it reads from each other rank, from the window
    rule (or the layout) itself, not from tokenmix.distributed's plans."""
    bounds = tmd.shard_bounds(sizes)
    length = sum(sizes)
    reads = []
    for a, b in bounds:
        if case["kind"] == "na":
            first = lambda x: x if isinstance(x, int | bool) else x[0]  # noqa: E731
            keys, valid, _ = window_table(
                length,
                first(case["kernel_size"]),
                first(case.get("stride", 1)),
                first(case.get("dilation", 1)),
                bool(first(case.get("is_causal", False))),
                queries=torch.arange(a, b),
            )
            rows = set(keys[valid].tolist())
        else:
            block = case["block"]
            used = harness.make_layout(case).block_status() > 0
            cols = used[:, :, a // block : -(-b // block)].flatten(0, 2).any(0) if b > a else []
            rows = {
                r
                for blk in torch.as_tensor(cols).nonzero().flatten().tolist()
                for r in range(blk * block, min((blk + 1) * block, length))
            }
        per_owner = {}
        for p, (pa, pb) in enumerate(bounds):
            n = sum(1 for r in rows if pa <= r < pb)
            if n and (pa, pb) != (a, b):
                per_owner[p] = n
        reads.append(per_owner)
    return reads


def _expected_p2p_bytes(case: dict, world: int, rank: int) -> int:
    """Bytes rank ``rank`` sends point to point: the K/V rows its peers read (forward) and the
    gradients of the rows it read (backward)."""
    tensors, _, _ = harness.make_inputs(case)
    k, v = tensors["k"], tensors["v"]
    sizes = harness.shard_sizes_for(case, k.shape[1], world)
    row = k[0, 0].numel() + v[0, 0].numel()  # one row of dimension 1, K and V together
    row_bytes = k.shape[0] * row * k.element_size()
    reads = _rows_read(case, sizes)
    sent = sum(r.get(rank, 0) for r in reads)
    returned = sum(reads[rank].values())
    return (sent + returned) * row_bytes


@pytest.mark.parametrize("world", [2, 4])
def test_only_the_halo_and_used_key_blocks_travel(results, world):
    checked = 0
    for index, case in enumerate(CASES):
        if case["kind"] not in ("na", "bs") or case.get("forward_only"):
            continue
        for rank, res in enumerate(results[world]):
            p2p, collective = res[index]["bytes"]
            assert p2p == _expected_p2p_bytes(case, world, rank), (index, rank)
            # The only collective: one all-gather of the shard lengths (two for block-sparse).
            gathers = 2 if case["kind"] == "bs" else 1
            assert collective == gathers * 16 * (world - 1), (index, rank)
        checked += 1
    assert checked >= 15
