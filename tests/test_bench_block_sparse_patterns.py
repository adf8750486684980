"""bench/bench_block_sparse.py's pattern table (``--patterns``), issue 11's bar
(``--issue11-bars``), the sequence-length sweep (``--seq-lens``) and ``--plot``: the cases
each option selects, the builders' layouts and their exact density and dense mask (against
the library's element-by-element ones), the bar's thresholds, and two ``--quick`` runs
(output structure, JSON, the PNG)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from bench_scripts import bench_script, import_bench
from test_bench_harness import assert_png

BENCH = bench_script("bench_block_sparse")


def _args(*argv: str):
    """The parsed options of ``bench_block_sparse.py argv`` (with the CPU's dtype)."""
    bench = import_bench("bench_block_sparse")
    args = import_bench("harness").attention_parser(bench.BENCHMARK).parse_args(list(argv))
    args.dtype = args.dtype or "float32"
    return args


def _cases(*argv: str):
    return import_bench("bench_block_sparse").select_cases(_args(*argv))


def test_case_selection():
    bench = import_bench("bench_block_sparse")
    pc = import_bench("pattern_cases")
    # No option: the issue-10 cases at both block sizes, T=8192, named as before.
    names = [c.name for c in _cases()]
    assert names == [f"{p}-bs{bs}" for p in bench.PATTERNS for bs in (64, 128)]
    # --patterns alone: every builder once, BLOCK_SIZE 128, T=8192, and no issue-10 case.
    cases = _cases("--patterns")
    assert [c.builder for c in cases] == list(pc.PATTERN_BUILDERS)
    assert len(pc.PATTERN_BUILDERS) == 11
    assert {(c.block_size, c.seq_len) for c in cases} == {(128, 8192)}
    assert all(isinstance(c, pc.PatternCase) for c in cases)
    # --issue11-bars alone: the two bar cases at T=16384, BLOCK_SIZE 64, B=1 H=4 D=64 fp32.
    cases = _cases("--issue11-bars")
    assert [c.name for c in cases] == ["sliding_window-bs64-T16384", "topk_blocks-bs64-T16384"]
    assert all(
        (c.seq_len, c.batch, c.heads, c.head_dim, c.dtype) == (16384, 1, 4, 64, "float32")
        for c in cases
    )
    # A sweep: one case per length, the length in the name; --case with --patterns runs both.
    cases = _cases("--case", "sliding", "--block-size", "64", "--seq-lens", "2048,4096")
    assert [c.name for c in cases] == ["sliding-bs64-T2048", "sliding-bs64-T4096"]
    assert [c.seq_len for c in cases] == [2048, 4096]
    cases = _cases("--case", "random", "--patterns", "radial,multi_axis", "--quick")
    assert [c.name for c in cases] == [
        "random-bs64",
        "random-bs128",
        "radial-bs128",
        "multi_axis-bs128",
    ]
    assert [c.seq_len for c in cases] == [1024] * 4


def test_case_selection_errors():
    with pytest.raises(SystemExit, match="--patterns: unknown 'nope'"):
        _cases("--patterns", "sliding_window,nope")
    with pytest.raises(SystemExit, match="radial needs T to be a multiple"):
        _cases("--patterns", "radial", "--seq-lens", "5000")
    with pytest.raises(SystemExit, match="multi_axis needs"):
        _cases("--patterns", "multi_axis", "--block-size", "96")
    with pytest.raises(SystemExit, match="--seq-lens"):
        _cases("--seq-lens", "1024,x")


def test_default_backends():
    bench = import_bench("bench_block_sparse")
    assert bench.default_backends(_args()) == ["tokenmix", "flex", "sdpa"]
    assert bench.default_backends(_args("--patterns")) == ["tokenmix", "flex", "sdpa"]
    assert bench.default_backends(_args("--issue11-bars")) == ["tokenmix", "flex", "sdpa_dense"]
    both = bench.default_backends(_args("--patterns", "--issue11-bars"))
    assert both == ["tokenmix", "flex", "sdpa", "sdpa_dense"]
    assert "sdpa_dense" in bench.UNCHECKED


@pytest.mark.parametrize("block_size", [64, 128])
def test_pattern_layouts_exact(block_size):
    """Every builder at --quick's size: the benchmark's block-wise kept-pair count and dense
    mask equal the library's element-by-element ones, the reordered inputs are permutations of
    the originals, and the worker rebuilds the parent's layout (same fingerprint)."""
    pc = import_bench("pattern_cases")
    harness = import_bench("harness")
    for builder in pc.PATTERN_BUILDERS:
        case = pc.PatternCase(builder, builder, block_size, **pc.QUICK_PATTERN_SIZES)
        assert pc.check_pattern_case(case) is None
        inputs = harness.attention_inputs(case.input_shape, case.dtype, 0)
        layout, moved = pc.build_pattern(case, inputs)
        assert layout.block_size == (block_size, block_size)
        assert layout.seq_lengths == (case.seq_len, case.seq_len)
        assert layout.heads == case.mask_heads
        dense = pc.layout_dense_mask(layout)
        assert torch.equal(dense, layout.dense_mask()), builder
        pairs = pc.layout_kept_pairs(layout, case.batch, case.heads)
        assert pairs == layout.kept_pairs(case.batch, case.heads), builder
        assert pairs == int(dense.sum()) * case.heads // dense.shape[1]
        assert set(moved) == {"q", "k", "v", "dout"}
        for name, x in moved.items():
            assert x.shape == inputs[name].shape
            assert torch.equal(x.sort(dim=1).values, inputs[name].sort(dim=1).values)
        reordered = {n for n in moved if not torch.equal(moved[n], inputs[n])}
        expect = {
            "multi_axis": {"q", "k", "v", "dout"},
            "permuted_blocks": {"k", "v"} if case.seq_len > pc.PERMUTED_SEGMENT else set(),
        }.get(builder, set())
        assert reordered == expect, builder
        again, _ = pc.build_pattern(case, inputs)
        assert pc.layout_digest(again) == pc.layout_digest(layout)
        prep = pc.prepare_pattern_case(case, inputs)
        assert prep["kept_pairs"] == pairs
        assert prep["density"] == pairs / (case.heads * case.seq_len**2)


def test_pattern_params_documented():
    """The arguments bench/README.md lists, at the table's size (T=8192, W=1024)."""
    pc = import_bench("pattern_cases")

    def params(builder, bs=128, heads=4):
        return pc.pattern_params(pc.PatternCase(builder, builder, bs, 8192, heads=heads))

    assert params("sliding_window") == {"window": 1024, "sinks": 64, "causal": True}
    assert params("per_head_windows")["windows"] == [256, 512, 1024, 2048]
    assert params("per_head_windows", heads=8)["windows"] == [256, 512, 1024, 2048] * 2
    e = params("elastic_windows")
    import tokenmix

    assert tokenmix.patterns.elastic_window_sizes(8192, e["alpha"], e["beta"]) == [
        256,
        384,
        768,
        1280,
    ]
    assert params("dilated") == {"window": 2048, "dilation": 2, "causal": True}
    assert params("power_attention")["window"] == 8
    assert params("power_attention", bs=64)["window"] == 16
    assert params("radial") == {"frames": 16, "tokens_per_frame": 512}
    doc = params("document")
    assert len(doc["cu_seqlens"]) == 9 and doc["cu_seqlens"][0] == 0
    assert doc["cu_seqlens"][-1] == 8192 and doc["causal"] is True
    assert params("prefix_lm") == {"prefix_len": 2048}
    assert params("multi_axis")["axes"] == ["block", "block", "grid", "grid"]
    assert (params("multi_axis")["height"], params("multi_axis")["width"]) == (128, 64)
    assert params("permuted_blocks") == {"segment_size": 1024, "threshold": 0.9}
    assert pc.TOPK_DENSITY == 1 / 16
    # The issue-10 document case and the builder's use the same boundaries.
    bench = import_bench("bench_block_sparse")
    case = bench.Case("document-bs64", "document", 64, **bench.FULL_SIZES)
    ids = bench.pattern_data(case)["doc"]
    starts = [0, *((ids[1:] != ids[:-1]).nonzero().flatten() + 1).tolist(), 8192]
    assert starts == doc["cu_seqlens"]


@pytest.mark.parametrize(("seq_len", "block_size"), [(16384, 64), (16384, 128), (2048, 64)])
def test_topk_density(seq_len, block_size):
    """topk_for_density's formula is the layout's exact density, and the closest to 1/16."""
    pc = import_bench("pattern_cases")
    topk = pc.topk_for_density(seq_len, block_size, 1 / 16)
    n = seq_len // block_size

    def formula(k):
        diag = block_size * (block_size + 1) // 2
        return sum((min(k, i + 1) - 1) * block_size**2 + diag for i in range(n)) / seq_len**2

    assert all(abs(formula(topk) - 1 / 16) <= abs(formula(k) - 1 / 16) for k in range(3, n + 1))
    if seq_len == 16384:
        assert topk == (17 if block_size == 64 else 9)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, seq_len, 2, 16, generator=gen)
    k = torch.randn(1, seq_len, 2, 16, generator=gen)
    import tokenmix

    layout = tokenmix.patterns.topk_blocks(q, k, block_size, topk=topk, sinks=1, local=1)
    pairs = pc.layout_kept_pairs(layout, 1, 2)
    assert pairs / (2 * seq_len**2) == pytest.approx(formula(topk), abs=1e-12)


def _result(builder, density, tm_ms, dense_ms, correct=True, seq_len=16384, bs=64):
    return {
        "name": f"{builder}-bs{bs}-T{seq_len}",
        "case": {
            "kind": "pattern",
            "builder": builder,
            "block_size": bs,
            "seq_len": seq_len,
            "batch": 1,
            "heads": 4,
            "head_dim": 64,
            "dtype": "float32",
        },
        "density": density,
        "results": [
            {"backend": "tokenmix", "mode": "fwd", "median_ms": 1.0, "correct": correct},
            {"backend": "tokenmix", "mode": "fwd+bwd", "median_ms": tm_ms},
            {
                "backend": "sdpa_dense",
                "mode": "fwd+bwd",
                "median_ms": dense_ms,
                "tokenmix_speedup": dense_ms / tm_ms,
            },
        ],
    }


def test_bars11_thresholds():
    """Issue 11's bar needs 0.35 / density (density = kept / (B*H*T^2)): 5.6x at 1/16."""
    pc = import_bench("pattern_cases")
    meta = {"threads": 2, "args": {"quick": False}}
    ok = _result("sliding_window", 0.066, 1000.0, 8000.0)
    low = _result("topk_blocks", 1 / 16, 1000.0, 5500.0)
    bar = pc.evaluate_bars11({"meta": meta, "cases": [ok, low]})
    assert [ch["verdict"] for ch in bar["checks"]] == ["PASS", "FAIL"]
    assert bar["checks"][1]["need"] == pytest.approx(5.6)
    assert bar["checks"][1]["needs"] == ">= 5.600x"
    assert bar["verdict"] == "FAIL"
    fast = _result("topk_blocks", 1 / 16, 1000.0, 5700.0)
    assert pc.evaluate_bars11({"meta": meta, "cases": [ok, fast]})["verdict"] == "PASS"
    wrong = _result("topk_blocks", 1 / 16, 1000.0, 9000.0, correct=False)
    bar = pc.evaluate_bars11({"meta": meta, "cases": [ok, wrong]})
    assert bar["checks"][1]["verdict"] == "FAIL (wrong output)"
    # Another configuration (threads, T) is not the bar's: NOT RUN, INCOMPLETE.
    bar = pc.evaluate_bars11({"meta": dict(meta, threads=4), "cases": [ok, fast]})
    assert [ch["verdict"] for ch in bar["checks"]] == ["NOT RUN", "NOT RUN"]
    assert bar["verdict"] == "INCOMPLETE"
    other_t = _result("topk_blocks", 1 / 16, 1000.0, 9000.0, seq_len=8192)
    bar = pc.evaluate_bars11({"meta": meta, "cases": [ok, other_t]})
    assert bar["checks"][1]["verdict"] == "NOT RUN"
    text = "\n".join(pc.render_bars11(bar, markdown=False))
    assert "== Bar (issue 11)" in text and "bar: fwd+bwd >= 0.35 / density" in text


def _run(tmp_path, name, *argv):
    path = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", *argv, "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    report = json.loads(path.read_text()) if path.exists() else None
    return proc, report


@pytest.fixture(scope="module")
def bars_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("bench_bs_bars"), "bars", "--issue11-bars")


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_bs_sweep")
    png = tmp / "sweep.png"
    proc, report = _run(
        tmp,
        "sweep",
        "--patterns",
        "multi_axis,permuted_blocks",
        "--seq-lens",
        "1024,2048",
        "--backends",
        "tokenmix,sdpa",
        "--forward",
        "--plot",
        str(png),
    )
    return proc, report, png


def _kernels() -> bool:
    import tokenmix  # noqa: F401

    return hasattr(torch.ops.tokenmix, "block_sparse_forward")


@pytest.mark.slow
def test_quick_bars_run(bars_run):
    """``--quick --issue11-bars``: the two bar cases at T=2048, tokenmix / dense causal SDPA /
    Flex, the pattern table and the bar section with its caveat."""
    proc, report = bars_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert [c["name"] for c in report["cases"]] == [
        "sliding_window-bs64-T2048",
        "topk_blocks-bs64-T2048",
    ]
    assert "== Bars (issue 10" not in out and "bars" not in report
    assert "== Pattern table (tokenmix.patterns; median ms per call)" in out
    assert "== Bar (issue 11) -- quick run: T=2048" in out
    assert re.search(r"^  bar: fwd\+bwd >= 0.35 / density .*: (PASS|FAIL|INCOMPLETE)$", out, re.M)
    for c in report["cases"]:
        backends = {(r["backend"], r["mode"]) for r in c["results"]}
        assert backends == {
            (b, m) for b in ("tokenmix", "flex", "sdpa_dense") for m in ("fwd", "fwd+bwd")
        }
        dense = [r for r in c["results"] if r["backend"] == "sdpa_dense"]
        assert all(r["status"] == "ok" and "diff_vs" not in r for r in dense)
        assert c["density"] == c["kept_pairs"] / (4 * 2048**2)
    bar = report["bars11"]
    assert [ch["case"] for ch in bar["checks"]] == [c["name"] for c in report["cases"]]
    if not _kernels():
        assert bar["verdict"] == "INCOMPLETE"
        pytest.skip("no block-sparse kernels in this build: the tokenmix rows are n/a")
    for c, ch in zip(report["cases"], bar["checks"], strict=True):
        assert ch["need"] == pytest.approx(0.35 / c["density"])
        rows = {(r["backend"], r["mode"]): r for r in c["results"]}
        tm, dense = rows[("tokenmix", "fwd+bwd")], rows[("sdpa_dense", "fwd+bwd")]
        assert ch["value"] == pytest.approx(dense["median_ms"] / tm["median_ms"])
        assert ch["verdict"] in ("PASS", "FAIL")
        # Flex (compiled) is the forward's oracle here.
        assert c["correctness"]["fwd"]["tokenmix"]["vs"] == "flex"
        assert c["correctness"]["fwd"]["tokenmix"]["ok"] is True


@pytest.mark.slow
def test_quick_sweep_run(sweep_run):
    """``--quick --patterns multi_axis,permuted_blocks --seq-lens 1024,2048 --plot``: one case
    per builder and length, the pattern table with exact densities, tokenmix checked against
    SDPA with the layout's dense mask, and the plot."""
    proc, report, png = sweep_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [c["name"] for c in report["cases"]] == [
        "multi_axis-bs128-T1024",
        "multi_axis-bs128-T2048",
        "permuted_blocks-bs128-T1024",
        "permuted_blocks-bs128-T2048",
    ]
    assert [c["series"] for c in report["cases"]] == ["multi_axis-bs128"] * 2 + [
        "permuted_blocks-bs128"
    ] * 2
    lines = proc.stdout.splitlines()
    start = lines.index("== Pattern table (tokenmix.patterns; median ms per call)")
    header = re.split(r"\s{2,}", lines[start + 1].strip())
    assert header == [
        "pattern",
        "arguments",
        "T",
        "BS",
        "layout",
        "density",
        "tokenmix fwd",
        "sdpa+mask fwd",
        "vs sdpa+mask fwd",
        "check",
    ]
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[start + 3 : start + 7]]
    assert [(r[0], r[2]) for r in rows] == [
        ("multi_axis", "1024"),
        ("multi_axis", "2048"),
        ("permuted_blocks", "1024"),
        ("permuted_blocks", "2048"),
    ]
    for row, c in zip(rows, report["cases"], strict=True):
        assert row[5] == f"{100 * c['density']:.2f}%"
        if c["builder"] == "multi_axis":
            assert c["density"] == 256 / c["case"]["seq_len"]  # 16x16 windows and grid
            assert row[4].endswith("none")  # full blocks only
    assert f"wrote {png}" in proc.stderr
    assert_png(png)
    if not _kernels():
        pytest.skip("no block-sparse kernels in this build: the tokenmix rows are n/a")
    for row, c in zip(rows, report["cases"], strict=True):
        assert row[-1] == "OK vs sdpa+mask"
        tm = next(r for r in c["results"] if r["backend"] == "tokenmix")
        assert tm["diff_vs"] == "sdpa" and tm["correct"] is True
