// torch.ops.tokenmix_emulated.*: SIMT kernels run on the CPU under the SIMT
// emulator, exposed as ops so the tests can compare CUDA kernel sources with
// torch on a machine without a GPU. A test-only library (tokenmix/_emulated.so),
// never loaded by `import tokenmix`. Emulator reports (out-of-bounds access,
// races, barrier divergence...) surface as Python RuntimeErrors.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <vector>

#include "../neighborhood/na_schemas.h"
#include "../neighborhood/na_simt_op.h"
#include "mma_gemm_op.h"

namespace {

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

}  // namespace

STABLE_TORCH_LIBRARY(tokenmix_emulated, m) {
  m.def("mma_gemm(Tensor a, Tensor b) -> Tensor");
  m.def(tokenmix::na_op::kForwardSchema);
  m.def(tokenmix::na_op::kBackwardSchema);
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix_emulated, CPU, m) {
  m.impl("mma_gemm", TORCH_BOX(&mma_gemm));
  m.impl("na_forward", TORCH_BOX(&na_forward));
  m.impl("na_backward", TORCH_BOX(&na_backward));
}
