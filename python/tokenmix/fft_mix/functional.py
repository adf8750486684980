"""FFT token mixing: long convolution (Hyena / H3 / SSM kernels), FNet, GFNet's global
filter and adaptive spectral gating (FFTNet / SPECTRE), channels last.

CPU tensors run tokenmix's fused kernels (transform, pointwise product and inverse
transform per block of channels while the data is in cache; docs/fft_mixing.md). On CUDA
(float32, float16, bfloat16), ``fft_conv`` runs tokenmix's kernels for transforms of up to
2^22 points (one fused kernel up to 2048, more passes beyond;
:func:`tokenmix.fft_mix.args.cuda_transform_size`), and the other three operators for
transformed axes of up to 2048 points (powers of two) or 1023 (any other length;
:func:`tokenmix.fft_mix.args.cuda_line_size`). Everything else, and installs without the
compiled library, runs the ``torch.fft`` compositions of :mod:`tokenmix.fft_mix.reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._cuda_driver import cuda_kernels_usable as _cuda_kernels_usable
from . import ops, reference
from .args import (
    check_fft_conv,
    check_fourier_mix,
    check_global_filter,
    check_spectral_gate,
    cuda_line_size,
    cuda_transform_size,
)

__all__ = [
    "fft_conv",
    "fourier_mix",
    "fused_kernels_available",
    "global_filter",
    "spectral_gate",
]


def fused_kernels_available() -> bool:
    """Whether CPU inputs run in tokenmix's fused FFT-mixing kernels."""
    return ops.kernels_available()


def _fused(x: Tensor, *lengths: int) -> bool:
    """Whether fourier_mix / global_filter / spectral_gate run tokenmix's kernels: every CPU
    problem; on CUDA, float32/16/bf16 problems whose transformed axes all have
    :func:`cuda_line_size`."""
    if x.device.type == "cpu":
        return ops.kernels_available()
    if x.device.type != "cuda" or x.dtype == torch.float64:
        return False
    return all(cuda_line_size(n) > 0 for n in lengths) and _cuda_kernels_usable()


def _fused_conv(u: Tensor, k: Tensor, bias: Tensor | None, causal: bool) -> bool:
    """Whether fft_conv runs tokenmix's kernels: every CPU problem; on CUDA, float32/16/bf16
    problems with a transform of at most 2^22 points (:func:`cuda_transform_size`), in a build
    with CUDA kernels and a driver that can run them. Everything else runs the torch.fft
    composition."""
    if u.device.type == "cpu":
        return ops.kernels_available()
    if u.device.type != "cuda":
        return False
    if torch.float64 in (u.dtype, k.dtype) or (bias is not None and bias.dtype == torch.float64):
        return False
    if cuda_transform_size(u.shape[1], k.shape[1], causal) == 0:
        return False
    return _cuda_kernels_usable()


def fft_conv(
    u: Tensor,
    k: Tensor,
    *,
    causal: bool = True,
    bias: Tensor | None = None,
    pre_gate: Tensor | None = None,
    post_gate: Tensor | None = None,
) -> Tensor:
    """Long convolution over the token axis: ``post_gate * (k * (pre_gate * u)) + bias * u``.

    Args:
        u: ``[B, L, C]`` (any strides, so a ``[B, C, L]`` tensor's ``.transpose(1, 2)`` view
            works without a copy); float32, float64, float16 or bfloat16.
        k: ``[C, Lk]`` filters, ``1 <= Lk <= L``, in ``u``'s dtype or float32 (float64 with
            float64 inputs).
        causal: ``True`` for the linear (causal) convolution
            ``y[t] = sum_{s <= t} k[t - s] v[s]``, which is what zero-padding to ``2L``
            gives; ``False`` for the circular convolution of length ``L``.
        bias: optional ``[C]`` skip weights (Hyena's ``D``), same dtype rule as ``k``.
        pre_gate, post_gate: optional gates broadcastable to ``u``'s shape, in ``u``'s dtype.

    Returns:
        ``[B, L, C]`` in ``u``'s dtype. Half-precision inputs are computed in float32.

    Every ``L`` works: linear convolutions pad to the next ``2^a 3^b 5^c >= L + Lk - 1``;
    circular ones transform length ``L`` exactly (mixed radix, Bluestein for large prime
    factors). Gradients reach every tensor argument.

    Example::

        >>> import torch, tokenmix
        >>> u = torch.randn(2, 1000, 64)
        >>> k = torch.randn(64, 1000) / 1000
        >>> tokenmix.fft_conv(u, k).shape
        torch.Size([2, 1000, 64])
    """
    u, k, pre_gate, post_gate = check_fft_conv(u, k, causal, bias, pre_gate, post_gate)
    if _fused_conv(u, k, bias, causal):
        return torch.ops.tokenmix.fft_conv_forward(u, k, bias, pre_gate, post_gate, causal)
    return reference.fft_conv_reference(
        u, k, causal=causal, bias=bias, pre_gate=pre_gate, post_gate=post_gate
    )


def fourier_mix(x: Tensor) -> Tensor:
    """FNet's token mixing: ``Re(FFT_tokens(FFT_channels(x)))`` for ``x`` of shape
    ``[B, L, C]``. No parameters; its gradient is the same map applied to the incoming
    gradient (the map is a real symmetric matrix).

    Example::

        >>> import torch, tokenmix
        >>> tokenmix.fourier_mix(torch.randn(2, 128, 64)).shape
        torch.Size([2, 128, 64])
    """
    x = check_fourier_mix(x)
    if _fused(x, x.shape[1], x.shape[2]):
        return torch.ops.tokenmix.fourier_mix(x)
    return reference.fourier_mix_reference(x)


def global_filter(x: Tensor, weight: Tensor) -> Tensor:
    """GFNet's global filter ``irfft2(rfft2(x) * weight)`` over the ``[H, W]`` token grid of
    ``x`` (``[B, H, W, C]``), orthonormal both ways.

    ``weight`` is complex ``[H, W//2+1, C]`` or real ``[H, W//2+1, C, 2]`` (GFNet stores it
    that way); gradients reach both arguments.

    Example::

        >>> import torch, tokenmix
        >>> x = torch.randn(2, 14, 14, 96)
        >>> w = torch.randn(14, 8, 96, 2) * 0.02
        >>> tokenmix.global_filter(x, w).shape
        torch.Size([2, 14, 14, 96])
    """
    x, weight_real = check_global_filter(x, weight)
    if _fused(x, x.shape[1], x.shape[2]):
        return torch.ops.tokenmix.global_filter_forward(x, weight_real)
    return reference.global_filter_reference(x, weight_real)


def spectral_gate(
    x: Tensor,
    gate: Tensor,
    *,
    heads: int,
    activation: str | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Adaptive spectral filtering (FFTNet / SPECTRE) of ``x`` (``[B, L, C]``,
    ``C = heads * d``).

    Per head: ``rfft`` over tokens, times the complex ``gate`` (``[B, heads, L//2+1]``, or
    real ``[..., 2]``; ``[1, heads, L//2+1]`` is shared by the batch), then, with
    ``activation="modrelu"``, ``relu(|z| + bias) * z / |z|`` (0 where ``z == 0``; ``bias``
    broadcast to ``[heads, L//2+1]``, 0 when omitted), then ``irfft``. Default normalization:
    a gate of ones is the identity. Gradients reach ``x``, ``gate`` and ``bias``.

    Example::

        >>> import torch, tokenmix
        >>> x = torch.randn(2, 256, 64)
        >>> gate = torch.randn(2, 4, 129, dtype=torch.complex64)
        >>> tokenmix.spectral_gate(x, gate, heads=4, activation="modrelu").shape
        torch.Size([2, 256, 64])
    """
    x, gate_real, bias_t, heads, modrelu = check_spectral_gate(x, gate, heads, activation, bias)
    if _fused(x, x.shape[1]):
        return torch.ops.tokenmix.spectral_gate_forward(x, gate_real, bias_t, heads, modrelu)
    return reference.spectral_gate_reference(
        x, gate_real, heads=heads, activation=activation, bias=bias_t
    )
