#!/usr/bin/env bash
# `make gpu-check`: everything tokenmix can learn from a few minutes on a GPU machine, in one run.
#
# The machine (see docs/cuda_engine.md, "The GPU check") has python3 with a CUDA torch, nvcc,
# cmake, ninja and scikit-build-core, no package registry, and about 9 minutes for this script.
# Steps, most important first, each with its own time limit and all within one budget
# ($GPU_CHECK_BUDGET seconds, default 520), so a slow step cannot starve the rest:
#   1. build for the device's architecture only (no emulator), --no-build-isolation
#   2. `python -m tokenmix info`
#   3. every GPU test (tests/*device*.py)
#   4. ncu on the forward and the backward kernels: tensor-pipe and issue-slot utilization
#   5. compute-sanitizer memcheck and racecheck on small checked cases (tools/gpu_kernels.py)
#   6. flash-linear-attention's wheels (gpu-check-wheels/, from `make gpu-check-wheels` on a
#      machine with the registry, carried with the checkout) into a directory of their own
#   7. the benchmarks with --device cuda against SDPA and FlexAttention (one case each), and
#      GLA and the gated delta rule against the chunked PyTorch path and causal SDPA, then
#      (a step of its own: Triton compiles on first use) against fla's Triton kernels
# Results go to $OUT (default ./gpu-check-out): summary.txt plus one log per step.
#
# --dry-run (or GPU_CHECK_DRY=1) runs the same steps on a machine without a GPU, up to each
# step's first GPU call: no build (the installed tokenmix is used), the tests collected instead
# of run, the sanitizer and profiler workloads on the CPU, the benchmarks' cases on the CPU
# kernels. The test suite runs it, so the script is known to work before a GPU machine sees it.
set -u
DRY=${GPU_CHECK_DRY:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$PWD/gpu-check-out}
BUDGET=${GPU_CHECK_BUDGET:-520}
PY=$(command -v "${PYTHON:-python3}") || { echo "gpu-check: no ${PYTHON:-python3}"; exit 1; }
case $PY in /*) ;; *) PY=$PWD/$PY ;; esac # absolute, but not resolved: a venv's python stays one
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1
start=$(date +%s)
failures=0
log() { echo "== [$(($(date +%s) - start)) s] $*" | tee -a "$OUT/summary.txt"; }
# step NAME LIMIT_S CMD...: runs CMD with a time limit (cut to what is left of the budget), its
# output in $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - start)))
  if [ $left -lt 15 ]; then
    log "$name: skipped (the ${BUDGET} s budget is spent)"
    failures=$((failures + 1))
    return 1
  fi
  [ $limit -gt $left ] && limit=$left
  log "$name (limit ${limit} s): $*"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -5 "$OUT/$name.log" | sed 's/^/   /' | tee -a "$OUT/summary.txt"
  if [ $rc -ne 0 ]; then
    failures=$((failures + 1))
    [ $rc -eq 124 ] && log "$name: stopped at its ${limit} s limit" || log "$name: exit $rc"
  fi
  return $rc
}

if [ "$DRY" = 1 ]; then
  log "dry run: no GPU calls (python: $($PY -c 'import sys; print(sys.executable)'))"
  DEVICE=cpu
else
  DEVICE=cuda
  nvidia-smi -L 2>&1 | tee -a "$OUT/summary.txt"
  arch=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')") || {
    log "torch sees no CUDA device: nothing to check"
    exit 1
  }
  log "building for sm_$arch with $(nproc) jobs"
  # PIP_BREAK_SYSTEM_PACKAGES: the machine's python3 may be an "externally managed" one
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) PIP_BREAK_SYSTEM_PACKAGES=1 step build 330 \
    "$PY" -m pip install -q --no-build-isolation --no-deps \
    -C cmake.define.TOKENMIX_CUDA=ON -C "cmake.define.TOKENMIX_CUDA_ARCHS=$arch" \
    -C cmake.define.TOKENMIX_EMULATOR=OFF -C build-dir=build/gpu-check . ||
    { log "build failed: see $OUT/build.log"; exit 1; }
fi

# Run from outside the checkout so `import tokenmix` is the installed package.
step info 60 bash -c 'cd /tmp && "$0" -m tokenmix info' "$PY"

tests=$(ls tests/*device*.py)
if [ "$DRY" = 1 ]; then
  step device-tests 120 "$PY" -m pytest -q --collect-only -p no:cacheprovider $tests
else
  step device-tests 150 "$PY" -m pytest -q -p no:cacheprovider $tests
fi

kernels=(tools/gpu_kernels.py --device "$DEVICE")

# ncu: the neighborhood family's forward kernel, then its dQ and dK/dV kernels (the SASS model's
# subjects). The metrics are the tensor pipe's share of active cycles and the issue-slot use.
metrics=sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
metrics+=,sm__inst_issued.avg.pct_of_peak_sustained_active
metrics+=,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum
for which in fwd bwd; do
  if [ "$DRY" = 1 ]; then
    step "profile-$which" 60 "$PY" "${kernels[@]}" --family na --pass "$which"
  elif command -v ncu >/dev/null; then
    # two launches of each kernel (the forward; the backward's dQ and dK/dV)
    names="regex:na_forward_kernel" count=2 expect="na_forward_kernel"
    [ "$which" = bwd ] && names="regex:na_backward_(dq|dkdv)_kernel" count=4 expect="na_backward_d"
    step "ncu-$which" 90 ncu --target-processes all --kernel-name "$names" --launch-count "$count" \
      --metrics "$metrics" "$PY" "${kernels[@]}" --family na --pass "$which" &&
      if ! grep -q "$expect" "$OUT/ncu-$which.log"; then
        log "ncu-$which: no $expect launch was profiled"
        failures=$((failures + 1))
      fi
  else
    log "ncu not found: the $which profile is missing"
    failures=$((failures + 1))
  fi
done

# The sanitizer runs double as correctness checks: gpu_kernels.py --small compares every output
# and gradient with the float64 reference. PyTorch's caching allocator would hide out-of-bounds
# accesses inside its blocks from memcheck, so it is off for these runs.
if [ "$DRY" = 1 ]; then
  step sanitizer 60 "$PY" "${kernels[@]}" --small
elif command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "sanitizer-$tool" 60 compute-sanitizer \
      --tool "$tool" --error-exitcode 3 "$PY" "${kernels[@]}" --small
  done
else
  log "compute-sanitizer not found: the small cases run without it"
  failures=$((failures + 1))
  step small-cases 60 "$PY" "${kernels[@]}" --small
fi

# fla for bench-linear, installed beside the machine's packages (PYTHONPATH), not into them.
WHEELS=${GPU_CHECK_WHEELS:-$PWD/gpu-check-wheels}
fla_site=$(mktemp -d)
trap 'rm -rf "$fla_site"' EXIT
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  step fla-wheels 60 "$PY" -m pip install -q --no-index --no-deps --target "$fla_site" \
    "$WHEELS"/*.whl
else
  log "fla-wheels: no wheels in $WHEELS (make gpu-check-wheels, then carry gpu-check-wheels):" \
    "bench-linear runs without fla"
  [ "$DRY" = 1 ] || failures=$((failures + 1))
fi

bench_args=(--device cuda --markdown)
# dry run: the same cases through the CPU kernels, tokenmix only, one timed call
[ "$DRY" = 1 ] && bench_args=(--device cpu --backends tokenmix --forward --repeats 1 --markdown)
step bench-na 120 "$PY" bench/bench_na.py --case 2d "${bench_args[@]}"
step bench-block-sparse 120 "$PY" bench/bench_block_sparse.py --case random --block-size 64 \
  "${bench_args[@]}"
# The scans: fused (CUDA kernels) against the chunked PyTorch path and causal SDPA.
linear_args=(--device cuda --markdown --backends fused,chunked,sdpa)
[ "$DRY" = 1 ] && linear_args=(--device cpu --backends fused --forward --repeats 1 --markdown)
step bench-linear 120 "$PY" bench/bench_linear.py --variant gla,gated_delta --T 8192 \
  "${linear_args[@]}"
# fla's Triton kernels compile and autotune on first use: a step of their own, so a slow
# compile cannot cost the rows above.
fla_args=(--device cuda --markdown --backends fused,fla-triton)
[ "$DRY" = 1 ] && fla_args=(--device cpu --backends fused,fla-triton --forward --repeats 1 --markdown)
step bench-linear-fla 150 env PYTHONPATH="$fla_site${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" bench/bench_linear.py --variant gla,gated_delta --T 8192 "${fla_args[@]}"

log "done: $failures step(s) failed; results in $OUT"
[ $failures -eq 0 ]
