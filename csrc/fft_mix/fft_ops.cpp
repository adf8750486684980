// torch.ops.tokenmix.fft_conv_* / fourier_mix / global_filter_* / spectral_gate_*: the op
// schemas and the CPU implementations, registered through PyTorch's stable C ABI (the CUDA
// fft_conv is in fft_cuda_ops.cpp). Checks and problem descriptors: fft_op_common.h.
#include "fft_op_common.h"
#include "fft_schemas.h"
#include "tokenmix/cpu/isa_dispatch.h"

namespace {

using namespace tokenmix::fft_op;

// Every input of a CPU op is a CPU tensor (the op's dispatch key is the first tensor's).
void require_cpu(std::initializer_list<std::optional<Tensor>> tensors) {
  for (const auto& t : tensors)
    STD_TORCH_CHECK(!t.has_value() || t->is_cpu(),
                    "tokenmix: CPU kernel called with non-CPU tensors");
}

void run_conv_cpu(const tokenmix::FftConvProblem& p, bool backward) {
  tokenmix::cpu::fft_conv(p, backward);
}

Tensor fft_conv_forward_cpu(Tensor u, Tensor k, std::optional<Tensor> bias,
                            std::optional<Tensor> pre_gate, std::optional<Tensor> post_gate,
                            bool causal) {
  require_cpu({u, k, bias, pre_gate, post_gate});
  return conv_forward(u, k, bias, pre_gate, post_gate, causal, run_conv_cpu);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fft_conv_backward_cpu(
    Tensor grad_out, Tensor u, Tensor k, std::optional<Tensor> bias, std::optional<Tensor> pre_gate,
    std::optional<Tensor> post_gate, bool causal) {
  require_cpu({grad_out, u, k, bias, pre_gate, post_gate});
  return conv_backward(grad_out, u, k, bias, pre_gate, post_gate, causal, run_conv_cpu);
}

// ---- fourier_mix ------------------------------------------------------------------------

Tensor fourier_mix_cpu(Tensor x) {
  require_cpu({x});
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
  require_cpu({x, weight});
  auto p = make_filter_problem(x, weight);
  Tensor out = empty(x, {p.batch, p.height, p.width, p.channels}, x.scalar_type(), "out");
  p.out = out.data_ptr();
  if (out.numel() > 0) tokenmix::cpu::global_filter(p, false);
  return out;
}

std::tuple<Tensor, Tensor> global_filter_backward_cpu(Tensor grad_out, Tensor x, Tensor weight) {
  require_cpu({grad_out, x, weight});
  auto p = make_filter_problem(x, weight);
  STD_TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(),
                  "tokenmix: grad_out must have the dtype of x");
  check_shape(grad_out, {p.batch, p.height, p.width, p.channels}, "grad_out");
  p.grad_out = view(grad_out);
  Tensor dx = empty(x, {p.batch, p.height, p.width, p.channels}, x.scalar_type(), "grad_x");
  Tensor dw =
      zeros(x, {p.height, p.width / 2 + 1, p.channels, 2}, weight.scalar_type(), "grad_weight");
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
  require_cpu({x, gate, bias});
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
  require_cpu({grad_out, x, gate, bias});
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
