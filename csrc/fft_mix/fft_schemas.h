// The schemas of the FFT-mixing ops, defined once for every backend that registers them.
//
// Channels last: u, x, gates and gradients are [B, L, C] ([B, H, W, C] for global_filter), any
// strides. Filters k are [C, Lk]; bias [C]. Complex parameters travel as real tensors with a
// trailing dimension of 2 in the accumulation dtype (float32; float64 for float64 inputs):
// global_filter's weight [H, W/2+1, C, 2], spectral_gate's gate [B, heads, L/2+1, 2] and its
// modReLU bias [heads, L/2+1]. Gradients of absent optional inputs are empty tensors.
#pragma once

namespace tokenmix::fft_op {

inline constexpr const char* kFftConvForwardSchema =
    "fft_conv_forward(Tensor u, Tensor k, Tensor? bias, Tensor? pre_gate, Tensor? post_gate, "
    "bool causal) -> Tensor";

// -> (grad_u, grad_k, grad_bias, grad_pre_gate, grad_post_gate)
inline constexpr const char* kFftConvBackwardSchema =
    "fft_conv_backward(Tensor grad_out, Tensor u, Tensor k, Tensor? bias, Tensor? pre_gate, "
    "Tensor? post_gate, bool causal) -> (Tensor, Tensor, Tensor, Tensor, Tensor)";

// Its own adjoint: the backward is the same op on grad_out.
inline constexpr const char* kFourierMixSchema = "fourier_mix(Tensor x) -> Tensor";

inline constexpr const char* kGlobalFilterForwardSchema =
    "global_filter_forward(Tensor x, Tensor weight) -> Tensor";

// -> (grad_x, grad_weight)
inline constexpr const char* kGlobalFilterBackwardSchema =
    "global_filter_backward(Tensor grad_out, Tensor x, Tensor weight) -> (Tensor, Tensor)";

inline constexpr const char* kSpectralGateForwardSchema =
    "spectral_gate_forward(Tensor x, Tensor gate, Tensor? bias, int heads, bool modrelu) "
    "-> Tensor";

// -> (grad_x, grad_gate, grad_bias)
inline constexpr const char* kSpectralGateBackwardSchema =
    "spectral_gate_backward(Tensor grad_out, Tensor x, Tensor gate, Tensor? bias, int heads, "
    "bool modrelu) -> (Tensor, Tensor, Tensor)";

}  // namespace tokenmix::fft_op
