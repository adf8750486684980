"""Per-token recurrences: THE definition of tokenmix's linear-attention family.

Everything else (the chunked PyTorch implementation in :mod:`.chunked`, the fused
CPU kernels) is tested against these loops. Semantics are flash-linear-attention's
naive recurrences, heads-last layout. Per sequence and head, with the state
``S`` (``K x V``) starting at ``initial_state`` (or zeros) and ``q`` scaled by
``scale`` (default ``K ** -0.5``)::

    linear attention        S_t = S_{t-1} + k_t v_t^T
    fixed decay (RetNet)    S_t = exp(g_gamma) S_{t-1} + k_t v_t^T
    scalar decay (SSD)      S_t = exp(g_t) S_{t-1} + k_t v_t^T
    per-key gates (GLA)     S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T
    (gated) delta rule      S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T

    o_t = (scale q_t)^T S_t

Options of linear attention: ``normalize=True`` divides ``o_t`` by
``(scale q_t) . z_t + 1e-10`` where ``z_t`` is the key sum under the same decay
(``z_t = a_t z_{t-1} + k_t``: the plain cumulative key sum without decay);
``causal=False`` (no decay only) gives every token the final state of its sequence,
``o_t = (scale q_t)^T S_T`` (and ``z_T`` when normalizing). With ``normalize`` the
state (initial and final) is ``[S | z]``, ``[N, H, K, V + 1]``: the key sum is
carried as an extra value column, so prefill and decoding compose.

The loops run over tokens, vectorized over batch and heads, compute in float32
(float64 for float64 inputs), never modify a tensor autograd needs in place (so
they are differentiable with respect to every tensor input) and work on any device.
Outputs have q's dtype; final states are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .args import accumulation_dtype, check_delta_rule, check_linear_attention

__all__ = ["empty_result", "naive_delta_rule", "naive_linear_attention", "sequence_segments"]


def empty_result(
    q: Tensor, v: Tensor, initial_state: Tensor | None, num_states: int, normalize: bool = False
) -> tuple[Tensor, Tensor]:
    """The result for ``B == 0`` or ``T == 0``: an empty output and the initial state
    (zeros without one) as the final state (``V + 1`` columns when normalizing)."""
    batch, seq, heads, dim_k = q.shape
    out = q.new_zeros(batch, seq, heads, v.shape[-1])
    acc = accumulation_dtype(q.dtype)
    if initial_state is not None:
        return out, initial_state.to(acc).clone()
    state_v = v.shape[-1] + (1 if normalize else 0)
    return out, q.new_zeros(num_states, heads, dim_k, state_v, dtype=acc)


def sequence_segments(batch: int, seq: int, offsets: list[int] | None) -> list[tuple]:
    """``(batch_slice, start, end, state_slice)`` for every independent segment.

    Without ``cu_seqlens`` one segment covers the whole batch; with it there is one
    segment per packed sequence (batch size 1), each with its own state row.
    """
    if offsets is None:
        return [(slice(None), 0, seq, slice(None))]
    return [
        (slice(None), offsets[i], offsets[i + 1], slice(i, i + 1)) for i in range(len(offsets) - 1)
    ]


def _initial(initial_state: Tensor | None, sl: slice, shape: tuple, acc, device) -> Tensor:
    if initial_state is None:
        return torch.zeros(shape, dtype=acc, device=device)
    return initial_state[sl].to(acc)


def naive_linear_attention(
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
    """Token-by-token linear attention with an optional decay (module docstring).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` scalar log decay; g_gamma: ``[H]`` fixed log decay;
            gk: ``[B, T, H, K]`` per-key log gates. At most one of them.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of sequences).
        output_final_state: also return the final states ``[N, H, K, V]``.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B must be 1).
        normalize: divide by ``(scale q_t) . z_t + 1e-10``.
        causal: False gives every token its sequence's final state (no decay only).

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype; final_state float32
        (float64 for float64 inputs) or None.
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
    batch, seq, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    if batch == 0 or seq == 0:
        o, final = empty_result(q, v, initial_state, batch, normalize)
        return o, (final if output_final_state else None)
    acc = accumulation_dtype(q.dtype)
    qf = q.to(acc) * scale
    kf = k.to(acc)
    vf = v.to(acc)
    # Per-token log decay, broadcastable against the key axis: [B, T, H, 1 or K].
    if g_gamma is not None:
        log_decay = g_gamma.to(acc).view(1, 1, heads, 1).expand(batch, seq, heads, 1)
    elif g is not None:
        log_decay = g.to(acc)[..., None]
    elif gk is not None:
        log_decay = gk.to(acc)
    else:
        log_decay = None

    outs, finals = [], []
    for bsl, start, end, ssl in sequence_segments(batch, seq, offsets):
        if normalize:  # the state is [S | z]: the key sum is its last value column
            full = _initial(initial_state, ssl, (batch, heads, dim_k, dim_v + 1), acc, q.device)
            state, ksum = full[..., :-1], full[..., -1]
        else:
            state = _initial(initial_state, ssl, (batch, heads, dim_k, dim_v), acc, q.device)
            ksum = torch.zeros(batch, heads, dim_k, dtype=acc, device=q.device)
        steps = []
        for t in range(start, end):
            q_t, k_t, v_t = qf[bsl, t], kf[bsl, t], vf[bsl, t]
            if log_decay is not None:
                a_t = log_decay[bsl, t].exp()  # [B, H, 1 or K]
                state = state * a_t[..., None]
                ksum = ksum * a_t
            state = state + k_t[..., :, None] * v_t[..., None, :]
            ksum = ksum + k_t
            if causal:
                o_t = torch.einsum("nhk,nhkv->nhv", q_t, state)
                if normalize:
                    o_t = o_t / ((q_t * ksum).sum(-1, keepdim=True) + 1e-10)
                steps.append(o_t)
        if causal:
            o = torch.stack(steps, dim=1)
        else:
            q_s = qf[bsl, start:end]
            o = torch.einsum("nthk,nhkv->nthv", q_s, state)
            if normalize:
                o = o / ((q_s * ksum[:, None]).sum(-1, keepdim=True) + 1e-10)
        outs.append(o)
        finals.append(torch.cat([state, ksum[..., None]], dim=-1) if normalize else state)
    o = torch.cat(outs, dim=1).to(q.dtype)
    final = torch.cat(finals, dim=0) if output_final_state else None
    return o, final


def naive_delta_rule(
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
    """Token-by-token (gated) delta rule.

    Per token (flash-linear-attention's order)::

        S   = exp(g_t) S                      (only with g)
        v'  = beta_t (v_t - S^T k_t)
        S   = S + k_t v'^T
        o_t = (scale q_t)^T S

    i.e. ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``.
    Shapes as in :func:`naive_linear_attention`; beta and g are ``[B, T, H]``.
    """
    scale, offsets = check_delta_rule(
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
    batch, seq, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    if batch == 0 or seq == 0:
        o, final = empty_result(q, v, initial_state, batch)
        return o, (final if output_final_state else None)
    acc = accumulation_dtype(q.dtype)
    qf = q.to(acc) * scale
    kf = k.to(acc)
    vf = v.to(acc)
    bf = beta.to(acc)
    decay = None if g is None else g.to(acc).exp()

    outs, finals = [], []
    for bsl, start, end, ssl in sequence_segments(batch, seq, offsets):
        state = _initial(initial_state, ssl, (batch, heads, dim_k, dim_v), acc, q.device)
        steps = []
        for t in range(start, end):
            q_t, k_t, v_t = qf[bsl, t], kf[bsl, t], vf[bsl, t]
            if decay is not None:
                state = state * decay[bsl, t][..., None, None]
            v_new = bf[bsl, t][..., None] * (v_t - torch.einsum("nhk,nhkv->nhv", k_t, state))
            state = state + k_t[..., :, None] * v_new[..., None, :]
            steps.append(torch.einsum("nhk,nhkv->nhv", q_t, state))
        outs.append(torch.stack(steps, dim=1))
        finals.append(state)
    o = torch.cat(outs, dim=1).to(q.dtype)
    final = torch.cat(finals, dim=0) if output_final_state else None
    return o, final
