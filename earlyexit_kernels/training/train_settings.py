"""What one training loop is asked for, as one object: :class:`TrainSettings`, checked once where it is made.

:func:`~earlyexit_kernels.training.train.train_exit_heads` takes one (or its fields as keywords, turned into one);
the fit's stages (:mod:`~earlyexit_kernels.training.fit`) and the benchmarks build theirs. The data (the batches,
the validation batches) is not a setting: the loop takes it beside.

    train_exit_heads(model, batches, TrainSettings(method="pabee", epochs=3, lr=2e-5))
    train_exit_heads(model, batches, method="pabee", epochs=3, lr=2e-5)   # the same: the fields as keywords
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from earlyexit_kernels.methods.losses import objective
from earlyexit_kernels.training.fit_config import check_count, check_rate

__all__ = ["HALTING_LR", "OPTIMIZERS", "SCHEDULES", "TRAINS", "TrainSettings"]

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
    :class:`~earlyexit_kernels.training.fit_config.FitConfig` (their bounds are written there); ``lr=0.0``
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
