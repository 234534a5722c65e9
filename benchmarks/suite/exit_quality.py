"""Exit quality of every method on the package's task: accuracy against mean layers, and the static baseline.

    python -m benchmarks.suite.exit_quality --output benchmarks/results/unknown_cpu/exit_quality_cpu.csv \\
        --plot benchmarks/results/unknown_cpu/exit_quality_cpu.png --readme docs/benchmarks.md

A 6-layer BERT (hidden 128, as in ``make demo``) is first fine-tuned once with PABEE's
loss (``--base-method``; in a one-thread run with ``CE_L`` alone, DeeBERT's stage 1, this
small model stayed near 73% on the task with the same data and epochs, against about 85%
with PABEE's loss: deep supervision helps it learn the hard examples). Its internal heads are then thrown away: every method starts from that
backbone with fresh heads (initialised from the final classifier) and trains with its
own loss (:mod:`earlyexit_kernels.methods.losses`):

=========  ==========================================  ===========================
method     training from the checkpoint                 exit policy (its knob)
=========  ==========================================  ===========================
pabee      PABEE loss, backbone and heads jointly       Patience (patience)
deebert    stage 2: heads on sum_{i<L} CE_i, frozen     Entropy (threshold)
fastbert   self-distillation of the heads, frozen       Entropy normalized (threshold)
palbert    PonderNet loss, jointly, Lambda head         QExit (q)
ensemble   sum_i CE_i + diversity, jointly              Voting (min votes)
dact       DACT loss, jointly, 3 epochs, once per tau    DACT (none: tau is the knob)
smartbert  stage 1 backbone + gates, then stage 2       SkipGates (entropy threshold)
=========  ==========================================  ===========================

Halting heads and gates train at their own learning rate (``--halting-lr``, the default
of :func:`~earlyexit_kernels.training.train.train_exit_heads`). DACT has no inference knob: it
trades accuracy for layers through the ponder weight ``tau`` of its loss, so it is trained
once per ``--dact-taus`` value (rows ``dact(tau=...)``) and its curve joins those points.

For every method every candidate value of its knob is replayed on the recorded exits of
the held-out test split (:mod:`earlyexit_kernels.training.calibrate_model`): the accuracy-vs-mean-layers
curve. The static baseline is the same model cut after layer ``k`` for every sequence
(the accuracy of head ``k``), interpolated linearly at the curve's mean layers; a point
*beats* it when its accuracy is higher at equal mean layers. The operating point of each
method is calibrated on a separate validation split (fewest layers with at most
``--max-drop`` points below the full model) and then measured on the test split.

The label check: on this task easy sequences are easy whatever their label, so their mean
exit layer should not depend on it; the table flags a method whose easy sequences of one
label exit more than ``LABEL_GAP_FLAG`` (half a layer) later than those of the other.

The CSV holds one row per curve point (``kind=curve``), per static cut (``kind=static``)
and per operating point (``kind=operating``); ``--readme`` rewrites the table between the
``exit-quality`` markers of a Markdown file (``docs/benchmarks.md``) from that CSV (``--from-csv`` does only that).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import time

import torch

from earlyexit_kernels._version import __version__
from earlyexit_kernels.calibration.candidates import candidates, plot_curve
from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.calibration.select import accuracy_curve, interpolate_baseline, static_baseline
from earlyexit_kernels.demo.task import batches, make_split
from earlyexit_kernels.methods.policies import Patience
from earlyexit_kernels.methods.policy_spec import parse_policy
from earlyexit_kernels.patching.patch import patch, unpatch
from earlyexit_kernels.patching.state import drop_detached_heads
from earlyexit_kernels.training.calibrate_model import calibrate, record_exits
from earlyexit_kernels.training.method_training import TRAINING_POLICIES, train_method
from earlyexit_kernels.training.train import HALTING_LR, train_exit_heads

__all__ = ["METHODS", "DACT_TAUS", "train_method", "train_base", "evaluate_method", "runs_of", "main"]
#: the methods this benchmark trains side by side: those with a paper's own training (``heads`` and
#: ``joint`` are the package's recipes, compared in docs/training.md)
METHODS = tuple(TRAINING_POLICIES)

#: DACT's ponder weights: one training each, the points of its curve
DACT_TAUS = (0.01, 0.05, 0.1)
#: easy sequences of two labels exiting further apart than this (mean layers) are flagged
LABEL_GAP_FLAG = 0.5
MARK_START = "<!-- exit-quality-table:start -->"
MARK_END = "<!-- exit-quality-table:end -->"


def build_model(seed: int, hidden: int = 128, layers: int = 6):
    from transformers import BertConfig, BertForSequenceClassification

    from earlyexit_kernels.demo.task import VOCAB_SIZE

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification._from_config(config, attn_implementation="sdpa")


def train_base(
    train_batches, *, seed: int, epochs: int, lr: float, hidden: int = 128, layers: int = 6, method: str = "pabee"
):
    """The shared checkpoint: the backbone fine-tuned with ``method``'s loss, returned without exit heads.

    PABEE's loss by default: its deep supervision helps this small model learn the hard
    examples (see the module docstring).
    The internal heads are thrown away, so every method starts from fresh heads.
    """
    model = patch(build_model(seed, hidden, layers), Patience(2))
    train_exit_heads(model, train_batches, method=method, epochs=epochs, lr=lr, progress=False)
    unpatch(model)
    drop_detached_heads(model)
    return model


def runs_of(methods, taus=DACT_TAUS) -> list[tuple[str, str, dict | None]]:
    """``(run name, method, loss kwargs)`` of each training: DACT once per ``tau``."""
    runs = []
    for method in methods:
        if method == "dact":
            runs += [(f"dact(tau={tau:g})", method, {"tau": tau}) for tau in taus]
        else:
            runs.append((method, method, None))
    return runs


def evaluate_method(method: str, model, val_batches, test_batches, hard: torch.Tensor, max_drop: float):
    """Curve, static baseline and operating point of a trained method on the test split."""
    record = record_exits(model, test_batches)
    curve = accuracy_curve(record, candidates(record))
    baseline = static_baseline(record)
    chosen = calibrate(record_exits(model, val_batches), max_drop=max_drop).policy
    agreeing = _hard_wrong_agreeing(record, hard)
    rows = []
    for point in curve:
        rows.append(_row(method, "curve", point.policy, record, hard, baseline))
    for k, _ in baseline:
        rows.append(_static_row(method, k, record, hard))
    rows.append(_row(method, "operating", chosen, record, hard, baseline))
    for row in rows:
        row["hard_wrong_agreeing"] = agreeing
    return rows, curve, baseline


def _hard_wrong_agreeing(record: ExitRecord, hard: torch.Tensor, layer: int = 2) -> float:
    """Of the hard sequences wrong at head ``layer``, the share whose heads 1..layer all gave that answer.

    Where this is high, agreement between consecutive heads (PABEE, voting) is no
    evidence of a right answer on the hard sequences.
    """
    predictions = record.all_logits[:layer].float().argmax(-1)  # [layer, N]
    wrong = hard & (predictions[-1] != record.labels)
    if not bool(wrong.any()):
        return 0.0
    agree = (predictions == predictions[-1]).all(0)
    return round((agree & wrong).sum().item() / wrong.sum().item(), 5)


def _split_stats(result, labels, hard):
    correct = (result.logits.argmax(-1) == labels).float()
    layers = result.layers_run.float()
    easy = ~hard

    def easy_layers_of(label):
        chosen = easy & (labels == label)
        return layers[chosen].mean().item() if bool(chosen.any()) else float("nan")

    return {
        "accuracy": correct.mean().item(),
        "easy_accuracy": correct[easy].mean().item(),
        "hard_accuracy": correct[hard].mean().item(),
        "mean_layers": layers.mean().item(),
        "easy_layers": layers[easy].mean().item(),
        "hard_layers": layers[hard].mean().item(),
        "easy_layers_label0": easy_layers_of(0),
        "easy_layers_label1": easy_layers_of(1),
    }


def _row(method, kind, policy, record: ExitRecord, hard, baseline):
    stats = _split_stats(replay(policy, record), record.labels, hard)
    static = interpolate_baseline(baseline, stats["mean_layers"])
    return {
        "method": method,
        "kind": kind,
        "policy": repr(policy),  # the exact code that builds it (the table rounds it)
        **{k: round(v, 5) for k, v in stats.items()},
        "static_accuracy": round(static, 5),
        "beats_static": int(stats["accuracy"] > static + 1e-9),
    }


def _static_row(method, k, record: ExitRecord, hard):
    logits = record.all_logits[k - 1].float()
    layers = torch.full((logits.shape[0],), k)
    from earlyexit_kernels.calibration.record import Replay

    stats = _split_stats(Replay(logits, layers, layers), record.labels, hard)
    return {
        "method": method,
        "kind": "static",
        "policy": f"cut after layer {k}",
        **{key: round(v, 5) for key, v in stats.items()},
        "static_accuracy": round(stats["accuracy"], 5),
        "beats_static": 0,
    }


FIELDS = [
    "method",
    "kind",
    "policy",
    "accuracy",
    "easy_accuracy",
    "hard_accuracy",
    "mean_layers",
    "easy_layers",
    "hard_layers",
    "easy_layers_label0",
    "easy_layers_label1",
    "static_accuracy",
    "beats_static",
    "hard_wrong_agreeing",
]


def readme_table(csv_path: str) -> str:
    """The exit-quality table of ``docs/benchmarks.md``, generated from the committed CSV."""
    with open(csv_path) as f:
        lines = [line for line in f if not line.startswith("#")]
    rows = list(csv.DictReader(lines))
    out = [
        "| method | operating point | accuracy | easy / hard acc. | mean layers | easy / hard layers "
        "| easy layers, label 0 / 1 | static cut at equal layers | curve points above static |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        curve = [r for r in mine if r["kind"] == "curve"]
        # points strictly inside (1, L): cutting at the first or last layer is the baseline itself
        num_layers = max(float(r["mean_layers"]) for r in mine if r["kind"] == "static")
        inner = [r for r in curve if 1.0 < float(r["mean_layers"]) < num_layers - 1e-9]
        above = sum(int(r["beats_static"]) for r in inner)
        op = next(r for r in mine if r["kind"] == "operating")

        def pct(key, r=op):
            return f"{100 * float(r[key]):.1f}%"

        out.append(
            f"| {method} | `{_table_code(op['policy'])}` | {pct('accuracy')} | {pct('easy_accuracy')} / {pct('hard_accuracy')} "
            f"| {float(op['mean_layers']):.2f} | {float(op['easy_layers']):.2f} / {float(op['hard_layers']):.2f} "
            f"| {_by_label(op)} | {pct('static_accuracy')} | {above} / {len(inner)} |"
        )
    return "\n".join(out)


def _by_label(row) -> str:
    """Easy sequences' mean layers per label, flagged where they differ by more than :data:`LABEL_GAP_FLAG`."""
    first, second = float(row["easy_layers_label0"]), float(row["easy_layers_label1"])
    flag = " **label-dependent**" if abs(first - second) > LABEL_GAP_FLAG else ""
    return f"{first:.2f} / {second:.2f}{flag}"


def _table_code(text: str) -> str:
    """A CSV's policy text as the code that builds it, thresholds to 4 significant digits."""
    try:
        return parse_policy(text).to_code(4)
    except ValueError:
        return text


def update_readme(readme: str, csv_path: str) -> None:
    with open(readme) as f:
        text = f.read()
    if MARK_START not in text or MARK_END not in text:
        raise ValueError(f"{readme} has no {MARK_START} ... {MARK_END} markers")
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    table = readme_table(csv_path)
    note = f"<!-- generated by python -m benchmarks.suite.exit_quality --from-csv {csv_path} --readme {readme} -->"
    with open(readme, "w") as f:
        f.write(f"{head}{MARK_START}\n{note}\n\n{table}\n\n{MARK_END}{tail}")


def run(args, save=None) -> list[dict]:
    """Train and evaluate every method of ``args``; ``save(rows)`` gets the rows so far after each method."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    train = make_split(args.train_size, seed=args.seed)
    val = make_split(args.val_size, seed=args.seed + 2)
    test = make_split(args.test_size, seed=args.seed + 1)
    train_batches = batches(train, 32, shuffle_seed=args.seed)
    method_batches = train_batches[: max(1, args.method_train_size // 32)]
    val_batches, test_batches = batches(val, 128), batches(test, 128)
    base = train_base(
        train_batches,
        seed=args.seed,
        epochs=args.base_epochs,
        lr=args.lr,
        hidden=args.hidden,
        layers=args.layers,
        method=args.base_method,
    )
    print(
        f"base checkpoint ({args.base_method} loss, {args.base_epochs} epochs): {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    rows, curves, baseline = [], {}, None
    for name, method, loss_kwargs in runs_of(args.methods, args.dact_taus):
        t0 = time.perf_counter()
        model = train_method(
            method,
            base,
            method_batches,
            epochs=args.epochs,
            lr=args.method_lr,
            heads_lr=args.heads_lr,
            halting_lr=args.halting_lr,
            loss_kwargs=loss_kwargs,
        )
        method_rows, curve, method_baseline = evaluate_method(
            name, model, val_batches, test_batches, test["hard"], args.max_drop
        )
        rows += method_rows
        if save is not None:
            save(rows)
        # DACT's curve joins its trainings' points, one per tau
        curves.setdefault(method, []).extend(curve)
        baseline = baseline or method_baseline
        op = method_rows[-1]
        print(
            f"{name:<16} trained in {time.perf_counter() - t0:4.0f} s; operating point {op['policy']}: "
            f"{100 * op['accuracy']:.1f}% at {op['mean_layers']:.2f} layers (easy {op['easy_layers']:.2f}: "
            f"label 0 {op['easy_layers_label0']:.2f}, label 1 {op['easy_layers_label1']:.2f}; hard "
            f"{op['hard_layers']:.2f}); static cut {100 * op['static_accuracy']:.1f}%; hard sequences wrong at "
            f"layer 2 with heads 1-2 agreeing: {100 * op['hard_wrong_agreeing']:.0f}%",
            flush=True,
        )
        if args.plot_dir:
            plot_curve(
                curve,
                f"{args.plot_dir}/{name}.png",
                baseline=method_baseline,
                full_accuracy=method_baseline[-1][1],
                title=name,
            )
    if args.plot:
        plot_curve(curves, args.plot, baseline=baseline, title="accuracy vs mean layers (static cut: PABEE model)")
    print(f"total {time.perf_counter() - start:.0f} s")
    return rows


def write_csv(rows: list[dict], path: str, argv: list[str]) -> None:
    import transformers

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "w", newline="") as f:
        f.write(f"# python -m benchmarks.suite.exit_quality {' '.join(argv)}, {stamp}\n")
        f.write(
            f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}, transformers {transformers.__version__}, earlyexit_kernels {__version__}\n"
        )
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="CSV file for the results")
    parser.add_argument("--plot", help="image with every method's curve")
    parser.add_argument("--plot-dir", help="also one image per method (curve and static baseline) in this folder")
    parser.add_argument(
        "--readme", help="rewrite the exit-quality table of this Markdown file (docs/benchmarks.md) from the CSV"
    )
    parser.add_argument("--from-csv", help="only regenerate the table from this CSV")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--train-size", type=int, default=6144, help="examples of the base fine-tuning")
    parser.add_argument("--method-train-size", type=int, default=3072, help="examples each method trains on")
    parser.add_argument("--val-size", type=int, default=1024)
    parser.add_argument("--test-size", type=int, default=2048)
    parser.add_argument("--base-epochs", type=int, default=3)
    parser.add_argument("--base-method", default="pabee", choices=["pabee", "deebert_stage1"])
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each method's training")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the base fine-tuning")
    parser.add_argument("--method-lr", type=float, default=5e-4, help="learning rate of joint training")
    parser.add_argument("--heads-lr", type=float, default=3e-3, help="learning rate of head-only training")
    parser.add_argument(
        "--halting-lr", type=float, default=HALTING_LR, help="learning rate of the halting heads and gates"
    )
    parser.add_argument(
        "--dact-taus", type=float, nargs="+", default=list(DACT_TAUS), help="DACT's ponder weights, one training each"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy points of the operating point")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.from_csv:
        if not args.readme:
            parser.error("--from-csv needs --readme")
        update_readme(args.readme, args.from_csv)
        return
    if args.readme and not args.output:
        parser.error("--readme needs --output (the CSV the table is generated from) or --from-csv")
    for folder in (args.plot_dir, *(os.path.dirname(p) for p in (args.output, args.plot) if p)):
        if folder:
            os.makedirs(folder, exist_ok=True)  # before the training, not after it
    if not (args.output or args.plot or args.plot_dir):
        print(
            "no --output, --plot or --plot-dir: the results are only printed; e.g. --output exit_quality.csv "
            "--plot exit_quality.png keeps them",
            flush=True,
        )

    def save(rows):
        if args.output:
            write_csv(rows, args.output, argv)  # rewritten after every method, so an interrupted run keeps its rows

    run(args, save)
    if args.output and args.readme:
        update_readme(args.readme, args.output)


if __name__ == "__main__":
    main()
