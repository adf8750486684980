// Internal state of the SIMT emulator (not part of the kernel-facing API).
#pragma once

#include <ucontext.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "tokenmix/simt/simt.h"

namespace tokenmix::simt::emu {

constexpr uint32_t kWarpSize = 32;
constexpr uint32_t kMaxThreads = 1024;
// Largest shared memory of one block (sm_90, with the opt-in attribute).
constexpr uint32_t kMaxSharedBytes = 227 * 1024;
constexpr uint32_t kStaticSharedLimit = 48 * 1024;
// Unallocated bytes around every shared array: small overruns land there and are reported.
constexpr uint32_t kRedzone = 64;
constexpr uint32_t kSharedCapacity = kMaxSharedBytes + 64 * kRedzone + 256;
constexpr uint16_t kManyWarps = 0xffff;

enum class status : uint8_t { runnable, barrier, collective, exited };
enum class coll_kind : uint8_t {
  sync_warp,
  shuffle,
  vote,
  mma,
  ldmatrix,
  wgmma,
  wgmma_fence,
  wgmma_commit,
  wgmma_wait
};
// The operand type of an mma collective (its mode): m16n8k16 f16 / bf16, or m16n8k8 tf32.
enum mma_type : uint8_t { mma_f16 = 0, mma_bf16 = 1, mma_tf32 = 2 };

struct cp_async_op {
  uint8_t* dst;
  uint32_t bytes;
  uint32_t group;
  uint8_t data[16];
};

struct thread_state {
  ucontext_t ctx;
  uint32_t tid;  // linear index in the block
  dim3u idx;
  status st;
  const char* wait_file;  // where it waits (barrier or collective)
  int wait_line;
  coll_kind wait_kind;  // the collective it waits in
  uint8_t wait_mode;
  uint32_t wait_mask;
  std::vector<cp_async_op> cp_ops;  // issued, not landed (in issue order)
  size_t cp_head;
  uint32_t cp_open_group;  // id of the group that new cp.async operations join
  uint32_t proxy_fences;   // fence_proxy_async_shared calls so far
  uint64_t idle_accesses;  // reads since the thread last made progress (the watchdog)
  uint64_t watchdog;       // the launch's limit on them
};

struct lane_args {
  uint32_t value, operand;
  const void* in;
  void* out;
};

struct collective {
  coll_kind kind;
  uint8_t mode;  // shfl_mode / vote_mode / mma_type / ldmatrix count + 8 * trans
  uint32_t mask, arrived;
  const char* file;
  int line;
  lane_args lane[kWarpSize];
};

// A warp's share of an issued wgmma, executed at the wgmma_wait_group that covers its group.
struct wgmma_op {
  wgmma_operands op;  // op.a unused: a_regs
  uint32_t group;
  const char* file;
  int line;
  std::vector<uint16_t> a, b;  // the warp's 16 rows of A and B's N rows, 16 k each, at issue
  float* d[kWarpSize];         // each lane's accumulators
  std::vector<float> d_issue;  // ... and their values at issue (lane-major, N / 2 each)
  const uint32_t* a_regs[kWarpSize] = {};  // A registers (null: A in shared memory)
  uint32_t a_issue[kWarpSize][4];
};

struct warp_state {
  uint32_t existing;  // lanes that exist (a block's last warp can be partial)
  uint32_t exited;
  uint32_t sync_gen;                         // sync_warp generations completed
  uint32_t pair_sync[kWarpSize][kWarpSize];  // generation of the last sync_warp two lanes shared
  std::vector<collective> pending;
  std::vector<wgmma_op> wgmma_ops;  // issued, not yet waited for (issue order)
  uint32_t wgmma_open_group = 0;    // the group new wgmma ops join
  bool wgmma_fenced = false;        // a wgmma_fence ran since the start or the last wait
};

// Accesses of one kind to one byte in the current barrier interval: lanes of one warp (or of
// several warps, kManyWarps), with the earliest and the latest warp sync generation at them.
struct access_set {
  uint32_t epoch;      // barrier interval (0: none recorded)
  uint32_t first_gen;  // sync_warp generation of the accessing warp at the earliest access
  uint32_t gen;        // ... at the latest access
  uint32_t lanes;      // lanes of `warp` that accessed
  uint16_t warp;       // kManyWarps: threads of several warps
};

// The accesses to one byte that later accesses must be ordered after. A plain write replaces the
// three sets (every later access must be ordered after it, hence after what it was ordered after);
// atomics accumulate, since they never race with each other.
struct access_history {
  access_set writes;   // the last plain write (one thread), or a landed cp.async
  access_set atomics;  // atomics since the last plain write
  access_set reads;    // plain reads since the last plain write
  // The last plain write's (or landed cp.async's) thread, 1 + tid (0: none), and its
  // proxy_fences then: wgmma reads the byte through the async proxy only after that thread fenced.
  uint32_t writer_fences;
  uint16_t writer;
};

// Per byte of shared memory (its access_history is kept apart: the bounds checks touch only this).
struct shadow_byte {
  uint16_t alloc;      // 1 + index into worker::shared_allocs, 0 = not allocated
  uint16_t cp_thread;  // issuer of the pending cp.async (kPendingCopy)
  uint8_t flags;
  uint8_t pad;
};
constexpr uint8_t kPendingCopy = 1;

struct shared_alloc {
  const void* key;
  uint32_t offset, bytes;
  const char* name;
};

struct global_alloc {
  uintptr_t begin, end;
  std::string name;
};

struct report {
  std::string kind, text;
};

struct launch_state {
  launch_spec* spec;
  std::string kernel_name;
  uint32_t nthreads;
  uint64_t nblocks;
  // The launch's buffers (buffer i of the spec is region i + 1), then a snapshot of the registry.
  std::vector<global_alloc> globals;
  uint64_t watchdog;  // reads without progress before a "no progress" report
  math_mode math;     // exact or approx
  uint64_t math_seed;
  std::atomic<uint64_t> next_block{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::exception_ptr error;
};

class stack_pool {
 public:
  ~stack_pool();
  void* get(size_t index, size_t bytes);

 private:
  std::vector<void*> stacks_;
  size_t bytes_ = 0;
};

struct worker {
  launch_state* launch = nullptr;
  dim3u block{0, 0, 0};
  std::vector<thread_state> threads;
  std::vector<warp_state> warps;
  thread_state* current = nullptr;  // the fiber running now (null in the scheduler)
  ucontext_t scheduler;
  std::deque<uint32_t> runnable;
  uint32_t epoch = 1, live = 0, at_barrier = 0;
  bool failed = false;
  report error;
  // shared memory
  uint8_t* smem = nullptr;
  shadow_byte* shadow = nullptr;
  access_history* history = nullptr;  // per byte, like shadow
  uint32_t smem_top = 0, static_bytes = 0;
  std::vector<shared_alloc> shared_allocs;
  const global_alloc* last_global = nullptr;
  stack_pool stacks;

  worker();
  ~worker();
  void run_block(uint64_t linear_block);
  void reset_shared(size_t dynamic_bytes);
};

worker& this_worker();
void register_global(const void* ptr, size_t bytes, const char* name);
void unregister_global(const void* ptr);
void set_workers(int workers);
void set_stack_kib(int kib);
void set_watchdog(long long accesses);
void set_math_mode(math_mode mode, uint64_t seed);
std::vector<global_alloc> registry_snapshot();
thread_state& current_thread();  // aborts when called outside kernel code
// The worker running a block on this OS thread (null outside kernel code), and the launch whose
// kernel code runs on this OS thread or whose arguments are being bound (null otherwise).
const worker* running_worker();
const launch_state* current_launch();
// The region (1 + index into L.globals) a pointer made from `addr` belongs to (see emu::region_of).
uint32_t global_region(const launch_state& L, uintptr_t addr);

// Records the report and leaves the fiber for good (throws when called from the scheduler).
[[noreturn]] void fail(const std::string& kind, const std::string& detail,
                       const thread_state* who = nullptr);
std::string describe_thread(const worker& w, const thread_state& t);
std::string site(const char* file, int line);    // "file.cpp:42", for reports
std::string describe_address(const void* addr);  // "address 0x... (buffer 'x' + 16)"

// Checks for an explicit thread (ldmatrix reads are by the lane that gave the row), through a
// pointer made for buffer / shared array `region` (0: any).
void check_shared(thread_state& t, uintptr_t addr, uint32_t bytes, uint32_t align, access a,
                  uint32_t region);
void check_global(thread_state& t, uintptr_t addr, uint32_t bytes, uint32_t align, access a,
                  uint32_t region);
void land_cp_async(thread_state& t, uint32_t first_pending_group);
// A read of shared memory through the async proxy (wgmma's `operand` at file:line, issued by
// `reader`): every byte's last writer must have run fence_proxy_async_shared since writing it.
void check_async_proxy_read(thread_state& reader, uintptr_t addr, uint32_t bytes,
                            const char* operand, const char* file, int line);
void on_exit_cp_async(thread_state& t);

// Warp collectives: blocks until every lane of `mask` arrived, then the last one computes.
void collective_arrive(coll_kind kind, uint8_t mode, uint32_t mask, const lane_args& args,
                       const char* file, int line);
void complete_tensor_op(warp_state& warp, uint32_t warp_index, collective& c);
// wgmma, wgmma_fence, wgmma_commit and wgmma_wait collectives (wgmma.cpp).
void complete_wgmma(warp_state& warp, uint32_t warp_index, collective& c);

}  // namespace tokenmix::simt::emu
