// The large-block cache of the CPU kernels (tokenmix/cpu/large_block_cache.h).
#include "tokenmix/cpu/large_block_cache.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tokenmix::cpu {

namespace {

constexpr int kMaxBlocks = 8;
constexpr size_t kDefaultCapBytes = size_t(256) << 20;

size_t cap_bytes() {
  static const size_t cap = [] {
    const char* env = std::getenv("TOKENMIX_CPU_BLOCK_CACHE_MB");
    // Unset, or anything but a plain non-negative number of MiB that fits size_t: the default.
    if (!env || *env < '0' || *env > '9') return kDefaultCapBytes;
    char* end = nullptr;
    const unsigned long long mb = std::strtoull(env, &end, 10);
    if (*end != '\0' || mb > (SIZE_MAX >> 20)) return kDefaultCapBytes;
    return size_t(mb) << 20;
  }();
  return cap;
}

struct Entry {
  void* block = nullptr;
  size_t bytes = 0;
  uint64_t stamp = 0;  // when it was given back (older ones are freed first)
};

// The critical sections are a few comparisons, taken twice per buffer: a spin
// lock, so the library needs no pthread symbols for it.
struct Cache {
  std::atomic<bool> busy{false};
  Entry entries[kMaxBlocks];
  size_t total = 0;
  uint64_t clock = 0;

  void lock() {
    while (busy.exchange(true, std::memory_order_acquire)) {
    }
  }
  void unlock() { busy.store(false, std::memory_order_release); }
};

Cache& cache() {
  static Cache* c = new Cache;  // never destroyed: blocks outlive static destruction safely
  return *c;
}

}  // namespace

void* take_large_block(size_t bytes, size_t* capacity) {
  const size_t rounded = (bytes + kLargeBlockAlign - 1) / kLargeBlockAlign * kLargeBlockAlign;
  Cache& c = cache();
  c.lock();
  int best = -1;
  for (int i = 0; i < kMaxBlocks; ++i) {
    const Entry& e = c.entries[i];
    if (e.block && e.bytes >= rounded && e.bytes / 2 <= rounded &&
        (best < 0 || e.bytes < c.entries[best].bytes))
      best = i;
  }
  if (best >= 0) {
    Entry& e = c.entries[best];
    void* block = e.block;
    *capacity = e.bytes;
    c.total -= e.bytes;
    e = Entry{};
    c.unlock();
    return block;
  }
  c.unlock();
  void* block = std::aligned_alloc(kLargeBlockAlign, rounded);
  if (!block) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(block, rounded, MADV_HUGEPAGE);  // advice only
#endif
  *capacity = rounded;
  return block;
}

void give_large_block(void* block, size_t capacity) {
  if (!block) return;
  const size_t cap = cap_bytes();
  if (capacity > cap) {
    std::free(block);
    return;
  }
  void* evicted[kMaxBlocks];
  int n_evicted = 0;
  Cache& c = cache();
  c.lock();
  // Make room: free the oldest blocks until this one fits in a free slot and under the cap.
  for (;;) {
    int empty = -1, oldest = -1;
    for (int i = 0; i < kMaxBlocks; ++i) {
      const Entry& e = c.entries[i];
      if (!e.block) {
        if (empty < 0) empty = i;
      } else if (oldest < 0 || e.stamp < c.entries[oldest].stamp) {
        oldest = i;
      }
    }
    if (empty >= 0 && c.total + capacity <= cap) {
      c.entries[empty] = Entry{block, capacity, ++c.clock};
      c.total += capacity;
      break;
    }
    Entry& e = c.entries[oldest];  // the cache is non-empty here: capacity <= cap
    evicted[n_evicted++] = e.block;
    c.total -= e.bytes;
    e = Entry{};
  }
  c.unlock();
  for (int i = 0; i < n_evicted; ++i) std::free(evicted[i]);
}

size_t cached_large_block_bytes() {
  Cache& c = cache();
  c.lock();
  const size_t total = c.total;
  c.unlock();
  return total;
}

size_t release_large_blocks() {
  void* freed[kMaxBlocks];
  int n = 0;
  Cache& c = cache();
  c.lock();
  const size_t total = c.total;
  for (Entry& e : c.entries) {
    if (e.block) freed[n++] = e.block;
    e = Entry{};
  }
  c.total = 0;
  c.unlock();
  for (int i = 0; i < n; ++i) std::free(freed[i]);
  return total;
}

}  // namespace tokenmix::cpu
