"""bench/harness.py, the machinery every benchmark shares: the sweep options, the bars'
verdicts, ``--plot`` (a valid PNG with matplotlib; without it one clear line naming
``pip install matplotlib``, before anything is measured, in every script) and the scripts'
use of it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from bench_scripts import BENCH_DIR, bench_script, import_bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCRIPTS = ("bench_na", "bench_block_sparse", "bench_linear")


def assert_png(path) -> None:
    """``path`` is a PNG that matplotlib can read back, of a plausible size."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300


def test_every_benchmark_uses_the_harness():
    """One harness: every script imports its machinery from bench/harness.py, and bench/common.py
    is gone."""
    assert not (BENCH_DIR / "common.py").exists()
    for name in SCRIPTS:
        text = bench_script(name).read_text()
        assert re.search(r"^from harness import \(", text, re.M), name
    for name in ("bench_na", "bench_block_sparse"):
        assert "attention_main(BENCHMARK, argv)" in bench_script(name).read_text()
    # bench_na.py uses the library's neighborhood window rule, not a copy of it.
    na = bench_script("bench_na").read_text()
    assert "from tokenmix.neighborhood.reference import window_bounds" in na
    assert "group_len" not in na and "leader" not in na


def test_parse_int_list():
    harness = import_bench("harness")
    assert harness.parse_int_list("2048, 4096,2048", "--seq-lens") == [2048, 4096]
    for bad in ("", "a,b", "0,1024", "-5"):
        with pytest.raises(SystemExit, match="--seq-lens"):
            harness.parse_int_list(bad, "--seq-lens")


def test_verdicts():
    harness = import_bench("harness")
    assert harness.check_verdict(5.6, 5.6) == "PASS"
    assert harness.check_verdict(1.0, 1.0, strict=True) == "FAIL"
    assert harness.check_verdict(3.0, 5.0) == "FAIL"
    assert harness.check_verdict(3.0, 5.0, lower_bound=True).startswith("NOT MEASURED")
    assert harness.check_verdict(9.0, 5.0, wrong=True) == "FAIL (wrong output)"
    assert harness.bar_verdict([{"verdict": "PASS"}, {"verdict": "PASS"}]) == "PASS"
    assert harness.bar_verdict([{"verdict": "PASS"}, {"verdict": "NOT RUN"}]) == "INCOMPLETE"
    assert harness.bar_verdict([{"verdict": "NOT RUN"}, {"verdict": "FAIL"}]) == "FAIL"
    assert harness.bar_verdict([]) == "INCOMPLETE"


def _points():
    """Two series, three backends, two modes; one peer stopped (a lower bound), one not run."""
    points = []
    for series, scale in (("sliding-bs64", 1.0), ("random-bs64", 0.5)):
        for x in (1024, 2048, 4096):
            for backend, label, per in (
                ("tokenmix", "tokenmix", 1.0),
                ("flex", "flex (compiled)", 2.0),
                ("sdpa", "sdpa+mask", 0.01 * x),
            ):
                for mode in ("fwd", "fwd+bwd"):
                    ms = scale * per * x / 1024 * (3.5 if mode == "fwd+bwd" else 1.0)
                    point = {
                        "series": series,
                        "x": x,
                        "backend": backend,
                        "label": label,
                        "mode": mode,
                        "ms": ms,
                        "lower_bound_ms": None,
                    }
                    if backend == "flex" and mode == "fwd+bwd":
                        point["ms"] = None  # n/a
                    if backend == "sdpa" and x == 4096:
                        point.update(ms=None, lower_bound_ms=30000.0)
                    points.append(point)
    return points


def test_plot_sweep_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    harness = import_bench("harness")
    path = tmp_path / "sweep.png"
    harness.plot_sweep(str(path), _points(), title="block-sparse attention: test")
    assert_png(path)
    # One series: the title names it, no series legend entries.
    one = [p for p in _points() if p["series"] == "sliding-bs64"]
    harness.plot_sweep(str(tmp_path / "one.png"), one, title="t", x_label="tokens")
    assert_png(tmp_path / "one.png")


def test_sweep_points_from_a_report():
    harness = import_bench("harness")
    cases = [
        {
            "name": f"sliding-bs64-T{t}",
            "tokens": t,
            "series": "sliding-bs64",
            "results": [
                {"backend": "tokenmix", "label": "tokenmix", "mode": "fwd", "median_ms": 1.0},
                {"backend": "sdpa", "label": "sdpa+mask", "mode": "fwd", "lower_bound_ms": 3e4},
            ],
        }
        for t in (1024, 2048)
    ]
    points = harness.sweep_points(
        cases, x=lambda c: c["tokens"], series=lambda c: c["series"], labels={"sdpa": "SDPA"}
    )
    assert [(p["x"], p["label"], p["ms"], p["lower_bound_ms"]) for p in points] == [
        (1024, "tokenmix", 1.0, None),
        (1024, "SDPA", None, 3e4),
        (2048, "tokenmix", 1.0, None),
        (2048, "SDPA", None, 3e4),
    ]


def test_require_matplotlib_without_it(monkeypatch, capsys):
    """The import failing (``sys.modules[name] = None`` makes ``import name`` raise
    ImportError) gives one line naming ``pip install matplotlib`` and exit status 2."""
    harness = import_bench("harness")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exc:
        harness.require_matplotlib("bench_x.py")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("bench_x.py: --plot needs matplotlib")
    assert err[0].endswith("pip install matplotlib")


@pytest.mark.parametrize("name", SCRIPTS)
def test_plot_without_matplotlib_fails_at_once(name, tmp_path):
    """Each script with ``--plot`` and an unimportable matplotlib (a package of that name on
    PYTHONPATH whose import raises) stops before measuring anything: exit status 2, nothing on
    stdout, one line on stderr."""
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib is hidden by the test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(fake.parent), env.get("PYTHONPATH", "")) if p
    )
    out = tmp_path / "x.png"
    size = ["--T", "128"] if name == "bench_linear" else ["--quick"]
    proc = subprocess.run(
        [sys.executable, str(bench_script(name)), *size, "--plot", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{name}.py: --plot needs matplotlib")
    assert "matplotlib is hidden by the test" in lines[0]
    assert lines[0].endswith("pip install matplotlib")
    assert not out.exists()


@pytest.mark.slow
def test_bench_linear_sweep_and_plot(tmp_path):
    """bench_linear.py --seq-lens: one case per length, the harness's ceiling (start and end,
    the higher used) and the plot."""
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "linear.png", tmp_path / "linear.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(bench_script("bench_linear")),
            "--variant",
            "linear",
            "--seq-lens",
            "128,256",
            "--backends",
            "fused,chunked",
            "--repeats",
            "2",
            "--plot",
            str(png),
            "--json",
            str(js),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(js.read_text())
    assert [c["seq"] for c in report["cases"]] == [128, 256]
    matmul = report["meta"]["matmul"]
    assert report["meta"]["matmul_gflops"] == max(matmul["gflops_start"], matmul["gflops_end"])
    assert "measuring float32 matmul 2048x2048 with 2 threads" in proc.stderr
    assert "torch.matmul" in matmul["libraries"]["start"]
    # The report's header names the library that set the ceiling.
    fastest = harness_fastest(matmul)
    assert re.search(rf"matmul 2048x2048: [0-9.]+ GFLOP/s \({re.escape(fastest)}[;)]", proc.stdout)
    assert report["meta"]["matmul_gflops"] == max(
        max(matmul["libraries"]["start"].values()), max(matmul["libraries"]["end"].values())
    )
    assert f"wrote {png}" in proc.stderr
    assert_png(png)


def test_example_plot_is_documented():
    """docs/performance.md shows the committed example plot with the command that draws it."""
    root = BENCH_DIR.parent
    doc = (root / "docs" / "performance.md").read_text()
    png = root / "docs" / "images" / "bench_block_sparse_sliding.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "](images/bench_block_sparse_sliding.png)" in doc
    command = re.search(r"bench_block_sparse\.py --case sliding [^`]*?\.png", doc, re.S)
    assert command is not None
    assert "--seq-lens 2048,4096,8192,16384" in command.group(0)
    assert "--plot docs/images/bench_block_sparse_sliding.png" in command.group(0)
    assert "## Sparse-attention patterns" in doc


def harness_fastest(matmul: dict) -> str:
    """The library whose figure is the ceiling in a report's ``meta["matmul"]``."""
    figures = {**matmul["libraries"]["start"]}
    for name, g in matmul["libraries"]["end"].items():
        figures[name + " (end)"] = g
    best = max(figures, key=figures.get)
    return best.removesuffix(" (end)")


def test_matmul_ceiling_is_the_fastest_right_library(monkeypatch):
    """The ceiling is the fastest library's product, and a library whose product is wrong is
    left out: torch.matmul (MKL on the CPU) runs a slow path on AMD CPUs, so oneDNN is measured
    too (where torch has it), and a wrong fast product must not set the ceiling."""
    import torch

    harness = import_bench("harness")
    real = harness.measure_matmul_libraries(1, n=128)
    assert set(real) >= {"torch.matmul"} and all(g > 0 for g in real.values())
    if torch.backends.mkldnn.is_available():
        assert "oneDNN" in real  # float32 on the CPU: oneDNN's product is measured and right
    assert set(harness.measure_matmul_libraries(1, n=64, dtype=torch.float64)) == {"torch.matmul"}

    n = 64
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    slow_right = lambda: [torch.matmul(a, b) for _ in range(20)][-1]  # noqa: E731
    fast_wrong = lambda: torch.zeros(n, n)  # noqa: E731

    def use_calls(calls):  # the libraries measure_matmul_libraries times, replaced
        monkeypatch.setattr(harness, "_matmul_calls", lambda *_: (a @ b, calls))

    use_calls({"torch.matmul": slow_right, "wrong": fast_wrong})
    got = harness.measure_matmul_libraries(1, n=n, repeats=3)
    assert set(got) == {"torch.matmul"}

    fast_right = lambda: torch.matmul(a, b)  # noqa: E731
    use_calls({"torch.matmul": slow_right, "fast": fast_right})
    got = harness.measure_matmul_libraries(1, n=n, repeats=5)
    assert got["fast"] > got["torch.matmul"]
    monkeypatch.setattr(harness, "measure_matmul_libraries", lambda *_, **__: {"x": 2.0, "y": 5.0})
    assert harness.measure_matmul_gflops(1) == 5.0


def test_run_ceiling_records_the_libraries(monkeypatch):
    """RunCeiling keeps each library's figure at the start and the end; the report header
    names the library that set the ceiling and the others' figures."""
    harness = import_bench("harness")
    figures = iter(
        [{"torch.matmul": 100.0, "oneDNN": 250.0}, {"torch.matmul": 110.0, "oneDNN": 240.0}]
    )
    monkeypatch.setattr(harness.RunCeiling, "_measure", lambda self: next(figures))
    monkeypatch.setattr(harness, "cpu_busy_fraction", lambda: 0.0)
    ceiling = harness.RunCeiling(1, 64, None, "float32")
    assert ceiling.start() == 250.0
    cases = [{"results": [{"gflops": 125.0}]}]
    assert ceiling.finish(cases) == 250.0
    assert cases[0]["results"][0]["frac_matmul"] == 0.5
    meta = ceiling.meta()
    assert meta["libraries"] == {
        "start": {"torch.matmul": 100.0, "oneDNN": 250.0},
        "end": {"torch.matmul": 110.0, "oneDNN": 240.0},
    }
    report_meta = {
        "device": "cpu",
        "machine": {"cpu": "x", "torch": "2.13.0"},
        "threads": 1,
        "tokenmix": {"version": "0"},
        "dtype": "float32",
        "matmul": meta,
    }
    head = harness.report_header(report_meta, "fam", markdown=False)[0]
    assert head.endswith("matmul 64x64: 250.0 GFLOP/s (oneDNN; torch.matmul 100.0)")
    # A report from before the libraries were recorded keeps its plain header.
    del report_meta["matmul"]["libraries"]
    assert harness.report_header(report_meta, "fam", markdown=False)[0].endswith("250.0 GFLOP/s")


def test_matmul_ceiling_without_onednn_or_with_a_failing_library(monkeypatch):
    """Without oneDNN (the op missing, or torch built without it) the ceiling is torch.matmul's;
    a library that raises or has reduced precision (a tf32-like product) is left out."""
    import torch

    harness = import_bench("harness")
    if torch.backends.mkldnn.is_available():
        with monkeypatch.context() as m:
            m.delattr(torch._C._nn, "mkldnn_linear")
            assert set(harness.measure_matmul_libraries(1, n=64, repeats=2)) == {"torch.matmul"}
    with monkeypatch.context() as m:
        m.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        assert set(harness.measure_matmul_libraries(1, n=64, repeats=2)) == {"torch.matmul"}

    n = 256
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)

    def tf32_like(x):  # keep 10 mantissa bits, as a tf32 product would
        return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)

    def raises():
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(
        harness,
        "_matmul_calls",
        lambda *_: (
            a @ b,
            {
                "torch.matmul": lambda: a @ b,
                "tf32": lambda: tf32_like(a) @ tf32_like(b),
                "broken": raises,
                "nan": lambda: torch.full((n, n), float("nan")),
            },
        ),
    )
    assert set(harness.measure_matmul_libraries(1, n=n, repeats=2)) == {"torch.matmul"}


def test_header_names_the_measurement_that_set_the_ceiling():
    """When the end measurement is the higher, the header shows its per-library figures."""
    harness = import_bench("harness")
    matmul = {
        "n": 64,
        "gflops": 300.0,
        "libraries": {
            "start": {"torch.matmul": 100.0, "oneDNN": 250.0},
            "end": {"torch.matmul": 120.0, "oneDNN": 300.0},
        },
    }
    assert harness.ceiling_libraries_note(matmul) == " (oneDNN; torch.matmul 120.0)"
    matmul["libraries"]["end"] = {"torch.matmul": 90.0, "oneDNN": 200.0}
    assert harness.ceiling_libraries_note(matmul) == " (oneDNN; torch.matmul 100.0)"
    assert harness.ceiling_libraries_note({"n": 64, "gflops": 1.0}) == ""


def test_paired_ceiling_alternates_matmul_and_call(monkeypatch):
    """--paired-ceiling times one matmul product (the fastest right library) right before each
    call, at least PAIRED_MIN_PAIRS pairs, more within the time budget, at most max_repeats;
    setup runs before each call, outside its time."""
    import torch

    harness = import_bench("harness")
    n = 64
    a, b = torch.randn(n, n), torch.randn(n, n)
    events: list[str] = []

    def product(name, loops):
        def call():
            events.append(name)
            return [torch.matmul(a, b) for _ in range(loops)][-1]

        return call

    calls = {"slow": product("slow", 40), "fast": product("fast", 1)}
    monkeypatch.setattr(harness, "checked_matmul_calls", lambda *_: calls)
    monkeypatch.setitem(harness.MATMUL_N, "cpu", n)
    spec = {"ceiling_dtype": "float32", "budget_s": 0.0, "max_repeats": 50}
    got = harness.measure_paired(
        spec, lambda: events.append("call"), setup=lambda: events.append("setup")
    )
    assert got["library"] == "fast" and got["n"] == n
    pairs = harness.PAIRED_MIN_PAIRS
    assert len(got["call_ms"]) == len(got["matmul_ms"]) == pairs
    timed = [e for e in events if e in ("fast", "call", "setup")][-3 * pairs :]
    assert timed == ["fast", "setup", "call"] * pairs
    # A budget: more pairs, up to max_repeats.
    spec.update(budget_s=30.0, max_repeats=pairs + 3)
    got = harness.measure_paired(spec, lambda: None)
    assert len(got["call_ms"]) == pairs + 3


def test_paired_fraction_is_the_median_of_the_pairs():
    """Each call is measured against its own pair's matmul: a slow stretch that slows both a
    call and its matmul leaves the call's fraction as it was."""
    harness = import_bench("harness")
    n = 1000  # 2e9 FLOPs per product
    # Call i: 1e9 FLOPs. Pairs 1 and 2 ran in a slow stretch at half speed for both.
    paired = {"n": n, "matmul_ms": [10.0, 20.0, 20.0], "call_ms": [10.0, 20.0, 20.0]}
    frac, matmul = harness.paired_fraction(paired, 1e9)
    assert frac == pytest.approx(0.5)
    assert matmul == pytest.approx(100.0)  # the median pair: 2e9 FLOPs in 20 ms
    paired = {"n": n, "matmul_ms": [10.0, 10.0, 10.0], "call_ms": [4.0, 5.0, 20.0]}
    assert harness.paired_fraction(paired, 1e9)[0] == pytest.approx(1.0)  # 1.25, 1.0, 0.25
    # The median of the pairs' fractions (0.25, 1.0, 0.25), not the ratio of the medians (0.5).
    paired = {"n": n, "matmul_ms": [10.0, 20.0, 20.0], "call_ms": [20.0, 10.0, 40.0]}
    assert harness.paired_fraction(paired, 1e9)[0] == pytest.approx(0.25)
    row = {"frac_matmul": 0.4, "frac_paired": 0.5}
    assert harness.frac_cell(row) == "40.0% (paired 50.0%)"
