// SIMT emulator: launches, fibers, block barriers and warp collectives.
//
// Each block runs on one OS thread. Its threads are fibers (ucontext) that switch only at
// synchronization points: sync_threads, warp collectives (shuffles, votes, sync_warp, mma,
// ldmatrix) and thread exit. The scheduler resumes runnable fibers in FIFO order, so a launch is
// deterministic. When nothing is runnable but threads are still alive the block is deadlocked and
// the waits are reported.
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "internal.h"

namespace tokenmix::simt::emu {
namespace {

std::atomic<int> g_workers{0};
std::atomic<int> g_stack_kib{0};
std::atomic<long long> g_watchdog{-1};  // negative: $TOKENMIX_SIMT_WATCHDOG or the default
std::atomic<int> g_math_mode{int(math_mode::from_env)};
std::atomic<uint64_t> g_math_seed{0};
constexpr uint64_t kDefaultWatchdog = uint64_t(1) << 24;
thread_local worker* t_active = nullptr;  // the worker running a block on this OS thread
thread_local const launch_state* t_binding = nullptr;  // the launch binding its arguments

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  const int x = v ? std::atoi(v) : 0;
  return x > 0 ? x : fallback;
}

// A non-negative integer from the environment, or `fallback` when unset; throws when malformed.
uint64_t env_count(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const unsigned long long x = std::strtoull(v, &end, 0);
  if (*end || v[0] == '-')
    throw emulator_error("invalid setting", std::string("tokenmix simt emulator: $") + name +
                                                " is '" + v + "', not a non-negative integer");
  return x;
}

uint64_t watchdog_limit() {
  const long long set = g_watchdog.load();
  const uint64_t n =
      set >= 0 ? uint64_t(set) : env_count("TOKENMIX_SIMT_WATCHDOG", kDefaultWatchdog);
  return n == 0 ? ~uint64_t(0) : n;
}

void read_math_mode(launch_state& L) {
  L.math = math_mode(g_math_mode.load());
  L.math_seed = g_math_seed.load();
  if (L.math != math_mode::from_env) return;
  const char* v = std::getenv("TOKENMIX_SIMT_MATH");
  const std::string mode = v ? v : "";
  if (mode.empty() || mode == "exact")
    L.math = math_mode::exact;
  else if (mode == "approx")
    L.math = math_mode::approx;
  else
    throw emulator_error("invalid setting", "tokenmix simt emulator: $TOKENMIX_SIMT_MATH is '" +
                                                mode + "', not 'exact' or 'approx'");
  L.math_seed = env_count("TOKENMIX_SIMT_MATH_SEED", 0);
}

size_t stack_bytes() {
  const int kib =
      g_stack_kib.load() > 0 ? g_stack_kib.load() : env_int("TOKENMIX_SIMT_STACK_KIB", 64);
  return size_t(std::max(kib, 16)) * 1024;
}

std::string fmt_dim(dim3u d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

// "0-15,20" for a set of indices.
std::string ranges(const std::vector<uint32_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size();) {
    size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(v[i]);
    if (j > i) s += "-" + std::to_string(v[j]);
    i = j + 1;
  }
  return s;
}

std::string lanes(uint32_t mask) {
  std::vector<uint32_t> v;
  for (uint32_t l = 0; l < kWarpSize; ++l)
    if (mask >> l & 1u) v.push_back(l);
  return ranges(v);
}

std::string hex(uint32_t x) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", x);
  return b;
}

std::string collective_name(coll_kind k, uint8_t mode) {
  switch (k) {
    case coll_kind::sync_warp: return "sync_warp";
    case coll_kind::shuffle: {
      static const char* names[] = {"shfl_sync", "shfl_up_sync", "shfl_down_sync", "shfl_xor_sync"};
      return names[mode & 3];
    }
    case coll_kind::vote: {
      static const char* names[] = {"any_sync", "all_sync", "ballot_sync"};
      return names[mode % 3];
    }
    case coll_kind::mma:
      return mode == mma_tf32   ? "mma_m16n8k8_tf32f32"
             : mode == mma_bf16 ? "mma_m16n8k16_bf16f32"
                                : "mma_m16n8k16_f16f32";
    case coll_kind::ldmatrix:
      return "ldmatrix_x" + std::to_string(mode & 7) + ((mode & 8) ? "_trans" : "");
    case coll_kind::wgmma:
      return std::string((mode & 2) ? "wgmma_rs" : "wgmma_ss") + "<" +
             std::to_string(16 * (mode >> 4)) + ((mode & 1) ? ", bf16" : ", f16") + ">";
    case coll_kind::wgmma_fence: return "wgmma_fence";
    case coll_kind::wgmma_commit: return "wgmma_commit_group";
    case coll_kind::wgmma_wait: return "wgmma_wait_group<" + std::to_string(mode) + ">";
  }
  return "?";
}

// The symbol's name without return type and parameter list: "ns::kernel<true>".
std::string short_function_name(std::string s) {
  if (!s.empty() && s.back() == ')') {
    int depth = 0;
    for (size_t i = s.size(); i-- > 0;) {
      if (s[i] == ')') ++depth;
      if (s[i] == '(' && --depth == 0) {
        s.resize(i);
        break;
      }
    }
  }
  int depth = 0;
  size_t start = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '<' || s[i] == '(') ++depth;
    if (s[i] == '>' || s[i] == ')') --depth;
    if (s[i] == ' ' && depth == 0) start = i + 1;
  }
  return s.substr(start);
}

std::string kernel_name(const launch_spec& spec) {
  if (spec.kernel_name) return spec.kernel_name;
  Dl_info info;
  if (dladdr(spec.kernel, &info) && info.dli_sname && info.dli_saddr == spec.kernel) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && d ? short_function_name(d) : info.dli_sname;
    std::free(d);
    return name;
  }
  char b[40];
  std::snprintf(b, sizeof b, "kernel@%p", spec.kernel);
  return b;
}

worker& active() {
  if (!t_active || !t_active->current)
    throw emulator_error("not in a kernel",
                         "tokenmix simt emulator: a SIMT call was made outside an emulated kernel "
                         "(call kernels through tokenmix::simt::launch)");
  return *t_active;
}

void yield(worker& w, thread_state& t) {
  swapcontext(&t.ctx, &w.scheduler);
}

void thread_exit(worker& w, thread_state& t) {
  on_exit_cp_async(t);
  const uint32_t wi = t.tid / kWarpSize, bit = 1u << (t.tid % kWarpSize);
  warp_state& ws = w.warps[wi];
  for (const collective& c : ws.pending) {
    if ((c.mask & bit) && !(c.arrived & bit))
      fail("incomplete warp collective",
           collective_name(c.kind, c.mode) + " at " + site(c.file, c.line) + " (member mask " +
               hex(c.mask) + ") was reached by lanes " + lanes(c.arrived) + " of warp " +
               std::to_string(wi) + ", but lane " + std::to_string(t.tid % kWarpSize) +
               " exits without reaching it: the waiting lanes can never complete it");
  }
  if (!ws.wgmma_ops.empty()) {
    const wgmma_op& r = ws.wgmma_ops.front();
    fail("wgmma in flight at exit",
         "lane " + std::to_string(t.tid % kWarpSize) + " of warp " + std::to_string(wi) +
             " exits while " + std::to_string(ws.wgmma_ops.size()) +
             " wgmma ops of its warp are in flight (first issued at " + site(r.file, r.line) +
             "): a wgmma_wait_group must cover them (and their group must be committed)");
  }
  if (w.at_barrier > 0) {
    const thread_state* waiter = nullptr;
    for (const thread_state& o : w.threads)
      if (o.st == status::barrier) waiter = &o;
    fail("barrier divergence",
         "thread exits while " + std::to_string(w.at_barrier) +
             " threads wait at sync_threads() at " + site(waiter->wait_file, waiter->wait_line) +
             ": they wait for a thread that never arrives (deadlock on the GPU)");
  }
  t.st = status::exited;
  --w.live;
  ws.exited |= bit;
}

void fiber_main() {
  worker& w = *t_active;
  thread_state& t = *w.current;
  std::string what;
  bool threw = false;
  try {
    w.launch->spec->thunk(w.launch->spec->closure);
  } catch (const std::exception& e) {
    threw = true;
    what = e.what();
  } catch (...) {
    threw = true;
    what = "unknown exception";
  }
  if (threw) fail("exception in kernel code", what, &t);
  thread_exit(w, t);
  // Returning resumes the scheduler (uc_link).
}

// Called in the scheduler when no fiber is runnable but some are alive.
[[noreturn]] void report_deadlock(worker& w) {
  auto where = [&](const thread_state& o) -> std::string {
    if (o.st == status::barrier)
      return "wait at sync_threads() at " + site(o.wait_file, o.wait_line);
    if (o.st == status::collective)
      return "wait in " + collective_name(o.wait_kind, o.wait_mode) + " at " +
             site(o.wait_file, o.wait_line) + " (member mask " + hex(o.wait_mask) + ")";
    if (o.st == status::exited) return "have exited";
    return "are runnable";
  };
  for (uint32_t wi = 0; wi < w.warps.size(); ++wi) {
    warp_state& ws = w.warps[wi];
    if (ws.pending.empty()) continue;
    const collective& c = ws.pending.front();
    const uint32_t missing = c.mask & ws.existing & ~c.arrived;
    std::string detail;
    uint32_t done = 0;
    for (uint32_t l = 0; l < kWarpSize; ++l) {
      if (!(missing >> l & 1u) || (done >> l & 1u)) continue;
      const std::string s = where(w.threads[wi * kWarpSize + l]);
      uint32_t same = 0;
      for (uint32_t m = l; m < kWarpSize; ++m)
        if ((missing >> m & 1u) && where(w.threads[wi * kWarpSize + m]) == s) same |= 1u << m;
      done |= same;
      detail += "; lanes " + lanes(same) + " " + s;
    }
    const uint32_t first = static_cast<uint32_t>(__builtin_ctz(c.arrived));
    fail("incomplete warp collective",
         collective_name(c.kind, c.mode) + " at " + site(c.file, c.line) + " (member mask " +
             hex(c.mask) + ") was reached only by lanes " + lanes(c.arrived) + " of warp " +
             std::to_string(wi) + detail + " (deadlock)",
         &w.threads[wi * kWarpSize + first]);
  }
  std::vector<uint32_t> waiting;
  for (const thread_state& o : w.threads)
    if (o.st != status::exited) waiting.push_back(o.tid);
  fail("deadlock", "threads " + ranges(waiting) + " wait forever", &w.threads[waiting.front()]);
}

}  // namespace

// "file.cpp:42" (the file name without its directories), for reports.
std::string site(const char* file, int line) {
  const char* slash = file ? std::strrchr(file, '/') : nullptr;
  return std::string(slash ? slash + 1 : (file ? file : "?")) + ":" + std::to_string(line);
}

// ---- settings and workers ----------------------------------------------------------------------

void set_workers(int n) {
  g_workers = n;
}
void set_stack_kib(int kib) {
  g_stack_kib = kib;
}
void set_watchdog(long long accesses) {
  g_watchdog = accesses;
}
void set_math_mode(math_mode mode, uint64_t seed) {
  g_math_mode = int(mode);
  g_math_seed = seed;
}

const worker* running_worker() {
  return t_active;
}
const launch_state* current_launch() {
  return t_active ? t_active->launch : t_binding;
}

worker& this_worker() {
  static thread_local worker w;
  return w;
}

thread_state& current_thread() {
  return *active().current;
}

stack_pool::~stack_pool() {
  for (void* s : stacks_) munmap(s, bytes_ + size_t(getpagesize()));
}

void* stack_pool::get(size_t index, size_t bytes) {
  const size_t page = size_t(getpagesize());
  if (bytes != bytes_) {
    for (void* s : stacks_) munmap(s, bytes_ + page);
    stacks_.clear();
    bytes_ = bytes;
  }
  while (stacks_.size() <= index) {
    void* p = mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    mprotect(p, page,
             PROT_NONE);  // guard page: a fiber stack overflow faults instead of corrupting
    stacks_.push_back(p);
  }
  return static_cast<char*>(stacks_[index]) + page;
}

void worker::run_block(uint64_t linear) {
  const launch_spec& spec = *launch->spec;
  block = dim3u(uint32_t(linear % spec.grid.x), uint32_t(linear / spec.grid.x % spec.grid.y),
                uint32_t(linear / (uint64_t(spec.grid.x) * spec.grid.y)));
  const uint32_t n = launch->nthreads;
  const dim3u bd = spec.block;
  threads.resize(n);
  warps.resize((n + kWarpSize - 1) / kWarpSize);
  for (uint32_t wi = 0; wi < warps.size(); ++wi) {
    warp_state& ws = warps[wi];
    const uint32_t count = std::min(kWarpSize, n - wi * kWarpSize);
    ws.existing = count == kWarpSize ? ~0u : (1u << count) - 1;
    ws.exited = 0;
    if (ws.sync_gen) std::memset(ws.pair_sync, 0, sizeof ws.pair_sync);
    ws.sync_gen = 0;
    ws.pending.clear();
    ws.wgmma_ops.clear();
    ws.wgmma_open_group = 0;
    ws.wgmma_fenced = false;
  }
  epoch = 1;
  live = n;
  at_barrier = 0;
  failed = false;
  runnable.clear();
  reset_shared(spec.dynamic_shared_bytes);
  const size_t sbytes = stack_bytes();
  for (uint32_t i = 0; i < n; ++i) {
    thread_state& t = threads[i];
    t.tid = i;
    t.idx = dim3u(i % bd.x, i / bd.x % bd.y, i / (bd.x * bd.y));
    t.st = status::runnable;
    t.cp_ops.clear();
    t.cp_head = 0;
    t.cp_open_group = 0;
    t.proxy_fences = 0;
    t.idle_accesses = 0;
    t.watchdog = launch->watchdog;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = stacks.get(i, sbytes);
    t.ctx.uc_stack.ss_size = sbytes;
    t.ctx.uc_link = &scheduler;
    makecontext(&t.ctx, fiber_main, 0);
    runnable.push_back(i);
  }
  t_active = this;
  while (!failed && !runnable.empty()) {
    const uint32_t i = runnable.front();
    runnable.pop_front();
    current = &threads[i];
    swapcontext(&scheduler, &threads[i].ctx);
    current = nullptr;
  }
  struct deactivate {
    ~deactivate() { t_active = nullptr; }
  } guard;
  if (failed) throw emulator_error(error.kind, error.text);
  if (live > 0) report_deadlock(*this);
}

[[noreturn]] void fail(const std::string& kind, const std::string& detail,
                       const thread_state* who) {
  worker* w = t_active;
  std::string text = "tokenmix simt emulator: " + kind;
  if (w && w->launch) {
    text += " in kernel '" + w->launch->kernel_name + "', block " + fmt_dim(w->block);
    if (!who) who = w->current;
    if (who) text += ", " + describe_thread(*w, *who);
  }
  text += ": " + detail;
  if (w && w->current) {
    w->failed = true;
    w->error = {kind, text};
    swapcontext(&w->current->ctx, &w->scheduler);  // never resumed
    std::abort();
  }
  throw emulator_error(kind, text);
}

std::string describe_thread(const worker&, const thread_state& t) {
  return "thread " + fmt_dim(t.idx) + " [warp " + std::to_string(t.tid / kWarpSize) + ", lane " +
         std::to_string(t.tid % kWarpSize) + "]";
}

// ---- launch ------------------------------------------------------------------------------------

void run(launch_spec& spec) {
  if (t_active && t_active->current)
    fail("invalid launch", "launch() from kernel code (dynamic parallelism) is not emulated");
  const dim3u g = spec.grid, b = spec.block;
  const uint64_t nthreads = uint64_t(b.x) * b.y * b.z;
  std::string bad;
  if (!b.x || !b.y || !b.z || nthreads > kMaxThreads || b.z > 64)
    bad = "block " + fmt_dim(b) + " (at most 1024 threads, z <= 64, none zero)";
  else if (!g.x || !g.y || !g.z || g.y > 65535 || g.z > 65535 || g.x > 0x7fffffffu)
    bad = "grid " + fmt_dim(g);
  else if (spec.dynamic_shared_bytes > kMaxSharedBytes)
    bad = std::to_string(spec.dynamic_shared_bytes) + " bytes of dynamic shared memory (max " +
          std::to_string(kMaxSharedBytes) + ")";
  launch_state L;
  L.spec = &spec;
  L.kernel_name = kernel_name(spec);
  if (!bad.empty())
    throw emulator_error("invalid launch", "tokenmix simt emulator: invalid launch of kernel '" +
                                               L.kernel_name + "': " + bad);
  L.nthreads = uint32_t(nthreads);
  L.nblocks = uint64_t(g.x) * g.y * g.z;
  for (size_t i = 0; i < spec.buffers.size(); ++i) {  // buffer i is region i + 1
    const auto& r = spec.buffers[i];
    const uintptr_t p = reinterpret_cast<uintptr_t>(r.ptr);
    L.globals.push_back({p, p + r.bytes, r.name ? r.name : "argument buffer " + std::to_string(i)});
  }
  for (global_alloc& a : registry_snapshot()) L.globals.push_back(std::move(a));
  L.watchdog = watchdog_limit();
  read_math_mode(L);
  t_binding = &L;
  spec.bind(spec.closure);
  t_binding = nullptr;
  const int wanted = g_workers.load() > 0 ? g_workers.load() : env_int("TOKENMIX_SIMT_WORKERS", 1);
  const uint64_t nworkers = std::min<uint64_t>(uint64_t(std::max(wanted, 1)), L.nblocks);
  auto body = [&L] {
    worker& w = this_worker();
    w.launch = &L;
    w.last_global = nullptr;
    while (!L.failed.load()) {
      const uint64_t blk = L.next_block++;
      if (blk >= L.nblocks) break;
      try {
        w.run_block(blk);
      } catch (...) {
        std::lock_guard<std::mutex> lock(L.error_mutex);
        if (!L.error) L.error = std::current_exception();
        L.failed = true;
      }
    }
    w.launch = nullptr;
  };
  std::vector<std::thread> extra;
  for (uint64_t i = 1; i < nworkers; ++i) extra.emplace_back(body);
  body();
  for (std::thread& t : extra) t.join();
  if (L.error) std::rethrow_exception(L.error);
}

// ---- indices and barriers ----------------------------------------------------------------------

dim3u thread_idx() {
  return current_thread().idx;
}
dim3u block_idx() {
  return active().block;
}
dim3u block_dim() {
  return active().launch->spec->block;
}
dim3u grid_dim() {
  return active().launch->spec->grid;
}
uint32_t linear_thread_idx() {
  return current_thread().tid;
}

void sync_threads(const char* file, int line) {
  worker& w = active();
  thread_state& t = *w.current;
  t.idle_accesses = 0;  // a synchronization point: progress for the watchdog
  if (w.live < w.launch->nthreads) {
    std::vector<uint32_t> gone;
    for (const thread_state& o : w.threads)
      if (o.st == status::exited) gone.push_back(o.tid);
    fail("barrier divergence",
         "thread reaches sync_threads() at " + site(file, line) + ", but threads " + ranges(gone) +
             " (linear index) have exited and never arrive (deadlock on the GPU)");
  }
  t.st = status::barrier;
  t.wait_file = file;
  t.wait_line = line;
  if (++w.at_barrier < w.live) {
    yield(w, t);
    return;
  }
  std::vector<uint32_t> here, elsewhere;
  const thread_state* other = nullptr;
  for (const thread_state& o : w.threads) {
    if (o.wait_line == line && (o.wait_file == file || std::strcmp(o.wait_file, file) == 0)) {
      here.push_back(o.tid);
    } else {
      elsewhere.push_back(o.tid);
      other = &o;
    }
  }
  if (!elsewhere.empty())
    fail("barrier divergence", "threads wait at different sync_threads() calls: threads " +
                                   ranges(here) + " at " + site(file, line) + ", threads " +
                                   ranges(elsewhere) + " at " +
                                   site(other->wait_file, other->wait_line) + " (linear indices)");
  w.at_barrier = 0;
  ++w.epoch;
  for (thread_state& o : w.threads) {
    o.st = status::runnable;
    if (&o != &t) w.runnable.push_back(o.tid);
  }
}

// ---- warp collectives --------------------------------------------------------------------------

void collective_arrive(coll_kind kind, uint8_t mode, uint32_t mask, const lane_args& args,
                       const char* file, int line) {
  worker& w = active();
  thread_state& t = *w.current;
  t.idle_accesses = 0;  // a synchronization point: progress for the watchdog
  const uint32_t wi = t.tid / kWarpSize, lane = t.tid % kWarpSize, bit = 1u << lane;
  warp_state& ws = w.warps[wi];
  auto name = [&] { return collective_name(kind, mode); };
  if (!(mask & bit))
    fail("invalid warp collective", name() + " at " + site(file, line) + ": the calling lane " +
                                        std::to_string(lane) + " is not in the member mask " +
                                        hex(mask));
  if (kind != coll_kind::sync_warp && kind != coll_kind::shuffle && kind != coll_kind::vote &&
      ws.existing != ~0u)
    fail("incomplete warp collective", name() + " at " + site(file, line) +
                                           " needs all 32 lanes, but this warp has only lanes " +
                                           lanes(ws.existing));
  if (mask & ws.exited)
    fail("incomplete warp collective", name() + " at " + site(file, line) + " (member mask " +
                                           hex(mask) + "): lanes " + lanes(mask & ws.exited) +
                                           " have already exited and never arrive");
  // sm_70+ semantics: a lane waits until every non-exited member of `mask` has executed a
  // collective with the same qualifiers and the same member mask (any call site). Groups with
  // overlapping masks may be pending at once; circular waits are found as deadlocks.
  collective* c = nullptr;
  for (collective& p : ws.pending)
    if (p.mask == mask && p.kind == kind && p.mode == mode) {
      c = &p;
      break;
    }
  if (!c) {
    ws.pending.emplace_back();
    c = &ws.pending.back();
    c->kind = kind;
    c->mode = mode;
    c->mask = mask;
    c->arrived = 0;
    c->file = file;
    c->line = line;
  }
  c->lane[lane] = args;
  c->arrived |= bit;
  const uint32_t need = mask & ws.existing;
  if (c->arrived != need) {
    t.st = status::collective;
    t.wait_file = file;
    t.wait_line = line;
    t.wait_kind = kind;
    t.wait_mode = mode;
    t.wait_mask = mask;
    yield(w, t);
    return;
  }
  // The last member computes every lane's result.
  switch (kind) {
    case coll_kind::sync_warp:
      ++ws.sync_gen;
      for (uint32_t a = 0; a < kWarpSize; ++a)
        for (uint32_t b = 0; b < kWarpSize; ++b)
          if ((need >> a & 1u) && (need >> b & 1u)) ws.pair_sync[a][b] = ws.sync_gen;
      break;
    case coll_kind::shuffle:
      for (uint32_t l = 0; l < kWarpSize; ++l) {
        if (!(need >> l & 1u)) continue;
        const uint32_t op = c->lane[l].operand;
        uint32_t src = l;
        switch (static_cast<shfl_mode>(mode)) {
          case shfl_mode::idx: src = op & 31u; break;
          case shfl_mode::up: src = op < kWarpSize && l >= op ? l - op : l; break;
          case shfl_mode::down: src = op < kWarpSize && l + op < kWarpSize ? l + op : l; break;
          case shfl_mode::bfly: src = (l ^ op) < kWarpSize ? l ^ op : l; break;
        }
        // A source lane outside the member mask gives an undefined value on the GPU: poison it.
        *static_cast<uint32_t*>(c->lane[l].out) =
            (need >> src & 1u) ? c->lane[src].value : 0xffffffffu;
      }
      break;
    case coll_kind::vote: {
      uint32_t ballot = 0;
      for (uint32_t l = 0; l < kWarpSize; ++l)
        if ((need >> l & 1u) && c->lane[l].value) ballot |= 1u << l;
      const uint32_t r = mode == uint8_t(vote_mode::any)   ? uint32_t(ballot != 0)
                         : mode == uint8_t(vote_mode::all) ? uint32_t(ballot == need)
                                                           : ballot;
      for (uint32_t l = 0; l < kWarpSize; ++l)
        if (need >> l & 1u) *static_cast<uint32_t*>(c->lane[l].out) = r;
      break;
    }
    case coll_kind::mma:
    case coll_kind::ldmatrix: complete_tensor_op(ws, wi, *c); break;
    case coll_kind::wgmma:
    case coll_kind::wgmma_fence:
    case coll_kind::wgmma_commit:
    case coll_kind::wgmma_wait: complete_wgmma(ws, wi, *c); break;
  }
  for (uint32_t l = 0; l < kWarpSize; ++l) {
    if (!(need >> l & 1u) || l == lane) continue;
    thread_state& o = w.threads[wi * kWarpSize + l];
    o.st = status::runnable;
    w.runnable.push_back(o.tid);
  }
  ws.pending.erase(ws.pending.begin() + (c - ws.pending.data()));
}

void sync_warp(uint32_t mask, const char* file, int line) {
  collective_arrive(coll_kind::sync_warp, 0, mask, lane_args{}, file, line);
}

uint32_t shuffle(shfl_mode mode, uint32_t mask, uint32_t value, uint32_t operand, const char* file,
                 int line) {
  uint32_t out = 0;
  collective_arrive(coll_kind::shuffle, uint8_t(mode), mask,
                    lane_args{value, operand, nullptr, &out}, file, line);
  return out;
}

uint32_t vote(vote_mode mode, uint32_t mask, bool pred, const char* file, int line) {
  uint32_t out = 0;
  collective_arrive(coll_kind::vote, uint8_t(mode), mask, lane_args{pred, 0, nullptr, &out}, file,
                    line);
  return out;
}

}  // namespace tokenmix::simt::emu
