"""Rounds of the serving benchmark against one another (issues 78 and 95's targets): each eek server's texts/s over
the strongest peer's at each level (Infinity's best configuration, or OpenVINO's static int8 per batch where the
round has it and it is faster: issue 95's "whichever is faster on that machine"), and its p99 over that peer's,
the median over the rounds with their range.

    python -m benchmarks.suite.serve_peers_rounds ROUND.json ROUND.json ROUND.json

Each ROUND.json is one ``serve_peers_cli`` result (``serve_peers_<name>.json``), its servers run in the order
``--servers`` gave; run the rounds with that order alternating. The strongest peer is taken per
round and level (the most texts/s), as a user would pick it.

A round may be several results joined by ``+`` (``A.json+B.json``: the same round run at two ``--max-batch-size``
caps, one after the other): their rows are pooled, each server named with its cap where the caps differ
(``eek serve int8 (batch 16)``), and the strongest peer is the best of every configuration at every cap.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# the servers a user would run instead: Infinity's configurations and OpenVINO's static int8
PEERS = ("infinity", "openvino")


def level_name(row: dict) -> str:
    return f"{row['texts_per_request']} texts a request" if row["texts_per_request"] > 1 else f"c{row['concurrency']}"


def ratios(result: dict) -> dict[tuple[str, str], tuple[float, float, str]]:
    """``(eek server, level) -> (texts/s ratio, p99 ratio, the strongest peer)`` of one round."""
    by_level: dict[str, list[dict]] = {}
    for row in result["rows"]:
        by_level.setdefault(level_name(row), []).append(row)
    out = {}
    for level, rows in by_level.items():
        peers = [r for r in rows if r["server"].startswith(PEERS)]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["texts_per_s"])
        for row in rows:
            if row["server"].startswith("eek"):
                out[(row["server"], level)] = (
                    row["texts_per_s"] / best["texts_per_s"],
                    row["p99_ms"] / best["p99_ms"],
                    best["server"],
                )
    return out


def pooled(parts: list[dict]) -> dict:
    """One round from the results of ``parts`` (run at different caps): their rows together, each server named
    with its ``--max-batch-size`` where the caps differ; the first part's other fields."""
    caps = {part["max_batch_size"] for part in parts}
    rows = []
    for part in parts:
        for row in part["rows"]:
            named = row["server"] if len(caps) == 1 else f"{row['server']} (batch {part['max_batch_size']})"
            rows.append({**row, "server": named})
    return {**parts[0], "rows": rows}


def read_round(argument: str) -> dict:
    """A round: one result file, or several joined by ``+`` (:func:`pooled`)."""
    return pooled([json.loads(Path(path).read_text()) for path in argument.split("+")])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "rounds", nargs="+", help="serve_peers_cli results, one a round (A.json+B.json: one round at two caps)"
    )
    args = parser.parse_args(argv)
    results = [read_round(argument) for argument in args.rounds]
    per_round = [ratios(result) for result in results]
    keys = sorted({key for round_ in per_round for key in round_}, key=lambda k: (k[0], k[1]))
    print(f"{len(results)} rounds ({', '.join(sorted({r['cpu'] for r in results}))}); median [range] over the rounds")
    print("| server | level | texts/s over the strongest peer | p99 over its p99 | the strongest peer, by round |")
    print("|---|---|---:|---:|---|")
    for key in keys:
        got = [r[key] for r in per_round if key in r]
        speed, tail = sorted(g[0] for g in got), sorted(g[1] for g in got)
        print(
            f"| {key[0]} | {key[1]} | {statistics.median(speed):.2f}x [{speed[0]:.2f}-{speed[-1]:.2f}] | "
            f"{statistics.median(tail):.2f}x [{tail[0]:.2f}-{tail[-1]:.2f}] | {', '.join(g[2] for g in got)} |"
        )
    for result in results:
        layers = {
            row["server"]: row.get("mean_exit_layer") for row in result["rows"] if row["server"].startswith("eek")
        }
        agreement = {}
        for row in result["rows"]:
            if row.get("agree") is not None and row.get("texts"):
                a = agreement.setdefault(row["server"], [0, 0])
                a[0] += row["agree"]
                a[1] += row["texts"]
        print(
            f"round {result['command'].split('--name ')[-1].split()[0] if '--name ' in result['command'] else ''}: "
            + "; ".join(f"{s}: exit layer {v}" for s, v in layers.items())
            + "; agreement with the full model: "
            + ", ".join(f"{s} {100 * a / n:.2f}% of {n}" for s, (a, n) in agreement.items())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
