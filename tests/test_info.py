"""``tokenmix.info()`` and ``python -m tokenmix info``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import tokenmix
import torch


def test_info_keys():
    data = tokenmix.info()
    assert {
        "tokenmix",
        "torch",
        "built_against_torch",
        "stable_abi_target",
        "compiler",
        "library",
        "operators",
        "backends",
    } <= set(data)
    assert data["tokenmix"] == tokenmix.__version__
    assert data["torch"] == torch.__version__
    assert set(data["backends"]) == {"cpu", "cuda", "emulator", "reference"}
    json.dumps(data)  # serializable


def test_info_backends():
    backends = tokenmix.info()["backends"]
    cpu, cuda = backends["cpu"], backends["cuda"]
    assert cpu["built"] is True
    assert cpu["kernels"] in {"generic x86-64 (SSE2)", "AVX2 + FMA", "AVX-512"}
    assert cpu["threads"] == torch.get_num_threads()
    # Built exactly when the build found nvcc; otherwise it says why not.
    assert cuda["built"] is bool(tokenmix._ops.build_info().get("cuda_built"))
    if cuda["built"]:
        assert cuda["version"] and "sm_" in cuda["archs"]
        # every family has CUDA kernels now
        for family in ("neighborhood", "block-sparse", "fft_conv", "linear scans", "delta rule"):
            assert family in cuda["kernels"], family
        assert "CPU only" not in cuda["kernels"]
    else:
        assert isinstance(cuda["reason"], str) and cuda["reason"].strip()
    assert backends["reference"]["built"] is True
    assert os.path.exists(tokenmix.info()["library"])


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tokenmix", "info", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )


def test_cli_info():
    proc = _cli()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"tokenmix {tokenmix.__version__}" in out
    assert f"torch {torch.__version__}" in out
    cuda_lines = [line for line in out.splitlines() if line.strip().startswith("cuda")]
    built = bool(tokenmix._ops.build_info().get("cuda_built"))
    assert len(cuda_lines) == 1 and ("yes" if built else "NO") in cuda_lines[0], out
    cpu_lines = [line for line in out.splitlines() if line.strip().startswith("cpu")]
    assert len(cpu_lines) == 1 and "yes" in cpu_lines[0], out


def test_cli_info_json():
    proc = _cli("--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["tokenmix"] == tokenmix.__version__
    assert data["backends"]["cuda"]["built"] is bool(tokenmix._ops.build_info().get("cuda_built"))
    assert data["backends"]["cpu"]["built"] is True
