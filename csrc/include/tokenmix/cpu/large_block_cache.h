// A process-wide cache of the CPU kernels' large per-call buffers (K/V copies,
// gradient accumulators), shared by every instruction set.
//
// Memory fresh from the system costs a page fault and the zeroing of each page
// on first touch: in the block-sparse forward (T = 8192, two 8 MiB K/V copies)
// the kernel's clear_page took 7.5% of the time. Whether glibc keeps a freed
// block for the next malloc depends on everything else the process allocated
// (its trim threshold moves), so the kernels keep their own: a large Buffer
// gives its block back here when it dies, and the next call of a similar size
// takes it. At most 8 blocks and 256 MiB in all are kept;
// TOKENMIX_CPU_BLOCK_CACHE_MB (read once) sets that cap, 0 turns the cache off,
// and tokenmix.empty_cpu_cache() frees what it holds.
//
// Compiled once with baseline flags (csrc/large_block_cache.cpp), not per
// instruction set.
#pragma once

#include <cstddef>

namespace tokenmix::cpu {

// Blocks are aligned to this (the transparent huge page size) and offered to
// transparent huge pages.
constexpr size_t kLargeBlockAlign = size_t(2) << 20;

// A block of at least `bytes` bytes, a multiple of kLargeBlockAlign: a cached
// one of at most twice that size, or a new one. *capacity receives its size.
// Throws std::bad_alloc when the system has no memory.
void* take_large_block(size_t bytes, size_t* capacity);

// Gives back a block from take_large_block (capacity as returned): cached when
// it fits the cap, else freed (older blocks are freed first to make room).
void give_large_block(void* block, size_t capacity);

// Bytes the cache holds now.
size_t cached_large_block_bytes();

// Frees every cached block; returns the bytes freed (tokenmix.empty_cpu_cache()).
size_t release_large_blocks();

}  // namespace tokenmix::cpu
