#!/usr/bin/env python
"""Two builds of tokenmix, timed against each other on a noisy machine.

On a shared host the machine's speed drifts by tens of percent within minutes, so two
benchmark runs made one after the other do not compare two builds: the difference is mostly
the host. This script keeps one worker process per build alive (each imports the
``tokenmix`` package found in its own directory, prepended to ``PYTHONPATH``) and asks them
for a few calls in turn, alternating which goes first. Each round gives one ratio
new / old of the two workers' fastest call of that round, made seconds apart; the report is
the median ratio over the rounds (below 1: the new build is faster), with its quartiles.

The case is one of ``bench_block_sparse.py``'s (the same masks, layouts and inputs) or one of
``bench_na.py``'s as ``na-<case>`` (B=1, H=4, D=64, float32), forward only::

    python bench/ab_builds.py --old /tmp/pkg_old --new /tmp/pkg_new \\
        --case random --block-sizes 64,128 --rounds 30 --threads 2

A package directory holds a ``tokenmix`` package, for example a copy of the installed one
(``site-packages/tokenmix``) with the ``_C.so`` of another build put in its place.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# Neighborhood-attention cases: bench_na.py's, as "na-<name>" (B=1, H=4, D=64, float32).
NA_CASES = ["na-2d-64x64-k7", "na-1d-16384-k1024", "na-3d-16x16x16-k5"]


def worker(args: argparse.Namespace) -> None:
    """Build the layouts and inputs, then answer each line on stdin with one timed round."""
    sys.path.insert(0, HERE)
    import tokenmix
    import torch

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    calls = {}  # label -> the timed call
    if args.case in NA_CASES:
        import bench_na

        name = args.case[len("na-") :]
        shape, kernel = bench_na.QUICK_CASES[name][1:] if args.quick else bench_na.CASES[name]
        q, k, v = (torch.randn(1, *shape, 4, 64, generator=gen) for _ in range(3))
        calls[0] = lambda: tokenmix.neighborhood_attention(q, k, v, kernel)
    else:
        import bench_block_sparse as bb

        sizes = bb.QUICK_SIZES if args.quick else bb.FULL_SIZES
        layouts = {}
        for bs in args.block_sizes:
            case = bb.Case(name=args.case, pattern=args.case, block_size=bs, **sizes)
            data = bb.pattern_data(case)
            layouts[bs] = bb.tokenmix_layout(case, data, bb.create_flex_block_mask(case, data))
        q, k, v = (torch.randn(case.input_shape, generator=gen) for _ in range(3))
        for bs, lay in layouts.items():
            calls[bs] = lambda lay=lay: tokenmix.block_sparse_attention(q, k, v, lay)
    for call in calls.values():
        call()  # warm-up
    print(f"ready {tokenmix.__file__}", flush=True)
    for _ in sys.stdin:
        times = []
        for label, call in calls.items():
            best = float("inf")
            for _ in range(args.calls):
                t0 = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - t0)
            times.append(f"{label}:{best * 1e3:.3f}")
        print(" ".join(times), flush=True)


class Worker:
    """One build's worker process: ``flag`` (``--old``/``--new``) and its package directory."""

    def __init__(self, flag: str, package_dir: str, argv: list[str]) -> None:
        self.flag, self.dir = flag, os.path.abspath(package_dir)
        paths = [self.dir] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(paths)),
        )

    def fail(self, what: str) -> None:
        self.close()
        sys.exit(f"error: {self.flag} {self.dir}: {what} (exit status {self.proc.poll()})")

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline().strip()
        if not line.startswith("ready "):
            self.fail("the worker did not start (its errors are above)")
        imported = os.path.realpath(line.split(" ", 1)[1])
        # The worker must time this directory's build, not one that an editable install or a
        # stray package put earlier on sys.path.
        if not imported.startswith(os.path.realpath(os.path.join(self.dir, "tokenmix")) + os.sep):
            self.fail(f"the worker imported tokenmix from {imported}, not from this directory")
        print(f"{self.flag} {self.dir}: {imported}", flush=True)

    def round(self) -> dict[int, float]:
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except OSError:
            self.fail("the worker exited")
        line = self.proc.stdout.readline()
        if not line.strip():
            self.fail("the worker exited during a round (its errors are above)")
        return {int(bs): float(ms) for bs, ms in (x.split(":") for x in line.split())}

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--old", help="directory holding the old build's tokenmix package")
    ap.add_argument("--new", help="directory holding the new build's tokenmix package")
    ap.add_argument(
        "--case",
        default="random",
        choices=["sliding", "random", "document", *NA_CASES],
        help="a block-sparse pattern, or a neighborhood-attention case (na-*; --block-sizes "
        "does not apply, its row is labelled 0)",
    )
    ap.add_argument("--block-sizes", default="64,128", help="comma list (default 64,128)")
    ap.add_argument("--rounds", type=int, default=30, help="rounds (default 30)")
    ap.add_argument("--calls", type=int, default=3, help="calls per build and round (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the scaled-down sizes (block-sparse T=1024; bench_na.py's --quick cases)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case in NA_CASES:
        args.block_sizes = "0"  # one row, labelled 0 internally; --block-sizes does not apply
    try:
        args.block_sizes = [int(x) for x in args.block_sizes.split(",")]
    except ValueError:
        sys.exit(
            f"error: --block-sizes: expected a comma list of integers, got {args.block_sizes!r}"
        )
    for flag, value in (
        ("--rounds", args.rounds),
        ("--calls", args.calls),
        ("--threads", args.threads),
    ):
        if value < 1:
            sys.exit(f"error: {flag} must be at least 1, got {value}")
    if args.case not in NA_CASES and any(bs < 1 for bs in args.block_sizes):
        sys.exit(f"error: --block-sizes: every size must be at least 1, got {args.block_sizes}")
    if args.worker:
        return worker(args)
    for flag, value in (("--old", args.old), ("--new", args.new)):
        if not value:
            sys.exit(f"error: {flag} is required")
        if not os.path.isfile(os.path.join(value, "tokenmix", "__init__.py")):
            sys.exit(f"error: {flag}: {value} holds no 'tokenmix' package")

    argv = [f"--case={args.case}", f"--block-sizes={','.join(map(str, args.block_sizes))}"]
    argv += [f"--calls={args.calls}", f"--threads={args.threads}"] + (
        ["--quick"] if args.quick else []
    )
    workers = {"old": Worker("--old", args.old, argv), "new": Worker("--new", args.new, argv)}
    ratios: dict[int, list[float]] = {bs: [] for bs in args.block_sizes}
    best: dict[tuple[str, int], float] = {}
    try:
        for w in workers.values():
            w.wait_ready()
        for r in range(args.rounds):
            got = {}
            for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                got[name] = workers[name].round()
                for bs, ms in got[name].items():
                    best[(name, bs)] = min(best.get((name, bs), float("inf")), ms)
            for bs in args.block_sizes:
                ratios[bs].append(got["new"][bs] / got["old"][bs])
            if (r + 1) % 10 == 0 or r + 1 == args.rounds:
                print(f"  round {r + 1}/{args.rounds}", flush=True)
    finally:
        for w in workers.values():
            w.close()
    what = f"{args.case}, forward, {args.threads} threads"
    print(f"\n{what}, {args.rounds} rounds of {args.calls} calls")
    na = args.case in NA_CASES
    first = "case" if na else "BLOCK_SIZE"
    print(f"| {first} | old best ms | new best ms | new / old (median of rounds) | quartiles |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for bs, rs in ratios.items():
        qs = statistics.quantiles(rs, n=4) if len(rs) > 1 else [rs[0], rs[0], rs[0]]
        print(
            f"| {args.case if na else bs} | {best[('old', bs)]:.2f} | {best[('new', bs)]:.2f} | "
            f"{statistics.median(rs):.3f} | {qs[0]:.3f}-{qs[2]:.3f} |"
        )


if __name__ == "__main__":
    main()
