"""The compiled library uses only PyTorch's stable C ABI.

An extension built against the stable ABI must not link against PyTorch's C++ API
(c10 / ATen / torch:: symbols, whose mangled names change between releases) nor
against libc10 / libtorch_python; the only torch symbols it may import are the C shim
functions (``aoti_torch_*``, ``torch_*``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tokenmix  # noqa: F401  (loads the library)
from tokenmix import _ops

CSRC = Path(__file__).resolve().parents[1] / "csrc"

_MANGLED_CXX = re.compile(r"^_Z(?:N|NK|TV|TI|TS|THN|TVN|TIN|TSN)?(?:K)?(?:3c10|2at|5torch)")
_DEMANGLED_CXX = re.compile(r"(?<![\w:])(?:c10|at|torch)::")
_C_SHIM = re.compile(r"^(?:aoti_torch_|torch_)\w+$")


def _library() -> str:
    path = _ops.LIBRARY_PATH
    if _ops.load_error is not None or not os.path.exists(path):
        pytest.skip(f"compiled library not available: {_ops.load_error}")
    return path


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} not found")
    return exe


def _undefined_symbols(demangle: bool) -> list[str]:
    """Names of the undefined dynamic symbols (nm lines are ``<type> <name>``)."""
    args = [_tool("nm"), "-D", "--undefined-only"] + (["-C"] if demangle else [])
    out = subprocess.run(args + [_library()], check=True, capture_output=True, text=True).stdout
    names = []
    for line in out.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and len(parts[0]) == 1:
            names.append(parts[1] if demangle else parts[1].split("@", 1)[0])
    return names


def test_symbol_patterns():
    # The detectors themselves: what a C++-API build would import, and what is fine.
    for name in (
        "_ZN3c1019UndefinedTensorImpl10_singletonE",
        "_ZNK2at10TensorBase4sizeEl",
        "_ZTVN5torch8autograd4NodeE",
        "_ZN5torch7Library4implEv",
    ):
        assert _MANGLED_CXX.match(name), name
    for name in ("_ZNSo9_M_insertIlEERSoT_", "aoti_torch_get_dim", "_ZdlPvm"):
        assert not _MANGLED_CXX.match(name), name
    assert _DEMANGLED_CXX.search("c10::detail::torchCheckFail(char const*)")
    assert _DEMANGLED_CXX.search("at::Tensor::print() const")
    assert not _DEMANGLED_CXX.search("std::basic_ostream<char>& std::format::x()")
    assert _C_SHIM.match("torch_parallel_for") and not _C_SHIM.match("THPVariable_Wrap")


def test_library_is_found():
    path = _library()
    assert os.path.basename(path) == "_C.so"
    assert os.path.dirname(path) == os.path.dirname(os.path.abspath(tokenmix.__file__))


def test_no_cxx_torch_symbols_mangled():
    names = _undefined_symbols(demangle=False)
    assert names, "nm found no undefined symbols at all; the parsing is broken"
    bad = [n for n in names if _MANGLED_CXX.match(n)]
    assert not bad, f"C++ torch/c10/at symbols imported: {bad[:20]}"


def test_no_cxx_torch_symbols_demangled():
    names = _undefined_symbols(demangle=True)
    bad = [n for n in names if _DEMANGLED_CXX.search(n)]
    assert not bad, f"C++ torch/c10/at symbols imported: {bad[:20]}"


def test_torch_imports_are_c_shims():
    names = _undefined_symbols(demangle=False)
    torch_like = [n for n in names if not n.startswith("_Z") and "torch" in n.lower()]
    assert torch_like, "expected the stable-ABI C shim functions to be imported"
    bad = [n for n in torch_like if not _C_SHIM.match(n)]
    assert not bad, f"torch symbols that are not aoti_torch_*/torch_* C shims: {bad}"
    assert any(n.startswith("aoti_torch_") for n in torch_like)


def test_no_needed_libc10_or_libtorch_python():
    out = subprocess.run(
        [_tool("readelf"), "-d", _library()], check=True, capture_output=True, text=True
    ).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert needed, "readelf reported no NEEDED entries; the parsing is broken"
    for lib in needed:
        assert not lib.startswith("libc10"), needed
        assert not lib.startswith("libtorch_python"), needed
        assert "python" not in lib, needed


_FORBIDDEN_INCLUDES = re.compile(
    r'^\s*#\s*include\s*[<"](torch/extension\.h|torch/torch\.h|torch/all\.h|ATen/[^>"]*'
    r'|pybind11/[^>"]*)[>"]',
    re.MULTILINE,
)


def test_no_unstable_headers_in_csrc():
    if not CSRC.is_dir():
        pytest.skip("source tree (csrc/) not available")
    sources = [
        p for p in CSRC.rglob("*") if p.suffix in {".h", ".hpp", ".cpp", ".cc", ".cu", ".cuh"}
    ]
    assert sources
    hits = []
    for path in sources:
        text = path.read_text(errors="replace")
        hits += [
            f"{path.relative_to(CSRC)}: {m.group(1)}" for m in _FORBIDDEN_INCLUDES.finditer(text)
        ]
        assert "torch/extension.h" not in text, path
    assert not hits, hits
