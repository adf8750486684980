// The CUDA fft_conv kernels built by the host compiler for the SIMT emulator (namespace
// tokenmix::cuda::emulated): the same sources nvcc compiles for tokenmix/_C.so.
#include "../fft_mix/cuda/fft_conv_dispatch.cu"
