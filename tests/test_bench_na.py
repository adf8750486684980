"""bench/bench_na.py: the ``--device cuda`` refusal on a machine without a usable GPU, the
planner columns, the masks (from the library's window rule), the ``--seq-lens`` sweep and
``--plot``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from bench_scripts import assert_cuda_refused, bench_script, import_bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is usable here")
def test_device_cuda_without_gpu_fails_with_one_line():
    assert_cuda_refused(bench_script("bench_na"))


def test_case_plan_matches_pair_count():
    bench_na = import_bench("bench_na")
    for name, (shape, kernel) in bench_na.CASES.items():
        n = len(shape)
        case = bench_na.Case(name, shape, kernel, (1,) * n, (1,) * n, (False,) * n)
        plan = bench_na.case_plan(case)
        assert plan is not None
        # The planner's useful pairs are the benchmark's own attended-pair count.
        assert plan["useful_pairs"] == bench_na.attended_pairs(case)
        assert plan["dense_pairs"] == case.tokens**2
        assert plan["flop_bound"] == case.tokens**2 / bench_na.attended_pairs(case)
        assert plan["tile_bound"] <= plan["flop_bound"]
        assert math.prod(plan["tile_shape"]) == 64
        assert "flop bound" in bench_na.plan_line(plan)


@pytest.mark.parametrize(
    ("shape", "kernel", "stride", "dilation", "causal"),
    [
        ((13,), (5,), (1,), (1,), (False,)),
        ((17,), (4,), (3,), (2,), (True,)),
        ((9, 11), (3, 4), (2, 1), (1, 2), (False, True)),
        ((6, 5, 7), (3, 3, 2), (1, 2, 2), (2, 1, 3), (True, False, False)),
    ],
)
def test_masks_follow_the_library_rule(shape, kernel, stride, dilation, causal):
    """The benchmark's masks and pair counts come from the library's window rule
    (``tokenmix.neighborhood.reference.window_bounds``) and agree with the brute-force oracle
    written from NATTEN's definition."""
    from na_brute_force import brute_force_mask

    bench_na = import_bench("bench_na")
    case = bench_na.Case("t", shape, kernel, stride, dilation, causal)
    case.validate()
    want = brute_force_mask(shape, kernel, stride, dilation, causal)
    assert torch.equal(bench_na.dense_mask(case), want)
    assert bench_na.attended_pairs(case) == int(want.sum())
    tables = bench_na.flex_tables(case)
    mod = bench_na.flex_mask_mod(tables)
    n = case.tokens
    q = torch.arange(n).view(-1, 1)
    k = torch.arange(n).view(1, -1)
    assert torch.equal(mod(0, 0, q, k), want)


def _na_cases(*argv):
    bench_na = import_bench("bench_na")
    harness = import_bench("harness")
    args = harness.attention_parser(bench_na.BENCHMARK).parse_args(list(argv))
    args.dtype = "float32"
    return bench_na.select_cases(args)


def test_seq_lens_sweep_cases():
    """--seq-lens runs each selected case at every token count, with equal sides."""
    cases = _na_cases("--case", "1d,2d", "--seq-lens", "1024,4096")
    assert [(c.name, c.shape, c.kernel) for c in cases] == [
        ("1d-1024-k1024", (1024,), (1024,)),
        ("1d-4096-k1024", (4096,), (1024,)),
        ("2d-32x32-k7", (32, 32), (7, 7)),
        ("2d-64x64-k7", (64, 64), (7, 7)),
    ]
    assert {c.series for c in cases} == {"1d-k1024", "2d-k7"}
    cases = _na_cases("--shape", "8,8", "--kernel", "3", "--causal", "0,1", "--seq-lens", "256")
    assert [(c.name, c.shape) for c in cases] == [("custom-16x16-k3x3-c01", (16, 16))]
    assert cases[0].series == "2d-k3-c01"
    # Without --seq-lens the cases keep their names.
    assert [c.name for c in _na_cases("--case", "3d")] == ["3d-16x16x16-k5"]
    with pytest.raises(SystemExit, match="not a 2-D cube"):
        _na_cases("--case", "2d", "--seq-lens", "1000")
    with pytest.raises(SystemExit, match="exceeds extent"):
        _na_cases("--case", "1d", "--seq-lens", "512")


@pytest.mark.slow
def test_quick_sweep_with_plot(tmp_path):
    """A --seq-lens sweep of the 1-D case with --plot: one case per length, the PNG written."""
    pytest.importorskip("matplotlib")
    from test_bench_harness import assert_png

    png, js = tmp_path / "na.png", tmp_path / "na.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(bench_script("bench_na")),
            "--case",
            "1d",
            "--quick",
            "--seq-lens",
            "256,512",
            "--backends",
            "tokenmix,sdpa",
            "--forward",
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
    assert [c["name"] for c in report["cases"]] == ["1d-256-k256", "1d-512-k256"]
    assert [c["series"] for c in report["cases"]] == ["1d-k256"] * 2
    assert "== 1d-512-k256: " in proc.stdout
    assert f"wrote {png}" in proc.stderr
    assert_png(png)
