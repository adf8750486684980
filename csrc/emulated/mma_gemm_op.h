// torch.ops.tokenmix_emulated.mma_gemm, shared by its CPU (emulator) and CUDA implementations:
// argument checks, the output, and the launch of the self-test GEMM kernel. Each translation unit
// gets its own copy (anonymous namespace): launch_gemm resolves to the emulated kernels under the
// host compiler and to the GPU ones under nvcc.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <vector>

#include "../simt_emulator/selftest_kernels.h"
#include "tokenmix/stable_op_utils.h"

namespace {

// C[M x N] (fp32) = A[M x K] B[K x N] with the tiled mma.sync GEMM kernel (cp.async staging,
// ldmatrix fragments, m16n8k16 tensor-core mma). The caller checks the device.
torch::stable::Tensor mma_gemm_launch(const torch::stable::Tensor& a,
                                      const torch::stable::Tensor& b, void* stream) {
  using torch::headeronly::ScalarType;
  STD_TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "mma_gemm: a and b must be matrices");
  STD_TORCH_CHECK(a.scalar_type() == b.scalar_type() && (a.scalar_type() == ScalarType::Half ||
                                                         a.scalar_type() == ScalarType::BFloat16),
                  "mma_gemm: a and b must both be float16 or both bfloat16");
  STD_TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "mma_gemm: a and b must be contiguous");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  STD_TORCH_CHECK(b.size(0) == k, "mma_gemm: inner dimensions differ");
  STD_TORCH_CHECK(k % 8 == 0 && n % 8 == 0 && k > 0 && n > 0,
                  "mma_gemm: K and N must be positive multiples of 8 (16-byte cp.async chunks)");
  torch::stable::Tensor c =
      tokenmix::new_empty_checked(a, std::vector<int64_t>{m, n}, ScalarType::Float, "c");
  if (m == 0) return c;
  tokenmix::simt_selftest::launch_gemm(
      a.scalar_type() == ScalarType::BFloat16, static_cast<const uint16_t*>(a.data_ptr()),
      static_cast<const uint16_t*>(b.data_ptr()), static_cast<float*>(c.data_ptr()), int(m), int(n),
      int(k), true, stream);
  return c;
}

}  // namespace
