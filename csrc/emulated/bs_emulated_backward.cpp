// The block-sparse backward kernels built by the host compiler for the SIMT emulator (see
// bs_emulated_forward.cpp).
#include "../block_sparse/cuda/bs_backward_bf16.cu"
#include "../block_sparse/cuda/bs_backward_f16.cu"
#include "../block_sparse/cuda/bs_backward_f32.cu"
