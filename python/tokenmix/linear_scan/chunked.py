"""Chunked pure-PyTorch math of the linear-attention family (no validation: the
public functions in :mod:`.functional` check their arguments and call in here).

Same semantics as the per-token recurrences in :mod:`.reference` (see there), but
computed chunk by chunk: inside a chunk of ``C`` tokens (64 by default) the output is
a masked ``C x C`` attention-like product, between chunks a ``K x V`` state carries
the past. This is the implementation tokenmix uses on devices without fused
kernels, the baseline the benchmark compares the fused CPU kernels against, and it
is differentiable with autograd (double-backward included).

Exact decays, whatever their size. Every decay factor is ``exp`` of a sum of log
decays over a range of tokens inside one chunk, and every such sum is accumulated
*directly* over its own range, never as the difference of two cumulative sums:
``G_i - G_j`` loses every digit of the decays after a reset of ``-1e9`` in float32,
while ``sum_{j < t <= i} g_t`` keeps them. With ``g <= 0`` the sums are of one sign, so
each is exact to a few ulps of its own size; ``-inf`` is an exact reset (decay 0),
and no ``-inf - (-inf)`` is ever formed. The ranges:

* pairwise (intra-chunk) ``D_ij = sum_{j < t <= i} g_t`` for ``i >= j`` (a cumulative
  sum down the rows of a matrix holding ``g_i`` strictly below the diagonal), masked
  to ``-inf`` above the diagonal before the exp;
* from the chunk start ``sum_{t <= i} g_t`` (queries against the incoming state);
* to the chunk end ``sum_{t > j} g_t`` (keys into the outgoing state), a reverse
  cumulative sum;
* per-key gates ``gk`` (GLA) split the chunk into sub-chunks of ``S`` tokens (16 by
  default). Diagonal sub-chunks use the pairwise sums (an ``S x S x K`` temporary);
  for a query sub-chunk ``I`` after a key sub-chunk ``J`` the factor is split at
  ``b``, the last token of ``J``: queries carry ``sum_{b < t <= i} g_t`` (the totals
  of the sub-chunks strictly between ``J`` and ``I`` plus ``i``'s prefix in ``I``),
  keys ``sum_{j < t <= b} g_t`` (a suffix inside ``J``); both factors are <= 1.
* delta rule: the WY / UT representation per chunk. With ``Gamma_ij = exp(D_ij)`` and
  ``M = strict_tril(diag(beta) (K K^T o Gamma))`` the chunk's corrected values are
  ``V' = U - W S_0`` where ``[U | W] = (I + M)^{-1} diag(beta) [V | diag(exp(G)) K]``
  (a unit-triangular solve), then ``O = (Q o exp(G)) S_0 + tril(Q K^T o Gamma) V'`` and
  ``S_C = exp(G_last) S_0 + (K o exp(sum_{t > j} g_t))^T V'``.

Causal under non-finite values: an inf or NaN at token ``t`` never reaches an output
before ``t``. Masked (future) entries are selected away, not multiplied by zero
(``0 * inf`` is NaN), and the causal products with values (:func:`_causal_matmul`)
take an exact path for chunks whose values are not all finite.

Positive log decays are allowed but grow exponentially, like in the recurrence.
Sequences of ``cu_seqlens`` are processed one after the other. Everything is
computed in float32 (float64 for float64 inputs); outputs have q's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .._utils import accumulation_dtype
from .reference import empty_result, sequence_segments

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_SUBCHUNK_SIZE",
    "bidirectional_linear_attention",
    "causal_matmul",
    "check_chunk_sizes",
    "chunked_delta_scan",
    "chunked_linear_scan",
    "log_decay_to_end",
    "pairwise_log_decay",
]

DEFAULT_CHUNK_SIZE = 64
DEFAULT_SUBCHUNK_SIZE = 16


def check_chunk_sizes(chunk_size: int, subchunk_size: int, gated: bool) -> None:
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


def pairwise_log_decay(g: Tensor, per_key: bool = False) -> Tensor:
    """``D_ij = sum_{j < t <= i} g_t`` for ``i >= j`` (0 on the diagonal), ``-inf`` above it.

    ``g`` is ``[..., C]`` (``[..., C, C]`` out) or, with ``per_key``, ``[..., C, K]``
    (``[..., C, C, K]`` out). Each entry is summed over its own range (a cumulative sum
    down the rows of a matrix holding ``g_i`` strictly below the diagonal), so no
    difference of cumulative sums is formed: exact for any ``g <= 0``, ``-inf``
    included. Entries above the diagonal are ``-inf``: their ``exp`` is 0, with a zero
    gradient.
    """
    size = g.shape[-2] if per_key else g.shape[-1]
    below = torch.ones(size, size, dtype=torch.bool, device=g.device).tril(-1)
    upper = ~_causal_mask(size, g.device)
    if per_key:
        below, upper, rows = below[..., None], upper[..., None], g[..., :, None, :]
    else:
        rows = g[..., :, None]
    steps = torch.where(below, rows, torch.zeros((), dtype=g.dtype, device=g.device))
    return steps.cumsum(-3 if per_key else -2).masked_fill(upper, float("-inf"))


def log_decay_to_end(g: Tensor, dim: int) -> Tensor:
    """``sum_{t > j} g_t`` along ``dim`` (0 at the last position): a reverse cumulative
    sum of the later decays, summed directly (not as ``total - prefix``)."""
    n = g.shape[dim]
    later = torch.cat([g.narrow(dim, 1, n - 1), torch.zeros_like(g.narrow(dim, 0, 1))], dim)
    return later.flip(dim).cumsum(dim).flip(dim)


def _lower_blocks(x: Tensor, size: int) -> Tensor:
    """The lower-left ``size x size`` block of every ``2 size`` diagonal block of
    ``x [..., C, C]``: ``[..., C / (2 size), size, size]``."""
    nb = x.shape[-1] // (2 * size)
    blocks = x.unflatten(-2, (nb, 2, size)).unflatten(-1, (nb, 2, size))
    diag = blocks.diagonal(dim1=-6, dim2=-3)  # [..., 2, size, 2, size, nb]
    return diag[..., 1, :, 0, :, :].movedim(-1, -3)


def _causal_matmul_exact(a: Tensor, v: Tensor) -> Tensor:
    """``o_i = sum_{j <= i} a_ij v_j`` reading only the lower triangle of ``a``.

    Recursive doubling: the diagonal, then at every level the lower-left block of
    each diagonal block times the values above it. Every product is one the
    recurrence makes too, so a non-finite value reaches only the rows at or after it.
    """
    size = a.shape[-1]
    padded = 1 << max(0, (size - 1).bit_length())
    if padded != size:
        a = F.pad(a, (0, padded - size, 0, padded - size))
        v = F.pad(v, (0, 0, 0, padded - size))
    out = a.diagonal(dim1=-2, dim2=-1)[..., None] * v
    half = 1
    while half < padded:
        nb = padded // (2 * half)
        upper_v = v.unflatten(-2, (nb, 2, half))[..., 0, :, :]
        lower = _lower_blocks(a, half) @ upper_v  # [..., nb, half, V]
        out = out + torch.stack([torch.zeros_like(lower), lower], dim=-3).flatten(-4, -2)
        half *= 2
    return out[..., :size, :]


def causal_matmul(a: Tensor, v: Tensor) -> Tensor:
    """``a @ v`` for a lower-triangular ``a [..., C, C]`` (exact zeros above the
    diagonal) and ``v [..., C, V]``, causal even when ``v`` is not finite.

    A plain matmul multiplies the zeros above the diagonal by every value, and
    ``0 * inf`` is NaN: one inf value at token ``t`` would poison the outputs before
    ``t``. Finite values take the plain matmul; others, and values whose data is
    not known here (compiled graphs and fake tensors cannot branch on data), the
    exact triangular product. Meta tensors have no values at all: any product
    gives their shape.
    """
    if v.device.type == "meta":
        return a @ v
    data_known = not (torch.compiler.is_compiling() or is_fake(v))
    if data_known and bool(torch.isfinite(v).all()):
        return a @ v
    return _causal_matmul_exact(a, v)


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
    zero = scores.new_zeros(())
    if g is None:
        out = causal_matmul(torch.where(mask, scores, zero), v)
        before, final = _states_before_chunks(initial, k.transpose(-1, -2) @ v, None)
        return out + q @ before, final
    from_start = g.cumsum(-1)  # sum_{t <= i} g_t
    out = causal_matmul(torch.where(mask, scores * pairwise_log_decay(g).exp(), zero), v)
    updates = (k * log_decay_to_end(g, -1).exp()[..., None]).transpose(-1, -2) @ v
    before, final = _states_before_chunks(initial, updates, from_start[..., -1].exp())
    return out + (q * from_start.exp()[..., None]) @ before, final


def _gated_chunks(
    q: Tensor, k: Tensor, v: Tensor, gk: Tensor, initial: Tensor | None, sub: int
) -> tuple[Tensor, Tensor]:
    """Chunks ``[B, H, NC, C, *]`` with per-key log gates ``gk`` (GLA)."""
    batch, heads, num, size, dim_k = q.shape
    ns = size // sub
    from_start = gk.cumsum(-2)  # [B, H, NC, C, K]

    # Between chunks: queries decayed from the chunk start, keys to the chunk end.
    updates = (k * log_decay_to_end(gk, -2).exp()).transpose(-1, -2) @ v
    before, final = _states_before_chunks(initial, updates, from_start[..., -1, :].exp())
    out = (q * from_start.exp()) @ before

    # Within a chunk, blocks of sub x sub tokens.
    shape = (batch, heads, num, ns, sub, dim_k)
    qs, ks, gs = q.reshape(shape), k.reshape(shape), gk.reshape(shape)
    # Diagonal blocks: pairwise decays, i >= j, selected (not multiplied) by the mask.
    decay = pairwise_log_decay(gs, per_key=True).exp()  # [B, H, NC, ns, S, S, K]
    diag = torch.einsum("...ijk,...jk->...ij", qs[..., :, None, :] * decay, ks)
    blocks = [torch.where(_causal_mask(sub, q.device), diag, diag.new_zeros(()))]
    index = [i * ns + i for i in range(ns)]
    if ns > 1:
        # Off-diagonal blocks I > J, split at b = the last token of J: queries carry
        # the totals of the sub-chunks strictly between J and I plus their own
        # prefix in I, keys their suffix in J.
        rows, cols = zip(*[(i, j) for i in range(ns) for j in range(i)], strict=True)
        rows, cols = list(rows), list(cols)
        totals = gs.sum(-2)  # [B, H, NC, ns, K]
        # sum_{J < s < I} totals_s = sum_{J + 1 < u <= I} shifted_u with shifted_u =
        # totals_{u - 1}: the pairwise sum of the shifted totals at (I, J + 1).
        shifted = torch.cat([torch.zeros_like(totals[..., :1, :]), totals[..., :-1, :]], dim=-2)
        after = [j + 1 for j in cols]
        between = pairwise_log_decay(shifted, per_key=True)[..., rows, after, :]
        q_log = between[..., None, :] + gs.cumsum(-2)[..., rows, :, :]
        q_to_b = qs[..., rows, :, :] * q_log.exp()
        k_to_b = (ks * log_decay_to_end(gs, -2).exp())[..., cols, :, :]
        blocks.append(q_to_b @ k_to_b.transpose(-1, -2))
        index += [i * ns + j for i, j in zip(rows, cols, strict=True)]
    values = torch.cat(blocks, dim=-3)
    scores = values.new_zeros(batch, heads, num, ns * ns, sub, sub).index_copy(
        3, torch.tensor(index, device=q.device), values
    )
    scores = scores.reshape(batch, heads, num, ns, ns, sub, sub).transpose(4, 5)
    return out + causal_matmul(scores.reshape(batch, heads, num, size, size), v), final


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
        gamma = pairwise_log_decay(g).exp()
        kk = kk * gamma
        qk = qk * gamma
        from_start = g.cumsum(-1)
        g_from_start = from_start.exp()[..., None]
        rhs = torch.cat([v * beta[..., None], k_beta * g_from_start], dim=-1)
    else:
        rhs = torch.cat([v * beta[..., None], k_beta], dim=-1)
    qk = torch.where(mask, qk, qk.new_zeros(()))
    # (I + strict_tril(kk))^-1 rhs: a unit lower-triangular solve reads only the
    # strictly lower triangle of kk.
    uw = torch.linalg.solve_triangular(kk, rhs, upper=False, unitriangular=True)
    u, w = uw.split([dim_v, dim_k], dim=-1)
    if g is not None:
        k_to_end = k * log_decay_to_end(g, -1).exp()[..., None]
        chunk_decay = from_start[..., -1].exp()
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
    return q_dec @ before_t + causal_matmul(qk, v_new_t), state


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
    check_chunk_sizes(chunk_size, subchunk_size, gk is not None)
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
    check_chunk_sizes(chunk_size, 1, False)
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
