"""bench/bench_na.py pieces that run without timing anything: the ``--device cuda``
refusal on a machine without a usable GPU, and the planner columns."""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_na.py"


def _bench_module():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench_na
    finally:
        sys.path.remove(str(BENCH.parent))
    return bench_na


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is usable here")
def test_device_cuda_without_gpu_fails_with_one_line():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cuda", "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--device cuda" in lines[0] and "CUDA" in lines[0]


def test_case_plan_matches_pair_count():
    bench_na = _bench_module()
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
