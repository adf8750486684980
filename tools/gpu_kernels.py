"""A fixed workload of tokenmix's CUDA kernels, for the GPU check's profiler and sanitizer runs.

    python tools/gpu_kernels.py --family na --pass fwd      # what `ncu` profiles (one kernel)
    python tools/gpu_kernels.py --small                     # what compute-sanitizer runs

The default shapes are the benchmarks' (fp16, B=1, H=4, D=64: neighborhood attention 2-D 64x64
with a 7x7 window; block-sparse random 64x64 blocks at 1/8 density over 4096 tokens; the gated
delta rule and GLA over 8192 tokens). ``--small`` runs tiny cases of every family and pass
(neighborhood attention at D=64; block-sparse at D=32 with partial blocks under a causal window
with attention sinks; the scans over 100 tokens with K=32, V=40: two value blocks and a partial
chunk) and checks each output and gradient against the float64 reference, so a sanitizer run is
also a correctness run; it exits 1 on a mismatch. With
``--device cpu`` the same calls run on the CPU kernels: the GPU check's dry run uses that to
prove the script up to its first GPU call.
"""

from __future__ import annotations

import argparse
import sys
import time

import tokenmix
import torch
from tokenmix import BlockLayout, ElementMask
from tokenmix.block_sparse.reference import block_sparse_attention_reference
from tokenmix.linear_scan import delta_rule, linear_attention
from tokenmix.linear_scan.reference import naive_delta_rule, naive_linear_attention
from tokenmix.neighborhood.reference import neighborhood_attention_reference

FAMILIES = ("na", "bs", "delta", "gla")
PASSES = ("fwd", "bwd", "both")


def na_inputs(small: bool, dtype: torch.dtype, device: str, gen: torch.Generator):
    shape, kernel = ((9, 11), (3, 5)) if small else ((64, 64), (7, 7))
    heads = 2 if small else 4  # D=64: the benchmarks' tensor-core path, small or not
    q, k, v = (torch.randn(1, *shape, heads, 64, generator=gen).to(device, dtype) for _ in range(3))

    def run(q, k, v):
        return tokenmix.neighborhood_attention(q, k, v, kernel)

    def reference(q, k, v):
        return neighborhood_attention_reference(q, k, v, kernel)

    return (q, k, v), run, reference


def bs_inputs(small: bool, dtype: torch.dtype, device: str, gen: torch.Generator):
    if small:
        # partial blocks with a structured rule: a causal window with attention sinks
        t, heads, dim = 200, 2, 32
        rule = ElementMask(band=(-80, 0), prefix=40, prefix_causal=True)
        layout = BlockLayout.from_element_mask(rule, t, t, block_size=64)
    else:
        # the benchmark's random 64x64 blocks, 8 of 64 per block row
        t, heads, dim, block, keep = 4096, 4, 64, 64, 8
        n = t // block
        picks = torch.rand(heads, n, n, generator=gen).topk(keep, dim=-1).indices
        status = torch.zeros(1, heads, n, n, dtype=torch.long)
        status.scatter_(-1, picks.unsqueeze(0), 2)
        layout = BlockLayout.from_block_status(status, block_size=block, seq_lengths=(t, t))
    layout = layout.to(device)
    q, k, v = (torch.randn(1, t, heads, dim, generator=gen).to(device, dtype) for _ in range(3))

    def run(q, k, v):
        return tokenmix.block_sparse_attention(q, k, v, layout)

    def reference(q, k, v):
        return block_sparse_attention_reference(q, k, v, layout)

    return (q, k, v), run, reference


def _scan_shape(small: bool) -> tuple[int, int, int, int]:
    return (100, 2, 32, 40) if small else (8192, 4, 64, 64)


def delta_inputs(small: bool, dtype: torch.dtype, device: str, gen: torch.Generator):
    t, heads, dk, dv = _scan_shape(small)
    q = torch.randn(1, t, heads, dk, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(1, t, heads, dk, generator=gen), dim=-1)
    v = torch.randn(1, t, heads, dv, generator=gen)
    beta = torch.rand(1, t, heads, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(1, t, heads, generator=gen))

    def run(q, k, v):
        return delta_rule(q, k, v, beta.to(q.device), g=g.to(q.device))[0]

    def reference(q, k, v):
        return naive_delta_rule(q, k, v, beta.double(), g=g.double())[0]

    return tuple(x.to(device, dtype) for x in (q, k, v)), run, reference


def gla_inputs(small: bool, dtype: torch.dtype, device: str, gen: torch.Generator):
    t, heads, dk, dv = _scan_shape(small)
    q, k = (torch.randn(1, t, heads, dk, generator=gen) for _ in range(2))
    v = torch.randn(1, t, heads, dv, generator=gen)
    gk = torch.nn.functional.logsigmoid(torch.randn(1, t, heads, dk, generator=gen)) / 16

    def run(q, k, v):
        return linear_attention(q, k, v, gk=gk.to(q.device))[0]

    def reference(q, k, v):
        return naive_linear_attention(q, k, v, gk=gk.double())[0]

    return tuple(x.to(device, dtype) for x in (q, k, v)), run, reference


BUILDERS = {"na": na_inputs, "bs": bs_inputs, "delta": delta_inputs, "gla": gla_inputs}


def run_family(family: str, which: str, small: bool, dtype, device: str, repeats: int) -> float:
    """Runs one family's pass; with ``small`` returns the largest relative error against the
    float64 reference over the output and every gradient, else 0."""
    gen = torch.Generator().manual_seed(0)
    inputs, run, reference = BUILDERS[family](small, dtype, device, gen)
    grad_inputs = [x.detach().requires_grad_(which != "fwd") for x in inputs]
    grad_out = torch.randn(run(*grad_inputs).shape, generator=gen).to(device, dtype)
    for _ in range(repeats):
        out = run(*grad_inputs)
        if which != "fwd":
            grads = torch.autograd.grad(out, grad_inputs, grad_out)
    if device == "cuda":
        torch.cuda.synchronize()
    if not small:
        return 0.0
    ref_inputs = [x.detach().double().cpu().requires_grad_(which != "fwd") for x in inputs]
    ref_out = reference(*ref_inputs)
    got, want = [out], [ref_out]
    if which != "fwd":
        got += list(grads)
        want += list(torch.autograd.grad(ref_out, ref_inputs, grad_out.double().cpu()))
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        w = w.detach()
        err = (g.detach().double().cpu() - w).abs().max() / w.abs().max().clamp_min(1.0)
        worst = max(worst, float(err))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--family", default="all", choices=(*FAMILIES, "all"))
    p.add_argument("--pass", dest="which", default="both", choices=PASSES)
    p.add_argument("--small", action="store_true", help="tiny cases, checked against the reference")
    p.add_argument("--repeats", type=int, default=1, help="calls per pass (default 1)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_kernels: --device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    families = FAMILIES if args.family == "all" else (args.family,)
    failed = False
    for family in families:
        start = time.perf_counter()
        err = run_family(family, args.which, args.small, dtype, args.device, args.repeats)
        took = time.perf_counter() - start
        verdict = ""
        if args.small:
            failed |= not err <= tol
            verdict = f", max rel err {err:.2e} ({'OK' if err <= tol else 'MISMATCH'})"
        print(f"{family} {args.which} on {args.device} ({dtype}): {took:.2f} s{verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
