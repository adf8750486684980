// The schemas of the neighborhood-attention ops, defined once: the tokenmix
// library (na_ops.cpp) and the emulated-kernel test library
// (emulated/emulated_ops.cpp) register the same signatures under their own
// namespaces.
#pragma once

namespace tokenmix::na_op {

inline constexpr const char* kForwardSchema =
    "na_forward(Tensor q, Tensor k, Tensor v, Tensor? rpb, Tensor? additional_keys, "
    "Tensor? additional_values, int[] kernel_size, int[] stride, int[] dilation, "
    "int[] is_causal, float scale) -> (Tensor, Tensor)";

inline constexpr const char* kBackwardSchema =
    "na_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? rpb, Tensor? additional_keys, Tensor? additional_values, int[] kernel_size, "
    "int[] stride, int[] dilation, int[] is_causal, float scale, Tensor? grad_lse=None, "
    "bool deterministic=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";

}  // namespace tokenmix::na_op
