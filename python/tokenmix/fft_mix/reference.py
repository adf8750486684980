"""Reference FFT mixing: the ``torch.fft`` compositions that define each operator.

Each function is the plain composition a user would write: every intermediate is a full
complex tensor. They are the definitions the fused kernels are tested against, and the
composites ``bench/bench_fft.py`` times. Half-precision inputs are computed in float32
and the result is cast back, as the fused kernels do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._utils import accumulation_dtype

__all__ = [
    "fft_conv_reference",
    "fourier_mix_reference",
    "global_filter_reference",
    "modrelu",
    "spectral_gate_reference",
]


def _up(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if x is None else x.to(dtype)


def fft_conv_reference(
    u: Tensor,
    k: Tensor,
    *,
    causal: bool = True,
    bias: Tensor | None = None,
    pre_gate: Tensor | None = None,
    post_gate: Tensor | None = None,
) -> Tensor:
    """``post_gate * (k * (pre_gate * u)) + bias * u`` over the token axis of ``[B, L, C]``.

    ``causal=True``: linear convolution, by zero-padding to ``2L``.
    ``causal=False``: circular convolution of length ``L``.
    """
    acc = accumulation_dtype(u.dtype)
    length = u.shape[1]
    uf = u.to(acc)
    v = uf if pre_gate is None else uf * pre_gate.to(acc)
    n = 2 * length if causal else length
    v_hat = torch.fft.rfft(v, n=n, dim=1)
    k_hat = torch.fft.rfft(k.to(acc), n=n, dim=-1)
    y = torch.fft.irfft(v_hat * k_hat.transpose(0, 1), n=n, dim=1)[:, :length]
    if post_gate is not None:
        y = y * post_gate.to(acc)
    if bias is not None:
        y = y + bias.to(acc) * uf
    return y.to(u.dtype)


def fourier_mix_reference(x: Tensor) -> Tensor:
    """FNet's mixing: the real part of the 2-D DFT over tokens and channels of ``[B, L, C]``."""
    xf = x.to(accumulation_dtype(x.dtype))
    return torch.fft.fft(torch.fft.fft(xf, dim=2), dim=1).real.to(x.dtype)


def global_filter_reference(x: Tensor, weight: Tensor) -> Tensor:
    """GFNet's filter ``irfft2(rfft2(x) * weight)`` over the ``[H, W]`` grid of ``[B, H, W, C]``,
    orthonormal both ways. ``weight`` is complex ``[H, W//2+1, C]`` or real ``[..., 2]``."""
    acc = accumulation_dtype(x.dtype)
    if not weight.is_complex():
        weight = torch.view_as_complex(weight.to(acc).contiguous())
    h, w = x.shape[1], x.shape[2]
    spec = torch.fft.rfft2(x.to(acc), dim=(1, 2), norm="ortho")
    y = torch.fft.irfft2(spec * weight, s=(h, w), dim=(1, 2), norm="ortho")
    return y.to(x.dtype)


def modrelu(z: Tensor, bias: Tensor) -> Tensor:
    """modReLU ``relu(|z| + bias) * z / |z|``, and 0 where ``z == 0``."""
    mag = z.abs()
    safe = torch.where(mag > 0, mag, torch.ones_like(mag))
    factor = torch.where(mag > 0, torch.relu(mag + bias) / safe, torch.zeros_like(mag))
    return z * factor


def spectral_gate_reference(
    x: Tensor,
    gate: Tensor,
    *,
    heads: int,
    activation: str | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Adaptive spectral filtering (FFTNet/SPECTRE) of ``[B, L, C]``, ``C = heads * d``.

    Per head: ``rfft`` over tokens, times the complex ``gate[b, head, f]`` (``[B, heads,
    L//2+1]``, or real ``[..., 2]``), then modReLU with ``bias`` (broadcast to ``[heads,
    L//2+1]``; 0 when omitted) if ``activation == "modrelu"``, then ``irfft``. Default
    (``"backward"``) normalization: a gate of ones is the identity.
    """
    acc = accumulation_dtype(x.dtype)
    b, length, c = x.shape
    if not gate.is_complex():
        gate = torch.view_as_complex(gate.to(acc).contiguous())
    spec = torch.fft.rfft(x.to(acc), dim=1).reshape(b, length // 2 + 1, heads, c // heads)
    spec = spec * gate.transpose(1, 2).unsqueeze(-1)
    if activation == "modrelu":
        bias_t = torch.zeros((), dtype=acc, device=x.device) if bias is None else bias.to(acc)
        bias_t = torch.broadcast_to(bias_t, (heads, length // 2 + 1)).transpose(0, 1)
        spec = modrelu(spec, bias_t.unsqueeze(-1))
    y = torch.fft.irfft(spec.reshape(b, length // 2 + 1, c), n=length, dim=1)
    return y.to(x.dtype)
