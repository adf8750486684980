"""The planner ``tokenmix.plan``: tile shapes, query tiles and pair counts.

The planner reports what ``csrc/include/tokenmix/neighborhood_schedule.h`` computes;
these tests check it against brute force written from the window rule
(``tests/na_brute_force.py``), independently of that header.
"""

from __future__ import annotations

import dataclasses
import doctest
import itertools
import math
import random

import pytest
import tokenmix
import torch
from na_brute_force import attended_1d, brute_force_mask
from tokenmix.neighborhood import plan as plan_module
from tokenmix.neighborhood.plan import NeighborhoodPlan, PlanFlops


def _powers_of_two_up_to(n: int) -> list[int]:
    return [1 << i for i in range(n.bit_length()) if (1 << i) <= n]


def _shapes_of_volume(volume: int, rank: int) -> list[tuple[int, ...]]:
    """Every power-of-two tile shape with ``rank`` entries and product ``volume``."""
    options = _powers_of_two_up_to(volume)
    return [s for s in itertools.product(options, repeat=rank) if math.prod(s) == volume]


def _random_problem(rng: random.Random) -> dict:
    """A small random problem (the brute-force mask is tokens^2 Python checks)."""
    rank = rng.choice((1, 2, 3))
    max_len = {1: 40, 2: 14, 3: 6}[rank]
    shape, kernel, stride, dilation, causal = [], [], [], [], []
    for _ in range(rank):
        length = rng.randint(2, max_len)
        k = rng.randint(2, length)
        d = rng.randint(1, length // k)
        shape.append(length)
        kernel.append(k)
        stride.append(rng.randint(1, k))
        dilation.append(d)
        causal.append(rng.random() < 0.4)
    return dict(
        input_shape=tuple(shape),
        kernel_size=tuple(kernel),
        stride=tuple(stride),
        dilation=tuple(dilation),
        is_causal=tuple(causal),
    )


def _brute_tiles(problem: dict, tile_shape: tuple[int, ...]) -> list[list[tuple[int, ...]]]:
    """Query tiles from the definition: per dimension, per dilation group, the tiles of
    ``tile`` consecutive group coordinates and the union of their queries' windows.

    Returns ``[group, first, count, key_begin, key_end]`` (rows of per-dimension tuples),
    dilation groups outermost, then tiles in row-major order (the kernels' order).
    """
    per_dim = []  # per dimension: [(group, first, count, key_begin, key_end)]
    for t, length in enumerate(problem["input_shape"]):
        k, s = problem["kernel_size"][t], problem["stride"][t]
        d, c = problem["dilation"][t], problem["is_causal"][t]
        tile = tile_shape[t]
        entries = []
        for group in range(d):
            coords = list(range(group, length, d))  # real coordinates of the group
            for first in range(0, len(coords), tile):
                queries = coords[first : first + tile]
                keys = set()
                for q in queries:
                    keys.update(attended_1d(q, length, k, s, d, c))
                keys_g = sorted(j // d for j in keys)
                # The keys form one interval in group coordinates (windows overlap or touch).
                assert keys_g == list(range(keys_g[0], keys_g[-1] + 1))
                entries.append((group, first, len(queries), keys_g[0], keys_g[-1] + 1))
        per_dim.append(entries)
    rank = len(per_dim)
    groups = [sorted({e[0] for e in entries}) for entries in per_dim]
    tiles = []
    for gs in itertools.product(*groups):
        per_group = [[e for e in per_dim[t] if e[0] == gs[t]] for t in range(rank)]
        for combo in itertools.product(*per_group):
            tiles.append([tuple(combo[t][r] for t in range(rank)) for r in range(5)])
    return tiles


# --------------------------------------------------------------------------------------
# The headline numbers
# --------------------------------------------------------------------------------------


def test_flop_bound_1d_exact():
    p = tokenmix.plan(32768, kernel_size=2048)
    assert p.useful_pairs == 32768 * 2048  # every window is full (border clamping)
    assert p.dense_pairs == 32768**2
    assert p.flop_bound == 16
    assert p.tile_shape == (64,)
    assert p.num_query_tiles == 32768 // 64


def test_flop_bound_2d():
    p = tokenmix.plan((256, 256), kernel_size=(80, 80))
    assert p.flop_bound == pytest.approx(10.24, abs=1e-9)
    assert math.prod(p.tile_shape) == 64
    assert p.tile_bound <= p.flop_bound


@pytest.mark.parametrize(
    "shape, kernel, tile",
    [
        ((4096,), (512,), (64,)),
        ((64, 64), (8, 8), (8, 8)),
        ((32, 32, 32), (4, 8, 8), (4, 4, 4)),
    ],
)
def test_blocked_aligned_tiles_compute_only_useful_pairs(shape, kernel, tile):
    # stride == kernel: blocks of `kernel` queries share one window; a tile that aligns
    # with the blocks visits exactly its block's keys.
    p = tokenmix.plan(shape, kernel, stride=kernel, tile_shape=tile)
    assert p.computed_pairs == p.useful_pairs
    assert p.tile_bound == p.flop_bound
    assert p.tile_efficiency == 1.0
    assert p.flop_bound == math.prod(s / k for s, k in zip(shape, kernel, strict=True))
    # The chooser finds an aligned shape on its own for these problems.
    assert tokenmix.plan(shape, kernel, stride=kernel).computed_pairs == p.useful_pairs


def test_key_groups_of_the_2d_k7_problem():
    # 64x64, kernel 7: 8x8 query tiles see 14x14 = 196-key boxes, which the CUDA fp16/bf16
    # kernels take as four 64-key chunks; in a chunk that not every query keeps, each warp (16
    # queries: 2x8) computes only the 16-key groups one of its queries keeps. Whole chunks
    # would make 21.9% of the computed pairs useful (917,504 per head); the groups, 41.8%.
    p = tokenmix.plan((64, 64), 7)
    assert p.tile_shape == (8, 8) and p.key_chunk == 64
    assert round(100 * p.tile_efficiency, 1) == 27.9
    assert round(100 * p.useful_pairs / 917_504, 1) == 21.9
    assert p.chunked_pairs == 479_744 and round(100 * p.chunk_efficiency, 1) == 41.8
    assert "CUDA forward (mma.sync), 64-key chunks:" in p.summary()
    assert "efficiency 41.8%" in p.summary()
    assert p.cuda_forward == "mma.sync" and p.whole_chunk_pairs == 917_504
    # fewer than the tiles' whole key boxes: the groups drop keys no query of the warp sees
    assert p.useful_pairs < p.chunked_pairs < p.computed_pairs
    # key_chunk = 1 (or any size that is not a multiple of 16): whole boxes, rounded up
    exact = tokenmix.plan((64, 64), 7, key_chunk=1)
    assert exact.chunked_pairs == exact.computed_pairs == p.computed_pairs
    # float32's 32-key chunks: the same groups here (no chunk is full in either)
    assert tokenmix.plan((64, 64), 7, key_chunk=32).chunked_pairs == p.chunked_pairs


def test_compute_capability_9_chooses_by_pairs():
    # On compute capability 9.0 (fp16/bf16, D in {32, 64, 128}) the launcher takes the sm_90a
    # kernel, which computes whole 64-key chunks, where the mma.sync kernels' warp groups are at
    # least wgmma_break_even(D) times its pairs; the plan makes the same choice.
    be = {d: plan_module.wgmma_break_even(d) for d in (32, 64, 128)}
    assert be[64] == pytest.approx(0.65 / 0.8) and be[128] == pytest.approx(0.48 / 0.8)
    assert be[32] > 1  # never: no problem computes more pairs in groups than in whole chunks

    # issue 12's 2-D k7 problem keeps the warp groups at every head dim: 41.8% of pairs useful
    for d in (32, 64, 128):
        p = tokenmix.plan((64, 64), 7, head_dim=d, compute_capability=(9, 0))
        assert p.cuda_forward == "mma.sync" and round(100 * p.chunk_efficiency, 1) == 41.8
    # a long 1-D window loses little to whole chunks: the wgmma kernel pays at D = 64 and 128
    for d, kernel in ((32, "mma.sync"), (64, "wgmma"), (128, "wgmma")):
        p = tokenmix.plan(32768, 2048, head_dim=d, compute_capability=(9, 0))
        assert p.cuda_forward == kernel, d
        assert p.chunked_pairs == (p.whole_chunk_pairs if kernel == "wgmma" else
                                   tokenmix.plan(32768, 2048).chunked_pairs)  # fmt: skip
        assert "CUDA forward (" + kernel + ")" in p.summary()
    # 2-D k13 lies between D = 128's break-even and D = 64's
    p64 = tokenmix.plan((64, 64), 13, head_dim=64, compute_capability=(9, 0))
    p128 = tokenmix.plan((64, 64), 13, head_dim=128, compute_capability=(9, 0))
    ratio = p64.chunked_pairs / p64.whole_chunk_pairs
    assert be[128] <= ratio < be[64]
    assert (p64.cuda_forward, p128.cuda_forward) == ("mma.sync", "wgmma")
    # other devices, head dims the wgmma kernel lacks, float32's chunks: mma.sync
    for kwargs in (
        dict(head_dim=64, compute_capability=(8, 0)),
        dict(head_dim=64, compute_capability=(10, 0)),
        dict(head_dim=96, compute_capability=(9, 0)),
        dict(head_dim=64, compute_capability=(9, 0), key_chunk=32),
        dict(head_dim=64, value_dim=128, compute_capability=(9, 0)),
        dict(),
    ):
        assert tokenmix.plan(32768, 2048, **kwargs).cuda_forward == "mma.sync", kwargs
    # a numpy-like pair (here a list) is a capability too
    assert (
        tokenmix.plan(32768, 2048, head_dim=64, compute_capability=[9, 0]).cuda_forward == "wgmma"
    )
    # a key chunk no kernel uses: whole boxes, no kernel named
    boxes = tokenmix.plan((64, 64), 7, key_chunk=7)
    assert boxes.cuda_forward is None and "whole key boxes, 7-key chunks" in boxes.summary()


def test_whole_chunk_pairs_and_the_choice_against_brute_force():
    # Problems large enough for either kernel (windows from half the length to all of it), with
    # strides, dilations and causal windows: both counts from the mask and the tiles, and the
    # choice from them with the threshold; both outcomes must occur.
    rng = random.Random(12)
    outcomes = set()
    for _ in range(16):
        rank = rng.choice((1, 1, 2))
        shape = tuple(
            rng.randint(60, 180) if rank == 1 else rng.randint(10, 20) for _ in range(rank)
        )
        kernel = tuple(rng.randint(n // 2, n) for n in shape)
        problem = dict(
            input_shape=shape,
            kernel_size=kernel,
            stride=tuple(rng.choice((1, 1, 2)) for _ in shape),
            dilation=(1,) * rank,
            is_causal=tuple(rng.random() < 0.3 for _ in shape),
        )
        if rng.random() < 0.3:  # a dilated problem: halve the windows to fit
            problem["kernel_size"] = tuple(max(2, k // 2) for k in kernel)
            problem["dilation"] = (2,) * rank
        d = rng.choice((32, 64, 128))
        p = tokenmix.plan(**problem, head_dim=d, compute_capability=(9, 0))
        tiles = [[tuple(row) for row in tile] for tile in p.query_tiles().tolist()]
        rows = math.prod(p.tile_shape)
        whole = sum(
            rows * -(-math.prod(e - b for b, e in zip(kb, ke, strict=True)) // 64) * 64
            for _, _, _, kb, ke in tiles
        )
        mask = brute_force_mask(*problem.values())
        grouped = _brute_chunked_pairs(problem, p.tile_shape, tiles, mask, 64)
        takes = grouped >= plan_module.wgmma_break_even(d) * whole
        assert p.whole_chunk_pairs == whole, problem
        assert p.cuda_forward == ("wgmma" if takes else "mma.sync"), (problem, d)
        assert p.chunked_pairs == (whole if takes else grouped), problem
        outcomes.add(p.cuda_forward)
    assert outcomes == {"wgmma", "mma.sync"}


def test_compute_capability_arguments_are_checked():
    with pytest.raises(ValueError, match="needs head_dim with compute_capability"):
        tokenmix.plan(64, 7, compute_capability=(9, 0))
    with pytest.raises(ValueError, match=r"compute_capability must be \(major, minor\)"):
        tokenmix.plan(64, 7, head_dim=64, compute_capability=9)
    with pytest.raises(ValueError, match=r"compute_capability must be \(major, minor\)"):
        tokenmix.plan(64, 7, head_dim=64, compute_capability="90")
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        tokenmix.plan(64, 7, head_dim=0, compute_capability=(9, 0))
    with pytest.raises(ValueError, match="value_dim must be >= 1"):
        tokenmix.plan(64, 7, head_dim=64, value_dim=0, compute_capability=(9, 0))
    with pytest.raises(ValueError, match="head_dim only matter with compute_capability"):
        tokenmix.plan(64, 7, head_dim=64)
    # the choice is the launcher's, on the kernels' own 64-query tiles
    for tiles in (dict(tile_volume=16), dict(tile_shape=8)):
        with pytest.raises(ValueError, match="leave tile_shape and tile_volume at their defaults"):
            tokenmix.plan(64, 7, head_dim=64, compute_capability=(9, 0), **tiles)
    with pytest.raises(ValueError, match=r"head_dim must be one of \(32, 64, 128\), got 96"):
        plan_module.wgmma_break_even(96)


def test_blocked_misaligned_tile_computes_more():
    p = tokenmix.plan(4096, 512, stride=512, tile_shape=96)
    assert p.computed_pairs > p.useful_pairs
    assert p.tile_bound < p.flop_bound


# --------------------------------------------------------------------------------------
# Geometry and counts against brute force
# --------------------------------------------------------------------------------------


# The CUDA kernels' warps own 16 rows of a query tile; they skip 16-key groups.
WARP_ROWS = GROUP_KEYS = 16


def _segmented_order(kb, ke, il, ih) -> list[tuple[int, ...]]:
    """The keys of box ``[kb, ke)`` in the CUDA kernels' order: the inner box ``[il, ih)``
    first, then the slabs below and above it in dimension 0, then in dimension 1 within
    the inner range of dimension 0, and so on; row-major within each part."""
    rank = len(kb)
    parts = [list(zip(il, ih, strict=True))]
    for own in range(rank):
        for below in (True, False):
            part = []
            for t in range(rank):
                if t < own:
                    part.append((il[t], ih[t]))
                elif t > own:
                    part.append((kb[t], ke[t]))
                else:
                    part.append((kb[t], il[t]) if below else (ih[t], ke[t]))
            parts.append(part)
    return [c for part in parts for c in itertools.product(*(range(a, b) for a, b in part))]


def _brute_chunked_pairs(problem: dict, tile_shape, tiles, mask: torch.Tensor, chunk: int) -> int:
    """The pairs the CUDA kernels compute, from the mask. With chunks of a multiple of 16
    keys: each tile's key box in the kernels' order (the keys every query of the tile keeps
    first) cut into chunks; a chunk of only such keys is computed whole by every warp of 16
    rows; in the other chunks a warp computes the 16-key groups that one of its queries
    keeps. Other chunk sizes: the tile's rows times its box rounded up to whole chunks."""
    shape, dil = problem["input_shape"], problem["dilation"]
    rows = math.prod(tile_shape)

    def token(group, coords) -> int:
        index = 0
        for t, n in enumerate(shape):
            index = index * n + group[t] + coords[t] * dil[t]
        return index

    total = 0
    for group, first, count, kb, ke in tiles:
        box = list(itertools.product(*(range(b, e) for b, e in zip(kb, ke, strict=True))))
        if chunk % GROUP_KEYS:
            total += rows * -(-len(box) // chunk) * chunk
            continue
        queries = [
            token(group, [f + i for f, i in zip(first, idx, strict=True)])
            for idx in itertools.product(*(range(c) for c in count))
        ]
        seen = mask[queries][:, [token(group, k) for k in box]]
        everyone = [k for k, keep in zip(box, seen.all(0).tolist(), strict=True) if keep]
        if everyone:
            il = tuple(min(k[t] for k in everyone) for t in range(len(kb)))
            ih = tuple(max(k[t] for k in everyone) + 1 for t in range(len(kb)))
            assert math.prod(h - lo for lo, h in zip(il, ih, strict=True)) == len(everyone)
        else:
            il = ih = tuple(kb)
        order = [token(group, k) for k in _segmented_order(kb, ke, il, ih)]
        assert sorted(order) == sorted(token(group, k) for k in box)
        full_keys = len(everyone) // chunk * chunk
        padded = -(-len(order) // chunk) * chunk
        for w in range(0, rows, WARP_ROWS):
            warp_queries = queries[w : w + WARP_ROWS]
            for k0 in range(0, padded, GROUP_KEYS):
                keys = order[k0 : k0 + GROUP_KEYS]
                if k0 < full_keys or (warp_queries and keys and mask[warp_queries][:, keys].any()):
                    total += WARP_ROWS * GROUP_KEYS
    return total


def _check_against_brute_force(problem: dict, p: NeighborhoodPlan) -> None:
    rank = len(problem["input_shape"])
    tiles = p.query_tiles()
    assert tiles.dtype == torch.int64 and tiles.shape == (p.num_query_tiles, 5, rank)
    expected = _brute_tiles(problem, p.tile_shape)
    got = [[tuple(row) for row in tile] for tile in tiles.tolist()]
    assert got == expected

    # Every query lies in exactly one tile.
    seen = []
    for group, first, count, _, _ in got:
        ranges = [
            [group[t] + c * problem["dilation"][t] for c in range(first[t], first[t] + count[t])]
            for t in range(rank)
        ]
        seen.extend(itertools.product(*ranges))
    assert sorted(seen) == list(itertools.product(*(range(n) for n in problem["input_shape"])))

    mask = brute_force_mask(
        problem["input_shape"],
        problem["kernel_size"],
        problem["stride"],
        problem["dilation"],
        problem["is_causal"],
    )
    tokens = math.prod(problem["input_shape"])
    assert p.useful_pairs == int(mask.sum())
    assert p.dense_pairs == tokens * tokens
    # Computed: every tile's rows (padding included) times its key box.
    computed = sum(
        math.prod(p.tile_shape) * math.prod(e - b for b, e in zip(kb, ke, strict=True))
        for _, _, _, kb, ke in got
    )
    assert p.computed_pairs == computed
    assert p.computed_pairs >= p.useful_pairs
    chunked = _brute_chunked_pairs(problem, p.tile_shape, got, mask, p.key_chunk)
    assert p.chunked_pairs == chunked >= p.useful_pairs
    assert p.chunk_efficiency == p.useful_pairs / chunked
    assert p.flop_bound == tokens * tokens / int(mask.sum())
    assert p.tile_efficiency == p.useful_pairs / computed


@pytest.mark.parametrize("seed", range(24))
def test_random_problems_match_brute_force(seed):
    rng = random.Random(seed)
    problem = _random_problem(rng)
    rank = len(problem["input_shape"])
    volume = rng.choice((1, 2, 4, 8, 16, 64))
    p = tokenmix.plan(**problem, tile_volume=volume, key_chunk=rng.choice((1, 7, 32, 64)))
    assert p.input_shape == problem["input_shape"]
    assert p.kernel_size == problem["kernel_size"] and p.is_causal == problem["is_causal"]
    assert math.prod(p.tile_shape) == volume
    _check_against_brute_force(problem, p)
    # An explicit tile shape, powers of two or not.
    explicit = tuple(rng.randint(1, 5) for _ in range(rank))
    q = tokenmix.plan(**problem, tile_shape=explicit)
    assert q.tile_shape == explicit
    _check_against_brute_force(problem, q)


@pytest.mark.parametrize(
    "problem",
    [
        dict(input_shape=(10,), kernel_size=(3,), stride=(2,), dilation=(3,), is_causal=(True,)),
        dict(
            input_shape=(9, 7), kernel_size=(4, 3), stride=(3, 1), dilation=(2, 2), is_causal=(1, 0)
        ),
        dict(
            input_shape=(5, 6, 4),
            kernel_size=(2, 3, 2),
            stride=(1, 3, 2),
            dilation=(2, 1, 2),
            is_causal=(False, True, False),
        ),
    ],
)
def test_dilation_causal_stride_match_brute_force(problem):
    problem = dict(problem, is_causal=tuple(bool(c) for c in problem["is_causal"]))
    for volume in (1, 4, 8):
        _check_against_brute_force(problem, tokenmix.plan(**problem, tile_volume=volume))


# --------------------------------------------------------------------------------------
# The tile-shape chooser
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape, kernel, kwargs",
    [
        ((256, 256), (80, 80), {}),
        ((64, 256), (7, 31), {}),
        ((200, 12), (9, 3), {"is_causal": (True, False)}),
        ((32, 32, 32), (5, 9, 3), {"dilation": (2, 1, 3)}),
        ((16, 40, 24), (4, 8, 8), {"stride": (4, 8, 8)}),
        ((1000,), (100,), {"stride": 50}),
    ],
)
@pytest.mark.parametrize("volume", [16, 64, 128])
def test_chosen_tile_shape_is_best_power_of_two_shape(shape, kernel, kwargs, volume):
    p = tokenmix.plan(shape, kernel, **kwargs, tile_volume=volume)
    assert math.prod(p.tile_shape) == volume
    assert all(t & (t - 1) == 0 for t in p.tile_shape)
    for candidate in _shapes_of_volume(volume, len(shape)):
        other = tokenmix.plan(shape, kernel, **kwargs, tile_shape=candidate)
        assert p.computed_pairs <= other.computed_pairs, (candidate, other.computed_pairs)
        if candidate == p.tile_shape:
            assert other == p


def test_default_tile_volume_is_64():
    assert math.prod(tokenmix.plan((64, 64, 64), 7).tile_shape) == 64
    assert tokenmix.plan(100, 9, tile_volume=1).tile_shape == (1,)


# --------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------


def test_flops():
    p = tokenmix.plan((32, 48), (7, 9))
    f = p.flops(64)
    assert isinstance(f, PlanFlops)
    assert f == (p.useful_pairs * 256, p.computed_pairs * 256, p.dense_pairs * 256)
    assert p.flops(64, value_dim=32) == tuple(
        2 * (64 + 32) * n for n in (p.useful_pairs, p.computed_pairs, p.dense_pairs)
    )
    assert f.dense / f.useful == pytest.approx(p.flop_bound)


def test_scalar_arguments_broadcast_and_plans_are_values():
    a = tokenmix.plan((24, 24), 5, stride=2, dilation=2, is_causal=True)
    b = tokenmix.plan([24, 24], (5, 5), stride=(2, 2), dilation=(2, 2), is_causal=(True, True))
    assert a == b and hash(a) == hash(b)
    assert a.kernel_size == (5, 5) and a.is_causal == (True, True) and a.rank == 2
    assert a.tokens == 576
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.useful_pairs = 0  # type: ignore[misc]
    assert tokenmix.NeighborhoodPlan is NeighborhoodPlan
    assert tokenmix.plan(torch.Size([24, 24]), 5) == tokenmix.plan((24, 24), 5)


def test_summary():
    p = tokenmix.plan((256, 256), (80, 80))
    text = str(p)
    assert text == p.summary()
    assert "256x256" in text and "80x80" in text
    assert f"{p.num_query_tiles} of {'x'.join(map(str, p.tile_shape))}" in text
    assert "10.24x" in text


def test_docstring_example():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    tests = finder.find(plan_module, "tokenmix.neighborhood.plan")
    assert sum(len(t.examples) for t in tests) > 0
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        (((16, 16), 20), {}, ValueError, "kernel_size"),
        (((16, 16), 1), {}, ValueError, "kernel_size"),
        (((16, 16), 5), {"stride": 6}, ValueError, "stride"),
        (((16, 16), 5), {"dilation": 0}, ValueError, "dilation"),
        (((16, 16), 5), {"dilation": (4, 1)}, ValueError, "dilation"),
        (((16, 16), (5, 5, 5)), {}, ValueError, "kernel_size"),
        (((16, 16), True), {}, TypeError, "kernel_size"),
        (((16, 16), 5), {"is_causal": 1}, TypeError, "is_causal"),
        (((16, 16), 5), {"is_causal": (True,)}, ValueError, "is_causal"),
        (((16, 16), 5.0), {}, TypeError, "kernel_size"),
        (((2, 16, 16, 4), 5), {}, ValueError, "input_shape"),
        (((), 5), {}, ValueError, "input_shape"),
        (((0, 16), 5), {}, ValueError, "input_shape"),
        (("16", 5), {}, TypeError, "input_shape"),
        (((16, 16), 5), {"tile_volume": 48}, ValueError, "tile_volume"),
        (((16, 16), 5), {"tile_volume": 0}, ValueError, "tile_volume"),
        (((16, 16), 5), {"tile_volume": 2.0}, TypeError, "tile_volume"),
        (((16, 16), 5), {"tile_shape": (0, 4)}, ValueError, "tile_shape"),
        (((16, 16), 5), {"tile_shape": (4, 4, 4)}, ValueError, "tile_shape"),
        (((16, 16), 5), {"tile_shape": (4, False)}, TypeError, "tile_shape"),
        (((16, 16), 5), {"key_chunk": 0}, ValueError, "key_chunk"),
        (((16, 16), 5), {"key_chunk": 2**21}, ValueError, "key_chunk"),
        (((16, 16), 5), {"key_chunk": 64.0}, TypeError, "key_chunk"),
    ],
)
def test_bad_arguments_name_the_argument(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tokenmix.plan(*args, **kwargs)


def test_bad_flops_arguments():
    p = tokenmix.plan(64, 8)
    with pytest.raises(ValueError, match="head_dim"):
        p.flops(0)
    with pytest.raises(ValueError, match="value_dim"):
        p.flops(64, value_dim=0)
    with pytest.raises(TypeError, match="head_dim"):
        p.flops(64.0)


def test_op_checks_direct_calls():
    op = torch.ops.tokenmix.na_plan
    tile, counts, tiles = op([16], [4], [1], [1], [0], [], 64, 64, False)
    assert tile.tolist() == [64] and tiles.shape == (0, 5, 1)
    # the 16-key box is one 64-key chunk, of which the first warp (the 16 queries; the other
    # three hold padding rows only) computes the one group of keys that exist; whole chunks
    # would be the 64 rows times the chunk, and no wgmma head dim was given (no choice made)
    assert counts.tolist() == [1, 16 * 4, 64 * 16, 256, 16 * 16, 64 * 64, 0]
    # D = 64 on compute capability 9.0: 256 pairs in warp groups against 4096 whole: mma.sync
    assert op([16], [4], [1], [1], [0], [], 64, 64, False, 64)[1].tolist()[4:] == [256, 4096, 0]
    for bad in (
        ([16], [17], [1], [1], [0], [], 64, 64, False),  # window larger than the input
        ([16], [4], [5], [1], [0], [], 64, 64, False),  # stride > kernel
        ([16, 16], [4], [1], [1], [0], [], 64, 64, False),  # mismatched lengths
        ([16], [4], [1], [1], [0], [], 48, 64, False),  # tile_volume not a power of two
        ([16], [4], [1], [1], [0], [0], 64, 64, False),  # empty tile
        ([16], [4], [1], [1], [0], [2, 2], 64, 64, False),  # tile of the wrong rank
        ([], [], [], [], [], [], 64, 64, False),  # rank 0
        ([16], [4], [1], [1], [0], [], 64, 0, False),  # empty key chunk
    ):
        with pytest.raises(RuntimeError, match="tokenmix"):
            op(*bad)
