"""Host time per layer call of ``eek.classify`` against the simple paths, with every encoder layer a no-op.

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/profiles/classify_host_time.py --sequences 1024

The continuous grid's stream (:mod:`earlyexit_kernels.bench.stream`; random BERT, hidden 128,
12 layers, sentence lengths) with ``BertLayer.forward`` replaced by the identity, so what is
left is what each path spends around its layers: embeddings, exit heads and exit step,
read-backs and, for ``eek.classify``, the engine's bookkeeping (scheduler, pool, admission).
``Entropy(0)``: nobody exits, so the three paths make the same layer calls (12 per batch of
32). One thread; microseconds per layer call, median (and minimum) of ``--repeats`` passes.
``eek.classify`` runs BERT layers op by op (``OpByOpLayer``), which is replaced by the identity
too. On a GPU this host time is what must hide behind the kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch
import transformers.models.bert.modeling_bert as modeling_bert

import earlyexit_kernels as eek
from benchmarks.suite.stream_grid import sorted_stream
from earlyexit_kernels.bench.stream import StreamConfig, run_on_batches
from earlyexit_kernels.engine.layers.packed_layer import OpByOpLayer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = StreamConfig(sequences=args.sequences, hidden=128, layers=12, heads=2, seed=0)
    stream = sorted_stream(config, 32)
    unpatched, model, batches, items = stream.unpatched, stream.model, stream.batches, stream.items
    eek.patch(model, eek.Entropy(0.0))
    modeling_bert.BertLayer.forward = lambda self, hidden_states, *args, **kwargs: hidden_states
    OpByOpLayer.__call__ = lambda self, hidden, positions, layer_mask: hidden

    def run_unpatched():
        run_on_batches(unpatched, batches)

    def run_per_batch():
        run_on_batches(model, batches)

    def run_classify():
        predictions = list(eek.classify(model, items, max_batch_size=32))
        assert all(p.exit_layer == 12 for p in predictions)

    calls = len(batches) * 12
    print(f"{args.sequences} sequences, {calls} layer calls per pass, hidden 128, 1 thread, layers no-op")
    for name, fn in (("unpatched", run_unpatched), ("per-batch", run_per_batch), ("classify", run_classify)):
        fn()  # warm-up
        samples = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - began)
        median, least = statistics.median(samples) * 1e6 / calls, min(samples) * 1e6 / calls
        print(f"{name}: {median:.0f} us per layer call (min {least:.0f})")


if __name__ == "__main__":
    main()
