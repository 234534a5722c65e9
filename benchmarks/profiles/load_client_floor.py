"""What the serving benchmark's load generator adds to a latency by itself (issue 78 item 2).

A server that does nothing but wait (``--delay`` seconds a request, then the answer
``/classify`` gives: Starlette under uvicorn, on the server's core as ``eek serve`` runs) is driven
by the benchmark's own client (``benchmarks.suite.serve_drive.drive``, on the other core) at each
concurrency. Every request should take the delay: what the client measures beyond it, at the
median, the p99 and the maximum, is the load generator's and the HTTP stack's, the floor under
any server's tail in the serving tables. ``--collector on`` drives with the client's garbage
collector left on (as before 2026-11-27), for the comparison::

    flock -x /tmp/eek-cpu.lock python benchmarks/profiles/load_client_floor.py --concurrency 8 32 --seconds 40
"""

import argparse
import asyncio
import contextlib
import socket
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import benchmarks.suite.serve_drive as serve_drive
from earlyexit_kernels.bench.server_process import LocalServer

APP = """
import asyncio
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def classify(request):
    body = await request.json()
    await asyncio.sleep({delay})
    return JSONResponse({{"data": [[{{"label": "pos", "score": 0.9}}] for _ in body["input"]]}})

async def health(request):
    return JSONResponse({{}})

app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/health", health)])
"""


@contextlib.asynccontextmanager
async def _collector_on():
    yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--delay", type=float, default=0.1, help="the server's seconds a request")
    parser.add_argument("--collector", choices=["off", "on"], default="off", help="the client's garbage collector")
    args = parser.parse_args()
    if args.collector == "on":
        serve_drive.collector_off = _collector_on  # drive() reads it when it runs
    server_cores, client_cores = serve_drive.default_cores()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "fixed_delay_app.py").write_text(textwrap.dedent(APP.format(delay=args.delay)))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "uvicorn", "--app-dir", folder, "fixed_delay_app:app"]
        command += ["--port", str(port), "--log-level", "warning"]
        with LocalServer(command, port, cores=server_cores, name="fixed-delay server") as server:
            print(
                f"| concurrency | requests/s | p50 ms | p99 ms | max ms | (server's delay {1000 * args.delay:.0f} ms, "
                f"client's collector {args.collector}) |"
            )
            print("|---:|---:|---:|---:|---:|---|")
            with serve_drive.pinned(client_cores):
                for concurrency in args.concurrency:
                    texts = ["a text"] * 64
                    run = asyncio.run(
                        serve_drive.drive(server.url, texts, list(range(64)), concurrency, args.seconds, cycle=True)
                    )
                    latency = sorted(run.latency)
                    p50, p99 = (1000 * latency[min(len(latency) - 1, int(q * len(latency)))] for q in (0.5, 0.99))
                    print(
                        f"| {concurrency} | {len(latency) / run.wall:.1f} | {p50:.1f} | {p99:.1f} | {1000 * latency[-1]:.1f} | |",
                        flush=True,
                    )
    print(f"\nserver on core(s) {server_cores}, client on {client_cores}")


if __name__ == "__main__":
    main()
