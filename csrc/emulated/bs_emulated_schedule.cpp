// Test library only: the schedule kernels of both sides, alone, on the emulator (see
// bs_schedule_dump.h). The same plans, parameters and kernels as the launches in bs_launch.h.
#include "bs_schedule_dump.h"
#include "tokenmix/cuda/bs_launch.h"

namespace tokenmix::cuda::emulated {
namespace {

BsSideSchedule read_side(const bs_host::SidePlan& s, const BsSchedule& b) {
  BsSideSchedule r;
  if (s.direct) return r;
  r.scheduled = true;
  r.head_rows = s.head_rows;
  r.tiles = s.tiles;
  r.max = s.max;
  const int64_t n = s.head_rows * s.tiles;
  r.count.assign(b.count, b.count + n);
  r.entry.assign(b.entry, b.entry + n * s.max);
  return r;
}

template <class E>
BsSchedules schedules(const BlockSparseProblem& p) {
  using namespace bs_host;
  const SidePlan qside = query_side<E>(p), kside = key_side<E>(p);
  std::vector<int32_t> workspace(size_t(std::max<int64_t>(qside.words() + kside.words(), 1)));
  const BsSchedule qs = schedule_at(workspace.data(), qside);
  const BsSchedule ks = schedule_at(workspace.data() + qside.words(), kside);
  Registrations r;
  register_layout(r, p, true);
  r.add(workspace.data(), workspace.size() * 4, "schedules (workspace)");
  r.commit();
  const device_facts device = checked_device();
  if (!qside.direct)
    launch_schedule(bs_schedule_kernel<E, 0>, "bs_schedule_kernel",
                    query_schedule_params<E>(p, qside, qs), device, nullptr);
  if (!kside.direct)
    launch_schedule(bs_schedule_kernel<E, 2>, "bs_schedule_kernel",
                    key_schedule_params<E>(p, kside, ks), device, nullptr);
  return {read_side(qside, qs), read_side(kside, ks)};
}

}  // namespace

BsSchedules bs_schedules(const BlockSparseProblem& p) {
  switch (p.dtype) {
    case DType::kFloat32: return schedules<F32>(p);
    case DType::kFloat16: return schedules<F16>(p);
    case DType::kBFloat16: return schedules<BF16>(p);
    default: throw std::runtime_error("tokenmix: " + bs_unsupported_reason(p));
  }
}

}  // namespace tokenmix::cuda::emulated
