// Host side of the CUDA fourier_mix / global_filter / spectral_gate kernels
// (tokenmix/cuda/fft_mix_kernels.h): the pass sequences, the emulator's buffer registrations and
// the launches, all on one stream.
#pragma once

#include <stdexcept>
#include <string>

#include "tokenmix/cuda/fft_entry.h"
#include "tokenmix/cuda/fft_launch_common.h"
#include "tokenmix/cuda/fft_mix_kernels.h"

namespace tokenmix::cuda::fft_host {

inline void require(const std::string& why) {
  if (!why.empty()) throw std::runtime_error(why);
}
inline void require_workspace(const float* workspace, const char* op) {
  if (!workspace)
    throw std::runtime_error(std::string("tokenmix: ") + op + "'s CUDA kernels need a workspace");
}

inline void set4(int64_t* dst, int64_t a, int64_t b, int64_t c, int64_t d) {
  dst[0] = a;
  dst[1] = b;
  dst[2] = c;
  dst[3] = d;
}

// One block per G lines, at most kFftLineBlocks blocks, each looping over groups: a block's
// setup (twiddles, and Bluestein's chirp spectrum, one m-point transform) is then amortized over
// many lines even when a group is a single line (m = 2048).
inline constexpr int64_t kFftLineBlocks = 1024;
inline dim3u line_grid(const LinePlan& q, int64_t lines) {
  int64_t groups = (lines + q.group - 1) / q.group;
  groups = groups < 1 ? 1 : (groups > kFftLineBlocks ? kFftLineBlocks : groups);
  return dim3u(uint32_t(groups), 1, 1);
}

template <class E>
void line_pass(const FftLinePassParams& prm, void* stream) {
  launch_checked(fft_line_pass_kernel<E>, "fft_line_pass_kernel", line_grid(prm.plan, prm.lines),
                 fft_line_smem_bytes(prm.plan), prm, stream);
}

// ---- fourier_mix

template <class E>
void fourier_mix(const FourierMixProblem& p, void* stream) {
  require(fft_mix_unsupported_reason(p.dtype, {p.length, p.channels}, "fourier_mix"));
  require_workspace(p.workspace, "fourier_mix");
  const int64_t B = p.batch, L = p.length, C = p.channels;
  const int64_t blc[3] = {B, L, C};
  Registrations r;
  r.add(p.x.data, extent_bytes(p.x, blc, 3), "x");
  r.add(p.out, size_t(B * L * C) * size_t(dtype_size(p.dtype)), "out");
  r.add(p.workspace, size_t(fourier_mix_cuda_workspace_floats(B, L, C)) * 4, "workspace");
  r.commit();
  // The channel transform of every token (b, t) into the workspace [B, L, C].
  FftLinePassParams a{};
  a.plan = line_plan(C);
  a.lines = B * L;
  a.dim1 = L;
  a.dim2 = 1;
  a.src = p.x.data;
  set4(a.src_stride, p.x.stride[0], p.x.stride[1], 0, p.x.stride[2]);
  a.src_points = C;
  a.forward = true;
  a.tensor_cores = true;
  a.dst = p.workspace;
  a.dst_complex = true;
  set4(a.dst_stride, L * C, C, 0, 1);
  a.dst_points = C;
  line_pass<E>(a, stream);
  // The token transform of every channel (b, c); the output is its real part.
  FftLinePassParams t{};
  t.plan = line_plan(L);
  t.lines = B * C;
  t.dim1 = C;
  t.dim2 = 1;
  t.src = p.workspace;
  t.src_complex = true;
  set4(t.src_stride, L * C, 1, 0, C);
  t.src_points = L;
  t.forward = true;
  t.tensor_cores = true;
  t.dst = p.out;
  set4(t.dst_stride, L * C, 1, 0, C);
  t.dst_points = L;
  line_pass<E>(t, stream);
}

// ---- global_filter

// The passes over a [B, H, W/2+1, C] complex half spectrum in the workspace.
struct FilterPasses {
  const GlobalFilterProblem& p;
  int64_t bins;
  void* stream;
  bool tensor_cores;  // Monarch transforms for fp16/bf16 (not for the weight's gradient's spectra)

  // Rows (b, h, c): the half spectrum of src's rows (W points) into spectrum.
  template <class E>
  void rows_forward(const FftTensor& src, float* spectrum) const {
    FftLinePassParams a{};
    a.plan = line_plan(p.width);
    a.lines = p.batch * p.height * p.channels;
    a.dim1 = p.height;
    a.dim2 = p.channels;
    a.src = src.data;
    set4(a.src_stride, src.stride[0], src.stride[1], src.stride[3], src.stride[2]);
    a.src_points = p.width;
    a.forward = true;
    a.tensor_cores = tensor_cores;
    a.dst = spectrum;
    a.dst_complex = true;
    set4(a.dst_stride, p.height * bins * p.channels, bins * p.channels, 1, p.channels);
    a.dst_points = bins;
    line_pass<E>(a, stream);
  }
  // Columns (b, f, c), in place: the transform, and/or the product with the (conjugated) weight
  // / (H W) followed by the inverse transform.
  template <class E>
  void columns(float* spectrum, bool forward, bool filter, bool conj_weight) const {
    FftLinePassParams a{};
    a.plan = line_plan(p.height);
    a.lines = p.batch * bins * p.channels;
    a.dim1 = bins;
    a.dim2 = p.channels;
    a.src = spectrum;
    a.src_complex = true;
    set4(a.src_stride, p.height * bins * p.channels, p.channels, 1, bins * p.channels);
    a.src_points = p.height;
    a.forward = forward;
    a.tensor_cores = tensor_cores;
    if (filter) {
      a.weight = static_cast<const float*>(p.weight);
      a.weight_stride[0] = p.channels;
      a.weight_stride[1] = 1;
      a.weight_stride[2] = bins * p.channels;
      a.conj_weight = conj_weight;
      a.scale = 1.0f / float(p.height * p.width);
      a.inverse = true;
    }
    a.dst = spectrum;
    a.dst_complex = true;
    set4(a.dst_stride, p.height * bins * p.channels, p.channels, 1, bins * p.channels);
    a.dst_points = p.height;
    line_pass<E>(a, stream);
  }
  // Rows (b, h, c): the real inverse of the half spectrum into out (contiguous [B, H, W, C]).
  template <class E>
  void rows_inverse(const float* spectrum, void* out) const {
    FftLinePassParams a{};
    a.plan = line_plan(p.width);
    a.lines = p.batch * p.height * p.channels;
    a.dim1 = p.height;
    a.dim2 = p.channels;
    a.src = spectrum;
    a.src_complex = true;
    a.hermitian = true;
    set4(a.src_stride, p.height * bins * p.channels, bins * p.channels, 1, p.channels);
    a.src_points = bins;
    a.inverse = true;
    a.tensor_cores = tensor_cores;
    a.dst = out;
    set4(a.dst_stride, p.height * p.width * p.channels, p.width * p.channels, 1, p.channels);
    a.dst_points = p.width;
    line_pass<E>(a, stream);
  }
};

template <class E>
void global_filter(const GlobalFilterProblem& p, bool backward, void* stream) {
  require(fft_mix_unsupported_reason(p.dtype, {p.height, p.width}, "global_filter"));
  require_workspace(p.workspace, "global_filter");
  const int64_t B = p.batch, H = p.height, W = p.width, C = p.channels, bins = W / 2 + 1;
  const int64_t bhwc[4] = {B, H, W, C};
  const size_t elems = size_t(B * H * W * C) * size_t(dtype_size(p.dtype));
  const size_t weight_bytes = size_t(H * bins * C * 2) * 4;
  Registrations r;
  r.add(p.x.data, extent_bytes(p.x, bhwc, 4), "x");
  r.add(p.weight, weight_bytes, "weight");
  r.add(p.workspace, size_t(global_filter_cuda_workspace_floats(B, H, W, C, backward)) * 4,
        "workspace");
  if (backward) {
    r.add(p.grad_out.data, extent_bytes(p.grad_out, bhwc, 4), "grad_out");
    r.add(p.grad_x, elems, "grad_x");
    r.add(p.grad_weight, weight_bytes, "grad_weight");
  } else {
    r.add(p.out, elems, "out");
  }
  r.commit();
  const FilterPasses passes{p, bins, stream, true};
  float* x_hat = p.workspace;
  if (!backward) {
    passes.rows_forward<E>(p.x, x_hat);
    passes.columns<E>(x_hat, true, true, false);
    passes.rows_inverse<E>(x_hat, p.out);
    return;
  }
  // The spectra of x and dy feed the weight's gradient, a sum over the batch: float32.
  const FilterPasses exact{p, bins, stream, false};
  float* g_hat = p.workspace + 2 * B * H * bins * C;
  exact.rows_forward<E>(p.x, x_hat);
  exact.columns<E>(x_hat, true, false, false);
  exact.rows_forward<E>(p.grad_out, g_hat);
  exact.columns<E>(g_hat, true, false, false);
  FilterGradParams g{B, H, W, bins, C, x_hat, g_hat, static_cast<float*>(p.grad_weight)};
  launch_checked(fft_filter_grad_kernel, "fft_filter_grad_kernel", pointwise_grid(H * bins * C), 0,
                 g, stream);
  passes.columns<E>(g_hat, false, true, true);  // dx: the filter with conj(weight) ...
  passes.rows_inverse<E>(g_hat, p.grad_x);      // ... applied to dy's spectrum
}

// ---- spectral_gate

template <class E>
void spectral_gate(const SpectralGateProblem& p, bool backward, void* stream) {
  require(fft_mix_unsupported_reason(p.dtype, {p.length}, "spectral_gate"));
  if (backward) require_workspace(p.workspace, "spectral_gate");  // the forward needs none
  const int64_t B = p.batch, L = p.length, C = p.channels, bins = L / 2 + 1;
  const int64_t blc[3] = {B, L, C};
  const size_t elems = size_t(B * L * C) * size_t(dtype_size(p.dtype));
  const size_t gate_bytes = size_t(B * p.heads * bins * 2) * 4;
  Registrations r;
  r.add(p.x.data, extent_bytes(p.x, blc, 3), "x");
  r.add(p.gate, gate_bytes, "gate");
  r.add(p.bias, p.bias ? size_t(p.heads * bins) * 4 : 0, "bias");
  r.add(p.workspace,
        size_t(spectral_gate_cuda_workspace_floats(B, L, C, p.bias != nullptr, backward)) * 4,
        "workspace");
  if (backward) {
    r.add(p.grad_out.data, extent_bytes(p.grad_out, blc, 3), "grad_out");
    r.add(p.grad_x, elems, "grad_x");
    r.add(p.grad_gate, gate_bytes, "grad_gate");
    r.add(p.grad_bias, p.bias ? size_t(p.heads * bins) * 4 : 0, "grad_bias");
  } else {
    r.add(p.out, elems, "out");
  }
  r.commit();
  SpectralGateParams prm{};
  prm.plan = line_plan(L);
  prm.batch = B;
  prm.length = L;
  prm.channels = C;
  prm.heads = p.heads;
  prm.bins = bins;
  prm.modrelu = p.modrelu;
  prm.x = p.x.data;
  copy_strides(p.x, prm.x_stride, 3);
  prm.dy = p.grad_out.data;
  copy_strides(p.grad_out, prm.dy_stride, 3);
  prm.gate = static_cast<const float*>(p.gate);
  prm.bias = static_cast<const float*>(p.bias);
  const dim3u grid = line_grid(prm.plan, B * C);
  const int64_t smem = fft_line_smem_bytes(prm.plan);
  if (!backward) {
    prm.out = p.out;
    launch_checked(spectral_gate_forward_kernel<E>, "spectral_gate_forward_kernel", grid, smem, prm,
                   stream);
    return;
  }
  prm.out = p.grad_x;
  prm.part_gate = p.workspace;
  prm.part_bias = p.bias ? p.workspace + 2 * B * C * bins : nullptr;
  prm.grad_gate = static_cast<float*>(p.grad_gate);
  prm.grad_bias = static_cast<float*>(p.grad_bias);
  launch_checked(spectral_gate_backward_kernel<E>, "spectral_gate_backward_kernel", grid, smem, prm,
                 stream);
  const int64_t outputs = B * p.heads * bins + (p.bias ? p.heads * bins : 0);
  launch_checked(spectral_gate_reduce_kernel, "spectral_gate_reduce_kernel",
                 pointwise_grid(outputs), 0, prm, stream);
}

}  // namespace tokenmix::cuda::fft_host
