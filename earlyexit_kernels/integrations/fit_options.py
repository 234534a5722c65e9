"""The fit's settings on the command line, made from their fields' metadata (as
:mod:`~earlyexit_kernels.integrations.engine_options` makes the engine's).

``eek fit`` and ``eek calibrate`` add their settings' options with :func:`add_fit_options`: each flag's help line,
metavar, choices and what None means come from the field's metadata (:data:`earlyexit_kernels._fit_fields.FIT_FIELDS`,
attached to :class:`~earlyexit_kernels.training.fit_config.FitConfig`'s, :class:`~earlyexit_kernels.training.fit_config.Training`'s
and the calibration :class:`~earlyexit_kernels.calibration.select.Goal`'s fields), its default from the entry point
(:data:`FIT_DEFAULTS`: ``FitConfig``'s; ``eek calibrate``'s: the folder's saved values, ``Recalibration``'s; a test
holds each equal to its object's). A value is checked by the settings object alone (:func:`checked`): a bad one
gets the object's own message, with the flag named, from every entry point. Free of torch: ``eek --help`` builds
these parsers.
"""

from __future__ import annotations

import argparse

from earlyexit_kernels._fit_fields import FIT_FIELDS
from earlyexit_kernels.patching.fit_record import SAVED

__all__ = ["FIT_DEFAULTS", "add_fit_options", "checked", "flag_of", "probability_or_off", "share_or_auto"]

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
    "epochs": None,
    "lr": None,
    "batch_size": 32,
    "max_length": None,
    "seed": 0,
    "progress": None,
}


def flag_of(name: str) -> str:
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
_PARSE = {
    "max_drop": float,
    "lr": float,
    "validation_split": float,
    "epochs": int,
    "batch_size": int,
    "max_length": int,
    "seed": int,
    "confidence": probability_or_off,
    "max_changed": probability_or_off,
    "calibration_fraction": share_or_auto,
}


def _shown(name: str, value) -> str:
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
        said = (shown or {}).get(name) or _shown(name, default)
        kwargs = {"default": default, "help": f"{meta['help']} (default: {said})"}
        if name == "progress":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta["choices"]:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["metavar"] = meta["metavar"]
            kwargs["type"] = _or_saved(_PARSE[name]) if default == SAVED else _PARSE[name]
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
        name = next((n for n in keywords if str(error).startswith(n + " ")), None)
        raise FitError(f"{flag_of(name)}: {error}" if name else str(error)) from None
