"""What the audit watch costs: eek.classify's throughput at audit fractions 0, 0.05 and 1.0 (issue 42).

Finished investigation: the audit costs about F times the full model's time on top of the early exit's
(docs/serving.md, "The audit watch", Cost).

A random BERT of 12 layers, hidden 128, its Entropy threshold set so that about half the layers
run; N sequences of 8-128 random token ids (no tokenizing), batches of 32; the three fractions
and the full model alone, interleaved, REPEATS times; medians and paired per-repeat ratios.
The figures in docs/serving.md ("The audit watch", Cost) came from

    flock -x /tmp/eek-cpu.lock sh -c 'OMP_NUM_THREADS=2 .venv/bin/python benchmarks/archive/audit_cost.py 4096 7'
"""

import statistics
import sys
import time

from audit_model import model_and_stream

import earlyexit_kernels as eek
from earlyexit_kernels.engine.entry.audit import full_depth_logits

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
model, items, policy = model_and_stream(N)
print(policy.to_code(4))
times = {0.0: [], 0.05: [], 1.0: [], "full": []}
audited = {}
list(eek.classify(model, items[:128], max_batch_size=32))  # warm-up
for rep in range(int(sys.argv[2]) if len(sys.argv) > 2 else 5):
    for f in (0.0, 0.05, 1.0):
        start = time.perf_counter()
        preds = eek.classify(model, items, max_batch_size=32, audit_fraction=f)
        out = list(preds)
        times[f].append(time.perf_counter() - start)
        if preds.audit is not None:
            audited[f] = (preds.audit.audited, preds.audit.rate, preds.audit.full_seconds)
        mean_layers = statistics.mean(p.layers_run for p in out)
    start = time.perf_counter()
    full_depth_logits(model, [(it["input_ids"], None) for it in items], max_batch_size=32)
    times["full"].append(time.perf_counter() - start)
    print(rep, {k: round(v[-1], 2) for k, v in times.items()}, flush=True)
print(f"N={N} mean layers run {mean_layers:.2f} of 12")
base = statistics.median(times[0.0])
full = statistics.median(times["full"])
for k, v in times.items():
    m = statistics.median(v)
    extra = (
        ""
        if k == "full"
        else f"  +{100 * (m / base - 1):.1f}% vs F=0; predicted F x full: +{100 * (k * full / base):.1f}%"
    )
    print(f"{k}: median {m:.2f} s ({N / m:.0f} seq/s) over {len(v)}: {[round(x, 2) for x in v]}{extra}")
for f, (n, rate, secs) in audited.items():
    print(f"F={f}: audited {n}, disagreement {rate:.3f}, full model seconds in the last run {secs:.2f}")
for f in (0.05, 1.0):
    ratios = [a / b for a, b in zip(times[f], times[0.0])]
    print(
        f"F={f}: paired per-repeat ratio to F=0, median {statistics.median(ratios):.3f}: {[round(r, 3) for r in ratios]}"
    )
