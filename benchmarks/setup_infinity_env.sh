#!/usr/bin/env bash
# Infinity (michaelfeil/infinity, `infinity_emb`) in a virtual environment of its own, for the
# peers of the serving benchmark (python -m earlyexit_kernels.bench.serve_load --infinity-python
# .venv-infinity/bin/python). Never a requirement of earlyexit_kernels: the benchmark skips the
# peers, with the reason, where this environment is absent.
#
# torch==2.13.0 first: pip then takes the CPU wheel where one lies in pip's find-links (or give
# TORCH_INDEX=https://download.pytorch.org/whl/cpu); an unpinned torch pulled in by infinity-emb
# would fetch several GB of CUDA packages.
# Then infinity-emb[server,torch,optimum] (transformers, optimum, onnxruntime), with torch held
# at 2.13.0 by a constraint so that no resolver step replaces it.
set -euo pipefail
VENV=${VENV:-.venv-infinity}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}

[[ -d "$VENV" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup_infinity_env: installing $TORCH (CPU)"
    "${PIP[@]}" install "$TORCH" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
fi
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" >"$constraint"
echo "setup_infinity_env: installing infinity-emb[server,torch,optimum] (torch held at $(cat "$constraint"))"
"${PIP[@]}" install "infinity-emb[server,torch,optimum]" -c "$constraint"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

names = ("infinity_emb", "torch", "transformers", "optimum", "onnxruntime")
print("setup_infinity_env: " + ", ".join(f"{n} {md.version(n.replace('_', '-'))}" for n in names))
PY
