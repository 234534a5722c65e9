"""The stream benchmark: a corpus classified five ways in one run, against the ideal.

    python -m earlyexit_kernels.bench.stream --output-dir benchmarks/results

The workload. Token lengths follow a log-normal with median 28 and sigma 0.55, clipped to
4..256: about 89% of the sequences hold 10-60 tokens, 8% more than 60, a tail to 256 (the
shape of sentence-classification sets such as SST-2, MNLI, QQP). Texts are random words of
a generated vocabulary, one token each, with ``[CLS]`` and ``[SEP]``. The model is a random
BERT whose exit heads and pooler are perturbed so that predictions differ from layer to
layer; the ``Entropy`` threshold is the ``q``-quantile of the heads' entropies on a
calibration sample, so a chosen share of the layer evaluations is saved, and exits spread
over the layers.

The methods, same sequences, same weights, interleaved repetitions:

(a) ``pipeline("text-classification", batch_size=32)`` on the unpatched model, in stream
    order (tokenizing included: it is what a Hugging Face user runs);
(b) the unpatched model on length-sorted batches of ``max_batch_size`` (token ids ready);
(c) the per-batch early exit, ``model(...)`` on the same batches as (b);
(d) ``eek.classify`` on the token ids (the continuous engine);
(e) ``eek.classify(compile=True)``, after a warm-up pass whose time is reported apart.

The ideal is (b)'s time per token-layer times the tokens and layers each sequence needs
(its length x its exit layer). Fill is the mean rows per layer call over
``max_batch_size``: for (c) from its exit layers (a batch's layer call holds the rows still
active), for (d) from the engine's counts. Token fill is the real tokens over the padded
slots the layer calls computed (for (c), each call trimmed to its longest active row). Hidden-state memory: (b)/(c) the largest layer
input ``[B, S, H]``; (d) the engine's token pool at its peak plus the largest call.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["StreamConfig", "make_stream", "run"]


@dataclass
class StreamConfig:
    sequences: int = 4096
    hidden: int = 256
    layers: int = 6
    heads: int = 4
    max_batch_size: int = 64
    pipeline_batch: int = 32
    repeats: int = 3
    quantiles: tuple[float, ...] = (0.5, 0.3, 0.15)  # main run: the first
    compile: bool = True
    compile_length_step: int = 16
    threads: int | None = None
    seed: int = 0


def stream_lengths(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [min(max(round(math.exp(rng.gauss(math.log(28), 0.55))), 4), 256) for _ in range(count)]


def make_stream(config: StreamConfig, folder: Path):
    """The tokenizer, the texts, their token ids and the unpatched model."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = [f"w{i}" for i in range(2000)]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    rng = random.Random(config.seed + 1)
    texts = [" ".join(rng.choice(words) for _ in range(n - 2)) for n in stream_lengths(config.sequences, config.seed)]
    ids = tokenizer(texts)["input_ids"]
    torch.manual_seed(config.seed)
    bert = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=config.hidden,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=4 * config.hidden,
        max_position_embeddings=512,
        num_labels=2,
    )
    model = BertForSequenceClassification._from_config(bert, attn_implementation="sdpa").eval()
    return tokenizer, texts, ids, model


def calibrated_policies(model, ids, quantiles, seed: int):
    """Perturb the heads, then one Entropy threshold per quantile of the heads' entropies."""
    import earlyexit_kernels as eek
    from earlyexit_kernels.exit_rules import entropy

    eek.patch(model, eek.Entropy(0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pooler = model._eek_adapter.pooler_linear.weight
        pooler.add_(torch.randn(pooler.shape, generator=generator) / math.sqrt(pooler.shape[1]))
        for head in model.early_exit_heads.classifiers:
            head.weight.add_(torch.randn(head.weight.shape, generator=generator) * 0.5)
        values = []
        for sequence in ids[:256]:
            out = model(input_ids=torch.tensor([sequence]), return_all_exits=True)
            values += entropy(out.all_logits[:-1, 0]).tolist()
    values = sorted(set(values))
    policies = []
    for q in quantiles:
        # Midway across the widest gap between two data points near the quantile, so that the
        # rounding of another batch composition cannot move a sequence across the threshold.
        k = max(1, min(len(values) - 1, round(q * len(values))))
        window = range(max(1, k - len(values) // 50), min(len(values), k + len(values) // 50 + 1))
        k = max(window, key=lambda j: values[j] - values[j - 1])
        policies.append(eek.Entropy((values[k - 1] + values[k]) / 2))
    return policies


def _batches(ids, size):
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


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run(config: StreamConfig, output_dir: Path, progress=print) -> list[dict]:
    """Run the benchmark; write ``stream.csv`` and ``stream.md`` (and ``stream.png``) under ``output_dir``."""
    import earlyexit_kernels as eek
    from earlyexit_kernels.continuous import ContinuousEngine

    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, texts, ids, model = make_stream(config, Path(folder))
    from transformers import pipeline

    policies = calibrated_policies(model, ids, config.quantiles, config.seed)
    batches = _batches(ids, config.max_batch_size)
    inputs = [{"input_ids": sequence} for sequence in ids]
    tokens = [len(sequence) for sequence in ids]
    rows_out = []
    for index, policy in enumerate(policies):
        main = index == 0
        eek.patch(model, policy)
        progress(f"stream: {policy!r} ({'main run' if main else 'exit-rate sweep'})")

        def unpatched_pipeline(policy=policy):
            eek.unpatch(model)
            try:
                classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")
                return classifier(texts, batch_size=config.pipeline_batch)
            finally:
                eek.patch(model, policy)

        def full_batches(policy=policy):
            eek.unpatch(model)
            try:
                with torch.no_grad():
                    return [model(input_ids=i, attention_mask=m).logits for _, i, m in batches]
            finally:
                eek.patch(model, policy)

        def early_batches():
            with torch.no_grad():
                return [model(input_ids=i, attention_mask=m) for _, i, m in batches]

        engines = {}

        def continuous(compiled=False, engines=engines):
            engine = ContinuousEngine(
                model,
                max_batch_size=config.max_batch_size,
                compile=compiled,
                admission="length",
                length_step=config.compile_length_step if compiled else 8,
            )
            engines["compiled" if compiled else "eager"] = engine
            from earlyexit_kernels.classify import _predictions

            return list(_predictions(engine, inputs, None, True, False, 8 * engine.scheduler.max_in_flight))

        methods = {"(b) full, sorted batches": full_batches, "(c) per-batch early exit": early_batches}
        methods["(d) eek.classify"] = continuous
        if main:
            methods = {"(a) pipeline, full": unpatched_pipeline, **methods}
        compile_warmup = None
        if main and config.compile:
            from torch._dynamo.utils import counters

            compile_warmup, _ = _timed(lambda: continuous(True))
            methods["(e) eek.classify(compile=True)"] = lambda: continuous(True)
        for fn in methods.values():
            fn()  # warm-up: first-call costs are not the method's
        times = {name: [] for name in methods}
        results = {}
        graphs_before = None
        for _ in range(config.repeats):
            for name, fn in methods.items():
                if name.startswith("(e)") and graphs_before is None:
                    graphs_before = counters["stats"]["unique_graphs"]
                elapsed, results[name] = _timed(fn)
                times[name].append(elapsed)
        recompiles = None if graphs_before is None else counters["stats"]["unique_graphs"] - graphs_before

        early = results["(c) per-batch early exit"]
        exit_layers = torch.zeros(len(ids), dtype=torch.long)
        syncs_c = calls_c = rows_c = slots_c = real_c = 0
        for (rows, _, _), out in zip(batches, early):
            exit_layers[rows] = out.exit_layer
            lengths = torch.tensor([tokens[i] for i in rows])
            for layer in range(1, config.layers + 1):
                active = out.exit_layer >= layer
                if active.any():  # a layer call on the active rows, trimmed to the longest of them
                    calls_c, rows_c = calls_c + 1, rows_c + int(active.sum())
                    slots_c += int(active.sum()) * int(lengths[active].max())
                    real_c += int(lengths[active].sum())
            syncs_c += out.host_syncs
        streamed = results["(d) eek.classify"]
        assert [p.exit_layer for p in streamed] == exit_layers.tolist(), "(d) and (c) disagree on exit layers"
        full_time = statistics.median(times["(b) full, sorted batches"])
        per_token_layer = full_time / (sum(tokens) * config.layers)
        ideal_time = per_token_layer * sum(t * int(e) for t, e in zip(tokens, exit_layers))
        mean_layers = exit_layers.float().mean().item()
        reference = statistics.median(times.get("(a) pipeline, full", times["(b) full, sorted batches"]))
        largest_batch = max(i.numel() for _, i, _ in batches) * config.hidden * 4
        for name, samples in times.items():
            p20, p50, p80 = (_quantile(samples, q) for q in (0.2, 0.5, 0.8))
            row = {
                "method": name,
                "policy": repr(policy),
                "sequences": len(ids),
                "mean_layers": round(mean_layers, 3),
                "layers": config.layers,
                "saved_layer_share": round(1 - mean_layers / config.layers, 3),
                "seq_per_s": round(len(ids) / p50, 1),
                "seq_per_s_p20": round(len(ids) / p80, 1),
                "seq_per_s_p80": round(len(ids) / p20, 1),
                "ideal_seq_per_s": round(len(ids) / ideal_time, 1),
                "of_ideal": round(ideal_time / p50, 3),
                "vs_reference": round(reference / p50, 3),
                "fill": "",
                "token_fill": "",
                "host_syncs_per_call": "",
                "hidden_state_mib": "",
                "compile_warmup_s": "",
                "new_graphs_after_warmup": "",
            }
            if name.startswith("(c)"):
                row.update(fill=round(rows_c / calls_c / config.max_batch_size, 3))
                row.update(token_fill=round(real_c / slots_c, 3))
                row.update(host_syncs_per_call=round(syncs_c / calls_c, 3))
                row.update(hidden_state_mib=round(largest_batch / 2**20, 2))
            if name.startswith(("(d)", "(e)")):
                stats = engines["compiled" if name.startswith("(e)") else "eager"].stats
                row.update(fill=round(stats.rows / stats.calls / config.max_batch_size, 3))
                row.update(token_fill=round(stats.tokens / stats.slots, 3))
                row.update(host_syncs_per_call=round(stats.host_syncs / stats.calls, 3))
                engine = engines["compiled" if name.startswith("(e)") else "eager"]
                pool = engine._pool.numel() * engine._pool.element_size()
                largest_call = stats.largest_call * config.hidden * engine._pool.element_size()
                row.update(hidden_state_mib=round((pool + largest_call) / 2**20, 2))
            if name.startswith("(b)"):
                row.update(hidden_state_mib=round(largest_batch / 2**20, 2))
            if name.startswith("(e)"):
                row.update(compile_warmup_s=round(compile_warmup, 1), new_graphs_after_warmup=recompiles)
            rows_out.append(row)
            progress(f"  {name}: {row['seq_per_s']} seq/s ({row['vs_reference']}x), fill {row['fill']}")
    _write(rows_out, output_dir, config)
    return rows_out


def _quantile(samples, q):
    ordered = sorted(samples)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _write(rows, output_dir: Path, config: StreamConfig) -> None:
    with open(output_dir / "stream.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    main = [r for r in rows if r["policy"] == rows[0]["policy"]]
    lines = [
        f"Stream of {config.sequences} sequences (median 28 tokens, tail to 256), random BERT "
        f"hidden {config.hidden}, {config.layers} layers, `max_batch_size` {config.max_batch_size}, "
        f"policy `{rows[0]['policy']}`: mean {rows[0]['mean_layers']} of {config.layers} layers. "
        f"p50 of {config.repeats} interleaved repetitions (p20-p80 in brackets); speed-up against (a).",
        "",
        "| method | sequences/s | vs (a) | of ideal | fill | token fill | host syncs / call | hidden-state MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in main:
        lines.append(
            f"| {r['method']} | {r['seq_per_s']} ({r['seq_per_s_p20']}-{r['seq_per_s_p80']}) | "
            f"{r['vs_reference']}x | {r['of_ideal']} | {r['fill']} | {r['token_fill']} | {r['host_syncs_per_call']} | "
            f"{r['hidden_state_mib']} |"
        )
    compiled = [r for r in main if r["compile_warmup_s"] != ""]
    if compiled:
        lines += [
            "",
            f"(e): warm-up (compiling every shape met) {compiled[0]['compile_warmup_s']} s, not counted; "
            f"graphs compiled during the measured passes: {compiled[0]['new_graphs_after_warmup']}.",
        ]
    (output_dir / "stream.md").write_text("\n".join(lines) + "\n")
    try:
        _plot(rows, output_dir / "stream.png")
    except ImportError:
        pass


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method in ("(b) full, sorted batches", "(c) per-batch early exit", "(d) eek.classify"):
        points = sorted((r["saved_layer_share"], r["seq_per_s"]) for r in rows if r["method"] == method)
        axis.plot(*zip(*points), marker="o", label=method)
    ideal = sorted({(r["saved_layer_share"], r["ideal_seq_per_s"]) for r in rows})
    axis.plot(*zip(*ideal), linestyle="--", color="grey", label="ideal")
    axis.set_xlabel("share of layer evaluations saved by early exit")
    axis.set_ylabel("sequences / s")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="default: a new folder under /tmp")
    parser.add_argument("--sequences", type=int, default=StreamConfig.sequences)
    parser.add_argument("--hidden", type=int, default=StreamConfig.hidden)
    parser.add_argument("--layers", type=int, default=StreamConfig.layers)
    parser.add_argument("--max-batch-size", type=int, default=StreamConfig.max_batch_size)
    parser.add_argument("--repeats", type=int, default=StreamConfig.repeats)
    parser.add_argument("--quantiles", default=",".join(map(str, StreamConfig.quantiles)))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    config = StreamConfig(
        sequences=args.sequences,
        hidden=args.hidden,
        layers=args.layers,
        heads=max(1, args.hidden // 64),
        max_batch_size=args.max_batch_size,
        repeats=args.repeats,
        quantiles=tuple(float(q) for q in args.quantiles.split(",")),
        compile=not args.no_compile,
        threads=args.threads,
    )
    output = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="eek-stream-"))
    run(config, output)
    print((output / "stream.md").read_text())
    print(f"written to {output}")


if __name__ == "__main__":
    main()
