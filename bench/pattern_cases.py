"""The builders of ``tokenmix.patterns`` as cases of bench_block_sparse.py.

``--patterns`` times every builder of the pattern library (the pattern table),
``--issue11-bars`` the two configurations of issue 11's bar. A :class:`PatternCase` is one
builder with its benchmark arguments (:func:`pattern_params`, derived from the sequence
length, the block size and the head count; bench/README.md lists them). Its layout is
built by the library's own builder, in the parent (for the exact density and the block
counts) and again in every worker, outside the timed region; the worker checks that it got
the parent's layout (:func:`layout_digest`). ``topk_blocks`` and ``permuted_blocks`` select
blocks from the seeded inputs; ``multi_axis`` and ``permuted_blocks`` reorder tokens, and
every backend gets the reordered inputs (the reordering is not timed).

The density of a layout is its kept (query, key) pairs over all pairs, ``kept / (B * H *
Tq * Tk)``, counted exactly from its blocks (:func:`layout_kept_pairs`: full blocks by
their area, partial blocks element by element), and the dense SDPA mask is assembled
from the same blocks (:func:`layout_dense_mask`); neither ever evaluates ``T x T``
elements one by one.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass

import torch
from harness import (
    BackendRun,
    autograd_run,
    bar_verdict,
    check_flex_mode,
    check_verdict,
    compiled_flex_run,
    dense_sdpa_run,
    fmt_float,
    format_markdown,
    format_table,
    sdpa_run,
    tensor_bytes,
)

PATTERN_BUILDERS = (
    "sliding_window",
    "per_head_windows",
    "elastic_windows",
    "dilated",
    "power_attention",
    "radial",
    "document",
    "prefix_lm",
    "multi_axis",
    "topk_blocks",
    "permuted_blocks",
)
# The pattern table's sizes: the issue-10 table's T, and --quick's (window and video frame in
# tokens; the other arguments follow from them, see pattern_params).
PATTERN_SIZES = {"seq_len": 8192, "window": 1024, "frame": 512}
QUICK_PATTERN_SIZES = {"seq_len": 1024, "window": 256, "frame": 128}
PATTERN_BLOCK_SIZE = 128  # the library's (and Flex's) default BLOCK_SIZE
SINKS = 64
DOCUMENTS = 8
TOPK_DENSITY = 1 / 16  # topk_blocks: topk is chosen for this fraction of kept pairs
MULTI_AXIS_WIDTH = 64  # multi_axis: the token grid is (T / 64) x 64 ...
MULTI_AXIS_GROUP = 16  # ... with 16x16 windows and a 16x16 grid (256-token groups)
PERMUTED_SEGMENT = 1024  # permuted_blocks: segment size (a multiple of the block size)
PERMUTED_THRESHOLD = 0.9

# Issue 11's bar: tokenmix fwd+bwd at least BAR11_FACTOR / density times faster than dense
# causal SDPA fwd+bwd, at this configuration, on these builders.
BAR11_BUILDERS = ("sliding_window", "topk_blocks")
BAR11_FACTOR = 0.35
BAR11_CONFIG = {"seq_len": 16384, "batch": 1, "heads": 4, "head_dim": 64, "dtype": "float32"}
BAR11_THREADS = 2
BAR11_BLOCK_SIZE = 64
QUICK_BAR11_SEQ_LEN = 2048


@dataclass(frozen=True)
class SequenceCase:
    """What every case of bench_block_sparse.py has besides its own fields (``name``,
    ``block_size``, ``seq_len``, ...): the keyword-only sizes of the inputs, and the round trip
    through the worker's spec."""

    _: KW_ONLY
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**d)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """Shape of q, k, v and the output gradient: heads-last ``[B, T, H, D]``."""
        return (self.batch, self.seq_len, self.heads, self.head_dim)


@dataclass(frozen=True)
class PatternCase(SequenceCase):
    """One builder of ``tokenmix.patterns`` at one size (see :func:`pattern_params`)."""

    name: str
    builder: str
    block_size: int
    seq_len: int
    window: int = 1024
    frame: int = 512
    sinks: int = SINKS
    pattern_seed: int = 0
    kind: str = "pattern"

    @property
    def mask_heads(self) -> int:
        """Heads of the layout (and of the dense SDPA mask): one for the patterns that are the
        same on every head, one per head for the others."""
        per_head = ("per_head_windows", "elastic_windows", "multi_axis", "topk_blocks")
        return self.heads if self.builder in (*per_head, "permuted_blocks") else 1

    @property
    def causal(self) -> bool:
        """Whether the attention the pattern thins out is causal: the dense SDPA baseline
        (``sdpa_dense``) runs with ``is_causal`` then."""
        return self.builder not in ("radial", "prefix_lm", "multi_axis")

    @property
    def series(self) -> str:
        return f"{self.builder}-bs{self.block_size}"

    def params(self) -> dict:
        return pattern_params(self)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return (
            f"patterns.{self.builder}({args}); BLOCK_SIZE {self.block_size}; T={self.seq_len} "
            f"B={self.batch} H={self.heads} D={self.head_dim} {self.dtype}"
        )


def topk_for_density(seq_len: int, block_size: int, target: float) -> int:
    """The ``topk`` of a causal ``topk_blocks`` self-attention layout whose kept fraction
    ``kept / T^2`` is closest to ``target``: query block ``i`` keeps ``min(topk, i + 1)``
    blocks, the diagonal one causal (``b (b + 1) / 2`` pairs), the others whole."""
    b, n = block_size, math.ceil(seq_len / block_size)
    diagonal = b * (b + 1) // 2

    def density(topk: int) -> float:
        kept = sum((min(topk, i + 1) - 1) * b * b + diagonal for i in range(n))
        return kept / seq_len**2

    return min(range(3, n + 1), key=lambda k: (abs(density(k) - target), k)) if n >= 3 else n


def document_offsets(seq_len: int, documents: int, seed: int) -> list[int]:
    """``cu_seqlens`` of ``documents`` packed documents with boundaries drawn from ``seed`` (the
    same boundaries as the issue-10 ``document`` case)."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(seq_len - 1, generator=gen)[: documents - 1].sort().values + 1
    return [0, *cuts.tolist(), seq_len]


def multi_axis_axes(heads: int) -> list[str]:
    """``multi_axis``: the first half of the heads attend in windows, the rest in the grid."""
    return ["block" if h < max(1, heads // 2) else "grid" for h in range(heads)]


def pattern_params(case: PatternCase) -> dict:
    """The builder's arguments besides ``T``/``q``/``k`` and ``block_size``, from the case's
    sequence length ``T``, window ``W``, video frame, sinks and heads:

    - ``sliding_window``: ``window=W, sinks=64``, causal;
    - ``per_head_windows``: ``windows = W/4, W/2, W, 2W`` (repeated over the heads), ``sinks=64``;
    - ``elastic_windows``: ``alpha = W/8, W/8, W/4, W/4``, ``beta = 1/64, 1/32, 1/16, 1/8``
      (MoA: ``window_h = floor(alpha_h + beta_h * T)``), ``sinks=64``;
    - ``dilated``: ``window=2W, dilation=2`` (``W`` keys per query);
    - ``power_attention``: ``window = W / BLOCK_SIZE`` blocks plus the power-of-two block
      distances (block granularity);
    - ``radial``: ``T / frame`` frames of ``frame`` tokens (defaults: decay 1, threshold 128);
    - ``document``: 8 documents (boundaries from the pattern seed), causal;
    - ``prefix_lm``: ``prefix_len = T / 4``;
    - ``multi_axis``: a ``(T/64) x 64`` token grid, 16x16 windows and a 16x16 grid; the first
      half of the heads block attention, the others grid attention;
    - ``topk_blocks``: ``topk`` for 1/16 of all pairs (:func:`topk_for_density`), ``sinks=1,
      local=1`` (NSA's initial and local blocks), mean pooling, causal;
    - ``permuted_blocks``: ``segment_size=1024``, ``threshold=0.9`` (PBS-Attn's).
    """
    t, w, h = case.seq_len, case.window, case.heads
    b = case.builder
    if b == "sliding_window":
        return {"window": w, "sinks": case.sinks, "causal": True}
    if b == "per_head_windows":
        windows = [max(1, w * 2 ** (i % 4) // 4) for i in range(h)]
        return {"windows": windows, "sinks": case.sinks, "causal": True}
    if b == "elastic_windows":
        alpha = [max(1, w // d) for d in (8, 8, 4, 4)]
        beta = [1 / 64, 1 / 32, 1 / 16, 1 / 8]
        return {
            "alpha": [alpha[i % 4] for i in range(h)],
            "beta": [beta[i % 4] for i in range(h)],
            "sinks": case.sinks,
            "causal": True,
        }
    if b == "dilated":
        return {"window": 2 * w, "dilation": 2, "causal": True}
    if b == "power_attention":
        return {"window": max(1, w // case.block_size), "causal": True, "granularity": "block"}
    if b == "radial":
        return {"frames": t // case.frame, "tokens_per_frame": case.frame}
    if b == "document":
        return {"cu_seqlens": document_offsets(t, DOCUMENTS, case.pattern_seed), "causal": True}
    if b == "prefix_lm":
        return {"prefix_len": t // 4}
    if b == "multi_axis":
        return {
            "height": t // MULTI_AXIS_WIDTH,
            "width": MULTI_AXIS_WIDTH,
            "block": MULTI_AXIS_GROUP,
            "grid": MULTI_AXIS_GROUP,
            "axes": multi_axis_axes(h),
        }
    if b == "topk_blocks":
        topk = topk_for_density(t, case.block_size, TOPK_DENSITY)
        return {"topk": topk, "sinks": 1, "local": 1, "pooling": "mean", "causal": True}
    if b == "permuted_blocks":
        return {"segment_size": PERMUTED_SEGMENT, "threshold": PERMUTED_THRESHOLD}
    raise ValueError(f"unknown pattern builder {b!r}; known: {', '.join(PATTERN_BUILDERS)}")


def check_pattern_case(case: PatternCase) -> str | None:
    """Why the builder cannot run at this size (a message), or None."""
    t, bs = case.seq_len, case.block_size
    if case.builder == "radial" and t % case.frame:
        return f"radial needs T to be a multiple of the frame ({case.frame} tokens), got {t}"
    if case.builder == "multi_axis":
        group = MULTI_AXIS_GROUP * MULTI_AXIS_GROUP
        if t % (MULTI_AXIS_WIDTH * MULTI_AXIS_GROUP) or group % bs:
            return (
                f"multi_axis needs T to be a multiple of {MULTI_AXIS_WIDTH * MULTI_AXIS_GROUP} "
                f"and BLOCK_SIZE to divide {group}, got T={t}, BLOCK_SIZE {bs}"
            )
    if case.builder == "permuted_blocks" and PERMUTED_SEGMENT % bs:
        return f"permuted_blocks needs BLOCK_SIZE to divide {PERMUTED_SEGMENT}, got {bs}"
    return None


def build_pattern(case: PatternCase, inputs: dict[str, torch.Tensor]):
    """``(layout, inputs)``: the case's layout from its builder (on the inputs' device; the
    data-dependent builders read ``q`` and ``k``) and the inputs every backend gets (q, k, v
    and dout; reordered for ``multi_axis`` and, keys and values, ``permuted_blocks``)."""
    from tokenmix import patterns

    device = inputs["q"].device
    p = pattern_params(case)
    t, bs = case.seq_len, case.block_size
    b = case.builder
    if b == "multi_axis":
        axes = p["axes"]
        pattern = patterns.multi_axis(p["height"], p["width"], p["block"], p["grid"], device=device)
        layout = pattern.layout(axes, block_size=bs)
        return layout, {n: pattern.permute(x, axes) for n, x in inputs.items()}
    if b == "topk_blocks":
        layout = patterns.topk_blocks(inputs["q"], inputs["k"], bs, **p)
        return layout, inputs
    if b == "permuted_blocks":
        r = patterns.permuted_blocks(inputs["q"], inputs["k"], bs, **p)
        moved = {n: r.permute(inputs[n]) for n in ("k", "v")}
        return r.layout, {**inputs, **moved}
    kw = {"block_size": bs, "device": device}
    if b == "radial":
        return patterns.radial(p["frames"], p["tokens_per_frame"], **kw), inputs
    if b == "document":
        return patterns.document(p["cu_seqlens"], p["causal"], T=t, **kw), inputs
    if b == "prefix_lm":
        return patterns.prefix_lm(t, p["prefix_len"], **kw), inputs
    return getattr(patterns, b)(t, **p, **kw), inputs


# ---------------------------------------------------------------------------
# Exact counts and the dense mask, from a layout's blocks
# ---------------------------------------------------------------------------

# Partial blocks evaluated at once (bounds the [n, q_block, kv_block] temporaries).
PARTIAL_CHUNK = 256


def _listed(count: torch.Tensor, index: torch.Tensor):
    """``(lb, lh, qb, slot, kb)``: every listed block of a layout's lists."""
    valid = torch.arange(index.shape[-1], device=index.device) < count.unsqueeze(-1)
    lb, lh, qb, slot = valid.nonzero(as_tuple=True)
    return lb, lh, qb, slot, index[lb, lh, qb, slot].long()


def _effective_batch(layout) -> int:
    """The batch of the layout's element masks: its own, or its document ids' when larger."""
    em = layout.element_mask
    docs = em.q_doc.shape[0] if em is not None and em.q_doc is not None else 1
    return max(layout.batch, docs)


def partial_blocks(layout) -> Iterator[tuple]:
    """Yields ``(b, lh, qb, kb, keep)`` for chunks of the partial blocks of each effective
    batch ``b``: layout heads, query and kv block indices, and the bool ``[n, q_block,
    kv_block]`` kept elements of each (the bitmask and the structured rule; rows and columns
    past the sequence ends dropped)."""
    qbs, kbs = layout.block_size
    tq, tk = layout.q_len, layout.kv_len
    bits = layout.mask_bits
    has_bits = bits is not None and bits.shape[3] > 0
    em = layout.element_mask
    rows = torch.arange(qbs, device=layout.device).view(1, -1, 1)
    cols = torch.arange(kbs, device=layout.device).view(1, 1, -1)
    lb, lh, qb, slot, kb = _listed(layout.kv_num_blocks, layout.kv_indices)
    for b in range(_effective_batch(layout)):
        mine = lb == (b if layout.batch > 1 else 0)
        sel = [t[mine] for t in (lb, lh, qb, slot, kb)]
        for s in range(0, int(sel[0].numel()), PARTIAL_CHUNK):
            c_lb, c_lh, c_qb, c_slot, c_kb = (t[s : s + PARTIAL_CHUNK] for t in sel)
            q = c_qb.view(-1, 1, 1) * qbs + rows
            k = c_kb.view(-1, 1, 1) * kbs + cols
            keep = (q < tq) & (k < tk)
            if has_bits:
                words = bits[c_lb, c_lh, c_qb, c_slot].long() & 0xFFFFFFFF  # [n, q_block, W]
                word = torch.gather(words, 2, (cols // 32).expand(*keep.shape[:2], kbs))
                keep &= (word >> (cols % 32)) & 1 == 1
            if em is not None:
                bb = torch.full_like(q, b)
                keep &= em.keeps(bb, q.clamp(max=tq - 1), k.clamp(max=tk - 1))
            yield b, c_lh, c_qb, c_kb, keep


def layout_kept_pairs(layout, batch: int, heads: int) -> int:
    """Exact kept (query, key) pairs over ``batch x heads``: full blocks by their area (cut at
    the sequence ends), partial blocks by their kept elements; a layout batch or head of 1
    counts for every batch or head, a layout head of a GQA group for each of its ``heads /
    layout.heads`` query heads. Equals ``layout.kept_pairs(batch, heads)`` (which evaluates
    every element) for layouts with 1 or ``heads`` heads."""
    qbs, kbs = layout.block_size
    eb = _effective_batch(layout)
    _, _, qb, _, kb = _listed(layout.full_kv_num_blocks, layout.full_kv_indices)
    rows = (layout.q_len - qb * qbs).clamp(max=qbs)
    cols = (layout.kv_len - kb * kbs).clamp(max=kbs)
    full = int((rows * cols).sum()) * (eb if layout.batch == 1 else 1)
    partial = sum(int(keep.sum()) for *_, keep in partial_blocks(layout))
    return (full + partial) * (batch // eb) * (heads // layout.heads)


def layout_dense_mask(layout) -> torch.Tensor:
    """Bool ``[LB', LH, Tq, Tk]``: the layout's whole element mask (what SDPA gets), built
    block by block."""
    qbs, kbs = layout.block_size
    nq, nk = layout.num_q_blocks, layout.num_kv_blocks
    full = layout.block_status() == 2  # [LB, LH, nq, nk]
    shape = (_effective_batch(layout), layout.heads, nq, qbs, nk, kbs)
    out = full[:, :, :, None, :, None].expand(shape).contiguous()
    for b, lh, qb, kb, keep in partial_blocks(layout):
        out[torch.full_like(lh, b), lh, qb, :, kb, :] = keep
    out = out.view(*shape[:2], nq * qbs, nk * kbs)
    if out.shape[2:] != (layout.q_len, layout.kv_len):
        out = out[:, :, : layout.q_len, : layout.kv_len].contiguous()
    return out


def layout_counts(layout, batch: int, heads: int) -> tuple[int, int]:
    """(partial, full) blocks visited over all ``batch x heads``."""
    scale = (batch // layout.batch) * (heads // layout.heads)
    return (
        int(layout.kv_num_blocks.sum()) * scale,
        int(layout.full_kv_num_blocks.sum()) * scale,
    )


def layout_rule(layout) -> str:
    """How the layout's partial blocks are masked: ``bits``, ``rule`` (a structured
    ``ElementMask``), both, or ``none`` (full blocks only)."""
    has_bits = layout.mask_bits is not None and layout.mask_bits.shape[3] > 0
    kinds = [k for k, on in (("bits", has_bits), ("rule", layout.element_mask is not None)) if on]
    return "+".join(kinds) or "none"


def layout_digest(layout) -> str:
    """A fingerprint of everything that defines the layout's mask (lists, bits, rule)."""
    h = hashlib.sha1()
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        h.update(getattr(layout, name).cpu().contiguous().numpy().tobytes())
    if layout.mask_bits is not None:
        h.update(layout.mask_bits.cpu().contiguous().numpy().tobytes())
    em = layout.element_mask
    if em is not None:
        h.update(repr((em.band, em.prefix, em.prefix_causal)).encode())
        for t in (em.q_doc, em.kv_doc):
            if t is not None:
                h.update(t.cpu().contiguous().numpy().tobytes())
    h.update(repr((layout.block_size, layout.seq_lengths)).encode())
    return h.hexdigest()


LAYOUT_TENSORS = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "mask_bits",
    "q_num_blocks",
    "q_indices",
    "q_slots",
    "full_q_num_blocks",
    "full_q_indices",
)


def layout_bytes(layout) -> int:
    """Bytes held by a tokenmix ``BlockLayout``: its block lists and bits, the document ids of
    its element mask, and the finer layout the kernels run when it has one
    (``layout.kernel_layout``)."""
    own = tensor_bytes(layout, LAYOUT_TENSORS) + tensor_bytes(
        layout.element_mask, ("q_doc", "kv_doc")
    )
    kernel = getattr(layout, "kernel_layout", layout)
    return own + (layout_bytes(kernel) if kernel is not layout else 0)


# ---------------------------------------------------------------------------
# Parent side: the exact density, block counts and the layout's fingerprint
# ---------------------------------------------------------------------------


def prepare_pattern_case(case: PatternCase, inputs: dict[str, torch.Tensor]) -> dict:
    """Once per case, in the parent, on the workers' inputs: the layout (built as the workers
    will), its exact kept pairs and density, block counts, rule and fingerprint."""
    t0 = time.perf_counter()
    layout, _ = build_pattern(case, inputs)
    build_s = time.perf_counter() - t0
    pairs = layout_kept_pairs(layout, case.batch, case.heads)
    partial, full = layout_counts(layout, case.batch, case.heads)
    return {
        "builder": case.builder,
        "params": pattern_params(case),
        "kept_pairs": pairs,
        "density": pairs / (case.batch * case.heads * case.seq_len**2),
        "tokenmix_blocks": {"partial": partial, "full": full},
        "layout_heads": layout.heads,
        "layout_rule": layout_rule(layout),
        "layout_digest": layout_digest(layout),
        "build_s": build_s,
        "setup_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------
# Worker side: the backends of a pattern case
# ---------------------------------------------------------------------------


def _worker_layout(case: PatternCase, spec: dict, inputs):
    """The layout and the (reordered) inputs, built as in the parent (on the CPU, then moved
    to the inputs' device, so that a data-dependent selection is the parent's on a GPU too);
    the layout must be the parent's (the same fingerprint), else the run would time another
    mask than it counts."""
    device = inputs["q"].device
    t0 = time.perf_counter()
    layout, moved = build_pattern(case, {n: x.cpu() for n, x in inputs.items()})
    build_s = time.perf_counter() - t0
    digest = layout_digest(layout)
    if spec.get("layout_digest") not in (None, digest):
        raise RuntimeError(
            f"{case.builder}: the layout built in the worker differs from the parent's "
            "(a non-deterministic builder?)"
        )
    if device.type != "cpu":
        layout = layout.to(device)
        moved = {n: x.to(device) for n, x in moved.items()}
    return layout, moved, build_s


def block_sparse_run(
    layout, inputs, backward: bool, layout_s: float, reference: bool = False
) -> BackendRun:
    """``tokenmix.block_sparse_attention`` (or, with ``reference``, its pure-PyTorch reference)
    with a ``layout`` built beforehand (in ``layout_s`` seconds), on heads-last inputs."""
    if reference:
        from tokenmix.block_sparse import block_sparse_attention_reference as attention
    else:
        from tokenmix import block_sparse_attention as attention

    def fn(q, k, v):
        return attention(q, k, v, layout)

    run = autograd_run(fn, inputs, backward)
    run.aux_bytes = layout_bytes(layout)
    run.info = {"layout": repr(layout), "layout_s": layout_s}
    return run


def tokenmix_pattern_run(
    case: PatternCase, spec: dict, inputs, backward: bool, reference: bool = False
) -> BackendRun:
    """:func:`block_sparse_run` with the case's layout."""
    layout, moved, build_s = _worker_layout(case, spec, inputs)
    return block_sparse_run(layout, moved, backward, build_s, reference)


def flex_pattern_run(case: PatternCase, spec: dict, inputs, backward: bool) -> BackendRun:
    """Compiled ``flex_attention`` with ``layout.to_block_mask(heads=H)``."""
    check_flex_mode(backward, inputs["q"].device)
    layout, moved, _ = _worker_layout(case, spec, inputs)
    return compiled_flex_run(layout.to_block_mask(heads=case.heads), moved, backward)


def sdpa_pattern_run(case: PatternCase, spec: dict, inputs, backward: bool) -> BackendRun:
    """SDPA with the layout's dense bool mask (``[B or 1, 1 or H, T, T]``)."""
    layout, moved, _ = _worker_layout(case, spec, inputs)
    return sdpa_run(layout_dense_mask(layout), moved, backward)


def sdpa_dense_run(case, spec: dict, inputs, backward: bool) -> BackendRun:
    """Dense SDPA without a mask, causal when the pattern thins out causal attention: the
    baseline a sparse pattern is chosen over (another function: timed, not compared)."""
    return dense_sdpa_run(inputs, backward, case.causal)


PATTERN_BACKENDS = {
    "tokenmix": tokenmix_pattern_run,
    "reference": lambda case, spec, inputs, backward: tokenmix_pattern_run(
        case, spec, inputs, backward, reference=True
    ),
    "flex": flex_pattern_run,
    "sdpa": sdpa_pattern_run,
    "sdpa_dense": sdpa_dense_run,
}


# ---------------------------------------------------------------------------
# The pattern table and issue 11's bar
# ---------------------------------------------------------------------------


def _short_params(params: dict) -> str:
    out = []
    for k, v in params.items():
        if k == "cu_seqlens":
            v = f"[{len(v) - 1} docs]"
        elif isinstance(v, list):
            v = ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        elif isinstance(v, float):
            v = f"{v:g}"
        out.append(f"{k}={v}")
    return " ".join(out)


def _cell(row: dict | None) -> str:
    if row is None:
        return "not run"
    if "median_ms" in row:
        text = fmt_float(row["median_ms"])
        return f"{text} WRONG" if row.get("correct") is False else text
    if "lower_bound_ms" in row:
        return f"> {row['lower_bound_ms'] / 1e3:g} s"
    note = row.get("note", row.get("status", "-"))
    return "n/a" if note.startswith("n/a") else note.split(" (")[0]


# Column labels of the pattern table.
SHORT_LABELS = {"flex": "flex", "sdpa": "sdpa+mask", "sdpa_dense": "sdpa dense"}


def pattern_table(cases: list[dict], labels: dict[str, str], markdown: bool) -> list[str]:
    """One row per pattern case: its arguments, layout, exact density, every backend's median
    time per mode (columns where nothing ran are left out), tokenmix's speedup over each peer
    and the correctness verdict; the notes of backends that did not run follow the table."""
    pairs = []  # (backend, mode) columns, in the order the rows have them
    for c in cases:
        for r in c["results"]:
            if (r["backend"], r["mode"]) not in pairs:
                pairs.append((r["backend"], r["mode"]))
    ran = {
        (r["backend"], r["mode"])
        for c in cases
        for r in c["results"]
        if "median_ms" in r or "lower_bound_ms" in r
    }
    dropped = [p for p in pairs if p not in ran]
    pairs = [p for p in pairs if p in ran]
    peers = [(b, m) for b, m in pairs if b != "tokenmix" and ("tokenmix", m) in pairs]

    def short(b: str) -> str:
        return SHORT_LABELS.get(b, labels[b])

    headers = ["pattern", "arguments", "T", "BS", "layout", "density"]
    headers += [f"{short(b)} {m}" for b, m in pairs]
    headers += [f"vs {short(b)} {m}" for b, m in peers]
    headers += ["check"]
    rows, notes = [], []
    for c in cases:
        case = c["case"]
        by = {(r["backend"], r["mode"]): r for r in c["results"]}
        blocks = c["tokenmix_blocks"]
        cells = [
            c["builder"],
            _short_params(c["params"]),
            str(case["seq_len"]),
            str(case["block_size"]),
            f"{blocks['partial']}p+{blocks['full']}f {c['layout_rule']}",
            f"{100 * c['density']:.2f}%",
        ]
        cells += [_cell(by.get(p)) for p in pairs]
        for p in peers:
            r = by.get(p)
            speed = r.get("tokenmix_speedup") if r else None
            lower = ">" if r and r.get("speedup_is_lower_bound") else ""
            cells.append("-" if speed is None else f"{lower}{speed:.2f}x")
        checked = [
            (mode, entries["tokenmix"])
            for mode, entries in c["correctness"].items()
            if "tokenmix" in entries
        ]
        bad = [f"{mode} vs {labels[tm['vs']]}" for mode, tm in checked if not tm["ok"]]
        ran = [r["mode"] for r in c["results"] if r["backend"] == "tokenmix" and "median_ms" in r]
        unchecked = [m for m in ran if m not in dict(checked)]
        if bad:
            verdict = "MISMATCH " + ", ".join(bad)
        elif checked:
            oracles = ", ".join(dict.fromkeys(labels[tm["vs"]] for _, tm in checked))
            verdict = f"OK vs {oracles}"
            if unchecked:
                done = "+".join(m for m, _ in checked)
                verdict = f"{done} OK vs {oracles}; {'+'.join(unchecked)} not checked"
        else:
            verdict = "not checked"
        cells.append(verdict)
        rows.append(cells)
        for r in c["results"]:
            if "median_ms" not in r and (r["backend"], r["mode"]) not in dropped:
                notes.append(f"{c['name']}: {r['label']} {r['mode']}: {r.get('note', '')}")
    for b, m in dropped:
        why = next(
            (
                r.get("note", "")
                for c in cases
                for r in c["results"]
                if (r["backend"], r["mode"]) == (b, m)
            ),
            "",
        )
        notes.insert(0, f"{labels[b]} {m}: {why}")
    title = "Pattern table (tokenmix.patterns; median ms per call)"
    align = "llrrlr" + "r" * (len(headers) - 7) + "l"
    out = [f"### {title}" if markdown else f"== {title}"]
    if markdown:
        out += ["", format_markdown(headers, rows, align), ""]
        out += [f"- {n}" for n in notes]
    else:
        out.append(format_table(headers, rows, align))
        out += [f"  {n}" for n in notes]
    out.append("")
    return out


def is_bar11_case(c: dict, threads: int, quick: bool) -> bool:
    """Whether a case result is one of issue 11's configurations (``--quick``: at its reduced
    length)."""
    case = c["case"]
    if case.get("kind") != "pattern" or case["builder"] not in BAR11_BUILDERS:
        return False
    want = dict(BAR11_CONFIG, seq_len=QUICK_BAR11_SEQ_LEN if quick else BAR11_CONFIG["seq_len"])
    return threads == BAR11_THREADS and all(case[k] == v for k, v in want.items())


def evaluate_bars11(report: dict) -> dict:
    """Issue 11's bar: on each builder of :data:`BAR11_BUILDERS` at :data:`BAR11_CONFIG`,
    tokenmix fwd+bwd at least ``0.35 / density`` times faster than dense causal SDPA fwd+bwd,
    with ``density = kept pairs / (B * H * T^2)``. One check per builder (PASS, FAIL, NOT
    MEASURED, NOT RUN); the bar is PASS when both pass, FAIL when one fails, else
    INCOMPLETE."""
    meta = report["meta"]
    quick = meta["args"].get("quick", False)
    cases = [c for c in report["cases"] if is_bar11_case(c, meta["threads"], quick)]
    checks = []
    for builder in BAR11_BUILDERS:
        c = next((c for c in cases if c["case"]["builder"] == builder), None)
        check = {"case": builder, "density": None, "needs": None, "measured": None}
        if c is None:
            check["verdict"] = "NOT RUN"
            checks.append(check)
            continue
        check["case"] = c["name"]
        need = BAR11_FACTOR / c["density"]
        check.update(density=c["density"], need=need, needs=f">= {need:.3f}x")
        rows = {r["backend"]: r for r in c["results"] if r["mode"] == "fwd+bwd"}
        tm, peer = rows.get("tokenmix"), rows.get("sdpa_dense")
        if tm is None or "median_ms" not in tm:
            why = tm.get("note", "not run") if tm else "not run"
            check["verdict"] = f"NOT MEASURED (tokenmix fwd+bwd: {why})"
        elif peer is None or "tokenmix_speedup" not in peer:
            why = peer.get("note", "not run") if peer else "not run"
            check["verdict"] = f"NOT MEASURED (sdpa dense causal fwd+bwd: {why})"
        else:
            value = peer["tokenmix_speedup"]
            lower = bool(peer.get("speedup_is_lower_bound"))
            check.update(value=value, measured=f"{'>' if lower else ''}{value:.3f}x")
            check["tokenmix_ms"] = tm["median_ms"]
            check["sdpa_ms"] = peer.get("median_ms")
            fwd = next(
                (r for r in c["results"] if r["backend"] == "tokenmix" and r["mode"] == "fwd"),
                None,
            )
            wrong = tm.get("correct") is False or (fwd is not None and fwd.get("correct") is False)
            check["verdict"] = check_verdict(value, need, lower_bound=lower, wrong=wrong)
        checks.append(check)
    verdict = bar_verdict(checks)
    text = (
        f"fwd+bwd >= {BAR11_FACTOR} / density x faster than dense causal SDPA fwd+bwd "
        f"(T={BAR11_CONFIG['seq_len']}, B=1, H=4, D=64, float32, {BAR11_THREADS} threads)"
    )
    return {"bar": text, "checks": checks, "verdict": verdict, "quick": quick}


BAR11_HEADERS = ("case", "density", "tokenmix fwd+bwd ms", "sdpa dense ms", "measured", "needs")


def render_bars11(bar: dict, markdown: bool) -> list[str]:
    head = "Bar (issue 11)"
    if bar["quick"]:
        head += f" -- quick run: T={QUICK_BAR11_SEQ_LEN}, the bar is defined at T=16384"
    rows = []
    for ch in bar["checks"]:
        rows.append(
            [
                ch["case"],
                "-" if ch["density"] is None else f"{ch['density']:.5f}",
                fmt_float(ch.get("tokenmix_ms")),
                fmt_float(ch.get("sdpa_ms")),
                ch["measured"] or "-",
                ch["needs"] or "-",
                ch["verdict"],
            ]
        )
    headers = (*BAR11_HEADERS, "verdict")
    out = [f"### {head}" if markdown else f"== {head}"]
    if markdown:
        out += ["", format_markdown(headers, rows, "lrrrrrl"), ""]
    else:
        out.append(format_table(headers, rows, "lrrrrrl"))
    lines = [
        "density = kept pairs / (B * H * T^2), counted exactly from the layout",
        "measured = dense causal SDPA fwd+bwd median / tokenmix fwd+bwd median (same run)",
        f"bar: {bar['bar']}: {bar['verdict']}",
    ]
    out += [f"- {line}" if markdown else f"  {line}" for line in lines]
    out.append("")
    return out
