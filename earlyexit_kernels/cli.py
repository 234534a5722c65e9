"""The command line: ``python -m earlyexit_kernels classify MODEL INPUT OUTPUT`` (also ``eek classify``).

Errors a user can fix are one line on stderr starting with ``error:`` and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import deque
from pathlib import Path

__all__ = ["CliError", "build_parser", "load_model", "main"]

OUTPUT_COLUMNS = ("label", "score", "exit_layer", "layers_run")


class CliError(Exception):
    """A problem with what the user asked for; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m earlyexit_kernels", description="Early-exit inference for Hugging Face encoder classifiers."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    classify = commands.add_parser(
        "classify",
        help="classify the texts of a file",
        description=(
            "Classify every row of INPUT with the early-exit model MODEL and write OUTPUT: every input column, "
            "then label (the id2label name of the prediction; empty for a regression head), score (its "
            "probability; the predicted value for a regression head), exit_layer and layers_run. INPUT and "
            "OUTPUT are .csv, .tsv, .jsonl or .parquet. OUTPUT is written in chunks as rows are classified; "
            "after an interruption, --resume continues it."
        ),
    )
    classify.add_argument(
        "model",
        metavar="MODEL",
        help="a save_pretrained folder of a patched model, or a plain "
        "Hugging Face classifier folder with --policy; its tokenizer is read from it",
    )
    classify.add_argument("input", metavar="INPUT", help="the file to classify (.csv, .tsv, .jsonl, .parquet)")
    classify.add_argument("output", metavar="OUTPUT", help="the file to write (.csv, .tsv, .jsonl, .parquet)")
    classify.add_argument("--text-column", default="text", help="column holding the texts (default: text)")
    classify.add_argument("--pair-column", default=None, help="column holding the second text of a pair")
    classify.add_argument(
        "--policy",
        default=None,
        help='exit policy, e.g. "Entropy(0.3)" or "Patience(2)": '
        "needed for a plain classifier, replaces a saved model's policy",
    )
    classify.add_argument("--backend", default=None, help="auto, torch, cpp, triton or cuda (default: the saved one)")
    classify.add_argument("--max-batch-size", type=int, default=64, help="most rows per layer call (default: 64)")
    classify.add_argument("--max-tokens", type=int, default=None, help="most rows x padded length per layer call")
    classify.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="longer texts are truncated (default: what the model's positions hold)",
    )
    classify.add_argument("--compile", action="store_true", help="run the layer calls through torch.compile")
    classify.add_argument("--resume", action="store_true", help="continue an OUTPUT an interrupted run left")
    classify.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    classify.add_argument("--chunk-rows", type=int, default=4096, help="rows read and written at a time")
    classify.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar (default: when stderr is a terminal)",
    )
    classify.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local (default), or ray: Ray Data actors, OUTPUT a folder of part files",
    )
    classify.add_argument("--workers", type=int, default=2, help="--engine ray: actors (default: 2)")
    classify.add_argument("--address", default=None, help="--engine ray: a Ray cluster (default: start one here)")
    classify.add_argument("--gpus-per-worker", type=float, default=0, help="--engine ray: GPUs per actor (e.g. 1)")
    classify.set_defaults(run=_classify)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weights' loading bar is not ours to show
    try:
        return args.run(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run again with --resume to continue", file=sys.stderr)
        return 130


def load_model(path: str, policy_text: str | None = None, backend: str | None = None):
    """A patched model and its tokenizer from ``path``; ``CliError`` saying what is wrong otherwise."""
    from transformers import AutoTokenizer

    from .policy_spec import parse_policy
    from .saving import CONFIG_FILE, from_pretrained

    folder = Path(path)
    if not folder.is_dir():
        raise CliError(f"MODEL {path} is not a folder; give one written by save_pretrained")
    if not (folder / "config.json").is_file():
        raise CliError(f"MODEL {path} has no config.json: it is not a Hugging Face model folder")
    try:
        policy = parse_policy(policy_text) if policy_text is not None else None
    except ValueError as error:
        raise CliError(f"--policy: {error}") from None
    if policy is None and not (folder / CONFIG_FILE).is_file():
        raise CliError(f"MODEL {path} is a plain Hugging Face model: pass --policy, e.g. --policy 'Entropy(0.3)'")
    try:
        model = from_pretrained(str(folder), policy, backend=backend)
    except TypeError as error:
        raise CliError(f"MODEL {path} is not a supported classifier: {error}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise CliError(f"cannot load MODEL {path}: {error}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
        raise CliError(
            f"MODEL {path} has no usable tokenizer ({error}); save one there with tokenizer.save_pretrained"
        ) from None
    return model, tokenizer


def _classify(args) -> int:
    from .table_io import TableError, table_format

    for name in ("max_batch_size", "chunk_rows", "workers"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1")
    if args.engine == "ray":  # reads files or folders; OUTPUT is a folder (Parquet unless named .csv / .jsonl)
        return _classify_on_ray(args)
    try:
        table_format(args.input)
        table_format(args.output)
    except TableError as error:
        raise CliError(str(error)) from None
    try:
        return _classify_locally(args)
    except TableError as error:
        raise CliError(str(error)) from None


def _classify_locally(args) -> int:
    from .classify import classify
    from .labels import labels_and_scores
    from .table_io import ChunkWriter, read_chunks

    model, tokenizer = load_model(args.model, args.policy, args.backend)
    writer = ChunkWriter(args.output, resume=args.resume, overwrite=args.overwrite)
    first_row = writer.rows_done
    frames: deque = deque()
    empty_rows: list[int] = []
    columns = _Columns(args.text_column, args.pair_column)

    def inputs():
        row = first_row
        for table in read_chunks(args.input, args.chunk_rows, skip_rows=first_row):
            frame = table.to_pandas()
            columns.check(frame, args.input)
            frames.append(frame)
            yield from columns.items(frame, row, empty_rows)
            row += len(frame)

    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        predictions = classify(
            model,
            inputs(),
            tokenizer=tokenizer,
            max_batch_size=args.max_batch_size,
            max_tokens=args.max_tokens,
            max_length=args.max_length,
            compile=args.compile,
            progress=show_progress,
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    start, done, layers, ready = time.perf_counter(), 0, 0, []

    def flush(final: bool = False):
        nonlocal ready
        while frames and (len(ready) >= len(frames[0]) or final):
            frame = frames.popleft()
            chunk, ready = ready[: len(frame)], ready[len(frame) :]
            out = frame.copy()
            if chunk:
                import torch

                labels, scores = labels_and_scores(torch.stack([p.logits for p in chunk]), model.config)
                out["label"], out["score"] = labels, scores
                out["exit_layer"] = [p.exit_layer for p in chunk]
                out["layers_run"] = [p.layers_run for p in chunk]
            else:
                for name in OUTPUT_COLUMNS:
                    out[name] = []
            writer.write(out)

    for prediction in predictions:
        ready.append(prediction)
        done += 1
        layers += prediction.exit_layer
        flush()
    flush(final=True)
    writer.finish()
    elapsed = time.perf_counter() - start
    if empty_rows:
        shown = ", ".join(map(str, empty_rows[:20])) + (", ..." if len(empty_rows) > 20 else "")
        print(
            f"warning: {len(empty_rows)} rows have an empty or null {args.text_column} and were classified as "
            f"the empty text (rows {shown}; row 0 is the first data row)",
            file=sys.stderr,
        )
    mean = f", mean exit layer {layers / done:.2f} of {model.config.num_hidden_layers}" if done else ""
    print(
        f"classified {done} rows in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.0f} rows/s){mean} -> {args.output}",
        file=sys.stderr,
    )
    return 0


class _Columns:
    """The text (and pair) columns of the input, checked once, read row by row."""

    def __init__(self, text: str, pair: str | None):
        self.text, self.pair = text, pair
        self.checked = False

    def check(self, frame, path: str) -> None:
        if self.checked:
            return
        for name in (self.text, self.pair):
            if name is not None and name not in frame.columns:
                option = "--text-column" if name == self.text else "--pair-column"
                raise CliError(f"{path} has no column {name!r} ({option}); its columns are {list(frame.columns)}")
        taken = [name for name in OUTPUT_COLUMNS if name in frame.columns]
        if taken:
            raise CliError(f"{path} already has the column(s) {taken} that the output adds; rename them")
        self.checked = True

    def items(self, frame, first_row: int, empty_rows: list[int]):
        texts = frame[self.text].tolist()
        pairs = frame[self.pair].tolist() if self.pair else None
        for offset, text in enumerate(texts):
            row = first_row + offset
            item = [self._text(text, self.text, row, empty_rows)]
            if pairs is not None:
                item.append(self._text(pairs[offset], self.pair, row, empty_rows))
            yield item[0] if len(item) == 1 else tuple(item)

    @staticmethod
    def _text(value, column: str, row: int, empty_rows: list[int]) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            value = ""
        if not isinstance(value, str):
            raise CliError(f"row {row}: column {column!r} holds {type(value).__name__} {value!r}, not text")
        if not value.strip() and (not empty_rows or empty_rows[-1] != row):
            empty_rows.append(row)
        return value


def _classify_on_ray(args) -> int:
    if args.resume:
        raise CliError("--resume is for the local engine; a Ray run writes its OUTPUT folder anew")
    try:
        from .ray import classify_files
    except ImportError as error:
        raise CliError(f"--engine ray needs Ray Data: pip install 'earlyexit_kernels[ray]' ({error})") from None
    if Path(args.output).exists() and not args.overwrite:
        raise CliError(f"output {args.output} exists; pass --overwrite to replace it")
    load_model(args.model, args.policy, args.backend)  # the actors load it too: fail here, with a clear message
    try:
        from .ray import input_files

        input_files(args.input)  # a missing file or an unknown format: say so before starting Ray
    except (FileNotFoundError, ValueError) as error:
        raise CliError(str(error)) from None
    start = time.perf_counter()
    summary = classify_files(
        args.model,
        args.input,
        args.output,
        workers=args.workers,
        address=args.address,
        num_gpus=args.gpus_per_worker,
        text_column=args.text_column,
        pair_column=args.pair_column,
        policy=args.policy,
        max_batch_size=args.max_batch_size,
        max_length=args.max_length,
        backend=args.backend,
        compile=args.compile,
    )
    elapsed = time.perf_counter() - start
    print(
        f"classified {summary['rows']} rows on Ray ({args.workers} workers) in {elapsed:.1f} s; "
        f"{summary['errors']} rows could not be classified (see the error column) -> {args.output}",
        file=sys.stderr,
    )
    return 0
