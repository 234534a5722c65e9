"""Time inside and outside the encoder layers per layer call: unpatched, per-batch early exit, ``eek.classify``.

The continuous grid's stream (:mod:`earlyexit_kernels.bench.stream`; random BERT, hidden
``--hidden``, 12 layers, sentence lengths) with ``Entropy`` calibrated to save ``--saved`` of
the layer evaluations (0: nothing exits): the unpatched model and the per-batch early exit on
length-sorted batches of 32, and ``eek.classify`` (``max_batch_size`` 32) on the stream.
``BertLayer.forward`` is timed inside each path, and ``eek.classify``'s layers run op by op
(``OpByOpLayer``, packed or on every position); what is left of the wall time is spent
around the layers (embeddings, heads, exit steps, the engine's bookkeeping).
Medians of ``--repeats`` interleaved passes.

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/classify_outside_layers.py --sequences 4096 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers.models.bert.modeling_bert as modeling_bert

import earlyexit_kernels as eek
from earlyexit_kernels.bench.stream import StreamConfig, calibrate, recorded_engines, run_on_batches, sorted_stream
from earlyexit_kernels.engine.packed_layer import OpByOpLayer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--saved", type=float, default=0.0, help="share of layer evaluations saved (0: none exits)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = StreamConfig(
        sequences=args.sequences, hidden=args.hidden, layers=12, heads=max(2, args.hidden // 64), seed=0
    )
    stream = sorted_stream(config, 32)
    eek.patch(stream.model, eek.Entropy(calibrate(stream.entropies, args.saved)))

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
    packed = {"calls": 0}

    def run_classify():
        with recorded_engines() as made:
            list(eek.classify(stream.model, stream.items, max_batch_size=32))
        packed["calls"] = sum(engine.stats.packed_calls for engine in made)

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


if __name__ == "__main__":
    main()
