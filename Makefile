# make test   - set up .venv from nothing, build vitops, run the test suite (what CI runs)
# make bench  - set up the same way, run the benchmark suite on the best device present (about 6 minutes on 2
#               CPU cores): prints the tables, writes .bench/<device>.json (git-ignored); BENCH_ARGS="--save --plot"
#               writes benchmarks/results/<device>.json and a PNG chart instead, BENCH_ARGS=--quick a 3-minute run
# make gpu-check - on a GPU machine with torch already installed: build, test and benchmark on the GPU
# make gpu-static - no GPU needed: registers, spills, occupancy and tensor-core use of every kernel for sm_80 and
#                  sm_90 (benchmarks/static.py), written to benchmarks/results/static-sm90.json
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
export PIP_DISABLE_PIP_VERSION_CHECK := 1

SOURCES := setup.py pyproject.toml vitops/ops/schemas.def $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: test bench gpu-check gpu-static cpp-test info clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" numpy ninja pybind11 pytest hypothesis timm build
	touch $@

# The extension: rebuilt when a source changes.
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

info: $(VENV)/.built
	$(PY) -m vitops info

test: $(VENV)/.built
	$(PY) -m vitops info
	$(MAKE) cpp-test PY=$(PY)
	$(PY) -m pytest tests -q -ra

# The C++ library for libtorch users, and a ctest program that calls an op through the dispatcher.
cpp-test:
	TORCH_CUDA_ARCH_LIST="8.0;9.0" cmake -S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  $(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc) \
	  > build-cmake.log 2>&1 || { cat build-cmake.log; exit 1; }
	cmake --build build-cmake
	ctest --test-dir build-cmake --output-on-failure

BENCH_ARGS ?=
bench: $(VENV)/.built
	$(PY) -m benchmarks $(BENCH_ARGS)

gpu-static: $(VENV)/.built
	env -u TRITON_INTERPRET $(PY) -m benchmarks.static

# On the lent GPU machine: its python3 already has torch, triton, timm and ninja, and it can't reach PyPI. The
# extension is built in place for the GPU present only (faster), and each step can run on its own, within the
# device tool's 10 minutes per command: make gpu-build, then gpu-test and gpu-bench.
GPU_OUT := $(if $(OUT),$(OUT),benchmarks/results)
GPU_ARCH = $(shell python3 -c 'import torch; c = torch.cuda.is_available(); \
  print("%d.%d" % torch.cuda.get_device_capability() if c else "8.0;9.0+PTX")' 2>/dev/null)
.PHONY: gpu-build gpu-test gpu-bench
gpu-build:
	mkdir -p $(GPU_OUT)
	TORCH_CUDA_ARCH_LIST="$(GPU_ARCH)" VITOPS_BUILD_CUDA=1 python3 setup.py -q build_ext --inplace 2>&1 \
	  | tee $(GPU_OUT)/gpu-build.txt | tail -n 30
	python3 -m vitops info | tee $(GPU_OUT)/gpu-check-info.txt
gpu-test:
	-python3 -m pytest tests -q -ra 2>&1 | tee $(GPU_OUT)/gpu-check-tests.txt | tail -n 40
gpu-bench:
	python3 -m benchmarks --out $(GPU_OUT) $(BENCH_ARGS)
gpu-check: gpu-build gpu-test gpu-bench

clean:
	rm -rf build build-cmake *.egg-info vitops/_C*.so
