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

#include "../simt_emulator/selftest_kernels.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// C[M x N] (fp32) = A[M x K] B[K x N] with the tiled mma.sync GEMM kernel
// (cp.async staging, ldmatrix fragments, m16n8k16 tensor-core mma).
Tensor mma_gemm(Tensor a, Tensor b) {
  STD_TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "mma_gemm: a and b must be matrices");
  STD_TORCH_CHECK(a.scalar_type() == b.scalar_type() && (a.scalar_type() == ScalarType::Half ||
                                                         a.scalar_type() == ScalarType::BFloat16),
                  "mma_gemm: a and b must both be float16 or both bfloat16");
  STD_TORCH_CHECK(a.is_cpu() && b.is_cpu() && a.is_contiguous() && b.is_contiguous(),
                  "mma_gemm: a and b must be contiguous CPU tensors");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  STD_TORCH_CHECK(b.size(0) == k, "mma_gemm: inner dimensions differ");
  STD_TORCH_CHECK(k % 8 == 0 && n % 8 == 0 && k > 0 && n > 0,
                  "mma_gemm: K and N must be positive multiples of 8 (16-byte cp.async chunks)");
  Tensor c = torch::stable::new_empty(a, std::vector<int64_t>{m, n}, ScalarType::Float);
  if (m == 0) return c;
  tokenmix::simt_selftest::launch_gemm(a.scalar_type() == ScalarType::BFloat16,
                                       static_cast<const uint16_t*>(a.data_ptr()),
                                       static_cast<const uint16_t*>(b.data_ptr()),
                                       static_cast<float*>(c.data_ptr()), int(m), int(n), int(k));
  return c;
}

}  // namespace

STABLE_TORCH_LIBRARY(tokenmix_emulated, m) {
  m.def("mma_gemm(Tensor a, Tensor b) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(tokenmix_emulated, CPU, m) {
  m.impl("mma_gemm", TORCH_BOX(&mma_gemm));
}
