"""How far a validation-calibrated exit point moves on test, across head variants and seeds (issue 24).

Finished investigation: the best test point is 2.47-3.22 of 6 layers across variants and seeds, and the point
chosen on validation loses 1.5-3.2 points on test (docs/training.md, "Measured on the real task").

The real task (``make demo``'s MiniLM-L6 fine-tuned on Rotten Tomatoes, unpatched and frozen):
the frozen model runs once over the train, validation and test splits and records what mean-pooled
exit heads read at layers 1-5 (``cache_exit_inputs``); small heads are then trained on those
vectors alone (seconds each), in variants the package's ``head="mlp"`` does not all offer
(width, dropout, weight decay, loss: cross-entropy on the labels, self-distillation from the
final classifier, or half of each), with early stopping on the validation loss.

For each variant and seed, on ``Entropy`` candidates (the package's ``calibration.candidates``,
replayed with ``calibration.replay``):

- ``val z=0``: the fewest mean layers whose validation accuracy is at most 1 point below the
  full model's (what ``calibrate(max_drop=1.0)`` picks), and that threshold's test drop and layers;
- ``val z=1.645``: the same with a one-sided 95% bound on the validation drop (paired per-row
  differences, normal approximation) kept under 1 point;
- ``test oracle``: the fewest mean layers whose **test** accuracy is at most 1 point below the
  full model's (what the best threshold could reach on test; not a usable calibration).

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/archive/real_task_head_variants.py \\
        --output benchmarks/results/intel_xeon/real_task_training/head_variants.jsonl
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.candidates import candidates
from earlyexit_kernels.calibration.record import ExitRecord, accuracy, replay
from earlyexit_kernels.demo import real_task
from earlyexit_kernels.training.cached_heads import cache_exit_inputs

SPLITS = ("train", "validation", "test")
VARIANTS = [  # width, weight decay, loss, dropout
    (384, 0.01, "ce", 0.0),
    (384, 0.01, "distill", 0.0),
    (384, 0.01, "mix", 0.0),
    (64, 0.01, "ce", 0.0),
    (64, 0.01, "mix", 0.1),
    (384, 0.1, "mix", 0.1),
    (128, 0.05, "mix", 0.2),
]
SEED_VARIANTS = [(384, 0.01, "ce", 0.0), (384, 0.01, "distill", 0.0)]


def cached_vectors(batch_size: int = 64) -> dict:
    """``{split: (inputs [N, L-1, H], final_logits [N, C], labels [N])}`` of the frozen fine-tuned model."""
    model, tokenizer, _ = real_task.fine_tuned_minilm(progress=False)
    eek.patch(model, eek.Entropy(0.0), pooling="mean", head="mlp")
    splits = real_task.load_rotten_tomatoes()
    out = {}
    for name in SPLITS:
        split = splits[name]
        order = sorted(range(len(split)), key=lambda i: len(split.texts[i]))
        batches = []
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = dict(real_task.tokenize(tokenizer, [split.texts[i] for i in rows]))
            batch["labels"] = torch.tensor([split.labels[i] for i in rows])
            batches.append(batch)
        cache = cache_exit_inputs(model, batches)
        out[name] = (cache.inputs[:, :-1].clone(), cache.final_logits, cache.labels)
    return out


def train_heads(data: dict, width: int, weight_decay: float, loss: str, dropout: float, seed: int, epochs=30):
    """Heads of layers 1..L-1 trained on the cached vectors; early stopping (patience 3) on validation loss."""
    torch.manual_seed(seed)
    inputs, final, labels = data["train"]
    val_inputs, _, val_labels = data["validation"]
    hidden, layers = inputs.shape[-1], inputs.shape[1]
    heads = nn.ModuleList(
        nn.Sequential(
            nn.LayerNorm(hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(width, final.shape[-1]),
        )
        for _ in range(layers)
    )
    optimizer = torch.optim.AdamW(heads.parameters(), lr=1e-3, weight_decay=weight_decay)
    steps = epochs * -(-inputs.shape[0] // 32)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, (steps - s) / steps)
    )
    generator = torch.Generator().manual_seed(seed)
    best, best_state, worse, epochs_run = float("inf"), None, 0, 0
    for epochs_run in range(1, epochs + 1):  # noqa: B007 (the count is returned)
        heads.train()
        for rows in torch.randperm(inputs.shape[0], generator=generator).split(32):
            teacher = torch.softmax(final[rows], -1)
            total = 0.0
            for layer, head in enumerate(heads):
                logits = head(inputs[rows, layer])
                ce = nn.functional.cross_entropy(logits, labels[rows])
                kd = nn.functional.kl_div(torch.log_softmax(logits, -1), teacher, reduction="batchmean")
                total = total + {"ce": ce, "distill": kd, "mix": 0.5 * ce + 0.5 * kd}[loss]
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            schedule.step()
        heads.eval()
        with torch.no_grad():
            val_loss = sum(
                nn.functional.cross_entropy(head(val_inputs[:, k]), val_labels).item() for k, head in enumerate(heads)
            )
        if val_loss < best - 1e-4:
            best, best_state, worse = val_loss, copy.deepcopy(heads.state_dict()), 0
        else:
            worse += 1
            if worse >= 3:
                break
    heads.load_state_dict(best_state)
    return heads.eval(), epochs_run


@torch.no_grad()
def record(data: dict, heads, split: str) -> ExitRecord:
    inputs, final, labels = data[split]
    logits = [head(inputs[:, k]) for k, head in enumerate(heads)] + [final]
    return ExitRecord(torch.stack(logits), labels, None, None, eek.Entropy(0.0))


def points(rec: ExitRecord, policies) -> list[tuple[float, float, torch.Tensor]]:
    """``(accuracy, mean layers, correct [N])`` of every policy replayed on ``rec``."""
    out = []
    for policy in policies:
        result = replay(policy, rec)
        correct = (result.logits.float().argmax(-1) == rec.labels).float()
        out.append((correct.mean().item(), result.layers_run.float().mean().item(), correct))
    return out


def evaluate(val: ExitRecord, test: ExitRecord) -> dict:
    policies = candidates(val, count=120)
    full_val = (val.all_logits[-1].argmax(-1) == val.labels).float()
    full_test = accuracy(test.all_logits[-1].float(), test.labels)
    on_val, on_test = points(val, policies), points(test, policies)
    row = {"val_head_accuracy": [round(100 * accuracy(z.float(), val.labels), 1) for z in val.all_logits[:-1]]}
    for z in (0.0, 1.645):
        ok = []
        for i, (_, layers, correct) in enumerate(on_val):
            drop = full_val - correct
            bound = drop.mean().item() + z * drop.std().item() / len(drop) ** 0.5
            if bound <= 0.01 + 1e-12:
                ok.append((layers, i))
        layers, i = min(ok)
        test_accuracy, test_layers, _ = on_test[i]
        row[f"val z={z}"] = {
            "val_layers": round(layers, 2),
            "test_drop_points": round(100 * (test_accuracy - full_test), 2),
            "test_layers": round(test_layers, 2),
        }
    row["test oracle layers at <= 1 point"] = round(
        min(layers for acc, layers, _ in on_test if acc >= full_test - 0.01 - 1e-12), 2
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    data = cached_vectors()
    print(f"cached the exit inputs of {sum(d[0].shape[0] for d in data.values())} rows", flush=True)
    runs = [(v, 0) for v in VARIANTS] + [(v, s) for s in args.seeds if s != 0 for v in SEED_VARIANTS]
    rows = []
    for (width, weight_decay, loss, dropout), seed in runs:
        start = time.perf_counter()
        heads, epochs = train_heads(data, width, weight_decay, loss, dropout, seed)
        row = {"width": width, "weight_decay": weight_decay, "loss": loss, "dropout": dropout, "seed": seed}
        row |= {"epochs": epochs, "seconds": round(time.perf_counter() - start, 1)}
        row |= evaluate(record(data, heads, "validation"), record(data, heads, "test"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "command": f"python benchmarks/archive/real_task_head_variants.py --threads {args.threads} --seeds "
            + " ".join(map(str, args.seeds)),
            "seconds": round(time.perf_counter() - began, 1),
            "torch": torch.__version__,
        }
        args.output.write_text("\n".join(json.dumps(r) for r in [header, *rows]) + "\n")


if __name__ == "__main__":
    main()
