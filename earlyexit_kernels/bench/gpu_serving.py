"""Serving on a GPU, in one process: eek's engine thread against the two servers a GPU user runs instead.

    python -m earlyexit_kernels.bench.gpu_serving --device cuda --dtype bf16     # -> bench-results/serve_gpu.{csv,md}
    python -m earlyexit_kernels.bench.gpu_serving --device cpu --hidden 64 --layers 4 --sequences 256 --requests 64

The GPU machine reaches no network, so neither Infinity nor text-embeddings-inference can be
fetched there; each is reproduced in-process, on the same model's weights, behind the same
request queue as eek's engine thread:

- **eek**: :class:`~earlyexit_kernels.engine.entry.background.BackgroundEngine` on the patched model, the
  engine ``eek serve`` runs (on CUDA the cohort engine: token-budget cohorts through the graphed
  step, :mod:`earlyexit_kernels.engine.engines.cohort_engine`), arrival order; on CUDA also
  **eek-continuous**, the same on the continuous engine, so that the two designs are measured
  side by side; and **eek-varlen**, the same on packed-token cohorts (no padding, varlen attention:
  :mod:`earlyexit_kernels.engine.engines.varlen.engine`), TEI's batching with early exit;
- **Infinity's way**: batches of up to 32 texts, sorted by length where more wait, padded to the
  longest rounded up to 32, the unpatched model captured in a CUDA graph per (rows, length) bucket;
- **TEI's way**: texts taken in arrival order until a 16,384-token budget, packed without padding,
  the unpatched BERT's layers on the real tokens with varlen attention (:mod:`.packed_bert`).

The workload: the stream benchmark's texts (:mod:`.stream`: lengths log-normal, median 28, tail
to 256, the shape of sentence-classification sets) and its model (a random BERT whose exit heads
spread exits over the layers), the threshold calibrated so that about ``--saved`` of the layer
evaluations are saved. Levels: ``c1`` (one client, one text a request), ``c32`` (32 clients, one
text each) and ``b32`` (4 clients, 32 texts a request); closed loop, each client sends its next
request when the last is answered. Per server and level: texts/s, the requests' p50 and p99
latency, agreement with the unpatched model (the same class) and with per-batch early exit (the
patched model on the stream's sorted batches: eek's engine must not change an answer; the peers
run the unpatched model). This model's exit heads read random directions of each layer's pooled
state, so its early exits agree with the unpatched model near chance by construction: the
column checks the peers (1.0), and the accuracy a certificate promises is measured on trained
models (the CPU's serving benchmark, ``benchmarks/suite/serve_peers.py``). Each server runs the whole
stream once untimed first (graphs captured, allocator warm), then each level's requests of the first round
(a single text or 32 clients' queue makes batch shapes the stream in batches of 32 does not: captured
there, inside a timed round, they would cost the peer that captures dearest); the servers take turns within a
level, in an order that rotates from one round to the next. No HTTP: the engine and its queue,
the same for all three.
"""

from __future__ import annotations

import argparse
import csv
import queue
import statistics
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from earlyexit_kernels.bench.packed_bert import fused_varlen_available, pack, packed_logits
from earlyexit_kernels.bench.stream import (
    StreamConfig,
    _quantile,
    calibrate,
    make_corpus,
    make_models,
    sorted_batches,
)
from earlyexit_kernels.bench.stream_device import device_label, on_device, torch_dtype, unavailable

__all__ = ["GpuServingConfig", "run", "markdown", "LEVELS"]

# name -> (clients, texts per request)
LEVELS = {"c1": (1, 1), "c32": (32, 1), "b32": (4, 32)}
PEER_BATCH = 32  # Infinity's default batch size
LENGTH_BUCKET = 32  # padded lengths rounded up to this, as the graphed step's on CUDA
COLUMNS = [
    "device",
    "model",
    "server",
    "level",
    "round",
    "requests",
    "texts",
    "texts_per_s",
    "p50_ms",
    "p99_ms",
    "agreement",
    "same_as_per_batch",
]


@dataclass(frozen=True)
class GpuServingConfig:
    device: str = "cuda"
    dtype: str = "bf16"
    hidden: int = 768
    layers: int = 12
    sequences: int = 2048
    saved: float = 0.5  # share of layer evaluations the calibrated threshold saves
    requests: int = 256  # per server, level and round
    rounds: int = 1
    levels: tuple[str, ...] = tuple(LEVELS)
    token_budget: int = 16384  # TEI's --max-batch-tokens default, and the cohort engine's
    max_batch_size: int = 64  # eek serve's default
    seed: int = 0


# ---------------------------------------------------------------------------- the servers


class _Batching:
    """A peer server: one thread taking what waits in its queue and answering it batch by batch;
    ``submit(sequences) -> Future`` of the logits [N, C] (CPU, float32) of one request's sequences."""

    def __init__(self, run_batch, take):
        self._run_batch, self._take = run_batch, take
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def submit(self, sequences: list[list[int]]) -> Future:
        future: Future = Future()
        self._inbox.put((sequences, future))
        return future

    def close(self) -> None:
        self._stop = True
        self._inbox.put(None)
        self._thread.join(30)

    def _loop(self) -> None:
        waiting: list[tuple] = []  # (sequence, request's answers, row, request's future, rows left)
        while not self._stop:
            block = not waiting
            while True:
                try:
                    item = self._inbox.get(block=block)
                except queue.Empty:
                    break
                if item is None:
                    return
                sequences, future = item
                answers = [None] * len(sequences)
                left = [len(sequences)]
                waiting += [(s, answers, row, future, left) for row, s in enumerate(sequences)]
                block = False
            chosen = self._take(waiting)
            taken = set(chosen)
            batch = [waiting[i] for i in chosen]
            waiting = [entry for i, entry in enumerate(waiting) if i not in taken]
            try:
                logits = self._run_batch([entry[0] for entry in batch]).float().cpu()
            except Exception as error:  # noqa: BLE001 - the request gets it
                for entry in batch:
                    if not entry[3].done():
                        entry[3].set_exception(error)
                continue
            for entry, row in zip(batch, logits):
                entry[1][entry[2]] = row
                entry[4][0] -= 1
                if entry[4][0] == 0:
                    entry[3].set_result(torch.stack(entry[1]))


def take_like_infinity(waiting: list) -> list[int]:
    """Up to ``PEER_BATCH`` of the waiting texts: the oldest, or where more wait, the batch of the
    shortest (Infinity sorts its queue by length when it is deep)."""
    if len(waiting) <= PEER_BATCH:
        return list(range(len(waiting)))
    order = sorted(range(len(waiting)), key=lambda i: len(waiting[i][0]))
    return order[:PEER_BATCH]


def take_like_tei(budget: int):
    """Texts in arrival order until ``budget`` tokens (at least one): TEI's ``--max-batch-tokens``."""

    def take(waiting: list) -> list[int]:
        chosen, tokens = [], 0
        for i, entry in enumerate(waiting):
            if chosen and tokens + len(entry[0]) > budget:
                break
            chosen.append(i)
            tokens += len(entry[0])
        return chosen

    return take


class ShapeGraphs:
    """The unpatched model on padded batches, each (rows, length) bucket captured once in a CUDA graph
    (rows a power of two up to ``PEER_BATCH``, lengths multiples of ``LENGTH_BUCKET``); eager on the CPU."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        self.capture = device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple] = {}

    def __call__(self, sequences: list[list[int]]) -> torch.Tensor:
        rows = 1 << (len(sequences) - 1).bit_length()
        longest = max(len(s) for s in sequences)
        length = -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET
        ids = torch.zeros(rows, length, dtype=torch.long)
        mask = torch.zeros(rows, length, dtype=torch.long)
        mask[:, 0] = 1  # pad rows attend to one position
        for row, s in enumerate(sequences):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        if not self.capture:
            with torch.no_grad():
                return self.model(input_ids=ids, attention_mask=mask).logits[: len(sequences)]
        key = (rows, length)
        if key not in self._graphs:
            self._graphs[key] = self._captured(rows, length)
        static_ids, static_mask, graph, out = self._graphs[key]
        static_ids.copy_(ids, non_blocking=True)
        static_mask.copy_(mask, non_blocking=True)
        graph.replay()
        return out[: len(sequences)]

    def _captured(self, rows: int, length: int) -> tuple:
        static_ids = torch.zeros(rows, length, dtype=torch.long, device=self.device)
        static_mask = torch.ones(rows, length, dtype=torch.long, device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(2):
                self.model(input_ids=static_ids, attention_mask=static_mask)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, stream=stream):
            out = self.model(input_ids=static_ids, attention_mask=static_mask).logits
        return static_ids, static_mask, graph, out


class _Eek:
    """eek's engine thread on the patched model, behind the same ``submit`` as the peers; ``engine``:
    ``"auto"`` (what eek serve runs: the cohort engine on CUDA), ``"continuous"`` or ``"varlen"``."""

    def __init__(self, model, config: GpuServingConfig, engine: str = "auto"):
        from earlyexit_kernels.engine.entry.background import BackgroundEngine

        self.worker = BackgroundEngine(
            model,
            max_batch_size=config.max_batch_size,
            max_tokens=config.token_budget,
            admission="fifo",
            engine=engine,
        )

    def submit(self, sequences: list[list[int]]) -> Future:
        futures = self.worker.submit_many([(s, None) for s in sequences])
        combined: Future = Future()
        left = [len(futures)]
        lock = threading.Lock()

        def done(_):
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                try:
                    combined.set_result(torch.stack([f.result().logits.float() for f in futures]))
                except Exception as error:  # noqa: BLE001 - the request gets it
                    combined.set_exception(error)

        for future in futures:
            future.add_done_callback(done)
        return combined

    def close(self) -> None:
        self.worker.close()


def make_servers(unpatched, patched, config: GpuServingConfig, device: torch.device) -> dict:
    """The three servers by name, each with ``submit`` and ``close``."""

    def tei_batch(sequences):
        ids, positions, cu, longest = pack(sequences, device)
        return packed_logits(unpatched, ids, positions, cu, longest)

    servers = {"eek": _Eek(patched, config), "eek-varlen": _Eek(patched, config, engine="varlen")}
    if device.type == "cuda":  # the engine eek serve ran on CUDA before the cohort engine, measured beside it
        servers["eek-continuous"] = _Eek(patched, config, engine="continuous")
    return servers | {
        "infinity-way": _Batching(ShapeGraphs(unpatched, device), take_like_infinity),
        "tei-way": _Batching(tei_batch, take_like_tei(config.token_budget)),
    }


# ---------------------------------------------------------------------------- the load


def drive(server, ids: list[list[int]], clients: int, per_request: int, requests: int, start: int = 0):
    """Closed-loop clients; returns ``(wall seconds, latencies, {text index: logits})``. Request ``r``
    holds the texts ``start + r * per_request ...`` (cycling over ``ids``)."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    answers: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def client():
        while True:
            with lock:
                r = next(counter, None)
            if r is None:
                return
            indices = [(start + r * per_request + k) % len(ids) for k in range(per_request)]
            began = time.perf_counter()
            try:
                logits = server.submit([ids[i] for i in indices]).result(timeout=600)
            except BaseException as error:  # noqa: BLE001 - reported after the run
                errors.append(error)
                return
            elapsed = time.perf_counter() - began
            with lock:
                latencies.append(elapsed)
                answers.update(zip(indices, logits))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]!r}") from errors[0]
    return wall, latencies, answers


def run(config: GpuServingConfig, output_dir: Path, name: str = "serve_gpu", progress=print) -> list[dict]:
    """Run the benchmark; writes ``<name>.csv`` and ``<name>.md`` under ``output_dir``."""
    from earlyexit_kernels.methods.policies import Entropy
    from earlyexit_kernels.patching.patch import patch

    problem = unavailable(config.device)
    if problem:
        raise ValueError(problem)
    unknown = [level for level in config.levels if level not in LEVELS]
    if unknown:
        raise ValueError(f"unknown level(s) {', '.join(unknown)}: the levels are {', '.join(LEVELS)}")
    device, dtype = torch.device(config.device), torch_dtype(config.dtype)
    stream = StreamConfig(
        sequences=config.sequences,
        hidden=config.hidden,
        layers=config.layers,
        heads=max(1, config.hidden // 64),
        seed=config.seed,
        device=config.device,
        dtype=config.dtype,
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, _, ids = make_corpus(stream, Path(folder))
    batches = sorted_batches(ids, 64)
    unpatched, patched, entropies = make_models(stream, len(tokenizer), batches)
    unpatched.to(dtype)
    patched.to(dtype)
    patch(patched, Entropy(calibrate(entropies, config.saved)))
    with torch.no_grad():  # the classes of the unpatched model (agreement) and of per-batch early exit
        reference = torch.zeros(len(ids), dtype=torch.long)
        per_batch = torch.zeros(len(ids), dtype=torch.long)
        for rows, input_ids, mask in on_device(batches, device):
            reference[rows] = unpatched(input_ids=input_ids, attention_mask=mask).logits.argmax(-1).cpu()
            per_batch[rows] = patched(input_ids=input_ids, attention_mask=mask).logits.argmax(-1).cpu()
    servers = make_servers(unpatched, patched, config, device)
    label = device_label(device)
    model = f"random BERT H{config.hidden} L{config.layers} in {config.dtype}, Entropy saving ~{config.saved:.0%}"
    dtype = next(unpatched.parameters()).dtype
    attention = (
        "varlen flash attention"
        if fused_varlen_available(device, dtype, unpatched.config.hidden_size // unpatched.config.num_attention_heads)
        else "varlen reference (SDPA per text)"
    )
    progress(f"serve_gpu: {len(ids)} texts on {label}; TEI's way runs {attention}")
    rows: list[dict] = []
    left_out: dict[str, str] = {}
    try:

        def warm(server):
            drive(server, ids, 8, 32, -(-len(ids) // 32))  # the stream once: graphs captured, allocator warm
            for level in config.levels:  # each level's first-round requests: the timed rounds meet no new shape
                clients, per_request = LEVELS[level]
                drive(server, ids, clients, per_request, config.requests, 0)

        warm_up(servers, warm, left_out, progress)
        names = list(servers)
        for round_index in range(config.rounds):
            for level in config.levels:
                clients, per_request = LEVELS[level]
                turn = round_index % len(names)
                for server_name in names[turn:] + names[:turn]:
                    start = (round_index * 7919) % len(ids)
                    wall, latencies, answers = drive(
                        servers[server_name], ids, clients, per_request, config.requests, start
                    )
                    texts = len(latencies) * per_request
                    classes = {i: int(logits.argmax()) for i, logits in answers.items()}
                    agree = sum(c == int(reference[i]) for i, c in classes.items())
                    same = sum(c == int(per_batch[i]) for i, c in classes.items())
                    row = {
                        "device": label,
                        "model": model,
                        "server": server_name,
                        "level": level,
                        "round": round_index + 1,
                        "requests": len(latencies),
                        "texts": texts,
                        "texts_per_s": round(texts / wall, 1),
                        "p50_ms": round(1000 * statistics.median(latencies), 2),
                        "p99_ms": round(1000 * _quantile(latencies, 0.99), 2),
                        "agreement": round(agree / len(answers), 4),
                        "same_as_per_batch": round(same / len(answers), 4),
                    }
                    rows.append(row)
                    progress(
                        f"  {level} {server_name}: {row['texts_per_s']} texts/s, p50 {row['p50_ms']} ms, "
                        f"p99 {row['p99_ms']} ms, agreement {row['agreement']:.2%}, "
                        f"same as per-batch exit {row['same_as_per_batch']:.2%}"
                    )
    finally:
        for server in servers.values():
            server.close()
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / f"{name}.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / f"{name}.md").write_text(markdown(rows, attention, left_out))
    return rows


# The engines no GPU has served on yet: where one fails its warm-up, its rows are left out, not the run's.
OPT_IN_SERVERS = ("eek-varlen",)


def warm_up(servers: dict, run, left_out: dict[str, str], progress) -> None:
    """``run(server)`` once for each of ``servers`` (untimed: graphs captured, allocator warm); a server of
    ``OPT_IN_SERVERS`` whose warm-up fails is closed and removed, with why in ``left_out``."""
    for server_name in list(servers):
        try:
            run(servers[server_name])
        except Exception as error:  # noqa: BLE001 - re-raised but for the opt-in engines
            if server_name not in OPT_IN_SERVERS:
                raise
            servers.pop(server_name).close()
            left_out[server_name] = f"{type(error).__name__}: {error}"[:300]
            progress(f"  {server_name}: left out, its warm-up failed: {left_out[server_name]}")
            continue
        progress(f"  {server_name}: warmed up")


def markdown(rows: list[dict], attention: str = "", left_out: dict | None = None) -> str:
    """The medians over rounds per server and level, and eek against the stronger peer."""
    if not rows:
        return "No rows.\n"
    first = rows[0]
    failed = "".join(f" {server} left out: its warm-up failed ({why})." for server, why in (left_out or {}).items())
    lines = [
        f"{first['model']}, {first['device']}; TEI's way on {attention}. Medians over "
        f"{max(int(r['round']) for r in rows)} round(s).{failed}",
        "",
        "| level | server | texts/s | p50 ms | p99 ms | agreement | same as per-batch exit |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary = []
    for level in dict.fromkeys(r["level"] for r in rows):
        medians = {}
        for server in dict.fromkeys(r["server"] for r in rows):
            mine = [r for r in rows if r["level"] == level and r["server"] == server]
            if not mine:
                continue
            medians[server] = {
                key: statistics.median(float(r[key]) for r in mine)
                for key in ("texts_per_s", "p50_ms", "p99_ms", "agreement", "same_as_per_batch")
            }
            m = medians[server]
            lines.append(
                f"| {level} | {server} | {m['texts_per_s']:.1f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                f"{m['agreement']:.2%} | {m['same_as_per_batch']:.2%} |"
            )
        peers = {k: v for k, v in medians.items() if not k.startswith("eek")}
        if peers:
            best = max(peers, key=lambda k: peers[k]["texts_per_s"])
            peer = peers[best]
            for name in (k for k in medians if k.startswith("eek")):  # eek serve's engine, then the opt-in ones
                eek = medians[name]
                summary.append(
                    f"- {level}: {name} {eek['texts_per_s'] / peer['texts_per_s']:.2f}x {best}'s texts/s, "
                    f"p99 {eek['p99_ms'] / peer['p99_ms']:.2f}x its p99"
                )
    return (
        "\n".join(
            [*lines, "", "Against the stronger peer (issue 96: >= 1.3x at c32 and b32, p99 at or below):", *summary]
        )
        + "\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m earlyexit_kernels.bench.gpu_serving", description=__doc__.split("\n")[0]
    )
    defaults = GpuServingConfig()
    parser.add_argument("--output-dir", type=Path, default=Path("bench-results"))
    parser.add_argument("--name", default="serve_gpu")
    parser.add_argument("--device", default=defaults.device, help="cuda (default) or cpu (the rehearsal)")
    parser.add_argument("--dtype", default=defaults.dtype, help="fp32, bf16 (default) or fp16")
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--sequences", type=int, default=defaults.sequences)
    parser.add_argument("--saved", type=float, default=defaults.saved, help="share of layer evaluations saved")
    parser.add_argument("--requests", type=int, default=defaults.requests, help="per server, level and round")
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--levels", default=",".join(defaults.levels), help=f"some of {', '.join(LEVELS)}")
    parser.add_argument("--token-budget", type=int, default=defaults.token_budget)
    args = parser.parse_args(argv)
    problem = unavailable(args.device)
    if problem:
        parser.error(problem)
    for flag in ("hidden", "layers", "sequences", "requests", "rounds", "token_budget"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.saved < 1.0:
        parser.error("--saved must be a share in [0, 1)")
    config = GpuServingConfig(
        device=args.device,
        dtype=args.dtype,
        hidden=args.hidden,
        layers=args.layers,
        sequences=args.sequences,
        saved=args.saved,
        requests=args.requests,
        rounds=args.rounds,
        levels=tuple(args.levels.split(",")),
        token_budget=args.token_budget,
    )
    run(config, args.output_dir, args.name)
    print((args.output_dir / f"{args.name}.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
