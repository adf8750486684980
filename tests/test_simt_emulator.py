"""The SIMT layer and its CPU emulator (csrc/simt_emulator, docs/simt_emulator.md).

Builds the standalone emulator project into build/simt (incremental on reruns), runs the
`simt_selftest` subcommands (kernels that must pass, planted bugs that must be reported), checks
the fragment layouts against the PTX ISA formulas and against CuTe's own layout definitions, and
compiles the same kernel source with nvcc for sm_80 and sm_90 without register spills.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "csrc" / "simt_emulator"
INCLUDE = ROOT / "csrc" / "include"
BUILD = ROOT / "build" / "simt"
KERNELS = SRC / "selftest_kernels.cu"

# Builds the standalone emulator from the source tree (make test-wheel deselects it).
pytestmark = pytest.mark.build_tree

POSITIVE = [
    "indices",
    "registered",
    "math",
    "conversions",
    "shuffles",
    "votes",
    "warp_sync",
    "reduce",
    "atomics",
    "atomic_warp",
    "math_approx",
    "vec128",
    "mma_f16",
    "mma_bf16",
    "mma_tf32",
    "ldmatrix",
    "cp_async",
    "gemm_f16",
    "gemm_bf16",
    "wgmma_f16",
    "wgmma_bf16",
]

NS = "tokenmix::simt_selftest::emulated::"  # the emulator build of the kernel sources
# name -> (report kind, fragments the report must contain)
BUGS = {
    "bug_oob_global": (
        "out-of-bounds global read",
        [
            f"kernel '{NS}oob_read_kernel'",
            "block (1,0,0)",
            "thread (36,0,0)",
            "address 0x",
            "past the end of buffer 'in'",
        ],
    ),
    "bug_misaligned": (
        "misaligned global access",
        [
            f"kernel '{NS}misaligned_kernel'",
            "block (0,0,0)",
            "thread (0,0,0)",
            "16-byte read at address 0x",
            "not 16-byte aligned",
            "buffer 'in' + 4",
        ],
    ),
    "bug_barrier_exit": (
        "barrier divergence",
        [
            f"kernel '{NS}barrier_exit_kernel'",
            "block (0,0,0)",
            "thread (48,0,0)",
            "48 threads wait at sync_threads() at selftest_kernels.cu:",
        ],
    ),
    "bug_barrier_sites": (
        "barrier divergence",
        [
            f"kernel '{NS}barrier_sites_kernel'",
            "different sync_threads() calls",
            "threads 32-63 at selftest_kernels.cu:",
            "threads 0-31 at selftest_kernels.cu:",
        ],
    ),
    "bug_shfl_half": (
        "incomplete warp collective",
        [
            f"kernel '{NS}shfl_half_kernel'",
            "block (0,0,0)",
            "thread (16,0,0)",
            "shfl_xor_sync at selftest_kernels.cu:",
            "member mask 0xffffffff",
            "lanes 0-15",
        ],
    ),
    "bug_shfl_barrier": (
        "incomplete warp collective",
        [f"kernel '{NS}shfl_barrier_kernel'", "lanes 16-31 wait at sync_threads()", "deadlock"],
    ),
    "bug_collective_mismatch": (
        "incomplete warp collective",
        [
            f"kernel '{NS}collective_mismatch_kernel'",
            "shfl_sync at",
            "lanes 16-31 wait in ballot_sync",
        ],
    ),
    "bug_race": (
        "shared memory race",
        [
            f"kernel '{NS}race_kernel'",
            "block (0,0,0)",
            "thread (1,0,0)",
            "address 0x",
            "shared 'flag' + 0",
            "write by thread (0,0,0)",
        ],
    ),
    "bug_warp_race": (
        "shared memory race",
        [
            f"kernel '{NS}warp_exchange_kernel<false>'",
            "thread (1,0,0)",
            "address 0x",
            "read by thread (0,0,0)",
        ],
    ),
    "bug_cp_async_early": (
        "read of pending cp.async destination",
        [
            f"kernel '{NS}cp_async_early_kernel'",
            "block (0,0,0)",
            "thread (0,0,0)",
            "address 0x",
            "shared 'buf' + 0",
            "no cp_async_wait_group",
        ],
    ),
    "bug_pipeline_race": (
        "shared memory race",
        [
            f"kernel '{NS}gemm_kernel<false, false>'",
            "write by cp.async at address 0x",
            "conflicts with a read",
        ],
    ),
    "bug_shared_oob": (
        "out-of-bounds shared write",
        [
            "kernel 'shared_oob_kernel (named)'",
            "thread (31,0,0)",
            "address 0x",
            "shared 'vals' + 128",
        ],
    ),
    "bug_uninitialized": (
        "uninitialized shared read",
        [f"kernel '{NS}uninitialized_kernel'", "thread (7,0,0)", "shared 'vals' + 28"],
    ),
    "bug_unregistered": (
        "out-of-bounds global read",
        [f"kernel '{NS}oob_read_kernel'", "thread (0,0,0)", "outside every registered buffer"],
    ),
    # Atomics are ordered by sync_warp like plain writes (atomic_warp passes), and still race with
    # plain accesses that nothing orders.
    "bug_atomics_then_read": (
        "shared memory race",
        [
            f"kernel '{NS}atomics_then_read_kernel'",
            "thread (0,0,0)",
            "4-byte read at address 0x",
            "shared 'count' + 0",
            "conflicts with an atomic by thread (16,0,0)",
        ],
    ),
    "bug_read_then_atomics": (
        "shared memory race",
        [
            f"kernel '{NS}read_then_atomics_kernel'",
            "thread (3,0,0)",
            "4-byte atomic at address 0x",
            "conflicts with a read by thread (1,0,0)",
        ],
    ),
    "bug_write_then_atomics": (
        "shared memory race",
        [
            f"kernel '{NS}write_then_atomics_kernel'",
            "thread (2,0,0)",
            "4-byte atomic at address 0x",
            "conflicts with a write by thread (0,0,0)",
        ],
    ),
    # Spin-waits stop with a report instead of hanging (the progress watchdog).
    "bug_spin_warp": (
        "no progress",
        [
            f"kernel '{NS}spin_warp_kernel'",
            "block (0,0,0)",
            "thread (0,0,0)",
            "more than 16777216 memory reads",
            "4-byte atomic at address 0x",
            "shared 'flag' + 0",
            "TOKENMIX_SIMT_WATCHDOG",
        ],
    ),
    "bug_spin_blocks": (
        "no progress",
        [
            f"kernel '{NS}spin_blocks_kernel'",
            "block (0,0,0)",
            "thread (0,0,0)",
            "4-byte read at address 0x",
            "buffer 'flag' + 0",
        ],
    ),
    # A pointer is checked against its own buffer, not against every registered one.
    **{
        name: (
            "out-of-bounds global read",
            [
                f"kernel '{NS}{kernel}'",
                "thread (0,0,0)",
                "0 bytes past the end of buffer 'q' (128 bytes at 0x",
                "the buffer this pointer was made for",
                "inside buffer 'k' + 0",
            ],
        )
        for name, kernel in [
            ("bug_packed_views", "packed_views_kernel"),  # buffer() arguments
            ("bug_packed_host_ptrs", "packed_views_kernel"),  # global_ptr made on the host
            ("bug_packed_params", "packed_params_kernel"),  # made in kernel code from raw pointers
        ]
    },
    "bug_wgmma_no_fence": (
        "wgmma without fence",
        [f"kernel '{NS}wgmma_gemm_kernel<false, 64, false, false>'", "selftest_wgmma.cu:"],
    ),
    "bug_wgmma_no_proxy_fence": (
        "unfenced generic write read by wgmma",
        [
            "operand of the wgmma at selftest_wgmma.cu:",
            "has not run fence_proxy_async_shared() since",
        ],
    ),
    "bug_wgmma_no_wait": (
        "wgmma in flight at exit",
        ["4 wgmma ops of its warp are in flight", "a wgmma_wait_group must cover them"],
    ),
    "bug_wgmma_overwrite": (
        "wgmma operand changed in flight",
        ["its shared-memory operand was overwritten while the op was in flight", "waited for at"],
    ),
    "bug_wgmma_accumulator": (
        "wgmma operand changed in flight",
        ["lane 0's accumulator registers changed while the op was in flight"],
    ),
    "bug_shared_views": (
        "out-of-bounds shared write",
        [
            f"kernel '{NS}shared_views_kernel'",
            "thread (0,0,0)",
            "shared 'b' + 0",
            "is outside shared 'a', the array this pointer was made for",
        ],
    ),
}


def _ninja() -> str | None:
    exe = shutil.which("ninja")
    if exe:
        return exe
    beside = Path(sys.executable).parent / "ninja"
    return str(beside) if beside.exists() else None


@pytest.fixture(scope="module")
def selftest() -> Path:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake is needed to build the SIMT emulator self-test")
    if not (BUILD / "CMakeCache.txt").exists():
        cmd = [cmake, "-S", str(SRC), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release"]
        ninja = _ninja()
        if ninja:
            cmd += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    build = subprocess.run(
        [cmake, "--build", str(BUILD), "--parallel", str(os.cpu_count() or 2)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    exe = BUILD / "simt_selftest"
    assert exe.exists()
    return exe


def _run(exe: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMIX_SIMT_")}
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=120, env={**environ, **env}
    )


def test_subcommand_list_matches(selftest):
    out = _run(selftest, "list")
    assert out.returncode == 0
    assert sorted(out.stdout.split()) == sorted(POSITIVE + list(BUGS))


@pytest.mark.parametrize("name", POSITIVE)
def test_kernel_passes(selftest, name):
    out = _run(selftest, name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"PASS {name} "), out.stdout


@pytest.mark.parametrize("name", ["gemm_f16", "gemm_bf16", "reduce", "atomics"])
def test_kernel_passes_with_parallel_blocks(selftest, name):
    out = _run(selftest, name, "--workers", "2")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", list(BUGS))
def test_planted_bug_is_reported(selftest, name):
    kind, fragments = BUGS[name]
    out = _run(selftest, name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"REPORTED {name} [{kind}]"), out.stdout
    report = out.stdout.splitlines()[1]
    assert report.startswith(f"tokenmix simt emulator: {kind} in kernel '"), report
    for fragment in fragments:
        assert fragment in report, f"{fragment!r} missing from: {report}"


def test_watchdog_limit_is_configurable(selftest):
    """$TOKENMIX_SIMT_WATCHDOG sets the limit; kernels that synchronize or write pass with a tiny
    one (the count restarts at every synchronization point and write); a bad value is an error."""
    out = _run(selftest, "bug_spin_blocks", TOKENMIX_SIMT_WATCHDOG="1000")
    assert out.returncode == 0, out.stdout
    assert "more than 1000 memory reads" in out.stdout and "(now 1000;" in out.stdout, out.stdout
    for name in ("reduce", "atomic_warp", "cp_async", "gemm_f16"):
        out = _run(selftest, name, TOKENMIX_SIMT_WATCHDOG="64")
        assert out.returncode == 0 and out.stdout.startswith(f"PASS {name} "), out.stdout
    out = _run(selftest, "bug_spin_blocks", TOKENMIX_SIMT_WATCHDOG="many")
    assert "[invalid setting]" in out.stdout, out.stdout
    assert "$TOKENMIX_SIMT_WATCHDOG is 'many', not a non-negative integer" in out.stdout


def test_math_mode_setting_is_checked(selftest):
    out = _run(selftest, "math", TOKENMIX_SIMT_MATH="fast")
    assert out.returncode == 1 and "[invalid setting]" in out.stdout, out.stdout
    assert "$TOKENMIX_SIMT_MATH is 'fast', not 'exact' or 'approx'" in out.stdout


def test_whole_selftest_is_fast(selftest):
    out = _run(selftest, "all")
    assert out.returncode == 0, out.stdout
    m = re.search(r"(\d+) of (\d+) self-tests passed in ([\d.]+) s", out.stdout)
    assert m and m.group(1) == m.group(2) == str(len(POSITIVE) + len(BUGS)), out.stdout
    assert float(m.group(3)) < 60


# ---- the host API: element references are temporaries ------------------------------------------

_SNIPPET = """#include "tokenmix/simt/simt.h"
using namespace tokenmix::simt;
void f(global_ptr<float> p, global_ptr<const float> q, shared_ptr<int> s) {{ {} }}
"""
_ACCEPTED = (
    "float x = p[0]; p[1] = x; p[2] += p[0]; p[0] = p[1]; p[3] = q[1] * 2.0f + q[2]; "
    "s[0] = 1; s[1] |= s[0]; p += 4; global_ptr<const float> c = p; (void)c;"
)
_REJECTED = {
    "named reference read later": "auto r = p[0]; float y = r; (void)y;",
    "named reference written later": "auto r = p[0]; r = 2.0f;",
    "store through const": "q[0] = 1.0f;",
    "address of element": "float* a = &p[0]; (void)a;",
    "increment": "p[0]++;",
    "global passed as shared": "shared_ptr<float> t = p; (void)t;",
}


def test_host_api_accepts_and_rejects(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("g++") or "c++"
    cases = {"accepted": _ACCEPTED, **_REJECTED}
    jobs = {}
    for i, (name, body) in enumerate(cases.items()):
        src = tmp_path / f"case{i}.cpp"
        src.write_text(_SNIPPET.format(body))
        cmd = [cxx, "-std=c++17", "-fsyntax-only", f"-I{INCLUDE}", str(src)]
        jobs[name] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    results = {}
    for name, job in jobs.items():
        out, _ = job.communicate(timeout=120)
        results[name] = (job.returncode, out)
    assert results["accepted"][0] == 0, results["accepted"][1]
    for name in _REJECTED:
        assert results[name][0] != 0, f"{name} compiled: {_REJECTED[name]}"


# ---- fragment layouts --------------------------------------------------------------------------

LDSM_COUNTS = {"x1": 1, "x2": 2, "x4": 4, "x1_trans": 1, "x2_trans": 2, "x4_trans": 4}


def _ptx_isa_tables() -> list[str]:
    """The tables as the PTX ISA states them (mma.m16n8k16 .f16/.bf16 and m16n8k8 .tf32 fragments,
    ldmatrix)."""
    lines = []
    for lane in range(32):
        g, q = lane >> 2, lane % 4
        for i in range(8):  # a0..a7: row groupID (+8 for a2,a3,a6,a7), col 2q + i%2 (+8 for i>=4)
            row = g if i < 2 or 4 <= i < 6 else g + 8
            col = q * 2 + (i & 1) + (8 if i >= 4 else 0)
            lines.append(f"mma_a {lane} {i} {row} {col}")
    for lane in range(32):
        g, q = lane >> 2, lane % 4
        for i in range(4):  # b0..b3: row (k) 2q + i%2 (+8 for i>=2), col (n) groupID
            lines.append(f"mma_b {lane} {i} {q * 2 + (i & 1) + (8 if i >= 2 else 0)} {g}")
    for lane in range(32):
        g, q = lane >> 2, lane % 4
        for i in range(4):  # c0..c3: row groupID (+8 for i>=2), col 2q + i%2
            lines.append(f"mma_c {lane} {i} {g if i < 2 else g + 8} {q * 2 + (i & 1)}")
    for lane in range(32):
        g, q = lane >> 2, lane % 4
        for i in range(4):  # tf32 a0..a3: row groupID (+8 for a1, a3), col q (+4 for a2, a3)
            lines.append(f"tf32_mma_a {lane} {i} {g + 8 * (i & 1)} {q + 4 * (i >> 1)}")
    for lane in range(32):
        g, q = lane >> 2, lane % 4
        for i in range(2):  # tf32 b0, b1: row (k) q (+4 for b1), col (n) groupID
            lines.append(f"tf32_mma_b {lane} {i} {q + 4 * i} {g}")
    for name, count in LDSM_COUNTS.items():
        trans = name.endswith("trans")
        for lane in range(32):
            for j in range(count):
                for h in range(2):
                    # lane t holds row t/4, elements 2(t%4), 2(t%4)+1 of matrix j (transposed: swap)
                    row, col = lane // 4, 2 * (lane % 4) + h
                    if trans:
                        row, col = col, row
                    lines.append(f"ldsm_{name} {lane} {j} {h} {j} {row} {col}")
    return lines


@pytest.fixture(scope="module")
def emulator_tables(selftest) -> list[str]:
    out = _run(selftest, "layouts")
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_layouts_match_ptx_isa(emulator_tables):
    assert emulator_tables == _ptx_isa_tables()


def _cuda_include_dirs() -> list[Path]:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    for root in filter(None, roots):
        inc = Path(root) / "include"
        if (inc / "cuda_runtime_api.h").exists():
            return [inc] + ([inc / "cccl"] if (inc / "cccl").is_dir() else [])
    return []


def _cute_include_dir() -> Path | None:
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return inc if (inc / "cute" / "atom" / "mma_traits_sm80.hpp").exists() else None


def test_layouts_match_cute(emulator_tables):
    cute = _cute_include_dir()
    if cute is None:
        pytest.skip("CuTe headers not installed (pip install --no-deps nvidia-cutlass)")
    cuda = _cuda_include_dirs()
    if not cuda:
        pytest.skip("CuTe's headers need the CUDA toolkit headers (cuda_runtime_api.h, cuda/std)")
    exe = BUILD / "cute_layouts"
    source = SRC / "cute_layouts.cpp"
    if not exe.exists() or exe.stat().st_mtime < source.stat().st_mtime:
        cxx = os.environ.get("CXX") or shutil.which("g++") or "c++"
        flags = [f"-I{cute}"] + [f"-I{d}" for d in cuda]
        build = subprocess.run(
            [cxx, "-std=c++17", "-O0", *flags, str(source), "-o", str(exe)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert build.returncode == 0, build.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True)
    cute_lines = out.stdout.splitlines()
    f16 = [line for line in cute_lines if not line.startswith(("bf16_", "tf32_"))]
    bf16 = [line[len("bf16_") :] for line in cute_lines if line.startswith("bf16_")]
    tf32 = [line for line in cute_lines if line.startswith("tf32_")]
    assert f16 == [line for line in emulator_tables if not line.startswith("tf32_")]
    assert bf16 == [line for line in emulator_tables if line.startswith("mma_")]
    assert tf32 == [line for line in emulator_tables if line.startswith("tf32_")]
    assert len(tf32) == 32 * 6


WGMMA_CHECKS = ["wgmma_d_n16", "wgmma_d_n64", "wgmma_d_n128", "wgmma_a"] + [
    f"smem_{major}_{swizzle}_{rows}"
    for major in ("k", "mn")
    for swizzle, rows in (("none", 64), ("sw32", 64), ("sw64", 64), ("sw128", 64), ("sw128", 128))
]


def test_wgmma_layouts_match_cute():
    """layouts.h's wgmma fragments and shared-memory descriptor decoding (the emulator's and the
    kernels') give CuTe's element addresses for every canonical layout CuTe builds."""
    cute = _cute_include_dir()
    if cute is None:
        pytest.skip("CuTe headers not installed (pip install --no-deps nvidia-cutlass)")
    cuda = _cuda_include_dirs()
    if not cuda:
        pytest.skip("CuTe's headers need the CUDA toolkit headers (cuda_runtime_api.h, cuda/std)")
    BUILD.mkdir(parents=True, exist_ok=True)
    exe = BUILD / "cute_wgmma_layouts"
    sources = [SRC / "cute_wgmma_layouts.cpp", INCLUDE / "tokenmix" / "simt" / "layouts.h"]
    if not exe.exists() or exe.stat().st_mtime < max(f.stat().st_mtime for f in sources):
        cxx = os.environ.get("CXX") or shutil.which("g++") or "c++"
        flags = [f"-I{cute}", f"-I{INCLUDE}"] + [f"-I{d}" for d in cuda]
        build = subprocess.run(
            [cxx, "-std=c++17", "-O0", "-w", *flags, str(sources[0]), "-o", str(exe)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert build.returncode == 0, build.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    results = {}
    for line in out.stderr.splitlines():
        name, _, checked, _, bad = line.split()
        results[name] = (int(checked), int(bad))
    assert sorted(results) == sorted(WGMMA_CHECKS), out.stderr
    assert all(checked >= 1024 and bad == 0 for checked, bad in results.values()), out.stderr
    assert out.returncode == 0, out.stderr


# ---- the same source under nvcc ----------------------------------------------------------------


def _nvcc() -> str | None:
    exe = shutil.which("nvcc")
    if exe:
        return exe
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return None


@pytest.fixture(scope="module")
def nvcc_reports() -> dict[str, subprocess.CompletedProcess]:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    BUILD.mkdir(parents=True, exist_ok=True)
    jobs = {}
    for arch in ("sm_80", "sm_90"):
        cmd = [nvcc, "-std=c++17", f"-arch={arch}", "-c", str(KERNELS), f"-I{INCLUDE}",
               "-Xptxas", "-v", "-o", str(BUILD / f"selftest_kernels_{arch}.o")]  # fmt: skip
        jobs[arch] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    ptx = BUILD / "selftest_kernels_sm_80.ptx"
    ptx_job = subprocess.Popen(
        [nvcc, "-std=c++17", "-arch=sm_80", "-ptx", str(KERNELS), f"-I{INCLUDE}", "-o", str(ptx)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    results = {}
    for arch, job in jobs.items():
        stdout, _ = job.communicate(timeout=600)
        results[arch] = subprocess.CompletedProcess(job.args, job.returncode, stdout, "")
    stdout, _ = ptx_job.communicate(timeout=600)
    results["ptx"] = subprocess.CompletedProcess(
        ptx_job.args, ptx_job.returncode, ptx.read_text() if ptx.exists() else stdout, ""
    )
    return results


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_with_nvcc_without_spills(nvcc_reports, arch):
    report = nvcc_reports[arch]
    assert report.returncode == 0, report.stdout[-4000:]
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", report.stdout)
    assert spills, report.stdout[-4000:]
    assert all(n == "0" for n in spills), report.stdout
    assert "gemm_kernel" in report.stdout and "Used " in report.stdout


def test_nvcc_emits_the_instructions(nvcc_reports):
    ptx = nvcc_reports["ptx"]
    assert ptx.returncode == 0, ptx.stdout[-4000:]
    for instruction in [
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
        "cvt.rna.tf32.f32",
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
        "ldmatrix.sync.aligned.m8n8.x1.shared.b16",
        "cp.async.cg.shared.global",
        "cp.async.ca.shared.global",
        "cp.async.commit_group",
        "cp.async.wait_group",
        "shfl.sync.bfly.b32",
        "shfl.sync.up.b32",
        "vote.sync.ballot.b32",
        # the approximate math the emulator's numeric mode models (math.cpp)
        "ex2.approx.f32",
        "ex2.approx.ftz.f32",
        "lg2.approx.f32",
        "rsqrt.approx.f32",
        "bar.warp.sync",
        "bar.sync",
    ]:
        assert instruction in ptx.stdout, instruction


@pytest.mark.slow
def test_wgmma_calls_become_hgmma_on_sm90a():
    """The wgmma self-test GEMM compiled for sm_90a: every width and dtype becomes HGMMA, with no
    spills (the emulator runs the same source: test_kernel_passes[wgmma_*])."""
    from sm90a_build import compile_sm90a

    kernels = compile_sm90a(SRC / "selftest_wgmma.cu", "selftest_wgmma_sm_90a")
    ops = {ins.op.split()[0] for k in kernels for ins in k.instructions}
    for n in (16, 32, 64, 128):
        assert f"HGMMA.64x{n}x16.F32" in ops, sorted(o for o in ops if "GMMA" in o)
        assert f"HGMMA.64x{n}x16.F32.BF16" in ops, sorted(o for o in ops if "GMMA" in o)
