// Problem descriptors of the FFT-mixing operators (fft_conv, fourier_mix, global_filter,
// spectral_gate), handed from the op layer to the kernels (plain data, no torch types), and
// the transform-size rules the CPU and CUDA kernels share.
#pragma once

#include <cstdint>

#include "tokenmix/host_device.h"
#include "tokenmix/tensor_view.h"

namespace tokenmix {

// A strided tensor of up to 4 dimensions; strides in elements.
struct FftTensor {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t stride[4] = {0, 0, 0, 0};
};

// Largest prime a mixed-radix pass handles directly (an O(p^2) butterfly, halved by symmetry);
// lengths with a larger prime factor use Bluestein's algorithm.
inline constexpr int64_t kFftMaxDirectPrime = 61;

// Splits n into the radices of a mixed-radix transform: 4s first, then 2, 3, 5 and the other
// primes up to kFftMaxDirectPrime, in ascending order. Returns the number of radices, or -1 when
// n has a larger prime factor (the caller then uses Bluestein). n == 1 has no radix.
TM_HOST_DEVICE int fft_factorize(int64_t n, int* radix, int capacity) {
  int count = 0;
  while (n % 4 == 0 && count < capacity) {
    radix[count++] = 4;
    n /= 4;
  }
  for (int64_t p = 2; p <= kFftMaxDirectPrime && n > 1; ++p) {
    while (n % p == 0 && count < capacity) {
      radix[count++] = int(p);
      n /= p;
    }
  }
  return n == 1 ? count : -1;
}

// Whether n is 2^a 3^b 5^c (the lengths the transforms are fastest at).
TM_HOST_DEVICE bool fft_is_smooth(int64_t n) {
  while (n % 2 == 0) n /= 2;
  while (n % 3 == 0) n /= 3;
  while (n % 5 == 0) n /= 5;
  return n == 1;
}

// The smallest even 2^a 3^b 5^c >= n: the padded length of a linear convolution and of
// Bluestein's convolution.
TM_HOST_DEVICE int64_t fft_smooth_even_size(int64_t n) {
  int64_t m = n < 2 ? 2 : n;
  m += m & 1;
  while (!fft_is_smooth(m)) m += 2;
  return m;
}

// Transform length of fft_conv: linear convolution pads to a smooth even length that no output
// of the first L can wrap into (L + Lk - 1); circular convolution uses L itself.
TM_HOST_DEVICE int64_t fft_conv_size(int64_t length, int64_t filter_length, bool causal) {
  return causal ? fft_smooth_even_size(length + filter_length - 1) : length;
}

// The CUDA kernels keep a whole transform in one block's shared memory up to this length (one
// fused kernel): the backward's 5.5 transforms of float32 complex values (88 KiB at 2048
// points) fit the smallest opt-in limit of the sm_80+ devices the build targets (99 KiB on
// sm_86/89/120). Longer power-of-two transforms, up to kFftConvCudaMaxSize, take more passes
// over a float32 workspace in global memory (tokenmix/cuda/fft_conv_multipass.h): two
// in-block transforms of at most kFftConvCudaBlockSize points each.
inline constexpr int64_t kFftConvCudaBlockSize = 2048;
inline constexpr int64_t kFftConvCudaMaxSize = kFftConvCudaBlockSize * kFftConvCudaBlockSize;

// The transform length of fft_conv on CUDA (a power of two), or 0 when the CUDA kernels cannot
// run the problem. A linear convolution pads to n >= L + Lk - 1. A circular one transforms L
// itself when L is a power of two; any other L computes the linear convolution z (same n) and
// folds it: y[t] = z[t] + z[t + L] for t < Lk - 1 (fft_conv_cuda_folds).
TM_HOST_DEVICE int64_t fft_conv_cuda_size(int64_t length, int64_t filter_length, bool causal) {
  int64_t n = 2;
  const int64_t linear = length + filter_length - 1;
  if (!causal) {
    while (n < length) n *= 2;
    if (n == length) return n <= kFftConvCudaMaxSize ? n : 0;
  }
  while (n < linear) n *= 2;
  return n <= kFftConvCudaMaxSize ? n : 0;
}

// Whether the CUDA kernels compute a circular convolution by folding a linear one.
TM_HOST_DEVICE bool fft_conv_cuda_folds(int64_t length, int64_t filter_length, bool causal) {
  return !causal && fft_conv_cuda_size(length, filter_length, causal) != length;
}

TM_HOST_DEVICE bool fft_conv_cuda_multipass(int64_t n) {
  return n > kFftConvCudaBlockSize;
}

// The single-pass CUDA backward splits the batch into chunks so that about this many blocks
// run; each chunk's partial dk / d_bias go to a workspace and are added in chunk order
// afterwards.
inline constexpr int64_t kFftConvCudaBackwardBlocks = 256;

TM_HOST_DEVICE int64_t fft_conv_cuda_chunks(int64_t batch, int64_t channels) {
  const int64_t pairs = (channels + 1) / 2;
  int64_t chunks = pairs >= kFftConvCudaBackwardBlocks
                       ? 1
                       : (kFftConvCudaBackwardBlocks + pairs - 1) / (pairs > 0 ? pairs : 1);
  if (chunks > batch) chunks = batch;
  return chunks < 1 ? 1 : chunks;
}

// The multi-pass kernels hold the spectra of a chunk of channel pairs and batch entries at a
// time: about this many bytes per [entries, pairs, n] complex buffer (at least one pair and
// one entry). The emulator's build sets a small value so that tests run several chunks.
#ifdef TOKENMIX_FFT_CUDA_CHUNK_BYTES
inline constexpr int64_t kFftConvCudaChunkBytes = TOKENMIX_FFT_CUDA_CHUNK_BYTES;
#else
inline constexpr int64_t kFftConvCudaChunkBytes = int64_t(256) << 20;
#endif

TM_HOST_DEVICE int64_t fft_conv_cuda_pair_chunk(int64_t channels, int64_t n) {
  const int64_t pairs = (channels + 1) / 2;
  int64_t chunk = kFftConvCudaChunkBytes / (n * 8);
  if (chunk > pairs) chunk = pairs;
  return chunk < 1 ? 1 : chunk;
}

TM_HOST_DEVICE int64_t fft_conv_cuda_batch_chunk(int64_t batch, int64_t pair_chunk, int64_t n) {
  int64_t entries = kFftConvCudaChunkBytes / (pair_chunk * n * 8);
  if (entries > batch) entries = batch;
  return entries < 1 ? 1 : entries;
}

// Floats of workspace the CUDA kernels need. Single pass: the backward's per-chunk partial dk
// [C, Lk] and d_bias [C] (none with one chunk). Multi-pass (P pairs per pair chunk, E entries
// per batch chunk, complex = 2 floats): forward the filter spectrum [P, n] and two [E, P, n]
// buffers; backward two [P, n] (filter spectrum, dk spectrum) and three [E, P, n].
TM_HOST_DEVICE int64_t fft_conv_cuda_workspace_floats(int64_t batch, int64_t channels,
                                                      int64_t length, int64_t filter_length,
                                                      bool causal, bool backward) {
  const int64_t n = fft_conv_cuda_size(length, filter_length, causal);
  if (fft_conv_cuda_multipass(n)) {
    const int64_t pairs = fft_conv_cuda_pair_chunk(channels, n);
    const int64_t entries = fft_conv_cuda_batch_chunk(batch, pairs, n);
    return 2 * pairs * n * (backward ? 2 + 3 * entries : 1 + 2 * entries);
  }
  if (!backward) return 0;
  const int64_t chunks = fft_conv_cuda_chunks(batch, channels);
  return chunks > 1 ? chunks * channels * (filter_length + 1) : 0;
}

// The other three operators on CUDA transform lines of any length n in one block's shared
// memory (tokenmix/cuda/fft_lines.h): a power of two directly, any other length by Bluestein's
// algorithm over the power of two m >= 2n - 1. This is that m, or 0 when it exceeds
// kFftConvCudaBlockSize (lengths up to 2048 when a power of two, up to 1023 otherwise); longer
// lines run the torch.fft compositions.
TM_HOST_DEVICE int64_t fft_line_cuda_size(int64_t n) {
  if (n < 1) return 0;
  const int64_t need = (n & (n - 1)) == 0 ? n : 2 * n - 1;
  int64_t m = 1;
  while (m < need) m *= 2;
  return m <= kFftConvCudaBlockSize ? m : 0;
}

// Workspace floats of the CUDA kernels (float32 complex spectra, kept whole: [B, L, C] for
// fourier_mix; one [B, H, W/2+1, C] half spectrum for global_filter's forward and two for its
// backward; each channel's share of d_gate [B, C, L/2+1] (and of d_bias) for spectral_gate's
// backward).
TM_HOST_DEVICE int64_t fourier_mix_cuda_workspace_floats(int64_t batch, int64_t length,
                                                         int64_t channels) {
  return 2 * batch * length * channels;
}
TM_HOST_DEVICE int64_t global_filter_cuda_workspace_floats(int64_t batch, int64_t height,
                                                           int64_t width, int64_t channels,
                                                           bool backward) {
  return (backward ? 4 : 2) * batch * height * (width / 2 + 1) * channels;
}
TM_HOST_DEVICE int64_t spectral_gate_cuda_workspace_floats(int64_t batch, int64_t length,
                                                           int64_t channels, bool bias,
                                                           bool backward) {
  return backward ? (bias ? 3 : 2) * batch * channels * (length / 2 + 1) : 0;
}

// fft_conv: y = post_gate * (k (*) (pre_gate * u)) + bias * u over [B, L, C].
struct FftConvProblem {
  DType dtype = DType::kFloat32;  // u, gates, out and their gradients
  int64_t batch = 0, length = 0, channels = 0, filter_length = 0;
  bool causal = true;
  FftTensor u, pre_gate, post_gate;  // [B, L, C]; gates optional (data == nullptr)
  FftTensor k;                       // [C, Lk], own dtype (u's or the accumulation type)
  FftTensor bias;                    // [C], own dtype; optional
  void* out = nullptr;               // contiguous [B, L, C]

  // Backward.
  FftTensor grad_out;              // [B, L, C]
  void* grad_u = nullptr;          // contiguous [B, L, C]
  void* grad_pre_gate = nullptr;   // contiguous [B, L, C] when pre_gate is given
  void* grad_post_gate = nullptr;  // contiguous [B, L, C] when post_gate is given
  void* grad_k = nullptr;          // contiguous [C, Lk], k's dtype
  void* grad_bias = nullptr;       // contiguous [C], bias's dtype
  float* workspace = nullptr;      // CUDA: fft_conv_cuda_workspace_floats floats

  ParallelForFn parallel_for = nullptr;
};

// fourier_mix: Re(FFT over tokens and channels) of [B, L, C]. Its own adjoint.
struct FourierMixProblem {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, length = 0, channels = 0;
  FftTensor x;                 // [B, L, C]
  void* out = nullptr;         // contiguous [B, L, C]
  float* workspace = nullptr;  // CUDA: fourier_mix_cuda_workspace_floats floats
  ParallelForFn parallel_for = nullptr;
};

// global_filter: irfft2(rfft2(x) * weight), orthonormal, over the [H, W] grid of [B, H, W, C].
struct GlobalFilterProblem {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, height = 0, width = 0, channels = 0;
  FftTensor x;                   // [B, H, W, C]
  const void* weight = nullptr;  // contiguous [H, W/2+1, C, 2], accumulation type
  void* out = nullptr;           // contiguous [B, H, W, C]

  // Backward.
  FftTensor grad_out;
  void* grad_x = nullptr;       // contiguous [B, H, W, C]
  void* grad_weight = nullptr;  // contiguous [H, W/2+1, C, 2], accumulation type
  float* workspace = nullptr;   // CUDA: global_filter_cuda_workspace_floats floats
  ParallelForFn parallel_for = nullptr;
};

// spectral_gate: per head, irfft(act(gate * rfft(x))) over the tokens of [B, L, heads * d].
struct SpectralGateProblem {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, length = 0, channels = 0, heads = 0;
  bool modrelu = false;
  FftTensor x;                 // [B, L, C]
  const void* gate = nullptr;  // contiguous [B, heads, L/2+1, 2], accumulation type
  const void* bias = nullptr;  // contiguous [heads, L/2+1], accumulation type; optional
  void* out = nullptr;         // contiguous [B, L, C]

  // Backward.
  FftTensor grad_out;
  void* grad_x = nullptr;      // contiguous [B, L, C]
  void* grad_gate = nullptr;   // contiguous [B, heads, L/2+1, 2]
  void* grad_bias = nullptr;   // contiguous [heads, L/2+1] when bias is given
  float* workspace = nullptr;  // CUDA: spectral_gate_cuda_workspace_floats floats
  ParallelForFn parallel_for = nullptr;
};

}  // namespace tokenmix
