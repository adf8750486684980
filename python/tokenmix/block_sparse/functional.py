"""Block-sparse attention: the public function."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._checks import require_bool
from .._cuda_driver import require_cuda_kernels
from .._utils import unit_feature_stride
from . import ops as _registrations  # noqa: F401  (fake kernels)
from .args import as_layout, check_layout_device, check_problem, resolve_scale
from .layout import BlockLayout

__all__ = ["block_sparse_attention"]


def _rule_args(layout: BlockLayout) -> tuple[Any, Any, Any, list[int]]:
    em = layout.element_mask
    if em is None:
        return layout.mask_bits, None, None, []
    return layout.mask_bits, em.q_doc, em.kv_doc, em.band_arg()


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout_tensors, static):
        (kv_num, kv_idx, full_num, full_idx, bits, q_doc, kv_doc, *q_side) = layout_tensors
        block_size, band, scale = static
        out, lse = torch.ops.tokenmix.block_sparse_forward(
            q,
            k,
            v,
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            block_size,
            bits,
            q_doc,
            kv_doc,
            band,
            scale,
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout_tensors = layout_tensors
        ctx.static = static
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        (kv_num, kv_idx, full_num, full_idx, bits, q_doc, kv_doc, *q_side) = ctx.layout_tensors
        q_num, q_idx, q_slots, full_q_num, full_q_idx = q_side
        block_size, band, scale = ctx.static
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = torch.ops.tokenmix.block_sparse_backward(
            grad_out.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            q_num,
            q_idx,
            q_slots,
            full_q_num,
            full_q_idx,
            block_size,
            bits,
            q_doc,
            kv_doc,
            band,
            scale,
            grad_lse.contiguous() if grad_lse is not None else None,
            torch.are_deterministic_algorithms_enabled(),
        )
        return dq, dk, dv, None, None


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: Any,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention with FlexAttention ``BlockMask`` semantics.

    ``q`` is ``[B, Tq, H, D]``, ``k`` is ``[B, Tk, H_kv, D]`` and ``v`` is ``[B, Tk, H_kv, Dv]``
    (heads last, as in the rest of tokenmix; Flex users pass ``x.transpose(1, 2)`` views, no copy
    is made), with ``H % H_kv == 0`` (GQA/MQA without repeating K/V). ``block_mask`` is a
    :class:`tokenmix.BlockLayout` or a Flex ``BlockMask`` (converted once and cached on it).
    Returns the output ``[B, Tq, H, Dv]`` and, with ``return_lse=True``, the natural-log LSE
    ``[B, Tq, H]`` (float32; float64 for float64 inputs), which is differentiable too. A query
    row that keeps no key gets output 0 and LSE ``-inf``.

    Example::

        >>> import torch, tokenmix
        >>> q = k = v = torch.randn(1, 256, 2, 32)
        >>> layout = tokenmix.BlockLayout.from_element_mask(
        ...     tokenmix.ElementMask.causal(), q_len=256, kv_len=256, block_size=64)
        >>> tokenmix.block_sparse_attention(q, k, v, layout).shape
        torch.Size([1, 256, 2, 32])
    """
    layout = as_layout(
        block_mask,
        q.shape[0] if isinstance(q, Tensor) and q.dim() == 4 else None,
        q.shape[2] if isinstance(q, Tensor) and q.dim() == 4 else None,
    )
    check_problem(q, k, v, layout)
    require_bool(return_lse, "return_lse")
    scale = resolve_scale(scale, q.shape[-1])
    check_layout_device(layout, q)
    if q.device.type not in ("cpu", "cuda", "meta"):
        raise NotImplementedError(
            f"tokenmix has no {q.device.type} kernel for block-sparse attention; use "
            "tokenmix.block_sparse.block_sparse_attention_reference on this device"
        )
    _ops.require_library()
    if q.device.type == "cuda":
        require_cuda_kernels()
    layout = layout.kernel_layout  # bits of whole 64 x 64 (or larger) squares: finer blocks
    bits, q_doc, kv_doc, band = _rule_args(layout)
    layout_tensors = (
        layout.kv_num_blocks,
        layout.kv_indices,
        layout.full_kv_num_blocks,
        layout.full_kv_indices,
        bits,
        q_doc,
        kv_doc,
        layout.q_num_blocks,
        layout.q_indices,
        layout.q_slots,
        layout.full_q_num_blocks,
        layout.full_q_indices,
    )
    static = (list(layout.block_size), band, scale)
    out, lse = _BlockSparseAttention.apply(
        unit_feature_stride(q),
        unit_feature_stride(k),
        unit_feature_stride(v),
        layout_tensors,
        static,
    )
    return (out, lse) if return_lse else out
