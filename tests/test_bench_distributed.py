"""bench/bench_distributed.py: a quick run on 2 gloo processes, its table against the plans."""

from __future__ import annotations

import subprocess
import sys

import tokenmix.distributed as tmd
from bench_scripts import bench_script


def test_quick_run_reports_the_planned_bytes():
    proc = subprocess.run(
        [
            sys.executable,
            str(bench_script("bench_distributed")),
            "--quick",
            "--world",
            "2",
            "--case",
            "na-2d",
            "simple-gla",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 gloo processes" in proc.stderr  # progress lines
    rows = {}
    for line in proc.stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in ("na-2d", "simple-gla"):
            rows[cells[0]] = cells
    assert set(rows) == {"na-2d", "simple-gla"}, proc.stdout
    # na-2d quick: 32x32, kernel 7, B=1 H=4 D=64 float32. Each rank sends the 3 rows its
    # neighbour's windows reach (K and V, 32 columns each) and gets their gradients back.
    plan = tmd.halo_plan((16, 16), 7, 1, 1, False)
    row_bytes = 32 * 4 * (64 + 64) * 4
    halo = plan.halo_rows(0) * row_bytes * 2
    mib = float(rows["na-2d"][4])  # fwd+bwd MiB/rank (max)
    assert abs(mib - halo / 2**20) < 1e-3, rows["na-2d"]
    assert float(rows["na-2d"][6]) == mib  # all of it point to point
    gather = 2 * 16 * 32 * 4 * 128 * 4 / 2**20  # all-gather K/V + reduce-scatter, 1 peer
    assert float(rows["na-2d"][7]) == gather
    # The scan sends no rows at all: one state pair (H x K x (V + K) floats) each way.
    assert float(rows["simple-gla"][6]) == 0.0
    pair = 4 * 64 * 128 * 4 / 2**20
    assert abs(float(rows["simple-gla"][4]) - 2 * pair) < 1e-3
