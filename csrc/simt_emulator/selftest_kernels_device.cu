// The self-test kernel sources compiled by nvcc into the CUDA build of the
// emulated-ops library (selftest_kernels.cu is also built as C++ for the
// emulator; the inline namespace in selftest_kernels.h keeps both apart).
#include "selftest_kernels.cu"
