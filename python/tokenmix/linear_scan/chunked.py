"""Chunked pure-PyTorch implementation of the linear-attention family.

Same semantics as the per-token recurrences in :mod:`.reference` (see there), but
computed chunk by chunk: inside a chunk of ``C`` tokens (64 by default) the output is
a masked ``C x C`` attention-like product, between chunks a ``K x V`` state carries
the past. This is the implementation tokenmix uses on devices without fused
kernels, the baseline the benchmark compares the fused CPU kernels against, and it
is differentiable with autograd (double-backward included).

Numerical stability at any length and any decay strength: log decays are
accumulated *within a chunk only* (``G = cumsum(g)`` restarts at every chunk
boundary, it is never accumulated over the whole sequence), and every ``exp`` has a
non-positive argument, i.e. every decay factor is in ``[0, 1]`` (given ``g <= 0``):

* scalar decay ``g`` (and ``g_gamma``): intra-chunk ``exp(G_i - G_j)`` for
  ``i >= j`` only (the rest is masked to ``-inf`` *before* the exp); queries are
  decayed from the chunk start (``exp(G_i)``), keys to the chunk end
  (``exp(G_last - G_j)``).
* per-key gates ``gk`` (GLA): the chunk is split into sub-chunks of ``S`` tokens (16
  by default). For a query sub-chunk ``I`` and a key sub-chunk ``J < I`` the
  factor ``exp(G_i - G_j)`` is split at ``b``, the last token of ``J``:
  ``(q_I * exp(G_I - G_b)) @ (k_J * exp(G_b - G_J))^T`` (both factors <= 1);
  diagonal sub-chunks compute the pairwise ``exp(G_i - G_j)`` (``i >= j``) directly
  (an ``S x S x K`` temporary per sub-chunk).
* delta rule: the WY / UT representation per chunk. With ``Gamma_ij = exp(G_i - G_j)``
  and ``M = strict_tril(diag(beta) (K K^T o Gamma))`` the chunk's corrected values
  are ``V' = U - W S_0`` where ``[U | W] = (I + M)^{-1} diag(beta) [V | diag(exp(G)) K]``
  (a unit-triangular solve), then ``O = (Q o exp(G)) S_0 + tril(Q K^T o Gamma) V'`` and
  ``S_C = exp(G_last) S_0 + (K o exp(G_last - G))^T V'``.

Positive log decays are allowed but grow exponentially, like in the recurrence.
Sequences of ``cu_seqlens`` are processed one after the other. Everything is
computed in float32 (float64 for float64 inputs); outputs have q's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .args import accumulation_dtype, check_delta_rule, check_linear_attention
from .reference import empty_result, sequence_segments

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_SUBCHUNK_SIZE",
    "bidirectional_linear_attention",
    "chunked_delta_rule",
    "chunked_delta_scan",
    "chunked_linear_attention",
    "chunked_linear_scan",
    "delta_rule_from_scan",
    "linear_attention_from_scan",
]

DEFAULT_CHUNK_SIZE = 64
DEFAULT_SUBCHUNK_SIZE = 16

# scan(q, k, v, g, gk, initial_state, cu_seqlens, scale) -> (o, final_state)
LinearScan = Callable[..., tuple[Tensor, Tensor]]


def _check_chunk_sizes(chunk_size: int, subchunk_size: int, gated: bool) -> None:
    for name, value in (("chunk_size", chunk_size), ("subchunk_size", subchunk_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if gated and chunk_size % subchunk_size != 0:
        raise ValueError(
            f"chunk_size ({chunk_size}) must be a multiple of subchunk_size ({subchunk_size}) "
            "with per-key gates gk"
        )


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _pad_time(x: Tensor | None, n: int) -> Tensor | None:
    """Zero-pad the time axis (dim 2 of ``[B, H, L]`` / ``[B, H, L, D]``) by ``n``.

    Zero keys / values / betas do not change the state and zero log decays do not
    decay it, so padding at the end leaves the final state unchanged.
    """
    if x is None or n == 0:
        return x
    return F.pad(x, (0, n) if x.dim() == 3 else (0, 0, 0, n))


def _chunks(x: Tensor | None, num: int, size: int) -> Tensor | None:
    """``[B, H, num * size, ...]`` -> ``[B, H, num, size, ...]``."""
    if x is None:
        return None
    return x.reshape(*x.shape[:2], num, size, *x.shape[3:])


def _causal_mask(size: int, device: torch.device) -> Tensor:
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def _pairwise_decay(G: Tensor, mask: Tensor) -> Tensor:
    """``exp(G_i - G_j)`` over the last axis where ``mask`` (``i >= j``), else 0.

    The difference is masked to ``-inf`` before the exp, so the (positive) entries
    above the diagonal never overflow and their gradient is exactly zero.
    """
    diff = G[..., :, None] - G[..., None, :]
    return diff.masked_fill(~mask, float("-inf")).exp()


def _states_before_chunks(
    initial: Tensor | None, updates: Tensor, decay: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The state entering every chunk, and the final state.

    ``updates`` ``[B, H, NC, K, V]`` is each chunk's own contribution (keys decayed
    to the chunk end), ``decay`` the whole-chunk decay (``[B, H, NC]`` or
    ``[B, H, NC, K]``; None for none). Without decay the states are a cumulative
    sum; with decay they are a sequential loop over chunks (never a product of decays
    over more than one chunk).
    """
    batch, heads, num, dim_k, dim_v = updates.shape
    if initial is None:
        initial = updates.new_zeros(batch, heads, dim_k, dim_v)
    if decay is None:
        inclusive = updates.cumsum(2) + initial[:, :, None]
        before = torch.cat([initial[:, :, None], inclusive[:, :, :-1]], dim=2)
        return before, inclusive[:, :, -1]
    state = initial
    before = []
    for c in range(num):
        before.append(state)
        d = decay[:, :, c]
        d = d[..., None, None] if d.dim() == 2 else d[..., None]
        state = state * d + updates[:, :, c]
    return torch.stack(before, dim=2), state


def _scalar_decay_chunks(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, initial: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Chunks ``[B, H, NC, C, *]`` with no decay or a scalar log decay ``g`` [B, H, NC, C]."""
    size = q.shape[-2]
    mask = _causal_mask(size, q.device)
    scores = q @ k.transpose(-1, -2)
    if g is None:
        out = scores.masked_fill(~mask, 0.0) @ v
        before, final = _states_before_chunks(initial, k.transpose(-1, -2) @ v, None)
        return out + q @ before, final
    G = g.cumsum(-1)  # chunk-local cumulative log decay
    last = G[..., -1:]
    out = (scores * _pairwise_decay(G, mask)) @ v
    updates = (k * (last - G).exp()[..., None]).transpose(-1, -2) @ v
    before, final = _states_before_chunks(initial, updates, last[..., 0].exp())
    return out + (q * G.exp()[..., None]) @ before, final


def _gated_chunks(
    q: Tensor, k: Tensor, v: Tensor, gk: Tensor, initial: Tensor | None, sub: int
) -> tuple[Tensor, Tensor]:
    """Chunks ``[B, H, NC, C, *]`` with per-key log gates ``gk`` (GLA)."""
    batch, heads, num, size, dim_k = q.shape
    ns = size // sub
    G = gk.cumsum(-2)  # chunk-local, [B, H, NC, C, K]
    last = G[..., -1:, :]

    # Between chunks: queries decayed from the chunk start, keys to the chunk end.
    updates = (k * (last - G).exp()).transpose(-1, -2) @ v
    before, final = _states_before_chunks(initial, updates, last[..., 0, :].exp())
    out = (q * G.exp()) @ before

    # Within a chunk, blocks of sub x sub tokens.
    shape = (batch, heads, num, ns, sub, dim_k)
    qs, ks, Gs = q.reshape(shape), k.reshape(shape), G.reshape(shape)
    # Diagonal blocks: pairwise exp(G_i - G_j), i >= j, computed directly.
    diff = Gs[..., :, None, :] - Gs[..., None, :, :]  # [B, H, NC, ns, S, S, K]
    tri = _causal_mask(sub, q.device)[..., None]
    decay = diff.masked_fill(~tri, float("-inf")).exp()
    blocks = [torch.einsum("...ijk,...jk->...ij", qs[..., :, None, :] * decay, ks)]
    index = [i * ns + i for i in range(ns)]
    if ns > 1:
        # Off-diagonal blocks I > J, split at b = the last token of J.
        rows, cols = zip(*[(i, j) for i in range(ns) for j in range(i)], strict=True)
        rows, cols = list(rows), list(cols)
        boundary = Gs[..., -1:, :]  # [B, H, NC, ns, 1, K]
        q_to_b = qs[..., rows, :, :] * (Gs[..., rows, :, :] - boundary[..., cols, :, :]).exp()
        k_to_b = (ks * (boundary - Gs).exp())[..., cols, :, :]
        blocks.append(q_to_b @ k_to_b.transpose(-1, -2))
        index += [i * ns + j for i, j in zip(rows, cols, strict=True)]
    values = torch.cat(blocks, dim=-3)
    scores = values.new_zeros(batch, heads, num, ns * ns, sub, sub).index_copy(
        3, torch.tensor(index, device=q.device), values
    )
    scores = scores.reshape(batch, heads, num, ns, ns, sub, sub).transpose(4, 5)
    return out + scores.reshape(batch, heads, num, size, size) @ v, final


def _delta_chunks(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, initial: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(Gated) delta rule over chunks ``[B, H, NC, C, *]`` (WY / UT representation)."""
    batch, heads, num, size, dim_k = q.shape
    dim_v = v.shape[-1]
    mask = _causal_mask(size, q.device)
    k_beta = k * beta[..., None]
    kk = k_beta @ k.transpose(-1, -2)  # beta_i k_i . k_j
    qk = q @ k.transpose(-1, -2)
    if g is not None:
        G = g.cumsum(-1)
        gamma = _pairwise_decay(G, mask)
        kk = kk * gamma
        qk = qk * gamma
        g_from_start = G.exp()[..., None]
        rhs = torch.cat([v * beta[..., None], k_beta * g_from_start], dim=-1)
    else:
        qk = qk.masked_fill(~mask, 0.0)
        rhs = torch.cat([v * beta[..., None], k_beta], dim=-1)
    # (I + strict_tril(kk))^-1 rhs: a unit lower-triangular solve reads only the
    # strictly lower triangle of kk.
    uw = torch.linalg.solve_triangular(kk, rhs, upper=False, unitriangular=True)
    u, w = uw.split([dim_v, dim_k], dim=-1)
    if g is not None:
        last = G[..., -1:]
        k_to_end = k * (last - G).exp()[..., None]
        chunk_decay = last[..., 0].exp()
    else:
        k_to_end = k

    state = initial if initial is not None else q.new_zeros(batch, heads, dim_k, dim_v)
    before, new_values = [], []
    for c in range(num):
        v_new = u[:, :, c] - w[:, :, c] @ state
        before.append(state)
        new_values.append(v_new)
        update = k_to_end[:, :, c].transpose(-1, -2) @ v_new
        if g is not None:
            state = state * chunk_decay[:, :, c, None, None] + update
        else:
            state = state + update
    before_t = torch.stack(before, dim=2)
    v_new_t = torch.stack(new_values, dim=2)
    q_dec = q * g_from_start if g is not None else q
    return q_dec @ before_t + qk @ v_new_t, state


def _segment_inputs(tensors, bsl, start, end, acc):
    """Slice a segment, cast to ``acc`` and move time next to the heads: [B, H, L, ...]."""
    out = []
    for t in tensors:
        out.append(None if t is None else t[bsl, start:end].to(acc).transpose(1, 2))
    return out


def _initial_state(initial_state: Tensor | None, ssl: slice, acc) -> Tensor | None:
    return None if initial_state is None else initial_state[ssl].to(acc)


def chunked_linear_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    gk: Tensor | None,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    scale: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    subchunk_size: int = DEFAULT_SUBCHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """The causal scan behind linear attention, on already-validated inputs.

    Same contract as the fused kernel ``ops.fused_linear_scan``: ``g`` is
    ``[B, T, H]`` or None, ``gk`` ``[B, T, H, K]`` or None (never both),
    ``initial_state`` ``[N, H, K, V]`` or None, ``scale`` a float. Returns ``o``
    (q's dtype) and the final state ``[N, H, K, V]`` (float32 / float64), always.
    """
    _check_chunk_sizes(chunk_size, subchunk_size, gk is not None)
    batch, seq = q.shape[:2]
    if batch == 0 or seq == 0:
        return empty_result(q, v, initial_state, batch)
    acc = accumulation_dtype(q.dtype)
    offsets = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    outs, finals = [], []
    for bsl, start, end, ssl in sequence_segments(batch, seq, offsets):
        qs, ks, vs, gs, gks = _segment_inputs((q, k, v, g, gk), bsl, start, end, acc)
        qs = qs * scale
        length = end - start
        if gks is not None:
            sub = min(subchunk_size, chunk_size)
            size = min(chunk_size, _round_up(length, sub))
        else:
            size = min(chunk_size, length)
        num = math.ceil(length / size)
        pad = num * size - length
        qs, ks, vs, gs, gks = (_chunks(_pad_time(t, pad), num, size) for t in (qs, ks, vs, gs, gks))
        h0 = _initial_state(initial_state, ssl, acc)
        if gks is not None:
            o, final = _gated_chunks(qs, ks, vs, gks, h0, sub)
        else:
            o, final = _scalar_decay_chunks(qs, ks, vs, gs, h0)
        o = o.reshape(*o.shape[:2], num * size, o.shape[-1])[:, :, :length]
        outs.append(o.transpose(1, 2))
        finals.append(final)
    return torch.cat(outs, dim=1).to(q.dtype), torch.cat(finals, dim=0)


def chunked_delta_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    scale: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """The (gated) delta-rule scan on already-validated inputs.

    Same contract as the fused kernel ``ops.fused_delta_rule``; returns ``o`` (q's
    dtype) and the final state (float32 / float64), always.
    """
    _check_chunk_sizes(chunk_size, 1, False)
    batch, seq = q.shape[:2]
    if batch == 0 or seq == 0:
        return empty_result(q, v, initial_state, batch)
    acc = accumulation_dtype(q.dtype)
    offsets = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    outs, finals = [], []
    for bsl, start, end, ssl in sequence_segments(batch, seq, offsets):
        qs, ks, vs, bs, gs = _segment_inputs((q, k, v, beta, g), bsl, start, end, acc)
        qs = qs * scale
        length = end - start
        size = min(chunk_size, length)
        num = math.ceil(length / size)
        pad = num * size - length
        qs, ks, vs, bs, gs = (_chunks(_pad_time(t, pad), num, size) for t in (qs, ks, vs, bs, gs))
        o, final = _delta_chunks(qs, ks, vs, bs, gs, _initial_state(initial_state, ssl, acc))
        o = o.reshape(*o.shape[:2], num * size, o.shape[-1])[:, :, :length]
        outs.append(o.transpose(1, 2))
        finals.append(final)
    return torch.cat(outs, dim=1).to(q.dtype), torch.cat(finals, dim=0)


def bidirectional_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    initial_state: Tensor | None,
    offsets: list[int] | None,
    normalize: bool,
) -> tuple[Tensor, Tensor]:
    """Non-causal linear attention: ``o_t = (scale q_t)^T (S_0 + K^T V)`` per sequence.

    No scan is needed: two matmuls per sequence. With ``normalize`` the denominator is
    ``(scale q_t) . sum_i k_i + 1e-10``. Returns ``(o, final_state)``.
    """
    batch, seq = q.shape[:2]
    acc = accumulation_dtype(q.dtype)
    qf, kf, vf = q.to(acc) * scale, k.to(acc), v.to(acc)
    outs, finals = [], []
    for bsl, start, end, ssl in sequence_segments(batch, seq, offsets):
        qs, ks, vs = qf[bsl, start:end], kf[bsl, start:end], vf[bsl, start:end]
        state = torch.einsum("bthk,bthv->bhkv", ks, vs)
        h0 = _initial_state(initial_state, ssl, acc)
        if h0 is not None:
            state = state + h0
        o = torch.einsum("bthk,bhkv->bthv", qs, state)
        if normalize:
            o = o / ((qs * ks.sum(1, keepdim=True)).sum(-1, keepdim=True) + 1e-10)
        outs.append(o)
        finals.append(state)
    return torch.cat(outs, dim=1).to(q.dtype), torch.cat(finals, dim=0)


def linear_attention_from_scan(
    scan: LinearScan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    gk: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    normalize: bool = False,
    causal: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Linear attention built on a causal ``scan``: validates the call
    (:func:`~tokenmix.linear_scan.args.check_linear_attention`), then normalizes the
    inputs for the scan (``g_gamma [H]`` becomes the view ``[B, T, H]``; gates and the
    initial state are cast to the accumulation dtype, ``cu_seqlens`` to int64), handles
    ``causal=False`` with plain matmuls and ``normalize=True`` with a second scan over
    ``v = 1`` (the decayed key sum).
    """
    scale, offsets = check_linear_attention(
        q,
        k,
        v,
        g=g,
        g_gamma=g_gamma,
        gk=gk,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        normalize=normalize,
        causal=causal,
    )
    acc = accumulation_dtype(q.dtype)
    if q.shape[0] == 0 or q.shape[1] == 0:  # no kernel call for empty inputs
        o, final = empty_result(q, v, initial_state, q.shape[0], normalize)
        return o, (final if output_final_state else None)
    h0 = None if initial_state is None else initial_state.to(acc)
    if not causal:
        if normalize:
            o_aug, final = bidirectional_linear_attention(
                q, k, _with_ones_column(v), scale, h0, offsets, False
            )
            return _normalized(o_aug, q.dtype), (final if output_final_state else None)
        o, final = bidirectional_linear_attention(q, k, v, scale, h0, offsets, False)
        return o, (final if output_final_state else None)
    batch, seq, heads = q.shape[:3]
    if g_gamma is not None:
        g = g_gamma.to(acc).view(1, 1, heads).expand(batch, seq, heads)
    elif g is not None:
        g = g.to(acc)
    if gk is not None:
        gk = gk.to(acc)
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64)
    if normalize:
        # The normalizer (scale q_t) . (decayed sum of keys) is the same scan over
        # a value column of ones: append it, so the state carries the key sum as
        # its last column and decoding can resume from it.
        o_aug, final = scan(q, k, _with_ones_column(v), g, gk, h0, cu, scale)
        return _normalized(o_aug, q.dtype), (final if output_final_state else None)
    o, final = scan(q, k, v, g, gk, h0, cu, scale)
    return o, (final if output_final_state else None)


def _with_ones_column(v: Tensor) -> Tensor:
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _normalized(o_aug: Tensor, dtype: torch.dtype) -> Tensor:
    """Output of a scan over ``[v | 1]``: numerator / (denominator + 1e-10)."""
    acc = accumulation_dtype(dtype)
    o_aug = o_aug.to(acc)
    return (o_aug[..., :-1] / (o_aug[..., -1:] + 1e-10)).to(dtype)


def delta_rule_from_scan(
    scan: Callable[..., tuple[Tensor, Tensor]],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    g: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The delta rule built on ``scan``: validates the call
    (:func:`~tokenmix.linear_scan.args.check_delta_rule`), casts ``beta``, ``g`` and the
    initial state to the accumulation dtype and ``cu_seqlens`` to int64, then runs it."""
    scale, _ = check_delta_rule(
        q,
        k,
        v,
        beta,
        g=g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    acc = accumulation_dtype(q.dtype)
    if q.shape[0] == 0 or q.shape[1] == 0:  # no kernel call for empty inputs
        o, final = empty_result(q, v, initial_state, q.shape[0])
        return o, (final if output_final_state else None)
    o, final = scan(
        q,
        k,
        v,
        beta.to(acc),
        None if g is None else g.to(acc),
        None if initial_state is None else initial_state.to(acc),
        None if cu_seqlens is None else cu_seqlens.to(torch.int64),
        scale,
    )
    return o, (final if output_final_state else None)


def chunked_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    gk: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    normalize: bool = False,
    causal: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    subchunk_size: int = DEFAULT_SUBCHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """Chunked linear attention; arguments and results as
    :func:`~tokenmix.linear_scan.linear_attention`, plus the chunk sizes
    (``subchunk_size`` is used with ``gk`` only; ``chunk_size`` must be a multiple of it).
    """
    _check_chunk_sizes(chunk_size, subchunk_size, gk is not None)

    def scan(*args):
        return chunked_linear_scan(*args, chunk_size=chunk_size, subchunk_size=subchunk_size)

    return linear_attention_from_scan(
        scan,
        q,
        k,
        v,
        g=g,
        g_gamma=g_gamma,
        gk=gk,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        normalize=normalize,
        causal=causal,
    )


def chunked_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    g: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """Chunked (gated) delta rule; arguments and results as
    :func:`~tokenmix.linear_scan.delta_rule`, plus ``chunk_size``."""
    _check_chunk_sizes(chunk_size, 1, False)

    def scan(*args):
        return chunked_delta_scan(*args, chunk_size=chunk_size)

    return delta_rule_from_scan(
        scan,
        q,
        k,
        v,
        beta,
        g=g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
