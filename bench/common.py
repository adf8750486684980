"""Shared helpers for the tokenmix benchmarks.

Timing (warmup + median of ``time.perf_counter`` samples on the CPU, CUDA events on a
GPU), matmul throughput as the machine's practical compute ceiling, peak-memory
measurement (RSS, or the CUDA caching allocator's high-water mark), and plain-text /
markdown table formatting. Only the standard library and torch are used.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
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


def measure_matmul_gflops(
    threads: int,
    n: int = 2048,
    dtype: torch.dtype = torch.float32,
    repeats: int = 10,
    device: str = "cpu",
) -> float:
    """Median GFLOP/s of an ``n x n @ n x n`` ``torch.matmul`` with ``threads`` threads.

    Counts ``2 * n**3`` FLOPs per product. This is the practical dense-compute
    ceiling of the machine (of the GPU with ``device="cuda"``) for the given dtype
    and thread count; the benchmarks report kernel throughput as a fraction of it.
    The previous thread count is restored afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        out = torch.empty(n, n, dtype=dtype, device=device)
        timing = time_fn(
            lambda: torch.matmul(a, b, out=out),
            warmup=2,
            repeats=repeats,
            budget_s=0,
            device=device,
        )
    finally:
        torch.set_num_threads(previous)
    return 2.0 * n**3 / (timing.median_ms * 1e-3) / 1e9


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
