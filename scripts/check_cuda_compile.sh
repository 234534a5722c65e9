#!/usr/bin/env bash
# Compile every .cu under csrc/ with nvcc for sm_80 and sm_90 (-Xptxas -v) and fail on a
# compile error or on any register spill in the kernels. No GPU and no CUDA torch needed:
# the .cu files include no torch headers.
#
# With TORCH_CUDA_INCLUDE set to the include/ folder of a CUDA build of torch (unzip it
# from the wheel: `pip download torch==<version> --no-deps`, then `unzip whl 'torch/include/*'`),
# the CUDA binding csrc/bindings_cuda.cpp, which needs c10/cuda, is syntax-checked too.
#
# Usage: scripts/check_cuda_compile.sh   (NVCC=/path/to/nvcc, CUDA_ARCHS="80 90" to override)
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCHS=${CUDA_ARCHS:-"80 90"}
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "cuda-check: nvcc not found" >&2
    exit 1
fi
mapfile -t SOURCES < <(find csrc -name '*.cu' | sort)
if ((${#SOURCES[@]} == 0)); then
    echo "cuda-check: no .cu files under csrc/" >&2
    exit 1
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
status=0
for src in "${SOURCES[@]}"; do
    for arch in $ARCHS; do
        log="$TMP/$(basename "$src").sm_$arch.log"
        if ! "$NVCC" -c -std=c++17 -O3 -Icsrc -gencode="arch=compute_$arch,code=sm_$arch" -Xptxas -v \
            "$src" -o "$TMP/out.o" >"$log" 2>&1; then
            echo "cuda-check: FAILED to compile $src for sm_$arch:" >&2
            cat "$log" >&2
            status=1
            continue
        fi
        kernels=$(grep -c "Compiling entry function" "$log")
        spills=$(grep -E "bytes spill (stores|loads)" "$log" | grep -vE "\b0 bytes spill stores, 0 bytes spill loads" || true)
        if [[ -n "$spills" ]]; then
            echo "cuda-check: register spills in $src for sm_$arch:" >&2
            grep -E "Compiling entry function|bytes spill" "$log" | grep -B1 -E "[1-9][0-9]* bytes spill" >&2
            status=1
        else
            echo "cuda-check: $src sm_$arch: $kernels kernels, no spills"
        fi
    done
done
if [[ -n "${TORCH_CUDA_INCLUDE:-}" ]]; then
    cuda_include="$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include"
    [[ -f "$cuda_include/cuda_runtime_api.h" ]] || cuda_include=$(find / -path /proc -prune -o -name cuda_runtime_api.h -path '*cuda*/include/*' -print -quit 2>/dev/null | xargs -r dirname)
    if "${CXX:-g++}" -std=c++17 -fsyntax-only -w -DEEK_WITH_CUDA=1 -Icsrc -I"$TORCH_CUDA_INCLUDE" \
        -I"$TORCH_CUDA_INCLUDE/torch/csrc/api/include" -I"$cuda_include" csrc/bindings_cuda.cpp; then
        echo "cuda-check: csrc/bindings_cuda.cpp compiles against $TORCH_CUDA_INCLUDE"
    else
        echo "cuda-check: csrc/bindings_cuda.cpp FAILED against $TORCH_CUDA_INCLUDE" >&2
        status=1
    fi
fi
exit $status
