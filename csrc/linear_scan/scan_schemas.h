// The schemas of the linear-scan ops, defined once for every backend that registers them (CPU,
// CUDA, and the emulated CUDA kernels of the test library).
//
// q, k: [B, T, H, K]; v: [B, T, H, V], unit feature stride. g [B, T, H] and gk [B, T, H, K]
// (linear scans) and beta [B, T, H] (delta rule) are contiguous in the accumulation dtype
// (float32; float64 for float64 inputs), as are the states [N, H, K, V]. cu_seqlens: int64 [N + 1]
// on the tensors' device. Gradients of absent decays are empty tensors.
#pragma once

namespace tokenmix::scan_op {

// -> (out, final_state)
inline constexpr const char* kLinearScanForwardSchema =
    "linear_scan_forward(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? gk, "
    "Tensor? initial_state, Tensor? cu_seqlens, float scale) -> (Tensor, Tensor)";

// -> (grad_q, grad_k, grad_v, grad_g, grad_gk, grad_initial_state)
inline constexpr const char* kLinearScanBackwardSchema =
    "linear_scan_backward(Tensor grad_out, Tensor? grad_final_state, Tensor q, Tensor k, "
    "Tensor v, Tensor? g, Tensor? gk, Tensor? initial_state, Tensor? cu_seqlens, float scale) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";

// -> (out, final_state)
inline constexpr const char* kDeltaRuleForwardSchema =
    "delta_rule_forward(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, "
    "Tensor? initial_state, Tensor? cu_seqlens, float scale) -> (Tensor, Tensor)";

// -> (grad_q, grad_k, grad_v, grad_beta, grad_g, grad_initial_state)
inline constexpr const char* kDeltaRuleBackwardSchema =
    "delta_rule_backward(Tensor grad_out, Tensor? grad_final_state, Tensor q, Tensor k, "
    "Tensor v, Tensor beta, Tensor? g, Tensor? initial_state, Tensor? cu_seqlens, float scale) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";

}  // namespace tokenmix::scan_op
