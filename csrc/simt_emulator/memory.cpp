// SIMT emulator: global buffer registry, checked global and shared accesses, the per-block shared
// memory arena with its race shadow, atomics and cp.async.
//
// Shared-memory races: every byte remembers its last plain writer, the atomics and the plain reads
// since then, each with the barrier interval ("epoch", advanced by each sync_threads) and the
// warp's sync_warp generation at the access. Two accesses by different threads to the same byte,
// at least one a write (plain or atomic), race unless a sync_threads separates them (different
// epochs) or both threads are lanes of one warp that took part in a common sync_warp after the
// first access. Atomics do not race with atomics; they are ordered like any other write.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>

#include "internal.h"

namespace tokenmix::simt::emu {
namespace {

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::map<uintptr_t, global_alloc>& registry() {
  static std::map<uintptr_t, global_alloc> r;
  return r;
}

std::string hexaddr(uintptr_t a) {
  char b[32];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(a));
  return b;
}

const char* verb(access a) {
  return a == access::read ? "read" : a == access::write ? "write" : "atomic";
}

std::string shared_where(const worker& w, uintptr_t addr) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(w.smem);
  std::string best;
  uintptr_t best_dist = ~uintptr_t(0);
  for (const shared_alloc& a : w.shared_allocs) {
    const uintptr_t b = base + a.offset, e = b + a.bytes;
    const uintptr_t d = addr < b ? b - addr : addr >= e ? addr - e + 1 : 0;
    if (d < best_dist) {
      best_dist = d;
      const long long off = static_cast<long long>(addr) - static_cast<long long>(b);
      best = std::string("shared '") + a.name + "' " + (off < 0 ? "- " : "+ ") +
             std::to_string(off < 0 ? -off : off) + ", an array of " + std::to_string(a.bytes) +
             " bytes";
    }
  }
  return "address " + hexaddr(addr) + (best.empty() ? "" : " (" + best + ")");
}

}  // namespace

// ---- registry ----------------------------------------------------------------------------------

void register_global(const void* ptr, size_t bytes, const char* name) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry()[p] = {p, p + bytes, name ? name : "buffer@" + hexaddr(p)};
}

void unregister_global(const void* ptr) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().erase(reinterpret_cast<uintptr_t>(ptr));
}

std::vector<global_alloc> registry_snapshot() {
  std::lock_guard<std::mutex> lock(registry_mutex());
  std::vector<global_alloc> v;
  for (const auto& kv : registry()) v.push_back(kv.second);
  return v;
}

std::string describe_address(const void* p) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  worker& w = this_worker();
  if (w.smem && addr >= reinterpret_cast<uintptr_t>(w.smem) &&
      addr < reinterpret_cast<uintptr_t>(w.smem) + kSharedCapacity)
    return shared_where(w, addr);
  if (!w.launch) return "address " + hexaddr(addr);
  for (const global_alloc& a : w.launch->globals)
    if (addr >= a.begin && addr < a.end)
      return "address " + hexaddr(addr) + " (buffer '" + a.name + "' + " +
             std::to_string(addr - a.begin) + ")";
  return "address " + hexaddr(addr);
}

// ---- global accesses ---------------------------------------------------------------------------

namespace {

std::string describe_buffer(const global_alloc& g) {
  return "buffer '" + g.name + "' (" + std::to_string(g.end - g.begin) + " bytes at " +
         hexaddr(g.begin) + ")";
}

// "is 4 bytes past the end of buffer 'x' (...)", for an access not inside g.
std::string where_outside(const global_alloc& g, uintptr_t addr, uint32_t bytes) {
  if (addr >= g.end)
    return " is " + std::to_string(addr - g.end) + " bytes past the end of " + describe_buffer(g);
  if (addr + bytes <= g.begin)
    return " is " + std::to_string(g.begin - addr) + " bytes before the start of " +
           describe_buffer(g);
  return " straddles the bounds of " + describe_buffer(g);
}

bool inside(const global_alloc& g, uintptr_t addr, uint32_t bytes) {
  return addr >= g.begin && addr + bytes <= g.end;
}

}  // namespace

uint32_t global_region(const launch_state& L, uintptr_t addr) {
  uint32_t starts = 0, contains = 0, containing = 0;
  for (uint32_t i = 0; i < L.globals.size(); ++i) {
    const global_alloc& g = L.globals[i];
    if (g.begin == addr && g.end > addr &&
        (!starts || g.end > L.globals[starts - 1].end))  // the widest of those starting here
      starts = i + 1;
    if (addr >= g.begin && addr < g.end) ++containing, contains = i + 1;
  }
  return starts ? starts : containing == 1 ? contains : 0;
}

void check_global(thread_state& t, uintptr_t addr, uint32_t bytes, uint32_t align, access a,
                  uint32_t region) {
  worker& w = this_worker();
  if (addr % align)
    fail("misaligned global access",
         std::to_string(bytes) + "-byte " + verb(a) + " at address " + hexaddr(addr) + " is not " +
             std::to_string(align) + "-byte aligned" + " (" + describe_address((void*)addr) + ")",
         &t);
  const std::vector<global_alloc>& globals = w.launch->globals;
  if (region > 0 && region <= globals.size()) {  // the pointer's own buffer, and only that one
    const global_alloc& g = globals[region - 1];
    if (inside(g, addr, bytes)) return;
    std::string detail = std::to_string(bytes) + "-byte " + verb(a) + " at address " +
                         hexaddr(addr) + where_outside(g, addr, bytes) +
                         ", the buffer this pointer was made for";
    for (const global_alloc& c : globals)
      if (&c != &g && addr >= c.begin && addr < c.end) {
        detail += "; the address lies inside buffer '" + c.name + "' + " +
                  std::to_string(addr - c.begin) + ", another buffer";
        break;
      }
    fail(std::string("out-of-bounds global ") + verb(a), detail, &t);
  }
  const global_alloc* g = w.last_global;
  if (g && inside(*g, addr, bytes)) return;
  const global_alloc* nearest = nullptr;
  uintptr_t nearest_dist = ~uintptr_t(0);
  for (const global_alloc& c : globals) {
    if (inside(c, addr, bytes)) {
      w.last_global = &c;
      return;
    }
    const uintptr_t d = addr + bytes <= c.begin ? c.begin - addr
                        : addr >= c.end         ? addr - c.end + 1
                                                : 0;
    if (d < nearest_dist) nearest_dist = d, nearest = &c;
  }
  std::string detail = std::to_string(bytes) + "-byte " + verb(a) + " at address " + hexaddr(addr);
  if (!nearest)
    detail +=
        " outside every registered buffer (none is registered: pass buffers to launch() with "
        "buffer(ptr, count) or register_global())";
  else
    detail += where_outside(*nearest, addr, bytes);
  fail(std::string("out-of-bounds global ") + verb(a), detail, &t);
}

// ---- shared memory arena -----------------------------------------------------------------------

worker::worker() {
  smem = static_cast<uint8_t*>(std::aligned_alloc(128, kSharedCapacity));
  shadow = static_cast<shadow_byte*>(std::calloc(kSharedCapacity, sizeof(shadow_byte)));
  history = static_cast<access_history*>(std::calloc(kSharedCapacity, sizeof(access_history)));
  if (!smem || !shadow || !history) throw std::bad_alloc();
}

worker::~worker() {
  std::free(smem);
  std::free(shadow);
  std::free(history);
}

namespace {

// Places an array at an offset aligned to exactly `align` (never to 2 * align), after a redzone.
uint32_t place(uint32_t top, size_t align) {
  uint32_t off = (top + kRedzone + uint32_t(align) - 1) / uint32_t(align) * uint32_t(align);
  if (align < 128 && off % (2 * align) == 0) off += uint32_t(align);
  return off;
}

void add_alloc(worker& w, const void* key, uint32_t off, size_t bytes, const char* name) {
  w.shared_allocs.push_back({key, off, uint32_t(bytes), name});
  const uint16_t id = uint16_t(w.shared_allocs.size());
  for (uint32_t i = 0; i < bytes; ++i) w.shadow[off + i].alloc = id;
  std::memset(w.smem + off, 0xff, bytes);  // poison (NaN as float)
  w.smem_top = std::max<uint32_t>(w.smem_top, off + uint32_t(bytes));
}

constexpr uint32_t kDynamicOffset = 80;  // 16-byte aligned, not 32-byte aligned

}  // namespace

void worker::reset_shared(size_t dynamic_bytes) {
  const size_t used = std::min<size_t>(smem_top + kRedzone, kSharedCapacity);
  std::memset(shadow, 0, sizeof(shadow_byte) * used);
  std::memset(history, 0, sizeof(access_history) * used);
  shared_allocs.clear();
  smem_top = 0;
  static_bytes = 0;
  add_alloc(*this, nullptr, kDynamicOffset, dynamic_bytes, "dynamic shared memory");
}

void* static_shared(const shared_site* s) {
  thread_state& t = current_thread();
  worker& w = this_worker();
  for (const shared_alloc& a : w.shared_allocs)
    if (a.key == s) return w.smem + a.offset;
  const uint32_t off = place(w.smem_top, s->align);
  const size_t dynamic_bytes = w.launch->spec->dynamic_shared_bytes;
  if (w.static_bytes + s->bytes > kStaticSharedLimit)
    fail("shared memory limit",
         "static shared memory exceeds 48 KiB with '" + std::string(s->name) + "' (" +
             std::to_string(s->bytes) + " bytes); use dynamic shared memory",
         &t);
  if (w.static_bytes + s->bytes + dynamic_bytes > kMaxSharedBytes ||
      off + s->bytes + kRedzone > kSharedCapacity)
    fail("shared memory limit",
         "static plus dynamic shared memory exceeds " + std::to_string(kMaxSharedBytes) +
             " bytes with '" + std::string(s->name) + "'",
         &t);
  w.static_bytes += uint32_t(s->bytes);
  add_alloc(w, s, off, s->bytes, s->name);
  return w.smem + off;
}

void* dynamic_shared() {
  current_thread();
  return this_worker().smem + kDynamicOffset;
}

// ---- shared accesses ---------------------------------------------------------------------------

namespace {

enum class sop : uint8_t { read, write, atomic, cp_issue, cp_land };

constexpr uint32_t kNone = ~0u, kSeveral = ~0u - 1;

// A thread of `set` whose access is not ordered before thread t's (kSeveral: threads of several
// warps; kNone: all are ordered). Accesses in an earlier barrier interval are ordered by the
// sync_threads() between; within the interval, only the thread itself, or a lane of its warp that
// took part with it in a sync_warp after the access, is ordered before it. The set keeps only the
// earliest and the latest sync generation of its lanes: a lane is ordered for sure when it synced
// with t after the latest, unordered for sure when not after the earliest, and counted as
// unordered in between (conservative: never a missed race). The lane named is a sure one if any.
inline uint32_t unordered(const worker& w, const access_set& set, const thread_state& t) {
  if (set.epoch != w.epoch) return kNone;
  const uint32_t wi = t.tid / kWarpSize, lane = t.tid % kWarpSize;
  if (set.warp == kManyWarps) return kSeveral;
  if (set.warp != wi) return set.warp * kWarpSize + uint32_t(__builtin_ctz(set.lanes));
  const warp_state& ws = w.warps[wi];
  const uint32_t others = set.lanes & ~(1u << lane);
  if (!others) return kNone;
  // No sync_warp completed since the earliest access: none of the others is ordered before t.
  if (set.first_gen == ws.sync_gen) return wi * kWarpSize + uint32_t(__builtin_ctz(others));
  uint32_t maybe = kNone;
  for (uint32_t rest = others; rest; rest &= rest - 1) {
    const uint32_t l = uint32_t(__builtin_ctz(rest)), synced = ws.pair_sync[l][lane];
    if (synced <= set.first_gen) return wi * kWarpSize + l;
    if (synced <= set.gen && maybe == kNone) maybe = wi * kWarpSize + l;
  }
  return maybe;
}

// Adds thread t's access to `set`. Members all ordered before it are dropped: whatever is ordered
// after t's access is ordered after theirs too.
inline void record(const worker& w, access_set& set, const thread_state& t) {
  const uint32_t wi = t.tid / kWarpSize, bit = 1u << (t.tid % kWarpSize);
  const uint32_t gen = w.warps[wi].sync_gen;  // sync generations only grow
  if (unordered(w, set, t) == kNone) {
    set = {w.epoch, gen, gen, bit, uint16_t(wi)};
    return;
  }
  if (set.warp != wi) set.warp = kManyWarps;
  set.lanes |= bit;
  set.gen = gen;
}

// Makes thread t the only member of `set`.
inline void replace(const worker& w, access_set& set, const thread_state& t) {
  set.epoch = 0;
  record(w, set, t);
}

// Thread t's access `op` added to a byte's history (after the checks).
void update(const worker& w, access_history& h, const thread_state& t, sop op) {
  switch (op) {
    case sop::read: record(w, h.reads, t); break;
    case sop::write:
    case sop::cp_land:  // a plain write by the issuing thread, checked when it was issued
      replace(w, h.writes, t);
      h.atomics.epoch = 0;
      h.reads.epoch = 0;
      h.writer = uint16_t(t.tid + 1);
      h.writer_fences = t.proxy_fences;
      break;
    case sop::atomic:  // the reads stay: a later atomic must be ordered after them too
      record(w, h.atomics, t);
      break;
    case sop::cp_issue: break;  // recorded when it lands (cp_land)
  }
}

inline bool same(const access_set& a, const access_set& b) {
  return a.epoch == b.epoch && a.first_gen == b.first_gen && a.gen == b.gen && a.lanes == b.lanes &&
         a.warp == b.warp;
}
inline bool same(const access_history& a, const access_history& b) {
  return same(a.writes, b.writes) && same(a.atomics, b.atomics) && same(a.reads, b.reads) &&
         a.writer == b.writer && a.writer_fences == b.writer_fences;
}

// Bit i set: byte i of an access has the same history as byte i - 1 (for the first 32 bytes). The
// bytes of one access mostly do; each distinct history is checked and updated once.
uint32_t repeats(const access_history* h, uint32_t bytes) {
  uint32_t mask = 0;
  for (uint32_t i = 1; i < std::min<uint32_t>(bytes, 32); ++i)
    if (same(h[i], h[i - 1])) mask |= 1u << i;
  return mask;
}
inline bool repeated_at(uint32_t mask, uint32_t i) {
  return i < 32 && (mask >> i & 1u);
}

void update_all(const worker& w, access_history* h, uint32_t bytes, uint32_t repeated,
                const thread_state& t, sop op) {
  for (uint32_t i = 0; i < bytes; ++i)
    if (repeated_at(repeated, i))
      h[i] = h[i - 1];
    else
      update(w, h[i], t, op);
}

void shared_op(thread_state& t, uintptr_t addr, uint32_t bytes, uint32_t align, sop op,
               uint32_t region) {
  worker& w = this_worker();
  const uintptr_t base = reinterpret_cast<uintptr_t>(w.smem);
  // Report text is built only on failure.
  auto what = [&]() -> std::string {
    return std::to_string(bytes) + "-byte " +
           (op == sop::read     ? "read"
            : op == sop::atomic ? "atomic"
                                : "write") +
           (op == sop::cp_issue ? " by cp.async" : "");
  };
  auto kind = [&](const char* prefix) {
    return std::string(prefix) + (op == sop::read     ? "read"
                                  : op == sop::atomic ? "atomic"
                                                      : "write");
  };
  if (addr < base || addr + bytes > base + kSharedCapacity)
    fail(kind("out-of-bounds shared "),
         what() + " at address " + hexaddr(addr) +
             " is outside the block's shared memory (a shared_ptr that does not point into shared "
             "memory)",
         &t);
  if (addr % align)
    fail("misaligned shared access",
         what() + " at " + shared_where(w, addr) + " is not " + std::to_string(align) +
             "-byte aligned",
         &t);
  const uint32_t off = uint32_t(addr - base);
  shadow_byte* s = w.shadow + off;
  access_history* h = w.history + off;
  if (region > w.shared_allocs.size()) region = 0;
  // The array the pointer was made for, else the one the access starts in.
  const uint16_t alloc = region ? uint16_t(region) : s[0].alloc;
  for (uint32_t i = 0; i < bytes; ++i) {
    if (s[i].alloc != 0 && s[i].alloc == alloc) continue;
    std::string why = !alloc ? " is outside every shared array"
                      : region
                          ? " is outside shared '" + std::string(w.shared_allocs[alloc - 1].name) +
                                "', the array this pointer was made for" +
                                (s[i].alloc ? " (it lies in another array)" : "")
                          : " runs past the end of the array";
    fail(kind("out-of-bounds shared "), what() + " at " + shared_where(w, addr + i) + why, &t);
  }
  const uint32_t repeated = repeats(h, bytes);
  if (op == sop::cp_land) return update_all(w, h, bytes, repeated, t, op);
  for (uint32_t i = 0; i < bytes; ++i)
    if (s[i].flags & kPendingCopy)
      fail(op == sop::read ? "read of pending cp.async destination"
                           : "write to pending cp.async destination",
           what() + " at " + shared_where(w, addr + i) +
               " touches the destination of a cp.async issued by " +
               describe_thread(w, w.threads[s[i].cp_thread]) +
               " that no cp_async_wait_group has completed yet (the data has not landed)",
           &t);
  // Conflicts: a plain write with everything, an atomic with plain accesses, a plain read with
  // writes and atomics.
  for (uint32_t i = 0; i < bytes; ++i) {
    if (repeated_at(repeated, i)) continue;  // checked already
    const access_history& b = h[i];
    if ((op == sop::read || op == sop::atomic) && b.writes.epoch == 0 && b.atomics.epoch == 0)
      fail("uninitialized shared read",
           what() + " at " + shared_where(w, addr + i) +
               " reads bytes no thread of this block has written yet (if another thread writes "
               "them later without a sync_threads() in between, this is also a race)",
           &t);
    const struct {
      const access_set* set;
      const char* noun;
    } earlier[3] = {{&b.writes, "a write"},
                    {op == sop::atomic ? nullptr : &b.atomics, "an atomic"},
                    {op == sop::read ? nullptr : &b.reads, "a read"}};
    for (const auto& e : earlier) {
      const uint32_t other = e.set ? unordered(w, *e.set, t) : kNone;
      if (other != kNone)
        fail("shared memory race",
             what() + " at " + shared_where(w, addr + i) + " conflicts with " + e.noun + " by " +
                 (other == kSeveral ? std::string("threads of several warps")
                                    : describe_thread(w, w.threads[other])) +
                 " in the same barrier interval: no sync_threads() (or sync_warp() within a warp) "
                 "orders them",
             &t);
    }
  }
  if (op == sop::cp_issue) {  // recorded as a write when it lands
    for (uint32_t i = 0; i < bytes; ++i) {
      s[i].flags |= kPendingCopy;
      s[i].cp_thread = uint16_t(t.tid);
    }
    return;
  }
  update_all(w, h, bytes, repeated, t, op);
}

}  // namespace

void check_shared(thread_state& t, uintptr_t addr, uint32_t bytes, uint32_t align, access a,
                  uint32_t region) {
  shared_op(t, addr, bytes, align,
            a == access::read    ? sop::read
            : a == access::write ? sop::write
                                 : sop::atomic,
            region);
}

uint32_t region_of(space s, const void* addr) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(addr);
  if (s == space::global) {
    const launch_state* L = current_launch();
    return L ? global_region(*L, p) : 0;
  }
  const worker* w = running_worker();
  if (!w) return 0;
  const uintptr_t base = reinterpret_cast<uintptr_t>(w->smem);
  return p >= base && p < base + kSharedCapacity ? w->shadow[p - base].alloc : 0;
}

// ---- the progress watchdog ---------------------------------------------------------------------

[[noreturn]] __attribute__((cold, noinline)) void no_progress(thread_state& t, const void* addr,
                                                              uint32_t bytes, access a) {
  fail("no progress",
       "the thread made more than " + std::to_string(t.watchdog) +
           " memory reads (or atomics that changed nothing) in a row without writing memory or "
           "reaching a synchronization point: it seems to spin on a value that nothing changes "
           "while it runs (last access: " +
           std::to_string(bytes) + "-byte " + verb(a) + " at " + describe_address(addr) +
           "). The emulator runs one thread of a block at a time, switching only at "
           "synchronization points (sync_threads, warp collectives, exit), and blocks one after "
           "another, so a spin-wait on another thread or block never ends here (one on another "
           "block can hang a GPU too). If this is legitimate work, raise $TOKENMIX_SIMT_WATCHDOG "
           "(now " +
           std::to_string(t.watchdog) + "; 0 turns the watchdog off)",
       &t);
}

// Counts the thread's accesses since it last made progress: wrote memory (a plain write, a
// cp.async, an atomic that changed the value) or reached a synchronization point. A thread that
// only reads for too long spins on a value nothing changes while it runs.
inline void note_access(thread_state& t, bool progress, const void* addr, uint32_t bytes,
                        access a) {
  if (progress)
    t.idle_accesses = 0;
  else if (++t.idle_accesses > t.watchdog)
    no_progress(t, addr, bytes, a);
}

void check(space s, const void* addr, uint32_t bytes, uint32_t align, access a, uint32_t region) {
  thread_state& t = current_thread();
  const uintptr_t p = reinterpret_cast<uintptr_t>(addr);
  if (s == space::shared)
    check_shared(t, p, bytes, align, a, region);
  else
    check_global(t, p, bytes, align, a, region);
  if (a != access::atomic) note_access(t, a == access::write, addr, bytes, a);
}

// ---- atomics -----------------------------------------------------------------------------------

namespace {
uint32_t apply(atomic_op op, uint32_t old, uint32_t v) {
  switch (op) {
    case atomic_op::add_f32: return float_bits(bits_float(old) + bits_float(v));
    case atomic_op::add_i32:
    case atomic_op::add_u32: return old + v;
    case atomic_op::max_i32: return int32_t(v) > int32_t(old) ? v : old;
  }
  return old;
}
}  // namespace

uint32_t atomic(space s, void* addr, uint32_t region, atomic_op op, uint32_t v) {
  check(s, addr, 4, 4, access::atomic, region);
  uint32_t* p = static_cast<uint32_t*>(addr);
  uint32_t old, now;
  if (s == space::shared) {  // one OS thread runs the whole block
    old = *p;
    now = apply(op, old, v);
    *p = now;
  } else {
    old = __atomic_load_n(p, __ATOMIC_RELAXED);
    do {
      now = apply(op, old, v);
    } while (!__atomic_compare_exchange_n(p, &old, now, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  }
  note_access(current_thread(), now != old, addr, 4, access::atomic);
  return old;
}

// ---- cp.async ----------------------------------------------------------------------------------

void cp_async(int bytes, void* dst, uint32_t dst_region, const void* src, uint32_t src_region,
              int src_bytes, const char* file, int line) {
  thread_state& t = current_thread();
  if (src_bytes < 0 || src_bytes > bytes)
    fail("invalid cp.async",
         "source size " + std::to_string(src_bytes) + " is not in [0, " + std::to_string(bytes) +
             "] at " + file + ":" + std::to_string(line),
         &t);
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst);
  shared_op(t, d, uint32_t(bytes), uint32_t(bytes), sop::cp_issue, dst_region);
  cp_async_op op{static_cast<uint8_t*>(dst), uint32_t(bytes), t.cp_open_group, {}};
  if (src_bytes > 0) {
    check_global(t, reinterpret_cast<uintptr_t>(src), uint32_t(src_bytes), uint32_t(bytes),
                 access::read, src_region);
    std::memcpy(op.data, src, size_t(src_bytes));  // the source is read at issue
  }
  t.cp_ops.push_back(op);
  note_access(t, true, dst, uint32_t(bytes), access::write);
}

void cp_async_commit_group() {
  ++current_thread().cp_open_group;
}

void fence_proxy_async_shared() {
  ++current_thread().proxy_fences;
}

void check_async_proxy_read(thread_state& reader, uintptr_t addr, uint32_t bytes,
                            const char* operand, const char* file, int line) {
  worker& w = this_worker();
  const uint32_t off = uint32_t(addr - reinterpret_cast<uintptr_t>(w.smem));
  for (uint32_t i = 0; i < bytes; ++i) {
    const access_history& h = w.history[off + i];
    if (h.writer == 0) continue;
    const thread_state& writer = w.threads[h.writer - 1];
    if (writer.proxy_fences != h.writer_fences) continue;
    fail("unfenced generic write read by wgmma",
         std::string("the ") + operand + " operand of the wgmma at " + site(file, line) +
             " reads " + shared_where(w, addr + i) + ", last written by " +
             describe_thread(w, writer) +
             " (a store or a landed cp.async: the generic proxy), which has not run "
             "fence_proxy_async_shared() since: wgmma reads shared memory through the async proxy",
         &reader);
  }
}

void land_cp_async(thread_state& t, uint32_t first_pending_group) {
  worker& w = this_worker();
  while (t.cp_head < t.cp_ops.size() && t.cp_ops[t.cp_head].group < first_pending_group) {
    const cp_async_op& op = t.cp_ops[t.cp_head++];
    const uint32_t off = uint32_t(op.dst - w.smem);
    for (uint32_t i = 0; i < op.bytes; ++i) w.shadow[off + i].flags &= uint8_t(~kPendingCopy);
    shared_op(t, reinterpret_cast<uintptr_t>(op.dst), op.bytes, op.bytes, sop::cp_land, 0);
    std::memcpy(op.dst, op.data, op.bytes);
  }
  if (t.cp_head == t.cp_ops.size()) {
    t.cp_ops.clear();
    t.cp_head = 0;
  }
}

void cp_async_wait_group(int n, const char*, int) {
  thread_state& t = current_thread();
  const uint32_t keep = uint32_t(n);
  land_cp_async(t, t.cp_open_group > keep ? t.cp_open_group - keep : 0);
}

void on_exit_cp_async(thread_state& t) {
  if (t.cp_head == t.cp_ops.size()) return;
  const cp_async_op& op = t.cp_ops[t.cp_head];
  fail("cp.async never waited",
       "thread exits with " + std::to_string(t.cp_ops.size() - t.cp_head) +
           " cp.async copies no cp_async_wait_group completed (first: " + std::to_string(op.bytes) +
           " bytes to " + shared_where(this_worker(), reinterpret_cast<uintptr_t>(op.dst)) +
           (op.group == t.cp_open_group ? ", never committed" : "") + ")",
       &t);
}

}  // namespace tokenmix::simt::emu

namespace tokenmix::simt {
void register_global(const void* ptr, size_t bytes, const char* name) {
  emu::register_global(ptr, bytes, name);
}
void unregister_global(const void* ptr) {
  emu::unregister_global(ptr);
}
void set_workers(int workers) {
  emu::set_workers(workers);
}
void set_stack_kib(int kib) {
  emu::set_stack_kib(kib);
}
void set_watchdog(long long accesses) {
  emu::set_watchdog(accesses);
}
void set_math_mode(math_mode mode, uint64_t seed) {
  emu::set_math_mode(mode, seed);
}
}  // namespace tokenmix::simt
