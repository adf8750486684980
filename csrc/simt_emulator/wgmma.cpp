// SIMT emulator: wgmma (m64nNk16, f16/bf16 -> f32), emulated per warp. Warp w of a warpgroup
// computes rows 16 (w % 4)..+15 of D, which depend only on its own rows of A and on all of B, so
// the warpgroup instruction is four independent warp collectives. The asynchrony is modelled:
//   - issue (the collective completes) reads the operands (A, B from shared memory through the
//     descriptors, A registers, the accumulators) and records the op in the warp's open group;
//   - wgmma_commit_group closes the group; wgmma_wait_group<N> executes every op of the groups
//     older than the N newest, in issue order, writing the accumulators only then;
//   - at the wait, every operand must still hold what it held at issue (shared memory re-read,
//     A registers, and the accumulators, which nothing but the op itself may touch in flight);
//   - a warp must run wgmma_fence after each wait (and at the start) before its next wgmma, and
//     must not exit with ops in flight.
// So a kernel that reads accumulators before the wait sees stale values, and one that overwrites
// an operand in flight, forgets the fence or the wait, is reported.
#include <atomic>
#include <cstring>

#include "internal.h"

namespace tokenmix::simt::emu {
namespace {

using layout::wgmma_swizzle;

double element(uint16_t h, bool bf16) {
  return bf16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
}

// The 16-bit elements (rows x 16, row-major by (mn, k)) of a shared-memory operand: rows `first`..
// of the descriptor's matrix, read (and checked) as thread `reader`. `at_issue`: the op's own read,
// through the async proxy (else the wait's comparison of what the op read with what is there).
void read_operand(worker& w, thread_state& reader, uint64_t desc, bool mn_major, int first,
                  int rows, uint16_t* out, const char* what, const char* file, int line,
                  bool at_issue) {
  const layout::wgmma_descriptor_fields f = layout::decode_wgmma_descriptor(desc);
  if (f.base_offset != 0)
    fail("unsupported wgmma descriptor",
         std::string("wgmma at ") + site(file, line) + ": the " + what +
             " descriptor has a base offset (" + std::to_string(f.base_offset) +
             "); the emulator supports only 0 (swizzled tiles aligned to their pattern)",
         &reader);
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < 16; ++k) {
      const uint32_t at = layout::wgmma_swizzled(
          f.start +
              layout::wgmma_operand_offset(mn_major, f.swizzle, f.leading, f.stride, first + r, k),
          f.swizzle);
      const uintptr_t addr = reinterpret_cast<uintptr_t>(w.smem) + at;
      check_shared(reader, addr, 2, 2, access::read, 0);
      if (at_issue) check_async_proxy_read(reader, addr, 2, what, file, line);
      std::memcpy(&out[r * 16 + k], reinterpret_cast<const void*>(addr), 2);
    }
}

std::atomic<uint64_t> wgmma_done{0};

}  // namespace

uint64_t wgmma_instructions() {
  return wgmma_done.load(std::memory_order_relaxed);
}

uint32_t shared_window_address(const void* p, const char* file, int line) {
  worker& w = this_worker();
  const uintptr_t base = reinterpret_cast<uintptr_t>(w.smem), a = reinterpret_cast<uintptr_t>(p);
  if (a < base || a >= base + kSharedCapacity)
    fail("not a shared address",
         "wgmma_descriptor at " + site(file, line) + ": " + describe_address(p) +
             " is not in the block's shared memory",
         &current_thread());
  return uint32_t(a - base);
}

// The issue: the last lane of the warp completes the collective.
void issue_wgmma(warp_state& ws, uint32_t wi, collective& c) {
  worker& w = this_worker();
  thread_state& lane0 = w.threads[wi * kWarpSize];
  const auto& op = *static_cast<const wgmma_operands*>(c.lane[0].in);
  const std::string where = "wgmma at " + site(c.file, c.line);
  for (uint32_t l = 1; l < kWarpSize; ++l) {
    const auto& o = *static_cast<const wgmma_operands*>(c.lane[l].in);
    if (o.desc_a != op.desc_a || o.desc_b != op.desc_b || o.accumulate != op.accumulate)
      fail("non-uniform wgmma",
           where + ": lane " + std::to_string(l) +
               " gives other descriptors or another accumulate flag than "
               "lane 0 (they must be the same in the whole warpgroup)",
           &w.threads[wi * kWarpSize + l]);
  }
  const uint32_t group_first = wi & ~3u;
  if (group_first + 4 > w.warps.size() || w.warps[group_first + 3].existing != ~0u)
    fail("incomplete warpgroup",
         where + ": warp " + std::to_string(wi) +
             " is not in a complete warpgroup of 4 warps (128 threads)",
         &lane0);
  if (!ws.wgmma_fenced)
    fail("wgmma without fence",
         where + ": warp " + std::to_string(wi) +
             " issues a wgmma without a wgmma_fence since its start or its last wgmma_wait_group "
             "(the accumulator and A registers need the fence before the asynchronous op reads "
             "them)",
         &lane0);
  const int rank = int(wi & 3u), n = op.n;
  wgmma_op r;
  r.op = op;
  r.op.a = nullptr;
  r.group = ws.wgmma_open_group;
  r.file = c.file;
  r.line = c.line;
  r.a.resize(16 * 16);
  if (op.a) {
    for (uint32_t l = 0; l < kWarpSize; ++l) {
      const auto& o = *static_cast<const wgmma_operands*>(c.lane[l].in);
      r.a_regs[l] = o.a;
      for (int i = 0; i < 4; ++i) r.a_issue[l][i] = o.a[i];
      for (int i = 0; i < 8; ++i) {
        const layout::coord e = layout::wgmma_a(rank, int(l), i);
        r.a[(e.row - 16 * rank) * 16 + e.col] = uint16_t(o.a[i / 2] >> (16 * (i % 2)));
      }
    }
  } else {
    read_operand(w, lane0, op.desc_a, op.trans_a, 16 * rank, 16, r.a.data(), "A", c.file, c.line,
                 true);
  }
  r.b.resize(size_t(n) * 16);
  read_operand(w, lane0, op.desc_b, op.trans_b, 0, n, r.b.data(), "B", c.file, c.line, true);
  r.d_issue.resize(size_t(kWarpSize) * (n / 2));
  for (uint32_t l = 0; l < kWarpSize; ++l) {
    r.d[l] = static_cast<float*>(c.lane[l].out);
    std::memcpy(&r.d_issue[l * (n / 2)], r.d[l], sizeof(float) * size_t(n / 2));
  }
  ws.wgmma_ops.push_back(std::move(r));
}

void complete_wgmma(warp_state& ws, uint32_t wi, collective& c) {
  switch (c.kind) {
    case coll_kind::wgmma: issue_wgmma(ws, wi, c); return;
    case coll_kind::wgmma_fence: ws.wgmma_fenced = true; return;
    case coll_kind::wgmma_commit: ++ws.wgmma_open_group; return;
    default: break;
  }
  // wgmma_wait_group<N>: the ops of groups older than the N newest committed ones.
  worker& w = this_worker();
  thread_state& lane0 = w.threads[wi * kWarpSize];
  const uint32_t keep = c.mode;
  const uint32_t done_below = ws.wgmma_open_group > keep ? ws.wgmma_open_group - keep : 0;
  const int rank = int(wi & 3u);
  size_t count = 0;
  while (count < ws.wgmma_ops.size() && ws.wgmma_ops[count].group < done_below) ++count;
  const std::string where = " (waited for at " + site(c.file, c.line) + ")";
  // Every operand must be as it was at issue.
  for (size_t j = 0; j < count; ++j) {
    const wgmma_op& r = ws.wgmma_ops[j];
    const std::string what = "wgmma issued at " + site(r.file, r.line);
    const int n = r.op.n;
    for (uint32_t l = 0; l < kWarpSize; ++l) {
      if (std::memcmp(&r.d_issue[l * (n / 2)], r.d[l], sizeof(float) * size_t(n / 2)) != 0)
        fail("wgmma operand changed in flight",
             what + ": lane " + std::to_string(l) +
                 "'s accumulator registers changed while the op was in flight" + where,
             &w.threads[wi * kWarpSize + l]);
      if (r.a_regs[l] && std::memcmp(r.a_issue[l], r.a_regs[l], sizeof r.a_issue[l]) != 0)
        fail("wgmma operand changed in flight",
             what + ": lane " + std::to_string(l) +
                 "'s A registers changed while the op was in flight" + where,
             &w.threads[wi * kWarpSize + l]);
    }
    std::vector<uint16_t> now(size_t(n) * 16);
    read_operand(w, lane0, r.op.desc_b, r.op.trans_b, 0, n, now.data(), "B", r.file, r.line, false);
    bool same = now == r.b;
    if (!r.a_regs[0]) {
      std::vector<uint16_t> a(16 * 16);
      read_operand(w, lane0, r.op.desc_a, r.op.trans_a, 16 * rank, 16, a.data(), "A", r.file,
                   r.line, false);
      same = same && a == r.a;
    }
    if (!same)
      fail("wgmma operand changed in flight",
           what + ": its shared-memory operand was overwritten while the op was in flight" + where,
           &lane0);
  }
  for (size_t j = 0; j < count; ++j) {
    wgmma_op& r = ws.wgmma_ops[j];
    const int n = r.op.n;
    const bool bf16 = r.op.bf16;
    for (uint32_t l = 0; l < kWarpSize; ++l)
      for (int i = 0; i < n / 2; ++i) {
        const layout::coord e = layout::wgmma_d(rank, int(l), i);
        double s = 0.0;
        for (int k = 0; k < 16; ++k)
          s +=
              element(r.a[(e.row - 16 * rank) * 16 + k], bf16) * element(r.b[e.col * 16 + k], bf16);
        r.d[l][i] = float(s + (r.op.accumulate ? double(r.d[l][i]) : 0.0));
      }
    wgmma_done.fetch_add(1, std::memory_order_relaxed);
    // A later op in flight on the same registers accumulates onto this result.
    for (size_t k = j + 1; k < ws.wgmma_ops.size(); ++k)
      for (uint32_t l = 0; l < kWarpSize; ++l)
        if (ws.wgmma_ops[k].d[l] == r.d[l] && ws.wgmma_ops[k].op.n == n)
          std::memcpy(&ws.wgmma_ops[k].d_issue[l * (n / 2)], r.d[l], sizeof(float) * size_t(n / 2));
  }
  ws.wgmma_ops.erase(ws.wgmma_ops.begin(), ws.wgmma_ops.begin() + std::ptrdiff_t(count));
  ws.wgmma_fenced = false;
}

void wgmma(const wgmma_operands& op, float* d, const char* file, int line) {
  const uint8_t mode = uint8_t((op.bf16 ? 1 : 0) | (op.a ? 2 : 0) | (op.trans_a ? 4 : 0) |
                               (op.trans_b ? 8 : 0) | (op.n / 16) << 4);
  collective_arrive(coll_kind::wgmma, mode, 0xffffffffu, lane_args{0, 0, &op, d}, file, line);
}

void wgmma_fence(const char* file, int line) {
  collective_arrive(coll_kind::wgmma_fence, 0, 0xffffffffu, lane_args{}, file, line);
}

void wgmma_commit_group(const char* file, int line) {
  collective_arrive(coll_kind::wgmma_commit, 0, 0xffffffffu, lane_args{}, file, line);
}

void wgmma_wait_group(int n, const char* file, int line) {
  collective_arrive(coll_kind::wgmma_wait, uint8_t(n), 0xffffffffu, lane_args{}, file, line);
}

}  // namespace tokenmix::simt::emu
