"""How much of the time a served process holds the GIL, and where (issue 78 item 3).

``eek serve`` on one core, one thread, driven at ``--concurrency`` with ``--texts-per-request``
texts a ``POST /classify`` (as the serving benchmark drives it); after a warm-up, ``py-spy record
--gil --nonblocking --format raw`` samples it for ``--seconds`` at ``--rate`` a second. A sample is
kept only where a thread holds the GIL, and at most one thread holds it at a time, so the kept
samples over the samples taken are the share of the time the GIL is held. Each kept sample is
put to the part its stack shows first, from the innermost frame out: ONNX Runtime or torch
calls, the tokenizer, the engine (``earlyexit_kernels/engine``), the server's own code, the HTTP
stack (uvicorn, starlette, h11/httptools, asyncio), and the rest. ``--engine-functions N`` also prints the N
engine functions most often innermost in the engine's samples (where its own Python holds the GIL)::

    flock -x /tmp/eek-cpu.lock python benchmarks/profiles/gil_share.py FOLDER TEXTS.txt --setting "int8:--dtype int8"
"""

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

from benchmarks.suite.serve_drive import default_cores, drive, pinned
from earlyexit_kernels.bench.server_process import EekServer

#: (part, what a frame's text holds), the first match from the innermost frame out names the sample's part
PARTS = (
    ("ONNX Runtime / torch calls", ("onnxruntime", "torch/")),
    ("tokenizer", ("tokenizers", "transformers/tokenization")),
    ("engine", ("earlyexit_kernels/engine",)),
    ("server code", ("earlyexit_kernels/integrations",)),
    ("HTTP stack and event loop", ("uvicorn", "starlette", "h11", "httptools", "asyncio", "anyio", "json")),
)


def part_of(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for part, marks in PARTS:
            if any(mark in frame for mark in marks):
                return part
    return "other"


def engine_function(stack: str) -> str:
    """The innermost engine frame of ``stack`` (py-spy's raw frames: ``function (path:line)``), by file and name."""
    for frame in reversed(stack.split(";")):
        if "earlyexit_kernels/engine" in frame:
            function, _, where = frame.partition(" (")
            return f"{where.split('earlyexit_kernels/engine/')[-1].split(':')[0]}:{function.strip()}"
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("texts", type=Path, help="one text per line")
    parser.add_argument("--setting", default="eek serve:", help="NAME:EXTRA OPTIONS of eek serve")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--engine-functions", type=int, default=0, metavar="N", help="the engine's N busiest functions")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    texts = [line for line in args.texts.read_text().splitlines() if line.strip()]
    server_cores, client_cores = default_cores()
    name, _, extra = args.setting.partition(":")
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    server = EekServer(args.folder, None, 32, 1, extra=tuple(extra.split()), cores=server_cores, env=env, name=name)
    try:
        with pinned(client_cores), tempfile.TemporaryDirectory() as folder:
            asyncio.run(drive(server.url, texts, list(range(64)), args.concurrency, 20))  # warm-up
            raw = Path(folder) / "gil.txt"
            command = [spy, "record", "--gil", "--nonblocking", "--format", "raw", "--rate", str(args.rate)]
            command += ["--duration", str(int(args.seconds)), "--pid", str(server.pid), "--output", str(raw)]

            def spy_on() -> None:
                time.sleep(2)  # the load first
                subprocess.run(command, check=True, capture_output=True)

            spying = threading.Thread(target=spy_on)
            spying.start()
            run = asyncio.run(
                drive(
                    server.url,
                    texts,
                    list(range(len(texts))),
                    args.concurrency,
                    args.seconds + 4,
                    cycle=True,
                    per_request=args.texts_per_request,
                )
            )
            spying.join()
            counts: collections.Counter = collections.Counter()
            functions: collections.Counter = collections.Counter()
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if stack:
                    part = part_of(stack)
                    counts[part] += int(count)
                    if part == "engine":
                        functions[engine_function(stack)] += int(count)
    finally:
        server.stop()
    taken = args.rate * int(args.seconds)
    held = sum(counts.values())
    print(
        f"{name}, concurrency {args.concurrency}, {args.texts_per_request} texts a request: "
        f"{len(run.index) / run.wall:.1f} texts/s; the GIL held in {held} of {taken} samples "
        f"({100 * held / taken:.0f}% of the time)"
    )
    print("| part | share of the time | share of the GIL's samples |\n|---|---:|---:|")
    for part, count in counts.most_common():
        print(f"| {part} | {100 * count / taken:.1f}% | {100 * count / max(1, held):.1f}% |")
    if args.engine_functions:
        print("\n| engine function (innermost) | share of the time |\n|---|---:|")
        for function, count in functions.most_common(args.engine_functions):
            print(f"| `{function}` | {100 * count / taken:.1f}% |")


if __name__ == "__main__":
    main()
