"""The CUDA side of the build (CMake finds nvcc): kernels compiled for the
configured architectures, their ptxas resource report, and a library that still
loads in a CPU-only torch. No GPU is needed or used."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import tokenmix
import torch

PACKAGE = os.path.dirname(tokenmix.__file__)
REPORT = os.path.join(PACKAGE, "cuda_resource_usage.txt")
EMULATED = os.path.join(PACKAGE, "_emulated.so")
BUILD = tokenmix._ops.build_info()

NVCC = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
)
_DISABLED = "TOKENMIX_CUDA=OFF" in str(BUILD.get("cuda_reason", ""))
pytestmark = pytest.mark.skipif(
    not BUILD.get("cuda_built") and (NVCC is None or _DISABLED),
    reason="no nvcc on this machine" if NVCC is None else "built with TOKENMIX_CUDA=OFF",
)

# Per-block shared memory limits (bytes): static __shared__ is capped at 48 KiB;
# dynamic shared memory can go to the opt-in maximum of the architecture.
STATIC_SMEM_LIMIT = 48 * 1024


def _parse_report(text: str) -> list[dict]:
    """One entry per (architecture, kernel) from `nvcc -Xptxas -v` output."""
    rows, arch, kernel = [], None, None
    for line in text.splitlines():
        if line.startswith("== sm_"):
            arch = line[3:].strip()
        elif m := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line):
            kernel = {"arch": m.group(2), "kernel": m.group(1)}
            assert m.group(2) == arch
        elif kernel and (
            m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        ):
            kernel["spill_stores"], kernel["spill_loads"] = int(m.group(1)), int(m.group(2))
        elif kernel and (m := re.search(r"Used (\d+) registers", line)):
            kernel["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            kernel["smem"] = int(smem.group(1)) if smem else 0
            rows.append(kernel)
            kernel = None
    return rows


def test_build_found_nvcc_and_reports_it():
    assert BUILD.get("cuda_built") is True, "nvcc is present, so the build must compile CUDA"
    info = tokenmix.info()["backends"]["cuda"]
    assert info["built"] is True
    assert re.match(r"\d+\.\d+", info["version"])
    assert "sm_80" in info["archs"] and "sm_90" in info["archs"]


def test_ptxas_report_every_kernel_no_spills_shared_within_limits():
    assert os.path.exists(REPORT), "the CUDA build installs its ptxas resource report"
    rows = _parse_report(open(REPORT).read())
    archs = {r["arch"] for r in rows}
    assert {"sm_80", "sm_90"} <= archs
    kernels = {r["kernel"] for r in rows}
    assert any("gemm_kernel" in k for k in kernels)
    print("\narch   regs  smem(B)  kernel")
    for r in rows:
        print(f"{r['arch']:6} {r['registers']:4} {r['smem']:8}  {r['kernel']}")
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"register spills: {r}"
        assert r["smem"] <= STATIC_SMEM_LIMIT, f"shared memory above the per-block limit: {r}"
        assert r["registers"] <= 255, r


def test_cuda_kernels_are_embedded_and_registered():
    sections = subprocess.run(
        ["readelf", "-S", EMULATED], capture_output=True, text=True, check=True
    ).stdout
    assert ".nv_fatbin" in sections, "the CUDA kernels are compiled into the library"
    needed = subprocess.run(
        ["readelf", "-d", EMULATED], capture_output=True, text=True, check=True
    ).stdout
    # The CUDA runtime is static and libtorch_cuda is looked up at run time, so
    # the library loads in a CPU-only torch (this one).
    assert "libcudart" not in needed and "libtorch_cuda" not in needed
    torch.ops.load_library(EMULATED)
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("tokenmix_emulated::mma_gemm", key)


def test_cuda_tensors_without_cuda_torch_fail_cleanly():
    if torch.cuda.is_available():
        pytest.skip("this check is for a CPU-only torch")
    torch.ops.load_library(EMULATED)
    with pytest.raises((RuntimeError, AssertionError)):
        torch.ops.tokenmix_emulated.mma_gemm(
            torch.empty(8, 8, dtype=torch.float16, device="cuda"),
            torch.empty(8, 8, dtype=torch.float16, device="cuda"),
        )
