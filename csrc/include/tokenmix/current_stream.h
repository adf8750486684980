// torch's current CUDA stream for a device, through the stable C shim. The shim function lives in
// libtorch_cuda, which a CPU-only torch does not have, so it is looked up at the first call
// instead of being a link-time dependency: libraries that use it still load in a CPU-only torch.
#pragma once

#include <dlfcn.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>

namespace tokenmix {

inline void* current_cuda_stream(int32_t device_index) {
  using Fn = int32_t (*)(int32_t, void**);
  static Fn fn = [] {
    void* lib = dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_NOLOAD);
    return lib ? reinterpret_cast<Fn>(dlsym(lib, "aoti_torch_get_current_cuda_stream")) : nullptr;
  }();
  STD_TORCH_CHECK(fn != nullptr, "tokenmix: CUDA tensors need a CUDA build of torch");
  void* stream = nullptr;
  STD_TORCH_CHECK(fn(device_index, &stream) == 0, "tokenmix: no current CUDA stream");
  return stream;
}

}  // namespace tokenmix
