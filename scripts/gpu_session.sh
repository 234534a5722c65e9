#!/usr/bin/env bash
# Everything a session with a GPU machine should run, in one call, writing under $OUT:
# build with CUDA, the test suite natively on the GPU, compute-sanitizer on the kernel
# tests, what backend="auto" picks, the microbenchmarks and the end-to-end benchmark.
# Each step logs to its own file and a failing step does not stop the others; the
# summary lists the exit codes.
#
#   OUT=/tmp/out bash scripts/gpu_session.sh            # everything
#   OUT=/tmp/out STEPS="build tests" bash scripts/gpu_session.sh
set -uo pipefail
OUT=${OUT:?set OUT to the folder for logs and results}
STEPS=${STEPS:-"build tests sanitizer auto micro bench"}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=.venv/bin/python
summary="$OUT/summary.txt"
: >"$summary"

step() {
    local name=$1
    shift
    local start=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$summary"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
for s in $STEPS; do
    case $s in
    build) step build env EARLYEXIT_FORCE_CUDA_BUILD=1 make setup ;;
    tests) step tests "$PY" -m pytest -q python_tests -x -ra ;;
    sanitizer)
        # The Triton kernels' tests and the CUDA C++ kernels' tests (test_cuda_*) natively.
        step memcheck compute-sanitizer --tool memcheck "$PY" -m pytest -q python_tests/test_triton_compact.py -x
        step memcheck_cpp compute-sanitizer --tool memcheck "$PY" -m pytest -q -x -k cuda \
            python_tests/test_cpp_exit_step.py python_tests/test_cpp_compact.py
        step racecheck compute-sanitizer --tool racecheck "$PY" -m pytest -q python_tests/test_triton_exit_step.py -x -k fp32
        ;;
    auto)
        # What backend="auto" measures and picks on this GPU for BERT-base shapes.
        step auto "$PY" -c "import torch; from earlyexit_kernels import backend_choice as c, backend_registry as r
for d in (torch.float16, torch.bfloat16, torch.float32):
    r.resolve_backend('auto', torch.device('cuda'), dtype=d, hidden_size=768, num_labels=2)
for key, (name, secs) in c.auto_choices().items():
    print(key, name, {k: round(v * 1e6, 1) for k, v in secs.items()}, 'us')"
        ;;
    micro) step micro "$PY" -m pytest -q benchmarks/bench_triton_micro.py benchmarks/bench_cpu_micro.py --benchmark-json="$OUT/micro.json" ;;
    bench) step bench "$PY" -m earlyexit_kernels.bench --device cuda --output-dir "$OUT/bench" ;;
    *) echo "unknown step $s" | tee -a "$summary" ;;
    esac
done
cat "$summary"
