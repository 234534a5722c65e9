"""The fit's settings, one module: what ``eek fit``, the library's fit and its training loop are asked for, each
a frozen dataclass checked once where it is made, and what is checked of the rows before they run.

- :class:`FitConfig`: the settings of one ``eek fit``. The command line
  (:mod:`earlyexit_kernels.integrations.fit_cli`) builds one from its options, once;
  :func:`~earlyexit_kernels.training.fit_texts.fit_model`, the library's entry point, takes one or its fields as
  keywords, and passes it along (to :func:`~earlyexit_kernels.training.fit_texts.prepare`, the calibration share and
  :func:`~earlyexit_kernels.training.fit.fit_heads`) instead of a dozen keywords at every step. The rows themselves
  (training, validation, calibration, unlabelled) are data, not settings:
  :class:`~earlyexit_kernels.training.fit_texts.FitData` carries them beside it.
- :class:`Training`: how a fit trains the heads (the part :func:`~earlyexit_kernels.training.fit.fit_exit_heads`
  takes too).
- :class:`TrainSettings`: one :func:`~earlyexit_kernels.training.train.train_exit_heads` call; the data (the
  batches, the validation batches) is not a setting, the loop takes it beside::

      train_exit_heads(model, batches, TrainSettings(method="pabee", epochs=3, lr=2e-5))
      train_exit_heads(model, batches, method="pabee", epochs=3, lr=2e-5)   # the same: the fields as keywords

- :func:`settings_of`: a settings object, or its fields given as keywords: the one way an entry point
  (:func:`~earlyexit_kernels.training.calibrate_model.calibrate`'s ``Goal``, ``train_exit_heads``, ``fit_model``,
  :func:`~earlyexit_kernels.integrations.recertify_folder.calibrate_folder`, the Ray Data classifier) turns either
  into the object; the object's fields stay accepted as keywords, not beside it.
- The checks ``eek fit`` and ``eek calibrate`` make before they run (:class:`FitError`, the command line prints it as
  one ``error:`` line): the confidence, the method against the labels, and enough rows to certify. How many rows a
  certificate needs is worked out once, in :mod:`earlyexit_kernels.calibration.certify`
  (:func:`~earlyexit_kernels.calibration.certify.least_rows_for`); here it is said in the command line's terms:
  ``--max-drop`` points, the rows of a training file after its validation and calibration splits.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from earlyexit_kernels._fit_fields import fit_field
from earlyexit_kernels._method_names import METHODS, UNLABELLED_METHODS
from earlyexit_kernels.calibration.certify import least_rows_for
from earlyexit_kernels.methods.losses import objective
from earlyexit_kernels.training.fit_tries import MAX_TRIES

__all__ = [
    "AUTO_SHARE",
    "CALIBRATION_FRACTION",
    "CONFIDENCE",
    "HALTING_LR",
    "OPTIMIZERS",
    "SCHEDULES",
    "TRAINS",
    "VALIDATION_SPLIT",
    "FitConfig",
    "FitError",
    "TrainSettings",
    "Training",
    "check_confidence",
    "check_count",
    "check_enough",
    "check_kept_out",
    "check_method_labels",
    "check_rate",
    "check_tries",
    "file_rows_to_certify",
    "held_out_rows",
    "least_rows_to_certify",
    "settings_of",
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


#: the confidence ``eek fit`` certifies its budget with unless told otherwise
CONFIDENCE = 0.95
#: the part of TRAIN_FILE ``eek fit`` holds out for validation where no ``--validation`` file is given
VALIDATION_SPLIT = 0.1
#: the part of the training rows ``eek fit`` keeps out to certify on where the share is not measured
CALIBRATION_FRACTION = 0.25
#: ``calibration_fraction`` that measures the share on the rows (:mod:`~earlyexit_kernels.training.share_probe`)
AUTO_SHARE = "auto"


@dataclass(frozen=True)
class Training:
    """How a fit trains the heads, one object: the part of :class:`FitConfig` that
    :func:`~earlyexit_kernels.training.fit.fit_exit_heads` takes too (its ``training``).

    ``method``: the recipe (:data:`~earlyexit_kernels._method_names.METHODS`); ``pooling`` / ``head``: the heads'
    (``"cls"``/``"mean"``, ``"model"``/``"mlp"``/``"cascade"``; ``"auto"``: tried and chosen; None: the model's);
    ``epochs``, ``lr``: every head-only stage's (None: the recipe's); ``seed``: everything drawn; ``progress``:
    bars. Each field checked here, once, in the words of :class:`FitConfig`'s refusals."""

    method: str = fit_field("method", "heads")
    pooling: str | None = fit_field("pooling", "auto")
    head: str | None = fit_field("head", "auto")
    epochs: int | None = fit_field("epochs", None)
    lr: float | None = fit_field("lr", None)
    seed: int = fit_field("seed", 0)
    progress: bool = fit_field("progress", False)

    def __post_init__(self) -> None:
        from earlyexit_kernels.engine.step.heads import HEAD_FORMS, HEAD_POOLINGS

        if self.method not in METHODS:
            _refuse("method", f"one of {', '.join(METHODS)}", self.method, "")
        for name, allowed in (("pooling", HEAD_POOLINGS), ("head", HEAD_FORMS)):
            value = getattr(self, name)
            if value is not None and value != "auto" and value not in allowed:
                raise FitError(f"{name} must be one of {', '.join(allowed)}, 'auto' or None; got {value!r}")
        check_rate("lr", self.lr)
        check_count("epochs", self.epochs)
        if not _whole(self.seed):
            _refuse("seed", "a whole number", self.seed, "an integer such as 0")


@dataclass(frozen=True)
class FitConfig:
    """The settings of one ``eek fit``; each field is the keyword of
    :func:`~earlyexit_kernels.training.fit_texts.fit_model` of the same name, which says what it does.

    ``method``: the recipe; ``pooling`` / ``head``: the heads' (``"auto"``: tried and chosen);
    ``max_drop``: the budget, in points; ``epochs``, ``lr``, ``batch_size``: the training's (None: the
    recipe's); ``max_length``: tokens a row keeps (None: the model's); ``seed``: everything drawn;
    ``progress``: bars; ``confidence``: of the certificate (None: uncertified); ``calibration_fraction``:
    the training rows kept out to certify on (``"auto"``: measured); ``validation_split``: the share of
    the user's file the validation rows were split from (None: they came from elsewhere); ``guarantee``: what
    the certificate promises, ``"probable"`` or ``"expected"``; ``max_changed``: the answers changed against the full
    model, in points, certified beside ``max_drop`` (labelled rows, with a ``confidence``; None: not bounded); ``tries``:
    fits at seeds ``seed``, ``seed + 1``, ..., each certified at a Bonferroni share of ``confidence``, the one of the
    fewest certified layers kept (:mod:`~earlyexit_kernels.training.fit_tries`; run by
    :func:`~earlyexit_kernels.integrations.fit_folder.fit_folder`, which loads the model anew for each)."""

    # each field's command-line metadata (help line, metavar, choices, what None means) is its entry of
    # _fit_fields.FIT_FIELDS, the same on Training's and the Goal's field of the setting: eek fit's and eek
    # calibrate's options are made from it (integrations/cli_options.py); the bounds are checked below, once
    method: str = fit_field("method", "heads")
    pooling: str | None = fit_field("pooling", "auto")
    head: str | None = fit_field("head", "auto")
    max_drop: float = fit_field("max_drop", 1.0)
    epochs: int | None = fit_field("epochs", None)
    lr: float | None = fit_field("lr", None)
    batch_size: int = fit_field("batch_size", 32)
    max_length: int | None = fit_field("max_length", None)
    seed: int = fit_field("seed", 0)
    progress: bool = fit_field("progress", False)
    confidence: float | None = fit_field("confidence", CONFIDENCE)
    calibration_fraction: float | str = fit_field("calibration_fraction", AUTO_SHARE)
    validation_split: float | None = fit_field("validation_split", None)
    guarantee: str = fit_field("guarantee", "probable")
    max_changed: float | None = fit_field("max_changed", None)
    tries: int = fit_field("tries", 1)

    def __post_init__(self) -> None:
        """Every setting checked here, once, before a row is read: a :class:`FitError` (a ``ValueError``) naming
        the setting as the command line spells it and as :func:`fit_model` does, its bound and what to give.
        The training's settings are checked by their :class:`Training`, the calibration's by their
        :class:`~earlyexit_kernels.calibration.select.Goal` (as for ``eek calibrate``)."""
        _ = self.training  # made, so checked
        check_count("batch_size", self.batch_size, optional=False)
        check_count("max_length", self.max_length)
        _ = self.goal  # made, so checked
        fraction = self.calibration_fraction
        if fraction != AUTO_SHARE and not (_number(fraction) and 0 < fraction < 1):
            _refuse(
                "calibration_fraction",
                f"strictly between 0 and 1, or {AUTO_SHARE}",
                fraction,
                f"a share such as {CALIBRATION_FRACTION:g}, or {AUTO_SHARE} (measured on the rows)",
                verb="lie",
            )
        if self.validation_split is not None and not (_number(self.validation_split) and 0 < self.validation_split < 1):
            _refuse(
                "validation_split", "strictly between 0 and 1", self.validation_split, "a share such as 0.1", verb="lie"
            )
        check_tries(self.tries, self.confidence, self.guarantee)

    @property
    def training(self) -> Training:
        """How the heads train: this config's :class:`Training` (what ``fit_exit_heads`` takes)."""
        return Training(
            method=self.method,
            pooling=self.pooling,
            head=self.head,
            epochs=self.epochs,
            lr=self.lr,
            seed=self.seed,
            progress=self.progress,
        )

    @property
    def goal(self):
        """What the calibration is asked for: this config's :class:`~earlyexit_kernels.calibration.select.Goal`;
        what it refuses is a :class:`FitError`."""
        from earlyexit_kernels.calibration.select import Goal

        try:
            return Goal(
                max_drop=self.max_drop,
                confidence=self.confidence,
                guarantee=self.guarantee,
                max_changed=self.max_changed,
            )
        except ValueError as error:
            raise FitError(str(error)) from None


def check_count(name: str, value, *, optional: bool = True) -> None:
    """``value`` of the setting ``name`` (``epochs``, ``batch_size``, ``max_length``) a whole number at least 1
    (or None where ``optional``), else the one refusal of it, for ``eek fit``, ``eek calibrate`` and the library."""
    if (value is not None or not optional) and not (_whole(value) and value >= 1):
        instead = "a number such as 32" + (", or None (the default)" if optional else "")
        _refuse(name, "a whole number, at least 1", value, instead)


def check_tries(tries, confidence: float | None, guarantee: str) -> None:
    """``--tries``: a whole number from 1 to :data:`~earlyexit_kernels.training.fit_tries.MAX_TRIES`; above 1 only
    with a ``probable`` certificate (it certifies the choice), else the one refusal of it saying what to change."""
    if not (_whole(tries) and 1 <= tries <= MAX_TRIES):
        _refuse("tries", f"a whole number from 1 to {MAX_TRIES}", tries, "a number such as 3, or 1 (one fit)")
    if tries > 1 and confidence is None:
        raise FitError(
            f"--tries {tries} keeps the try that certifies the fewest layers, which needs a certificate: give a "
            "--confidence (each try is certified at a share of it), or leave --tries out"
        )
    if tries > 1 and guarantee != "probable":
        raise FitError(
            f"--tries {tries} keeps the try whose calibration rows certified the fewest layers, which the "
            f"{guarantee} guarantee (a mean over the draw of those rows) does not cover: use --guarantee probable, "
            "or leave --tries out"
        )


def check_rate(name: str, value, *, zero: bool = False) -> None:
    """``value`` of the learning rate ``name`` positive and finite, or None (the recipe's), else the one refusal of
    it. ``zero``: ``0.0`` taken too (:class:`TrainSettings`: epochs run
    without learning, to measure the loss as it is)."""
    if value is not None and not (_number(value) and (value > 0 or (zero and value == 0))):
        _refuse(name, "a positive learning rate", value, "a rate such as 1e-3, or None (the method's recipe)")


def _number(value) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value) -> bool:
    """An integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _refuse(name: str, bound: str, got, instead: str, verb: str = "be") -> None:
    """The one form of a refused setting: ``--lr must be a positive learning rate (lr=), got 0: give ...``."""
    flag = "--" + name.replace("_", "-")
    raise FitError(f"{flag} must {verb} {bound} ({name}=), got {got!r}" + (f": give {instead}" if instead else ""))


OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("linear", "cosine", "constant")
#: which parameters learn (:func:`~earlyexit_kernels.training.train.select_trainable`)
TRAINS = ("all", "heads", "backbone", "below")
#: default learning rate of the halting heads (QExit, DACT) and SmartBERT's gates. They
#: start from a constant output (zero weights), far from where they must end: DACT's
#: halting logit starts at 2.2 and must move by 2-4 before any sequence can leave before
#: the last layers, which the backbone's learning rate (1e-5 to 1e-3) does not do in a
#: few hundred steps.
HALTING_LR = 3e-3


@dataclass(frozen=True)
class TrainSettings:
    """The settings of one :func:`~earlyexit_kernels.training.train.train_exit_heads` call (its docstring says what
    each does): ``method``, ``epochs``, ``lr``, ``halting_lr``, ``heads_lr``, ``weight_decay``,
    ``warmup_fraction``, ``max_grad_norm``, ``optimizer``, ``schedule``, ``trains``, ``loss_kwargs``,
    ``progress``, ``early_stopping``, ``cached``, ``batch_size``, ``seed``.

    Each field is checked here, once, as it is made: what can be checked without the model. ``epochs``,
    ``batch_size`` and ``lr`` are refused in the words of
    :class:`FitConfig` (their bounds are written there); ``lr=0.0``
    alone of the rates that are not positive is taken: the epochs run without learning, so that the losses
    measure the model as it is."""

    method: str = "pabee"
    epochs: int | None = None
    lr: float | None = None
    halting_lr: float | None = HALTING_LR
    heads_lr: float | None = None
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    schedule: str = "linear"
    trains: str | None = None
    loss_kwargs: Mapping | None = None
    progress: bool = True
    early_stopping: int | None = 3
    cached: bool | None = None
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        objective(self.method)  # an unknown method: its ValueError names the methods
        if self.trains is not None and self.trains not in TRAINS:
            raise ValueError(f"trains must be one of {', '.join(TRAINS)}; got {self.trains!r}")
        check_count("epochs", self.epochs)
        check_rate("lr", self.lr, zero=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        for name in ("halting_lr", "heads_lr"):
            rate = getattr(self, name)
            if rate is not None and not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
                raise ValueError(f"{name} must be a positive number or None (the same as lr); got {rate!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.early_stopping is not None and self.early_stopping < 1:
            raise ValueError(
                f"early_stopping must be >= 1 epochs or None (never stop early); got {self.early_stopping!r}"
            )
        check_count("batch_size", self.batch_size)


def settings_of(kind: type, given, fields: dict, *, who: str, what: str):
    """``given`` (an instance of the dataclass ``kind``), or the ``kind`` made of ``fields`` (its keywords); a
    ``TypeError`` naming what to give where both come, where ``given`` is not a ``kind``, or where a keyword is
    none of its fields. ``who``: the entry point, ``what``: its parameter's name, as the messages say them."""
    if given is not None and fields:
        raise TypeError(
            f"{who} takes its {what} once: {what}= or its fields as keywords ({', '.join(sorted(fields))}), "
            f"not both; put them in the {kind.__name__} (dataclasses.replace({what}, ...))"
        )
    if given is not None:
        if not isinstance(given, kind):
            where = kind.__module__.removeprefix("earlyexit_kernels.")
            raise TypeError(f"{what} must be a {where}.{kind.__name__}, got {type(given).__name__}")
        return given
    known = {field.name for field in dataclasses.fields(kind)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(
            f"{who} got unexpected keyword(s) {', '.join(unknown)}: its {what}'s fields are {', '.join(sorted(known))}"
        )
    return kind(**fields)
