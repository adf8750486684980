"""The benchmark scripts under bench/, for the tests of the parts that run without timing
anything: importing a script as a module, and its ``--device cuda`` refusal on a machine
without a usable GPU."""

from __future__ import annotations

import importlib
import pathlib
import subprocess
import sys
from types import ModuleType

BENCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "bench"


def bench_script(name: str) -> pathlib.Path:
    """The path of ``bench/<name>.py``."""
    return BENCH_DIR / f"{name}.py"


def import_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (``bench_na``, ``bench_block_sparse``, ``harness``), with
    bench/ on ``sys.path`` while it is imported."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH_DIR))


def assert_cuda_refused(script: pathlib.Path) -> None:
    """``script --device cuda --quick`` on a machine without a usable CUDA device stops at once:
    exit status 2, nothing on stdout, one line on stderr (no traceback) that names the script
    and says why."""
    proc = subprocess.run(
        [sys.executable, str(script), "--device", "cuda", "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith(f"{script.name}: --device cuda: no usable CUDA device: ")
    assert "CUDA" in lines[0]
