"""NATTEN 0.21's functional API on tokenmix's kernels: ``from tokenmix.compat import natten``.

``na1d``, ``na2d``, ``na3d``, ``attention``, ``merge_attentions`` and the layers
``NeighborhoodAttention1D/2D/3D`` take NATTEN 0.21.7's arguments (names, order, defaults) and
return what NATTEN returns, computed by :func:`tokenmix.neighborhood_attention` and
:func:`tokenmix.block_sparse_attention`, forward and backward, on the CPU and on CUDA.

Where NATTEN's semantics and tokenmix's own defaults differ, the shim follows NATTEN:

* ``scale`` is ``scale or head_dim ** -0.5`` (so ``0.0`` means the default, as in NATTEN);
* ``stride``, ``dilation`` and ``is_causal`` may be ``None`` (1, 1, ``False``);
* ``na1d/na2d/na3d`` dispatch on the rank of the tensors, not on their name;
* argument errors are NATTEN's kinds (``ValueError`` for window arguments and shapes,
  ``NotImplementedError`` for an unknown backend, ``TypeError`` for bad ``attention_kwargs``),
  raised where NATTEN raises them: ``attention_kwargs`` only where NATTEN passes it to
  ``attention`` (additional keys/values, or a window that is the whole input), the FNA
  kernel-choice arguments only where NATTEN runs an FNA kernel (not for such a window).

The arguments that choose NATTEN kernels (``backend``, tile shapes and sizes,
``backward_kv_splits``, ``backward_use_pt_reduction``, ``run_persistent_kernel``,
``kernel_schedule``, ``torch_compile``) are checked like NATTEN checks them and then ignored:
tokenmix runs its own kernels, and the result does not depend on them. Each one given with a
non-default value warns once per process (:class:`NattenCompatWarning`). What tokenmix cannot
compute (variable-length ``attention``, causal ``attention`` with ``seqlen_Q != seqlen_KV``,
fp8) raises ``NotImplementedError`` naming it. See docs/compat.md for the table.
"""

from __future__ import annotations

import enum
import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import SUPPORTED_DTYPES
from .._context_parallel import pick_operator
from ..block_sparse import BlockLayout, ElementMask, block_sparse_attention
from ..neighborhood import neighborhood_attention

__all__ = [
    "NattenCompatWarning",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "attention",
    "merge_attentions",
    "na1d",
    "na2d",
    "na3d",
]

# The NATTEN release whose API this module reproduces (tests/test_compat_natten.py compares
# the signatures with the installed natten).
_NATTEN_VERSION = "0.21.7"

Dimension1DType = tuple[int]
Dimension2DType = tuple[int, int]
Dimension3DType = tuple[int, int, int]
Dimension1DTypeOrDed = int | Dimension1DType
Dimension2DTypeOrDed = int | Dimension2DType
Dimension3DTypeOrDed = int | Dimension3DType
CausalArg1DTypeOrDed = bool | tuple[bool]
CausalArg2DTypeOrDed = bool | tuple[bool, bool]
CausalArg3DTypeOrDed = bool | tuple[bool, bool, bool]
# NATTEN's natten.types.KernelSchedule members are accepted too (matched by name).
KernelScheduleArg = str | enum.Enum | None

_FNA_BACKENDS = ("cutlass-fna", "hopper-fna", "blackwell-fna", "flex-fna")
_FMHA_BACKENDS = ("cutlass-fmha", "hopper-fmha", "blackwell-fmha", "flex-fmha")
_KERNEL_SCHEDULES = {
    "non": "NonPersistent",
    "coop": "WarpSpecializedCooperative",
    "pp": "WarpSpecializedPingpong",
}
# Arguments of attention() that na1d/na2d/na3d set themselves when NATTEN forwards
# attention_kwargs to it; NATTEN raises TypeError ("multiple values") for them.
_RESERVED_ATTENTION_KWARGS = ("query", "key", "value", "is_causal", "scale", "return_lse")
_VARLEN_ARGS = (
    "seqlens_Q",
    "seqlens_KV",
    "cumulative_seqlen_Q",
    "cumulative_seqlen_KV",
    "max_seqlen_Q",
    "max_seqlen_KV",
)


class NattenCompatWarning(UserWarning):
    """A NATTEN argument that selects NATTEN kernels was given and is ignored by tokenmix."""


_warned: set[str] = set()


def _ignored(name: str, value: Any, why: str, shown: str | None = None) -> None:
    """Warn once per process that argument ``name`` is ignored (``shown``: the value as the
    message writes it, default its repr)."""
    if name in _warned:
        return
    _warned.add(name)
    # Point the warning at the caller's line: the first frame outside this module.
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    text = repr(value) if shown is None else shown
    warnings.warn(
        f"tokenmix.compat.natten: {name}={text} is ignored: "
        f"{why} (this warning is shown once per argument; see docs/compat.md)",
        NattenCompatWarning,
        stacklevel=level,
    )


_KERNEL_CHOICE = "it selects NATTEN kernels, and tokenmix runs its own (the result is the same)"


# ---- argument checks (NATTEN's rules and error kinds) -------------------------------------


def _dims(value: Any, name: str, rank: int, minimum: int, none_is_one: bool) -> tuple[int, ...]:
    """An int or a sequence of ``rank`` ints, each ``>= minimum``, as a tuple (``ValueError``
    otherwise, as NATTEN)."""
    if value is None and none_is_one:
        return (1,) * rank
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == rank
        and all(isinstance(x, int) and x >= minimum for x in value)
    ):
        return tuple(int(x) for x in value)
    if isinstance(value, int) and value >= minimum:
        return (int(value),) * rank
    raise ValueError(
        f"Invalid value for `{name}`: expected an integer or a tuple of {rank} integers, all "
        f">= {minimum}, got {value!r}."
    )


def _causal(value: Any, rank: int) -> tuple[bool, ...]:
    if value is None:
        return (False,) * rank
    if isinstance(value, bool):
        return (value,) * rank
    if (
        isinstance(value, Sequence)
        and len(value) == rank
        and all(isinstance(c, bool) for c in value)
    ):
        return tuple(value)
    raise ValueError(
        f"Invalid value for `is_causal`: expected a bool or a tuple of {rank} bools, got {value!r}."
    )


def _check_common(
    query: Any, key: Any, value: Any, names: tuple[str, str, str] = ("query", "key", "value")
) -> None:
    tensors = (query, key, value)
    for name, t in zip(names, tensors, strict=True):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    listed = ", ".join(names)
    if any(t.is_sparse for t in tensors):
        raise NotImplementedError(
            f"tokenmix.compat.natten does not take sparse tensors ({listed})."
        )
    if any(t.is_nested for t in tensors):
        raise NotImplementedError(
            f"tokenmix.compat.natten does not take nested tensors ({listed})."
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"{listed} must be on the same device, got {query.device}, {key.device}, "
            f"{value.device}."
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"{listed} must have the same dtype, got {query.dtype}, {key.dtype}, {value.dtype}."
        )
    if query.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(
            f"tokenmix has no kernel for dtype {query.dtype} (it takes "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}); NATTEN's fp8 forward is not "
            "available in tokenmix."
        )


def _check_heads(query: Tensor, key: Tensor, value: Tensor) -> None:
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"key and value must have the same number of heads, got {key.shape[-2]} and "
            f"{value.shape[-2]}."
        )
    heads, heads_kv = query.shape[-2], key.shape[-2]
    if heads_kv < 1 or heads < heads_kv or heads % heads_kv != 0:
        raise ValueError(
            f"key/value heads must evenly divide query heads (GQA/MQA), got heads={heads}, "
            f"heads_kv={heads_kv}."
        )


def _check_na_tensors(query: Any, key: Any, value: Any) -> int:
    """NATTEN's checks of a neighborhood-attention call; returns the number of spatial dims."""
    _check_common(query, key, value)
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(
            f"query, key and value must have the same rank, got {query.dim()}, {key.dim()}, "
            f"{value.dim()}."
        )
    if query.dim() not in (4, 5, 6):
        raise ValueError(
            "expected 4-D, 5-D or 6-D tensors [batch, *token_layout, heads, head_dim] "
            f"(na1d, na2d, na3d), got query of shape {tuple(query.shape)}."
        )
    rank = query.dim() - 3
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key head dims must match, got {query.shape[-1]} and {key.shape[-1]}."
        )
    if not (query.shape[0] == key.shape[0] == value.shape[0]):
        raise ValueError(
            f"query, key and value must have the same batch size, got {query.shape[0]}, "
            f"{key.shape[0]}, {value.shape[0]}."
        )
    layout = tuple(query.shape[1 : rank + 1])
    if tuple(key.shape[1 : rank + 1]) != layout or tuple(value.shape[1 : rank + 1]) != layout:
        raise ValueError(
            "query, key and value must have the same token layout, got "
            f"{layout}, {tuple(key.shape[1 : rank + 1])}, {tuple(value.shape[1 : rank + 1])}."
        )
    _check_heads(query, key, value)
    return rank


def _check_additional_kv(
    query: Tensor, key: Tensor, value: Tensor, add_key: Any, add_value: Any
) -> None:
    if (add_key is None) != (add_value is None):
        raise ValueError(
            "`additional_keys` and `additional_values` must be either both Tensors or None."
        )
    if add_key is None:
        return
    _check_common(query, add_key, add_value, ("query", "additional_keys", "additional_values"))
    if add_key.dim() != 4 or add_value.dim() != 4:
        raise ValueError(
            "additional_keys and additional_values must be 4-D [batch, seqlen_kv, heads_kv, "
            f"head_dim], got shapes {tuple(add_key.shape)} and {tuple(add_value.shape)}."
        )
    if add_key.shape[0] != query.shape[0] or add_value.shape[0] != query.shape[0]:
        raise ValueError(
            "additional_keys and additional_values must have the batch size of query, got "
            f"{add_key.shape[0]}, {add_value.shape[0]} and {query.shape[0]}."
        )
    if add_key.shape[1] != add_value.shape[1]:
        raise ValueError(
            "additional_keys and additional_values must have the same number of tokens, got "
            f"{add_key.shape[1]} and {add_value.shape[1]}."
        )
    if add_key.shape[-2] != key.shape[-2] or add_value.shape[-2] != value.shape[-2]:
        raise ValueError(
            "additional_keys/values must have the number of heads of key/value, got "
            f"{add_key.shape[-2]}, {add_value.shape[-2]} and {key.shape[-2]}."
        )
    if add_key.shape[-1] != key.shape[-1] or add_value.shape[-1] != value.shape[-1]:
        raise ValueError(
            "additional_keys/values must have the head dims of key/value, got "
            f"{add_key.shape[-1]}, {add_value.shape[-1]} and {key.shape[-1]}, {value.shape[-1]}."
        )


def _check_kernel_schedule(kernel_schedule: Any) -> str | None:
    """NATTEN's choices (``"non"``, ``"coop"``, ``"pp"`` or a ``KernelSchedule`` member);
    returns the member's name, or None."""
    if kernel_schedule is None:
        return None
    if isinstance(kernel_schedule, enum.Enum) and type(kernel_schedule).__name__ == (
        "KernelSchedule"
    ):
        if kernel_schedule.name in _KERNEL_SCHEDULES.values():
            return kernel_schedule.name
    if isinstance(kernel_schedule, str) and kernel_schedule in _KERNEL_SCHEDULES:
        return _KERNEL_SCHEDULES[kernel_schedule]
    raise ValueError(
        f"Kernel schedule {kernel_schedule!r} is invalid (argument `kernel_schedule`); choices "
        "are None, 'non' (non-persistent), 'coop' (warp-specialized cooperative) and 'pp' "
        "(warp-specialized ping-ponging), or a natten.types.KernelSchedule."
    )


def _check_backend(backend: Any, choices: tuple[str, ...], name: str) -> None:
    if backend is None:
        return
    if not isinstance(backend, str) or backend not in choices:
        raise NotImplementedError(
            f"Unrecognized NATTEN backend {backend!r} (argument `{name}`); NATTEN 0.21 takes "
            f"None or one of {', '.join(repr(c) for c in choices)}."
        )
    _ignored(name, backend, _KERNEL_CHOICE)


def _check_tile_pair(
    q_tile: Any, kv_tile: Any, names: tuple[str, str], check: Callable[[Any, str], None]
) -> None:
    """A (query, key/value) tile pair: both or neither (every NATTEN backend's rule), each
    well formed; then ignored with a warning."""
    if q_tile is None and kv_tile is None:
        return
    if (q_tile is None) != (kv_tile is None):
        raise ValueError(
            f"Please specify both {names[0]} and {names[1]}, or neither one. Got "
            f"{names[0]}={q_tile!r}, {names[1]}={kv_tile!r}."
        )
    check(q_tile, names[0])
    check(kv_tile, names[1])
    _ignored(names[0], q_tile, "tile shapes tune NATTEN's kernels; tokenmix picks its own tiles")
    _ignored(names[1], kv_tile, "tile shapes tune NATTEN's kernels; tokenmix picks its own tiles")


def _check_common_knobs(
    backward_use_pt_reduction: Any,
    run_persistent_kernel: Any,
    kernel_schedule: Any,
    torch_compile: Any,
    prefix: str,
) -> None:
    if backward_use_pt_reduction:
        _ignored(
            f"{prefix}backward_use_pt_reduction",
            backward_use_pt_reduction,
            "it applies to NATTEN's CUTLASS backward; tokenmix's backward computes dO * O itself",
        )
    if not run_persistent_kernel:
        _ignored(
            f"{prefix}run_persistent_kernel",
            run_persistent_kernel,
            "it applies to NATTEN's Blackwell kernels only",
        )
    if kernel_schedule is not None:
        _ignored(
            f"{prefix}kernel_schedule",
            kernel_schedule,
            "it applies to NATTEN's Hopper kernels only",
        )
    if torch_compile:
        _ignored(
            f"{prefix}torch_compile",
            torch_compile,
            "it compiles NATTEN's Flex backend; tokenmix's kernels are compiled ahead of time "
            "and trace under torch.compile (compile your model instead)",
        )


def _check_tile_shape_for(rank: int) -> Callable[[Any, str], None]:
    def check(value: Any, name: str) -> None:
        if not (
            isinstance(value, Sequence)
            and len(value) == rank
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)
        ):
            raise ValueError(
                f"Invalid value for `{name}`: expected a tuple of {rank} positive integers, got "
                f"{value!r}."
            )

    return check


def _check_tile_size(value: Any, name: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"Invalid value for `{name}`: expected a positive integer, got {value!r}.")


def _check_fmha_options(
    *,
    backend: Any = None,
    q_tile_size: Any = None,
    kv_tile_size: Any = None,
    backward_q_tile_size: Any = None,
    backward_kv_tile_size: Any = None,
    backward_kv_splits: Any = None,
    backward_use_pt_reduction: Any = False,
    run_persistent_kernel: Any = True,
    kernel_schedule: Any = None,
    torch_compile: Any = False,
    prefix: str = "",
) -> None:
    """attention()'s kernel-choice arguments (also those given through ``attention_kwargs``)."""
    _check_kernel_schedule(kernel_schedule)
    _check_backend(backend, _FMHA_BACKENDS, f"{prefix}backend")
    _check_tile_pair(
        q_tile_size,
        kv_tile_size,
        (f"{prefix}q_tile_size", f"{prefix}kv_tile_size"),
        _check_tile_size,
    )
    _check_tile_pair(
        backward_q_tile_size,
        backward_kv_tile_size,
        (f"{prefix}backward_q_tile_size", f"{prefix}backward_kv_tile_size"),
        _check_tile_size,
    )
    if backward_kv_splits is not None:
        _check_tile_size(backward_kv_splits, f"{prefix}backward_kv_splits")
        _ignored(
            f"{prefix}backward_kv_splits",
            backward_kv_splits,
            "it applies to NATTEN's CUTLASS backward; tokenmix's backward does not split keys",
        )
    _check_common_knobs(
        backward_use_pt_reduction, run_persistent_kernel, kernel_schedule, torch_compile, prefix
    )


def _check_varlen(args: Mapping[str, Any], where: str) -> None:
    given = [
        name
        for name in _VARLEN_ARGS
        if args.get(name) is not None and not (name.startswith("max_") and args[name] == 0)
    ]
    if given:
        raise NotImplementedError(
            f"tokenmix.compat.natten.{where} does not implement variable-length (varlen) "
            f"attention ({', '.join(given)} given). tokenmix computes it with "
            "tokenmix.block_sparse_attention and tokenmix.ElementMask.document(q_doc, kv_doc) "
            "(docs/block_sparse_attention.md)."
        )


def _check_attention_kwargs(attention_kwargs: Any) -> None:
    """attention_kwargs where NATTEN passes them to attention(): ``**(attention_kwargs or {})``,
    so any falsy value means none, another non-mapping is a TypeError, and a key attention()
    does not take or na*d sets itself is a TypeError."""
    if not attention_kwargs:
        return
    if not isinstance(attention_kwargs, Mapping):
        raise TypeError(
            "attention_kwargs must be a dict of arguments to natten.attention or None, got "
            f"{type(attention_kwargs).__name__}."
        )
    allowed = set(_ATTENTION_PARAMETERS) - set(_RESERVED_ATTENTION_KWARGS)
    for name in attention_kwargs:
        if name in _RESERVED_ATTENTION_KWARGS:
            raise TypeError(
                f"attention_kwargs may not set {name!r}: na1d/na2d/na3d pass it to attention "
                "themselves (NATTEN raises this TypeError too)."
            )
        if name not in allowed:
            raise TypeError(
                f"attention_kwargs has an unexpected key {name!r}; natten.attention takes "
                f"{', '.join(sorted(allowed))}."
            )
    _check_varlen(attention_kwargs, "na1d/na2d/na3d (attention_kwargs)")
    options = {k: v for k, v in attention_kwargs.items() if k not in _VARLEN_ARGS}
    _check_fmha_options(**options, prefix="attention_kwargs.")


_UNUSED_ATTENTION_KWARGS = (
    "NATTEN passes it to natten.attention only with additional_keys/values or when the "
    "neighborhood is the whole input (its self-attention shortcut), so NATTEN ignores it in "
    "this call too"
)
_SHORTCUT = (
    "the neighborhood is the whole input, so NATTEN runs natten.attention (configured by "
    "attention_kwargs) and ignores this argument too"
)


def _is_self_attention(
    kernel: tuple[int, ...], causal: tuple[bool, ...], layout: tuple[int, ...], additional: bool
) -> bool:
    """NATTEN's test for its self-attention shortcut (natten.utils.checks.is_self_attention):
    1-D with ``kernel_size == seqlen`` and no additional tokens (causal or not), or a window
    that covers the input along every dimension without causal masking."""
    if len(layout) == 1 and not additional:
        return kernel[0] == layout[0]
    return all(k == n and not c for k, n, c in zip(kernel, layout, causal, strict=True))


def _describe_kwargs(attention_kwargs: Any) -> str:
    """attention_kwargs for a warning: its keys (values may be large tensors)."""
    if isinstance(attention_kwargs, Mapping):
        return "{" + ", ".join(f"{key!r}: ..." for key in attention_kwargs) + "}"
    return repr(attention_kwargs)


# ---- neighborhood attention ----------------------------------------------------------------


def _na_generic(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: Any,
    stride: Any,
    dilation: Any,
    is_causal: Any,
    scale: float | None,
    additional_keys: Tensor | None,
    additional_values: Tensor | None,
    attention_kwargs: dict | None,
    backend: str | None,
    q_tile_shape: Any,
    kv_tile_shape: Any,
    backward_q_tile_shape: Any,
    backward_kv_tile_shape: Any,
    backward_kv_splits: Any,
    backward_use_pt_reduction: bool,
    run_persistent_kernel: bool,
    kernel_schedule: Any,
    torch_compile: bool,
    return_lse: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    # NATTEN's order: tensors, additional tensors, kernel schedule, window arguments, window
    # against the input; then the kernel-choice arguments (checked by NATTEN's backends).
    rank = _check_na_tensors(query, key, value)
    _check_additional_kv(query, key, value, additional_keys, additional_values)
    _check_kernel_schedule(kernel_schedule)
    kernel = _dims(kernel_size, "kernel_size", rank, 2, none_is_one=False)
    strides = _dims(stride, "stride", rank, 1, none_is_one=True)
    dilations = _dims(dilation, "dilation", rank, 1, none_is_one=True)
    causal = _causal(is_causal, rank)
    layout = tuple(query.shape[1 : rank + 1])
    if any(k * d > n for k, d, n in zip(kernel, dilations, layout, strict=True)):
        raise ValueError(
            "The product of kernel size and dilation cannot be larger than the input size along "
            f"any dimension, got input size {layout}, kernel_size={kernel}, dilation={dilations}."
        )
    if any(s > k for s, k in zip(strides, kernel, strict=True)):
        raise ValueError(
            "Stride cannot be larger than kernel size along any dimension, got "
            f"kernel_size={kernel}, stride={strides}."
        )

    # NATTEN's self-attention shortcut (the window is the whole input) calls natten.attention
    # with attention_kwargs and never looks at the FNA kernel-choice arguments; otherwise it
    # checks those in its FNA backend, and passes attention_kwargs to natten.attention only
    # for the additional tokens. The shim raises where NATTEN raises: unused arguments are
    # accepted (and warned about, as ignored).
    additional = additional_keys is not None  # both or neither (checked above)
    shortcut = _is_self_attention(kernel, causal, layout, additional)
    if shortcut:
        fna_options = (
            ("backend", backend),
            ("q_tile_shape", q_tile_shape),
            ("kv_tile_shape", kv_tile_shape),
            ("backward_q_tile_shape", backward_q_tile_shape),
            ("backward_kv_tile_shape", backward_kv_tile_shape),
            ("backward_kv_splits", backward_kv_splits),
        )
        for name, option in fna_options:
            if option is not None:
                _ignored(name, option, _SHORTCUT)
    else:
        _check_backend(backend, _FNA_BACKENDS, "backend")
        check_shape = _check_tile_shape_for(rank)
        _check_tile_pair(
            q_tile_shape, kv_tile_shape, ("q_tile_shape", "kv_tile_shape"), check_shape
        )
        _check_tile_pair(
            backward_q_tile_shape,
            backward_kv_tile_shape,
            ("backward_q_tile_shape", "backward_kv_tile_shape"),
            check_shape,
        )
        if backward_kv_splits is not None:
            if not isinstance(backward_kv_splits, tuple):
                raise ValueError(
                    f"Invalid type {type(backward_kv_splits).__name__} for "
                    f"`backward_kv_splits`: expected a tuple of {rank} positive integers."
                )
            check_shape(backward_kv_splits, "backward_kv_splits")
            _ignored(
                "backward_kv_splits",
                backward_kv_splits,
                "it applies to NATTEN's CUTLASS backward; tokenmix's backward does not split keys",
            )
    _check_common_knobs(
        backward_use_pt_reduction, run_persistent_kernel, kernel_schedule, torch_compile, ""
    )
    if shortcut or additional:
        _check_attention_kwargs(attention_kwargs)
    elif attention_kwargs is not None and not (
        isinstance(attention_kwargs, Mapping) and not attention_kwargs
    ):
        _ignored(
            "attention_kwargs",
            attention_kwargs,
            _UNUSED_ATTENTION_KWARGS,
            shown=_describe_kwargs(attention_kwargs),
        )

    # The neighborhood and the additional tokens share one softmax in tokenmix (NATTEN merges
    # two attentions by their LSE: the same result). NATTEN's self-attention shortcut is the
    # same window, so the computation needs no special case.
    return neighborhood_attention(
        query,
        key,
        value,
        kernel,
        strides,
        dilations,
        causal,
        scale=scale or None,  # NATTEN: `scale or head_dim ** -0.5`
        additional_keys=additional_keys,
        additional_values=additional_values,
        return_lse=bool(return_lse),
    )


_NA_DOC = """Computes {rank}-D neighborhood attention (NATTEN 0.21's ``natten.na{rank}d``).

    ``query`` is ``[batch, {layout}, heads, head_dim]``, ``key`` ``[batch, {layout}, heads_kv,
    head_dim]`` and ``value`` ``[batch, {layout}, heads_kv, head_dim_v]`` (heads last; GQA/MQA
    when ``heads_kv`` divides ``heads``). ``kernel_size``, ``stride``, ``dilation`` and
    ``is_causal`` take one value or one per dimension, with NATTEN's meaning; ``scale`` defaults
    to ``head_dim ** -0.5`` (also when it is ``0``, as in NATTEN). ``additional_keys/values``
    (``[batch, seqlen_kv, heads_kv, head_dim(_v)]``) are attended by every query, in the same
    softmax. Returns the output ``[batch, {layout}, heads, head_dim_v]`` and, with
    ``return_lse=True``, the natural-log logsumexp ``[batch, {layout}, heads]`` (float32).

    ``attention_kwargs``, ``backend``, the tile shapes, ``backward_kv_splits``,
    ``backward_use_pt_reduction``, ``run_persistent_kernel``, ``kernel_schedule`` and
    ``torch_compile`` are validated as NATTEN validates them and then ignored (a one-time
    :class:`NattenCompatWarning` for each non-default value): tokenmix runs its own kernels.
    As in NATTEN, ``attention_kwargs`` is validated only with additional keys/values or when
    the neighborhood is the whole input (NATTEN's self-attention shortcut), and the tile
    shapes, ``backend`` and ``backward_kv_splits`` are not validated for such a window;
    otherwise they are accepted and ignored with the warning.
    Like NATTEN, the rank of the tensors decides the number of spatial dimensions.
    """


def na1d(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: Dimension1DTypeOrDed,
    stride: Dimension1DTypeOrDed = 1,
    dilation: Dimension1DTypeOrDed = 1,
    is_causal: CausalArg1DTypeOrDed | None = False,
    scale: float | None = None,
    additional_keys: Tensor | None = None,
    additional_values: Tensor | None = None,
    attention_kwargs: dict | None = None,
    backend: str | None = None,
    q_tile_shape: Dimension1DType | None = None,
    kv_tile_shape: Dimension1DType | None = None,
    backward_q_tile_shape: Dimension1DType | None = None,
    backward_kv_tile_shape: Dimension1DType | None = None,
    backward_kv_splits: Dimension1DType | None = None,
    backward_use_pt_reduction: bool = False,
    run_persistent_kernel: bool = True,
    kernel_schedule: KernelScheduleArg = None,
    torch_compile: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    return _na_generic(**locals())


def na2d(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: Dimension2DTypeOrDed,
    stride: Dimension2DTypeOrDed = 1,
    dilation: Dimension2DTypeOrDed = 1,
    is_causal: CausalArg2DTypeOrDed | None = False,
    scale: float | None = None,
    additional_keys: Tensor | None = None,
    additional_values: Tensor | None = None,
    attention_kwargs: dict | None = None,
    backend: str | None = None,
    q_tile_shape: Dimension2DType | None = None,
    kv_tile_shape: Dimension2DType | None = None,
    backward_q_tile_shape: Dimension2DType | None = None,
    backward_kv_tile_shape: Dimension2DType | None = None,
    backward_kv_splits: Dimension2DType | None = None,
    backward_use_pt_reduction: bool = False,
    run_persistent_kernel: bool = True,
    kernel_schedule: KernelScheduleArg = None,
    torch_compile: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    return _na_generic(**locals())


def na3d(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: Dimension3DTypeOrDed,
    stride: Dimension3DTypeOrDed = 1,
    dilation: Dimension3DTypeOrDed = 1,
    is_causal: CausalArg3DTypeOrDed | None = False,
    scale: float | None = None,
    additional_keys: Tensor | None = None,
    additional_values: Tensor | None = None,
    attention_kwargs: dict | None = None,
    backend: str | None = None,
    q_tile_shape: Dimension3DType | None = None,
    kv_tile_shape: Dimension3DType | None = None,
    backward_q_tile_shape: Dimension3DType | None = None,
    backward_kv_tile_shape: Dimension3DType | None = None,
    backward_kv_splits: Dimension3DType | None = None,
    backward_use_pt_reduction: bool = False,
    run_persistent_kernel: bool = True,
    kernel_schedule: KernelScheduleArg = None,
    torch_compile: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    return _na_generic(**locals())


na1d.__doc__ = _NA_DOC.format(rank=1, layout="seqlen")
na2d.__doc__ = _NA_DOC.format(rank=2, layout="X, Y")
na3d.__doc__ = _NA_DOC.format(rank=3, layout="X, Y, Z")


# ---- standard attention and merging --------------------------------------------------------


@torch.compiler.disable  # built eagerly (a graph break under torch.compile), then cached
@functools.lru_cache(maxsize=64)
def _dense_layout(q_len: int, kv_len: int, causal: bool, device: str) -> BlockLayout:
    rule = ElementMask.causal() if causal else ElementMask()
    layout = BlockLayout.from_element_mask(rule, q_len, kv_len, block_size=64)
    return layout if device == "cpu" else layout.to(device)


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    seqlens_Q: Tensor | None = None,
    seqlens_KV: Tensor | None = None,
    cumulative_seqlen_Q: Tensor | None = None,
    cumulative_seqlen_KV: Tensor | None = None,
    max_seqlen_Q: int | None = None,
    max_seqlen_KV: int | None = None,
    backend: str | None = None,
    q_tile_size: int | None = None,
    kv_tile_size: int | None = None,
    backward_q_tile_size: int | None = None,
    backward_kv_tile_size: int | None = None,
    backward_kv_splits: int | None = None,
    backward_use_pt_reduction: bool = False,
    run_persistent_kernel: bool = True,
    kernel_schedule: KernelScheduleArg = None,
    torch_compile: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Standard dot-product attention (NATTEN 0.21's ``natten.attention``).

    ``query`` is ``[batch, seqlen, heads, head_dim]``, ``key`` ``[batch, seqlen_kv, heads_kv,
    head_dim]``, ``value`` ``[batch, seqlen_kv, heads_kv, head_dim_v]`` (GQA/MQA when
    ``heads_kv`` divides ``heads``); ``scale`` defaults to ``head_dim ** -0.5`` (also when
    ``0``). Returns the output ``[batch, seqlen, heads, head_dim_v]`` and, with
    ``return_lse=True``, the float32 logsumexp ``[batch, seqlen, heads]``. Computed by
    :func:`tokenmix.block_sparse_attention` with every block kept.

    ``is_causal=True`` needs ``seqlen == seqlen_kv`` (query ``i`` sees keys ``<= i``); with
    other lengths NATTEN's alignment is backend-specific and this raises
    ``NotImplementedError``, as do the varlen arguments. The kernel-choice arguments are
    validated and ignored as in :func:`na1d`.
    """
    _check_common(query, key, value)
    if not (query.dim() == key.dim() == value.dim() == 4):
        raise ValueError(
            "expected 4-D tensors [batch, seqlen, heads, head_dim] as inputs to attention, got "
            f"shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key head dims must match, got {query.shape[-1]} and {key.shape[-1]}."
        )
    if not (query.shape[0] == key.shape[0] == value.shape[0]):
        raise ValueError(
            f"query, key and value must have the same batch size, got {query.shape[0]}, "
            f"{key.shape[0]}, {value.shape[0]}."
        )
    if key.shape[1] != value.shape[1]:
        raise ValueError(
            f"key and value must have the same sequence length, got {key.shape[1]} and "
            f"{value.shape[1]}."
        )
    _check_heads(query, key, value)
    _check_varlen(locals(), "attention")
    _check_fmha_options(
        backend=backend,
        q_tile_size=q_tile_size,
        kv_tile_size=kv_tile_size,
        backward_q_tile_size=backward_q_tile_size,
        backward_kv_tile_size=backward_kv_tile_size,
        backward_kv_splits=backward_kv_splits,
        backward_use_pt_reduction=backward_use_pt_reduction,
        run_persistent_kernel=run_persistent_kernel,
        kernel_schedule=kernel_schedule,
        torch_compile=torch_compile,
    )
    q_len, kv_len = int(query.shape[1]), int(key.shape[1])
    if is_causal and q_len != kv_len:
        raise NotImplementedError(
            f"tokenmix.compat.natten.attention: is_causal=True with seqlen {q_len} != seqlen_kv "
            f"{kv_len} is not implemented (NATTEN's diagonal alignment for unequal lengths "
            "depends on its backend); pass a tokenmix.ElementMask.causal(offset) layout to "
            "tokenmix.block_sparse_attention to choose the alignment."
        )
    layout = _dense_layout(q_len, kv_len, bool(is_causal), str(query.device))
    return block_sparse_attention(
        query, key, value, layout, scale=scale or None, return_lse=bool(return_lse)
    )


_ATTENTION_PARAMETERS = tuple(inspect.signature(attention).parameters)


def merge_attentions(
    outputs: list[Tensor],
    lse_tensors: list[Tensor],
    torch_compile: bool = True,
    use_autograd_fix: bool = True,
) -> tuple[Tensor, Tensor]:
    """Merges attention outputs of one query over disjoint key sets, as if the keys had been
    concatenated (NATTEN 0.21's ``natten.merge_attentions``).

    ``outputs`` are ``[batch, seqlen, heads, head_dim]`` tensors and ``lse_tensors`` their
    natural-log logsumexps ``[batch, seqlen, heads]``. Returns the merged output (the dtype of
    ``outputs[0]``) and the float32 merged logsumexp. Rows where every input LSE is ``-inf``
    (nothing attended) get output 0 and LSE ``-inf``.

    Gradients flow through plain autograd, which is exact for tokenmix's attention functions
    (their LSE is differentiable), so ``use_autograd_fix`` (NATTEN's workaround for its fused
    kernels) and ``torch_compile`` (fusing the elementwise math) are accepted and ignored.
    """
    if len(outputs) < 2:
        raise ValueError("`merge_attentions` expects at least two tensors.")
    if len(outputs) != len(lse_tensors):
        raise ValueError(
            "`merge_attentions` expected number of outputs and LSE tensors to match, got "
            f"{len(outputs)} != {len(lse_tensors)}."
        )
    shape = outputs[0].shape
    for i, (out, lse) in enumerate(zip(outputs, lse_tensors, strict=True)):
        if out.dim() != 4:
            raise ValueError(
                "Output tensors must be rank-4 tensors with (batch, seq, heads, dim), but got "
                f"output {i} with rank={out.dim()}."
            )
        if out.shape != shape:
            raise ValueError(
                f"Output tensors must match in shape, but got output {i} with shape "
                f"{tuple(out.shape)} (output 0: {tuple(shape)})."
            )
        if lse.dim() != 3 or lse.shape != shape[:3]:
            raise ValueError(
                "LSE tensors must be rank-3 tensors (batch, seq, heads) matching the outputs, "
                f"but got LSE {i} with shape {tuple(lse.shape)} (outputs: {tuple(shape)})."
            )
    lse = torch.stack([x.float() for x in lse_tensors])
    merged_lse = torch.logsumexp(lse, dim=0)
    # exp(lse_i - merged) are the weights; a row with merged == -inf attended nothing.
    shift = merged_lse.masked_fill(merged_lse == float("-inf"), 0.0)
    weights = torch.exp(lse - shift).unsqueeze(-1)
    merged = weights[0] * outputs[0].float()
    for w, out in zip(weights[1:], outputs[1:], strict=True):
        merged = merged + w * out.float()
    return merged.to(outputs[0].dtype), merged_lse


# ---- layers --------------------------------------------------------------------------------


class _NeighborhoodAttentionND(nn.Module):
    """NATTEN 0.21's ``NeighborhoodAttention{1,2,3}D``: a fused qkv projection, neighborhood
    attention and an output projection, with NATTEN's parameter names (``qkv``, ``proj``), so
    a NATTEN state dict loads as it is."""

    na_dim: int

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kernel_size: Any,
        stride: Any = 1,
        dilation: Any = 1,
        is_causal: Any = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        rank = self.na_dim
        self.kernel_size = _dims(kernel_size, "kernel_size", rank, 2, none_is_one=False)
        self.stride = _dims(stride, "stride", rank, 1, none_is_one=True)
        self.dilation = _dims(dilation, "dilation", rank, 1, none_is_one=True)
        self.is_causal = _causal(is_causal, rank)
        if embed_dim % num_heads != 0:
            raise ValueError(
                "Number of attention heads must evenly divide embedding dimension, got "
                f"embed_dim={embed_dim}, num_heads={num_heads}."
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.expected_input_tensor_rank = rank + 2
        self.qkv = nn.Linear(embed_dim, embed_dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` is ``[batch, *token_layout, embed_dim]``; returns the same shape."""
        if x.dim() != self.expected_input_tensor_rank:
            raise ValueError(
                f"NeighborhoodAttention{self.na_dim}D expected a tensor of rank "
                f"{self.expected_input_tensor_rank} [batch, *token_layout, embed_dim], got "
                f"shape {tuple(x.shape)}."
            )
        batch, *layout, channels = x.shape
        if channels != self.embed_dim:
            raise ValueError(
                f"Expected embedding dimension {self.embed_dim}, got {channels} "
                f"(shape {tuple(x.shape)})."
            )
        qkv = self.qkv(x).reshape(batch, *layout, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=self.na_dim + 1)
        attend = pick_operator(self, neighborhood_attention, "neighborhood_attention")
        out = attend(
            q,
            k,
            v,
            self.kernel_size,
            self.stride,
            self.dilation,
            self.is_causal,
            scale=self.scale,
        )
        return self.proj_drop(self.proj(out.reshape(batch, *layout, channels)))

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_heads={self.num_heads}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dilation={self.dilation}, is_causal={self.is_causal}"
        )


class NeighborhoodAttention1D(_NeighborhoodAttentionND):
    """1-D neighborhood attention layer with NATTEN 0.21's arguments and parameter names."""

    na_dim = 1

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kernel_size: Dimension1DTypeOrDed,
        stride: Dimension1DTypeOrDed = 1,
        dilation: Dimension1DTypeOrDed = 1,
        is_causal: CausalArg1DTypeOrDed = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            kernel_size,
            stride,
            dilation,
            is_causal,
            qkv_bias,
            qk_scale,
            proj_drop,
        )


class NeighborhoodAttention2D(_NeighborhoodAttentionND):
    """2-D neighborhood attention layer with NATTEN 0.21's arguments and parameter names."""

    na_dim = 2

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kernel_size: Dimension2DTypeOrDed,
        stride: Dimension2DTypeOrDed = 1,
        dilation: Dimension2DTypeOrDed = 1,
        is_causal: CausalArg2DTypeOrDed = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            kernel_size,
            stride,
            dilation,
            is_causal,
            qkv_bias,
            qk_scale,
            proj_drop,
        )


class NeighborhoodAttention3D(_NeighborhoodAttentionND):
    """3-D neighborhood attention layer with NATTEN 0.21's arguments and parameter names."""

    na_dim = 3

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kernel_size: Dimension3DTypeOrDed,
        stride: Dimension3DTypeOrDed = 1,
        dilation: Dimension3DTypeOrDed = 1,
        is_causal: CausalArg3DTypeOrDed = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            kernel_size,
            stride,
            dilation,
            is_causal,
            qkv_bias,
            qk_scale,
            proj_drop,
        )
