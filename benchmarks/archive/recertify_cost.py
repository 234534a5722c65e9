"""What online re-certification adds to the audit's cost (issue 55): eek.classify with a 5% audit, with and without it.

Finished investigation: re-certification adds +1.1% of the served time over the 5% audit, median of 5 pairs
(docs/serving.md, "Online re-certification", Cost).

The model and stream of ``benchmarks/archive/audit_cost.py`` (a random 12-layer BERT, hidden 128, its
Entropy threshold set so that about half the layers run; N sequences of 8-128 random token ids,
batches of 32). Re-certification walks a path of 401 candidates (the size of ``eek fit``'s global
entropy grid), every one the served threshold itself, so the served policy, and the early exit's
work, stay what they are while the audit records every head's logits, replays the 401 candidates
on each audited row and updates their e-processes and detectors: the cost of the machinery alone.
Interleaved repeats of: no audit, a 5% audit (the watch), a 5% audit with re-certification, the
full model alone; medians and paired per-repeat differences.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/archive/recertify_cost.py 4096 7
"""

import statistics
import sys
import time

from audit_model import model_and_stream

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.online import OnlineCertificate
from earlyexit_kernels.engine.entry.audit import AuditWatch, full_depth_logits

FRACTION, CANDIDATES = 0.05, 401

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
REPEATS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
model, items, policy = model_and_stream(N)
print(f"{policy.to_code(4)}; {CANDIDATES} candidates; audit fraction {FRACTION}", flush=True)


def run(kind: str):
    audit = certificate = None
    if kind != "none":
        audit = AuditWatch(FRACTION)
    if kind == "recertify":
        certificate = OnlineCertificate([policy] * CANDIDATES, budget=0.01, confidence=0.95, fraction=FRACTION)
    start = time.perf_counter()
    predictions = eek.classify(model, items, max_batch_size=32, audit=audit, recertify=certificate or False)
    layers = statistics.mean(p.layers_run for p in predictions)
    return time.perf_counter() - start, layers, audit, certificate


times = {"none": [], "watch": [], "recertify": [], "full": []}
list(eek.classify(model, items[:128], max_batch_size=32))  # warm-up
for rep in range(REPEATS):
    for kind in ("none", "watch", "recertify"):
        seconds, layers, audit, certificate = run(kind)
        times[kind].append(seconds)
        if kind == "recertify":
            audited, full_seconds, moved = audit.audited, audit.full_seconds, len(certificate.moves)
    start = time.perf_counter()
    full_depth_logits(model, [(it["input_ids"], None) for it in items], max_batch_size=32)
    times["full"].append(time.perf_counter() - start)
    print(rep, {k: round(v[-1], 2) for k, v in times.items()}, flush=True)
median = {k: statistics.median(v) for k, v in times.items()}
print(f"N={N}, mean layers run {layers:.2f} of 12; re-certification: {audited} audited, {moved} move(s)")
for kind, value in median.items():
    print(f"{kind}: median {value:.2f} s ({N / value:.0f} seq/s) over {REPEATS}: {[round(x, 2) for x in times[kind]]}")
base, full = median["none"], median["full"]
extra = [r - w for r, w in zip(times["recertify"], times["watch"])]
print(
    f"the audit alone: +{100 * (median['watch'] / base - 1):.1f}% of the served time (F x full: "
    f"+{100 * FRACTION * full / base:.1f}%); with re-certification: +{100 * (median['recertify'] / base - 1):.1f}%; "
    f"re-certification over the audit, paired: median {statistics.median(extra):+.2f} s = "
    f"{100 * statistics.median(extra) / base:+.1f}% of the served time: {[round(x, 2) for x in extra]}"
)
