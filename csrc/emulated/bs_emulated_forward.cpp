// The block-sparse kernels of the CUDA attention engine built by the host compiler for the SIMT
// emulator (namespace tokenmix::cuda::emulated): the same sources nvcc compiles for tokenmix/_C.so.
#include "../block_sparse/cuda/bs_dispatch.cu"
#include "../block_sparse/cuda/bs_forward_bf16.cu"
#include "../block_sparse/cuda/bs_forward_f16.cu"
#include "../block_sparse/cuda/bs_forward_f32.cu"
