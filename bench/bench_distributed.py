"""Communication volume of tokenmix.distributed against an all-gather of K/V.

Runs each operator forward and backward with its token dimension sharded across 2 and 4 gloo
processes on this machine, on the benchmark shapes of docs/performance.md, and reports the
bytes each rank sends (measured with ``tokenmix.distributed.count_bytes``: point-to-point
sends exactly, collectives at the ring algorithm's volume per rank) next to what the common
alternative sends: an all-gather of K and V in the forward and a reduce-scatter of dK and dV
in the backward, ``(R - 1) x`` the rank's K/V shard each way. Times are wall-clock seconds of
one forward+backward per rank, for orientation only (the processes share 2 cores here).

    python bench/bench_distributed.py --markdown
    python bench/bench_distributed.py --quick          # small shapes (make demo)
    python bench/bench_distributed.py --case na-2d --world 4
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import format_markdown, format_table, log  # noqa: E402

# name -> (kind, description, parameters, quick parameters)
CASES: dict[str, tuple[str, str, dict, dict]] = {
    "na-2d": (
        "na",
        "neighborhood 2-D 64x64, kernel 7x7",
        dict(spatial=(64, 64), kernel=7),
        dict(spatial=(32, 32), kernel=7),
    ),
    "na-1d": (
        "na",
        "neighborhood 1-D 16384, kernel 1024",
        dict(spatial=(16384,), kernel=1024),
        dict(spatial=(2048,), kernel=256),
    ),
    "na-3d": (
        "na",
        "neighborhood 3-D 16x16x16, kernel 5x5x5",
        dict(spatial=(16, 16, 16), kernel=5),
        dict(spatial=(8, 8, 8), kernel=5),
    ),
    "simple-gla": (
        "linear",
        "simple GLA T=8192",
        dict(length=8192),
        dict(length=1024),
    ),
    "gated-delta": (
        "delta",
        "gated delta rule T=8192",
        dict(length=8192),
        dict(length=1024),
    ),
    "bs-sliding": (
        "bs",
        "block-sparse causal window 1024 + 64 sinks, T=8192, block 128",
        dict(length=8192, block=128, rule="sliding"),
        dict(length=4096, block=128, rule="sliding"),
    ),
    "bs-causal": (
        "bs",
        "block-sparse causal, T=8192, block 128",
        dict(length=8192, block=128, rule="causal"),
        dict(length=2048, block=128, rule="causal"),
    ),
}
HEADS, DIM = 4, 64  # B=1, H=4, D=64 (K=V=64 for the scans), float32, as in docs/performance.md


def _inputs(kind: str, p: dict, rank: int, world: int):
    """This rank's shards (the same seeded whole tensors on every rank) and the call."""
    import tokenmix
    import tokenmix.distributed as tmd

    gen = torch.Generator().manual_seed(0)
    if kind == "na":
        shape = (1, *p["spatial"], HEADS, DIM)
        whole = [torch.randn(shape, generator=gen) for _ in range(3)]
        q, k, v = (tmd.shard(x).clone().requires_grad_() for x in whole)
        return (q, k, v), (k, v), lambda: tmd.neighborhood_attention(q, k, v, p["kernel"])
    length = p["length"]
    if kind in ("linear", "delta"):
        shape = (1, length, HEADS, DIM)
        q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
        k = torch.nn.functional.normalize(k, dim=-1)
        g = torch.nn.functional.logsigmoid(torch.randn(1, length, HEADS, generator=gen) + 3)
        beta = torch.rand(1, length, HEADS, generator=gen)
        q, k, v, g, beta = (tmd.shard(x).clone().requires_grad_() for x in (q, k, v, g, beta))
        if kind == "linear":
            return (q, k, v, g), (k, v), lambda: tmd.linear_attention(q, k, v, g=g)[0]
        return (q, k, v, g, beta), (k, v), lambda: tmd.delta_rule(q, k, v, beta, g=g)[0]
    block = p["block"]
    if p["rule"] == "sliding":
        rule = tokenmix.ElementMask(band=(-1023, 0), prefix=64, prefix_causal=True)
    else:
        rule = tokenmix.ElementMask.causal()
    layout = tokenmix.BlockLayout.from_element_mask(rule, length, length, block)
    sizes = tmd.shard_sizes(length, world, multiple_of=block)
    shape = (1, length, HEADS, DIM)
    q, k, v = (
        tmd.shard(torch.randn(shape, generator=gen), sizes=sizes).clone().requires_grad_()
        for _ in range(3)
    )
    return (q, k, v), (k, v), lambda: tmd.block_sparse_attention(q, k, v, layout)


def _worker(rank: int, world: int, init_file: str, kind: str, params: dict, threads: int, out: str):
    import tokenmix.distributed as tmd

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=1200),
    )
    leaves, kv, call = _inputs(kind, params, rank, world)
    dist.barrier()
    start = time.perf_counter()
    with tmd.count_bytes() as fwd:
        o = call()
    with tmd.count_bytes() as bwd:
        o.backward(torch.ones_like(o))
    seconds = time.perf_counter() - start
    kv_bytes = sum(t.numel() * t.element_size() for t in kv)
    torch.save(
        {
            "fwd": fwd.total,
            "fwd_p2p": fwd.point_to_point,
            "all": fwd.total + bwd.total,
            "all_p2p": fwd.point_to_point + bwd.point_to_point,
            "allgather_fwd": (world - 1) * kv_bytes,
            "seconds": seconds,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()


def run_case(name: str, world: int, quick: bool, threads: int) -> dict:
    kind, _, params, quick_params = CASES[name]
    with tempfile.TemporaryDirectory(prefix="tokenmix-bench-dist-") as tmp:
        args = (world, os.path.join(tmp, "init"), kind, quick_params if quick else params)
        mp.spawn(_worker, args=(*args, threads, tmp), nprocs=world, join=True)
        return {"ranks": [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]}


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--world", nargs="+", type=int, default=[2, 4], help="process counts")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    p.add_argument("--threads", type=int, default=2, help="threads in all (split over ranks)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    if any(w < 2 for w in args.world):
        p.error("--world takes process counts >= 2")
    headers = [
        "case",
        "ranks",
        "fwd MiB/rank (max)",
        "fwd all-gather K/V",
        "fwd+bwd MiB/rank (max)",
        "(mean)",
        "of which p2p",
        "fwd+bwd all-gather K/V",
        "fwd+bwd vs all-gather",
        "s (max rank)",
    ]
    rows = []
    for name in args.case:
        kind, desc, params, quick_params = CASES[name]
        for world in args.world:
            log(
                f"{name} ({desc}{', quick shapes ' + str(quick_params) if args.quick else ''}) "
                f"on {world} gloo processes ..."
            )
            ranks = run_case(name, world, args.quick, max(1, args.threads // world))["ranks"]
            worst = max(ranks, key=lambda r: r["all"])
            gather = max(r["allgather_fwd"] for r in ranks)
            rows.append(
                [
                    name,
                    str(world),
                    _mib(max(r["fwd"] for r in ranks)),
                    _mib(gather),
                    _mib(worst["all"]),
                    _mib(sum(r["all"] for r in ranks) / len(ranks)),
                    _mib(worst["all_p2p"]),
                    _mib(2 * gather),
                    f"{worst['all'] / (2 * gather):.3f}x",
                    f"{max(r['seconds'] for r in ranks):.2f}",
                ]
            )
            log("  " + "  ".join(rows[-1]))
    fmt = format_markdown if args.markdown else format_table
    print(
        f"B=1 H={HEADS} D={DIM} float32; MiB sent per rank (2^20 bytes)"
        + ("; quick shapes" if args.quick else "")
    )
    print(fmt(headers, rows, "llrrrrrrrr"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
