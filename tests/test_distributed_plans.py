"""tokenmix.distributed without spawning: the sharding helpers, the halo and key-block plans
(checked against the window rule and the layout directly, over many shapes), the layer switch,
and the errors. test_distributed.py runs the operators on 2 and 4 gloo processes."""

from __future__ import annotations

import datetime
import os
import random
import tempfile

import pytest
import tokenmix
import tokenmix.distributed as tmd
import torch
import torch.distributed as dist
from tokenmix.neighborhood.reference import window_table


def test_shard_sizes():
    assert tmd.shard_sizes(10, 4) == [3, 3, 2, 2]
    assert tmd.shard_sizes(1000, 3, multiple_of=128) == [384, 384, 232]
    assert tmd.shard_sizes(3, 4) == [1, 1, 1, 0]
    for length, world, block in [(1, 1, 1), (8192, 4, 128), (8193, 4, 128), (100, 7, 16)]:
        sizes = tmd.shard_sizes(length, world, block)
        assert sum(sizes) == length and len(sizes) == world
        assert all(n % block == 0 for n in sizes[:-1])
    assert tmd.shard_bounds([3, 0, 2]) == [(0, 3), (3, 3), (3, 5)]
    with pytest.raises(ValueError, match="world_size"):
        tmd.shard_sizes(10, 0)


def _window_keys(length, kernel, stride, dilation, causal, queries):
    keys, valid, _ = window_table(
        length, kernel, stride, dilation, causal, queries=torch.as_tensor(queries)
    )
    return [sorted(set(row[ok].tolist())) for row, ok in zip(keys, valid, strict=True)]


def _random_rule(rng: random.Random):
    length = rng.randint(4, 48)
    kernel = rng.randint(2, min(9, length))
    dilation = rng.randint(1, max(1, length // kernel))
    stride = rng.randint(1, kernel)
    causal = rng.random() < 0.4
    world = rng.randint(2, min(5, length))
    cuts = sorted(rng.sample(range(1, length), world - 1))
    sizes = tuple(b - a for a, b in zip([0, *cuts], [*cuts, length], strict=True))
    return length, kernel, stride, dilation, causal, sizes


def test_halo_plan_reads_exactly_the_windows_rows():
    """Each rank receives exactly the rows its queries' windows reach outside its shard, from
    their owners, and its slab gives every one of its queries its global window."""
    rng = random.Random(0)
    for _ in range(300):
        length, kernel, stride, dilation, causal, sizes = _random_rule(rng)
        plan = tmd.halo_plan(sizes, kernel, stride, dilation, causal)
        for rank, (a, b) in enumerate(plan.bounds):
            windows = _window_keys(length, kernel, stride, dilation, causal, range(a, b))
            outside = sorted({k for w in windows for k in w if not a <= k < b})
            received = sorted(r for rows in plan.halo[rank].values() for r in rows.tolist())
            assert received == outside, (length, kernel, stride, dilation, causal, sizes, rank)
            for owner, rows in plan.halo[rank].items():
                oa, ob = plan.bounds[owner]
                assert owner != rank and all(oa <= r < ob for r in rows.tolist())
            lo, hi = plan.slabs[rank]
            local = _window_keys(hi - lo, kernel, stride, dilation, causal, range(a - lo, b - lo))
            assert [[k + lo for k in w] for w in local] == windows


@pytest.mark.parametrize("dims", [1, 2])
def test_slab_attention_equals_the_whole(dims):
    """One process plays every rank: the operator on each rank's slab (own rows, received
    rows, zeros elsewhere) gives that rank's rows of the whole operator, rpb included."""
    rng = random.Random(dims)
    for _ in range(60):
        length, kernel, stride, dilation, causal, sizes = _random_rule(rng)
        plan = tmd.halo_plan(sizes, kernel, stride, dilation, causal)
        rest = (3,) if dims == 2 else ()
        kernels = (kernel, 3)[:dims]
        args = (kernels, (stride, 1)[:dims], (dilation, 1)[:dims], (causal, False)[:dims])
        q, k, v = (torch.randn(1, length, *rest, 2, 8, dtype=torch.float64) for _ in range(3))
        rpb = torch.randn(2, *(2 * x - 1 for x in kernels), dtype=torch.float64)
        whole = tokenmix.neighborhood_attention(q, k, v, *args, rpb=rpb)
        for rank, (a, b) in enumerate(plan.bounds):
            lo, hi = plan.slabs[rank]
            keep = torch.zeros(length, dtype=torch.bool)
            keep[a:b] = True
            for rows in plan.halo[rank].values():
                keep[rows] = True
            shape = (1, length) + (1,) * (q.dim() - 2)
            ks, vs = (torch.where(keep.view(shape), x, 0)[:, lo:hi] for x in (k, v))
            qs = torch.zeros_like(q)
            qs[:, a:b] = q[:, a:b]
            out = tokenmix.neighborhood_attention(qs[:, lo:hi], ks, vs, *args, rpb=rpb)
            torch.testing.assert_close(out[:, a - lo : b - lo], whole[:, a:b], rtol=0, atol=1e-13)


def test_key_block_plan_is_the_union_of_the_rows_lists():
    gen = torch.Generator().manual_seed(0)
    status = (torch.rand(2, 3, 8, 8, generator=gen) < 0.3).long() * 2
    status[0, 0, 5, 1] = 1
    layout = tokenmix.BlockLayout.from_block_status(status, block_size=16, seq_lengths=(120, 120))
    sizes = [32, 48, 0, 40]
    plan = tmd.key_block_plan(layout, sizes, sizes)
    for rank, (a, b) in enumerate(plan.q_bounds):
        rows = status[:, :, a // 16 : -(-b // 16)] > 0
        expected = rows.flatten(0, 2).any(0).nonzero().flatten().tolist()
        assert plan.needed[rank].tolist() == expected
        exchange = plan.exchange(rank)
        own = [blk for blk in expected if plan.owner(blk) == rank]
        lengths = [min(16, 120 - 16 * blk) for blk in expected]
        assert exchange.out_len == sum(lengths)
        assert exchange.own_src.numel() == sum(min(16, 120 - 16 * blk) for blk in own)
    with pytest.raises(ValueError, match="multiples of the layout's block size 16"):
        tmd.key_block_plan(layout, [30, 90], [32, 88])
    with pytest.raises(ValueError, match="hold 100 tokens in all"):
        tmd.key_block_plan(layout, [50, 50], [64, 56])


def test_operators_need_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    x = torch.randn(1, 8, 2, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        tmd.neighborhood_attention(x, x, x, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        tmd.linear_attention(x, x, x)


@pytest.fixture
def one_rank_group():
    """A gloo group of one process (this one)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(tmp, 'init')}",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=60),
        )
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_one_rank_is_the_single_process_operator(one_rank_group):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 9, 5, 2, 8) for _ in range(3))
    assert torch.equal(
        tmd.neighborhood_attention(q, k, v, (3, 5), is_causal=(True, False)),
        tokenmix.neighborhood_attention(q, k, v, (3, 5), is_causal=(True, False)),
    )
    q, k, v = (torch.randn(1, 40, 2, 8) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, 40, 2))
    cu = torch.tensor([0, 15, 40])
    got = tmd.linear_attention(q, k, v, g=g, cu_seqlens=cu, output_final_state=True)
    want = tokenmix.linear_attention(q, k, v, g=g, cu_seqlens=cu, output_final_state=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with tmd.count_bytes() as sent:
        tmd.delta_rule(q, k, v, torch.rand(1, 40, 2))
    assert sent.point_to_point == 0 and sent.by_operator == {"delta_rule": 0}
    for causal in (True, False):  # bidirectional too, with and without an initial state
        for init in (None, torch.randn(2, 2, 8, 8)):
            got = tmd.linear_attention(q, k, v, causal=causal, cu_seqlens=cu, initial_state=init)
            want = tokenmix.linear_attention(
                q, k, v, causal=causal, cu_seqlens=cu, initial_state=init
            )
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    empty = torch.randn(0, 40, 2, 8)  # an empty batch, as in one process
    o, final = tmd.delta_rule(empty, empty, empty, torch.rand(0, 40, 2), output_final_state=True)
    assert o.shape == (0, 40, 2, 8) and final.shape == (0, 2, 8, 8)


def test_errors_name_the_argument(one_rank_group):
    x = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens must end at T=8"):
        tmd.linear_attention(x, x, x, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        tmd.delta_rule(x, x, x, torch.rand(1, 8, 2), initial_state=torch.zeros(3, 2, 8, 8))
    empty = torch.randn(1, 0, 2, 8)
    with pytest.raises(ValueError, match="at least one token"):
        tmd.linear_attention(empty, empty, empty)
    with pytest.raises(ValueError, match="kernel_size"):
        tmd.neighborhood_attention(x, x, x, 9)
    layout = tokenmix.BlockLayout.from_element_mask(tokenmix.ElementMask.causal(), 16, 16, 8)
    with pytest.raises(ValueError, match="the layout's length is 16"):
        tmd.block_sparse_attention(x, x, x, layout)


def test_context_parallel_switches_the_tokenmix_layers():
    model = torch.nn.Sequential(
        tokenmix.nn.NeighborhoodAttention1D(16, 2, kernel_size=3),
        torch.nn.Linear(16, 16),
        tokenmix.nn.GatedDeltaNet(16, 2),
    )
    x = torch.randn(1, 8, 16)
    before = model[2](model[1](model[0](x)))[0]
    assert tmd.context_parallel(model) is model
    layers = [model[0], model[2]]
    assert all(m._tokenmix_context_parallel == (None,) for m in layers)
    # Switched on, a layer calls the sharded operator (which needs a process group here).
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            model[0](x)
    tmd.context_parallel(model, enable=False)
    assert all(m._tokenmix_context_parallel is None for m in layers)
    assert torch.equal(model[2](model[1](model[0](x)))[0], before)
    with pytest.raises(ValueError, match="holds no tokenmix layer"):
        tmd.context_parallel(torch.nn.Linear(4, 4))
    # Layers whose mixing reaches across the whole sequence have no sharded form yet.
    topk = tokenmix.patterns.TopKBlockAttention(16, 2, block_size=16, topk=2)
    with pytest.raises(NotImplementedError, match="TopKBlockAttention .it selects key blocks"):
        tmd.context_parallel(torch.nn.Sequential(model, topk))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tmd.context_parallel("model")


def test_the_example_runs_under_torchrun():
    """examples/context_parallel.py (docs/distributed.md's example) on 2 gloo processes."""
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            os.path.join(root, "examples", "context_parallel.py"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.search(r"output (\S+), parameter gradients (\S+)", run.stdout)
    assert found, run.stdout
    assert float(found[1]) <= 1e-6 and float(found[2]) <= 1e-5, run.stdout
    assert "neighborhood_attention:" in run.stdout and "delta_rule:" in run.stdout
