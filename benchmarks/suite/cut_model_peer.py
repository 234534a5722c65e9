"""The peer a user would pick instead of early exit: the same model cut to k layers, fine-tuned.

    python -m benchmarks.suite.cut_model_peer --threads 2 \\
        --output benchmarks/results/amd_epyc/cut_model_peer_cpu.json --readme docs/benchmarks.md

A smaller model is the plain answer to "the model is too slow": keep the first k of the
pre-trained model's L layers and fine-tune that. Each peer here is the backbone
(``--backbone``: all-MiniLM-L6-v2, or the 12-layer all-mpnet-base-v2 with ``mpnet``) cut to
k = 1 … L-1 layers and fine-tuned with the demo's recipe and data
(:func:`earlyexit_kernels.demo.real_task.fine_tune`: one epoch of the Rotten Tomatoes train
split, AdamW at 5e-5, batches of 32), with two heads:

- ``model``: the model's own head (the [CLS] pooler and a linear classifier), as its
  ``*ForSequenceClassification`` with ``num_hidden_layers=k``;
- ``mean``: the masked mean of the last layer's tokens and a linear classifier (how both
  sentence-transformers models were pre-trained).

Its test accuracy at k runs k layers for every sequence, so it sits beside early exit's curve
at k mean layers (``benchmarks/results/intel_xeon/real_task_cpu.csv``, or ``real_task_mpnet_cpu.csv`` for
MPNet: every method of :mod:`benchmarks.suite.real_task_quality`). Each peer is written to the JSON as soon as it
is trained, and a rerun skips the peers already there (``--redo`` trains them again).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.suite.markdown_sections import replace_section

__all__ = ["HEADS", "MeanPooledClassifier", "cut_model", "train_peer", "render_markdown", "update_readme", "main"]

HEADS = ("model", "mean")
#: per backbone: the peers' JSON, early exit's curves, the section's markers and title
DEFAULTS = {
    "minilm": (
        "benchmarks/results/amd_epyc/cut_model_peer_cpu.json",
        "benchmarks/results/intel_xeon/real_task_cpu.csv",
        "cut-model-peer",
        "Early exit against a smaller model (cut and fine-tuned)",
    ),
    "mpnet": (
        "benchmarks/results/amd_epyc/cut_model_peer_mpnet_cpu.json",
        "benchmarks/results/amd_epyc/real_task_mpnet_cpu.csv",
        "cut-model-peer-mpnet",
        "MPNet-base against a smaller MPNet (cut and fine-tuned)",
    ),
}
DEFAULT_JSON, REAL_TASK_CSV = DEFAULTS["minilm"][:2]
EVAL_BATCH = 64


class MeanPooledClassifier(nn.Module):
    """A linear classifier on the masked mean of ``encoder``'s last hidden states.

    ``forward(input_ids [B, T], attention_mask [B, T], token_type_ids [B, T], labels [B])``
    returns an object with ``logits`` [B, C] and, with labels, ``loss`` (cross-entropy).
    """

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        config = encoder.config
        self.encoder = encoder
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=config.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        from types import SimpleNamespace

        from earlyexit_kernels.models.base import masked_mean

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}  # MPNet takes none
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        pooled = masked_mean(hidden, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


def cut_model(layers: int, head: str, seed: int = 0, backbone: str = "minilm") -> nn.Module:
    """The pre-trained ``backbone`` with its first ``layers`` layers and ``head`` (``"model"`` or ``"mean"``), untrained head."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from earlyexit_kernels.demo.real_task import LABELS, backbone_path

    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}; got {head!r}")
    torch.manual_seed(seed)
    if head == "model":
        return AutoModelForSequenceClassification.from_pretrained(
            backbone_path(backbone),
            num_hidden_layers=layers,
            num_labels=len(LABELS),
            id2label=dict(enumerate(LABELS)),
            label2id={name: i for i, name in enumerate(LABELS)},
        )
    encoder = AutoModel.from_pretrained(backbone_path(backbone), num_hidden_layers=layers, add_pooling_layer=False)
    return MeanPooledClassifier(encoder, len(LABELS))


@torch.no_grad()
def accuracy(model: nn.Module, tokenizer, split, max_length: int) -> float:
    """The share of ``split``'s rows whose argmax matches the label (length-sorted batches)."""
    from earlyexit_kernels.demo.real_task import tokenize

    model.eval()
    order = sorted(range(len(split)), key=lambda i: len(split.texts[i]))
    right = 0
    for start in range(0, len(order), EVAL_BATCH):
        rows = order[start : start + EVAL_BATCH]
        batch = tokenize(tokenizer, [split.texts[i] for i in rows], max_length)
        predicted = model(**batch).logits.argmax(-1)
        right += int((predicted == torch.tensor([split.labels[i] for i in rows])).sum())
    return right / len(split)


def train_peer(layers: int, head: str, splits, tokenizer, recipe, backbone: str = "minilm") -> dict:
    """Cut, fine-tune and score one peer; returns its row (accuracies on validation and test, seconds)."""
    from earlyexit_kernels.demo.real_task import fine_tune

    started = time.perf_counter()
    model = cut_model(layers, head, recipe.seed, backbone)
    fine_tune(model, tokenizer, splits["train"], recipe)
    seconds = time.perf_counter() - started
    return {
        "layers": layers,
        "head": head,
        "validation_accuracy": accuracy(model, tokenizer, splits["validation"], recipe.max_length),
        "test_accuracy": accuracy(model, tokenizer, splits["test"], recipe.max_length),
        "train_rows": len(splits["train"]),
        "fine_tune_seconds": seconds,
    }


def _environment(argv: list[str], seconds: float) -> str:
    import transformers

    from earlyexit_kernels.bench.results import cpu_name

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"python -m benchmarks.suite.cut_model_peer {' '.join(argv)}, {stamp}; {cpu_name()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {seconds:.0f} s, load average {os.getloadavg()[0]:.1f} at the end"
    )


def _curves(csv_path: str) -> tuple[dict[str, list[dict]], dict[int, float], tuple[float | None, int]]:
    """Early exit's test curves per run, the static cut of the first run, the full model's accuracy and depth."""
    from benchmarks.suite.real_task_quality import _read_csv, depth_of, operating_rows

    _, rows = _read_csv(csv_path)
    operating = operating_rows(rows)
    curves = {r["run"]: [c for c in rows if c["kind"] == "curve" and c["run"] == r["run"]] for r in operating}
    first = operating[0] if operating else None
    static = {
        int(r["layer"]): float(r["accuracy"])
        for r in rows
        if first is not None and r["kind"] == "static" and r["run"] == first["run"]
    }
    full = float(first["full_accuracy"]) if first is not None else None
    return curves, static, (full, depth_of(rows))


def render_markdown(json_path: str, csv_path: str = REAL_TASK_CSV) -> str:
    """The section of ``docs/benchmarks.md``: each peer's test accuracy beside early exit's curve at k mean layers."""
    from benchmarks.suite.real_task_quality import _curve_at, _pct

    data = json.loads(Path(json_path).read_text())
    peers = {(p["layers"], p["head"]): p for p in data["peers"]}
    layers = sorted({k for k, _ in peers})
    curves, static, (full, depth) = _curves(csv_path) if Path(csv_path).is_file() else ({}, {}, (None, None))
    lines = [
        f"Generated from `{json_path}` by `python -m benchmarks.suite.cut_model_peer` (the peers) and "
        f"`{csv_path}` (early exit's test curves, `real_task_quality`), run as:",
        "",
        "```",
        *data["runs"],
        "```",
        "",
        "Test accuracy on the 2,500 test snippets. A peer at k runs k layers for every sequence; an early-exit "
        "column is the best accuracy its method reaches within k mean layers on its test curve. "
        + (f"The full {depth}-layer model scores {_pct(full)}." if full is not None else ""),
        "",
    ]
    names = list(curves)
    first = next(iter(curves), None)
    header = [
        "k",
        "cut + fine-tuned (model head)",
        "cut + fine-tuned (mean head)",
        f"static cut ({first}, exit head k)",
    ]
    header += [f"early exit: {name}" for name in names]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k in layers:
        cells = [str(k)]
        cells += [_pct(peers[(k, h)]["test_accuracy"]) if (k, h) in peers else "–" for h in HEADS]
        cells.append(_pct(static.get(k)))
        cells += [_pct(_curve_at(curves[name], k)) for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    seconds = ", ".join(f"k={p['layers']} {p['head']} {p['fine_tune_seconds']:.0f} s" for p in data["peers"])
    lines += ["", f"Fine-tuning took (one epoch of {data['peers'][0]['train_rows']} rows each): {seconds}."]
    beaten = _beaten(peers, curves, layers)
    if beaten:
        lines += ["", "Where the better peer beats an early-exit method at its number of layers:", ""]
        lines += [f"- {name}: " + "; ".join(cells) for name, cells in beaten.items()]
    return "\n".join(lines) + "\n"


def _beaten(peers, curves, layers) -> dict[str, list[str]]:
    from benchmarks.suite.real_task_quality import _curve_at

    found: dict[str, list[str]] = {}
    for name, curve in curves.items():
        for k in layers:
            best_peer = max((peers[(k, h)]["test_accuracy"] for h in HEADS if (k, h) in peers), default=None)
            ours = _curve_at(curve, k)
            if best_peer is not None and (ours is None or best_peer > ours):
                shown = "no threshold runs that few layers" if ours is None else f"{100 * ours:.2f}%"
                found.setdefault(name, []).append(f"k = {k} ({shown}; the peer {100 * best_peer:.2f}%)")
    return found


def update_readme(readme: str, json_path: str, csv_path: str = REAL_TASK_CSV, backbone: str = "minilm") -> None:
    """Rewrite ``backbone``'s section between its markers in ``readme`` (appended at the end when missing)."""
    _, _, mark, title = DEFAULTS[backbone]
    start, end = f"<!-- {mark}:start -->", f"<!-- {mark}:end -->"
    text = Path(readme).read_text()
    flag = "" if backbone == "minilm" else f" --backbone {backbone}"
    note = f"<!-- generated by python -m benchmarks.suite.cut_model_peer{flag} --from-json {json_path} -->"
    section = f"{start}\n{note}\n\n{render_markdown(json_path, csv_path)}\n{end}"
    Path(readme).write_text(replace_section(text, start, end, section, title))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm", choices=tuple(DEFAULTS), help="the model cut (default: minilm)")
    parser.add_argument("--output", help=f"JSON of the peers (default: {DEFAULT_JSON}, or the backbone's)")
    parser.add_argument("--readme", help="rewrite the backbone's cut-model-peer section of this Markdown file")
    parser.add_argument("--from-json", help="only regenerate the section from this JSON (needs --readme)")
    parser.add_argument("--curves", help=f"early exit's curves (default: {REAL_TASK_CSV}, or the backbone's)")
    parser.add_argument("--layers", type=int, nargs="+", help="the k to train (default: 1 … L-1)")
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--redo", action="store_true", help="train again the peers already in --output")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    default_json, default_csv, _, _ = DEFAULTS[args.backbone]
    args.output, args.curves = args.output or default_json, args.curves or default_csv
    if args.from_json:
        if not args.readme:
            parser.error("--from-json needs --readme")
        update_readme(args.readme, args.from_json, args.curves, args.backbone)
        return

    from transformers import AutoConfig, AutoTokenizer

    from earlyexit_kernels.demo.real_task import FineTuneRecipe, backbone_path, load_rotten_tomatoes

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    recipe = FineTuneRecipe()
    depth = AutoConfig.from_pretrained(backbone_path(args.backbone)).num_hidden_layers
    layers = args.layers or list(range(1, depth))
    if any(not 1 <= k < depth for k in layers):
        parser.error(f"--layers must lie in 1 … {depth - 1} (the model has {depth})")
    path = Path(args.output)
    data = json.loads(path.read_text()) if path.is_file() else {"runs": [], "recipe": vars(recipe), "peers": []}
    done = {(p["layers"], p["head"]) for p in data["peers"]}
    tokenizer = AutoTokenizer.from_pretrained(backbone_path(args.backbone))
    splits = load_rotten_tomatoes(recipe.seed)
    data["runs"].append("")
    for k in layers:
        for head in args.heads:
            if (k, head) in done and not args.redo:
                continue
            row = train_peer(k, head, splits, tokenizer, recipe, args.backbone)
            data["peers"] = [p for p in data["peers"] if (p["layers"], p["head"]) != (k, head)] + [row]
            data["peers"].sort(key=lambda p: (p["layers"], HEADS.index(p["head"])))
            data["runs"][-1] = _environment(argv, time.perf_counter() - started)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1) + "\n")
            print(
                f"k={k} {head:<5} test {100 * row['test_accuracy']:.2f}% validation "
                f"{100 * row['validation_accuracy']:.2f}% ({row['fine_tune_seconds']:.0f} s)",
                flush=True,
            )
    if not data["runs"][-1]:
        data["runs"].pop()
    if args.readme and data["peers"]:
        update_readme(args.readme, str(path), args.curves, args.backbone)


if __name__ == "__main__":
    main()
