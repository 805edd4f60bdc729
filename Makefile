# moefuse developer entry points. `make test` sets everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.moefuse-installed

.PHONY: setup test test-fast demo clean asan test-ort-versions bench gpu-build gpu-test gpu-memcheck gpu-compare gpu-trace gpu-bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned first so that the test extra resolves to the CPU build rather than a CUDA one.
$(STAMP): $(BIN)/python pyproject.toml CMakeLists.txt $(wildcard custom_ops/*) $(wildcard custom_ops/cuda/*)
	$(BIN)/python -m pip install --quiet "torch==2.13.0" || $(BIN)/python -m pip install --quiet "torch>=2.6"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(STAMP)

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

# Convert the bundled tiny model, run original and converted, print node counts, error, speed.
demo: setup
	$(BIN)/python examples/demo.py

# The custom-op library built with AddressSanitizer + UndefinedBehaviorSanitizer in its own
# build directory, and the kernel tests run against it. Python itself is not instrumented, so
# the sanitizer runtime (and libstdc++, for its exception interceptor) are preloaded.
ASAN_DIR := build/asan
ASAN_CXX ?= g++
asan: setup
	cmake -S . -B $(ASAN_DIR) -DMOEFUSE_SANITIZE=ON -DMOEFUSE_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_CXX_COMPILER=$(ASAN_CXX) -DPython_EXECUTABLE=$(abspath $(BIN)/python) > /dev/null
	cmake --build $(ASAN_DIR) -j 2
	MOEFUSE_LIBRARY=$(abspath $(ASAN_DIR))/custom_ops/libmoefuse_ops.so \
	LD_PRELOAD="$$($(ASAN_CXX) -print-file-name=libasan.so) $$(realpath $$($(ASAN_CXX) -print-file-name=libstdc++.so))" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(BIN)/pytest -q -s -p no:cacheprovider tests/test_kernel_cpu.py

# The kernel tests (and doctor's, which reads onnxruntime's profile) on the oldest onnxruntime we
# support (pyproject's floor), installed apart from the venv, and on the newest (the venv's); on
# the oldest also the fallback function's, which runs in whatever onnxruntime a user has.
ORT_OLDEST ?= 1.20.1
ORT_OLD_DIR := build/onnxruntime-$(ORT_OLDEST)
test-ort-versions: setup
	test -d $(ORT_OLD_DIR) || $(BIN)/python -m pip install --quiet --no-deps --target $(ORT_OLD_DIR) "onnxruntime==$(ORT_OLDEST)"
	PYTHONPATH=$(abspath $(ORT_OLD_DIR)) $(BIN)/python -c "import onnxruntime as o; assert o.__version__ == '$(ORT_OLDEST)', o.__version__; print('onnxruntime', o.__version__)"
	PYTHONPATH=$(abspath $(ORT_OLD_DIR)) $(BIN)/pytest -q -p no:cacheprovider tests/test_kernel_cpu.py tests/test_fallback_parity.py
	PYTHONPATH=$(abspath $(ORT_OLD_DIR)) $(BIN)/pytest -q -p no:cacheprovider tests/test_cli.py -k doctor
	$(BIN)/python -c "import onnxruntime as o; print('onnxruntime', o.__version__)"
	$(BIN)/pytest -q -p no:cacheprovider tests/test_kernel_cpu.py
	$(BIN)/pytest -q -p no:cacheprovider tests/test_cli.py -k doctor

# CPU benchmark of the MoEFFN kernel against onnxruntime's com.microsoft.MoE, the fallback
# function and the unfused export (writes benchmarks/results/cpu_moe.{json,png}).
bench: setup
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/python benchmarks/cpu_moe.py

# --- GPU (a CUDA GPU and onnxruntime-gpu; never on CI) ---
# GPU_PYTHON is the interpreter that has onnxruntime-gpu and the built library (MOEFUSE_LIBRARY).
GPU_PYTHON ?= $(BIN)/python

# The library built apart from the package, for one GPU architecture (quick to rebuild while
# working on the kernels): point MOEFUSE_LIBRARY at the path it prints. GPU_PYTHON must import
# scipy_openblas32.
GPU_ARCHS ?= 90a
GPU_BUILD := build/gpu
gpu-build:
	cmake -S . -B $(GPU_BUILD) -DMOEFUSE_CUDA=ON -DMOEFUSE_CUDA_ARCHS="$(GPU_ARCHS)" \
	  -DPython_EXECUTABLE="$$($(GPU_PYTHON) -c 'import sys; print(sys.executable)')" > /dev/null
	cmake --build $(GPU_BUILD) -j
	@echo "MOEFUSE_LIBRARY=$(abspath $(GPU_BUILD))/custom_ops/libmoefuse_ops.so"

# The CUDA kernel tests (skipped without a GPU).
gpu-test:
	$(GPU_PYTHON) -m pytest -q -p no:cacheprovider tests/test_kernel_cuda.py

# The CUDA kernel tests under compute-sanitizer's memcheck (a reduced matrix that still takes
# every kernel path; scratch buffers allocated one by one so that overruns are caught); fails on
# any memory error found in the process. Its 216 not-slow tests took about 3 minutes on an H100.
# Host backtraces are off (--show-backtrace device): to take one the checker holds the driver's
# lock at each kernel launch while it waits for Python's GIL, and a thread holding the GIL in
# onnxruntime's bindings (a stream's creation) waits for that lock, so test_concurrent_runs hung.
# MEMCHECK_SHARD=i/n runs the i-th of n parts (every n-th test), so that n runs cover it;
# MEMCHECK_K=EXPR only the tests pytest's -k EXPR selects (e.g. test_one_token_routing).
# Each test is named as it ends (-v), so that a run cut short says how far it got, and a test
# still running after MEMCHECK_STACKS seconds has every thread's Python stack printed (it goes on).
MEMCHECK_SHARD ?=
MEMCHECK_K ?=
MEMCHECK_STACKS ?= 240
gpu-memcheck:
	MOEFUSE_TEST_SHARD=$(MEMCHECK_SHARD) MOEFUSE_GPU_MEMCHECK=1 MOEFUSE_CUDA_EXACT_ALLOC=1 compute-sanitizer --tool memcheck --error-exitcode 1 --report-api-errors no \
	  --show-backtrace device --print-limit 20 $(GPU_PYTHON) -m pytest -v -p no:cacheprovider -o faulthandler_timeout=$(MEMCHECK_STACKS) \
	  -m "not slow" tests/test_kernel_cuda.py $(if $(MEMCHECK_K),-k "$(MEMCHECK_K)")

# Two builds of the library against each other (BASE=path/to/a.so NEW=path/to/b.so): outputs bit
# for bit, Nsight Compute kernel times, gpu_moe.py with both (benchmarks/gpu_compare_builds.sh).
COMPARE_DIR ?= build/gpu-compare
gpu-compare:
	PYTHON=$(GPU_PYTHON) benchmarks/gpu_compare_builds.sh "$(BASE)" "$(NEW)" $(COMPARE_DIR)

# Where a one-token call's time goes, block by block: the library built apart with per-block
# stamps in the one-token kernels (MOEFUSE_CUDA_TRACE, into build/gpu-trace), then
# benchmarks/gpu_trace.py on it (TRACE_ARGS, e.g. "--shape GPT-OSS-20B --dtype float16 --out t.json").
GPU_TRACE_BUILD := build/gpu-trace
TRACE_ARGS ?=
gpu-trace:
	cmake -S . -B $(GPU_TRACE_BUILD) -DMOEFUSE_CUDA=ON -DMOEFUSE_CUDA_ARCHS="$(GPU_ARCHS)" -DMOEFUSE_CUDA_TRACE=ON \
	  -DPython_EXECUTABLE="$$($(GPU_PYTHON) -c 'import sys; print(sys.executable)')" > /dev/null
	cmake --build $(GPU_TRACE_BUILD) -j
	MOEFUSE_LIBRARY=$(abspath $(GPU_TRACE_BUILD))/custom_ops/libmoefuse_ops.so $(GPU_PYTHON) benchmarks/gpu_trace.py $(TRACE_ARGS)

# MoEFFN vs com.microsoft.MoE on the CUDA EP (writes benchmarks/results/gpu_moe.{json,md,png}).
gpu-bench:
	$(GPU_PYTHON) benchmarks/gpu_moe.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
