"""Micro-benchmarks of the engine's exit step and compaction on the CPU (pytest-benchmark).

    EEK_BENCH_THREADS=1 python -m pytest benchmarks/micro/bench_cpu_micro.py -p pytest_benchmark --benchmark-columns=median,iqr

Not collected by ``make test`` (which runs ``python_tests``). For each batch size
B in {1, 8, 32, 64, 128} (S = 128, H = 768 and H = 128, fp32):

- exit step (the default head on the [CLS] state + ``Entropy(0.3)``): ``cpp`` (the C++
  fused ``head_exit_step``), ``torch`` (``exit_rules.head_exit_step``, eager), ``naive``
  (pooler and classifier modules + eager exit step + boolean-mask write-back, as
  ``earlyexit_kernels.bench.baselines.naive_batched`` does);
- compaction (keep every other row, trim 1/8 of S): ``cpp`` (the C++ gather), ``torch``
  (``index_select`` + slice), ``naive`` (``hidden[keep]``, ``mask[keep]``).

``EEK_BENCH_THREADS=n`` sets ``torch.set_num_threads(n)`` for the module (the end-to-end
suite's ``--threads``): on a 2-core machine where another process holds a core, two
OpenMP threads make these microsecond-scale ops up to ~200x slower (threads spinning at
barriers), so compare implementations at one thread there.

The callables are those of :mod:`benchmarks.suite.micro`, whose command line also writes
the sweep's CSV rows and the exit-step plot (the repository's root is on pytest's path). Results: pytest-benchmark's table (and its JSON
with ``--benchmark-json``).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks.suite.micro import compact_fn, exit_step_fn, micro_impls  # noqa: E402

CPU = torch.device("cpu")
BATCHES = (1, 8, 32, 64, 128)
HIDDEN = (128, 768)
SEQ, LAYERS = 128, 12
IMPLS = micro_impls(CPU)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    if os.environ.get("EEK_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["EEK_BENCH_THREADS"]))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_exit_step(benchmark, impl, batch, hidden):
    benchmark.group = f"exit_step H={hidden} B={batch}"
    fn = exit_step_fn(impl, batch, SEQ, hidden, LAYERS, CPU, torch.float32)
    with torch.inference_mode():
        benchmark(fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_compact(benchmark, impl, batch, hidden):
    benchmark.group = f"compact H={hidden} B={batch}"
    fn, moved = compact_fn(impl, batch, SEQ, hidden, CPU, torch.float32)
    benchmark.extra_info["bytes_moved"] = moved
    with torch.inference_mode():
        benchmark(fn)
