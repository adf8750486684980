// The CPU attention engine: fused tiles of queries x chunks of keys with an
// online softmax (forward) and a recompute-from-LSE backward, driven by one
// policy type (NeighborhoodPolicy, BlockSparsePolicy).
//
// Layout of the work: the query rows of one tile (for a policy's choice of
// heads) are the *lanes* of the SIMD vectors. Scores are computed
// transposed, S^T = K Q^T ([keys x lanes]), so the mask, the online softmax
// and the exponentials are plain vertical vector operations with no
// horizontal reductions, and key/value rows are read in place through row
// pointers instead of being packed. Every matrix product is the
// register-blocked GEMM of gemm.h.
//
// The policy contract (see docs/cpu_engine.md):
//   using In, T                 storage and compute types
//   using Tile, Lanes, Chunk    a query tile; its lane table (derives LaneTable<T>);
//                               a key chunk (derives ChunkRows<T>)
//   using GradTarget            backward: where a tile adds dK/dV (and bias gradients)
//   kChunk                      keys per chunk at most
//   lanes(), tensors()          lanes per tile (a multiple of the vector width); the tensors
//   init_lanes(Lanes&), init_chunk(Chunk&, backward)
//   setup_lanes(tile, lanes)    heads and row offsets of the tile's lanes
//   for_each_chunk(tile, lanes, chunk, const GradTarget*, fn)
//                               fills chunks (rows, n, full) and calls fn(chunk) for each;
//                               with a GradTarget, also the dK/dV rows (gk, gv)
//   keep(chunk, lanes, j, v)    partial chunks: -1 in the lanes [v, v + W) that keep key j
//   keeps(chunk, lanes, j, l)   the same rule for one element (exact passes)
//   add_bias(chunk, lanes, st)  partial chunks: additive bias in log2 units on kept elements
//   add_bias_grad(chunk, lanes, ds, target)  its gradient from dS^T
// Full chunks keep every element of the active lanes: no keep(), no bias.
//
// Masked entries contribute exactly nothing. P and dS are formed by selection
// (never by multiplying with 0). A GEMM over P or dS would still add
// 0 * inf = NaN from a non-finite operand row to every lane of the tile, so the
// products with such rows are exact instead: the row leaves the GEMM and is
// added back only where the rule keeps it (add_bad_key_rows for K and V rows,
// add_bad_lanes for Q and dO rows). Q and dO rows are checked as a tile loads
// them. K and V rows are checked only when a tile's O (forward) or dQ
// (backward) came out non-finite: that tile is then computed again with every
// chunk's rows checked. Finite inputs never take the exact path, and a key
// outside a query's kept set never reaches it, while on kept elements IEEE
// arithmetic applies as in the reference (0 * inf is NaN).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "tokenmix/cpu/attention_tables.h"
#include "tokenmix/cpu/finite_rows.h"
#include "tokenmix/cpu/gemm.h"
#include "tokenmix/cpu/parallel.h"
#include "tokenmix/cpu/simd.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <class Policy>
struct AttentionEngine {
  using In = typename Policy::In;
  using T = typename Policy::T;
  using Tile = typename Policy::Tile;
  using Lanes = typename Policy::Lanes;
  using Chunk = typename Policy::Chunk;
  using GradTarget = typename Policy::GradTarget;
  using V = typename Simd<T>::V;
  using VI = typename Simd<T>::VI;
  using I = typename Simd<T>::I;
  static constexpr int W = Simd<T>::kWidth;
  static constexpr int kChunk = Policy::kChunk;
  // Lane vectors one softmax pass covers (its independent max and sum chains).
  static constexpr int kSoftmaxVecs = 4;

  const Policy& pol;
  const AttentionTensors& io;
  int L, D, Dv, dp, dvp;
  T qscale;            // softmax scale in log2 units
  Buffer<T> zero_row;  // stands in for a non-finite row inside a GEMM

  explicit AttentionEngine(const Policy& policy) : pol(policy), io(policy.tensors()) {
    L = pol.lanes();
    D = io.head_dim;
    Dv = io.value_dim;
    dp = round_up(D, W);
    dvp = round_up(Dv, W);
    qscale = T(io.scale * kLog2e);
    zero_row.assign(size_t(max_of(dp, dvp)), T(0));
  }

  struct Work {
    Lanes ln;
    Chunk ch;
    Buffer<T> qt, q, st, pt, o, dot, dor, dpt, dq;
    Buffer<T> row_max, row_sum, delta, alpha;
  };

  void init_work(Work& w, bool backward) const {
    pol.init_lanes(w.ln);
    pol.init_chunk(w.ch, backward);
    w.qt.assign(size_t(D) * L, T(0));
    w.st.assign(size_t(kChunk) * L, T(0));
    w.o.assign(size_t(L) * dvp, T(0));
    w.row_max.assign(L, T(0));
    w.row_sum.assign(L, T(0));
    w.alpha.assign(L, T(0));
    if (backward) {
      w.q.assign(size_t(L) * dp, T(0));
      w.pt.assign(size_t(kChunk) * L, T(0));
      w.dot.assign(size_t(Dv) * L, T(0));
      w.dor.assign(size_t(L) * dvp, T(0));
      w.dpt.assign(size_t(kChunk) * L, T(0));
      w.dq.assign(size_t(L) * dp, T(0));
      w.delta.assign(L, T(0));
    }
  }

  // Loads the rows at base + off[l] of every active lane into dst[lane][ld]
  // (row-major) and/or dst_t[dim][lanes] (transposed), multiplied by mult.
  void load_lanes(const void* base, const int64_t* off, const Lanes& ln, int dim, T mult, T* dst,
                  int ld, T* dst_t) const {
    // Every row's cache lines are requested first: the rows are scattered (a heads-last
    // tensor), and the transposing loop below would otherwise wait on them one at a time.
    for (int l = 0; l < L; ++l) {
      if (ln.head[l] < 0) continue;
      const char* src = reinterpret_cast<const char*>(static_cast<const In*>(base) + off[l]);
      for (int c = 0; c < dim * int(sizeof(In)); c += 64) __builtin_prefetch(src + c, 0, 3);
    }
#if TOKENMIX_VEC_BYTES >= 64
    if constexpr (std::is_same_v<In, float> && std::is_same_v<T, float>) {
      if (dst_t) {
        for (int l0 = 0; l0 < L; l0 += 16) {
          const float* rows[16];
          for (int i = 0; i < 16; ++i)
            rows[i] = ln.head[l0 + i] < 0 ? nullptr : static_cast<const float*>(base) + off[l0 + i];
          transpose_rows16(rows, dim, mult, dst_t + l0, L);
        }
        dst_t = nullptr;  // done; the loop below writes the row-major copy only
      }
    }
#endif
    for (int l = 0; l < L; ++l) {
      if (ln.head[l] < 0) {
        if (dst) fill(dst + int64_t(l) * ld, dst + int64_t(l + 1) * ld, T(0));
        if (dst_t)
          for (int d = 0; d < dim; ++d) dst_t[int64_t(d) * L + l] = T(0);
        continue;
      }
      const In* src = static_cast<const In*>(base) + off[l];
      if (dst) {
        T* row = dst + int64_t(l) * ld;
        for (int d = 0; d < dim; ++d) row[d] = T(to_float(src[d])) * mult;
        fill(row + dim, row + ld, T(0));
      }
      if (dst_t)
        for (int d = 0; d < dim; ++d) dst_t[int64_t(d) * L + l] = T(to_float(src[d])) * mult;
    }
  }

  // Whether lane l keeps column j of the chunk (one element of the rule).
  bool sees(const Chunk& ch, const Lanes& ln, int j, int l) const {
    if (ln.head[l] < 0) return false;
    return ch.full || pol.keeps(ch, ln, j, l);
  }

  // C[l] += A^T[j][l] * row_j over the lanes l that keep column j, for every column j flagged in
  // `bad`, and then replaces row_j by zeros in `rows` for the GEMM that follows: the GEMM of
  // C [L x dim] += A [L x n] * rows [n x dim] would add 0 * inf = NaN from a non-finite row to
  // the lanes that do not keep it. Kept elements keep IEEE arithmetic.
  void add_bad_key_rows(const Chunk& ch, const Lanes& ln, const uint8_t* bad, const T** rows,
                        const T* at, T* c, int ldc, int dim) const {
    for (int j = 0; j < ch.n; ++j) {
      if (!bad[j]) continue;
      const T* row = rows[j];
      for (int l = 0; l < L; ++l) {
        if (!sees(ch, ln, j, l)) continue;
        const T a = at[int64_t(j) * L + l];
        T* crow = c + int64_t(l) * ldc;
        for (int d = 0; d < dim; ++d) crow[d] += a * row[d];
      }
      rows[j] = zero_row.data();
    }
  }

  // The lane-side counterpart, for C_rows [n x dim] += A^T [n x L] * X [L x dim] where the X rows
  // of the flagged lanes were zeroed at tile setup: crow_j += A^T[j][l] * x_l for every column j
  // lane l keeps, x_l read from the transposed copy xt [dim x L].
  void add_bad_lanes(const Chunk& ch, const Lanes& ln, const uint8_t* bad, const T* at, const T* xt,
                     T* const* crows, int dim) const {
    for (int l = 0; l < L; ++l) {
      if (!bad[l]) continue;
      for (int j = 0; j < ch.n; ++j) {
        if (!sees(ch, ln, j, l)) continue;
        const T a = at[int64_t(j) * L + l];
        T* crow = crows[j];
        for (int d = 0; d < dim; ++d) crow[d] += a * xt[int64_t(d) * L + l];
      }
    }
  }

  void forward_tile(Work& w, const Tile& tile) const;
  template <int G>
  void softmax_chunk(Work& w, const Chunk& ch, int v0, bool exact) const;
  void forward_pass(Work& w, const Tile& tile, bool exact) const;
  void backward_tile(Work& w, const Tile& tile, const GradTarget& target) const;
  void backward_pass(Work& w, const Tile& tile, const GradTarget* target) const;
};

// ---------------------------------------------------------------- forward --

// One chunk's online-softmax step for the G lane vectors [v0, v0 + G W): the chunk's max
// (applying the element rule on partial chunks), alpha = exp2(old max - new max), and
// P^T = exp2(S^T - new max) in place with its sum. S^T rows are read whole (G vectors per key),
// so the loads are sequential and the G vectors' chains independent. The sum is one chain per
// vector: each lane adds its keys in key order (masked keys add exact zeros), so the sum does
// not depend on where they sit in the chunk (a sharded run adds the same terms in the same
// order).
template <class Policy>
template <int G>
void AttentionEngine<Policy>::softmax_chunk(Work& w, const Chunk& ch, int v0, bool exact) const {
  const V vninf = vbroadcast<V>(-std::numeric_limits<T>::infinity());
  T* const st = w.st.data() + v0;
  const int64_t ld = L;
  const int n = ch.n;
  // Two max chains per vector (even and odd keys), so that with few lane vectors (G = 1 for
  // neighborhood attention's tiles, one vector unless the heads of a group fill more) the
  // loop is not bound by the latency of one max per key. A max is exact: same result.
  V cm[G], cm1[G];
  for (int g = 0; g < G; ++g) cm[g] = cm1[g] = vninf;
  // value(j, g): the score of key j in vector g; partial chunks apply the element rule there
  // (-inf stored where it drops the element).
  auto chunk_max = [&](auto&& value) {
    int j = 0;
    for (; j + 1 < n; j += 2)
      for (int g = 0; g < G; ++g) {
        const V x = value(j, g), y = value(j + 1, g);
        cm[g] = x > cm[g] ? x : cm[g];
        cm1[g] = y > cm1[g] ? y : cm1[g];
      }
    if (j < n)
      for (int g = 0; g < G; ++g) {
        const V x = value(j, g);
        cm[g] = x > cm[g] ? x : cm[g];
      }
  };
  if (ch.full) {
    chunk_max([&](int j, int g) { return vload<V>(st + j * ld + g * W); });
  } else {
    chunk_max([&](int j, int g) {
      T* e = st + j * ld + g * W;
      const V x = pol.keep(ch, w.ln, j, v0 + g * W) != 0 ? vload<V>(e) : vninf;
      vstore(e, x);
      return x;
    });
  }
  for (int g = 0; g < G; ++g) cm[g] = cm1[g] > cm[g] ? cm1[g] : cm[g];
  if (exact) {
    for (int g = 0; g < G; ++g) {
      I* seen = w.ln.nan_logit.data() + v0 + g * W;
      VI nan_seen = vload<VI>(seen);
      for (int j = 0; j < n; ++j) {
        const V x = vload<V>(st + j * ld + g * W);
        nan_seen |= x != x;
      }
      vstore(seen, nan_seen);
    }
  }
  V safe[G], sum[G];
  for (int g = 0; g < G; ++g) {
    T* m = w.row_max.data() + v0 + g * W;
    const V m_old = vload<V>(m);
    const V m_new = cm[g] > m_old ? cm[g] : m_old;
    safe[g] = m_new == vninf ? V{} : m_new;
    const V alpha = vexp2_nonpositive(m_old - safe[g]);
    vstore(m, m_new);
    vstore(w.alpha.data() + v0 + g * W, alpha);
    sum[g] = V{};
  }
  for (int j = 0; j < n; ++j) {
    T* row = st + j * ld;
    for (int g = 0; g < G; ++g) {
      const V e = vexp2_nonpositive(vload<V>(row + g * W) - safe[g]);  // s <= max
      sum[g] += e;
      vstore(row + g * W, e);
    }
  }
  for (int g = 0; g < G; ++g) {
    T* s = w.row_sum.data() + v0 + g * W;
    vstore(s, vload<V>(s) * vload<V>(w.alpha.data() + v0 + g * W) + sum[g]);
  }
}

// The online softmax over the tile's chunks into w.o, w.row_max, w.row_sum
// (lanes and Q^T already loaded). `exact`: each chunk's V rows are checked and
// the non-finite ones multiplied only where the rule keeps them, and NaN
// logits are recorded per lane (for the LSE).
template <class Policy>
void AttentionEngine<Policy>::forward_pass(Work& w, const Tile& tile, bool exact) const {
  const T ninf = -std::numeric_limits<T>::infinity();
  fill(w.o.begin(), w.o.end(), T(0));
  fill(w.row_max.begin(), w.row_max.end(), ninf);
  fill(w.row_sum.begin(), w.row_sum.end(), T(0));
  fill(w.ln.nan_logit.begin(), w.ln.nan_logit.end(), I(0));
  T* st = w.st.data();

  pol.for_each_chunk(tile, w.ln, w.ch, nullptr, [&](Chunk& ch) {
    const int n = ch.n;
    // S^T [n x L] = K_rows [n x D] * Q^T [D x L]
    gemm<T>(n, L, D, TableRows<const T>{ch.krow.data()}, 1, StridedRows<const T>{w.qt.data(), L},
            StridedRows<T>{st, L}, false);
    if (!ch.full) pol.add_bias(ch, w.ln, st);
    int v = 0;
    for (; v + kSoftmaxVecs * W <= L; v += kSoftmaxVecs * W)
      softmax_chunk<kSoftmaxVecs>(w, ch, v, exact);
    switch ((L - v) / W) {
      case 1: softmax_chunk<1>(w, ch, v, exact); break;
      case 2: softmax_chunk<2>(w, ch, v, exact); break;
      case 3: softmax_chunk<3>(w, ch, v, exact); break;
      default: break;
    }
    for (int l = 0; l < L; ++l) {
      const T a = w.alpha[l];
      if (a == T(1)) continue;
      T* orow = w.o.data() + int64_t(l) * dvp;
      for (int d = 0; d < dvp; ++d) orow[d] *= a;
    }
    if (exact && flag_rows<T>(TableRows<const T>{ch.vrow.data()}, n, dvp, ch.bad.data()))
      add_bad_key_rows(ch, w.ln, ch.bad.data(), ch.vrow.data(), st, w.o.data(), dvp, Dv);
    // O [L x Dv] += P [L x n] (read transposed from S^T) * V_rows [n x Dv]
    gemm<T>(L, dvp, n, StridedRows<const T>{st, 1}, L, TableRows<const T>{ch.vrow.data()},
            StridedRows<T>{w.o.data(), dvp}, true);
  });
}

template <class Policy>
void AttentionEngine<Policy>::forward_tile(Work& w, const Tile& tile) const {
  const double inf = std::numeric_limits<double>::infinity();
  pol.setup_lanes(tile, w.ln);
  load_lanes(io.q, w.ln.q_off.data(), w.ln, D, qscale, nullptr, 0, w.qt.data());
  forward_pass(w, tile, false);
  // A non-finite V row in a chunk's GEMM turns the masked (0) probabilities of
  // every lane of the tile into NaN. Rather than check every chunk, a tile whose
  // O came out non-finite anywhere is computed again with the exact product.
  const bool exact = !all_finite(w.o.data(), int64_t(L) * dvp);
  if (exact) forward_pass(w, tile, true);

  for (int l = 0; l < L; ++l) {
    if (w.ln.head[l] < 0) continue;
    In* dst = static_cast<In*>(io.out) + w.ln.out_off[l];
    const T sum = w.row_sum[l], m = w.row_max[l];
    // sum == 0: no key left (every logit -inf): output 0, LSE -inf.
    const T inv = sum == T(0) ? T(0) : T(1) / sum;
    const T* orow = w.o.data() + int64_t(l) * dvp;
    for (int d = 0; d < Dv; ++d) dst[d] = from_float<In>(orow[d] * inv);
    // As torch.logsumexp: NaN with a NaN logit, else +inf with a +inf logit.
    // (Either makes O non-finite, so nan_logit is known: the pass was exact.)
    double lse2;
    if (exact && w.ln.nan_logit[l])
      lse2 = std::numeric_limits<double>::quiet_NaN();
    else if (double(m) == inf)
      lse2 = inf;
    else if (sum == T(0))
      lse2 = -inf;
    else
      lse2 = double(m) + std::log2(double(sum));
    static_cast<T*>(io.lse)[w.ln.lse_off[l]] = T(lse2 * kLn2);
  }
}

// Every tile of the policy, in parallel; tiles write disjoint outputs.
template <class Policy>
void attention_forward(const Policy& pol) {
  const AttentionEngine<Policy> eng(pol);
  run_parallel(pol.problem(), pol.num_tiles(), 1, [&](int64_t begin, int64_t end) {
    typename AttentionEngine<Policy>::Work w;
    eng.init_work(w, false);
    typename Policy::Tile tile;
    for (int64_t it = begin; it < end; ++it)
      if (pol.tile(it, &tile)) eng.forward_tile(w, tile);
  });
}

// --------------------------------------------------------------- backward --

// Computes dQ of the tile (written to grad_q) and adds its dK/dV (and bias
// gradient) contributions to `target`.
template <class Policy>
void AttentionEngine<Policy>::backward_tile(Work& w, const Tile& tile,
                                            const GradTarget& target) const {
  const T ninf = -std::numeric_limits<T>::infinity();
  pol.setup_lanes(tile, w.ln);
  load_lanes(io.q, w.ln.q_off.data(), w.ln, D, qscale, w.q.data(), dp, w.qt.data());
  load_lanes(io.grad_out, w.ln.grad_out_off.data(), w.ln, Dv, T(1), w.dor.data(), dvp,
             w.dot.data());
  load_lanes(io.out_in, w.ln.out_off.data(), w.ln, Dv, T(1), w.o.data(), dvp, nullptr);
  for (int l = 0; l < L; ++l) {
    w.ln.alive[l] = 0;
    if (w.ln.head[l] < 0) {
      w.row_max[l] = 0;
      w.delta[l] = 0;
      continue;
    }
    w.row_max[l] = T(double(static_cast<const T*>(io.lse)[w.ln.lse_off[l]]) * kLog2e);
    // A row whose logits were all -inf (LSE -inf) has P = 0 and dS = 0 everywhere.
    w.ln.alive[l] = w.row_max[l] != ninf ? I(-1) : I(0);
    T dl = 0;
    const T* orow = w.o.data() + int64_t(l) * dvp;
    const T* grow = w.dor.data() + int64_t(l) * dvp;
    for (int d = 0; d < Dv; ++d) dl += orow[d] * grow[d];
    // d lse / d logit = P, so an LSE gradient enters as a shift of delta.
    if (io.grad_lse) dl -= static_cast<const T*>(io.grad_lse)[w.ln.lse_off[l]];
    w.delta[l] = dl;
  }
  // Non-finite Q (dO) rows leave the dK (dV) GEMM: add_bad_lanes adds them
  // where the rule keeps them. Their transposed copies keep the values.
  w.ln.any_q_bad = flag_rows<T>(StridedRows<const T>{w.q.data(), dp}, L, dp, w.ln.q_bad.data());
  w.ln.any_g_bad = flag_rows<T>(StridedRows<const T>{w.dor.data(), dvp}, L, dvp, w.ln.g_bad.data());
  for (int l = 0; l < L; ++l) {
    if (w.ln.q_bad[l]) fill(w.q.data() + int64_t(l) * dp, w.q.data() + int64_t(l + 1) * dp, T(0));
    if (w.ln.g_bad[l])
      fill(w.dor.data() + int64_t(l) * dvp, w.dor.data() + int64_t(l + 1) * dvp, T(0));
  }
  backward_pass(w, tile, &target);
  // A non-finite K row in the dQ GEMM turns the masked (0) dS of every lane of
  // the tile into NaN: a tile whose dQ came out non-finite computes dQ again,
  // alone, with the exact product.
  if (!all_finite(w.dq.data(), int64_t(L) * dp)) backward_pass(w, tile, nullptr);

  const T qs = T(io.scale);
  for (int l = 0; l < L; ++l) {
    if (w.ln.head[l] < 0) continue;
    In* dst = static_cast<In*>(io.grad_q) + w.ln.grad_q_off[l];
    const T* row = w.dq.data() + int64_t(l) * dp;
    for (int d = 0; d < D; ++d) dst[d] = from_float<In>(row[d] * qs);
  }
}

// Recomputes P and dS of every chunk from the LSE and accumulates dQ into w.dq,
// and with a target dK/dV (and the bias gradient). Without one: the exact dQ
// pass, which checks each chunk's K rows and adds nothing else.
template <class Policy>
void AttentionEngine<Policy>::backward_pass(Work& w, const Tile& tile,
                                            const GradTarget* target) const {
  fill(w.dq.begin(), w.dq.end(), T(0));
  T* st = w.st.data();
  T* dpt = w.dpt.data();

  pol.for_each_chunk(tile, w.ln, w.ch, target, [&](Chunk& ch) {
    const int n = ch.n;
    gemm<T>(n, L, D, TableRows<const T>{ch.krow.data()}, 1, StridedRows<const T>{w.qt.data(), L},
            StridedRows<T>{st, L}, false);
    // dP^T [n x L] = V_rows [n x Dv] * dO^T [Dv x L]
    gemm<T>(n, L, Dv, TableRows<const T>{ch.vrow.data()}, 1, StridedRows<const T>{w.dot.data(), L},
            StridedRows<T>{dpt, L}, false);
    // P and dS by selection: exactly 0 where the rule drops the element and on
    // rows without keys, whatever the scores, dP, delta or the LSE hold.
    if (ch.full) {
      // Rows of S^T and dP^T are read whole (sequential loads), through row pointers held in
      // locals (the lambda's captured ones would be reloaded after every store). The per-lane
      // vectors (alive, LSE, delta) are loaded from L1 for each row.
      const I* const alive = w.ln.alive.data();
      const T* const lse2 = w.row_max.data();
      const T* const delta = w.delta.data();
      T* const s_base = st;
      T* const d_base = dpt;
      const int64_t ld = L;
      for (int j = 0; j < n; ++j) {
        T* const srow = s_base + j * ld;
        T* const drow = d_base + j * ld;
        for (int64_t v = 0; v < ld; v += W) {
          const VI kv = vload<VI>(alive + v);
          const V pr = kv != 0 ? vexp2(vload<V>(srow + v) - vload<V>(lse2 + v)) : V{};
          const V ds = pr * (vload<V>(drow + v) - vload<V>(delta + v));
          vstore(srow + v, pr);                  // P^T
          vstore(drow + v, kv != 0 ? ds : V{});  // dS^T
        }
      }
    } else {
      pol.add_bias(ch, w.ln, st);
      for (int j = 0; j < n; ++j)
        for (int v = 0; v < L; v += W) {
          T* sp = st + int64_t(j) * L + v;
          T* dpp = dpt + int64_t(j) * L + v;
          const VI kv = pol.keep(ch, w.ln, j, v) & vload<VI>(w.ln.alive.data() + v);
          const V pr = kv != 0 ? vexp2(vload<V>(sp) - vload<V>(w.row_max.data() + v)) : V{};
          const V ds = pr * (vload<V>(dpp) - vload<V>(w.delta.data() + v));
          vstore(sp, pr);                   // P^T
          vstore(dpp, kv != 0 ? ds : V{});  // dS^T
        }
      if (target) pol.add_bias_grad(ch, w.ln, dpt, *target);
    }
    // dQ [L x D] += dS [L x n] * K_rows [n x D]
    if (!target && flag_rows<T>(TableRows<const T>{ch.krow.data()}, n, dp, ch.bad.data()))
      add_bad_key_rows(ch, w.ln, ch.bad.data(), ch.krow.data(), dpt, w.dq.data(), dp, D);
    gemm<T>(L, dp, n, StridedRows<const T>{dpt, 1}, L, TableRows<const T>{ch.krow.data()},
            StridedRows<T>{w.dq.data(), dp}, true);
    if (!target) return;
    // dK_rows [n x D] += dS^T [n x L] * Q [L x D];  dV_rows += P^T * dO
    gemm<T>(n, dp, L, StridedRows<const T>{dpt, L}, 1, StridedRows<const T>{w.q.data(), dp},
            TableRows<T>{ch.gk.data()}, true);
    gemm<T>(n, dvp, L, StridedRows<const T>{st, L}, 1, StridedRows<const T>{w.dor.data(), dvp},
            TableRows<T>{ch.gv.data()}, true);
    if (w.ln.any_q_bad)
      add_bad_lanes(ch, w.ln, w.ln.q_bad.data(), dpt, w.qt.data(), ch.gk.data(), D);
    if (w.ln.any_g_bad)
      add_bad_lanes(ch, w.ln, w.ln.g_bad.data(), st, w.dot.data(), ch.gv.data(), Dv);
  });
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
