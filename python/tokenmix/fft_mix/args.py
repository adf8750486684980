"""Argument checks of the FFT-mixing operators.

Every error is a ``ValueError`` (``TypeError`` for a wrong Python type) that names the
offending argument. The generic pieces come from :mod:`tokenmix._checks`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import as_int, check_supported_dtype, require_bool, require_tensor
from .._utils import accumulation_dtype

__all__ = [
    "CUDA_MAX_TRANSFORM",
    "check_fft_conv",
    "check_fourier_mix",
    "check_global_filter",
    "check_spectral_gate",
    "complex_as_real",
    "cuda_line_size",
    "cuda_transform_size",
]

# The CUDA fft_conv kernels take power-of-two transforms up to this length: one fused kernel up
# to 2048 points, more passes over a global-memory workspace beyond (kFftConvCudaMaxSize in
# csrc/include/tokenmix/fft_problem.h).
CUDA_MAX_TRANSFORM = 2048 * 2048


def cuda_transform_size(length: int, taps: int, causal: bool) -> int:
    """The transform length the CUDA fft_conv kernels use (a power of two), or 0 when they
    cannot run the problem (a transform longer than :data:`CUDA_MAX_TRANSFORM`).

    A causal convolution pads to ``L + Lk - 1`` rounded up. A circular one transforms ``L``
    itself when it is a power of two; any other ``L`` computes the linear convolution (same
    padding) and folds its tail back: ``y[t] = z[t] + z[t + L]``. The rule of
    ``fft_conv_cuda_size`` in csrc/include/tokenmix/fft_problem.h."""
    n = 2
    if not causal:
        while n < length:
            n *= 2
        if n == length:
            return n if n <= CUDA_MAX_TRANSFORM else 0
    while n < length + taps - 1:
        n *= 2
    return n if n <= CUDA_MAX_TRANSFORM else 0


# fourier_mix, global_filter and spectral_gate on CUDA transform each line (a row, a column, a
# channel's tokens) in one thread block: a power of two directly, any other length n by
# Bluestein's algorithm over the power of two >= 2n - 1; at most CUDA_MAX_LINE points either way
# (kFftConvCudaBlockSize in csrc/include/tokenmix/fft_problem.h).
CUDA_MAX_LINE = 2048


def cuda_line_size(n: int) -> int:
    """The in-block transform length the CUDA kernels of ``fourier_mix``, ``global_filter``
    and ``spectral_gate`` use for an axis of ``n`` points (``n`` when it is a power of two,
    else the power of two ``>= 2n - 1`` of Bluestein's algorithm), or 0 when it exceeds
    :data:`CUDA_MAX_LINE` (powers of two up to 2048, other lengths up to 1023): those
    problems run the ``torch.fft`` compositions. The rule of ``fft_line_cuda_size`` in
    csrc/include/tokenmix/fft_problem.h."""
    if n < 1:
        return 0
    need = n if n & (n - 1) == 0 else 2 * n - 1
    m = 1
    while m < need:
        m *= 2
    return m if m <= CUDA_MAX_LINE else 0


def _check_input(x: Any, name: str, rank: int, layout: str) -> Tensor:
    x = require_tensor(x, name)
    check_supported_dtype(x, name)
    if x.dim() != rank:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one token, got shape {tuple(x.shape)}")
    return x


def _same_device(x: Tensor, x_name: str, t: Tensor, name: str) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} device {t.device} must match {x_name} device {x.device}")


def _param_dtype(u: Tensor, t: Tensor, name: str) -> None:
    """Filters and biases may be in the input's dtype or in float32 (float64 with float64)."""
    allowed = {u.dtype, accumulation_dtype(u.dtype)}
    if t.dtype not in allowed:
        raise ValueError(
            f"{name} dtype {t.dtype} must be the input's dtype {u.dtype} or "
            f"{accumulation_dtype(u.dtype)}"
        )


def check_fft_conv(
    u: Any,
    k: Any,
    causal: Any,
    bias: Any,
    pre_gate: Any,
    post_gate: Any,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Checks ``fft_conv``'s arguments; returns ``(u, k, pre_gate, post_gate)`` with the gates
    broadcast to ``u``'s shape (as views: no copies)."""
    u = _check_input(u, "u", 3, "[B, L, C] (tokens before channels)")
    k = require_tensor(k, "k")
    require_bool(causal, "causal")
    b, length, c = u.shape
    if k.dim() != 2 or k.shape[0] != c:
        raise ValueError(f"k must be [C, Lk] = [{c}, Lk], got shape {tuple(k.shape)}")
    if not 1 <= k.shape[1] <= length:
        raise ValueError(f"k must have 1 <= Lk <= L = {length} taps, got Lk = {k.shape[1]}")
    _param_dtype(u, k, "k")
    _same_device(u, "u", k, "k")
    if bias is not None:
        bias = require_tensor(bias, "bias")
        if tuple(bias.shape) != (c,):
            raise ValueError(f"bias must be [C] = [{c}], got shape {tuple(bias.shape)}")
        _param_dtype(u, bias, "bias")
        _same_device(u, "u", bias, "bias")
    gates = []
    for name, g in (("pre_gate", pre_gate), ("post_gate", post_gate)):
        if g is None:
            gates.append(None)
            continue
        g = require_tensor(g, name)
        if g.dtype != u.dtype:
            raise ValueError(f"{name} dtype {g.dtype} must match u dtype {u.dtype}")
        _same_device(u, "u", g, name)
        try:
            gates.append(g.expand(b, length, c))
        except RuntimeError:
            raise ValueError(
                f"{name} must broadcast to u's shape {tuple(u.shape)}, got {tuple(g.shape)}"
            ) from None
    return u, k, gates[0], gates[1]


def check_fourier_mix(x: Any) -> Tensor:
    x = _check_input(x, "x", 3, "[B, L, C] (tokens before channels)")
    if x.shape[2] < 1:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    return x


def complex_as_real(t: Tensor, name: str, shape: tuple, dtype: torch.dtype) -> Tensor:
    """A complex ``shape`` tensor, or a real ``shape + (2,)`` one, as a contiguous real
    ``shape + (2,)`` tensor of ``dtype`` (differentiably)."""
    want = tuple(shape)
    if t.is_complex():
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must be complex {list(want)}, got shape {tuple(t.shape)}")
        t = torch.view_as_real(t)
    else:
        if tuple(t.shape) != want + (2,):
            raise ValueError(
                f"{name} must be complex {list(want)} or real {list(want + (2,))}, got shape "
                f"{tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating or complex tensor, got {t.dtype}")
    return t.to(dtype).contiguous()


def check_global_filter(x: Any, weight: Any) -> tuple[Tensor, Tensor]:
    """Returns ``(x, weight)`` with the weight as a real ``[H, W//2+1, C, 2]`` tensor in the
    accumulation dtype."""
    x = _check_input(x, "x", 4, "[B, H, W, C] (a 2-D token grid before channels)")
    weight = require_tensor(weight, "weight")
    _same_device(x, "x", weight, "weight")
    _, h, w, c = x.shape
    if w < 1 or c < 1:
        raise ValueError(f"x must have W >= 1 and C >= 1, got shape {tuple(x.shape)}")
    return x, complex_as_real(weight, "weight", (h, w // 2 + 1, c), accumulation_dtype(x.dtype))


def check_spectral_gate(
    x: Any, gate: Any, heads: Any, activation: Any, bias: Any
) -> tuple[Tensor, Tensor, Tensor | None, int, bool]:
    """Returns ``(x, gate, bias, heads, modrelu)``: the gate as a real ``[B, heads, L//2+1,
    2]`` tensor and the bias as ``[heads, L//2+1]``, both contiguous in the accumulation
    dtype."""
    x = _check_input(x, "x", 3, "[B, L, C] (tokens before channels)")
    heads = as_int(heads, "heads")
    b, length, c = x.shape
    if heads < 1 or c % heads != 0:
        raise ValueError(f"heads must be a positive divisor of C = {c}, got {heads}")
    if activation not in (None, "modrelu"):
        raise ValueError(f"activation must be None or 'modrelu', got {activation!r}")
    gate = require_tensor(gate, "gate")
    _same_device(x, "x", gate, "gate")
    acc = accumulation_dtype(x.dtype)
    bins = length // 2 + 1
    shape = (b, heads, bins)
    real_shape = tuple(gate.shape[:-1]) if not gate.is_complex() else tuple(gate.shape)
    if real_shape != shape and len(real_shape) == 3:
        try:  # a gate shared across the batch ([1, heads, F])
            gate = gate.expand(*shape) if gate.is_complex() else gate.expand(*shape, 2)
        except RuntimeError:
            pass
    gate = complex_as_real(gate, "gate", shape, acc)
    if bias is not None:
        if activation != "modrelu":
            raise ValueError("bias is modReLU's bias: pass activation='modrelu' to use it")
        bias = require_tensor(bias, "bias")
        _same_device(x, "x", bias, "bias")
        if bias.is_complex() or not bias.is_floating_point():
            raise ValueError(f"bias must be a real floating tensor, got {bias.dtype}")
        try:
            bias = torch.broadcast_to(bias, (heads, bins))
        except RuntimeError:
            raise ValueError(
                f"bias must broadcast to [heads, L//2+1] = [{heads}, {bins}], got shape "
                f"{tuple(bias.shape)}"
            ) from None
        bias = bias.to(acc).contiguous()
    return x, gate, bias, heads, activation == "modrelu"
