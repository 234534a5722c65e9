"""``eek fit``, ``eek calibrate`` and ``eek evaluate``: from a data file to a served model.

``fit MODEL TRAIN_FILE OUTPUT_DIR`` trains the exit heads of a fine-tuned classifier on the
rows of a data file (labelled, or not: then the heads learn to agree with the model's own
final classifier), certifies the exit threshold on calibration rows no training step saw (a
share of TRAIN_FILE kept out, or ``--calibration FILE``) and writes a patched model folder that
``eek classify`` and ``eek serve`` load. ``calibrate FOLDER FILE`` certifies such a folder's
threshold anew on other rows, its heads fixed, and writes it back. ``evaluate MODEL FILE``
measures a model on a data file: accuracy (with labels) or agreement with the full model
(without), mean layers, the exit histogram and sequences/s.

Errors a user can fix are one line on stderr starting with ``error:`` and exit status 2,
as for the other commands (:mod:`earlyexit_kernels.integrations.cli`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from earlyexit_kernels._fit_fields import HEAD_CHOICES
from earlyexit_kernels._method_names import METHODS, UNLABELLED_METHODS
from earlyexit_kernels.integrations.cli_options import (
    FIT_DEFAULTS,
    add_base_options,
    add_fit_options,
    add_int8_layers_option,
    add_int8_traffic_option,
    checked,
)
from earlyexit_kernels.patching.fit_record import SAVED

__all__ = [
    "add_commands",
    "CALIBRATE_DEFAULTS",
    "CALIBRATE_SHOWN",
    "FIT_FLAGS",
    "HEAD_CHOICES",
    "METHODS",
    "UNLABELLED_METHODS",
]

#: the fit settings ``eek fit`` takes as options (their help, bound and default: the fields',
#: :mod:`~earlyexit_kernels.integrations.cli_options`), in the order ``--help`` lists them
FIT_FLAGS = (
    "max_length",
    "progress",
    "method",
    "pooling",
    "head",
    "max_drop",
    "confidence",
    "guarantee",
    "max_changed",
    "calibration_fraction",
    "validation_split",
    "tries",
    "epochs",
    "lr",
    "batch_size",
    "seed",
)
#: ``eek calibrate``'s defaults: ``Recalibration``'s, the settings object of ``calibrate_folder`` (the calibration
#: goal's: the folder's saved values; ``max_drop`` None: the saved one), and what the goal's are said to be where the
#: folder has no certificate (the library's ``DEFAULT_GOAL``); ``python_tests/test_fit_options.py`` holds both to
#: the objects
CALIBRATE_DEFAULTS = {"max_drop": None, "confidence": SAVED, "guarantee": SAVED, "max_changed": SAVED, "risk": "auto"}
CALIBRATE_SHOWN = {
    "max_drop": "FOLDER's certificate's, else 1",
    "confidence": "FOLDER's certificate's, else 0.95",
    "guarantee": "FOLDER's certificate's, else probable",
    "max_changed": "FOLDER's certificate's, else none",
}

# -- the command line ---------------------------------------------------------------------------


def add_commands(commands) -> None:
    """Add ``fit``, ``calibrate`` and ``evaluate`` to the subcommands of ``eek``."""
    _add_fit(commands)
    _add_calibrate(commands)
    _add_evaluate(commands)


def _add_data_options(parser, *, for_fit: bool) -> None:
    parser.add_argument("--text-column", default="text", help="column holding the texts (default: text)")
    parser.add_argument("--pair-column", default=None, help="column holding the second text of a pair (optional)")
    parser.add_argument(
        "--label-column",
        default=None,
        help="column holding the labels: the model's label names or class ids 0..C-1 (default: label, when "
        + (
            "the file has it; without labels the heads learn the model's own predictions)"
            if for_fit
            else "the file has it; without labels, agreement with the full model is measured)"
        ),
    )
    add_fit_options(parser, ("max_length",), FIT_DEFAULTS)
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N", help="torch's CPU threads (default: torch's choice)"
    )
    add_fit_options(parser, ("progress",), FIT_DEFAULTS)


def _add_fit(commands) -> None:
    fit = commands.add_parser(
        "fit",
        help="train and calibrate the exit heads of a classifier on a data file",
        description=(
            "Train the exit heads of the fine-tuned classifier MODEL on TRAIN_FILE (.csv, .tsv, .jsonl, "
            ".parquet), certify the exit threshold on calibration rows that no training step saw (the most "
            "aggressive threshold whose loss is at most --max-drop points with probability --confidence; rows "
            "kept out of TRAIN_FILE, or the classifier's own unseen rows given with --calibration) and write "
            "OUTPUT_DIR: a patched model folder with its tokenizer, which `eek classify`, `eek serve`, "
            "`eek evaluate`, `eek calibrate` and eek.from_pretrained load. Without a label column the heads learn "
            "to agree with the model's own final classifier and the budget is on that agreement. Rows the "
            "classifier was fine-tuned on make every exit look worse than it is and cost layers: give "
            "--calibration rows it never saw where you have them. Errors: one line starting with 'error:', exit "
            "status 2."
        ),
    )
    fit.add_argument("model", metavar="MODEL", help="a Hugging Face *ForSequenceClassification folder, fine-tuned")
    fit.add_argument("train", metavar="TRAIN_FILE", help="the training rows (.csv, .tsv, .jsonl, .parquet)")
    fit.add_argument("output", metavar="OUTPUT_DIR", help="the folder to write the patched model to")
    _add_data_options(fit, for_fit=True)
    add_fit_options(
        fit, ("method", "pooling", "head", "max_drop", "confidence", "guarantee", "max_changed"), FIT_DEFAULTS
    )
    fit.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help="rows the classifier never trained on (its validation split, or a sample of what it will serve; "
        "labelled or not, same columns) to certify the threshold on; every row of TRAIN_FILE then trains the heads",
    )
    fit.add_argument(
        "--unlabelled",
        default=None,
        metavar="FILE",
        help="unseen rows without labels, with the same text columns (e.g. a sample of what it will serve): in the "
        "certificate beside the calibration rows (accuracy lost: by prediction-powered inference where the "
        "validation rows say it certifies fewer layers, else the labelled rows alone, said in the report; "
        "agreement: as more calibration rows). A --calibration file's rows with an empty label cell count the same",
    )
    add_fit_options(fit, ("calibration_fraction",), FIT_DEFAULTS)
    held = fit.add_mutually_exclusive_group()
    held.add_argument("--validation", default=None, metavar="FILE", help="validation rows, same columns")
    add_fit_options(held, ("validation_split",), FIT_DEFAULTS)
    add_fit_options(fit, ("tries", "epochs", "lr", "batch_size", "seed"), FIT_DEFAULTS)
    fit.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    # int8: the heads fitted on the int8 encoder's hidden states and certified on it against the float32 full model
    # (integrations/int8_fit.py); the folder keeps the float32 weights
    add_base_options(fit, dtypes=("float32", "bfloat16", "int8"))
    add_int8_layers_option(
        fit,
        "each installed runtime timed on a few training rows on this CPU, in batches and one at a time (--traffic); "
        "the family's kept unless another is faster in 10 of up to 12 rounds; recorded with its timings",
    )
    add_int8_traffic_option(fit)
    fit.set_defaults(run=_fit_command)


def _add_calibrate(commands) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="certify a fitted folder's exit threshold anew on other rows",
        description=(
            "Certify the exit threshold of FOLDER (written by eek fit) anew on FILE's rows, with its heads fixed: "
            "the most aggressive threshold of the same fixed grid whose loss is at most --max-drop points with "
            "probability --confidence for rows like FILE's, as eek fit certifies. Give rows the classifier never "
            "trained on (its validation split, a sample of what it serves), labelled (accuracy lost against the "
            "full model) or not (disagreement with it). FOLDER's policy and eek_fit.json are rewritten in place, "
            "so eek serve and its audit watch use the new certificate; a result that certifies no saving (the "
            "target not met, or every layer run) leaves FOLDER as it was and says so, unless --force. Errors: one line starting with 'error:', "
            "exit status 2."
        ),
    )
    calibrate.add_argument("folder", metavar="FOLDER", help="a model folder written by eek fit")
    calibrate.add_argument(
        "data", metavar="FILE", nargs="?", help="the rows to certify on (.csv, .tsv, .jsonl, .parquet)"
    )
    calibrate.add_argument(
        "--from-audit",
        default=None,
        metavar="RECORD",
        help="certify on the audited rows a server recorded (eek serve --audit-record RECORD: what it served since "
        "its last pull-back, every head's logits) instead of FILE: the served certificate written back, so that a "
        "restart keeps it",
    )
    calibrate.add_argument(
        "--force",
        action="store_true",
        help="write the result even where it certifies no saving (the target not met, or every layer run); "
        "without it FOLDER keeps its policy then, and the command says why",
    )
    _add_data_options(calibrate, for_fit=False)
    calibrate.add_argument(
        "--unlabelled",
        default=None,
        metavar="FILE",
        help="unseen rows without labels, with FILE's text columns: in the certificate beside FILE's rows "
        "(accuracy lost: by prediction-powered inference; agreement: as more rows). FILE's rows with an empty "
        "label cell count the same",
    )
    add_fit_options(
        calibrate, ("max_drop", "confidence", "guarantee", "max_changed"), CALIBRATE_DEFAULTS, CALIBRATE_SHOWN
    )
    add_fit_options(calibrate, ("risk",), CALIBRATE_DEFAULTS)
    calibrate.add_argument("--batch-size", type=int, default=64, metavar="N", help="rows per batch (default: 64)")
    add_base_options(calibrate)
    add_int8_layers_option(
        calibrate,
        "the layers the folder's record names where they run here, else ONNX Runtime where it is "
        "installed, else PyTorch",
    )
    calibrate.set_defaults(run=_calibrate_command)


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="accuracy, mean layers and speed of an early-exit model on a data file",
        description=(
            "Classify every row of FILE with the early-exit model MODEL, batch by batch on length-sorted "
            "batches, and print accuracy (with a label column) or agreement with the full model (without), "
            "mean layers run, the exit layer histogram and sequences/s. --compare also runs the unpatched "
            "model on the same batches, interleaved, and prints its sequences/s and the speed-up."
        ),
    )
    evaluate.add_argument(
        "model",
        metavar="MODEL",
        help="a patched model folder (e.g. written by eek fit), or a plain Hugging Face classifier folder with --policy",
    )
    evaluate.add_argument("data", metavar="FILE", help="the rows to classify (.csv, .tsv, .jsonl, .parquet)")
    _add_data_options(evaluate, for_fit=False)
    evaluate.add_argument(
        "--policy",
        default=None,
        help='exit policy, e.g. "Entropy(0.3)": required for a plain classifier folder, replaces a saved one',
    )
    evaluate.add_argument("--backend", default=None, help="auto, torch, cpp, triton or cuda (default: the saved one)")
    add_base_options(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=32, metavar="N", help="rows per batch (default: 32)")
    evaluate.add_argument(
        "--compare", action="store_true", help="time the unpatched model on the same batches too, interleaved"
    )
    evaluate.set_defaults(run=_evaluate_command)


def _errors_to_exit_status(run):
    """Run ``run()``; a user's error is one line on stderr and status 2."""
    from earlyexit_kernels.integrations.model_folder import ModelFolderError
    from earlyexit_kernels.training.fit_texts import FitError
    from earlyexit_kernels.training.labelled_texts import DataError

    try:
        return run()
    except (FitError, DataError, ModelFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _fit_command(args) -> int:
    return _errors_to_exit_status(lambda: _fit(args))


def _evaluate_command(args) -> int:
    return _errors_to_exit_status(lambda: _evaluate(args))


def _calibrate_command(args) -> int:
    return _errors_to_exit_status(lambda: _calibrate(args))


def _common_checks(args, names=("batch_size", "max_length", "threads", "epochs")) -> None:
    """``names`` (options' destinations) at least 1 where given, in the words of ``eek fit``'s FitConfig (which
    checks ``eek fit``'s own)."""
    from earlyexit_kernels.training.fit_config import check_count
    from earlyexit_kernels.training.fit_texts import FitError

    for name in names:
        value = getattr(args, name, None)
        if name != "threads":
            check_count(name, value)
        elif value is not None and value < 1:
            raise FitError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def _progress_on(args) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


def _fit(args) -> int:
    from earlyexit_kernels.integrations.fit_folder import fit_folder
    from earlyexit_kernels.integrations.table_io import read_labelled
    from earlyexit_kernels.training.fit_config import VALIDATION_SPLIT, FitConfig, check_method_labels
    from earlyexit_kernels.training.fit_texts import FitError
    from earlyexit_kernels.training.labelled_texts import split_rows

    _common_checks(args, names=("threads",))
    given = {name: getattr(args, name) for name in FIT_FLAGS}
    given["progress"] = _progress_on(args)
    given["validation_split"] = None if args.validation is not None else (args.validation_split or VALIDATION_SPLIT)
    config = checked(FitConfig, given)  # every setting checked by the object, before a file is read
    output = Path(args.output)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())) and not args.overwrite:
        raise FitError(f"OUTPUT_DIR {output} exists; pass --overwrite to replace it")
    # The data is read and checked before the (slower) model is loaded.
    label_column = args.label_column or "label"
    columns = dict(text_column=args.text_column, pair_column=args.pair_column, label_column=label_column)
    train = read_labelled(args.train, **columns, label_required=args.label_column is not None)
    calibration = None
    if args.calibration is not None:
        calibration = read_labelled(args.calibration, **columns, label_required=False)
    unlabelled = _unlabelled(args)
    validation = None  # split from train by fit_folder, at each try's seed
    if args.validation is not None:
        validation = read_labelled(args.validation, **columns, label_required=train.labels is not None)
        if train.labels is None and validation.labels is not None:
            validation.labels = None  # the heads learn agreement: calibrate on agreement too
    else:
        split_rows(len(train), config.validation_split, args.seed)  # a file too small to split: said before loading
    if train.labels is None:
        check_method_labels(
            args.method,
            False,
            f"{args.train} has none (no column {label_column!r})",
            ", or give the label column with --label-column",
        )
        print(
            f"{args.train} has no column {label_column!r}: the heads learn the model's own predictions and the "
            f"threshold is calibrated on agreement with the full model",
            file=sys.stderr,
        )
    report = fit_folder(
        args.model,
        train,
        validation,
        str(output),
        config=config,
        calibration=calibration,
        unlabelled=unlabelled,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        int8_layers=args.layers,
        int8_traffic=args.traffic,
    )
    for line in report.summary():
        print(line)
    base = ""  # what the commands below add: the base the folder was certified on, where not as saved
    if args.dtype == "int8":
        from earlyexit_kernels.patching.fit_record import FitRecord

        record = FitRecord.load(output)
        if record.int8_layers is not None:
            print(record.int8_layers["reason"])
            if "exit_graph_settings" in record.int8_layers:  # static layers: how their exit graph is compiled
                print(record.int8_layers["exit_graph_settings"]["reason"])
        print(
            f"fitted and certified on the int8 base (recipe {record.int8_recipe}) against the float32 "
            f"full model; the folder holds the float32 weights: serve it on int8 (--dtype int8)"
        )
        base = " --dtype int8"
    print(
        f"wrote {output}: eek classify {output} INPUT OUTPUT{base}, eek serve {output}{base}, "
        f"eek evaluate {output} FILE{base}"
    )
    return 0


def _evaluate(args) -> int:
    import copy

    from earlyexit_kernels.integrations.evaluation import evaluate
    from earlyexit_kernels.integrations.model_folder import load_model
    from earlyexit_kernels.integrations.table_io import read_labelled
    from earlyexit_kernels.patching.patch import policy_of, unpatch
    from earlyexit_kernels.training.fit_texts import max_length_for, warn_truncated
    from earlyexit_kernels.training.labelled_texts import encode, label_ids, length_sorted_batches

    _common_checks(args)
    data = read_labelled(
        args.data,
        text_column=args.text_column,
        pair_column=args.pair_column,
        label_column=args.label_column or "label",
        label_required=args.label_column is not None,
    )
    model, tokenizer = load_model(args.model, args.policy, args.backend, dtype=args.dtype, device=args.device)
    model.eval()
    labels = label_ids(data, model.config) if data.labels is not None else None
    encoded = encode(tokenizer, data, max_length_for(args.max_length, model, tokenizer))
    warn_truncated(encoded)
    batches = length_sorted_batches(encoded, labels, args.batch_size)
    full = None
    if args.compare or labels is None:  # agreement needs the full model's answers
        full = unpatch(copy.deepcopy(model))
    result = evaluate(model, batches, full_model=full, progress=_progress_on(args))
    if not args.compare:
        result.full_seconds = None  # ran for agreement only, not asked to be timed
    print(f"policy: {policy_of(model).to_code(4)}")
    for line in result.summary():
        print(line)
    return 0


def _calibrate(args) -> int:
    from earlyexit_kernels.calibration.select import Goal
    from earlyexit_kernels.integrations.recertify_folder import Recalibration, calibrate_folder
    from earlyexit_kernels.integrations.table_io import read_labelled
    from earlyexit_kernels.training.calibrate_texts import DEFAULT_GOAL
    from earlyexit_kernels.training.fit_texts import FitError

    _common_checks(args, names=("threads",))
    # each setting given checked by its object before FILE is read: the Recalibration's, and the Goal, where these
    # say 'saved' with a folder's without a certificate (DEFAULT_GOAL; calibrate_folder makes it again with the
    # folder's own)
    asked = dict(max_drop=args.max_drop, confidence=args.confidence, guarantee=args.guarantee, force=args.force)
    names = ("batch_size", "max_length", "dtype", "device", "risk", "max_changed")
    settings = checked(
        Recalibration, {**asked, **{name: getattr(args, name) for name in names}}, int8_layers=args.layers
    )
    goal = {name: getattr(args, name) for name in CALIBRATE_SHOWN}
    saved = {name for name, value in goal.items() if value == SAVED or (name == "max_drop" and value is None)}
    checked(Goal, {name: getattr(DEFAULT_GOAL, name) if name in saved else value for name, value in goal.items()})
    if (args.data is None) == (args.from_audit is None):
        raise FitError("give FILE (the rows to certify on) or --from-audit RECORD, one of them")
    if args.from_audit is not None:
        from earlyexit_kernels.calibration.online import RecertifyError

        if args.unlabelled is not None:
            raise FitError("--unlabelled joins FILE's rows; an audit record's rows carry no labels: leave it out")
        if args.layers != "auto":
            raise FitError(
                "--layers chooses the int8 layers; an audit record is certified as it was served (its logits as "
                "recorded): leave it out"
            )
        if args.max_changed not in (SAVED, None):
            raise FitError(
                "--max-changed is certified beside accuracy lost, on labels; an audit record's rows carry none (its "
                "risk is the answers changed, at --max-drop): leave it out"
            )

        try:
            report = calibrate_folder(args.folder, settings=Recalibration(**asked), from_audit=args.from_audit)
        except RecertifyError as error:
            raise FitError(str(error)) from None
        for line in report.summary():
            print(line)
        if report.kept is None:
            print(
                f"rewrote {args.folder}: its policy and eek_fit.json hold the certificate served from {args.from_audit}"
            )
        return 0
    data = read_labelled(
        args.data,
        text_column=args.text_column,
        pair_column=args.pair_column,
        label_column=args.label_column or "label",
        label_required=args.label_column is not None,
    )
    report = calibrate_folder(args.folder, data, settings, unlabelled=_unlabelled(args), source=str(args.data))
    for line in report.summary():
        print(line)
    if report.kept is None:
        print(f"rewrote {args.folder}: its policy and eek_fit.json hold the new threshold and certificate")
        if args.dtype == "int8":  # calibrate_folder recorded the int8 base the certificate holds for
            from earlyexit_kernels.patching.fit_record import FILE, FitRecord

            print(f"int8 recipe: {FitRecord.load(args.folder).int8_recipe} (recorded in {FILE})")
    return 0


def _unlabelled(args):
    """``--unlabelled FILE``'s rows (their labels, if any, not read), or None."""
    from earlyexit_kernels.integrations.table_io import read_labelled
    from earlyexit_kernels.training.fit_texts import FitError
    from earlyexit_kernels.training.labelled_texts import DataError

    if args.unlabelled is None:
        return None
    try:
        return read_labelled(
            args.unlabelled, text_column=args.text_column, pair_column=args.pair_column, label_column=None
        )
    except DataError as error:
        raise FitError(f"--unlabelled: {error}") from None
