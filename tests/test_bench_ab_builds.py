"""bench/ab_builds.py: two builds timed against each other in alternating worker processes."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import tokenmix
from bench_scripts import bench_script

INSTALLED = str(pathlib.Path(tokenmix.__file__).resolve().parent.parent)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(bench_script("ab_builds")), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_same_build_against_itself():
    proc = run(
        "--old", INSTALLED, "--new", INSTALLED, "--quick", "--rounds", "4", "--calls", "2",
        "--block-sizes", "32,64",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "random, forward, 2 threads, 4 rounds of 2 calls" in out
    # Each worker says which tokenmix it imported: the one in its package directory.
    assert out.count(f"{INSTALLED}: {INSTALLED}") == 2
    rows = [
        line for line in out.splitlines() if line.startswith("| 32 ") or line.startswith("| 64 ")
    ]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        old_ms, new_ms, ratio = float(cells[1]), float(cells[2]), float(cells[3])
        assert old_ms > 0 and new_ms > 0
        # One build against itself: the ratio of the rounds' fastest calls is about 1.
        assert 0.5 < ratio < 2.0, row


def test_missing_package_is_refused(tmp_path):
    proc = run("--old", str(tmp_path), "--new", INSTALLED, "--quick")
    assert proc.returncode != 0
    assert "--old/--new" in proc.stderr and "no 'tokenmix' package" in proc.stderr


def test_bad_block_sizes_are_refused():
    proc = run("--old", INSTALLED, "--new", INSTALLED, "--block-sizes", "64,x")
    assert proc.returncode != 0 and "--block-sizes" in proc.stderr
