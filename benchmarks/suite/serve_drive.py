"""The serving benchmark's client: the load it drives and the row it makes of it.

:func:`drive` sends texts to a server's ``POST /classify`` (asyncio + aiohttp, ``concurrency``
requests at a time, the client's garbage collector off while it runs: :func:`collector_off`) and
gives back a :class:`Drive`, what each request answered and how long it took; :func:`summarize`
turns a :class:`Drive` into a result row (texts/s, p50/p99 latency, agreement with the full model's
labels); :func:`pinned` keeps this process on the client's cores for a block, and
:func:`default_cores` splits the cores between server and client. The serving benchmark
(:mod:`benchmarks.suite.serve_peers`), its OpenVINO peer (:mod:`benchmarks.suite.openvino_peer`,
which fills a :class:`Drive` from batches timed in this process) and the profiles under
``benchmarks/profiles/`` drive servers with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from dataclasses import dataclass, field

__all__ = ["Drive", "drive", "summarize", "collector_off", "pinned", "default_cores"]


def default_cores() -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(server cores, client cores): core 0 and the rest where there are two or more, else no pinning."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(available) < 2:
        return None, None
    return (available[0],), tuple(available[1:])


@contextlib.contextmanager
def pinned(cores: tuple[int, ...] | None):
    """This process on ``cores`` for the block (the client's), its affinity restored after."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cores))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class Drive:
    """What a load run got back: per text answered its index, label and exit layer; per request
    answered its latency (s) and the timing headers it carried (``x-*-time``, milliseconds; none
    from a server that sends none)."""

    index: list[int] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)  # per request
    sent_at: list[float] = field(default_factory=list)  # per request: time.perf_counter() as it was sent
    timings: list[dict[str, int]] = field(default_factory=list)  # per request
    label: list[str] = field(default_factory=list)
    exit_layer: list[int | None] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0


def _timing_header(name: str) -> bool:
    """A server's timing header: a span in ms (``x-*-time``) or a mark on the shared monotonic clock in
    µs (``x-*-at``, which ``benchmarks/profiles/clock_marks_launcher.py`` adds)."""
    return name.startswith("x-") and (name.endswith("-time") or name.endswith("-at"))


@contextlib.asynccontextmanager
async def collector_off():
    """Python's garbage collector off (after one collection), on again after: a collection of the
    load generator's objects pauses every request in flight, the client's latency, not the
    server's. Against a server that answers every request in 100 ms, at c32 on the AMD EPYC, the
    client measured a p99 of 230 ms with it on and 135 ms with it off (max 638 against 286 ms;
    ``benchmarks/profiles/load_client_floor.py``, benchmarks/results/amd_epyc/request_latency_parts_cpu.md)."""
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


async def drive(
    url: str,
    texts: list[str],
    indices: list[int],
    concurrency: int,
    max_seconds: float,
    *,
    model: str | None = None,
    cycle: bool = False,
    sample=None,
    every: float = 0.0,
    per_request: int = 1,
) -> Drive:
    """``POST /classify`` of ``texts[i]`` for each i of ``indices``, ``per_request`` texts a request (the
    next indices in order; the last request of a pass may hold fewer), ``concurrency`` requests at a time.

    Stops when every index was sent (``cycle``: starts over until ``max_seconds``) or after
    ``max_seconds``. Answers other than 200 count in ``errors`` (one per request); a worker whose
    connection fails stops. ``sample()`` is called every ``every`` seconds while it runs.

    The client's garbage collector is off while it runs (:func:`collector_off`).
    """
    from earlyexit_kernels.bench import load_client

    out = Drive()
    sent = 0
    body = {} if model is None else {"model": model}
    async with collector_off(), load_client.session(url, concurrency) as client:
        stop_at = time.perf_counter() + max_seconds  # after the collection: the run gets all its seconds

        async def worker():
            nonlocal sent
            while (cycle or sent < len(indices)) and time.perf_counter() < stop_at:
                count = per_request if cycle else min(per_request, len(indices) - sent)
                batch = [indices[(sent + k) % len(indices)] for k in range(count)]
                sent += count
                started = time.perf_counter()
                try:
                    response = await load_client.post_json(
                        client, "/classify", {**body, "input": [texts[i] for i in batch]}
                    )
                except load_client.TransportError:
                    out.errors += 1
                    return
                if response.status != 200:
                    out.errors += 1
                    continue
                out.latency.append(time.perf_counter() - started)
                out.sent_at.append(started)
                out.timings.append({k: int(v) for k, v in response.headers.items() if _timing_header(k)})
                for index, answer in zip(batch, response.json()["data"], strict=True):
                    best = max(answer, key=lambda entry: entry["score"])
                    out.index.append(index)
                    out.label.append(best["label"])
                    out.exit_layer.append(best.get("exit_layer"))

        async def sampler():
            while True:
                await asyncio.sleep(every)
                sample()

        started = time.perf_counter()
        watch = asyncio.create_task(sampler()) if sample is not None and every > 0 else None
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        out.wall = time.perf_counter() - started
        if watch is not None:
            watch.cancel()
    return out


def _quantile_ms(values: list[float], q: float) -> float | str:
    if not values:
        return ""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return round((ordered[low] + (ordered[high] - ordered[low]) * (position - low)) * 1000, 1)


def summarize(server: str, concurrency: int, run: Drive, full: list[str], texts_per_request: int = 1) -> dict:
    agree = sum(label == full[i] for i, label in zip(run.index, run.label, strict=True))
    exits = [e for e in run.exit_layer if e is not None]
    return dict(
        server=server,
        concurrency=concurrency,
        texts_per_request=texts_per_request,
        requests=len(run.latency),
        texts=len(run.index),
        texts_per_s=round(len(run.index) / run.wall, 2) if run.wall > 0 else "",
        p50_ms=_quantile_ms(run.latency, 0.5),
        p99_ms=_quantile_ms(run.latency, 0.99),
        agreement=round(agree / len(run.index), 4) if run.index else "",
        agree=agree,
        mean_exit_layer=round(sum(exits) / len(exits), 2) if exits else "",
        errors=run.errors,
    )
