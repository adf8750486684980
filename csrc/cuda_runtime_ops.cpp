// The CUDA versions behind `python -m tokenmix info` and the driver check of the CUDA kernels
// (python/tokenmix/_cuda_driver.py). Compiled into tokenmix/_C.so when CUDA is built.
#include <cuda_runtime_api.h>
#include <torch/csrc/stable/library.h>

namespace {
// The newest CUDA version the installed driver supports (e.g. 12040 for CUDA 12.4), or 0 when
// no driver is installed. Needs no device.
int64_t cuda_driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

// The CUDA runtime linked into the library (statically), e.g. 13000 for CUDA 13.0.
int64_t cuda_runtime_version() {
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) return 0;
  return version;
}
}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  m.def("cuda_driver_version() -> int");
  m.def("cuda_runtime_version() -> int");
}

// No tensor inputs: CompositeExplicitAutograd serves every dispatch (as for cpu_isa).
STABLE_TORCH_LIBRARY_IMPL(tokenmix, CompositeExplicitAutograd, m) {
  m.impl("cuda_driver_version", TORCH_BOX(&cuda_driver_version));
  m.impl("cuda_runtime_version", TORCH_BOX(&cuda_runtime_version));
}
