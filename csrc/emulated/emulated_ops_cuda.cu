// CUDA implementations of the torch.ops.tokenmix_emulated.* ops: the same
// SIMT kernel sources that the CPU implementations run under the emulator,
// compiled by nvcc and launched on torch's current CUDA stream. Built when
// CMake finds nvcc (TOKENMIX_CUDA=AUTO/ON). Never run on this project's
// machines (no GPU): the emulator is what executes these sources in the tests.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <vector>

#include "mma_gemm_op.h"
#include "tokenmix/current_stream.h"

namespace {

using torch::stable::Tensor;

Tensor mma_gemm_cuda(Tensor a, Tensor b) {
  STD_TORCH_CHECK(a.is_cuda() && b.is_cuda() && a.get_device() == b.get_device(),
                  "mma_gemm: a and b must be tensors on one CUDA device");
  return mma_gemm_launch(a, b, tokenmix::current_cuda_stream(a.get_device()));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tokenmix_emulated, CUDA, m) {
  m.impl("mma_gemm", TORCH_BOX(&mma_gemm_cuda));
}
