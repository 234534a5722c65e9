"""The first requests to a just-started ``eek serve``: with the runtime layers prepared at start-up, and without.

A runtime layer (ONNX Runtime's or OpenVINO's) makes its session at its first call unless it was prepared
(:func:`~earlyexit_kernels.engine.layers.served_layers.prepare_layers`, which the server's start-up runs before
``/health`` answers). Here each round starts two servers on the same folder, one after the other (their order
rotated each round), each as ``eek serve FOLDER --threads T EXTRA``:

- ``prepared at start-up``: ``eek serve`` as installed;
- ``sessions at first call``: the same, with the start-up's preparation left out (this script, run as the
  server's launcher with ``--unprepared``, replaces it by nothing before it runs ``eek``).

Once ``/health`` answers, one client sends ``--requests`` requests of one text each, one at a time (the first
lines of TEXTS, the same for both servers), and reads each request's wall time and its ``x-layer-time``
header. Per server and round: seconds to ``/health``, the first request, the slowest of the first 8, and the
median of the requests after the eighth::

    python benchmarks/profiles/first_requests.py FOLDER TEXTS --extra="--dtype int8" --rounds 3 \\
        --output FILE.json

Nothing else should run beside it: the servers and the client share the machine's cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

SETTINGS = ("prepared at start-up", "sessions at first call")
#: the requests counted as "the first ones" (each may reach layers no request reached before)
FIRST = 8


def serve_unprepared(argv: list[str]) -> None:
    """``eek`` with the server's start-up preparation of the runtime layers left out."""
    from earlyexit_kernels.integrations.server import serving_state

    serving_state.prepare_layers = lambda model: 0
    from earlyexit_kernels.__main__ import main as eek

    raise SystemExit(eek(argv))


def one_server(folder: Path, setting: str, texts: list[str], threads: int, extra: list[str]) -> dict:
    """Start ``setting``'s server, send ``texts`` one request at a time, stop it: its readings."""
    import httpx

    from earlyexit_kernels.bench.server_process import EekServer
    from earlyexit_kernels.integrations.serve_cli import SERVE_ENGINE_DEFAULTS

    launcher = (sys.executable, "-m", "earlyexit_kernels")
    if setting == SETTINGS[1]:
        launcher = (sys.executable, str(Path(__file__).resolve()), "--unprepared", "--")
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    rows = SERVE_ENGINE_DEFAULTS["max_batch_size"]  # eek serve's own default: EekServer passes it on
    server = EekServer(folder, None, rows, threads, extra=tuple(extra), env=env, name=setting, launcher=launcher)
    ready = time.perf_counter() - began
    try:
        wall, layer = [], []
        with httpx.Client(timeout=120) as client:
            for text in texts:
                started = time.perf_counter()
                answer = client.post(server.url + "/predict", json={"inputs": text})
                wall.append((time.perf_counter() - started) * 1e3)
                answer.raise_for_status()
                layer.append(float(answer.headers["x-layer-time"]))
        said = [line for line in server.log_tail(20000).splitlines() if "runtime sessions made at start-up" in line]
    finally:
        server.stop()
    return {
        "ready_s": round(ready, 3),
        "first_ms": round(wall[0], 1),
        "slowest_of_first_ms": round(max(wall[:FIRST]), 1),
        "later_median_ms": round(statistics.median(wall[FIRST:]), 1),
        "request_ms": [round(w, 1) for w in wall],
        "layer_ms": layer,
        "start_up_line": said[0] if said else None,
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--unprepared"]:
        serve_unprepared(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the folder eek serve serves")
    parser.add_argument("texts", type=Path, help="a .csv with a text column, or a .txt of one text a line")
    parser.add_argument("--requests", type=int, default=32, help=f"requests per server (default 32; > {FIRST})")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="the server's --threads (default 1)")
    parser.add_argument("--extra", default="", help="more eek serve options, one string (--extra='--dtype int8')")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.requests <= FIRST or args.rounds < 1:
        parser.error(f"--requests must be more than {FIRST} and --rounds at least 1")
    from benchmarks.suite.corpus_peers import read_texts
    from benchmarks.suite.script_results import run_conditions, write_json

    started = time.perf_counter()
    texts = read_texts(args.texts)[: args.requests]
    if len(texts) < args.requests:
        parser.error(f"{args.texts} holds {len(texts)} texts; --requests asks for {args.requests}")
    rounds = {setting: [] for setting in SETTINGS}
    for round_ in range(args.rounds):
        order = SETTINGS[round_ % 2 :] + SETTINGS[: round_ % 2]
        for setting in order:
            rounds[setting].append(one_server(args.folder, setting, texts, args.threads, args.extra.split()))
            row = rounds[setting][-1]
            print(
                f"round {round_ + 1}, {setting}: ready in {row['ready_s']:.1f} s, first request {row['first_ms']:.1f} "
                f"ms, slowest of the first {FIRST} {row['slowest_of_first_ms']:.1f}, later median "
                f"{row['later_median_ms']:.1f}",
                flush=True,
            )
    medians = {
        setting: {key: round(statistics.median(r[key] for r in done), 1) for key in
                  ("ready_s", "first_ms", "slowest_of_first_ms", "later_median_ms")}
        for setting, done in rounds.items()
    }  # fmt: skip
    result = {
        **run_conditions("benchmarks/profiles/first_requests.py", argv, started),
        "what": "the first requests of one text each to a just-started eek serve, its runtime layers prepared at "
        "start-up or making their sessions at their first calls",
        "folder": str(args.folder),
        "server_threads": args.threads,
        "extra": args.extra,
        "requests": args.requests,
        "first": FIRST,
        "rounds": rounds,
        "medians": medians,
    }
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
