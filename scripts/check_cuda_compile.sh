#!/usr/bin/env bash
# Compile every .cu under csrc/ with nvcc for sm_80 and sm_90 (-Xptxas -v) and fail on a
# compile error, on any register spill or on any local-memory stack frame in the kernels
# (a register array indexed at run time lands there). No GPU and no CUDA torch needed: the
# .cu files include no torch headers.
#
# Then syntax-check the CUDA binding csrc/bindings_cuda.cpp (it needs c10/cuda) against the
# include/ folder of torch: TORCH_CUDA_INCLUDE when set (a CUDA build of torch: unzip it from
# the wheel, `pip download torch==<version> --no-deps`, then `unzip whl 'torch/include/*'`),
# else the torch of .venv (or of python3): a CPU wheel ships the c10/cuda headers too, all
# but the generated c10/cuda/impl/cuda_cmake_macros.h, which is stood in for here. Set
# TORCH_CUDA_INCLUDE=none to skip this check.
#
# Then link a small shared object from plain C++ and a .cu (no torch, no CUDA runtime: its
# registration calls stay undefined, as in any extension) with the link arguments of setup.py's
# extension_link_args and run scripts/check_libstdcxx.sh on it: it must not define libstdc++'s
# stream or locale code, also where a -static-libstdc++ sits ahead on the line (as one baked into
# Python's LDSHARED would); and the check must catch the copy that -static-libstdc++ alone makes.
#
# The Triton kernels are compiled for sm_80/sm_90 by `make triton-check`
# (python_tests/triton_compile_check.py), which needs Triton, not nvcc.
#
# The CUDA kernels' logic is tested on the CPU by python_tests/test_cuda_kernels.py (a CPU
# emulation of the CUDA execution model); on a GPU by the same tests and scripts/gpu_session.sh.
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
# The CUDA binding against torch's headers, in the background beside the nvcc compiles.
check_binding() {
    PY=.venv/bin/python
    [[ -x "$PY" ]] || PY=$(command -v python3 || true)
    TORCH_CUDA_INCLUDE=${TORCH_CUDA_INCLUDE:-}
    if [[ -z "$TORCH_CUDA_INCLUDE" ]]; then
        if [[ -n "$PY" ]]; then
            TORCH_CUDA_INCLUDE=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null || true)
        fi
    fi
    if [[ "$TORCH_CUDA_INCLUDE" == "none" ]]; then
        :
    elif [[ -z "$TORCH_CUDA_INCLUDE" || ! -f "$TORCH_CUDA_INCLUDE/c10/cuda/CUDAGuard.h" ]]; then
        echo "cuda-check: no torch include/ with c10/cuda found: csrc/bindings_cuda.cpp not checked" >&2
    else
        stand_ins=()
        if [[ ! -f "$TORCH_CUDA_INCLUDE/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
            mkdir -p "$TMP/include/c10/cuda/impl"
            printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$TMP/include/c10/cuda/impl/cuda_cmake_macros.h"
            stand_ins=(-I"$TMP/include")
        fi
        cuda_include="$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include"
        [[ -f "$cuda_include/cuda_runtime_api.h" ]] || cuda_include=$(find / -path /proc -prune -o -name cuda_runtime_api.h -path '*cuda*/include/*' -print -quit 2>/dev/null | xargs -r dirname)
        if "${CXX:-g++}" -std=c++17 -fsyntax-only -w -DEEK_WITH_CUDA=1 -Icsrc -I"$TORCH_CUDA_INCLUDE" \
            -I"$TORCH_CUDA_INCLUDE/torch/csrc/api/include" "${stand_ins[@]}" -I"$cuda_include" csrc/bindings_cuda.cpp; then
            echo "cuda-check: csrc/bindings_cuda.cpp compiles against $TORCH_CUDA_INCLUDE"
        else
            echo "cuda-check: csrc/bindings_cuda.cpp FAILED against $TORCH_CUDA_INCLUDE" >&2
            return 1
        fi
    fi
    return 0
}

check_binding >"$TMP/binding.out" 2>&1 &
binding_pid=$!

status=0
# Every (source, arch) compile at once, in the background (each one nvcc process on one core);
# their logs are read in order once all are done.
pids=()
for src in "${SOURCES[@]}"; do
    for arch in $ARCHS; do
        name="$(basename "$src").sm_$arch"
        "$NVCC" -c -std=c++17 -O3 -Icsrc -gencode="arch=compute_$arch,code=sm_$arch" -Xptxas -v \
            "$src" -o "$TMP/$name.o" >"$TMP/$name.log" 2>&1 &
        pids+=("$!")
    done
done
i=0
for src in "${SOURCES[@]}"; do
    for arch in $ARCHS; do
        log="$TMP/$(basename "$src").sm_$arch.log"
        if ! wait "${pids[$i]}"; then
            i=$((i + 1))
            echo "cuda-check: FAILED to compile $src for sm_$arch:" >&2
            cat "$log" >&2
            status=1
            continue
        fi
        i=$((i + 1))
        kernels=$(grep -c "Compiling entry function" "$log")
        spills=$(grep -E "bytes spill (stores|loads)" "$log" | grep -vE "\b0 bytes spill stores, 0 bytes spill loads" || true)
        frames=$(grep -E "bytes stack frame" "$log" | grep -vE "\b0 bytes stack frame" || true)
        if [[ -n "$spills" || -n "$frames" ]]; then
            echo "cuda-check: register spills or local-memory stack frames in $src for sm_$arch:" >&2
            grep -E "Compiling entry function|bytes stack frame" "$log" |
                grep -B1 -E "([1-9][0-9]* bytes stack frame|[1-9][0-9]* bytes spill)" >&2
            status=1
        else
            echo "cuda-check: $src sm_$arch: $kernels kernels, no spills, no stack frames"
        fi
    done
done

# libstdc++ linked as the shared library (the first GPU session's _C carried its own copy).
check_link() {
    local py=.venv/bin/python cxx=${CXX:-g++} link_args ldflags
    [[ -x "$py" ]] || py=python3
    # setup.py's own list (and its stripping of $LDFLAGS), loaded without running setup().
    if ! { read -r link_args && read -r ldflags; } < <("$py" -c '
import os, runpy, shlex
ns = runpy.run_path("setup.py", run_name="eek_setup_flags")
print(shlex.join(ns["extension_link_args"]()))
print(shlex.join(ns["strip_static_runtime"](shlex.split(os.environ.get("LDFLAGS", "")))))
'); then
        echo "cuda-check: could not read setup.py's extension_link_args with $py" >&2
        return 1
    fi
    cat >"$TMP/link_probe.cpp" <<'CPP'
#include <sstream>
#include <stdexcept>
void eek_probe_check(long index, long rows) {
    if (index >= rows) {
        std::ostringstream message;
        message << "index " << index << " out of range for " << rows << " rows";
        throw std::out_of_range(message.str());
    }
}
CPP
    cat >"$TMP/link_probe.cu" <<'CU'
#include <sstream>
#include <string>
__global__ void eek_probe_kernel(float* x, long n) {
    long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x;
    if (i < n) x[i] *= 2.0f;
}
std::string eek_probe_launch_message(long blocks) {
    std::ostringstream message;
    message << "launching " << blocks << " blocks";
    return message.str();
}
CU
    local first_arch=${ARCHS%% *}
    if ! "$cxx" -std=c++17 -O3 -fPIC -c "$TMP/link_probe.cpp" -o "$TMP/link_probe_cpp.o" ||
        ! "$NVCC" -std=c++17 -O3 -Xcompiler -fPIC -gencode="arch=compute_$first_arch,code=sm_$first_arch" \
            -c "$TMP/link_probe.cu" -o "$TMP/link_probe_cu.o"; then
        echo "cuda-check: FAILED to compile the link probe" >&2
        return 1
    fi
    local objects=("$TMP/link_probe_cpp.o" "$TMP/link_probe_cu.o") args ok=0
    read -ra args <<<"$link_args"
    read -ra ldflags <<<"$ldflags"
    # As setup.py links the extension; then with a -static-libstdc++ ahead that escaped the stripping.
    "$cxx" -shared "${ldflags[@]}" "${objects[@]}" "${args[@]}" -o "$TMP/link_probe.so" &&
        "$cxx" -shared -static-libstdc++ "${ldflags[@]}" "${objects[@]}" "${args[@]}" -o "$TMP/link_probe_static_ahead.so" &&
        bash scripts/check_libstdcxx.sh "$TMP/link_probe.so" "$TMP/link_probe_static_ahead.so" || ok=1
    if ((ok == 0)); then
        echo "cuda-check: C++ and CUDA objects linked with setup.py's link args ($link_args) take libstdc++ from the shared library"
    else
        echo "cuda-check: FAILED: libstdc++ linked into a shared object built with setup.py's link args ($link_args)" >&2
    fi
    # The check itself: -static-libstdc++ without those args copies libstdc++ in, and it must say so.
    if "$cxx" -shared -static-libstdc++ "${objects[@]}" -o "$TMP/link_probe_static.so" 2>/dev/null; then
        if bash scripts/check_libstdcxx.sh "$TMP/link_probe_static.so" >/dev/null 2>&1; then
            echo "cuda-check: FAILED: scripts/check_libstdcxx.sh passes a shared object linked with -static-libstdc++" >&2
            ok=1
        fi
    else
        echo "cuda-check: no libstdc++.a here: the check's own negative case not run"
    fi
    return $ok
}
check_link || status=1

if wait "$binding_pid"; then
    cat "$TMP/binding.out"
else
    cat "$TMP/binding.out" >&2
    status=1
fi
exit $status
