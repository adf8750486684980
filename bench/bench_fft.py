#!/usr/bin/env python
"""FFT token mixing on CPU: tokenmix's fused kernels against the ``torch.fft`` compositions.

For every case, on the same seeded inputs (float32 by default), this times two backends

* ``tokenmix``: the public functions ``tokenmix.fft_conv``, ``tokenmix.global_filter``,
  ``tokenmix.fourier_mix`` and ``tokenmix.spectral_gate`` on CPU tensors, i.e. the fused C++
  kernels (the header says when they are not built and the public API runs the composition),
* ``composite``: the plain ``torch.fft`` compositions of ``tokenmix.fft_mix.reference``
  (``fft_conv_reference`` and so on), what a user writes without tokenmix,

in forward and forward+backward mode (fwd+bwd: every floating input requires grad, then
``out.backward(dout)`` with a fixed random ``dout``; the gradients are cleared outside the
timed region). Every (case, backend, mode) runs in a fresh worker process (this script
re-invoked with ``--worker``, bench/harness.py), which reports the median time, the peak
extra memory of one call and its outputs. Per row: median ms, counted GFLOP/s, that
throughput as a fraction of the same run's fp32 matmul throughput (2048 x 2048, measured at
the start and the end, the higher one used: ``harness.RunCeiling``), peak MiB, tokenmix's
speedup and the max relative difference of every output and gradient against the composite
(``max|x - composite| / max|composite|`` per tensor; above 1e-4 in float32 the row is marked
WRONG OUTPUT and the exit status is 1). Under each case: "tokenmix fwd+bwd is 2.6x faster
than composite; peak memory 0.2x" (tokenmix's peak over the composite's); after the tables,
the issue's bars with a PASS/FAIL verdict, for the cases that ran:

* conv-16k fwd+bwd: tokenmix at least 2x faster than the composite, and its peak extra
  memory at most half of the composite's;
* gfnet-s fwd+bwd: tokenmix at least 1.5x faster than the composite.

Cases (B batch, L tokens, C channels; ``--quick`` scales them down):

* ``conv-1k``, ``conv-4k``, ``conv-16k``, ``conv-64k``: causal ``fft_conv`` of ``u [1, L, 768]``
  with ``k [768, L] / L`` (Lk = L), L = 1024, 4096, 16384, 65536 (quick: L / 16, C = 128);
* ``gfnet-s``: ``global_filter`` of ``x [8, 56, 56, 384]`` with the real weight
  ``[56, 29, 384, 2] * 0.02`` (quick: B = 2, C = 64);
* ``fnet``: ``fourier_mix`` of ``x [8, 512, 768]`` (quick: ``[2, 128, 64]``);
* ``spectral``: ``spectral_gate`` of ``x [8, 1024, 768]``, 12 heads, modReLU, the complex gate
  as real ``[8, 12, 513, 2]`` and the bias ``[12, 513] * 0.1`` (quick: B = 2, L = 256, C = 64,
  4 heads).

Counted FLOPs (a convention, the same for both backends, so GFLOP/s compare like times
do): a real transform of length N counts ``2.5 * N * log2(N)`` per channel, a 2-D
transform of H x W ``2.5 * H * W * log2(H * W)`` per channel; the pointwise products are
not counted. The transforms counted are

    fft_conv       fwd  C * (2B + 1) of length n   (u per batch entry, k once, one inverse
                                                     per batch entry)
                   fwd+bwd  C * (4B + 2)            (+ dy's transform and dv's inverse per
                                                     batch entry, and dk's inverse)
    global_filter  fwd  2 * B * C of H x W          (forward and inverse); fwd+bwd 4 * B * C
    fourier_mix    fwd  B of L x C (one 2-D transform per batch entry); fwd+bwd 2 * B
    spectral_gate  fwd  2 * B * C of length L;       fwd+bwd 4 * B * C

where n, the transform length of a causal fft_conv, is the smallest even ``2^a 3^b 5^c >=
L + Lk - 1`` (the fused kernel's padded length; 32768 at L = Lk = 16384; a circular
convolution would use n = L).

    python bench/bench_fft.py                   # all cases, both modes (about 3 min on 2 cores)
    python bench/bench_fft.py --case conv-16k,gfnet-s --backward
    python bench/bench_fft.py --case conv       # the four fft_conv lengths
    python bench/bench_fft.py --quick           # scaled-down shapes, short timing (make demo)
    python bench/bench_fft.py --markdown --json out.json

Progress goes to stderr, the tables to stdout. ``--device cuda`` runs both backends on the
GPU: there ``fft_conv`` runs tokenmix's CUDA kernels when its transform fits in shared memory
(up to 2048 points: the conv-1k case, and the ``--quick`` conv cases up to L = 1024), and the
other cases run the same ``torch.fft`` compositions through tokenmix's functions
(docs/fft_mixing.md, "CUDA"); on a machine without a usable CUDA device it stops with one line
and exit status 2. See bench/README.md for the harness's timing, memory and
correctness rules.
"""

from __future__ import annotations

import argparse
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

from harness import (
    DTYPES,
    MATMUL_N,
    TOLERANCES,
    BackendRun,
    RunCeiling,
    add_measurement_arguments,
    add_speedups,
    bar_verdict,
    check_correctness,
    check_verdict,
    format_markdown,
    format_table,
    log,
    machine_info,
    measure_row,
    refuse_unusable_cuda,
    render_tables,
    report_header,
    report_text,
    resolve_measurement_arguments,
    run_measurement,
    tokenmix_info,
    worker_main,
    worker_spec,
)
from harness import (  # noqa: E402
    case_footer as harness_case_footer,
)
from harness import (
    result_cells as harness_result_cells,
)

BACKENDS = ("tokenmix", "composite")
LABELS = {"tokenmix": "tokenmix", "composite": "composite (torch.fft)"}
ORACLES = ("composite",)

# name -> the case's sizes (op, batch B, length L (H for gfnet), channels C, width W, heads).
CASES: dict[str, dict] = {
    "conv-1k": dict(op="conv", batch=1, length=1024, channels=768),
    "conv-4k": dict(op="conv", batch=1, length=4096, channels=768),
    "conv-16k": dict(op="conv", batch=1, length=16384, channels=768),
    "conv-64k": dict(op="conv", batch=1, length=65536, channels=768),
    "gfnet-s": dict(op="gfnet", batch=8, length=56, width=56, channels=384),
    "fnet": dict(op="fnet", batch=8, length=512, channels=768),
    "spectral": dict(op="spectral", batch=8, length=1024, channels=768, heads=12),
}
# --quick: the same cases (and names) at smoke-test sizes.
QUICK_CASES: dict[str, dict] = {
    **{
        name: dict(op="conv", batch=1, length=CASES[name]["length"] // 16, channels=128)
        for name in ("conv-1k", "conv-4k", "conv-16k", "conv-64k")
    },
    "gfnet-s": dict(op="gfnet", batch=2, length=56, width=56, channels=64),
    "fnet": dict(op="fnet", batch=2, length=128, channels=64),
    "spectral": dict(op="spectral", batch=2, length=256, channels=64, heads=4),
}
# --case aliases: a family of cases.
CASE_ALIASES = {"conv": [n for n in CASES if n.startswith("conv-")]}

# The bars: (case, what, needed speedup, largest tokenmix / composite peak memory or
# None), all in fwd+bwd mode.
BARS = (
    ("conv-16k", "fwd+bwd >= 2x faster than composite, peak memory <= 0.5x", 2.0, 0.5),
    ("gfnet-s", "fwd+bwd >= 1.5x faster than composite", 1.5, None),
)
BAR_MODE = "fwd+bwd"


# ---------------------------------------------------------------------------
# Cases and counted FLOPs
# ---------------------------------------------------------------------------


def is_smooth(n: int) -> bool:
    """Whether ``n`` has no prime factor above 5."""
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


def conv_transform_length(length: int, filter_length: int, causal: bool = True) -> int:
    """The transform length of ``fft_conv``: the smallest even ``2^a 3^b 5^c >= L + Lk - 1``
    for a causal (linear) convolution, ``L`` for a circular one (the rule of
    csrc/include/tokenmix/fft_problem.h)."""
    if not causal:
        return length
    n = max(2, length + filter_length - 1)
    n += n % 2
    while not is_smooth(n):
        n += 2
    return n


def transform_flops(n: int) -> float:
    """Counted FLOPs of one real transform of length ``n`` (per channel): ``2.5 n log2 n``;
    a 2-D transform of H x W counts ``transform_flops(H * W)``."""
    return 2.5 * n * math.log2(n) if n > 1 else 0.0


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # conv (fft_conv), gfnet (global_filter), fnet (fourier_mix), spectral (spectral_gate)
    batch: int
    length: int  # L tokens (gfnet: the grid's height H)
    channels: int
    width: int = 0  # gfnet: the grid's width W
    heads: int = 0  # spectral: gate heads
    dtype: str = "float32"

    @property
    def tokens(self) -> int:
        return self.batch * self.length * (self.width if self.op == "gfnet" else 1)

    @property
    def transform_length(self) -> int:
        """Points of one counted transform: n for fft_conv, H*W for global_filter, L*C for
        fourier_mix, L for spectral_gate."""
        if self.op == "conv":
            return conv_transform_length(self.length, self.length)
        if self.op == "gfnet":
            return self.length * self.width
        if self.op == "fnet":
            return self.length * self.channels
        return self.length

    def transforms(self, mode: str) -> int:
        """Transforms counted in ``mode`` (see the module docstring)."""
        b, c = self.batch, self.channels
        fwd = {"conv": c * (2 * b + 1), "gfnet": 2 * b * c, "fnet": b, "spectral": 2 * b * c}
        return fwd[self.op] * (2 if mode == "fwd+bwd" else 1)

    def flops(self, mode: str) -> float:
        """Counted FLOPs of one call in ``mode``."""
        return self.transforms(mode) * transform_flops(self.transform_length)

    def describe(self) -> str:
        b, ell, c = self.batch, self.length, self.channels
        if self.op == "conv":
            n = self.transform_length
            return f"fft_conv causal, u [{b}, {ell}, {c}], k [{c}, {ell}], n={n}, {self.dtype}"
        if self.op == "gfnet":
            w = self.width
            return (
                f"global_filter, x [{b}, {ell}, {w}, {c}], weight [{ell}, {w // 2 + 1}, {c}, 2], "
                f"{self.dtype}"
            )
        if self.op == "fnet":
            return f"fourier_mix, x [{b}, {ell}, {c}], {self.dtype}"
        f = ell // 2 + 1
        return (
            f"spectral_gate modrelu, x [{b}, {ell}, {c}], heads={self.heads}, gate "
            f"[{b}, {self.heads}, {f}, 2], bias [{self.heads}, {f}], {self.dtype}"
        )


def select_cases(text: str, quick: bool, dtype: str) -> list[Case]:
    """The cases ``--case`` names (a comma list of names, ``conv`` or ``all``), in the order
    of :data:`CASES`, at the ``--quick`` sizes when asked."""
    names: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item == "all":
            names.extend(CASES)
        elif item in CASES:
            names.append(item)
        elif item in CASE_ALIASES:
            names.extend(CASE_ALIASES[item])
        else:
            known = ", ".join([*CASES, *CASE_ALIASES, "all"])
            raise SystemExit(f"unknown case {item!r}; known: {known}")
    if not names:
        raise SystemExit("--case: no case given")
    sizes = QUICK_CASES if quick else CASES
    return [Case(name, **sizes[name], dtype=dtype) for name in CASES if name in names]


# ---------------------------------------------------------------------------
# Worker side: one backend, one mode, in a fresh process
# ---------------------------------------------------------------------------


def make_inputs(case: Case, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The inputs of ``case`` in the order its function takes them, and the output gradient
    ``dout``; identical in every process (drawn in float32 from one generator seeded with
    ``seed`` on the CPU, then moved to ``device``). The data (``u``, ``x``, ``dout``) is in the
    case's dtype, the parameters (``k``, ``weight``, ``gate``, ``bias``) in float32."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]

    def randn(*shape: int, scale: float = 1.0, data: bool = False) -> torch.Tensor:
        t = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
        return t.to(device=device, dtype=dtype if data else torch.float32)

    b, ell, c = case.batch, case.length, case.channels
    if case.op == "conv":
        out = {"u": randn(b, ell, c, data=True), "k": randn(c, ell, scale=1.0 / ell)}
        shape = (b, ell, c)
    elif case.op == "gfnet":
        w = case.width
        out = {
            "x": randn(b, ell, w, c, data=True),
            "weight": randn(ell, w // 2 + 1, c, 2, scale=0.02),
        }
        shape = (b, ell, w, c)
    elif case.op == "fnet":
        out = {"x": randn(b, ell, c, data=True)}
        shape = (b, ell, c)
    else:
        f = ell // 2 + 1
        out = {
            "x": randn(b, ell, c, data=True),
            "gate": randn(b, case.heads, f, 2),
            "bias": randn(case.heads, f, scale=0.1),
        }
        shape = (b, ell, c)
    out["dout"] = randn(*shape, data=True)
    return out


def backend_function(case: Case, backend: str) -> Callable[..., torch.Tensor]:
    """The function ``backend`` times for ``case``, called with the inputs of
    :func:`make_inputs` (without ``dout``) in their order."""
    import tokenmix
    from tokenmix.fft_mix import reference

    if case.op == "conv":
        fn = tokenmix.fft_conv if backend == "tokenmix" else reference.fft_conv_reference
        return lambda u, k: fn(u, k, causal=True)
    if case.op == "gfnet":
        return (
            tokenmix.global_filter if backend == "tokenmix" else reference.global_filter_reference
        )
    if case.op == "fnet":
        return tokenmix.fourier_mix if backend == "tokenmix" else reference.fourier_mix_reference
    fn = tokenmix.spectral_gate if backend == "tokenmix" else reference.spectral_gate_reference
    heads = case.heads
    return lambda x, gate, bias: fn(x, gate, heads=heads, activation="modrelu", bias=bias)


def build(case: Case, backend: str, inputs: dict[str, torch.Tensor], backward: bool) -> BackendRun:
    """``backend`` on ``inputs`` as a :class:`harness.BackendRun`. Forward mode calls it on
    tensors that do not require grad; fwd+bwd mode on leaves that all do, then
    ``out.backward(dout)``, with ``.grad`` cleared before each call (outside the timing);
    ``collect`` returns ``out`` and, in fwd+bwd mode, ``d<name>`` for every input."""
    fn = backend_function(case, backend)
    dout = inputs["dout"]
    leaves = {
        name: t.detach().requires_grad_(backward) for name, t in inputs.items() if name != "dout"
    }
    args = tuple(leaves.values())
    if not backward:
        return BackendRun(lambda: fn(*args), None, lambda out: {"out": out})

    def call():
        out = fn(*args)
        out.backward(dout)
        return out

    def setup():
        for t in args:
            t.grad = None

    def collect(out):
        return {"out": out.detach(), **{f"d{name}": t.grad for name, t in leaves.items()}}

    return BackendRun(call, setup, collect)


def run_worker(spec: dict) -> dict:
    """One measurement (:func:`harness.run_measurement`) of ``spec["backend"]`` on
    ``spec["case"]`` in ``spec["mode"]``."""
    case = Case(**spec["case"])
    device = spec.get("device", "cpu")
    return run_measurement(
        spec,
        lambda: make_inputs(case, spec["seed"], device),
        lambda inputs: build(case, spec["backend"], inputs, spec["mode"] == "fwd+bwd"),
    )


# ---------------------------------------------------------------------------
# Parent side: the run, correctness, ratios, bars
# ---------------------------------------------------------------------------


def composite_scales(rows: list[dict], modes: list[str]) -> dict[str, dict[str, float]]:
    """``max|composite|`` per saved tensor and mode, read from the composite's saved outputs
    (before :func:`harness.check_correctness` consumes them): the denominators of the
    relative differences."""
    scale: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["backend"] == "composite" and r.get("status") == "ok" and r["mode"] in modes:
            saved = torch.load(r["save_path"])
            scale[r["mode"]] = {k: float(v.float().abs().max()) for k, v in saved.items()}
    return scale


def relative(diffs: dict[str, float], scale: dict[str, float]) -> dict[str, float]:
    """``max|x - composite| / max|composite|`` per tensor (the absolute difference where the
    composite is all zeros)."""
    return {k: d / scale[k] if scale.get(k) else d for k, d in diffs.items()}


def memory_ratios(rows: list[dict], modes: list[str]) -> dict[str, float]:
    """tokenmix's peak extra memory over the composite's, per mode where both were measured
    and the composite's is positive; stored on the tokenmix rows as ``peak_ratio``."""
    ratios = {}
    for mode in modes:
        by = {r["backend"]: r for r in rows if r["mode"] == mode}
        tm, comp = by.get("tokenmix"), by.get("composite")
        if tm is None or comp is None:
            continue
        a, b = tm.get("peak_mib"), comp.get("peak_mib")
        if a is None or b is None or b <= 0:
            continue
        tm["peak_ratio"] = ratios[mode] = a / b
    return ratios


def run_case(case: Case, args, backends: list[str], modes: list[str], progress: dict) -> dict:
    """Every backend and mode of ``case``, each in a worker; the rows' correctness against the
    composite (relative to each tensor's max), speedups and peak-memory ratios."""
    rows = []
    for backend in backends:
        for mode in modes:
            progress["done"] += 1
            tag = f"[{progress['done']}/{progress['total']}] {case.name} {LABELS[backend]} {mode}"
            row = {"backend": backend, "label": LABELS[backend], "mode": mode}
            spec = worker_spec(
                args,
                case=asdict(case),
                backend=backend,
                mode=mode,
                save_path=os.path.join(progress["tmpdir"], f"{case.name}-{backend}-{mode}.pt"),
            )
            measure_row(
                row,
                spec,
                script=__file__,
                tag=tag,
                flops=case.flops(mode),
                matmul_gflops=args.matmul_gflops,
                timeout_s=args.worker_timeout,
                verbose=args.verbose,
            )
            rows.append(row)
    rtol = TOLERANCES[case.dtype][1]
    scale = composite_scales(rows, modes)
    # |x - composite| <= rtol * max|composite| per tensor: atol 0, the bound is relative.
    correctness = check_correctness(rows, modes, ORACLES, 0.0, rtol)
    for mode, entries in correctness.items():
        for entry in entries.values():
            entry["max_rel_diff"] = relative(entry["max_abs_diff"], scale.get(mode, {}))
    for r in rows:
        if "max_abs_diff" in r:
            r["max_rel_diff"] = relative(r["max_abs_diff"], scale.get(r["mode"], {}))
    speedups = add_speedups(rows, modes)
    return {
        "case": asdict(case),
        "name": case.name,
        "description": case.describe(),
        "tokens": case.tokens,
        "transform_length": case.transform_length,
        "flops": {mode: case.flops(mode) for mode in ("fwd", "fwd+bwd")},
        "transforms": {mode: case.transforms(mode) for mode in ("fwd", "fwd+bwd")},
        "rel_tol": rtol,
        "results": rows,
        "correctness": correctness,
        "speedups": speedups,
        "peak_ratios": memory_ratios(rows, modes),
    }


def evaluate_bars(cases: list[dict]) -> list[dict]:
    """The bars of :data:`BARS` whose case ran: one check per condition (the fwd+bwd speedup
    over the composite, and for conv-16k the peak-memory ratio) with the measured value and
    PASS / FAIL / NOT MEASURED, and the bar's verdict (:func:`harness.bar_verdict`: PASS when
    every check passes, FAIL when one fails). A wrong tokenmix output fails every check."""
    by_name = {c["name"]: c for c in cases}
    bars = []
    for name, text, need_speedup, max_memory in BARS:
        c = by_name.get(name)
        if c is None:
            continue
        rows = {r["backend"]: r for r in c["results"] if r["mode"] == BAR_MODE}
        tm, comp = rows.get("tokenmix"), rows.get("composite")
        wrong = bool(tm and tm.get("correct") is False)
        missing = None
        for who, r in (("tokenmix", tm), ("composite", comp)):
            if r is None or "median_ms" not in r:
                why = r.get("note", "not run") if r else "not run"
                missing = missing or f"NOT MEASURED ({LABELS[who]} {BAR_MODE}: {why})"
        checks = []
        speed = {"what": "speedup", "needs": f">= {need_speedup:.2f}x", "measured": None}
        if missing:
            speed["verdict"] = missing
        else:
            value = comp["tokenmix_speedup"]
            speed.update(measured=f"{value:.2f}x", value=value)
            speed["verdict"] = check_verdict(value, need_speedup, wrong=wrong)
        checks.append(speed)
        if max_memory is not None:
            mem = {"what": "peak memory", "needs": f"<= {max_memory:.2f}x", "measured": None}
            ratio = tm.get("peak_ratio") if tm else None
            if missing:
                mem["verdict"] = missing
            elif ratio is None:
                mem["verdict"] = "NOT MEASURED (no positive composite peak memory)"
            else:
                mem.update(measured=f"{ratio:.2f}x", value=ratio)
                # At most max_memory: the check's value is max_memory / ratio >= 1.
                mem["verdict"] = check_verdict(
                    max_memory / ratio if ratio > 0 else math.inf, 1.0, wrong=wrong
                )
            checks.append(mem)
        bars.append(
            {
                "case": name,
                "mode": BAR_MODE,
                "bar": text,
                "checks": checks,
                "verdict": bar_verdict(checks),
            }
        )
    return bars


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

HEADERS = (
    "backend",
    "mode",
    "median ms",
    "GFLOP/s",
    "% matmul",
    "peak MiB",
    "tokenmix speedup",
    "max rel diff",
    "note",
)
ALIGN = "llrrrrrrl"


def result_cells(r: dict) -> list[str]:
    """One table row (:data:`HEADERS`) of a result row: the harness's, with relative differences
    and no mask-memory column."""
    return harness_result_cells(r, ORACLES, diff_key="max_rel_diff", aux_column=False)


def case_footer(c: dict) -> list[str]:
    """Under a case's table: tokenmix's correctness per mode (relative differences), and its
    speedup and peak-memory ratio over the composite per mode."""

    def memory(mode: str) -> str:
        ratio = c["peak_ratios"].get(mode)
        return "" if ratio is None else f"; peak memory {ratio:.2f}x"

    labels = {"composite": "composite", "tokenmix": "tokenmix"}
    return harness_case_footer(c, labels, relative_tol=c["rel_tol"], mode_suffix=memory)


BAR_HEADERS = ("case", "mode", "check", "measured", "needs", "verdict")


def render_bars(bars: list[dict], markdown: bool, quick: bool) -> list[str]:
    """The bars' table (one row per check) and one verdict line per bar."""
    rows = [
        [b["case"], b["mode"], ch["what"], ch["measured"] or "-", ch["needs"], ch["verdict"]]
        for b in bars
        for ch in b["checks"]
    ]
    head = "Bars"
    if quick:
        head += " -- quick run: scaled-down shapes, the bars are defined on the full run"
    out = [f"### {head}" if markdown else f"== {head}"]
    if markdown:
        out.append("")
    out.append((format_markdown if markdown else format_table)(BAR_HEADERS, rows, "lllrrl"))
    if markdown:
        out.append("")
    for b in bars:
        line = f"{b['case']}: tokenmix {b['bar']}: {b['verdict']}"
        out.append(f"- {line}" if markdown else f"  {line}")
    out.append("")
    return out


def render(report: dict, markdown: bool) -> str:
    meta = report["meta"]
    out = report_header(meta, "FFT mixing", markdown)
    line = None
    if meta["device"] != "cpu":
        line = "tokenmix's FFT mixing has no fused kernels off the CPU: its rows run the composite"
    elif not meta["tokenmix"].get("fused_kernels"):
        line = "tokenmix's fused FFT kernels are NOT built: the tokenmix rows run the composite"
    if line is not None:
        out.insert(1, f"> **Warning:** {line}" if markdown else f"WARNING: {line}")
    for c in report["cases"]:
        title = (
            f"{c['name']}: {c['description']}; counted fwd {c['flops']['fwd'] / 1e9:.3f} GFLOP "
            f"({c['transforms']['fwd']} transforms of {c['transform_length']} points)"
        )
        rows = [result_cells(r) for r in c["results"]]
        out += render_tables(title, rows, case_footer(c), markdown, HEADERS, ALIGN)
    if report["bars"]:
        out += render_bars(report["bars"], markdown, meta["args"]["quick"])
    notes = (
        "Counted FLOPs: 2.5*N*log2(N) per real transform of N points and channel (a 2-D "
        "transform of H x W: N = H*W), the same count for both backends; fwd+bwd counts twice "
        "the forward's transforms. % matmul = GFLOP/s / the same run's fp32 matmul GFLOP/s. "
        "peak MiB = RSS growth during one call over the RSS after setup (fresh process per "
        "row), outputs and gradients included; peak memory in the ratio lines = tokenmix's "
        "peak / the composite's. max rel diff = max over the output (and in fwd+bwd every "
        "input's gradient) of max|x - composite| / max|composite|. See bench/README.md."
    )
    return report_text(out, notes, markdown)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Benchmark tokenmix's fused FFT-mixing kernels against the torch.fft "
        "compositions."
    )
    p.add_argument(
        "--case",
        default="all",
        help=f"comma list of {', '.join(CASES)} / conv / all (default all)",
    )
    add_measurement_arguments(p, BACKENDS)
    # float32 on every device (the harness's CUDA default, float16, is the attention kernels').
    p.set_defaults(dtype="float32")
    for action in p._actions:
        if action.dest == "dtype":
            action.help = "default float32"
    return p


def check_tokenmix() -> dict:
    """Import tokenmix or exit with a clear message; say whether the fused kernels are built."""
    info = tokenmix_info("bench_fft.py", "fft_conv")
    from tokenmix.fft_mix import fused_kernels_available

    info["fused_kernels"] = bool(fused_kernels_available())
    return info


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker, run_worker)
    if args.device == "cuda":
        # One clear line instead of a traceback from the first CUDA call.
        refused = refuse_unusable_cuda("bench_fft.py")
        if refused is not None:
            return refused
    backends, modes = resolve_measurement_arguments(args, BACKENDS)
    cases = select_cases(args.case, args.quick, args.dtype)
    tm_info = check_tokenmix()

    t_start = time.perf_counter()
    ceiling = RunCeiling(
        args.threads, MATMUL_N[args.device], DTYPES[args.dtype], args.dtype, args.device
    )
    args.matmul_gflops = ceiling.start()
    progress = {"done": 0, "total": len(cases) * len(backends) * len(modes)}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_fft_") as progress["tmpdir"]:
        for case in cases:
            results.append(run_case(case, args, backends, modes, progress))
    # Measured again at the end: the higher median is the ceiling; % matmul is redone.
    ceiling.finish(results)
    report = {
        "meta": {
            "machine": machine_info(args.threads, args.device),
            "device": args.device,
            "threads": args.threads,
            "dtype": args.dtype,
            "tokenmix": tm_info,
            "matmul": ceiling.meta(),
            "flops": {
                "transform": "2.5 * N * log2(N) per channel (2-D: N = H * W)",
                "fft_conv": "fwd C*(2B+1), fwd+bwd C*(4B+2) transforms of n",
                "global_filter": "fwd 2*B*C, fwd+bwd 4*B*C 2-D transforms of H x W",
                "fourier_mix": "fwd B, fwd+bwd 2*B 2-D transforms of L x C",
                "spectral_gate": "fwd 2*B*C, fwd+bwd 4*B*C transforms of L",
            },
            "warnings": ceiling.warnings,
            "cpu_busy_at_start": ceiling.busy_start,
            "args": {k: v for k, v in vars(args).items() if k != "worker"},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_s": time.perf_counter() - t_start,
        },
        "cases": results,
        "bars": evaluate_bars(results),
    }
    log(f"done in {report['meta']['wall_s']:.0f} s")
    print(render(report, args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {args.json}")

    wrong = [
        (c["name"], m)
        for c in results
        for m, entries in c["correctness"].items()
        if "tokenmix" in entries and not entries["tokenmix"]["ok"]
    ]
    if wrong:
        log(f"ERROR: tokenmix output mismatches the composite in {wrong}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
