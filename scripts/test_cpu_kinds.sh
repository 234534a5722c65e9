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
# package then takes the int8 form of a CPU without VNNI, on fbgemm's saturating AVX2 kernels, as on an
# AVX2-only AMD EPYC. ONNX Runtime's kernel choice cannot be capped: MLAS reads CPUID, with no override,
# so its layers keep this CPU's kernel, which computes the AVX2 form exactly wherever it runs (with VNNI
# in 32-bit sums; without it, 7-bit weights no 16-bit pair sum can overflow). The AVX2 kernels of ONNX
# Runtime themselves run only on such a CPU: `make test` there.
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
