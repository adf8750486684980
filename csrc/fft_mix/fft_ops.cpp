// torch.ops.tokenmix.fft_conv_* / fourier_mix / global_filter_* / spectral_gate_*: the op
// schemas and the CPU implementations, registered through PyTorch's stable C ABI. User-facing
// argument checks live in Python (tokenmix/fft_mix/args.py); these guard direct calls.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

#include "fft_schemas.h"
#include "tokenmix/cpu/isa_dispatch.h"
#include "tokenmix/fft_problem.h"
#include "tokenmix/stable_op_utils.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using tokenmix::FftTensor;

void check_shape(const Tensor& t, std::initializer_list<int64_t> shape, const char* name) {
  STD_TORCH_CHECK(t.is_cpu(), "tokenmix: ", name, " must be a CPU tensor");
  bool ok = t.dim() == int64_t(shape.size());
  int64_t i = 0;
  for (const int64_t n : shape) ok = ok && t.size(i++) == n;
  std::vector<int64_t> want(shape);
  STD_TORCH_CHECK(ok, "tokenmix: ", name, " must have shape ", tokenmix::shape_string(want),
                  ", got ", tokenmix::shape_string(t.sizes()));
}

FftTensor view(const Tensor& t) {
  FftTensor v;
  v.data = t.data_ptr();
  v.dtype = tokenmix::to_dtype(t.scalar_type());
  for (int64_t i = 0; i < t.dim() && i < 4; ++i) v.stride[i] = t.stride(i);
  return v;
}

// An optional [B, L, C] operand in the input's dtype (gates, gradients).
FftTensor optional_like(const std::optional<Tensor>& t, const Tensor& like, const char* name) {
  if (!t.has_value()) return FftTensor{};
  STD_TORCH_CHECK(t->scalar_type() == like.scalar_type(), "tokenmix: ", name,
                  " must have the dtype of the input");
  check_shape(*t, {like.size(0), like.size(1), like.size(2)}, name);
  return view(*t);
}

// A contiguous tensor in the accumulation dtype of `like` (complex parameters and their kin).
const void* acc_contiguous(const Tensor& t, const Tensor& like,
                           std::initializer_list<int64_t> shape, const char* name) {
  check_shape(t, shape, name);
  STD_TORCH_CHECK(t.scalar_type() == tokenmix::accumulation_type(like.scalar_type()) &&
                      t.is_contiguous(),
                  "tokenmix: ", name,
                  " must be contiguous in the accumulation dtype (float32; float64 for float64 "
                  "inputs)");
  return t.data_ptr();
}

// A [C] or [C, Lk] parameter in the input's dtype or its accumulation dtype.
void check_param_dtype(const Tensor& t, const Tensor& like, const char* name) {
  STD_TORCH_CHECK(t.scalar_type() == like.scalar_type() ||
                      t.scalar_type() == tokenmix::accumulation_type(like.scalar_type()),
                  "tokenmix: ", name, " must have the input's dtype or float32");
}

Tensor empty(const Tensor& like, std::vector<int64_t> shape, ScalarType dtype, const char* what) {
  return tokenmix::new_empty_checked(like, shape, dtype, what);
}

Tensor zeros(const Tensor& like, std::vector<int64_t> shape, ScalarType dtype, const char* what) {
  return tokenmix::new_zeros_checked(like, shape, dtype, what);
}

// ---- fft_conv ---------------------------------------------------------------------------

tokenmix::FftConvProblem make_conv_problem(const Tensor& u, const Tensor& k,
                                           const std::optional<Tensor>& bias,
                                           const std::optional<Tensor>& pre_gate,
                                           const std::optional<Tensor>& post_gate, bool causal) {
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
  p.filter_length = k.size(1);
  STD_TORCH_CHECK(p.filter_length >= 1 && p.filter_length <= p.length,
                  "tokenmix: k must have 1 <= Lk <= L taps");
  p.causal = causal;
  p.u = view(u);
  p.k = view(k);
  if (bias.has_value()) {
    check_shape(*bias, {p.channels}, "bias");
    check_param_dtype(*bias, u, "bias");
    p.bias = view(*bias);
  }
  p.pre_gate = optional_like(pre_gate, u, "pre_gate");
  p.post_gate = optional_like(post_gate, u, "post_gate");
  p.parallel_for = tokenmix::host_parallel_for;
  return p;
}

Tensor fft_conv_forward_cpu(Tensor u, Tensor k, std::optional<Tensor> bias,
                            std::optional<Tensor> pre_gate, std::optional<Tensor> post_gate,
                            bool causal) {
  auto p = make_conv_problem(u, k, bias, pre_gate, post_gate, causal);
  Tensor out = empty(u, {p.batch, p.length, p.channels}, u.scalar_type(), "out");
  p.out = out.data_ptr();
  if (out.numel() > 0) tokenmix::cpu::fft_conv(p, false);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fft_conv_backward_cpu(
    Tensor grad_out, Tensor u, Tensor k, std::optional<Tensor> bias,
    std::optional<Tensor> pre_gate, std::optional<Tensor> post_gate, bool causal) {
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
  if (du.numel() > 0) tokenmix::cpu::fft_conv(p, true);
  return {du, dk, dbias, dpre, dpost};
}

// ---- fourier_mix ------------------------------------------------------------------------

Tensor fourier_mix_cpu(Tensor x) {
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
  if (out.numel() > 0) tokenmix::cpu::fourier_mix(p);
  return out;
}

// ---- global_filter ----------------------------------------------------------------------

tokenmix::GlobalFilterProblem make_filter_problem(const Tensor& x, const Tensor& weight) {
  STD_TORCH_CHECK(x.dim() == 4, "tokenmix: x must be [B, H, W, C]");
  check_shape(x, {x.size(0), x.size(1), x.size(2), x.size(3)}, "x");
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

Tensor global_filter_forward_cpu(Tensor x, Tensor weight) {
  auto p = make_filter_problem(x, weight);
  Tensor out = empty(x, {p.batch, p.height, p.width, p.channels}, x.scalar_type(), "out");
  p.out = out.data_ptr();
  if (out.numel() > 0) tokenmix::cpu::global_filter(p, false);
  return out;
}

std::tuple<Tensor, Tensor> global_filter_backward_cpu(Tensor grad_out, Tensor x, Tensor weight) {
  auto p = make_filter_problem(x, weight);
  STD_TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(),
                  "tokenmix: grad_out must have the dtype of x");
  check_shape(grad_out, {p.batch, p.height, p.width, p.channels}, "grad_out");
  p.grad_out = view(grad_out);
  Tensor dx = empty(x, {p.batch, p.height, p.width, p.channels}, x.scalar_type(), "grad_x");
  Tensor dw = zeros(x, {p.height, p.width / 2 + 1, p.channels, 2}, weight.scalar_type(),
                    "grad_weight");
  p.grad_x = dx.data_ptr();
  p.grad_weight = dw.data_ptr();
  if (dx.numel() > 0) tokenmix::cpu::global_filter(p, true);
  return {dx, dw};
}

// ---- spectral_gate ----------------------------------------------------------------------

tokenmix::SpectralGateProblem make_gate_problem(const Tensor& x, const Tensor& gate,
                                                const std::optional<Tensor>& bias, int64_t heads,
                                                bool modrelu) {
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
  p.gate = acc_contiguous(gate, x, {p.batch, heads, bins, 2}, "gate");
  STD_TORCH_CHECK(!bias.has_value() || modrelu, "tokenmix: bias is modReLU's; it needs modrelu");
  if (bias.has_value()) p.bias = acc_contiguous(*bias, x, {heads, bins}, "bias");
  p.parallel_for = tokenmix::host_parallel_for;
  return p;
}

Tensor spectral_gate_forward_cpu(Tensor x, Tensor gate, std::optional<Tensor> bias, int64_t heads,
                                 bool modrelu) {
  auto p = make_gate_problem(x, gate, bias, heads, modrelu);
  Tensor out = empty(x, {p.batch, p.length, p.channels}, x.scalar_type(), "out");
  p.out = out.data_ptr();
  if (out.numel() > 0) tokenmix::cpu::spectral_gate(p, false);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> spectral_gate_backward_cpu(Tensor grad_out, Tensor x,
                                                              Tensor gate,
                                                              std::optional<Tensor> bias,
                                                              int64_t heads, bool modrelu) {
  auto p = make_gate_problem(x, gate, bias, heads, modrelu);
  STD_TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(),
                  "tokenmix: grad_out must have the dtype of x");
  check_shape(grad_out, {p.batch, p.length, p.channels}, "grad_out");
  p.grad_out = view(grad_out);
  const int64_t bins = p.length / 2 + 1;
  Tensor dx = empty(x, {p.batch, p.length, p.channels}, x.scalar_type(), "grad_x");
  Tensor dgate = zeros(x, {p.batch, heads, bins, 2}, gate.scalar_type(), "grad_gate");
  Tensor dbias = bias.has_value() ? zeros(x, {heads, bins}, bias->scalar_type(), "grad_bias")
                                  : empty(x, {0}, gate.scalar_type(), "grad_bias");
  p.grad_x = dx.data_ptr();
  p.grad_gate = dgate.data_ptr();
  p.grad_bias = bias.has_value() ? dbias.data_ptr() : nullptr;
  if (dx.numel() > 0) tokenmix::cpu::spectral_gate(p, true);
  return {dx, dgate, dbias};
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  using namespace tokenmix::fft_op;
  m.def(kFftConvForwardSchema);
  m.def(kFftConvBackwardSchema);
  m.def(kFourierMixSchema);
  m.def(kGlobalFilterForwardSchema);
  m.def(kGlobalFilterBackwardSchema);
  m.def(kSpectralGateForwardSchema);
  m.def(kSpectralGateBackwardSchema);
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("fft_conv_forward", TORCH_BOX(&fft_conv_forward_cpu));
  m.impl("fft_conv_backward", TORCH_BOX(&fft_conv_backward_cpu));
  m.impl("fourier_mix", TORCH_BOX(&fourier_mix_cpu));
  m.impl("global_filter_forward", TORCH_BOX(&global_filter_forward_cpu));
  m.impl("global_filter_backward", TORCH_BOX(&global_filter_backward_cpu));
  m.impl("spectral_gate_forward", TORCH_BOX(&spectral_gate_forward_cpu));
  m.impl("spectral_gate_backward", TORCH_BOX(&spectral_gate_backward_cpu));
}
