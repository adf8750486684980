// The SIMT layer under nvcc: every call is the CUDA builtin or one PTX instruction, pointers are
// plain pointers. Include "tokenmix/simt/simt.h", not this file.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "tokenmix/simt/layouts.h"
#include "tokenmix/simt/types.h"
#include "tokenmix/simt/wgmma_device.h"

// Static shared memory: `TM_SHARED(float, tile, 256);` declares `tile` (indexable like an array).
#define TM_SHARED(T, name, count) __shared__ T name[count]
#define TM_SHARED_ALIGNED(T, name, count, align) __shared__ alignas(align) T name[count]

namespace tokenmix::simt {

template <class T>
using global_ptr = T*;
template <class T>
using shared_ptr = T*;
using stream_t = cudaStream_t;

// Reinterpret a global or shared pointer as a pointer to another element type.
template <class U, class T>
TM_HOST_DEVICE U* ptr_cast(T* p) {
  return reinterpret_cast<U*>(p);
}

// ---- indices
TM_DEVICE dim3u thread_idx() {
  return {threadIdx.x, threadIdx.y, threadIdx.z};
}
TM_DEVICE dim3u block_idx() {
  return {blockIdx.x, blockIdx.y, blockIdx.z};
}
TM_DEVICE dim3u block_dim() {
  return {blockDim.x, blockDim.y, blockDim.z};
}
TM_DEVICE dim3u grid_dim() {
  return {gridDim.x, gridDim.y, gridDim.z};
}
TM_DEVICE uint32_t linear_thread_idx() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
TM_DEVICE uint32_t lane_id() {
  uint32_t lane;
  asm("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
}
TM_DEVICE uint32_t warp_id() {
  return linear_thread_idx() >> 5;
}

// ---- barriers, shuffles, votes
TM_DEVICE void sync_threads() {
  __syncthreads();
}
TM_DEVICE void sync_warp(uint32_t mask = 0xffffffffu) {
  __syncwarp(mask);
}

template <class T>
TM_DEVICE T shfl_sync(uint32_t mask, T v, int src_lane) {
  return detail::from_u32<T>(__shfl_sync(mask, detail::to_u32(v), src_lane));
}
template <class T>
TM_DEVICE T shfl_up_sync(uint32_t mask, T v, unsigned delta) {
  return detail::from_u32<T>(__shfl_up_sync(mask, detail::to_u32(v), delta));
}
template <class T>
TM_DEVICE T shfl_down_sync(uint32_t mask, T v, unsigned delta) {
  return detail::from_u32<T>(__shfl_down_sync(mask, detail::to_u32(v), delta));
}
template <class T>
TM_DEVICE T shfl_xor_sync(uint32_t mask, T v, int lane_mask) {
  return detail::from_u32<T>(__shfl_xor_sync(mask, detail::to_u32(v), lane_mask));
}
TM_DEVICE int any_sync(uint32_t mask, int pred) {
  return __any_sync(mask, pred);
}
TM_DEVICE int all_sync(uint32_t mask, int pred) {
  return __all_sync(mask, pred);
}
TM_DEVICE uint32_t ballot_sync(uint32_t mask, int pred) {
  return __ballot_sync(mask, pred);
}

// ---- shared memory
template <class T>
TM_DEVICE T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char tm_dynamic_shared_memory[];
  return reinterpret_cast<T*>(tm_dynamic_shared_memory);
}

// ---- atomics (global or shared, through the generic address)
template <class T>
struct identity {
  using type = T;
};
template <class T>
TM_DEVICE T atomic_add(T* p, typename identity<T>::type v) {
  return atomicAdd(p, v);
}
TM_DEVICE int atomic_max(int* p, int v) {
  return atomicMax(p, v);
}

// ---- 16-byte vector accesses
template <class T>
TM_DEVICE u32x4 load128(const T* p) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  return {v.x, v.y, v.z, v.w};
}
template <class T>
TM_DEVICE void store128(T* p, u32x4 v) {
  *reinterpret_cast<uint4*>(p) = make_uint4(v.x, v.y, v.z, v.w);
}

// ---- tensor cores: D = A * B + C, m16n8k16, A row major, B column major, f32 accumulate
TM_DEVICE void mma_m16n8k16_f16f32(float d[4], const uint32_t a[4], const uint32_t b[2],
                                   const float c[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#endif
}
TM_DEVICE void mma_m16n8k16_bf16f32(float d[4], const uint32_t a[4], const uint32_t b[2],
                                    const float c[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#endif
}

// m16n8k8 with tf32 operands (f32_to_tf32_bits), f32 accumulate.
TM_DEVICE void mma_m16n8k8_tf32f32(float d[4], const uint32_t a[4], const uint32_t b[2],
                                   const float c[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#endif
}

// ---- ldmatrix: 8x8 b16 matrices from shared memory, one row address per lane
template <class T>
TM_DEVICE uint32_t shared_address(const T* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
template <class T>
TM_DEVICE void ldmatrix_x1(uint32_t* r, const T* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(shared_address(row)));
}
template <class T>
TM_DEVICE void ldmatrix_x2(uint32_t* r, const T* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row)));
}
template <class T>
TM_DEVICE void ldmatrix_x4(uint32_t* r, const T* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}
template <class T>
TM_DEVICE void ldmatrix_x1_trans(uint32_t* r, const T* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(shared_address(row)));
}
template <class T>
TM_DEVICE void ldmatrix_x2_trans(uint32_t* r, const T* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row)));
}
template <class T>
TM_DEVICE void ldmatrix_x4_trans(uint32_t* r, const T* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// ---- cp.async: global -> shared copies that complete at cp_async_wait_group
template <int Bytes, class D, class S>
TM_DEVICE void cp_async(D* dst, const S* src) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(dst)), "l"(src)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(shared_address(dst)), "l"(src),
                 "n"(Bytes)
                 : "memory");
  }
}
// Copies the first `src_bytes` (0..Bytes) bytes and zero-fills the rest; src is not read when 0.
template <int Bytes, class D, class S>
TM_DEVICE void cp_async_zfill(D* dst, const S* src, int src_bytes) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
                 "l"(src), "r"(src_bytes)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(shared_address(dst)),
                 "l"(src), "n"(Bytes), "r"(src_bytes)
                 : "memory");
  }
}
TM_DEVICE void cp_async_commit_group() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
TM_DEVICE void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- wgmma: warpgroup tensor-core products, asynchronous (sm_90a; elsewhere the calls trap).
// A warpgroup's four warps issue the same calls. wgmma_fence before the first wgmma of a batch (and
// after touching its registers), wgmma_commit_group after it, and wgmma_wait_group<N> before using
// its accumulators or changing its operands: it waits until at most N groups are in flight and
// keeps the compiler from moving accesses of the named accumulators above the wait.
// The address of p in the block's shared window (swizzled wgmma tiles are placed by it).
template <class T>
TM_DEVICE uint32_t shared_window_address(const T* p) {
  return shared_address(p);
}
template <class T>
TM_DEVICE uint64_t wgmma_descriptor(const T* start, uint32_t leading_bytes, uint32_t stride_bytes,
                                    layout::wgmma_swizzle swizzle) {
  return layout::wgmma_descriptor(shared_address(start), leading_bytes, stride_bytes, swizzle);
}
// wgmma reads shared memory through the async proxy: a thread's generic writes there (stores,
// landed cp.async) are visible to it only after the thread runs this fence (then a barrier
// publishes them to the warpgroups).
TM_DEVICE void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();
#endif
}
TM_DEVICE void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
TM_DEVICE void wgmma_commit_group() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
namespace detail {
template <class A>
TM_DEVICE void fence_registers(A& acc) {
  float* r = reinterpret_cast<float*>(&acc);
  TM_UNROLL
  for (int i = 0; i < int(sizeof(A) / sizeof(float)); ++i) asm volatile("" : "+f"(r[i])::"memory");
}
}  // namespace detail
template <int N, class... Acc>
TM_DEVICE void wgmma_wait_group(Acc&... acc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
  (detail::fence_registers(acc), ...);
#else
  __trap();
#endif
}
// D (64 x N) += A (64 x 16) B (16 x N), or = without `accumulate`; A and B in shared memory
// (descriptors), kTransA / kTransB: the operand is MN-major (else K-major).
template <int N, bool kBF16, bool kTransA, bool kTransB>
TM_DEVICE void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, bool accumulate) {
  static_assert(N == 16 || N == 32 || N == 64 || N == 128, "wgmma widths: 16, 32, 64, 128");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int ta = kTransA ? 1 : 0, tb = kTransB ? 1 : 0;
  const int acc = accumulate ? 1 : 0;
  if constexpr (N == 16) {
    if constexpr (kBF16)
      detail::wgmma_ss_n16_bf16<ta, tb>(d, a, b, acc);
    else
      detail::wgmma_ss_n16_f16<ta, tb>(d, a, b, acc);
  } else if constexpr (N == 32) {
    if constexpr (kBF16)
      detail::wgmma_ss_n32_bf16<ta, tb>(d, a, b, acc);
    else
      detail::wgmma_ss_n32_f16<ta, tb>(d, a, b, acc);
  } else if constexpr (N == 64) {
    if constexpr (kBF16)
      detail::wgmma_ss_n64_bf16<ta, tb>(d, a, b, acc);
    else
      detail::wgmma_ss_n64_f16<ta, tb>(d, a, b, acc);
  } else {
    if constexpr (kBF16)
      detail::wgmma_ss_n128_bf16<ta, tb>(d, a, b, acc);
    else
      detail::wgmma_ss_n128_f16<ta, tb>(d, a, b, acc);
  }
#else
  __trap();
#endif
}
// The same with A in registers: the warp's m16n8k16 A fragment of rows 16 * (warp % 4)...
template <int N, bool kBF16, bool kTransB>
TM_DEVICE void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b, bool accumulate) {
  static_assert(N == 16 || N == 32 || N == 64 || N == 128, "wgmma widths: 16, 32, 64, 128");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int tb = kTransB ? 1 : 0;
  const int acc = accumulate ? 1 : 0;
  if constexpr (N == 16) {
    if constexpr (kBF16)
      detail::wgmma_rs_n16_bf16<tb>(d, a, b, acc);
    else
      detail::wgmma_rs_n16_f16<tb>(d, a, b, acc);
  } else if constexpr (N == 32) {
    if constexpr (kBF16)
      detail::wgmma_rs_n32_bf16<tb>(d, a, b, acc);
    else
      detail::wgmma_rs_n32_f16<tb>(d, a, b, acc);
  } else if constexpr (N == 64) {
    if constexpr (kBF16)
      detail::wgmma_rs_n64_bf16<tb>(d, a, b, acc);
    else
      detail::wgmma_rs_n64_f16<tb>(d, a, b, acc);
  } else {
    if constexpr (kBF16)
      detail::wgmma_rs_n128_bf16<tb>(d, a, b, acc);
    else
      detail::wgmma_rs_n128_f16<tb>(d, a, b, acc);
  }
#else
  __trap();
#endif
}

// ---- fast math
TM_DEVICE float exp2f_approx(float x) {
  return exp2f(x);
}
// ex2.approx.ftz.f32: one MUFU.EX2 (exp2f_approx adds the subnormal range fix-ups); subnormal
// inputs count as 0 and subnormal results are flushed to +0.
TM_DEVICE float exp2f_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
TM_DEVICE float expf_approx(float x) {
  return __expf(x);
}
TM_DEVICE float log2f_approx(float x) {
  return __log2f(x);
}
TM_DEVICE float rcp(float x) {
  return __frcp_rn(x);
}
// a * b + c rounded once (FFMA), whatever the contraction flags.
TM_DEVICE float fma_rn(float a, float b, float c) {
  return __fmaf_rn(a, b, c);
}
TM_DEVICE float rsqrt(float x) {
  return rsqrtf(x);
}
// sin(pi x) and cos(pi x), accurate (not the approximate instructions): twiddle factors.
TM_DEVICE void sincospi_f32(float x, float* s, float* c) {
  sincospif(x, s, c);
}

// ---- host side: the current device, and dynamic shared memory above 48 KiB (opt-in per kernel)
struct device_facts {
  int compute_capability = 0;     // 10 * major + minor
  size_t max_dynamic_shared = 0;  // per-block opt-in maximum (bytes)
  const char* error = nullptr;    // the CUDA runtime's message when the query failed
};
inline device_facts current_device_facts() {
  device_facts f;
  int device = 0, major = 0, minor = 0, bytes = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) {
    cudaGetLastError();  // do not leave the failure for the next launch check
    f.error = cudaGetErrorString(e);
    return f;
  }
  f.compute_capability = 10 * major + minor;
  f.max_dynamic_shared = size_t(bytes);
  return f;
}
// Lets `kernel` launch with up to `bytes` of dynamic shared memory: nullptr on success, else the
// runtime's message (the error is cleared).
template <class... P>
const char* allow_dynamic_shared(void (*kernel)(P...), size_t bytes) {
  const cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (e == cudaSuccess) return nullptr;
  cudaGetLastError();
  return cudaGetErrorString(e);
}
// The first error of the last launches (cudaGetLastError), nullptr when there was none.
inline const char* last_launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// ---- host side: registration is an emulator concept, a no-op here
inline void register_global(const void*, size_t, const char* = nullptr) {}
inline void unregister_global(const void*) {}
class global_registration {
 public:
  global_registration(const void*, size_t, const char* = nullptr) {}
};

namespace detail {
template <class A>
A&& unwrap(A&& a) {
  return std::forward<A>(a);
}
template <class T>
T* unwrap(buffer_arg<T> b) {
  return b.ptr;
}
}  // namespace detail

// kernel<<<grid, block, dynamic_shared_bytes, stream>>>(args...). Launch errors are left for
// cudaGetLastError(), as with <<<>>>.
template <class... P, class... A>
void launch_on(stream_t stream, void (*kernel)(P...), dim3u grid, dim3u block,
               size_t dynamic_shared_bytes, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "launch: wrong number of kernel arguments");
  kernel<<<dim3(grid.x, grid.y, grid.z), dim3(block.x, block.y, block.z), dynamic_shared_bytes,
           stream>>>(detail::unwrap(std::forward<A>(args))...);
}
template <class... P, class... A>
void launch_on(stream_t stream, named_kernel<P...> kernel, dim3u grid, dim3u block,
               size_t dynamic_shared_bytes, A&&... args) {
  launch_on(stream, kernel.fn, grid, block, dynamic_shared_bytes, std::forward<A>(args)...);
}
// On the default stream (stream 0).
template <class K, class... A>
void launch(K kernel, dim3u grid, dim3u block, size_t dynamic_shared_bytes, A&&... args) {
  launch_on(stream_t(nullptr), kernel, grid, block, dynamic_shared_bytes, std::forward<A>(args)...);
}

}  // namespace tokenmix::simt
