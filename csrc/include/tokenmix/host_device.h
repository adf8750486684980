// Qualifiers for code shared by the CPU kernels, the CUDA kernels and the planner.
#pragma once

#if defined(__CUDACC__)
#define TM_HOST_DEVICE __host__ __device__ __forceinline__
// Fully unrolls the loop that follows in device code (small arrays indexed by the loop variable
// then stay in registers).
#define TM_HD_UNROLL _Pragma("unroll")
#else
#define TM_HOST_DEVICE inline
#define TM_HD_UNROLL
#endif
