#!/usr/bin/env python
"""Linear attention: tokenmix's fused scans against their peers, on the CPU (default) or
with ``--device cuda`` on a GPU.

For every case (a variant of the linear-attention family at one sequence length), on
the same random inputs (B=1, H=4, K=V=64, float32 by default; ``--dtype`` for q, k, v and
beta, bfloat16 by default on CUDA; decays float32), this times

* ``fused``: the public functions ``tokenmix.linear_scan.linear_attention`` /
  ``delta_rule``, i.e. the fused C++ kernels (CUDA kernels on CUDA tensors) when they are
  built (the row says when they are not and the public API fell back to the chunked scan),
* ``chunked``: the pure-PyTorch chunked implementation
  (``tokenmix.linear_scan.chunked``, called directly),
* ``naive``: the per-token recurrence (``tokenmix.linear_scan.reference``), only up
  to ``--naive-max-t`` tokens (2048), else "skipped (too slow)",
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` on
  ``[B, H, T, D]`` tensors (the transposes are outside the timed region): the
  softmax attention a linear-attention layer replaces,
* ``fla``: flash-linear-attention's pure-PyTorch paths (``fla.ops.*.naive``) when
  ``import fla`` works, else "not installed",
* ``fla-triton``: flash-linear-attention's Triton chunk kernels (``chunk_linear_attn``,
  ``chunk_simple_gla``, ``chunk_gla``, ``chunk_delta_rule``, ``chunk_gated_delta_rule``), on
  CUDA only (``make gpu-check`` carries the wheels to the GPU machine),

in forward and forward+backward mode (every differentiable input gets a gradient),
and reports the median time, tokens/s, counted GFLOP/s, that throughput as a
fraction of the same run's fp32 matmul throughput (2048 x 2048, measured at the start and the
end, the higher one used: ``harness.RunCeiling``),
the max abs difference of the output against the chunked implementation, and
ratio lines ("fused fwd+bwd is 3.1x faster than chunked").

Counted FLOPs (a convention, the same for every variant and implementation of the
linear family, so GFLOP/s compare like tokens/s do). Per head and chunk of C = 64
tokens: intra-chunk ``2*C*C*K`` (Q K^T) + ``2*C*C*V`` (scores V), inter-chunk
``2*C*K*V`` (Q S) + state update ``2*C*K*V`` (K^T V), i.e. per token and head

    forward = 2*C*(K + V) + 4*K*V              (C = 64)
    fwd+bwd = 3 * forward                       (the backward does about 2x the forward)

The delta rule does more work than this (K K^T, the triangular solve, W S); the count
leaves it out. SDPA counts the usual causal attention FLOPs, per head
``2*T*T*(K + V) / 2`` forward and 3.5x that for forward+backward (FlashAttention's
convention: the backward is 2.5x the forward).

    python bench/bench_linear.py                     # default plan (about 1-4 min on 2 cores)
    python bench/bench_linear.py --variant gla --T 4096
    python bench/bench_linear.py --all --T 2048      # every variant, naive included
    python bench/bench_linear.py --markdown --json out.json
    python bench/bench_linear.py --variant gla --seq-lens 2048,4096,8192 --plot gla.png
    python bench/bench_linear.py --device cuda --variant gated_delta --T 16384
    python bench/bench_linear.py --device cuda --variant gla,gated_delta --backends fused,fla-triton

The default plan: simple_gla T=8192 fwd and fwd+bwd, gated_delta T=8192 fwd and
fwd+bwd, simple_gla T=16384 fwd against SDPA. Progress goes to stderr, tables to
stdout. The exit status is 1 when the fused output does not match the chunked one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    DTYPES,
    MODES,
    RunCeiling,
    add_device_arguments,
    add_mode_arguments,
    add_output_arguments,
    add_plot_argument,
    add_size_arguments,
    add_timing_arguments,
    ceiling_libraries_note,
    fmt_float,
    fmt_sci,
    header_lines,
    log,
    machine_info,
    parse_int_list,
    plot_sweep,
    render_tables,
    report_text,
    require_matplotlib,
    selected_modes,
    speedup_phrase,
    sweep_points,
    time_fn,
)

CHUNK = 64  # the chunk size of the FLOP count
LINEAR_FWD_BWD_FACTOR = 3.0
SDPA_FWD_BWD_FACTOR = 3.5

# variant -> (kind, decay argument)
VARIANTS: dict[str, tuple[str, str | None]] = {
    "linear": ("linear", None),
    "retention": ("linear", "g_gamma"),
    "simple_gla": ("linear", "g"),
    "gla": ("linear", "gk"),
    "delta": ("delta", None),
    "gated_delta": ("delta", "g"),
}
BACKENDS = ("fused", "chunked", "naive", "sdpa", "fla", "fla-triton")
# The default --backends: all of them on CUDA, all but fla-triton (CUDA only) on the CPU.
CPU_BACKENDS = tuple(b for b in BACKENDS if b != "fla-triton")
# Labels of rows that did not run (those that ran say what exactly ran).
LABELS = {
    "fused": "fused",
    "chunked": "chunked (PyTorch)",
    "naive": "naive recurrence",
    "sdpa": "sdpa causal (softmax)",
    "fla": "fla (pure PyTorch)",
    "fla-triton": "fla (Triton)",
}
# |fused - chunked| <= ATOL + RTOL * max|chunked| per dtype (long sums of T terms; with
# float16/bfloat16 both outputs are rounded to the dtype).
TOLERANCES = {"float32": (1e-3, 1e-4), "float16": (5e-3, 1e-3), "bfloat16": (3e-2, 1e-2)}
DEFAULT_DTYPES = {"cpu": "float32", "cuda": "bfloat16"}

DEFAULT_PLAN = [
    ("simple_gla", 8192, MODES, BACKENDS),
    ("gated_delta", 8192, MODES, BACKENDS),
    ("simple_gla", 16384, ("fwd",), ("fused", "chunked", "sdpa")),
    # The token-by-token recurrences are only timed at a short length.
    ("simple_gla", 1024, MODES, BACKENDS),
    ("gated_delta", 1024, MODES, BACKENDS),
]


class Skip(Exception):
    """A backend that does not run for this case (reported in the table, not an error)."""


@dataclass
class Case:
    variant: str
    seq: int
    batch: int
    heads: int
    dim: int
    dtype: str = "float32"

    @property
    def kind(self) -> str:
        return VARIANTS[self.variant][0]

    @property
    def decay(self) -> str | None:
        return VARIANTS[self.variant][1]

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def linear_flops(self) -> float:
        k = v = self.dim
        per_token = 2 * CHUNK * (k + v) + 4 * k * v
        return float(self.batch * self.heads * self.seq * per_token)

    def sdpa_flops(self) -> float:
        return float(self.batch * self.heads * self.seq * self.seq * 2 * self.dim)

    def describe(self) -> str:
        return (
            f"{self.variant} T={self.seq}, B={self.batch} H={self.heads} K=V={self.dim} "
            f"{self.dtype}"
        )


def make_inputs(case: Case, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The inputs every backend gets (``[B, T, H, *]``, on ``device``; q, k, v, beta and the
    output gradient in the case's dtype, decays float32), plus the output gradient."""
    gen = torch.Generator().manual_seed(seed)
    b, t, h, d = case.batch, case.seq, case.heads, case.dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    out = {"q": randn(b, t, h, d), "k": randn(b, t, h, d), "v": randn(b, t, h, d)}
    if case.kind == "delta":
        out["k"] = F.normalize(out["k"], dim=-1)
        out["beta"] = torch.sigmoid(randn(b, t, h))
    if case.decay == "g":
        out["g"] = F.logsigmoid(randn(b, t, h))
    elif case.decay == "gk":
        out["gk"] = F.logsigmoid(randn(b, t, h, d)) / 16
    elif case.decay == "g_gamma":
        from tokenmix.linear_scan.modules import retnet_log_decays

        out["g_gamma"] = retnet_log_decays(h)
    out["dout"] = randn(b, t, h, d)
    dtype = DTYPES[case.dtype]
    decays = ("g", "gk", "g_gamma")
    return {
        n: x.to(device=device, dtype=torch.float32 if n in decays else dtype)
        for n, x in out.items()
    }


# ---------------------------------------------------------------------------
# Backends: each returns (fn(tensors) -> o [B, T, H, V], tensors, label)
# ---------------------------------------------------------------------------


def _tensor_names(case: Case) -> list[str]:
    names = ["q", "k", "v"]
    if case.kind == "delta":
        names.append("beta")
    if case.decay is not None:
        names.append(case.decay)
    return names


def _kwargs(case: Case, t: dict) -> dict:
    return {case.decay: t[case.decay]} if case.decay is not None else {}


def build_fused(case: Case, inputs: dict):
    from tokenmix.linear_scan import delta_rule, fused_kernels_available, linear_attention

    label = "fused" if fused_kernels_available() else "fused (NOT BUILT: public API -> chunked)"

    def fn(t):
        if case.kind == "delta":
            return delta_rule(t["q"], t["k"], t["v"], t["beta"], **_kwargs(case, t))[0]
        return linear_attention(t["q"], t["k"], t["v"], **_kwargs(case, t))[0]

    return fn, {n: inputs[n] for n in _tensor_names(case)}, label


def build_chunked(case: Case, inputs: dict):
    from tokenmix.linear_scan import chunked_delta_rule, chunked_linear_attention

    def fn(t):
        if case.kind == "delta":
            return chunked_delta_rule(t["q"], t["k"], t["v"], t["beta"], **_kwargs(case, t))[0]
        return chunked_linear_attention(t["q"], t["k"], t["v"], **_kwargs(case, t))[0]

    return fn, {n: inputs[n] for n in _tensor_names(case)}, "chunked (PyTorch)"


def build_naive(case: Case, inputs: dict, max_t: int):
    if case.seq > max_t:
        raise Skip(f"skipped (too slow: T > {max_t})")
    from tokenmix.linear_scan.reference import naive_delta_rule, naive_linear_attention

    def fn(t):
        if case.kind == "delta":
            return naive_delta_rule(t["q"], t["k"], t["v"], t["beta"], **_kwargs(case, t))[0]
        return naive_linear_attention(t["q"], t["k"], t["v"], **_kwargs(case, t))[0]

    return fn, {n: inputs[n] for n in _tensor_names(case)}, "naive recurrence"


def build_sdpa(case: Case, inputs: dict):
    tensors = {n: inputs[n].transpose(1, 2).contiguous() for n in ("q", "k", "v")}

    def fn(t):
        return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True)

    return fn, tensors, "sdpa causal (softmax)"


def _import_fla() -> None:
    try:
        importlib.import_module("fla")
    except Exception as exc:  # not installed, or no triton
        if isinstance(exc, ModuleNotFoundError) and exc.name == "fla":
            raise Skip("not installed") from None
        raise Skip(f"unavailable ({type(exc).__name__}: {exc})") from None


def build_fla(case: Case, inputs: dict, max_t: int):
    """flash-linear-attention's pure-PyTorch implementation of the same variant."""
    _import_fla()
    scale = case.dim**-0.5
    names = _tensor_names(case)
    t_in = {n: inputs[n] for n in names}
    if case.variant == "linear":
        if case.seq % 64:
            raise Skip("n/a (fla naive_chunk_linear_attn needs T % 64 == 0)")
        from fla.ops.linear_attn.naive import naive_chunk_linear_attn

        return (
            lambda t: naive_chunk_linear_attn(t["q"], t["k"], t["v"], scale=scale),
            t_in,
            "fla naive_chunk_linear_attn",
        )
    if case.variant in ("simple_gla", "retention"):
        from fla.ops.simple_gla.naive import naive_chunk_simple_gla

        if case.variant == "retention":  # RetNet = simple GLA with a constant g per head
            gamma = t_in.pop("g_gamma")
            t_in["g"] = gamma.view(1, 1, -1).expand(case.batch, case.seq, -1).contiguous()
        return (
            lambda t: naive_chunk_simple_gla(t["q"], t["k"], t["v"], t["g"], scale=scale)[0],
            t_in,
            "fla naive_chunk_simple_gla",
        )
    if case.variant == "gla":
        if case.seq > max_t:
            raise Skip(f"skipped (fla has only a recurrent GLA; too slow: T > {max_t})")
        from fla.ops.gla.naive import naive_recurrent_gla

        return (
            lambda t: naive_recurrent_gla(t["q"], t["k"], t["v"], t["gk"])[0],
            t_in,
            "fla naive_recurrent_gla",
        )
    if case.variant == "delta":
        if case.seq % 32:
            raise Skip("n/a (fla delta_rule_chunkwise needs T % 32 == 0)")
        from fla.ops.delta_rule.naive import delta_rule_chunkwise

        # [B, H, T, D] layout; transposed here, outside the timed region.
        t_bh = {n: x.transpose(1, 2).contiguous() for n, x in t_in.items()}

        def fn(t):
            o = delta_rule_chunkwise(t["q"], t["k"], t["v"], t["beta"], chunk_size=32)[0]
            return o.transpose(1, 2)  # a view, back to [B, T, H, V]

        return fn, t_bh, "fla delta_rule_chunkwise"
    if case.variant == "gated_delta":
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule

        return (
            lambda t: naive_chunk_gated_delta_rule(
                t["q"], t["k"], t["v"], t["g"], t["beta"], chunk_size=64, scale=scale
            )[0],
            t_in,
            "fla naive_chunk_gated_delta_rule",
        )
    raise Skip("n/a")


# variant -> (module, function) of flash-linear-attention's Triton chunk kernels. Each takes
# [B, T, H, *] tensors and returns (o, final_state); RetNet is simple GLA with g_gamma.
FLA_TRITON = {
    "linear": ("fla.ops.linear_attn", "chunk_linear_attn"),
    "retention": ("fla.ops.simple_gla", "chunk_simple_gla"),
    "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
    "gla": ("fla.ops.gla", "chunk_gla"),
    "delta": ("fla.ops.delta_rule", "chunk_delta_rule"),
    "gated_delta": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
}


def build_fla_triton(case: Case, inputs: dict, device: str):
    """flash-linear-attention's Triton kernels for the same variant (CUDA only)."""
    if device != "cuda":
        raise Skip("n/a (fla's Triton kernels need CUDA)")
    _import_fla()
    module, name = FLA_TRITON[case.variant]
    kernel = getattr(importlib.import_module(module), name)
    scale = case.dim**-0.5
    t_in = {n: inputs[n] for n in _tensor_names(case)}

    def fn(t):
        q, k, v = t["q"], t["k"], t["v"]
        if case.variant == "linear":  # fla normalizes by default; tokenmix does not
            return kernel(q, k, v, scale=scale, normalize=False)[0]
        if case.variant == "retention":
            return kernel(q, k, v, g_gamma=t["g_gamma"], scale=scale)[0]
        if case.variant == "simple_gla":
            return kernel(q, k, v, g=t["g"], scale=scale)[0]
        if case.variant == "gla":
            return kernel(q, k, v, g=t["gk"], scale=scale)[0]
        if case.variant == "delta":
            return kernel(q, k, v, beta=t["beta"], scale=scale)[0]
        return kernel(q, k, v, g=t["g"], beta=t["beta"], scale=scale)[0]

    return fn, t_in, f"fla {name} (Triton)"


def build(backend: str, case: Case, inputs: dict, args):
    if backend == "fused":
        return build_fused(case, inputs)
    if backend == "chunked":
        return build_chunked(case, inputs)
    if backend == "naive":
        return build_naive(case, inputs, args.naive_max_t)
    if backend == "sdpa":
        return build_sdpa(case, inputs)
    if backend == "fla-triton":
        return build_fla_triton(case, inputs, args.device)
    return build_fla(case, inputs, args.naive_max_t)


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def measure(fn: Callable, tensors: dict, dout: torch.Tensor, backward: bool, args):
    """Time ``fn``; returns the Timing and the last call's output (and, with
    ``backward``, the gradients of its inputs as ``d<name>``)."""
    leaves = {n: x.detach().clone().requires_grad_(backward) for n, x in tensors.items()}
    last: dict = {}
    if backward:

        def call():
            o = fn(leaves)
            o.backward(dout)
            last["o"] = o.detach()
            return o

        def setup():
            for x in leaves.values():
                x.grad = None

        timing = time_fn(
            call,
            setup=setup,
            warmup=args.warmup,
            repeats=args.repeats,
            budget_s=args.time_budget,
            device=args.device,
        )
        last.update({"d" + n: x.grad for n, x in leaves.items()})
    else:

        def call():
            with torch.no_grad():
                o = fn(leaves)
            last["o"] = o
            return o

        timing = time_fn(
            call,
            warmup=args.warmup,
            repeats=args.repeats,
            budget_s=args.time_budget,
            device=args.device,
        )
    return timing, last


def run_case(case: Case, modes, backends, args, counter: list[int], total: int) -> dict:
    inputs = make_inputs(case, args.seed, args.device)
    rows = []
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    for mode in modes:
        backward = mode == "fwd+bwd"
        for backend in backends:
            row = {"backend": backend, "mode": mode}
            try:
                fn, tensors, label = build(backend, case, inputs, args)
            except Skip as exc:
                row.update(label=LABELS[backend], status="skipped", note=str(exc))
                rows.append(row)
                continue
            row["label"] = label
            counter[0] += 1
            log(f"[{counter[0]}/{total}] {case.variant} T={case.seq} {label} {mode} ...")
            dout = inputs["dout"]
            if backend == "sdpa":  # its output is [B, H, T, D]
                dout = dout.transpose(1, 2).contiguous()
            t0 = time.perf_counter()
            try:
                timing, out = measure(fn, tensors, dout, backward, args)
            except Exception as exc:  # a peer failing must not stop the run
                row.update(status="error", note=f"error: {type(exc).__name__}: {exc}")
                rows.append(row)
                log(f"    {row['note']}")
                continue
            if backend == "sdpa":
                out = {"o": out["o"].transpose(1, 2)}
            elif backend in ("fla", "fla-triton"):
                out = {"o": out["o"]}  # its gradients may be in another layout
            outputs[(backend, mode)] = out
            flops = case.sdpa_flops() if backend == "sdpa" else case.linear_flops()
            if backward:
                flops *= SDPA_FWD_BWD_FACTOR if backend == "sdpa" else LINEAR_FWD_BWD_FACTOR
            sec = timing.median_ms * 1e-3
            row.update(
                status="ok",
                timing=timing.to_dict(),
                median_ms=timing.median_ms,
                tokens_per_s=case.tokens / sec,
                gflops=flops / sec / 1e9,
                frac_matmul=flops / sec / 1e9 / args._matmul_gflops,
                wall_s=time.perf_counter() - t0,
            )
            log(
                f"    {fmt_float(timing.median_ms)} ms, "
                f"{fmt_float(case.tokens / sec / 1e3)}k tokens/s"
            )
            rows.append(row)

    # Correctness: every linear-family output (and gradient) against the chunked one.
    ok = True
    for row in rows:
        ref = outputs.get(("chunked", row["mode"]))
        out = outputs.get((row["backend"], row["mode"]))
        if row["backend"] in ("chunked", "sdpa") or ref is None or out is None:
            continue
        diffs, correct = {}, True
        for name, x in out.items():
            if name not in ref or ref[name] is None or x is None:
                continue
            diff = float((x.float() - ref[name].float()).abs().max())
            diffs[name] = diff
            rtol, atol = TOLERANCES[case.dtype]
            bound = atol + rtol * float(ref[name].abs().max())
            correct = correct and math.isfinite(diff) and diff <= bound
        row["max_abs_diff"] = diffs
        row["correct"] = correct
        if row["backend"] == "fused" and not correct:
            ok = False

    # Ratios: fused against every other backend that ran, per mode.
    speedups = []
    for mode in modes:
        fused = next((r for r in rows if r["backend"] == "fused" and r["mode"] == mode), None)
        if fused is None or fused.get("status") != "ok":
            continue
        for r in rows:
            if r["mode"] == mode and r["backend"] != "fused" and r.get("status") == "ok":
                speedups.append(
                    {
                        "mode": mode,
                        "peer": r["label"],
                        "speedup": r["median_ms"] / fused["median_ms"],
                    }
                )
    return {
        "variant": case.variant,
        "seq": case.seq,
        "description": case.describe(),
        "fwd_linear_gflop": case.linear_flops() / 1e9,
        "fwd_sdpa_gflop": case.sdpa_flops() / 1e9,
        "results": rows,
        "speedups": speedups,
        "fused_correct": ok,
    }


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

HEADERS = ("backend", "mode", "median ms", "tokens/s", "GFLOP/s", "% matmul", "max|Δ|", "note")
ALIGN = "llrrrrrl"


def case_rows(case_res: dict) -> list[list[str]]:
    out = []
    for r in case_res["results"]:
        if r.get("status") != "ok":
            out.append([r["label"], r["mode"], "-", "-", "-", "-", "-", r.get("note", "")])
            continue
        t = r["timing"]
        note = f"n={t['repeats']}"
        if r.get("correct") is False:
            note = ("WRONG OUTPUT; " if r["backend"] == "fused" else "differs; ") + note
        if r["backend"] == "chunked":
            diff = "(oracle)"
        elif r.get("max_abs_diff"):
            diff = fmt_sci(max(r["max_abs_diff"].values()))
        else:
            diff = "-"
        out.append(
            [
                r["label"],
                r["mode"],
                fmt_float(r["median_ms"]),
                f"{r['tokens_per_s'] / 1e3:.1f}k",
                fmt_float(r["gflops"]),
                f"{100 * r['frac_matmul']:.1f}%",
                diff,
                note,
            ]
        )
    return out


def ratio_lines(case_res: dict) -> list[str]:
    lines = []
    for s in case_res["speedups"]:
        lines.append(f"fused {s['mode']} is {speedup_phrase(s['speedup'])} {s['peer']}")
    if not case_res["fused_correct"]:
        lines.append("fused output MISMATCHES the chunked implementation")
    return lines


def render(report: dict, markdown: bool) -> str:
    meta = report["meta"]
    where = "on the GPU" if meta.get("device") == "cuda" else f"{meta['threads']} threads"
    head = (
        f"linear attention, {meta['machine']['cpu']}, {where}, "
        f"torch {meta['machine']['torch']}; {meta.get('matmul_dtype', 'float32')} matmul "
        f"2048x2048: "
        f"{meta['matmul_gflops']:.1f} GFLOP/s{ceiling_libraries_note(meta.get('matmul', {}))}; "
        f"fused kernels "
        f"{'built' if meta['fused_kernels'] else 'NOT built (public API runs the chunked scan)'}"
    )
    out = header_lines(head, meta["warnings"], markdown)
    for c in report["cases"]:
        title = (
            f"{c['description']}; counted fwd {c['fwd_linear_gflop']:.2f} GFLOP "
            f"(sdpa causal {c['fwd_sdpa_gflop']:.1f})"
        )
        out += render_tables(title, case_rows(c), ratio_lines(c), markdown, HEADERS, ALIGN)
    notes = (
        f"Counted FLOPs per token and head: fwd 2*C*(K+V) + 4*K*V with C={CHUNK}, fwd+bwd "
        f"{LINEAR_FWD_BWD_FACTOR:g}x; sdpa causal fwd T*(K+V), fwd+bwd {SDPA_FWD_BWD_FACTOR:g}x. "
        "% matmul = GFLOP/s / that matmul's GFLOP/s. max|Δ| is against the chunked "
        "implementation: the output, and for fused/naive in fwd+bwd every gradient too. "
        "SDPA is softmax attention (another operation), timed on [B,H,T,D] inputs with the "
        "transposes outside the timed region."
    )
    return report_text(out, notes, markdown)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Benchmark tokenmix's linear-attention scans against their peers."
    )
    add_device_arguments(p, DEFAULT_DTYPES)
    p.add_argument("--T", type=int, help="sequence length (default 8192)")
    p.add_argument(
        "--seq-lens",
        metavar="T1,T2,...",
        help="sweep: run the variant(s) at each of these sequence lengths (instead of --T), "
        "e.g. --seq-lens 2048,4096,8192,16384",
    )
    p.add_argument(
        "--variant",
        metavar="V1,V2,...",
        help=f"comma list of variants, of {', '.join(VARIANTS)} (default simple_gla)",
    )
    p.add_argument("--all", action="store_true", help="every variant at --T")
    add_size_arguments(p, "--dim", "K = V head dim")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    add_mode_arguments(p)
    p.add_argument(
        "--backends",
        help=f"comma list of {', '.join(BACKENDS)} (default: all; on the CPU all but fla-triton)",
    )
    p.add_argument(
        "--naive-max-t",
        type=int,
        default=2048,
        help="longest T for the per-token recurrences (ours and fla's GLA; default 2048)",
    )
    add_timing_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    add_output_arguments(p)
    add_plot_argument(p)
    args = p.parse_args(argv)
    if args.plot:
        require_matplotlib("bench_linear.py")
    args.dtype = args.dtype or DEFAULT_DTYPES[args.device]
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_linear.py: --device cuda needs a CUDA device that torch can use")

    try:
        import tokenmix.linear_scan as ls
    except Exception as exc:
        sys.exit(
            f"bench_linear.py: cannot import tokenmix.linear_scan ({type(exc).__name__}: "
            f"{exc}).\nBuild and install tokenmix first (pip install --no-build-isolation . "
            "from the repository root), or put python/ on PYTHONPATH."
        )
    default_backends = BACKENDS if args.device == "cuda" else CPU_BACKENDS
    backends = tuple(b for b in (args.backends or ",".join(default_backends)).split(",") if b)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        sys.exit(f"unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    modes = selected_modes(args)

    if args.T is None and args.seq_lens is None and args.variant is None and not args.all:
        plan = [
            (v, t, tuple(m for m in ms if m in modes), tuple(b for b in bs if b in backends))
            for v, t, ms, bs in DEFAULT_PLAN
        ]
    else:
        seqs = parse_int_list(args.seq_lens, "--seq-lens") if args.seq_lens else [args.T or 8192]
        variants = list(VARIANTS) if args.all else (args.variant or "simple_gla").split(",")
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
        plan = [(v, seq, modes, backends) for v in variants for seq in seqs]
    plan = [(v, t, ms, bs) for v, t, ms, bs in plan if ms and bs]
    if any(t < 1 for _, t, _, _ in plan) or min(args.batch, args.heads, args.dim) < 1:
        sys.exit("--T, --batch, --heads and --dim must be >= 1")

    # The same-run matmul ceiling with its quietness warnings, as in every benchmark.
    # The ceiling's dtype: the inputs' on the GPU; float32 on the CPU (CPU half-precision
    # matmuls are emulated and would take minutes).
    ceiling_dtype = args.dtype if args.device == "cuda" else "float32"
    ceiling = RunCeiling(args.threads, 2048, DTYPES[ceiling_dtype], ceiling_dtype, args.device)
    args._matmul_gflops = ceiling.start()

    total = sum(len(ms) * len(bs) for _, _, ms, bs in plan)
    counter = [0]
    cases = []
    for variant, seq, ms, bs in plan:
        case = Case(variant, seq, args.batch, args.heads, args.dim, args.dtype)
        cases.append(run_case(case, ms, bs, args, counter, total))

    # Measured again at the end; the higher of the two is the ceiling (the % matmul column
    # is redone), and a change of more than 15% is a warning.
    ceiling.finish(cases)
    report = {
        "meta": {
            "machine": machine_info(args.threads),
            "threads": args.threads,
            "device": args.device,
            "dtype": args.dtype,
            "matmul_gflops": ceiling.gflops,
            "matmul_dtype": ceiling_dtype,
            "matmul": ceiling.meta(),
            "fused_kernels": ls.fused_kernels_available(),
            "chunk_for_flops": CHUNK,
            "fwd_bwd_factor": {"linear": LINEAR_FWD_BWD_FACTOR, "sdpa": SDPA_FWD_BWD_FACTOR},
            "warnings": ceiling.warnings,
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        },
        "cases": cases,
    }
    print(render(report, args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        points = sweep_points(
            cases, x=lambda c: c["seq"], series=lambda c: c["variant"], labels=LABELS
        )
        title = (
            f"linear attention: {report['meta']['machine']['cpu']}, {args.threads} threads; "
            f"{args.device} {args.dtype}, B={args.batch} H={args.heads} K=V={args.dim}, "
            f"torch {torch.__version__}"
        )
        plot_sweep(args.plot, points, title=title, subject="fused")
        log(f"wrote {args.plot}")
    return 0 if all(c["fused_correct"] for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
