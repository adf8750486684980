#!/usr/bin/env bash
# make test-wheel: a built tokenmix wheel, installed with no rebuild into a fresh virtual
# environment per torch version, runs the test suite there (docs/wheels.md).
#
#   TORCH_VERSIONS="2.10.0 2.14.1" WHEEL=dist/tokenmix-...whl bash tools/test_wheel.sh
#
# WHEEL unset: the wheel is made from the development build (`make build`'s CMake folder,
# re-used as configured, so nothing recompiles) by tools/build_wheel.py --reuse-build: the CUDA
# variant when that build has CUDA. Then, for each torch version:
#   1. a fresh venv under build/test-wheel/ with that torch from the registry (torch 2.10.0 is a
#      ~4 GB CUDA build that runs on the CPU), the test dependencies and the wheel, --no-deps;
#   2. `tokenmix info`, then the test suite from a folder outside the source tree, so `import
#      tokenmix` is the installed wheel; tests marked build_tree (they read the CMake build
#      folder or rebuild from source) are deselected, and so are those marked slow (long runs
#      over code the wheel shares with the build tree, which `make test` ran);
#   3. as root with debootstrap: the wheel's libraries load (every symbol bound) next to that
#      torch's in a Debian 11 root (glibc 2.31, from before glibc 2.34 merged libpthread, libdl
#      and librt into libc), which is what manylinux_2_28 portability is about.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
DEV_PY=${DEV_PY:-.venv/bin/python}
TORCH_VERSIONS=${TORCH_VERSIONS:-2.10.0 2.14.1}
WORK=$ROOT/build/test-wheel
mkdir -p "$WORK"
say() { echo "[test-wheel $(date +%H:%M:%S)] $*"; }

if [[ -z "${WHEEL:-}" ]]; then
  dev_build=$(ls -d build/py3-none-linux_x86_64 2>/dev/null || true)
  [[ -n "$dev_build" ]] || { echo "no development build: run 'make build' first" >&2; exit 1; }
  rm -rf "$WORK/dist"
  "$DEV_PY" tools/build_wheel.py --reuse-build "$dev_build" --out "$WORK/dist" \
    > "$WORK/build_wheel.log" 2>&1 || { tail -30 "$WORK/build_wheel.log"; exit 1; }
  WHEEL=$(ls "$WORK"/dist/tokenmix-*.whl)
fi
WHEEL=$(readlink -f "$WHEEL")
say "wheel: $(basename "$WHEEL")"

for version in $TORCH_VERSIONS; do
  venv=$WORK/torch-$version
  started=$(date +%s)
  say "torch $version: fresh venv $venv"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "torch==$version"
  "$venv/bin/pip" install -q -r tests/requirements.txt
  "$venv/bin/pip" install -q --no-deps "$WHEEL"
  say "torch $version: installed in $(($(date +%s) - started)) s"
  "$venv/bin/python" -m tokenmix info
  # A folder outside the source tree: `import tokenmix` must find the wheel, not python/.
  run_dir=$WORK/run-$version
  rm -rf "$run_dir" && mkdir -p "$run_dir"
  cp -r tests "$run_dir/tests"
  ln -s "$ROOT/bench" "$run_dir/bench"
  ln -s "$ROOT/examples" "$run_dir/examples"
  ln -s "$ROOT/docs" "$run_dir/docs"
  ln -s "$ROOT/tools" "$run_dir/tools"
  ln -s "$ROOT/csrc" "$run_dir/csrc"
  cp README.md pyproject.toml "$run_dir/"
  (cd "$run_dir" && "$venv/bin/python" -c "import tokenmix, sys; \
    assert tokenmix.__file__.startswith(sys.prefix), tokenmix.__file__" &&
    "$venv/bin/python" -m pytest -q -m "not build_tree and not slow" -n "${TEST_WORKERS:-2}" \
      --dist loadfile -p no:cacheprovider tests)
  say "torch $version: suite passed in $(($(date +%s) - started)) s in all"
  bash tools/check_old_glibc.sh "$venv" "$WORK/debian11"
done
