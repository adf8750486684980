"""flash-linear-attention 0.6 op functions computed by tokenmix's linear scans.

``from tokenmix.compat import fla`` gives the ``chunk_*`` and ``fused_recurrent_*``
functions of ``fla.ops`` (fla-core 0.6.0) for linear attention, simple GLA, GLA, the
delta rule and the gated delta rule, with fla's argument names, order, defaults and
return conventions. Everything runs in :func:`tokenmix.linear_attention` and
:func:`tokenmix.delta_rule` (tokenmix's fused CPU kernels, or the chunked PyTorch
implementation on other devices); this module only translates conventions:

* inputs are ``[B, T, H, ...]`` (fla 0.6 removed ``head_first``), states ``[N, H, K, V]``
  (``[N, H, V, K]`` with ``state_v_first=True``); ``o`` has q's dtype, final states are
  float32 (float64 for float64 inputs);
* ``g``, ``g_gamma``, ``gk``, ``gv`` are log decays, as in fla and tokenmix;
* ``reverse=True`` runs the scan from the last token of every sequence to its first
  (the inputs are flipped along time, per packed sequence);
* normalized linear attention keeps fla's ``(kv_state, z_state)`` pair, with
  ``z_state`` ``[N, 1, H, K]``;
* ``cu_seqlens`` may contain empty sequences (their final state is their initial state);
* the in-kernel options of the delta rules (``use_qk_l2norm_in_kernel``,
  ``use_beta_sigmoid_in_kernel``, ``allow_neg_eigval``, ``use_gate_in_kernel`` with
  ``A_log`` / ``dt_bias``) are applied in PyTorch before the scan, differentiably;
* per-value gates ``gv`` and per-value ``beta`` ``[B, T, H, V]`` are exact: every value
  column of the state is an independent recurrence, so the scan runs over ``H * V``
  heads with one value column each (which costs about ``V`` times the work of the
  per-head form on the ``K`` side).

What tokenmix cannot express raises ``NotImplementedError`` naming the argument: a
per-key decay ``gk`` in the gated delta rule, ``cp_context`` (context parallelism).
Arguments that are pure performance hints (``cu_seqlens_cpu``, ``chunk_indices``, the
``chunk_size`` keyword) are validated as fla validates them and otherwise ignored.
Unknown keyword arguments of the functions that take ``**kwargs`` in fla are ignored, as fla
ignores them, with a :class:`FlaCompatWarning` once per argument name.
See docs/compat.md for the full table of conventions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..linear_scan import delta_rule as _tm_delta_rule
from ..linear_scan import linear_attention as _tm_linear_attention

__all__ = [
    "FlaCompatWarning",
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "chunk_gdn",
    "chunk_gla",
    "chunk_linear_attn",
    "chunk_simple_gla",
    "fused_recurrent_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gdn",
    "fused_recurrent_gla",
    "fused_recurrent_linear_attn",
    "fused_recurrent_simple_gla",
]

_HEAD_FIRST_REMOVED = "head_first has been removed. Inputs must be in `[B, T, H, ...]` format."

# One scan call: (q, k, v, per-token tensors, initial_state, output_final_state, cu_seqlens)
# -> (o, final_state or None), all in tokenmix's conventions.
_Scan = Callable[..., tuple[Tensor, Tensor | None]]


# --------------------------------------------------------------------------- helpers


def _acc(q: Tensor) -> torch.dtype:
    """tokenmix's accumulation dtype for q: float64 for float64 inputs, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _cast(t: Tensor | None, q: Tensor) -> Tensor | None:
    """Gates, betas and states in the accumulation dtype (fla reads them in any float
    dtype; tokenmix accepts q's dtype or float32). Differentiable."""
    if t is None or not isinstance(t, Tensor):
        return t
    return t.to(_acc(q))


class FlaCompatWarning(UserWarning):
    """A keyword argument that fla 0.6 takes through ``**kwargs`` and ignores was given; the
    shim ignores it too."""


_warned: set[str] = set()


def _ignore_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """The keywords left in ``kwargs`` once the known ones are popped: fla's function ``name``
    ignores them (it takes ``**kwargs``), so the shim ignores them too, warning once per
    argument name (a misspelt option would otherwise go unnoticed)."""
    for arg in sorted(set(kwargs) - _warned):
        _warned.add(arg)
        warnings.warn(
            f"tokenmix.compat.fla: {name}() got the unknown keyword argument {arg!r}; it is "
            f"ignored, as fla 0.6's {name} ignores it too (it takes **kwargs). This warning is "
            "shown once per argument name.",
            FlaCompatWarning,
            stacklevel=3,
        )


def _state_v_first(state_v_first: bool, kwargs: dict[str, Any]) -> bool:
    """fla's deprecated alias ``transpose_state_layout`` for ``state_v_first``."""
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError(
                "Cannot pass both `state_v_first` and the deprecated `transpose_state_layout`."
            )
        warnings.warn(
            "`transpose_state_layout` is deprecated and renamed to `state_v_first`.",
            DeprecationWarning,
            stacklevel=3,
        )
        state_v_first = bool(kwargs.pop("transpose_state_layout"))
    return state_v_first


def _head_first(kwargs: dict[str, Any], *, always: bool) -> None:
    """fla 0.6 raises ``DeprecationWarning`` for ``head_first`` in the chunk functions
    (``always``); the fused_recurrent ones ignore it, which would silently misread
    head-first inputs, so here ``head_first=True`` raises there too."""
    if "head_first" in kwargs:
        value = kwargs.pop("head_first")
        if always or value:
            raise DeprecationWarning(_HEAD_FIRST_REMOVED)


def _chunk_size(kwargs: dict[str, Any], allowed: tuple[int, ...] | None) -> None:
    """The ``chunk_size`` keyword: validated like fla (a power of 2, or one of
    ``allowed``), then ignored (tokenmix picks its own chunking; results agree to
    rounding)."""
    if "chunk_size" not in kwargs:
        return
    size = kwargs.pop("chunk_size")
    if allowed is None:
        if size is not None and (
            not isinstance(size, int) or size < 1 or size != 2 ** (size.bit_length() - 1)
        ):
            raise ValueError(f"`chunk_size` must be a power of 2, got {size}.")
    elif size not in allowed:
        raise ValueError(
            f"`chunk_size` must be {', '.join(map(str, allowed[:-1]))}, or {allowed[-1]}, "
            f"got {size}."
        )


def _no_cp(cp_context: Any) -> None:
    if cp_context is not None:
        raise NotImplementedError(
            "cp_context (context-parallel execution across devices) is not supported by "
            "tokenmix.compat.fla; pass cp_context=None"
        )


def _to_internal_state(state: Tensor | None, state_v_first: bool) -> Tensor | None:
    if state is None or not state_v_first:
        return state
    return state.transpose(-1, -2)


def _from_internal_state(state: Tensor | None, state_v_first: bool) -> Tensor | None:
    if state is None or not state_v_first:
        return state
    return state.transpose(-1, -2).contiguous()


def _l2norm(x: Tensor) -> Tensor:
    """fla's ``l2norm`` (``x / sqrt(sum(x^2) + 1e-6)`` over the last axis, computed in
    float32, returned in x's dtype)."""
    xf = x.to(_acc(x))
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + 1e-6)).to(x.dtype)


def _nonempty(cu_seqlens: Any, seq: int) -> list[int] | None:
    """Indices of the non-empty sequences when ``cu_seqlens`` (otherwise valid) has
    empty ones; None when there are none to drop (or when the values cannot be read:
    then tokenmix validates ``cu_seqlens`` itself)."""
    if (
        not isinstance(cu_seqlens, Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.dtype not in (torch.int32, torch.int64)
        or cu_seqlens.numel() < 2
        or torch.compiler.is_compiling()
    ):
        return None
    offsets = [int(x) for x in cu_seqlens.tolist()]
    lens = [b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    if offsets[0] != 0 or offsets[-1] != seq or min(lens) < 0 or min(lens) > 0:
        return None
    return [i for i, n in enumerate(lens) if n > 0]


def _run(
    scan: _Scan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tokens: dict[str, Tensor | None],
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, Tensor | None]:
    """Runs ``scan`` with fla's sequence conventions on top of tokenmix's: empty
    sequences in ``cu_seqlens`` (dropped, their final state is their initial state) and
    ``reverse`` (every per-token tensor flipped along time, per sequence)."""
    if (
        isinstance(cu_seqlens, Tensor)
        and cu_seqlens.dim() == 1
        and isinstance(initial_state, Tensor)
        and initial_state.dim() >= 1
        and initial_state.shape[0] != cu_seqlens.shape[0] - 1
    ):
        raise ValueError(
            f"The number of initial states is expected to be equal to the number of input "
            f"sequences, i.e., {cu_seqlens.shape[0] - 1} rather than {initial_state.shape[0]}."
        )
    keep = None if cu_seqlens is None else _nonempty(cu_seqlens, q.shape[1])
    if keep is not None:
        num = cu_seqlens.shape[0] - 1
        idx = torch.tensor(keep, dtype=torch.long, device=cu_seqlens.device)
        kept_state = initial_state
        if initial_state is not None:
            kept_state = initial_state.index_select(0, idx.to(initial_state.device))
        if not keep:  # every sequence is empty (T == 0)
            o, final = scan(q, k, v, tokens, None, True, None)
            if output_final_state:
                heads, dim_k, dim_v = final.shape[1:]
                base = initial_state
                if base is None:
                    base = final.new_zeros(num, heads, dim_k, dim_v)
                return o, base.to(final.dtype).clone()
            return o, None
        cu = torch.cat([cu_seqlens[:1], cu_seqlens[1:][idx]])
        o, final = _run(scan, q, k, v, tokens, kept_state, output_final_state, cu, reverse)
        if final is None:
            return o, None
        if initial_state is None:
            base = final.new_zeros((num, *final.shape[1:]))
        else:
            base = initial_state.to(final.dtype)
        return o, base.index_copy(0, idx.to(final.device), final)
    if reverse:
        q, k, v = q.flip(1), k.flip(1), v.flip(1)
        tokens = {n: (None if t is None else t.flip(1)) for n, t in tokens.items()}
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens[-1] - cu_seqlens.flip(0)
            if initial_state is not None:
                initial_state = initial_state.flip(0)
    o, final = scan(q, k, v, tokens, initial_state, output_final_state, cu_seqlens)
    if reverse:
        o = o.flip(1)
        if final is not None and cu_seqlens is not None:
            final = final.flip(0)
    return o, final


def _linear_scan(g_gamma: Tensor | None, scale: float | None, normalize: bool) -> _Scan:
    def scan(q, k, v, tokens, initial_state, output_final_state, cu_seqlens):
        return _tm_linear_attention(
            q,
            k,
            v,
            g=tokens.get("g"),
            g_gamma=g_gamma,
            gk=tokens.get("gk"),
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            normalize=normalize,
        )

    return scan


def _delta_scan(scale: float | None) -> _Scan:
    def scan(q, k, v, tokens, initial_state, output_final_state, cu_seqlens):
        return _tm_delta_rule(
            q,
            k,
            v,
            tokens["beta"],
            g=tokens.get("g"),
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )

    return scan


def _resolve_scale(scale: Any, k: Tensor) -> Any:
    """fla's default ``K ** -0.5`` (also tokenmix's), resolved before any reshaping."""
    if scale is None and isinstance(k, Tensor) and k.dim() >= 1:
        return k.shape[-1] ** -0.5
    return scale


# Per-value recurrences: every value column of the state evolves on its own (its decay
# and beta are scalars per column), so [B, T, H, V] becomes H * V heads of width 1.


def _split_columns(x: Tensor, dim_v: int) -> Tensor:
    """``[B, T, H, K]`` -> ``[B, T, H * V, K]`` (each head repeated for its V columns)."""
    b, t, h, d = x.shape
    return x.unsqueeze(3).expand(b, t, h, dim_v, d).reshape(b, t, h * dim_v, d)


def _split_state(state: Tensor | None) -> Tensor | None:
    """``[N, H, K, V]`` -> ``[N, H * V, K, 1]``."""
    if state is None:
        return None
    n, h, dk, dv = state.shape
    return state.permute(0, 1, 3, 2).reshape(n, h * dv, dk, 1)


def _merge_state(state: Tensor | None, heads: int) -> Tensor | None:
    """``[N, H * V, K, 1]`` -> ``[N, H, K, V]``."""
    if state is None:
        return None
    n, hv, dk, _ = state.shape
    return state.reshape(n, heads, hv // heads, dk).transpose(-1, -2).contiguous()


def _per_head(x: Tensor | None, dim_v: int) -> Tensor | None:
    """``[B, T, H]`` -> ``[B, T, H * V]`` (the same scalar for every value column)."""
    if x is None:
        return None
    b, t, h = x.shape
    return x.unsqueeze(-1).expand(b, t, h, dim_v).reshape(b, t, h * dim_v)


def _check_4d(name: str, x: Tensor, like: Tensor) -> None:
    if not isinstance(x, Tensor) or tuple(x.shape) != tuple(like.shape):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"{name} must have v's shape [B, T, H, V] = {tuple(like.shape)}, got {shape}"
        )


def _check_qv(q: Tensor, v: Tensor) -> None:
    """Shapes the column split relies on (tokenmix re-checks everything else)."""
    for name, x in (("q", q), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, T, H, D]")
    if tuple(v.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(
            f"v batch/time/head shape {tuple(v.shape[:3])} must match q's {tuple(q.shape[:3])}"
        )


def _check_state_shape(state: Any, q: Tensor, dim_v: int, heads: int) -> None:
    if isinstance(state, Tensor) and (
        state.dim() != 4 or tuple(state.shape[1:]) != (heads, q.shape[-1], dim_v)
    ):
        raise ValueError(
            f"initial_state must have shape [N, H, K, V] = [N, {heads}, {q.shape[-1]}, "
            f"{dim_v}], got {tuple(state.shape)}"
        )


# --------------------------------------------------------------------------- linear attention


def _linear_family(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Unnormalized linear attention with any of fla's decays."""
    if isinstance(initial_state, tuple):
        raise TypeError(
            "initial_state must be a tensor [N, H, K, V]; the (kv_state, z_state) pair is "
            "only accepted with normalize=True"
        )
    scale = _resolve_scale(scale, k)
    # fla's kernels return no gradient for g_gamma (a fixed decay): neither does the shim.
    g_gamma = None if g_gamma is None else _cast(g_gamma, q).detach()
    if g is not None and g_gamma is not None:  # fused_recurrent applies both, in turn
        g = _cast(g, q) + g_gamma.view(1, 1, -1)
        g_gamma = None
    g, gk = _cast(g, q), _cast(gk, q)
    h0 = _cast(_to_internal_state(initial_state, state_v_first), q)
    if gv is None:
        scan = _linear_scan(g_gamma, scale, False)
        o, final = _run(
            scan, q, k, v, {"g": g, "gk": gk}, h0, output_final_state, cu_seqlens, reverse
        )
        return o, _from_internal_state(final, state_v_first)
    # Per-value gates: column j of the state decays by exp(gk + gv_j), on its own.
    _check_qv(q, v)
    _check_4d("gv", gv, v)
    heads, dim_v = v.shape[2], v.shape[3]
    _check_state_shape(h0, q, dim_v, heads)
    gv = _cast(gv, q)
    if gk is not None:
        if tuple(gk.shape) != tuple(q.shape):
            raise ValueError(f"gk must have q's shape {tuple(q.shape)}, got {tuple(gk.shape)}")
        cols = {"g": None, "gk": (gk.unsqueeze(3) + gv.unsqueeze(-1)).flatten(2, 3)}
    else:
        cols = {"g": gv.flatten(2, 3), "gk": None}
    scan = _linear_scan(None, scale, False)
    o, final = _run(
        scan,
        _split_columns(q, dim_v),
        _split_columns(k, dim_v),
        v.reshape(*v.shape[:2], heads * dim_v, 1),
        cols,
        _split_state(h0),
        output_final_state,
        cu_seqlens,
        reverse,
    )
    o = o.reshape(v.shape)
    return o, _from_internal_state(_merge_state(final, heads), state_v_first)


def _normalized_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None,
    initial_state: Tensor | tuple | None,
    output_final_state: bool,
    reverse: bool,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, tuple[Tensor | None, Tensor]]:
    """fla's normalized linear attention: ``o_t / ((scale q_t) . z_t + 1e-10)`` with the
    running key sum ``z_t``; the state is the pair ``(kv [N, H, K, V], z [N, 1, H, K])``,
    tokenmix's ``[N, H, K, V + 1]`` split in two."""
    if isinstance(initial_state, tuple):
        if len(initial_state) != 2:
            raise ValueError(
                f"initial_state must be a (kv_state, z_state) pair, got a tuple of "
                f"{len(initial_state)}"
            )
        kv0, z0 = initial_state
    else:
        kv0, z0 = initial_state, None
    h0 = None
    if kv0 is not None or z0 is not None:
        if z0 is not None:
            heads, dim_k = q.shape[2], q.shape[3]
            if (
                not isinstance(z0, Tensor)
                or z0.dim() != 4
                or tuple(z0.shape[1:]) != (1, heads, dim_k)
            ):
                shape = tuple(z0.shape) if isinstance(z0, Tensor) else type(z0).__name__
                raise ValueError(
                    f"initial_state's z_state must have shape [N, 1, H, K] = "
                    f"[N, 1, {heads}, {dim_k}], got {shape}"
                )
            z0 = _cast(z0, q)[:, 0, :, :, None]  # [N, H, K, 1]
        if kv0 is not None:
            kv0 = _cast(kv0, q)
        if kv0 is None:
            kv0 = z0.new_zeros(*z0.shape[:3], v.shape[-1])
        if z0 is None:
            z0 = kv0.new_zeros(*kv0.shape[:3], 1)
        h0 = torch.cat([kv0, z0], dim=-1)
    scan = _linear_scan(None, _resolve_scale(scale, k), True)
    o, final = _run(scan, q, k, v, {}, h0, True, cu_seqlens, reverse)
    z = final[..., -1].unsqueeze(1).to(k.dtype)
    kv = final[..., :-1] if output_final_state else None
    return o, (kv, z)


def chunk_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state: Tensor | tuple | None = None,
    output_final_state: bool = False,
    normalize: bool = True,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[Tensor, Tensor | tuple | None]:
    """fla's ``chunk_linear_attn``: linear attention ``S_t = S_{t-1} + k_t v_t^T``,
    ``o_t = (scale q_t)^T S_t``, **normalized by default** (``normalize=True``, as in fla).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        scale: default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]``; with ``normalize=True`` also the pair
            ``(kv_state [N, H, K, V] or None, z_state [N, 1, H, K] or None)``, where
            ``z_state`` is the running key sum the denominator starts from.
        output_final_state: return the final ``kv_state``.
        normalize: divide ``o_t`` by ``(scale q_t) . z_t + 1e-10``, ``z_t`` the running
            key sum (plus the initial ``z_state``).
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B must be 1).

    Returns:
        ``(o, final_state)``. Without ``normalize``, ``final_state`` is the
        ``[N, H, K, V]`` state or None. With ``normalize`` it is always the pair
        ``(kv_state or None, z_state)`` (fla's code returns the key sum even when
        ``output_final_state=False``; ``kv_state`` is None then), ``z_state`` in k's dtype.
    """
    if normalize:
        return _normalized_linear(
            q, k, v, scale, initial_state, output_final_state, False, cu_seqlens
        )
    return _linear_family(
        q,
        k,
        v,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


def fused_recurrent_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state: Tensor | tuple | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    normalize: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[Tensor, Tensor | tuple | None]:
    """fla's ``fused_recurrent_linear_attn``: as :func:`chunk_linear_attn`, but
    **unnormalized by default** (``normalize=False``, as in fla), and with ``reverse``.

    Args:
        reverse: scan every sequence from its last token to its first (with
            ``normalize`` the key sum is the suffix sum too).
        Others: as :func:`chunk_linear_attn`.

    Returns:
        ``(o, final_state)`` as :func:`chunk_linear_attn`.
    """
    if normalize:
        return _normalized_linear(
            q, k, v, scale, initial_state, output_final_state, reverse, cu_seqlens
        )
    return _linear_family(
        q,
        k,
        v,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        reverse=reverse,
        cu_seqlens=cu_seqlens,
    )


# --------------------------------------------------------------------------- simple GLA, GLA


def chunk_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's ``chunk_simple_gla``: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T`` (head-wise
    log decay ``g [B, T, H]``), or RetNet's fixed decay ``g_gamma [H]``;
    ``o_t = (scale q_t)^T S_t``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log decay; g_gamma: ``[H]`` log decay (no gradient, as in fla).
            At most one of them (fla's chunk kernels do not combine them consistently).
        scale: default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (``[N, H, V, K]`` with ``state_v_first``).
        output_final_state: also return the final state (same layout, float32).
        state_v_first: states stored ``[V, K]`` instead of ``[K, V]``.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B must be 1).
        cu_seqlens_cpu: performance hint, ignored.
        **kwargs: ``chunk_size`` (a power of 2, ignored); ``head_first`` raises
            ``DeprecationWarning`` like fla; other keywords are ignored, as fla ignores
            them, with a :class:`FlaCompatWarning`.

    Returns:
        ``(o [B, T, H, V], final_state or None)``.
    """
    _head_first(kwargs, always=True)
    _chunk_size(kwargs, None)
    _ignore_kwargs("chunk_simple_gla", kwargs)
    if g is not None and g_gamma is not None:
        raise ValueError(
            "chunk_simple_gla takes only one of g and g_gamma (fla: 'Only one of `g` or "
            "`g_gamma` should be provided'); fused_recurrent_simple_gla applies both"
        )
    return _linear_family(
        q,
        k,
        v,
        g=g,
        g_gamma=g_gamma,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
    )


def fused_recurrent_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's ``fused_recurrent_simple_gla``: as :func:`chunk_simple_gla`, plus
    ``reverse``; ``g`` and ``g_gamma`` may both be given (the state decays by
    ``exp(g_t + g_gamma)``, as fla's recurrent kernel does).

    Args:
        reverse: scan every sequence from its last token to its first.
        **kwargs: ``transpose_state_layout`` (fla's deprecated name of
            ``state_v_first``); ``head_first=True`` raises ``DeprecationWarning``; other
            keywords are ignored with a :class:`FlaCompatWarning`.
        Others: as :func:`chunk_simple_gla`.

    Returns:
        ``(o [B, T, H, V], final_state or None)``.
    """
    state_v_first = _state_v_first(state_v_first, kwargs)
    _head_first(kwargs, always=False)
    _ignore_kwargs("fused_recurrent_simple_gla", kwargs)
    return _linear_family(
        q,
        k,
        v,
        g=g,
        g_gamma=g_gamma,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        reverse=reverse,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
    )


def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """fla's ``chunk_gla``: gated linear attention with per-key log gates,
    ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = (scale q_t)^T S_t``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: ``[B, T, H, K]`` per-key log gates.
        scale: default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (``[N, H, V, K]`` with ``state_v_first``).
        output_final_state, state_v_first, cu_seqlens: as in :func:`chunk_simple_gla`.
        cu_seqlens_cpu: performance hint, ignored.

    Returns:
        ``(o [B, T, H, V], final_state or None)``.
    """
    return _linear_family(
        q,
        k,
        v,
        gk=g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
    )


def fused_recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's ``fused_recurrent_gla``: ``S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) +
    k_t v_t^T``, ``o_t = (scale q_t)^T S_t``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        gk: ``[B, T, H, K]`` per-key log gates, or None.
        gv: ``[B, T, H, V]`` per-value log gates, or None. Exact, but it runs the scan
            over ``H * V`` heads of one value column each (about ``V`` times the work).
        reverse: scan every sequence from its last token to its first.
        **kwargs: ``transpose_state_layout``; ``head_first=True`` raises; other keywords
            are ignored with a :class:`FlaCompatWarning`.
        Others: as :func:`chunk_gla`.

    Returns:
        ``(o [B, T, H, V], final_state or None)``.
    """
    state_v_first = _state_v_first(state_v_first, kwargs)
    _head_first(kwargs, always=False)
    _ignore_kwargs("fused_recurrent_gla", kwargs)
    return _linear_family(
        q,
        k,
        v,
        gk=gk,
        gv=gv,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        reverse=reverse,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
    )


# --------------------------------------------------------------------------- delta rules


def _delta_family(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor | None,
    *,
    g: Tensor | None = None,
    gv: Tensor | None = None,
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None,
    grouped_values: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The (gated) delta rule with fla's options, on :func:`tokenmix.delta_rule`."""
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("`A_log` must be provided when `use_gate_in_kernel=True`.")
        if g is None:
            raise ValueError(
                "`g` (raw pre-activation) must be provided when `use_gate_in_kernel=True`."
            )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, T, H, D]")
    scale = _resolve_scale(scale, k)
    if grouped_values and q.shape[2] != k.shape[2]:  # GVA: value head i reads q/k head
        raise ValueError(  # i // (HV // H); q and k share their heads
            f"q and k must have the same number of heads, but got "
            f"q.shape[2]={q.shape[2]} and k.shape[2]={k.shape[2]}"
        )
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    if grouped_values:
        heads, v_heads = q.shape[2], v.shape[2]
        if v_heads % heads != 0:
            raise ValueError(
                f"For GVA, num_v_heads (HV={v_heads}) must be evenly divisible by "
                f"num_heads (H={heads}), but got HV % H = {v_heads % heads}"
            )
        if v_heads != heads:
            q = q.repeat_interleave(v_heads // heads, dim=2)
            k = k.repeat_interleave(v_heads // heads, dim=2)
    if beta is None:
        beta = torch.ones(v.shape[:3], dtype=_acc(q), device=q.device)
    beta = _cast(beta, q)
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(beta) * (2.0 if allow_neg_eigval else 1.0)
    g = _cast(g, q)
    if use_gate_in_kernel:  # Mamba2 / GDN decay: -exp(A_log) * softplus(g + dt_bias)
        x = g if dt_bias is None else g + _cast(dt_bias, q).reshape(-1)
        g = -_cast(A_log, q).reshape(-1).exp() * F.softplus(x)
    h0 = _cast(_to_internal_state(initial_state, state_v_first), q)
    per_value_beta = isinstance(beta, Tensor) and beta.dim() == 4
    if gv is None and not per_value_beta:
        o, final = _run(
            _delta_scan(scale),
            q,
            k,
            v,
            {"beta": beta, "g": g},
            h0,
            output_final_state,
            cu_seqlens,
            False,
        )
        return o, _from_internal_state(final, state_v_first)
    # Per-value beta / gates: column j of the state is a delta rule of its own, with
    # beta_j and the decay exp(g + gv_j).
    _check_qv(q, v)
    heads, dim_v = v.shape[2], v.shape[3]
    _check_state_shape(h0, q, dim_v, heads)
    if per_value_beta:
        _check_4d("beta", beta, v)
        beta_cols = beta.flatten(2, 3)
    else:
        beta_cols = _per_head(beta, dim_v)
    g_cols = _per_head(g, dim_v)
    if gv is not None:
        _check_4d("gv", gv, v)
        gv_cols = _cast(gv, q).flatten(2, 3)
        g_cols = gv_cols if g_cols is None else g_cols + gv_cols
    o, final = _run(
        _delta_scan(scale),
        _split_columns(q, dim_v),
        _split_columns(k, dim_v),
        v.reshape(*v.shape[:2], heads * dim_v, 1),
        {"beta": beta_cols, "g": g_cols},
        _split_state(h0),
        output_final_state,
        cu_seqlens,
        False,
    )
    o = o.reshape(v.shape)
    return o, _from_internal_state(_merge_state(final, heads), state_v_first)


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's ``chunk_delta_rule`` (DeltaNet): per token ``v' = beta_t (v_t - S^T k_t)``,
    ``S = S + k_t v'^T``, ``o_t = (scale q_t)^T S``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]``.
        scale: default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]``.
        output_final_state: also return the final state (float32).
        use_qk_l2norm_in_kernel: L2-normalize q and k first (fla's ``l2norm``, eps 1e-6).
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B must be 1).
        cu_seqlens_cpu: performance hint, ignored.
        **kwargs: ``chunk_size`` (16, 32 or 64, ignored); ``head_first`` raises
            ``DeprecationWarning`` like fla; other keywords are ignored with a
            :class:`FlaCompatWarning`.

    Unlike fla's Triton kernel, float32 inputs are accepted.

    Returns:
        ``(o [B, T, H, V], final_state or None)``.
    """
    _head_first(kwargs, always=True)
    _chunk_size(kwargs, (16, 32, 64))
    _ignore_kwargs("chunk_delta_rule", kwargs)
    if isinstance(beta, Tensor) and beta.dim() != 3:
        raise ValueError(f"beta must have shape [B, T, H], got {tuple(beta.shape)}")
    return _delta_family(
        q,
        k,
        v,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        cu_seqlens=cu_seqlens,
    )


def fused_recurrent_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """fla's ``fused_recurrent_delta_rule``: as :func:`chunk_delta_rule`, with
    ``beta`` optional (None: ones) and either ``[B, T, H]`` or per value
    ``[B, T, H, V]`` (exact, over ``H * V`` heads of one value column each).

    Returns:
        ``(o [B, T, H, V], final_state or None)``.
    """
    return _delta_family(
        q,
        k,
        v,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        cu_seqlens=cu_seqlens,
    )


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    cp_context: Any | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's ``chunk_gated_delta_rule`` (Gated DeltaNet): per token
    ``S = exp(g_t) S``, ``v' = beta_t (v_t - S^T k_t)``, ``S = S + k_t v'^T``,
    ``o_t = (scale q_t)^T S``. Note fla's argument order: ``g`` before ``beta``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]`` (GVA when ``HV > H``: value head
            ``i`` uses q/k head ``i // (HV // H)``).
        g: ``[B, T, HV]`` log decay (raw input with ``use_gate_in_kernel``).
        beta: ``[B, T, HV]`` (logits with ``use_beta_sigmoid_in_kernel``).
        scale: default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first``).
        output_final_state: also return the final state (float32).
        use_qk_l2norm_in_kernel: L2-normalize q and k first (eps 1e-6).
        use_beta_sigmoid_in_kernel: ``beta = sigmoid(beta)``, times 2 with
            ``allow_neg_eigval`` (which requires it).
        state_v_first: states stored ``[V, K]``.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B must be 1).
        cu_seqlens_cpu, chunk_indices: performance hints, ignored.
        cp_context: must be None (context parallelism raises NotImplementedError).
        **kwargs: ``use_gate_in_kernel`` with ``A_log [HV]`` and ``dt_bias [HV]``
            (``g = -exp(A_log) * softplus(g + dt_bias)``, differentiable in all three),
            ``chunk_size`` (16, 32 or 64, ignored), ``transpose_state_layout``;
            ``head_first`` raises ``DeprecationWarning`` like fla; other keywords are
            ignored with a :class:`FlaCompatWarning`.

    Returns:
        ``(o [B, T, HV, V], final_state or None)``.
    """
    state_v_first = _state_v_first(state_v_first, kwargs)
    _head_first(kwargs, always=True)
    _chunk_size(kwargs, (16, 32, 64))
    use_gate_in_kernel = bool(kwargs.pop("use_gate_in_kernel", False))
    A_log = kwargs.pop("A_log", None)
    dt_bias = kwargs.pop("dt_bias", None)
    _ignore_kwargs("chunk_gated_delta_rule", kwargs)
    _no_cp(cp_context)
    if isinstance(beta, Tensor) and beta.dim() != 3:
        raise ValueError(f"beta must have shape [B, T, HV], got {tuple(beta.shape)}")
    return _delta_family(
        q,
        k,
        v,
        beta,
        g=g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval,
        use_gate_in_kernel=use_gate_in_kernel,
        A_log=A_log,
        dt_bias=dt_bias,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        grouped_values=True,
    )


def fused_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    beta: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's ``fused_recurrent_gated_delta_rule``: as :func:`chunk_gated_delta_rule`
    (keyword order differs: ``g, gk, gv, beta``), with ``g`` and ``beta`` optional
    (None: no decay / ones), ``beta`` also per value ``[B, T, HV, V]`` and per-value log
    decays ``gv [B, T, HV, V]`` (both exact, over ``HV * V`` heads of one value column
    each). Differentiable, where fla's recurrent kernel has no backward.

    Args:
        gk: per-key decay ``[B, T, HV, K]``: not expressible with tokenmix's delta rule
            (scalar decays only), raises NotImplementedError.
        use_gate_in_kernel, A_log, dt_bias: the GDN gate, as in
            :func:`chunk_gated_delta_rule` (A_log and dt_bias are ignored without it).
        **kwargs: ``transpose_state_layout``; ``head_first=True`` raises; other keywords
            are ignored with a :class:`FlaCompatWarning`.
        Others: as :func:`chunk_gated_delta_rule`.

    Returns:
        ``(o [B, T, HV, V], final_state or None)``.
    """
    state_v_first = _state_v_first(state_v_first, kwargs)
    _head_first(kwargs, always=False)
    _ignore_kwargs("fused_recurrent_gated_delta_rule", kwargs)
    if gk is not None:
        raise NotImplementedError(
            "gk (a per-key decay inside the delta rule) is not supported by "
            "tokenmix.compat.fla: tokenmix's delta rule has scalar decays (g) only; "
            "per-value decays (gv) are supported"
        )
    if not use_gate_in_kernel:
        A_log = dt_bias = None
    return _delta_family(
        q,
        k,
        v,
        beta,
        g=g,
        gv=gv,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval,
        use_gate_in_kernel=use_gate_in_kernel,
        A_log=A_log,
        dt_bias=dt_bias,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        grouped_values=True,
    )


chunk_gdn = chunk_gated_delta_rule
fused_recurrent_gdn = fused_recurrent_gated_delta_rule
