// One dtype and one pass of the CUDA neighborhood-attention engine per translation unit, so the
// instantiations compile in parallel. nvcc builds these files into namespace gpu, the host compiler
// into namespace emulated (see tokenmix/cuda/na_entry.h).
#pragma once

#include "tokenmix/cuda/na_launch.h"

#if defined(__CUDACC__)
#define TOKENMIX_NA_BACKEND gpu
#else
#define TOKENMIX_NA_BACKEND emulated
#endif

#define TOKENMIX_NA_FORWARD(Elem, suffix)                                \
  namespace tokenmix::cuda::TOKENMIX_NA_BACKEND {                        \
  void na_forward_##suffix(const NeighborhoodProblem& p, void* stream) { \
    ::tokenmix::cuda::forward<::tokenmix::cuda::Elem>(p, stream);        \
  }                                                                      \
  }

#define TOKENMIX_NA_BACKWARD(Elem, suffix)                                                      \
  namespace tokenmix::cuda::TOKENMIX_NA_BACKEND {                                               \
  void na_backward_##suffix(const NeighborhoodProblem& p, bool deterministic, float* workspace, \
                            void* stream) {                                                     \
    const int64_t rows = p.batch * p.tokens() * p.heads;                                        \
    ::tokenmix::cuda::backward<::tokenmix::cuda::Elem>(p, deterministic, workspace,             \
                                                       workspace + rows, stream);               \
  }                                                                                             \
  }
