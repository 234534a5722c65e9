"""The load generator measured against itself: httpx's ``AsyncClient`` (the serving benchmarks' client before)
and aiohttp (:mod:`earlyexit_kernels.bench.load_client`, the client now), alternating, against one
``eek serve`` on the server core, one text a ``POST /classify``, at each concurrency for ``--seconds``.

Per run: requests/s, the client's p50/p99/max latency, the server's own p99 (``x-total-time``) and the
client process's CPU time over the run's wall time (its share of its one core). A client that needs its
whole core measures itself, not the server::

    flock -x /tmp/eek-cpu.lock python benchmarks/profiles/load_client_ab.py FOLDER TEXTS.txt \\
        --setting "MiniLM-L6 int8:--dtype int8" --concurrency 8 32 --seconds 25
"""

import argparse
import asyncio
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

from benchmarks.profiles.request_latency_parts import quantile
from benchmarks.suite.serve_drive import collector_off, default_cores, drive, pinned
from earlyexit_kernels.bench.server_process import EekServer

#: with ``--trace-pool``: per httpx request, seconds from its call until httpcore began writing its headers
POOL_WAITS: list[float] = []


async def httpx_drive(url: str, texts: list[str], concurrency: int, seconds: float, trace_pool: bool = False):
    """The client before (serve_drive.drive up to this change): latencies (s) and the server's totals (ms)."""
    import httpx

    latency, total, sent = [], [], 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with collector_off(), httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        stop_at = time.perf_counter() + seconds

        async def worker():
            nonlocal sent
            while time.perf_counter() < stop_at:
                text = texts[sent % len(texts)]
                sent += 1
                started = time.perf_counter()
                marks = {}

                async def trace(event: str, info, marks=marks) -> None:  # httpcore's trace extension
                    marks.setdefault(event, time.perf_counter())

                extensions = {"trace": trace} if trace_pool else None
                response = await client.post("/classify", json={"input": [text]}, extensions=extensions)
                response.json()
                if trace_pool:
                    POOL_WAITS.append(marks["http11.send_request_headers.started"] - started)
                latency.append(time.perf_counter() - started)
                total.append(int(response.headers["x-total-time"]))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latency, total


async def aiohttp_drive(url: str, texts: list[str], concurrency: int, seconds: float, trace_pool: bool = False):
    run = await drive(url, texts, list(range(len(texts))), concurrency, seconds, cycle=True)
    return run.latency, [timings["x-total-time"] for timings in run.timings]


CLIENTS = {"httpx": httpx_drive, "aiohttp": aiohttp_drive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("texts", type=Path, help="one text per line")
    parser.add_argument("--setting", default="eek serve:", help="NAME:EXTRA OPTIONS of eek serve")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--pairs", type=int, default=2, help="httpx then aiohttp, this many times a level")
    parser.add_argument(
        "--trace-pool",
        action="store_true",
        help="httpx's runs also time each request's wait before its headers are written (httpcore's trace; slower)",
    )
    parser.add_argument("--output", type=Path, help="also write the table here (Markdown)")
    args = parser.parse_args()
    texts = [line for line in args.texts.read_text().splitlines() if line.strip()]
    name, _, extra = args.setting.partition(":")
    server_cores, client_cores = default_cores()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = [
        f"`{' '.join(sys.argv)}`",
        f"{time.strftime('%Y-%m-%d')}, {name}: server on core(s) {server_cores}, client on {client_cores}",
        "",
        "| concurrency | client | requests/s | p50 ms | p99 ms | max ms | server's p99 ms | client's CPU (of its core) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(out), flush=True)
    server = EekServer(args.folder, None, 32, 1, extra=tuple(extra.split()), cores=server_cores, env=env, name=name)
    try:
        with pinned(client_cores):
            asyncio.run(aiohttp_drive(server.url, texts, 8, 10))  # warm-up
            for concurrency in args.concurrency:
                for client in [*CLIENTS] * args.pairs:
                    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                    POOL_WAITS.clear()
                    run = CLIENTS[client](server.url, texts, concurrency, args.seconds, args.trace_pool)
                    latency, total = asyncio.run(run)
                    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
                    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / wall
                    line = (
                        f"| {concurrency} | {client} | {len(latency) / wall:.1f} | {1000 * quantile(latency, 0.5):.1f} | "
                        f"{1000 * quantile(latency, 0.99):.1f} | {1000 * max(latency):.1f} | {quantile(total, 0.99)} | "
                        f"{cpu:.0%} |"
                    )
                    print(line, flush=True)
                    out.append(line)
                    if POOL_WAITS:
                        waits = [1000 * wait for wait in POOL_WAITS]
                        pool = f"from its call to its first header written: p50 {quantile(waits, 0.5):.1f} ms, "
                        pool += f"p99 {quantile(waits, 0.99):.1f} ms, max {max(waits):.1f} ms"
                        print(f"|  | (httpx, {pool}) |  |  |  |  |  |  |", flush=True)
                        out.append(f"|  | (httpx, {pool}) |  |  |  |  |  |  |")
    finally:
        server.stop()
    if args.output is not None:
        args.output.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
