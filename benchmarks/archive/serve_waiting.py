"""The served tail of issue 53, by simulation of the engine's scheduling alone (no model).

Finished investigation: admitting new texts behind the longest waiting group took concurrency 32 from p99
7.2 s to 528 ms at the same requests per second (docs/serving.md, "Bounded waiting").

``eek serve`` one text per request, ``C`` clients each sending its next request as soon as
(about 1 ms after) the last was answered. The engine is driven exactly as its thread drives
it (:class:`~earlyexit_kernels.engine.engines.continuous.scheduler.LayerScheduler` and the runner's fifo
:class:`~earlyexit_kernels.engine.stream.admission.PendingQueue`, new sequences taken between two
steps), eager shapes, ``max_batch_size`` 64; each step's time comes from a cost model of
one CPU thread running a MiniLM-L6-sized layer (hidden 384): ``0.25 ms + 70 us`` per token of
the call (its real tokens where the call runs packed, below 0.75 fill). Texts: 4-120 tokens,
lognormal around 27; exit layers drawn so that 3.6 of 6 layers run on average, 35% all six
(the certified Rotten Tomatoes classifier's shape). Host only, a minute.

For each concurrency and ``max_age`` (None: the rule off, the engine before issue 53): the
requests' p50, p99 and longest latency, and the longest wait in layer calls against the
stated bound (``max_age + L x n``, :mod:`earlyexit_kernels.engine.stream.aging`).

    python benchmarks/archive/serve_waiting.py [--requests 4000]
"""

from __future__ import annotations

import argparse
import heapq
import math
import random

import numpy as np

from earlyexit_kernels.engine.engines.continuous.scheduler import Admit, LayerScheduler, ShapeBuckets, default_call_cost
from earlyexit_kernels.engine.stream.admission import PendingQueue

LAYERS = 6
EXIT_SHARES = (0.25, 0.15, 0.10, 0.10, 0.05, 0.35)  # of the sequences leaving at layers 1..6
SECONDS_PER_TOKEN = 70e-6  # a MiniLM layer (H 384) on one CPU thread, per token
CALL_COST = default_call_cost(384)  # the engine's, in tokens
THINK = 1e-3  # mean seconds between an answer and the client's next request


def simulate(concurrency: int, requests: int, max_age: int | None, seed: int = 0) -> dict:
    rng = random.Random(seed)
    scheduler = LayerScheduler(LAYERS, ShapeBuckets.exact(64, 512), 1024, call_cost=CALL_COST, max_age=max_age)
    pending = PendingQueue("fifo")
    seconds_per_call = CALL_COST * SECONDS_PER_TOKEN
    now, issued = 0.0, 0
    arrivals: list[tuple[float, int]] = []
    length, exit_layer, submitted, clock_in, clock_out, finished = {}, {}, {}, {}, {}, {}
    free = list(range(1024))
    sequence_of: dict[int, int] = {}

    def request(at: float) -> None:
        nonlocal issued
        length[issued] = min(max(round(math.exp(rng.gauss(math.log(27), 0.5))), 4), 120)
        exit_layer[issued] = rng.choices(range(1, LAYERS + 1), EXIT_SHARES)[0]
        heapq.heappush(arrivals, (at, issued))
        issued += 1

    for _ in range(concurrency):
        request(0.0)
    while True:
        while arrivals and arrivals[0][0] <= now:  # the thread takes what arrived, between two steps
            at, sequence = heapq.heappop(arrivals)
            submitted[sequence], clock_in[sequence] = at, scheduler.calls
            pending.add(sequence, np.zeros(length[sequence]), None, scheduler.calls, at)
        action = scheduler.decide(bool(pending), pending.oldest())
        if action is None:
            if not arrivals:
                break
            now = arrivals[0][0]
            continue
        if isinstance(action, Admit):
            overdue_from = None if max_age is None else scheduler.calls - max_age
            taken = pending.take(action.count, overdue_from)
            rows = [free.pop() for _ in taken]
            for row, entry in zip(rows, taken):
                sequence_of[row] = entry[2]
            scheduler.admit(rows, [entry[0] for entry in taken], [entry[5] for entry in taken])
            now += seconds_per_call
            continue
        lengths = [length[sequence_of[row]] for row in action.rows]
        slots = len(lengths) * max(lengths)
        tokens = sum(lengths) * 1.1 if sum(lengths) < 0.75 * slots else slots  # packed: real tokens
        now += seconds_per_call + SECONDS_PER_TOKEN * tokens
        for row in action.rows:
            sequence = sequence_of[row]
            if exit_layer[sequence] == action.layer:
                scheduler.release(row)
                free.append(row)
                finished[sequence], clock_out[sequence] = now, scheduler.calls
                if issued < requests:
                    request(now + rng.expovariate(1 / THINK))
            else:
                scheduler.requeue(row, action.layer + 1, length[sequence])
    latency = sorted(finished[s] - submitted[s] for s in finished)
    waits = {s: clock_out[s] - clock_in[s] for s in finished}
    worst = max(waits, key=waits.get)
    return {
        "req/s": len(latency) / max(finished.values()),
        "p50": latency[len(latency) // 2],
        "p99": latency[int(0.99 * len(latency))],
        "max": latency[-1],
        "longest wait": waits[worst],
        "bound": None if max_age is None else _bound(worst, max_age, clock_in, clock_out),
        "exit 6 among slowest 1%": _deep_share(finished, submitted, exit_layer),
    }


def _bound(sequence: int, max_age: int, clock_in: dict, clock_out: dict) -> int:
    """``max_age + L x n`` for ``sequence``: ``n`` the sequences submitted no later, still there when it is overdue."""
    overdue_at = clock_in[sequence] + max_age
    n = sum(1 for s in clock_in if clock_in[s] <= clock_in[sequence] and clock_out[s] > overdue_at)
    return max_age + LAYERS * n


def _deep_share(finished: dict, submitted: dict, exit_layer: dict) -> float:
    slowest = sorted(finished, key=lambda s: finished[s] - submitted[s])[-max(len(finished) // 100, 1) :]
    return sum(exit_layer[s] == LAYERS for s in slowest) / len(slowest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    print(
        "Scheduler-only simulation (`python benchmarks/archive/serve_waiting.py`, host only, no model: call times from the"
        f" cost model of its docstring, not measured): `eek serve`, one text per request, {args.requests} requests"
        " per row, a MiniLM-L6-sized layer on one CPU thread, `max_batch_size` 64, eager shapes; `max_age` None is"
        f" the engine without the age rule, {2 * LAYERS} its default (2 x {LAYERS} layers). Latencies in modelled"
        " milliseconds; waits in layer calls from the engine taking a text to its exit.\n"
    )
    print(
        "| concurrency | max_age | req/s | p50 ms | p99 ms | max ms | longest wait (layer calls) | its bound | all 6 layers, of the slowest 1% |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency in (1, 8, 32, 128):
        for max_age in (None, 2 * LAYERS):
            r = simulate(concurrency, args.requests, max_age)
            bound = "" if r["bound"] is None else r["bound"]
            print(
                f"| {concurrency} | {max_age} | {r['req/s']:.0f} | {1e3 * r['p50']:.0f} | {1e3 * r['p99']:.0f} | "
                f"{1e3 * r['max']:.0f} | {r['longest wait']} | {bound} | {r['exit 6 among slowest 1%']:.2f} |"
            )


if __name__ == "__main__":
    main()
