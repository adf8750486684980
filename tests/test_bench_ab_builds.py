"""bench/ab_builds.py: two builds timed against each other in alternating worker processes."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
import tokenmix
from bench_scripts import bench_script

INSTALLED = pathlib.Path(tokenmix.__file__).resolve().parent

# Appended to a copy's __init__.py: block_sparse_attention made slower by a fixed sleep, or
# exiting the process once the worker's warm-up call is done.
SLOW = """
import time as _time
_fast_block_sparse_attention = block_sparse_attention
def block_sparse_attention(*args, **kwargs):
    _time.sleep(0.2)
    return _fast_block_sparse_attention(*args, **kwargs)
"""
CRASH = """
import os as _os
_calls = [0]
_fast_block_sparse_attention = block_sparse_attention
def block_sparse_attention(*args, **kwargs):
    _calls[0] += 1
    if _calls[0] > 1:
        _os._exit(3)
    return _fast_block_sparse_attention(*args, **kwargs)
"""


def package_copy(root: pathlib.Path, name: str, patch: str = "") -> pathlib.Path:
    """A directory holding a copy of the installed tokenmix package, with ``patch`` appended."""
    target = root / name / "tokenmix"
    shutil.copytree(INSTALLED, target, ignore=shutil.ignore_patterns("__pycache__"))
    with open(target / "__init__.py", "a") as f:
        f.write(patch)
    return root / name


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(bench_script("ab_builds")), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def table_rows(out: str) -> dict[int, list[float]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            rows[int(cells[0])] = [float(cells[1]), float(cells[2]), float(cells[3])]
    return rows


@pytest.mark.parametrize("slow_side", ["new", "old"])
def test_each_worker_times_its_own_build(tmp_path, slow_side):
    fast = package_copy(tmp_path, "fast")
    slow = package_copy(tmp_path, "slow", SLOW)
    old, new = (fast, slow) if slow_side == "new" else (slow, fast)
    proc = run("--old", str(old), "--new", str(new), "--rounds", "2", "--calls", "1",
               "--block-sizes", "32,64")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "random, forward, 2 threads, 2 rounds of 1 calls" in out
    # Each worker imported the tokenmix of its own directory.
    for flag, d in (("--old", old), ("--new", new)):
        assert f"{flag} {d}: {(d / 'tokenmix' / '__init__.py').resolve()}" in out
    rows = table_rows(out)
    assert sorted(rows) == [32, 64]
    for old_ms, new_ms, ratio in rows.values():
        # The slow copy sleeps 200 ms in every call; a quick call takes a few ms (tens on a
        # busy machine). The ratio is new / old.
        slow_ms, fast_ms = (new_ms, old_ms) if slow_side == "new" else (old_ms, new_ms)
        assert slow_ms >= 200 and fast_ms < slow_ms, out
        assert ratio > 1 if slow_side == "new" else ratio < 1, out


def test_a_worker_that_dies_is_named(tmp_path):
    good = package_copy(tmp_path, "good")
    bad = package_copy(tmp_path, "bad", CRASH)
    proc = run("--old", str(good), "--new", str(bad), "--block-sizes", "32", "--rounds", "2")
    assert proc.returncode != 0
    assert f"--new {bad}" in proc.stderr and "exited during a round" in proc.stderr
    assert "exit status 3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_arguments_are_checked(tmp_path):
    proc = run("--old", str(tmp_path), "--new", str(INSTALLED.parent))
    assert proc.returncode != 0 and "--old:" in proc.stderr
    assert "no 'tokenmix' package" in proc.stderr
    proc = run("--old", str(INSTALLED.parent), "--new", str(tmp_path))
    assert proc.returncode != 0 and "--new:" in proc.stderr
    for args, flag in (
        (["--block-sizes", "64,x"], "--block-sizes"),
        (["--block-sizes", "0"], "--block-sizes"),
        (["--threads", "0"], "--threads"),
        (["--rounds", "0"], "--rounds"),
    ):
        proc = run("--old", str(INSTALLED.parent), "--new", str(INSTALLED.parent), *args)
        assert proc.returncode != 0 and flag in proc.stderr, (args, proc.stderr)


SLOW_NA = """
import time as _time
_fast_neighborhood_attention = neighborhood_attention
def neighborhood_attention(*args, **kwargs):
    _time.sleep(0.2)
    return _fast_neighborhood_attention(*args, **kwargs)
"""


def test_neighborhood_case_times_its_own_build(tmp_path):
    fast = package_copy(tmp_path, "fast")
    slow = package_copy(tmp_path, "slow", SLOW_NA)
    proc = run("--old", str(fast), "--new", str(slow), "--case", "na-2d-64x64-k7",
               "--rounds", "2", "--calls", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "na-2d-64x64-k7, forward, 2 threads, 2 rounds of 1 calls" in out
    assert "| case | old best ms |" in out
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith("| na-2d-64x64-k7 |")
    ]
    assert len(rows) == 1, out
    old_ms, new_ms, ratio = (float(x) for x in rows[0][1:4])
    # The new copy sleeps 200 ms in every call; the quick 32x32 case takes about a millisecond.
    assert new_ms >= 200 and old_ms < new_ms and ratio > 1, out


def test_neighborhood_cases_are_bench_na_cases(tmp_path):
    sys.path.insert(0, str(bench_script("ab_builds").parent))
    try:
        import ab_builds
        import bench_na
    finally:
        sys.path.pop(0)
    assert sorted(ab_builds.NA_CASES) == sorted(f"na-{name}" for name in bench_na.CASES)
    # --block-sizes does not apply to them: the next error is about --old.
    proc = run("--old", str(tmp_path), "--new", str(INSTALLED.parent), "--case",
               "na-2d-64x64-k7", "--block-sizes", "0")  # fmt: skip
    assert proc.returncode != 0 and "--old:" in proc.stderr and "--block-sizes" not in proc.stderr
