// One dtype and one pass of the block-sparse kernels per translation unit, so the instantiations
// compile in parallel. nvcc builds these files into namespace gpu, the host compiler into
// namespace emulated (see tokenmix/cuda/bs_entry.h).
#pragma once

#include "tokenmix/cuda/bs_launch.h"

#if defined(__CUDACC__)
#define TOKENMIX_BS_BACKEND gpu
#else
#define TOKENMIX_BS_BACKEND emulated
#endif

#define TOKENMIX_BS_FORWARD(Elem, suffix)                                                   \
  namespace tokenmix::cuda::TOKENMIX_BS_BACKEND {                                           \
  void bs_forward_##suffix(const BlockSparseProblem& p, int32_t* workspace, void* stream) { \
    ::tokenmix::cuda::bs_host::forward<::tokenmix::cuda::Elem>(p, workspace, stream);       \
  }                                                                                         \
  }

#define TOKENMIX_BS_BACKWARD(Elem, suffix)                                                   \
  namespace tokenmix::cuda::TOKENMIX_BS_BACKEND {                                            \
  void bs_backward_##suffix(const BlockSparseProblem& p, int32_t* workspace, void* stream) { \
    ::tokenmix::cuda::bs_host::backward<::tokenmix::cuda::Elem>(p, workspace, stream);       \
  }                                                                                          \
  }
