"""Where a served request's time goes, concurrency by concurrency: the c32 int8 anomaly (issue 64, item 4).

``eek serve`` on one core, one thread (as the serving benchmark runs it, ``bench/serve_peers.py``),
driven at each concurrency with one text per ``POST /classify`` for ``--seconds``; per level:
texts/s, p50/p99 of the requests, then from the server's own ``/metrics`` over that level alone
the mean seconds per request spent tokenizing, queued (before the engine admits its first text)
and in inference, the layer calls and rows per call, the server process's CPU seconds per text
(``/proc/PID/stat``) and its resident memory at the end of the level. Each ``--setting`` is one
server (extra ``eek serve`` options after a colon, e.g. ``int8:--dtype int8``)::

    flock -x /tmp/eek-cpu.lock python benchmarks/profiles/serve_concurrency_profile.py FOLDER TEXTS.txt \\
        --setting "int8:--dtype int8" "int8, no trim:--dtype int8 --memory-trim off" --concurrency 8 32
"""

import argparse
import asyncio
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import httpx

from benchmarks.suite.serve_drive import default_cores, drive, pinned
from earlyexit_kernels.bench.server_process import EekServer

SPANS = ("tokenization", "queue", "inference")


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    found = {}
    for name in [f"eek_request_{s}_seconds_{k}" for s in SPANS for k in ("sum", "count")]:
        found[name] = sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
    for name in ("eek_layer_calls_total", "eek_layer_call_rows_total"):
        found[name] = sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("texts", type=Path, help="one text per line")
    parser.add_argument("--setting", nargs="+", default=["eek serve:"], help="NAME:EXTRA OPTIONS")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    texts = [line for line in args.texts.read_text().splitlines() if line.strip()]
    server_cores, client_cores = default_cores()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(
        "| setting | concurrency | texts/s | p50 / p99 ms | tokenize / queue / inference ms per request "
        "| layer calls | rows per call | server CPU ms per text | RSS MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for setting in args.setting:
        name, _, extra = setting.partition(":")
        server = EekServer(args.folder, None, 32, 1, extra=tuple(extra.split()), cores=server_cores, env=env, name=name)
        try:
            with pinned(client_cores):
                asyncio.run(drive(server.url, texts, list(range(64)), 8, 30))  # warm-up
                for level, concurrency in enumerate(args.concurrency):
                    before, cpu = metrics(server.url), cpu_seconds(server.pid)
                    indices = [(level * 4096 + i) % len(texts) for i in range(len(texts))]
                    run = asyncio.run(drive(server.url, texts, indices, concurrency, args.seconds, cycle=True))
                    after, used = metrics(server.url), cpu_seconds(server.pid) - cpu
                    d = {k: after[k] - before[k] for k in after}
                    requests = max(1.0, d["eek_request_queue_seconds_count"])
                    spans = " / ".join(f"{1000 * d[f'eek_request_{s}_seconds_sum'] / requests:.1f}" for s in SPANS)
                    latency = sorted(run.latency)
                    p50, p99 = (1000 * latency[int(q * (len(latency) - 1))] for q in (0.5, 0.99))
                    calls = d["eek_layer_calls_total"]
                    print(
                        f"| {name} | {concurrency} | {len(run.index) / run.wall:.1f} | {p50:.1f} / {p99:.1f} | {spans} "
                        f"| {calls:.0f} | {d['eek_layer_call_rows_total'] / max(calls, 1):.1f} "
                        f"| {1000 * used / max(1, len(run.index)):.2f} | {server.resident_kib() / 1024:.0f} |",
                        flush=True,
                    )
        finally:
            server.stop()
    print(f"\n{time.strftime('%Y-%m-%d')}, server on core(s) {server_cores}, client on {client_cores}")


if __name__ == "__main__":
    main()
