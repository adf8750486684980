// The neighborhood-attention kernels of the CPU engine: the forward runs every
// tile of NeighborhoodPolicy; the backward's dK/dV schedule is the stripe plan
// below.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "tokenmix/attention_problem.h"
#include "tokenmix/cpu/attention_engine.h"
#include "tokenmix/cpu/neighborhood_policy.h"

namespace tokenmix::cpu::TOKENMIX_ISA {

template <class In, class T>
void neighborhood_forward(const NeighborhoodProblem& p) {
  attention_forward(NeighborhoodPolicy<In, T>(p, false));
}

// ---------------------------------------------------------- backward schedule --
//
// The dK/dV rows of a (batch, kv head) are summed in one fp32 (fp64) buffer, or
// in the gradient tensors themselves when their rows are T rows the GEMM can
// write. Its query tiles are cut into *stripes*: runs of `width` tiles along one
// tile dimension, wide enough that the key boxes of stripes s and s + 2 of a
// dilation group never overlap. Phase 0 runs the even stripes of every (batch,
// kv head, dilation group) at once, phase 1 the odd ones, so no two concurrent
// tasks add to the same row and nothing is locked. Each key receives its
// contributions in one fixed order (its even stripe's tiles, then its odd
// stripe's), so the gradients are the same bit for bit for any thread count.
// The additional tokens and the rpb, which every stripe touches, are summed per
// *part* (a run of one phase's stripes) into partial buffers reduced in order at
// the end; parts are capped so that those buffers stay within half the size of
// K and V in fp32. Extra memory is therefore at most about K + V in fp32 plus
// the dK/dV buffer, whatever the thread count.

// Smallest stripe width (tiles along dimension t) for which stripes s and s + 2 of every dilation
// group have disjoint key ranges; tiles_per_dim[t] (one stripe) when none is narrower.
inline int stripe_width(const NeighborhoodSchedule& sc, int t) {
  const WindowDim& d = sc.dims[t];
  const int tiles = sc.tiles_per_dim[t];
  const int lens[2] = {dilation_group_length(d.length, d.dilation, 0),
                       dilation_group_length(d.length, d.dilation, d.dilation - 1)};
  for (int w = 1; w < tiles; ++w) {
    const int span = w * sc.tile[t];
    bool ok = true;
    for (int li = 0; li < 2 && ok; ++li) {
      const int glen = lens[li];
      for (int first = 0; first + 2 * span < glen && ok; first += span) {
        int b0, e0, b2, e2;
        window_union(first, first + span - 1, glen, d.kernel, d.stride, d.causal, &b0, &e0);
        const int f2 = first + 2 * span;
        window_union(f2, min_of(f2 + span, glen) - 1, glen, d.kernel, d.stride, d.causal, &b2, &e2);
        ok = e0 <= b2;
      }
    }
    if (ok) return w;
  }
  return tiles;
}

struct StripePlan {
  int dim = 2, width = 1;  // stripes cut tile dimension `dim`, `width` tiles each
  int64_t stripes = 1;     // per dilation group
  int64_t groups = 1;      // dilation groups (all dimensions together)
  int64_t per_group = 1;   // tiles per dilation group
  int64_t items[2] = {0, 0}, half[2] = {0, 0}, parts[2] = {0, 0};

  // part_elems: partial-buffer elements a part needs; budget: the elements all parts of one
  // (batch, kv head) may use. Depends on the problem only, never on the thread count.
  void init(const NeighborhoodSchedule& sc, int64_t part_elems, int64_t budget) {
    for (int t = 0; t < 3; ++t) {
      const int w = stripe_width(sc, t);
      const int64_t n = (sc.tiles_per_dim[t] + w - 1) / w;
      if (n > stripes) {
        stripes = n;
        dim = t;
        width = w;
      }
    }
    if (stripes == 1) width = sc.tiles_per_dim[dim];
    groups = int64_t(sc.dims[0].dilation) * sc.dims[1].dilation * sc.dims[2].dilation;
    per_group = int64_t(sc.tiles_per_dim[0]) * sc.tiles_per_dim[1] * sc.tiles_per_dim[2];
    const int64_t cap = part_elems > 0 ? max_of<int64_t>(1, budget / (2 * part_elems)) : -1;
    for (int ph = 0; ph < 2; ++ph) {
      half[ph] = (stripes - ph + 1) / 2;  // stripes ph, ph + 2, ... of one group
      items[ph] = groups * half[ph];
      parts[ph] = cap < 0 ? items[ph] : min_of(items[ph], cap);
    }
  }

  // Calls fn(tile index) for the tiles of item k of phase ph, in schedule order.
  template <class Fn>
  void for_each_tile(const NeighborhoodSchedule& sc, int ph, int64_t k, Fn&& fn) const {
    const int64_t group = k / half[ph], stripe = ph + 2 * (k % half[ph]);
    int lo[3] = {0, 0, 0}, hi[3];
    for (int t = 0; t < 3; ++t) hi[t] = sc.tiles_per_dim[t];
    lo[dim] = int(stripe * width);
    hi[dim] = min_of<int>(hi[dim], int((stripe + 1) * width));
    for (int a = lo[0]; a < hi[0]; ++a)
      for (int b = lo[1]; b < hi[1]; ++b)
        for (int c = lo[2]; c < hi[2]; ++c)
          fn(group * per_group + (int64_t(a) * sc.tiles_per_dim[1] + b) * sc.tiles_per_dim[2] + c);
  }
};

template <class In, class T>
void neighborhood_backward(const NeighborhoodProblem& p) {
  using Policy = NeighborhoodPolicy<In, T>;
  const Policy pol(p, true);
  const AttentionEngine<Policy> eng(pol);
  const int64_t pairs = p.batch * p.kv_heads;
  const int64_t tokens = p.tokens(), E = p.num_extra;
  const int64_t D = p.head_dim, Dv = p.value_dim, Hkv = p.kv_heads;
  const int64_t dp = pol.dp, dvp = pol.dvp, G = pol.group_heads;
  const int64_t rs = p.rpb_size();
  const int64_t rpb_elems = p.rpb ? G * rs : 0;

  StripePlan plan;
  plan.init(pol.sched, E * (dp + dvp) + rpb_elems, (tokens + E) * (dp + dvp) / 2);
  const int64_t slots = plan.parts[0] + plan.parts[1];  // partial buffers per (batch, kv head)

  // dK/dV rows: the gradient tensors themselves when they are contiguous T rows of the padded
  // width (one kv head: with more, rows H_kv * D apart would use a fraction of the cache sets),
  // zeroed here; else one zeroed buffer [pairs, tokens, padded dim].
  const bool native = sizeof(In) == sizeof(T) && p.dtype != DType::kFloat16 &&
                      p.dtype != DType::kBFloat16 && Hkv == 1;
  struct GradRows {
    bool direct;
    T* grad;
    int64_t dim, padded;
    Buffer<T> acc;
    // Where pair (b, hk) adds its rows, and their stride.
    void rows(int64_t b, int64_t hk, int64_t tokens, int64_t Hkv, T** base, int64_t* ld) {
      if (direct) {
        *base = grad + (b * tokens * Hkv + hk) * dim;
        *ld = Hkv * dim;
      } else {
        *base = acc.data() + (b * Hkv + hk) * tokens * padded;
        *ld = padded;
      }
    }
    // Row r (pair * tokens + token) of the result, scaled: in place, or converted from acc.
    void finish(In* dst, int64_t r, T scale) const {
      if (!direct) {
        const T* row = acc.data() + r * padded;
        for (int64_t d = 0; d < dim; ++d) dst[d] = from_float<In>(row[d] * scale);
      } else if (scale != T(1)) {
        T* row = reinterpret_cast<T*>(dst);
        for (int64_t d = 0; d < dim; ++d) row[d] *= scale;
      }
    }
  };
  GradRows gk{native && D == dp, static_cast<T*>(p.grad_k.data), D, dp, {}};
  GradRows gv{native && Dv == dvp, static_cast<T*>(p.grad_v.data), Dv, dvp, {}};
  for (GradRows* g : {&gk, &gv}) {
    if (g->direct) {
      run_parallel(p, pairs * tokens, 256, [&](int64_t begin, int64_t end) {
        fill(g->grad + begin * g->dim, g->grad + end * g->dim, T(0));
      });
    } else {
      g->acc.assign(size_t(pairs * tokens * g->padded), T(0));
    }
  }
  Buffer<T> part_k, part_v, part_rpb;
  part_k.assign(size_t(pairs * slots * E * dp), T(0));
  part_v.assign(size_t(pairs * slots * E * dvp), T(0));
  part_rpb.assign(size_t(pairs * slots * rpb_elems), T(0));

  for (int ph = 0; ph < 2; ++ph) {
    const int64_t parts = plan.parts[ph], items = plan.items[ph];
    run_parallel(p, pairs * parts, 1, [&](int64_t begin, int64_t end) {
      typename AttentionEngine<Policy>::Work w;
      eng.init_work(w, true);
      NeighborhoodTile tile;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t pair = task / parts, part = task % parts;
        const int64_t b = pair / Hkv, hk = pair % Hkv;
        const int64_t slot = pair * slots + (ph ? plan.parts[0] : 0) + part;
        NeighborhoodGrads<T> acc;
        gk.rows(b, hk, tokens, Hkv, &acc.k, &acc.k_ld);
        gv.rows(b, hk, tokens, Hkv, &acc.v, &acc.v_ld);
        acc.ek = part_k.data() + slot * E * dp;
        acc.ev = part_v.data() + slot * E * dvp;
        acc.e_ldk = dp;
        acc.e_ldv = dvp;
        acc.rpb = p.rpb ? part_rpb.data() + slot * rpb_elems : nullptr;
        tile.b = b;
        tile.hk = hk;
        const int64_t k0 = items * part / parts, k1 = items * (part + 1) / parts;
        for (int64_t k = k0; k < k1; ++k)
          plan.for_each_tile(pol.sched, ph, k, [&](int64_t it) {
            if (pol.sched.decode(it, &tile.g)) eng.backward_tile(w, tile, acc);
          });
      }
    });
  }

  // Write dK, dV and the additional tokens' gradients, contiguous [B, tokens, H_kv, D]. dK was
  // accumulated against the log2-scaled query, hence the factor ln 2. The partials of the
  // additional tokens are summed in slot order.
  const T kscale = T(kLn2);
  const int64_t rows = tokens + E;
  run_parallel(p, pairs * rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t pair = idx / rows, tok = idx % rows;
      const int64_t b = pair / Hkv, hk = pair % Hkv;
      if (tok < tokens) {
        In* dk = static_cast<In*>(p.grad_k.data) + ((b * tokens + tok) * Hkv + hk) * D;
        In* dv = static_cast<In*>(p.grad_v.data) + ((b * tokens + tok) * Hkv + hk) * Dv;
        gk.finish(dk, pair * tokens + tok, kscale);
        gv.finish(dv, pair * tokens + tok, T(1));
        continue;
      }
      const int64_t e = tok - tokens;
      In* dk = static_cast<In*>(p.grad_extra_k.data) + ((b * E + e) * Hkv + hk) * D;
      In* dv = static_cast<In*>(p.grad_extra_v.data) + ((b * E + e) * Hkv + hk) * Dv;
      for (int64_t d = 0; d < D; ++d) {
        T sum = 0;
        for (int64_t sl = 0; sl < slots; ++sl)
          sum += part_k[size_t(((pair * slots + sl) * E + e) * dp + d)];
        dk[d] = from_float<In>(sum * kscale);
      }
      for (int64_t d = 0; d < Dv; ++d) {
        T sum = 0;
        for (int64_t sl = 0; sl < slots; ++sl)
          sum += part_v[size_t(((pair * slots + sl) * E + e) * dvp + d)];
        dv[d] = from_float<In>(sum);
      }
    }
  });
  if (p.rpb) {
    T* out = static_cast<T*>(p.grad_rpb);
    fill(out, out + p.heads * rs, T(0));
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t hk = pair % Hkv;
      for (int64_t sl = 0; sl < slots; ++sl)
        for (int64_t hg = 0; hg < G; ++hg)
          for (int64_t e = 0; e < rs; ++e)
            out[(hk * G + hg) * rs + e] +=
                part_rpb[size_t((pair * slots + sl) * rpb_elems + hg * rs + e)];
    }
  }
}

}  // namespace tokenmix::cpu::TOKENMIX_ISA
