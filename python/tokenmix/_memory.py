"""The CPU kernels' cache of large per-call buffers.

The CPU kernels keep their large per-call buffers (the block-sparse forward's head-major K/V
copies, the backward's dK/dV accumulators) for the next call instead of returning them to the
system: fresh pages cost a fault and a zeroing each on first touch. At most 8 blocks and 256 MiB
in all are kept; the environment variable ``TOKENMIX_CPU_BLOCK_CACHE_MB`` (read when the first
kernel runs) sets the cap, and ``0`` turns the cache off. See docs/cpu_engine.md.
"""

from __future__ import annotations

import torch

from ._ops import require_library


def cpu_cached_bytes() -> int:
    """Bytes the CPU kernels hold for reuse by their next call.

    Example::

        >>> import tokenmix
        >>> tokenmix.cpu_cached_bytes() >= 0
        True
    """
    require_library()
    return int(torch.ops.tokenmix.cpu_cached_bytes())


def empty_cpu_cache() -> int:
    """Frees the buffers the CPU kernels hold for reuse (as ``torch.cuda.empty_cache()`` does
    for the CUDA caching allocator) and returns the bytes freed. The next call allocates anew.

    Example::

        >>> import tokenmix
        >>> freed = tokenmix.empty_cpu_cache()
        >>> tokenmix.cpu_cached_bytes()
        0
    """
    require_library()
    return int(torch.ops.tokenmix.cpu_empty_cache())
