// The op layer of the FFT-mixing family shared by every backend (CPU, CUDA and the SIMT
// emulator): argument checks of direct op calls, problem descriptors and output allocation.
// User-facing argument checks live in Python (tokenmix/fft_mix/args.py).
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "tokenmix/fft_problem.h"
#include "tokenmix/stable_op_utils.h"

namespace tokenmix::fft_op {

using tokenmix::FftTensor;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline void check_shape(const Tensor& t, std::initializer_list<int64_t> shape, const char* name) {
  bool ok = t.dim() == int64_t(shape.size());
  int64_t i = 0;
  for (const int64_t n : shape) ok = ok && t.size(i++) == n;
  std::vector<int64_t> want(shape);
  STD_TORCH_CHECK(ok, "tokenmix: ", name, " must have shape ", tokenmix::shape_string(want),
                  ", got ", tokenmix::shape_string(t.sizes()));
}

inline FftTensor view(const Tensor& t) {
  FftTensor v;
  v.data = t.data_ptr();
  v.dtype = tokenmix::to_dtype(t.scalar_type());
  for (int64_t i = 0; i < t.dim() && i < 4; ++i) v.stride[i] = t.stride(i);
  return v;
}

// An optional [B, L, C] operand in the input's dtype (gates, gradients).
inline FftTensor optional_like(const std::optional<Tensor>& t, const Tensor& like,
                               const char* name) {
  if (!t.has_value()) return FftTensor{};
  STD_TORCH_CHECK(t->scalar_type() == like.scalar_type(), "tokenmix: ", name,
                  " must have the dtype of the input");
  STD_TORCH_CHECK(tokenmix::same_device(*t, like), "tokenmix: ", name,
                  " must be on the input's device");
  check_shape(*t, {like.size(0), like.size(1), like.size(2)}, name);
  return view(*t);
}

// A contiguous tensor in the accumulation dtype of `like` (complex parameters and their kin).
inline const void* acc_contiguous(const Tensor& t, const Tensor& like,
                                  std::initializer_list<int64_t> shape, const char* name) {
  check_shape(t, shape, name);
  STD_TORCH_CHECK(
      t.scalar_type() == tokenmix::accumulation_type(like.scalar_type()) && t.is_contiguous(),
      "tokenmix: ", name,
      " must be contiguous in the accumulation dtype (float32; float64 for float64 "
      "inputs)");
  return t.data_ptr();
}

// A [C] or [C, Lk] parameter in the input's dtype or its accumulation dtype.
inline void check_param_dtype(const Tensor& t, const Tensor& like, const char* name) {
  STD_TORCH_CHECK(
      t.scalar_type() == like.scalar_type() ||
          t.scalar_type() == tokenmix::accumulation_type(like.scalar_type()),
      "tokenmix: ", name,
      " must have the input's dtype or its accumulation dtype (float32; float64 for float64 "
      "inputs)");
}

inline Tensor empty(const Tensor& like, std::vector<int64_t> shape, ScalarType dtype,
                    const char* what) {
  return tokenmix::new_empty_checked(like, shape, dtype, what);
}

inline Tensor zeros(const Tensor& like, std::vector<int64_t> shape, ScalarType dtype,
                    const char* what) {
  return tokenmix::new_zeros_checked(like, shape, dtype, what);
}

// ---- fft_conv ---------------------------------------------------------------------------

inline tokenmix::FftConvProblem make_conv_problem(const Tensor& u, const Tensor& k,
                                                  const std::optional<Tensor>& bias,
                                                  const std::optional<Tensor>& pre_gate,
                                                  const std::optional<Tensor>& post_gate,
                                                  bool causal) {
  tokenmix::FftConvProblem p;
  STD_TORCH_CHECK(u.dim() == 3, "tokenmix: u must be [B, L, C]");
  check_shape(u, {u.size(0), u.size(1), u.size(2)}, "u");
  p.dtype = tokenmix::to_dtype(u.scalar_type());
  p.batch = u.size(0);
  p.length = u.size(1);
  p.channels = u.size(2);
  STD_TORCH_CHECK(k.dim() == 2, "tokenmix: k must be [C, Lk]");
  check_shape(k, {p.channels, k.size(1)}, "k");
  check_param_dtype(k, u, "k");
  STD_TORCH_CHECK(tokenmix::same_device(k, u), "tokenmix: k must be on u's device");
  p.filter_length = k.size(1);
  STD_TORCH_CHECK(p.filter_length >= 1 && p.filter_length <= p.length,
                  "tokenmix: k must have 1 <= Lk <= L taps");
  p.causal = causal;
  p.u = view(u);
  p.k = view(k);
  if (bias.has_value()) {
    check_shape(*bias, {p.channels}, "bias");
    check_param_dtype(*bias, u, "bias");
    STD_TORCH_CHECK(tokenmix::same_device(*bias, u), "tokenmix: bias must be on u's device");
    p.bias = view(*bias);
  }
  p.pre_gate = optional_like(pre_gate, u, "pre_gate");
  p.post_gate = optional_like(post_gate, u, "post_gate");
  p.parallel_for = tokenmix::host_parallel_for;
  return p;
}

// fft_conv's forward and backward on any backend: run(problem, backward) computes into the
// problem's outputs.
template <class Run>
Tensor conv_forward(const Tensor& u, const Tensor& k, const std::optional<Tensor>& bias,
                    const std::optional<Tensor>& pre_gate, const std::optional<Tensor>& post_gate,
                    bool causal, const Run& run) {
  auto p = make_conv_problem(u, k, bias, pre_gate, post_gate, causal);
  Tensor out = empty(u, {p.batch, p.length, p.channels}, u.scalar_type(), "out");
  p.out = out.data_ptr();
  if (out.numel() > 0) run(p, false);
  return out;
}

template <class Run>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_backward(
    const Tensor& grad_out, const Tensor& u, const Tensor& k, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& pre_gate, const std::optional<Tensor>& post_gate, bool causal,
    const Run& run) {
  auto p = make_conv_problem(u, k, bias, pre_gate, post_gate, causal);
  p.grad_out = optional_like(grad_out, u, "grad_out");
  const std::vector<int64_t> shape = {p.batch, p.length, p.channels};
  Tensor du = empty(u, shape, u.scalar_type(), "grad_u");
  Tensor dk = zeros(u, {p.channels, p.filter_length}, k.scalar_type(), "grad_k");
  Tensor dbias = bias.has_value() ? zeros(u, {p.channels}, bias->scalar_type(), "grad_bias")
                                  : empty(u, {0}, u.scalar_type(), "grad_bias");
  Tensor dpre = pre_gate.has_value() ? empty(u, shape, u.scalar_type(), "grad_pre_gate")
                                     : empty(u, {0}, u.scalar_type(), "grad_pre_gate");
  Tensor dpost = post_gate.has_value() ? empty(u, shape, u.scalar_type(), "grad_post_gate")
                                       : empty(u, {0}, u.scalar_type(), "grad_post_gate");
  p.grad_u = du.data_ptr();
  p.grad_k = dk.data_ptr();
  p.grad_bias = bias.has_value() ? dbias.data_ptr() : nullptr;
  p.grad_pre_gate = pre_gate.has_value() ? dpre.data_ptr() : nullptr;
  p.grad_post_gate = post_gate.has_value() ? dpost.data_ptr() : nullptr;
  if (du.numel() > 0) run(p, true);
  return {du, dk, dbias, dpre, dpost};
}

// The CUDA kernels' workspace (an empty tensor when they need none); sets p.workspace. The
// tensor must outlive the launches.
inline Tensor conv_workspace(const Tensor& like, tokenmix::FftConvProblem& p, bool backward) {
  const int64_t floats = tokenmix::fft_conv_cuda_workspace_floats(
      p.batch, p.channels, p.length, p.filter_length, p.causal, backward);
  Tensor w = empty(like, {floats}, ScalarType::Float, "fft_conv's CUDA workspace");
  p.workspace = floats > 0 ? static_cast<float*>(w.data_ptr()) : nullptr;
  return w;
}

// ---- fourier_mix, global_filter, spectral_gate --------------------------------------------
// Each takes `run(problem)` or `run(problem, backward)`, which computes into the problem's
// outputs on its backend.

// grad_out of an op whose output has x's shape and dtype.
inline FftTensor grad_out_view(const Tensor& grad_out, const Tensor& x) {
  STD_TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(),
                  "tokenmix: grad_out must have the dtype of x");
  STD_TORCH_CHECK(tokenmix::same_device(grad_out, x), "tokenmix: grad_out must be on x's device");
  bool same_shape = grad_out.dim() == x.dim();
  for (int64_t i = 0; same_shape && i < x.dim(); ++i) same_shape = grad_out.size(i) == x.size(i);
  STD_TORCH_CHECK(same_shape, "tokenmix: grad_out must have shape ",
                  tokenmix::shape_string(x.sizes()), ", got ",
                  tokenmix::shape_string(grad_out.sizes()));
  return view(grad_out);
}

template <class Run>
Tensor mix_forward(const Tensor& x, const Run& run) {
  STD_TORCH_CHECK(x.dim() == 3, "tokenmix: x must be [B, L, C]");
  check_shape(x, {x.size(0), x.size(1), x.size(2)}, "x");
  tokenmix::FourierMixProblem p;
  p.dtype = tokenmix::to_dtype(x.scalar_type());
  p.batch = x.size(0);
  p.length = x.size(1);
  p.channels = x.size(2);
  p.x = view(x);
  Tensor out = empty(x, {p.batch, p.length, p.channels}, x.scalar_type(), "out");
  p.out = out.data_ptr();
  p.parallel_for = tokenmix::host_parallel_for;
  if (out.numel() > 0) run(p);
  return out;
}

inline tokenmix::GlobalFilterProblem make_filter_problem(const Tensor& x, const Tensor& weight) {
  STD_TORCH_CHECK(x.dim() == 4, "tokenmix: x must be [B, H, W, C]");
  check_shape(x, {x.size(0), x.size(1), x.size(2), x.size(3)}, "x");
  STD_TORCH_CHECK(tokenmix::same_device(weight, x), "tokenmix: weight must be on x's device");
  tokenmix::GlobalFilterProblem p;
  p.dtype = tokenmix::to_dtype(x.scalar_type());
  p.batch = x.size(0);
  p.height = x.size(1);
  p.width = x.size(2);
  p.channels = x.size(3);
  p.x = view(x);
  p.weight = acc_contiguous(weight, x, {p.height, p.width / 2 + 1, p.channels, 2}, "weight");
  p.parallel_for = tokenmix::host_parallel_for;
  return p;
}

template <class Run>
Tensor filter_forward(const Tensor& x, const Tensor& weight, const Run& run) {
  auto p = make_filter_problem(x, weight);
  Tensor out = empty(x, {p.batch, p.height, p.width, p.channels}, x.scalar_type(), "out");
  p.out = out.data_ptr();
  if (out.numel() > 0) run(p, false);
  return out;
}

template <class Run>
std::tuple<Tensor, Tensor> filter_backward(const Tensor& grad_out, const Tensor& x,
                                           const Tensor& weight, const Run& run) {
  auto p = make_filter_problem(x, weight);
  p.grad_out = grad_out_view(grad_out, x);
  Tensor dx = empty(x, {p.batch, p.height, p.width, p.channels}, x.scalar_type(), "grad_x");
  Tensor dw =
      zeros(x, {p.height, p.width / 2 + 1, p.channels, 2}, weight.scalar_type(), "grad_weight");
  p.grad_x = dx.data_ptr();
  p.grad_weight = dw.data_ptr();
  if (dx.numel() > 0) run(p, true);
  return {dx, dw};
}

inline tokenmix::SpectralGateProblem make_gate_problem(const Tensor& x, const Tensor& gate,
                                                       const std::optional<Tensor>& bias,
                                                       int64_t heads, bool modrelu) {
  STD_TORCH_CHECK(x.dim() == 3, "tokenmix: x must be [B, L, C]");
  check_shape(x, {x.size(0), x.size(1), x.size(2)}, "x");
  tokenmix::SpectralGateProblem p;
  p.dtype = tokenmix::to_dtype(x.scalar_type());
  p.batch = x.size(0);
  p.length = x.size(1);
  p.channels = x.size(2);
  STD_TORCH_CHECK(heads >= 1 && p.channels % heads == 0,
                  "tokenmix: heads must be >= 1 and divide the channels");
  p.heads = heads;
  p.modrelu = modrelu;
  const int64_t bins = p.length / 2 + 1;
  p.x = view(x);
  STD_TORCH_CHECK(tokenmix::same_device(gate, x), "tokenmix: gate must be on x's device");
  p.gate = acc_contiguous(gate, x, {p.batch, heads, bins, 2}, "gate");
  STD_TORCH_CHECK(!bias.has_value() || modrelu, "tokenmix: bias is modReLU's; it needs modrelu");
  if (bias.has_value()) {
    STD_TORCH_CHECK(tokenmix::same_device(*bias, x), "tokenmix: bias must be on x's device");
    p.bias = acc_contiguous(*bias, x, {heads, bins}, "bias");
  }
  p.parallel_for = tokenmix::host_parallel_for;
  return p;
}

template <class Run>
Tensor gate_forward(const Tensor& x, const Tensor& gate, const std::optional<Tensor>& bias,
                    int64_t heads, bool modrelu, const Run& run) {
  auto p = make_gate_problem(x, gate, bias, heads, modrelu);
  Tensor out = empty(x, {p.batch, p.length, p.channels}, x.scalar_type(), "out");
  p.out = out.data_ptr();
  if (out.numel() > 0) run(p, false);
  return out;
}

template <class Run>
std::tuple<Tensor, Tensor, Tensor> gate_backward(const Tensor& grad_out, const Tensor& x,
                                                 const Tensor& gate,
                                                 const std::optional<Tensor>& bias, int64_t heads,
                                                 bool modrelu, const Run& run) {
  auto p = make_gate_problem(x, gate, bias, heads, modrelu);
  p.grad_out = grad_out_view(grad_out, x);
  const int64_t bins = p.length / 2 + 1;
  Tensor dx = empty(x, {p.batch, p.length, p.channels}, x.scalar_type(), "grad_x");
  Tensor dgate = zeros(x, {p.batch, heads, bins, 2}, gate.scalar_type(), "grad_gate");
  Tensor dbias = bias.has_value() ? zeros(x, {heads, bins}, bias->scalar_type(), "grad_bias")
                                  : empty(x, {0}, gate.scalar_type(), "grad_bias");
  p.grad_x = dx.data_ptr();
  p.grad_gate = dgate.data_ptr();
  p.grad_bias = bias.has_value() ? dbias.data_ptr() : nullptr;
  if (dx.numel() > 0) run(p, true);
  return {dx, dgate, dbias};
}

// Raises the reason a backend's kernels give for refusing a problem ("" when they accept it),
// before anything is allocated for it.
inline void require_supported(const std::string& why) {
  STD_TORCH_CHECK(why.empty(), why);
}

// The CUDA kernels' float32 workspace for these operators (an empty tensor when they need none);
// sets p.workspace. The tensor must outlive the launches.
inline Tensor float_workspace(const Tensor& like, int64_t floats, float** workspace) {
  Tensor w = empty(like, {floats}, ScalarType::Float, "the CUDA kernels' workspace");
  *workspace = floats > 0 ? static_cast<float*>(w.data_ptr()) : nullptr;
  return w;
}
inline Tensor mix_workspace(const Tensor& like, tokenmix::FourierMixProblem& p) {
  return float_workspace(like,
                         tokenmix::fourier_mix_cuda_workspace_floats(p.batch, p.length, p.channels),
                         &p.workspace);
}
inline Tensor filter_workspace(const Tensor& like, tokenmix::GlobalFilterProblem& p,
                               bool backward) {
  return float_workspace(like,
                         tokenmix::global_filter_cuda_workspace_floats(p.batch, p.height, p.width,
                                                                       p.channels, backward),
                         &p.workspace);
}
inline Tensor gate_workspace(const Tensor& like, tokenmix::SpectralGateProblem& p, bool backward) {
  return float_workspace(like,
                         tokenmix::spectral_gate_cuda_workspace_floats(
                             p.batch, p.length, p.channels, p.bias != nullptr, backward),
                         &p.workspace);
}

}  // namespace tokenmix::fft_op
