"""`tokenmix.info()` / `python -m tokenmix info`: what this install can do."""

from __future__ import annotations

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
        cuda["archs"] = ", ".join(f"sm_{a}" for a in str(build.get("cuda_archs", "")).split(";"))
        cuda["kernels"] = (
            "SIMT kernels of the emulated-ops library; tokenmix ops run on the CPU only so far"
        )
    else:
        cuda["reason"] = build.get("cuda_reason") or "the compiled library is missing"
    return {
        "tokenmix": __version__,
        "torch": torch.__version__,
        "built_against_torch": build.get("torch_build_version"),
        "stable_abi_target": build.get("stable_abi_target"),
        "compiler": build.get("compiler"),
        "library": _ops.LIBRARY_PATH,
        "operators": [
            "neighborhood attention (na1d/na2d/na3d)",
            "linear attention scans (linear, RetNet, simple GLA, GLA)",
            "delta rule (plain, gated)",
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
        f"tokenmix {data['tokenmix']}",
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
