"""Fused FFT mixing: autograd and fake (meta) registrations of the ops defined in C++
(csrc/fft_mix/: CPU and CUDA kernels for every op).

Complex parameters travel as real ``[..., 2]`` tensors in the accumulation dtype; the
conversions in :mod:`tokenmix.fft_mix.args` are differentiable, so gradients reach the
caller's tensors in their own dtypes.
"""

from __future__ import annotations

import torch

from .. import _ops


def kernels_available() -> bool:
    """True when the compiled FFT-mixing kernels are loaded."""
    return _ops.load_error is None and hasattr(torch.ops.tokenmix, "fft_conv_forward")


if kernels_available():

    @torch.library.register_fake("tokenmix::fft_conv_forward")
    def _fft_conv_forward_fake(u, k, bias, pre_gate, post_gate, causal):
        return u.new_empty(u.shape)

    @torch.library.register_fake("tokenmix::fft_conv_backward")
    def _fft_conv_backward_fake(grad_out, u, k, bias, pre_gate, post_gate, causal):
        # Absent optional inputs get empty gradients.
        return (
            u.new_empty(u.shape),
            k.new_empty(k.shape),
            bias.new_empty(bias.shape) if bias is not None else u.new_empty((0,)),
            u.new_empty(u.shape if pre_gate is not None else (0,)),
            u.new_empty(u.shape if post_gate is not None else (0,)),
        )

    @torch.library.register_fake("tokenmix::fourier_mix")
    def _fourier_mix_fake(x):
        return x.new_empty(x.shape)

    @torch.library.register_fake("tokenmix::global_filter_forward")
    def _global_filter_forward_fake(x, weight):
        return x.new_empty(x.shape)

    @torch.library.register_fake("tokenmix::global_filter_backward")
    def _global_filter_backward_fake(grad_out, x, weight):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    @torch.library.register_fake("tokenmix::spectral_gate_forward")
    def _spectral_gate_forward_fake(x, gate, bias, heads, modrelu):
        return x.new_empty(x.shape)

    @torch.library.register_fake("tokenmix::spectral_gate_backward")
    def _spectral_gate_backward_fake(grad_out, x, gate, bias, heads, modrelu):
        dbias = bias.new_empty(bias.shape) if bias is not None else gate.new_empty((0,))
        return x.new_empty(x.shape), gate.new_empty(gate.shape), dbias

    def _conv_setup(ctx, inputs, output):
        u, k, bias, pre_gate, post_gate, causal = inputs
        ctx.save_for_backward(u, k, bias, pre_gate, post_gate)
        ctx.causal = causal

    def _conv_backward(ctx, grad):
        u, k, bias, pre_gate, post_gate = ctx.saved_tensors
        du, dk, dbias, dpre, dpost = torch.ops.tokenmix.fft_conv_backward(
            grad, u, k, bias, pre_gate, post_gate, ctx.causal
        )
        return (
            du,
            dk,
            dbias if bias is not None else None,
            dpre if pre_gate is not None else None,
            dpost if post_gate is not None else None,
            None,
        )

    torch.library.register_autograd(
        "tokenmix::fft_conv_forward", _conv_backward, setup_context=_conv_setup
    )

    def _fourier_setup(ctx, inputs, output):
        pass

    def _fourier_backward(ctx, grad):
        # Re(F_L (x) F_C) is a real symmetric matrix: the op is its own adjoint.
        return torch.ops.tokenmix.fourier_mix(grad)

    torch.library.register_autograd(
        "tokenmix::fourier_mix", _fourier_backward, setup_context=_fourier_setup
    )

    def _filter_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _filter_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return torch.ops.tokenmix.global_filter_backward(grad, x, weight)

    torch.library.register_autograd(
        "tokenmix::global_filter_forward", _filter_backward, setup_context=_filter_setup
    )

    def _gate_setup(ctx, inputs, output):
        x, gate, bias, heads, modrelu = inputs
        ctx.save_for_backward(x, gate, bias)
        ctx.heads, ctx.modrelu = heads, modrelu

    def _gate_backward(ctx, grad):
        x, gate, bias = ctx.saved_tensors
        dx, dgate, dbias = torch.ops.tokenmix.spectral_gate_backward(
            grad, x, gate, bias, ctx.heads, ctx.modrelu
        )
        return dx, dgate, dbias if bias is not None else None, None, None

    torch.library.register_autograd(
        "tokenmix::spectral_gate_forward", _gate_backward, setup_context=_gate_setup
    )

    for _name in ("fft_conv_backward", "global_filter_backward", "spectral_gate_backward"):
        _ops.forbid_double_backward(f"tokenmix::{_name}")
