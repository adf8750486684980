// Kernel-parameter fields and tile constants shared by every policy of the CUDA attention engine
// (attention_engine.h). A policy's parameter struct derives from AttentionParams and adds what its
// tile schedule and element rule need; it is plain data passed by value to every kernel.
#pragma once

#include <cstdint>

namespace tokenmix::cuda {

// Rows per tile (queries in the query-major kernels, keys in the key-major one) and threads per
// block: 4 warps, each owning 16 rows (the M side of the m16n8k16 tensor-core instruction).
constexpr int kTileRows = 64;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// Output columns a backward block accumulates in registers (dQ, dK, dV are split in chunks).
constexpr int kGradChunk = 64;

// The tensors a policy locates rows of.
enum class Operand { kQ, kK, kV, kOut, kGradOut };

struct AttentionParams {
  int batch, heads, kv_heads;
  int head_dim, value_dim;  // D, Dv
  int head_dim_padded;      // D rounded up to the kernel's k-step (16 for tensor cores)
  int value_dim_padded;     // Dv rounded up to the k-step
  float scale;              // softmax scale
  float scale_log2;         // scale * log2(e): logits are kept in log2 units
  const void* q;
  const void* k;
  const void* v;
  // Forward outputs.
  void* out;
  float* lse;  // [B, Tq, H]
  // Backward inputs and outputs.
  const void* grad_out;
  const void* out_in;     // the forward output (for delta = rowsum(dO * O))
  const float* lse_in;    // the forward LSE
  const float* grad_lse;  // optional
  float* delta;           // workspace [B, Tq, H]: rowsum(dO * O) - grad_lse
  void* grad_q;           // contiguous [B, Tq.., H, D]
  void* grad_k;           // contiguous [B, Tk.., H_kv, D]
  void* grad_v;           // contiguous [B, Tk.., H_kv, Dv]
  bool deterministic;
};

}  // namespace tokenmix::cuda
