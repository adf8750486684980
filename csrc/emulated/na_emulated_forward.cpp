// The CUDA neighborhood-attention kernels built by the host compiler for the SIMT emulator
// (namespace tokenmix::cuda::emulated): the same sources nvcc compiles for tokenmix/_C.so.
#include "../neighborhood/cuda/na_dispatch.cu"
#include "../neighborhood/cuda/na_forward_bf16.cu"
#include "../neighborhood/cuda/na_forward_f16.cu"
#include "../neighborhood/cuda/na_forward_f32.cu"
