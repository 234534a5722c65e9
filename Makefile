VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test lint format demo bench clean

setup:
	@VENV=$(VENV) bash scripts/setup_env.sh

test: setup lint
	$(PY) -m pytest -q python_tests

lint: setup
	@if $(PY) -m ruff --version >/dev/null 2>&1; then \
		$(PY) -m ruff check earlyexit_kernels python_tests benchmarks scripts; \
	else echo "lint: ruff not installed, skipped"; fi

format: setup
	$(PY) -m ruff format earlyexit_kernels python_tests benchmarks scripts
	$(PY) -m ruff check --fix earlyexit_kernels python_tests benchmarks scripts

demo: setup
	$(PY) -m earlyexit_kernels.demo

clean:
	rm -rf build *.egg-info $(VENV)
