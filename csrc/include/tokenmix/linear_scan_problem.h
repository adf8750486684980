// Problem descriptor of the linear-attention scans, handed from the op layer
// to the CPU kernels (plain data, no torch types).
#pragma once

#include <cstdint>

#include "tokenmix/tensor_view.h"

namespace tokenmix {

enum class DecayKind : int { kNone = 0, kScalar = 1, kPerKey = 2 };

struct LinearScanProblem {
  DType dtype = DType::kFloat32;
  DecayKind decay = DecayKind::kNone;
  bool delta_rule = false;
  int64_t batch = 0, seq_len = 0, heads = 0, key_dim = 0, value_dim = 0;
  int64_t num_seqs = 0;  // sequences (= batch without cu_seqlens)
  // [num_seqs + 1] offsets into T (batch == 1), on the tensors' device (the CUDA op layer
  // leaves their validation to the Python checks: reading them would synchronize).
  const int64_t* cu_seqlens = nullptr;
  double scale = 1.0;

  // [B, T, H, D] tensors in the input dtype with unit feature stride:
  // strides in elements for (b, t, h).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride[3], k_stride[3], v_stride[3];
  // Decays and beta: contiguous, in the accumulation type (fp32, fp64 for fp64).
  const void* g = nullptr;              // [B, T, H] scalar log decay
  const void* gk = nullptr;             // [B, T, H, K] per-key log decay
  const void* beta = nullptr;           // [B, T, H] (delta rule)
  const void* initial_state = nullptr;  // [N, H, K, V], accumulation type
  void* out = nullptr;                  // contiguous [B, T, H, V], input dtype
  void* final_state = nullptr;          // [N, H, K, V], accumulation type

  // Backward.
  const void* grad_out = nullptr;          // contiguous [B, T, H, V]
  const void* grad_final_state = nullptr;  // optional [N, H, K, V]
  void* grad_q = nullptr;                  // contiguous, input dtype
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  void* grad_g = nullptr;     // accumulation type, like g
  void* grad_gk = nullptr;    // like gk
  void* grad_beta = nullptr;  // like beta
  void* grad_initial_state = nullptr;
  float* workspace = nullptr;  // CUDA backward: linear_scan_cuda_workspace_floats floats

  ParallelForFn parallel_for = nullptr;
  int num_threads = 1;

  // Sequence n covers [begin, end) of the time axis of batch entry b.
  void sequence(int64_t n, int64_t* b, int64_t* begin, int64_t* end) const {
    if (cu_seqlens) {
      *b = 0;
      *begin = cu_seqlens[n];
      *end = cu_seqlens[n + 1];
    } else {
      *b = n;
      *begin = 0;
      *end = seq_len;
    }
  }
};

}  // namespace tokenmix
