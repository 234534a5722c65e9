"""The options the commands share, checked: ``--device``, ``--dtype`` and ``--layers`` (every command that loads a
model), and ``eek classify``'s and ``eek serve``'s ``--threads``, ``--max-age``, the audit's flags and their
settings, online re-certification; and :class:`CliError`, the one-line error they raise.

The devices and dtypes are written out here, not imported from :mod:`earlyexit_kernels.engine.precision`, so that
``--help`` imports no torch; a test holds the two equal.
"""

from __future__ import annotations

import sys

from earlyexit_kernels.integrations.recertify_cli import recertify_options as _recertify_options

__all__ = [
    "DEVICES",
    "DTYPES",
    "INT8_LAYERS",
    "CliError",
    "add_base_options",
    "add_int8_layers_option",
    "add_audit_options",
    "audit_given",
    "audit_line",
    "audit_options",
    "is_multi_label",
    "max_age",
    "recertify_options",
    "set_threads",
]


DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "int8")
#: where the int8 layers run (``engine.precision.INT8_LAYERS``'s keys, and auto)
INT8_LAYERS = ("auto", "onnxruntime", "openvino", "torch")


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


def add_int8_layers_option(parser) -> None:
    """Add ``--layers`` (default auto): where the int8 layers run, the recipe the certificate is made on."""
    parser.add_argument(
        "--layers",
        choices=INT8_LAYERS,
        default="auto",
        help="with --dtype int8, where the int8 layers run, one activation scale per token and one weight scale per "
        "output channel: auto (default: ONNX Runtime where it is installed, else PyTorch), onnxruntime, openvino "
        "(openvino installed; faster on the CPUs measured with AMX: docs/serving.md) or torch. The certificate is "
        "made on those layers and recorded with them; eek serve runs them",
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
    settings object (:class:`~earlyexit_kernels.engine.audit.AuditConfig`), whose words the one-line error gives
    after the flag."""
    import dataclasses

    from earlyexit_kernels.engine.audit import AuditConfig

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
    from earlyexit_kernels.engine.aging import parse_max_age

    try:
        return parse_max_age(text)
    except ValueError as error:
        raise CliError(str(error)) from None


def add_guarantee_option(parser, default: str | None, default_says: str) -> None:
    """``--guarantee probable|expected``: what a certificate promises (``default_says``: the default, in words)."""
    parser.add_argument(
        "--guarantee",
        choices=("probable", "expected"),
        default=default,
        help=f"what the certificate promises (default: {default_says}): 'probable', with probability --confidence "
        "over the draw of the calibration rows, at most --max-drop points are lost; 'expected', at most --max-drop on "
        "average over that draw (conformal risk control: cheaper, and any one draw may lose more)",
    )
