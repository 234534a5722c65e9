"""The options the commands share, checked: ``--device``, ``--dtype`` and ``--layers`` (every command that loads a
model), and ``eek classify``'s and ``eek serve``'s ``--threads``, ``--max-age``, the audit's flags and their
settings, online re-certification; and :class:`CliError`, the one-line error they raise.

The devices and dtypes are written out here, not imported from :mod:`earlyexit_kernels.engine.layers.precision`, so that
``--help`` imports no torch; a test holds the two equal.

The options made from the settings objects' fields, the same way for each object: each flag's help line,
metavar, choices and what None means come from the field's metadata, its default from the entry point, and a
bad value is refused by the object alone, in its own words with the flag named, on every entry point:

- the engine's (:class:`~earlyexit_kernels.engine.stream.engine_config.EngineConfig`; :func:`add_engine_options`,
  :func:`engine_keywords`, :func:`checked_engine`), for ``eek classify`` and ``eek serve`` with their defaults
  (``eek serve``'s :class:`~earlyexit_kernels.integrations.server.serve_settings.ServeSettings`, ``eek classify``'s
  ``eek.classify``);
- the fit's (:data:`earlyexit_kernels._fit_fields.FIT_FIELDS`, attached to
  :class:`~earlyexit_kernels.training.fit_config.FitConfig`'s, ``Training``'s and the calibration ``Goal``'s
  fields; :func:`add_fit_options`, :func:`checked`), for ``eek fit`` (:data:`FIT_DEFAULTS`: ``FitConfig``'s) and
  ``eek calibrate`` (the folder's saved values, ``Recalibration``'s); a test holds each entry point's defaults
  equal to its object's. Free of torch: ``eek --help`` builds these parsers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from earlyexit_kernels._fit_fields import FIT_FIELDS
from earlyexit_kernels.engine.stream.engine_config import EngineConfig
from earlyexit_kernels.integrations.recertify_cli import recertify_options as _recertify_options
from earlyexit_kernels.patching.fit_record import SAVED

__all__ = [
    "HTTP_FIELDS",
    "SERVE_HTTP_DEFAULTS",
    "add_http_options",
    "flagged",
    "FIT_DEFAULTS",
    "add_engine_options",
    "add_fit_options",
    "checked",
    "checked_engine",
    "engine_keywords",
    "flag_of",
    "probability_or_off",
    "share_or_auto",
    "DEVICES",
    "DTYPES",
    "INT8_LAYERS",
    "INT8_TRAFFIC",
    "CliError",
    "add_base_options",
    "add_int8_layers_option",
    "add_int8_traffic_option",
    "add_audit_options",
    "audit_given",
    "audit_line",
    "audit_options",
    "is_multi_label",
    "max_age",
    "add_int8_traffic_option",
    "recertify_options",
    "set_threads",
]


DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "int8")
#: where the int8 layers run (``engine.precision.INT8_LAYERS``'s keys, and auto)
INT8_LAYERS = ("auto", "onnxruntime", "openvino", "torch", "openvino-static")
#: the calls ``eek fit --dtype int8`` times the int8 runtimes on (``engine.layers.runtime_choice.TRAFFIC``), each
#: with what it is for
INT8_TRAFFIC = {
    "both": "batches and single texts, a runtime chosen only where it is faster on both",
    "batches": "batches alone, for a corpus (eek classify) or requests of many texts",
    "texts": "single texts alone, for requests of one text",
}


def add_base_options(parser, *, dtypes: tuple[str, ...] = DTYPES) -> None:
    """Add ``--device`` (default auto) and ``--dtype`` (default: as saved) to ``parser``."""
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the model runs: auto (default: the GPU where torch sees one, else the CPU), cpu or cuda",
    )
    int8 = (
        "; int8: the encoder's Linear layers dynamically quantized with the recipe the family needs (CPU only)"
        if "int8" in dtypes
        else ""
    )
    parser.add_argument(
        "--dtype",
        choices=dtypes,
        default=None,
        help=f"the base the layers run in: {', '.join(dtypes)} (default: as saved){int8}; the exit heads run fused "
        f"on it",
    )


def add_int8_layers_option(parser, auto: str) -> None:
    """Add ``--layers`` (default auto, which ``auto`` explains): where the int8 layers run, the recipe the
    certificate is made on."""
    parser.add_argument(
        "--layers",
        choices=INT8_LAYERS,
        default="auto",
        help=f"with --dtype int8, where the int8 layers run, one activation scale per token and one weight scale per "
        f"output channel: auto (default: {auto}), onnxruntime, openvino (openvino installed) or torch; or "
        "openvino-static: NNCF's static int8 on OpenVINO (one scale per activation tensor, set by eek fit on "
        "training rows and saved in the folder; openvino and nncf installed). The certificate is made on those "
        "layers and recorded with them; eek serve runs them",
    )


def add_int8_traffic_option(parser) -> None:
    """Add ``--traffic`` (default both): the calls the int8 runtimes are timed on, as the folder will be used."""
    parser.add_argument(
        "--traffic",
        choices=INT8_TRAFFIC,
        default="both",
        help="with --dtype int8 and --layers auto, the calls the runtimes are timed on, as the folder will be used: "
        + "; ".join(f"{name}: {what}" for name, what in INT8_TRAFFIC.items())
        + " (default: both). A runtime with a fixed cost a call can win batches and lose single texts; the choice and "
        "its timings are recorded in the folder",
    )


class CliError(Exception):
    """A problem with what the user asked for; the message says what to change."""


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op CPU threads (None: leave torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise CliError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def add_audit_options(command, what: str, where: str) -> None:
    command.add_argument(
        "--audit-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help=f"run a random fraction F in [0, 1] of the {what} through the full model too (the early exit's answers "
        f"unchanged) and report their disagreement with the early exit and its upper bound {where}, beside the "
        "budget; a warning says when the disagreements show the budget passed. Costs about F times the full "
        "model's time (default: 0, no audit)",
    )
    command.add_argument(
        "--audit-budget",
        type=float,
        default=None,
        metavar="POINTS",
        help=f"the audit's budget, in percentage points of {what} (1: 1%%); default: the certificate's of "
        "MODEL/eek_fit.json (eek fit), else none: the disagreement and its bound are reported, no budget, no warning",
    )
    command.add_argument(
        "--audit-confidence",
        type=float,
        default=None,
        metavar="P",
        help="confidence of the audit's bound (default: the certificate's of MODEL/eek_fit.json, else 0.95)",
    )


def audit_given(args) -> dict:
    """``--audit-fraction``, ``--audit-budget``, ``--audit-confidence`` as ``create_app``'s options, checked, as
    given (the budget a fraction; None where not given); ``{}`` without an audit. Each is checked by the audit's
    settings object (:class:`~earlyexit_kernels.engine.entry.audit.AuditConfig`), whose words the one-line error gives
    after the flag."""
    import dataclasses

    from earlyexit_kernels.engine.entry.audit import AuditConfig

    fraction, points, confidence = args.audit_fraction, args.audit_budget, args.audit_confidence
    budget = None if points is None else points / 100.0
    config = None
    for flag, given, field, value in (
        ("--audit-fraction", fraction, "fraction", fraction),
        ("--audit-budget", points, "budget", budget),
        ("--audit-confidence", confidence, "confidence", confidence),
    ):
        if given is None:
            continue
        try:
            config = AuditConfig(value) if config is None else dataclasses.replace(config, **{field: value})
        except ValueError as error:
            said = f"{given:g} percentage points" if field == "budget" else f"{given:g}"
            raise CliError(f"{flag} {said}: {error}") from None
    if fraction == 0.0:
        if points is not None or confidence is not None:
            raise CliError("--audit-budget and --audit-confidence set the audit: give --audit-fraction F (> 0) too")
        return {}
    return {"audit_fraction": fraction, "audit_budget": budget, "audit_confidence": confidence}


def audit_line(fraction: float, budget: float | None, confidence: float, source: str, what: str) -> str:
    """What the command line says of its audit, on stderr."""
    said = "no budget: the disagreement and its bound only" if budget is None else f"budget {100 * budget:g}%"
    return f"audit: {fraction:g} of the {what} also run by the full model; {said}, confidence {100 * confidence:g}% ({source})"


def audit_options(args, what: str = "rows") -> dict:
    """:func:`audit_given`, with the budget and confidence not given from MODEL's eek_fit.json certificate
    (said on stderr): ``eek classify``'s audit (``eek serve``'s: :meth:`~.server.serve_settings.ServeSettings.from_folder`)."""
    options = audit_given(args)
    if not options:
        return {}
    from earlyexit_kernels.integrations.model_folder import audit_settings

    budget, confidence, source = audit_settings(args.model, options["audit_budget"], options["audit_confidence"])
    print(audit_line(options["audit_fraction"], budget, confidence, source, what), file=sys.stderr)
    return {**options, "audit_budget": budget, "audit_confidence": confidence}


def recertify_options(args, audit: dict, **options) -> dict:
    """:func:`~earlyexit_kernels.integrations.recertify_cli.recertify_options`, its error one line."""
    try:
        return _recertify_options(args, audit, **options)
    except ValueError as error:
        raise CliError(str(error)) from None


def is_multi_label(config) -> bool:
    from earlyexit_kernels.integrations.labels import is_multi_label as multi_label  # imports torch: not for --help

    return multi_label(config)


def max_age(text: str):
    """``--max-age`` as ``create_app``'s ``max_age``; a bad value is a one-line error."""
    from earlyexit_kernels.engine.stream.aging import parse_max_age

    try:
        return parse_max_age(text)
    except ValueError as error:
        raise CliError(str(error)) from None


# ------------------------------------------------------------------ the engine's options, from EngineConfig's fields

_ENGINE_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig) if f.metadata.get("help")}


def _engine_parse(name: str):
    """The argparse type of a numeric field: a number of tokens for ``call_cost``, else a whole number
    (``--max-age``'s words are parsed by :func:`engine_keywords`)."""
    return float if name == "call_cost" else int


def _engine_shown(name: str, value) -> str:
    return _ENGINE_FIELDS[name].metadata["none"] if value is None else str(value)


def add_engine_options(parser, defaults: dict, names: tuple[str, ...]) -> None:
    """Add the flags of ``names`` (EngineConfig fields) to ``parser``, each with ``defaults[name]`` (the entry
    point's default, as the parser's; ``max_age`` as its text, e.g. ``"0"``)."""
    for name in names:
        meta = _ENGINE_FIELDS[name].metadata
        default = defaults[name]
        if name == "compile":
            parser.add_argument(flag_of(name), action="store_true", help=meta["help"])
            continue
        shown = default if name == "max_age" else _engine_shown(name, default)
        kwargs = {"default": default, "help": f"{meta['help']} (default: {shown})"}
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["metavar"] = meta["metavar"]
            if name != "max_age":  # its default is text, parsed by engine_keywords
                kwargs["type"] = _engine_parse(name)
        parser.add_argument(flag_of(name), **kwargs)


def engine_keywords(args, names: tuple[str, ...]) -> dict:
    """The parsed flags of ``names`` as EngineConfig keywords (``--max-age``'s text turned into its value)."""
    out = {name: getattr(args, name) for name in names}
    if "max_age" in out and isinstance(out["max_age"], str):
        out["max_age"] = max_age(out["max_age"])
    return out


def checked_engine(keywords: dict, **fixed) -> EngineConfig:
    """``EngineConfig(**keywords, **fixed)``; a bad value is a :class:`CliError` naming its flag in the
    object's own words (``--max-batch-size: max_batch_size must be an integer >= 1 or None, got 0``)."""
    try:
        return EngineConfig(**keywords, **fixed)
    except ValueError as error:
        raise CliError(flagged(error, keywords)) from None


def flagged(error: ValueError, keywords: dict) -> str:
    """A settings object's refusal with the flag of the field it names in front (``--max-queue: max_queue must
    be ...``); as it is where it names none of ``keywords``."""
    name = next((n for n in keywords if str(error).startswith(n + " ")), None)
    return f"{flag_of(name)}: {error}" if name else str(error)


# ------------------------------------------------------------------ eek serve's request limits, from HttpLimits' fields

#: what each of ``eek serve``'s request limits says, attached as metadata to
#: :class:`~earlyexit_kernels.integrations.server.serve_settings.HttpLimits`' fields (written here: the server
#: package loads starlette, which ``eek --help`` does not); their bounds are the object's
HTTP_FIELDS = {
    "max_queue": {"help": "most sequences waiting or in flight; beyond it requests get 429 at once", "metavar": "N"},
    "max_client_batch_size": {
        "help": "most inputs (or rerank texts) in one request; more get 413 naming this limit",
        "metavar": "N",
        "none": "--max-queue",
    },
    "max_body_bytes": {
        "help": "the largest request body taken; a larger one gets 413 before it is read whole (TEI's payload limit "
        "by default)",
        "metavar": "N",
    },
}
#: ``eek serve``'s defaults for them: ``HttpLimits``' (``python_tests/test_engine_options.py`` holds them equal)
SERVE_HTTP_DEFAULTS = {"max_queue": 1024, "max_client_batch_size": None, "max_body_bytes": 2_000_000}


def add_http_options(parser, defaults: dict = SERVE_HTTP_DEFAULTS) -> None:
    """Add ``--max-queue``, ``--max-client-batch-size`` and ``--max-body-bytes`` from :data:`HTTP_FIELDS`."""
    for name, meta in HTTP_FIELDS.items():
        default = defaults[name]
        shown = meta["none"] if default is None else default
        parser.add_argument(
            flag_of(name), type=int, default=default, metavar=meta["metavar"], help=f"{meta['help']} (default: {shown})"
        )


# ------------------------------------------------------------------ the fit's options, from the fit settings' fields

#: ``eek fit``'s defaults: :class:`~earlyexit_kernels.training.fit_config.FitConfig`'s, but ``progress`` (None: on
#: when stderr is a terminal) and ``validation_split`` (None: 0.1 without ``--validation``), which the command
#: decides (``python_tests/test_fit_options.py`` holds the rest equal to the object's)
FIT_DEFAULTS = {
    "method": "heads",
    "pooling": "auto",
    "head": "auto",
    "max_drop": 1.0,
    "confidence": 0.95,
    "guarantee": "probable",
    "max_changed": None,
    "calibration_fraction": "auto",
    "validation_split": None,
    "tries": 1,
    "epochs": None,
    "lr": None,
    "batch_size": 32,
    "max_length": None,
    "seed": 0,
    "progress": None,
}


def flag_of(name: str) -> str:
    """A settings field's flag: ``max_batch_size`` -> ``--max-batch-size``."""
    return "--" + name.replace("_", "-")


def share_or_auto(text: str) -> float | str:
    """``--calibration-fraction``: ``auto`` or a number (its bound: ``FitConfig``'s)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"auto or a fraction such as 0.25; got {text!r}") from None


def probability_or_off(text: str) -> float | None:
    """``--confidence`` and ``--max-changed``: ``off`` (None) or a number (their bounds: the ``Goal``'s)."""
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a probability such as 0.95, or off; got {text!r}") from None


def _or_saved(parse):
    """``parse``, or :data:`SAVED` (``eek calibrate``'s default, which argparse passes through here: the folder's
    certificate's)."""

    def parsed(text: str):
        return SAVED if text.strip().lower() == SAVED else parse(text)

    parsed.__name__ = parse.__name__  # argparse names the type in its refusal
    return parsed


#: how each numeric setting's text is read (its bound is the settings object's, not the parser's)
_FIT_PARSE = {
    "max_drop": float,
    "lr": float,
    "validation_split": float,
    "epochs": int,
    "tries": int,
    "batch_size": int,
    "max_length": int,
    "seed": int,
    "confidence": probability_or_off,
    "max_changed": probability_or_off,
    "calibration_fraction": share_or_auto,
}


def _fit_shown(name: str, value) -> str:
    if value is None:
        return FIT_FIELDS[name]["none"]
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_fit_options(parser, names: tuple[str, ...], defaults: dict, shown: dict | None = None) -> None:
    """Add the flags of ``names`` (fit settings' fields) to ``parser`` (or an argument group), each with
    ``defaults[name]`` as the parser's default and its help line said ``(default: ...)``: ``shown[name]`` where
    given (the entry point's words, e.g. ``eek calibrate``'s "FOLDER's certificate's, else 1"), else the value
    (None: what the field's metadata says None means). A default of :data:`SAVED` is read as the folder's."""
    for name in names:
        meta = FIT_FIELDS[name]
        default = defaults[name]
        said = (shown or {}).get(name) or _fit_shown(name, default)
        kwargs = {"default": default, "help": f"{meta['help']} (default: {said})"}
        if name == "progress":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta["choices"]:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["metavar"] = meta["metavar"]
            kwargs["type"] = _or_saved(_FIT_PARSE[name]) if default == SAVED else _FIT_PARSE[name]
        parser.add_argument(flag_of(name), **kwargs)


def checked(kind: type, keywords: dict, **fixed):
    """``kind(**keywords, **fixed)`` (a fit settings object: ``FitConfig``, ``Goal``, ``Recalibration``); a bad
    value is a :class:`~earlyexit_kernels.training.fit_config.FitError` in the object's own words, the flag named
    where they name the field (``--max-drop: max_drop must be >= 0 accuracy points, got -1.0: ...``; the words of
    ``FitConfig``'s own checks name it already: ``--lr must be a positive learning rate (lr=), got 0.0: ...``)."""
    from earlyexit_kernels.training.fit_config import FitError

    try:
        return kind(**keywords, **fixed)
    except ValueError as error:
        raise FitError(flagged(error, keywords)) from None
