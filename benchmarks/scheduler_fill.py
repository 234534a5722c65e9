"""Fill of the continuous engine's layer calls, by simulation of its scheduler alone (no model).

The stream benchmark (``earlyexit_kernels.bench.stream``) measured a mean fill of 82% (rows
per layer call over ``max_batch_size``) on a stream of 1024 sequences. This script drives
:class:`earlyexit_kernels.engine.scheduler.LayerScheduler` exactly as the runner does (admit up to
the room left, run the call it hands out, requeue survivors, release exits) over streams of
the same lengths (``bench.stream.stream_lengths``) and exit layers drawn from that run's
distribution, and reports what sets the fill: the stream's length against ``max_in_flight``
(the last sequences drain through ever smaller queues), and ``min_token_fill`` (rows traded
against padding). Host only, seconds.

    python benchmarks/scheduler_fill.py
"""

from __future__ import annotations

import argparse
import random

from earlyexit_kernels.bench.stream import stream_lengths
from earlyexit_kernels.engine.scheduler import Admit, LayerScheduler, ShapeBuckets

# Sequences exiting at layers 1..12 in the committed stream run (benchmarks/results/stream_cpu.md).
EXITS_PER_LAYER = (0, 25, 73, 124, 204, 231, 122, 127, 114, 0, 4, 0)


def simulate(
    count: int,
    *,
    max_batch_size: int = 64,
    max_in_flight: int | None = None,
    min_token_fill: float = 0.85,
    length_step: int = 8,
    seed: int = 0,
) -> dict:
    """Fill, token fill and layer calls of one stream of ``count`` sequences."""
    lengths = stream_lengths(count, seed)
    rng = random.Random(seed + 7)
    layers = len(EXITS_PER_LAYER)
    exit_layers = rng.choices(range(1, layers + 1), weights=EXITS_PER_LAYER, k=count)
    buckets = ShapeBuckets(max_batch_size, 256, length_step)
    in_flight = 16 * max_batch_size if max_in_flight is None else max_in_flight
    scheduler = LayerScheduler(layers, buckets, in_flight, min_token_fill=min_token_fill)
    # Admission as eek.classify's default ("length"): the read-ahead window, shortest first.
    read_ahead = 8 * in_flight
    pending: list[int] = []
    next_input, free = 0, list(range(in_flight))
    sequence_of: dict[int, int] = {}
    rows_run = slots = real_tokens = calls = 0
    while True:
        while next_input < count and len(pending) < read_ahead:
            pending.append(next_input)
            next_input += 1
        pending.sort(key=lambda i: lengths[i], reverse=True)
        action = scheduler.decide(can_admit=bool(pending))
        if action is None:
            break
        if isinstance(action, Admit):
            for _ in range(min(action.count, len(pending))):
                sequence, row = pending.pop(), free.pop()
                sequence_of[row] = sequence
                scheduler.add(row, lengths[sequence])
            continue
        calls += 1
        rows_run += len(action.rows)
        slots += action.padded_rows * action.padded_length
        real_tokens += sum(lengths[sequence_of[row]] for row in action.rows)
        for row in action.rows:
            sequence = sequence_of[row]
            if exit_layers[sequence] == action.layer:
                scheduler.release(row)
                free.append(row)
            else:
                scheduler.requeue(row, action.layer + 1, lengths[sequence])
    return {
        "calls": calls,
        "fill": rows_run / (calls * max_batch_size),
        "token_fill": real_tokens / slots,
        "slots_per_token_layer": slots / real_tokens,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.parse_args(argv)
    print("| sequences | max_in_flight | min_token_fill | layer calls | fill | token fill |")
    print("| --- | --- | --- | --- | --- | --- |")
    cases = [(1024, None, 0.85), (4096, None, 0.85), (16384, None, 0.85), (65536, None, 0.85)]
    cases += [(1024, 256, 0.85), (16384, 256, 0.85), (1024, None, 0.5), (16384, None, 0.5)]
    for count, in_flight, min_fill in cases:
        result = simulate(count, max_in_flight=in_flight, min_token_fill=min_fill)
        shown = in_flight or "default (1024)"
        print(
            f"| {count} | {shown} | {min_fill} | {result['calls']} | {100 * result['fill']:.1f}% "
            f"| {100 * result['token_fill']:.1f}% |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
