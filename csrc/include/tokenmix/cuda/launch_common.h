// Host-side helpers shared by the launchers of the CUDA attention engine's policies
// (na_launch.h, bs_launch.h): buffer registrations for the emulator's checks, the device check,
// the shared-memory opt-in and launch errors.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "tokenmix/simt/simt.h"

namespace tokenmix::cuda {

using namespace ::tokenmix::simt;

// Whether sm_90a (wgmma) code can run. On a GPU: the build holds sm_90a code
// (TOKENMIX_HAS_SM90A: 90 is among its architectures) and the device has compute capability 9.0
// (the only one that runs sm_90a code). In the emulator: $TOKENMIX_SIMT_ARCH is sm_90a (default
// sm_80, mma.sync).
inline bool sm90a_device() {
#if defined(__CUDACC__)
#if defined(TOKENMIX_HAS_SM90A)
  return current_device_facts().compute_capability == 90;
#else
  return false;
#endif
#else
  const char* arch = std::getenv("TOKENMIX_SIMT_ARCH");
  if (!arch || !*arch || std::string(arch) == "sm_80") return false;
  if (std::string(arch) == "sm_90a") return true;
  throw std::invalid_argument(std::string("TOKENMIX_SIMT_ARCH must be sm_80 or sm_90a, got '") +
                              arch + "'");
#endif
}

// $TOKENMIX_WGMMA, where sm_90a_device holds: 0 keeps the mma.sync kernels, 1 takes the wgmma
// kernel wherever it has an instantiation (for comparisons), auto or unset lets the launcher
// choose by the pairs each computes (na_launch.h, tokenmix/neighborhood_chunking.h).
enum class WgmmaSetting { off, by_pairs, on };

inline WgmmaSetting wgmma_setting() {
  const char* v = std::getenv("TOKENMIX_WGMMA");
  if (!v || !*v || std::string(v) == "auto") return WgmmaSetting::by_pairs;
  if (std::string(v) == "0") return WgmmaSetting::off;
  if (std::string(v) == "1") return WgmmaSetting::on;
  throw std::invalid_argument(std::string("TOKENMIX_WGMMA must be 0, 1 or auto, got '") + v + "'");
}

// The emulator checks every global access against registered buffers; under nvcc this is a no-op.
class Registrations {
 public:
  void add(const void* ptr, size_t bytes, const char* name) {
    if (!ptr || bytes == 0) return;
    for (auto& e : entries_)
      if (e.ptr == ptr) {  // views sharing a start address: keep the widest
        e.bytes = std::max(e.bytes, bytes);
        return;
      }
    entries_.push_back({ptr, bytes, name});
  }
  void commit() {
    for (const auto& e : entries_)
      held_.push_back(std::make_unique<global_registration>(e.ptr, e.bytes, e.name));
  }

 private:
  struct Entry {
    const void* ptr;
    size_t bytes;
    const char* name;
  };
  std::vector<Entry> entries_;
  std::vector<std::unique_ptr<global_registration>> held_;
};

inline void check_launch(const char* kernel) {
  if (const char* err = last_launch_error())
    throw std::runtime_error(std::string("tokenmix: CUDA launch of ") + kernel + " failed: " + err);
}

// The device must run sm_80 code (mma.sync m16n8k16, ldmatrix, cp.async).
inline device_facts checked_device() {
  const device_facts f = current_device_facts();
  if (f.error)
    throw std::runtime_error(std::string("tokenmix: cannot query the CUDA device (") + f.error +
                             "); is the driver new enough for this build's CUDA runtime?");
  if (f.compute_capability < 80)
    throw std::runtime_error(
        "tokenmix: the CUDA kernels need compute capability 8.0 or newer "
        "(sm_80+); this device is " +
        std::to_string(f.compute_capability / 10) + "." +
        std::to_string(f.compute_capability % 10));
  return f;
}

// Blocks above 48 KiB opt in. The attribute is set to the device's maximum, the same value for
// every call, so concurrent launches of one kernel with different sizes cannot undo each other.
// `remedy` ends the message when the device has too little.
template <class K>
void prepare_shared(K kernel, int64_t bytes, const device_facts& device, const char* name,
                    const char* remedy =
                        "use a smaller head dim, or float16/bfloat16 (half the "
                        "bytes)") {
  if (size_t(bytes) > device.max_dynamic_shared)
    throw std::runtime_error(std::string("tokenmix: ") + name + " needs " + std::to_string(bytes) +
                             " bytes of shared memory per block and this device allows " +
                             std::to_string(device.max_dynamic_shared) + "; " + remedy);
  if (bytes <= 48 * 1024) return;
  if (const char* err = allow_dynamic_shared(kernel, device.max_dynamic_shared))
    throw std::runtime_error(std::string("tokenmix: could not enable ") + std::to_string(bytes) +
                             " bytes of shared memory for " + name + ": " + err);
}

}  // namespace tokenmix::cuda
