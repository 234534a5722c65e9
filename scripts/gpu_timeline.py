"""Where one call of a profiled forward leaves the GPU idle, read back from its timeline.

``gpu_session_report.py gaps`` writes each configuration's profiler timeline (a chrome trace,
``logs/gaps_traces/*.json`` in the GPU session's logs) with each call of the forward inside an
``eek_gaps_call`` annotation. This reads one call back on any machine, no GPU needed, and prints
every stretch in which no kernel, copy or memset ran (from the call's start to its last kernel's
end), with the host ops that started in it, then where the first CUDA graph was launched and how
much of the idle time came before it:

    python scripts/gpu_timeline.py benchmarks/results/nvidia_h100_80gb_hbm3/gpu_session_2026-11-27c/traces/graphed_Scheduled_on_cuda_nobody_exits.json.gz

The profiler slows the host (each op's launch takes several times its unprofiled cost), so the
host's share is larger here than in an unprofiled forward; where the idle time falls is what this
shows, not its unprofiled length.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

DEVICE = ("kernel", "gpu_memcpy", "gpu_memset")
HOST = ("cpu_op", "cuda_runtime")
EAGER_LAUNCHES = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaMemcpyAsync",
    "cudaMemsetAsync",
)


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as file:
        return json.load(file)["traceEvents"]


def call_timeline(events: list[dict], call: int, min_gap_us: float = 5.0) -> dict:
    """The ``call``-th (0-based) ``eek_gaps_call`` of ``events``: its device ``gaps`` as
    ``(start, length, host ops starting in it)`` in microseconds from the call's start (those
    shorter than ``min_gap_us`` left out), the ``end`` of its last device event, the start of its
    first ``cudaGraphLaunch`` (None without one), the idle time of the gaps that begin before and
    after it (the gap a launch falls in is the device waiting for that launch) and the kernels,
    copies and memsets launched one by one before it."""
    calls = sorted(
        (e for e in events if e.get("name") == "eek_gaps_call" and e.get("cat") == "user_annotation"),
        key=lambda e: e["ts"],
    )
    if not 0 <= call < len(calls):
        raise ValueError(f"the trace holds {len(calls)} calls; ask for one in 0..{len(calls) - 1}")
    start = calls[call]["ts"]
    following = calls[call + 1]["ts"] if call + 1 < len(calls) else float("inf")

    def inside(e):
        return start <= e["ts"] < following

    device = sorted((e for e in events if e.get("cat") in DEVICE and inside(e)), key=lambda e: e["ts"])
    host = sorted((e for e in events if e.get("cat") in HOST and inside(e)), key=lambda e: e["ts"])
    gaps, at = [], start
    for event in device:
        if event["ts"] - at >= min_gap_us:
            ops = [o["name"] for o in host if at <= o["ts"] < event["ts"]]
            gaps.append((at - start, event["ts"] - at, ops))
        at = max(at, event["ts"] + event["dur"])
    launches = [o["ts"] - start for o in host if o["name"] == "cudaGraphLaunch"]
    first = launches[0] if launches else None
    before = sum(length for at_, length, _ in gaps if first is not None and at_ < first)
    after = sum(length for _, length, _ in gaps) - before
    # kernels, copies and memsets the host launched one by one before the first graph
    eager = sum(1 for o in host if o["name"] in EAGER_LAUNCHES and (first is None or o["ts"] - start < first))
    found = {
        "gaps": gaps,
        "end": at - start,
        "first_graph_launch": first,
        "idle_before": before,
        "idle_after": after,
        "eager_launches": eager,
    }
    # The graphed step marks its first layer's launch (``eek_first_layer``): what came before it, the
    # prologue's graph among them where it is captured (issue 93's target: 3 launches, 1 read-back,
    # at most 0.4 ms of device idle).
    marks = [e["ts"] - start for e in events if e.get("name") == "eek_first_layer" and inside(e)]
    if marks:
        layer = min(marks)
        found["first_layer"] = layer
        found["idle_before_first_layer"] = sum(length for at_, length, _ in gaps if at_ < layer)
        found["launches_before_first_layer"] = sum(
            1 for o in host if o["name"] in (*EAGER_LAUNCHES, "cudaGraphLaunch") and o["ts"] - start < layer
        )
        found["syncs_before_first_layer"] = sum(
            1 for o in host if "Synchronize" in o["name"] and o["ts"] - start < layer
        )
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace", type=Path, help="a chrome trace (.json or .json.gz) from the gaps step")
    parser.add_argument("--call", type=int, default=2, help="which call (0-based; the first ones may warm up)")
    parser.add_argument("--ops", type=int, default=8, help="host ops named per gap")
    args = parser.parse_args(argv)
    try:
        found = call_timeline(load_events(args.trace), args.call)
    except ValueError as err:
        print(f"gpu_timeline: {err}", file=sys.stderr)
        return 2
    print(f"{args.trace.name}, call {args.call}: last device event ends {found['end']:.0f} us after the call starts")
    for at, length, ops in found["gaps"]:
        more = f" (+{len(ops) - args.ops})" if len(ops) > args.ops else ""
        print(f"  idle {length:7.1f} us from {at:7.1f} us; host ops starting in it: {', '.join(ops[: args.ops])}{more}")
    if "first_layer" in found:
        print(
            f"first layer launched at {found['first_layer']:.0f} us, after {found['launches_before_first_layer']} "
            f"launches (graphs included) and {found['syncs_before_first_layer']} synchronizations; the device idle "
            f"{found['idle_before_first_layer']:.0f} us before it"
        )
    if found["first_graph_launch"] is None:
        print("no CUDA graph launched in this call")
    else:
        print(
            f"first cudaGraphLaunch at {found['first_graph_launch']:.0f} us, after {found['eager_launches']} launches "
            f"one by one; the device idle {found['idle_before']:.0f} us before it, {found['idle_after']:.0f} us after it"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
