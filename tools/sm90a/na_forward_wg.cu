// The neighborhood-attention forward's sm_90a (wgmma) kernels, instantiated for the static SASS
// model: the shipped build has no sm_90a code yet (the emulator runs this path; see
// docs/cuda_engine.md, "The sm_90a path"). tests/test_na_cuda_wgmma.py compiles this file:
//   nvcc -std=c++17 -O3 -DNDEBUG -arch=sm_90a -cubin -Icsrc/include -Icsrc \
//        tools/sm90a/na_forward_wg.cu -o build/na_forward_wg_sm90a.cubin
//   python -m tokenmix sass-report --library build/na_forward_wg_sm90a.cubin
#include "tokenmix/cuda/na_launch.h"

namespace tokenmix::cuda {
template __global__ void na_forward_wg_kernel<F16, 32>(NaParams);
template __global__ void na_forward_wg_kernel<F16, 64>(NaParams);
template __global__ void na_forward_wg_kernel<F16, 128>(NaParams);
template __global__ void na_forward_wg_kernel<BF16, 64>(NaParams);
}  // namespace tokenmix::cuda
