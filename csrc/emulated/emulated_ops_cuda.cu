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

#include "../simt_emulator/selftest_kernels.h"
#include "tokenmix/current_stream.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

Tensor mma_gemm_cuda(Tensor a, Tensor b) {
  STD_TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "mma_gemm: a and b must be matrices");
  STD_TORCH_CHECK(a.scalar_type() == b.scalar_type() && (a.scalar_type() == ScalarType::Half ||
                                                         a.scalar_type() == ScalarType::BFloat16),
                  "mma_gemm: a and b must both be float16 or both bfloat16");
  STD_TORCH_CHECK(a.is_cuda() && b.is_cuda() && a.get_device() == b.get_device() &&
                      a.is_contiguous() && b.is_contiguous(),
                  "mma_gemm: a and b must be contiguous tensors on one CUDA device");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  STD_TORCH_CHECK(b.size(0) == k, "mma_gemm: inner dimensions differ");
  STD_TORCH_CHECK(k % 8 == 0 && n % 8 == 0 && k > 0 && n > 0,
                  "mma_gemm: K and N must be positive multiples of 8 (16-byte cp.async chunks)");
  Tensor c = torch::stable::new_empty(a, std::vector<int64_t>{m, n}, ScalarType::Float);
  if (m == 0) return c;
  tokenmix::simt_selftest::launch_gemm(
      a.scalar_type() == ScalarType::BFloat16, static_cast<const uint16_t*>(a.data_ptr()),
      static_cast<const uint16_t*>(b.data_ptr()), static_cast<float*>(c.data_ptr()), int(m), int(n),
      int(k), true, tokenmix::current_cuda_stream(a.get_device()));
  return c;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(tokenmix_emulated, CUDA, m) {
  m.impl("mma_gemm", TORCH_BOX(&mma_gemm_cuda));
}
