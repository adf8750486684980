// The CUDA linear-scan kernels built by the host compiler for the SIMT emulator (namespace
// tokenmix::cuda::emulated): the same sources nvcc compiles for tokenmix/_C.so.
#include "../linear_scan/cuda/linear_scan_dispatch.cu"
