"""Time inside and outside the encoder layers per layer call: unpatched, per-batch early exit, ``eek.classify``.

Finished investigation: `eek.classify` spends 551 us a call outside its layers on 2 threads against the
per-batch loop's 352, at 0.919 of the ideal (docs/benchmarks.md, "Benchmarks").

The continuous grid's stream (:mod:`earlyexit_kernels.bench.stream`; random BERT, hidden
``--hidden``, 12 layers, sentence lengths) with ``Entropy`` calibrated to save ``--saved`` of
the layer evaluations (0: nothing exits): the unpatched model and the per-batch early exit on
length-sorted batches of 32, and ``eek.classify`` (``max_batch_size`` 32) on the stream.
``BertLayer.forward`` is timed inside each path, and ``eek.classify``'s layers run op by op
(``OpByOpLayer``, packed or on every position); what is left of the wall time is spent
around the layers (embeddings, heads, exit steps, the engine's bookkeeping).
Medians of ``--repeats`` interleaved passes.

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/archive/classify_outside_layers.py --sequences 4096 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import transformers.models.bert.modeling_bert as modeling_bert

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import earlyexit_kernels as eek
from benchmarks.suite.stream_grid import add_stream_arguments, grid_stream
from earlyexit_kernels.bench.stream import recorded_engines, run_on_batches
from earlyexit_kernels.engine.layers.packed_layer import OpByOpLayer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stream_arguments(parser, sequences=4096, saved=0.0)
    args = parser.parse_args()
    stream = grid_stream(args)

    inside = {"seconds": 0.0, "calls": 0}

    def timed(forward):
        def timed_forward(self, *layer_args, **kwargs):
            start = time.perf_counter()
            try:
                return forward(self, *layer_args, **kwargs)
            finally:
                inside["seconds"] += time.perf_counter() - start
                inside["calls"] += 1

        return timed_forward

    modeling_bert.BertLayer.forward = timed(modeling_bert.BertLayer.forward)
    OpByOpLayer.__call__ = timed(OpByOpLayer.__call__)
    packed = {"calls": 0, "token_layers": 0}

    def run_classify():
        with recorded_engines() as made:
            list(eek.classify(stream.model, stream.items, max_batch_size=32))
        packed["calls"] = sum(engine.stats.packed_calls for engine in made)
        packed["token_layers"] = sum(engine.stats.tokens for engine in made)

    paths = {
        "unpatched": lambda: run_on_batches(stream.unpatched, stream.batches),
        "per-batch": lambda: run_on_batches(stream.model, stream.batches),
        "classify": run_classify,
    }
    for fn in paths.values():
        fn()  # warm-up
    samples = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            inside.update(seconds=0.0, calls=0)
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start, inside["seconds"], inside["calls"]))
    print(
        f"{args.sequences} sequences, hidden {args.hidden}, {args.threads} threads, {args.saved:.0%} of the layer "
        f"evaluations saved; median of {args.repeats} interleaved passes"
    )
    print("| path | wall s | in layers s | layer calls | packed calls | per call in layers us | per call outside us |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in samples.items():
        wall = statistics.median(run[0] for run in runs)
        in_layers = statistics.median(run[1] for run in runs)
        calls = runs[0][2]  # packed ones included
        packed_calls = packed["calls"] if name == "classify" else 0
        print(
            f"| {name} | {wall:.3f} | {in_layers:.3f} | {calls} | {packed_calls} | "
            f"{1e6 * in_layers / calls:.0f} | {1e6 * (wall - in_layers) / calls:.0f} |"
        )
    # The grid's token-layer ideal: the unpatched model's time per real token-layer, times those classify ran.
    share = packed["token_layers"] / (sum(len(ids) for ids in stream.ids) * stream.model.config.num_hidden_layers)
    ideal = statistics.median(run[0] for run in samples["unpatched"]) * share
    classify = statistics.median(run[0] for run in samples["classify"])
    print(
        f"eek.classify ran {share:.1%} of the stream's token-layers: ideal {ideal:.3f} s, "
        f"eek.classify at {ideal / classify:.3f} of it"
    )


if __name__ == "__main__":
    main()
