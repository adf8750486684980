"""Argument checks shared by the operator families.

Generic pieces only (what a neighborhood-attention call and a linear scan check alike):
tensors, bools, ints and int tuples, the dtype/device rules of a call and the softmax /
readout ``scale``. Each family's own rules (shapes, layouts, windows) stay in its
``args.py``.

Every error is a ``ValueError`` (``TypeError`` when an argument has the wrong Python
type) whose message starts with, or names, the offending argument.

Sizes read from tensors may be symbolic (``torch.SymInt``) inside ``torch.compile`` with
``dynamic=True``: :func:`as_int` and :func:`int_tuple` pass them through unchanged, so
comparisons on them become shape guards instead of graph breaks.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "as_int",
    "bool_tuple",
    "check_same_dtype_and_device",
    "check_supported_dtype",
    "int_tuple",
    "require_bool",
    "require_tensor",
    "resolve_scale",
]

# Floating dtypes every tokenmix operator takes (float64 on the CPU, for gradcheck).
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def require_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` itself if it is a tensor, else a ``TypeError`` naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def require_bool(x: Any, name: str) -> bool:
    """``x`` itself if it is a Python bool, else a ``TypeError`` naming ``name``."""
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__} ({x!r})")
    return x


def as_int(value: Any, name: str) -> int:
    """An int argument (anything with ``__index__``: int, numpy integers) as a Python int.

    Symbolic sizes (``torch.SymInt``, from ``q.shape`` under ``torch.compile(dynamic=True)``)
    are returned as they are. ``bool`` and tensors are refused: a bool as a size is almost
    always a bug, and a tensor value would be data-dependent.
    """
    # bool is an int subclass; passing True/False as a size is almost always a bug.
    if isinstance(value, bool):
        raise TypeError(f"{name} must contain ints, not bool (got {value!r})")
    # Plain ints as they are: inside torch.compile a symbolic size is seen as an int here,
    # and calling __index__ on it would break the graph. (A SymInt met outside Dynamo, e.g.
    # under make_fx, is passed through as well.)
    if type(value) is int or isinstance(value, torch.SymInt):
        return value  # type: ignore[return-value]
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must contain Python ints, not tensors")
    try:
        return int(value.__index__())
    except (AttributeError, TypeError):
        raise TypeError(
            f"{name} must be an int or a sequence of ints, got element of type "
            f"{type(value).__name__} ({value!r})"
        ) from None


def _per_dimension(value: Any, name: str, rank: int, kind: str) -> Sequence[Any] | None:
    """``value`` as a sequence of ``rank`` entries, or None for a single (broadcast) value."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be {kind} or a sequence of {rank} {kind}s, got {value!r}")
    if isinstance(value, Sequence):
        if len(value) != rank:
            raise ValueError(
                f"{name} must be {kind} or a sequence of length {rank} (one per spatial "
                f"dimension), got length {len(value)}: {tuple(value)!r}"
            )
        return value
    return None


def int_tuple(value: Any, name: str, rank: int) -> tuple[int, ...]:
    """An int (used for every dimension) or ``rank`` ints, as a tuple of ``rank`` ints."""
    seq = _per_dimension(value, name, rank, "an int")
    if seq is not None:
        return tuple(as_int(x, name) for x in seq)
    return (as_int(value, name),) * rank


def bool_tuple(value: Any, name: str, rank: int) -> tuple[bool, ...]:
    """A bool (used for every dimension) or ``rank`` bools, as a tuple of ``rank`` bools."""

    def one(x: Any) -> bool:
        if not isinstance(x, bool):
            raise TypeError(
                f"{name} must be a bool or a sequence of bools, got element of type "
                f"{type(x).__name__} ({x!r})"
            )
        return x

    seq = _per_dimension(value, name, rank, "a bool")
    if seq is not None:
        return tuple(one(x) for x in seq)
    return (one(value),) * rank


def resolve_scale(scale: Any, head_dim: Any) -> float:
    """``scale`` as a finite float; ``None`` means ``head_dim ** -0.5``.

    A real number is required (``int``, ``float``, numpy floats; not ``bool``, strings,
    tensors or complex numbers), and it must be finite: a nan or inf scale makes every
    output nan.
    """
    if scale is None:
        # int ** -0.5 is a float; a symbolic head dim (torch.compile(dynamic=True)) stays
        # symbolic instead of being specialized.
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.SymFloat)):
        raise TypeError(
            f"scale must be a Python float or None, got {type(scale).__name__} ({scale!r})"
        )
    if isinstance(scale, torch.SymFloat):
        return scale  # type: ignore[return-value]
    value = float(scale)
    # Not math.isfinite: inside torch.compile(dynamic=True) a float argument is symbolic, and
    # comparisons (false for nan) trace where math.isfinite cannot.
    if not -math.inf < value < math.inf:
        raise ValueError(f"scale must be finite, got {value}")
    return value


def check_supported_dtype(t: torch.Tensor, name: str) -> None:
    """``t``'s dtype is one of :data:`SUPPORTED_DTYPES`."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name} dtype {t.dtype} is not supported; expected one of "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
        )


def check_same_dtype_and_device(
    ref: torch.Tensor, ref_name: str, others: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Every ``(name, tensor)`` of ``others`` has ``ref``'s dtype and device."""
    for name, t in others:
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must match {ref_name} dtype {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} device {t.device} must match {ref_name} device {ref.device}")
