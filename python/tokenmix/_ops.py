"""Loads the compiled library that registers ``torch.ops.tokenmix.*``."""

from __future__ import annotations

import json
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY_PATH = os.path.join(_HERE, "_C.so")

load_error: str | None = None
try:
    torch.ops.load_library(LIBRARY_PATH)
except OSError as exc:  # a source checkout without a build, or a broken install
    load_error = f"{type(exc).__name__}: {exc}"


def _read_build_info() -> dict:
    path = os.path.join(_HERE, "_build_info.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


# Read once: the operators consult it on every CUDA call, also inside torch.compile graphs,
# where a file read cannot be traced.
_BUILD_INFO = _read_build_info()


def build_info() -> dict:
    """Facts recorded by CMake at build time (empty if the package was not built)."""
    return _BUILD_INFO


def require_library() -> None:
    if load_error is not None:
        raise RuntimeError(
            "tokenmix's compiled kernels could not be loaded "
            f"({load_error}). Build and install the package with "
            "`pip install --no-build-isolation .`, or call the pure-PyTorch "
            "reference in tokenmix.neighborhood.reference."
        )


def forbid_double_backward(op_name: str) -> None:
    """Registers an autograd formula for a backward op that raises.

    tokenmix's backward ops are not differentiable themselves. Without this,
    torch would treat them as constants under ``create_graph=True`` (with only a
    warning) and second derivatives would come out silently wrong.
    """

    def setup(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op_name} is not differentiable: tokenmix does not support double "
            "backward (second derivatives, gradient penalties, Hessian-vector products) "
            "through its fused kernels; use the pure-PyTorch reference for those"
        )

    torch.library.register_autograd(op_name, backward, setup_context=setup)
