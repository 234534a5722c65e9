"""The stream benchmark (issue 10): one corpus classified five ways in one run, against the ideal.

(Past 600 lines: the workload, the five ways, their interleaved timing and the report of one
benchmark; the repository's grid studies build their streams on it, benchmarks/suite/stream_grid.py.)

    eek bench stream                                # -> bench-results/stream_<device>.{csv,md,png}
    eek bench stream --device cuda --dtype bf16     # -> stream_cuda_bf16.{csv,md,png}
    eek bench stream --from-csv stream_cpu.csv      # the table again
    python -m earlyexit_kernels.bench.stream        # the same as eek bench stream

**The workload.** Token lengths (``[CLS]`` and ``[SEP]`` included) follow a log-normal
with median 28 and sigma 0.55, rounded and clipped to 4..256 (:func:`stream_lengths`):
about 89% of the sequences hold 10-60 tokens, 9% more than 60, 0.3% more than 128, a
tail to 256: the shape of sentence-classification sets such as SST-2, MNLI or QQP. The
texts are random words of a generated vocabulary (``vocab.txt`` written to a temporary
folder, ``BertTokenizerFast``: no download), one token per word, in a seeded random
order.

**The model.** A random BERT (``BertForSequenceClassification``, SDPA attention,
``initializer_range`` 0.1 so that the ``[CLS]`` state depends on the text: at the default
0.02 it varies by 2-6% across texts, at 0.1 by about 40%). Its classifiers are set so
that exits spread over the layers, as in a trained model: the head of layer ``l`` reads
a random direction of the pooled ``[CLS]`` state, standardised over the stream, with a
margin that grows with depth (``scale * l / L``); the model's own classifier is built
the same way at ``l = L``, so the unpatched model and the last layer agree. The policy is
``Entropy(t)``, with ``t`` calibrated on the stream so that a chosen share of the layer
evaluations is saved (``1 - mean exit layer / L``), and placed mid-way across the
widest gap between the stream's entropies near it, so that the rounding of another
batch composition cannot move a sequence across it.

**The methods**, same sequences, same weights, interleaved repetitions (the order
rotates from one repetition to the next):

(a) ``transformers.pipeline("text-classification", batch_size=32)`` on the unpatched
    model, the texts in stream order (tokenising included);
(b) the unpatched model on length-sorted batches of ``max_batch_size`` (tensors ready);
(c) the per-batch early exit: the patched ``model(...)`` on the same batches as (b);
(d) ``eek.classify(model, texts, tokenizer=tok, max_batch_size=...)`` (tokenising included; on
    CUDA the cohort engine in cohorts of ``max_batch_size`` rows, elsewhere the continuous engine);
(e) the same with ``compile=True``, after a warm-up pass over the same stream, timed
    and reported apart; Dynamo's ``unique_graphs`` counter is read before and after the
    measured passes;
(f) ``eek.classify(..., engine="cohorts", max_batch_size=None, max_tokens=16384)``: the GPU's
    engine (:mod:`earlyexit_kernels.engine.engines.cohort_engine`), length-sorted cohorts sized by a
    token budget (``--cohort-tokens``) through the model's step, read back a cohort late (on
    CUDA, the engine ``eek.classify`` takes by default, with the token budget of a call
    where (d) has ``max_batch_size`` rows). Its fill is left blank: its calls are not sized by
    ``max_batch_size``;
(g) on CUDA only, ``eek.classify(..., engine="continuous")``: the continuous engine, which (d)
    was on CUDA before the cohort engine, measured beside it (on the CPU (d) is that engine);
(h) with ``--segments``, ``eek.classify(..., engine="segments", max_batch_size=None, max_tokens=...)``:
    the segment engine (:mod:`earlyexit_kernels.engine.engines.segments.engine`, E3's layer segments, equal
    thirds, each refilled to (f)'s token budget from the rows leaving the one below), beside (f) on
    the same texts, so that a GPU run says which design is faster. Its fill is left blank, as (f)'s;
(i) with ``--varlen``, ``eek.classify(..., engine="varlen", max_batch_size=None, max_tokens=...)``: the
    cohort engine on packed tokens (:mod:`earlyexit_kernels.engine.engines.varlen.engine`: cohorts filled to
    (f)'s budget of real tokens, no padding, varlen attention: flash attention's kernel in fp16/bf16
    on CUDA, a padded grid elsewhere), beside (f), so that a GPU run says whether unpadded layers pay.
    Its fill is left blank, as (f)'s.

**The figures.** Sequences/s: the p50 of the repetitions (p20 and p80 beside it). The
ideal: (b)'s time per real token-layer (its time over the stream's tokens times ``L``)
times the tokens and layers each sequence needs (its length times its exit layer). Fill:
the mean rows per layer call over ``max_batch_size`` (for (c) from its exit layers: a
batch's layer call holds the rows still in it; for (d)/(e) the engine's counts); token
fill: real tokens over the slots (rows x padded length) the layer calls computed; host
syncs per layer call (for (c) the ``host_syncs`` of its outputs, for (d)/(e) the
engine's). Peak memory: in one more (untimed) pass per method, the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) above its resident set
at the start of the pass.

**On a GPU** (``--device cuda``, issue 60; :mod:`earlyexit_kernels.bench.stream_device`): the
models are built and the heads calibrated there in float32, then cast to ``--dtype``; the
sorted batches live there, (a) runs its pipeline there, each timed pass ends with
``torch.cuda.synchronize()``; the peak memory is not measured. The report names the GPU and
the dtype and checks issue 60's target: (d) at 0.85 of the ideal or more.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from earlyexit_kernels.bench.stream_device import (
    DEVICES,
    DTYPES,
    default_name,
    device_label,
    on_device,
    synced,
    torch_dtype,
    unavailable,
)

__all__ = ["StreamConfig", "markdown", "run", "stream_lengths"]

METHODS = {
    "a": "(a) pipeline, unpatched",
    "b": "(b) unpatched, sorted batches",
    "c": "(c) per-batch early exit",
    "d": "(d) eek.classify",
    "e": "(e) eek.classify(compile=True)",
    "f": "(f) eek.classify, token-budget cohorts",
    "g": "(g) eek.classify, the continuous engine",
    "h": "(h) eek.classify, token-budget segments",
    "i": "(i) eek.classify, packed-token cohorts",
}

COLUMNS = [
    "device",
    "threads",
    "model",
    "sequences",
    "tokens",
    "max_batch_size",
    "policy",
    "target_saved",
    "saved_layer_share",
    "mean_exit_layer",
    "exit_histogram",
    "method",
    "seq_per_s",
    "seq_per_s_p20",
    "seq_per_s_p80",
    "repeats",
    "vs_a",
    "vs_c",
    "of_ideal",
    "ideal_seq_per_s",
    "layer_calls",
    "fill",
    "padded_row_fill",
    "token_fill",
    "host_syncs_per_call",
    "peak_mib",
    "compile_warmup_s",
    "graphs_warmup",
    "graphs_measured",
    "exit_mismatches_vs_c",
    "max_logit_diff_vs_c",
    "load_before",
    "load_after",
]


@dataclass
class StreamConfig:
    sequences: int = 2048
    hidden: int = 256
    layers: int = 12
    heads: int = 4
    init_range: float = 0.1
    margin_scale: float = 8.0  # the last layer's margin, in standard deviations of its direction
    max_batch_size: int = 64
    pipeline_batch: int = 32
    repeats: int = 3
    saved: tuple[float, ...] = (0.5, 0.0, 0.25, 0.75)  # shares of layer evaluations saved; the first is the main run
    compile: bool = True
    memory: bool = True
    threads: int | None = None
    seed: int = 0
    device: str = "cpu"  # or "cuda": see stream_device
    dtype: str = "fp32"  # "bf16", "fp16": the models' dtype once calibrated (in float32)
    cohort_tokens: int = 16384  # (f)'s token budget per cohort; 0 leaves (f) out
    segments: bool = False  # (h): the segment engine on (f)'s token budget (16384 where (f) is out)
    varlen: bool = False  # (i): the packed-token cohorts on (f)'s budget of real tokens (16384 where (f) is out)


# ---------------------------------------------------------------------------- workload


def stream_lengths(count: int, seed: int) -> list[int]:
    """Token lengths (special tokens included): log-normal, median 28, sigma 0.55, clipped to 4..256."""
    rng = random.Random(seed)
    return [min(max(round(math.exp(rng.gauss(math.log(28), 0.55))), 4), 256) for _ in range(count)]


def make_corpus(config: StreamConfig, folder: Path):
    """The tokenizer, the texts and their token ids (one token per word: lengths as drawn)."""
    from transformers import BertTokenizerFast

    words = [f"w{i}" for i in range(4000)]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    rng = random.Random(config.seed + 1)
    lengths = stream_lengths(config.sequences, config.seed)
    texts = [" ".join(rng.choice(words) for _ in range(n - 2)) for n in lengths]
    ids = tokenizer(texts)["input_ids"]
    assert [len(i) for i in ids] == lengths, "a word did not map to one token"
    return tokenizer, texts, ids


def sorted_batches(ids: list[list[int]], size: int):
    """Length-sorted batches of ``size``: ``(positions, input_ids, attention_mask)``."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = []
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        longest = max(len(ids[i]) for i in rows)
        input_ids = torch.zeros(len(rows), longest, dtype=torch.long)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        out.append((rows, input_ids, mask))
    return out


def run_on_batches(model, batches) -> list:
    """``model``'s outputs on each of ``batches`` (from :func:`sorted_batches`), without gradients."""
    with torch.no_grad():
        return [model(input_ids=ids, attention_mask=mask) for _, ids, mask in batches]


def make_models(config: StreamConfig, vocab_size: int, batches):
    """The unpatched model and a patched copy (same weights), heads set so that exits spread.

    Returns ``(unpatched, patched, entropies)``: ``entropies`` [N, L - 1] of the exit heads
    of layers 1..L-1 on the stream, for the calibration of the threshold. The models are on
    ``config.device`` (the full-model pass runs there, in float32), then cast to ``config.dtype``;
    the calibration reads the pooled states on the CPU in float32.
    """
    from transformers import BertConfig, BertForSequenceClassification

    from earlyexit_kernels.methods.exit_rules import entropy
    from earlyexit_kernels.methods.policies import Entropy
    from earlyexit_kernels.patching.patch import patch

    torch.manual_seed(config.seed)
    bert = BertConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=4 * config.hidden,
        max_position_embeddings=512,
        initializer_range=config.init_range,
        num_labels=2,
    )
    model = BertForSequenceClassification._from_config(bert, attn_implementation="sdpa").eval()
    dtype, device = torch_dtype(config.dtype), torch.device(config.device)
    model.to(device)
    count = sum(len(rows) for rows, _, _ in batches)
    pooled = torch.zeros(config.layers, count, config.hidden)
    with torch.no_grad():
        for rows, input_ids, mask in on_device(batches, device):
            out = model.bert(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            for layer in range(config.layers):
                pooled[layer, rows] = model.bert.pooler(out.hidden_states[layer + 1]).float().cpu()
    generator = torch.Generator().manual_seed(config.seed + 2)
    weights = []
    for layer in range(config.layers):
        direction = torch.randn(config.hidden, generator=generator)
        direction /= direction.norm()
        z = pooled[layer] @ direction
        mean, std = z.mean(), z.std().clamp_min(1e-6)
        margin = config.margin_scale * (layer + 1) / config.layers
        # logit_1 - logit_0 = margin * (z - mean) / std
        weight = torch.stack([-direction, direction]) * (margin / (2 * std))
        bias = torch.stack([mean, -mean]) * (margin / (2 * std))
        weights.append((weight, bias))
    with torch.no_grad():
        model.classifier.weight.copy_(weights[-1][0])
        model.classifier.bias.copy_(weights[-1][1])
    patched = copy.deepcopy(model)
    patch(patched, Entropy(0.0))
    with torch.no_grad():
        for layer, head in enumerate(patched.early_exit_heads.classifiers):
            head.weight.copy_(weights[layer][0])
            head.bias.copy_(weights[layer][1])
        entropies = torch.stack(
            [entropy(pooled[layer] @ weights[layer][0].T + weights[layer][1]) for layer in range(config.layers - 1)],
            dim=1,
        )
    if dtype != torch.float32:
        model.to(dtype)
        patched.to(dtype)
    return model, patched, entropies


def exit_layers_at(entropies: torch.Tensor, threshold: float) -> torch.Tensor:
    """The exit layer of each sequence under ``Entropy(threshold)``: the first head below it, else L."""
    below = entropies < threshold
    layers = entropies.shape[1] + 1
    first = torch.where(below.any(dim=1), below.int().argmax(dim=1) + 1, layers)
    return first


def calibrate(entropies: torch.Tensor, saved: float) -> float:
    """The ``Entropy`` threshold saving about ``saved`` of the layer evaluations, mid-way across a wide gap."""
    if saved <= 0:
        return 0.0  # nothing exits: every sequence runs every layer
    layers = entropies.shape[1] + 1
    values = torch.unique(entropies.flatten()).tolist()  # sorted
    low, high = 1, len(values) - 1  # the threshold between values[k - 1] and values[k]

    def share(k: int) -> float:
        threshold = (values[k - 1] + values[k]) / 2
        return 1 - exit_layers_at(entropies, threshold).float().mean().item() / layers

    while low < high:  # the smallest k whose share reaches the target (share grows with k)
        middle = (low + high) // 2
        if share(middle) >= saved:
            high = middle
        else:
            low = middle + 1
    spread = max(1, len(values) // 200)
    window = range(max(1, low - spread), min(len(values), low + spread + 1))
    k = max(window, key=lambda j: values[j] - values[j - 1])
    return (values[k - 1] + values[k]) / 2


# ---------------------------------------------------------------------------- measuring


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_memory_mib(fn: Callable[[], object]) -> float | None:
    """Peak resident set during ``fn()`` above the resident set before it (MiB); None where Linux cannot tell."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return _sampled_peak(fn)
    before = _rss_mib()
    fn()
    with open("/proc/self/status") as file:
        peak = next(int(line.split()[1]) / 1024 for line in file if line.startswith("VmHWM:"))
    return peak - before


def _sampled_peak(fn) -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    import threading

    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return (peak[0] - before) / 2**20


@contextlib.contextmanager
def recorded_engines():
    """The engines ``eek.classify`` builds inside the block (for their counts; nothing else changes)."""
    import importlib

    # by its path: the package's name ``classify`` is the function
    classify_module = importlib.import_module("earlyexit_kernels.engine.entry.classify")

    original = getattr(classify_module, "make_engine", None)
    made: list = []
    if original is None:
        yield made
        return

    def recording(*args, **kwargs):
        engine = original(*args, **kwargs)
        made.append(engine)
        return engine

    classify_module.make_engine = recording
    try:
        yield made
    finally:
        classify_module.make_engine = original


def _quantile(samples, q):
    ordered = sorted(samples)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---------------------------------------------------------------------------- the run


def run(config: StreamConfig, output_dir: Path, name: str | None = None, progress=print) -> list[dict]:
    """Run the benchmark; writes ``<name>.csv``, ``<name>.md`` and (with matplotlib) ``<name>.png``.

    ``name`` defaults to ``stream_<device>`` (``stream_<device>_<dtype>`` for a dtype other than
    fp32). The CSV and the table are written after each exit rate too, so that a run cut short
    keeps the rates it measured."""
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    from earlyexit_kernels.engine.entry.classify import classify
    from earlyexit_kernels.methods.policies import Entropy
    from earlyexit_kernels.patching.patch import patch

    torch_dtype(config.dtype)  # an unknown dtype fails here, before the work
    problem = unavailable(config.device)
    if problem:
        raise ValueError(problem)
    device = torch.device(config.device)
    name = name or default_name(config.device, config.dtype)
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        start = time.perf_counter()
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            tokenizer, texts, ids = make_corpus(config, Path(folder))
        batches = on_device(sorted_batches(ids, config.max_batch_size), device)
        unpatched, model, entropies = make_models(config, len(tokenizer), batches)
        tokens = torch.tensor([len(i) for i in ids])
        total_tokens = int(tokens.sum())
        hf_logging.set_verbosity_error()
        classifier = pipeline("text-classification", model=unpatched, tokenizer=tokenizer, device=device)
        started_tokenizing = time.perf_counter()
        for i in range(0, len(texts), config.max_batch_size):
            tokenizer(texts[i : i + config.max_batch_size])
        tokenize_s = time.perf_counter() - started_tokenizing
        progress(
            f"stream: {len(ids)} sequences, {total_tokens} tokens; model ready in {time.perf_counter() - start:.1f} s"
        )
        in_dtype = "" if (config.device, config.dtype) == ("cpu", "fp32") else f" in {config.dtype}"
        common = {
            "device": device_label(device),
            "threads": torch.get_num_threads(),
            "model": f"random BERT H{config.hidden} L{config.layers} heads {config.heads}{in_dtype}",
            "sequences": len(ids),
            "tokens": total_tokens,
            "max_batch_size": config.max_batch_size,
        }
        engines: dict[str, list] = {}

        def method_a():
            return classifier(texts, batch_size=config.pipeline_batch)

        def method_b():
            return run_on_batches(unpatched, batches)

        def method_c():
            return run_on_batches(model, batches)

        def streamed(key: str, **options):
            def method():
                with recorded_engines() as made:
                    out = list(classify(model, texts, tokenizer=tokenizer, **options))
                engines[key] = [engine.stats for engine in made]
                return out

            return method

        rows_cap = config.max_batch_size
        runners = {
            "a": method_a,
            "b": method_b,
            "c": method_c,
            "d": streamed("d", max_batch_size=rows_cap),
            "e": streamed("e", max_batch_size=rows_cap, compile=True),
            "f": streamed("f", engine="cohorts", max_batch_size=None, max_tokens=config.cohort_tokens),
            "g": streamed("g", max_batch_size=rows_cap, engine="continuous"),
            "h": streamed("h", engine="segments", max_batch_size=None, max_tokens=config.cohort_tokens or 16384),
            "i": streamed("i", engine="varlen", max_batch_size=None, max_tokens=config.cohort_tokens or 16384),
        }
        runners = {key: synced(fn, device) for key, fn in runners.items()}  # on cuda: each ends with a sync
        rows: list[dict] = []
        # The opt-in engines no GPU has run yet, left out where their first pass fails (with why), so that
        # one of them failing on a GPU costs its own row, not the others'.
        left_out: dict[str, str] = {}
        first = True
        for saved in config.saved:
            threshold = calibrate(entropies, saved)
            policy = Entropy(threshold)
            patch(model, policy)
            exits = exit_layers_at(entropies, threshold) if threshold > 0 else torch.full_like(tokens, config.layers)
            keys = ["a", "b", "c", "d"] if first else ["b", "c", "d"]
            if config.compile:
                keys.append("e")
            if config.cohort_tokens:
                keys.append("f")
            if config.segments and "h" not in left_out:
                keys.append("h")
            if config.varlen and "i" not in left_out:
                keys.append("i")
            if device.type == "cuda":  # on the CPU (d) is the continuous engine already
                keys.append("g")
            load_before = os.getloadavg()[0]
            progress(f"stream: {policy!r}, target saved {saved}: {', '.join(keys)}")
            if first:  # first-call costs (thread pools, allocator) are no method's
                head = on_device(sorted_batches(ids[:256], config.max_batch_size), device)
                with torch.no_grad():
                    classifier(texts[:256], batch_size=config.pipeline_batch)
                    for _, i, m in head:
                        unpatched(input_ids=i, attention_mask=m)
                        model(input_ids=i, attention_mask=m)
                list(classify(model, texts[:256], tokenizer=tokenizer, max_batch_size=config.max_batch_size))
                if device.type == "cuda":
                    # The graphed step captures a graph per (layer, bucket, length) at its first meeting:
                    # one untimed pass of the engines over the whole stream meets their shapes.
                    first_passes(runners, keys, left_out, progress)
                    torch.cuda.synchronize(device)
            warmup = graphs_warmup = None
            if "e" in keys:
                graphs_start = _graphs()
                began = time.perf_counter()
                try:
                    runners["e"]()
                except Exception as error:  # a compile that fails costs (e), not the other methods
                    keys.remove("e")
                    progress(f"  (e) left out, its warm-up failed: {type(error).__name__}: {error}"[:400])
                else:
                    warmup, graphs_warmup = time.perf_counter() - began, _graphs() - graphs_start
                    progress(f"  (e) warm-up: {warmup:.1f} s, {graphs_warmup} graphs compiled")
            times: dict[str, list[float]] = {k: [] for k in keys}
            results: dict[str, object] = {}
            graphs_measured = 0
            for repeat in range(config.repeats):
                turn = repeat % len(keys)
                for key in keys[turn:] + keys[:turn]:
                    before = _graphs() if key == "e" else 0
                    began = time.perf_counter()
                    results[key] = runners[key]()
                    times[key].append(time.perf_counter() - began)
                    if key == "e":
                        graphs_measured += _graphs() - before
            peaks = {}
            if config.memory and first and device.type == "cuda":
                progress("  peak memory: not measured on cuda")
            elif config.memory and first:
                for key in keys:
                    peaks[key] = peak_memory_mib(runners[key])
            load_after = os.getloadavg()[0]

            # What (c) did, from its outputs.
            early = results["c"]
            exit_c = torch.zeros(len(ids), dtype=torch.long)
            logits_c = torch.zeros(len(ids), 2)
            calls_c = rows_c = slots_c = real_c = syncs_c = 0
            for (positions, _, _), out in zip(batches, early):
                exit_layer = out.exit_layer.cpu()
                exit_c[positions] = exit_layer
                logits_c[positions] = out.logits.float().cpu()
                lengths = tokens[positions]
                syncs_c += int(out.host_syncs or 0)
                for layer in range(1, config.layers + 1):
                    active = exit_layer >= layer
                    n = int(active.sum())
                    if n:  # a layer call on the rows still in the batch, trimmed to the longest of them
                        calls_c, rows_c = calls_c + 1, rows_c + n
                        slots_c += n * int(lengths[active].max())
                        real_c += int(lengths[active].sum())
            if threshold > 0 and not torch.equal(exit_c, exits):
                progress(f"  note: (c) differs from the calibration on {int((exit_c != exits).sum())} exits")
            exits = exit_c
            mean_layers = exits.float().mean().item()
            histogram = torch.bincount(exits, minlength=config.layers + 1)[1:].tolist()
            per_token_layer = statistics.median(times["b"]) / (total_tokens * config.layers)
            ideal = per_token_layer * int((tokens * exits).sum())
            p50 = {k: statistics.median(v) for k, v in times.items()}
            if first:
                reference_a = p50["a"]
            for key in keys:
                samples = times[key]
                row = {
                    **common,
                    "policy": repr(policy),
                    "target_saved": saved,
                    "saved_layer_share": round(1 - mean_layers / config.layers, 4),
                    "mean_exit_layer": round(mean_layers, 3),
                    "exit_histogram": "/".join(map(str, histogram)),
                    "method": METHODS[key],
                    "seq_per_s": round(len(ids) / p50[key], 1),
                    "seq_per_s_p20": round(len(ids) / _quantile(samples, 0.8), 1),
                    "seq_per_s_p80": round(len(ids) / _quantile(samples, 0.2), 1),
                    "repeats": len(samples),
                    "vs_a": round(reference_a / p50[key], 3),
                    "vs_c": round(p50["c"] / p50[key], 3),
                    "of_ideal": round(ideal / p50[key], 3),
                    "ideal_seq_per_s": round(len(ids) / ideal, 1),
                    "peak_mib": "" if peaks.get(key) is None else round(peaks[key], 1),
                    "load_before": round(load_before, 2),
                    "load_after": round(load_after, 2),
                }
                if key == "c":
                    row.update(
                        layer_calls=calls_c,
                        fill=round(rows_c / calls_c / config.max_batch_size, 4),
                        padded_row_fill=round(rows_c / calls_c / config.max_batch_size, 4),
                        token_fill=round(real_c / slots_c, 4),
                        host_syncs_per_call=round(syncs_c / calls_c, 4),
                    )
                if key in ("d", "e", "f", "g", "h", "i"):
                    stats = engines.get(key) or []
                    if stats:
                        calls = sum(s.calls for s in stats)
                        row.update(
                            layer_calls=calls,
                            token_fill=round(sum(s.tokens for s in stats) / sum(s.slots for s in stats), 4),
                            host_syncs_per_call=round(sum(s.host_syncs for s in stats) / calls, 4),
                        )
                        if key not in ("f", "h", "i"):  # (f), (h) and (i)'s calls are sized by tokens, not rows
                            row.update(
                                fill=round(sum(s.rows for s in stats) / calls / config.max_batch_size, 4),
                                padded_row_fill=round(
                                    sum(s.padded_rows for s in stats) / calls / config.max_batch_size, 4
                                ),
                            )
                    predictions = results[key]
                    exit_k = torch.tensor([int(p.exit_layer) for p in predictions])
                    logits_k = torch.stack([p.logits.float().cpu() for p in predictions])
                    row.update(
                        exit_mismatches_vs_c=int((exit_k != exits).sum()),
                        max_logit_diff_vs_c=f"{(logits_k - logits_c).abs().max().item():.2e}",
                    )
                if key == "e":
                    row.update(
                        compile_warmup_s=round(warmup, 1), graphs_warmup=graphs_warmup, graphs_measured=graphs_measured
                    )
                rows.append({column: row.get(column, "") for column in COLUMNS})
                progress(
                    f"  {METHODS[key]}: {row['seq_per_s']} seq/s, {row['vs_a']}x (a), {row['of_ideal']} of ideal, "
                    f"fill {row.get('fill', '')}"
                )
            first = False
            if saved != config.saved[-1]:  # what is measured so far, should the run be cut short
                note = _note(config, time.perf_counter() - start, tokenize_s, partial=True, left_out=left_out)
                _write(rows, output_dir, name, note)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads_before)
    csv_path = _write(rows, output_dir, name, _note(config, seconds, tokenize_s, left_out=left_out))
    with contextlib.suppress(ImportError):
        plot(csv_path, output_dir / f"{name}.png")
    return rows


def first_passes(runners: dict, keys: list[str], left_out: dict[str, str], progress) -> None:
    """One untimed pass of each engine in ``keys`` (on a GPU: the graphs of their shapes captured). The opt-in
    engines no GPU has run yet, (h) and (i), are left out where theirs fails: removed from ``keys``, with why
    in ``left_out``, so that one of them failing costs its own row, not the run."""
    for key in ("d", "f", "g"):
        if key in keys:
            runners[key]()
    for key in ("h", "i"):
        if key in keys:
            try:
                runners[key]()
            except Exception as error:  # noqa: BLE001 - its row is left out, the run goes on
                keys.remove(key)
                left_out[key] = f"{type(error).__name__}: {error}"[:300]
                progress(f"  {METHODS[key]} left out, its first pass failed: {left_out[key]}")


def _write(rows: list[dict], output_dir: Path, name: str, note: str) -> Path:
    csv_path = output_dir / f"{name}.csv"
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / f"{name}.md").write_text(markdown(csv_path, note=note))
    return csv_path


def _note(
    config: StreamConfig, seconds: float, tokenize_s: float, partial: bool = False, left_out: dict | None = None
) -> str:
    done = f"partial: {seconds:.0f} s in, the run goes on" if partial else f"{seconds:.0f} s in all"
    failed = "".join(
        f" Left out: {METHODS[key]}, whose first pass failed ({why})." for key, why in (left_out or {}).items()
    )
    return (
        f"Command: `eek bench stream {' '.join(_argv(config))}`".rstrip()
        + f" ({done}; tokenising the stream alone: {tokenize_s:.2f} s)."
        + failed
    )


def _argv(config: StreamConfig) -> list[str]:
    defaults, out = StreamConfig(), []
    for field_name, flag in (
        ("sequences", "--sequences"),
        ("hidden", "--hidden"),
        ("layers", "--layers"),
        ("repeats", "--repeats"),
        ("threads", "--threads"),
        ("max_batch_size", "--max-batch-size"),
        ("device", "--device"),
        ("dtype", "--dtype"),
        ("cohort_tokens", "--cohort-tokens"),
    ):
        value = getattr(config, field_name)
        if value != getattr(defaults, field_name):
            out += [flag, str(value)]
    out += ["--segments"] * config.segments + ["--varlen"] * config.varlen
    out += ["--no-compile"] * (not config.compile) + ["--no-memory"] * (not config.memory)
    return out


# ---------------------------------------------------------------------------- report


def _read(csv_path: Path) -> list[dict]:
    with open(csv_path) as file:
        return list(csv.DictReader(file))


def markdown(csv_path: Path, note: str = "", targets=None) -> str:
    """The table of a run, from its CSV alone. ``targets(main_rows_by_method, on_gpu) -> lines``: checks to print
    under it (the repository's, ``benchmarks/suite/stream_grid.py``)."""
    rows = _read(csv_path)
    main = [r for r in rows if r["target_saved"] == rows[0]["target_saved"]]
    first = main[0]
    histogram = first["exit_histogram"].split("/")
    n = int(first["sequences"])
    by_key = {r["method"][:3]: r for r in main}
    on_cpu = not first["device"].startswith("cuda")
    where = f"with {first['threads']} threads" if on_cpu else f"({first['threads']} host threads)"
    lines = [
        f"Stream of {n} sequences ({first['tokens']} tokens; lengths log-normal, median 28, 89% in 10-60 tokens, "
        f"tail to 256), {first['model']} (exits spread by calibrated heads), `max_batch_size` "
        f"{first['max_batch_size']}, {first['device']} {where}. Policy `{first['policy']}`: "
        f"mean exit layer {first['mean_exit_layer']}, {float(first['saved_layer_share']):.0%} of the layer "
        f"evaluations saved; sequences exiting at layers 1..{len(histogram)}: {' / '.join(histogram)}. "
        f"Sequences/s: p50 of {first['repeats']} interleaved repetitions [p20-p80]; load average "
        f"{first['load_before']} before, {first['load_after']} after.",
        "",
        "| method | sequences/s | vs (a) | vs (c) | of ideal | fill | token fill | host syncs / layer call | peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in main:
        fill, token_fill = _percent(r["fill"]), _percent(r["token_fill"])
        lines.append(
            f"| {r['method']} | {r['seq_per_s']} [{r['seq_per_s_p20']}-{r['seq_per_s_p80']}] | {r['vs_a']}x | "
            f"{r['vs_c']}x | {r['of_ideal']} | {fill} | {token_fill} | {r['host_syncs_per_call']} | {r['peak_mib']} |"
        )
    ideal = first["ideal_seq_per_s"]
    peak = "resident set above the start of an untimed pass" if on_cpu else "not measured on cuda"
    lines += [
        "",
        f"Ideal: {ideal} sequences/s ((b)'s time per real token-layer times the tokens x exit layers the stream "
        f"needs). Fill: rows per layer call / `max_batch_size`; token fill: real tokens / computed slots. Peak: "
        f"{peak}.",
    ]
    if "(e)" in by_key:
        e = by_key["(e)"]
        lines.append(
            f"(e): warm-up pass {e['compile_warmup_s']} s ({e['graphs_warmup']} graphs compiled), not counted; "
            f"graphs compiled during the {e['repeats']} measured passes: {e['graphs_measured']}."
        )
    mismatches = [
        f"{r['method'][:3]} {r['exit_mismatches_vs_c']} exits differ, logits within {r['max_logit_diff_vs_c']}"
        for r in main
        if r["exit_mismatches_vs_c"] != ""
    ]
    if mismatches:
        lines.append("Against (c): " + "; ".join(mismatches) + ".")
    sweep = sorted({r["target_saved"] for r in rows}, key=float)
    if len(sweep) > 1:
        methods = [m for m in METHODS.values() if m[:3] != "(a)" and any(r["method"] == m for r in rows)]
        lines += [
            "",
            "Exit-rate sweep (sequences/s, p50; (a) runs the full model: "
            f"{by_key['(a)']['seq_per_s'] if '(a)' in by_key else '-'} sequences/s):",
            "",
            "| layers saved | "
            + " | ".join(m.split(" ", 1)[0] for m in methods)
            + " | ideal | (d) / (c) | (d) of ideal | (d) fill | (c) fill |",
            "| --- | " + " | ".join("---" for _ in methods) + " | --- | --- | --- | --- | --- |",
        ]
        for target in sweep:
            group = {r["method"][:3]: r for r in rows if r["target_saved"] == target}
            any_row = next(iter(group.values()))
            cells = [group[m[:3]]["seq_per_s"] if m[:3] in group else "" for m in methods]
            d, c = group.get("(d)"), group.get("(c)")
            tail = [
                any_row["ideal_seq_per_s"],
                d["vs_c"] if d else "",
                d["of_ideal"] if d else "",
                _percent(d["fill"]) if d else "",
                _percent(c["fill"]) if c else "",
            ]
            share = f"{float(any_row['saved_layer_share']):.0%}"
            lines.append("| " + " | ".join([share, *cells, *map(str, tail)]) + " |")
    if targets is not None:
        lines += ["", *targets(by_key, not on_cpu)]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _percent(text: str) -> str:
    return f"{float(text):.1%}" if text else ""


def plot(csv_path: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read(csv_path)
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for method in list(METHODS.values())[1:]:
        points = sorted((float(r["saved_layer_share"]), float(r["seq_per_s"])) for r in rows if r["method"] == method)
        if points:
            axis.plot(*zip(*points), marker="o", label=method)
    ideal = sorted({(float(r["saved_layer_share"]), float(r["ideal_seq_per_s"])) for r in rows})
    axis.plot(*zip(*ideal), linestyle="--", color="grey", label="ideal")
    pipeline_rows = [r for r in rows if r["method"] == METHODS["a"]]
    if pipeline_rows:
        axis.axhline(float(pipeline_rows[0]["seq_per_s"]), color="black", linestyle=":", label=METHODS["a"])
    axis.set_xlabel("share of layer evaluations saved by early exit")
    axis.set_ylabel("sequences / s")
    axis.set_title(f"{rows[0]['sequences']} sequences, {rows[0]['model']}, {rows[0]['device']}", fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="eek bench stream", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output-dir", "--out", type=Path, default=Path("bench-results"), help="default: bench-results"
    )
    parser.add_argument(
        "--name", help="file names: <name>.csv, .md, .png (default stream_<device>, with _<dtype> unless fp32)"
    )
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="cuda: see stream_device")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="the models' dtype once calibrated")
    parser.add_argument("--sequences", type=int, default=StreamConfig.sequences)
    parser.add_argument("--hidden", type=int, default=StreamConfig.hidden)
    parser.add_argument("--layers", type=int, default=StreamConfig.layers)
    parser.add_argument("--max-batch-size", type=int, default=StreamConfig.max_batch_size)
    parser.add_argument("--repeats", type=int, default=StreamConfig.repeats)
    parser.add_argument(
        "--saved", default=",".join(map(str, StreamConfig.saved)), help="shares of layers saved; the first: main run"
    )
    parser.add_argument(
        "--cohort-tokens",
        type=int,
        default=StreamConfig.cohort_tokens,
        help="(f)'s token budget per cohort (default 16384; 0 leaves (f) out)",
    )
    parser.add_argument(
        "--segments",
        action="store_true",
        help="(h): the segment engine (equal thirds of the layers) on (f)'s token budget, beside (f)",
    )
    parser.add_argument(
        "--varlen",
        action="store_true",
        help="(i): the packed-token cohorts (no padding, varlen attention) on (f)'s budget of real tokens, beside (f)",
    )
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--from-csv", type=Path, help="print the markdown of an existing CSV and stop")
    args = parser.parse_args(argv)
    if args.from_csv:
        print(markdown(args.from_csv), end="")
        return 0
    problem = unavailable(args.device)
    if problem:
        parser.error(problem)
    config = StreamConfig(
        sequences=args.sequences,
        hidden=args.hidden,
        layers=args.layers,
        heads=max(1, args.hidden // 64),
        max_batch_size=args.max_batch_size,
        repeats=args.repeats,
        saved=tuple(float(q) for q in args.saved.split(",")),
        compile=not args.no_compile,
        memory=not args.no_memory,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        cohort_tokens=args.cohort_tokens,
        segments=args.segments,
        varlen=args.varlen,
    )
    name = args.name or default_name(args.device, args.dtype)
    run(config, args.output_dir, name=name)
    print((args.output_dir / f"{name}.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
