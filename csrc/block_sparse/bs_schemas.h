// The schemas of the block-sparse attention ops, defined once: the tokenmix
// library and the emulated-kernel test library register the same signatures.
//
// Layout tensors are contiguous int32 on the device of q:
//   kv_num_blocks / full_kv_num_blocks  [LB, LH, num_q_blocks]
//   kv_indices / full_kv_indices        [LB, LH, num_q_blocks, max]
//   q_num_blocks / full_q_num_blocks    [LB, LH, num_kv_blocks]          (backward)
//   q_indices / q_slots / full_q_indices [LB, LH, num_kv_blocks, max]    (backward)
// LB and LH are 1 (broadcast) or B and H. block_size = [q_block, kv_block].
// mask_bits: int32 [LB, LH, num_q_blocks, max_partial, q_block, ceil(kv_block / 32)].
// q_doc / kv_doc: int32 [1 or B, Tq] / [1 or B, Tk].
// band: [], [lo, hi, prefix] or [lo, hi, prefix, prefix_causal (0 or 1)].
#pragma once

namespace tokenmix::bs_op {

inline constexpr const char* kForwardSchema =
    "block_sparse_forward(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, "
    "Tensor kv_indices, Tensor full_kv_num_blocks, Tensor full_kv_indices, int[] block_size, "
    "Tensor? mask_bits, Tensor? q_doc, Tensor? kv_doc, int[] band, float scale) "
    "-> (Tensor, Tensor)";

inline constexpr const char* kBackwardSchema =
    "block_sparse_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
    "Tensor lse, Tensor kv_num_blocks, Tensor kv_indices, Tensor full_kv_num_blocks, "
    "Tensor full_kv_indices, Tensor q_num_blocks, Tensor q_indices, Tensor q_slots, "
    "Tensor full_q_num_blocks, Tensor full_q_indices, int[] block_size, Tensor? mask_bits, "
    "Tensor? q_doc, Tensor? kv_doc, int[] band, float scale, Tensor? grad_lse=None, "
    "bool deterministic=False) -> (Tensor, Tensor, Tensor)";

}  // namespace tokenmix::bs_op
