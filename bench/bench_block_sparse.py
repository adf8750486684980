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
* (opt-in, ``sdpa_dense``) SDPA without a mask, causal for causal patterns: the dense
  attention a sparse pattern replaces,

in forward and forward+backward mode, and reports the median time, useful GFLOP/s
(exact kept pairs), that throughput as a fraction of the same run's fp32 matmul
throughput, the peak memory of one call, the max abs difference of every output
against SDPA, the speedup of tokenmix over each peer, and the bars of issue 10
(section 4) with PASS/FAIL. Every (case, backend, mode) runs in a fresh subprocess
(this script re-invoked with ``--worker``). ``--patterns`` times every builder of
``tokenmix.patterns`` instead (the pattern table, bench/pattern_cases.py),
``--issue11-bars`` issue 11's bar, ``--seq-lens`` sweeps the sequence length and
``--plot`` draws the sweep. See bench/README.md.

    python bench/bench_block_sparse.py                     # all patterns, both block sizes
    python bench/bench_block_sparse.py --case random --block-size 64
    python bench/bench_block_sparse.py --quick --json out.json --markdown
    python bench/bench_block_sparse.py --patterns          # the pattern table (T=8192)
    python bench/bench_block_sparse.py --issue11-bars      # issue 11's bar (T=16384)
    python bench/bench_block_sparse.py --case sliding --block-size 64 \
        --seq-lens 2048,4096,8192,16384 --plot sweep.png
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

from harness import (  # noqa: E402
    BLOCK_MASK_LISTS,
    DTYPES,
    FWD_BWD_FLOP_FACTOR,
    AttentionBenchmark,
    BackendRun,
    BenchmarkRun,
    attention_inputs,
    attention_main,
    bar_verdict,
    check_flex_mode,
    check_verdict,
    compiled_flex_run,
    format_markdown,
    format_table,
    frac_cell,
    log,
    parse_int_list,
    peer_skip_reason,
    render_case,
    report_header,
    report_text,
    sdpa_run,
    tokenmix_info,
)
from pattern_cases import (  # noqa: E402
    BAR11_BLOCK_SIZE,
    BAR11_BUILDERS,
    BAR11_CONFIG,
    PATTERN_BACKENDS,
    PATTERN_BLOCK_SIZE,
    PATTERN_BUILDERS,
    PATTERN_SIZES,
    QUICK_BAR11_SEQ_LEN,
    QUICK_PATTERN_SIZES,
    PatternCase,
    SequenceCase,
    block_sparse_run,
    check_pattern_case,
    document_offsets,
    evaluate_bars11,
    pattern_table,
    prepare_pattern_case,
    render_bars11,
)

PATTERNS = ("sliding", "random", "document")
BLOCK_SIZES = (64, 128)
# Problem sizes: the issue's configuration, and --quick's scaled-down one.
FULL_SIZES = {"seq_len": 8192, "window": 1024}
QUICK_SIZES = {"seq_len": 1024, "window": 256}

BACKENDS = ("tokenmix", "flex", "sdpa", "sdpa_dense", "reference")
DEFAULT_BACKENDS = ("tokenmix", "flex", "sdpa")
# Issue 11's bar compares with dense causal SDPA; compiled Flex checks tokenmix's forward (the
# dense-mask SDPA would need more than 8 GiB at T=16384).
BAR11_BACKENDS = ("tokenmix", "sdpa_dense", "flex")
LABELS = {
    "tokenmix": "tokenmix",
    "flex": "flex (compiled)",
    "sdpa": "sdpa+mask",
    "sdpa_dense": "sdpa dense",
    "reference": "tokenmix reference",
}
# Oracles for the correctness check, in order of preference.
ORACLES = ("sdpa", "reference", "flex")
# Backends computing another function (dense attention): timed, never compared.
UNCHECKED = ("sdpa_dense",)

# Rows of the dense mask evaluated at once (bounds the index temporaries).
MASK_CHUNK_ROWS = 512


# ---------------------------------------------------------------------------
# Cases and their masks
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case(SequenceCase):
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

    @property
    def mask_heads(self) -> int:
        """Heads of the mask: the random pattern differs per head, the others broadcast."""
        return self.heads if self.pattern == "random" else 1

    @property
    def pattern_blocks(self) -> int:
        return math.ceil(self.seq_len / self.pattern_block)

    @property
    def causal(self) -> bool:
        """Whether the pattern is causal (the ``sdpa_dense`` baseline is causal then)."""
        return self.pattern == "sliding"

    @property
    def series(self) -> str:
        """The case without its length: what stays fixed along a ``--seq-lens`` sweep."""
        return f"{self.pattern}-bs{self.block_size}"

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
        offsets = torch.tensor(document_offsets(case.seq_len, case.documents, case.pattern_seed))
        lengths = offsets[1:] - offsets[:-1]
        return {"doc": torch.repeat_interleave(torch.arange(case.documents), lengths)}
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
    return block_sparse_run(layout, inputs, backward, layout_s, reference=fn_name != "tokenmix")


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


def _builder(backend: str, issue10: Callable | None):
    """The worker's builder of ``backend``: the pattern library's (bench/pattern_cases.py)
    for a :class:`PatternCase`, ``issue10`` for the issue-10 cases (or, when None, the same as
    for a pattern case)."""

    def build(case, spec: dict, inputs, backward: bool) -> BackendRun:
        if isinstance(case, PatternCase) or issue10 is None:
            return PATTERN_BACKENDS[backend](case, spec, inputs, backward)
        return issue10(case, spec, inputs, backward)

    return build


# Backend -> builder (harness.Builder), in the order of BACKENDS.
BUILDERS = {
    "tokenmix": _builder("tokenmix", build_tokenmix),
    "flex": _builder("flex", build_flex),
    "sdpa": _builder("sdpa", build_sdpa),
    "sdpa_dense": _builder("sdpa_dense", None),  # dense SDPA: the same for every case
    "reference": _builder("reference", build_reference),
}


def case_from_dict(d: dict) -> Case | PatternCase:
    """A worker's case: a pattern-library case or an issue-10 case."""
    return PatternCase.from_dict(d) if d.get("kind") == "pattern" else Case.from_dict(d)


# ---------------------------------------------------------------------------
# Parent side: cases, orchestration, bars, output
# ---------------------------------------------------------------------------


def _block_sizes(text: str | None, default: tuple[int, ...]) -> list[int]:
    """``--block-size``, or the mode's default."""
    return parse_int_list(text, "--block-size") if text else list(default)


def _names(text: str, known: tuple[str, ...], flag: str) -> list[str]:
    """A comma list of ``known`` names (``all`` for every one), without repeats."""
    names = []
    for item in text.split(","):
        item = item.strip()
        if item == "all":
            names.extend(known)
        elif item in known:
            names.append(item)
        else:
            raise SystemExit(f"{flag}: unknown {item!r}; known: {', '.join([*known, 'all'])}")
    return list(dict.fromkeys(names))


def issue10_selected(args) -> bool:
    """The issue-10 cases run unless only ``--patterns`` / ``--issue11-bars`` was asked for."""
    return args.case is not None or (args.patterns is None and not args.issue11_bars)


def default_backends(args) -> list[str]:
    """tokenmix, compiled Flex and SDPA with the dense mask; for issue 11's bar tokenmix, dense
    causal SDPA and Flex (the union when both are run)."""
    chosen = []
    if issue10_selected(args) or args.patterns is not None:
        chosen += DEFAULT_BACKENDS
    if args.issue11_bars:
        chosen += BAR11_BACKENDS
    return [b for b in BACKENDS if b in chosen]


def select_cases(args) -> list[Case | PatternCase]:
    """The issue-10 cases (``--case``), the pattern table's (``--patterns``) and issue 11's
    (``--issue11-bars``), each at every ``--block-size`` and ``--seq-lens`` length."""
    seq_lens = parse_int_list(args.seq_lens, "--seq-lens") if args.seq_lens else None
    common = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype)
    cases: list[Case | PatternCase] = []

    def add(kind: type, names: list[str], sizes: dict, block_sizes: tuple[int, ...]) -> None:
        for what in names:
            for bs in _block_sizes(args.block_size, block_sizes):
                for t in seq_lens or [sizes["seq_len"]]:
                    name = f"{what}-bs{bs}" + (f"-T{t}" if seq_lens else "")
                    cases.append(kind(name, what, bs, **dict(sizes, seq_len=t), **common))

    if issue10_selected(args):
        patterns = _names(args.case or "all", PATTERNS, "--case")
        add(Case, patterns, QUICK_SIZES if args.quick else FULL_SIZES, BLOCK_SIZES)
    if args.patterns is not None:
        builders = _names(args.patterns, PATTERN_BUILDERS, "--patterns")
        sizes = QUICK_PATTERN_SIZES if args.quick else PATTERN_SIZES
        add(PatternCase, builders, sizes, (PATTERN_BLOCK_SIZE,))
    if args.issue11_bars:
        dims = QUICK_PATTERN_SIZES if args.quick else PATTERN_SIZES
        t = QUICK_BAR11_SEQ_LEN if args.quick else BAR11_CONFIG["seq_len"]
        for builder in BAR11_BUILDERS:
            for bs in dict.fromkeys(_block_sizes(args.block_size, (BAR11_BLOCK_SIZE,))):
                name = f"{builder}-bs{bs}-T{t}"
                if any(c.name == name for c in cases):
                    continue
                sizes = dict(dims, seq_len=t)
                cases.append(PatternCase(name, builder, bs, **sizes, **common))
    for case in cases:
        why = check_pattern_case(case) if isinstance(case, PatternCase) else None
        if why is not None:
            raise SystemExit(f"{case.name}: {why}")
    return cases


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
        kernel = layout.kernel_layout
        if kernel is not layout:  # bits of whole squares: the kernels run finer blocks
            partial, full = block_counts(kernel.kv_num_blocks, kernel.full_kv_num_blocks, case)
            info["kernel_blocks"] = {"partial": partial, "full": full, "size": kernel.q_block}
        if check_layout:
            info["layout_kept_pairs"] = layout.kept_pairs(batch=case.batch, heads=case.heads)
    except Exception as exc:  # reported in the output, the measurements still run
        info["layout_error"] = f"{type(exc).__name__}: {exc}"
    info["setup_s"] = time.perf_counter() - t0
    return info


def run_pattern_case(case: PatternCase, run: BenchmarkRun) -> dict:
    """A pattern-library case: its layout on the workers' inputs, exact density and block
    counts (:func:`pattern_cases.prepare_pattern_case`), then every backend and mode of it
    (each worker checks it built the same layout), their correctness and speedups."""
    log(f"{case.name}: {case.describe()} ...")
    inputs = attention_inputs(case.input_shape, case.dtype, run.args.seed)
    prep = prepare_pattern_case(case, inputs)
    blocks = prep["tokenmix_blocks"]
    log(
        f"    {100 * prep['density']:.2f}% of pairs kept; layout {blocks['partial']} partial + "
        f"{blocks['full']} full blocks ({prep['layout_rule']}) [{prep['setup_s']:.1f} s]"
    )
    fwd_flops = forward_flops(case, prep["kept_pairs"])
    rows = run.measure(case, fwd_flops, layout_digest=prep["layout_digest"])
    details = {**prep, "series": case.series}
    return run.case_result(case, rows, tokens=case.seq_len, details=details, fwd_flops=fwd_flops)


def run_case(case: Case | PatternCase, run: BenchmarkRun) -> dict:
    """The case's masks, BlockMask and layout (:func:`prepare_case`), then every backend and
    mode of it, their correctness and speedups (:func:`run_pattern_case` for a pattern-library
    case)."""
    if isinstance(case, PatternCase):
        return run_pattern_case(case, run)
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
    details = {**prep, "series": case.series}
    return run.case_result(case, rows, tokens=case.seq_len, details=details, fwd_flops=fwd_flops)


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
    """Each bar over its scope (its patterns at every block size of the issue, 64 and 128, at
    the issue's T=8192, or --quick's T): one check per case with the measured value and
    PASS / FAIL / NOT MEASURED, and the bar's verdict: PASS when every check in its scope
    passes, FAIL when one fails, otherwise INCOMPLETE (a case not run or not measured)."""
    bar_t = (QUICK_SIZES if report["meta"]["args"]["quick"] else FULL_SIZES)["seq_len"]
    by_key = {
        (c["case"]["pattern"], c["case"]["block_size"]): c
        for c in reversed(report["cases"])
        if c["case"].get("kind") != "pattern" and c["case"]["seq_len"] == bar_t
    }
    bars = []
    for bar_id, text, patterns, mode, peer in BARS:
        checks = []
        for pattern in patterns:
            for bs in BLOCK_SIZES:
                name = f"{pattern}-bs{bs}"
                need, strict, need_s = _bar_need(bar_id, bs)
                check = {"case": name, "needs": need_s, "measured": None}
                c = by_key.get((pattern, bs))
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
                    # The verdict is on the run's ceiling; the row and paired fractions are
                    # shown beside it (a host's slow stretch can move the paired one either
                    # way: bench/README.md).
                    value = tm["frac_matmul"]
                    check["measured"] = frac_cell(tm)
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
                check["verdict"] = check_verdict(
                    value, need, strict=strict, lower_bound=lower, wrong=tm.get("correct") is False
                )
                checks.append(check)
        bars.append({"id": bar_id, "bar": text, "checks": checks, "verdict": bar_verdict(checks)})
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
    kb = c.get("kernel_blocks")
    if kb:
        g = kb["size"]
        lines[-1] += (
            f"; its bits are whole {g}x{g} squares, so the kernels run it as {kb['partial']} "
            f"partial + {kb['full']} full {g}x{g} blocks (layout.kernel_layout)"
        )
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
    pattern_results = [c for c in report["cases"] if c["case"].get("kind") == "pattern"]
    for c in report["cases"]:
        if c["case"].get("kind") == "pattern":
            continue
        title = (
            f"{c['name']}: {c['description']}; {100 * c['density']:.2f}% of pairs kept "
            f"({c['kept_pairs'] / (c['case']['batch'] * c['case']['heads'] * c['tokens']):.0f} "
            f"keys/query), fwd {c['fwd_flops'] / 1e9:.3f} GFLOP useful"
        )
        out.extend(render_case(c, title, LABELS, ORACLES, markdown, case_notes(c)))
    if "bars" in report:
        out.extend(render_bars(report["bars"], markdown, meta["args"]["quick"]))
    if pattern_results:
        out.extend(pattern_table(pattern_results, LABELS, markdown))
    if "bars11" in report:
        out.extend(render_bars11(report["bars11"], markdown))
    where_t = "CUDA events around each call" if cuda else "perf_counter around each call"
    notes = (
        "GFLOP/s = useful FLOPs / median time for every backend: fwd 4*B*H*kept_pairs*D (kept "
        f"pairs counted exactly), fwd+bwd {FWD_BWD_FLOP_FACTOR}x that; % matmul = GFLOP/s / the "
        f"same run's matmul GFLOP/s; times: {where_t}. tokenmix times heads-last [B,T,H,D] "
        "inputs with a BlockLayout built beforehand; SDPA and flex time [B,H,T,D] inputs (the "
        "transposes, the masks and compiling are outside the timed region). "
    )
    if len(pattern_results) < len(report["cases"]):
        notes += (
            "peak MiB = memory growth during one call (fresh process per row); mask MiB = memory "
            "held by the mask / BlockMask / layout. max|diff| is against sdpa+mask (else the "
            "reference, then flex). "
        )
    if pattern_results:
        notes += (
            "Pattern table: each builder's layout as tokenmix.patterns builds it; density = kept "
            "pairs / (B*H*T^2), exact; layout = partial (p) and full (f) blocks over all heads "
            "and how partial blocks are masked (bits: a bitmask, rule: a structured "
            "ElementMask); flex gets layout.to_block_mask(heads=H), sdpa+mask the layout's dense "
            "mask; check = tokenmix's outputs (and gradients) against the first oracle that ran "
            "(sdpa+mask, the reference, flex). "
        )
    if any(
        b == "sdpa_dense" for c in report["cases"] for b in (r["backend"] for r in c["results"])
    ):
        notes += (
            "sdpa dense = SDPA without a mask (causal for causal patterns), the dense attention a "
            "sparse pattern replaces: timed, not compared. "
        )
    notes += "See bench/README.md."
    return report_text(out, notes, markdown)


def conclude(report: dict) -> list[str]:
    """The bars of the run: issue 10's when an issue-10 case ran (``report["bars"]``), issue
    11's with ``--issue11-bars`` (``report["bars11"]``); and an error line when the tokenmix
    layout keeps other pairs than the mask in some case."""
    args = report["meta"]["args"]
    if any(c["case"].get("kind") != "pattern" for c in report["cases"]):
        report["bars"] = evaluate_bars(report)
    if args.get("issue11_bars"):
        report["bars11"] = evaluate_bars11(report)
    mismatched = [
        c["name"]
        for c in report["cases"]
        if "layout_kept_pairs" in c and c["layout_kept_pairs"] != c["kept_pairs"]
    ]
    if mismatched:
        return [f"the tokenmix layout keeps other pairs than the mask in {mismatched}"]
    return []


def add_arguments(p: argparse.ArgumentParser) -> None:
    """bench_block_sparse.py's own options: the cases, the pattern table, issue 11's bar and
    the sweep."""
    p.add_argument(
        "--case",
        help=f"comma list of issue-10 patterns: {', '.join(PATTERNS)} / all (default all, "
        "unless only --patterns or --issue11-bars is given)",
    )
    p.add_argument(
        "--block-size",
        help="comma list of BLOCK_SIZEs to run each case at (default: 64,128 for the issue-10 "
        f"cases, {PATTERN_BLOCK_SIZE} for --patterns, {BAR11_BLOCK_SIZE} for --issue11-bars)",
    )
    p.add_argument(
        "--patterns",
        nargs="?",
        const="all",
        metavar="BUILDERS",
        help="the pattern table: every builder of tokenmix.patterns (or a comma list of "
        f"{', '.join(PATTERN_BUILDERS)}) at T={PATTERN_SIZES['seq_len']} (--quick: "
        f"{QUICK_PATTERN_SIZES['seq_len']}); their arguments: bench/README.md",
    )
    p.add_argument(
        "--issue11-bars",
        action="store_true",
        help="issue 11's bar: tokenmix fwd+bwd >= 0.35 / density x faster than dense causal "
        f"SDPA on {' and '.join(BAR11_BUILDERS)} at T={BAR11_CONFIG['seq_len']} (--quick: "
        f"{QUICK_BAR11_SEQ_LEN}), B=1, H=4, D=64, float32, 2 threads",
    )
    p.add_argument(
        "--seq-lens",
        metavar="T1,T2,...",
        help="sweep: run every issue-10 and --patterns case at each of these sequence lengths "
        "(the window, frame and other arguments unchanged; not the issue-11 bar, which is "
        "defined at one T), e.g. --seq-lens 2048,4096,8192,16384",
    )
    p.add_argument(
        "--check-layout",
        action="store_true",
        help="check layout.kept_pairs() against the mask's pair count (always with --quick; "
        "about 30-60 s per pattern at T=8192)",
    )


BENCHMARK = AttentionBenchmark(
    script=__file__,
    family="block-sparse attention",
    description="Benchmark tokenmix block-sparse attention against compiled FlexAttention "
    "and SDPA with a dense mask (CPU or CUDA).",
    add_arguments=add_arguments,
    case_from_dict=case_from_dict,
    builders=BUILDERS,
    backends=BACKENDS,
    default_backends=default_backends,
    default_backends_help=f"{','.join(DEFAULT_BACKENDS)}; with --issue11-bars also "
    f"{','.join(b for b in BAR11_BACKENDS if b not in DEFAULT_BACKENDS)}",
    labels=LABELS,
    oracles=ORACLES,
    unchecked=UNCHECKED,
    select_cases=select_cases,
    check_tokenmix=check_tokenmix,
    skip_reason=skip_reason,
    run_case=run_case,
    fwd_flops="4 * kept_pairs * D (kept_pairs summed over B x H)",
    render=render,
    conclude=conclude,
    series=lambda c: c["series"],
)


def main(argv: list[str] | None = None) -> int:
    return attention_main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
