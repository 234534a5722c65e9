"""Where ``eek.classify`` spends its time against the simple paths, on one stream of the continuous grid.

The stream benchmark's workload (:mod:`earlyexit_kernels.bench.stream`; random BERT, sentence
lengths) with ``Entropy`` calibrated to save ``--saved`` of the layer evaluations (0: nothing
exits): the unpatched model and the per-batch early exit on length-sorted batches of 32, and
``eek.classify`` on the stream, each timed ``--repeats`` times (median); then one
``eek.classify`` pass under cProfile (functions by their own time) and, for each path, the
time in its matrix products, attention and GELU.

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/classify_profile.py --sequences 1024 --hidden 128 --threads 2
"""

import argparse
import cProfile
import pstats
import statistics
import time

import torch

import earlyexit_kernels as eek
from earlyexit_kernels.bench.stream import StreamConfig, calibrate, run_on_batches, sorted_stream

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
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--saved", type=float, default=0.0, help="share of layer evaluations saved (0: none exits)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=25, help="functions listed from the profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = StreamConfig(
        sequences=args.sequences, hidden=args.hidden, layers=12, heads=max(2, args.hidden // 64), seed=0
    )
    stream = sorted_stream(config, 32)
    unpatched, model, batches, items = stream.unpatched, stream.model, stream.batches, stream.items
    eek.patch(model, eek.Entropy(calibrate(stream.entropies, args.saved)))

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
