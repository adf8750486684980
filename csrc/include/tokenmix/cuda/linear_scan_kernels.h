// Chunked linear-attention scans on CUDA (plain, scalar decay, per-key gates), on the SIMT layer:
// the algorithm of the CPU kernels (tokenmix/cpu/linear_scan_engine.h), inputs read as float32
// and outputs rounded once; the matrix products are warp products (scan_tiles.h: tf32 tensor
// cores for fp16/bf16 inputs, float32 FMAs for float32).
//
// One block is one (sequence, head, block of kScanValues value columns); it carries its slice of
// the state S [K x kScanValues] in shared memory from chunk to chunk. A chunk of kScanChunk
// tokens is read in slices of kScanKeys key columns: per slice, the decay factors of each key
// (qfac = 2^{sum_{t<=i} lg_t}, kfac = 2^{sum_{t>j} lg_t}, each a sum over its own range), that
// slice's share of the intra scores A, of the output's state term (q qfac) S and the update of
// the slice's state rows. Then A is masked (and, for scalar decays, multiplied by 2^{D_ij} with
// D_ij = sum_{j<t<=i} lg_t running down each column) and o += A v over j <= i only, so an inf or
// NaN at token t reaches no output before t.
//
// Per-key gates keep the factor inside the sum over keys: A_ij = sum_d q_id k_jd 2^{D_ij,d}. The
// chunk is cut into sub-chunks of kScanSub tokens. For row i in sub-chunk I and key j in an
// earlier sub-chunk J, D_ij splits at the sub-chunk boundaries into three sums over their own
// ranges: tokens of I up to i (qsub_i), tokens of J after j (ksub_j) and the whole sub-chunks in
// between (span(J + 1, I)). So A_ij = sum_d (q_id qsub_id) (k_jd ksub_jd span_d): a matrix
// product on tensor cores, with no difference of cumulative sums, so resets stay exact. Only
// the diagonal sub-chunk blocks (j and i in one sub-chunk) keep one running sum per (j, key) on
// FMAs. The backward's dq and dk split the same way.
//
// Backward, per block and in reverse over chunks: the chunk-start states come from a states-only
// forward pass (scan_forward_kernel with `states_only`) stored in a workspace. dA = dO v^T is the
// block's share over its value columns; dq and dk, linear in dA and in the state terms, are
// written as per-value-block shares and summed in a fixed order by scan_reduce_kernel, which also
// forms the decay gradient's per-token terms q.dq - k.dk; scan_decay_grad_kernel reverse-cumulates
// them over each sequence. dv and the initial state's gradient are complete per block. No
// atomics: every sum runs in a fixed order.
#pragma once

#include <cmath>
#include <cstdint>

#include "tokenmix/cuda/grid_stride.h"
#include "tokenmix/cuda/scan_layout.h"
#include "tokenmix/cuda/scan_tiles.h"
#include "tokenmix/cuda/warp_gemm.h"
#include "tokenmix/scan_chunk_math.h"

namespace tokenmix::cuda {

inline constexpr float kScanLog2e = 1.4426950408889634f;

enum ScanDecay : int { kScanNoDecay = 0, kScanScalarDecay = 1, kScanPerKeyDecay = 2 };

struct ScanParams {
  int64_t batch, seq_len, heads, key_dim, value_dim, num_seqs;
  int64_t key_pad;            // key_dim rounded up to kScanKeys
  int64_t value_blocks;       // ceil(value_dim / kScanValues)
  const int64_t* cu_seqlens;  // [num_seqs + 1] on the device, or null
  float scale;
  const void *q, *k, *v;  // [B, T, H, D] in the input dtype, unit feature stride
  int64_t q_stride[3], k_stride[3], v_stride[3];
  const float* g;              // [B, T, H] scalar log decays, or null
  const float* gk;             // [B, T, H, K] per-key log decays, or null
  const float* initial_state;  // [N, H, K, V] or null
  void* out;                   // contiguous [B, T, H, V]
  float* final_state;          // [N, H, K, V] or null
  // Backward.
  bool states_only;      // forward pass that only stores the chunk-start states
  float* states;         // [slots, H, value_blocks, key_pad, kScanValues] (scan_state_slot)
  const void* grad_out;  // contiguous [B, T, H, V]
  int64_t grad_out_stride[3];
  const float* grad_final_state;  // [N, H, K, V] or null
  float* dq_part;                 // [value_blocks, B, T, H, K] shares of dq (scaled-q units)
  float* dk_part;                 // [value_blocks, B, T, H, K]
  float* dg_final_part;           // [value_blocks, N, H, K]: the final state's dL/dG shares
  // The delta rule: beta and its gradient [B, T, H]; each value block's shares of every
  // token's dL/dG and dL/dbeta [value_blocks, B, T, H].
  const float* beta;
  float* grad_beta;
  float *dg_part, *dbeta_part;
  void *grad_q, *grad_k, *grad_v;  // contiguous, input dtype
  float* grad_g;                   // like g
  float* grad_gk;                  // like gk
  float* grad_initial_state;       // [N, H, K, V]
};

// Sequence n: its batch entry and token range.
TM_DEVICE void scan_sequence(const ScanParams& p, int64_t n, int64_t* b, int64_t* begin,
                             int64_t* end) {
  if (p.cu_seqlens) {
    const global_ptr<const int64_t> cu(p.cu_seqlens);
    *b = 0;
    *begin = cu[n];
    *end = cu[n + 1];
  } else {
    *b = n;
    *begin = 0;
    *end = p.seq_len;
  }
}

// The block's shared memory, as swizzled matrices (scan_tiles.h).
struct ScanSmem {
  ScanMat S;   // [key_pad x BV]: the state (forward) or dL/dS (backward)
  ScanMat v;   // [C x BV]
  ScanMat A;   // [C x C]
  ScanMat q;   // [C x BK] scaled q of the slice
  ScanMat k;   // [C x BK]
  ScanMat lg;  // [C x BK] log2 decays per key (per-key gates)
  // [C x BK] decay factors 2^{sum_{t<=i} lg_t} and 2^{sum_{j<t<C} lg_t}; with per-key gates the
  // sums stop at the token's sub-chunk (qsub, ksub) and chunk_qfac / chunk_kfac add `span`.
  ScanMat qfac;
  ScanMat kfac;
  ScanMat sp;               // backward: [BK x BV] the chunk-start state's slice
  ScanMat dO;               // backward: [C x BV]
  ScanMat dA;               // backward: [C x C]
  shared_ptr<float> decay;  // [BK] 2^{sum over the chunk}
  shared_ptr<float> gl;     // [C] log2 scalar decays
  shared_ptr<float> span;   // [kScanSpans x BK] per-key gates: sub_span's factors
};

TM_DEVICE ScanSmem scan_smem(int64_t key_pad, bool backward) {
  constexpr int C = kScanChunk, BK = kScanKeys, BV = kScanValues;
  SmemCarver m;
  ScanSmem s;
  s.S = m.matrix(key_pad, BV);
  s.v = m.matrix(C, BV);
  s.A = m.matrix(C, C);
  s.q = m.matrix(C, BK);
  s.k = m.matrix(C, BK);
  s.lg = m.matrix(C, BK);
  s.qfac = m.matrix(C, BK);
  s.kfac = m.matrix(C, BK);
  s.decay = m.array(BK);
  s.gl = m.array(C);
  s.span = m.array(kScanSpans * BK);
  if (backward) {
    s.sp = m.matrix(BK, BV);
    s.dO = m.matrix(C, BV);
    s.dA = m.matrix(C, C);
  }
  return s;
}

// Per-key gates: 2^{sum of the log2 decays of sub-chunks a .. b - 1} for key dd of the slice, 1
// for an empty run (a >= b). Runs are numbered row by row of the a < b triangle.
TM_DEVICE int scan_span_index(int a, int b) {
  return a * kScanSubChunks - a * (a - 1) / 2 + (b - a - 1);
}
TM_DEVICE float sub_span(const ScanSmem& s, int a, int b, int dd) {
  return a >= b ? 1.0f : float(s.span[scan_span_index(a, b) * kScanKeys + dd]);
}

// The chunk's decay factors of token i for key dd of the slice: 2^{sum_{t<=i} lg_t} for q and
// 2^{sum_{i<t<C} lg_t} for k. Per-key gates store them per sub-chunk (ScanSmem::qfac).
template <int kDecay>
TM_DEVICE float chunk_qfac(const ScanSmem& s, int i, int dd) {
  if constexpr (kDecay == kScanPerKeyDecay)
    return s.qfac(i, dd) * sub_span(s, 0, i / kScanSub, dd);
  else
    return s.qfac(i, dd);
}
template <int kDecay>
TM_DEVICE float chunk_kfac(const ScanSmem& s, int j, int dd) {
  if constexpr (kDecay == kScanPerKeyDecay)
    return s.kfac(j, dd) * sub_span(s, j / kScanSub + 1, kScanSubChunks, dd);
  else
    return s.kfac(j, dd);
}

template <class E>
TM_DEVICE float scan_read(const void* base, const int64_t* stride, int64_t b, int64_t t, int64_t h,
                          int64_t d) {
  const global_ptr<const typename E::T> src(static_cast<const typename E::T*>(base));
  return E::to_float(src[b * stride[0] + t * stride[1] + h * stride[2] + d]);
}

// Rows [t0, t0 + c) of a [B, T, H, V] tensor's value block into dst [C x BV], zeros elsewhere.
template <class E, bool kSw>
TM_DEVICE void scan_load_values(const ScanParams& p, const void* base, const int64_t* stride,
                                SmemMat<kSw> dst, int64_t b, int64_t h, int64_t t0, int c,
                                int64_t e_base) {
  constexpr int BV = kScanValues;
  for (int x = int(thread_idx().x); x < kScanChunk * BV; x += kScanThreads) {
    const int j = x / BV, e = x % BV;
    dst.set(j, e,
            (j < c && e_base + e < p.value_dim)
                ? scan_read<E>(base, stride, b, t0 + j, h, e_base + e)
                : 0.0f);
  }
}

// The scalar log2 decays of the chunk (0 past c).
template <int kDecay>
TM_DEVICE void scan_load_scalar_decays(const ScanParams& p, const ScanSmem& s, int64_t b, int64_t h,
                                       int64_t t0, int c) {
  if constexpr (kDecay == kScanScalarDecay) {
    const global_ptr<const float> g(p.g);
    for (int i = int(thread_idx().x); i < kScanChunk; i += kScanThreads)
      s.gl[i] = i < c ? g[(b * p.seq_len + t0 + i) * p.heads + h] * kScanLog2e : 0.0f;
  }
}

// Key columns [d0, d0 + BK) of the chunk's q (scaled), k and per-key log2 decays, then every
// factor of the slice: qfac (0 past c), kfac (0 past c) and the chunk's decay per key; per-key
// gates take qfac and kfac per sub-chunk and add the spans. Ends with a barrier.
template <class E, int kDecay>
TM_DEVICE void scan_load_slice(const ScanParams& p, const ScanSmem& s, int64_t b, int64_t h,
                               int64_t t0, int c, int64_t d0) {
  constexpr int C = kScanChunk, BK = kScanKeys;
  const int tid = int(thread_idx().x);
  for (int x = tid; x < C * BK; x += kScanThreads) {
    const int i = x / BK, dd = x % BK;
    const int64_t d = d0 + dd;
    const bool in = i < c && d < p.key_dim;
    s.q.set(i, dd, in ? scan_read<E>(p.q, p.q_stride, b, t0 + i, h, d) * p.scale : 0.0f);
    s.k.set(i, dd, in ? scan_read<E>(p.k, p.k_stride, b, t0 + i, h, d) : 0.0f);
    if constexpr (kDecay == kScanPerKeyDecay) {
      const global_ptr<const float> gk(p.gk);
      s.lg.set(
          i, dd,
          in ? gk[((b * p.seq_len + t0 + i) * p.heads + h) * p.key_dim + d] * kScanLog2e : 0.0f);
    } else if constexpr (kDecay == kScanScalarDecay) {
      s.lg.set(i, dd, s.gl[i]);  // 0 past c already
    }
  }
  sync_threads();
  if constexpr (kDecay == kScanNoDecay) {
    for (int x = tid; x < C * BK; x += kScanThreads) {
      s.qfac.set(x / BK, x % BK, 1.0f);
      s.kfac.set(x / BK, x % BK, 1.0f);
    }
    for (int x = tid; x < BK; x += kScanThreads) s.decay[x] = 1.0f;
  } else if (kDecay == kScanPerKeyDecay) {
    // Every thread one (factor, sub-chunk u, key): u's prefix (qsub) or suffix (ksub) factors
    // over its 16 tokens (tokenmix/scan_chunk_math.h, shared with the CPU). The prefix threads
    // also leave u's log2 sum in the span row of u alone, (u, u + 1); after a barrier one
    // thread per key reads those four sums and writes every span over them.
    static_assert(2 * kScanSubChunks * BK == kScanThreads, "a thread per (factor, sub-chunk, key)");
    const int dd = tid % BK, at = (tid / BK) % kScanSubChunks * kScanSub;
    const auto lg = [&](int i) { return s.lg(at + i, dd); };
    const auto exp2 = [](float x) { return exp2f(x); };
    if (tid < kScanThreads / 2) {
      chunk_prefix_decays<float>(
          kScanSub, c - at, lg, [&](int i, float f) { s.qfac.set(at + i, dd, f); }, exp2);
      float sum = 0.0f;
      for (int i = 0; i < kScanSub; ++i) sum += lg(i);
      const int u = at / kScanSub;
      s.span[scan_span_index(u, u + 1) * BK + dd] = sum;
    } else {
      chunk_suffix_decays<float>(
          kScanSub, c - at, lg, [&](int j, float f) { s.kfac.set(at + j, dd, f); }, exp2);
    }
    sync_threads();
    if (tid < BK) {
      float sub[kScanSubChunks];
      for (int u = 0; u < kScanSubChunks; ++u) sub[u] = s.span[scan_span_index(u, u + 1) * BK + dd];
      for (int a = 0; a < kScanSubChunks; ++a) {
        float sum = 0.0f;
        for (int b = a + 1; b <= kScanSubChunks; ++b) {
          sum += sub[b - 1];
          s.span[scan_span_index(a, b) * BK + dd] = exp2f(sum);
        }
      }
      s.decay[dd] =
          d0 + dd < p.key_dim ? float(s.span[scan_span_index(0, kScanSubChunks) * BK + dd]) : 0.0f;
    }
  } else if (tid < 2 * BK) {
    // One thread per key for each factor (tokenmix/scan_chunk_math.h, shared with the CPU).
    const int dd = tid % BK;
    const auto lg = [&](int i) { return s.lg(i, dd); };
    const auto exp2 = [](float x) { return exp2f(x); };
    if (tid < BK) {
      const float total =
          chunk_prefix_decays<float>(C, c, lg, [&](int i, float f) { s.qfac.set(i, dd, f); }, exp2);
      s.decay[dd] = d0 + dd < p.key_dim ? total : 0.0f;
    } else {
      chunk_suffix_decays<float>(C, c, lg, [&](int j, float f) { s.kfac.set(j, dd, f); }, exp2);
    }
  }
  sync_threads();
}

// Per-key gates, the slice's share of the intra scores inside the diagonal sub-chunk blocks,
// added to A (j <= i < c, i and j in one sub-chunk): A_ij += sum_d q_id k_jd 2^{D_ij,d}. Thread
// (j = t / 4, g = t % 4) runs down column j to the end of its sub-chunk with one running sum per
// key of its group of 8; the quad's 4 groups are added by shuffles in a fixed order. (The factor
// is inside the sum over keys, so this is not a matrix product.)
TM_DEVICE void scan_gated_scores_diagonal(const ScanSmem& s, int c) {
  constexpr int BK = kScanKeys, G = BK / 4;
  const int tid = int(thread_idx().x), j = tid / 4, g = tid % 4;
  const int first = (tid / 32) * 8;                // the warp's smallest column
  const int last = (j / kScanSub + 1) * kScanSub;  // the end of the warp's sub-chunk
  float kj[G], run[G];
#pragma unroll
  for (int u = 0; u < G; ++u) {
    kj[u] = s.k(j, g * G + u);
    run[u] = 0.0f;
  }
  for (int i = first; i < (c < last ? c : last); ++i) {
    float acc = 0.0f;
#pragma unroll
    for (int u = 0; u < G; ++u) {
      if (i > j) run[u] += s.lg(i, g * G + u);
      acc += s.q(i, g * G + u) * kj[u] * exp2f(run[u]);
    }
    acc += shfl_xor_sync(0xffffffffu, acc, 1);
    acc += shfl_xor_sync(0xffffffffu, acc, 2);
    if (g == 0 && i >= j) s.A.set(i, j, s.A(i, j) + acc);
  }
}

// Masks M [C x C] in place: 0 above the diagonal and in rows >= c; for scalar decays the kept
// entries are multiplied by 2^{D_ij}, D_ij = sum_{j<t<=i} lg_t summed down column j. Masked
// entries are assigned, never multiplied.
template <int kDecay>
TM_DEVICE void scan_mask(const ScanSmem& s, ScanMat M, int c) {
  const int j = int(thread_idx().x);
  if (j < kScanChunk) {
    float run = 0.0f;
    for (int i = 0; i < kScanChunk; ++i) {
      if (i < j || i >= c) {
        M.set(i, j, 0.0f);
      } else if constexpr (kDecay == kScanScalarDecay) {
        if (i > j) run += float(s.gl[i]);
        M.set(i, j, M(i, j) * exp2f(run));
      }
    }
  }
  sync_threads();
}

// S[d0 + dd, :] = decay(dd) S[d0 + dd, :] + the products `add` accumulates, for the slice's BK
// rows: warp w owns rows 16 (w / 4) .. +16 and columns 8 (w % 4) .. +8 of the slice, and
// add(acc, m0, n0) adds its products to that [16 x 8] tile. The forward's state update
// (k kfac)^T v, the backward's dS update (q qfac)^T dO, and the delta rule's.
template <class DecayFn, class AddFn>
TM_DEVICE void scan_advance_tiles(ScanMat S, int d0, DecayFn decay, AddFn add) {
  const int w = int(warp_id()), m0 = 16 * (w / 4), n0 = 8 * (w % 4);
  const FragLane f = frag_lane();
  float acc[1][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = m0 + frag_row(f, i);
    acc[0][i] = decay(r) * S(d0 + r, n0 + frag_col(f, 0, i));
  }
  add(acc, m0, n0);
  frag_store(acc, S, d0 + m0, n0);
}

// The linear scans' update: S = decay S + (a fac)^T x over the chunk's tokens, fac(j, dd) the
// decay factor of token j and key dd.
template <bool kTensor, class FacFn>
TM_DEVICE void scan_advance_slice(const ScanSmem& s, ScanMat a, FacFn fac, ScanMat x, int d0,
                                  int c) {
  scan_advance_tiles(
      s.S, d0, [&](int dd) { return float(s.decay[dd]); },
      [&](float (&acc)[1][4], int m0, int n0) {
        warp_product<kTensor, 1>(
            acc, 0, scan_token_end<kTensor>(c),
            [&](int r, int j) { return a(j, m0 + r) * fac(j, m0 + r); },
            [&](int j, int e) { return x(j, n0 + e); });
      });
}

// The block's state slice <-> an [N, H, K, V] tensor (zeros for a missing source).
template <bool kSw>
TM_DEVICE void scan_load_state(const ScanParams& p, SmemMat<kSw> S, const float* src, int64_t n,
                               int64_t h, int64_t e_base) {
  constexpr int BV = kScanValues;
  const global_ptr<const float> in(src);
  for (int64_t x = thread_idx().x; x < p.key_pad * BV; x += kScanThreads) {
    const int64_t d = x / BV, e = e_base + x % BV;
    S.set(int(d), int(x % BV),
          (src && d < p.key_dim && e < p.value_dim)
              ? float(in[((n * p.heads + h) * p.key_dim + d) * p.value_dim + e])
              : 0.0f);
  }
}
template <bool kSw>
TM_DEVICE void scan_store_state(const ScanParams& p, SmemMat<kSw> S, float* dst, int64_t n,
                                int64_t h, int64_t e_base) {
  constexpr int BV = kScanValues;
  const global_ptr<float> out(dst);
  for (int64_t x = thread_idx().x; x < p.key_pad * BV; x += kScanThreads) {
    const int64_t d = x / BV, e = e_base + x % BV;
    if (d < p.key_dim && e < p.value_dim)
      out[((n * p.heads + h) * p.key_dim + d) * p.value_dim + e] = S(int(d), int(x % BV));
  }
}

// The states workspace's slice for (slot, h, value block): [key_pad x BV], unswizzled.
TM_DEVICE global_ptr<float> scan_state_at(const ScanParams& p, int64_t slot, int64_t h,
                                          int64_t vb) {
  return global_ptr<float>(p.states) +
         ((slot * p.heads + h) * p.value_blocks + vb) * p.key_pad * kScanValues;
}

struct ScanBlock {
  int64_t n, h, vb, b, begin, end, e_base;
};
TM_DEVICE ScanBlock scan_block(const ScanParams& p) {
  ScanBlock k;
  const int64_t id = block_idx().x;
  k.vb = id % p.value_blocks;
  k.h = (id / p.value_blocks) % p.heads;
  k.n = id / (p.value_blocks * p.heads);
  scan_sequence(p, k.n, &k.b, &k.begin, &k.end);
  k.e_base = k.vb * kScanValues;
  return k;
}

// The block's state slice into its slot of the states workspace.
template <bool kSw>
TM_DEVICE void scan_store_slot(const ScanParams& p, SmemMat<kSw> S, int64_t slot,
                               const ScanBlock& blk) {
  const global_ptr<float> dst = scan_state_at(p, slot, blk.h, blk.vb);
  for (int64_t x = thread_idx().x; x < p.key_pad * kScanValues; x += kScanThreads)
    dst[x] = S(int(x / kScanValues), int(x % kScanValues));
}

// A warp's [16 x 16] tile at (m0, n0) of the chunk's [C x BV] values (rows t0 + m0 ..) into a
// contiguous [B, T, H, V] tensor of the input dtype: rows past c and columns past V not stored.
template <class E>
TM_DEVICE void scan_store_value_tile(const ScanParams& p, void* dst, const ScanBlock& blk,
                                     int64_t t0, int c, int m0, int n0, const float (&acc)[2][4]) {
  const global_ptr<typename E::T> out(static_cast<typename E::T*>(dst));
  const FragLane f = frag_lane();
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = m0 + frag_row(f, i);
      const int64_t e = blk.e_base + n0 + frag_col(f, n, i);
      if (r < c && e < p.value_dim)
        out[((blk.b * p.seq_len + t0 + r) * p.heads + blk.h) * p.value_dim + e] =
            E::from_float(acc[n][i]);
    }
}

// The walk over the block's chunks shared by the forward kernels: the initial state into S, then
// body(t0, c) per chunk of c tokens from t0, where a states-only pass first stores the
// chunk-start state in its slot of the workspace; at the end the final state goes to its slot
// (states-only) or to final_state.
template <class Body>
TM_DEVICE void scan_forward_chunks(const ScanParams& p, const ScanBlock& blk, ScanMat S,
                                   Body body) {
  const int64_t base = scan_state_base(p.seq_len, blk.n, blk.begin, p.cu_seqlens != nullptr);
  scan_load_state(p, S, p.initial_state, blk.n, blk.h, blk.e_base);
  sync_threads();
  int64_t ci = 0;
  for (int64_t t0 = blk.begin; t0 < blk.end; t0 += kScanChunk, ++ci) {
    if (p.states_only) scan_store_slot(p, S, base + ci, blk);
    body(t0, int(blk.end - t0 < kScanChunk ? blk.end - t0 : kScanChunk));
  }
  if (p.states_only) {
    scan_store_slot(p, S, base + ci, blk);
  } else if (p.final_state) {
    scan_store_state(p, S, p.final_state, blk.n, blk.h, blk.e_base);
  }
}

// The backward kernels' walk, in reverse: dL/dS into S from grad_final_state, at_end(slot) with
// the workspace slot of the final state, then body(slot, t0, c) per chunk with the slot of its
// chunk-start state, and dL/dS into grad_initial_state.
template <class AtEnd, class Body>
TM_DEVICE void scan_backward_chunks(const ScanParams& p, const ScanBlock& blk, ScanMat S,
                                    AtEnd at_end, Body body) {
  const int64_t base = scan_state_base(p.seq_len, blk.n, blk.begin, p.cu_seqlens != nullptr);
  const int64_t chunks = scan_chunks(blk.end - blk.begin);
  scan_load_state(p, S, p.grad_final_state, blk.n, blk.h, blk.e_base);
  sync_threads();
  at_end(base + chunks);
  for (int64_t ci = chunks - 1; ci >= 0; --ci) {
    const int64_t t0 = blk.begin + ci * kScanChunk;
    body(base + ci, t0, int(blk.end - t0 < kScanChunk ? blk.end - t0 : kScanChunk));
  }
  scan_store_state(p, S, p.grad_initial_state, blk.n, blk.h, blk.e_base);
}

// Warp tiles of the chunk's products (8 warps): the C x C scores as 4 x 2 tiles of 16 x 32; the
// C x 32 outputs (o, dv, and the dq / dk slices) as 4 x 2 tiles of 16 x 16.
static_assert(kScanThreads == 256 && kScanChunk == 64 && kScanKeys == 32 && kScanValues == 32,
              "scan_warp_tiles and scan_advance_tiles split these shapes over 8 warps");
struct ScanWarpTiles {
  int sm0, sn0;  // scores
  int om0, on0;  // outputs
};
TM_DEVICE ScanWarpTiles scan_warp_tiles() {
  const int w = int(warp_id());
  return {16 * (w / 2), 32 * (w % 2), 16 * (w / 2), 16 * (w % 2)};
}

// acc (the warp's score tile) += a b^T over the slice's n columns, a and b [C x n]. Tiles wholly
// above the diagonal are skipped (the mask assigns them 0).
template <bool kTensor>
TM_DEVICE void scan_scores_nt(const ScanWarpTiles& wt, ScanMat a, ScanMat b, int n,
                              float (&acc)[4][4]) {
  if (wt.sn0 > wt.sm0 + 15) return;
  warp_product<kTensor, 4>(
      acc, 0, n, [&](int r, int d) { return a(wt.sm0 + r, d); },
      [&](int d, int j) { return b(wt.sn0 + j, d); });
}

// Per-key gates, the slice's share of the warp's score tile below the diagonal sub-chunk blocks
// (rows in sub-chunk I, keys in an earlier J): acc[h] += (q qsub) (k ksub span(J + 1, I))^T for
// each 16-key half h of the tile with J < I; the others are left alone.
template <bool kTensor>
TM_DEVICE void scan_gated_scores_below(const ScanSmem& s, const ScanWarpTiles& wt,
                                       float (&acc)[2][2][4]) {
  const int I = wt.sm0 / kScanSub;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int J = wt.sn0 / kScanSub + h;
    if (J >= I) continue;
    warp_product<kTensor, 2>(
        acc[h], 0, kScanKeys,
        [&](int r, int d) { return s.q(wt.sm0 + r, d) * s.qfac(wt.sm0 + r, d); },
        [&](int d, int j) {
          const int key = J * kScanSub + j;
          return s.k(key, d) * s.kfac(key, d) * sub_span(s, J + 1, I, d);
        });
  }
}

// Stores the halves of the score tile that scan_gated_scores_below computed.
TM_DEVICE void scan_gated_scores_store(const ScanSmem& s, const ScanWarpTiles& wt,
                                       const float (&acc)[2][2][4]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int J = wt.sn0 / kScanSub + h;
    if (J < wt.sm0 / kScanSub) frag_store(acc[h], s.A, wt.sm0, J * kScanSub);
  }
}

template <class E, int kDecay>
TM_DEVICE void scan_forward_body(const ScanParams& p) {
  constexpr int C = kScanChunk, BK = kScanKeys;
  constexpr bool kTC = E::kTensorCore;
  const ScanBlock blk = scan_block(p);
  const ScanSmem s = scan_smem(p.key_pad, false);
  const ScanWarpTiles wt = scan_warp_tiles();
  const int tid = int(thread_idx().x);
  scan_forward_chunks(p, blk, s.S, [&](int64_t t0, int c) {
    scan_load_values<E>(p, p.v, p.v_stride, s.v, blk.b, blk.h, t0, c, blk.e_base);
    scan_load_scalar_decays<kDecay>(p, s, blk.b, blk.h, t0, c);
    if (kDecay == kScanPerKeyDecay && !p.states_only)
      for (int x = tid; x < C * C; x += kScanThreads) s.A.set(x / C, x % C, 0.0f);
    float a_acc[4][4] = {}, o_acc[2][4] = {};
    float below[2][2][4] = {};  // per-key gates: the score tile's 16-key halves
    sync_threads();
    for (int d0 = 0; d0 < int(p.key_pad); d0 += BK) {
      scan_load_slice<E, kDecay>(p, s, blk.b, blk.h, t0, c, d0);
      if (!p.states_only) {
        if constexpr (kDecay == kScanPerKeyDecay) {
          scan_gated_scores_diagonal(s, c);
          scan_gated_scores_below<kTC>(s, wt, below);
        } else {
          scan_scores_nt<kTC>(wt, s.q, s.k, BK, a_acc);
        }
        // The output's state term: (q qfac) S[d0 .., :].
        warp_product<kTC, 2>(
            o_acc, 0, BK,
            [&](int r, int d) { return s.q(wt.om0 + r, d) * chunk_qfac<kDecay>(s, wt.om0 + r, d); },
            [&](int d, int e) { return s.S(d0 + d, wt.on0 + e); });
      }
      sync_threads();
      scan_advance_slice<kTC>(
          s, s.k, [&](int j, int dd) { return chunk_kfac<kDecay>(s, j, dd); }, s.v, d0, c);
      sync_threads();
    }
    if (p.states_only) return;
    if constexpr (kDecay == kScanPerKeyDecay)
      scan_gated_scores_store(s, wt, below);
    else
      frag_store(a_acc, s.A, wt.sm0, wt.sn0);
    sync_threads();
    scan_mask<kDecay>(s, s.A, c);
    // o += A v over j <= i, then the rows are stored.
    warp_product_lower<kTC, 2>(
        o_acc, wt.om0, c, [&](int r, int j) { return s.A(wt.om0 + r, j); },
        [&](int j, int e) { return s.v(j, wt.on0 + e); });
    scan_store_value_tile<E>(p, p.out, blk, t0, c, wt.om0, wt.on0, o_acc);
    sync_threads();
  });
}

// Per-key gates' share of dq (kUpper false) or dk (true) for the warp's [16 x 16] slice tile,
// whose rows lie in sub-chunk I: dq_id += sum_{j<=i} dA_ij k_jd 2^{D_ij,d} and
// dk_jd += sum_{i>=j} dA_ij q_id 2^{D_ij,d}. The tokens of other sub-chunks are a product, with
// D split as in the forward: dq += qsub (dA (k ksub span(J + 1, I))), dk += ksub (dA^T (q qsub
// span(I + 1, J))), J the other token's sub-chunk. The tokens of sub-chunk I run on FMAs, each
// element with its own decay sum from the diagonal.
template <bool kTensor, bool kUpper>
TM_DEVICE void scan_gated_grad(const ScanSmem& s, const ScanWarpTiles& wt, int c,
                               float (&acc)[2][4]) {
  const FragLane f = frag_lane();
  const int I = wt.om0 / kScanSub, first = I * kScanSub, last = first + kScanSub;
  float other[2][4] = {};
  if constexpr (kUpper) {
    const int end = scan_token_end<kTensor>(c);
    if (last < end)
      warp_product<kTensor, 2>(
          other, last, end, [&](int r, int t) { return s.dA(t, wt.om0 + r); },
          [&](int t, int d) {
            const int dd = wt.on0 + d;
            return s.q(t, dd) * s.qfac(t, dd) * sub_span(s, I + 1, t / kScanSub, dd);
          });
  } else if (I > 0) {
    warp_product<kTensor, 2>(
        other, 0, first, [&](int r, int t) { return s.dA(wt.om0 + r, t); },
        [&](int t, int d) {
          const int dd = wt.on0 + d;
          return s.k(t, dd) * s.kfac(t, dd) * sub_span(s, t / kScanSub + 1, I, dd);
        });
  }
  const ScanMat x = kUpper ? s.q : s.k, fac = kUpper ? s.kfac : s.qfac;
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = wt.om0 + frag_row(f, i), d = wt.on0 + frag_col(f, n, i);
      if (r >= c) continue;
      float run = 0.0f, sum = fac(r, d) * other[n][i];
      if constexpr (kUpper) {
        for (int t = r; t < (c < last ? c : last); ++t) {
          if (t > r) run += s.lg(t, d);
          sum += s.dA(t, r) * x(t, d) * exp2f(run);
        }
      } else {
        for (int t = r; t >= first; --t) {
          if (t < r) run += s.lg(t + 1, d);
          sum += s.dA(r, t) * x(t, d) * exp2f(run);
        }
      }
      acc[n][i] += sum;
    }
}

template <class E, int kDecay>
TM_DEVICE void scan_backward_body(const ScanParams& p) {
  constexpr int C = kScanChunk, BK = kScanKeys, BV = kScanValues;
  constexpr bool kTC = E::kTensorCore;
  const ScanBlock blk = scan_block(p);
  const ScanSmem s = scan_smem(p.key_pad, true);
  const ScanWarpTiles wt = scan_warp_tiles();
  const FragLane f = frag_lane();
  const int tid = int(thread_idx().x);
  const int64_t plane = p.batch * p.seq_len * p.heads * p.key_dim;
  const global_ptr<float> dq_out = global_ptr<float>(p.dq_part) + blk.vb * plane;
  const global_ptr<float> dk_out = global_ptr<float>(p.dk_part) + blk.vb * plane;
  // The final state's share of dL/dG at the last token: sum_e dS_de S_final,de.
  const auto final_share = [&](int64_t final_slot) {
    if (kDecay != kScanNoDecay && tid < p.key_dim) {
      const global_ptr<const float> fin = scan_state_at(p, final_slot, blk.h, blk.vb);
      float acc = 0.0f;
      for (int e = 0; e < BV; ++e) acc += s.S(tid, e) * float(fin[tid * BV + e]);
      global_ptr<float>(
          p.dg_final_part)[((blk.vb * p.num_seqs + blk.n) * p.heads + blk.h) * p.key_dim + tid] =
          acc;
    }
  };
  scan_backward_chunks(p, blk, s.S, final_share, [&](int64_t slot, int64_t t0, int c) {
    scan_load_values<E>(p, p.v, p.v_stride, s.v, blk.b, blk.h, t0, c, blk.e_base);
    scan_load_values<E>(p, p.grad_out, p.grad_out_stride, s.dO, blk.b, blk.h, t0, c, blk.e_base);
    scan_load_scalar_decays<kDecay>(p, s, blk.b, blk.h, t0, c);
    if (kDecay == kScanPerKeyDecay)
      for (int x = tid; x < C * C; x += kScanThreads) s.A.set(x / C, x % C, 0.0f);
    float a_acc[4][4] = {};
    float below[2][2][4] = {};  // per-key gates: the score tile's 16-key halves
    sync_threads();
    // Pass 1: the intra scores A over every key.
    for (int d0 = 0; d0 < int(p.key_pad); d0 += BK) {
      scan_load_slice<E, kDecay>(p, s, blk.b, blk.h, t0, c, d0);
      if constexpr (kDecay == kScanPerKeyDecay) {
        scan_gated_scores_diagonal(s, c);
        scan_gated_scores_below<kTC>(s, wt, below);
      } else {
        scan_scores_nt<kTC>(wt, s.q, s.k, BK, a_acc);
      }
      sync_threads();
    }
    if constexpr (kDecay == kScanPerKeyDecay)
      scan_gated_scores_store(s, wt, below);
    else
      frag_store(a_acc, s.A, wt.sm0, wt.sn0);
    // dA = dO v^T over the block's value columns.
    {
      float acc[4][4] = {};
      scan_scores_nt<kTC>(wt, s.dO, s.v, BV, acc);
      frag_store(acc, s.dA, wt.sm0, wt.sn0);
    }
    sync_threads();
    scan_mask<kDecay>(s, s.A, c);
    scan_mask<kDecay>(s, s.dA, c);
    // dv = A^T dO (i >= j) + (k kfac) dS; the warp's [16 x 16] tile of the chunk's [C x BV].
    float dv_acc[2][4] = {};
    warp_product_upper<kTC, 2>(
        dv_acc, wt.om0, c, [&](int r, int i) { return s.A(i, wt.om0 + r); },
        [&](int i, int e) { return s.dO(i, wt.on0 + e); });
    const global_ptr<const float> sp_src = scan_state_at(p, slot, blk.h, blk.vb);
    // Pass 2: per slice, dq and dk shares, dv's state term, then dS moves to the chunk start.
    for (int d0 = 0; d0 < int(p.key_pad); d0 += BK) {
      scan_load_slice<E, kDecay>(p, s, blk.b, blk.h, t0, c, d0);
      for (int x = tid; x < BK * BV; x += kScanThreads)
        s.sp.set(x / BV, x % BV, sp_src[d0 * BV + x]);
      sync_threads();
      // dq_i = qfac_i (dO_i S_prev^T) + sum_{j<=i} dA_ij k_j (2^{D_ij,d} with per-key gates);
      // dk_j = kfac_j (v_j dS^T) + sum_{i>=j} dA_ij q_i (likewise); the warp's [16 x 16] tile of
      // the slice's [C x BK].
      float dq[2][4] = {}, dk[2][4] = {};
      warp_product<kTC, 2>(
          dq, 0, BV, [&](int r, int e) { return s.dO(wt.om0 + r, e); },
          [&](int e, int d) { return s.sp(wt.on0 + d, e); });
      warp_product<kTC, 2>(
          dk, 0, BV, [&](int r, int e) { return s.v(wt.om0 + r, e); },
          [&](int e, int d) { return s.S(d0 + wt.on0 + d, e); });
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = wt.om0 + frag_row(f, i), d = wt.on0 + frag_col(f, n, i);
          dq[n][i] *= chunk_qfac<kDecay>(s, r, d);
          dk[n][i] *= chunk_kfac<kDecay>(s, r, d);
        }
      if constexpr (kDecay == kScanPerKeyDecay) {
        scan_gated_grad<kTC, false>(s, wt, c, dq);
        scan_gated_grad<kTC, true>(s, wt, c, dk);
      } else {
        warp_product_lower<kTC, 2>(
            dq, wt.om0, c, [&](int r, int j) { return s.dA(wt.om0 + r, j); },
            [&](int j, int d) { return s.k(j, wt.on0 + d); });
        warp_product_upper<kTC, 2>(
            dk, wt.om0, c, [&](int r, int i) { return s.dA(i, wt.om0 + r); },
            [&](int i, int d) { return s.q(i, wt.on0 + d); });
      }
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = wt.om0 + frag_row(f, i);
          const int64_t d = d0 + wt.on0 + frag_col(f, n, i);
          if (r < c && d < p.key_dim) {
            const int64_t at = ((blk.b * p.seq_len + t0 + r) * p.heads + blk.h) * p.key_dim + d;
            dq_out[at] = dq[n][i];
            dk_out[at] = dk[n][i];
          }
        }
      // dv's state term: (k kfac) dS[d0 .., :].
      warp_product<kTC, 2>(
          dv_acc, 0, BK,
          [&](int r, int d) { return s.k(wt.om0 + r, d) * chunk_kfac<kDecay>(s, wt.om0 + r, d); },
          [&](int d, int e) { return s.S(d0 + d, wt.on0 + e); });
      sync_threads();
      scan_advance_slice<kTC>(
          s, s.q, [&](int i, int dd) { return chunk_qfac<kDecay>(s, i, dd); }, s.dO, d0, c);
      sync_threads();
    }
    scan_store_value_tile<E>(p, p.grad_v, blk, t0, c, wt.om0, wt.on0, dv_acc);
    sync_threads();
  });
}

// dq and dk from their value-block shares, summed in block order; with decays, each token's
// dL/dG_i = q_i dq_i - k_i dk_i (per key) is left in dq_part's first plane.
template <class E>
TM_DEVICE void scan_reduce_body(const ScanParams& p, bool decay) {
  const int64_t plane = p.batch * p.seq_len * p.heads * p.key_dim;
  const global_ptr<float> dq_part(p.dq_part), dk_part(p.dk_part);
  const global_ptr<typename E::T> gq(static_cast<typename E::T*>(p.grad_q)),
      gk(static_cast<typename E::T*>(p.grad_k));
  for (int64_t x = grid_thread(); x < plane; x += grid_threads()) {
    float dq = 0.0f, dk = 0.0f;
    for (int64_t vb = 0; vb < p.value_blocks; ++vb) {
      dq += float(dq_part[vb * plane + x]);
      dk += float(dk_part[vb * plane + x]);
    }
    gq[x] = E::from_float(dq * p.scale);
    gk[x] = E::from_float(dk);
    if (decay) {
      const int64_t d = x % p.key_dim, bth = x / p.key_dim;
      const int64_t h = bth % p.heads, bt = bth / p.heads;
      const int64_t t = bt % p.seq_len, b = bt / p.seq_len;
      const float q = scan_read<E>(p.q, p.q_stride, b, t, h, d) * p.scale;
      const float k = scan_read<E>(p.k, p.k_stride, b, t, h, d);
      dq_part[x] = q * dq - k * dk;
    }
  }
}

// dg / dgk: each token's dL/dG (plus the final state's share at the last token) reverse-cumulated
// over its sequence. One warp per (sequence, head); with a scalar decay the keys are summed per
// token, lanes first and then by shuffles in a fixed order.
template <int kDecay>
TM_DEVICE void scan_decay_grad_body(const ScanParams& p) {
  const int64_t w = int64_t(block_idx().x) * (kScanThreads / 32) + warp_id();
  if (w >= p.num_seqs * p.heads) return;
  const int64_t n = w / p.heads, h = w % p.heads;
  const int lane = int(lane_id());
  int64_t b, begin, end;
  scan_sequence(p, n, &b, &begin, &end);
  const global_ptr<const float> tok(p.dq_part), fin(p.dg_final_part);
  auto final_share = [&](int64_t d) {
    float f = 0.0f;
    for (int64_t vb = 0; vb < p.value_blocks; ++vb)
      f += float(fin[((vb * p.num_seqs + n) * p.heads + h) * p.key_dim + d]);
    return f;
  };
  if constexpr (kDecay == kScanPerKeyDecay) {
    const global_ptr<float> out(p.grad_gk);
    for (int64_t d = lane; d < p.key_dim; d += 32) {
      float acc = final_share(d);
      for (int64_t t = end - 1; t >= begin; --t) {
        const int64_t at = ((b * p.seq_len + t) * p.heads + h) * p.key_dim + d;
        acc += float(tok[at]);
        out[at] = acc;
      }
    }
  } else {
    const global_ptr<float> out(p.grad_g);
    float acc = 0.0f;
    for (int64_t t = end - 1; t >= begin; --t) {
      float part = 0.0f;
      for (int64_t d = lane; d < p.key_dim; d += 32) {
        part += float(tok[((b * p.seq_len + t) * p.heads + h) * p.key_dim + d]);
        if (t == end - 1) part += final_share(d);
      }
      for (int m = 16; m >= 1; m /= 2) part += shfl_xor_sync(0xffffffffu, part, m);
      acc += part;
      if (lane == 0) out[(b * p.seq_len + t) * p.heads + h] = acc;
    }
  }
}

template <class E, int kDecay>
TM_GLOBAL void scan_forward_kernel(ScanParams p) {
  scan_forward_body<E, kDecay>(p);
}
template <class E, int kDecay>
TM_GLOBAL void scan_backward_kernel(ScanParams p) {
  scan_backward_body<E, kDecay>(p);
}
template <class E>
TM_GLOBAL void scan_reduce_kernel(ScanParams p, bool decay) {
  scan_reduce_body<E>(p, decay);
}
template <int kDecay>
TM_GLOBAL void scan_decay_grad_kernel(ScanParams p) {
  scan_decay_grad_body<kDecay>(p);
}

}  // namespace tokenmix::cuda
