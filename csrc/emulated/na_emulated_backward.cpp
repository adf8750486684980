// The CUDA neighborhood-attention backward kernels built by the host compiler for the SIMT
// emulator (see na_emulated_forward.cpp).
#include "../neighborhood/cuda/na_backward_bf16.cu"
#include "../neighborhood/cuda/na_backward_f16.cu"
#include "../neighborhood/cuda/na_backward_f32.cu"
