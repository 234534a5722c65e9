"""The training and calibration step of ``eek fit``: a method's recipe on tokenized rows, then the threshold.

:func:`train_and_calibrate` patches the model with the method's policy family (and the
heads' pooling and form), then :func:`earlyexit_kernels.training.fit_exit_heads` trains it with
the method's recipe (:mod:`earlyexit_kernels.training.recipes`), calibrates the threshold on
the validation rows and re-patches the model with it; :class:`FitReport` is what ``eek fit``
prints and saves (``eek_fit.json``). Without labels the heads learn the final classifier's
predictions (self-distillation) and the threshold is calibrated on agreement with the
full model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

__all__ = ["FitReport", "train_and_calibrate"]


@dataclass
class FitReport:
    """What ``eek fit`` did: the method, rows, calibration (on validation) and timings.

    ``accuracy`` / ``full_accuracy`` are on the validation rows, fractions; with
    ``target == "agreement"`` they are agreement with the full model (and full is 1.0).
    ``train_seconds``: the training stages; ``calibrate_seconds``: the rest of the fit (the
    frozen model's passes over the rows, the calibration).
    """

    method: str
    target: str
    policy: str
    accuracy: float
    full_accuracy: float
    mean_layers: float
    num_layers: int
    met: bool
    train_rows: int
    validation_rows: int
    train_seconds: float
    calibrate_seconds: float
    curve: list[tuple[str, float, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pooling: str | None = None
    head: str | None = None
    stages: list[str] = field(default_factory=list)
    layer_scores: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}

    def summary(self) -> list[str]:
        """The lines ``eek fit`` prints: the compact curve, then the chosen point."""
        what = "agreement with the full model" if self.target == "agreement" else "accuracy"
        lines = [
            f"fitted the exit heads ({self.method}) on {self.train_rows} rows and calibrated them on "
            f"{self.validation_rows} validation rows in {self.train_seconds + self.calibrate_seconds:.1f} s "
            f"({self.train_seconds:.1f} s in the training stages; the rest: the model's passes over the rows "
            f"and the calibration)"
        ]
        lines += [f"  stage {i}: {stage}" for i, stage in enumerate(self.stages, start=1)]
        if self.layer_scores:
            scores = " ".join(f"{k}:{100 * a:.1f}" for k, a in enumerate(self.layer_scores, start=1))
            lines.append(f"{what} of each layer's head alone on validation: {scores}")
        lines.append(f"candidates ({what} on validation, mean layers of {self.num_layers}):")
        lines += ["  " + line for line in _compact_curve(self.curve)]
        full = "" if self.target == "agreement" else f" (full model {100 * self.full_accuracy:.2f}%)"
        lines.append(
            f"chosen: {self.policy}: {what} {100 * self.accuracy:.2f}%{full}, {self.mean_layers:.2f} mean layers "
            f"of {self.num_layers} (ideal speed-up {self.num_layers / self.mean_layers:.2f}x)"
            + ("" if self.met else " - the target was NOT met")
        )
        lines += [f"warning: {w}" for w in self.warnings]
        return lines


def _compact_curve(curve: list[tuple[str, float, float]], rows: int = 8) -> list[str]:
    """At most ``rows`` candidates, spread over the range of mean layers."""
    if not curve:
        return []
    points = sorted(curve, key=lambda p: (p[2], p[1]))
    if len(points) > rows:
        step = (len(points) - 1) / (rows - 1)
        points = [points[round(i * step)] for i in range(rows)]
    width = max(len(p[0]) for p in points)
    return [f"{name:<{width}}  {100 * acc:6.2f}%  {layers:5.2f} layers" for name, acc, layers in points]


def train_and_calibrate(
    model,
    train,
    train_labels: torch.Tensor | None,
    validation,
    validation_labels: torch.Tensor | None,
    *,
    method: str,
    pooling: str | None,
    head: str | None,
    max_drop: float,
    epochs: int | None,
    lr: float | None,
    batch_size: int,
    seed: int,
    progress: bool,
) -> FitReport:
    """Train ``model``'s exit heads with ``method``'s recipe on ``train`` (:class:`Encoded` rows) and calibrate
    on ``validation`` (:func:`earlyexit_kernels.training.fit_exit_heads`); returns a :class:`FitReport`.

    ``train_labels`` / ``validation_labels``: LongTensor [N] of class ids, or both None
    (self-distillation, calibrated on agreement). ``pooling`` / ``head``: the internal heads'
    (None: the family's default, see ``eek.patch``).
    """
    import earlyexit_kernels as eek
    from earlyexit_kernels.integrations.labelled_data import length_sorted_batches, shuffled_batches
    from earlyexit_kernels.training.calibration import describe, distinct_digits
    from earlyexit_kernels.training.fit import fit_exit_heads
    from earlyexit_kernels.training.recipes import recipe

    options = {k: v for k, v in (("pooling", pooling), ("head", head)) if v is not None}
    eek.patch(model, recipe(method).make_policy(), **options)  # the heads' form; fit keeps it
    train_batches = shuffled_batches(train, train_labels, batch_size, seed)
    val_batches = length_sorted_batches(validation, validation_labels, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the calibration's warnings are in its result, printed by the report
        result = fit_exit_heads(
            model,
            train_batches,
            val_batches,
            method=method,
            labels=train_labels is not None,
            max_drop=max_drop,
            epochs=epochs,
            lr=lr,
            progress=progress,
            seed=seed,
        )
    model.eval()
    calibration = result.calibration
    digits = distinct_digits([p.policy for p in calibration.curve])
    config = getattr(model.early_exit_heads, "config", None)
    return FitReport(
        method=method,
        target=calibration.measure,
        policy=describe(calibration.policy, 4),
        accuracy=calibration.accuracy,
        full_accuracy=calibration.full_accuracy,
        mean_layers=calibration.mean_layers,
        num_layers=model.config.num_hidden_layers,
        met=calibration.met,
        train_rows=len(train),
        validation_rows=len(validation),
        train_seconds=sum(stage.log.seconds for stage in result.stages),
        calibrate_seconds=result.seconds - sum(stage.log.seconds for stage in result.stages),
        curve=[(describe(p.policy, digits), p.accuracy, p.mean_layers) for p in calibration.curve],
        warnings=list(calibration.warnings),
        pooling=getattr(config, "pooling", pooling),
        head=getattr(config, "head", head),
        stages=[stage.describe() for stage in result.stages],
        layer_scores=list(calibration.layer_scores),
    )
