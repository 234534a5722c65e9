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

if [[ -f "$STAMP" && "$STAMP" -nt setup.py && "$STAMP" -nt pyproject.toml ]]; then
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
missing=()
"$VENV/bin/python" -c "import transformers, sys; sys.exit(int(transformers.__version__.split('.')[0]) != 5)" \
    >/dev/null 2>&1 || missing+=("transformers>=5.17,<6")
for module in safetensors numpy pytest setuptools wheel; do
    "$VENV/bin/python" -c "import $module" >/dev/null 2>&1 || missing+=("$module")
done
# Triton kernels (run on the CPU through TRITON_INTERPRET=1 in the tests); GPU images ship it with torch.
# Triton publishes Linux wheels only.
[[ "$(uname -s)" != Linux ]] || "$VENV/bin/python" -c "import triton" >/dev/null 2>&1 || missing+=("triton>=3.6,<4")
"$VENV/bin/python" -c "import ruff" >/dev/null 2>&1 || command -v ruff >/dev/null 2>&1 || missing+=("ruff")
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    "${PIP[@]}" install "${missing[@]}"
fi

echo "setup: building and installing earlyexit_kernels"
"${PIP[@]}" install --no-build-isolation --no-deps -e .
touch "$STAMP"
