// Host side of the CUDA linear-attention scans (tokenmix/cuda/linear_scan_kernels.h): the
// kernels' parameters from the op layer's problem, the emulator's buffer registrations and the
// launch sequences, all on one stream.
#pragma once

#include <stdexcept>
#include <string>

#include "tokenmix/cuda/delta_rule_kernels.h"
#include "tokenmix/cuda/launch_common.h"
#include "tokenmix/cuda/linear_scan_kernels.h"
#include "tokenmix/cuda/scan_entry.h"

namespace tokenmix::cuda::scan_host {

inline void copy3(const int64_t* src, int64_t* dst) {
  for (int i = 0; i < 3; ++i) dst[i] = src[i];
}

inline ScanParams scan_params(const LinearScanProblem& p) {
  ScanParams s{};
  s.batch = p.batch;
  s.seq_len = p.seq_len;
  s.heads = p.heads;
  s.key_dim = p.key_dim;
  s.value_dim = p.value_dim;
  s.num_seqs = p.num_seqs;
  s.key_pad = scan_key_pad(p.key_dim);
  s.value_blocks = scan_value_blocks(p.value_dim);
  s.cu_seqlens = p.cu_seqlens;
  s.scale = float(p.scale);
  s.q = p.q;
  s.k = p.k;
  s.v = p.v;
  copy3(p.q_stride, s.q_stride);
  copy3(p.k_stride, s.k_stride);
  copy3(p.v_stride, s.v_stride);
  s.g = static_cast<const float*>(p.g);
  s.gk = static_cast<const float*>(p.gk);
  s.initial_state = static_cast<const float*>(p.initial_state);
  s.out = p.out;
  s.final_state = static_cast<float*>(p.final_state);
  s.grad_out = p.grad_out;
  s.grad_out_stride[0] = p.seq_len * p.heads * p.value_dim;
  s.grad_out_stride[1] = p.heads * p.value_dim;
  s.grad_out_stride[2] = p.value_dim;
  s.grad_final_state = static_cast<const float*>(p.grad_final_state);
  s.grad_q = p.grad_q;
  s.grad_k = p.grad_k;
  s.grad_v = p.grad_v;
  s.grad_g = static_cast<float*>(p.grad_g);
  s.grad_gk = static_cast<float*>(p.grad_gk);
  s.grad_initial_state = static_cast<float*>(p.grad_initial_state);
  s.beta = static_cast<const float*>(p.beta);
  s.grad_beta = static_cast<float*>(p.grad_beta);
  if (p.workspace) {
    const ScanWorkspace w = scan_workspace(p);
    s.states = p.workspace + w.states;
    s.dq_part = p.workspace + w.dq_part;
    s.dk_part = p.workspace + w.dk_part;
    s.dg_final_part = p.workspace + w.extra;
    s.dg_part = p.workspace + w.extra;
    s.dbeta_part = s.dg_part + scan_value_blocks(p.value_dim) * p.batch * p.seq_len * p.heads;
  }
  return s;
}

// Bytes from a [B, T, H, D] view's first element to one past its last.
inline size_t view_bytes(const LinearScanProblem& p, const void* data, const int64_t* stride,
                         int64_t dim, int64_t elem) {
  if (!data || p.batch * p.seq_len * p.heads * dim == 0) return 0;
  return size_t(
      ((p.batch - 1) * stride[0] + (p.seq_len - 1) * stride[1] + (p.heads - 1) * stride[2] + dim) *
      elem);
}

// Every buffer a launch sequence touches, for the emulator's checks (no-op under nvcc).
inline void register_buffers(Registrations& r, const LinearScanProblem& p, bool backward) {
  const int64_t es = dtype_size(p.dtype);
  const size_t btH = size_t(p.batch * p.seq_len * p.heads);
  const size_t state = size_t(p.num_seqs * p.heads * p.key_dim * p.value_dim) * 4;
  r.add(p.q, view_bytes(p, p.q, p.q_stride, p.key_dim, es), "q");
  r.add(p.k, view_bytes(p, p.k, p.k_stride, p.key_dim, es), "k");
  r.add(p.v, view_bytes(p, p.v, p.v_stride, p.value_dim, es), "v");
  r.add(p.g, btH * 4, "g");
  r.add(p.beta, btH * 4, "beta");
  r.add(p.gk, btH * size_t(p.key_dim) * 4, "gk");
  r.add(p.cu_seqlens, size_t(p.num_seqs + 1) * 8, "cu_seqlens");
  r.add(p.initial_state, state, "initial_state");
  if (!backward) {
    r.add(p.out, btH * size_t(p.value_dim * es), "out");
    r.add(p.final_state, state, "final_state");
    return;
  }
  r.add(p.grad_out, btH * size_t(p.value_dim * es), "grad_out");
  r.add(p.grad_final_state, state, "grad_final_state");
  r.add(p.grad_q, btH * size_t(p.key_dim * es), "grad_q");
  r.add(p.grad_k, btH * size_t(p.key_dim * es), "grad_k");
  r.add(p.grad_v, btH * size_t(p.value_dim * es), "grad_v");
  r.add(p.grad_g, btH * 4, "grad_g");
  r.add(p.grad_beta, btH * 4, "grad_beta");
  r.add(p.grad_gk, btH * size_t(p.key_dim) * 4, "grad_gk");
  r.add(p.grad_initial_state, state, "grad_initial_state");
  r.add(p.workspace, size_t(scan_workspace(p).total) * 4, "workspace");
}

template <class K, class... Args>
void launch(K kernel, const char* name, int64_t blocks, int64_t smem_bytes, void* stream,
            const Args&... args) {
  // The scans keep float32 tiles for every dtype: the remedy is the chunked PyTorch path,
  // which tokenmix.linear_attention / delta_rule pick themselves for such devices.
  if (smem_bytes > 0)
    prepare_shared(kernel, smem_bytes, checked_device(), name,
                   "a smaller head dim K fits; tokenmix.linear_attention and delta_rule run such "
                   "problems in the chunked PyTorch implementation");
  launch_on(static_cast<stream_t>(stream), named(kernel, name), dim3u(uint32_t(blocks), 1, 1),
            dim3u(kScanThreads), size_t(smem_bytes), args...);
  check_launch(name);
}

// Blocks of a grid-stride kernel over `count` items.
inline int64_t pointwise_blocks(int64_t count) {
  const int64_t blocks = (count + kScanThreads - 1) / kScanThreads;
  return blocks < 1 ? 1 : (blocks > 4096 ? 4096 : blocks);
}

inline int64_t scan_blocks(const LinearScanProblem& p) {
  return p.num_seqs * p.heads * scan_value_blocks(p.value_dim);
}

inline void require(const LinearScanProblem& p) {
  const std::string why = linear_scan_unsupported_reason(p);
  if (!why.empty()) throw std::runtime_error(why);
}

// A launch sequence's checked problem and parameters, with every buffer it touches registered
// for the emulator while the object lives.
struct ScanLaunch {
  Registrations registrations;
  ScanParams params;
  ScanLaunch(const LinearScanProblem& p, bool backward) {
    require(p);
    if (backward && !p.workspace)
      throw std::runtime_error("tokenmix: the CUDA scans' backward needs a workspace");
    register_buffers(registrations, p, backward);
    registrations.commit();
    params = scan_params(p);
  }
};

template <class E, int kDecay>
void forward(const LinearScanProblem& p, void* stream) {
  ScanLaunch checked(p, false);
  ScanParams& s = checked.params;
  launch(scan_forward_kernel<E, kDecay>, "scan_forward_kernel", scan_blocks(p),
         scan_smem_floats(s.key_pad, false) * 4, stream, s);
}

template <class E, int kDecay>
void backward(const LinearScanProblem& p, void* stream) {
  ScanLaunch checked(p, true);
  ScanParams& s = checked.params;
  s.states_only = true;  // the chunk-start states into the workspace
  launch(scan_forward_kernel<E, kDecay>, "scan_forward_kernel", scan_blocks(p),
         scan_smem_floats(s.key_pad, false) * 4, stream, s);
  s.states_only = false;
  launch(scan_backward_kernel<E, kDecay>, "scan_backward_kernel", scan_blocks(p),
         scan_smem_floats(s.key_pad, true) * 4, stream, s);
  const int64_t elements = p.batch * p.seq_len * p.heads * p.key_dim;
  launch(scan_reduce_kernel<E>, "scan_reduce_kernel", pointwise_blocks(elements), 0, stream, s,
         kDecay != kScanNoDecay);
  if constexpr (kDecay != kScanNoDecay) {
    const int64_t warps = kScanThreads / 32;
    launch(scan_decay_grad_kernel<kDecay>, "scan_decay_grad_kernel",
           (p.num_seqs * p.heads + warps - 1) / warps, 0, stream, s);
  }
}

template <class E>
void delta_forward(const LinearScanProblem& p, void* stream) {
  ScanLaunch checked(p, false);
  ScanParams& s = checked.params;
  launch(delta_forward_kernel<E>, "delta_forward_kernel", scan_blocks(p),
         delta_smem_floats(s.key_pad, false) * 4, stream, s);
}

template <class E>
void delta_backward(const LinearScanProblem& p, void* stream) {
  ScanLaunch checked(p, true);
  ScanParams& s = checked.params;
  s.states_only = true;  // the chunk-start states into the workspace
  launch(delta_forward_kernel<E>, "delta_forward_kernel", scan_blocks(p),
         delta_smem_floats(s.key_pad, false) * 4, stream, s);
  s.states_only = false;
  launch(delta_backward_kernel<E>, "delta_backward_kernel", scan_blocks(p),
         delta_smem_floats(s.key_pad, true) * 4, stream, s);
  const int64_t elements = p.batch * p.seq_len * p.heads * p.key_dim;
  launch(scan_reduce_kernel<E>, "scan_reduce_kernel", pointwise_blocks(elements), 0, stream, s,
         false);
  launch(delta_token_grad_kernel, "delta_token_grad_kernel", pointwise_blocks(p.num_seqs * p.heads),
         0, stream, s);
}

template <class E>
void run(const LinearScanProblem& p, bool backward_pass, void* stream) {
  if (p.delta_rule)
    return backward_pass ? delta_backward<E>(p, stream) : delta_forward<E>(p, stream);
  switch (p.decay) {
    case DecayKind::kNone:
      return backward_pass ? backward<E, kScanNoDecay>(p, stream)
                           : forward<E, kScanNoDecay>(p, stream);
    case DecayKind::kScalar:
      return backward_pass ? backward<E, kScanScalarDecay>(p, stream)
                           : forward<E, kScanScalarDecay>(p, stream);
    case DecayKind::kPerKey:
      return backward_pass ? backward<E, kScanPerKeyDecay>(p, stream)
                           : forward<E, kScanPerKeyDecay>(p, stream);
  }
}

}  // namespace tokenmix::cuda::scan_host
