"""Micro-benchmarks of the Triton kernels (needs a CUDA GPU and pytest-benchmark).

    python -m pytest benchmarks/micro/bench_triton_micro.py -p pytest_benchmark

- exit step, per policy, B in {1, 8, 64, 256, 1024}, H = 768, C in {2, 3}:
  fused Triton head + exit step vs the eager PyTorch reference
  (``exit_rules.head_exit_step``) vs ``torch.compile`` of that reference;
- compaction gather: Triton vs ``index_select`` vs boolean indexing, in bytes/s
  (bytes read + written).

Every timed call ends with ``torch.cuda.synchronize()``. Results (p20/p50/p80 of the
per-call times, device name, versions, timestamp) go to
``benchmarks/results/triton_micro_<timestamp>.json`` and ``.csv`` (or the folder
``EEK_MICRO_RESULTS_DIR`` names). Without CUDA
every benchmark is skipped: timings of Triton's CPU interpreter mean nothing.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")
triton = pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton micro-benchmarks need a CUDA GPU")

import earlyexit_kernels as eek  # noqa: E402
from earlyexit_kernels.backends import compaction  # noqa: E402
from earlyexit_kernels.bench.results import device_folder  # noqa: E402
from earlyexit_kernels.methods import exit_rules  # noqa: E402

RESULTS_DIR = Path(
    os.environ.get("EEK_MICRO_RESULTS_DIR")
    or Path(__file__).resolve().parents[1] / "results" / device_folder("cuda" if torch.cuda.is_available() else "cpu")
)
HIDDEN, LAYERS, SEQ = 768, 12, 128
BATCHES = (1, 8, 64, 256, 1024)
LABELS = (2, 3)
DTYPE = torch.float16
_ROWS: list[dict] = []


def _policy(name: str, batch: int):
    return {
        "entropy": lambda: eek.Entropy(0.3),
        "maxprob": lambda: eek.MaxProb(0.9),
        "patience": lambda: eek.Patience(2),
        "qexit": lambda: eek.QExit(0.5),
        "voting": lambda: eek.Voting(3),
        "dact": lambda: eek.DACT(),
        "scheduled": lambda: eek.Scheduled(torch.full((batch,), LAYERS, dtype=torch.long)),
    }[name]()


def _percentiles(data: list[float]) -> dict[str, float]:
    values = sorted(data)

    def pick(p):
        return values[min(len(values) - 1, max(0, math.ceil(p * len(values)) - 1))]

    return {"p20_s": pick(0.2), "p50_s": pick(0.5), "p80_s": pick(0.8), "rounds": len(values)}


def _record(benchmark, **fields):
    stats = _percentiles(list(benchmark.stats.stats.data))
    row = {**fields, **stats}
    if "bytes" in fields:
        row["bytes_per_s_p50"] = fields["bytes"] / stats["p50_s"]
    _ROWS.append(row)


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    if not _ROWS:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    meta = {
        "timestamp_utc": stamp,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "earlyexit_kernels": eek.__version__,
    }
    base = RESULTS_DIR / f"triton_micro_{stamp}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": _ROWS}, indent=2))
    keys = sorted({k for row in _ROWS for k in row})
    with base.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys + sorted(meta))
        writer.writeheader()
        for row in _ROWS:
            writer.writerow({**row, **meta})


def _head_inputs(batch: int, labels: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = dict(device="cuda", dtype=DTYPE)
    hidden = torch.randn(batch, SEQ, HIDDEN, generator=g, **dev)
    wp = torch.randn(HIDDEN, HIDDEN, generator=g, **dev) / math.sqrt(HIDDEN)
    bp = torch.zeros(HIDDEN, **dev)
    wi = torch.randn(labels, HIDDEN, generator=g, **dev) / math.sqrt(HIDDEN)
    bi = torch.zeros(labels, **dev)
    return hidden[:, 0], wp, bp, wi, bi


def _halting():
    lin = torch.nn.Linear(HIDDEN, 1).to(device="cuda", dtype=DTYPE)

    def fn(pooled, previous):
        return lin(pooled).squeeze(-1)

    return fn


@pytest.mark.parametrize("impl", ["triton", "eager", "compiled"])
@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("policy_name", ["entropy", "maxprob", "patience", "qexit", "voting", "dact", "scheduled"])
def test_exit_step(benchmark, policy_name, batch, labels, impl):
    from earlyexit_kernels.backends.triton_kernels import exit_step as tk

    policy = _policy(policy_name, batch)
    cls, wp, bp, wi, bi = _head_inputs(batch, labels)
    state = exit_rules.init_state(policy, batch, labels, HIDDEN, LAYERS, torch.device("cuda"), pooled_dtype=DTYPE)
    halting_fn = _halting() if policy.needs_halting_head else None
    if impl == "triton":
        fn = tk.head_exit_step
    elif impl == "eager":
        fn = exit_rules.head_exit_step
    else:
        fn = torch.compile(exit_rules.head_exit_step)

    def step():
        with torch.no_grad():
            out = fn(policy, 3, LAYERS, cls, wp, bp, wi, bi, dict(state), halting_fn)
        torch.cuda.synchronize()
        return out

    for _ in range(3):  # compile / autotune / caches
        step()
    benchmark.pedantic(step, rounds=200, iterations=1, warmup_rounds=10)
    _record(benchmark, kind="exit_step", policy=policy_name, batch=batch, hidden=HIDDEN, labels=labels, impl=impl)


@pytest.mark.parametrize("impl", ["triton", "index_select", "bool_mask"])
@pytest.mark.parametrize("batch", BATCHES)
def test_compact(benchmark, batch, impl):
    from earlyexit_kernels.backends.triton_kernels.compact import compact as triton_compact

    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(batch, SEQ, HIDDEN, device="cuda", dtype=DTYPE, generator=g)
    mask = torch.ones(batch, SEQ, dtype=torch.long, device="cuda")
    keep = torch.rand(batch, device="cuda", generator=g) < 0.5
    keep[0] = True
    count = int(keep.sum())
    index = compaction.survivor_index(keep, count)
    seq_len = SEQ - 16
    moved = 2 * count * seq_len * (HIDDEN * hidden.element_size() + mask.element_size())

    if impl == "triton":

        def run():
            return triton_compact(hidden, mask, index, seq_len)
    elif impl == "index_select":

        def run():
            return compaction.compact(hidden, mask, index, seq_len)
    else:

        def run():
            return hidden[keep][:, :seq_len].contiguous(), mask[keep][:, :seq_len].contiguous()

    def step():
        out = run()
        torch.cuda.synchronize()
        return out

    for _ in range(3):
        step()
    benchmark.pedantic(step, rounds=200, iterations=1, warmup_rounds=10)
    _record(benchmark, kind="compact", batch=batch, kept=count, seq_len=seq_len, hidden=HIDDEN, impl=impl, bytes=moved)
