"""The serving benchmark on a real model, beside its peers, and the soak (issue 53).

``python -m benchmarks.suite.serve_peers_cli --rotten-tomatoes`` (or ``--model MODEL --plain
PLAIN``) runs, one at a time, on 127.0.0.1, each pinned to the server cores with one thread
(``taskset``-like affinity, ``OMP_NUM_THREADS=1``), batches of at most ``--max-batch-size`` (32),
the client (this process, asyncio + aiohttp, one text per ``POST /classify``;
:mod:`benchmarks.suite.serve_drive`) pinned to the others:

- ``eek serve``: MODEL (an ``eek fit`` folder) with its saved, certified policy, ``--threads 1``;
- ``eek serve int8``: ``--dtype int8`` on ``--int8-model`` (with ``--rotten-tomatoes``: a copy of
  MODEL whose threshold ``eek calibrate --dtype int8`` certified on the int8 base, on the same
  calibration rows), or on MODEL with its own threshold where none is given;
- ``eek serve int8, cohort engine``: the same with ``--engine cohorts`` (opt-in: only where named);
- Infinity's four configurations of PLAIN, the plain classifier with the same weights
  (:mod:`benchmarks.suite.infinity_peer`), when Infinity is installed in its own
  environment (``--infinity-python``); skipped with the reason when it is not;
- OpenVINO static int8 of PLAIN, which Infinity does not serve: the corpus job's batches timed in this
  process (:mod:`benchmarks.suite.openvino_peer`), quantized on ``calibration_texts``; skipped with the
  reason where openvino or nncf is missing, no calibration texts are given or there is no corpus job.

Each server gets the same texts at each concurrency (a bounded number of requests per level, at
most ``--max-seconds`` each): texts/s, p50/p99 latency, and the agreement of its labels with
the full model's (PLAIN unpatched, float32, run once in this process on every text). Then a
corpus job: every text once, in requests of ``--texts-per-request`` texts (32; 0: none),
``--corpus-concurrency`` requests at a time (1), at most ``--max-seconds``: texts/s over the
texts answered, p50/p99 of the requests' latencies. Then the soak: ``eek serve`` at concurrency 32
for ``--soak-seconds``, its resident memory (``VmRSS``) read after a warm-up, a few times during
and at the end; the target is flat within +-5%.

Writes ``serve_peers_<name>.json`` and ``.csv`` under ``--output-dir``, and with ``--readme`` the
section between :data:`START` and :data:`END` of that Markdown file (``--from-json`` re-renders
a recorded result without running anything).
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks.suite import infinity_peer, openvino_peer
from benchmarks.suite.serve_drive import drive, pinned, summarize
from benchmarks.suite.serve_peers_report import END, START, render, write_readme
from earlyexit_kernels.bench.server_process import EekServer, resident_kib

COLUMNS = ["server", "concurrency", "texts_per_request", "requests", "texts", "texts_per_s", "p50_ms", "p99_ms"]
COLUMNS += ["agreement", "agree"]
COLUMNS += ["mean_exit_layer", "errors", "rss_mib", "peak_rss_mib"]
#: eek's servers by name: ``eek serve``'s arguments over the folder's (the cohort engine's: where the int8 layers are the
#: static ones, it runs each cohort in one call of their exit graph, where the default engine calls a layer at a time)
EEK_SERVERS = {
    "eek serve": (),
    "eek serve int8": ("--dtype", "int8"),
    "eek serve int8, cohort engine": ("--dtype", "int8", "--engine", "cohorts"),
}
SERVERS = (*EEK_SERVERS, *(peer.name for peer in infinity_peer.PEERS), openvino_peer.NAME)
#: the servers that run only where ``--servers`` names them
OPT_IN_SERVERS = ("eek serve int8, cohort engine",)
#: what runs where no servers are named
DEFAULT_SERVERS = tuple(name for name in SERVERS if name not in OPT_IN_SERVERS)
TOLERANCE = 0.05  # the soak's target: resident memory within +-5% of its value after the warm-up
__all__ = [
    "DEFAULT_SERVERS",
    "PeersConfig",
    "run",
    "soak",
    "full_model_labels",
    "render",
    "write_readme",
    "START",
    "END",
]


@dataclass
class PeersConfig:
    model: Path  # the eek fit folder
    plain: Path  # the plain classifier with the same weights
    int8_model: Path | None = None  # MODEL certified again on the int8 base (None: MODEL's own threshold)
    texts: list[str] = field(repr=False, default_factory=list)
    # OpenVINO int8's calibration texts, never the texts timed: read only where that peer runs (None: none given)
    calibration_texts: Callable[[], list[str]] | None = field(repr=False, default=None)
    source: str = ""  # what the texts are, for the notes
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    requests: int = 1024  # per level (a quarter of it at concurrency 1); 256 moved texts/s by +-20% between runs
    max_seconds: float = 30.0  # per level
    max_batch_size: int = 32
    threads: int = 1
    server_cores: tuple[int, ...] | None = None
    client_cores: tuple[int, ...] | None = None
    servers: tuple[str, ...] = DEFAULT_SERVERS
    infinity_python: Path | None = None
    texts_per_request: int = 32  # the corpus job: every text once, in requests of this many (0 or 1: none)
    corpus_concurrency: int = 1  # the corpus job's requests at a time
    soak_seconds: float = 300.0  # 0: no soak
    soak_concurrency: int = 32
    soak_samples: int = 10
    soak_memory_trim: str | None = None  # the soak server's --memory-trim (None: eek serve's default)
    work_dir: Path | None = None  # ONNX exports and the peers' caches (default: a temporary folder)
    section: str = "serve-peers"  # the Markdown section's markers (serve_peers_report.markers)


def full_model_labels(plain: Path, texts: list[str], batch_size: int = 32) -> list[str]:
    """The label of each text by the plain classifier, unpatched, float32, in this process."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plain)
    model = AutoModelForSequenceClassification.from_pretrained(plain, dtype=torch.float32).eval()
    limit = model.config.max_position_embeddings
    names = model.config.id2label
    labels: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            encoded = tokenizer(batch, padding=True, truncation=True, max_length=limit, return_tensors="pt")
            labels += [names[int(i)] for i in model(**encoded).logits.argmax(-1)]
    return labels


def _mib(kib: int | None) -> float | str:
    return round(kib / 1024, 1) if kib is not None else ""


def _peak_kib(pid: int) -> int | None:
    return resident_kib(pid, "VmHWM")


def _start(name: str, config: PeersConfig, scratch: Path, onnx: dict | None):
    env = {"OMP_NUM_THREADS": str(config.threads), "MKL_NUM_THREADS": str(config.threads)}
    if name in EEK_SERVERS:
        int8 = name.startswith("eek serve int8")
        folder = config.int8_model if int8 and config.int8_model is not None else config.model
        return EekServer(
            folder,
            None,
            config.max_batch_size,
            config.threads,
            extra=EEK_SERVERS[name],
            cores=config.server_cores,
            env=env,
            name=name,
        ), None
    peer = next(p for p in infinity_peer.PEERS if p.name == name)
    folder = config.plain if peer.onnx is None else onnx[peer.onnx]
    server = infinity_peer.InfinityServer(
        config.infinity_python,
        peer,
        folder,
        scratch / ("home-" + name.replace(" ", "-")),
        threads=config.threads,
        max_batch_size=config.max_batch_size,
        cores=config.server_cores,
    )
    return server, infinity_peer.MODEL_NAME


def _notes(name: str, server) -> str:
    if name.startswith("infinity onnx") and "Optimization failed" in server.log_tail(10**7):
        return "Infinity's ONNX graph optimization failed; it served the model as exported"
    return ""


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no message")


def measure(config: PeersConfig, full: list[str], scratch: Path, onnx: dict | None, progress=print):
    """One row per (server, concurrency), the notes of each server, and the peers that did not start (why)."""
    rows, notes, failed = [], {}, {}
    n = len(config.texts)
    for name in config.servers:
        try:
            server, model = _start(name, config, scratch, onnx)
        except RuntimeError as err:
            if name in EEK_SERVERS:
                raise
            failed[name] = "it did not start: " + _last_line(str(err))
            progress(f"{name}: {err}")
            continue
        try:
            with pinned(config.client_cores):
                asyncio.run(drive(server.url, config.texts, list(range(min(16, n))), 4, 60, model=model))
                for level, concurrency in enumerate(config.concurrency):
                    count = max(1, config.requests // 4) if concurrency == 1 else config.requests
                    start = level * config.requests
                    indices = [(start + i) % n for i in range(min(count, n))]
                    run = asyncio.run(
                        drive(server.url, config.texts, indices, concurrency, config.max_seconds, model=model)
                    )
                    rows.append(_measured(summarize(name, concurrency, run, full), server))
                    progress(f"{name} c={concurrency}: {rows[-1]}")
                if config.texts_per_request > 1:  # the corpus job: every text once, in requests of many
                    per, concurrency = config.texts_per_request, config.corpus_concurrency
                    run = asyncio.run(
                        drive(
                            server.url,
                            config.texts,
                            list(range(n)),
                            concurrency,
                            config.max_seconds,
                            model=model,
                            per_request=per,
                        )
                    )
                    rows.append(_measured(summarize(name, concurrency, run, full, per), server))
                    progress(f"{name} {per} texts a request, c={concurrency}: {rows[-1]}")
            notes[name] = _notes(name, server)
        finally:
            server.stop()
    return rows, notes, failed


def _measured(row: dict, server) -> dict:
    """``row`` with the server's resident memory now and at its peak so far."""
    return dict(row, rss_mib=_mib(server.resident_kib()), peak_rss_mib=_mib(_peak_kib(server.pid)))


def soak(config: PeersConfig, full: list[str], progress=print) -> dict:
    """``eek serve`` at ``soak_concurrency`` for ``soak_seconds``; its resident memory before, during, after."""
    env = {"OMP_NUM_THREADS": str(config.threads), "MKL_NUM_THREADS": str(config.threads)}
    extra = () if config.soak_memory_trim is None else ("--memory-trim", config.soak_memory_trim)
    server = EekServer(
        config.model, None, config.max_batch_size, config.threads, extra=extra, cores=config.server_cores, env=env
    )
    indices = list(range(len(config.texts)))
    warm_up = min(30.0, config.soak_seconds / 5)
    samples: list[tuple[float, int | None]] = []
    try:
        started_kib = server.resident_kib()
        with pinned(config.client_cores):
            asyncio.run(drive(server.url, config.texts, indices, config.soak_concurrency, warm_up, cycle=True))
            before = server.resident_kib()
            began = time.perf_counter()
            samples.append((0.0, before))
            load = asyncio.run(
                drive(
                    server.url,
                    config.texts,
                    indices,
                    config.soak_concurrency,
                    config.soak_seconds,
                    cycle=True,
                    sample=lambda: samples.append((time.perf_counter() - began, server.resident_kib())),
                    every=config.soak_seconds / max(1, config.soak_samples),
                )
            )
        after = server.resident_kib()
        samples.append((time.perf_counter() - began, after))
        peak = _peak_kib(server.pid)
    finally:
        server.stop()
    # what the server said it did with the allocator (memory_trim's start-up line)
    memory = next((line for line in server.log_tail(10**6).splitlines() if line.startswith("memory: ")), "")
    row = summarize("eek serve", config.soak_concurrency, load, full)
    values = [kib for _, kib in samples if kib is not None]
    deviation = max(abs(kib - before) / before for kib in values) if before and values else None
    result = dict(
        row,
        seconds=round(load.wall, 1),
        warm_up_seconds=round(warm_up, 1),
        rss_start_mib=_mib(started_kib),
        rss_before_mib=_mib(before),
        rss_after_mib=_mib(after),
        rss_min_mib=_mib(min(values)) if values else "",
        rss_max_mib=_mib(max(values)) if values else "",
        peak_rss_mib=_mib(peak),
        rss_change_pct=round((after - before) / before * 100, 2) if before and after else "",
        rss_largest_deviation_pct=round(deviation * 100, 2) if deviation is not None else "",
        flat=deviation is not None and deviation <= TOLERANCE,
        memory=memory.removeprefix("memory: "),
        samples=[[round(t, 1), _mib(kib)] for t, kib in samples],
    )
    progress(f"soak: {result}")
    return result


def _package_versions() -> dict:
    import torch
    import transformers

    from earlyexit_kernels._version import __version__

    return {
        "earlyexit_kernels": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def int8_max_changed(folder: Path | None) -> float | None:
    """The answers-changed budget (points) ``folder``'s certificate holds beside accuracy lost, or None."""
    if folder is None:
        return None
    from earlyexit_kernels.integrations.recertify_folder import saved_changed

    return saved_changed(str(folder))


def run(config: PeersConfig, output_dir: Path, name: str = "cpu", command: str = "", progress=print) -> dict:
    """Measure every server of ``config`` that can run, then the soak; writes the JSON and CSV, returns the result."""
    from earlyexit_kernels.bench.results import cpu_name, instruction_sets

    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # absolute (not resolved: a virtual environment's python is a link that must stay one): the
    # ONNX peers start inside their model folder
    python = os.path.abspath(config.infinity_python or infinity_peer.default_python())
    config = replace(
        config,
        model=Path(os.path.abspath(config.model)),
        plain=Path(os.path.abspath(config.plain)),
        int8_model=Path(os.path.abspath(config.int8_model)) if config.int8_model is not None else None,
        infinity_python=Path(python),
    )
    skipped: dict[str, str] = {}
    servers = list(config.servers)
    openvino = openvino_peer.NAME in servers
    servers = [s for s in servers if s != openvino_peer.NAME]  # no server: its batches run in this process
    if openvino:
        why = openvino_peer.missing()
        if why is None and config.calibration_texts is None:
            why = "no calibration texts given (they are what NNCF quantizes on)"
        if why is None and config.texts_per_request < 2:
            why = "no corpus job (--texts-per-request 0): its batches are the corpus job's"
        if why is not None:
            skipped[openvino_peer.NAME] = why
            openvino = False
    wanted_peers = [s for s in servers if s not in EEK_SERVERS]
    infinity, why = (None, "")
    if wanted_peers:
        infinity, why = infinity_peer.find_infinity(config.infinity_python)
        if infinity is None:
            skipped.update(dict.fromkeys(wanted_peers, why))
            servers = [s for s in servers if s in EEK_SERVERS]
    progress(f"full model's labels of {len(config.texts)} texts")
    full = full_model_labels(config.plain, config.texts)
    with tempfile.TemporaryDirectory(prefix="eek-serve-peers-") as scratch_name:
        scratch = Path(config.work_dir) if config.work_dir is not None else Path(scratch_name)
        onnx = None
        if any(s.startswith("infinity onnx") for s in servers):
            progress("ONNX export and int8 quantization of the plain classifier")
            try:
                onnx = infinity_peer.export_onnx(config.infinity_python, config.plain, scratch / "onnx")
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                failed = [s for s in servers if s.startswith("infinity onnx")]
                skipped.update(dict.fromkeys(failed, "the ONNX export failed: " + _last_line(str(err))))
                servers = [s for s in servers if s not in failed]
        rows, notes, failed = measure(replace(config, servers=tuple(servers)), full, scratch, onnx, progress)
        skipped.update(failed)
        if openvino:
            calibration = config.calibration_texts()
            progress(f"{openvino_peer.NAME}: NNCF on {len(calibration)} calibration texts, then the batches")
            row, notes[openvino_peer.NAME] = openvino_peer.measure(
                config.plain,
                config.texts,
                calibration,
                full,
                batch=config.texts_per_request,
                threads=config.threads,
                cores=config.server_cores,
            )
            rows.append(row)
            progress(f"{openvino_peer.NAME}: {row}")
    result = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpu": cpu_name(),
        "instruction_sets": instruction_sets(),
        "cpu_count": os.cpu_count(),
        "command": command,
        "model": str(config.model),
        "plain": str(config.plain),
        "section": config.section,
        "int8_model": str(config.int8_model) if config.int8_model is not None else None,
        "int8_max_changed": int8_max_changed(config.int8_model),
        "source": config.source,
        "texts": len(config.texts),
        "server_cores": list(config.server_cores) if config.server_cores else None,
        "client_cores": list(config.client_cores) if config.client_cores else None,
        "threads": config.threads,
        "max_batch_size": config.max_batch_size,
        "requests": config.requests,
        "max_seconds": config.max_seconds,
        "concurrency": list(config.concurrency),
        "texts_per_request": config.texts_per_request,
        "corpus_concurrency": config.corpus_concurrency,
        "versions": {"eek": _package_versions(), "infinity": infinity},
        "quantize_flag": infinity_peer.quantize_flag() if onnx else None,
        "rows": rows,
        "notes": {k: v for k, v in notes.items() if v},
        "skipped": skipped,
        "soak": soak(config, full, progress) if config.soak_seconds > 0 else None,
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    (output_dir / f"serve_peers_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(output_dir / f"serve_peers_{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return result
