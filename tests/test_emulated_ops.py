"""torch.ops.tokenmix_emulated.*: CUDA kernel sources run under the SIMT emulator
and compared with torch on the CPU (docs/simt_emulator.md)."""

from __future__ import annotations

import os
import subprocess

import pytest
import tokenmix
import torch

LIBRARY = os.path.join(os.path.dirname(tokenmix.__file__), "_emulated.so")


@pytest.fixture(scope="module", autouse=True)
def emulated_library():
    assert os.path.exists(LIBRARY), "the build must produce tokenmix/_emulated.so"
    torch.ops.load_library(LIBRARY)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "m,n,k",
    [(150, 136, 200), (64, 64, 64), (1, 8, 8), (65, 72, 24), (3, 200, 136)],
    ids=["partial-tiles", "one-tile", "tiny", "edge", "wide"],
)
def test_mma_gemm_matches_torch_matmul(dtype, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    c = torch.ops.tokenmix_emulated.mma_gemm(a, b)
    assert c.dtype == torch.float32 and c.shape == (m, n)
    want = torch.matmul(a.double(), b.double()).float()
    # fp32 accumulation of exact products of fp16/bf16 inputs
    torch.testing.assert_close(c, want, rtol=1e-4, atol=1e-3 * k**0.5)


def test_mma_gemm_rejects_bad_input():
    half = torch.randn(4, 12).half()
    with pytest.raises(RuntimeError, match="multiples of 8"):
        torch.ops.tokenmix_emulated.mma_gemm(half, torch.randn(12, 8).half())
    with pytest.raises(RuntimeError, match="float16 or both bfloat16"):
        torch.ops.tokenmix_emulated.mma_gemm(torch.randn(8, 8), torch.randn(8, 8))
    with pytest.raises(RuntimeError, match="inner dimensions"):
        torch.ops.tokenmix_emulated.mma_gemm(torch.randn(8, 8).half(), torch.randn(16, 8).half())


def test_emulated_library_uses_only_the_stable_abi():
    out = subprocess.run(
        ["nm", "-D", "--undefined-only", LIBRARY], capture_output=True, text=True, check=True
    ).stdout
    cxx_torch = [s for s in out.split() if s.startswith(("_ZN3c10", "_ZN2at", "_ZN5torch"))]
    assert cxx_torch == []


def test_info_reports_the_emulator():
    assert tokenmix.info()["backends"]["emulator"]["built"] is True
