// Qualifiers for code shared by the CPU kernels, the CUDA kernels and the planner.
#pragma once

#if defined(__CUDACC__)
#define TM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TM_HOST_DEVICE inline
#endif
