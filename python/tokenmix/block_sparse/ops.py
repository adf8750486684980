"""Fake (meta) kernels of the block-sparse ops, and their guard against direct differentiation.

The ops (``torch.ops.tokenmix.block_sparse_forward`` / ``block_sparse_backward``) are defined
and implemented in C++ (csrc/block_sparse/). Gradients go through
:func:`tokenmix.block_sparse_attention`, whose autograd function also carries the layout's
q-side lists to the backward op.
"""

from __future__ import annotations

import torch

from .. import _ops
from .._utils import accumulation_dtype

if _ops.load_error is None and hasattr(torch.ops.tokenmix, "block_sparse_forward"):

    @torch.library.register_fake("tokenmix::block_sparse_forward")
    def _forward_fake(
        q,
        k,
        v,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        block_size,
        mask_bits,
        q_doc,
        kv_doc,
        band,
        scale,
    ):
        batch, q_len, heads, _ = q.shape
        out = q.new_empty((batch, q_len, heads, v.shape[-1]))
        lse = q.new_empty((batch, q_len, heads), dtype=accumulation_dtype(q.dtype))
        return out, lse

    @torch.library.register_fake("tokenmix::block_sparse_backward")
    def _backward_fake(grad_out, q, k, v, *args, **kwargs):
        # Fresh contiguous gradients, whatever the inputs' strides.
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _not_differentiable(op_name: str) -> None:
        def setup(ctx, inputs, output):
            pass

        def backward(ctx, *grads):
            raise RuntimeError(
                f"{op_name} is not differentiable by itself: call "
                "tokenmix.block_sparse_attention, which supplies the layout's q-side lists "
                "to the backward"
            )

        torch.library.register_autograd(op_name, backward, setup_context=setup)

    _not_differentiable("tokenmix::block_sparse_forward")
    _ops.forbid_double_backward("tokenmix::block_sparse_backward")
