"""What each GPU stream engine computes over the stream benchmark's texts, counted on the CPU twin.

The GPU's engines run a stream in fixed buckets (rows, and for the packed cohorts tokens) with the
survivor counts read a layer late, so a layer call computes more positions than its texts have
tokens: padding to the longest row rounded up to 32, dead rows, and the part of a bucket above its
rows. On a GPU a layer's GEMMs cost about the positions they run, so these counts say how much of
each engine's work is real, before any GPU times it. Here the engines run on the CPU with the GPU's
plan (``StaticBatches(sizes=DEFAULT_SIZES, lag=1)``, the cohorts' length step 32) on the stream
benchmark's texts and model (:mod:`earlyexit_kernels.bench.stream`: 2,048 texts, median 28 tokens,
tail to 256; Entropy calibrated to the share of layer evaluations saved), and each engine's own
counts are read:

- ``(f) cohorts``: ``engine="cohorts"``, length-sorted cohorts of a 16,384-token padded budget;
- ``(h) segments``: ``engine="segments"``, E3's segments on the same budget;
- ``(i) varlen``: ``engine="varlen"``, cohorts of 16,384 real tokens run packed;

each in both admission orders: ``length`` (``eek.classify``'s, a sweep over lengths) and ``fifo``
(``eek serve``'s, arrival order: a cohort's rows of every length).

Columns: layer calls; positions computed per real token-layer (``slots / tokens``: 1.0 is no padding
and no empty bucket); the mean rows a call holds; distinct steps the GPU would capture (the keys of
``step_graphs.run_step``) after one pass and after a second (a stream's shapes should settle); exits
that differ from the exact step on the padded rows (0 expected). Counts, not times: they are the
same on every CPU. Minutes on 2 cores at hidden 64::

    python benchmarks/micro/stream_plan_counts.py --saved 0 0.5
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import earlyexit_kernels as eek
from earlyexit_kernels.bench import stream
from earlyexit_kernels.engine.engines.cohort_engine import CohortEngine
from earlyexit_kernels.engine.engines.segments.engine import SegmentEngine
from earlyexit_kernels.engine.engines.varlen.engine import VarlenEngine
from earlyexit_kernels.engine.graphed import step_graphs
from earlyexit_kernels.engine.graphed.buckets import DEFAULT_SIZES
from earlyexit_kernels.engine.graphed.static_step import CUDA_LENGTH_STEP, StaticBatches
from earlyexit_kernels.patching.state import state_of

ENGINES = {
    "(f) cohorts": (CohortEngine, {"length_step": CUDA_LENGTH_STEP}),
    "(h) segments": (SegmentEngine, {"length_step": CUDA_LENGTH_STEP}),
    "(i) varlen": (VarlenEngine, {}),
}


class _Keys:
    """The keys every graphed step is run under (what a GPU captures once each), while installed."""

    def __init__(self):
        self.keys: set = set()
        self._original = step_graphs.run_step

    def __enter__(self):
        def counted(graphs, key, step, capture):
            self.keys.add(key)
            self._original(graphs, key, step, capture)

        step_graphs.run_step = counted
        return self

    def __exit__(self, *exc):
        step_graphs.run_step = self._original


def count(engine_class, options: dict, model, ids: list[list[int]], expected: torch.Tensor, budget: int) -> dict:
    """One engine's counts over ``ids`` on the GPU's plan, two passes."""
    state_of(model).static_batches = StaticBatches(sizes=DEFAULT_SIZES, lag=1)
    passes = []
    with _Keys() as keys:
        for _ in range(2):
            engine = engine_class(model, max_batch_size=None, max_tokens=budget, **options)
            for index, sequence in enumerate(ids):
                engine.submit(index, sequence)
            with torch.no_grad():
                finished = {done.key: done for done in engine.run()}
            passes.append(len(keys.keys))
    stats = engine.stats
    exits = torch.tensor([finished[i].exit_layer for i in range(len(ids))])
    return {
        "calls": stats.calls,
        "slots_per_token": stats.slots / stats.tokens,
        "rows_per_call": stats.rows / stats.calls,
        "steps_first_pass": passes[0],
        "steps_second_pass": passes[1],
        "exits_differ": int((exits != expected).sum()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--saved", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--budget", type=int, default=16384, help="each engine's token budget per call")
    parser.add_argument("--admission", nargs="+", default=["length", "fifo"], choices=["length", "fifo"])
    args = parser.parse_args(argv)
    config = stream.StreamConfig(
        sequences=args.sequences, hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 64)
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, _, ids = stream.make_corpus(config, Path(folder))
    batches = stream.sorted_batches(ids, config.max_batch_size)
    _, model, entropies = stream.make_models(config, tokenizer.vocab_size, batches)
    tokens = sum(map(len, ids))
    print(f"{len(ids)} texts, {tokens} tokens; random BERT H{args.hidden} L{args.layers}; budget {args.budget}")
    print(
        "| saved | admission | engine | layer calls | positions per real token-layer | rows per call | steps captured "
        "(pass 1, pass 2) | exits differing from the exact step |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | --- | ---: |")
    for saved in args.saved:
        threshold = stream.calibrate(entropies, saved)
        eek.patch(model, eek.Entropy(threshold), step="graphed")  # the cohorts run the graphed step
        expected = torch.zeros(len(ids), dtype=torch.long)
        with torch.no_grad():
            for rows, input_ids, mask in batches:
                expected[rows] = model(input_ids=input_ids, attention_mask=mask).exit_layer
        for admission in args.admission:
            for name, (engine_class, options) in ENGINES.items():
                options = {**options, "admission": admission}
                row = count(engine_class, options, model, ids, expected, args.budget)
                print(
                    f"| {saved} | {admission} | {name} | {row['calls']} | {row['slots_per_token']:.2f} | {row['rows_per_call']:.0f} | "
                    f"{row['steps_first_pass']}, {row['steps_second_pass']} | {row['exits_differ']} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
