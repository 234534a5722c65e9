#!/usr/bin/env bash
# Prepare the project's virtual environment once: `make demo` and `make test` call this.
#
# - torch already importable by python3 (a GPU image): the venv sees the system's
#   packages and nothing is fetched; only what is missing is installed.
# - no torch: install torch==2.13.0, the CPU wheel on a machine without a GPU
#   (never an unpinned torch, which would pull several GB of CUDA packages).
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.eek-setup-done"

# Done already, unless the build inputs (setup.py, pyproject.toml, csrc/) changed since.
if [[ -f "$STAMP" && "$STAMP" -nt setup.py && "$STAMP" -nt pyproject.toml && -z "$(find csrc -newer "$STAMP" -print -quit)" ]]; then
    exit 0
fi

if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: using the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
    [[ -d "$VENV" ]] || "$PYTHON" -m venv --system-site-packages "$VENV"
else
    [[ -d "$VENV" ]] || "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0"
    "${PIP[@]}" install "torch==2.13.0"
fi

# Install only what is missing, so an offline GPU image with everything present fetches nothing.
has() { "$VENV/bin/python" -c "import $1" >/dev/null 2>&1; }
required=()
"$VENV/bin/python" -c "import transformers, sys; sys.exit(int(transformers.__version__.split('.')[0]) != 5)" \
    >/dev/null 2>&1 || required+=("transformers>=5.17,<6")
for module in safetensors numpy tqdm pytest setuptools wheel; do
    has "$module" || required+=("$module")
done
if ((${#required[@]})); then
    echo "setup: installing ${required[*]}"
    "${PIP[@]}" install "${required[@]}"
fi

# Optional: without them the package still works and the tests that need them are skipped.
# Triton kernels run on the CPU through TRITON_INTERPRET=1 in the tests; GPU images ship
# Triton with torch. Triton publishes Linux wheels only.
optional=()
[[ "$(uname -s)" != Linux ]] || has triton || optional+=("triton>=3.6,<4")
has ruff || command -v ruff >/dev/null 2>&1 || optional+=("ruff")
has ray.data || optional+=("ray[data]>=2.40")  # earlyexit_kernels.ray; its tests are skipped without it
has ray.serve || optional+=("ray[serve]>=2.40")  # `eek serve --replicas`
has onnxruntime || optional+=("onnxruntime>=1.17")  # --dtype int8 on ONNX Runtime's kernels (engine/layers/ort_layer.py)
has onnx || optional+=("onnx>=1.15")  # builds its graphs
# the openvino extra: OpenVINO's layers (engine/layers/ov_layer.py: the per-token-ov recipe, --layers openvino) and
# NNCF's static int8 (the benchmarks' OpenVINO peer), so that make test runs their tests where wheels exist
has openvino || optional+=("openvino>=2025.1")
has nncf || optional+=("nncf>=2.14")
has xdist || optional+=("pytest-xdist")  # make test runs the suite on every core (scripts/run_tests.sh)
# the server (earlyexit_kernels.integrations.server; swagger_ui: Swagger UI 5, the files of its /docs), its tests' HTTP client and the fuzzer of its
# routes (schemathesis: python_tests/test_server_fuzz.py)
for package in matplotlib datasets accelerate pytest_benchmark pyarrow pandas starlette uvicorn prometheus_client pydantic httpx schemathesis; do
    has "$package" || optional+=("${package//_/-}")
done
has swagger_ui || optional+=("swagger-ui-py>=25")  # its module is swagger_ui
has aiohttp || optional+=("aiohttp")  # the serving benchmarks' load client (earlyexit_kernels/bench/load_client.py)
has websockets || optional+=("websockets")  # drives Chromium over DevTools in python_tests/test_docs_page_browser.py
for package in "${optional[@]}"; do
    echo "setup: installing $package (optional)"
    "${PIP[@]}" install --retries 1 --timeout 15 "$package" \
        || echo "setup: could not install $package; what needs it is skipped"
done

echo "setup: building and installing earlyexit_kernels"
"${PIP[@]}" install --no-build-isolation --no-deps -e .
touch "$STAMP"
