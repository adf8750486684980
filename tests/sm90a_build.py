"""Compiles a CUDA source for sm_90a into a cubin and reads it with the static SASS model: the
shipped build has no sm_90a code, so the tests of wgmma code build their own."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def nvcc() -> str:
    for exe in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc")):
        if exe and Path(exe).exists():
            return exe
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda/bin/nvcc"
    pytest.skip("nvcc not found")


def compile_sm90a(source: Path, name: str, *flags: str) -> list:
    """nvcc -arch=sm_90a -cubin with -Xptxas -v into build/<name>.cubin; asserts it compiled with
    no spills (every kernel's report line) and returns the analyzed kernels."""
    from tokenmix import _sass

    out = ROOT / "build" / f"{name}.cubin"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc(), "-std=c++17", "-arch=sm_90a", "-cubin", "-Xptxas", "-v", *flags]
    cmd += [f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}", str(source), "-o", str(out)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-4000:]
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", build.stderr)
    assert spills and all(n == "0" for n in spills), build.stderr[-4000:]
    kernels = _sass.sass_report(str(out))
    assert len(spills) == 2 * len(kernels), build.stderr[-4000:]  # stores and loads per kernel
    return kernels
