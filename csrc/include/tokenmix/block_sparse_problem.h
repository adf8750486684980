// Block-sparse attention: the problem descriptor, its block layout and the
// element rule of partial blocks. Plain data plus __host__ __device__ helpers,
// shared by the CPU and CUDA engines' BlockSparsePolicy and by the op layer.
//
// Semantics are FlexAttention's BlockMask: query block i visits the kv blocks
// listed for it, *partial* ones (the element rule decides per element) and
// *full* ones (every element kept, no mask work). Keys at or past kv_len are
// never kept. A query row that keeps no key gets output 0 and LSE -inf.
#pragma once

#include <cstdint>

#include "tokenmix/host_device.h"
#include "tokenmix/tensor_view.h"

namespace tokenmix {

// The element rule of partial blocks: keep(b, q, k) holds when every part that
// is present holds (with no part present, partial blocks are kept whole).
//  - band: band_lo <= k - q <= band_hi, or k < prefix. Causal with an offset is
//    (-inf, offset], a sliding window [offset - left, offset + right]. The prefix is
//    prefix-LM's (every query keeps it), or with prefix_causal attention sinks' (only
//    where k - q <= band_hi: a causal query never keeps a later sink).
//  - documents: q_doc[b, q] == kv_doc[b, k] (packed sequences).
//  - bits: bit (q mod q_block, k mod kv_block) of the partial block's bitmask,
//    which Python fills by evaluating a Flex mask_mod once per partial block.
struct ElementMask {
  bool has_band = false;
  int64_t band_lo = 0, band_hi = 0;
  int64_t prefix = 0;
  bool prefix_causal = false;
  const int32_t* q_doc = nullptr;   // [doc_batch, q_len], contiguous
  const int32_t* kv_doc = nullptr;  // [doc_batch, kv_len], contiguous
  int64_t doc_batch = 0;            // 1 (broadcast over B) or B
  // [layout rows, max_partial, q_block, words], contiguous; bit c % 32 of word c / 32
  // of row r is element (r, c) of the block.
  const uint32_t* bits = nullptr;
  int words = 0;  // ceil(kv_block / 32)

  TM_HOST_DEVICE bool structured() const { return has_band || q_doc != nullptr; }
  TM_HOST_DEVICE bool any() const { return structured() || bits != nullptr; }

  // The band and document parts for query q and key k of batch b.
  TM_HOST_DEVICE bool keeps_structured(int64_t b, int64_t q_len, int64_t kv_len, int64_t q,
                                       int64_t k) const {
    if (has_band) {
      const int64_t d = k - q;
      const bool in_band = d >= band_lo && d <= band_hi;
      const bool in_prefix = k < prefix && (!prefix_causal || d <= band_hi);
      if (!(in_band || in_prefix)) return false;
    }
    if (q_doc) {
      const int64_t db = doc_batch > 1 ? b : 0;
      if (q_doc[db * q_len + q] != kv_doc[db * kv_len + k]) return false;
    }
    return true;
  }
};

// One (batch, head)'s lists are a *row* of the layout: row(b, h, i) for query
// block i. Layout batch/heads of 1 broadcast over the problem's B/H; a layout with
// one head per kv head serves that kv head's GQA group of query heads.
struct BlockLayoutView {
  int q_block = 0, kv_block = 0;            // block sizes in tokens
  int num_q_blocks = 0, num_kv_blocks = 0;  // ceil(q_len / q_block), ceil(kv_len / kv_block)
  int64_t batch = 1, heads = 1;             // 1 or the problem's B; 1, H_kv or H
  int64_t head_group = 1;                   // query heads per layout head (heads > 1)

  // kv side, per (layout batch, layout head, query block), all contiguous int32:
  // partial_count[row], partial_index[row * max_partial + s] for s < count; same for full.
  const int32_t* partial_count = nullptr;
  const int32_t* partial_index = nullptr;
  int max_partial = 0;
  const int32_t* full_count = nullptr;
  const int32_t* full_index = nullptr;
  int max_full = 0;

  // q side (backward, dK/dV), per (layout batch, layout head, kv block): the query blocks that
  // visit it. A partial entry also gives its slot s in that query block's partial list, which
  // locates its bitmask.
  const int32_t* q_partial_count = nullptr;
  const int32_t* q_partial_index = nullptr;
  const int32_t* q_partial_slot = nullptr;
  int max_q_partial = 0;
  const int32_t* q_full_count = nullptr;
  const int32_t* q_full_index = nullptr;
  int max_q_full = 0;

  ElementMask mask;

  TM_HOST_DEVICE int64_t head_row(int64_t b, int64_t h) const {
    return (batch > 1 ? b : 0) * heads + (heads > 1 ? h / head_group : 0);
  }
  // Row of query block qb (kv-side lists).
  TM_HOST_DEVICE int64_t q_row(int64_t b, int64_t h, int64_t qb) const {
    return head_row(b, h) * num_q_blocks + qb;
  }
  // Row of kv block kb (q-side lists).
  TM_HOST_DEVICE int64_t kv_row(int64_t b, int64_t h, int64_t kb) const {
    return head_row(b, h) * num_kv_blocks + kb;
  }
  // Bitmask of slot s of a kv-side row (null without bits): q_block rows of `words` words.
  TM_HOST_DEVICE const uint32_t* block_bits(int64_t row, int slot) const {
    return mask.bits ? mask.bits + (row * max_partial + slot) * int64_t(q_block) * mask.words
                     : nullptr;
  }
};

// Whether element (q, k) of a partial block is kept; `bits` is that block's bitmask (or null).
// Queries and keys are absolute token indices; q0 / k0 are the block's first query / key.
TM_HOST_DEVICE bool partial_keeps(const BlockLayoutView& l, int64_t b, int64_t q_len,
                                  int64_t kv_len, const uint32_t* bits, int64_t q0, int64_t k0,
                                  int64_t q, int64_t k) {
  if (k >= kv_len) return false;
  if (bits) {
    const int64_t r = q - q0, c = k - k0;
    if (!((bits[r * l.mask.words + (c >> 5)] >> (c & 31)) & 1u)) return false;
  }
  return l.mask.keeps_structured(b, q_len, kv_len, q, k);
}

struct BlockSparseProblem {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, heads = 0, kv_heads = 0;
  int64_t q_len = 0, kv_len = 0, head_dim = 0, value_dim = 0;
  double scale = 1.0;

  TokenView q, k, v;    // [B, Tq, H, D], [B, Tk, H_kv, D], [B, Tk, H_kv, Dv]
  TokenView out;        // [B, Tq, H, Dv], dtype
  void* lse = nullptr;  // contiguous [B, Tq, H], fp32 (fp64 for fp64 problems), natural log

  // Backward only.
  TokenView grad_out;
  TokenView grad_q, grad_k, grad_v;  // contiguous, dtype
  const void* grad_lse = nullptr;    // optional, like lse
  bool deterministic = false;        // CUDA: no float atomics (the CPU is always deterministic)

  BlockLayoutView layout;

  ParallelForFn parallel_for = nullptr;
  int num_threads = 1;
};

}  // namespace tokenmix
