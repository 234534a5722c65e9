"""A corpus classified by ``eek.classify`` on int8 beside the int8 runtimes a user would run instead (issue 107).

What a user with a corpus runs: the early-exit folder on its int8 base (``eek classify FOLDER --dtype
int8``: the library call :func:`earlyexit_kernels.classify` on ``load_model(FOLDER, dtype="int8")``, the
engine sorting by length as it does), or the plain classifier on a faster runtime, the texts sorted by
length by hand (longest first) in batches of ``--batch``:

- ``OpenVINO int8``: static int8 by NNCF (``nncf.quantize``, transformer preset) on ``--calibration``
  texts, never the corpus (:func:`benchmarks.suite.stack_peers.openvino_int8`: latency hint, float32 for what
  stays float, the plugin's fused-subgraph code generation on or off as timed faster on those texts);
- ``ONNX Runtime int8``: ONNX Runtime's transformer optimizer, then ``quantize_dynamic``
  (:func:`benchmarks.suite.stack_peers.peer_configs`);
- ``OpenVINO fp32`` and ``ONNX Runtime fp32`` where installed, for scale.

Every timing runs from the texts to the labels (tokenization included), after one pass of each, timed
apart (``first_pass_texts_per_s``: what a corpus classified once takes, each new shape prepared) and not
among the rounds (compilation, allocations, and the answers: agreement with the float32 plain model and
eek's mean layers). Then ``--rounds`` rounds, each timing every configuration once over the whole corpus in an
order rotated by the round; ratios are paired within a round, their median reported.

    python -m benchmarks.suite.corpus_peers FOLDER PLAIN --texts .cache/demo/test.csv \\
        --calibration .cache/demo/validation.csv --threads 1 --rounds 3 --output FILE.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch

from benchmarks.suite.stack_peers import peer_configs
from earlyexit_kernels.bench.results import cpu_name
from earlyexit_kernels.engine.layers.int8_isa import int8_isa

EEK = "eek classify int8"


def read_texts(path: Path, column: str = "text") -> list[str]:
    """The texts of a .csv (its ``column``) or of a text file (one a line)."""
    if path.suffix == ".csv":
        import pandas as pd

        return [str(t) for t in pd.read_csv(path)[column].tolist()]
    return [line for line in path.read_text().splitlines() if line.strip()]


def sorted_batches(tokenizer, texts: list[str], batch: int, limit: int):
    """The texts longest first (by tokens, as a careful user sorts a corpus), in batches: (rows, texts) each."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=limit)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    return [(order[s : s + batch], [texts[i] for i in order[s : s + batch]]) for s in range(0, len(order), batch)]


def rotated_rounds(runs: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each of ``runs`` (name -> a call of no arguments) in each of ``rounds`` rounds, every round
    calling them all once in an order rotated by the round, so that a drift of the machine falls on each alike."""
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def peer_runner(config, tokenizer, batches, limit: int):
    """Classify the corpus with a peer configuration: the labels in corpus order."""

    def classify_all() -> list[int]:
        labels: dict[int, int] = {}
        for rows, chunk in batches:
            encoded = dict(tokenizer(chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt"))
            logits, _ = config.run(encoded)
            labels.update(zip(rows, logits.argmax(-1).tolist()))
        return [labels[i] for i in range(len(labels))]

    return classify_all


def eek_runner(model, tokenizer, texts: list[str], layers: list[float], engine: str = "auto"):
    import earlyexit_kernels as eek

    def classify_all() -> list[int]:
        predictions = list(eek.classify(model, texts, tokenizer=tokenizer, engine=engine))
        layers[:] = [p.exit_layer for p in predictions]
        return [int(p.logits.argmax()) for p in predictions]

    return classify_all


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the early-exit folder (eek fit ... --dtype int8)")
    parser.add_argument("plain", type=Path, help="the plain classifier the folder was fitted from")
    parser.add_argument("--texts", type=Path, required=True, help="the corpus (.csv with a text column, or .txt)")
    parser.add_argument("--calibration", type=Path, required=True, help="texts NNCF calibrates on, never the corpus")
    parser.add_argument("--calibration-count", type=int, default=300, help="how many of them (default 300)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="the peers' batch size (default 32)")
    parser.add_argument("--output", type=Path, required=True, help="the JSON written")
    parser.add_argument(
        "--also",
        type=Path,
        nargs="*",
        default=[],
        help="more early-exit folders timed in the same rounds (e.g. one fitted on other int8 layers), each a row "
        "named by its int8 recipe, with its own paired speed-ups",
    )
    parser.add_argument(
        "--also-engine",
        nargs="*",
        default=[],
        choices=("continuous", "cohorts"),
        help="the folder again on these stream engines (eek classify --engine), each a row with its own paired "
        "speed-ups (e.g. cohorts: length-sorted cohorts, in one OpenVINO call each on static int8 layers)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from earlyexit_kernels.integrations.model_folder import load_model

    texts = read_texts(args.texts)
    tokenizer = AutoTokenizer.from_pretrained(args.plain)
    plain = AutoModelForSequenceClassification.from_pretrained(args.plain, dtype=torch.float32).eval()
    limit = min(plain.config.max_position_embeddings, tokenizer.model_max_length or 512)
    batches = sorted_batches(tokenizer, texts, args.batch, limit)
    calibration_texts = read_texts(args.calibration)[: args.calibration_count]
    calibration = [
        dict(tokenizer(calibration_texts[s : s + args.batch], padding=True, truncation=True, max_length=limit,
                       return_tensors="pt"))
        for s in range(0, len(calibration_texts), args.batch)
    ]  # fmt: skip
    model, folder_tokenizer = load_model(str(args.folder), dtype="int8")
    layers: list[float] = []
    runners = {EEK: eek_runner(model, folder_tokenizer, texts, layers)}
    also = {}  # the other folders' rows: name -> (model, its exit layers)
    for folder in args.also:
        other, other_tokenizer = load_model(str(folder), dtype="int8")
        name = f"{EEK} ({getattr(other, 'eek_int8_recipe', folder.name)})"
        also[name] = (other, [])
        runners[name] = eek_runner(other, other_tokenizer, texts, also[name][1])
    for engine in args.also_engine:
        name = f"{EEK} (engine {engine})"
        also[name] = (model, [])
        runners[name] = eek_runner(model, folder_tokenizer, texts, also[name][1], engine)
    eeks = [EEK, *also]
    with tempfile.TemporaryDirectory(prefix="eek-corpus-peers-") as scratch:
        configs, notes = peer_configs(plain, calibration[0], Path(scratch), args.threads, calibration)
        for config in configs:
            runners[config.name] = peer_runner(config, tokenizer, batches, limit)
        with torch.inference_mode():
            reference: dict[int, int] = {}
            for rows, chunk in batches:
                encoded = tokenizer(chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt")
                reference.update(zip(rows, plain(**encoded).logits.argmax(-1).tolist()))
            full = [reference[i] for i in range(len(texts))]  # the float32 plain model's, in corpus order
            answers, first_pass = {}, {}
            for name, run in runners.items():  # the untimed pass: compilation, the shapes met, and the answers
                start = time.perf_counter()
                answers[name] = run()
                first_pass[name] = time.perf_counter() - start
            seconds = rotated_rounds(runners, args.rounds)
            names = list(runners)
    rows = []
    for name in names:
        agreement = sum(a == b for a, b in zip(answers[name], full)) / len(full)
        row = {
            "name": name,
            "texts_per_s": [len(texts) / s for s in seconds[name]],
            "texts_per_s_median": len(texts) / statistics.median(seconds[name]),
            # a corpus classified once pays this pass: each new shape prepared, per compiled model
            "first_pass_texts_per_s": len(texts) / first_pass[name],
            "agreement_with_fp32": agreement,
        }
        if name not in eeks:
            paired = [peer / mine for peer, mine in zip(seconds[name], seconds[EEK])]
            row["eek_speedup_per_round"] = paired
            row["eek_speedup_median"] = statistics.median(paired)
            for other in also:  # each other folder's paired speed-up over this peer
                paired = [peer / mine for peer, mine in zip(seconds[name], seconds[other])]
                row.setdefault("also_speedup_per_round", {})[other] = paired
                row.setdefault("also_speedup_median", {})[other] = statistics.median(paired)
        elif name in also:
            row["mean_layers"] = statistics.fmean(also[name][1])
            row["int8_recipe"] = getattr(also[name][0], "eek_int8_recipe", None)
        rows.append(row)
    result = {
        "command": "python -m benchmarks.suite.corpus_peers " + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_name(),
        "int8_isa": int8_isa(),
        "threads": args.threads,
        "rounds": args.rounds,
        "texts": len(texts),
        "batch": args.batch,
        "eek_mean_layers": statistics.fmean(layers),
        "num_layers": plain.config.num_hidden_layers,
        "eek_int8_recipe": getattr(model, "eek_int8_recipe", None),
        "versions": {p: _version(p) for p in ("torch", "onnxruntime", "openvino", "nncf", "transformers")},
        "peers": notes,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    for row in rows:
        ratio = f"  eek {row['eek_speedup_median']:.2f}x" if "eek_speedup_median" in row else ""
        ratio += "".join(f"  {other} {value:.2f}x" for other, value in row.get("also_speedup_median", {}).items())
        print(
            f"{row['name']:<22} {row['texts_per_s_median']:7.1f} texts/s (first pass {row['first_pass_texts_per_s']:.1f})"
            f"  agreement {row['agreement_with_fp32']:.4f}{ratio}"
        )
    print(f"eek mean layers {result['eek_mean_layers']:.2f} of {result['num_layers']}")
    return 0


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
