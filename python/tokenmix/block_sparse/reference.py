"""Pure-PyTorch reference of block-sparse attention: the definition the kernels are tested against.

``out[b, q, h] = sum_k softmax_k(scale * q . k)[keep] v[k]`` over the keys ``k`` that the
layout keeps for query ``q`` (see :mod:`tokenmix.block_sparse.layout`), with FlexAttention's
semantics: full blocks keep every element, partial blocks apply the element rule, keys at or past
``kv_len`` are never kept, and a row that keeps no key gets output 0 and LSE ``-inf`` (and sends
no gradient back).

Memory-bounded: queries are processed in chunks whose logits and element mask stay under a fixed
budget (never ``q_len x kv_len`` at once), each chunk under activation checkpointing when
gradients are needed. It works on any device, computes in float32 (float64 for float64 inputs),
and is differentiable with respect to q, k and v.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .._utils import accumulation_dtype
from .args import as_layout, check_problem, resolve_scale

__all__ = ["block_sparse_attention_reference"]

# Upper bound (elements) on one chunk's logits.
_CHUNK_BUDGET = 1 << 22


def _chunk(q, k, v, keep, scale):
    """Attention of a query chunk ``[B, n, H, D]`` over all keys, with ``keep``
    ``[B or 1, H or 1, n, Tk]``."""
    acc = accumulation_dtype(q.dtype)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    logits = logits.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, H, n]
    dead = torch.isinf(lse) & (lse < 0)
    safe = torch.where(dead, torch.zeros_like(lse), lse)
    p = torch.where(keep, torch.exp(logits - safe.unsqueeze(-1)), torch.zeros_like(logits))
    out = torch.einsum("bhqk,bkhd->bqhd", p, v.to(acc))
    return out, lse.transpose(1, 2)


def block_sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference of :func:`tokenmix.block_sparse_attention` (same arguments and results)."""
    layout = as_layout(
        block_mask,
        q.shape[0] if isinstance(q, Tensor) and q.dim() == 4 else None,
        q.shape[2] if isinstance(q, Tensor) and q.dim() == 4 else None,
    )
    check_problem(q, k, v, layout)
    scale = resolve_scale(scale, q.shape[-1])
    layout = layout.to(q.device)
    batch, q_len, heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    kx = k.repeat_interleave(group, dim=2) if group > 1 else k
    vx = v.repeat_interleave(group, dim=2) if group > 1 else v
    keys = torch.arange(kv_len, device=q.device)
    rows = max(1, _CHUNK_BUDGET // max(1, batch * heads * kv_len))
    outs, lses = [], []
    for q0 in range(0, q_len, rows):
        qs = torch.arange(q0, min(q0 + rows, q_len), device=q.device)
        keep = layout.element_keep(qs, keys)  # [LB', LH, n, Tk]
        if keep.shape[1] not in (1, heads):  # one layout head per kv head
            keep = keep.repeat_interleave(heads // keep.shape[1], dim=1)
        qc = q[:, q0 : q0 + rows]
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out, lse = checkpoint(_chunk, qc, kx, vx, keep, scale, use_reentrant=False)
        else:
            out, lse = _chunk(qc, kx, vx, keep, scale)
        outs.append(out)
        lses.append(lse)
    if outs:
        out = torch.cat(outs, dim=1).to(q.dtype)
        lse = torch.cat(lses, dim=1)
    else:
        out = q.new_zeros(batch, 0, heads, v.shape[-1])
        lse = q.new_zeros(batch, 0, heads, dtype=accumulation_dtype(q.dtype))
    return (out, lse) if return_lse else out
