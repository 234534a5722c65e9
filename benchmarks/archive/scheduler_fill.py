"""The continuous engine's layer calls against the per-batch loop's, by simulation of its scheduler alone (no model).

Finished investigation: with nothing exiting the engine runs the per-batch loop's calls (0.7% more token slots
at 64k sequences); with half the layers saved 13-27% fewer layer calls (docs/benchmarks.md, "Benchmarks";
docs/serving.md, "Bounded waiting").

Drives :class:`earlyexit_kernels.engine.engines.continuous.scheduler.LayerScheduler` exactly as the runner does
under ``eek.classify`` (read-ahead of ``32 * max_in_flight`` inputs, the length sweep, whole
cohorts admitted, survivors requeued, exits released) over streams of the stream
benchmark's lengths (``bench.stream.stream_lengths``), with exit layers drawn from a
committed stream run's distribution (about half the layer evaluations saved) or nothing
exiting, in eager shapes. Beside it, the per-batch loop on the whole stream sorted by length:
its layer calls and the token fill of both (real tokens over rows x padded length). Host
only, seconds.

    python benchmarks/archive/scheduler_fill.py
"""

from __future__ import annotations

import argparse
import random
from bisect import bisect_left

from earlyexit_kernels.bench.stream import stream_lengths
from earlyexit_kernels.engine.engines.continuous.scheduler import Admit, LayerScheduler, ShapeBuckets

# Sequences exiting at layers 1..12 in a committed stream run (benchmarks/results/unknown_cpu/stream_cpu.md).
EXITS_PER_LAYER = (0, 25, 73, 124, 204, 231, 122, 127, 114, 0, 4, 0)
LAYERS = len(EXITS_PER_LAYER)


def per_batch(lengths: list[int], exits: list[int], batch: int) -> tuple[int, int]:
    """(layer calls, slots) of the per-batch loop on the stream sorted by length, in batches of ``batch``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    calls = slots = 0
    for start in range(0, len(order), batch):
        cohort = order[start : start + batch]
        for layer in range(1, LAYERS + 1):
            active = [lengths[i] for i in cohort if exits[i] >= layer]
            if active:
                calls, slots = calls + 1, slots + len(active) * max(active)
    return calls, slots


def continuous(lengths: list[int], exits: list[int], batch: int, call_cost: float) -> tuple[int, int]:
    """(layer calls, slots) of the scheduler driven as ``eek.classify`` drives it."""
    count, in_flight = len(lengths), 16 * batch
    read_ahead = 32 * in_flight  # eek.classify's default
    scheduler = LayerScheduler(LAYERS, ShapeBuckets.exact(batch, 256), in_flight, call_cost=call_cost)
    pending: list[tuple[int, int]] = []  # (length, arrival), sorted
    sweep, cutoff, next_input = (0, -1), 0, 0
    free = list(range(in_flight))
    sequence_of: dict[int, int] = {}
    calls = slots = 0
    while True:
        while next_input < count and len(pending) < read_ahead:
            pending.insert(bisect_left(pending, (lengths[next_input], next_input)), (lengths[next_input], next_input))
            next_input += 1
        action = scheduler.decide(can_admit=bool(pending))
        if action is None:
            return calls, slots
        if isinstance(action, Admit):  # the runner's length sweep
            start = bisect_left(pending, (sweep[0], sweep[1] + 1))
            taken = [e for e in pending[start:] if e[1] < cutoff][: action.count]
            if len(taken) < action.count:
                cutoff = next_input
                chosen = set(taken)
                taken += [e for e in pending if e not in chosen][: action.count - len(taken)]
            chosen = set(taken)
            pending = [e for e in pending if e not in chosen]
            sweep = taken[-1]
            rows = [free.pop() for _ in taken]
            for row, (_, sequence) in zip(rows, taken):
                sequence_of[row] = sequence
            scheduler.admit(rows, [length for length, _ in taken])
            continue
        calls += 1
        slots += len(action.rows) * action.padded_length
        for row in action.rows:
            sequence = sequence_of[row]
            if exits[sequence] == action.layer:
                scheduler.release(row)
                free.append(row)
            else:
                scheduler.requeue(row, action.layer + 1, lengths[sequence])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--call-cost", type=float, default=32.0, help="the scheduler's call_cost (tokens)")
    args = parser.parse_args(argv)
    batch = args.max_batch_size
    print(f"max_batch_size {batch}, call_cost {args.call_cost}, eager shapes, 12 layers")
    print()
    print("| sequences | exits | layer calls (per-batch) | token fill (per-batch) | slots / per-batch's |")
    print("| --- | --- | --- | --- | --- |")
    for count in (1024, 4096, 16384, 65536):
        lengths = stream_lengths(count, 0)
        spread = random.Random(7).choices(range(1, LAYERS + 1), weights=EXITS_PER_LAYER, k=count)
        for name, exits in (("none", [LAYERS] * count), ("half the layers saved", spread)):
            tokens = sum(length * layer for length, layer in zip(lengths, exits))
            calls_b, slots_b = per_batch(lengths, exits, batch)
            calls_c, slots_c = continuous(lengths, exits, batch, args.call_cost)
            print(
                f"| {count} | {name} | {calls_c} ({calls_b}) | {tokens / slots_c:.1%} ({tokens / slots_b:.1%}) "
                f"| {slots_c / slots_b:.3f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
