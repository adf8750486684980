# tokenmix: the two set-up commands are `make demo` and `make test`.
# Both create the virtual environment, install torch (CPU build from the
# pinned version) and build the extension when needed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
THREADS ?= 2
STAMP := $(VENV)/.tokenmix-installed
SOURCES := $(shell find csrc python -type f \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.py' -o -name '*.in' \)) CMakeLists.txt pyproject.toml

.PHONY: demo test build lint format bench clean gpu-check gpu-check-wheels gpu-check-dry wheel sdist test-wheel ptx-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.deps: $(PY) tests/requirements.txt
	$(PIP) install -q "torch==$(TORCH_VERSION)" "scikit-build-core>=0.10" ninja "ruff==0.17.6" "clang-format==23.1.5"
	# CuTe headers for the emulator's layout cross-check (headers only: no dependencies)
	$(PIP) install -q --no-deps "nvidia-cutlass==4.2.0.0"
	$(PIP) install -q -r tests/requirements.txt
	# fla imports triton; CUDA builds of torch bring it, the CPU build does not.
	$(PIP) install -q --no-deps "triton==3.9.0"
	touch $@

# Incremental: scikit-build-core keeps its CMake build dir under build/.
$(STAMP): $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation .
	touch $@

build: $(STAMP)

demo: build
	$(PY) -m tokenmix info
	$(PY) bench/bench_na.py --threads $(THREADS) --case 2d
	$(PY) bench/bench_linear.py --threads $(THREADS)
	$(PY) bench/bench_block_sparse.py --threads $(THREADS) --case random --block-size 64
	$(PY) bench/bench_distributed.py --threads $(THREADS) --quick --world 2 --case na-2d gated-delta bs-sliding
	$(PY) bench/bench_fft.py --threads $(THREADS) --case conv-4k

# The suite on TEST_WORKERS processes (pytest-xdist), each test file on one of them (module
# fixtures such as the SASS report and the emulator's own build are made once).
TEST_WORKERS ?= 2
test: build lint
	$(PY) -m tokenmix info
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: build
	$(PY) bench/bench_na.py --threads $(THREADS) --markdown
	$(PY) bench/bench_linear.py --threads $(THREADS) --markdown
	$(PY) bench/bench_block_sparse.py --threads $(THREADS) --markdown
	$(PY) bench/bench_distributed.py --threads $(THREADS) --markdown
	$(PY) bench/bench_fft.py --threads $(THREADS) --markdown

# Release wheels into dist/: +cpu and +cu130, manylinux_2_28 (tools/build_wheel.py, docs/wheels.md).
# The CUDA wheel is built with the CUDA 13.0 toolchain from the package registry, installed into
# $(CUDA_TOOLCHAIN); tools/cuda12/Dockerfile builds the CUDA 12 variants.
CUDA_TOOLCHAIN := build/cuda-13.0
$(CUDA_TOOLCHAIN)/.installed: $(VENV)/.deps
	$(PIP) install -q --no-deps --target $(CUDA_TOOLCHAIN) "nvidia-cuda-nvcc==13.0.88" \
	  "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-runtime==13.0.96" \
	  "nvidia-cuda-cccl==13.0.85"
	# The packages' layout as a toolkit's: nvcc links from lib64, CMake's FindCUDAToolkit looks
	# for libcudart.so (the wheel links libcudart_static.a).
	ln -sfn lib $(CUDA_TOOLCHAIN)/nvidia/cu13/lib64
	ln -sfn libcudart.so.13 $(CUDA_TOOLCHAIN)/nvidia/cu13/lib/libcudart.so
	touch $@

wheel: $(VENV)/.deps $(CUDA_TOOLCHAIN)/.installed
	$(PY) tools/build_wheel.py --variant cpu
	$(PY) tools/build_wheel.py --variant cuda --cuda-home $(CUDA_TOOLCHAIN)/nvidia/cu13

sdist: $(VENV)/.deps
	$(PY) -m build --sdist --no-isolation --outdir dist .

# A wheel (WHEEL=..., default: one packaged from `make build`'s folder) in a fresh venv per
# torch version, running the test suite (tools/test_wheel.sh). CI runs it for torch 2.10.0.
TEST_WHEEL_TORCH ?= 2.10.0 2.14.1
WHEEL ?=
test-wheel: build
	TORCH_VERSIONS="$(TEST_WHEEL_TORCH)" WHEEL="$(WHEEL)" PYTHON=$(PYTHON) DEV_PY=$(PY) \
	  bash tools/test_wheel.sh

# On a GPU machine (python3 with a CUDA torch, no package registry): builds for its device there
# and runs the GPU tests, profilers, sanitizers and benchmarks into $(OUT). See tools/gpu_check.sh.
OUT ?= $(CURDIR)/gpu-check-out
gpu-check:
	OUT="$(OUT)" PYTHON=python3 bash tools/gpu_check.sh

# flash-linear-attention for the GPU check's linear benchmark (fla's Triton kernels). The GPU machine
# has no package registry: download the wheels here, then send them with the checkout (they are
# git-ignored: the device run's carry names gpu-check-wheels).
gpu-check-wheels: $(PY)
	$(PIP) download -q --no-deps --only-binary=:all: -d gpu-check-wheels \
	  "fla-core==0.6.0" "einops==0.8.2"

# The same script on this machine, up to each step's first GPU call (the test suite runs it too).
gpu-check-dry: build
	OUT="$(OUT)" PYTHON=$(PY) bash tools/gpu_check.sh --dry-run

# The library's embedded PTX assembled ahead of time: for sm_100 and sm_120, which get no SASS and
# JIT the compute_90 PTX, with CUDA 13's ptxas; for sm_80 and sm_90 with CUDA 12.6's (the
# nvidia-cuda-nvcc-cu12 test dependency) at PTX ISA 8.5. Both run; either failing fails the
# target. See docs/cuda_engine.md.
ptx-check: build
	rc=0; \
	$(PY) -m tokenmix ptx-check --arch 100 120 || rc=1; \
	$(PY) -m tokenmix ptx-check --cuda 12 --ptx-version 8.5 --arch 80 90 || rc=1; \
	exit $$rc

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check python tests bench tools examples
	$(VENV)/bin/ruff format --check python tests bench tools examples
	$(VENV)/bin/clang-format --dry-run --Werror $$(find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu')

format: $(VENV)/.deps
	$(VENV)/bin/ruff format python tests bench tools examples
	$(VENV)/bin/clang-format -i $$(find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu')

clean:
	rm -rf build $(VENV)
