// The SIMT layer: kernels are written once against tokenmix::simt. Under nvcc each call is the
// CUDA builtin or PTX instruction (device.h); under the host compiler the kernel runs on the CPU
// emulator (emulator.h, runtime in csrc/simt_emulator/). See docs/simt_emulator.md.
#pragma once

#include "tokenmix/simt/layouts.h"
#include "tokenmix/simt/types.h"

#if defined(__CUDACC__)
#include "tokenmix/simt/device.h"
#else
#include "tokenmix/simt/emulator.h"
#endif
