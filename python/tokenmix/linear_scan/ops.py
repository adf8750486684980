"""Fused scans: autograd and fake (meta) registrations, and the entry points used by
:mod:`tokenmix.linear_scan.functional`.

The ops (``torch.ops.tokenmix.linear_scan_forward/backward`` and
``delta_rule_forward/backward``) are defined and implemented in C++
(csrc/linear_scan/): CPU and CUDA kernels for all four.
Decays, gates, beta and states are passed to them in the accumulation dtype
(float32; float64 for float64 inputs); the conversions here are differentiable, so
gradients reach the caller's tensors in their dtypes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ops
from .._utils import accumulation_dtype, unit_feature_stride

# The largest head dim K of the CUDA scans (kLinearScanCudaMaxKeyDim in
# csrc/include/tokenmix/cuda/scan_layout.h); larger heads run the chunked PyTorch path.
CUDA_MAX_KEY_DIM = 256


def cuda_smem_bytes(key_dim: int, *, delta: bool, backward: bool) -> int:
    """Shared memory per block of the CUDA scan kernels (the forward, or the backward's
    largest kernel) for head dim ``key_dim``: scan_smem_floats / delta_smem_floats in
    csrc/include/tokenmix/cuda/, mirrored here (a test compares the two)."""
    chunk, keys, values, threads = 64, 32, 32, 256
    spans = (chunk // 16) * (chunk // 16 + 1) // 2  # kScanSpans: per-key gates' sub-chunk runs
    key_pad = -(-key_dim // keys) * keys
    if delta:
        floats = key_pad * values + 3 * chunk * values + 2 * chunk * chunk + 2 * chunk * keys
        floats += 4 * chunk
        if backward:
            floats += 2 * chunk * values + 2 * chunk * chunk + keys * values + 5 * chunk + threads
    else:
        floats = key_pad * values + chunk * values + chunk * chunk + 5 * chunk * keys + keys + chunk
        floats += spans * keys
        if backward:
            floats += keys * values + chunk * values + chunk * chunk
    return 4 * floats


def kernels_available() -> bool:
    """True when the compiled scan kernels are loaded."""
    return _ops.load_error is None and hasattr(torch.ops.tokenmix, "linear_scan_forward")


def _acc_dtype(q: Tensor) -> torch.dtype:
    return accumulation_dtype(q.dtype)


def _acc(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if x is None else x.to(dtype).contiguous()


def _cu(cu_seqlens: Tensor | None) -> Tensor | None:
    return None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()


def fused_linear_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    gk: Tensor | None,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Chunked scan S_t = diag(e^{gk_t}) e^{g_t} S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t."""
    acc = _acc_dtype(q)
    return torch.ops.tokenmix.linear_scan_forward(
        unit_feature_stride(q),
        unit_feature_stride(k),
        unit_feature_stride(v),
        _acc(g, acc),
        _acc(gk, acc),
        _acc(initial_state, acc),
        _cu(cu_seqlens),
        float(scale),
    )


def fused_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Chunked (gated) delta rule S_t = e^{g_t}(I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T."""
    acc = _acc_dtype(q)
    return torch.ops.tokenmix.delta_rule_forward(
        unit_feature_stride(q),
        unit_feature_stride(k),
        unit_feature_stride(v),
        _acc(beta, acc),
        _acc(g, acc),
        _acc(initial_state, acc),
        _cu(cu_seqlens),
        float(scale),
    )


def _num_seqs(q: Tensor, cu_seqlens: Tensor | None) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _scan_outputs_fake(q: Tensor, v: Tensor, cu_seqlens: Tensor | None):
    b, t, h, kd = q.shape
    out = q.new_empty((b, t, h, v.shape[-1]))
    state = q.new_empty((_num_seqs(q, cu_seqlens), h, kd, v.shape[-1]), dtype=_acc_dtype(q))
    return out, state


def _grad_like(x: Tensor | None, q: Tensor) -> Tensor:
    """Fake gradient of an optional accumulation-dtype input (empty when absent)."""
    acc = _acc_dtype(q)
    return q.new_empty(x.shape, dtype=acc) if x is not None else q.new_empty((0,), dtype=acc)


def _register_autograd(op_name: str, backward_op) -> None:
    """Both scans take (q, k, v, a, b, initial_state, cu_seqlens, scale) and their
    backward ops return the gradients of the first six inputs, so one formula
    serves both: a = g, b = gk (linear scan) or a = beta, b = g (delta rule)."""

    def setup(ctx, inputs, output):
        *tensors, scale = inputs
        ctx.save_for_backward(*tensors)
        ctx.scale = scale

    def backward(ctx, grad_out, grad_state):
        saved = ctx.saved_tensors
        q, v = saved[0], saved[2]
        if grad_out is None:
            grad_out = q.new_zeros((*q.shape[:-1], v.shape[-1]))
        grads = backward_op(
            grad_out.contiguous(),
            None if grad_state is None else grad_state.contiguous(),
            *saved,
            ctx.scale,
        )
        # Gradients only for the inputs that were given; none for cu_seqlens, scale.
        return (
            *(g if x is not None else None for g, x in zip(grads, saved[:6], strict=True)),
            None,
            None,
        )

    torch.library.register_autograd(op_name, backward, setup_context=setup)


if kernels_available():

    @torch.library.register_fake("tokenmix::linear_scan_forward")
    def _linear_scan_forward_fake(q, k, v, g, gk, initial_state, cu_seqlens, scale):
        return _scan_outputs_fake(q, v, cu_seqlens)

    @torch.library.register_fake("tokenmix::linear_scan_backward")
    def _linear_scan_backward_fake(
        grad_out, grad_final_state, q, k, v, g, gk, initial_state, cu_seqlens, scale
    ):
        _, state = _scan_outputs_fake(q, v, cu_seqlens)
        grads = (q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape))
        return (*grads, _grad_like(g, q), _grad_like(gk, q), state)

    @torch.library.register_fake("tokenmix::delta_rule_forward")
    def _delta_rule_forward_fake(q, k, v, beta, g, initial_state, cu_seqlens, scale):
        return _scan_outputs_fake(q, v, cu_seqlens)

    @torch.library.register_fake("tokenmix::delta_rule_backward")
    def _delta_rule_backward_fake(
        grad_out, grad_final_state, q, k, v, beta, g, initial_state, cu_seqlens, scale
    ):
        _, state = _scan_outputs_fake(q, v, cu_seqlens)
        grads = (q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape))
        return (*grads, _grad_like(beta, q), _grad_like(g, q), state)

    _register_autograd("tokenmix::linear_scan_forward", torch.ops.tokenmix.linear_scan_backward)
    _register_autograd("tokenmix::delta_rule_forward", torch.ops.tokenmix.delta_rule_backward)
    _ops.forbid_double_backward("tokenmix::linear_scan_backward")
    _ops.forbid_double_backward("tokenmix::delta_rule_backward")
