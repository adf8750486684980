// The SIMT layer under the host compiler: the same calls run on the CPU emulator
// (csrc/simt_emulator/), which executes each block's threads as cooperative fibers and checks every
// memory access and collective. Include "tokenmix/simt/simt.h", not this file.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "tokenmix/simt/layouts.h"
#include "tokenmix/simt/types.h"

namespace tokenmix::simt {

// Thrown by launch() when the emulator finds a bug; what() is the full report.
class emulator_error : public std::runtime_error {
 public:
  emulator_error(std::string kind, const std::string& report)
      : std::runtime_error(report), kind_(std::move(kind)) {}
  // Short kind, e.g. "out-of-bounds global read", "shared memory race", "barrier divergence".
  const std::string& kind() const { return kind_; }

 private:
  std::string kind_;
};

using stream_t = void*;

namespace emu {

enum class space : uint8_t { global, shared };
enum class access : uint8_t { read, write, atomic };
enum class shfl_mode : uint8_t { idx, up, down, bfly };
enum class vote_mode : uint8_t { any, all, ballot };
enum class atomic_op : uint8_t { add_f32, add_i32, add_u32, max_i32 };

// The buffer a pointer to `addr` belongs to, 0 when none is known: for global memory 1 + the
// index of a buffer of the running launch (the one that starts at `addr`, the widest if several
// do, else the only one that contains it), for shared memory the array at `addr`. Pointers made
// from raw addresses take it; arithmetic keeps it.
uint32_t region_of(space s, const void* addr);
// Checks an access by the current emulated thread through a pointer of buffer `region` (0: any
// registered buffer / shared array); aborts the launch with a report if it is bad.
void check(space s, const void* addr, uint32_t bytes, uint32_t align, access a, uint32_t region);
uint32_t atomic(space s, void* addr, uint32_t region, atomic_op op, uint32_t value);

dim3u thread_idx();
dim3u block_idx();
dim3u block_dim();
dim3u grid_dim();
uint32_t linear_thread_idx();

void sync_threads(const char* file, int line);
void sync_warp(uint32_t mask, const char* file, int line);
uint32_t shuffle(shfl_mode mode, uint32_t mask, uint32_t value, uint32_t operand, const char* file,
                 int line);
uint32_t vote(vote_mode mode, uint32_t mask, bool pred, const char* file, int line);
void mma_m16n8k16(bool bf16, float* d, const uint32_t* a, const uint32_t* b, const float* c,
                  const char* file, int line);
void mma_m16n8k8_tf32(float* d, const uint32_t* a, const uint32_t* b, const float* c,
                      const char* file, int line);
void ldmatrix(int count, bool trans, uint32_t* regs, const void* row, uint32_t row_region,
              const char* file, int line);
// Warp-level mma instructions completed so far, over every launch of the process (tests compare
// it with the work a kernel should do).
uint64_t mma_instructions();
// wgmma (see layouts.h and the wrappers below). `in` is a wgmma_operands; d the lane's
// accumulator registers.
struct wgmma_operands {
  uint64_t desc_a, desc_b;
  const uint32_t* a;  // A registers (4), or null: A in shared memory (desc_a)
  bool bf16, trans_a, trans_b, accumulate;
  int n;
};
void wgmma(const wgmma_operands& op, float* d, const char* file, int line);
void wgmma_fence(const char* file, int line);
void fence_proxy_async_shared();
void wgmma_commit_group(const char* file, int line);
void wgmma_wait_group(int n, const char* file, int line);
// Warp shares of wgmma instructions executed so far (four per warpgroup instruction), over every
// launch of the process.
uint64_t wgmma_instructions();
// The address of `p` in the block's shared window (what cvta.to.shared gives on the GPU).
uint32_t shared_window_address(const void* p, const char* file, int line);
void cp_async(int bytes, void* dst, uint32_t dst_region, const void* src, uint32_t src_region,
              int src_bytes, const char* file, int line);
void cp_async_commit_group();
void cp_async_wait_group(int n, const char* file, int line);

// One TM_SHARED declaration (a static object per source site).
struct shared_site {
  const char* name;
  size_t bytes;
  size_t align;
};
void* static_shared(const shared_site* site);
void* dynamic_shared();

// The approximate math instructions (PTX ex2.approx.f32, lg2.approx.f32, rsqrt.approx.f32, and
// __expf: mul.f32 by log2(e), then ex2.approx.f32): exact, or with the PTX ISA's maximum error in
// the opt-in numeric mode (set_math_mode, $TOKENMIX_SIMT_MATH).
enum class math_fn : uint8_t { ex2, exp, lg2, rsqrt, ex2_ftz };
float approx_math(math_fn f, float x);

// Everything launch() hands to the runtime.
struct launch_spec {
  void (*thunk)(void* closure);  // runs the kernel body for the current emulated thread
  void (*bind)(void* closure);   // gives the launch's buffers to the pointer arguments
  void* closure;
  const void* kernel;  // the kernel function (for its name)
  const char* kernel_name;
  dim3u grid, block;
  size_t dynamic_shared_bytes;
  struct region {
    const void* ptr;
    size_t bytes;
    const char* name;
  };
  std::vector<region> buffers;  // registered for the duration of the launch; buffer i is region i+1
};
void run(launch_spec& spec);

}  // namespace emu

// ---- checked pointers --------------------------------------------------------------------------

// A reference to one element: reads and writes go through the emulator's checks. Only usable as a
// temporary (`x = p[i]`, `p[i] = x`, `p[i] += x`), so that every access happens where it is
// written: `auto r = p[i];` followed by a use of `r` does not compile.
template <class T, emu::space S>
class mem_ref {
 public:
  using value_type = std::remove_const_t<T>;
  mem_ref(T* p, uint32_t region) : p_(p), region_(region) {}
  mem_ref(const mem_ref&) = delete;
  const mem_ref&& operator=(const mem_ref&) const&& = delete;  // a named mem_ref: see above

  value_type load() const {
    emu::check(S, p_, sizeof(T), alignof(T), emu::access::read, region_);
    value_type v;
    std::memcpy(&v, p_, sizeof(T));
    return v;
  }
  void store(const value_type& v) const {
    static_assert(!std::is_const<T>::value, "store through a pointer to const");
    emu::check(S, p_, sizeof(T), alignof(T), emu::access::write, region_);
    std::memcpy(const_cast<value_type*>(p_), &v, sizeof(T));
  }
  operator value_type() const&& { return load(); }
  const mem_ref&& operator=(const value_type& v) const&& {
    store(v);
    return std::move(*this);
  }
  const mem_ref&& operator=(mem_ref&& other) const&& {
    store(other.load());
    return std::move(*this);
  }
#define TM_SIMT_COMPOUND(op)                               \
  template <class U>                                       \
  const mem_ref&& operator op## = (const U& u) const&& {   \
    store(static_cast<value_type>(load() op value_of(u))); \
    return std::move(*this);                               \
  }
  TM_SIMT_COMPOUND(+)
  TM_SIMT_COMPOUND(-)
  TM_SIMT_COMPOUND(*)
  TM_SIMT_COMPOUND(/)
  TM_SIMT_COMPOUND(&)
  TM_SIMT_COMPOUND(|)
  TM_SIMT_COMPOUND(^)
#undef TM_SIMT_COMPOUND

 private:
  template <class U>
  static const U& value_of(const U& u) {
    return u;
  }
  template <class U, emu::space S2>
  static std::remove_const_t<U> value_of(const mem_ref<U, S2>& r) {
    return r.load();
  }
  T* p_;
  uint32_t region_;
};

// A pointer into global or shared memory. Arithmetic is free; each dereference is checked, against
// the buffer (or shared array) the pointer was made for: a pointer keeps the buffer of the address
// it was made from through arithmetic and casts, so an index that runs into a neighbouring buffer
// is still out of bounds.
template <class T, emu::space S>
class checked_ptr {
 public:
  using element_type = T;
  checked_ptr() = default;
  checked_ptr(std::nullptr_t) {}
  explicit checked_ptr(T* p) : p_(p), region_(p ? emu::region_of(S, p) : 0) {}
  // Emulator-only: the address with an explicit buffer (see emu::region_of).
  checked_ptr(T* p, uint32_t region) : p_(p), region_(region) {}
  template <class U, class = std::enable_if_t<std::is_convertible<U*, T*>::value>>
  checked_ptr(checked_ptr<U, S> other) : p_(other.raw()), region_(other.region()) {}

  // The address, unchecked, and its buffer (emulator-only; kernel code should not need them).
  T* raw() const { return p_; }
  uint32_t region() const { return region_; }

  mem_ref<T, S> operator*() const { return mem_ref<T, S>(p_, region_); }
  mem_ref<T, S> operator[](ptrdiff_t i) const { return mem_ref<T, S>(p_ + i, region_); }
  checked_ptr operator+(ptrdiff_t i) const { return checked_ptr(p_ + i, region_); }
  checked_ptr operator-(ptrdiff_t i) const { return checked_ptr(p_ - i, region_); }
  friend checked_ptr operator+(ptrdiff_t i, checked_ptr p) { return p + i; }
  ptrdiff_t operator-(checked_ptr o) const { return p_ - o.p_; }
  checked_ptr& operator+=(ptrdiff_t i) { return p_ += i, *this; }
  checked_ptr& operator-=(ptrdiff_t i) { return p_ -= i, *this; }
  checked_ptr& operator++() { return ++p_, *this; }
  checked_ptr& operator--() { return --p_, *this; }
  checked_ptr operator++(int) { return checked_ptr(p_++, region_); }
  checked_ptr operator--(int) { return checked_ptr(p_--, region_); }
  bool operator==(checked_ptr o) const { return p_ == o.p_; }
  bool operator!=(checked_ptr o) const { return p_ != o.p_; }
  bool operator<(checked_ptr o) const { return p_ < o.p_; }
  explicit operator bool() const { return p_ != nullptr; }

 private:
  T* p_ = nullptr;
  uint32_t region_ = 0;
};

template <class T>
using global_ptr = checked_ptr<T, emu::space::global>;
template <class T>
using shared_ptr = checked_ptr<T, emu::space::shared>;

template <class U, class T, emu::space S>
checked_ptr<U, S> ptr_cast(checked_ptr<T, S> p) {
  return checked_ptr<U, S>(reinterpret_cast<U*>(p.raw()), p.region());
}

// ---- indices, barriers, warp collectives ------------------------------------------------------

inline dim3u thread_idx() {
  return emu::thread_idx();
}
inline dim3u block_idx() {
  return emu::block_idx();
}
inline dim3u block_dim() {
  return emu::block_dim();
}
inline dim3u grid_dim() {
  return emu::grid_dim();
}
inline uint32_t linear_thread_idx() {
  return emu::linear_thread_idx();
}
inline uint32_t lane_id() {
  return emu::linear_thread_idx() & 31u;
}
inline uint32_t warp_id() {
  return emu::linear_thread_idx() >> 5;
}

inline void sync_threads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu::sync_threads(file, line);
}
inline void sync_warp(uint32_t mask = 0xffffffffu, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  emu::sync_warp(mask, file, line);
}

template <class T>
T shfl_sync(uint32_t mask, T v, int src_lane, const char* file = __builtin_FILE(),
            int line = __builtin_LINE()) {
  return detail::from_u32<T>(
      emu::shuffle(emu::shfl_mode::idx, mask, detail::to_u32(v), uint32_t(src_lane), file, line));
}
template <class T>
T shfl_up_sync(uint32_t mask, T v, unsigned delta, const char* file = __builtin_FILE(),
               int line = __builtin_LINE()) {
  return detail::from_u32<T>(
      emu::shuffle(emu::shfl_mode::up, mask, detail::to_u32(v), delta, file, line));
}
template <class T>
T shfl_down_sync(uint32_t mask, T v, unsigned delta, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  return detail::from_u32<T>(
      emu::shuffle(emu::shfl_mode::down, mask, detail::to_u32(v), delta, file, line));
}
template <class T>
T shfl_xor_sync(uint32_t mask, T v, int lane_mask, const char* file = __builtin_FILE(),
                int line = __builtin_LINE()) {
  return detail::from_u32<T>(
      emu::shuffle(emu::shfl_mode::bfly, mask, detail::to_u32(v), uint32_t(lane_mask), file, line));
}
inline int any_sync(uint32_t mask, int pred, const char* file = __builtin_FILE(),
                    int line = __builtin_LINE()) {
  return int(emu::vote(emu::vote_mode::any, mask, pred != 0, file, line));
}
inline int all_sync(uint32_t mask, int pred, const char* file = __builtin_FILE(),
                    int line = __builtin_LINE()) {
  return int(emu::vote(emu::vote_mode::all, mask, pred != 0, file, line));
}
inline uint32_t ballot_sync(uint32_t mask, int pred, const char* file = __builtin_FILE(),
                            int line = __builtin_LINE()) {
  return emu::vote(emu::vote_mode::ballot, mask, pred != 0, file, line);
}

// ---- shared memory -----------------------------------------------------------------------------

// One allocation per block, the same for all its threads. Host arrays get exactly the alignment
// asked for (alignof(T) or `align`), never more, so a kernel that relies on luck fails here.
#define TM_SHARED_ALIGNED(T, name, count, align)                                            \
  static const ::tokenmix::simt::emu::shared_site tm_shared_site_##name{                    \
      #name, sizeof(T) * size_t(count), size_t(align) < alignof(T) ? alignof(T) : (align)}; \
  const ::tokenmix::simt::shared_ptr<T> name(                                               \
      static_cast<T*>(::tokenmix::simt::emu::static_shared(&tm_shared_site_##name)))
#define TM_SHARED(T, name, count) TM_SHARED_ALIGNED(T, name, count, alignof(T))

template <class T>
shared_ptr<T> dynamic_shared() {
  static_assert(alignof(T) <= 16, "dynamic shared memory is 16-byte aligned");
  return shared_ptr<T>(static_cast<T*>(emu::dynamic_shared()));
}

// ---- atomics -----------------------------------------------------------------------------------

template <class T>
struct identity {
  using type = T;
};
namespace detail {
template <class T>
constexpr emu::atomic_op add_op() {
  static_assert(std::is_same<T, float>::value || std::is_same<T, int>::value ||
                    std::is_same<T, unsigned>::value,
                "atomic_add supports float, int and unsigned");
  return std::is_same<T, float>::value ? emu::atomic_op::add_f32
         : std::is_same<T, int>::value ? emu::atomic_op::add_i32
                                       : emu::atomic_op::add_u32;
}
}  // namespace detail
template <class T, emu::space S>
T atomic_add(checked_ptr<T, S> p, typename identity<T>::type v) {
  return detail::from_u32<T>(
      emu::atomic(S, p.raw(), p.region(), detail::add_op<T>(), detail::to_u32(static_cast<T>(v))));
}
template <emu::space S>
int atomic_max(checked_ptr<int, S> p, int v) {
  return detail::from_u32<int>(
      emu::atomic(S, p.raw(), p.region(), emu::atomic_op::max_i32, uint32_t(v)));
}

// ---- 16-byte vector accesses (16-byte aligned) -------------------------------------------------

template <class T, emu::space S>
u32x4 load128(checked_ptr<T, S> p) {
  emu::check(S, p.raw(), 16, 16, emu::access::read, p.region());
  u32x4 v;
  std::memcpy(&v, p.raw(), 16);
  return v;
}
template <class T, emu::space S>
void store128(checked_ptr<T, S> p, u32x4 v) {
  static_assert(!std::is_const<T>::value, "store through a pointer to const");
  emu::check(S, p.raw(), 16, 16, emu::access::write, p.region());
  std::memcpy(p.raw(), &v, 16);
}

// ---- tensor cores (warp collectives: all 32 lanes must arrive) ---------------------------------

inline void mma_m16n8k16_f16f32(float d[4], const uint32_t a[4], const uint32_t b[2],
                                const float c[4], const char* file = __builtin_FILE(),
                                int line = __builtin_LINE()) {
  emu::mma_m16n8k16(false, d, a, b, c, file, line);
}
inline void mma_m16n8k16_bf16f32(float d[4], const uint32_t a[4], const uint32_t b[2],
                                 const float c[4], const char* file = __builtin_FILE(),
                                 int line = __builtin_LINE()) {
  emu::mma_m16n8k16(true, d, a, b, c, file, line);
}
inline void mma_m16n8k8_tf32f32(float d[4], const uint32_t a[4], const uint32_t b[2],
                                const float c[4], const char* file = __builtin_FILE(),
                                int line = __builtin_LINE()) {
  emu::mma_m16n8k8_tf32(d, a, b, c, file, line);
}

#define TM_SIMT_LDMATRIX(suffix, count, trans)                                                \
  template <class T>                                                                          \
  void ldmatrix_##suffix(uint32_t* r, shared_ptr<T> row, const char* file = __builtin_FILE(), \
                         int line = __builtin_LINE()) {                                       \
    emu::ldmatrix(count, trans, r, row.raw(), row.region(), file, line);                      \
  }
TM_SIMT_LDMATRIX(x1, 1, false)
TM_SIMT_LDMATRIX(x2, 2, false)
TM_SIMT_LDMATRIX(x4, 4, false)
TM_SIMT_LDMATRIX(x1_trans, 1, true)
TM_SIMT_LDMATRIX(x2_trans, 2, true)
TM_SIMT_LDMATRIX(x4_trans, 4, true)
#undef TM_SIMT_LDMATRIX

// ---- wgmma (warpgroup collectives; emulated per warp, see csrc/simt_emulator/wgmma.cpp) --------

template <class T>
uint32_t shared_window_address(shared_ptr<T> p, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  return emu::shared_window_address(p.raw(), file, line);
}
template <class T>
uint64_t wgmma_descriptor(shared_ptr<T> start, uint32_t leading_bytes, uint32_t stride_bytes,
                          layout::wgmma_swizzle swizzle, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  return layout::wgmma_descriptor(emu::shared_window_address(start.raw(), file, line),
                                  leading_bytes, stride_bytes, swizzle);
}
inline void wgmma_fence(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu::wgmma_fence(file, line);
}
// The thread's generic writes to shared memory so far become visible to wgmma's reads (the
// emulator reports a wgmma operand byte whose last writer has not fenced since writing it).
inline void fence_proxy_async_shared() {
  emu::fence_proxy_async_shared();
}
inline void wgmma_commit_group(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu::wgmma_commit_group(file, line);
}
// The accumulators named on the GPU side (kept below the wait there) need nothing here: the
// emulator writes every in-flight accumulator at the wait.
template <int N>
void wgmma_wait_group(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(N >= 0, "wait_group takes a non-negative count");
  emu::wgmma_wait_group(N, file, line);
}
template <int N, class A>
void wgmma_wait_group(A&, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  wgmma_wait_group<N>(file, line);
}
template <int N, class A, class B>
void wgmma_wait_group(A&, B&, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  wgmma_wait_group<N>(file, line);
}
template <int N, bool kBF16, bool kTransA, bool kTransB>
void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, bool accumulate,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(N == 16 || N == 32 || N == 64 || N == 128, "wgmma widths: 16, 32, 64, 128");
  emu::wgmma({a, b, nullptr, kBF16, kTransA, kTransB, accumulate, N}, d, file, line);
}
template <int N, bool kBF16, bool kTransB>
void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b, bool accumulate,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(N == 16 || N == 32 || N == 64 || N == 128, "wgmma widths: 16, 32, 64, 128");
  emu::wgmma({0, b, a, kBF16, false, kTransB, accumulate, N}, d, file, line);
}

// ---- cp.async ----------------------------------------------------------------------------------

template <int Bytes, class D, class S>
void cp_async(shared_ptr<D> dst, global_ptr<S> src, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  emu::cp_async(Bytes, dst.raw(), dst.region(), src.raw(), src.region(), Bytes, file, line);
}
template <int Bytes, class D, class S>
void cp_async_zfill(shared_ptr<D> dst, global_ptr<S> src, int src_bytes,
                    const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  emu::cp_async(Bytes, dst.raw(), dst.region(), src.raw(), src.region(), src_bytes, file, line);
}
inline void cp_async_commit_group() {
  emu::cp_async_commit_group();
}
template <int N>
void cp_async_wait_group(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(N >= 0, "wait_group takes a non-negative count");
  emu::cp_async_wait_group(N, file, line);
}

// ---- fast math (exact by default; the PTX ISA's maximum error in the opt-in numeric mode) -------

inline float exp2f_approx(float x) {
  return emu::approx_math(emu::math_fn::ex2, x);
}
inline float exp2f_ftz(float x) {
  return emu::approx_math(emu::math_fn::ex2_ftz, x);
}
inline float expf_approx(float x) {
  return emu::approx_math(emu::math_fn::exp, x);
}
inline float log2f_approx(float x) {
  return emu::approx_math(emu::math_fn::lg2, x);
}
inline float rcp(float x) {
  return 1.0f / x;  // __frcp_rn is correctly rounded: exact in every mode
}
inline float fma_rn(float a, float b, float c) {
  return std::fma(a, b, c);  // rounded once, as FFMA
}
inline float rsqrt(float x) {
  return emu::approx_math(emu::math_fn::rsqrt, x);
}
// sin(pi x) and cos(pi x), correctly rounded (CUDA's sincospif is within 1 ulp of them).
inline void sincospi_f32(float x, float* s, float* c) {
  const double a = 3.14159265358979323846 * double(x);
  *s = float(std::sin(a));
  *c = float(std::cos(a));
}

// ---- host side: buffers and launches -----------------------------------------------------------

// Global accesses must fall inside a registered buffer (or one passed to launch() via buffer()).
void register_global(const void* ptr, size_t bytes, const char* name = nullptr);
void unregister_global(const void* ptr);
class global_registration {
 public:
  global_registration(const void* ptr, size_t bytes, const char* name = nullptr) : ptr_(ptr) {
    register_global(ptr, bytes, name);
  }
  ~global_registration() { unregister_global(ptr_); }
  global_registration(const global_registration&) = delete;
  global_registration& operator=(const global_registration&) = delete;

 private:
  const void* ptr_;
};

// The emulated device: sm_90's limits (227 KiB of dynamic shared memory for every kernel), or
// $TOKENMIX_SIMT_MAX_SHARED bytes per block, so that tests can stand in for a smaller device
// (99 KiB: sm_86, sm_89, sm_120) and reach the launchers' choices for it.
struct device_facts {
  int compute_capability = 90;
  size_t max_dynamic_shared = 227 * 1024;
  const char* error = nullptr;
};
inline device_facts current_device_facts() {
  device_facts f;
  if (const char* env = std::getenv("TOKENMIX_SIMT_MAX_SHARED")) {
    char* end = nullptr;
    const unsigned long long bytes = std::strtoull(env, &end, 10);
    if (env[0] < '0' || env[0] > '9' || *end != '\0' || bytes == 0)
      throw emulator_error("invalid setting",
                           std::string("tokenmix simt emulator: $TOKENMIX_SIMT_MAX_SHARED is '") +
                               env + "', not a positive number of bytes");
    f.max_dynamic_shared = size_t(bytes);
  }
  return f;
}
template <class... P>
const char* allow_dynamic_shared(void (*)(P...), size_t bytes) {
  return bytes <= current_device_facts().max_dynamic_shared ? nullptr : "too much shared memory";
}
// Launches report their errors by throwing emulator_error: nothing is left pending.
inline const char* last_launch_error() {
  return nullptr;
}

// Blocks run by this many OS threads at once (default 1, or $TOKENMIX_SIMT_WORKERS); fiber stack
// size in KiB (default 64, or $TOKENMIX_SIMT_STACK_KIB).
void set_workers(int workers);
void set_stack_kib(int kib);
// The progress watchdog: a thread that makes this many memory reads (or atomics that change
// nothing) in a row, without a write or a synchronization point, stops the launch with a "no
// progress" report (default 2^24, or $TOKENMIX_SIMT_WATCHDOG; 0 turns it off; negative: back to
// the default or the environment).
void set_watchdog(long long accesses);
// The numeric mode of exp2f_approx / expf_approx / log2f_approx / rsqrt: exact results, or results
// off by up to the PTX ISA's maximum error, deterministically for a given seed (a hash of the
// seed, the function and the input). from_env: $TOKENMIX_SIMT_MATH ("exact" or "approx", default
// exact) and $TOKENMIX_SIMT_MATH_SEED (default 0).
enum class math_mode { from_env, exact, approx };
void set_math_mode(math_mode mode, uint64_t seed = 0);

namespace detail {
template <class P, class A>
P kernel_arg(A&& a, emu::launch_spec&) {
  return P(std::forward<A>(a));
}
template <class P, class T>
P kernel_arg(buffer_arg<T> b, emu::launch_spec& spec) {
  spec.buffers.push_back({b.ptr, b.count * sizeof(T), b.name});
  return P(global_ptr<T>(b.ptr, uint32_t(spec.buffers.size())));
}
// A global_ptr argument made on the host, before the launch's buffers existed, gets its buffer at
// the launch.
template <class A>
void bind_arg(A&) {}
template <class T>
void bind_arg(global_ptr<T>& p) {
  if (p && !p.region()) p = global_ptr<T>(p.raw(), emu::region_of(emu::space::global, p.raw()));
}
template <class... P>
struct closure {
  void (*fn)(P...);
  std::tuple<std::decay_t<P>...> args;
  static void run(void* self) {
    auto* c = static_cast<closure*>(self);
    std::apply(c->fn, c->args);  // each emulated thread gets its own copies of the arguments
  }
  static void bind(void* self) {
    std::apply([](auto&... a) { (bind_arg(a), ...); }, static_cast<closure*>(self)->args);
  }
};
}  // namespace detail

// Runs kernel<<<grid, block, dynamic_shared_bytes>>>(args...) on the emulator and returns when it
// is done; throws emulator_error with a report when a check fails.
template <class... P, class... A>
void launch_on(stream_t, named_kernel<P...> kernel, dim3u grid, dim3u block,
               size_t dynamic_shared_bytes, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "launch: wrong number of kernel arguments");
  emu::launch_spec spec{};
  detail::closure<P...> c{kernel.fn,
                          {detail::kernel_arg<std::decay_t<P>>(std::forward<A>(args), spec)...}};
  spec.thunk = &detail::closure<P...>::run;
  spec.bind = &detail::closure<P...>::bind;
  spec.closure = &c;
  spec.kernel = reinterpret_cast<const void*>(kernel.fn);
  spec.kernel_name = kernel.name;
  spec.grid = grid;
  spec.block = block;
  spec.dynamic_shared_bytes = dynamic_shared_bytes;
  emu::run(spec);
}
template <class... P, class... A>
void launch_on(stream_t stream, void (*kernel)(P...), dim3u grid, dim3u block,
               size_t dynamic_shared_bytes, A&&... args) {
  launch_on(stream, named_kernel<P...>{kernel, nullptr}, grid, block, dynamic_shared_bytes,
            std::forward<A>(args)...);
}
template <class K, class... A>
void launch(K kernel, dim3u grid, dim3u block, size_t dynamic_shared_bytes, A&&... args) {
  launch_on(nullptr, kernel, grid, block, dynamic_shared_bytes, std::forward<A>(args)...);
}

}  // namespace tokenmix::simt
