"""`make gpu-check` (tools/gpu_check.sh) and its workload (tools/gpu_kernels.py), up to their first
GPU call: a GPU machine is lent for a few minutes at a time, so the script must already work."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_gpu_kernels():
    spec = importlib.util.spec_from_file_location(
        "gpu_kernels", os.path.join(ROOT, "tools", "gpu_kernels.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dry_run(out, **env) -> tuple[int, str]:
    """Runs tools/gpu_check.sh --dry-run into ``out``: its exit code and summary."""
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env)
    result = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.returncode, (out / "summary.txt").read_text()


def probe_wheel(directory) -> None:
    """A minimal pure-Python wheel, for the step that installs the carried wheels."""
    info = "gpu_check_probe-1.0.dist-info"
    with zipfile.ZipFile(directory / "gpu_check_probe-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("gpu_check_probe/__init__.py", "")
        whl.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 1.0\n"
        )
        whl.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        whl.writestr(f"{info}/RECORD", "")


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    probe_wheel(wheels)
    out = tmp_path / "out"
    returncode, summary = dry_run(out, GPU_CHECK_WHEELS=str(wheels))
    assert returncode == 0, summary
    steps = ["info", "device-tests", "profile-fwd", "profile-bwd", "sanitizer", "fla-wheels"]
    for step in [*steps, "bench-na", "bench-block-sparse", "bench-linear", "bench-linear-fla"]:
        assert f"] {step} (limit" in summary, f"step {step} did not run:\n{summary}"
        assert (out / f"{step}.log").exists()
    assert "done: 0 step(s) failed" in summary
    # The GPU tests were collected (not run) and the sanitizer's cases were checked.
    assert "tests collected" in (out / "device-tests.log").read_text()
    assert (out / "sanitizer.log").read_text().count("(OK)") == 4
    # GLA and the gated delta rule, then with fla's Triton kernels named (they need CUDA).
    for log in ("bench-linear.log", "bench-linear-fla.log"):
        linear = (out / log).read_text()
        assert "gla T=8192" in linear and "gated_delta T=8192" in linear, log
    fla = (out / "bench-linear-fla.log").read_text()
    assert fla.count("n/a (fla's Triton kernels need CUDA)") == 2


def test_dry_run_says_when_no_wheels_were_carried(tmp_path):
    returncode, summary = dry_run(
        tmp_path, GPU_CHECK_WHEELS=str(tmp_path / "none"), GPU_CHECK_BUDGET="20"
    )
    assert "fla-wheels: no wheels in" in summary and "make gpu-check-wheels" in summary


def test_dry_run_respects_the_budget(tmp_path):
    returncode, summary = dry_run(tmp_path, GPU_CHECK_BUDGET="20")
    assert returncode != 0
    assert "skipped (the 20 s budget is spent)" in summary


def test_small_cases_match_the_reference_on_cpu(capsys):
    gpu_kernels = load_gpu_kernels()
    assert gpu_kernels.main(["--device", "cpu", "--small"]) == 0
    out = capsys.readouterr().out
    assert out.count("(OK)") == 4
    assert all(f"{family} both" in out for family in ("na", "bs", "delta", "gla"))


def test_small_cases_report_a_mismatch(monkeypatch, capsys):
    gpu_kernels = load_gpu_kernels()
    real = gpu_kernels.BUILDERS["na"]

    def off_by_a_bit(small, dtype, device, gen):
        inputs, run, reference = real(small, dtype, device, gen)
        return inputs, (lambda q, k, v: run(q, k, v) * 1.01), reference

    monkeypatch.setitem(gpu_kernels.BUILDERS, "na", off_by_a_bit)
    assert gpu_kernels.main(["--device", "cpu", "--small", "--family", "na"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPU")
def test_cuda_without_a_device_is_a_clear_error(capsys):
    gpu_kernels = load_gpu_kernels()
    assert gpu_kernels.main(["--device", "cuda"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
