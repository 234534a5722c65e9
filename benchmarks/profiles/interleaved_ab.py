"""Two servers' texts/s told apart to within a few percent on a noisy machine: short blocks, interleaved.

Rounds of a minute or more, one server after the other, moved by up to 16% among themselves on this
2-core machine (issue 79's cost rounds), more than the 3% they were meant to tell. Here both servers
run at once (each on the server core, the client on the other), and the load goes to one at a time
in blocks of ``--block`` seconds, in pairs ordered A B, B A, A B, ... so that a slow drift of the
machine falls on both servers of a pair alike. Each pair gives one change, candidate (the first
``--setting``) against baseline (the second): ``texts/s A / texts/s B - 1``. Reported: the median
change with its distribution-free 95% interval (order statistics of the pairs, as the sign test
gives it), the mean with its standard error, and how many pairs went each way (``--combine`` sums up the
pairs of several recorded runs together)::

    flock -x /tmp/eek-cpu.lock python benchmarks/profiles/interleaved_ab.py FOLDER TEXTS.txt \\
        --setting "doubling:--dtype int8" "as asked:--dtype int8|EEK_ARENA_CFG=arena_extend_strategy=1" \\
        --wrapper benchmarks/profiles/ort_sessions_before.py --pairs 20 --block 15 --output OUT.json

Each ``--setting`` is ``NAME:EXTRA eek serve OPTIONS|ENV=VALUE ...``, as in ``serve_memory_profile.py``.
The idle server waits on its event loop; its memory trim (every 10 s) runs as it would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

from benchmarks.profiles.serve_memory_profile import server_setting
from benchmarks.suite.serve_drive import default_cores, drive, pinned
from earlyexit_kernels.bench.results import cpu_name, instruction_sets
from earlyexit_kernels.bench.server_process import EekServer


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values``: the order statistics k and n-1-k
    with k the largest count such that a Binomial(n, 1/2) falls below k with probability at most
    (1 - level) / 2 (the sign test's interval; ``level`` or more covered)."""
    ordered = sorted(values)
    n = len(ordered)
    tail, k = 0.0, -1
    while True:
        nxt = tail + math.comb(n, k + 1) / 2**n
        if nxt > (1 - level) / 2:
            break
        tail, k = nxt, k + 1
    if k < 0:
        return ordered[0], ordered[-1]  # too few pairs for the level: the whole range
    return ordered[k], ordered[n - 1 - k]


def summary(changes: list[float]) -> dict:
    """The pairs' changes (fractions) summed up in percent."""
    low, high = median_interval(changes)
    mean = statistics.fmean(changes)
    se = statistics.stdev(changes) / math.sqrt(len(changes)) if len(changes) > 1 else float("nan")
    return {
        "pairs": len(changes),
        "median_change_pct": round(100 * statistics.median(changes), 2),
        "median_95_pct": [round(100 * low, 2), round(100 * high, 2)],
        "mean_change_pct": round(100 * mean, 2),
        "mean_se_pct": round(100 * se, 2),
        "faster_pairs": sum(c > 0 for c in changes),
        "slower_pairs": sum(c < 0 for c in changes),
    }


def recorded_changes(record: dict) -> list[float]:
    """The pairs' changes (candidate against baseline) of a recorded run, in pair order."""
    candidate, baseline = (setting.partition(":")[0] for setting in record["settings"])
    rates: dict[int, dict[str, float]] = {}
    for block in record["blocks"]:
        rates.setdefault(block["pair"], {})[block["server"]] = block["texts_per_s"]
    return [pair[candidate] / pair[baseline] - 1 for _, pair in sorted(rates.items())]


def _server(args, setting: str, cores) -> EekServer:
    name, extra, env, launcher = server_setting(setting, args.wrapper)
    return EekServer(args.folder, None, 32, 1, extra=tuple(extra), cores=cores, env=env, name=name, launcher=launcher)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?")
    parser.add_argument("texts", type=Path, nargs="?", help="one text per line")
    parser.add_argument("--setting", nargs=2, help="candidate and baseline: NAME:OPTIONS|ENV=VALUE")
    parser.add_argument("--combine", type=Path, nargs="+", help="recorded JSON files: their pairs summed up together")
    parser.add_argument("--wrapper", type=Path, help="a Python script that runs eek's command line given after --")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--block", type=float, default=15.0, help="seconds of load a block")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of load on each server before the pairs")
    parser.add_argument("--label", default="", help="what is served")
    parser.add_argument("--output", type=Path, help="a JSON file the blocks and the summary are written to")
    args = parser.parse_args(argv)
    if args.combine:
        changes = [c for path in args.combine for c in recorded_changes(json.loads(path.read_text()))]
        print(json.dumps(summary(changes)))
        return
    if args.folder is None or args.texts is None or args.setting is None:
        parser.error("give FOLDER, TEXTS and --setting CANDIDATE BASELINE (or --combine JSON files)")
    texts = [line for line in args.texts.read_text().splitlines() if line.strip()]
    indices = list(range(len(texts)))
    server_cores, client_cores = default_cores()
    names = [setting.partition(":")[0] for setting in args.setting]
    servers = []
    try:
        for setting in args.setting:
            servers.append(_server(args, setting, server_cores))
        with pinned(client_cores):

            def block(which: int, seconds: float) -> dict:
                run = asyncio.run(drive(servers[which].url, texts, indices, args.concurrency, seconds, cycle=True))
                return {"server": names[which], "texts_per_s": len(run.index) / run.wall, "errors": run.errors}

            for which in (0, 1):
                block(which, args.warmup)
            blocks, changes = [], []
            for pair in range(args.pairs):
                order = (0, 1) if pair % 2 == 0 else (1, 0)
                got = {}
                for which in order:
                    got[which] = block(which, args.block)
                    blocks.append({"pair": pair + 1, **got[which]})
                changes.append(got[0]["texts_per_s"] / got[1]["texts_per_s"] - 1)
                print(
                    f"pair {pair + 1}: {names[0]} {got[0]['texts_per_s']:.1f}, {names[1]} {got[1]['texts_per_s']:.1f} "
                    f"texts/s ({100 * changes[-1]:+.1f}%)",
                    flush=True,
                )
            resident = {name: round(server.resident_kib() / 1024, 1) for name, server in zip(names, servers)}
    finally:
        for server in servers:
            server.stop()
    result = summary(changes)
    rates = {
        name: round(statistics.median(b["texts_per_s"] for b in blocks if b["server"] == name), 1) for name in names
    }
    print(
        f"{names[0]} against {names[1]}: median change {result['median_change_pct']:+.2f}% "
        f"(95%: {result['median_95_pct'][0]:+.2f} to {result['median_95_pct'][1]:+.2f}), mean "
        f"{result['mean_change_pct']:+.2f}% ± {result['mean_se_pct']:.2f}; {result['faster_pairs']} pairs faster, "
        f"{result['slower_pairs']} slower; median texts/s {rates}; resident MiB at the end {resident}"
    )
    if args.output:
        meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "instruction_sets": instruction_sets()}
        meta |= {"folder": str(args.folder), "label": args.label, "concurrency": args.concurrency}
        meta |= {"block_seconds": args.block, "warmup": args.warmup, "settings": args.setting, "command": sys.argv[1:]}
        record = {**meta, "summary": result, "median_texts_per_s": rates, "resident_mib": resident, "blocks": blocks}
        args.output.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
