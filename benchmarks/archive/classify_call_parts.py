"""Where ``eek.classify``'s time goes around its layer calls, part by part, timed in place.

Finished investigation: of the 586 us a call spends outside the layers: admission 92, exit head and step 76,
gather 69, scheduler 48, layer mask 43 (docs/benchmarks.md, "Benchmarks").

The continuous grid's stream (:mod:`earlyexit_kernels.bench.stream`; random BERT, hidden
``--hidden``, 12 layers, sentence lengths) with ``Entropy`` calibrated to save ``--saved`` of the
layer evaluations. The engine's parts are wrapped with a clock (about a microsecond each):
the layer (``OpByOpLayer``), the gather of a call's inputs, the exit head and exit step, the
scheduler's decision, admission (embeddings included), requeues, releases, the layer mask, the
write-backs. Each part's seconds per pass and microseconds per layer call, averaged over
``--repeats`` passes after a warm-up pass; parts nest (the gather inside the call's inputs,
everything but admission and the decision inside the call), so they do not add up to the wall.
Unlike a warm microbenchmark, every part runs where it runs in the stream: right after a layer,
on caches the layer's products left cold.

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/archive/classify_call_parts.py --sequences 4096 --saved 0.5
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import earlyexit_kernels as eek
from benchmarks.suite.stream_grid import add_stream_arguments, grid_stream
from earlyexit_kernels.engine.engines.continuous.engine import ContinuousEngine
from earlyexit_kernels.engine.engines.continuous.scheduler import LayerScheduler
from earlyexit_kernels.engine.engines.continuous.token_pool import TokenPool
from earlyexit_kernels.engine.layers.packed_layer import OpByOpLayer

PARTS = {
    "layer (op by op)": (OpByOpLayer, "__call__"),
    "call inputs (gather included)": (ContinuousEngine, "_call_inputs"),
    "  pool gather": (TokenPool, "gather"),
    "pool write-back": (TokenPool, "scatter"),
    "keep the output": (ContinuousEngine, "_keep"),
    "layer mask": (ContinuousEngine, "_layer_mask"),
    "scheduler decision": (LayerScheduler, "decide"),
    "requeue": (LayerScheduler, "requeue_many"),
    "advance (no exits)": (LayerScheduler, "advance"),
    "release exits": (ContinuousEngine, "_release"),
    "admission (embeddings included)": (ContinuousEngine, "_admit"),
    "submit": (ContinuousEngine, "submit"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stream_arguments(parser, sequences=4096, saved=0.5)
    args = parser.parse_args()
    stream = grid_stream(args)
    seconds, counts = collections.Counter(), collections.Counter()

    def clocked(name, function):
        def timed(*call_args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*call_args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
                counts[name] += 1

        return timed

    for name, (owner, attribute) in PARTS.items():
        setattr(owner, attribute, clocked(name, getattr(owner, attribute)))
    prepared = ContinuousEngine._prepared_head_steps  # the exit head and step: per layer, made at the first call
    ContinuousEngine._prepared_head_steps = lambda self: [
        None if step is None else clocked("exit head and exit step", step) for step in prepared(self)
    ]

    list(eek.classify(stream.model, stream.items, max_batch_size=32))  # warm-up
    seconds.clear()
    counts.clear()
    began = time.perf_counter()
    for _ in range(args.repeats):
        list(eek.classify(stream.model, stream.items, max_batch_size=32))
    wall = (time.perf_counter() - began) / args.repeats
    calls = counts["layer (op by op)"] / args.repeats
    print(
        f"{args.sequences} sequences, hidden {args.hidden}, {args.threads} threads, {args.saved:.0%} of the layer "
        f"evaluations saved; {wall:.3f} s a pass, {calls:.0f} layer calls; mean of {args.repeats} passes"
    )
    print("| part | s a pass | us a layer call | times a pass |")
    print("| --- | --- | --- | --- |")
    for name in [*PARTS, "exit head and exit step"]:
        per_pass = seconds[name] / args.repeats
        print(f"| {name} | {per_pass:.3f} | {1e6 * per_pass / calls:.0f} | {counts[name] // args.repeats} |")
    print(
        f"| outside the layer | {wall - seconds['layer (op by op)'] / args.repeats:.3f} | "
        f"{1e6 * (wall - seconds['layer (op by op)'] / args.repeats) / calls:.0f} | - |"
    )


if __name__ == "__main__":
    main()
