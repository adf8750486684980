"""The benchmark harness: the machinery every tokenmix benchmark (bench_na.py,
bench_block_sparse.py, bench_linear.py) shares.

Timing (warmup + median of ``time.perf_counter`` samples on the CPU, CUDA events on a
GPU), matmul throughput as the machine's practical compute ceiling (measured at the
start and the end of a run, with the quietness warnings: :class:`RunCeiling`), peak-memory
measurement (RSS, or the CUDA caching allocator's high-water mark), one measurement per
fresh worker process (the benchmark script re-invoked with ``--worker``: timing, peak memory
and saved outputs of one backend), the correctness check and speedups over the rows of one
case, plain-text / markdown table formatting, the command-line options the benchmarks share,
sequence-length sweeps and their plot (``--seq-lens``, ``--plot``: :func:`plot_sweep`, the
one place matplotlib is imported), and what the attention benchmarks have in common: their
settings, inputs, SDPA and FlexAttention peers and the run over cases, backends and modes
(:class:`AttentionBenchmark`, :func:`attention_main`). Only the standard library and torch
are needed; matplotlib only for ``--plot``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock samples of one measurement, in milliseconds."""

    samples_ms: list[float]
    warmup_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def max_ms(self) -> float:
        return max(self.samples_ms)

    @property
    def repeats(self) -> int:
        return len(self.samples_ms)

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed samples; 0 for a single sample."""
        m = self.median_ms
        return (self.max_ms - self.min_ms) / m if m > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            median_ms=self.median_ms,
            min_ms=self.min_ms,
            max_ms=self.max_ms,
            repeats=self.repeats,
        )
        return d


def _timed_call(
    fn: Callable[[], object], setup: Callable[[], None] | None, device: str = "cpu"
) -> float:
    if setup is not None:
        setup()
    if device == "cuda":
        # GPU work is asynchronous: events on the stream bracket the call, and the
        # synchronize first keeps earlier queued work (setup, the last call) out of it.
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        del result
        return start.elapsed_time(end) * 1e-3
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    del result
    return elapsed


def choose_repeats(
    estimate_s: float, budget_s: float, min_repeats: int = 3, max_repeats: int = 50
) -> int:
    """Timed calls for a measurement whose single call takes ``estimate_s``.

    Enough calls to fill ``budget_s`` seconds, clamped to ``[min_repeats, max_repeats]``;
    calls slower than 5 s get 2 samples and calls slower than 20 s a single one, so
    a dense baseline on a large problem cannot eat the whole run.
    """
    if estimate_s > 20.0:
        return 1
    if estimate_s > 5.0:
        return min(2, max_repeats)
    n = int(budget_s / max(estimate_s, 1e-9))
    return max(min_repeats, min(max_repeats, n))


class Deadline:
    """Context manager calling ``on_expire()`` from a timer thread if the region is
    still running after ``seconds``. Used to give up on a call that is far too slow
    to benchmark (``on_expire`` typically reports and exits); torch ops
    release the GIL, so the timer fires even while a long op runs."""

    def __init__(self, seconds: float, on_expire: Callable[[], None]) -> None:
        self.seconds = seconds
        self.on_expire = on_expire
        self._timer: threading.Timer | None = None

    def __enter__(self) -> Deadline:
        self._timer = threading.Timer(self.seconds, self.on_expire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()


def time_fn(
    fn: Callable[[], object],
    *,
    setup: Callable[[], None] | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    budget_s: float = 1.5,
    min_repeats: int = 3,
    max_repeats: int = 50,
    first_call_guard: Callable[[], Deadline] | None = None,
    device: str = "cpu",
) -> Timing:
    """Median-of-N wall-clock timing of ``fn()``.

    ``setup`` runs before every call, outside the timed region (e.g. clearing
    ``.grad``). ``warmup=None`` runs one warmup call, plus a second one when the
    first took under a second (the first call often pays for lazy initialisation
    or compilation); the last warmup call is the per-call estimate used to pick the
    number of timed calls when ``repeats`` is None (see :func:`choose_repeats`).
    CPU execution is synchronous, so ``perf_counter`` around the call is exact; with
    ``device="cuda"`` each call is timed with CUDA events recorded before and after it
    (after a ``torch.cuda.synchronize()``), waiting for the end event.
    ``first_call_guard()``, if given, is a context manager (e.g. :class:`Deadline`)
    wrapped around the very first call.
    """
    warm: list[float] = []
    n_warm = warmup if warmup is not None else 1
    for i in range(max(n_warm, 0)):
        if i == 0 and first_call_guard is not None:
            with first_call_guard():
                warm.append(_timed_call(fn, setup, device))
        else:
            warm.append(_timed_call(fn, setup, device))
    if warmup is None and warm and warm[-1] < 1.0:
        warm.append(_timed_call(fn, setup, device))
    if repeats is None:
        if not warm:
            if first_call_guard is not None:
                with first_call_guard():
                    warm.append(_timed_call(fn, setup, device))
            else:
                warm.append(_timed_call(fn, setup, device))
        estimate = warm[-1]
        repeats = choose_repeats(estimate, budget_s, min_repeats, max_repeats)
    samples = [_timed_call(fn, setup, device) for _ in range(max(repeats, 1))]
    return Timing(samples_ms=[s * 1e3 for s in samples], warmup_ms=[w * 1e3 for w in warm])


# ---------------------------------------------------------------------------
# Throughput ceiling
# ---------------------------------------------------------------------------


def _matmul_calls(
    n: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, dict[str, Callable[[], torch.Tensor]]]:
    """The ``n x n @ n x n`` products a ceiling is measured with, by library, and the product
    they should compute.

    ``torch.matmul`` always. On the CPU in float32 also oneDNN's (torch's ``mkldnn_linear``,
    where the build has oneDNN): torch.matmul's CPU BLAS is MKL, which on AMD CPUs runs a code
    path that reaches about half of what the cores do (on the AMD EPYC development host with
    AVX-512: 164-204 GFLOP/s on 2 threads, oneDNN 357-446), so torch.matmul alone would
    understate the machine's dense peak there and flatter every kernel measured against it.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "torch.matmul": lambda: torch.matmul(a, b, out=out)
    }
    if device == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        try:
            linear = torch._C._nn.mkldnn_linear
            a_dnn = a.to_mkldnn()
            bt_dnn = b.t().contiguous().to_mkldnn()  # linear computes a @ weight^T
            calls["oneDNN"] = lambda: linear(a_dnn, bt_dnn, None)
        except (RuntimeError, AttributeError):
            pass  # a torch without the op or without oneDNN tensors: torch.matmul alone
    return a @ b, calls


# A library's product must match ``a @ b`` to this fraction of its largest element: fp32
# rounding at n = 2048 stays near 1e-6 of it, a reduced-precision product (tf32, bf16
# inputs) is off by 1e-4 or more and must not set an fp32 ceiling.
MATMUL_CHECK_RTOL = 2e-5


def measure_matmul_libraries(
    threads: int,
    n: int = 2048,
    dtype: torch.dtype = torch.float32,
    repeats: int = 10,
    device: str = "cpu",
) -> dict[str, float]:
    """Median GFLOP/s of an ``n x n @ n x n`` product with ``threads`` threads, for each library
    of :func:`_matmul_calls` whose product is right (checked once against ``a @ b``, to
    ``MATMUL_CHECK_RTOL``); a library other than ``torch.matmul`` that fails or computes
    something else is left out.

    Counts ``2 * n**3`` FLOPs per product. The previous thread count is restored afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    gflops: dict[str, float] = {}
    try:
        for name, call in checked_matmul_calls(n, dtype, device).items():
            timing = time_fn(call, warmup=2, repeats=repeats, budget_s=0, device=device)
            gflops[name] = 2.0 * n**3 / (timing.median_ms * 1e-3) / 1e9
    finally:
        torch.set_num_threads(previous)
    return gflops


def checked_matmul_calls(
    n: int, dtype: torch.dtype, device: str
) -> dict[str, Callable[[], torch.Tensor]]:
    """The products of :func:`_matmul_calls` that compute ``a @ b`` (to ``MATMUL_CHECK_RTOL``),
    by library: ``torch.matmul`` always; another library that raises or computes something
    else is left out."""
    expected, calls = _matmul_calls(n, dtype, device)
    tol = MATMUL_CHECK_RTOL * float(expected.abs().max())
    checked: dict[str, Callable[[], torch.Tensor]] = {}
    for name, call in calls.items():
        if name != "torch.matmul":
            try:
                got = call()
                got = got.to_dense() if got.is_mkldnn else got
                right = float((got - expected).abs().max()) <= tol  # False for NaN
            except RuntimeError:
                right = False
            if not right:
                continue  # a library that fails or computes something else sets nothing
        checked[name] = call
    return checked


def measure_matmul_gflops(
    threads: int,
    n: int = 2048,
    dtype: torch.dtype = torch.float32,
    repeats: int = 10,
    device: str = "cpu",
) -> float:
    """The practical dense-compute ceiling of the machine (of the GPU with ``device="cuda"``)
    for the given dtype and thread count: the fastest library's median GFLOP/s of
    :func:`measure_matmul_libraries`. The benchmarks report kernel throughput as a fraction
    of it."""
    return max(
        measure_matmul_libraries(threads, n=n, dtype=dtype, repeats=repeats, device=device).values()
    )


def describe_libraries(gflops: Mapping[str, float]) -> str:
    """``"oneDNN; torch.matmul 187.5"``: the fastest library, then the others' GFLOP/s."""
    order = sorted(gflops, key=lambda k: -gflops[k])
    return "; ".join([order[0], *(f"{k} {gflops[k]:.1f}" for k in order[1:])])


class RunCeiling:
    """The same-run matmul ceiling of a benchmark run, with its quietness checks.

    :meth:`start` samples ``/proc/stat`` (warning when the CPUs are already more than 20%
    busy) and measures the matmul throughput; :meth:`finish`, after the run, measures it
    again, warns when the two differ by more than 15%, takes the higher of the two as the
    ceiling (a busy moment must not lower it) and redoes every result row's
    ``frac_matmul``. ``warnings`` collects the warnings (also logged as they happen).
    """

    def __init__(
        self, threads: int, n: int, dtype: torch.dtype, dtype_name: str, device: str = "cpu"
    ) -> None:
        self.threads, self.n, self.dtype, self.dtype_name = threads, n, dtype, dtype_name
        self.device = device
        self.warnings: list[str] = []
        self.busy_start: float | None = None
        self.gflops_start = self.gflops_end = self.gflops = float("nan")
        self.libraries_start: dict[str, float] = {}
        self.libraries_end: dict[str, float] = {}

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        log(f"warning: {text}")

    def _measure(self) -> dict[str, float]:
        return measure_matmul_libraries(
            self.threads, n=self.n, dtype=self.dtype, device=self.device
        )

    def start(self) -> float:
        self.busy_start = cpu_busy_fraction()
        if self.busy_start is not None and self.busy_start > 0.2:
            self._warn(
                f"the CPUs were {100 * self.busy_start:.0f}% busy before the run started; "
                "other work on this machine distorts the timings"
            )
        torch.set_num_threads(self.threads)
        on = "on the GPU" if self.device == "cuda" else f"with {self.threads} threads"
        log(f"measuring {self.dtype_name} matmul {self.n}x{self.n} {on} ...")
        self.libraries_start = self._measure()
        self.gflops_start = self.gflops = max(self.libraries_start.values())
        log(f"    {self.gflops_start:.1f} GFLOP/s ({describe_libraries(self.libraries_start)})")
        return self.gflops_start

    def finish(self, cases: Sequence[dict]) -> float:
        """Measure again; ``cases`` are the report's cases (``results`` rows updated)."""
        self.libraries_end = self._measure()
        self.gflops_end = max(self.libraries_end.values())
        log(
            f"matmul again at the end: {self.gflops_end:.1f} GFLOP/s "
            f"({describe_libraries(self.libraries_end)})"
        )
        self.gflops = max(self.gflops_start, self.gflops_end)
        if abs(self.gflops_end - self.gflops_start) > 0.15 * self.gflops:
            self._warn(
                f"matmul throughput changed from {self.gflops_start:.1f} to "
                f"{self.gflops_end:.1f} GFLOP/s during the run: the machine was not quiet, the "
                "timings are unreliable"
            )
        for c in cases:
            for r in c["results"]:
                if "gflops" in r:
                    r["frac_matmul"] = r["gflops"] / self.gflops
        return self.gflops

    def meta(self) -> dict:
        return {
            "n": self.n,
            "gflops": self.gflops,
            "gflops_start": self.gflops_start,
            "gflops_end": self.gflops_end,
            # GFLOP/s per library (the ceiling is the fastest's): {"start": {...}, "end": {...}}
            "libraries": {"start": self.libraries_start, "end": self.libraries_end},
        }


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------

_PROC_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _proc_status_kib(key: str) -> int | None:
    try:
        with open(_PROC_STATUS) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mib() -> float | None:
    """Resident set size now (Linux ``VmRSS``), or None where unavailable."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib / 1024.0


def peak_rss_mib() -> float | None:
    """Peak resident set size since start or the last :func:`reset_peak_rss`.

    Linux ``VmHWM`` when readable, else ``getrusage(RUSAGE_SELF).ru_maxrss``
    (which cannot be reset).
    """
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib / 1024.0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS high-water mark (Linux >= 4.0).

    Writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS.
    Returns False when that is not possible (other OS, restricted ``/proc``).
    """
    before = _proc_status_kib("VmHWM")
    if before is None:
        return False
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    after = _proc_status_kib("VmHWM")
    rss = _proc_status_kib("VmRSS")
    # After a reset the high-water mark equals the current RSS (allow some drift).
    return after is not None and rss is not None and after <= rss + 4096


@dataclass
class PeakMemory:
    """Peak memory growth of a region over the memory at its start, in MiB."""

    peak_mib: float | None = None
    method: str = "n/a"


def release_cpu_buffer_cache() -> int:
    """Frees the large buffers tokenmix's CPU kernels keep for their next call
    (``tokenmix.empty_cpu_cache()``), if tokenmix is loaded; returns the bytes freed."""
    tm = sys.modules.get("tokenmix")
    empty = getattr(tm, "empty_cpu_cache", None) if tm is not None else None
    if empty is None:
        return 0
    try:
        return int(empty())
    except RuntimeError:  # imported without its compiled library: nothing is cached
        return 0


class measure_peak_rss:
    """Context manager measuring how far RSS rises above its value on entry.

    Freed heap memory is first returned to the OS (:func:`release_free_memory`) so
    that memory the region reuses from earlier calls still counts. With a
    resettable high-water mark (Linux) the result is then the peak of this region;
    otherwise it falls back to the ``ru_maxrss`` delta, which is only
    meaningful when nothing before the region used more memory (the fresh-process
    case), and says so in ``method``.
    """

    def __init__(self) -> None:
        self.result = PeakMemory()
        self._base: float | None = None
        self._resettable = False

    def __enter__(self) -> PeakMemory:
        release_free_memory()
        self._resettable = reset_peak_rss()
        if self._resettable:
            self._base = current_rss_mib()
        else:
            self._base = peak_rss_mib()
        return self.result

    def __exit__(self, *exc) -> None:
        peak = peak_rss_mib()
        if self._base is None or peak is None:
            return
        self.result.peak_mib = max(0.0, peak - self._base)
        self.result.method = "VmHWM reset" if self._resettable else "ru_maxrss delta"


class measure_peak_cuda:
    """Context manager measuring how far the CUDA caching allocator's allocated bytes
    rise above their value on entry (``torch.cuda.max_memory_allocated``, reset on
    entry): the device memory one region needs, outputs and autograd buffers
    included. Memory cached but not allocated, and the CUDA context, are not counted.
    """

    def __init__(self) -> None:
        self.result = PeakMemory()
        self._base = 0

    def __enter__(self) -> PeakMemory:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._base = torch.cuda.memory_allocated()
        return self.result

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        self.result.peak_mib = max(0, peak - self._base) / 2**20
        self.result.method = "cuda max_memory_allocated"


def release_free_memory() -> bool:
    """Return freed heap memory to the OS (``gc.collect`` + glibc ``malloc_trim(0)``).

    Without this, memory freed by earlier calls stays resident in the allocator's
    free lists and a later call that reuses it shows no RSS growth at all.
    Returns whether ``malloc_trim`` was available.
    """
    gc.collect()
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    # From here on (the memory measurement only, after all timing) blocks of
    # 1 MiB and more are mmapped and returned on free, so the peak reflects
    # live memory rather than glibc heap fragmentation. Not set while timing:
    # fresh mmaps would add page faults to every call.
    try:
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except AttributeError:
        pass
    return True


def limit_address_space(extra_bytes: int) -> bool:
    """Cap this process's address space at its current size plus ``extra_bytes``.

    Allocations beyond it then fail with a clean ``RuntimeError`` / ``MemoryError``
    instead of driving the machine into the OOM killer. Linux only; returns
    whether the limit was applied.
    """
    vm_kib = _proc_status_kib("VmSize")
    if vm_kib is None:
        return False
    limit = vm_kib * 1024 + int(extra_bytes)
    try:
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        return False
    return True


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return (
        isinstance(exc, (MemoryError, torch.OutOfMemoryError))
        or "can't allocate memory" in text
        or "std::bad_alloc" in text
    )


# ---------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_busy_fraction(interval_s: float = 0.5) -> float | None:
    """Fraction of all CPUs' time spent busy over ``interval_s`` (Linux ``/proc/stat``),
    i.e. how much other work is running right now; None where unavailable."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return None if total <= 0 else 1.0 - (idle1 - idle0) / total


def machine_info(threads: int, device: str = "cpu") -> dict:
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            gpu=props.name,
            gpu_capability=f"sm_{props.major}{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


def refuse_unusable_cuda(script: str) -> int | None:
    """For ``--device cuda``: None when a CUDA device is usable; otherwise print one line
    (``<script>: --device cuda: no usable CUDA device: <why>``) on stderr and return the exit
    status 2, instead of a traceback from the first CUDA call."""
    reason = cuda_unusable_reason()
    if reason is None:
        return None
    print(f"{script}: --device cuda: no usable CUDA device: {reason}", file=sys.stderr)
    return 2


def cuda_unusable_reason() -> str | None:
    """Why this process cannot run on a CUDA device, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    try:
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
    except Exception as exc:  # a broken driver or a device that cannot be used
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return f"the CUDA device cannot be used ({type(exc).__name__}: {first})"
    return None


# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------


def fmt_float(x: float | None, digits: int = 3) -> str:
    """Compact number: ``digits`` significant digits, no exponent for usual ranges."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:.{decimals}f}"


def fmt_sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None
) -> str:
    """Fixed-width text table. ``align`` has one ``l``/``r`` per column."""
    align = align or "l" * len(headers)
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if align[i] == "r" else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def format_markdown(
    headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None
) -> str:
    """GitHub-flavoured markdown table (``|`` in cells is escaped)."""
    align = align or "l" * len(headers)

    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    marks = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def log(msg: str) -> None:
    """Progress line on stderr (flushed: the benchmark is a long job)."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Settings shared by the attention benchmarks (bench_na.py, bench_block_sparse.py)
# ---------------------------------------------------------------------------

# Forward+backward useful FLOPs as a multiple of forward FLOPs. The forward pass is
# two matmul-shaped products per attended pair (QK^T and PV); the backward pass is
# five (recomputed QK^T, dV, dP, dQ, dK), i.e. 2.5x the forward (FlashAttention
# convention), so forward+backward is 3.5x the forward.
FWD_BWD_FLOP_FACTOR = 3.5

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --dtype default per --device: what each device's attention kernels are used with.
DEFAULT_DTYPES = {"cpu": "float32", "cuda": "float16"}
# Matmul size of the throughput ceiling: a GPU needs a larger product to approach its peak.
MATMUL_N = {"cpu": 2048, "cuda": 8192}
MODES = ("fwd", "fwd+bwd")
# Tolerances of the correctness check: |x - oracle| <= atol + rtol * max|oracle|.
TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": (3e-2, 3e-2), "float16": (1e-2, 1e-2)}


# ---------------------------------------------------------------------------
# Command line shared by the benchmarks
# ---------------------------------------------------------------------------


def add_size_arguments(
    p: argparse.ArgumentParser, head_dim_flag: str = "--head-dim", head_dim_help: str = "head dim"
) -> None:
    """``--batch``, ``--heads`` and the head dim (``head_dim_flag``), defaults 1, 4 and 64."""
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--heads", type=int, default=4, help="heads (default 4)")
    p.add_argument(head_dim_flag, type=int, default=64, help=f"{head_dim_help} (default 64)")


def add_mode_arguments(p: argparse.ArgumentParser) -> None:
    """``--forward`` / ``--backward`` (one of them at most); see :func:`selected_modes`."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--forward", action="store_true", help="forward only")
    mode.add_argument("--backward", action="store_true", help="forward+backward only")


def selected_modes(args: argparse.Namespace, modes: Sequence[str] = MODES) -> list[str]:
    """The modes ``--forward`` / ``--backward`` select from ``(fwd, fwd+bwd)``: one, or both."""
    fwd, bwd = modes
    return [fwd] if args.forward else [bwd] if args.backward else list(modes)


def add_timing_arguments(p: argparse.ArgumentParser) -> None:
    """``--repeats``, ``--warmup`` and ``--time-budget``: :func:`time_fn`'s options."""
    p.add_argument("--repeats", type=int, help="timed calls per measurement (default: adaptive)")
    p.add_argument("--warmup", type=int, help="warmup calls (default: 1, or 2 for calls < 1 s)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=1.5,
        help="adaptive repeats: seconds per measurement (default 1.5)",
    )


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """``--json PATH`` and ``--markdown``."""
    p.add_argument("--json", metavar="PATH", help="write raw numbers as JSON")
    p.add_argument("--markdown", action="store_true", help="print markdown tables")


# The default backends of a run: a list, or a function of the parsed options (a benchmark
# whose modes have different peers).
DefaultBackends = Sequence[str] | Callable[[argparse.Namespace], Sequence[str]]


def add_device_arguments(
    p: argparse.ArgumentParser, default_dtypes: dict[str, str] = DEFAULT_DTYPES
) -> None:
    """``--device`` (cpu or cuda) and ``--dtype`` (default per device: ``default_dtypes``)."""
    p.add_argument(
        "--device",
        default="cpu",
        choices=sorted(default_dtypes),
        help="where every backend runs (default cpu); cuda needs a usable CUDA device",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="default "
        + ", ".join(
            f"{d} on {'the CPU' if dev == 'cpu' else dev.upper()}"
            for dev, d in default_dtypes.items()
        ),
    )


def add_measurement_arguments(
    p: argparse.ArgumentParser,
    backends: Sequence[str],
    default_backends: DefaultBackends | None = None,
    default_help: str | None = None,
) -> None:
    """The options every worker-based benchmark has: device and dtype, threads, modes,
    backends (``default_backends``, or all of ``backends``; ``default_help`` describes a
    default that depends on other options), timing, memory and time limits, seed, ``--quick``,
    output, ``--worker``."""
    add_device_arguments(p)
    p.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads for every run (default 2)"
    )
    add_mode_arguments(p)
    if callable(default_backends):
        p.add_argument(
            "--backends",
            help=f"comma list of backends to run, of {','.join(backends)} (default "
            f"{default_help or 'depends on the other options'})",
        )
    else:
        default = list(default_backends or backends)
        others = [b for b in backends if b not in default]
        p.add_argument(
            "--backends",
            default=",".join(default),
            help=f"comma list of backends to run (default {','.join(default)}"
            + (f"; also: {','.join(others)})" if others else ")"),
        )
    add_timing_arguments(p)
    p.add_argument("--max-repeats", type=int, default=50, help="adaptive repeats cap (default 50)")
    p.add_argument(
        "--mem-limit-gb",
        type=float,
        default=8.0,
        help="per-worker address-space cap; SDPA / reference fwd+bwd are skipped up front when "
        "their estimate exceeds it (default 8)",
    )
    p.add_argument(
        "--max-call-s",
        type=float,
        default=30.0,
        help="give up on a backend whose first call is still running after this many seconds "
        "(reported as a lower bound; 0 = never; default 30)",
    )
    p.add_argument(
        "--worker-timeout", type=float, default=900.0, help="seconds per measurement (default 900)"
    )
    p.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    p.add_argument(
        "--row-ceiling",
        action="store_true",
        help="also measure the matmul ceiling inside each row's worker, right before and after "
        "its timed calls, and show the row's throughput against the higher of the two as "
        "'(row x%%)': a slow stretch of the host during one row shows up there (about 2 s more "
        "per row)",
    )
    p.add_argument(
        "--paired-ceiling",
        action="store_true",
        help="after each row's timed calls, time its call again alternating with one matmul "
        "product each (at least 5 pairs, more within the time budget), and show the median "
        "over the pairs of the call's throughput against its pair's as '(paired x%%)': the "
        "ceiling under the same conditions as each call",
    )
    p.add_argument(
        "--quick", action="store_true", help="scaled-down cases, short timing (smoke test)"
    )
    add_output_arguments(p)
    p.add_argument("--verbose", action="store_true", help="show worker stderr on failures")
    p.add_argument("--worker", help=argparse.SUPPRESS)


def resolve_measurement_arguments(
    args: argparse.Namespace,
    backends: Sequence[str],
    default_backends: DefaultBackends | None = None,
) -> tuple[list[str], list[str]]:
    """After :func:`add_measurement_arguments`: fill the device's default dtype and the
    default backends, shorten the timing for ``--quick``, and return the selected (backends,
    modes)."""
    if args.dtype is None:
        args.dtype = DEFAULT_DTYPES[args.device]
    if args.quick:
        args.time_budget = min(args.time_budget, 0.3)
        args.max_repeats = min(args.max_repeats, 10)
    if args.backends is None:
        default = default_backends(args) if callable(default_backends) else default_backends
        args.backends = ",".join(default or backends)
    chosen = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in backends]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; known: {', '.join(backends)}")
    return chosen, selected_modes(args)


def worker_spec(args, **fields) -> dict:
    """The spec of one worker: the run's timing and limit options plus ``fields``."""
    return {
        **fields,
        "threads": args.threads,
        "seed": args.seed,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "budget_s": args.time_budget,
        "max_repeats": args.max_repeats,
        "mem_limit_gb": args.mem_limit_gb,
        "max_call_s": args.max_call_s,
        "device": args.device,
        "row_ceiling": bool(getattr(args, "row_ceiling", False)),
        "paired_ceiling": bool(getattr(args, "paired_ceiling", False)),
        "ceiling_dtype": getattr(args, "dtype", None) or DEFAULT_DTYPES[args.device],
    }


# ---------------------------------------------------------------------------
# One measurement per fresh worker process
# ---------------------------------------------------------------------------

# Prefix of the line on which a worker reports its result (JSON) to the parent.
RESULT_MARK = "@@BENCH_RESULT@@ "


class Unsupported(Exception):
    """The backend cannot run this configuration (reported as ``n/a``, not an error)."""


@dataclass
class BackendRun:
    """One backend set up for timing: ``call()`` is what is timed, ``setup()`` runs before
    every call outside the timed region, ``collect(out)`` returns the tensors to compare
    (on any device), ``aux_bytes`` is the memory the backend's mask / layout holds."""

    call: Callable[[], object]
    setup: Callable[[], None] | None
    collect: Callable[[object], dict[str, torch.Tensor]]
    aux_bytes: int = 0
    info: dict = field(default_factory=dict)


def autograd_run(
    fn: Callable,
    inputs: dict[str, torch.Tensor],
    backward: bool,
    to_layout: Callable[[torch.Tensor], torch.Tensor] | None = None,
    from_layout: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> BackendRun:
    """Wrap ``fn(q, k, v) -> out`` for timing on ``inputs`` (``q, k, v, dout``).

    ``to_layout`` moves the inputs to the backend's layout once, here, outside the timed
    region, and ``from_layout`` moves what ``collect`` returns back. Forward mode calls
    ``fn`` on tensors that do not require grad; fwd+bwd mode on leaves that do, then
    ``out.backward(dout)``, with ``.grad`` cleared before each call (outside the timing).
    """

    def conv(x):
        return to_layout(x) if to_layout is not None else x

    def back(x):
        return from_layout(x) if from_layout is not None else x

    q, k, v = (conv(inputs[n]).detach().requires_grad_(backward) for n in ("q", "k", "v"))
    dout = conv(inputs["dout"])

    if backward:

        def call():
            out = fn(q, k, v)
            out.backward(dout)
            return out

        def setup():
            for t in (q, k, v):
                t.grad = None

        def collect(out):
            res = {"out": back(out.detach())}
            for name, t in zip(("dq", "dk", "dv"), (q, k, v), strict=True):
                res[name] = back(t.grad)
            return res

        return BackendRun(call, setup, collect)

    return BackendRun(lambda: fn(q, k, v), None, lambda out: {"out": back(out)})


def tensor_bytes(obj: object, names: Sequence[str]) -> int:
    """Bytes held by the tensors among ``obj``'s attributes ``names`` (an attribute that is
    missing or not a tensor counts 0)."""
    total = 0
    for name in names:
        t = getattr(obj, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


# The key-side block lists of a FlexAttention ``BlockMask`` (what ``BlockMask.from_kv_blocks``
# rebuilds it from).
BLOCK_MASK_LISTS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def block_mask_bytes(block_mask) -> int:
    """Bytes held by the block lists of a FlexAttention ``BlockMask``."""
    return tensor_bytes(
        block_mask,
        (*BLOCK_MASK_LISTS, "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"),
    )


def run_measurement(
    spec: dict,
    make_inputs: Callable[[], object],
    build: Callable[[object], BackendRun],
) -> dict:
    """Worker side: set up one backend, time it, measure one call's peak memory, save its
    outputs. Every failure is reported in the returned dict, never raised.

    ``spec`` holds ``threads``, ``mode`` (``fwd`` / ``fwd+bwd``), ``device``,
    ``mem_limit_gb``, ``max_call_s``, ``warmup``, ``repeats``, ``budget_s``, ``max_repeats``
    and ``save_path``. ``make_inputs()`` creates the inputs; the memory cap (address space
    on the CPU, the caching allocator's fraction on CUDA) is applied after it and before
    ``build(inputs)``, so a backend that needs more than ``mem_limit_gb`` fails cleanly.
    """
    torch.set_num_threads(spec["threads"])
    device = spec.get("device", "cpu")
    result: dict = {"status": "ok"}
    mem_limit = int(spec["mem_limit_gb"] * 2**30)
    try:
        inputs = make_inputs()
        if device == "cuda":
            # The same cap on device memory, through the caching allocator (an address-space
            # limit would break the CUDA context, which reserves huge virtual ranges).
            total = torch.cuda.get_device_properties(0).total_memory
            cap = min(1.0, (torch.cuda.memory_allocated() + mem_limit) / total)
            torch.cuda.set_per_process_memory_fraction(cap)
            result["device_memory_fraction"] = cap
        else:
            # Cap the address space so that a backend that would need more than the limit
            # fails cleanly instead of meeting the OOM killer.
            result["address_space_limited"] = limit_address_space(mem_limit)
        run = build(inputs)
        del inputs
        max_call_s = spec["max_call_s"]

        def give_up() -> None:
            # Runs on the Deadline's timer thread while the first call is still going:
            # report a lower bound and end the process (the call cannot be interrupted).
            note = f"> {max_call_s:g} s per call (stopped after one unfinished call)"
            res = {"status": "too_slow", "note": note, "lower_bound_ms": max_call_s * 1e3}
            print(RESULT_MARK + json.dumps(res), flush=True)
            os._exit(0)

        row_ceiling = spec.get("row_ceiling")
        if row_ceiling:
            ceiling_before = _row_matmul_gflops(spec)
        timing = time_fn(
            run.call,
            setup=run.setup,
            warmup=spec["warmup"],
            repeats=spec["repeats"],
            budget_s=spec["budget_s"],
            max_repeats=spec["max_repeats"],
            first_call_guard=(lambda: Deadline(max_call_s, give_up)) if max_call_s > 0 else None,
            device=device,
        )
        if row_ceiling:
            result["row_ceiling"] = {"before": ceiling_before, "after": _row_matmul_gflops(spec)}
        if spec.get("paired_ceiling"):
            try:
                result["paired"] = measure_paired(spec, run.call, run.setup)
            except Exception as exc:  # the row's own timing stands; the pairs are extra
                first = (str(exc).strip().splitlines() or [""])[0][:160]
                result["paired_error"] = f"{type(exc).__name__}: {first}"
        if run.setup is not None:
            run.setup()
        # Peak memory of one steady-state call (outputs, autograd buffers and gradients
        # included) over the RSS right before it: inputs, masks and compiled code are
        # already resident and are not counted; the mask is reported as aux_bytes. The
        # buffers tokenmix's CPU kernels keep between calls are freed first, so the call's
        # own (K/V copies, accumulators) count.
        release_cpu_buffer_cache()
        with measure_peak_cuda() if device == "cuda" else measure_peak_rss() as mem:
            out = run.call()
        saved = run.collect(out)
        if spec.get("save_path"):
            # On the CPU, so that the parent compares outputs without touching the GPU.
            saved = {k: v.detach().cpu().contiguous() for k, v in saved.items()}
            torch.save(saved, spec["save_path"])
        result.update(
            timing=timing.to_dict(),
            peak_mib=mem.peak_mib,
            mem_method=mem.method,
            aux_mib=run.aux_bytes / 2**20,
            info=run.info,
        )
    except Unsupported as exc:
        result.update(status="unsupported", note=f"n/a ({exc})")
    except Exception as exc:  # every failure is reported, never raised
        traceback.print_exc()
        if device != "cpu" and isinstance(exc, NotImplementedError):
            # A build without kernels for this device (tokenmix's CUDA kernels, for one).
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            result.update(status="unsupported", note=f"n/a (NotImplementedError: {first})")
        elif is_out_of_memory(exc):
            result.update(
                status="oom", note=f"skipped (memory: needs > {spec['mem_limit_gb']:g} GiB)"
            )
        else:
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            result.update(status="error", note=f"error: {type(exc).__name__}: {first}")
    return result


def _row_matmul_gflops(spec: dict) -> float:
    """The matmul ceiling of ``--row-ceiling``, measured inside the worker (the run's size,
    dtype, device and threads)."""
    device = spec.get("device", "cpu")
    return measure_matmul_gflops(
        spec["threads"], n=MATMUL_N[device], dtype=DTYPES[spec["ceiling_dtype"]], device=device
    )


# --paired-ceiling: at least this many (matmul, call) pairs, more while the time budget lasts.
PAIRED_MIN_PAIRS = 5


def measure_paired(
    spec: dict, call: Callable[[], object], setup: Callable[[], None] | None = None
) -> dict:
    """``--paired-ceiling``, worker side: alternate one matmul product and one ``call()``,
    each timed alone, so that each call has a ceiling measured under the same conditions as
    it (a host that slows down for seconds slows both). The product is the run's size, dtype
    and device, by the library that is fastest in a short timing here (of the right ones,
    :func:`checked_matmul_calls`). Pairs: at least ``PAIRED_MIN_PAIRS``, then more until
    ``spec["budget_s"]`` has passed, at most ``max(PAIRED_MIN_PAIRS, spec["max_repeats"])``.

    Returns ``{"library", "n", "matmul_ms": [...], "call_ms": [...]}``, pair by pair;
    :func:`paired_fraction` turns them into the row's fraction of the ceiling.
    """
    device = spec.get("device", "cpu")
    n = MATMUL_N[device]
    calls = checked_matmul_calls(n, DTYPES[spec["ceiling_dtype"]], device)
    speed = {
        name: time_fn(mm, warmup=1, repeats=3, budget_s=0, device=device).median_ms
        for name, mm in calls.items()
    }
    library = min(speed, key=speed.__getitem__)
    matmul = calls[library]
    matmul_ms: list[float] = []
    call_ms: list[float] = []
    end = time.perf_counter() + spec["budget_s"]
    limit = max(PAIRED_MIN_PAIRS, spec["max_repeats"])
    while len(call_ms) < limit and (len(call_ms) < PAIRED_MIN_PAIRS or time.perf_counter() < end):
        matmul_ms.append(_timed_call(matmul, None, device) * 1e3)
        call_ms.append(_timed_call(call, setup, device) * 1e3)
    return {"library": library, "n": n, "matmul_ms": matmul_ms, "call_ms": call_ms}


def paired_fraction(paired: Mapping, flops: float) -> tuple[float, float]:
    """(median over the pairs of the call's useful GFLOP/s over its pair's matmul GFLOP/s,
    median matmul GFLOP/s) of :func:`measure_paired`'s result, for a call of ``flops``."""
    mm_flops = 2.0 * float(paired["n"]) ** 3
    ratios = [
        (flops / c) / (mm_flops / m)
        for c, m in zip(paired["call_ms"], paired["matmul_ms"], strict=True)
    ]
    matmul = [mm_flops / (m * 1e-3) / 1e9 for m in paired["matmul_ms"]]
    return statistics.median(ratios), statistics.median(matmul)


def worker_main(spec_json: str, measure: Callable[[dict], dict]) -> int:
    """The ``--worker`` entry point: run ``measure(spec)`` and report its result."""
    result = measure(json.loads(spec_json))
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def launch_worker(script: str, spec: dict, timeout_s: float) -> dict:
    """Run ``script --worker <spec>`` in a fresh process and return its result dict (with
    ``stderr_tail`` when it did not run cleanly)."""
    cmd = [sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"timed out after {timeout_s:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK) :])
            if result["status"] not in ("ok", "unsupported"):
                result["stderr_tail"] = proc.stderr[-4000:]
            return result
    tail = proc.stderr[-4000:]
    if proc.returncode < 0:
        note = f"killed by signal {-proc.returncode} (out of memory?)"
    else:
        last = (tail.strip().splitlines() or ["no output"])[-1][:160]
        note = f"worker failed (rc={proc.returncode}): {last}"
    return {"status": "error", "note": note, "stderr_tail": tail}


def measure_row(
    row: dict,
    spec: dict,
    *,
    script: str,
    tag: str,
    flops: float,
    matmul_gflops: float,
    timeout_s: float,
    verbose: bool = False,
) -> None:
    """Parent side of one measurement: log ``tag``, run the worker, and fill ``row`` with its
    result, the median, useful GFLOP/s (``flops`` / median) and the fraction of
    ``matmul_gflops``; log the outcome."""
    log(f"{tag} ...")
    t0 = time.perf_counter()
    result = launch_worker(script, spec, timeout_s)
    wall = time.perf_counter() - t0
    row.update(result, wall_s=wall)
    if result["status"] == "ok":
        t = result["timing"]
        row["median_ms"] = t["median_ms"]
        row["save_path"] = spec.get("save_path")
        row["gflops"] = flops / (t["median_ms"] * 1e-3) / 1e9
        row["frac_matmul"] = row["gflops"] / matmul_gflops
        around = result.get("row_ceiling")
        if around:
            row["row_ceiling_gflops"] = max(around["before"], around["after"])
            row["frac_row_ceiling"] = row["gflops"] / row["row_ceiling_gflops"]
        paired = result.get("paired")
        if paired:
            row["frac_paired"], row["paired_matmul_gflops"] = paired_fraction(paired, flops)
        peak = result.get("peak_mib")
        peak_s = "-" if peak is None else f"{peak:.0f} MiB"
        log(
            f"    {t['median_ms']:.3f} ms median (n={t['repeats']}, "
            f"min {t['min_ms']:.3f}), {row['gflops']:.1f} GFLOP/s, "
            f"peak +{peak_s} [{wall:.1f} s]"
        )
        if around:
            log(
                f"    matmul next to it: {around['before']:.1f} before / {around['after']:.1f} "
                f"after GFLOP/s; the row reached {100 * row['frac_row_ceiling']:.1f}% of the higher"
            )
        if result.get("paired_error"):
            log(f"    no paired ceiling: {result['paired_error']}")
        if paired:
            log(
                f"    paired with {len(paired['call_ms'])} matmuls ({paired['library']}, median "
                f"{row['paired_matmul_gflops']:.1f} GFLOP/s): median "
                f"{100 * row['frac_paired']:.1f}% of its pair's"
            )
    else:
        log(f"    {result.get('note', result['status'])} [{wall:.1f} s]")
        if verbose and result.get("stderr_tail"):
            log(result["stderr_tail"])


# ---------------------------------------------------------------------------
# Attention benchmarks: inputs, the SDPA and FlexAttention peers, tokenmix's import
# ---------------------------------------------------------------------------

FLEX_NO_CPU_BACKWARD = "FlexAttention has no CPU backward"


# build(case, spec, inputs, backward): one backend of an attention benchmark set up on the
# inputs of one case, for one worker's ``spec``.
Builder = Callable[[object, dict, dict[str, torch.Tensor], bool], BackendRun]


def attention_inputs(
    shape: Sequence[int], dtype: str, seed: int, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """``q``, ``k``, ``v`` and the output gradient ``dout``, each of ``shape`` (heads-last
    ``[B, *spatial, H, D]``) in the :data:`DTYPES` dtype ``dtype``; identical in every process
    (drawn in float32 from one generator seeded with ``seed`` on the CPU, then moved to
    ``device``)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen, dtype=torch.float32).to(
            device=device, dtype=DTYPES[dtype]
        )
        for name in ("q", "k", "v", "dout")
    }


def run_attention_worker(
    spec: dict, case_from_dict: Callable[[dict], object], builders: Mapping[str, Builder]
) -> dict:
    """Worker side of an attention benchmark: set up backend ``spec["backend"]`` (its
    ``builders`` entry) for the case ``case_from_dict(spec["case"])``, time it, measure
    one call's peak memory and save its outputs (:func:`run_measurement`). The inputs are
    :func:`attention_inputs` of the case's ``input_shape`` and ``dtype``, drawn from
    ``spec["seed"]`` on ``spec["device"]``."""
    case = case_from_dict(spec["case"])
    build = builders[spec["backend"]]
    backward = spec["mode"] == "fwd+bwd"
    device = spec.get("device", "cpu")
    return run_measurement(
        spec,
        lambda: attention_inputs(case.input_shape, case.dtype, spec["seed"], device),
        lambda inputs: build(case, spec, inputs, backward),
    )


def heads_first_run(fn: Callable, inputs: dict[str, torch.Tensor], backward: bool) -> BackendRun:
    """:func:`autograd_run` of a backend that takes ``[B, H, N, D]`` tensors (SDPA,
    FlexAttention) on heads-last ``[B, *spatial, H, D]`` inputs: the spatial dims are
    flattened to ``N`` and the heads moved ahead once, here, outside the timed region; the
    outputs and gradients ``collect`` returns are moved back."""
    spatial = inputs["q"].shape[1:-2]
    return autograd_run(
        fn,
        inputs,
        backward,
        to_layout=lambda x: x.flatten(1, -3).transpose(1, 2).contiguous(),
        from_layout=lambda x: x.transpose(1, 2).unflatten(1, spatial),
    )


def sdpa_run(mask: torch.Tensor, inputs: dict[str, torch.Tensor], backward: bool) -> BackendRun:
    """``F.scaled_dot_product_attention`` with the dense bool ``mask`` (moved to the inputs'
    device) as a :func:`heads_first_run`; ``aux_bytes`` is the mask's size."""
    import torch.nn.functional as F

    mask = mask.to(inputs["q"].device)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    run = heads_first_run(fn, inputs, backward)
    run.aux_bytes = mask.numel() * mask.element_size()
    return run


def dense_sdpa_run(inputs: dict[str, torch.Tensor], backward: bool, causal: bool) -> BackendRun:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=causal)`` without a mask (dense
    attention, PyTorch's fused flash kernel on the CPU) as a :func:`heads_first_run`: what a
    sparse pattern saves, as a baseline (it computes another function)."""
    import torch.nn.functional as F

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return heads_first_run(fn, inputs, backward)


def check_flex_mode(backward: bool, device: torch.device) -> None:
    """Raise :class:`Unsupported` for FlexAttention fwd+bwd on the CPU."""
    if backward and device.type == "cpu":
        raise Unsupported(FLEX_NO_CPU_BACKWARD)


def compiled_flex_run(block_mask, inputs: dict[str, torch.Tensor], backward: bool) -> BackendRun:
    """``torch.compile(flex_attention)`` with the ``BlockMask`` ``block_mask`` as a
    :func:`heads_first_run`, compiled here by one call (so that the warmup estimate reflects a
    compiled call). ``aux_bytes`` is the block lists' size (:func:`block_mask_bytes`),
    ``info`` has ``compile_s`` and the mask's ``block_sparsity_pct``."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        return compiled(q, k, v, block_mask=block_mask)

    run = heads_first_run(fn, inputs, backward)
    t0 = time.perf_counter()
    run.call()
    compile_s = time.perf_counter() - t0
    if run.setup is not None:
        run.setup()
    run.aux_bytes = block_mask_bytes(block_mask)
    run.info = {"compile_s": compile_s, "block_sparsity_pct": float(block_mask.sparsity())}
    return run


def peer_skip_reason(
    case,
    backend: str,
    mode: str,
    mem_limit_gb: float,
    device: str,
    sdpa_memory_estimate: Callable[[object, bool, str], int],
) -> tuple[str, str] | None:
    """(status, note) when a peer's measurement is not run, else None: FlexAttention fwd+bwd
    on the CPU, SDPA whose estimated memory (``sdpa_memory_estimate(case, backward, device)``,
    bytes) exceeds the limit."""
    backward = mode == "fwd+bwd"
    if backend == "flex" and backward and device == "cpu":
        return ("n/a", f"n/a ({FLEX_NO_CPU_BACKWARD})")
    if backend == "sdpa":
        est = sdpa_memory_estimate(case, backward, device)
        if est > mem_limit_gb * 2**30:
            return (
                "skipped",
                f"skipped (memory: dense mask needs ~{est / 2**30:.1f} GiB > {mem_limit_gb:g} GiB)",
            )
    return None


def tokenmix_info(script: str, entry_point: str) -> dict:
    """Import tokenmix, or exit with a clear message (``script`` says who) when it cannot be
    imported or has no ``entry_point``; returns its ``version`` and ``file``."""
    try:
        import tokenmix
    except Exception as exc:
        sys.exit(
            f"{script}: cannot import tokenmix "
            f"({type(exc).__name__}: {exc}).\n"
            "Build and install it first (pip install --no-build-isolation -e . from the "
            "repository root),\nor put an installed build on PYTHONPATH."
        )
    if not hasattr(tokenmix, entry_point):
        sys.exit(f"{script}: tokenmix at {getattr(tokenmix, '__file__', '?')} has no {entry_point}")
    return {
        "version": getattr(tokenmix, "__version__", "?"),
        "file": getattr(tokenmix, "__file__", None),
    }


# ---------------------------------------------------------------------------
# Results of one case: correctness, speedups, table rows
# ---------------------------------------------------------------------------


def diff_tensors(a: dict, b: dict) -> dict[str, float]:
    out = {}
    for key in a:
        if key in b:
            out[key] = float((a[key].float() - b[key].float()).abs().max())
    return out


def check_correctness(
    rows: list[dict],
    modes: Sequence[str],
    oracles: Sequence[str],
    atol: float,
    rtol: float,
    unchecked: Collection[str] = (),
) -> dict:
    """Every backend's saved outputs (and gradients) against the first of ``oracles`` that
    ran, per mode: ``|x - oracle| <= atol + rtol * max|oracle|`` per tensor. Marks the rows
    (``max_abs_diff``, ``diff_vs``, ``correct``) and returns ``{mode: {backend: {vs,
    max_abs_diff, ok}}}``; the rows' ``save_path`` is dropped afterwards. Backends in
    ``unchecked`` compute another function (dense attention as a baseline of a sparse
    pattern): they are timed and compared for speed only."""
    correctness: dict = {}
    for mode in modes:
        ran = {
            r["backend"]: r
            for r in rows
            if r["mode"] == mode and r.get("status") == "ok" and r["backend"] not in unchecked
        }
        oracle = next((o for o in oracles if o in ran), None)
        if oracle is None:
            continue
        ref = torch.load(ran[oracle]["save_path"])
        bound = {k: atol + rtol * float(v.float().abs().max()) for k, v in ref.items()}
        for backend, row in ran.items():
            if backend == oracle:
                continue
            diffs = diff_tensors(torch.load(row["save_path"]), ref)
            ok = all(d <= bound[k] for k, d in diffs.items()) and bool(diffs)
            row["max_abs_diff"] = diffs
            row["diff_vs"] = oracle
            row["correct"] = ok
            correctness.setdefault(mode, {})[backend] = {
                "vs": oracle,
                "max_abs_diff": diffs,
                "ok": ok,
            }
    for r in rows:
        r.pop("save_path", None)
    return correctness


def add_speedups(rows: list[dict], modes: Sequence[str], subject: str = "tokenmix") -> list[dict]:
    """``tokenmix_speedup`` = peer median / ``subject`` median per mode, on every row (a
    lower bound for a peer stopped as too slow); returns the peers' entries."""
    speedups = []
    for mode in modes:
        tm = next(
            (r for r in rows if r["backend"] == subject and r["mode"] == mode and "median_ms" in r),
            None,
        )
        if tm is None:
            continue
        for r in rows:
            if r["mode"] != mode:
                continue
            if "median_ms" in r:
                r["tokenmix_speedup"] = r["median_ms"] / tm["median_ms"]
            elif "lower_bound_ms" in r:
                # The peer was stopped: the speedup is at least this much.
                r["tokenmix_speedup"] = r["lower_bound_ms"] / tm["median_ms"]
                r["speedup_is_lower_bound"] = True
            else:
                continue
            if r["backend"] != subject:
                speedups.append(
                    {
                        "mode": mode,
                        "peer": r["backend"],
                        "speedup": r["tokenmix_speedup"],
                        "lower_bound": bool(r.get("speedup_is_lower_bound")),
                    }
                )
    return speedups


RESULT_HEADERS = (
    "backend",
    "mode",
    "median ms",
    "GFLOP/s",
    "% matmul",
    "peak MiB",
    "mask MiB",
    "tokenmix speedup",
    "max|diff|",
    "note",
)
RESULT_ALIGN = "llrrrrrrrl"


def result_cells(
    r: dict, oracles: Sequence[str], *, diff_key: str = "max_abs_diff", aux_column: bool = True
) -> list[str]:
    """One table row (:data:`RESULT_HEADERS`; without the aux column when ``aux_column`` is
    false) of a result row; the difference column shows ``r[diff_key]``'s largest entry."""
    speed = r.get("tokenmix_speedup")
    if "median_ms" not in r:
        speed_s = "-" if speed is None else f">{speed:.0f}x"
        blanks = ["-"] * (5 if aux_column else 4)
        return [r["label"], r["mode"], *blanks, speed_s, "-", r.get("note", "")]
    t = r["timing"]
    note = f"n={t['repeats']}"
    if t["repeats"] > 1:
        note += f", min {fmt_float(t['min_ms'])}"
    if r.get("correct") is False:
        note = "WRONG OUTPUT; " + note
    diffs = r.get(diff_key)
    diff = fmt_sci(max(diffs.values())) if diffs else "-"
    if r["backend"] in oracles and "diff_vs" not in r:
        diff = "(oracle)"
    aux = r.get("aux_mib") or 0.0
    cells = [
        r["label"],
        r["mode"],
        fmt_float(r["median_ms"]),
        fmt_float(r["gflops"]),
        frac_cell(r),
        "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.1f}",
    ]
    if aux_column:
        cells.append(f"{aux:.1f}" if aux else "-")
    return [*cells, "-" if speed is None else f"{speed:.2f}x", diff, note]


def frac_cell(r: dict) -> str:
    """The "% matmul" cell of a measured row: its fraction of the run's ceiling, followed by
    ``(row x%)``, its fraction of the ceiling measured next to it, with ``--row-ceiling``, and
    ``(paired x%)``, its median fraction of the matmul timed next to each call, with
    ``--paired-ceiling``."""
    cell = f"{100 * r['frac_matmul']:.1f}%"
    if "frac_row_ceiling" in r:
        cell += f" (row {100 * r['frac_row_ceiling']:.1f}%)"
    if "frac_paired" in r:
        cell += f" (paired {100 * r['frac_paired']:.1f}%)"
    return cell


def speedup_phrase(x: float, lower_bound: bool = False) -> str:
    """``31.2x faster than`` / ``2.0x slower than`` / ``on par (1.02x) with``."""
    if lower_bound:
        phrase = f"more than {x:.0f}x faster"
    elif 1 / 1.05 < x < 1.05:
        phrase = f"on par ({x:.2f}x) with"
    else:
        phrase = f"{x:.1f}x faster" if x >= 1 else f"{1 / x:.1f}x slower"
    return phrase if phrase.endswith("with") else phrase + " than"


def case_footer(
    case_res: dict,
    labels: dict[str, str],
    *,
    relative_tol: float | None = None,
    mode_suffix: Callable[[str], str] | None = None,
) -> list[str]:
    """Lines under a case's table: tokenmix's correctness verdict per mode and its speedups
    over every peer, in words. With ``relative_tol`` the verdict quotes the differences
    relative to the oracle's largest value (``max_rel_diff``) and the tolerance;
    ``mode_suffix(mode)`` is appended to each mode's speedup line."""
    lines = []
    for r in case_res["results"]:
        if r["backend"] == "tokenmix" and "median_ms" in r and "diff_vs" not in r:
            lines.append(f"correctness {r['mode']}: NOT CHECKED (no oracle backend ran)")
    for mode, entries in case_res["correctness"].items():
        tm = entries.get("tokenmix")
        if tm is None:
            continue
        verdict = "OK" if tm["ok"] else "MISMATCH - tokenmix output is wrong"
        oracle = labels[tm["vs"]]
        if relative_tol is None:
            diffs = ", ".join(f"{k} {v:.2e}" for k, v in tm["max_abs_diff"].items())
            lines.append(f"correctness {mode}: max|tokenmix - {oracle}|: {diffs} -> {verdict}")
        else:
            diffs = ", ".join(f"{k} {v:.2e}" for k, v in tm["max_rel_diff"].items())
            lines.append(
                f"correctness {mode}: max|tokenmix - {oracle}| / max|{oracle}|: {diffs} "
                f"(<= {relative_tol:g}) -> {verdict}"
            )
    by_mode: dict[str, list[str]] = {}
    for s in case_res["speedups"]:
        phrase = speedup_phrase(s["speedup"], s.get("lower_bound", False))
        by_mode.setdefault(s["mode"], []).append(f"{phrase} {labels[s['peer']]}")
    for mode, parts in by_mode.items():
        suffix = mode_suffix(mode) if mode_suffix is not None else ""
        lines.append(f"tokenmix {mode} is " + ", ".join(parts) + suffix)
    return lines


def render_tables(
    title: str,
    rows: list[list[str]],
    footer: list[str],
    markdown: bool,
    headers: Sequence[str] = RESULT_HEADERS,
    align: str = RESULT_ALIGN,
) -> list[str]:
    """One case: a heading, the table (:data:`RESULT_HEADERS` unless ``headers``), the footer
    lines, a blank line."""
    out = []
    if markdown:
        out.append(f"### {title}")
        out.append("")
        out.append(format_markdown(headers, rows, align))
        out.append("")
        out.extend(f"- {line}" for line in footer)
    else:
        out.append(f"== {title}")
        out.append(format_table(headers, rows, align))
        out.extend(f"  {line}" for line in footer)
    out.append("")
    return out


def render_case(
    case_res: dict,
    title: str,
    labels: dict[str, str],
    oracles: Sequence[str],
    markdown: bool,
    notes: Sequence[str] = (),
) -> list[str]:
    """One case of an attention benchmark's report: :func:`render_tables` of its result rows
    (:func:`result_cells`) with the :func:`case_footer` and the script's own ``notes``."""
    rows = [result_cells(r, oracles) for r in case_res["results"]]
    return render_tables(title, rows, case_footer(case_res, labels) + list(notes), markdown)


def header_lines(head: str, warnings: Sequence[str], markdown: bool) -> list[str]:
    """A report's first line ``head`` (bold in markdown), its warnings, a blank line."""
    out = [f"**{head}**" if markdown else head]
    for w in warnings:
        out.append(f"> **Warning:** {w}" if markdown else f"WARNING: {w}")
    out.append("")
    return out


def report_text(lines: list[str], notes: str, markdown: bool) -> str:
    """A report: its ``lines``, then the explanatory paragraph ``notes`` (italic in markdown)."""
    return "\n".join([*lines, f"_{notes}_" if markdown else notes])


def _ceiling_libraries(matmul: Mapping) -> dict[str, float]:
    """The per-library figures of the measurement that set the ceiling (start or end; empty for
    a report written before libraries were recorded)."""
    libs = matmul.get("libraries") or {}
    start, end = libs.get("start") or {}, libs.get("end") or {}
    if not start and not end:
        return {}
    return end if end and max(end.values()) > max(start.values() or [0.0]) else start


def ceiling_libraries_note(matmul: Mapping) -> str:
    """``" (oneDNN; torch.matmul 187.5)"``: for a report header, after the ceiling's GFLOP/s
    (``matmul`` is a report's ``meta["matmul"]``; empty without per-library figures)."""
    libraries = _ceiling_libraries(matmul)
    return f" ({describe_libraries(libraries)})" if libraries else ""


def report_header(meta: dict, family: str, markdown: bool) -> list[str]:
    """The first lines of a benchmark report: machine, versions, the same-run matmul ceiling and
    the run's warnings, then a blank line."""
    cuda = meta.get("device", "cpu") == "cuda"
    where = (
        f"{meta['machine']['gpu']} (CUDA {meta['machine']['cuda']})"
        if cuda
        else f"{meta['machine']['cpu']}, {meta['threads']} threads"
    )
    head = (
        f"{family}, {where}, "
        f"torch {meta['machine']['torch']}, tokenmix {meta['tokenmix']['version']}; "
        f"{meta['dtype']} matmul {meta['matmul']['n']}x{meta['matmul']['n']}: "
        f"{meta['matmul']['gflops']:.1f} GFLOP/s"
    )
    head += ceiling_libraries_note(meta["matmul"])
    if meta.get("args", {}).get("row_ceiling"):
        head += (
            "; (row x%): against the higher of two matmuls measured in the row's own worker, "
            "right before and after its timed calls"
        )
    if meta.get("args", {}).get("paired_ceiling"):
        head += (
            "; (paired x%): the median over pairs of one call and one matmul timed next to it "
            "of the call's throughput against its matmul's"
        )
    return header_lines(head, meta.get("warnings", []), markdown)


# ---------------------------------------------------------------------------
# Bars: the issues' pass/fail targets
# ---------------------------------------------------------------------------


def check_verdict(
    value: float, need: float, *, strict: bool = False, lower_bound: bool = False, wrong=False
) -> str:
    """The verdict of one check of a bar: ``FAIL (wrong output)`` when tokenmix's output is
    wrong, ``PASS`` when ``value`` reaches ``need`` (``>``, or ``>=`` unless ``strict``),
    ``NOT MEASURED (peer stopped early)`` when it does not but ``value`` is only a lower bound,
    else ``FAIL``."""
    if wrong:
        return "FAIL (wrong output)"
    if value > need if strict else value >= need:
        return "PASS"
    return "NOT MEASURED (peer stopped early)" if lower_bound else "FAIL"


def bar_verdict(checks: Sequence[dict]) -> str:
    """A bar over its checks: ``FAIL`` when one fails, ``PASS`` when all pass, else
    ``INCOMPLETE`` (a check not run or not measured)."""
    if any(ch["verdict"].startswith("FAIL") for ch in checks):
        return "FAIL"
    if checks and all(ch["verdict"] == "PASS" for ch in checks):
        return "PASS"
    return "INCOMPLETE"


# ---------------------------------------------------------------------------
# Sequence-length sweeps and their plot (--seq-lens, --plot)
# ---------------------------------------------------------------------------


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"2048,4096"`` -> ``[2048, 4096]`` (positive integers, duplicates dropped), or exit
    with a message naming ``flag``."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected integers like 2048,4096, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"{flag}: expected positive integers, got {text!r}")
    return list(dict.fromkeys(values))


def add_plot_argument(p: argparse.ArgumentParser) -> None:
    """``--plot FILE.png``: see :func:`plot_sweep`."""
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw each backend's median time and tokenmix's speedup over it against the "
        "sequence length (with --seq-lens) into FILE.png; needs matplotlib",
    )


MATPLOTLIB_HINT = "pip install matplotlib"


def require_matplotlib(script: str) -> None:
    """For ``--plot``: return when matplotlib can be imported, else print one line
    (``<script>: --plot needs matplotlib ...; pip install matplotlib``) on stderr and exit with
    status 2, before anything is measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError as exc:
        print(
            f"{script}: --plot needs matplotlib, which cannot be imported ({exc}); "
            f"install it with: {MATPLOTLIB_HINT}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def sweep_points(
    cases: Sequence[dict],
    *,
    x: Callable[[dict], int],
    series: Callable[[dict], str],
    labels: Mapping[str, str],
) -> list[dict]:
    """The points of a plot: one per result row of every case, with the case's ``x`` (its
    sequence length) and ``series`` (what stays fixed along the sweep, e.g. the pattern and
    block size), the backend, its label, the mode, the median (None when it did not run) and
    the lower bound of a backend stopped as too slow, and the note of one that did not run."""
    points = []
    for c in cases:
        for r in c["results"]:
            points.append(
                {
                    "series": series(c),
                    "x": x(c),
                    "backend": r["backend"],
                    "label": labels.get(r["backend"], r.get("label", r["backend"])),
                    "mode": r["mode"],
                    "ms": r.get("median_ms"),
                    "lower_bound_ms": r.get("lower_bound_ms"),
                    "note": r.get("note", ""),
                }
            )
    return points


def plot_sweep(
    path: str,
    points: Sequence[dict],
    *,
    title: str,
    subject: str = "tokenmix",
    x_label: str = "sequence length T (tokens)",
) -> None:
    """Draw :func:`sweep_points` into the PNG ``path``: one row per mode; on the left the
    median time of every backend against the sequence length (log-log), on the right
    ``subject``'s speedup over every other backend (its time / ``subject``'s time at the same
    point). A hollow marker is a lower bound: the peer was stopped as too slow (``--max-call-s``).
    Colours are backends; with several series, markers and line styles tell them apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    modes = list(dict.fromkeys(p["mode"] for p in points))
    ordered = sorted(points, key=lambda p: p["backend"] != subject)
    labels = list(dict.fromkeys(p["label"] for p in ordered))
    subject_label = next((p["label"] for p in ordered if p["backend"] == subject), subject)
    series = list(dict.fromkeys(p["series"] for p in points))
    xs = sorted({p["x"] for p in points})
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    markers = "osD^vP*Xh<>"
    styles = ("-", "--", "-.", ":")

    def style(label: str, si: int) -> dict:
        return {
            "color": colors[label],
            "marker": markers[si % len(markers)],
            "linestyle": styles[si % len(styles)],
            "markersize": 5,
        }

    fig, axes = plt.subplots(
        max(1, len(modes)), 2, figsize=(12, 3.9 * max(1, len(modes)) + 1.2), squeeze=False
    )
    hollow: list[bool] = []  # whether a lower bound was drawn
    for row, mode in enumerate(modes):
        ax_t, ax_s = axes[row]
        for si, ser in enumerate(series):
            here = [p for p in points if p["series"] == ser and p["mode"] == mode]
            base = {p["x"]: p["ms"] for p in here if p["backend"] == subject and p["ms"]}
            for label in labels:
                pts = sorted((p for p in here if p["label"] == label), key=lambda p: p["x"])
                timed = [(p["x"], p["ms"]) for p in pts if p["ms"]]
                if timed:
                    ax_t.plot(*zip(*timed, strict=True), **style(label, si))
                stopped = [
                    (p["x"], p["lower_bound_ms"])
                    for p in pts
                    if not p["ms"] and p.get("lower_bound_ms")
                ]
                if stopped:
                    hollow.append(True)
                    ax_t.plot(
                        *zip(*stopped, strict=True),
                        **{**style(label, si), "linestyle": "none", "markerfacecolor": "none"},
                    )
                if label == subject_label:
                    continue
                ratio = [
                    (p["x"], p["ms"] / base[p["x"]]) for p in pts if p["ms"] and p["x"] in base
                ]
                if ratio:
                    ax_s.plot(*zip(*ratio, strict=True), **style(label, si))
                bound = [
                    (p["x"], p["lower_bound_ms"] / base[p["x"]])
                    for p in pts
                    if not p["ms"] and p.get("lower_bound_ms") and p["x"] in base
                ]
                if bound:
                    hollow.append(True)
                    ax_s.plot(
                        *zip(*bound, strict=True),
                        **{**style(label, si), "linestyle": "none", "markerfacecolor": "none"},
                    )
        ax_t.set_title(f"{mode}: median time per call")
        ax_t.set_ylabel("ms")
        ax_s.set_title(f"{mode}: {subject_label} speedup (peer time / {subject_label} time)")
        ax_s.set_ylabel("speedup (x)")
        ax_s.axhline(1.0, color="0.4", linewidth=0.8)
        for ax in (ax_t, ax_s):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.set_xlabel(x_label)
            ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=colors[label], linewidth=2, label=label) for label in labels]
    if len(series) > 1:
        handles += [
            Line2D(
                [],
                [],
                color="0.2",
                marker=markers[si % len(markers)],
                linestyle=styles[si % len(styles)],
                label=ser,
            )
            for si, ser in enumerate(series)
        ]
    elif series:
        title = f"{title}\n{series[0]}"
    if hollow:
        handles.append(
            Line2D(
                [],
                [],
                color="0.2",
                marker="o",
                markerfacecolor="none",
                linestyle="none",
                label="hollow: peer stopped as too slow (time and speedup are lower bounds)",
            )
        )
    fig.suptitle(title, fontsize=11)
    ncol = min(len(handles), 4)
    rows = -(-len(handles) // max(ncol, 1))
    missing = missing_points(points, xs)
    if missing:
        fig.text(0.01, 0.005, "\n".join(missing), fontsize=7.5, color="0.3", va="bottom")
    legend_y = (0.16 * len(missing) + 0.05) / fig.get_figheight() if missing else 0.0
    fig.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, legend_y),
        ncol=ncol,
        frameon=False,
        fontsize=9,
    )
    bottom = legend_y + (0.35 * rows + 0.2) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 0.93 if len(series) <= 1 else 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def missing_points(points: Sequence[dict], xs: Sequence[int], most: int = 6) -> list[str]:
    """Footnote lines of a plot: the backends and modes that have no point at some lengths
    (skipped, n/a, failed), with their note: ``not drawn: sdpa+mask fwd+bwd at 16384:
    skipped (memory: ...)``; a note shared by every length is said once."""
    gaps: dict[tuple[str, str, str], list[int]] = {}
    for p in points:
        if not p["ms"] and not p.get("lower_bound_ms"):
            note = p.get("note") or "not run"
            gaps.setdefault((p["label"], p["mode"], note), []).append(p["x"])
    lines = []
    for (label, mode, note), at in gaps.items():
        at = sorted(set(at))
        where = "" if at == list(xs) else " at " + ", ".join(str(x) for x in at)
        lines.append(f"not drawn: {label} {mode}{where}: {note}")
    if len(lines) > most:
        lines = [*lines[: most - 1], f"(and {len(lines) - most + 1} more: see the report)"]
    return lines


# ---------------------------------------------------------------------------
# Parent side of the attention benchmarks: one run over cases, backends and modes
# ---------------------------------------------------------------------------

# skip_reason(case, backend, mode, tm_info, mem_limit_gb, device): (status, note) of a
# measurement that is not run, or None.
SkipReason = Callable[[object, str, str, dict, float, str], tuple[str, str] | None]


@dataclass
class AttentionBenchmark:
    """What an attention benchmark script (bench_na.py, bench_block_sparse.py) gives the
    harness; :func:`attention_main` runs it.

    ``script`` is the script's path (re-invoked as the worker), ``family`` names the operator
    in the report header and the plot, ``description`` is the ``--help`` text and
    ``add_arguments(parser)`` adds the script's own options. ``case_from_dict`` rebuilds a
    case in the worker, ``builders`` set each backend up there. ``backends``,
    ``default_backends`` (a list or a function of the options; ``default_backends_help``
    describes the latter), ``labels``, ``oracles`` (correctness, in order of preference) and
    ``unchecked`` (backends computing another function, timed only) describe the backends.
    ``select_cases(args)``, ``check_tokenmix()``, ``skip_reason``, ``run_case(case, run)``,
    ``render(report, markdown)`` and ``conclude(report)`` (verdicts: error lines for the exit
    status) are the script's steps (see :func:`benchmark_main`); ``fwd_flops`` is the forward
    FLOP formula for the JSON; ``series(case_result)`` names the sweep a case belongs to in
    ``--plot`` (default its name) and ``x_label`` the plot's x axis (each case's ``tokens``).
    """

    script: str
    family: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    case_from_dict: Callable[[dict], object]
    builders: Mapping[str, Builder]
    backends: Sequence[str]
    labels: dict[str, str]
    oracles: Sequence[str]
    select_cases: Callable[[argparse.Namespace], list]
    check_tokenmix: Callable[[], dict]
    skip_reason: SkipReason
    run_case: Callable[[object, BenchmarkRun], dict]
    fwd_flops: str
    render: Callable[[dict, bool], str]
    default_backends: DefaultBackends | None = None
    default_backends_help: str | None = None
    unchecked: Sequence[str] = ()
    conclude: Callable[[dict], list[str]] | None = None
    series: Callable[[dict], str] = field(default=lambda c: c["name"])
    x_label: str = "sequence length T (tokens)"


@dataclass
class BenchmarkRun:
    """What the cases of one attention-benchmark run share on the parent side: the options,
    the script (re-invoked as the worker), its labels, oracles, unchecked backends and skip
    rule, the selected backends and modes, tokenmix's import info, the directory of the
    workers' files and the progress count (``[done/total]``)."""

    args: argparse.Namespace
    script: str
    labels: dict[str, str]
    oracles: Sequence[str]
    skip_reason: SkipReason
    backends: list[str]
    modes: list[str]
    tm_info: dict
    unchecked: Sequence[str] = ()
    tmpdir: str = ""
    total: int = 0
    done: int = 0

    def skip(self, case, backend: str, mode: str) -> tuple[str, str] | None:
        """(status, note) when ``backend`` in ``mode`` is not run on ``case``, else None."""
        return self.skip_reason(
            case, backend, mode, self.tm_info, self.args.mem_limit_gb, self.args.device
        )

    def measure(self, case, fwd_flops: float, **spec_fields) -> list[dict]:
        """One result row per (backend, mode) of ``case``: skipped ones with their status and
        note, the others measured by a worker (:func:`measure_row`; ``spec_fields`` go into its
        spec) with ``fwd_flops`` useful forward FLOPs (:data:`FWD_BWD_FLOP_FACTOR` times that
        in fwd+bwd mode)."""
        args = self.args
        rows = []
        for backend in self.backends:
            for mode in self.modes:
                label = self.labels[backend]
                row = {"backend": backend, "label": label, "mode": mode}
                skip = self.skip(case, backend, mode)
                if skip is not None:
                    row.update(status=skip[0], note=skip[1])
                    rows.append(row)
                    continue
                self.done += 1
                spec = worker_spec(
                    args,
                    case=asdict(case),
                    backend=backend,
                    mode=mode,
                    **spec_fields,
                    save_path=os.path.join(self.tmpdir, f"{case.name}-{backend}-{mode}.pt"),
                )
                measure_row(
                    row,
                    spec,
                    script=self.script,
                    tag=f"[{self.done}/{self.total}] {case.name} {label} {mode}",
                    flops=fwd_flops * (FWD_BWD_FLOP_FACTOR if mode == "fwd+bwd" else 1.0),
                    matmul_gflops=args.matmul_gflops,
                    timeout_s=args.worker_timeout,
                    verbose=args.verbose,
                )
                rows.append(row)
        return rows

    def case_result(
        self, case, rows: list[dict], *, tokens: int, details: dict, fwd_flops: float
    ) -> dict:
        """The report entry of ``case``: the case and its description, ``tokens``, the script's
        ``details``, the FLOPs, and the ``rows`` with every backend's outputs checked against
        the first oracle that ran (at the dtype's :data:`TOLERANCES`) and tokenmix's speedup
        over every peer that ran, per mode."""
        atol, rtol = TOLERANCES[case.dtype]
        correctness = check_correctness(
            rows, self.modes, self.oracles, atol, rtol, unchecked=self.unchecked
        )
        speedups = add_speedups(rows, self.modes)
        return {
            "case": asdict(case),
            "name": case.name,
            "description": case.describe(),
            "tokens": tokens,
            **details,
            "fwd_flops": fwd_flops,
            "fwd_bwd_flops": fwd_flops * FWD_BWD_FLOP_FACTOR,
            "results": rows,
            "correctness": correctness,
            "speedups": speedups,
        }


def attention_parser(bench: AttentionBenchmark) -> argparse.ArgumentParser:
    """The command line of an attention benchmark: its own options (``bench.add_arguments``),
    batch/heads/head dim, the measurement options and ``--plot``."""
    p = argparse.ArgumentParser(description=bench.description)
    bench.add_arguments(p)
    add_size_arguments(p)
    add_measurement_arguments(
        p, bench.backends, bench.default_backends, bench.default_backends_help
    )
    add_plot_argument(p)
    return p


def attention_main(bench: AttentionBenchmark, argv: list[str] | None = None) -> int:
    """Parse the command line (:func:`attention_parser`) and run :func:`benchmark_main`;
    returns the exit status."""
    return benchmark_main(attention_parser(bench).parse_args(argv), bench)


def benchmark_main(args: argparse.Namespace, bench: AttentionBenchmark) -> int:
    """The whole run of a worker-based attention benchmark after parsing its options
    (:func:`attention_main`); returns the exit status.

    With ``--worker``: one measurement (:func:`run_attention_worker` of the benchmark's
    ``case_from_dict`` and ``builders``). Otherwise: refuse an unusable ``--device cuda`` in
    one line, and ``--plot`` without matplotlib (:func:`require_matplotlib`), select the cases
    and backends, measure the same-run matmul ceiling (:class:`RunCeiling`),
    ``run_case(case, run)`` for every case in a temporary directory, then ``conclude(report)``
    (the script's own verdicts: extra report fields, and error lines for the exit status),
    print ``render(report, markdown)``, write ``--json`` and the ``--plot``
    (:func:`plot_sweep` over the cases' ``tokens``). The exit status is 1 when tokenmix's
    output mismatches its oracle or ``conclude`` reports an error, else 0.
    """
    if args.worker is not None:
        return worker_main(
            args.worker,
            lambda spec: run_attention_worker(spec, bench.case_from_dict, bench.builders),
        )
    name = os.path.basename(bench.script)
    if args.device == "cuda":
        # One clear line instead of a traceback from the first CUDA call.
        refused = refuse_unusable_cuda(name)
        if refused is not None:
            return refused
    if args.plot:
        require_matplotlib(name)
    chosen, modes = resolve_measurement_arguments(args, bench.backends, bench.default_backends)
    cases = bench.select_cases(args)
    tm_info = bench.check_tokenmix()
    run = BenchmarkRun(
        args,
        bench.script,
        bench.labels,
        bench.oracles,
        bench.skip_reason,
        chosen,
        modes,
        tm_info,
        unchecked=bench.unchecked,
    )

    t_start = time.perf_counter()
    ceiling = RunCeiling(
        args.threads, MATMUL_N[args.device], DTYPES[args.dtype], args.dtype, args.device
    )
    args.matmul_gflops = ceiling.start()
    run.total = sum(run.skip(c, b, m) is None for c in cases for b in chosen for m in modes)
    report: dict = {
        "meta": {
            "machine": machine_info(args.threads, args.device),
            "device": args.device,
            "threads": args.threads,
            "dtype": args.dtype,
            "tokenmix": tm_info,
            "matmul": ceiling.meta(),
            "flops": {"fwd": bench.fwd_flops, "fwd+bwd": f"{FWD_BWD_FLOP_FACTOR} * fwd"},
            "args": {k: v for k, v in vars(args).items() if k != "worker"},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "cases": [],
    }
    stem = os.path.splitext(name)[0]
    with tempfile.TemporaryDirectory(prefix=f"{stem}_") as run.tmpdir:
        for case in cases:
            report["cases"].append(bench.run_case(case, run))
    # Measured again at the end: a busy machine at the start would otherwise make the
    # ceiling too low. The higher median is the ceiling; the stored ratios are redone.
    ceiling.finish(report["cases"])
    report["meta"]["warnings"] = ceiling.warnings
    report["meta"]["matmul"] = ceiling.meta()
    report["meta"]["wall_s"] = time.perf_counter() - t_start
    report["meta"]["cpu_busy_at_start"] = ceiling.busy_start
    errors = bench.conclude(report) if bench.conclude is not None else []
    log(f"done in {report['meta']['wall_s']:.0f} s")

    print(bench.render(report, args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {args.json}")
    if args.plot:
        points = sweep_points(
            report["cases"], x=lambda c: c["tokens"], series=bench.series, labels=bench.labels
        )
        title = plot_title(report["meta"], bench.family)
        plot_sweep(args.plot, points, title=title, x_label=bench.x_label)
        log(f"wrote {args.plot}")

    wrong = [
        (c["name"], m)
        for c in report["cases"]
        for m, entries in c["correctness"].items()
        if "tokenmix" in entries and not entries["tokenmix"]["ok"]
    ]
    if wrong:
        errors.insert(0, f"tokenmix output mismatches its oracle in {wrong}")
    for error in errors:
        log(f"ERROR: {error}")
    return 1 if errors else 0


def plot_title(meta: dict, family: str) -> str:
    """The title of a ``--plot``: the operator, the machine, threads, dtype and sizes."""
    machine = meta["machine"]
    where = (
        machine.get("gpu", "GPU")
        if meta.get("device") == "cuda"
        else f"{machine['cpu']}, {meta['threads']} threads"
    )
    a = meta["args"]
    sizes = f"B={a['batch']} H={a['heads']} D={a.get('head_dim', a.get('dim'))}"
    return f"{family}: {where}; {meta['dtype']}, {sizes}, torch {machine['torch']}"
