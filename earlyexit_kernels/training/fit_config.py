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

from dataclasses import dataclass

__all__ = ["AUTO_SHARE", "CALIBRATION_FRACTION", "CONFIDENCE", "FitConfig"]

#: the confidence ``eek fit`` certifies its budget with unless told otherwise
CONFIDENCE = 0.95
#: the part of the training rows ``eek fit`` keeps out to certify on where the share is not measured
CALIBRATION_FRACTION = 0.25
#: ``calibration_fraction`` that measures the share on the rows (:mod:`~earlyexit_kernels.training.calibration_share`)
AUTO_SHARE = "auto"


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
    the certificate promises, ``"probable"`` or ``"expected"``."""

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
