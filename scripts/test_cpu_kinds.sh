#!/usr/bin/env bash
# The exactness tests (pytest -m exact) again under every CPU capability below this machine's own,
# which `make test` has just run them under. Each level caps the vectorized kernels of the whole
# stack together: ATen's (ATEN_CPU_CAPABILITY), MKL's GEMMs (MKL_ENABLE_INSTRUCTIONS), oneDNN's
# (ONEDNN_MAX_CPU_ISA) and the package's own CPU exit head (EARLYEXIT_CPU_ISA). A bit-for-bit
# assumption that holds on one CPU only (an AVX-512 Intel Xeon, say, but not an AVX2 AMD EPYC)
# then fails on every machine, not only on the one CI happens to land on.
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
        avx2) caps=(MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 EARLYEXIT_CPU_ISA=avx2_fma) ;;
        default) caps=(MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 EARLYEXIT_CPU_ISA=portable) ;;
    esac
    # Inductor's precompiled headers are made for one capability: each level compiles in its own cache.
    cache=$(mktemp -d)
    echo "test-cpu-kinds: the exactness tests with ATEN_CPU_CAPABILITY=$level ${caps[*]} (this CPU: $native)"
    env ATEN_CPU_CAPABILITY="$level" "${caps[@]}" TORCHINDUCTOR_CACHE_DIR="$cache" \
        "$PY" -m pytest -q -m exact -p no:cacheprovider python_tests
    rm -rf "$cache"
done
[[ ${#levels[@]} -gt 0 ]] || echo "test-cpu-kinds: this CPU runs torch's portable kernels only; nothing below it"
