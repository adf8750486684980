"""bench/bench_fft.py: the counted FLOPs and transform lengths, the case selection, the bars'
verdicts on synthetic rows, one ``--quick`` run of two cases (JSON structure, times,
correctness) and the ``--device cuda`` refusal on a machine without a usable GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from bench_scripts import assert_cuda_refused, bench_script, import_bench

BENCH = bench_script("bench_fft")


def _bench():
    return import_bench("bench_fft")


def _case(name: str, quick: bool = False):
    (case,) = _bench().select_cases(name, quick, "float32")
    return case


def test_transform_lengths():
    bench = _bench()
    # The smallest even 2^a 3^b 5^c >= L + Lk - 1 (causal); L itself (circular).
    assert bench.conv_transform_length(16384, 16384) == 32768
    assert bench.conv_transform_length(1024, 1024) == 2048
    assert bench.conv_transform_length(65536, 65536) == 131072
    assert bench.conv_transform_length(1000, 1000) == 2000  # 1999 -> 2000 = 2^4 5^3
    assert bench.conv_transform_length(7, 7) == 16  # 13 -> 14 = 2 * 7 is not smooth
    assert bench.conv_transform_length(100, 30) == 144  # 129 -> 130 = 2 * 5 * 13, ... 144
    assert bench.conv_transform_length(1000, 1000, causal=False) == 1000
    for n in range(2, 400):
        m = bench.conv_transform_length(n, 1)
        assert m >= n and m % 2 == 0 and bench.is_smooth(m)
        assert not any(bench.is_smooth(j) for j in range(n + n % 2, m, 2))


def test_counted_flops():
    def tf(n):
        return 2.5 * n * math.log2(n)

    conv = _case("conv-16k")
    assert conv.transform_length == 32768
    assert conv.flops("fwd") == 768 * (2 * 1 + 1) * tf(32768)
    assert conv.flops("fwd+bwd") == 768 * (4 * 1 + 2) * tf(32768)
    gf = _case("gfnet-s")
    assert gf.flops("fwd") == 2 * 8 * 384 * tf(56 * 56)
    assert gf.flops("fwd+bwd") == 4 * 8 * 384 * tf(56 * 56)
    fnet = _case("fnet")
    assert fnet.flops("fwd") == 8 * tf(512 * 768)
    assert fnet.flops("fwd+bwd") == 2 * 8 * tf(512 * 768)
    sg = _case("spectral")
    assert sg.flops("fwd") == 2 * 8 * 768 * tf(1024)
    assert sg.flops("fwd+bwd") == 4 * 8 * 768 * tf(1024)


def test_case_selection():
    bench = _bench()
    names = [c.name for c in bench.select_cases("all", False, "float32")]
    assert names == ["conv-1k", "conv-4k", "conv-16k", "conv-64k", "gfnet-s", "fnet", "spectral"]
    # In the order of the table, duplicates dropped; "conv" is the four lengths.
    assert [c.name for c in bench.select_cases("gfnet-s,conv,conv-1k", False, "float32")] == [
        "conv-1k",
        "conv-4k",
        "conv-16k",
        "conv-64k",
        "gfnet-s",
    ]
    assert [c.length for c in bench.select_cases("conv", False, "float32")] == [
        1024,
        4096,
        16384,
        65536,
    ]
    quick = _case("conv-16k", quick=True)
    assert (quick.name, quick.length, quick.channels) == ("conv-16k", 1024, 128)
    with pytest.raises(SystemExit, match="unknown case"):
        bench.select_cases("conv-2k", False, "float32")


def test_inputs_match_the_cases():
    bench = _bench()
    sg = _case("spectral", quick=True)
    t = bench.make_inputs(sg, 0)
    assert list(t) == ["x", "gate", "bias", "dout"]
    assert t["gate"].shape == (2, 4, 129, 2) and t["bias"].shape == (4, 129)
    gf = _case("gfnet-s", quick=True)
    t = bench.make_inputs(gf, 0)
    assert t["weight"].shape == (56, 29, 64, 2) and t["x"].shape == (2, 56, 56, 64)
    assert float(t["weight"].abs().max()) < 0.2  # * 0.02
    # Seeded: the same inputs in every process.
    assert torch.equal(bench.make_inputs(gf, 0)["x"], t["x"])


def _rows(tm_ms, comp_ms, tm_peak, comp_peak, correct=True, mode="fwd+bwd"):
    tm = {"backend": "tokenmix", "label": "tokenmix", "mode": mode, "median_ms": tm_ms}
    tm.update(peak_mib=tm_peak, correct=correct)
    comp = {"backend": "composite", "label": "composite", "mode": mode, "median_ms": comp_ms}
    comp["peak_mib"] = comp_peak
    return [tm, comp]


def _synthetic_case(name, rows):
    """A case entry as run_case leaves it: speedups and memory ratios from the rows."""
    bench = _bench()
    harness = import_bench("harness")
    modes = sorted({r["mode"] for r in rows})
    harness.add_speedups(rows, modes)
    bench.memory_ratios(rows, modes)
    return {"name": name, "results": rows}


def _bars(*cases):
    return {b["case"]: b for b in _bench().evaluate_bars(list(cases))}


def test_bar_verdicts():
    # conv-16k: 2.5x faster with a third of the memory passes both checks.
    bars = _bars(_synthetic_case("conv-16k", _rows(1.0, 2.5, 10.0, 30.0)))
    bar = bars["conv-16k"]
    assert bar["verdict"] == "PASS"
    assert [ch["verdict"] for ch in bar["checks"]] == ["PASS", "PASS"]
    assert [ch["measured"] for ch in bar["checks"]] == ["2.50x", "0.33x"]
    # Exactly at the thresholds still passes.
    bar = _bars(_synthetic_case("conv-16k", _rows(1.0, 2.0, 15.0, 30.0)))["conv-16k"]
    assert bar["verdict"] == "PASS"
    # Too slow: the speedup check fails, and with it the bar.
    bar = _bars(_synthetic_case("conv-16k", _rows(1.0, 1.9, 10.0, 30.0)))["conv-16k"]
    assert [ch["verdict"] for ch in bar["checks"]] == ["FAIL", "PASS"]
    assert bar["verdict"] == "FAIL"
    # Fast enough but over half the composite's memory: FAIL.
    bar = _bars(_synthetic_case("conv-16k", _rows(1.0, 3.0, 16.0, 30.0)))["conv-16k"]
    assert [ch["verdict"] for ch in bar["checks"]] == ["PASS", "FAIL"]
    assert bar["verdict"] == "FAIL"
    # A wrong output fails however fast it is.
    bar = _bars(_synthetic_case("conv-16k", _rows(1.0, 5.0, 1.0, 30.0, correct=False)))
    assert bar["conv-16k"]["verdict"] == "FAIL"
    # gfnet-s: speed only, 1.5x (its memory is not a condition).
    bar = _bars(_synthetic_case("gfnet-s", _rows(1.0, 1.6, 50.0, 30.0)))["gfnet-s"]
    assert bar["verdict"] == "PASS"
    bar = _bars(_synthetic_case("gfnet-s", _rows(1.0, 1.4, 1.0, 30.0)))["gfnet-s"]
    assert [ch["what"] for ch in bar["checks"]] == ["speedup"]
    assert bar["verdict"] == "FAIL"


def test_bars_only_for_cases_that_ran():
    assert _bars(_synthetic_case("conv-1k", _rows(1.0, 3.0, 1.0, 30.0))) == {}
    assert _bars() == {}
    # Only the forward ran: the fwd+bwd bar is not measured, so neither PASS nor FAIL.
    bar = _bars(_synthetic_case("gfnet-s", _rows(1.0, 3.0, 1.0, 30.0, mode="fwd")))["gfnet-s"]
    assert bar["verdict"] == "INCOMPLETE"
    assert bar["checks"][0]["verdict"].startswith("NOT MEASURED")
    # The composite failed: not measured either.
    rows = _rows(1.0, 3.0, 1.0, 30.0)
    del rows[1]["median_ms"]
    rows[1].update(status="error", note="error: boom")
    bar = _bars(_synthetic_case("conv-16k", rows))["conv-16k"]
    assert bar["verdict"] == "INCOMPLETE"
    assert "boom" in bar["checks"][0]["verdict"]


@pytest.mark.slow
def test_quick_run_json(tmp_path):
    """``--quick --case conv-1k,gfnet-s --json``: both backends and modes per case, positive
    times, tokenmix within 1e-4 of the composite (relative to each tensor's max)."""
    js = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--case", "conv-1k,gfnet-s", "--json", str(js)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(js.read_text())
    assert [c["name"] for c in report["cases"]] == ["conv-1k", "gfnet-s"]
    for c in report["cases"]:
        got = {(r["backend"], r["mode"]) for r in c["results"]}
        assert got == {(b, m) for b in ("tokenmix", "composite") for m in ("fwd", "fwd+bwd")}
        for r in c["results"]:
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0 and r["gflops"] > 0 and r["frac_matmul"] > 0
            assert r["peak_mib"] is not None and r["peak_mib"] >= 0
        for mode in ("fwd", "fwd+bwd"):
            entry = c["correctness"][mode]["tokenmix"]
            assert entry["ok"]
            assert entry["vs"] == "composite"
            rel = entry["max_rel_diff"]
            want = {"out"} | ({"du", "dk"} if c["name"] == "conv-1k" else {"dx", "dweight"})
            assert set(rel) == (want if mode == "fwd+bwd" else {"out"})
            assert max(rel.values()) < 1e-4
    # Only the bar whose case ran, with a verdict; both in the text.
    assert [b["case"] for b in report["bars"]] == ["gfnet-s"]
    assert report["bars"][0]["verdict"] in ("PASS", "FAIL")
    assert "gfnet-s: tokenmix fwd+bwd >= 1.5x faster than composite: " in proc.stdout
    assert "conv-16k: tokenmix" not in proc.stdout
    assert "tokenmix fwd+bwd is " in proc.stdout and "; peak memory " in proc.stdout
    assert "[8/8] gfnet-s composite (torch.fft) fwd+bwd" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is usable here")
def test_device_cuda_without_gpu_fails_with_one_line():
    assert_cuda_refused(BENCH)
