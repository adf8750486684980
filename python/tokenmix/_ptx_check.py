"""`python -m tokenmix ptx-check`: does the PTX that the library embeds assemble for other
architectures and other toolkits?

The library ships SASS for TOKENMIX_CUDA_ARCHS (sm_80 and sm_90 by default) and the PTX of each,
which the driver compiles at load time for newer GPUs (sm_100, sm_120): the driver picks the
highest PTX target not above the device's. This check runs that compilation ahead of time with a
given ``ptxas``, the same way, and reports per kernel the registers, stack and spills, so that a
spill or an assembler error on an architecture we do not build SASS for shows up here. The driver
chooses per module (per translation unit); choosing once for the library gives the same answer
because every translation unit is built for the same TOKENMIX_CUDA_ARCHS.

``--ptx-version`` rewrites the PTX's ``.version`` first: with the CUDA 12 ptxas (the
``nvidia-cuda-nvcc-cu12`` package) and the highest PTX ISA it accepts, it tells whether a CUDA 12
build of the same source is plausible (the PTX uses nothing newer than that ISA).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import subprocess
import tempfile

from . import _ops
from ._info import _readable_kernel, parse_ptxas_report
from ._sass import _find_tool, tool_candidates

# Where CMake finds nvcc on the project's machines.
_DEFAULT_TOOLKIT_PTXAS = "/usr/local/cuda/bin/ptxas"

__all__ = ["PtxFile", "PtxCheck", "extract_ptx", "pick_ptx", "lower_version", "check", "find_ptxas"]


@dataclasses.dataclass
class PtxFile:
    name: str
    target: int  # the PTX's .target, sm_<target>
    suffix: str  # "" (runs on any later GPU), "a" (only on sm_<target>), "f" (its family)
    version: str  # the PTX ISA version, "9.0"
    entries: list[str]
    text: str


@dataclasses.dataclass
class PtxCheck:
    arch: str  # the architecture assembled for, "sm_100"
    ptxas: str  # its release line, "release 13.0, V13.0.88"
    source_target: int  # the PTX's own target
    ptx_version: str  # the .version assembled
    files: int
    rows: list[dict]  # the ptxas report, one row per kernel
    errors: list[str]  # ptxas messages of failed files
    missing: list[str] = dataclasses.field(default_factory=list)  # entries ptxas did not report

    @property
    def spill_bytes(self) -> int:
        return sum(r["spill_stores"] + r["spill_loads"] for r in self.rows)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and not self.errors and not self.missing and self.spill_bytes == 0


def find_ptxas(release: int | None = None) -> str:
    """ptxas of the given major release (13: the one nvcc uses; 12: ``nvidia-cuda-nvcc-cu12``)."""
    # nvidia-cuda-nvcc-cu12 installs nvidia/cuda_nvcc/bin/ptxas; nvcc's own toolkit last
    candidates = tool_candidates("ptxas", ("cuda_nvcc",))
    if os.access(_DEFAULT_TOOLKIT_PTXAS, os.X_OK):
        candidates.append(_DEFAULT_TOOLKIT_PTXAS)
    for path in candidates:
        if release is None or ptxas_release(path).startswith(f"release {release}."):
            return path
    package = {12: "nvidia-cuda-nvcc-cu12", 13: "nvidia-cuda-nvcc"}.get(release or 13)
    hint = f"`pip install {package}`, " if package else ""
    wanted = f"a CUDA {release} ptxas" if release else "ptxas"
    raise FileNotFoundError(f"{wanted} not found: {hint}set CUDA_HOME, or pass --ptxas")


def ptxas_release(ptxas: str) -> str:
    """The release line of ``ptxas --version`` ("release 13.0, V13.0.88")."""
    try:
        done = subprocess.run([ptxas, "--version"], capture_output=True, text=True)
    except OSError as e:
        raise FileNotFoundError(f"ptxas {ptxas!r} cannot run: {e}") from e
    m = re.search(r"release [\d.]+, V[\d.]+", done.stdout)
    if done.returncode != 0 or not m:
        raise RuntimeError(f"{ptxas} --version did not name a CUDA release: {done.stderr.strip()}")
    return m.group(0)


def extract_ptx(library: str | None = None, cuobjdump: str | None = None) -> list[PtxFile]:
    """Every PTX module embedded in the library (default: the installed ``_C.so``)."""
    library = os.path.abspath(library or _ops.LIBRARY_PATH)
    tool = cuobjdump or _find_tool("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([tool, "-xptx", "all", library], cwd=tmp, capture_output=True,
                              text=True)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{tool} -xptx all {library} failed: {done.stderr.strip()}")
        files = []
        for name in sorted(os.listdir(tmp)):
            if name.endswith(".ptx"):
                with open(os.path.join(tmp, name)) as f:
                    files.append(parse_ptx(name, f.read()))
    if not files:
        raise RuntimeError(f"{library} embeds no PTX (built without the virtual architectures?)")
    return files


def parse_ptx(name: str, text: str) -> PtxFile:
    target = re.search(r"^\s*\.target\s+sm_(\d+)([af]?)\b", text, re.M)
    version = re.search(r"^\s*\.version\s+(\d+\.\d+)", text, re.M)
    if not target or not version:
        raise ValueError(f"{name}: no .target / .version line: not PTX")
    entries = re.findall(r"\.entry\s+(\w+)", text)
    return PtxFile(name, int(target.group(1)), target.group(2), version.group(1), entries, text)


def _runs_on(f: PtxFile, arch: int) -> bool:
    """Whether the driver may compile this PTX for sm_<arch>: generic PTX for any later GPU,
    family PTX (sm_100f) for later GPUs of its major, arch-specific PTX (sm_90a) only for its
    own architecture."""
    if f.suffix == "a":
        return f.target == arch
    if f.suffix == "f":
        return f.target // 10 == arch // 10 and f.target <= arch
    return f.target <= arch


def pick_ptx(files: list[PtxFile], arch: int) -> list[PtxFile]:
    """The modules the driver would JIT for sm_<arch>: those of the highest target <= arch."""
    usable = [f for f in files if _runs_on(f, arch)]
    if not usable:
        targets = ", ".join(sorted({f"sm_{f.target}{f.suffix}" for f in files}))
        raise ValueError(f"no embedded PTX runs on sm_{arch}: the library has PTX for {targets}")
    best = max(f.target for f in usable)
    return [f for f in usable if f.target == best]


def lower_version(text: str, version: str) -> str:
    """The PTX with its ``.version`` line set to ``version`` ("8.8")."""
    if not re.fullmatch(r"\d+\.\d+", version):
        raise ValueError(f"ptx_version must look like 8.8, got {version!r}")
    return re.sub(r"^(\s*\.version\s+)\d+\.\d+", rf"\g<1>{version}", text, count=1, flags=re.M)


def _assemble(ptxas: str, arch: int, f: PtxFile, text: str, tmp: str) -> tuple[str, str, int]:
    src = os.path.join(tmp, f.name)
    with open(src, "w") as out:
        out.write(text)
    cmd = [ptxas, f"-arch=sm_{arch}", "-v", "-o", os.devnull, src]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return done.stdout + done.stderr, done.stderr, done.returncode


def check(
    arch: int,
    ptxas: str,
    files: list[PtxFile],
    ptx_version: str | None = None,
    kernel: str | None = None,
    jobs: int | None = None,
) -> PtxCheck:
    """Assemble the modules the driver would pick for sm_<arch> with ``ptxas``; with ``kernel``
    (a regex), only the modules that define a matching entry."""
    if ptx_version is not None:
        lower_version("", ptx_version)  # checks the argument before any work
    try:
        pattern = re.compile(kernel or "")
    except re.error as e:
        raise ValueError(f"kernel must be a regular expression: {kernel!r}: {e}") from e
    chosen = pick_ptx(files, arch)
    if kernel:
        chosen = [f for f in chosen if any(pattern.search(e) for e in f.entries)]
        if not chosen:
            raise ValueError(f"no PTX module defines a kernel matching {kernel!r}")
    release = ptxas_release(ptxas)
    rows, errors = [], []
    with tempfile.TemporaryDirectory() as tmp:
        with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
            futures = [
                pool.submit(_assemble, ptxas, arch, f,
                            lower_version(f.text, ptx_version) if ptx_version else f.text, tmp)
                for f in chosen
            ]  # fmt: skip
            for f, fut in zip(chosen, futures, strict=True):
                report, stderr, rc = fut.result()
                if rc != 0:
                    errors.append(f"{f.name}: {stderr.strip()}")
                else:
                    rows += parse_ptxas_report(report)
    rows = [r for r in rows if pattern.search(r["kernel"])]
    expected = [e for f in chosen for e in f.entries if pattern.search(e)]
    reported = {r["kernel"] for r in rows}
    failed = bool(errors)  # a failed module reports nothing; its error says why
    missing = [] if failed else [e for e in expected if e not in reported]
    return PtxCheck(
        arch=f"sm_{arch}",
        ptxas=release,
        source_target=chosen[0].target,
        ptx_version=ptx_version or chosen[0].version,
        files=len(chosen),
        rows=rows,
        errors=errors,
        missing=missing,
    )


def format_checks(checks: list[PtxCheck]) -> str:
    head = (
        "| arch | ptxas | PTX | .version | modules | kernels | max registers | max stack | "
        "spill bytes | result |\n| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    lines = [head]
    for c in checks:
        regs = max((r["registers"] for r in c.rows), default=0)
        stack = max((r["stack"] for r in c.rows), default=0)
        result = (
            "ok" if c.ok else "errors" if c.errors else "spills" if c.spill_bytes else "missing"
        )
        lines.append(
            f"| {c.arch} | {c.ptxas} | compute_{c.source_target} | {c.ptx_version} | {c.files} | "
            f"{len(c.rows)} | {regs} | {stack} | {c.spill_bytes} | {result} |"
        )
    for c in checks:
        lines += [f"{c.arch}: {e}" for e in c.errors]
        lines += [f"{c.arch}: no ptxas report for `{_readable_kernel(e)}`" for e in c.missing]
        lines += [
            f"{c.arch}: `{_readable_kernel(r['kernel'])}` spills ({r['registers']} registers, "
            f"{r['spill_stores']} B stores, {r['spill_loads']} B loads)"
            for r in c.rows
            if r["spill_stores"] or r["spill_loads"]
        ]
    return "\n".join(lines)
