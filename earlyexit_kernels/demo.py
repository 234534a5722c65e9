"""``make demo``: train exit heads on the package's task, then compare early exit with the full model.

Trains a small BERT with PABEE's weighted loss on :mod:`earlyexit_kernels.demo_task`,
classifies a held-out set with the full (unpatched) model and with early exit under
Patience, Entropy and MaxProb, and prints accuracy, mean layers run and the
wall-clock speed-up over the full model, all measured in this run at batch 32.

Then the methods side by side: from the trained backbone, with fresh exit heads, each
method (PABEE, DeeBERT, FastBERT, PALBERT, ensemble voting, DACT, SmartBERT) trains
briefly with its own loss, its threshold is calibrated on a validation split (fewest
layers within 1 accuracy point of the full model, :mod:`earlyexit_kernels.calibration`),
and it classifies the held-out set, timed like the rows above.
Runs on a CUDA GPU when there is one, else on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import platform
import statistics
import sys
import time
import warnings
from contextlib import redirect_stdout

import torch
from transformers import BertConfig, BertForSequenceClassification

import earlyexit_kernels as eek

from .demo_task import VOCAB_SIZE, batches, make_split
from .training import train_exit_heads

EVAL_BATCH = 32


def build_model(device: torch.device, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification._from_config(config, attn_implementation="sdpa").to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def classify(model, split, device, repeats: int):
    """Predictions, exit layers and the median wall-clock time over ``repeats`` passes at batch 32."""
    times, outputs = [], None
    for _ in range(repeats + 1):  # the first pass warms up
        elapsed, outputs = _timed_pass(model, split, device)
        times.append(elapsed)
    logits = torch.cat([o.logits for o in outputs]).float().cpu()
    num_layers = model.config.num_hidden_layers
    layers_run = torch.cat(
        [o.layers_run if "layers_run" in o else torch.full((len(o.logits),), num_layers) for o in outputs]
    )
    return logits.argmax(-1), layers_run.cpu(), statistics.median(times[1:])


@torch.no_grad()
def classify_against_full(model, policy, split, device, repeats: int):
    """Like :func:`classify` for ``policy``, timing each pass right after one of the unpatched model.

    Returns predictions, exit layers, and the median times of the method's and of the full
    model's passes (after one warm-up pass of each).
    """
    method_times, full_times = [], []
    for round_ in range(repeats + 1):
        if eek.is_patched(model):
            eek.unpatch(model)
        full_time, _ = _timed_pass(model, split, device)
        eek.patch(model, policy)
        method_time, outputs = _timed_pass(model, split, device)
        if round_:
            full_times.append(full_time)
            method_times.append(method_time)
    pred = torch.cat([o.logits for o in outputs]).float().argmax(-1).cpu()
    layers_run = torch.cat([o.layers_run for o in outputs]).cpu()
    return pred, layers_run, statistics.median(method_times), statistics.median(full_times)


def _timed_pass(model, split, device):
    chunks = [{k: v.to(device) for k, v in b.items()} for b in batches(split, EVAL_BATCH)]
    _sync(device)
    start = time.perf_counter()
    outputs = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]) for b in chunks]
    _sync(device)
    return time.perf_counter() - start, outputs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=6144)
    parser.add_argument("--test-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method-train-size", type=int, default=1024, help="examples each method trains on")
    parser.add_argument("--val-size", type=int, default=512, help="validation split for the calibration")
    parser.add_argument("--method-repeats", type=int, default=3)
    parser.add_argument("--no-methods", action="store_true", help="skip the methods side by side")
    parser.add_argument("--output", help="also write the report to this file, with the date and versions")
    args = parser.parse_args(argv)
    report = io.StringIO()
    with redirect_stdout(_Tee(report)):
        run(args)
    if args.output:
        import transformers

        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        header = (
            f"# python -m earlyexit_kernels.demo {' '.join(sys.argv[1:] if argv is None else argv)}, {stamp}\n"
            f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, earlyexit_kernels {eek.__version__}\n"
        )
        with open(args.output, "w") as f:
            f.write(header + report.getvalue())


class _Tee(io.TextIOBase):
    def __init__(self, copy: io.StringIO):
        self.console, self.copy = sys.stdout, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        self.console.flush()


def run(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    train = make_split(args.train_size, seed=args.seed)
    test = make_split(args.test_size, seed=args.seed + 1)

    model = build_model(device, args.seed)
    eek.patch(model, eek.Patience(2))
    start = time.perf_counter()
    train_batches = [{k: v.to(device) for k, v in b.items()} for b in batches(train, 32, shuffle_seed=args.seed)]
    losses = train_exit_heads(
        model,
        train_batches,
        method="pabee",
        epochs=args.epochs,
        lr=1e-3,
    )
    print(
        f"trained backbone and exit heads (PABEE loss) in {time.perf_counter() - start:.0f} s, final loss {losses[-1]:.3f}"
    )
    model.eval()
    base = copy.deepcopy(model)  # the trained backbone, for the methods side by side

    eek.unpatch(model)
    full_pred, _, full_time = classify(model, test, device, args.repeats)
    labels, hard = test["labels"], test["hard"]
    rows = [("full model", full_pred, torch.full_like(labels, model.config.num_hidden_layers), full_time)]
    policies = [
        eek.Patience(1),
        eek.Patience(2),
        eek.Patience(3),
        eek.Entropy(0.05),
        eek.Entropy(0.2),
        eek.Entropy(0.4),
        eek.MaxProb(0.99),
        eek.MaxProb(0.95),
        eek.MaxProb(0.9),
    ]
    for policy in policies:
        pred, exit_layer, elapsed, full_paired = classify_against_full(model, policy, test, device, args.repeats)
        # Report the ratio to the full-model passes interleaved with this method's, which
        # cancels drifts of the machine's speed during the run, on the full model's scale.
        rows.append((_describe(policy), pred, exit_layer, elapsed * full_time / full_paired))

    _print_table(rows, labels, hard, full_time)
    print("\nlayers: mean layers run (of 6); speed-up: wall-clock time of the full model / this method, same run.")
    if not args.no_methods:
        eek.unpatch(base)
        vars(base).pop("_eek_detached_heads", None)
        _methods_side_by_side(base, train_batches, test, full_time, device, args)


def _methods_side_by_side(base, train_batches, test, full_time, device, args) -> None:
    from .calibration import calibrate, describe
    from .exit_quality import METHODS, train_method

    val = make_split(args.val_size, seed=args.seed + 2)
    val_batches = [{k: v.to(device) for k, v in b.items()} for b in batches(val, 128)]
    method_batches = train_batches[: max(1, args.method_train_size // 32)]
    start = time.perf_counter()
    rows = []
    for method in METHODS:
        model = train_method(method, base, method_batches, epochs=1, lr=5e-4, heads_lr=3e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a target not met is marked in the table
            result = calibrate(model, val_batches, max_drop=1.0)
        eek.patch(model, result.policy)
        pred, layers, elapsed = classify(model, test, device, args.method_repeats)
        rows.append((f"{method}: {describe(result.policy)}{'' if result.met else ' *'}", pred, layers, elapsed))
    print(
        f"\nmethods side by side: each trained {len(method_batches)} steps from the backbone above with fresh heads, "
        f"calibrated on {args.val_size} validation sequences (fewest layers within 1 point of the full model); "
        f"{time.perf_counter() - start:.0f} s"
    )
    _print_table(rows, test["labels"], test["hard"], full_time, width=46)
    print("\n*: no threshold was within 1 point of the full model on the validation split (the closest is shown).")
    print("full model: the unpatched model timed above; DeeBERT, FastBERT and SmartBERT share its backbone,")
    print(
        "the jointly trained methods moved it. More in README, 'Exit quality' (python -m earlyexit_kernels.exit_quality)."
    )


def _print_table(rows, labels, hard, full_time, width: int = 22) -> None:
    header = (
        f"{'method':<{width}}{'accuracy':>9}{'easy':>7}{'hard':>7}{'layers':>8}{'easy':>6}{'hard':>6}{'speed-up':>10}"
    )
    print(f"\nheld-out set: {len(labels)} sequences ({int(hard.sum())} hard), batch {EVAL_BATCH}")
    print(header)
    print("-" * len(header))
    for name, pred, exit_layer, elapsed in rows:
        correct = (pred == labels).float()
        layers = exit_layer.float()
        print(
            f"{name:<{width}}{100 * correct.mean():>8.1f}%{100 * correct[~hard].mean():>6.1f}%{100 * correct[hard].mean():>6.1f}%"
            f"{layers.mean():>8.2f}{layers[~hard].mean():>6.2f}{layers[hard].mean():>6.2f}{full_time / elapsed:>9.2f}x"
        )


def _describe(policy) -> str:
    if isinstance(policy, eek.Patience):
        return f"Patience({policy.patience})"
    if isinstance(policy, eek.Entropy):
        return f"Entropy({policy.threshold:g})"
    return f"MaxProb({policy.threshold:g})"


if __name__ == "__main__":
    main()
