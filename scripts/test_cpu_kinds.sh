#!/usr/bin/env bash
# The exactness tests (pytest -m exact) again under every CPU capability below this machine's own,
# which `make test` has just run them under. Each level caps the vectorized kernels of the whole
# stack together: ATen's (ATEN_CPU_CAPABILITY), MKL's GEMMs (MKL_ENABLE_INSTRUCTIONS), oneDNN's
# (ONEDNN_MAX_CPU_ISA) and the package's own CPU exit head (EARLYEXIT_CPU_ISA). A bit-for-bit
# assumption that holds on one CPU only (an AVX-512 Intel Xeon, say, but not an AVX2 AMD EPYC)
# then fails on every machine, not only on the one CI happens to land on.
#
# int8 (issue 95): at the avx2 level fbgemm's kernels are capped too (FBGEMM_ENABLE_INSTRUCTIONS; it has no
# level below AVX2), and the int8 kernel tests (pytest -m int8_kernels) run with the exactness tests: the
# package then takes the int8 form of a CPU without VNNI, on fbgemm's saturating AVX2 kernels. ONNX
# Runtime's and OpenVINO's kernel choice cannot be capped (they read CPUID, with no override), so a last
# level runs the int8 kernel tests on an emulated AVX2-only CPU, where every library's CPUID says AVX2:
# qemu-x86_64 -cpu EPYC-Rome (AMD Zen 2: AVX2, FMA, F16C; no AVX-512, no VNNI), the CPU of issue 95's
# failing EPYC. Emulation gives the kernels' results, not their speed. Where qemu-x86_64 is not
# installed (Debian: apt-get install qemu-user; .ci/run installs it) that level says so and is skipped.
set -euo pipefail
PY=${PY:-.venv/bin/python}

# What torch picks with no override; a level above it would run instructions this CPU lacks.
native=$(env -u ATEN_CPU_CAPABILITY "$PY" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')
case "$native" in
    AVX512) levels=(avx2 default) ;;
    AVX2) levels=(default) ;;
    DEFAULT) levels=() ;;
    *) levels=(default) ;;  # another architecture (SVE256, VSX, ZVECTOR): its vectorized level against none
esac

for level in "${levels[@]}"; do
    case "$level" in
        avx2) caps=(MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 EARLYEXIT_CPU_ISA=avx2_fma
                    FBGEMM_ENABLE_INSTRUCTIONS=AVX2)
              marks="exact or int8_kernels" ;;
        default) caps=(MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 EARLYEXIT_CPU_ISA=portable)
                 marks="exact" ;;
    esac
    # Inductor's precompiled headers are made for one capability: each level compiles in its own cache.
    cache=$(mktemp -d)
    echo "test-cpu-kinds: the tests marked $marks with ATEN_CPU_CAPABILITY=$level ${caps[*]} (this CPU: $native)"
    env ATEN_CPU_CAPABILITY="$level" "${caps[@]}" TORCHINDUCTOR_CACHE_DIR="$cache" \
        "$PY" -m pytest -q -m "$marks" -p no:cacheprovider python_tests
    rm -rf "$cache"
done
[[ ${#levels[@]} -gt 0 ]] || echo "test-cpu-kinds: this CPU runs torch's portable kernels only; nothing below it"

# The emulated AVX2-only CPU. One OpenMP thread: a fork while other threads hold qemu's locks deadlocked
# the child. EEK_TEST_EMULATOR runs the tests' own subprocesses on the same emulated CPU.
emulated_cpu=EPYC-Rome
emulator=$(command -v qemu-x86_64 || true)
if [[ "$(uname -m)" != x86_64 ]]; then
    echo "test-cpu-kinds: not an x86_64 machine; no emulated AVX2-only level"
elif [[ -z "$emulator" ]]; then
    echo "test-cpu-kinds: the emulated AVX2-only level is skipped: qemu-x86_64 not found (Debian: apt-get install qemu-user)"
else
    export QEMU_CPU=$emulated_cpu OMP_NUM_THREADS=1 EEK_TEST_EMULATOR="$emulator"
    # qemu's warnings about CPUID bits its translator lacks (rdseed, sha-ni, ...) say nothing of the kernels
    quiet() { "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2); }
    class=$(quiet "$emulator" "$PY" -c 'from earlyexit_kernels.engine.layers.int8_isa import int8_isa; print(int8_isa())')
    if [[ "$class" != avx2 ]]; then
        echo "test-cpu-kinds: under qemu-x86_64 -cpu $emulated_cpu the package sees int8 class '$class', not avx2:" \
             "the int8 class must come from CPUID, as the kernels read it (earlyexit_kernels/engine/layers/int8_isa.py)" >&2
        exit 1
    fi
    echo "test-cpu-kinds: the tests marked int8_kernels on an emulated AVX2-only CPU (qemu-x86_64 -cpu $emulated_cpu)"
    # the files that hold such tests only: collecting all of python_tests under emulation takes minutes
    mapfile -t files < <(grep -l "int8_kernels" python_tests/test_*.py)
    quiet "$emulator" "$PY" -m pytest -q -m int8_kernels -p no:cacheprovider "${files[@]}"
fi
