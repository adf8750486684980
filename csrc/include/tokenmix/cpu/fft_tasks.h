// Task decomposition of the per-channel-block FFT kernels: (channel block, batch chunk) tasks,
// and the fixed-order sum of the chunks' partial parameter gradients.
#pragma once

#include <cstdint>

#include "tokenmix/cpu/parallel.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

// Tasks of a per-channel-block kernel: (block, chunk of the batch), at least `target` of them
// when the shape allows, so that small-C and small-B problems spread over the threads. The
// chunking depends on the shape only. Backward passes, whose chunks each hold partial sums,
// ask for fewer.
struct BlockChunking {
  static constexpr int64_t kForwardTasks = 64, kBackwardTasks = 16;
  int64_t batch = 0, channels = 0, width = 0;
  int64_t blocks = 0, chunks = 0, batch_per_chunk = 0;

  // What task `index` covers: channels [c0, c0 + lanes) of batch entries [b0, b1).
  struct Task {
    int64_t chunk, c0, b0, b1;
    int lanes;
  };

  BlockChunking(int64_t batch_, int64_t channels_, int width_, int64_t target)
      : batch(batch_), channels(channels_), width(width_) {
    blocks = (channels + width - 1) / width;
    const int64_t want = blocks >= target ? 1 : (target + blocks - 1) / blocks;
    chunks = batch < want ? batch : want;
    if (chunks < 1) chunks = 1;
    batch_per_chunk = (batch + chunks - 1) / chunks;
    chunks = batch_per_chunk > 0 ? (batch + batch_per_chunk - 1) / batch_per_chunk : 1;
  }
  int64_t tasks() const { return blocks * chunks; }
  Task task(int64_t index) const {
    Task t;
    t.chunk = index / blocks;
    t.c0 = (index % blocks) * width;
    t.lanes = int(channels - t.c0 < width ? channels - t.c0 : width);
    t.b0 = t.chunk * batch_per_chunk;
    t.b1 = t.b0 + batch_per_chunk < batch ? t.b0 + batch_per_chunk : batch;
    return t;
  }
};

// out(i, sum over chunks of part[chunk * size + i]) for every i < size, the chunks added in
// order: the parameter gradients do not depend on the number of threads.
template <class Problem, class T, class Out>
void add_chunk_partials(const Problem& p, const T* part, int64_t chunks, int64_t size,
                        const Out& out) {
  run_parallel(p, size, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T sum = 0;
      for (int64_t ch = 0; ch < chunks; ++ch) sum += part[ch * size + i];
      out(i, sum);
    }
  });
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
