"""``python -m earlyexit_kernels.demo.report``: train exit heads on the package's synthetic task, then
compare early exit with the full model (``make demo`` runs the real-data demo, :mod:`.real_demo`).

Trains a small BERT with PABEE's weighted loss on :mod:`earlyexit_kernels.demo.task` (the
first run; it is saved under a cache folder, ``--cache-dir``, and later runs load it;
``--retrain`` trains again), classifies a held-out set with the full (unpatched) model and
with early exit under Patience, Entropy and MaxProb, and prints accuracy, mean layers run
and the wall-clock speed-up over the full model: paired passes at batch 32, the p50 and
p20-p80 of interleaved repetitions, next to the ideal the layers allow (6 / mean layers).
A speed-up beyond ``IDEAL_MARGIN`` times its ideal, or whose p20-p80 range is wider than
its distance from 1, is printed as noisy instead of as a result.

Then the held-out set as a stream: ``eek.classify`` (texts in) against Hugging Face's
``pipeline("text-classification", batch_size=32)`` on the unpatched model and against the
per-batch early exit, sequences/s in the same run.

Then the methods side by side: from the trained backbone, with fresh exit heads, each
method (PABEE, DeeBERT, FastBERT, PALBERT, ensemble voting, DACT, SmartBERT) trains
briefly with its own loss, its threshold is calibrated on a validation split (fewest
layers within 1 accuracy point of the full model, :mod:`earlyexit_kernels.training.calibrate_model`),
it is cached like the backbone, and it classifies the held-out set, timed like the rows
above. Runs on a CUDA GPU when there is one, else on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import math
import platform
import sys
import time
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from earlyexit_kernels._version import __version__
from earlyexit_kernels.demo.task import VOCAB_SIZE, batches, make_split
from earlyexit_kernels.engine.entry.classify import classify
from earlyexit_kernels.methods.policies import Entropy, MaxProb, Patience
from earlyexit_kernels.patching.loading import from_pretrained
from earlyexit_kernels.patching.patch import is_patched, patch, policy_of, unpatch
from earlyexit_kernels.patching.state import drop_detached_heads
from earlyexit_kernels.training.train import train_exit_heads

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
def predict(model, split, device) -> torch.Tensor:
    """The predicted class of every sequence of ``split``, at batch 32."""
    _, outputs = _timed_pass(model, split, device)
    return torch.cat([o.logits for o in outputs]).float().argmax(-1).cpu()


@torch.no_grad()
def classify_against_full(model, policy, split, device, repeats: int):
    """Predictions, exit layers and :class:`Speedup` of ``policy``; see :func:`classify_policies_against_full`."""
    return classify_policies_against_full(model, [policy], split, device, repeats)[0]


@torch.no_grad()
def classify_policies_against_full(model, policies, split, device, repeats: int):
    """Time the unpatched model and each policy in interleaved rounds on ``split``.

    Each round times one pass of the unpatched model, then one pass per policy; a policy's
    speed-up in a round is that round's full-model time over its own, so every ratio
    pairs passes a few seconds apart and the full model is timed once per round, not once
    per policy. A first round on two batches warms up every path and is not timed.
    Returns ``(predictions, layers_run, Speedup)`` per policy.
    """
    ratios = [[] for _ in policies]
    outputs = [None] * len(policies)
    for round_ in range(repeats + 1):
        part = _first_batches(split, 2) if round_ == 0 else split
        if is_patched(model):
            unpatch(model)
        full_time, _ = _timed_pass(model, part, device)
        for i, policy in enumerate(policies):
            patch(model, policy)
            method_time, outputs[i] = _timed_pass(model, part, device)
            if round_:
                ratios[i].append(full_time / method_time)
    results = []
    for i in range(len(policies)):
        pred = torch.cat([o.logits for o in outputs[i]]).float().argmax(-1).cpu()
        layers_run = torch.cat([o.layers_run for o in outputs[i]]).cpu()
        ideal = model.config.num_hidden_layers / layers_run.float().mean().item()
        results.append((pred, layers_run, Speedup(ratios[i], ideal)))
    return results


def _first_batches(split: dict, count: int) -> dict:
    return {k: v[: count * EVAL_BATCH] for k, v in split.items()}


# A measured speed-up may pass its ideal by this much: early exit also trims the padding of the
# rows that left (the demo's lengths vary from 16 to 32 tokens) and timers jitter by a few percent.
IDEAL_MARGIN = 1.10


@dataclass
class Speedup:
    """Paired speed-ups of interleaved repetitions and the ideal the layers allow."""

    ratios: list[float]
    ideal: float

    def quantile(self, q: float) -> float:
        ordered = sorted(self.ratios)
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    @property
    def noise(self) -> str | None:
        """Why the measurement cannot be trusted, or None."""
        p20, p50, p80 = (self.quantile(q) for q in (0.2, 0.5, 0.8))
        if p50 > self.ideal * IDEAL_MARGIN:
            return f"noisy: {p50:.2f}x is beyond the ideal {self.ideal:.2f}x"
        if p80 - p20 > abs(p50 - 1):
            return f"noisy: range {p20:.2f}-{p80:.2f}x is wider than the effect"
        return None

    def __str__(self) -> str:
        if self.noise:
            return self.noise
        return f"{self.quantile(0.5):.2f}x [{self.quantile(0.2):.2f}-{self.quantile(0.8):.2f}] of {self.ideal:.2f}x"


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
    parser.add_argument(
        "--cache-dir",
        help="where the trained models are kept (default: $XDG_CACHE_HOME or ~/.cache, earlyexit_kernels/demo)",
    )
    parser.add_argument("--retrain", action="store_true", help="train again even when the cache has the models")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # saving and loading the cached models
    report = io.StringIO()
    with redirect_stdout(_Tee(report)):
        run(args)
    if args.output:
        import transformers

        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        header = (
            f"# python -m earlyexit_kernels.demo.report {' '.join(sys.argv[1:] if argv is None else argv)}, {stamp}\n"
            f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, earlyexit_kernels {__version__}\n"
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


#: the cache folder of the methods side by side, named after their training recipe (a new
#: recipe trains them again): r2, halting heads and gates at their own learning rate, DACT
#: 10 epochs at tau 0.1
METHODS_RECIPE = "methods-r2"
#: DACT's ponder weight and epochs here (its 32 steps per epoch are few: at 3 epochs it ran
#: 4.0-4.2 layers, at 10 epochs and tau 0.1 1.7 layers at 99.9%; the exit-quality run
#: trains several tau on 96 steps per epoch)
METHOD_LOSS_KWARGS = {"dact": {"tau": 0.1}}
METHOD_EPOCHS = {"dact": 10}


def cache_dir(args) -> Path:
    """Where the trained models of this configuration live: one folder per (version, seed, sizes)."""
    import os

    root = Path(args.cache_dir) if args.cache_dir else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    if not args.cache_dir:
        root = root / "earlyexit_kernels" / "demo"
    key = (
        f"v{__version__}-seed{args.seed}-train{args.train_size}-epochs{args.epochs}"
        f"-methods{args.method_train_size}-val{args.val_size}"
    )
    return root / key


def _trained_base(args, device, train_batches):
    """The backbone and exit heads trained with PABEE's loss, from the cache or trained and cached."""
    folder = cache_dir(args) / "base"
    if (folder / "early_exit_config.json").is_file() and not args.retrain:
        model = from_pretrained(folder).to(device)
        print(f"loaded the trained backbone and exit heads from {folder}")
        return model
    model = build_model(device, args.seed)
    patch(model, Patience(2))
    start = time.perf_counter()
    losses = train_exit_heads(model, train_batches, method="pabee", epochs=args.epochs, lr=1e-3)
    print(
        f"trained backbone and exit heads (PABEE loss) in {time.perf_counter() - start:.0f} s, final loss "
        f"{losses[-1]:.3f}; saved to {folder} (later runs load it; --retrain trains again)"
    )
    model.eval().save_pretrained(folder)
    return model


def run(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    train = make_split(args.train_size, seed=args.seed)
    test = make_split(args.test_size, seed=args.seed + 1)
    train_batches = [{k: v.to(device) for k, v in b.items()} for b in batches(train, 32, shuffle_seed=args.seed)]
    model = _trained_base(args, device, train_batches).eval()
    base = copy.deepcopy(model)  # the trained backbone, for the methods side by side

    unpatch(model)
    full_pred = predict(model, test, device)
    labels, hard = test["labels"], test["hard"]
    rows = [("full model", full_pred, torch.full_like(labels, model.config.num_hidden_layers), None)]
    policies = [
        Patience(1),
        Patience(2),
        Entropy(0.05),
        Entropy(0.2),
        MaxProb(0.99),
        MaxProb(0.9),
    ]
    timed = classify_policies_against_full(model, policies, test, device, args.repeats)
    for policy, (pred, exit_layer, speedup) in zip(policies, timed, strict=True):
        rows.append((_describe(policy), pred, exit_layer, speedup))

    _print_table(rows, labels, hard)
    print(
        f"\nlayers: mean layers run (of 6). speed-up: full model time / this method's, paired passes at batch "
        f"{EVAL_BATCH}, p50 [p20-p80] of {args.repeats} interleaved repetitions, of the ideal (6 / layers); "
        f"'noisy' where the range is wider than the effect or the p50 beyond {IDEAL_MARGIN:.2f} x the ideal."
    )
    _stream(model, test, device, args)
    if not args.no_methods:
        unpatch(base)
        drop_detached_heads(base)
        _methods_side_by_side(base, train_batches, test, device, args)


STREAM_POLICY = Entropy(0.2)


def _stream(model, test, device, args) -> None:
    """The held-out set as a stream: eek.classify against the pipeline and the per-batch early exit."""
    from transformers import pipeline

    from earlyexit_kernels.demo.task import texts, tokenizer

    tok, text = tokenizer(), texts(test)
    patch(model, STREAM_POLICY)
    lengths = test["attention_mask"].sum(1)
    padded = sum(len(chunk) * int(chunk.max()) for chunk in lengths.split(EVAL_BATCH))

    def hugging_face_pipeline():
        unpatch(model)
        try:
            return pipeline("text-classification", model=model, tokenizer=tok, device=device)(
                text, batch_size=EVAL_BATCH
            )
        finally:
            patch(model, STREAM_POLICY)

    def per_batch():
        return _timed_pass(model, test, device)[1]

    def stream():
        return list(classify(model, text, tokenizer=tok, max_batch_size=EVAL_BATCH))

    runners = {"pipeline, full model": hugging_face_pipeline, "per-batch early exit": per_batch, "eek.classify": stream}
    times = {name: [] for name in runners}
    results = {}
    with torch.no_grad():
        for round_ in range(args.repeats + 1):
            for name, fn in runners.items():
                _sync(device)
                start = time.perf_counter()
                results[name] = fn()
                _sync(device)
                if round_:
                    times[name].append(time.perf_counter() - start)
    streamed = results["eek.classify"]
    layers = sum(p.exit_layer for p in streamed) / len(streamed)
    pred = torch.tensor([int(p.logits.argmax()) for p in streamed])
    accuracy = 100 * (pred == test["labels"]).float().mean().item()
    # Ideal against the pipeline: the layers saved and the padding its batches carry that the stream's need not.
    ideal = model.config.num_hidden_layers / layers * padded / int(lengths.sum())
    print(
        f"\nthe held-out set as a stream, policy {STREAM_POLICY!r}: accuracy {accuracy:.1f}%, mean {layers:.2f} "
        f"layers; sequences/s, p50 [p20-p80] of {args.repeats} interleaved repetitions, texts in, labels out"
    )
    reference = times["pipeline, full model"]
    for name, samples in times.items():
        rate = Speedup([len(text) / t for t in samples], ideal=math.inf)  # its quantiles
        speedup = Speedup([r / t for r, t in zip(reference, samples)], ideal if name != "pipeline, full model" else 1.0)
        vs = "" if name == "pipeline, full model" else f"  vs pipeline {speedup}"
        print(f"  {name:<22}{rate.quantile(0.5):>8.0f}/s [{rate.quantile(0.2):.0f}-{rate.quantile(0.8):.0f}]{vs}")
    print(
        f"  (per-batch early exit: token ids in, batches of {EVAL_BATCH} as in the table; eek.classify: "
        f"the continuous engine, layer calls of up to {EVAL_BATCH} rows; ideal vs pipeline "
        f"{ideal:.2f}x = 6 / layers x the pipeline's padding)"
    )


def _methods_side_by_side(base, train_batches, test, device, args) -> None:
    from earlyexit_kernels.calibration.candidates import describe
    from earlyexit_kernels.training.calibrate_model import calibrate
    from earlyexit_kernels.training.method_training import TRAINING_POLICIES, train_method

    val = make_split(args.val_size, seed=args.seed + 2)
    val_batches = [{k: v.to(device) for k, v in b.items()} for b in batches(val, 128)]
    method_batches = train_batches[: max(1, args.method_train_size // 32)]
    start = time.perf_counter()
    rows = []
    cached = 0
    for method in TRAINING_POLICIES:
        folder = cache_dir(args) / METHODS_RECIPE / method
        if (folder / "early_exit_config.json").is_file() and not args.retrain:
            model = from_pretrained(folder).to(device).eval()
            met = (folder / "target_met").read_text() == "yes"
            cached += 1
        else:
            model = train_method(
                method,
                base,
                method_batches,
                epochs=METHOD_EPOCHS.get(method, 1),
                lr=5e-4,
                heads_lr=3e-3,
                loss_kwargs=METHOD_LOSS_KWARGS.get(method),
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a target not met is marked in the table
                result = calibrate(model, val_batches, max_drop=1.0)
            patch(model, result.policy)
            model.save_pretrained(folder)
            met = result.met
            (folder / "target_met").write_text("yes" if met else "no")
        policy = policy_of(model)
        pred, layers, speedup = classify_against_full(model, policy, test, device, args.method_repeats)
        rows.append((f"{method}: {describe(policy)}{'' if met else ' *'}", pred, layers, speedup))
    origin = (
        "loaded from the cache"
        if cached == len(TRAINING_POLICIES)
        else f"trained {len(method_batches)} steps (DACT {len(method_batches) * METHOD_EPOCHS['dact']}) from the backbone"
    )
    print(
        f"\nmethods side by side: each {origin} with fresh heads, calibrated on {args.val_size} validation "
        f"sequences (fewest layers within 1 point of the full model); {time.perf_counter() - start:.0f} s"
    )
    _print_table(rows, test["labels"], test["hard"], width=46)
    print("\n*: no threshold was within 1 point of the full model on the validation split (the closest is shown).")
    print("speed-up: against the method's own model without early exit (the jointly trained methods moved it).")
    print(
        "DeeBERT, FastBERT and SmartBERT share the backbone above. More in docs/benchmarks.md, 'Exit quality' "
        "(python -m benchmarks.suite.exit_quality)."
    )


def _print_table(rows, labels, hard, width: int = 22) -> None:
    header = f"{'method':<{width}}{'accuracy':>9}{'easy':>7}{'hard':>7}{'layers':>8}{'easy':>6}{'hard':>6}   speed-up"
    print(f"\nheld-out set: {len(labels)} sequences ({int(hard.sum())} hard), batch {EVAL_BATCH}")
    print(header)
    print("-" * (len(header) + 24))
    for name, pred, exit_layer, speedup in rows:
        correct = (pred == labels).float()
        layers = exit_layer.float()
        print(
            f"{name:<{width}}{100 * correct.mean():>8.1f}%{100 * correct[~hard].mean():>6.1f}%{100 * correct[hard].mean():>6.1f}%"
            f"{layers.mean():>8.2f}{layers[~hard].mean():>6.2f}{layers[hard].mean():>6.2f}   "
            f"{'1.00x (reference)' if speedup is None else speedup}"
        )


def _describe(policy) -> str:
    if isinstance(policy, Patience):
        return f"Patience({policy.patience})"
    if isinstance(policy, Entropy):
        return f"Entropy({policy.threshold:g})"
    return f"MaxProb({policy.threshold:g})"


if __name__ == "__main__":
    main()
