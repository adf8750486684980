"""The FFT-mixing family: long convolution (``fft_conv``), FNet (``fourier_mix``), GFNet's
global filter (``global_filter``) and adaptive spectral gating (``spectral_gate``), over
channels-last ``[B, L, C]`` (``[B, H, W, C]`` for the global filter) inputs."""

from .functional import (
    fft_conv,
    fourier_mix,
    fused_kernels_available,
    global_filter,
    spectral_gate,
)
from .reference import (
    fft_conv_reference,
    fourier_mix_reference,
    global_filter_reference,
    spectral_gate_reference,
)

__all__ = [
    "fft_conv",
    "fft_conv_reference",
    "fourier_mix",
    "fourier_mix_reference",
    "fused_kernels_available",
    "global_filter",
    "global_filter_reference",
    "spectral_gate",
    "spectral_gate_reference",
]
