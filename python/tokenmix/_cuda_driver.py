"""The NVIDIA driver a CUDA build of tokenmix needs, and a clear error when it is too old.

A CUDA build links the CUDA runtime statically. By CUDA's minor-version compatibility it runs on
any driver of the same CUDA major: CUDA 13.x needs a driver for CUDA 13.0 (r580) or newer, CUDA
12.x one for CUDA 12.0 (r525) or newer. The driver reports the newest CUDA version it supports.
"""

from __future__ import annotations

import functools
import re
from importlib import metadata

import torch

# The oldest driver of each CUDA major (Linux x86-64), from NVIDIA's CUDA release notes.
MINIMUM_DRIVER = {12: "525.60.13", 13: "580.65.06"}

# The CUDA wheels tokenmix builds, newest first: (the CUDA version the wheel's runtime is, as
# the driver API reports versions, variant). README.md, "Installing", lists the same.
CUDA_VARIANTS = ((13000, "cu130"), (12080, "cu128"), (12060, "cu126"))


def format_cuda_version(version: int) -> str:
    """12040 -> '12.4'."""
    return f"{version // 1000}.{version % 1000 // 10}"


def variant_for_driver(driver_version: int) -> str | None:
    """The newest tokenmix CUDA wheel that runs on a driver supporting `driver_version`."""
    for wheel_version, variant in CUDA_VARIANTS:
        if driver_version >= wheel_version:
            return variant
    major = driver_version // 1000
    for wheel_version, variant in reversed(CUDA_VARIANTS):
        if wheel_version // 1000 == major:  # an older minor of the same major
            return variant
    return None


def _release() -> str:
    try:
        return metadata.version("tokenmix").split("+")[0]
    except metadata.PackageNotFoundError:  # a source tree on sys.path
        from . import __version__

        return __version__


def driver_release(path: str = "/proc/driver/nvidia/version") -> str | None:
    """The installed NVIDIA kernel driver's version (e.g. '550.54.14'), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(r"Kernel Module\b.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    return match.group(1) if match else None


def driver_problem(
    driver_version: int, runtime_version: int, variant: str, release: str | None = None
) -> str | None:
    """Why a build linking CUDA `runtime_version` cannot run on `driver_version` (the driver
    API's version; `release` is the driver's own, when known), else None."""
    if runtime_version <= 0:
        return None
    major = runtime_version // 1000
    if driver_version >= major * 1000:
        return None
    supports = f"supports CUDA {format_cuda_version(driver_version)} at most"
    if driver_version <= 0:
        found = "no NVIDIA driver"
    elif release:
        found = f"NVIDIA driver {release}, which {supports}"
    else:
        found = f"an NVIDIA driver that {supports}"
    minimum = MINIMUM_DRIVER.get(major)
    needs = f"a driver for CUDA {major}.x" + (f" ({minimum} or newer)" if minimum else "")
    message = (
        f"tokenmix's CUDA kernels ({variant} build) link the CUDA "
        f"{format_cuda_version(runtime_version)} runtime, which needs {needs}; this machine "
        f"has {found}."
    )
    alternative = variant_for_driver(driver_version) if driver_version > 0 else None
    if alternative is not None and alternative != variant:
        release = _release()
        message += (
            f" Install the {alternative} variant instead (tokenmix {release}+{alternative}, "
            f"tokenmix-{release}+{alternative}-py3-none-manylinux_2_28_x86_64.whl; README.md, "
            "'Installing'), or update the driver."
        )
    else:
        message += " Update the NVIDIA driver."
    return message


@functools.cache
def cuda_versions() -> tuple[int, int]:
    """(driver, runtime) CUDA versions; (0, 0) when the library has no CUDA kernels."""
    from . import _ops

    if _ops.load_error is not None or not _ops.build_info().get("cuda_built", False):
        return (0, 0)
    return (
        int(torch.ops.tokenmix.cuda_driver_version()),
        int(torch.ops.tokenmix.cuda_runtime_version()),
    )


def require_cuda_kernels() -> None:
    """Called before an operator launches its CUDA kernels: raises NotImplementedError when
    this build has none, RuntimeError when the driver is too old for them."""
    from . import _ops

    if not _ops.build_info().get("cuda_built", False):
        reason = _ops.build_info().get("cuda_reason") or "built without CUDA"
        raise NotImplementedError(
            f"this tokenmix build has no CUDA kernels ({reason}); install a CUDA variant "
            "(README.md, 'Installing') or rebuild with nvcc available (TOKENMIX_CUDA=ON), see "
            "`python -m tokenmix info`"
        )
    if torch.compiler.is_compiling():
        # Traced graphs skip the driver check (the versions come from ops that Dynamo would
        # have to trace); an eager call checks, and a launch on a too-old driver still fails
        # with the CUDA runtime's own error.
        return
    problem = _checked_problem()
    if problem is not None:
        raise RuntimeError(problem)


def cuda_kernels_usable() -> bool:
    """Whether CUDA tensors can run tokenmix's CUDA kernels: a loaded build with CUDA kernels
    and a driver that can run them. A driver too old for the build's CUDA runtime leaves the
    PyTorch compositions, which still work there."""
    from . import _ops

    if _ops.load_error is not None or not _ops.build_info().get("cuda_built", False):
        return False
    return torch.compiler.is_compiling() or cuda_driver_problem() is None


def cuda_driver_problem() -> str | None:
    """Why the installed driver cannot run this build's CUDA kernels, or None when it can
    (checked once per process)."""
    return _checked_problem()


@functools.cache
def _checked_problem() -> str | None:
    from . import _ops

    driver, runtime = cuda_versions()
    variant = _ops.build_info().get("variant", "source")
    return driver_problem(driver, runtime, variant, driver_release())
