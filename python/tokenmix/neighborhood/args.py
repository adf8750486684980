"""Argument normalization and validation for neighborhood attention.

Two entry points:

* :func:`normalize_window_args` turns user-facing ``kernel_size`` / ``stride`` /
  ``dilation`` / ``is_causal`` arguments (an int / bool, or one value per spatial
  dimension) into per-dimension tuples and validates them against the input's
  spatial shape.
* :func:`check_tensors` validates the tensors of a call (shapes, dtypes, devices).

Every error is a ``ValueError`` (``TypeError`` when an argument has the wrong Python
type) whose message starts with, or names, the offending argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._checks import (
    SUPPORTED_DTYPES,
    bool_tuple,
    check_same_dtype_and_device,
    check_supported_dtype,
    int_tuple,
    require_tensor,
    resolve_scale,
)

__all__ = [
    "MAX_SPATIAL_LENGTH",
    "SUPPORTED_DTYPES",
    "check_tensors",
    "normalize_window_args",
    "resolve_scale",
    "spatial_rank",
]

# The longest spatial dimension the kernels take (their window math is 32-bit; the ops
# check the same limit, csrc/neighborhood/na_window_args.h).
MAX_SPATIAL_LENGTH = 1 << 30


def spatial_rank(q: Any) -> int:
    """The number of spatial dimensions of ``q`` ``[B, *spatial, H, D]`` (1 to 3)."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    rank = q.dim() - 3
    if rank not in (1, 2, 3):
        raise ValueError(
            f"q must be [B, *spatial, H, D] with 1 to 3 spatial dimensions, got shape "
            f"{tuple(q.shape)}"
        )
    return rank


def _check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank not in (1, 2, 3):
        raise ValueError(f"rank must be 1, 2 or 3, got {rank}")
    return rank


def normalize_window_args(
    rank: int,
    spatial_shape: Sequence[int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """Normalize and validate window arguments.

    Each of ``kernel_size``, ``stride`` and ``dilation`` may be an int (used for every
    spatial dimension) or a sequence with one int per spatial dimension; ``is_causal``
    likewise takes a bool or a sequence of bools. Returns
    ``(kernel_size, stride, dilation, is_causal)`` as tuples of length ``rank``.

    Constraints, per dimension: ``kernel_size >= 2``, ``1 <= stride <= kernel_size``,
    ``dilation >= 1``, ``kernel_size * dilation <= spatial size <= 2**30``. Spatial sizes
    may be symbolic (``torch.compile(dynamic=True)``); the checks then become guards.
    """
    rank = _check_rank(rank)
    if not isinstance(spatial_shape, Sequence):
        raise TypeError(
            f"spatial_shape must be a sequence of {rank} ints, got {type(spatial_shape).__name__}"
        )
    shape = int_tuple(spatial_shape, "spatial_shape", rank)
    if any(n < 1 for n in shape):
        raise ValueError(f"spatial_shape must be >= 1 in every dimension, got {shape}")
    if any(n > MAX_SPATIAL_LENGTH for n in shape):
        raise ValueError(f"spatial_shape must be <= 2**30 in every dimension, got {shape}")

    kernel = int_tuple(kernel_size, "kernel_size", rank)
    strides = int_tuple(stride, "stride", rank)
    dils = int_tuple(dilation, "dilation", rank)
    causal = bool_tuple(is_causal, "is_causal", rank)

    if any(x < 2 for x in kernel):
        raise ValueError(f"kernel_size must be >= 2 in every dimension, got {kernel}")
    if any(x < 1 for x in strides):
        raise ValueError(f"stride must be >= 1 in every dimension, got {strides}")
    if any(s > k for s, k in zip(strides, kernel, strict=True)):
        raise ValueError(f"stride {strides} must be <= kernel_size {kernel} in every dimension")
    if any(x < 1 for x in dils):
        raise ValueError(f"dilation must be >= 1 in every dimension, got {dils}")
    span = tuple(k * d for k, d in zip(kernel, dils, strict=True))
    if any(sp > n for sp, n in zip(span, shape, strict=True)):
        raise ValueError(
            f"kernel_size * dilation {span} (kernel_size={kernel}, dilation={dils}) must "
            f"be <= the input's spatial shape {shape} in every dimension"
        )
    return kernel, strides, dils, causal


def check_tensors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rank: int,
    rpb: torch.Tensor | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    kernel_size: Sequence[int] | None = None,
) -> None:
    """Validate the tensors of a neighborhood-attention call.

    Expected layouts (heads last)::

        q                  [B, *spatial, H,    D ]
        k                  [B, *spatial, H_kv, D ]
        v                  [B, *spatial, H_kv, Dv]
        rpb                [H, 2*k_1 - 1, ..., 2*k_rank - 1]   (needs kernel_size)
        additional_keys    [B, N_extra, H_kv, D ]
        additional_values  [B, N_extra, H_kv, Dv]

    ``H`` must be a multiple of ``H_kv``. All tensors must share one dtype (float32,
    float64, float16 or bfloat16) and one device. ``B == 0`` is allowed; spatial sizes,
    head counts and head dims must be >= 1 (``N_extra == 0`` is allowed).
    """
    rank = _check_rank(rank)
    require_tensor(q, "q")
    require_tensor(k, "k")
    require_tensor(v, "v")

    ndim = rank + 3
    for name, t, layout in (
        ("q", q, "[B, *spatial, H, D]"),
        ("k", k, "[B, *spatial, H_kv, D]"),
        ("v", v, "[B, *spatial, H_kv, Dv]"),
    ):
        if t.dim() != ndim:
            raise ValueError(
                f"{name} must be a {ndim}-D tensor {layout} for rank-{rank} neighborhood "
                f"attention, got shape {tuple(t.shape)}"
            )

    lead = tuple(q.shape[: rank + 1])
    spatial = lead[1:]
    if any(n < 1 for n in spatial):
        raise ValueError(f"q spatial dims must all be >= 1, got spatial shape {spatial}")
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape[: rank + 1]) != lead:
            raise ValueError(
                f"{name} batch/spatial shape {tuple(t.shape[: rank + 1])} must match q's "
                f"{lead} (q shape {tuple(q.shape)}, {name} shape {tuple(t.shape)})"
            )

    heads, dim = q.shape[-2], q.shape[-1]
    heads_kv, dim_v = k.shape[-2], v.shape[-1]
    if heads < 1 or dim < 1:
        raise ValueError(f"q must have >= 1 heads and head dim >= 1, got shape {tuple(q.shape)}")
    if heads_kv < 1 or dim_v < 1:
        raise ValueError(
            f"k/v must have >= 1 heads and v head dim >= 1, got k shape {tuple(k.shape)}, "
            f"v shape {tuple(v.shape)}"
        )
    if k.shape[-1] != dim:
        raise ValueError(f"k head dim {k.shape[-1]} must equal q head dim {dim}")
    if v.shape[-2] != heads_kv:
        raise ValueError(f"v head count {v.shape[-2]} must equal k head count {heads_kv}")
    if heads % heads_kv != 0:
        raise ValueError(
            f"q head count {heads} must be a multiple of the k/v head count {heads_kv} "
            "(grouped-query attention)"
        )

    check_supported_dtype(q, "q")
    check_same_dtype_and_device(q, "q", (("k", k), ("v", v)))

    if rpb is not None:
        require_tensor(rpb, "rpb")
        if kernel_size is None:
            raise ValueError("rpb was given but kernel_size is None; it is needed to check rpb")
        kernel = tuple(int(x) for x in kernel_size)
        if len(kernel) != rank:
            raise ValueError(f"kernel_size must have length {rank}, got {kernel}")
        expected = (heads, *(2 * x - 1 for x in kernel))
        if tuple(rpb.shape) != expected:
            raise ValueError(
                f"rpb must have shape [H, 2*kernel_size-1 per dim] = {expected}, got "
                f"{tuple(rpb.shape)}"
            )
        check_same_dtype_and_device(q, "q", (("rpb", rpb),))

    if (additional_keys is None) != (additional_values is None):
        given, missing = (
            ("additional_keys", "additional_values")
            if additional_values is None
            else ("additional_values", "additional_keys")
        )
        raise ValueError(f"{given} was given without {missing}; pass both or neither")
    if additional_keys is not None:
        ak = require_tensor(additional_keys, "additional_keys")
        av = require_tensor(additional_values, "additional_values")
        for name, t, last, last_name in (
            ("additional_keys", ak, dim, "D"),
            ("additional_values", av, dim_v, "Dv"),
        ):
            if t.dim() != 4:
                raise ValueError(
                    f"{name} must be a 4-D tensor [B, N_extra, H_kv, {last_name}], got shape "
                    f"{tuple(t.shape)}"
                )
            if t.shape[0] != q.shape[0]:
                raise ValueError(
                    f"{name} batch size {t.shape[0]} must match q batch size {q.shape[0]}"
                )
            if t.shape[2] != heads_kv:
                raise ValueError(
                    f"{name} head count {t.shape[2]} must equal the k/v head count {heads_kv}"
                )
            if t.shape[3] != last:
                raise ValueError(
                    f"{name} head dim {t.shape[3]} must equal {last_name}={last} "
                    f"({'q/k' if name == 'additional_keys' else 'v'} head dim)"
                )
            check_same_dtype_and_device(q, "q", ((name, t),))
        if ak.shape[1] != av.shape[1]:
            raise ValueError(
                f"additional_keys and additional_values must have the same number of tokens "
                f"N_extra, got {ak.shape[1]} and {av.shape[1]}"
            )


def check_cuda_problem(q: torch.Tensor, v: torch.Tensor) -> None:
    """What the CUDA kernels take beyond the general rules: a CUDA build, float32/float16/
    bfloat16, and head dims that are multiples of 8 up to 256 (16-byte row copies)."""
    from .._cuda_driver import require_cuda_kernels

    require_cuda_kernels()
    if q.dtype == torch.float64:
        raise TypeError(
            "q dtype float64 has no CUDA kernel; use float32, float16 or bfloat16 on CUDA "
            "(float64 runs on the CPU)"
        )
    for name, dim in (("q", q.shape[-1]), ("v", v.shape[-1])):
        if dim % 8 != 0 or not 8 <= dim <= 256:
            raise ValueError(
                f"{name} head dim {dim} is not supported by the CUDA kernels: it must be a "
                "multiple of 8 between 8 and 256"
            )
