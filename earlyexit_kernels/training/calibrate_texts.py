"""``eek calibrate`` as a library: a fitted model's threshold certified anew on other rows, its heads fixed.

    report = calibrate_texts(model, tokenizer, rows, max_drop=1.0, confidence=0.95)
    print("\\n".join(report.summary()))   # the certificate, the uncertified point, what more rows would do

The rows are those the classifier never trained on (its validation split, or a sample of what
it serves, labelled or not). The heads stay as they are; only the policy's threshold moves
along the same fixed grid ``eek fit`` certifies on
(:mod:`earlyexit_kernels.calibration.certify`), so the certificate means what
``eek fit``'s does, for rows like these.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from earlyexit_kernels.calibration.certify import describe_certificate
from earlyexit_kernels.training.fit_checks import FitError, check_confidence, check_enough
from earlyexit_kernels.training.fit_texts import CONFIDENCE, max_length_for, warn_truncated

__all__ = ["CalibrationReport", "calibrate_record", "calibrate_texts"]


@dataclass
class CalibrationReport:
    """What ``eek calibrate`` did: the policy before and after, on ``rows`` rows.

    ``accuracy`` / ``full_accuracy``: the chosen policy's and the full model's on the rows
    (agreement with the full model when ``target == "agreement"``); ``certificate``: the
    :class:`~earlyexit_kernels.calibration.certify.Certificate`'s fields, or None
    (``confidence`` None: the uncertified point within ``max_drop``)."""

    previous_policy: str
    policy: str
    target: str
    accuracy: float
    full_accuracy: float
    mean_layers: float
    previous_mean_layers: float
    num_layers: int
    rows: int
    max_drop: float
    confidence: float | None
    met: bool
    certificate: dict | None = None
    warnings: list[str] = field(default_factory=list)
    kept: str | None = None  # why the folder kept its policy instead (eek calibrate without --force)

    def as_dict(self) -> dict:
        return dict(vars(self))

    def summary(self) -> list[str]:
        what = "agreement with the full model" if self.target == "agreement" else "accuracy"
        full = "" if self.target == "agreement" else f" (full model {100 * self.full_accuracy:.2f}%)"
        lines = [
            f"calibrated on {self.rows} rows ({what}); the heads are unchanged",
            f"before: {self.previous_policy}: {self.previous_mean_layers:.2f} mean layers of {self.num_layers} on "
            f"these rows",
            f"chosen: {self.policy}: {what} {100 * self.accuracy:.2f}%{full}, {self.mean_layers:.2f} mean layers of "
            f"{self.num_layers}" + ("" if self.met else " - the target was NOT met"),
        ]
        if self.certificate is not None:
            lines.append(describe_certificate(self.certificate))
        lines += [f"warning: {w}" for w in self.warnings]
        if self.kept is not None:
            lines.append(f"not written: {self.kept}")
        return lines

    def saving_refused(self) -> str | None:
        """Why this result must not replace a folder's policy: it certifies no saving (the target was
        not met, or the chosen policy runs every layer). None where it does."""
        if not self.met:
            return "the target was not met on these rows"
        if self.mean_layers >= self.num_layers:
            return f"the policy certified runs every layer ({self.mean_layers:.2f} of {self.num_layers}): no saving"
        return None


def calibrate_texts(
    model,
    tokenizer,
    data,
    *,
    max_drop: float = 1.0,
    confidence: float | None = CONFIDENCE,
    batch_size: int = 64,
    max_length: int | None = None,
    path: list | None = None,
    unlabelled=None,
) -> CalibrationReport:
    """Certify ``model``'s threshold anew on ``data``; the model ends patched with the chosen policy.

    ``model``: a patched classifier (e.g. ``eek.from_pretrained`` of an ``eek fit`` folder);
    ``data``: :class:`~earlyexit_kernels.training.labelled_texts.LabelledTexts`, with labels
    (the risk is accuracy lost against the full model) or without (disagreement with it).
    ``confidence`` None: the fewest mean layers within ``max_drop`` points on these rows,
    uncertified. Rows too few for any certificate raise :class:`FitError` saying how many would do.
    ``path``: the ordered candidates to certify along (the folder's saved path, policies); None:
    the family's fixed grid. ``unlabelled`` (``LabelledTexts``, labels ignored): more rows without
    labels in the certificate (:func:`~earlyexit_kernels.calibration.certify.certify`); the
    rows of ``data`` whose label cell is empty join them.
    """
    import torch

    from earlyexit_kernels.training.labelled_texts import (
        encode,
        joined_texts,
        label_ids,
        length_sorted_batches,
        split_unlabelled,
    )
    from earlyexit_kernels.training.record_exits import record_exits

    if not max_drop >= 0:
        raise FitError(f"--max-drop must be >= 0 accuracy points, got {max_drop}")
    data, partly = split_unlabelled(data)
    unlabelled = joined_texts(partly, joined_texts(unlabelled, None))
    if unlabelled is not None and confidence is None:
        raise FitError("unlabelled rows (--unlabelled) join the certificate: give a --confidence, or leave them out")
    if confidence is not None:
        check_confidence(confidence)
        check_enough(len(data), max_drop, confidence, "labelled rows" if unlabelled is not None else "rows")
    labels = label_ids(data, model.config) if data.labels is not None else None
    length = max_length_for(max_length, model, tokenizer)
    encoded = encode(tokenizer, data, length)
    warn_truncated(encoded)
    model.eval()
    with torch.no_grad():
        record = record_exits(model, length_sorted_batches(encoded, labels, batch_size))
        extra = None
        if unlabelled is not None:
            extra = record_exits(model, length_sorted_batches(encode(tokenizer, unlabelled, length), None, batch_size))
    return calibrate_record(model, record, max_drop=max_drop, confidence=confidence, path=path, unlabelled=extra)


def calibrate_record(
    model,
    record,
    *,
    max_drop: float = 1.0,
    confidence: float | None = CONFIDENCE,
    path: list | None = None,
    unlabelled=None,
) -> CalibrationReport:
    """:func:`calibrate_texts` on rows already recorded (:class:`~earlyexit_kernels.calibration.record.ExitRecord`:
    every head's logits, e.g. the audited rows of ``eek serve --audit-record``); the model ends patched
    with the chosen policy."""
    from earlyexit_kernels.calibration.record import replay
    from earlyexit_kernels.calibration.report import describe
    from earlyexit_kernels.patching.patch import backend_of, patch, policy_of
    from earlyexit_kernels.training.calibration import calibrate

    if not max_drop >= 0:
        raise FitError(f"--max-drop must be >= 0 accuracy points, got {max_drop}")
    rows = record.all_logits.shape[1]
    if confidence is not None:
        check_confidence(confidence)
        check_enough(rows, max_drop, confidence, "rows")
    previous = policy_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kept in the result and printed by the report
        result = calibrate(
            record,
            max_drop=max_drop,
            confidence=confidence,
            policy=previous,
            path=path if confidence else None,
            unlabelled=unlabelled,
        )
    before = replay(previous, record).layers_run.float().mean().item()
    patch(model, result.policy, backend_of(model))
    return CalibrationReport(
        previous_policy=describe(previous, 4),
        policy=describe(result.policy, 4),
        target=result.measure,
        accuracy=result.accuracy,
        full_accuracy=result.full_accuracy,
        mean_layers=result.mean_layers,
        previous_mean_layers=before,
        num_layers=record.num_layers,
        rows=rows,
        max_drop=max_drop,
        confidence=confidence,
        met=result.met,
        certificate=None if result.certificate is None else result.certificate.as_dict(),
        warnings=list(result.warnings),
    )
