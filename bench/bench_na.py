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
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    BackendRun,
    RunCeiling,
    Unsupported,
    add_measurement_arguments,
    add_speedups,
    autograd_run,
    block_mask_bytes,
    case_footer,
    check_correctness,
    log,
    machine_info,
    measure_row,
    refuse_unusable_cuda,
    render_tables,
    report_header,
    resolve_measurement_arguments,
    result_cells,
    run_measurement,
    worker_main,
    worker_spec,
)

# Forward+backward useful FLOPs as a multiple of forward FLOPs. The forward pass is
# two matmul-shaped products per attended pair (QK^T and PV); the backward pass is
# five (recomputed QK^T, dV, dP, dQ, dK), i.e. 2.5x the forward (FlashAttention
# convention), so forward+backward is 3.5x the forward.
FWD_BWD_FLOP_FACTOR = 3.5

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --dtype default per --device: what each device's attention kernels are used with.
DEFAULT_DTYPES = {"cpu": "float32", "cuda": "float16"}
# Matmul size of the throughput ceiling: a GPU needs a larger product to approach its peak.
MATMUL_N = {"cpu": 2048, "cuda": 8192}

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
MODES = ("fwd", "fwd+bwd")
# Oracles for the correctness check, in order of preference.
ORACLES = ("sdpa", "reference", "flex")
# Tolerances of the correctness check: |x - oracle| <= atol + rtol * max|oracle|.
TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": (3e-2, 3e-2), "float16": (1e-2, 1e-2)}


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


def window_bounds(
    length: int, kernel: int, stride: int, dilation: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position of one dimension: (dilation group, group coordinate, start, end).

    Query ``i`` attends key ``j`` of this dimension iff both are in the same
    dilation group and ``start[i] <= jg < end[i]`` for ``jg``, the key's group
    coordinate. This is NATTEN's rule (tokenmix/window.h), vectorised.
    """
    i = torch.arange(length, dtype=torch.int64)
    group = i % dilation
    ig = i // dilation
    group_len = (length - group + dilation - 1) // dilation
    left = kernel // 2
    right = kernel // 2 + (kernel % 2) - 1
    if causal:
        leader = torch.minimum((ig // stride) * stride + stride - 1, group_len - 1)
        start = (leader - left - right).clamp(min=0)
        end = torch.minimum(ig + 1, group_len)
    else:
        leader = torch.minimum((ig // stride) * stride + stride // 2, group_len - 1)
        start = (leader - left).clamp(min=0)
        start = start + torch.where(
            leader + right >= group_len, group_len - right - leader - 1, torch.zeros_like(start)
        )
        end = start + kernel
    return group, ig, start, end


def dim_mask(length: int, kernel: int, stride: int, dilation: int, causal: bool) -> torch.Tensor:
    """``[length, length]`` bool: query position (row) attends key position (column)."""
    group, ig, start, end = window_bounds(length, kernel, stride, dilation, causal)
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
        _, _, start, end = window_bounds(
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
        bounds = window_bounds(
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


def make_inputs(case: Case, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """q, k, v and the output gradient, ``[B, *spatial, H, D]``; identical in every process
    (drawn on the CPU, then moved to ``device``)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (case.batch, *case.shape, case.heads, case.head_dim)
    dtype = DTYPES[case.dtype]
    return {
        name: torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        for name in ("q", "k", "v", "dout")
    }


def _to_bhnd(x: torch.Tensor, case: Case) -> torch.Tensor:
    return (
        x.reshape(case.batch, case.tokens, case.heads, case.head_dim).transpose(1, 2).contiguous()
    )


def _from_bhnd(x: torch.Tensor, case: Case) -> torch.Tensor:
    return x.transpose(1, 2).reshape(case.batch, *case.shape, case.heads, case.head_dim)


def _autograd_run(
    fn: Callable,
    case: Case,
    inputs: dict[str, torch.Tensor],
    backward: bool,
    bhnd: bool = False,
) -> BackendRun:
    """Wrap ``fn(q, k, v) -> out`` for timing; ``bhnd`` moves tensors to ``[B, H, N, D]``
    once, here, outside the timed region."""
    if not bhnd:
        return autograd_run(fn, inputs, backward)
    return autograd_run(
        fn,
        inputs,
        backward,
        to_layout=lambda x: _to_bhnd(x, case),
        from_layout=lambda x: _from_bhnd(x, case),
    )


def build_tokenmix(case: Case, inputs, backward: bool) -> BackendRun:
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

    return _autograd_run(fn, case, inputs, backward)


def build_reference(case: Case, inputs, backward: bool) -> BackendRun:
    from tokenmix.neighborhood.reference import neighborhood_attention_reference as ref

    def fn(q, k, v):
        return ref(q, k, v, case.kernel, case.stride, case.dilation, case.causal)

    return _autograd_run(fn, case, inputs, backward)


def build_sdpa(case: Case, inputs, backward: bool) -> BackendRun:
    import torch.nn.functional as F

    mask = dense_mask(case).to(inputs["q"].device)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    run = _autograd_run(fn, case, inputs, backward, bhnd=True)
    run.aux_bytes = mask.numel() * mask.element_size()
    return run


def build_flex(case: Case, inputs, backward: bool) -> BackendRun:
    device = inputs["q"].device
    if backward and device.type == "cpu":
        raise Unsupported("FlexAttention has no CPU backward")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tables = flex_tables(case).to(device)
    n = case.tokens
    t0 = time.perf_counter()
    block_mask = create_block_mask(flex_mask_mod(tables), None, None, n, n, device=str(device))
    mask_s = time.perf_counter() - t0
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        return compiled(q, k, v, block_mask=block_mask)

    run = _autograd_run(fn, case, inputs, backward, bhnd=True)
    t0 = time.perf_counter()
    run.call()  # compile now so the warmup estimate reflects a compiled call
    compile_s = time.perf_counter() - t0
    run.aux_bytes = tables.numel() * tables.element_size() + block_mask_bytes(block_mask)
    run.info = {
        "block_mask_s": mask_s,
        "compile_s": compile_s,
        "block_sparsity_pct": float(block_mask.sparsity()),
    }
    return run


def build_natten(case: Case, inputs, backward: bool) -> BackendRun:
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

    run = _autograd_run(fn, case, inputs, backward)
    run.info = {"natten_version": getattr(natten, "__version__", "?")}
    return run


BUILDERS = {
    "tokenmix": build_tokenmix,
    "reference": build_reference,
    "sdpa": build_sdpa,
    "flex": build_flex,
    "natten": build_natten,
}


def run_worker(spec: dict) -> dict:
    """Set up one backend, time it, measure one call's peak memory, save its outputs."""
    case = Case.from_dict(spec["case"])
    backward = spec["mode"] == "fwd+bwd"
    device = spec.get("device", "cpu")
    return run_measurement(
        spec,
        lambda: make_inputs(case, spec["seed"], device),
        lambda inputs: BUILDERS[spec["backend"]](case, inputs, backward),
    )


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


def select_cases(args) -> list[Case]:
    common = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype)
    if args.shape:
        shape = tuple(int(p) for p in args.shape.split(","))
        n = len(shape)
        if args.kernel is None:
            raise SystemExit("--shape needs --kernel")
        kernel = parse_tuple(args.kernel, n, "kernel")
        stride = parse_tuple(args.stride, n, "stride")
        dilation = parse_tuple(args.dilation, n, "dilation")
        causal = parse_tuple(args.causal, n, "causal", bool)
        name = "custom-" + "x".join(map(str, shape)) + "-k" + "x".join(map(str, kernel))
        if any(s != 1 for s in stride):
            name += "-s" + "x".join(map(str, stride))
        if any(d != 1 for d in dilation):
            name += "-d" + "x".join(map(str, dilation))
        if any(causal):
            name += "-c" + "".join(str(int(c)) for c in causal)
        cases = [Case(name, shape, kernel, stride, dilation, causal, **common)]
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
        cases = []
        for name in dict.fromkeys(names):
            shape, kernel = CASES[name]
            if args.quick:
                name, shape, kernel = QUICK_CASES[name]
            n = len(shape)
            cases.append(Case(name, shape, kernel, (1,) * n, (1,) * n, (False,) * n, **common))
    for case in cases:
        try:
            case.validate()
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    return cases


def check_tokenmix() -> dict:
    """Import tokenmix or exit with a clear message."""
    try:
        import tokenmix
    except Exception as exc:
        sys.exit(
            "bench_na.py: cannot import tokenmix "
            f"({type(exc).__name__}: {exc}).\n"
            "Build and install it first (pip install --no-build-isolation -e . from the "
            "repository root),\nor put an installed build on PYTHONPATH."
        )
    if not hasattr(tokenmix, "neighborhood_attention"):
        sys.exit(
            f"bench_na.py: tokenmix at {getattr(tokenmix, '__file__', '?')} has no "
            "neighborhood_attention"
        )
    info = {
        "version": getattr(tokenmix, "__version__", "?"),
        "file": getattr(tokenmix, "__file__", None),
    }
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
    backward = mode == "fwd+bwd"
    if backend == "flex" and backward and device == "cpu":
        return ("n/a", "n/a (FlexAttention has no CPU backward)")
    if backend == "natten" and importlib.util.find_spec("natten") is None:
        return ("not installed", "not installed")
    if backend == "reference" and tm_info.get("reference") is not True:
        return ("unavailable", f"unavailable ({tm_info.get('reference')})")
    if backend == "sdpa":
        est = sdpa_memory_estimate(case, backward, device)
        if est > mem_limit_gb * 2**30:
            return (
                "skipped",
                f"skipped (memory: dense mask needs ~{est / 2**30:.1f} GiB > {mem_limit_gb:g} GiB)",
            )
    return None


def case_plan(case: Case) -> dict | None:
    """The planner's view of a case (``tokenmix.plan``, 64-query tiles as the CUDA kernels
    use): the tile shape and the bounds on the speedup over dense attention, from FLOPs
    (dense / useful pairs) and at tile granularity (dense / computed pairs). None when the
    installed tokenmix has no planner."""
    try:
        import tokenmix

        p = tokenmix.plan(case.shape, case.kernel, case.stride, case.dilation, case.causal)
    except (ImportError, AttributeError, RuntimeError) as exc:
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
    }


def plan_line(plan: dict | None) -> str:
    if plan is None:
        return "planner: unavailable in this tokenmix build"
    tile = "x".join(str(t) for t in plan["tile_shape"])
    return (
        f"planner: flop bound {plan['flop_bound']:.2f}x, tile bound {plan['tile_bound']:.2f}x "
        f"over dense attention (tile {tile}, {100 * plan['tile_efficiency']:.1f}% of computed "
        "pairs useful)"
    )


def run_case(
    case: Case,
    args,
    modes: list[str],
    backends: list[str],
    tm_info: dict,
    tmpdir: str,
    counter: list[int],
    total: int,
) -> dict:
    fwd_flops = forward_flops(case)
    pairs = attended_pairs(case)
    rows = []
    for backend in backends:
        for mode in modes:
            backward = mode == "fwd+bwd"
            row = {"backend": backend, "label": LABELS[backend], "mode": mode}
            skip = skip_reason(case, backend, mode, tm_info, args.mem_limit_gb, args.device)
            if skip is not None:
                row.update(status=skip[0], note=skip[1])
                rows.append(row)
                continue
            counter[0] += 1
            tag = f"[{counter[0]}/{total}] {case.name} {LABELS[backend]} {mode}"
            spec = worker_spec(
                args,
                case=asdict(case),
                backend=backend,
                mode=mode,
                save_path=os.path.join(tmpdir, f"{case.name}-{backend}-{mode}.pt"),
            )
            measure_row(
                row,
                spec,
                script=__file__,
                tag=tag,
                flops=fwd_flops * (FWD_BWD_FLOP_FACTOR if backward else 1.0),
                matmul_gflops=args.matmul_gflops,
                timeout_s=args.worker_timeout,
                verbose=args.verbose,
            )
            rows.append(row)

    # Correctness: every backend's outputs (and gradients) against the first oracle
    # that ran, in the order sdpa+mask, reference, flex.
    atol, rtol = TOLERANCES[case.dtype]
    correctness = check_correctness(rows, modes, ORACLES, atol, rtol)
    # Speedups of tokenmix over every peer that ran, per mode.
    speedups = add_speedups(rows, modes)
    return {
        "case": asdict(case),
        "name": case.name,
        "description": case.describe(),
        "tokens": case.tokens,
        "plan": case_plan(case),
        "attended_pairs": pairs,
        "avg_keys_per_query": pairs / case.tokens,
        "fwd_flops": fwd_flops,
        "fwd_bwd_flops": fwd_flops * FWD_BWD_FLOP_FACTOR,
        "results": rows,
        "correctness": correctness,
        "speedups": speedups,
    }


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
        rows = [result_cells(r, ORACLES) for r in c["results"]]
        # The planner's bounds are printed for the GPU run only: the CPU output stays
        # what docs/performance.md shows (the JSON has them for both).
        footer = case_footer(c, LABELS) + ([plan_line(c.get("plan"))] if cuda else [])
        out.extend(render_tables(title, rows, footer, markdown))
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
    out.append(f"_{notes}_" if markdown else notes)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Benchmark tokenmix neighborhood attention against its peers (CPU or CUDA).",
    )
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
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--heads", type=int, default=4, help="heads (default 4)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim (default 64)")
    add_measurement_arguments(p, DTYPES, DEFAULT_DTYPES, BACKENDS)
    args = p.parse_args(argv)

    if args.worker is not None:
        return worker_main(args.worker, run_worker)

    if args.device == "cuda":
        # One clear line instead of a traceback from the first CUDA call.
        refused = refuse_unusable_cuda("bench_na.py")
        if refused is not None:
            return refused
    backends, modes = resolve_measurement_arguments(args, DEFAULT_DTYPES, BACKENDS, MODES)
    cases = select_cases(args)
    tm_info = check_tokenmix()

    t_start = time.perf_counter()
    dtype = DTYPES[args.dtype]
    matmul_n = MATMUL_N[args.device]
    ceiling = RunCeiling(args.threads, matmul_n, dtype, args.dtype, args.device)
    args.matmul_gflops = ceiling.start()

    total = sum(
        skip_reason(c, b, m, tm_info, args.mem_limit_gb, args.device) is None
        for c in cases
        for b in backends
        for m in modes
    )

    report = {
        "meta": {
            "machine": machine_info(args.threads, args.device),
            "device": args.device,
            "threads": args.threads,
            "dtype": args.dtype,
            "tokenmix": tm_info,
            "matmul": {"n": matmul_n, "gflops": args.matmul_gflops},
            "flops": {
                "fwd": "4 * B * H * attended_pairs * D",
                "fwd+bwd": f"{FWD_BWD_FLOP_FACTOR} * fwd",
            },
            "args": {k: v for k, v in vars(args).items() if k != "worker"},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "cases": [],
    }
    counter = [0]
    with tempfile.TemporaryDirectory(prefix="bench_na_") as tmpdir:
        for case in cases:
            report["cases"].append(
                run_case(case, args, modes, backends, tm_info, tmpdir, counter, total)
            )
    # Measured again at the end: a busy machine at the start would otherwise make the
    # ceiling too low. The higher median is the ceiling; the stored ratios are redone.
    ceiling.finish(report["cases"])
    report["meta"]["warnings"] = ceiling.warnings
    report["meta"]["matmul"] = ceiling.meta()
    report["meta"]["wall_s"] = time.perf_counter() - t_start
    report["meta"]["cpu_busy_at_start"] = ceiling.busy_start
    log(f"done in {report['meta']['wall_s']:.0f} s")

    print(render(report, args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {args.json}")

    wrong = [
        (c["name"], m)
        for c in report["cases"]
        for m, entries in c["correctness"].items()
        if "tokenmix" in entries and not entries["tokenmix"]["ok"]
    ]
    if wrong:
        log(f"ERROR: tokenmix output mismatches its oracle in {wrong}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
