"""What ``eek fit`` is asked for, as one object: :class:`FitConfig`.

The command line (:mod:`earlyexit_kernels.integrations.fit_cli`) builds one from its options, once;
:func:`~earlyexit_kernels.training.fit_texts.fit_model`, the library's entry point, builds one from its
keyword arguments (the way users call it); both hand it to
:func:`~earlyexit_kernels.training.fit_texts.fit_with_config`, which passes it along (to
:func:`~earlyexit_kernels.training.fit_data.prepare`, the calibration share and
:func:`~earlyexit_kernels.training.fit_texts.train_and_calibrate`) instead of a dozen keywords at
every step. The rows themselves (training, validation, calibration, unlabelled) are data, not
settings: :class:`~earlyexit_kernels.training.fit_data.FitData` carries them beside it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from earlyexit_kernels._method_names import METHODS
from earlyexit_kernels.training.fit_checks import FitError

__all__ = ["AUTO_SHARE", "CALIBRATION_FRACTION", "CONFIDENCE", "FitConfig", "Training", "check_count", "check_rate"]

#: the confidence ``eek fit`` certifies its budget with unless told otherwise
CONFIDENCE = 0.95
#: the part of the training rows ``eek fit`` keeps out to certify on where the share is not measured
CALIBRATION_FRACTION = 0.25
#: ``calibration_fraction`` that measures the share on the rows (:mod:`~earlyexit_kernels.training.calibration_share`)
AUTO_SHARE = "auto"


@dataclass(frozen=True)
class Training:
    """How a fit trains the heads, one object: the part of :class:`FitConfig` that
    :func:`~earlyexit_kernels.training.fit.fit_exit_heads` takes too (its ``training``).

    ``method``: the recipe (:data:`~earlyexit_kernels._method_names.METHODS`); ``pooling`` / ``head``: the heads'
    (``"cls"``/``"mean"``, ``"model"``/``"mlp"``/``"cascade"``; ``"auto"``: tried and chosen; None: the model's);
    ``epochs``, ``lr``: every head-only stage's (None: the recipe's); ``seed``: everything drawn; ``progress``:
    bars. Each field checked here, once, in the words of :class:`FitConfig`'s refusals."""

    method: str = "heads"
    pooling: str | None = "auto"
    head: str | None = "auto"
    epochs: int | None = None
    lr: float | None = None
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        from earlyexit_kernels.engine.heads import HEAD_FORMS, HEAD_POOLINGS

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
    model, in points, certified beside ``max_drop`` (labelled rows, with a ``confidence``; None: not bounded)."""

    method: str = "heads"
    pooling: str | None = "auto"
    head: str | None = "auto"
    max_drop: float = 1.0
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 32
    max_length: int | None = None
    seed: int = 0
    progress: bool = False
    confidence: float | None = CONFIDENCE
    calibration_fraction: float | str = AUTO_SHARE
    validation_split: float | None = None
    guarantee: str = "probable"
    max_changed: float | None = None

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


def check_rate(name: str, value, *, zero: bool = False) -> None:
    """``value`` of the learning rate ``name`` positive and finite, or None (the recipe's), else the one refusal of
    it. ``zero``: ``0.0`` taken too (:class:`~earlyexit_kernels.training.train_settings.TrainSettings`: epochs run
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
