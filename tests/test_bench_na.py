"""bench/bench_na.py pieces that run without timing anything: the ``--device cuda``
refusal on a machine without a usable GPU, and the planner columns."""

from __future__ import annotations

import math

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
