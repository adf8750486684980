// torch.ops.tokenmix_emulated.*: SIMT kernels run on the CPU under the SIMT
// emulator, exposed as ops so the tests can compare CUDA kernel sources with
// torch on a machine without a GPU. A test-only library (tokenmix/_emulated.so),
// never loaded by `import tokenmix`. Emulator reports (out-of-bounds access,
// races, barrier divergence...) surface as Python RuntimeErrors.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../block_sparse/bs_schemas.h"
#include "../block_sparse/bs_simt_op.h"
#include "../fft_mix/fft_op_common.h"
#include "../fft_mix/fft_schemas.h"
#include "../neighborhood/na_schemas.h"
#include "../neighborhood/na_simt_op.h"
#include "bs_schedule_dump.h"
#include "fill_nan.h"
#include "mma_gemm_op.h"
#include "tokenmix/cuda/fft_entry.h"
#include "tokenmix/simt/simt.h"

namespace {

using tokenmix::emulated_op::fill_nan;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

Tensor mma_gemm(Tensor a, Tensor b) {
  STD_TORCH_CHECK(a.is_cpu() && b.is_cpu(), "mma_gemm: a and b must be CPU tensors");
  return mma_gemm_launch(a, b, nullptr);
}

// Neighborhood attention on the CUDA engine's kernels, run by the emulator: the same schema and
// semantics as torch.ops.tokenmix.na_forward / na_backward, on CPU tensors.
struct EmulatedBackend {
  bool poison = true;
  void forward(const tokenmix::NeighborhoodProblem& p) const {
    tokenmix::cuda::emulated::na_forward(p, nullptr);
  }
  void backward(const tokenmix::NeighborhoodProblem& p, bool deterministic,
                float* workspace) const {
    tokenmix::cuda::emulated::na_backward(p, deterministic, workspace, nullptr);
  }
};

using tokenmix::na_op::IntList;

std::tuple<Tensor, Tensor> na_forward(Tensor q, Tensor k, Tensor v, std::optional<Tensor> rpb,
                                      std::optional<Tensor> extra_k, std::optional<Tensor> extra_v,
                                      IntList kernel, IntList stride, IntList dilation,
                                      IntList causal, double scale) {
  STD_TORCH_CHECK(q.is_cpu(), "tokenmix_emulated: the emulated kernels take CPU tensors");
  return tokenmix::na_op::simt_forward(q, k, v, rpb, extra_k, extra_v, kernel, stride, dilation,
                                       causal, scale, EmulatedBackend{});
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> na_backward(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
    std::optional<Tensor> rpb, std::optional<Tensor> extra_k, std::optional<Tensor> extra_v,
    IntList kernel, IntList stride, IntList dilation, IntList causal, double scale,
    std::optional<Tensor> grad_lse, bool deterministic) {
  STD_TORCH_CHECK(q.is_cpu(), "tokenmix_emulated: the emulated kernels take CPU tensors");
  return tokenmix::na_op::simt_backward(grad_out, q, k, v, out, lse, rpb, extra_k, extra_v, kernel,
                                        stride, dilation, causal, scale, grad_lse, deterministic,
                                        EmulatedBackend{});
}

// Block-sparse attention on the CUDA engine's kernels, run by the emulator: the same schema and
// semantics as torch.ops.tokenmix.block_sparse_forward / block_sparse_backward, on CPU tensors.
struct EmulatedBsBackend {
  bool poison = true;
  int64_t workspace_words(const tokenmix::BlockSparseProblem& p, bool backward) const {
    return tokenmix::cuda::emulated::bs_workspace_words(p, backward);
  }
  void forward(const tokenmix::BlockSparseProblem& p, int32_t* workspace) const {
    tokenmix::cuda::emulated::bs_forward(p, workspace, nullptr);
  }
  void backward(const tokenmix::BlockSparseProblem& p, int32_t* workspace) const {
    tokenmix::cuda::emulated::bs_backward(p, workspace, nullptr);
  }
};

std::tuple<Tensor, Tensor> block_sparse_forward(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks,
                                                Tensor kv_indices, Tensor full_kv_num_blocks,
                                                Tensor full_kv_indices, IntList block_size,
                                                std::optional<Tensor> mask_bits,
                                                std::optional<Tensor> q_doc,
                                                std::optional<Tensor> kv_doc, IntList band,
                                                double scale) {
  STD_TORCH_CHECK(q.is_cpu(), "tokenmix_emulated: the emulated kernels take CPU tensors");
  return tokenmix::bs_op::simt_forward(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                       full_kv_indices, block_size, mask_bits, q_doc, kv_doc, band,
                                       scale, EmulatedBsBackend{});
}

std::tuple<Tensor, Tensor, Tensor> block_sparse_backward(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor kv_num_blocks,
    Tensor kv_indices, Tensor full_kv_num_blocks, Tensor full_kv_indices, Tensor q_num_blocks,
    Tensor q_indices, Tensor q_slots, Tensor full_q_num_blocks, Tensor full_q_indices,
    IntList block_size, std::optional<Tensor> mask_bits, std::optional<Tensor> q_doc,
    std::optional<Tensor> kv_doc, IntList band, double scale, std::optional<Tensor> grad_lse,
    bool deterministic) {
  STD_TORCH_CHECK(q.is_cpu(), "tokenmix_emulated: the emulated kernels take CPU tensors");
  return tokenmix::bs_op::simt_backward(
      grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
      q_num_blocks, q_indices, q_slots, full_q_num_blocks, full_q_indices, block_size, mask_bits,
      q_doc, kv_doc, band, scale, grad_lse, deterministic, EmulatedBsBackend{});
}

// The tile schedules the block-sparse kernels would use for these arguments (the backward's:
// both sides): (query-side counts [LB * LH, query tiles], entries [LB * LH, query tiles, max],
// the same for the key side). An entry is chunk << 1 | full; a side in direct mode (no schedule)
// gives empty tensors.
constexpr const char* kBsScheduleSchema =
    "block_sparse_schedule(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, "
    "Tensor kv_indices, Tensor full_kv_num_blocks, Tensor full_kv_indices, Tensor q_num_blocks, "
    "Tensor q_indices, Tensor q_slots, Tensor full_q_num_blocks, Tensor full_q_indices, "
    "int[] block_size, Tensor? mask_bits, Tensor? q_doc, Tensor? kv_doc, int[] band) "
    "-> (Tensor, Tensor, Tensor, Tensor)";

Tensor int_tensor(const Tensor& like, std::vector<int64_t> size, const std::vector<int32_t>& data) {
  Tensor t = tokenmix::new_empty_checked(like, size, ScalarType::Int, "a schedule");
  if (!data.empty()) std::memcpy(t.data_ptr(), data.data(), data.size() * sizeof(int32_t));
  return t;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> block_sparse_schedule(
    Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices,
    Tensor full_kv_num_blocks, Tensor full_kv_indices, Tensor q_num_blocks, Tensor q_indices,
    Tensor q_slots, Tensor full_q_num_blocks, Tensor full_q_indices, IntList block_size,
    std::optional<Tensor> mask_bits, std::optional<Tensor> q_doc, std::optional<Tensor> kv_doc,
    IntList band) {
  STD_TORCH_CHECK(q.is_cpu(), "tokenmix_emulated: the emulated kernels take CPU tensors");
  namespace op = tokenmix::bs_op;
  auto p = op::make_problem(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                            block_size, mask_bits, q_doc, kv_doc, band, 1.0);
  op::check_supported(p);
  // The backward's checks of the q-side lists (out, lse and the gradients are placeholders).
  auto [out, lse] = op::forward_outputs(q, p);
  op::BackwardOutputs g;
  STD_TORCH_CHECK(
      op::prepare_backward(p, g, out, q, k, v, out, lse, q_num_blocks, q_indices, q_slots,
                           full_q_num_blocks, full_q_indices, std::nullopt, false),
      "tokenmix_emulated: block_sparse_schedule needs a non-empty problem");
  const auto s = tokenmix::cuda::emulated::bs_schedules(p);
  auto side = [&](const tokenmix::cuda::emulated::BsSideSchedule& x) {
    if (!x.scheduled) return std::make_tuple(int_tensor(q, {0}, {}), int_tensor(q, {0}, {}));
    return std::make_tuple(int_tensor(q, {x.head_rows, x.tiles}, x.count),
                           int_tensor(q, {x.head_rows, x.tiles, x.max}, x.entry));
  };
  auto [qc, qe] = side(s.query);
  auto [kc, ke] = side(s.key);
  return {qc, qe, kc, ke};
}

// fft_conv on the CUDA kernels, run by the emulator: the same schema and semantics as
// torch.ops.tokenmix.fft_conv_forward / fft_conv_backward, on CPU tensors. Outputs start as NaN
// so that an element a kernel never writes shows.
void emulated_conv(tokenmix::FftConvProblem& p, bool backward, const Tensor& u) {
  const std::string why = tokenmix::cuda::fft_conv_unsupported_reason(p);
  STD_TORCH_CHECK(why.empty(), why);
  const int64_t elems = p.batch * p.length * p.channels;
  fill_nan(p.out, p.dtype, elems);
  fill_nan(p.grad_u, p.dtype, elems);
  fill_nan(p.grad_pre_gate, p.dtype, elems);
  fill_nan(p.grad_post_gate, p.dtype, elems);
  fill_nan(p.grad_k, p.k.dtype, p.channels * p.filter_length);
  if (p.bias.data) fill_nan(p.grad_bias, p.bias.dtype, p.channels);
  const Tensor workspace = tokenmix::fft_op::conv_workspace(u, p, backward);
  fill_nan(p.workspace, tokenmix::DType::kFloat32,
           tokenmix::fft_conv_cuda_workspace_floats(p.batch, p.channels, p.length, p.filter_length,
                                                    p.causal, backward));
  if (backward)
    tokenmix::cuda::emulated::fft_conv_backward(p, nullptr);
  else
    tokenmix::cuda::emulated::fft_conv_forward(p, nullptr);
}

Tensor fft_conv_forward(Tensor u, Tensor k, std::optional<Tensor> bias,
                        std::optional<Tensor> pre_gate, std::optional<Tensor> post_gate,
                        bool causal) {
  STD_TORCH_CHECK(u.is_cpu(), "tokenmix_emulated: the emulated kernels take CPU tensors");
  return tokenmix::fft_op::conv_forward(
      u, k, bias, pre_gate, post_gate, causal,
      [&](tokenmix::FftConvProblem& p, bool backward) { emulated_conv(p, backward, u); });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fft_conv_backward(
    Tensor grad_out, Tensor u, Tensor k, std::optional<Tensor> bias, std::optional<Tensor> pre_gate,
    std::optional<Tensor> post_gate, bool causal) {
  STD_TORCH_CHECK(u.is_cpu(), "tokenmix_emulated: the emulated kernels take CPU tensors");
  return tokenmix::fft_op::conv_backward(
      grad_out, u, k, bias, pre_gate, post_gate, causal,
      [&](tokenmix::FftConvProblem& p, bool backward) { emulated_conv(p, backward, u); });
}

// The transform length the CUDA fft_conv kernels use for a problem, 0 when they refuse it (the
// rule tokenmix.fft_mix.args.cuda_transform_size must match), without running anything.
int64_t fft_conv_cuda_size(int64_t length, int64_t taps, bool causal) {
  return tokenmix::fft_conv_cuda_size(length, taps, causal);
}

// Warp-level mma instructions the emulator has run so far in this process.
int64_t mma_count() {
  return int64_t(tokenmix::simt::emu::mma_instructions());
}

// Warp shares of wgmma instructions (four per warpgroup instruction) run so far in this process.
int64_t wgmma_count() {
  return int64_t(tokenmix::simt::emu::wgmma_instructions());
}

// The in-block transform length of the other FFT-mixing kernels for a line of n points, 0 when
// they refuse it (the rule tokenmix.fft_mix.args.cuda_line_size must match).
int64_t fft_line_cuda_size(int64_t n) {
  return tokenmix::fft_line_cuda_size(n);
}

// fourier_mix, global_filter and spectral_gate on the CUDA kernels, run by the emulator, with
// outputs and workspaces starting as NaN. Unsupported problems are refused before anything is
// allocated, as by the CUDA ops.
Tensor fourier_mix(Tensor x) {
  STD_TORCH_CHECK(x.is_cpu(), "tokenmix_emulated: the emulated kernels take CPU tensors");
  return tokenmix::fft_op::mix_forward(x, [&](tokenmix::FourierMixProblem& p) {
    tokenmix::fft_op::require_supported(
        tokenmix::cuda::fft_mix_unsupported_reason(p.dtype, {p.length, p.channels}, "fourier_mix"));
    const Tensor workspace = tokenmix::fft_op::mix_workspace(x, p);
    fill_nan(p.workspace, tokenmix::DType::kFloat32, workspace.numel());
    fill_nan(p.out, p.dtype, p.batch * p.length * p.channels);
    tokenmix::cuda::emulated::fourier_mix(p, nullptr);
  });
}

auto emulated_filter(const Tensor& x) {
  return [&x](tokenmix::GlobalFilterProblem& p, bool backward) {
    tokenmix::fft_op::require_supported(
        tokenmix::cuda::fft_mix_unsupported_reason(p.dtype, {p.height, p.width}, "global_filter"));
    const Tensor workspace = tokenmix::fft_op::filter_workspace(x, p, backward);
    fill_nan(p.workspace, tokenmix::DType::kFloat32, workspace.numel());
    const int64_t elems = p.batch * p.height * p.width * p.channels;
    fill_nan(backward ? p.grad_x : p.out, p.dtype, elems);
    if (backward)
      fill_nan(p.grad_weight, tokenmix::DType::kFloat32,
               p.height * (p.width / 2 + 1) * p.channels * 2);
    tokenmix::cuda::emulated::global_filter(p, backward, nullptr);
  };
}

Tensor global_filter_forward(Tensor x, Tensor weight) {
  STD_TORCH_CHECK(x.is_cpu(), "tokenmix_emulated: the emulated kernels take CPU tensors");
  return tokenmix::fft_op::filter_forward(x, weight, emulated_filter(x));
}

std::tuple<Tensor, Tensor> global_filter_backward(Tensor grad_out, Tensor x, Tensor weight) {
  STD_TORCH_CHECK(x.is_cpu(), "tokenmix_emulated: the emulated kernels take CPU tensors");
  return tokenmix::fft_op::filter_backward(grad_out, x, weight, emulated_filter(x));
}

auto emulated_gate(const Tensor& x) {
  return [&x](tokenmix::SpectralGateProblem& p, bool backward) {
    tokenmix::fft_op::require_supported(
        tokenmix::cuda::fft_mix_unsupported_reason(p.dtype, {p.length}, "spectral_gate"));
    const Tensor workspace = tokenmix::fft_op::gate_workspace(x, p, backward);
    fill_nan(p.workspace, tokenmix::DType::kFloat32, workspace.numel());
    fill_nan(backward ? p.grad_x : p.out, p.dtype, p.batch * p.length * p.channels);
    const int64_t bins = p.length / 2 + 1;
    if (backward) {
      fill_nan(p.grad_gate, tokenmix::DType::kFloat32, p.batch * p.heads * bins * 2);
      if (p.bias) fill_nan(p.grad_bias, tokenmix::DType::kFloat32, p.heads * bins);
    }
    tokenmix::cuda::emulated::spectral_gate(p, backward, nullptr);
  };
}

Tensor spectral_gate_forward(Tensor x, Tensor gate, std::optional<Tensor> bias, int64_t heads,
                             bool modrelu) {
  STD_TORCH_CHECK(x.is_cpu(), "tokenmix_emulated: the emulated kernels take CPU tensors");
  return tokenmix::fft_op::gate_forward(x, gate, bias, heads, modrelu, emulated_gate(x));
}

std::tuple<Tensor, Tensor, Tensor> spectral_gate_backward(Tensor grad_out, Tensor x, Tensor gate,
                                                          std::optional<Tensor> bias, int64_t heads,
                                                          bool modrelu) {
  STD_TORCH_CHECK(x.is_cpu(), "tokenmix_emulated: the emulated kernels take CPU tensors");
  return tokenmix::fft_op::gate_backward(grad_out, x, gate, bias, heads, modrelu, emulated_gate(x));
}

}  // namespace

STABLE_TORCH_LIBRARY(tokenmix_emulated, m) {
  m.def("mma_gemm(Tensor a, Tensor b) -> Tensor");
  m.def(tokenmix::na_op::kForwardSchema);
  m.def(tokenmix::na_op::kBackwardSchema);
  m.def(tokenmix::bs_op::kForwardSchema);
  m.def(tokenmix::bs_op::kBackwardSchema);
  m.def(kBsScheduleSchema);
  m.def(tokenmix::fft_op::kFftConvForwardSchema);
  m.def(tokenmix::fft_op::kFftConvBackwardSchema);
  m.def("fft_conv_cuda_size(int length, int taps, bool causal) -> int");
  m.def(tokenmix::fft_op::kFourierMixSchema);
  m.def(tokenmix::fft_op::kGlobalFilterForwardSchema);
  m.def(tokenmix::fft_op::kGlobalFilterBackwardSchema);
  m.def(tokenmix::fft_op::kSpectralGateForwardSchema);
  m.def(tokenmix::fft_op::kSpectralGateBackwardSchema);
  m.def("fft_line_cuda_size(int n) -> int");
  m.def("mma_count() -> int");
  m.def("wgmma_count() -> int");
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix_emulated, CompositeExplicitAutograd, m) {
  m.impl("fft_conv_cuda_size", TORCH_BOX(&fft_conv_cuda_size));
  m.impl("fft_line_cuda_size", TORCH_BOX(&fft_line_cuda_size));
  m.impl("mma_count", TORCH_BOX(&mma_count));
  m.impl("wgmma_count", TORCH_BOX(&wgmma_count));
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix_emulated, CPU, m) {
  m.impl("mma_gemm", TORCH_BOX(&mma_gemm));
  m.impl("na_forward", TORCH_BOX(&na_forward));
  m.impl("na_backward", TORCH_BOX(&na_backward));
  m.impl("block_sparse_forward", TORCH_BOX(&block_sparse_forward));
  m.impl("block_sparse_backward", TORCH_BOX(&block_sparse_backward));
  m.impl("block_sparse_schedule", TORCH_BOX(&block_sparse_schedule));
  m.impl("fft_conv_forward", TORCH_BOX(&fft_conv_forward));
  m.impl("fft_conv_backward", TORCH_BOX(&fft_conv_backward));
  m.impl("fourier_mix", TORCH_BOX(&fourier_mix));
  m.impl("global_filter_forward", TORCH_BOX(&global_filter_forward));
  m.impl("global_filter_backward", TORCH_BOX(&global_filter_backward));
  m.impl("spectral_gate_forward", TORCH_BOX(&spectral_gate_forward));
  m.impl("spectral_gate_backward", TORCH_BOX(&spectral_gate_backward));
}
