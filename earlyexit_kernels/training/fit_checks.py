"""What ``eek fit`` and ``eek calibrate`` check before they run: the confidence, and enough rows to certify.

Each check raises :class:`FitError` with what to change (the command line prints it as one
``error:`` line). How many rows a certificate needs is worked out once, in
:mod:`earlyexit_kernels.calibration.certify` (:func:`~earlyexit_kernels.calibration.certify.least_rows`);
here it is said in the command line's terms: ``--max-drop`` points, the rows of a training file
after its validation and calibration splits.
"""

from __future__ import annotations

import math

from earlyexit_kernels._method_names import UNLABELLED_METHODS
from earlyexit_kernels.calibration.certify import least_rows_for

__all__ = [
    "FitError",
    "check_confidence",
    "check_enough",
    "check_kept_out",
    "check_method_labels",
    "file_rows_to_certify",
    "held_out_rows",
    "least_rows_to_certify",
]


class FitError(ValueError):
    """A problem with what the user asked ``fit`` or ``evaluate`` for; the message says what to change."""


def check_confidence(confidence: float) -> None:
    """``--confidence``: a probability strictly between 0 and 1, or a :class:`FitError`."""
    from earlyexit_kernels.methods.risk_control import check_confidence as check

    try:
        check(confidence)
    except ValueError as error:
        raise FitError(f"--confidence: {error}") from None


def check_method_labels(method: str, labelled: bool, none: str = "the training rows have none", fix: str = "") -> None:
    """A :class:`FitError` where ``method`` trains with labels and the rows have none (``none``: which, in words;
    ``fix``: another way out, after the methods that learn without labels)."""
    if not labelled and method not in UNLABELLED_METHODS:
        raise FitError(
            f"--method {method} trains with labels and {none}; without labels use --method "
            f"{' or '.join(UNLABELLED_METHODS)} (the heads learn the model's own predictions){fix}"
        )


def least_rows_to_certify(max_drop: float, confidence: float, guarantee: str = "probable") -> int:
    """The calibration rows below which not even a policy that never errs is certified (at ``max_drop`` points,
    under ``guarantee``)."""
    least = least_rows_for(max_drop / 100.0, confidence, guarantee)
    if least is None:
        raise FitError(
            f"--max-drop {max_drop:g} cannot be certified: no number of rows tells a zero loss from a tiny one"
        )
    return least


def check_enough(rows: int, max_drop: float, confidence: float, what: str, guarantee: str = "probable") -> None:
    """A :class:`FitError` when ``rows`` (``what``, in words) cannot certify ``max_drop`` points at ``confidence``
    (or in expectation, ``guarantee="expected"``)."""
    least = least_rows_to_certify(max_drop, confidence, guarantee)
    if rows < least:
        raise FitError(
            f"{rows} {what} cannot certify a drop of at most {max_drop:g} points with confidence {confidence:g}: even "
            f"a model that never errs needs {least} rows. Give at least {least} rows, a larger --max-drop, a lower "
            f"--confidence, or --confidence off (an uncertified threshold)"
        )


def held_out_rows(count: int, fraction: float) -> int:
    """How many of ``count`` rows :func:`~earlyexit_kernels.training.labelled_texts.split_rows` holds out."""
    return round(count * fraction)


def file_rows_to_certify(least: int, calibration_fraction: float, validation_split: float | None) -> int:
    """The fewest rows of a training file whose calibration share holds ``least`` rows, after a
    ``validation_split`` (None: none) is split off the file first, with the same rounding as the splits."""
    rows = max(1, math.ceil(least / calibration_fraction) - 2)
    while True:
        training = rows - (held_out_rows(rows, validation_split) if validation_split is not None else 0)
        if held_out_rows(training, calibration_fraction) >= least:
            return rows
        rows += 1


def check_kept_out(
    training: int,
    held: int,
    max_drop: float,
    confidence: float,
    fraction: float,
    validation_split: float | None,
    guarantee: str = "probable",
) -> None:
    """``held`` calibration rows kept out of ``training + held`` must be enough to certify anything."""
    least = least_rows_to_certify(max_drop, confidence, guarantee)
    if held < least:
        needed = file_rows_to_certify(least, fraction, validation_split)
        after = "" if validation_split is None else f" after its --validation-split of {validation_split:g}"
        raise FitError(
            f"{held} calibration rows ({fraction:g} of the {training + held} training rows{after}) cannot certify a "
            f"drop of at most {max_drop:g} points with confidence {confidence:g}: even a model that never errs needs "
            f"{least} rows. Give a training file of at least {needed} rows, rows the "
            f"classifier never trained on with --calibration FILE, a larger --max-drop, a lower --confidence, or "
            f"--confidence off (an uncertified threshold chosen on the validation rows)"
        )
