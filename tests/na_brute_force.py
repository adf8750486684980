"""Brute-force neighborhood-attention oracle for tests.

Written directly from the definition of (NATTEN 0.21-style) generalized neighborhood
attention with plain Python integer math, independently of
``tokenmix.neighborhood.reference``: a dense ``[N, N]`` boolean mask, a dense ``[N, N]``
rpb index table, and dense float64 masked-softmax attention.
"""

from __future__ import annotations

import itertools
import math

import torch


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def attended_1d(i: int, length: int, kernel: int, stride: int, dilation: int, causal: bool):
    """Sorted list of real key coordinates attended by query ``i`` along one dimension."""
    group = i % dilation
    ig = i // dilation
    group_len = _ceil_div(length - group, dilation)
    window_left = kernel // 2
    window_right = kernel // 2 + (kernel % 2) - 1
    if causal:
        leader = min((ig // stride) * stride + stride - 1, group_len - 1)
        start = max(leader - window_left - window_right, 0)
        end = min(ig + 1, group_len)
    else:
        leader = min((ig // stride) * stride + stride // 2, group_len - 1)
        start = max(leader - window_left, 0)
        if leader + window_right >= group_len:
            start += group_len - window_right - leader - 1
        end = start + kernel
    keys = []
    for j in range(length):
        if j % dilation != group:
            continue
        jg = j // dilation
        if start <= jg < end:
            keys.append(j)
    return keys


def _rel_1d(i: int, j: int, kernel: int, dilation: int) -> int:
    return j // dilation - i // dilation + kernel - 1


def brute_force_mask(spatial_shape, kernel_size, stride, dilation, is_causal) -> torch.Tensor:
    """``[N, N]`` bool mask, ``mask[query, key]`` over row-major flattened tokens."""
    spatial_shape = tuple(spatial_shape)
    n = math.prod(spatial_shape)
    per_dim = [
        [
            set(attended_1d(i, length, kernel_size[m], stride[m], dilation[m], is_causal[m]))
            for i in range(length)
        ]
        for m, length in enumerate(spatial_shape)
    ]
    coords = list(itertools.product(*(range(x) for x in spatial_shape)))
    mask = torch.zeros(n, n, dtype=torch.bool)
    for qi, qc in enumerate(coords):
        for ki, kc in enumerate(coords):
            if all(kc[m] in per_dim[m][qc[m]] for m in range(len(spatial_shape))):
                mask[qi, ki] = True
    return mask


def brute_force_rpb_index(spatial_shape, kernel_size, stride, dilation, is_causal) -> torch.Tensor:
    """``[N, N]`` int64: flat index into ``rpb[h].reshape(-1)`` for attended pairs, else -1."""
    spatial_shape = tuple(spatial_shape)
    rank = len(spatial_shape)
    n = math.prod(spatial_shape)
    mask = brute_force_mask(spatial_shape, kernel_size, stride, dilation, is_causal)
    coords = list(itertools.product(*(range(x) for x in spatial_shape)))
    index = torch.full((n, n), -1, dtype=torch.int64)
    for qi, qc in enumerate(coords):
        for ki, kc in enumerate(coords):
            if not mask[qi, ki]:
                continue
            flat = 0
            for m in range(rank):
                r = _rel_1d(qc[m], kc[m], kernel_size[m], dilation[m])
                assert 0 <= r <= 2 * kernel_size[m] - 2, (qc, kc, m, r)
                flat = flat * (2 * kernel_size[m] - 1) + r
            index[qi, ki] = flat
    return index


def dense_rpb_bias(rpb: torch.Tensor, rpb_index: torch.Tensor) -> torch.Tensor:
    """Dense ``[H, N, N]`` bias from ``rpb [H, ...]`` and :func:`brute_force_rpb_index`."""
    flat = rpb.reshape(rpb.shape[0], -1)
    safe = rpb_index.clamp_min(0)
    bias = flat[:, safe]
    return torch.where(rpb_index >= 0, bias, torch.zeros_like(bias))


def dense_attention(q, k, v, mask, scale, rpb_bias=None, add_k=None, add_v=None):
    """Dense masked softmax attention in float64.

    q ``[B, *spatial, H, D]``, k ``[B, *spatial, H_kv, D]``, v ``[B, *spatial, H_kv, Dv]``,
    mask ``[N, N]`` bool, rpb_bias ``[H, N, N]`` (added to attended logits), add_k / add_v
    ``[B, N_extra, H_kv, D / Dv]`` (attended by every query, no bias).

    Returns ``(out [B, *spatial, H, Dv], lse [B, *spatial, H])``, both float64.
    """
    batch = q.shape[0]
    spatial = tuple(q.shape[1:-2])
    heads, dim = q.shape[-2], q.shape[-1]
    heads_kv, dim_v = k.shape[-2], v.shape[-1]
    n = math.prod(spatial)
    rep = heads // heads_kv
    qd = q.double().reshape(batch, n, heads, dim)
    kd = k.double().reshape(batch, n, heads_kv, dim).repeat_interleave(rep, dim=2)
    vd = v.double().reshape(batch, n, heads_kv, dim_v).repeat_interleave(rep, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    if rpb_bias is not None:
        logits = logits + rpb_bias.double()[None]
    logits = logits.masked_fill(~mask[None, None], float("-inf"))
    values = vd
    if add_k is not None:
        ak = add_k.double().repeat_interleave(rep, dim=2)
        av = add_v.double().repeat_interleave(rep, dim=2)
        logits = torch.cat([logits, torch.einsum("bqhd,bkhd->bhqk", qd, ak) * scale], dim=-1)
        values = torch.cat([vd, av], dim=1)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhqk,bkhv->bqhv", probs, values)
    return out.reshape(batch, *spatial, heads, dim_v), lse.permute(0, 2, 1).reshape(
        batch, *spatial, heads
    )
