"""The command line: ``python -m earlyexit_kernels classify MODEL INPUT OUTPUT`` and
``python -m earlyexit_kernels serve MODEL`` (also ``eek classify``, ``eek serve``); ``serve`` is in
:mod:`earlyexit_kernels.integrations.serve_cli`, ``fit``, ``calibrate`` and ``evaluate`` in
:mod:`earlyexit_kernels.integrations.fit_cli`.

Errors a user can fix are one line on stderr starting with ``error:`` and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import deque
from pathlib import Path

from earlyexit_kernels.integrations.classified_table import ColumnError, InputColumns, with_predictions
from earlyexit_kernels.integrations.cli_options import (
    CliError,
    add_audit_options,
    add_base_options,
    add_engine_options,
    audit_options,
    checked_engine,
    engine_keywords,
    is_multi_label,
    recertify_options,
    set_threads,
)
from earlyexit_kernels.integrations.extras import install_line
from earlyexit_kernels.integrations.fit_cli import add_commands as add_fit_commands
from earlyexit_kernels.integrations.model_folder import ModelFolderError, load_model
from earlyexit_kernels.integrations.recertify_cli import add_recertify_options
from earlyexit_kernels.integrations.serve_cli import add_serve_command

__all__ = ["CliError", "build_parser", "main", "program_name"]

#: eek classify's engine options (EngineConfig fields; its --engine is where the rows run, local or Ray) and
#: their defaults, eek.classify's (python_tests/test_engine_options.py holds them equal)
CLASSIFY_ENGINE_FLAGS = ("max_batch_size", "max_tokens", "max_length", "compile")
CLASSIFY_ENGINE_DEFAULTS = {"max_batch_size": None, "max_tokens": None, "max_length": None, "compile": False}


def program_name() -> str:
    """How the user called the command line: ``eek``, or ``python -m earlyexit_kernels``."""
    return "eek" if Path(sys.argv[0]).name == "eek" else "python -m earlyexit_kernels"


def build_parser(listed: dict[str, str] | None = None, *, only: str | None = None) -> argparse.ArgumentParser:
    """``listed``: commands of the layers above (``bench``), named in ``--help`` with their line; the ``eek``
    command (``earlyexit_kernels.__main__``) sends them on before this parser reads them. ``only``: a command's
    name, to build only the options of the module that owns it (what :func:`main` parses ``eek fit ...`` with);
    None: every command, as ``eek --help`` lists them."""
    parser = argparse.ArgumentParser(
        prog=program_name(), description="Early-exit inference for Hugging Face encoder classifiers."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for names, add in _COMMANDS:
        if only is None or only in names:
            add(commands)
    for name, line in (listed or {}).items():
        if only is None or only == name:
            commands.add_parser(name, help=line, add_help=False).set_defaults(run=_run_through_eek)
    return parser


def _add_classify(commands) -> None:
    classify = commands.add_parser(
        "classify",
        help="classify the texts of a file",
        description=(
            "Classify every row of INPUT with the early-exit model MODEL and write OUTPUT: every input column, "
            "then label (the id2label name of the prediction; empty for a regression head), score (its "
            "probability; the predicted value for a regression head), exit_layer and layers_run; a multi-label "
            "model writes as label the labels of probability above 0.5 (comma-separated), as score the highest "
            "label probability, and a last column scores with every label's probability (JSON). INPUT and "
            "OUTPUT are .csv, .tsv, .jsonl or .parquet. Empty or null texts are classified as the empty text "
            "(a warning names their rows). OUTPUT is written in chunks as rows are classified; after an "
            "interruption, the same command with --resume continues it (OUTPUT.eek-progress.json records "
            "what is done). Errors: one line starting with 'error:', exit status 2."
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
    classify.add_argument("--pair-column", default=None, help="column holding the second text of a pair (optional)")
    classify.add_argument(
        "--policy",
        default=None,
        help='exit policy, e.g. "Entropy(0.3)" or "Patience(2)": '
        "needed for a plain classifier, replaces a saved model's policy",
    )
    classify.add_argument("--backend", default=None, help="auto, torch, cpp, triton or cuda (default: the saved one)")
    add_base_options(classify)
    add_engine_options(classify, CLASSIFY_ENGINE_DEFAULTS, CLASSIFY_ENGINE_FLAGS)
    classify.add_argument(
        "--resume",
        action="store_true",
        help="continue the OUTPUT an interrupted run of the same command left, from its first row not written",
    )
    classify.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    classify.add_argument(
        "--chunk-rows", type=int, default=4096, metavar="N", help="rows read and written at a time (default: 4096)"
    )
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
    classify.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch's CPU threads for the layer calls, --engine local (default: torch's choice, one per core)",
    )
    add_audit_options(classify, "rows", "on stderr (each audited row's in a last column, audit_disagreement)")
    add_recertify_options(classify, "rows")
    classify.set_defaults(run=_classify)


#: each module's commands and the function that adds their parsers, in the order ``--help`` lists them
_COMMANDS = (
    (("classify",), _add_classify),
    (("serve",), add_serve_command),
    (("fit", "calibrate", "evaluate"), add_fit_commands),
)


def _command_of(argv) -> str | None:
    """The command ``argv`` names (its first word, where it is not an option such as ``--help``), else None."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return str(argv[0]) if argv and not str(argv[0]).startswith("-") else None


def _run_through_eek(args) -> int:
    raise CliError(f"{args.command} is a command of eek (earlyexit_kernels.__main__), not of this parser")


def main(argv=None, listed: dict[str, str] | None = None) -> int:
    # Only the named command's options are built (``eek fit`` builds no server options); a name no module owns
    # gets the whole parser, whose error lists every command.
    command = _command_of(argv)
    known = {name for names, _ in _COMMANDS for name in names} | set(listed or {})
    args = build_parser(listed, only=command if command in known else None).parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weights' loading bar is not ours to show
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args)
    except (CliError, ColumnError, ModelFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run again with --resume to continue", file=sys.stderr)
        return 130


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _classify(args) -> int:
    from earlyexit_kernels.integrations.table_io import TableError, need_pyarrow, table_format

    for name in ("chunk_rows", "workers"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1")
    checked_engine(engine_keywords(args, CLASSIFY_ENGINE_FLAGS))  # EngineConfig's words, before anything is read
    args.audit = audit_options(args)
    if args.engine == "ray":  # reads files or folders; OUTPUT is a folder (Parquet unless named .csv / .jsonl)
        if args.threads is not None:
            raise CliError("--threads sets this process's threads: use it with --engine local")
        return _classify_on_ray(args)
    set_threads(args.threads)
    try:
        table_format(args.input)
        table_format(args.output)
        need_pyarrow()  # before the model is loaded
    except TableError as error:
        raise CliError(str(error)) from None
    try:
        return _classify_locally(args)
    except TableError as error:
        raise CliError(str(error)) from None
    except OSError as error:  # reading errors are TableErrors: this is OUTPUT (a full disk, no permission)
        progress = Path(args.output + ".eek-progress.json")
        kept = "; the rows written so far are kept: run again with --resume" if progress.exists() else ""
        raise CliError(f"cannot write {args.output}: {error}{kept}") from None


def _classify_locally(args) -> int:
    from earlyexit_kernels.engine.entry.classify import classify
    from earlyexit_kernels.integrations.table_io import ChunkWriter, check_writable, read_chunks

    # The input is checked before the (slower) model is loaded and before OUTPUT is touched.
    text_columns = [name for name in (args.text_column, args.pair_column) if name]
    columns = InputColumns(args.text_column, args.pair_column, audited=bool(getattr(args, "audit_fraction", 0)))
    first_chunk = read_chunks(args.input, 1, text_columns=text_columns)
    probe = next(first_chunk)
    first_chunk.close()
    columns.check(probe, args.input)
    check_writable(args.output, probe)
    model, tokenizer = load_model(args.model, args.policy, args.backend, dtype=args.dtype, device=args.device)
    watch = None
    online = recertify_options(args, args.audit, local=True, multi_label=is_multi_label(model.config))
    if args.audit:
        from earlyexit_kernels.engine.entry.audit import AuditWatch, audit_config

        watch = AuditWatch(audit_config(args.audit))  # the options as create_app takes them, one AuditConfig
    tables: deque = deque()  # input chunks whose rows are being classified, in order

    def inputs():  # read from the first row not yet written, once iterated (after the writer exists)
        first_row = row = writer.rows_done
        for table in read_chunks(args.input, args.chunk_rows, skip_rows=first_row, text_columns=text_columns):
            tables.append(table)
            yield from columns.items(table, row)
            row += table.num_rows

    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        predictions = classify(
            model,
            inputs(),
            tokenizer=tokenizer,
            **engine_keywords(args, CLASSIFY_ENGINE_FLAGS),
            progress=show_progress,
            audit=watch,
            recertify=online["recertify"] or False,
        )
    except ValueError as error:  # the engine's options, checked before OUTPUT is touched
        raise CliError(str(error)) from None
    run = {"input": str(Path(args.input).resolve()), "text_column": args.text_column, "pair_column": args.pair_column}
    writer = ChunkWriter(args.output, resume=args.resume, overwrite=args.overwrite, run=run)
    first_row = writer.rows_done
    start, done, layers, ready = time.perf_counter(), 0, 0, []

    def flush(final: bool = False):
        nonlocal ready
        while tables and (len(ready) >= tables[0].num_rows or final):
            table = tables.popleft()
            chunk, ready = ready[: table.num_rows], ready[table.num_rows :]
            writer.write(with_predictions(table, chunk, model.config, audited=watch is not None))

    for prediction in predictions:
        ready.append(prediction)
        done += 1
        layers += prediction.exit_layer
        flush()
    flush(final=True)
    writer.finish()
    elapsed = time.perf_counter() - start
    columns.warn_about_empty_texts()
    mean = f", mean exit layer {layers / done:.2f} of {model.config.num_hidden_layers}" if done else ""
    resumed = f" (resumed after row {first_row})" if first_row else ""
    print(
        f"classified {done} rows{resumed} in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.0f} rows/s){mean} "
        f"-> {args.output}",
        file=sys.stderr,
    )
    if watch is not None:
        print(watch.describe(), file=sys.stderr)
    if predictions.certificate is not None:
        print(predictions.certificate.describe(), file=sys.stderr)
        if online["audit_record"] is not None and predictions.certificate.epoch_rows:
            rows = predictions.certificate.save_audit(online["audit_record"])
            print(f"audit record: {rows} audited rows -> {online['audit_record']}", file=sys.stderr)
    return 0


def _classify_on_ray(args) -> int:
    if args.resume:
        raise CliError("--resume is for the local engine; a Ray run writes its OUTPUT folder anew")
    try:
        from earlyexit_kernels.integrations.ray_data import classify_files
    except ImportError as error:
        raise CliError(f"--engine ray needs Ray Data (the ray extra): {install_line('ray')} ({error})") from None
    if Path(args.output).exists() and not args.overwrite:
        raise CliError(f"output {args.output} exists; pass --overwrite to replace it")
    load_model(
        args.model, args.policy, args.backend, dtype=args.dtype, device=args.device
    )  # the actors load it too: fail here, with a clear message
    try:
        from earlyexit_kernels.integrations.ray_data import input_files

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
        device=args.device,
        dtype=args.dtype,
        **args.audit,
        **_ray_recertify(args),
    )
    elapsed = time.perf_counter() - start
    print(
        f"classified {summary['rows']} rows on Ray ({args.workers} workers) in {elapsed:.1f} s; "
        f"{summary['errors']} rows could not be classified (see the error column) -> {args.output}",
        file=sys.stderr,
    )
    if "audit" in summary:
        audit = summary["audit"]
        print(
            f"audit: {audit['audited']} rows also run by the full model, disagreement "
            f"{100 * (audit['rate'] or 0.0):.2f}%, upper {100 * audit['confidence']:g}% bound {100 * audit['bound']:.2f}%"
            + ("" if audit["budget"] is None else f", budget {100 * audit['budget']:g}%"),
            file=sys.stderr,
        )
    return 0


def _ray_recertify(args) -> dict:
    """Ray Data: each actor re-certifies on its own audited rows (its own certificate)."""
    if args.audit_record is not None:
        raise CliError("--audit-record is written by one process: use it with --engine local")
    online = recertify_options(args, args.audit, local=False)
    return {"recertify": online["recertify"]} if args.audit else {}
