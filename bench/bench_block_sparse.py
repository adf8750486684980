#!/usr/bin/env python
"""Block-sparse attention on the CPU (or a CUDA GPU): tokenmix against its peers.

For three mask patterns, each at BLOCK_SIZE 64 and 128, on the same random inputs
(fp32, B=1, H=4, D=64, T=8192 by default), this times

* ``tokenmix.block_sparse_attention`` on heads-last ``[B, T, H, D]`` tensors with a
  ``tokenmix.BlockLayout`` built once, outside the timed region (from the same Flex
  ``BlockMask``, or from the structured ``ElementMask`` where that is the natural
  description),
* ``flex_attention`` compiled with ``torch.compile``, with the ``BlockMask`` from
  ``create_block_mask`` (forward only on the CPU: FlexAttention has no CPU backward),
* ``torch.nn.functional.scaled_dot_product_attention`` with the dense boolean mask,

in forward and forward+backward mode, and reports the median time, useful GFLOP/s
(exact kept pairs), that throughput as a fraction of the same run's fp32 matmul
throughput, the peak memory of one call, the max abs difference of every output
against SDPA, the speedup of tokenmix over each peer, and the bars of issue 10
(section 4) with PASS/FAIL. Every (case, backend, mode) runs in a fresh subprocess
(this script re-invoked with ``--worker``). See bench/README.md.

    python bench/bench_block_sparse.py                     # all patterns, both block sizes
    python bench/bench_block_sparse.py --case random --block-size 64
    python bench/bench_block_sparse.py --quick --json out.json --markdown
    python bench/bench_block_sparse.py --device cuda       # on the GPU (float16 by default)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    BLOCK_MASK_LISTS,
    DTYPES,
    FWD_BWD_FLOP_FACTOR,
    BackendRun,
    BenchmarkRun,
    add_measurement_arguments,
    add_size_arguments,
    autograd_run,
    benchmark_main,
    check_flex_mode,
    compiled_flex_run,
    format_markdown,
    format_table,
    log,
    peer_skip_reason,
    render_case,
    report_header,
    report_text,
    sdpa_run,
    tensor_bytes,
    tokenmix_info,
)

PATTERNS = ("sliding", "random", "document")
BLOCK_SIZES = (64, 128)
# Problem sizes: the configuration, and --quick's scaled-down one.
FULL_SIZES = {"seq_len": 8192, "window": 1024}
QUICK_SIZES = {"seq_len": 1024, "window": 256}

BACKENDS = ("tokenmix", "flex", "sdpa", "reference")
DEFAULT_BACKENDS = ("tokenmix", "flex", "sdpa")
LABELS = {
    "tokenmix": "tokenmix",
    "flex": "flex (compiled)",
    "sdpa": "sdpa+mask",
    "reference": "tokenmix reference",
}
# Oracles for the correctness check, in order of preference.
ORACLES = ("sdpa", "reference", "flex")

# Rows of the dense mask evaluated at once (bounds the index temporaries).
MASK_CHUNK_ROWS = 512


# ---------------------------------------------------------------------------
# Cases and their masks
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    pattern: str
    block_size: int
    seq_len: int
    window: int = 1024  # sliding: keys q - window < k <= q ...
    sinks: int = 64  # ... and the first `sinks` keys (k <= q)
    density: float = 0.1  # random: fraction of pattern blocks kept per block row
    pattern_block: int = 64  # random: the pattern's block size
    documents: int = 8  # document: number of documents
    pattern_seed: int = 0
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, d: dict) -> Case:
        return cls(**d)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """Shape of q, k, v and the output gradient: heads-last ``[B, T, H, D]``."""
        return (self.batch, self.seq_len, self.heads, self.head_dim)

    @property
    def mask_heads(self) -> int:
        """Heads of the mask: the random pattern differs per head, the others broadcast."""
        return self.heads if self.pattern == "random" else 1

    @property
    def pattern_blocks(self) -> int:
        return math.ceil(self.seq_len / self.pattern_block)

    @property
    def blocks_per_row(self) -> int:
        """random: kept pattern blocks per block row (the same count in every row)."""
        return max(1, round(self.density * self.pattern_blocks))

    def describe(self) -> str:
        if self.pattern == "sliding":
            what = (
                f"causal sliding window {self.window} + {self.sinks} sink tokens "
                f"(k <= q and (q - k < {self.window} or k < {self.sinks}))"
            )
        elif self.pattern == "random":
            pb, n = self.pattern_block, self.pattern_blocks
            what = (
                f"random {pb}x{pb} blocks, {self.blocks_per_row} of {n} per block row "
                f"({100 * self.blocks_per_row / n:.1f}%), drawn per head (seed "
                f"{self.pattern_seed})"
            )
            if self.block_size % pb == 0 and self.block_size > pb:
                what += f", as partial {self.block_size}-blocks"
        else:
            what = (
                f"{self.documents} documents (random boundaries, seed {self.pattern_seed}), "
                "non-causal within each"
            )
        return (
            f"{what}; BLOCK_SIZE {self.block_size}; T={self.seq_len} B={self.batch} "
            f"H={self.heads} D={self.head_dim} {self.dtype}"
        )


def pattern_data(case: Case) -> dict[str, torch.Tensor]:
    """The seeded tensors behind a pattern: ``table`` (random: bool ``[H, n, n]`` over the
    pattern's blocks) or ``doc`` (document: int64 ``[T]`` document id per token)."""
    gen = torch.Generator().manual_seed(case.pattern_seed)
    if case.pattern == "random":
        n = case.pattern_blocks
        draws = torch.rand(case.heads, n, n, generator=gen)
        keep = draws.topk(case.blocks_per_row, dim=-1).indices
        table = torch.zeros(case.heads, n, n, dtype=torch.bool)
        table.scatter_(-1, keep, True)
        return {"table": table}
    if case.pattern == "document":
        t = case.seq_len
        cuts = torch.randperm(t - 1, generator=gen)[: case.documents - 1].sort().values + 1
        starts = torch.zeros(t, dtype=torch.int64)
        starts[cuts] = 1
        return {"doc": starts.cumsum(0)}
    return {}


def make_mask_mod(case: Case, data: dict[str, torch.Tensor]) -> Callable:
    """The pattern as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``; it is also what the
    dense SDPA mask and the kept-pair count are evaluated from."""
    if case.pattern == "sliding":
        window, sinks = case.window, case.sinks

        def sliding_window_sinks(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sinks))

        return sliding_window_sinks
    if case.pattern == "random":
        table, pb = data["table"], case.pattern_block

        def random_blocks(b, h, q_idx, kv_idx):
            return table[h, q_idx // pb, kv_idx // pb]

        return random_blocks
    doc = data["doc"]

    def same_document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    return same_document


def mask_rows(case: Case, data: dict[str, torch.Tensor]):
    """Yields ``(head, q0, rows)``: the dense bool mask ``[n, T]`` of query rows ``q0..``
    of each mask head, evaluated from the ``mask_mod`` in chunks."""
    mask_mod = make_mask_mod(case, data)
    t = case.seq_len
    keys = torch.arange(t).view(1, t)
    b = torch.zeros((), dtype=torch.int64)
    for h in range(case.mask_heads):
        hh = torch.tensor(h)
        for q0 in range(0, t, MASK_CHUNK_ROWS):
            q = torch.arange(q0, min(q0 + MASK_CHUNK_ROWS, t)).view(-1, 1)
            yield h, q0, torch.broadcast_to(mask_mod(b, hh, q, keys), (q.shape[0], t))


def dense_mask(case: Case, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[1, mask_heads, T, T]`` bool: what SDPA gets."""
    t = case.seq_len
    out = torch.empty(1, case.mask_heads, t, t, dtype=torch.bool)
    for h, q0, rows in mask_rows(case, data):
        out[0, h, q0 : q0 + rows.shape[0]] = rows
    return out


def kept_pairs(case: Case, data: dict[str, torch.Tensor]) -> int:
    """Exact number of kept (query, key) pairs over all ``B x H`` (the dense mask's
    popcount, counted in chunks)."""
    per_mask = sum(int(rows.sum()) for _, _, rows in mask_rows(case, data))
    return per_mask * case.batch * (case.heads // case.mask_heads)


def forward_flops(case: Case, pairs: int) -> int:
    """Useful forward FLOPs: ``4 * pairs * D`` (QK^T and PV; ``pairs`` over all B x H)."""
    return 4 * pairs * case.head_dim


def create_flex_block_mask(case: Case, data: dict[str, torch.Tensor], device: str = "cpu"):
    """The Flex ``BlockMask`` of a case (``create_block_mask``: full blocks where the
    ``mask_mod`` keeps every element, partial where it keeps some)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mh = case.mask_heads
    return create_block_mask(
        make_mask_mod(case, data),
        None,
        mh if mh > 1 else None,
        case.seq_len,
        case.seq_len,
        device=device,
        BLOCK_SIZE=case.block_size,
    )


def load_block_mask(case: Case, saved: dict, data: dict[str, torch.Tensor], device):
    """The parent's ``create_block_mask`` result, rebuilt from its saved lists (the same
    ``BlockMask``, without re-evaluating the mask in every worker)."""
    from torch.nn.attention.flex_attention import BlockMask

    lists = [saved["block_mask"][name].to(device) for name in BLOCK_MASK_LISTS]
    return BlockMask.from_kv_blocks(
        *lists,
        BLOCK_SIZE=(case.block_size, case.block_size),
        mask_mod=make_mask_mod(case, data),
        seq_lengths=(case.seq_len, case.seq_len),
    )


LAYOUT_SOURCES = {
    "from_block_mask": "BlockLayout.from_block_mask(flex BlockMask): the mask_mod is evaluated "
    "once per partial block into bits",
    "from_element_mask": "BlockLayout.from_element_mask(ElementMask.document(ids)): the "
    "document rule is evaluated in the kernel",
}


def layout_source(case: Case) -> str:
    return "from_element_mask" if case.pattern == "document" else "from_block_mask"


def tokenmix_layout(case: Case, data: dict[str, torch.Tensor], block_mask):
    """The tokenmix ``BlockLayout`` of a case, on the block mask's device: the structured
    document rule for the document mask, the Flex ``BlockMask`` for the others."""
    import tokenmix

    if layout_source(case) == "from_element_mask":
        rule = tokenmix.ElementMask.document(data["doc"])
        return tokenmix.BlockLayout.from_element_mask(
            rule, case.seq_len, case.seq_len, block_size=case.block_size
        )
    return tokenmix.BlockLayout.from_block_mask(block_mask, batch=case.batch, heads=case.heads)


LAYOUT_TENSORS = (
    *BLOCK_MASK_LISTS,
    "mask_bits",
    "q_num_blocks",
    "q_indices",
    "q_slots",
    "full_q_num_blocks",
    "full_q_indices",
)


def layout_bytes(layout) -> int:
    """Bytes held by a tokenmix ``BlockLayout``: its block lists and bits, and the document
    ids of its element mask."""
    return tensor_bytes(layout, LAYOUT_TENSORS) + tensor_bytes(
        layout.element_mask, ("q_doc", "kv_doc")
    )


def block_counts(kv_num_blocks: torch.Tensor, full_kv_num_blocks: torch.Tensor, case: Case):
    """(partial, full) blocks visited over all B x H (broadcast lists counted per head)."""
    scale = case.batch * case.heads // (kv_num_blocks.shape[0] * kv_num_blocks.shape[1])
    return int(kv_num_blocks.sum()) * scale, int(full_kv_num_blocks.sum()) * scale


def sdpa_memory_estimate(case: Case, backward: bool, device: str = "cpu") -> int:
    """Rough bytes SDPA needs beyond the inputs: the bool mask and the additive mask derived
    from it (float32 on the CPU, the input dtype on CUDA), one ``T x T`` probability matrix
    per batch and head (three with the backward), a few input-sized buffers."""
    t = case.seq_len
    elt = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    per_mask = case.mask_heads * t * t * (1 + (elt if device == "cuda" else 4))
    probs = case.batch * case.heads * t * t * 4
    act = case.batch * case.heads * t * case.head_dim * elt
    return (per_mask + probs) * (3 if backward else 1) + 12 * act


# ---------------------------------------------------------------------------
# Worker side: one backend, one mode, in a fresh process
# ---------------------------------------------------------------------------


def _saved_masks(spec: dict, case: Case, device) -> tuple[dict, dict[str, torch.Tensor]]:
    saved = torch.load(spec["masks_path"])
    data = {k: v.to(device) for k, v in saved["data"].items()}
    return saved, data


def _layout_run(fn_name: str, case: Case, spec: dict, inputs, backward: bool) -> BackendRun:
    device = inputs["q"].device
    saved, data = _saved_masks(spec, case, device)
    block_mask = None
    if layout_source(case) == "from_block_mask":
        block_mask = load_block_mask(case, saved, data, device)
    t0 = time.perf_counter()
    layout = tokenmix_layout(case, data, block_mask)
    layout_s = time.perf_counter() - t0
    if fn_name == "tokenmix":
        import tokenmix

        attention = tokenmix.block_sparse_attention
    else:
        from tokenmix.block_sparse import block_sparse_attention_reference as attention

    def fn(q, k, v):
        return attention(q, k, v, layout)

    run = autograd_run(fn, inputs, backward)
    run.aux_bytes = layout_bytes(layout)
    run.info = {"layout": repr(layout), "layout_s": layout_s}
    return run


def build_tokenmix(case: Case, spec: dict, inputs, backward: bool) -> BackendRun:
    return _layout_run("tokenmix", case, spec, inputs, backward)


def build_reference(case: Case, spec: dict, inputs, backward: bool) -> BackendRun:
    return _layout_run("reference", case, spec, inputs, backward)


def build_sdpa(case: Case, spec: dict, inputs, backward: bool) -> BackendRun:
    _, data = _saved_masks(spec, case, "cpu")
    return sdpa_run(dense_mask(case, data), inputs, backward)


def build_flex(case: Case, spec: dict, inputs, backward: bool) -> BackendRun:
    device = inputs["q"].device
    check_flex_mode(backward, device)
    saved, data = _saved_masks(spec, case, device)
    run = compiled_flex_run(load_block_mask(case, saved, data, device), inputs, backward)
    run.aux_bytes += sum(t.numel() * t.element_size() for t in data.values())
    return run


# Backend -> builder (common.Builder), in the order of BACKENDS.
BUILDERS = {
    "tokenmix": build_tokenmix,
    "flex": build_flex,
    "sdpa": build_sdpa,
    "reference": build_reference,
}


# ---------------------------------------------------------------------------
# Parent side: cases, orchestration, bars, output
# ---------------------------------------------------------------------------


def select_cases(args) -> list[Case]:
    patterns = []
    for item in args.case.split(","):
        item = item.strip()
        if item == "all":
            patterns.extend(PATTERNS)
        elif item in PATTERNS:
            patterns.append(item)
        else:
            raise SystemExit(f"unknown case {item!r}; known: {', '.join([*PATTERNS, 'all'])}")
    try:
        sizes = [int(x) for x in args.block_size.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(
            f"--block-size: expected integers like 64,128, got {args.block_size!r}"
        ) from None
    if not sizes or any(s < 1 for s in sizes):
        raise SystemExit(f"--block-size: expected positive integers, got {args.block_size!r}")
    dims = QUICK_SIZES if args.quick else FULL_SIZES
    common = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype)
    return [
        Case(f"{pattern}-bs{bs}", pattern, bs, **dims, **common)
        for pattern in dict.fromkeys(patterns)
        for bs in dict.fromkeys(sizes)
    ]


def check_tokenmix() -> dict:
    """Import tokenmix or exit with a clear message; report whether its build has the
    block-sparse kernels."""
    info = tokenmix_info("bench_block_sparse.py", "block_sparse_attention")
    from tokenmix import _ops

    return {
        **info,
        "library_error": _ops.load_error,
        "kernels": _ops.load_error is None
        and hasattr(torch.ops.tokenmix, "block_sparse_forward")
        and hasattr(torch.ops.tokenmix, "block_sparse_backward"),
    }


def skip_reason(
    case: Case, backend: str, mode: str, tm_info: dict, mem_limit_gb: float, device: str = "cpu"
) -> tuple[str, str] | None:
    """(status, note) when a measurement is not run, else None."""
    if backend == "tokenmix" and not tm_info["kernels"]:
        why = tm_info["library_error"] or (
            "torch.ops.tokenmix.block_sparse_forward/_backward are not registered"
        )
        return ("unavailable", f"n/a (no block-sparse kernels in this tokenmix build: {why})")
    return peer_skip_reason(case, backend, mode, mem_limit_gb, device, sdpa_memory_estimate)


def prepare_case(case: Case, path: str, check_layout: bool) -> dict:
    """Once per case, in the parent: the pattern's tensors and the Flex ``BlockMask`` lists
    (saved for the workers), the exact kept pairs, and the block counts of both the
    ``BlockMask`` and the tokenmix layout. With ``check_layout`` the layout's own count
    (``layout.kept_pairs``, element by element: about 30-60 s per pattern at T=8192) is
    checked against the mask's."""
    t0 = time.perf_counter()
    data = pattern_data(case)
    block_mask = create_flex_block_mask(case, data)
    torch.save(
        {
            "data": data,
            "block_mask": {n: getattr(block_mask, n).contiguous() for n in BLOCK_MASK_LISTS},
        },
        path,
    )
    pairs = kept_pairs(case, data)
    flex_partial, flex_full = block_counts(
        block_mask.kv_num_blocks, block_mask.full_kv_num_blocks, case
    )
    info = {
        "kept_pairs": pairs,
        "density": pairs / (case.batch * case.heads * case.seq_len**2),
        "flex_blocks": {"partial": flex_partial, "full": flex_full},
        "layout_source": layout_source(case),
    }
    try:
        layout = tokenmix_layout(case, data, block_mask)
        partial, full = block_counts(layout.kv_num_blocks, layout.full_kv_num_blocks, case)
        info["tokenmix_blocks"] = {"partial": partial, "full": full}
        if check_layout:
            info["layout_kept_pairs"] = layout.kept_pairs(batch=case.batch, heads=case.heads)
    except Exception as exc:  # reported in the output, the measurements still run
        info["layout_error"] = f"{type(exc).__name__}: {exc}"
    info["setup_s"] = time.perf_counter() - t0
    return info


def run_case(case: Case, run: BenchmarkRun) -> dict:
    """The case's masks, BlockMask and layout (:func:`prepare_case`), then every backend and
    mode of it, their correctness and speedups."""
    log(f"{case.name}: masks, BlockMask and layout ...")
    masks_path = os.path.join(run.tmpdir, f"{case.name}-masks.pt")
    prep = prepare_case(case, masks_path, run.args.quick or run.args.check_layout)
    log(
        f"    {100 * prep['density']:.2f}% of pairs kept; flex BlockMask "
        f"{prep['flex_blocks']['partial']} partial + {prep['flex_blocks']['full']} full blocks "
        f"[{prep['setup_s']:.1f} s]"
    )
    fwd_flops = forward_flops(case, prep["kept_pairs"])
    rows = run.measure(case, fwd_flops, masks_path=masks_path)
    return run.case_result(case, rows, tokens=case.seq_len, details=prep, fwd_flops=fwd_flops)


# The bars of issue 10, section 4: (id, text, pattern scope, mode, peer or None, threshold).
BARS = (
    (
        "flex",
        "fwd faster than compiled Flex on every pattern and block size, >= 1.2x at BLOCK_SIZE 64",
        PATTERNS,
        "fwd",
        "flex",
    ),
    ("matmul", "fwd useful throughput >= 60% of matmul at 10% density", ("random",), "fwd", None),
    ("sdpa", "fwd+bwd >= 8x faster than sdpa+mask at 10% density", ("random",), "fwd+bwd", "sdpa"),
)


def _bar_need(bar: str, block_size: int) -> tuple[float, bool, str]:
    """(threshold, strict, text) of one check."""
    if bar == "flex":
        if block_size == 64:
            return 1.2, False, ">= 1.20x"
        return 1.0, True, "> 1.00x"
    if bar == "matmul":
        return 0.6, False, ">= 60%"
    return 8.0, False, ">= 8.00x"


def evaluate_bars(report: dict) -> list[dict]:
    """Each bar over its scope (its patterns at every block size of the issue, 64 and 128):
    one check per case with the measured value and PASS / FAIL / NOT MEASURED, and the
    bar's verdict: PASS when every check in its scope passes, FAIL when one fails,
    otherwise INCOMPLETE (a case not run or not measured)."""
    by_name = {c["name"]: c for c in report["cases"]}
    bars = []
    for bar_id, text, patterns, mode, peer in BARS:
        checks = []
        for pattern in patterns:
            for bs in BLOCK_SIZES:
                name = f"{pattern}-bs{bs}"
                need, strict, need_s = _bar_need(bar_id, bs)
                check = {"case": name, "needs": need_s, "measured": None}
                c = by_name.get(name)
                if c is None:
                    check["verdict"] = "NOT RUN"
                    checks.append(check)
                    continue
                rows = {r["backend"]: r for r in c["results"] if r["mode"] == mode}
                tm = rows.get("tokenmix")
                if tm is None or "median_ms" not in tm:
                    why = tm.get("note", "not run") if tm else "not run"
                    check["verdict"] = f"NOT MEASURED (tokenmix {mode}: {why})"
                    checks.append(check)
                    continue
                if peer is None:
                    value = tm["frac_matmul"]
                    check["measured"] = f"{100 * value:.1f}%"
                    lower = False
                else:
                    p = rows.get(peer)
                    if p is None or "tokenmix_speedup" not in p:
                        why = p.get("note", "not run") if p else "not run"
                        check["verdict"] = f"NOT MEASURED ({LABELS[peer]} {mode}: {why})"
                        checks.append(check)
                        continue
                    value = p["tokenmix_speedup"]
                    lower = bool(p.get("speedup_is_lower_bound"))
                    check["measured"] = f"{'>' if lower else ''}{value:.2f}x"
                check["value"] = value
                ok = value > need if strict else value >= need
                if tm.get("correct") is False:
                    check["verdict"] = "FAIL (wrong output)"
                elif ok:
                    check["verdict"] = "PASS"
                elif lower:
                    check["verdict"] = "NOT MEASURED (peer stopped early)"
                else:
                    check["verdict"] = "FAIL"
                checks.append(check)
        if any(ch["verdict"].startswith("FAIL") for ch in checks):
            verdict = "FAIL"
        elif checks and all(ch["verdict"] == "PASS" for ch in checks):
            verdict = "PASS"
        else:
            verdict = "INCOMPLETE"
        bars.append({"id": bar_id, "bar": text, "checks": checks, "verdict": verdict})
    return bars


BAR_HEADERS = ("bar", "case", "measured", "needs", "verdict")


def render_bars(bars: list[dict], markdown: bool, quick: bool) -> list[str]:
    rows = []
    for i, bar in enumerate(bars, 1):
        for ch in bar["checks"]:
            rows.append([str(i), ch["case"], ch["measured"] or "-", ch["needs"], ch["verdict"]])
    head = "Bars (issue 10, section 4)"
    if quick:
        head += " -- quick run: scaled-down problems, the bars are defined on the full run"
    out = [f"### {head}" if markdown else f"== {head}"]
    if markdown:
        out.append("")
    out.append((format_markdown if markdown else format_table)(BAR_HEADERS, rows, "llrrl"))
    if markdown:
        out.append("")
    for i, bar in enumerate(bars, 1):
        line = f"bar {i}: {bar['bar']}: {bar['verdict']}"
        out.append(f"- {line}" if markdown else f"  {line}")
    out.append("")
    return out


def case_notes(c: dict) -> list[str]:
    """The blocks each side visits, and the kept-pair cross-check."""
    bs = c["case"]["block_size"]
    fb = c["flex_blocks"]
    lines = [f"flex BlockMask: {fb['partial']} partial + {fb['full']} full {bs}x{bs} blocks"]
    if "layout_error" in c:
        lines.append(f"tokenmix layout: could not be built here ({c['layout_error']})")
        return lines
    tb = c["tokenmix_blocks"]
    source = LAYOUT_SOURCES[c["layout_source"]]
    lines.append(f"tokenmix layout: {source}; {tb['partial']} partial + {tb['full']} full blocks")
    if "layout_kept_pairs" not in c:
        pass
    elif c["layout_kept_pairs"] == c["kept_pairs"]:
        lines[-1] += "; layout.kept_pairs() agrees with the mask"
    else:
        lines.append(
            f"LAYOUT MISMATCH: the tokenmix layout keeps {c['layout_kept_pairs']} pairs, the "
            f"mask {c['kept_pairs']}"
        )
    return lines


def render(report: dict, markdown: bool) -> str:
    meta = report["meta"]
    cuda = meta.get("device", "cpu") == "cuda"
    out = report_header(meta, "block-sparse attention", markdown)
    for c in report["cases"]:
        title = (
            f"{c['name']}: {c['description']}; {100 * c['density']:.2f}% of pairs kept "
            f"({c['kept_pairs'] / (c['case']['batch'] * c['case']['heads'] * c['tokens']):.0f} "
            f"keys/query), fwd {c['fwd_flops'] / 1e9:.3f} GFLOP useful"
        )
        out.extend(render_case(c, title, LABELS, ORACLES, markdown, case_notes(c)))
    out.extend(render_bars(report["bars"], markdown, meta["args"]["quick"]))
    where_t = "CUDA events around each call" if cuda else "perf_counter around each call"
    notes = (
        "GFLOP/s = useful FLOPs / median time for every backend: fwd 4*B*H*kept_pairs*D (kept "
        f"pairs counted exactly), fwd+bwd {FWD_BWD_FLOP_FACTOR}x that; % matmul = GFLOP/s / the "
        f"same run's matmul GFLOP/s; times: {where_t}. tokenmix times heads-last [B,T,H,D] "
        "inputs with a BlockLayout built beforehand; SDPA and flex time [B,H,T,D] inputs (the "
        "transposes, the masks and compiling are outside the timed region). peak MiB = memory "
        "growth during one call (fresh process per row); mask MiB = memory held by the mask / "
        "BlockMask / layout. max|diff| is against sdpa+mask; see bench/README.md."
    )
    return report_text(out, notes, markdown)


def conclude(report: dict) -> list[str]:
    """The bars of the run (``report["bars"]``), and an error line when the tokenmix layout
    keeps other pairs than the mask in some case."""
    report["bars"] = evaluate_bars(report)
    mismatched = [
        c["name"]
        for c in report["cases"]
        if "layout_kept_pairs" in c and c["layout_kept_pairs"] != c["kept_pairs"]
    ]
    if mismatched:
        return [f"the tokenmix layout keeps other pairs than the mask in {mismatched}"]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Benchmark tokenmix block-sparse attention against compiled FlexAttention "
        "and SDPA with a dense mask (CPU or CUDA).",
    )
    p.add_argument(
        "--case",
        default="all",
        help=f"comma list of patterns: {', '.join(PATTERNS)} / all (default all)",
    )
    p.add_argument(
        "--block-size",
        default=",".join(str(b) for b in BLOCK_SIZES),
        help="comma list of BLOCK_SIZEs to run each pattern at (default 64,128)",
    )
    p.add_argument(
        "--check-layout",
        action="store_true",
        help="check layout.kept_pairs() against the mask's pair count (always with --quick; "
        "about 30-60 s per pattern at T=8192)",
    )
    add_size_arguments(p)
    add_measurement_arguments(p, BACKENDS, DEFAULT_BACKENDS)
    return benchmark_main(
        p.parse_args(argv),
        script=__file__,
        case_type=Case,
        builders=BUILDERS,
        backends=BACKENDS,
        labels=LABELS,
        oracles=ORACLES,
        select_cases=select_cases,
        check_tokenmix=check_tokenmix,
        skip_reason=skip_reason,
        run_case=run_case,
        fwd_flops="4 * kept_pairs * D (kept_pairs summed over B x H)",
        render=render,
        conclude=conclude,
    )


if __name__ == "__main__":
    sys.exit(main())
