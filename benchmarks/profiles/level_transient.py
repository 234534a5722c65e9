"""Where a level of the serving benchmark gets its p99: ``eek serve`` driven as ``serve_peers_cli`` drives it (its
warm-up, then per level 1,024 requests of one text, a quarter at concurrency 1), each level's latencies read in
the order the requests were sent. Per level: the p99, the p99 of its first 128 requests and of the rest, and the
sending positions of its 10 slowest requests, so that a one-off stall (a run of neighbours) tells itself apart
from the level's start and from a steady tail (positions spread out). The last level is run twice::

    flock -x /tmp/eek-cpu.lock python benchmarks/profiles/level_transient.py FOLDER TEXTS.txt \\
        --extra "--dtype int8 --max-batch-size 16" [--launcher benchmarks/profiles/gc_pauses_launcher.py]

Each line also carries the time on the machine's monotonic clock at the level's end, to set beside a launcher's
log (``gc_pauses_launcher.py``).
"""

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

from benchmarks.suite.serve_drive import default_cores, drive, pinned
from earlyexit_kernels.bench.server_process import EekServer


def p99_ms(latencies: list[float]) -> float:
    """The 99th percentile by nearest rank, in ms (the serving benchmark's own p99 interpolates between the two
    ranks around it: a level's figures here can differ from its by a fraction of a ms)."""
    ordered = sorted(latencies)
    return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def describe(concurrency: int, latencies: list[float], wall: float, head: int = 128) -> str:
    slowest = sorted(sorted(range(len(latencies)), key=lambda i: -latencies[i])[:10])
    return (
        f"{time.monotonic():.3f} c{concurrency}: {len(latencies)} requests in {wall:.2f} s, p99 "
        f"{p99_ms(latencies):.1f} ms; the first {head}: {p99_ms(latencies[:head]):.1f}, the rest "
        f"{p99_ms(latencies[head:]):.1f}; the 10 slowest sent at positions {slowest}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("texts", help="one text per line")
    parser.add_argument("--extra", default="--dtype int8", help="eek serve options (default: --dtype int8)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="as the serving benchmark's (32)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 32])
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--launcher", default=None, help="what runs eek in place of python -m earlyexit_kernels")
    args = parser.parse_args()
    texts = [line.rstrip("\n") for line in open(args.texts, encoding="utf-8")]
    server_cores, client_cores = default_cores()
    launcher = {} if args.launcher is None else {"launcher": (sys.executable, args.launcher)}
    server = EekServer(
        args.folder,
        None,
        args.max_batch_size,
        1,
        extra=tuple(args.extra.split()),
        cores=server_cores,
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        **launcher,
    )
    print(f"eek serve {args.extra} --max-batch-size {args.max_batch_size}; server on {server_cores}")
    try:
        with pinned(client_cores):
            asyncio.run(drive(server.url, texts, list(range(min(16, len(texts)))), 4, 60))  # serve_peers' warm-up
            for level, concurrency in enumerate(args.concurrency):
                count = max(1, args.requests // 4) if concurrency == 1 else args.requests
                indices = [(level * args.requests + i) % len(texts) for i in range(count)]
                run = asyncio.run(drive(server.url, texts, indices, concurrency, 30))
                print(describe(concurrency, run.latency, run.wall), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
