"""Autograd and fake (meta) registrations of the neighborhood-attention ops.

The ops themselves (``torch.ops.tokenmix.na_forward`` / ``na_backward``) are
defined and implemented in C++ (csrc/neighborhood/na_ops.cpp).
"""

from __future__ import annotations

import torch

from .. import _ops
from .._utils import accumulation_dtype, unit_feature_stride

if _ops.load_error is None:

    @torch.library.register_fake("tokenmix::na_forward")
    def _na_forward_fake(
        q,
        k,
        v,
        rpb,
        additional_keys,
        additional_values,
        kernel_size,
        stride,
        dilation,
        is_causal,
        scale,
    ):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        acc = accumulation_dtype(q.dtype)
        lse = q.new_empty(q.shape[:-1], dtype=acc)
        return out, lse

    @torch.library.register_fake("tokenmix::na_backward")
    def _na_backward_fake(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        rpb,
        additional_keys,
        additional_values,
        kernel_size,
        stride,
        dilation,
        is_causal,
        scale,
        grad_lse=None,
        deterministic=False,
    ):
        acc = accumulation_dtype(q.dtype)
        drpb = (
            q.new_empty(rpb.shape, dtype=acc) if rpb is not None else q.new_empty((0,), dtype=acc)
        )
        dek = (
            q.new_empty(additional_keys.shape) if additional_keys is not None else q.new_empty((0,))
        )
        dev = (
            q.new_empty(additional_values.shape)
            if additional_values is not None
            else q.new_empty((0,))
        )
        # The real op returns fresh contiguous gradients whatever the inputs' strides.
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), drpb, dek, dev

    def _setup_context(ctx, inputs, output):
        (q, k, v, rpb, ek, ev, kernel_size, stride, dilation, is_causal, scale) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, rpb, ek, ev)
        ctx.window = (kernel_size, stride, dilation, is_causal, scale)

    def _backward(ctx, grad_out, grad_lse):
        grads = backward(grad_out, grad_lse, ctx.saved_tensors, ctx.window)
        return (*grads, None, None, None, None, None)

    torch.library.register_autograd("tokenmix::na_forward", _backward, setup_context=_setup_context)
    _ops.forbid_double_backward("tokenmix::na_backward")


def forward(q, k, v, rpb, ek, ev, window):
    """``torch.ops.tokenmix.na_forward`` on validated arguments: ``window`` is the normalized
    ``(kernel_size, stride, dilation, is_causal, scale)``. Returns ``(out, lse)``."""
    kernel_size, stride, dilation, is_causal, scale = window
    return torch.ops.tokenmix.na_forward(
        unit_feature_stride(q),
        unit_feature_stride(k),
        unit_feature_stride(v),
        rpb.contiguous() if rpb is not None else None,
        unit_feature_stride(ek) if ek is not None else None,
        unit_feature_stride(ev) if ev is not None else None,
        list(kernel_size),
        list(stride),
        list(dilation),
        [int(c) for c in is_causal],
        scale,
    )


def backward(grad_out, grad_lse, saved, window):
    """The gradients ``(dq, dk, dv, drpb, dek, dev)`` of :func:`forward` from its saved
    ``(q, k, v, out, lse, rpb, ek, ev)``. A row whose saved LSE is ``-inf`` attended nothing:
    no gradient flows back through it."""
    q, k, v, out, lse, rpb, ek, ev = saved
    kernel_size, stride, dilation, is_causal, scale = window
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, drpb, dek, dev = torch.ops.tokenmix.na_backward(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        rpb,
        ek,
        ev,
        kernel_size,
        stride,
        dilation,
        is_causal,
        scale,
        grad_lse.contiguous() if grad_lse is not None else None,
        # The CUDA backward adds the rpb gradient with float atomics unless asked not to.
        torch.are_deterministic_algorithms_enabled(),
    )
    drpb = drpb.to(rpb.dtype) if rpb is not None else None
    dek = dek if ek is not None else None
    dev = dev if ev is not None else None
    return dq, dk, dv, drpb, dek, dev
