"""Python's full garbage collections during ``eek.classify`` passes over the continuous grid's stream.

Finished investigation: full collections (0.16-0.17 s) fell in 3 of 4 passes of 16384 sequences, 2 of 4 once
the read-ahead held tuples (docs/benchmarks.md, "Benchmarks").

The grid's stream (:mod:`earlyexit_kernels.bench.stream`; random BERT, hidden ``--hidden``, 12
layers, token ids ready as dicts, as the grid passes them) with ``Entropy`` calibrated to save
``--saved`` of the layer evaluations. After a warm-up pass, ``--repeats`` passes are timed, each
kept until the next one is made (as a caller holding its predictions); ``gc.callbacks`` times
every collection of the oldest generation (a full one: it traverses every object the collector
tracks, the stream's included). What the engine keeps tracked while a pass runs (its read-ahead
of waiting sequences, its outputs) decides how often a full collection falls inside a pass.

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/archive/classify_gc_pauses.py --sequences 16384
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import earlyexit_kernels as eek
from benchmarks.suite.stream_grid import add_stream_arguments, grid_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stream_arguments(parser, sequences=16384, saved=0.5)
    args = parser.parse_args()
    stream = grid_stream(args)
    full = {"count": 0, "seconds": 0.0}
    started = []

    def on_collection(phase, info):
        if info["generation"] != 2:
            return
        if phase == "start":
            started.append(time.perf_counter())
        else:
            full["count"] += 1
            full["seconds"] += time.perf_counter() - started.pop()

    result = list(eek.classify(stream.model, stream.items, max_batch_size=32))  # warm-up
    print(f"{args.sequences} sequences, hidden {args.hidden}, {args.threads} threads, {args.saved:.0%} saved; ", end="")
    print(f"{len(gc.get_objects())} objects tracked after the warm-up pass")
    print("| pass | wall s | full collections | their s |")
    print("| --- | --- | --- | --- |")
    gc.callbacks.append(on_collection)
    try:
        for index in range(1, args.repeats + 1):
            before = dict(full)
            began = time.perf_counter()
            result = list(eek.classify(stream.model, stream.items, max_batch_size=32))
            wall = time.perf_counter() - began
            count, seconds = full["count"] - before["count"], full["seconds"] - before["seconds"]
            print(f"| {index} | {wall:.3f} | {count} | {seconds:.3f} |")
    finally:
        gc.callbacks.remove(on_collection)
    assert len(result) == args.sequences


if __name__ == "__main__":
    main()
