"""The CUDA side of the build (CMake finds nvcc): kernels compiled for the
configured architectures, their ptxas resource report, and a library that still
loads in a CPU-only torch. No GPU is needed or used."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import tokenmix
import torch
from tokenmix._info import cuda_resource_usage, format_cuda_resources

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


def test_build_found_nvcc_and_reports_it():
    assert BUILD.get("cuda_built") is True, "nvcc is present, so the build must compile CUDA"
    info = tokenmix.info()["backends"]["cuda"]
    assert info["built"] is True
    assert re.match(r"\d+\.\d+", info["version"])
    assert "sm_80" in info["archs"] and "sm_90" in info["archs"]


def test_ptxas_report_every_kernel_no_spills_shared_within_limits():
    assert os.path.exists(REPORT), "the CUDA build installs its ptxas resource report"
    rows = cuda_resource_usage()
    archs = {r["arch"] for r in rows}
    assert {"sm_80", "sm_90"} <= archs
    kernels = {r["kernel"] for r in rows}
    assert any("gemm_kernel" in k for k in kernels)
    print("\n" + format_cuda_resources(rows))
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"register spills: {r}"
        # Local memory (a stack frame) means fragments were indexed at run time.
        assert r["stack"] == 0, f"stack frame (local memory): {r}"
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


def test_every_neighborhood_attention_instantiation_is_in_the_report():
    """Each shipped instantiation of the CUDA neighborhood-attention engine, for both
    architectures: forward/dq/dkdv for fp16 and bf16 (specialized 32/64/128 and general) and
    fp32 (general), plus the delta and rpb-reduction kernels per dtype."""
    names = {(r["arch"], format_cuda_resources([r]).split("`")[1]) for r in cuda_resource_usage()}
    for arch in ("sm_80", "sm_90"):
        for elem in ("F16", "BF16", "F32"):
            dims = ("32", "64", "128", "0") if elem != "F32" else ("0",)
            for kernel in ("na_forward_kernel", "na_backward_dq_kernel", "na_backward_dkdv_kernel"):
                for d in dims:
                    assert (arch, f"{kernel}<{elem}, {d}>") in names, (arch, kernel, elem, d)
            for kernel in ("na_backward_delta_kernel", "na_backward_rpb_reduce_kernel"):
                assert (arch, f"{kernel}<{elem}>") in names, (arch, kernel, elem)


def test_every_block_sparse_instantiation_is_in_the_report():
    """Each shipped instantiation of the block-sparse kernels (BlockSparsePolicy on the same
    engine), for both architectures: forward/dq/dkdv like neighborhood attention's, the delta
    kernel, and the schedule kernel of each pass (forward 0, dQ 1, dK/dV 2) per dtype."""
    names = {(r["arch"], format_cuda_resources([r]).split("`")[1]) for r in cuda_resource_usage()}
    for arch in ("sm_80", "sm_90"):
        for elem in ("F16", "BF16", "F32"):
            dims = ("32", "64", "128", "0") if elem != "F32" else ("0",)
            for kernel in ("bs_forward_kernel", "bs_backward_dq_kernel", "bs_backward_dkdv_kernel"):
                for d in dims:
                    assert (arch, f"{kernel}<{elem}, {d}>") in names, (arch, kernel, elem, d)
            assert (arch, f"bs_backward_delta_kernel<{elem}>") in names, (arch, elem)
            for use in ("0", "1", "2"):
                assert (arch, f"bs_schedule_kernel<{elem}, {use}>") in names, (arch, elem, use)


def test_cuda_key_registered_for_the_neighborhood_ops():
    """tokenmix.na2d on CUDA tensors dispatches to the fused kernels (same ops as the CPU)."""
    for op in ("tokenmix::na_forward", "tokenmix::na_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


def test_cuda_resources_command_prints_the_table():
    out = subprocess.run(
        [sys.executable, "-m", "tokenmix", "cuda-resources"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| sm_80 | `na_forward_kernel<F16, 128>` |" in out


def test_every_fft_conv_instantiation_is_in_the_report():
    """fft_conv's CUDA kernels, forward and backward, per dtype and architecture, and the
    backward's reduction of per-chunk partial sums."""
    names = {(r["arch"], format_cuda_resources([r]).split("`")[1]) for r in cuda_resource_usage()}
    for arch in ("sm_80", "sm_90"):
        assert (arch, "fft_conv_reduce_kernel") in names, arch
        for elem in ("F16", "BF16", "F32"):
            for kernel in ("fft_conv_forward_kernel", "fft_conv_backward_kernel"):
                assert (arch, f"{kernel}<{elem}>") in names, (arch, kernel, elem)


def test_every_fft_line_kernel_is_in_the_report():
    """fourier_mix / global_filter / spectral_gate's kernels: the line pass and spectral_gate's
    two per dtype, the weight gradient and the gate reduction, per architecture."""
    names = {(r["arch"], format_cuda_resources([r]).split("`")[1]) for r in cuda_resource_usage()}
    for arch in ("sm_80", "sm_90"):
        for kernel in ("fft_filter_grad_kernel", "spectral_gate_reduce_kernel"):
            assert (arch, kernel) in names, (arch, kernel)
        for elem in ("F16", "BF16", "F32"):
            for kernel in (
                "fft_line_pass_kernel",
                "spectral_gate_forward_kernel",
                "spectral_gate_backward_kernel",
            ):
                assert (arch, f"{kernel}<{elem}>") in names, (arch, kernel, elem)


def test_cuda_key_registered_for_the_fft_mixing_ops():
    for op in (
        "tokenmix::fft_conv_forward",
        "tokenmix::fft_conv_backward",
        "tokenmix::fourier_mix",
        "tokenmix::global_filter_forward",
        "tokenmix::global_filter_backward",
        "tokenmix::spectral_gate_forward",
        "tokenmix::spectral_gate_backward",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


def test_every_linear_scan_instantiation_is_in_the_report():
    """The linear scans' kernels: forward (which also stores the backward's chunk-start
    states) and backward per dtype and decay kind (0 none, 1 scalar, 2 per key), the dq/dk
    reduction per dtype and the decay gradient's reverse cumulation per decay kind; the delta
    rule's forward and backward per dtype and its per-token gradient reduction."""
    names = {(r["arch"], format_cuda_resources([r]).split("`")[1]) for r in cuda_resource_usage()}
    for arch in ("sm_80", "sm_90"):
        assert (arch, "delta_token_grad_kernel") in names, arch
        for decay in (1, 2):
            assert (arch, f"scan_decay_grad_kernel<{decay}>") in names, (arch, decay)
        for elem in ("F16", "BF16", "F32"):
            assert (arch, f"scan_reduce_kernel<{elem}>") in names, (arch, elem)
            for kernel in ("delta_forward_kernel", "delta_backward_kernel"):
                assert (arch, f"{kernel}<{elem}>") in names, (arch, kernel, elem)
            for decay in (0, 1, 2):
                for kernel in ("scan_forward_kernel", "scan_backward_kernel"):
                    assert (arch, f"{kernel}<{elem}, {decay}>") in names, (arch, kernel, elem)


def test_cuda_key_registered_for_the_scan_ops():
    for op in (
        "tokenmix::linear_scan_forward",
        "tokenmix::linear_scan_backward",
        "tokenmix::delta_rule_forward",
        "tokenmix::delta_rule_backward",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
