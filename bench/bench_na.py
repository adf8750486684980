#!/usr/bin/env python
"""Neighborhood attention on CPU (or a CUDA GPU): tokenmix's fused kernel against its peers.

For every case, on the same random inputs, this times

* ``tokenmix.neighborhood_attention`` (the fused CPU kernel; ``na1d/na2d/na3d`` on
  CUDA tensors with ``--device cuda``),
* the pure-PyTorch reference ``tokenmix.neighborhood.reference``,
* ``torch.nn.functional.scaled_dot_product_attention`` with the equivalent dense
  boolean mask,
* ``flex_attention`` compiled with ``torch.compile`` and a ``BlockMask`` built from
  the same rule (forward only on the CPU: FlexAttention has no CPU backward),
* NATTEN (``natten.na1d/na2d/na3d``) when it is installed,

in forward and forward+backward mode, and reports the median time, useful GFLOP/s,
that throughput as a fraction of the machine's fp32 matmul throughput, the peak
memory of one call, the max abs difference of every output against SDPA, and the
speedup of tokenmix over each peer. Every (case, backend, mode) runs in a fresh
subprocess (this script re-invoked with ``--worker``) so that peak-memory numbers
are not polluted by earlier measurements. Each case also reports the planner's
bounds (``tokenmix.plan``: dense/useful and dense/computed pairs of the 64-query tile
schedule). See bench/README.md.

    python bench/bench_na.py                       # all cases, both modes
    python bench/bench_na.py --device cuda         # on the GPU (float16 by default)
    python bench/bench_na.py --case 2d-64x64-k7 --forward
    python bench/bench_na.py --shape 64,64 --kernel 7 --dilation 2 --causal 0,1
    python bench/bench_na.py --quick --json out.json --markdown
    python bench/bench_na.py --case 1d --seq-lens 4096,8192,16384 --plot na_1d.png
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    DTYPES,
    FWD_BWD_FLOP_FACTOR,
    AttentionBenchmark,
    BackendRun,
    BenchmarkRun,
    Unsupported,
    attention_main,
    autograd_run,
    check_flex_mode,
    compiled_flex_run,
    log,
    parse_int_list,
    peer_skip_reason,
    render_case,
    report_header,
    report_text,
    sdpa_run,
    tokenmix_info,
)

# name -> (shape, kernel); stride 1, dilation 1, non-causal.
CASES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "2d-64x64-k7": ((64, 64), (7, 7)),
    "1d-16384-k1024": ((16384,), (1024,)),
    "3d-16x16x16-k5": ((16, 16, 16), (5, 5, 5)),
}
# --quick: the same kinds of problem, scaled down to a smoke test.
QUICK_CASES: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {
    "2d-64x64-k7": ("2d-32x32-k7", (32, 32), (7, 7)),
    "1d-16384-k1024": ("1d-2048-k256", (2048,), (256,)),
    "3d-16x16x16-k5": ("3d-8x8x8-k5", (8, 8, 8), (5, 5, 5)),
}
CASE_ALIASES = {name.split("-", 1)[0]: name for name in CASES}

BACKENDS = ("tokenmix", "reference", "sdpa", "flex", "natten")
LABELS = {
    "tokenmix": "tokenmix",
    "reference": "tokenmix reference",
    "sdpa": "sdpa+mask",
    "flex": "flex (compiled)",
    "natten": "natten",
}
# Oracles for the correctness check, in order of preference.
ORACLES = ("sdpa", "reference", "flex")


# ---------------------------------------------------------------------------
# Cases and the neighborhood rule
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    dtype: str = "float32"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of q, k, v and the output gradient: heads-last ``[B, *spatial, H, D]``."""
        return (self.batch, *self.shape, self.heads, self.head_dim)

    @classmethod
    def from_dict(cls, d: dict) -> Case:
        return cls(
            name=d["name"],
            shape=tuple(d["shape"]),
            kernel=tuple(d["kernel"]),
            stride=tuple(d["stride"]),
            dilation=tuple(d["dilation"]),
            causal=tuple(bool(c) for c in d["causal"]),
            batch=d["batch"],
            heads=d["heads"],
            head_dim=d["head_dim"],
            dtype=d["dtype"],
        )

    @property
    def series(self) -> str:
        """The case without its extent: what stays fixed along a ``--seq-lens`` sweep."""
        return series_name(self.ndim, self.kernel, self.stride, self.dilation, self.causal)

    def describe(self) -> str:
        def x(t):
            return "x".join(str(int(v)) for v in t)

        causal = "no" if not any(self.causal) else x(self.causal)
        return (
            f"shape {x(self.shape)}, kernel {x(self.kernel)}, stride {x(self.stride)}, "
            f"dilation {x(self.dilation)}, causal {causal}; B={self.batch} H={self.heads} "
            f"D={self.head_dim} {self.dtype}"
        )

    def validate(self) -> None:
        n = self.ndim
        if not 1 <= n <= 3:
            raise ValueError(f"{self.name}: 1 to 3 spatial dimensions supported, got {n}")
        for name in ("kernel", "stride", "dilation", "causal"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{self.name}: {name} needs {n} entries")
        for L, k, s, d in zip(self.shape, self.kernel, self.stride, self.dilation, strict=True):
            if k < 1 or d < 1 or not 1 <= s <= k:
                raise ValueError(f"{self.name}: need kernel>=1, dilation>=1, 1<=stride<=kernel")
            if k * d > L:
                raise ValueError(f"{self.name}: kernel*dilation ({k}*{d}) exceeds extent {L}")


def dim_bounds(
    length: int, kernel: int, stride: int, dilation: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position of one dimension: (dilation group, group coordinate, start, end).

    Query ``i`` attends key ``j`` of this dimension iff both are in the same
    dilation group and ``start[i] <= jg < end[i]`` for ``jg``, the key's group
    coordinate. ``start`` and ``end`` are the library's window rule,
    ``tokenmix.neighborhood.reference.window_bounds`` (NATTEN's rule; the kernels use the
    same rule from tokenmix/window.h), so the benchmark's masks cannot drift from it.
    """
    from tokenmix.neighborhood.reference import window_bounds

    start, end = window_bounds(length, kernel, stride, dilation, causal)
    i = torch.arange(length, dtype=torch.int64)
    return i % dilation, i // dilation, start, end


def dim_mask(length: int, kernel: int, stride: int, dilation: int, causal: bool) -> torch.Tensor:
    """``[length, length]`` bool: query position (row) attends key position (column)."""
    group, ig, start, end = dim_bounds(length, kernel, stride, dilation, causal)
    same_group = group[:, None] == group[None, :]
    return same_group & (start[:, None] <= ig[None, :]) & (ig[None, :] < end[:, None])


def dense_mask(case: Case) -> torch.Tensor:
    """``[tokens, tokens]`` bool mask over row-major flattened tokens.

    The rule is separable: a pair is attended iff it is attended in every
    dimension, so the dense mask is the Kronecker (AND) product of the per-dimension
    masks; no tokens x tokens integer temporaries are created.
    """
    mask: torch.Tensor | None = None
    for dim in range(case.ndim):
        m = dim_mask(
            case.shape[dim],
            case.kernel[dim],
            case.stride[dim],
            case.dilation[dim],
            case.causal[dim],
        )
        if mask is None:
            mask = m
        else:
            rows, cols = mask.shape
            mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(
                rows * m.shape[0], cols * m.shape[1]
            )
    assert mask is not None
    return mask


def attended_pairs(case: Case) -> int:
    """Exact number of attended (query, key) pairs per batch and head.

    Separable rule: the count is the product over dimensions of the per-dimension
    pair counts, and per dimension each query sees ``end - start`` keys (windows
    never leave their dilation group). Equals ``dense_mask(case).sum()``.
    """
    total = 1
    for dim in range(case.ndim):
        _, _, start, end = dim_bounds(
            case.shape[dim],
            case.kernel[dim],
            case.stride[dim],
            case.dilation[dim],
            case.causal[dim],
        )
        total *= int((end - start).sum())
    return total


def forward_flops(case: Case) -> int:
    """Useful forward FLOPs: ``4 * B * H * pairs * D`` (QK^T and PV, D == Dv)."""
    return 4 * case.batch * case.heads * attended_pairs(case) * case.head_dim


def flex_tables(case: Case) -> torch.Tensor:
    """``[ndim, 4, tokens]`` int32 lookup tables (group, group coord, start, end) per token."""
    flat = torch.arange(case.tokens, dtype=torch.int64)
    tables = []
    for dim in range(case.ndim):
        inner = math.prod(case.shape[dim + 1 :])
        coord = (flat // inner) % case.shape[dim]
        bounds = dim_bounds(
            case.shape[dim],
            case.kernel[dim],
            case.stride[dim],
            case.dilation[dim],
            case.causal[dim],
        )
        tables.append(torch.stack([b[coord] for b in bounds]))
    return torch.stack(tables).to(torch.int32).contiguous()


def flex_mask_mod(tables: torch.Tensor) -> Callable:
    """FlexAttention ``mask_mod`` applying the neighborhood rule through index tables."""
    ndim = tables.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = None
        for dim in range(ndim):
            group, coord, start, end = tables[dim].unbind(0)
            key = coord[kv_idx]
            ok = (group[q_idx] == group[kv_idx]) & (start[q_idx] <= key) & (key < end[q_idx])
            keep = ok if keep is None else keep & ok
        return keep

    return mask_mod


def sdpa_memory_estimate(case: Case, backward: bool, device: str = "cpu") -> int:
    """Rough bytes SDPA needs beyond the inputs: the bool mask plus the additive float
    mask PyTorch's CPU kernel derives from it (both tokens x tokens; on CUDA the
    additive mask has the input dtype), doubled for the backward, plus a few
    input-sized buffers."""
    n = case.tokens
    elt = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    per_mask = n * n * (1 + (elt if device == "cuda" else 4))
    act = case.batch * case.heads * n * case.head_dim * elt
    return per_mask * (2 if backward else 1) + 12 * act


# ---------------------------------------------------------------------------
# Worker side: one backend, one mode, in a fresh process
# ---------------------------------------------------------------------------


def build_tokenmix(case: Case, spec: dict, inputs, backward: bool) -> BackendRun:
    import tokenmix

    kwargs = dict(
        kernel_size=case.kernel, stride=case.stride, dilation=case.dilation, is_causal=case.causal
    )
    # On the GPU the fixed-rank entry points, as a model would call them.
    na = (
        tokenmix.neighborhood_attention
        if inputs["q"].device.type == "cpu"
        else getattr(tokenmix, f"na{case.ndim}d")
    )

    def fn(q, k, v):
        return na(q, k, v, **kwargs)

    return autograd_run(fn, inputs, backward)


def build_reference(case: Case, spec: dict, inputs, backward: bool) -> BackendRun:
    from tokenmix.neighborhood.reference import neighborhood_attention_reference as ref

    def fn(q, k, v):
        return ref(q, k, v, case.kernel, case.stride, case.dilation, case.causal)

    return autograd_run(fn, inputs, backward)


def build_sdpa(case: Case, spec: dict, inputs, backward: bool) -> BackendRun:
    return sdpa_run(dense_mask(case), inputs, backward)


def build_flex(case: Case, spec: dict, inputs, backward: bool) -> BackendRun:
    device = inputs["q"].device
    check_flex_mode(backward, device)
    from torch.nn.attention.flex_attention import create_block_mask

    tables = flex_tables(case).to(device)
    n = case.tokens
    t0 = time.perf_counter()
    block_mask = create_block_mask(flex_mask_mod(tables), None, None, n, n, device=str(device))
    mask_s = time.perf_counter() - t0
    run = compiled_flex_run(block_mask, inputs, backward)
    run.aux_bytes += tables.numel() * tables.element_size()
    run.info = {"block_mask_s": mask_s, **run.info}
    return run


def build_natten(case: Case, spec: dict, inputs, backward: bool) -> BackendRun:
    import natten

    name = f"na{case.ndim}d"
    fn_na = getattr(natten, name, None)
    if fn_na is None and hasattr(natten, "functional"):
        fn_na = getattr(natten.functional, name, None)
    if fn_na is None:
        raise Unsupported(f"natten {getattr(natten, '__version__', '?')} has no {name}")
    params = inspect.signature(fn_na).parameters
    kwargs = dict(kernel_size=case.kernel, dilation=case.dilation, is_causal=case.causal)
    if "stride" in params:
        kwargs["stride"] = case.stride
    elif any(s != 1 for s in case.stride):
        raise Unsupported("this natten version has no stride")

    def fn(q, k, v):
        return fn_na(q, k, v, **kwargs)

    run = autograd_run(fn, inputs, backward)
    run.info = {"natten_version": getattr(natten, "__version__", "?")}
    return run


# Backend -> builder (harness.Builder; the worker spec is not needed here).
BUILDERS = {
    "tokenmix": build_tokenmix,
    "reference": build_reference,
    "sdpa": build_sdpa,
    "flex": build_flex,
    "natten": build_natten,
}


# ---------------------------------------------------------------------------
# Parent side: orchestration, metrics, correctness, output
# ---------------------------------------------------------------------------


def parse_tuple(text: str | None, n: int, what: str, cast=int) -> tuple:
    if text is None:
        return (cast(1),) * n if cast is int else (False,) * n
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if cast is bool:
        vals = []
        for p in parts:
            if p.lower() not in ("0", "1", "true", "false", "yes", "no"):
                raise SystemExit(f"--{what}: expected booleans like 0,1 got {text!r}")
            vals.append(p.lower() in ("1", "true", "yes"))
    else:
        vals = [int(p) for p in parts]
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise SystemExit(f"--{what}: expected 1 or {n} values, got {text!r}")
    return tuple(vals)


def _x(values) -> str:
    return "x".join(str(int(v)) for v in values)


def _k(kernel) -> str:
    """``7`` for a 7x7 kernel (as the case names say), ``7x5`` otherwise."""
    return str(kernel[0]) if len(set(kernel)) == 1 else _x(kernel)


def series_name(ndim, kernel, stride, dilation, causal) -> str:
    """``1d-k1024``, ``2d-k7-s2x2-c01``: the window arguments of a case, without its extent."""
    name = f"{ndim}d-k{_k(kernel)}"
    if any(s != 1 for s in stride):
        name += f"-s{_x(stride)}"
    if any(d != 1 for d in dilation):
        name += f"-d{_x(dilation)}"
    if any(causal):
        name += "-c" + "".join(str(int(c)) for c in causal)
    return name


def shape_for_tokens(tokens: int, ndim: int) -> tuple[int, ...]:
    """The cube-like extent of ``ndim`` equal sides with ``tokens`` tokens (``--seq-lens``);
    exits when ``tokens`` is not an ``ndim``-th power."""
    side = round(tokens ** (1.0 / ndim))
    if side**ndim != tokens:
        raise SystemExit(
            f"--seq-lens: {tokens} tokens is not a {ndim}-D cube of equal sides (a {ndim}-D case "
            f"needs a perfect {['', '', 'square', 'cube'][ndim] or 'power'})"
        )
    return (side,) * ndim


def select_cases(args) -> list[Case]:
    common = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype)
    # (shape, kernel, stride, dilation, causal) of each selected case, then its name.
    specs = []
    if args.shape:
        shape = tuple(int(p) for p in args.shape.split(","))
        n = len(shape)
        if args.kernel is None:
            raise SystemExit("--shape needs --kernel")
        specs.append(
            (
                shape,
                parse_tuple(args.kernel, n, "kernel"),
                parse_tuple(args.stride, n, "stride"),
                parse_tuple(args.dilation, n, "dilation"),
                parse_tuple(args.causal, n, "causal", bool),
                None,
            )
        )
    else:
        names = []
        for item in args.case.split(","):
            item = item.strip()
            if item == "all":
                names.extend(CASES)
            elif item in CASES:
                names.append(item)
            elif item in CASE_ALIASES:
                names.append(CASE_ALIASES[item])
            else:
                known = ", ".join([*CASES, *CASE_ALIASES, "all"])
                raise SystemExit(f"unknown case {item!r}; known: {known}")
        for name in dict.fromkeys(names):
            shape, kernel = CASES[name]
            if args.quick:
                name, shape, kernel = QUICK_CASES[name]
            n = len(shape)
            specs.append((shape, kernel, (1,) * n, (1,) * n, (False,) * n, name))
    seq_lens = parse_int_list(args.seq_lens, "--seq-lens") if args.seq_lens else None
    cases = []
    for shape, kernel, stride, dilation, causal, name in specs:
        shapes = [shape_for_tokens(t, len(shape)) for t in seq_lens] if seq_lens else [shape]
        for extent in shapes:
            case_name = name
            if name is None or seq_lens:
                n = len(extent)
                suffix = series_name(n, kernel, stride, dilation, causal)
                suffix = suffix[len(f"{n}d-k{_k(kernel)}") :]
                if name is None:
                    case_name = f"custom-{_x(extent)}-k{_x(kernel)}{suffix}"
                else:
                    case_name = f"{n}d-{_x(extent)}-k{_k(kernel)}{suffix}"
            cases.append(Case(case_name, extent, kernel, stride, dilation, causal, **common))
    for case in cases:
        try:
            case.validate()
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    return cases


def check_tokenmix() -> dict:
    """Import tokenmix or exit with a clear message; report whether its reference imports."""
    info = tokenmix_info("bench_na.py", "neighborhood_attention")
    try:
        from tokenmix.neighborhood.reference import neighborhood_attention_reference  # noqa: F401

        info["reference"] = True
    except Exception as exc:
        info["reference"] = f"{type(exc).__name__}: {exc}"
    return info


def skip_reason(
    case: Case, backend: str, mode: str, tm_info: dict, mem_limit_gb: float, device: str = "cpu"
) -> tuple[str, str] | None:
    """(status, note) when a measurement is not run, else None."""
    if backend == "natten" and importlib.util.find_spec("natten") is None:
        return ("not installed", "not installed")
    if backend == "reference" and tm_info.get("reference") is not True:
        return ("unavailable", f"unavailable ({tm_info.get('reference')})")
    return peer_skip_reason(case, backend, mode, mem_limit_gb, device, sdpa_memory_estimate)


def case_plan(case: Case) -> dict | None:
    """The planner's view of a case (``tokenmix.plan``, 64-query tiles as the CUDA kernels
    use): the tile shape and the bounds on the speedup over dense attention, from FLOPs
    (dense / useful pairs) and at tile granularity (dense / computed pairs), and the share of
    useful pairs in the CUDA kernels' key chunks (64 keys, 32 for float32). None when the
    installed tokenmix has no planner."""
    chunk = 32 if case.dtype == "float32" else 64
    try:
        import tokenmix

        p = tokenmix.plan(
            case.shape, case.kernel, case.stride, case.dilation, case.causal, key_chunk=chunk
        )
    except (ImportError, AttributeError, RuntimeError, TypeError) as exc:
        log(f"    planner unavailable ({type(exc).__name__}: {exc})")
        return None
    return {
        "tile_shape": list(p.tile_shape),
        "num_query_tiles": p.num_query_tiles,
        "useful_pairs": p.useful_pairs,
        "computed_pairs": p.computed_pairs,
        "dense_pairs": p.dense_pairs,
        "flop_bound": p.flop_bound,
        "tile_bound": p.tile_bound,
        "tile_efficiency": p.tile_efficiency,
        "key_chunk": p.key_chunk,
        "chunked_pairs": p.chunked_pairs,
        "chunk_efficiency": p.chunk_efficiency,
    }


def plan_line(plan: dict | None) -> str:
    if plan is None:
        return "planner: unavailable in this tokenmix build"
    tile = "x".join(str(t) for t in plan["tile_shape"])
    return (
        f"planner: flop bound {plan['flop_bound']:.2f}x, tile bound {plan['tile_bound']:.2f}x "
        f"over dense attention (tile {tile}, {100 * plan['tile_efficiency']:.1f}% of computed "
        f"pairs useful, {100 * plan['chunk_efficiency']:.1f}% in the CUDA kernels' "
        f"{plan['key_chunk']}-key chunks)"
    )


def run_case(case: Case, run: BenchmarkRun) -> dict:
    """Every backend and mode of one case, its correctness and speedups, and the planner's
    view of it."""
    fwd_flops = forward_flops(case)
    pairs = attended_pairs(case)
    rows = run.measure(case, fwd_flops)
    details = {
        "plan": case_plan(case),
        "attended_pairs": pairs,
        "avg_keys_per_query": pairs / case.tokens,
        "series": case.series,
    }
    return run.case_result(case, rows, tokens=case.tokens, details=details, fwd_flops=fwd_flops)


def render(report: dict, markdown: bool) -> str:
    meta = report["meta"]
    cuda = meta.get("device", "cpu") == "cuda"
    out = report_header(meta, "neighborhood attention", markdown)
    for c in report["cases"]:
        title = (
            f"{c['name']}: {c['description']}; {c['tokens']} tokens, "
            f"{c['avg_keys_per_query']:.1f} keys/query, "
            f"fwd {c['fwd_flops'] / 1e9:.3f} GFLOP useful"
        )
        # The planner's bounds are printed for the GPU run only: the CPU output stays
        # what docs/performance.md shows (the JSON has them for both).
        notes = [plan_line(c.get("plan"))] if cuda else []
        out.extend(render_case(c, title, LABELS, ORACLES, markdown, notes))
    notes = (
        "GFLOP/s = useful FLOPs / median time for every backend: fwd 4*B*H*pairs*D, fwd+bwd "
        f"{FWD_BWD_FLOP_FACTOR}x that; % matmul = GFLOP/s / matmul GFLOP/s. peak MiB = RSS "
        "growth during one call over the RSS after setup (fresh process per row); mask MiB = "
        "memory held by the mask / BlockMask. SDPA and flex time [B,H,N,D] inputs: the layout "
        "transposes are outside the timed region. max|diff| is against sdpa+mask (else the "
        "reference); see bench/README.md."
    )
    if cuda:
        notes = (
            "GFLOP/s = useful FLOPs / median time for every backend: fwd 4*B*H*pairs*D, fwd+bwd "
            f"{FWD_BWD_FLOP_FACTOR}x that; % matmul = GFLOP/s / the GPU's matmul GFLOP/s. Times "
            "are CUDA events around each call (after a synchronize). peak MiB = growth of "
            "torch.cuda.max_memory_allocated during one call (fresh process per row); mask "
            "MiB = memory held by the mask / BlockMask. SDPA and flex time [B,H,N,D] inputs: "
            "the layout transposes are outside the timed region. max|diff| is against "
            "sdpa+mask (else the reference). Planner bounds (tokenmix.plan, 64-query tiles) "
            "are FLOP ratios, not measurements; see bench/README.md."
        )
    return report_text(out, notes, markdown)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """bench_na.py's own options: the cases and the sweep."""
    p.add_argument(
        "--case",
        default="all",
        help=f"comma list of {', '.join(CASES)} / 1d,2d,3d / all (default all)",
    )
    p.add_argument("--shape", help="custom case: spatial extent, e.g. 64,64 (overrides --case)")
    p.add_argument("--kernel", help="custom case: kernel size per dim, e.g. 7,7 or 7")
    p.add_argument("--stride", help="custom case: stride per dim (default 1)")
    p.add_argument("--dilation", help="custom case: dilation per dim (default 1)")
    p.add_argument("--causal", help="custom case: causal flag per dim, e.g. 0,1 (default 0)")
    p.add_argument(
        "--seq-lens",
        metavar="T1,T2,...",
        help="sweep: run every selected case at each of these token counts, its extent made "
        "of equal sides (a 2-D case needs squares, a 3-D case cubes), the window arguments "
        "unchanged; e.g. --case 1d --seq-lens 4096,8192,16384,32768",
    )


BENCHMARK = AttentionBenchmark(
    script=__file__,
    family="neighborhood attention",
    description="Benchmark tokenmix neighborhood attention against its peers (CPU or CUDA).",
    add_arguments=add_arguments,
    case_from_dict=Case.from_dict,
    builders=BUILDERS,
    backends=BACKENDS,
    labels=LABELS,
    oracles=ORACLES,
    select_cases=select_cases,
    check_tokenmix=check_tokenmix,
    skip_reason=skip_reason,
    run_case=run_case,
    fwd_flops="4 * B * H * attended_pairs * D",
    render=render,
    series=lambda c: c["series"],
    x_label="tokens (product of the extent)",
)


def main(argv: list[str] | None = None) -> int:
    return attention_main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
