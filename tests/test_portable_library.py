"""The built libraries load on every manylinux_2_28 system: their symbol versions and
dependencies stay within auditwheel's manylinux_2_28 policy (cmake/portable_linking.cmake).

A regression here means a new glibc or libstdc++ symbol crept in: add it to
csrc/portable/glibc_compat.S or csrc/portable/libstdcxx_compat.cpp (docs/wheels.md).
"""

from __future__ import annotations

import json
import os
import platform

import pytest
import tokenmix
from tokenmix import _ops

elftools = pytest.importorskip("elftools.elf.elffile")
auditwheel = pytest.importorskip("auditwheel")


def _torch_libraries() -> set[str]:
    """torch's libraries, which the wheels depend on and never bundle: the list
    tools/build_wheel.py gives auditwheel."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "build_wheel.py")
    spec = importlib.util.spec_from_file_location("build_wheel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return set(module.TORCH_LIBRARIES)


def _policy(name: str = "manylinux_2_28") -> dict:
    path = os.path.join(os.path.dirname(auditwheel.__file__), "policy", "manylinux-policy.json")
    with open(path) as f:
        return next(p for p in json.load(f) if p["name"] == name)


def _libraries() -> list[str]:
    here = os.path.dirname(tokenmix.__file__)
    return [
        os.path.join(here, n)
        for n in ("_C.so", "_emulated.so")
        if os.path.exists(os.path.join(here, n))
    ]


def _version_needs(path: str) -> tuple[list[str], dict[str, set[str]]]:
    """(DT_NEEDED entries, {version prefix: {versions}}) of a shared library."""
    needed: list[str] = []
    versions: dict[str, set[str]] = {}
    with open(path, "rb") as f:
        elf = elftools.ELFFile(f)
        for tag in elf.get_section_by_name(".dynamic").iter_tags():
            if tag.entry.d_tag == "DT_NEEDED":
                needed.append(tag.needed)
        for _, auxiliaries in elf.get_section_by_name(".gnu.version_r").iter_versions():
            for aux in auxiliaries:
                prefix, _, version = aux.name.partition("_")
                versions.setdefault(prefix, set()).add(version)
    return needed, versions


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or not _ops.build_info().get("portable_linking", False),
    reason="portable linking is built on x86-64 Linux only (TOKENMIX_PORTABLE_LINKING)",
)


def _too_new(path: str) -> dict[str, list[str]]:
    """The versions `path` needs that manylinux_2_28 does not allow, by family."""
    allowed = _policy()["symbol_versions"]["x86_64"]
    _, versions = _version_needs(path)
    assert "GLIBC" in versions  # the reader found the table
    return {
        prefix: sorted(found - set(allowed.get(prefix, ())), key=_key)
        for prefix, found in versions.items()
        if found - set(allowed.get(prefix, ()))
    }


@pytest.mark.parametrize("path", _libraries(), ids=os.path.basename)
def test_symbol_versions_within_manylinux_2_28(path):
    too_new = _too_new(path)
    assert not too_new, (
        f"{os.path.basename(path)} needs versions newer than manylinux_2_28: {too_new}"
    )


@pytest.mark.parametrize("path", _libraries(), ids=os.path.basename)
def test_dependencies_are_the_system_and_torch(path):
    needed, _ = _version_needs(path)
    allowed = set(_policy()["lib_whitelist"]) | _torch_libraries() | {"ld-linux-x86-64.so.2"}
    assert set(needed) <= allowed, set(needed) - allowed
    # Where pthread, dl and rt functions live before glibc 2.34.
    assert {"libpthread.so.0", "libdl.so.2", "librt.so.1"} <= set(needed)


def _wrapped_symbols(portable: str) -> list[str]:
    """The symbols cmake/portable_linking.cmake wraps, read from the sources as it reads them."""
    import re

    with open(os.path.join(portable, "glibc_compat.S")) as f:
        asm = f.read()
    with open(os.path.join(portable, "libstdcxx_compat.cpp")) as f:
        cxx = f.read()
    return (
        re.findall(r"^compat ([A-Za-z0-9_]+),", asm, re.MULTILINE)
        + re.findall(r"^__wrap_([A-Za-z0-9_]+):", asm, re.MULTILINE)
        + re.findall(r"void\s+__wrap_([A-Za-z0-9_]+)\(", cxx)
    )


_PROBE = r"""
#include <cmath>
#include <sstream>
#include <thread>
extern "C" double probe(double x) {
  std::ostringstream out;
  out << x;
  std::thread worker([&] { x = std::exp2(x) + std::log2(x + 1.0); });
  worker.join();
  return x + static_cast<double>(out.str().size());
}
"""


@pytest.mark.skipif(
    tuple(int(p) for p in platform.libc_ver()[1].split(".")[:2]) < (2, 34),
    reason="on glibc < 2.34 a plain link is already within manylinux_2_28",
)
def test_compat_objects_fix_a_plain_link(tmp_path):
    """The mechanism on its own: a small library that uses threads, exp2/log2 and
    ostringstream, linked plainly on this machine, needs glibc 2.34 versions (the check fails);
    linked with csrc/portable's objects and wraps, it needs none and still computes."""
    import ctypes
    import shutil
    import subprocess

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++")
    root = os.path.join(os.path.dirname(__file__), "..")
    portable = os.path.join(root, "csrc", "portable")
    source = tmp_path / "probe.cpp"
    source.write_text(_PROBE)
    subprocess.run(
        [cxx, "-O2", "-fPIC", "-c", str(source), "-o", str(tmp_path / "probe.o")], check=True
    )
    plain = tmp_path / "plain.so"
    subprocess.run([cxx, "-shared", str(tmp_path / "probe.o"), "-o", str(plain)], check=True)
    assert _too_new(str(plain)).get("GLIBC"), "a plain link here should need glibc > 2.28"

    objects = []
    for name in ("glibc_compat.S", "libstdcxx_compat.cpp"):
        obj = tmp_path / (name + ".o")
        subprocess.run(
            [cxx, "-O2", "-fPIC", "-c", os.path.join(portable, name), "-o", str(obj)], check=True
        )
        objects.append(str(obj))
    symbols = _wrapped_symbols(portable)
    assert len(symbols) > 50 and "pthread_create" in symbols
    portable_so = tmp_path / "portable.so"
    subprocess.run(
        [cxx, "-shared", str(tmp_path / "probe.o"), *objects, "-o", str(portable_so)]
        + [f"-Wl,--wrap={s}" for s in symbols]
        + ["-Wl,--no-as-needed", "-l:libpthread.so.0", "-l:libdl.so.2", "-l:librt.so.1"],
        check=True,
    )
    assert _too_new(str(portable_so)) == {}
    results = []
    for path in (plain, portable_so):
        lib = ctypes.CDLL(str(path))
        lib.probe.restype = ctypes.c_double
        lib.probe.argtypes = [ctypes.c_double]
        results.append(lib.probe(1.5))
    assert results[0] == results[1]
