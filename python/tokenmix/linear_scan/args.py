"""Argument validation for the linear-attention family (linear attention, RetNet,
simple GLA / Mamba2 SSD, GLA, (gated) delta rule).

Entry points:

* :func:`check_linear_attention` validates a :func:`~tokenmix.linear_scan.linear_attention`
  call, :func:`check_delta_rule` a :func:`~tokenmix.linear_scan.delta_rule` call.
* :func:`check_step` validates the single-token decode steps.
* :func:`check_cu_seqlens`, :func:`check_state`, :func:`resolve_scale` are the shared
  pieces.

Layout (heads last)::

    q, k          [B, T, H, K]
    v             [B, T, H, V]
    g             [B, T, H]        scalar log decay per token (simple GLA, Mamba2)
    g_gamma       [H]              fixed log decay per head (RetNet)
    gk            [B, T, H, K]     per-key log gates (GLA)
    beta          [B, T, H]        delta-rule writing strength
    initial_state [N, H, K, V]     N = B, or the number of sequences with cu_seqlens
    cu_seqlens    [N + 1]          int32 / int64 offsets into T (needs B == 1)

Dtype rules: ``q``, ``k`` and ``v`` share one dtype (float32, float64, float16 or
bfloat16). The auxiliary tensors (``g``, ``g_gamma``, ``gk``, ``beta``,
``initial_state``) are either in ``q``'s dtype or float32; everything is computed in
float32 (float64 for float64 inputs). All tensors must be on ``q``'s device.

Values are not checked (that would need the data, which meta tensors and compiled
graphs do not have): log decays may be any value, ``-inf`` included (an exact reset,
decay 0), and non-finite values propagate as in the recurrence, never to earlier
tokens.

Empty batches (``B == 0``) and empty sequences (``T == 0``, without ``cu_seqlens``)
are valid: the output is empty and the final state is the initial state.

Every error is a ``ValueError`` (``TypeError`` when an argument has the wrong Python
type) whose message names the offending argument.
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import (
    SUPPORTED_DTYPES,
    check_same_dtype_and_device,
    check_supported_dtype,
    require_bool,
    require_tensor,
    resolve_scale,
)
from .._utils import accumulation_dtype

__all__ = [
    "SUPPORTED_DTYPES",
    "accumulation_dtype",
    "check_cu_seqlens",
    "check_delta_rule",
    "check_linear_attention",
    "check_state",
    "check_step",
    "resolve_scale",
]


def _check_aux(t: Any, name: str, q: torch.Tensor, shape: tuple[int, ...], layout: str) -> None:
    """An auxiliary tensor: exact shape, dtype in (q.dtype, float32), q's device."""
    require_tensor(t, name)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {tuple(t.shape)}")
    if t.dtype not in (q.dtype, torch.float32):
        raise ValueError(f"{name} dtype {t.dtype} must be q's dtype ({q.dtype}) or torch.float32")
    if t.device != q.device:
        raise ValueError(f"{name} device {t.device} must match q device {q.device}")


def _check_qkv(q: Any, k: Any, v: Any) -> tuple[int, int, int, int, int]:
    require_tensor(q, "q")
    require_tensor(k, "k")
    require_tensor(v, "v")
    for name, t, layout in (("q", q, "[B, T, H, K]"), ("k", k, "[B, T, H, K]")):
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor {layout}, got shape {tuple(t.shape)}")
    if v.dim() != 4:
        raise ValueError(f"v must be a 4-D tensor [B, T, H, V], got shape {tuple(v.shape)}")
    batch, seq, heads, dim_k = q.shape
    if min(heads, dim_k) < 1:
        raise ValueError(f"q must have H and K >= 1, got shape {tuple(q.shape)}")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(
            f"k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)} ([B, T, H, K])"
        )
    if tuple(v.shape[:3]) != (batch, seq, heads):
        raise ValueError(
            f"v batch/time/head shape {tuple(v.shape[:3])} must match q's {(batch, seq, heads)} "
            f"(q shape {tuple(q.shape)}, v shape {tuple(v.shape)})"
        )
    dim_v = v.shape[3]
    if dim_v < 1:
        raise ValueError(f"v head dim V must be >= 1, got shape {tuple(v.shape)}")
    check_supported_dtype(q, "q")
    check_same_dtype_and_device(q, "q", (("k", k), ("v", v)))
    return batch, seq, heads, dim_k, dim_v


def check_cu_seqlens(
    cu_seqlens: Any, batch: int, seq: int, device: torch.device
) -> list[int] | None:
    """Validate FlashAttention-style ``cu_seqlens`` and return its values as a list.

    ``cu_seqlens`` is a 1-D int32/int64 tensor ``[N + 1]`` on ``q``'s device with
    ``cu_seqlens[0] == 0``, strictly increasing values (every sequence holds at least
    one token) and ``cu_seqlens[-1] == T``; the batch size must be 1. Sequence ``i``
    is the token range ``[cu_seqlens[i], cu_seqlens[i + 1])``.
    """
    require_tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D tensor [N + 1] with N >= 1 sequences, got shape "
            f"{tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens device {cu_seqlens.device} must match q device {device}")
    if batch != 1:
        raise ValueError(
            f"with cu_seqlens the batch size must be 1 (sequences are packed along T), got "
            f"B={batch}"
        )
    if torch.compiler.is_compiling():
        # Values are data: inside a compiled graph they are checked at run time by
        # device-side asserts (no host synchronization; a RuntimeError), since the
        # CUDA ops do not read them on the host (the CPU ops also check them).
        first_ok = cu_seqlens[0] == 0
        torch._assert_async(first_ok, "tokenmix: cu_seqlens must start at 0")
        torch._assert_async(cu_seqlens[-1] == seq, "tokenmix: cu_seqlens must end at T")
        increasing = (cu_seqlens[1:] > cu_seqlens[:-1]).all()
        torch._assert_async(increasing, "tokenmix: cu_seqlens must be strictly increasing")
        return None
    offsets = [int(x) for x in cu_seqlens.tolist()]
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]} (cu_seqlens={offsets})")
    for i in range(len(offsets) - 1):
        if offsets[i + 1] <= offsets[i]:
            raise ValueError(
                f"cu_seqlens must be strictly increasing (no empty sequences), got "
                f"cu_seqlens[{i}]={offsets[i]} >= cu_seqlens[{i + 1}]={offsets[i + 1]}"
            )
    if offsets[-1] != seq:
        raise ValueError(
            f"cu_seqlens must end at T={seq} (the sequence length of q), got {offsets[-1]}"
        )
    return offsets


def check_state(
    state: Any,
    name: str,
    q: torch.Tensor,
    num_states: int,
    heads: int,
    dim_k: int,
    dim_v: int,
) -> None:
    """A recurrent state ``[N, H, K, V]`` in q's dtype or float32, on q's device."""
    _check_aux(
        state,
        name,
        q,
        (num_states, heads, dim_k, dim_v),
        "[N, H, K, V] (N = B, or the number of sequences with cu_seqlens)",
    )


def _check_decays(
    q: torch.Tensor,
    g: Any,
    g_gamma: Any,
    gk: Any,
    batch: int,
    seq: int,
    heads: int,
    dim_k: int,
) -> None:
    given = [n for n, t in (("g", g), ("g_gamma", g_gamma), ("gk", gk)) if t is not None]
    if len(given) > 1:
        raise ValueError(
            f"at most one of g, g_gamma and gk may be given, got {' and '.join(given)}"
        )
    if g is not None:
        _check_aux(g, "g", q, (batch, seq, heads), "[B, T, H]")
    if g_gamma is not None:
        _check_aux(g_gamma, "g_gamma", q, (heads,), "[H]")
    if gk is not None:
        _check_aux(gk, "gk", q, (batch, seq, heads, dim_k), "[B, T, H, K]")


def _check_sequences(
    q: torch.Tensor, cu_seqlens: Any, initial_state: Any, state_v: int
) -> list[int] | None:
    """Checks ``cu_seqlens`` and the initial state (``[N, H, K, state_v]``, N the
    number of sequences); returns the offsets as a list (None without them, or
    inside a compiled graph)."""
    batch, seq, heads, dim_k = q.shape
    offsets = None
    if cu_seqlens is not None:
        offsets = check_cu_seqlens(cu_seqlens, batch, seq, q.device)
    num_states = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None:
        check_state(initial_state, "initial_state", q, num_states, heads, dim_k, state_v)
    return offsets


def check_linear_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    g: Any = None,
    g_gamma: Any = None,
    gk: Any = None,
    scale: Any = None,
    initial_state: Any = None,
    output_final_state: Any = False,
    cu_seqlens: Any = None,
    normalize: Any = False,
    causal: Any = True,
) -> tuple[float, list[int] | None]:
    """Validate a linear-attention call; returns ``(scale, offsets)``.

    ``offsets`` is ``cu_seqlens`` as a Python list (None without ``cu_seqlens``).
    Besides shapes, dtypes and devices (module docstring) this enforces: at most one
    of ``g`` / ``g_gamma`` / ``gk``; ``causal=False`` only without any decay;
    with ``normalize=True`` the state is ``[N, H, K, V + 1]`` (its last column is the
    decayed key sum the normalizer needs).
    """
    batch, seq, heads, dim_k, dim_v = _check_qkv(q, k, v)
    require_bool(output_final_state, "output_final_state")
    require_bool(normalize, "normalize")
    require_bool(causal, "causal")
    _check_decays(q, g, g_gamma, gk, batch, seq, heads, dim_k)
    if not causal and (g is not None or g_gamma is not None or gk is not None):
        raise ValueError(
            "causal=False (bidirectional) is only defined for undecayed linear attention; "
            "drop g / g_gamma / gk or use causal=True"
        )
    # A normalized scan's state carries the decayed key sum as an extra value
    # column: [N, H, K, V + 1].
    state_v = dim_v + 1 if normalize else dim_v
    offsets = _check_sequences(q, cu_seqlens, initial_state, state_v)
    if cu_seqlens is not None and offsets is None and not causal:
        raise ValueError(
            "causal=False with cu_seqlens is not supported under torch.compile (the "
            "bidirectional form splits the batch by the offsets' values)"
        )
    return resolve_scale(scale, dim_k), offsets


def check_delta_rule(
    q: Any,
    k: Any,
    v: Any,
    beta: Any,
    *,
    g: Any = None,
    scale: Any = None,
    initial_state: Any = None,
    output_final_state: Any = False,
    cu_seqlens: Any = None,
) -> tuple[float, list[int] | None]:
    """Validate a (gated) delta-rule call; returns ``(scale, offsets)``."""
    batch, seq, heads, dim_k, dim_v = _check_qkv(q, k, v)
    require_bool(output_final_state, "output_final_state")
    if beta is None:
        raise TypeError("beta must be a torch.Tensor [B, T, H], got None")
    _check_aux(beta, "beta", q, (batch, seq, heads), "[B, T, H]")
    if g is not None:
        _check_aux(g, "g", q, (batch, seq, heads), "[B, T, H]")
    offsets = _check_sequences(q, cu_seqlens, initial_state, dim_v)
    return resolve_scale(scale, dim_k), offsets


def check_step(
    q: Any,
    k: Any,
    v: Any,
    state: Any,
    *,
    g: Any = None,
    g_gamma: Any = None,
    gk: Any = None,
    beta: Any = None,
    scale: Any = None,
    needs_beta: bool = False,
    normalize: bool = False,
) -> float:
    """Validate a single-token decode step; returns the scale.

    ``q``, ``k`` are ``[N, H, K]``, ``v`` is ``[N, H, V]``, ``state`` is
    ``[N, H, K, V]`` (or None for zeros), ``g`` / ``beta`` are ``[N, H]``, ``gk`` is
    ``[N, H, K]`` and ``g_gamma`` is ``[H]``.
    """
    require_tensor(q, "q")
    require_tensor(k, "k")
    require_tensor(v, "v")
    for name, t, layout in (("q", q, "[N, H, K]"), ("k", k, "[N, H, K]"), ("v", v, "[N, H, V]")):
        if t.dim() != 3:
            raise ValueError(
                f"{name} must be a 3-D tensor {layout} (one token per sequence), got shape "
                f"{tuple(t.shape)}"
            )
    num, heads, dim_k = q.shape
    if min(heads, dim_k) < 1:
        raise ValueError(f"q must have H and K >= 1, got shape {tuple(q.shape)}")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)}")
    if tuple(v.shape[:2]) != (num, heads) or v.shape[2] < 1:
        raise ValueError(
            f"v must have shape [N, H, V] = [{num}, {heads}, V >= 1], got {tuple(v.shape)}"
        )
    dim_v = v.shape[2]
    check_supported_dtype(q, "q")
    check_same_dtype_and_device(q, "q", (("k", k), ("v", v)))
    if state is not None:
        if normalize:
            _check_aux(state, "state", q, (num, heads, dim_k, dim_v + 1), "[N, H, K, V + 1]")
        else:
            _check_aux(state, "state", q, (num, heads, dim_k, dim_v), "[N, H, K, V]")
    given = [n for n, t in (("g", g), ("g_gamma", g_gamma), ("gk", gk)) if t is not None]
    if len(given) > 1:
        raise ValueError(
            f"at most one of g, g_gamma and gk may be given, got {' and '.join(given)}"
        )
    if g is not None:
        _check_aux(g, "g", q, (num, heads), "[N, H]")
    if g_gamma is not None:
        _check_aux(g_gamma, "g_gamma", q, (heads,), "[H]")
    if gk is not None:
        _check_aux(gk, "gk", q, (num, heads, dim_k), "[N, H, K]")
    if needs_beta:
        if beta is None:
            raise TypeError("beta must be a torch.Tensor [N, H], got None")
        _check_aux(beta, "beta", q, (num, heads), "[N, H]")
    return resolve_scale(scale, dim_k)
