"""Load benchmark of the HTTP server, on loopback: ``eek bench serve`` (``python -m earlyexit_kernels.bench.serve_load``).

Two servers of the same model (a random BERT whose exit heads are set so that exits
spread over the layers, as in :mod:`earlyexit_kernels.bench.stream`), each a real
``python -m earlyexit_kernels serve`` process on 127.0.0.1:

- ``early_exit``: ``Entropy`` with the threshold that saves about half the layers;
- ``never_exit``: ``Entropy(0.0)``, which never exits: the same server and engine, every
  sequence runs every layer (what a server without early exit does).

The client (this process, asyncio + aiohttp, :mod:`.load_client`) sends one text per request from the stream
workload (lengths: log-normal, median 28 tokens, tail to 256) at concurrency 1, 8, 32 and
128, a bounded number of requests per level (and at most ``--max-seconds`` each), and
reports requests/s and p50/p99 latency. Then, on each server, easy requests (the quarter of
texts the early-exit policy lets leave earliest) and hard ones (the quarter that leave
latest) arrive together, interleaved, at concurrency 32: their median latencies show whether an
easy request waits for the hard one that arrived with it.

Client and server share this machine's cores; figures are wall-clock on loopback.
Writes ``serve_load_<name>.csv`` and ``.md`` under ``--output-dir`` (default: a new
folder under the system's temporary directory).

A real model beside Infinity's configurations of the same weights, then a soak, is the repository's
comparison: ``python -m benchmarks.suite.serve_peers_cli --rotten-tomatoes`` from a source checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from earlyexit_kernels.bench.server_process import EekServer
from earlyexit_kernels.bench.stream import (
    StreamConfig,
    calibrate,
    exit_layers_at,
    make_corpus,
    make_models,
    sorted_batches,
)

COLUMNS = ["server", "workload", "concurrency", "requests", "req_per_s", "p50_ms", "p99_ms", "mean_exit_layer"]


@dataclass
class LoadConfig:
    sequences: int = 1024
    hidden: int = 256
    layers: int = 12
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    requests: int = 1024  # per level (a quarter of it at concurrency 1); 256 moved texts/s by +-20% between runs
    max_seconds: float = 30.0  # per level
    max_batch_size: int = 64
    saved: float = 0.5
    server_threads: int = max(1, (os.cpu_count() or 2) - 1)
    seed: int = 0


def prepare(config: LoadConfig, folder: Path):
    """Save the patched model with its tokenizer; returns (folder, texts, threshold, offline exit layers)."""
    stream = StreamConfig(sequences=config.sequences, hidden=config.hidden, layers=config.layers, seed=config.seed)
    tokenizer, texts, ids = make_corpus(stream, folder)
    _, patched, entropies = make_models(stream, tokenizer.vocab_size, sorted_batches(ids, config.max_batch_size))
    threshold = calibrate(entropies, config.saved)
    model_dir = folder / "model"
    patched.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, texts, threshold, exit_layers_at(entropies, threshold)


async def _load(url: str, texts: list[str], concurrency: int, max_seconds: float):
    """Send each text once, ``concurrency`` at a time; returns (latencies in s, exit layers, wall s)."""
    from earlyexit_kernels.bench import load_client

    latencies: list[float | None] = [None] * len(texts)
    exits: list[int | None] = [None] * len(texts)
    next_index = 0
    stop_at = time.perf_counter() + max_seconds
    async with load_client.session(url, concurrency) as client:

        async def worker():
            nonlocal next_index
            while next_index < len(texts) and time.perf_counter() < stop_at:
                index = next_index
                next_index += 1
                started = time.perf_counter()
                response = await load_client.post_json(client, "/predict", {"inputs": texts[index]})
                if response.status != 200:
                    raise RuntimeError(f"POST /predict answered {response.status}: {response.body[:200]!r}")
                latencies[index] = time.perf_counter() - started
                exits[index] = response.json()[0]["exit_layer"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    done = [i for i, latency in enumerate(latencies) if latency is not None]
    return [latencies[i] for i in done], [exits[i] for i in done], wall, done


def _row(server: str, workload: str, concurrency: int, latencies, exits, wall) -> dict:
    ordered = torch.tensor(sorted(latencies), dtype=torch.float64)
    return dict(
        server=server,
        workload=workload,
        concurrency=concurrency,
        requests=len(latencies),
        req_per_s=round(len(latencies) / wall, 2),
        p50_ms=round(float(ordered.quantile(0.5)) * 1000, 1),
        p99_ms=round(float(ordered.quantile(0.99)) * 1000, 1),
        mean_exit_layer=round(sum(exits) / len(exits), 2),
    )


def run(config: LoadConfig, output_dir: Path, name: str = "cpu", progress=print) -> list[dict]:
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path = output_dir / f"serve_load_{name}.csv"
    with tempfile.TemporaryDirectory() as scratch:
        model_dir, texts, threshold, offline_exits = prepare(config, Path(scratch))
        # Easy: the quarter of texts that leave earliest under the policy; hard: the latest quarter.
        order = sorted(range(len(texts)), key=lambda i: (int(offline_exits[i]), i))
        quarter = len(texts) // 4
        easy, hard = [texts[i] for i in order[:quarter]], [texts[i] for i in order[-quarter:]]
        pairs = min(len(easy), len(hard), config.requests // 2)
        mixed = [text for pair in zip(easy[:pairs], hard[:pairs], strict=True) for text in pair]
        progress(
            f"threshold {threshold:.6g}: offline mean exit layer {offline_exits.float().mean():.2f} of {config.layers}; "
            f"easy texts exit by layer {int(offline_exits[order[quarter - 1]])}, hard ones from layer "
            f"{int(offline_exits[order[-quarter]])}"
        )
        rows = []
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            for server_name, policy in (("early_exit", f"Entropy({threshold!r})"), ("never_exit", "Entropy(0.0)")):
                server = EekServer(model_dir, policy, config.max_batch_size, config.server_threads)
                try:
                    asyncio.run(_load(server.url, texts[:16], 4, 30))  # warm-up
                    for concurrency in config.concurrency:
                        count = config.requests // 4 if concurrency == 1 else config.requests
                        latencies, exits, wall, _ = asyncio.run(
                            _load(server.url, texts[:count], concurrency, config.max_seconds)
                        )
                        row = _row(server_name, "stream", concurrency, latencies, exits, wall)
                        rows.append(row)
                        writer.writerow(row)
                        handle.flush()
                        progress(f"{server_name} c={concurrency}: {row}")
                    latencies, exits, wall, done = asyncio.run(_load(server.url, mixed, 32, config.max_seconds))
                    for kind, parity in (("easy", 0), ("hard", 1)):
                        picked = [k for k, i in enumerate(done) if i % 2 == parity]
                        row = _row(
                            server_name,
                            f"{kind} (with {'hard' if parity == 0 else 'easy'})",
                            32,
                            [latencies[k] for k in picked],
                            [exits[k] for k in picked],
                            wall,
                        )
                        row["req_per_s"] = ""  # shares the wall time with the other half
                        rows.append(row)
                        writer.writerow(row)
                        progress(f"{server_name} mixed: {row}")
                finally:
                    server.stop()
    (output_dir / f"serve_load_{name}.md").write_text(markdown(rows, config))
    return rows


def markdown(rows: list[dict], config: LoadConfig) -> str:
    by = {(r["server"], r["workload"], int(r["concurrency"])): r for r in rows}
    lines = [
        f"Random BERT, H = {config.hidden}, L = {config.layers}; one text per request from the stream workload; "
        f"`max_batch_size` {config.max_batch_size}; client and server on the same {os.cpu_count()}-core machine, "
        f"loopback; the server runs {config.server_threads} torch thread(s) (`--threads`), the client has the rest.",
        "",
        "| concurrency | early exit req/s | p50 ms | p99 ms | mean exit layer | never exit req/s | p50 ms | p99 ms | "
        "req/s ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency in config.concurrency:
        e, n = by.get(("early_exit", "stream", concurrency)), by.get(("never_exit", "stream", concurrency))
        if e is None or n is None:
            continue
        ratio = float(e["req_per_s"]) / float(n["req_per_s"])
        lines.append(
            f"| {concurrency} | {e['req_per_s']} | {e['p50_ms']} | {e['p99_ms']} | {e['mean_exit_layer']} | "
            f"{n['req_per_s']} | {n['p50_ms']} | {n['p99_ms']} | {ratio:.2f}x |"
        )
    lines += ["", "Easy and hard requests arriving together (interleaved, concurrency 32):", ""]
    lines += ["| server | requests | p50 ms | p99 ms | mean exit layer |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if r["workload"] != "stream":
            lines.append(
                f"| {r['server']}, {r['workload']} | {r['requests']} | {r['p50_ms']} | {r['p99_ms']} | "
                f"{r['mean_exit_layer']} |"
            )
    return "\n".join(lines) + "\n"


def add_level_arguments(parser: argparse.ArgumentParser) -> None:
    """The load levels' arguments: this benchmark's, and the repository's real model beside Infinity
    (``benchmarks/suite/serve_peers_cli.py``) takes the same."""
    parser.add_argument("--output-dir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--name", default="cpu", help="file name suffix (default: cpu)")
    parser.add_argument("--requests", type=int, default=LoadConfig.requests, help="requests per level")
    parser.add_argument("--max-seconds", type=float, default=LoadConfig.max_seconds, help="cap per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(LoadConfig.concurrency))


#: the real-model mode's flags, which moved with the Infinity peer to the repository's benchmarks
MOVED_FLAGS = ("--rotten-tomatoes", "--model", "--plain", "--texts", "--from-json", "--backbone")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="eek bench serve", description=__doc__.split("\n\n")[0])
    add_level_arguments(parser)
    parser.add_argument("--layers", type=int, default=LoadConfig.layers)
    parser.add_argument("--hidden", type=int, default=LoadConfig.hidden)
    given = sys.argv[1:] if argv is None else list(argv)
    if moved := [flag for flag in MOVED_FLAGS if any(a == flag or a.startswith(flag + "=") for a in given)]:
        parser.error(
            f"{moved[0]}: a real model beside Infinity is a comparison of the repository's, not the package's: "
            "from a source checkout, python -m benchmarks.suite.serve_peers_cli " + " ".join(given)
        )
    args = parser.parse_args(given)
    config = LoadConfig(
        requests=args.requests,
        max_seconds=args.max_seconds,
        concurrency=tuple(args.concurrency),
        layers=args.layers,
        hidden=args.hidden,
    )
    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="eek-serve-load-"))
    run(config, output_dir, args.name)
    print((output_dir / f"serve_load_{args.name}.md").read_text())
    print(f"written to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
