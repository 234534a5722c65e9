"""Where ``eek.classify`` spends its time against the simple paths, on one stream of the continuous grid.

The stream benchmark's workload (:mod:`earlyexit_kernels.bench.stream`; random BERT, sentence
lengths) with ``Entropy`` calibrated to save ``--saved`` of the layer evaluations (0: nothing
exits): the unpatched model and the per-batch early exit on length-sorted batches of 32, and
``eek.classify`` on the stream, each timed ``--repeats`` times (median); then one
``eek.classify`` pass under cProfile (functions by their own time) and, for each path, the
time in its matrix products, attention and GELU.

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/profiles/classify_profile.py --sequences 1024 --hidden 128 --threads 2
"""

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import earlyexit_kernels as eek
from benchmarks.suite.stream_grid import add_stream_arguments, grid_stream
from earlyexit_kernels.bench.stream import run_on_batches

KERNELS = {
    "<built-in method torch._C._nn.linear>": "linear",
    "<built-in method torch._C._nn.scaled_dot_product_attention>": "attention",
    "<built-in method torch._C._nn.gelu>": "gelu",
}


def _profiled(fn) -> pstats.Stats:
    profile = cProfile.Profile()
    profile.enable()
    fn()
    profile.disable()
    return pstats.Stats(profile)


def _kernel_seconds(stats: pstats.Stats) -> str:
    seconds = {KERNELS[key[2]]: value[2] for key, value in stats.stats.items() if key[2] in KERNELS}
    return ", ".join(f"{name} {seconds.get(name, 0.0):.3f} s" for name in KERNELS.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stream_arguments(parser, sequences=1024, saved=0.0)
    parser.add_argument("--top", type=int, default=25, help="functions listed from the profile")
    args = parser.parse_args()
    stream = grid_stream(args)
    unpatched, model, batches, items = stream.unpatched, stream.model, stream.batches, stream.items

    def run_unpatched():
        run_on_batches(unpatched, batches)

    def run_per_batch():
        run_on_batches(model, batches)

    def run_classify():
        list(eek.classify(model, items, max_batch_size=32))

    paths = {"unpatched": run_unpatched, "per-batch": run_per_batch, "classify": run_classify}
    for fn in paths.values():
        fn()  # warm-up
    for name, fn in paths.items():
        samples = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        print(f"{name}: {statistics.median(samples):.3f} s (median of {args.repeats})")
    for name, fn in paths.items():
        print(f"{name} under cProfile: {_kernel_seconds(_profiled(fn))}")
    _profiled(run_classify).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
