"""`tokenmix.info()` / `python -m tokenmix info`: what this install can do."""

from __future__ import annotations

from importlib import metadata

import torch

from . import _ops

_ISA_NAMES = {0: "generic x86-64 (SSE2)", 1: "AVX2 + FMA", 2: "AVX-512"}


def _emulator_status(build: dict) -> dict:
    """The SIMT emulator's test library (torch.ops.tokenmix_emulated.*)."""
    import os

    path = os.path.join(os.path.dirname(_ops.LIBRARY_PATH), "_emulated.so")
    if build.get("emulator_built") and os.path.exists(path):
        return {"built": True, "library": "tokenmix/_emulated.so (tests only)"}
    return {"built": False, "reason": "built with TOKENMIX_EMULATOR=OFF"}


def cuda_resource_usage() -> list[dict]:
    """The ptxas report of the shipped CUDA kernels, one row per (architecture, kernel):
    arch, kernel (mangled), registers, smem (static bytes), stack, spill_stores, spill_loads.
    Empty when the build has no CUDA."""
    import os

    path = os.path.join(os.path.dirname(_ops.LIBRARY_PATH), "cuda_resource_usage.txt")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return parse_ptxas_report(f.read())


def parse_ptxas_report(text: str) -> list[dict]:
    """The rows of ``ptxas -v`` output (the format of `cuda_resource_usage`)."""
    import re

    rows, kernel = [], None
    for line in text.splitlines():
        # sm_90, and the arch-specific / family targets sm_90a, sm_100f
        if m := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+[af]?)'", line):
            kernel = {"arch": m.group(2), "kernel": m.group(1)}
        elif kernel and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill "
                                        r"stores, (\d+) bytes spill loads", line)):  # fmt: skip
            kernel["stack"] = int(m.group(1))
            kernel["spill_stores"], kernel["spill_loads"] = int(m.group(2)), int(m.group(3))
        elif kernel and (m := re.search(r"Used (\d+) registers", line)):
            kernel["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            kernel["smem"] = int(smem.group(1)) if smem else 0
            if "stack" in kernel:  # a complete entry (its stack and spill line came first)
                rows.append(kernel)
            kernel = None
    return rows


def _readable_kernel(mangled: str) -> str:
    """`_ZN8tokenmix4cuda17na_forward_kernelINS0_3F16ELi64EEEvNS0_8NaParamsE` ->
    `na_forward_kernel<F16, 64>` (enough of the Itanium ABI for tokenmix's kernels)."""
    import re

    if not mangled.startswith("_ZN"):
        return mangled
    i, name = 3, mangled
    while i < len(mangled) and mangled[i].isdigit():  # nested names: <length><name>...
        j = i
        while mangled[j].isdigit():
            j += 1
        n = int(mangled[i:j])
        name, i = mangled[j : j + n], j + n
    rest = mangled[i:]
    if not rest.startswith("I"):
        return name
    template = rest[: rest.find("Ev")]
    args = re.findall(r"NS0_\d+(\w+?)E|Li(\d+)E|Lb([01])E", template)
    parts = [a or b or ("true" if c == "1" else "false") for a, b, c in args]
    return f"{name}<{', '.join(parts)}>"


def format_cuda_resources(rows: list[dict]) -> str:
    """A Markdown table of cuda_resource_usage() rows."""
    lines = [
        "| arch | kernel | registers | static smem (B) | stack (B) | spills (B) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        spills = r.get("spill_stores", 0) + r.get("spill_loads", 0)
        lines.append(
            f"| {r['arch']} | `{_readable_kernel(r['kernel'])}` | {r['registers']} | {r['smem']} "
            f"| {r.get('stack', 0)} | {spills} |"
        )
    return "\n".join(lines)


def _distribution_version() -> str | None:
    """The installed distribution's version, with its variant label (0.1.0+cu130)."""
    try:
        return metadata.version("tokenmix")
    except metadata.PackageNotFoundError:
        return None


def _cuda_runtime_status(build: dict) -> dict:
    """The CUDA runtime the library links, the driver it needs and the driver found."""
    from ._cuda_driver import (
        MINIMUM_DRIVER,
        cuda_versions,
        driver_problem,
        driver_release,
        format_cuda_version,
    )

    if _ops.load_error is not None:
        return {}
    driver, runtime = cuda_versions()
    release = driver_release()
    major = runtime // 1000
    status = {
        "runtime": f"CUDA {format_cuda_version(runtime)} (linked statically)",
        "minimum driver": f"{MINIMUM_DRIVER.get(major, 'unknown')} (CUDA {major}.x)",
        "driver": (
            f"{release or 'version unknown'}, supports CUDA {format_cuda_version(driver)}"
            if driver > 0
            else "none found"
        ),
    }
    problem = driver_problem(driver, runtime, build.get("variant", "source"), release)
    if problem is not None and driver > 0:
        status["driver problem"] = problem
    return status


def info() -> dict:
    """Returns the version, the torch version and each backend's status."""
    from . import __version__

    build = _ops.build_info()
    cpu: dict = {"built": _ops.load_error is None}
    if _ops.load_error is None:
        cpu["kernels"] = _ISA_NAMES.get(int(torch.ops.tokenmix.cpu_isa()), "unknown")
        cpu["threads"] = torch.get_num_threads()
    else:
        cpu["reason"] = _ops.load_error
    cuda: dict = {"built": bool(build.get("cuda_built", False))}
    if cuda["built"]:
        cuda["version"] = build.get("cuda_version")
        cuda.update(_cuda_runtime_status(build))
        cuda["archs"] = ", ".join(f"sm_{a}" for a in str(build.get("cuda_archs", "")).split(";"))
        cuda["kernels"] = (
            "fused neighborhood and block-sparse attention (forward + backward; fp16/bf16 "
            "tensor cores, fp32), fft_conv for transforms up to 2^22 points (forward + "
            "backward, one kernel up to 2048 points; fp16/bf16 Monarch transforms on tensor "
            "cores, fp32 FMA), fourier_mix / global_filter / spectral_gate for transformed "
            "axes up to 2048 points (1023 when not a power of two, by Bluestein's "
            "algorithm); linear scans and the delta rule (linear, RetNet, simple GLA, GLA, "
            "DeltaNet, Gated DeltaNet; forward + backward, fp16/bf16 products on tensor cores as "
            "tf32, fp32 FMA, K <= 256)"
        )
    else:
        cuda["reason"] = build.get("cuda_reason") or "the compiled library is missing"
    return {
        "tokenmix": __version__,
        "distribution": _distribution_version(),
        "variant": build.get("variant", "source"),
        "portable_linking": build.get("portable_linking"),
        "torch": torch.__version__,
        "built_against_torch": build.get("torch_build_version"),
        "stable_abi_target": build.get("stable_abi_target"),
        "compiler": build.get("compiler"),
        "library": _ops.LIBRARY_PATH,
        "operators": [
            "neighborhood attention (na1d/na2d/na3d) and its planner (tokenmix.plan)",
            "block-sparse attention (FlexAttention BlockMask semantics)",
            "linear attention scans (linear, RetNet, simple GLA, GLA)",
            "delta rule (plain, gated)",
            "FFT mixing (fft_conv, fourier_mix, global_filter, spectral_gate)",
        ],
        "backends": {
            "cpu": cpu,
            "cuda": cuda,
            "emulator": _emulator_status(build),
            "reference": {"built": True},
        },
    }


def format_info(data: dict) -> str:
    lines = [
        f"tokenmix {data['distribution'] or data['tokenmix']} (variant: {data['variant']}; "
        + (
            "manylinux_2_28 symbol versions"
            if data["portable_linking"]
            else "linked for this machine's glibc"
        )
        + ")",
        f"torch {data['torch']} (built against {data['built_against_torch']}, "
        f"stable ABI target {data['stable_abi_target']})",
        f"compiler: {data['compiler']}",
        f"library: {data['library']}",
        "operators: " + "; ".join(data["operators"]),
        "backends:",
    ]
    for name, b in data["backends"].items():
        if b["built"]:
            extra = ", ".join(f"{k}: {v}" for k, v in b.items() if k != "built")
            lines.append(f"  {name:9s} yes" + (f" ({extra})" if extra else ""))
        else:
            lines.append(f"  {name:9s} NO  ({b['reason']})")
    return "\n".join(lines)
