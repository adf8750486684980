// The CUDA attention engine: fused forward and backward kernels written on the SIMT layer, so nvcc
// compiles them for the GPU and the host compiler runs the very same source on the SIMT emulator
// (the tests). One engine serves every attention pattern; a pattern is a policy. See
// docs/cuda_engine.md.
//
// Units:
//   attention_params.h  tile constants, AttentionParams (the fields every policy's Params has)
//   smem_plan.h         shared-memory plans (kernels and launchers use the same functions)
//   tile_io.h           cp.async row copies, non-finite checks, block votes
//   online_softmax.h    masking of score fragments (full / partial chunks), the online softmax
//   attention_forward.h attention_forward<Policy, E, kDim, kWgmma, KeyOffset>
//   attention_backward.h attention_delta, attention_dq, attention_dkdv
//
// The policy contract. A policy is a type with
//   Params                         plain data deriving from AttentionParams (kernel argument)
//   query_rows(p), row_offset(p, row, op)
//                                  rows of [B, Tq, H] and where row `row` of Out / GradOut lives
//   QueryTile<E, Offset = int64_t> the query-major view (forward, dQ), one per block; Offset is
//                                  the type of its key-row offsets (a policy may take int32_t
//                                  for kernels whose host has checked that they fit):
//     init(p)                      decodes block_idx().x; false: the block has nothing to do
//     nrows, chunks                valid rows of the tile (of kTileRows), key chunks it visits
//     offset(p, r, op), row(p, r)  element offset of row r of Q / Out / GradOut (-1: padding),
//                                  its index in [B, Tq, H] (LSE, delta, dQ)
//     row_ints(p), key_ints(p)     ints of row metadata and of key-chunk metadata in shared memory
//     write_rows / read_rows       row metadata -> shared memory -> RowState (registers, with
//                                  valid[2] for the thread's two accumulator rows)
//     load_keys(p, c, ...)         chunk c's metadata and K rows (cp.async); returns a ValuesRow
//                                  (the policy's: what it found for V, if anything), which the
//                                  engine hands to load_values(p, c, v_row, ...): V rows; every
//                                  thread of the block calls both (the copies shuffle in warps)
//     full(p, c)                   every valid row keeps every key of chunk c: no keep() calls
//     keep(p, rs, ri, keys, c, j)  the element rule of a partial chunk (row ri, chunk column j)
//     biased(p, c), bias(...)      an additive bias (log2 units), in full chunks too
//     kBiasGrad, bias_stage(p), bias_grad_enabled(p), bias_grad(...)  the bias's gradient (dQ)
//   KeyTile<E>                     the key-major view (dK/dV), one per block:
//     init(p), nkeys, source(p, op), key_offset(p, r, op), write_keys / read_keys (KeyState;
//                                  a barrier separates write_keys from the first step)
//     first(p), next(p, st)        the steps: Step{valid, full, h, ...}, a query head of the kv
//                                  head and a chunk of E::kKeys queries that see the key tile
//     write_cols(p, st, cols)      the step's own metadata (before the columns')
//     query_col(p, st, j, cols, write)  query column j: QueryCol{row, q, go} (the LSE / delta row
//                                  and the Q and dO offsets, -1 past the end), and its metadata
//                                  in cols when `write`; called once per lane and step
//     keep(p, ks, ri, cols, st, j) the element rule (partial steps; the engine drops columns
//                                  without a query first), biased / bias as above
//     grad(p, op), grad_row(p, r)  where dK / dV row r goes (contiguous)
// A full chunk (step) promises that all its keys (queries) exist; the engine still drops padding
// rows. Policies: NeighborhoodPolicy (neighborhood_policy.h), BlockSparsePolicy
// (block_sparse_policy.h).
#pragma once

#include "tokenmix/cuda/attention_backward.h"
#include "tokenmix/cuda/attention_forward.h"
#include "tokenmix/cuda/attention_params.h"
#include "tokenmix/cuda/online_softmax.h"
#include "tokenmix/cuda/smem_plan.h"
#include "tokenmix/cuda/tile_io.h"
