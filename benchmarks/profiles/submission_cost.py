"""What one submission to the continuous engine costs on the host: ``engine.submit`` of each of the stream
benchmark's 1,024 sequences (``eek bench stream``'s corpus), timed over fresh engines.

Every sequence ``eek.classify`` or a server hands the CPU's engine passes the stream surface's checks (its tokens'
type and length, their ids' range) before it is queued; this times that path alone, without a layer call, so that
a change to it shows apart from the layers' noise. Run it from a checkout of each commit to compare (the import
falls back to the engine's path before ``engine/`` moved into wings)::

    .venv/bin/python benchmarks/profiles/submission_cost.py --engines 30

Prints the min and median of the per-sequence cost over the engines. Quoted in docs/benchmarks.md ("The CPU stream
after `engine/` moved into wings").
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import earlyexit_kernels as eek
from earlyexit_kernels.bench.stream import StreamConfig, calibrate, make_corpus, make_models, sorted_batches

try:
    from earlyexit_kernels.engine.engines.continuous.engine import ContinuousEngine
except ImportError:  # a checkout from before engine/ moved into wings
    from earlyexit_kernels.engine.continuous import ContinuousEngine


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=int, default=30, help="fresh engines, each given every sequence (30)")
    parser.add_argument("--sequences", type=int, default=1024, help="the stream's sequences (1024)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = StreamConfig(sequences=args.sequences, hidden=64, layers=12, compile=False, memory=False)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, _, ids = make_corpus(config, Path(folder))
    _, model, entropies = make_models(config, len(tokenizer), sorted_batches(ids, config.max_batch_size))
    eek.patch(model, eek.Entropy(calibrate(entropies, 0.5)))
    arrays = [np.asarray(i, dtype=np.int64) for i in ids]
    per_sequence = []
    for _ in range(args.engines):
        engine = ContinuousEngine(model, max_batch_size=config.max_batch_size, admission="length")
        start = time.perf_counter()
        for key, array in enumerate(arrays):
            engine.submit(key, array)
        per_sequence.append((time.perf_counter() - start) / len(arrays) * 1e6)
    print(
        f"submission: min {min(per_sequence):.2f} us, median {statistics.median(per_sequence):.2f} us a sequence "
        f"({args.engines} engines x {len(arrays)} sequences, {eek.__file__})"
    )


if __name__ == "__main__":
    sys.exit(main())
