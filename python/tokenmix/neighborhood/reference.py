"""Pure-PyTorch reference implementation of generalized neighborhood attention.

Semantics match NATTEN 0.21 ``na1d`` / ``na2d`` / ``na3d`` (heads-last layout), with
per-dimension kernel size, stride, dilation and causal flag, optional relative
positional bias (rpb), optional additional (global) key/value tokens, and GQA.

The implementation is memory-bounded: it never materializes a tokens x tokens mask
(nor a tokens x window table). Queries are processed in chunks; for each chunk,
:func:`window_table` gives, per spatial dimension, the key coordinates of the
chunk's queries (plus a validity mask, since causal windows can be shorter than the
kernel), the keys/values of every query's window are gathered
(``[B, chunk, window, H_kv, D]``) and a masked softmax is taken jointly over the
window and the additional tokens.

It works on any device, is differentiable with autograd with respect to every tensor
input, and computes in float32 (float64 for float64 inputs). The output has the input
dtype; the LSE is float32 (float64 for float64 inputs).

Non-finite inputs and fully masked rows (the fused kernels follow the same rules):

* A key or value outside a query's window never reaches that query: it is not gathered.
  Inside the window, IEEE arithmetic applies, so a non-finite key or value makes the
  query's output (and the gradients that flow through it) non-finite even where its
  probability is 0 (``0 * inf`` is NaN).
* A row whose logits are all ``-inf`` (every key masked, e.g. by an rpb of ``-inf``)
  has output 0 and LSE ``-inf``, and no gradient flows back through it.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .._utils import accumulation_dtype
from .args import check_tensors, normalize_window_args, resolve_scale, spatial_rank

__all__ = [
    "neighborhood_attention_reference",
    "window_bounds",
    "window_table",
]

# Upper bound (in elements) on the per-chunk gathered K/V and logits tensors.
_CHUNK_BUDGET = 1 << 22


def window_bounds(
    length: int,
    kernel: int,
    stride: int,
    dilation: int,
    causal: bool,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The single source of truth for the 1-D window rule.

    Returns ``(start, end)``, int64 tensors of shape ``[length]``: for the query at real
    coordinate ``i``, the attended keys are the real coordinates
    ``jg * dilation + i % dilation`` for ``start[i] <= jg < end[i]`` (i.e. ``start`` and
    ``end`` are in dilation-group coordinates, ``end`` exclusive). Non-causal windows
    always hold exactly ``kernel`` keys; causal ones hold at most ``kernel``.
    """
    i = torch.arange(length, device=device, dtype=torch.int64)
    group = i % dilation
    ig = i // dilation
    group_len = (length - group + dilation - 1) // dilation
    window_left = kernel // 2
    window_right = kernel // 2 + kernel % 2 - 1
    if causal:
        leader = torch.minimum((ig // stride) * stride + stride - 1, group_len - 1)
        start = (leader - window_left - window_right).clamp_min(0)
        end = torch.minimum(ig + 1, group_len)
    else:
        leader = torch.minimum((ig // stride) * stride + stride // 2, group_len - 1)
        shift = torch.where(
            leader + window_right >= group_len,
            group_len - window_right - leader - 1,
            torch.zeros_like(leader),
        )
        start = (leader - window_left).clamp_min(0) + shift
        end = start + kernel
    return start, end


def window_table(
    length: int,
    kernel: int,
    stride: int,
    dilation: int,
    causal: bool,
    device: torch.device | str | None = None,
    queries: torch.Tensor | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query window table for one spatial dimension.

    ``queries`` (int64 coordinates) restricts the table to those queries (default:
    all ``length``); ``bounds`` reuses a precomputed :func:`window_bounds`.
    Returns ``(keys, valid, rel)``, each ``[len(queries), kernel]``:

    * ``keys``: int64 real key coordinates; invalid slots point at the query itself
      (always a legal index) so they can be gathered safely and masked afterwards.
    * ``valid``: bool, whether the slot is part of the window.
    * ``rel``: int64 rpb index ``jg - ig + kernel - 1`` (in ``[0, 2*kernel - 2]``);
      ``kernel - 1`` in invalid slots.
    """
    start, end = (
        bounds
        if bounds is not None
        else window_bounds(length, kernel, stride, dilation, causal, device)
    )
    if queries is None:
        i = torch.arange(length, device=device, dtype=torch.int64)
    else:
        i = queries
        start, end = start[i], end[i]
    group = (i % dilation)[:, None]
    ig = (i // dilation)[:, None]
    jg = start[:, None] + torch.arange(kernel, device=device, dtype=torch.int64)
    valid = jg < end[:, None]
    jg = torch.where(valid, jg, ig)
    keys = jg * dilation + group
    rel = jg - ig + kernel - 1
    return keys, valid, rel


def _combine_windows(
    query_idx: torch.Tensor,
    spatial_shape: tuple[int, ...],
    kernel_size: tuple[int, ...],
    dims: list[tuple],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-dimensional windows for a chunk of flat query indices.

    Returns flat key indices, validity and flat rpb indices, each ``[chunk, window]``
    with ``window = prod(kernel_size)`` (row-major over the per-dim kernel offsets).
    """
    n = query_idx.shape[0]
    dev = query_idx.device
    key = torch.zeros(n, 1, dtype=torch.int64, device=dev)
    rel = torch.zeros(n, 1, dtype=torch.int64, device=dev)
    valid = torch.ones(n, 1, dtype=torch.bool, device=dev)
    inner = math.prod(spatial_shape)
    for length, kern, dim_args in zip(spatial_shape, kernel_size, dims, strict=True):
        inner //= length
        coord = (query_idx // inner) % length
        rule, bounds = dim_args
        keys_m, valid_m, rel_m = window_table(*rule, queries=coord, bounds=bounds)
        key = (key[:, :, None] * length + keys_m[:, None, :]).reshape(n, -1)
        rel = (rel[:, :, None] * (2 * kern - 1) + rel_m[:, None, :]).reshape(n, -1)
        valid = (valid[:, :, None] & valid_m[:, None, :]).reshape(n, -1)
    return key, valid, rel


def _attend_chunk(q_c, kf, vf, key_idx, valid, rel_idx, rpb_flat, extra_k, extra_v, window):
    """Attention of one chunk of queries over their windows (+ the extra tokens)."""
    batch, c, heads_kv, groups, _ = q_c.shape
    k_w = kf[:, key_idx]  # [B, C, W, Hkv, D]
    v_w = vf[:, key_idx]  # [B, C, W, Hkv, Dv]
    logits = torch.einsum("bcmgd,bcwmd->bcmgw", q_c, k_w)
    if rpb_flat is not None:
        bias = rpb_flat[:, rel_idx]  # [H, C, W]
        bias = bias.permute(1, 0, 2).reshape(c, heads_kv, groups, window)
        logits = logits + bias
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    if extra_k is not None:
        logits_extra = torch.einsum("bcmgd,bnmd->bcmgn", q_c, extra_k)
        logits = torch.cat([logits, logits_extra], dim=-1)
    # A fully masked row (every logit -inf, e.g. under an rpb of -inf) attends to nothing: output
    # 0, LSE -inf, and no gradient flows back through it. Its logits are replaced by zeros before
    # the logsumexp and its probabilities by exact zeros after it (masked_fill selects, so the
    # NaN of exp(-inf - -inf) and its gradient never arise).
    dead = (logits == float("-inf")).all(dim=-1, keepdim=True)
    logits = logits.masked_fill(dead, 0.0)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, C, Hkv, G, 1]
    probs = torch.exp(logits - lse).masked_fill(dead, 0.0)
    lse = lse.masked_fill(dead, float("-inf")).squeeze(-1)
    out = torch.einsum("bcmgw,bcwmv->bcmgv", probs[..., :window], v_w)
    if extra_v is not None:
        out = out + torch.einsum("bcmgn,bnmv->bcmgv", probs[..., window:], extra_v)
    return out, lse


def neighborhood_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int | tuple[int, ...],
    stride: int | tuple[int, ...] = 1,
    dilation: int | tuple[int, ...] = 1,
    is_causal: bool | tuple[bool, ...] = False,
    scale: float | None = None,
    rpb: torch.Tensor | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference neighborhood attention (see module docstring).

    Args:
        q: ``[B, *spatial, H, D]``.
        k: ``[B, *spatial, H_kv, D]`` with ``H % H_kv == 0`` (GQA: query head ``h`` uses
            kv head ``h // (H // H_kv)``).
        v: ``[B, *spatial, H_kv, Dv]``.
        kernel_size, stride, dilation, is_causal: one value or one per spatial
            dimension, with the defaults of :func:`tokenmix.neighborhood_attention`.
        scale: logit scale; defaults to ``D ** -0.5``.
        rpb: optional ``[H, 2*k_1 - 1, ...]`` relative positional bias.
        additional_keys / additional_values: optional ``[B, N_extra, H_kv, D / Dv]``
            tokens attended by every query (no mask, no bias), in the same softmax.
        return_lse: also return the natural-log logsumexp of the logits.

    Returns:
        ``out`` ``[B, *spatial, H, Dv]`` in the input dtype, and if ``return_lse``
        also ``lse`` ``[B, *spatial, H]`` (float32; float64 for float64 inputs).
    """
    rank = spatial_rank(q)
    spatial_shape = tuple(q.shape[1 : rank + 1])
    kernel_size, stride, dilation, is_causal = normalize_window_args(
        rank, spatial_shape, kernel_size, stride, dilation, is_causal
    )
    check_tensors(q, k, v, rank, rpb, additional_keys, additional_values, kernel_size)

    in_dtype = q.dtype
    cdtype = accumulation_dtype(in_dtype)
    device = q.device
    batch = q.shape[0]
    heads, dim = q.shape[-2], q.shape[-1]
    heads_kv, dim_v = k.shape[-2], v.shape[-1]
    groups = heads // heads_kv
    n_tokens = math.prod(spatial_shape)
    window = math.prod(kernel_size)
    scale = resolve_scale(scale, dim)

    qf = (q.to(cdtype) * scale).reshape(batch, n_tokens, heads_kv, groups, dim)
    kf = k.to(cdtype).reshape(batch, n_tokens, heads_kv, dim)
    vf = v.to(cdtype).reshape(batch, n_tokens, heads_kv, dim_v)
    rpb_flat = None if rpb is None else rpb.to(cdtype).reshape(heads, -1)
    extra_k = extra_v = None
    n_extra = 0
    if additional_keys is not None:
        extra_k = additional_keys.to(cdtype)
        extra_v = additional_values.to(cdtype)
        n_extra = extra_k.shape[1]

    # Per dimension: the window rule's arguments and its [L] start/end bounds.
    dims = []
    for length, kern, s, d, c in zip(
        spatial_shape, kernel_size, stride, dilation, is_causal, strict=True
    ):
        bounds = window_bounds(length, kern, s, d, c, device)
        dims.append(((length, kern, s, d, c, device), bounds))

    per_query = batch * (window * heads_kv * (dim + dim_v) + heads * (window + n_extra))
    chunk = n_tokens if per_query == 0 else max(1, min(n_tokens, _CHUNK_BUDGET // per_query))

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (q, k, v, rpb, additional_keys, additional_values)
    )
    outs = []
    lses = []
    for begin in range(0, n_tokens, chunk):
        query_idx = torch.arange(
            begin, min(begin + chunk, n_tokens), device=device, dtype=torch.int64
        )
        c = query_idx.shape[0]
        key_idx, valid, rel_idx = _combine_windows(query_idx, spatial_shape, kernel_size, dims)

        q_c = qf[:, begin : begin + c]  # [B, C, Hkv, G, D]
        args = (q_c, kf, vf, key_idx, valid, rel_idx, rpb_flat, extra_k, extra_v, window)
        if needs_grad:
            # Recompute the chunk in backward: autograd then keeps only the
            # chunk's inputs, so memory stays bounded in backward too.
            out, lse = checkpoint(_attend_chunk, *args, use_reentrant=False)
        else:
            out, lse = _attend_chunk(*args)
        outs.append(out.reshape(batch, c, heads, dim_v))
        lses.append(lse.reshape(batch, c, heads))

    out = torch.cat(outs, dim=1).reshape(batch, *spatial_shape, heads, dim_v).to(in_dtype)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1).reshape(batch, *spatial_shape, heads)
    return out, lse
