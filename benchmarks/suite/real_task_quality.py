"""Exit quality on a real task: every method on all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes.

    python -m benchmarks.suite.real_task_quality --threads 2 \\
        --output benchmarks/results/intel_xeon/real_task_cpu.csv --plot benchmarks/results/real_task_cpu.png \\
        --readme docs/benchmarks.md

The backbone is :func:`earlyexit_kernels.demo.real_task.fine_tuned_minilm` (one epoch as a plain
classifier, cached), or with ``--backbone mpnet`` the 12-layer all-mpnet-base-v2 fine-tuned the
same way (its own CSV, ``benchmarks/results/amd_epyc/real_task_mpnet_cpu.csv``, and its own section). Each run starts from a fresh copy of it, is patched with its method's
policy family and the heads' pooling and form, and is trained and calibrated by
:func:`earlyexit_kernels.training.fit_exit_heads` with the method's recipe
(:mod:`earlyexit_kernels.training.recipes`; the fewest mean layers within ``--max-drop``
points of the full model on the validation split). The head-only runs and the package's own
``joint`` recipe train on the whole train split; the papers' joint methods (their recipes
train the backbone for an epoch) on the first ``--joint-train-rows`` rows of it, to keep the
run short on a CPU.

On the test split (2,500 snippets, never seen by training or calibration):

- the curve: every candidate threshold of the method's policy replayed on the recorded exits
  (:mod:`earlyexit_kernels.training.calibrate_model`), against the static cut (the same model's
  head of layer ``k`` for every sequence), interpolated at equal mean layers;
- the calibrated point: accuracy, mean layers, and the drop from the full model;
- wall-clock: the patched model and the unpatched one on the same length-sorted batches of
  32, interleaved batch by batch (:func:`earlyexit_kernels.integrations.evaluation.evaluate`),
  with the layer ideal L / mean layers next to the speed-up.

A method that saves less than ``LITTLE_SAVING`` of the layers at its calibrated point says
why, from its measurements: each head's validation accuracy alone and the best validation
accuracy any of its thresholds reaches at 75% of the layers.

``--readme`` rewrites the section between the ``real-task-quality`` markers of a Markdown
file from the CSV (``--from-csv CSV --readme FILE`` does only that; so does
``python -m benchmarks.suite.report --readme docs/benchmarks.md`` when the committed
CSV exists).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from benchmarks.suite.command_names import current_command
from benchmarks.suite.markdown_sections import replace_section

__all__ = ["RUNS", "DEFAULT_CSV", "run", "render_markdown", "update_readme", "operating_rows", "depth_of", "main"]

#: name -> (method recipe, pooling, head form)
RUNS = {
    "heads (mean, mlp)": ("heads", "mean", "mlp"),
    "heads (cls, model)": ("heads", "cls", "model"),
    "heads (cls, mlp)": ("heads", "cls", "mlp"),
    "joint": ("joint", "mean", "mlp"),
    "auto heads": ("heads", "auto", "auto"),
    "deebert": ("deebert", "mean", "mlp"),
    "pabee": ("pabee", "mean", "mlp"),
    "palbert": ("palbert", "mean", "mlp"),
    "ensemble": ("ensemble", "mean", "mlp"),
    "dact": ("dact", "mean", "mlp"),
    "smartbert": ("smartbert", "mean", "mlp"),
}
#: a calibrated point saving less than this fraction of the layers says why
LITTLE_SAVING = 0.25
BATCH = 32
MAX_LENGTH = 128
DEFAULT_CSV = "benchmarks/results/intel_xeon/real_task_cpu.csv"
MARK_START = "<!-- real-task-quality:start -->"
MARK_END = "<!-- real-task-quality:end -->"
#: the backbones' names in titles and the tasks' (see earlyexit_kernels.demo.real_task)
BACKBONE_NAMES = {"minilm": "MiniLM-L6", "mpnet": "MPNet-base (12 layers)"}
TASK_NAMES = {"rotten_tomatoes": "Rotten Tomatoes", "debates": "the 2016 debates (three classes)"}


def outputs(backbone: str = "minilm", task: str = "rotten_tomatoes") -> tuple[str, str, str, str]:
    """``(csv, start marker, end marker, title)`` of one backbone on one task: each has its own CSV and section."""
    suffix = "".join(f"-{part}" for part in (backbone, task) if part not in ("minilm", "rotten_tomatoes"))
    if not suffix:
        return DEFAULT_CSV, MARK_START, MARK_END, f"{BACKBONE_NAMES[backbone]} on {TASK_NAMES[task]}"
    return (
        f"benchmarks/results/real_task{suffix.replace('-', '_')}_cpu.csv",
        f"<!-- real-task-quality{suffix}:start -->",
        f"<!-- real-task-quality{suffix}:end -->",
        f"{BACKBONE_NAMES[backbone]} on {TASK_NAMES[task]}",
    )


FIELDS = [
    "kind",
    "run",
    "method",
    "pooling",
    "head",
    "policy",
    "layer",
    "accuracy",
    "mean_layers",
    "static_accuracy",
    "full_accuracy",
    "val_accuracy",
    "val_full_accuracy",
    "val_mean_layers",
    "val_layer_accuracy",
    "val_best_at_75pct",
    "saved_fraction",
    "seconds_early_exit",
    "seconds_full",
    "speedup",
    "ideal",
    "full_depth_max_diff",
    "train_rows",
    "fit_seconds",
    "stages",
    "warnings",
    "why",
]


def _encoded(tokenizer, split):
    from earlyexit_kernels.training.labelled_texts import LabelledTexts, encode

    data = LabelledTexts(split.texts, None, split.labels, "rotten tomatoes", "label")
    return encode(tokenizer, data, MAX_LENGTH), torch.tensor(split.labels)


def _folder_name(run: str) -> str:
    """A run's name as a folder name: ``"heads (mean, mlp)"`` -> ``"heads-mean-mlp"``."""
    return "-".join(re.findall(r"[a-z0-9]+", run.lower()))


def run(args, save=None) -> list[dict]:
    """Fit, calibrate and measure every run of ``args.runs``; ``save(rows)`` after each run."""
    from earlyexit_kernels.calibration.candidates import candidates, describe, distinct_digits
    from earlyexit_kernels.calibration.record import replay
    from earlyexit_kernels.calibration.select import accuracy_curve, interpolate_baseline, static_baseline
    from earlyexit_kernels.demo.real_task import fine_tuned_model, load_task
    from earlyexit_kernels.integrations.evaluation import evaluate
    from earlyexit_kernels.patching.patch import head_config, patch, unpatch
    from earlyexit_kernels.training.calibrate_model import record_exits
    from earlyexit_kernels.training.fit import fit_exit_heads
    from earlyexit_kernels.training.labelled_texts import length_sorted_batches, shuffled_batches
    from earlyexit_kernels.training.recipes import recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    splits = load_task(args.task)
    base, tokenizer, info = fine_tuned_model(args.backbone, cache_dir=args.cache_dir, progress=False, task=args.task)
    how = "loaded" if info["cached"] else f"trained in {info['seconds']:.0f} s"
    print(f"fine-tuned {args.backbone}: {how} ({info['path']})", flush=True)
    train, train_labels = _encoded(tokenizer, splits["train"])
    val, val_labels = _encoded(tokenizer, splits["validation"])
    test, test_labels = _encoded(tokenizer, splits["test"])
    train_batches = shuffled_batches(train, train_labels, BATCH, seed=0)
    if args.train_rows:
        train_batches = train_batches[: max(1, args.train_rows // BATCH)]
    joint_batches = train_batches[: max(1, args.joint_train_rows // BATCH)]
    val_batches = length_sorted_batches(val, val_labels, 64)
    test_batches = length_sorted_batches(test, test_labels, BATCH)
    num_layers = base.config.num_hidden_layers
    rows, curves, baseline = [], {}, None
    for name in args.runs:
        method, pooling, head = RUNS[name]
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        auto = {"pooling": "auto", "head": "auto"} if pooling == "auto" else {}
        patch(model, recipe(method).make_policy(), **({} if auto else {"pooling": pooling, "head": head}))
        batches = train_batches if method in ("heads", "fastbert", "joint") else joint_batches
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # they are in the result, and in the CSV
            fitted = fit_exit_heads(
                model, batches, val_batches, method=method, max_drop=args.max_drop, progress=False, **auto
            )
        if auto:
            chosen_heads = head_config(model)
            pooling, head = f"auto: {chosen_heads.pooling}", f"auto: {chosen_heads.head}"
        fit_seconds = time.perf_counter() - t0
        calibration = fitted.calibration
        record = record_exits(model, test_batches)
        family = candidates(record, calibration.policy)
        curve = accuracy_curve(record, family)
        static = static_baseline(record)
        baseline = baseline or static
        curves[name] = curve
        chosen = replay(calibration.policy, record)
        test_accuracy = float((chosen.logits.argmax(-1) == record.labels).float().mean())
        test_layers = float(chosen.layers_run.float().mean())
        # the unpatched model of this run: a joint method's backbone learnt, so its full model is its own
        timing = evaluate(model, test_batches, full_model=unpatch(copy.deepcopy(model)))
        digits = distinct_digits(family)
        common = {"run": name, "method": method, "pooling": pooling, "head": head}
        for point in curve:
            rows.append(
                {
                    **common,
                    "kind": "curve",
                    "policy": describe(point.policy, digits),
                    "accuracy": point.accuracy,
                    "mean_layers": point.mean_layers,
                    "static_accuracy": interpolate_baseline(static, point.mean_layers),
                }
            )
        rows += [{**common, "kind": "static", "layer": k, "accuracy": a, "mean_layers": k} for k, a in static]
        best_at_75 = max(
            (p.accuracy for p in calibration.curve if p.mean_layers <= (1 - LITTLE_SAVING) * num_layers + 1e-9),
            default=None,
        )
        saved = 1 - test_layers / num_layers
        operating = {
            **common,
            "kind": "operating",
            "policy": describe(calibration.policy, 4),
            "accuracy": test_accuracy,
            "mean_layers": test_layers,
            "static_accuracy": interpolate_baseline(static, test_layers),
            "full_accuracy": static[-1][1],
            "val_accuracy": calibration.accuracy,
            "val_full_accuracy": calibration.full_accuracy,
            "val_mean_layers": calibration.mean_layers,
            "val_layer_accuracy": " ".join(f"{a:.4f}" for a in calibration.layer_scores),
            "val_best_at_75pct": best_at_75,
            "saved_fraction": saved,
            "seconds_early_exit": timing.seconds,
            "seconds_full": timing.full_seconds,
            "speedup": timing.speedup,
            "ideal": timing.ideal_speedup,
            "full_depth_max_diff": timing.full_depth_max_diff,
            "train_rows": sum(int(b["input_ids"].shape[0]) for b in batches),
            "fit_seconds": fit_seconds,
            "stages": " | ".join(stage.describe() for stage in fitted.stages),
            "warnings": " | ".join(calibration.warnings),
        }
        operating["why"] = _why(operating, num_layers) if saved < LITTLE_SAVING else ""
        rows.append(operating)
        if save is not None:
            save(rows)
        if getattr(args, "save_models", None):
            from earlyexit_kernels.demo.real_task import save_atomically

            save_atomically(model, tokenizer, Path(args.save_models) / _folder_name(name))
        print(
            f"{name:<20} fit {fit_seconds:5.0f} s; {operating['policy']}: test {100 * test_accuracy:.2f}% "
            f"(full {100 * static[-1][1]:.2f}%) at {test_layers:.2f} layers; speed-up {timing.speedup:.2f}x of "
            f"{timing.ideal_speedup:.2f}x; full-depth logits max |diff| {timing.full_depth_max_diff}",
            flush=True,
        )
        if operating["why"]:
            print(f"{'':<20} why: {operating['why']}", flush=True)
    if args.plot and curves:
        from earlyexit_kernels.calibration.candidates import plot_curve

        title = f"{outputs(args.backbone, args.task)[3]}, test split"
        plot_curve(curves, args.plot, baseline=baseline, title=title)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def _why(row: dict, num_layers: int) -> str:
    """Why a calibrated point saves little, from what was measured on validation."""
    heads = [float(a) for a in row["val_layer_accuracy"].split()]
    full = row["val_full_accuracy"]
    best = row["val_best_at_75pct"]
    parts = [
        "heads alone on validation: "
        + ", ".join(f"layer {k} {100 * a:.1f}%" for k, a in enumerate(heads[:-1], start=1))
        + f" (full model {100 * full:.1f}%)"
    ]
    if best is None:
        parts.append(f"no threshold of its policy runs {(1 - LITTLE_SAVING) * num_layers:.1f} layers or fewer")
    else:
        parts.append(
            f"its best threshold at <= {(1 - LITTLE_SAVING) * num_layers:.1f} layers reaches {100 * best:.1f}%, "
            f"{100 * (full - best):.1f} points below the full model"
        )
    return "; ".join(parts)


def write_csv(
    rows: list[dict], path: str, argv: list[str], seconds: float | None = None, kept: tuple[list, list] = ([], [])
) -> None:
    """Write ``rows`` after ``kept`` (the comment lines and rows of an earlier run, ``--append``)."""
    import transformers

    from earlyexit_kernels._version import __version__
    from earlyexit_kernels.bench.results import cpu_name

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    comments, old_rows = kept
    with open(path, "w", newline="") as f:
        for line in comments:
            f.write(f"# {line}\n")
        f.write(f"# python -m benchmarks.suite.real_task_quality {' '.join(argv)}, {stamp}\n")
        f.write(
            f"# {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}, transformers {transformers.__version__}, earlyexit_kernels "
            f"{__version__}"
            + ("" if seconds is None else f", {seconds:.0f} s")
            + f", load average {os.getloadavg()[0]:.1f} at the end\n"
        )
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(old_rows)
        writer.writerows(rows)


def _read_csv(path: str) -> tuple[list[str], list[dict]]:
    with open(path) as f:
        lines = f.read().splitlines()
    comments = [line[2:] for line in lines if line.startswith("# ")]
    return comments, list(csv.DictReader(line for line in lines if not line.startswith("#")))


def _pct(value) -> str:
    return "–" if value in (None, "") else f"{100 * float(value):.2f}%"


def _curve_at(points: list[dict], layers: float) -> float | None:
    """The best accuracy of the curve at no more than ``layers`` mean layers."""
    within = [float(p["accuracy"]) for p in points if float(p["mean_layers"]) <= layers + 1e-9]
    return max(within) if within else None


def _layers_within(points: list[dict], reference: float | None, points_allowed: float = 0.01) -> float | None:
    """The fewest mean layers of the curve at no more than ``points_allowed`` below ``reference`` (None: none)."""
    if reference is None:
        return None
    within = [float(p["mean_layers"]) for p in points if float(p["accuracy"]) >= reference - points_allowed - 1e-12]
    return min(within) if within else None


def render_markdown(csv_path: str) -> str:
    """The real-task section of ``docs/benchmarks.md``, generated from the CSV."""
    comments, rows = _read_csv(csv_path)
    operating = operating_rows(rows)
    depth = depth_of(rows)
    start = next((float(r["full_accuracy"]) for r in operating if r["method"] in ("heads", "fastbert")), None)
    points = (depth // 3, depth // 2, 2 * depth // 3)
    lines = [f"Generated from `{csv_path}` by `python -m benchmarks.suite.real_task_quality`, run as:", ""]
    lines += ["```", *map(current_command, comments), "```", ""]
    lines += [
        f"| run | calibrated policy | test accuracy (full) | drop (points) | mean layers of {depth} | layers saved | "
        "static cut at equal layers | speed-up vs unpatched (ideal) | full-depth logits | fit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in operating:
        drop = 100 * (float(r["full_accuracy"]) - float(r["accuracy"]))
        exact = r["full_depth_max_diff"]
        exact = "–" if exact == "" else ("bit-exact" if float(exact) == 0 else f"max diff {float(exact):.2g}")
        lines.append(
            f"| {r['run']} | `{r['policy']}` | {_pct(r['accuracy'])} ({_pct(r['full_accuracy'])}) | {drop:+.2f} | "
            f"{float(r['mean_layers']):.2f} | {100 * float(r['saved_fraction']):.0f}% | {_pct(r['static_accuracy'])} | "
            f"{float(r['speedup']):.2f}x ({float(r['ideal']):.2f}x) | {exact} | "
            f"{int(r['train_rows'])} rows, {float(r['fit_seconds']):.0f} s |"
        )
    lines += [
        "",
        f"The curve on the test split: the best accuracy any threshold reaches within {points[0]}, {points[1]} and "
        f"{points[2]} mean layers, against the static cut at that layer; and the fewest mean layers any threshold "
        f"needs to stay within 1 point of the run's own full model, and of the fine-tuned model it started from "
        f"(the full model of the head-only runs, whose backbone does not change"
        + (f": {_pct(start)})." if start is not None else ")."),
        "",
        "| run | "
        + " | ".join(f"<= {k} layers | static {k}" for k in points)
        + " | within 1 point of its own | of the starting model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in operating:
        curve = [p for p in rows if p["kind"] == "curve" and p["run"] == r["run"]]
        static = {int(p["layer"]): p["accuracy"] for p in rows if p["kind"] == "static" and p["run"] == r["run"]}
        cells = []
        for k in points:
            cells += [_pct(_curve_at(curve, k)), _pct(static.get(k))]
        for reference in (float(r["full_accuracy"]), start):
            layers = _layers_within(curve, reference)
            cells.append("–" if layers is None else f"{layers:.2f}")
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    why = [r for r in operating if r["why"]]
    if why:
        lines += ["", f"Runs saving less than {100 * LITTLE_SAVING:.0f}% of the layers, and why (measured):", ""]
        lines += [f"- **{r['run']}**: {r['why']}." for r in why]
    stages = [r for r in operating if r["stages"]]
    if stages:
        lines += ["", "Training stages of each run (fit_exit_heads' log):", ""]
        lines += [f"- {r['run']}: {r['stages']}" for r in stages]
    warned = [r for r in operating if r["warnings"]]
    if warned:
        lines += ["", "Calibration warnings:", ""]
        lines += [f"- {r['run']}: {r['warnings']}" for r in warned]
    return "\n".join(lines) + "\n"


def operating_rows(rows: list[dict]) -> list[dict]:
    """The calibrated point of every run in a CSV's ``rows``, in the order of :data:`RUNS`."""
    order = list(RUNS)
    return sorted(
        (r for r in rows if r["kind"] == "operating"),
        key=lambda r: order.index(r["run"]) if r["run"] in order else len(order),
    )


def depth_of(rows: list[dict]) -> int:
    """The model's number of layers: the deepest static cut of a CSV's ``rows`` (every run has one per layer)."""
    return max((int(r["layer"]) for r in rows if r["kind"] == "static"), default=0)


def update_readme(readme: str, csv_path: str, backbone: str = "minilm", task: str = "rotten_tomatoes") -> None:
    """Rewrite the section of ``backbone`` on ``task`` between its markers in ``readme`` (appended when missing)."""
    _, start, end, name = outputs(backbone, task)
    text = Path(readme).read_text()
    flag = "" if backbone == "minilm" else f" --backbone {backbone}"
    flag += "" if task == "rotten_tomatoes" else f" --task {task}"
    note = f"<!-- generated by python -m benchmarks.suite.real_task_quality{flag} --from-csv {csv_path} -->"
    section = f"{start}\n{note}\n\n{render_markdown(csv_path)}\n{end}"
    heading = "Exit quality on a real task" if not flag else f"Exit quality on a real task: {name}"
    Path(readme).write_text(replace_section(text, start, end, section, heading))


SIDE_START = "<!-- real-task-side-by-side:start -->"
SIDE_END = "<!-- real-task-side-by-side:end -->"


def render_side_by_side(readme_dir: str | Path = ".") -> str:
    """One row per backbone and task whose CSV exists: the full model, and each run's calibrated point
    (test accuracy, drop, mean layers of L, speed-up against its own unpatched model)."""
    lines = [
        "Each backbone and task from its own CSV (the sections below); the calibrated point of every run on "
        "the test split, with the speed-up against the same model unpatched on the same length-sorted "
        "batches of 32.",
        "",
        "| model, task | full model | run | test accuracy (drop) | mean layers of L | layers saved | "
        "speed-up (layer ideal) |",
        "|---|---|---|---|---|---|---|",
    ]
    for backbone in BACKBONE_NAMES:
        for task in TASK_NAMES:
            csv_path, _, _, title = outputs(backbone, task)
            if not (Path(readme_dir) / csv_path).is_file():
                continue
            _, rows = _read_csv(str(Path(readme_dir) / csv_path))
            depth = depth_of(rows)
            for r in operating_rows(rows):
                drop = 100 * (float(r["full_accuracy"]) - float(r["accuracy"]))
                lines.append(
                    f"| {title} | {_pct(r['full_accuracy'])} | {r['run']} | {_pct(r['accuracy'])} ({drop:+.2f}) | "
                    f"{float(r['mean_layers']):.2f} of {depth} | {100 * float(r['saved_fraction']):.0f}% | "
                    f"{float(r['speedup']):.2f}x ({float(r['ideal']):.2f}x) |"
                )
    return "\n".join(lines) + "\n"


def update_side_by_side(readme: str) -> None:
    """Rewrite the side-by-side section of ``readme`` from every backbone's and task's CSV that exists."""
    text = Path(readme).read_text()
    note = "<!-- generated by python -m benchmarks.suite.real_task_quality --side-by-side -->"
    section = f"{SIDE_START}\n{note}\n\n{render_side_by_side()}\n{SIDE_END}"
    Path(readme).write_text(replace_section(text, SIDE_START, SIDE_END, section, "Real tasks side by side"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="CSV file for the results (rewritten after every run)")
    parser.add_argument("--plot", help="image with every run's test curve and the static cut")
    parser.add_argument("--readme", help="rewrite the real-task section of this Markdown file from the CSV")
    parser.add_argument("--markdown", help="also write the section alone to this Markdown file")
    parser.add_argument("--from-csv", help="only regenerate the section from this CSV")
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="with --readme: also rewrite the table of every backbone and task side by side (from their CSVs)",
    )
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), metavar="RUN")
    parser.add_argument(
        "--joint-train-rows", type=int, default=2048, help="training rows of the joint methods (default: 2048)"
    )
    parser.add_argument(
        "--train-rows",
        type=int,
        default=None,
        help="training rows of every run (default: the whole train split; the joint methods take at most "
        "--joint-train-rows of them)",
    )
    parser.add_argument("--max-drop", type=float, default=1.0, help="calibration target, accuracy points")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the other runs of an existing --output CSV (one CSV from several shorter invocations)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--backbone",
        choices=tuple(BACKBONE_NAMES),
        default="minilm",
        help="the pre-trained model fine-tuned on the task: minilm (6 layers, default) or mpnet (12 layers)",
    )
    parser.add_argument(
        "--task",
        choices=tuple(TASK_NAMES),
        default="rotten_tomatoes",
        help="the labelled task: rotten_tomatoes (two classes, default) or debates (three)",
    )
    parser.add_argument("--cache-dir", help="where the fine-tuned model is cached (default: real_task's)")
    parser.add_argument(
        "--save-models",
        help="write each run's fitted model (exit heads, calibrated policy) and tokenizer to SAVE_MODELS/<run>, "
        "e.g. for the stack benchmark's --stack-folder",
    )
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.from_csv:
        if not (args.readme or args.markdown):
            parser.error("--from-csv needs --readme or --markdown")
        _write_docs(args, args.from_csv)
        return
    if (args.readme or args.markdown) and not args.output:
        parser.error("--readme and --markdown need --output (the CSV they are generated from)")
    for path in (args.output, args.plot, args.markdown):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    started = time.perf_counter()
    kept = ([], [])
    if args.append and args.output and os.path.exists(args.output):
        comments, old_rows = _read_csv(args.output)
        kept = (comments, [r for r in old_rows if r["run"] not in args.runs])

    def save(rows):
        if args.output:
            write_csv(rows, args.output, argv, time.perf_counter() - started, kept)

    run(args, save)
    if args.output:
        _write_docs(args, args.output)


def _write_docs(args, csv_path: str) -> None:
    if args.readme and args.side_by_side:
        update_side_by_side(args.readme)
    if args.markdown:
        Path(args.markdown).write_text("# Exit quality on a real task\n\n" + render_markdown(csv_path))
    if args.readme:
        update_readme(args.readme, csv_path, args.backbone, args.task)


if __name__ == "__main__":
    main()
