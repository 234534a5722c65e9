"""Where a served request's time goes, part by part, at its median and at its tail (issue 78 item 2).

``eek serve`` on one core, one thread (as the serving benchmark runs it), driven at each
concurrency with one text per ``POST /classify`` for ``--seconds`` after a warm-up. Each answer's
timing headers are its own timeline (``request_costs.RequestCosts``): tokenizing (body read and
parsed included), queued until the engine admits its text, in the layer calls that held it,
waiting for a layer call, handing the answer back and formatting it; beside them the client's
latency and what none of the parts holds (the client's and the event loop's share). Printed per
level: the p50 and p99 of each part over the requests, and the parts of the requests in the
slowest 1% (their mean), so that the tail's own cause shows::

    flock -x /tmp/eek-cpu.lock python benchmarks/profiles/request_latency_parts.py FOLDER TEXTS.txt \\
        --setting "int8:--dtype int8" --concurrency 8 32 --seconds 60
"""

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

from benchmarks.suite.serve_drive import default_cores, drive, pinned
from earlyexit_kernels.bench.server_process import EekServer

#: the parts, from each answer's headers (ms), in the order of the request's timeline
PARTS = {
    "tokenize": "x-tokenization-time",
    "queue": "x-queue-time",
    "in layer calls": "x-layer-time",
    "waiting for a call": "x-layer-wait-time",
    "answer": "x-answer-time",
}


#: with ``--launcher benchmarks/profiles/clock_marks_launcher.py``: what ``elsewhere`` holds, from the
#: server's marks on the machine's monotonic clock and the client's own send and receive times
OUTSIDE = ("before the read", "read to the app", "after the hand-off")


def parts_of(run) -> list[dict[str, float]]:
    """Per answered request, its parts in ms: the headers', the server's total and the client's
    latency, and ``elsewhere``: the client's latency less the server's total. Where the answer
    carries the clock marks, ``elsewhere`` splits into :data:`OUTSIDE`: sent until uvicorn reads it,
    read until the app receives it, and the app's hand-off until the client holds the answer."""
    rows = []
    for timings, latency, sent_at in zip(run.timings, run.latency, run.sent_at, strict=True):
        if not all(header in timings for header in PARTS.values()):
            continue
        row = {part: float(timings[header]) for part, header in PARTS.items()}
        row["server total"] = float(timings["x-total-time"])
        row["client latency"] = 1000 * latency
        row["elsewhere"] = row["client latency"] - row["server total"]
        if all(mark in timings for mark in ("x-read-at", "x-arrived-at", "x-handed-at")):
            sent, received = 1e6 * sent_at, 1e6 * (sent_at + latency)  # µs, as the marks
            row["before the read"] = (timings["x-read-at"] - sent) / 1000
            row["read to the app"] = (timings["x-arrived-at"] - timings["x-read-at"]) / 1000
            row["after the hand-off"] = (received - timings["x-handed-at"]) / 1000
        rows.append(row)
    return rows


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(name: str, concurrency: int, rows: list[dict[str, float]], wall: float) -> list[str]:
    tail = sorted(rows, key=lambda row: row["client latency"])[-max(1, len(rows) // 100) :]
    lines = [f"\n{name}, concurrency {concurrency}: {len(rows)} requests in {wall:.0f} s ({len(rows) / wall:.1f}/s)\n"]
    lines.append("| part | p50 ms | p99 ms | mean ms | mean ms of the slowest 1% |")
    lines.append("|---|---:|---:|---:|---:|")
    outside = OUTSIDE if rows and OUTSIDE[0] in rows[0] else ()
    for part in (*PARTS, "server total", "elsewhere", *outside, "client latency"):
        values = [row[part] for row in rows]
        lines.append(
            f"| {part} | {quantile(values, 0.5):.1f} | {quantile(values, 0.99):.1f} | {statistics.fmean(values):.1f} "
            f"| {statistics.fmean(row[part] for row in tail):.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("texts", type=Path, help="one text per line")
    parser.add_argument(
        "--setting",
        nargs="+",
        default=["eek serve:"],
        help="NAME:EXTRA OPTIONS of eek serve, or NAME:EXTRA OPTIONS|LAUNCHER to run it with its own --launcher",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--output", type=Path, help="also write the tables here (Markdown)")
    parser.add_argument(
        "--launcher", nargs="+", help="what runs eek in place of python -m earlyexit_kernels (a wrapper script)"
    )
    args = parser.parse_args()
    texts = [line for line in args.texts.read_text().splitlines() if line.strip()]
    server_cores, client_cores = default_cores()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = [
        f"`{' '.join(sys.argv)}`",
        f"{time.strftime('%Y-%m-%d')}, server on core(s) {server_cores}, client on {client_cores}",
    ]
    for setting in args.setting:
        name, _, extra = setting.partition(":")
        extra, _, own_launcher = extra.partition("|")  # NAME:OPTIONS|LAUNCHER: this setting's own
        script = [own_launcher] if own_launcher else args.launcher
        launcher = {} if script is None else {"launcher": (sys.executable, *script)}
        server = EekServer(
            args.folder, None, 32, 1, extra=tuple(extra.split()), cores=server_cores, env=env, name=name, **launcher
        )
        try:
            with pinned(client_cores):
                asyncio.run(drive(server.url, texts, list(range(64)), 8, 30))  # warm-up
                for level, concurrency in enumerate(args.concurrency):
                    indices = [(level * 4096 + i) % len(texts) for i in range(len(texts))]
                    run = asyncio.run(drive(server.url, texts, indices, concurrency, args.seconds, cycle=True))
                    lines = table(name, concurrency, parts_of(run), run.wall)
                    print("\n".join(lines), flush=True)
                    out += lines
        finally:
            server.stop()
    if args.output is not None:
        args.output.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
