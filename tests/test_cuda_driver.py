"""The driver a CUDA build needs, the error when it is older, and what `info` reports
(python/tokenmix/_cuda_driver.py). The versions are the driver API's: 12040 is CUDA 12.4."""

from __future__ import annotations

import pytest
import tokenmix
from tokenmix import _cuda_driver, _ops
from tokenmix._cuda_driver import driver_problem, format_cuda_version, variant_for_driver


def test_format_cuda_version():
    assert format_cuda_version(13000) == "13.0"
    assert format_cuda_version(12080) == "12.8"
    assert format_cuda_version(12040) == "12.4"


@pytest.mark.parametrize(
    "driver, variant",
    [
        (13020, "cu130"),
        (13000, "cu130"),
        (12090, "cu128"),
        (12080, "cu128"),
        (12060, "cu126"),
        (12040, "cu126"),  # CUDA 12 minor-version compatibility
        (12000, "cu126"),
        (11080, None),
    ],
)
def test_variant_for_driver(driver, variant):
    assert variant_for_driver(driver) == variant


@pytest.mark.parametrize("driver", [13000, 13010, 14000])
def test_a_cuda13_build_runs_on_cuda13_drivers(driver):
    assert driver_problem(driver, 13000, "cu130") is None


def test_minor_version_compatibility():
    """A CUDA 12.8 runtime runs on a CUDA 12.2 driver."""
    assert driver_problem(12020, 12080, "cu128") is None


def test_cu130_on_a_cuda12_driver_names_the_driver_and_the_variant():
    message = driver_problem(12040, 13000, "cu130")
    assert message is not None
    assert "CUDA 13.0 runtime" in message
    assert "580.65.06" in message  # the minimum driver of CUDA 13
    assert "supports CUDA 12.4 at most" in message  # the driver found
    assert "cu126 variant" in message and "+cu126-py3-none-manylinux_2_28_x86_64.whl" in message


def test_cu130_on_a_cuda12_8_driver_suggests_cu128():
    assert "cu128 variant" in driver_problem(12080, 13000, "cu130")


def test_a_driver_older_than_every_wheel_says_update():
    message = driver_problem(11080, 12060, "cu126")
    assert "supports CUDA 11.8 at most" in message
    assert "525.60.13" in message
    assert "variant" not in message and "Update the NVIDIA driver" in message


def test_no_driver():
    message = driver_problem(0, 13000, "cu130")
    assert "no NVIDIA driver" in message and "Update the NVIDIA driver" in message


def test_cpu_builds_need_no_driver():
    assert driver_problem(0, 0, "cpu") is None


def test_require_cuda_kernels_raises_the_driver_problem(monkeypatch):
    """What an operator on CUDA tensors raises before launching on a too-old driver."""
    monkeypatch.setattr(_ops, "build_info", lambda: {"cuda_built": True, "variant": "cu130"})
    monkeypatch.setattr(_cuda_driver, "cuda_versions", lambda: (12040, 13000))
    _cuda_driver._checked_problem.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"supports CUDA 12\.4 at most.*cu126 variant"):
            _cuda_driver.require_cuda_kernels()
    finally:
        _cuda_driver._checked_problem.cache_clear()


def test_require_cuda_kernels_without_cuda_build(monkeypatch):
    monkeypatch.setattr(
        _ops, "build_info", lambda: {"cuda_built": False, "cuda_reason": "no nvcc found"}
    )
    with pytest.raises(NotImplementedError, match="no CUDA kernels .no nvcc found"):
        _cuda_driver.require_cuda_kernels()


def test_info_reports_the_variant_and_the_cuda_runtime():
    data = tokenmix.info()
    build = _ops.build_info()
    assert data["variant"] == build["variant"]
    assert isinstance(data["portable_linking"], bool)
    if build["cuda_built"]:
        cuda = data["backends"]["cuda"]
        runtime_major = int(build["cuda_version"].split(".")[0])
        assert cuda["runtime"].startswith(f"CUDA {runtime_major}.")
        assert cuda["minimum driver"] == (
            f"{_cuda_driver.MINIMUM_DRIVER[runtime_major]} (CUDA {runtime_major}.x)"
        )
        driver, runtime = _cuda_driver.cuda_versions()
        assert runtime // 1000 == runtime_major
        assert ("none found" in cuda["driver"]) == (driver == 0)


def test_the_error_names_the_driver_release_when_known():
    message = driver_problem(12040, 13000, "cu130", "550.54.14")
    assert "NVIDIA driver 550.54.14, which supports CUDA 12.4 at most" in message


@pytest.mark.parametrize(
    "text",
    [
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n",
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
        "(dvs-builder@U16-I3-B03-4-3)  Tue Jul 15 2025\n",
    ],
)
def test_driver_release_reads_proc(tmp_path, text):
    path = tmp_path / "version"
    path.write_text(text + "GCC version:  gcc version 12.2.0\n")
    assert _cuda_driver.driver_release(str(path)) in ("550.54.14", "580.65.06")
    assert _cuda_driver.driver_release(str(tmp_path / "missing")) is None


def test_require_cuda_kernels_compiles_with_fullgraph():
    """The check sits on the CUDA paths of the operators, which torch.compile(fullgraph=True)
    traces: it must not read files or call ops inside the graph."""
    import torch

    def f(x):
        _cuda_driver.require_cuda_kernels()
        return x + 1

    if not _ops.build_info().get("cuda_built", False):
        pytest.skip("a build without CUDA raises NotImplementedError here")
    x = torch.ones(3)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), x + 1)
