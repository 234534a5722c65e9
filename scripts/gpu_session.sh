#!/usr/bin/env bash
# Everything a session with a GPU machine should run, in one call, writing under $OUT:
# build with CUDA, the test suite natively on the GPU, the GPU-only tests on their own (so a
# skip shows), compute-sanitizer on the kernel tests, what backend="auto" picks, host time
# per exit step, the microbenchmarks and the end-to-end benchmark. Each step logs to its own
# file; neither a failing test nor a failing step stops the others (no pytest -x: one
# failure must not hide the rest). The summary lists the exit codes.
#
#   OUT=/tmp/out bash scripts/gpu_session.sh            # everything
#   OUT=/tmp/out STEPS="build tests" bash scripts/gpu_session.sh
set -uo pipefail
OUT=${OUT:?set OUT to the folder for logs and results}
STEPS=${STEPS:-"build tests gpu_tests defects sanitizer auto host micro bench"}
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

# compute-sanitizer with PyTorch's caching allocator off: otherwise an out-of-bounds access
# that stays inside a cached block goes unseen.
sanitize() {
    local tool=$1
    shift
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" -m pytest -q -ra "$@"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
for s in $STEPS; do
    case $s in
    build) step build env EARLYEXIT_FORCE_CUDA_BUILD=1 make setup ;;
    tests) step tests "$PY" -m pytest -q -ra python_tests ;;
    gpu_tests)
        # The tests that only a GPU runs (skipped without one, with the reason): the CUDA head at
        # H = 768 and 1024 and the rest of the CUDA kernels natively (the "gpu" half of
        # test_cuda_kernels), backend="cuda" end to end, a model on cuda:1 when there are two
        # devices (Triton and CUDA C++), compactions past 2^31 elements. -rs lists the skips.
        step gpu_cuda_kernels "$PY" -m pytest -q -rs python_tests/test_cuda_kernels.py -k gpu
        step gpu_cuda_backend "$PY" -m pytest -q -rs -k cuda python_tests/test_cpp_engine.py \
            python_tests/test_cpp_compact.py python_tests/test_cpp_exit_step.py
        step gpu_triton "$PY" -m pytest -q -rs -k "second_gpu or two_to_the_31 or cuda" \
            python_tests/test_triton_engine.py python_tests/test_triton_exit_step.py python_tests/test_triton_compact.py
        # the whole per-layer head step (pooling, head, rule) natively, and its launch counts
        step gpu_pooled_head "$PY" -m pytest -q -rs python_tests/test_triton_pooled_head.py \
            python_tests/test_launch_budget.py -k "pooled or mlp"
        ;;
    defects)
        # The checks of docs/development.md "GPU-path defects found by reading" that need a GPU.
        # 8: this device's opt-in shared memory per block and the widest head the CUDA kernel
        # stages per dtype (wider ones run the head in PyTorch; the test runs the first of them).
        step shared_memory "$PY" -c "import torch; from earlyexit_kernels.backends import cpp_backend as b
p = torch.cuda.get_device_properties(0); optin = p.shared_memory_per_block_optin
print(p.name, 'sm_%d%d' % (p.major, p.minor), 'opt-in shared memory per block:', optin, 'bytes')
for d in (torch.float32, torch.float16, torch.bfloat16):
    print(d, 'widest CUDA head: H =', max(h for h in range(8, 65536, 8) if b.cuda_head_fits(h, d, optin)))"
        step wide_head "$PY" -m pytest -q -rs python_tests/test_cuda_kernels.py -k too_wide_for_shared_memory
        # 1: torch.compile with dynamic shapes (Inductor, the triton_op decomposition) and the
        # full opcheck on CUDA.
        step dynamic_shapes "$PY" -m pytest -q -rs python_tests/test_triton_exit_step.py \
            -k "opcheck_and_compile_cuda or symbolic_sizes or dynamic_batch_cuda"
        # 2: the write-back's logits equal head_exit_step's bit for bit in bf16/fp16 (cuda, triton).
        step write_back_rounding "$PY" -m pytest -q -rs python_tests/test_write_back.py -k writes_the_logits
        ;;
    sanitizer)
        # memcheck: the Triton kernels (compaction, exit step), the write-back tests (every
        # backend) and the CUDA C++ kernels.
        step memcheck_triton sanitize memcheck python_tests/test_triton_compact.py python_tests/test_triton_exit_step.py \
            python_tests/test_triton_pooled_head.py
        step memcheck_write_back sanitize memcheck python_tests/test_write_back.py
        step memcheck_cuda_kernels sanitize memcheck python_tests/test_cuda_kernels.py -k gpu
        step memcheck_cuda_ops sanitize memcheck -k cuda python_tests/test_cpp_exit_step.py python_tests/test_cpp_compact.py
        # racecheck and synccheck: the one-block survivor scan (rule_scan_kernel) and the head
        # kernel's shared memory; racecheck on the Triton exit step too.
        step racecheck_cuda sanitize racecheck python_tests/test_cuda_kernels.py -k "gpu and not compact"
        step synccheck_cuda sanitize synccheck python_tests/test_cuda_kernels.py -k "gpu and not compact"
        step racecheck_triton sanitize racecheck python_tests/test_triton_exit_step.py -k "fp32 or write_back"
        ;;
    auto)
        # What backend="auto" measures and picks on this GPU for BERT-base shapes.
        step auto "$PY" -c "import torch; from earlyexit_kernels.backends import choice as c, registry as r
for d in (torch.float16, torch.bfloat16, torch.float32):
    r.resolve_backend('auto', torch.device('cuda'), dtype=d, hidden_size=768, num_labels=2)
for key, (name, secs) in c.auto_choices().items():
    print(key, name, {k: round(v * 1e6, 1) for k, v in secs.items()}, 'us (sum over batches', c.TIMED_BATCHES, ')')
# 7: the crossover: each candidate per batch size (fp16, H = 768, 2 labels).
for b in (1, 16, 64, 256, 1024):
    print('batch', b, {n: round(c.step_seconds(r.resolve_backend(n, torch.device('cuda')), torch.device('cuda'),
          torch.float16, 768, 2, batch=b) * 1e6, 1) for n in ('cuda', 'triton')}, 'us')"
        ;;
    host)
        # Host time per exit step: launches stubbed (CPU tensors), then real launches on the GPU.
        step host_stubbed "$PY" benchmarks/host_time_per_step.py --output "$OUT/host_time_stubbed.txt"
        step host_gpu "$PY" benchmarks/host_time_per_step.py --device cuda --output "$OUT/host_time_gpu.txt"
        ;;
    micro) step micro "$PY" -m pytest -q benchmarks/bench_triton_micro.py benchmarks/bench_cpu_micro.py --benchmark-json="$OUT/micro.json" ;;
    bench) step bench "$PY" -m earlyexit_kernels.bench --device cuda --output-dir "$OUT/bench" ;;
    *) echo "unknown step $s" | tee -a "$summary" ;;
    esac
done
cat "$summary"
