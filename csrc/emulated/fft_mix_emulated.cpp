// The CUDA fourier_mix / global_filter / spectral_gate kernels built by the host compiler for the
// SIMT emulator (namespace tokenmix::cuda::emulated): the same sources nvcc compiles for
// tokenmix/_C.so.
#include "../fft_mix/cuda/fft_mix_dispatch.cu"
