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

import dataclasses
import warnings
from dataclasses import dataclass, field

from earlyexit_kernels.calibration.certify import describe_certificate
from earlyexit_kernels.training.fit_config import FitError, check_enough
from earlyexit_kernels.training.fit_texts import CONFIDENCE, max_length_for, warn_truncated

__all__ = [
    "BaseChange",
    "CalibrationReport",
    "base_change_for",
    "calibrate_record",
    "calibrate_texts",
    "calibration_goal",
]


def calibration_goal(max_drop: float, confidence: float | None, guarantee: str, max_changed: float | None):
    """The :class:`~earlyexit_kernels.calibration.select.Goal` of a re-certification, whose construction checks each
    setting (once, there), before any row is read; what it refuses is a :class:`FitError` (``error:`` at the
    command line)."""
    from earlyexit_kernels.calibration.select import Goal

    try:
        return Goal(max_drop=max_drop, confidence=confidence, guarantee=guarantee, max_changed=max_changed)
    except ValueError as error:
        raise FitError(str(error)) from None


#: the goal :func:`calibrate_texts` certifies where none is given: 1 point lost at most, at confidence 0.95
DEFAULT_GOAL = calibration_goal(1.0, CONFIDENCE, "probable", None)

#: the risks a threshold can be certified on where the base changes (``eek calibrate --risk``): ``reference`` (the
#: default) against the saved base's full model, ``agreement`` and ``accuracy`` against the served base's full depth
BASE_RISKS = ("reference", "agreement", "accuracy")


@dataclass
class BaseChange:
    """A threshold certified on another base than the model's own (``eek calibrate --dtype int8``).

    ``reference``: the model on its own base (the saved float32 one, which the user validated), whose full
    depth the report compares against, or None (only the exits' agreement with the base's full depth is
    reported); ``base``: the name of the base certified on. ``risk``:

    - ``"reference"`` (the default): against the reference's full depth, what the user validated: accuracy
      lost where the rows have labels, else disagreement with it. The base's own changes and the exits' are
      counted together, against one budget (an int8 base alone disagrees with float32 on a few rows in a
      hundred, which can take a whole budget of disagreement; on labels its changes partly cancel). It needs
      the reference.
    - ``"agreement"``: the exits' disagreement with the full depth *of the base certified on*, labelled rows
      or not: what the exits add to the base, the base's own changes left out.
    - ``"accuracy"``: accuracy lost against that full depth, on the labels.
    """

    reference: object
    base: str
    risk: str = "agreement"

    def __post_init__(self):
        if self.risk not in BASE_RISKS:
            raise FitError(
                f"the risk certified on another base must be one of {', '.join(BASE_RISKS)}; got {self.risk!r}"
            )


def base_change_for(dtype: str | None, reference=None, risk: str = "auto") -> BaseChange | None:
    """The :class:`BaseChange` of certifying on ``dtype`` (None or ``"float32"``: the model's own base, no
    change); ``risk`` ``"auto"`` is ``"reference"`` there. ``reference``: the model on its own base (which the
    ``"reference"`` risk needs: set it on the result before certifying), or None."""
    if risk not in ("auto", *BASE_RISKS):
        raise FitError(f"--risk must be auto, {', '.join(BASE_RISKS[:-1])} or {BASE_RISKS[-1]}; got {risk!r}")
    if dtype in (None, "float32"):
        return None
    return BaseChange(reference, dtype, "reference" if risk == "auto" else risk)


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
    #: certified on another base (BaseChange): its name, and the agreements the report gives separately
    #: (``base_full``: its full depth with the reference's; ``exits``: the exits with the reference's full
    #: depth; ``exits_base``: the exits with the base's full depth), fractions
    base: str | None = None
    agreements: dict | None = None
    #: what the risk was measured against on another base (:class:`BaseChange`'s ``risk``: ``"reference"``, the
    #: saved full model; ``"agreement"`` / ``"accuracy"``, the base's own full depth)
    base_risk: str | None = None

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
        if self.base is not None:
            lines += self._base_lines()
        lines += [f"warning: {w}" for w in self.warnings]
        if self.kept is not None:
            lines.append(f"not written: {self.kept}")
        return lines

    def _base_lines(self) -> list[str]:
        if self.base_risk == "reference":
            risk = (
                "disagreement with the float32 full model (the base's own changes and the exits' together)"
                if self.target == "agreement"
                else "accuracy lost against the float32 full model, on the labels (the base's own changes and the "
                "exits' together)"
            )
        elif self.target == "agreement":
            risk = (
                f"the exits' disagreement with the {self.base} full depth (what the exits add to the base; the base "
                "alone changes labels, below)"
            )
        else:
            risk = f"accuracy lost against the {self.base} full depth, on the labels"
        lines = [f"certified on the {self.base} base: the risk is {risk}"]
        a = self.agreements or {}
        if "base_full" in a:
            lines.append(
                f"agreement with the float32 full model: {self.base} full depth {100 * a['base_full']:.2f}%, "
                f"{self.base} exits {100 * a['exits']:.2f}%; the exits with the {self.base} full depth "
                f"{100 * a['exits_base']:.2f}%"
            )
        elif "exits_base" in a:
            lines.append(f"agreement of the exits with the {self.base} full depth: {100 * a['exits_base']:.2f}%")
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
    goal=None,
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    path: list | None = None,
    unlabelled=None,
    base_change: BaseChange | None = None,
) -> CalibrationReport:
    """Certify ``model``'s threshold anew on ``data``; the model ends patched with the chosen policy.

    ``model``: a patched classifier (e.g. ``eek.from_pretrained`` of an ``eek fit`` folder);
    ``data``: :class:`~earlyexit_kernels.training.labelled_texts.LabelledTexts`, with labels
    (the risk is accuracy lost against the full model) or without (disagreement with it).
    ``goal``: what is certified, a :class:`~earlyexit_kernels.calibration.select.Goal` made by
    :func:`calibration_goal` (``calibration_goal(max_drop, confidence, guarantee, max_changed)``: its refusals are
    :class:`FitError`); None: :data:`DEFAULT_GOAL`, 1 point at 0.95. ``goal.confidence`` None: the fewest mean
    layers within ``goal.max_drop`` points on these rows, uncertified. Rows too few for any certificate raise
    :class:`FitError` saying how many would do.
    ``path``: the ordered candidates to certify along (the folder's saved path, policies); None:
    the family's fixed grid. ``unlabelled`` (``LabelledTexts``, labels ignored): more rows without
    labels in the certificate (:func:`~earlyexit_kernels.calibration.certify.certify`); the
    rows of ``data`` whose label cell is empty join them. ``base_change``: ``model`` runs on another
    base than its own (:class:`BaseChange`: the risk, by default disagreement with this base's full
    depth, and the agreements reported with the reference's full depth). ``goal.guarantee``: what the certificate
    promises, ``"probable"`` or ``"expected"`` (:data:`~earlyexit_kernels.calibration.certify.GUARANTEES`).
    ``goal.max_changed`` (points, labelled rows, certified): the answers changed against the full model the risk
    reads, certified beside accuracy lost (:func:`~earlyexit_kernels.calibration.certify.certify`).
    """
    import torch

    from earlyexit_kernels.training.calibrate_model import record_exits
    from earlyexit_kernels.training.labelled_texts import (
        encode,
        joined_texts,
        label_ids,
        length_sorted_batches,
        split_unlabelled,
    )

    goal = DEFAULT_GOAL if goal is None else goal
    max_drop, confidence, max_changed = goal.max_drop, goal.confidence, goal.max_changed
    data, partly = split_unlabelled(data)
    unlabelled = joined_texts(partly, joined_texts(unlabelled, None))
    if unlabelled is not None and confidence is None:
        raise FitError("unlabelled rows (--unlabelled) join the certificate: give a --confidence, or leave them out")
    if confidence is not None:
        rows = "labelled rows" if unlabelled is not None else "rows"
        check_enough(len(data), max_drop, confidence, rows, goal.guarantee)
    labels = label_ids(data, model.config) if data.labels is not None else None
    length = max_length_for(max_length, model, tokenizer)
    encoded = encode(tokenizer, data, length)
    warn_truncated(encoded)
    if base_change is not None and base_change.risk == "accuracy" and labels is None:
        raise FitError(
            f"--risk accuracy on the {base_change.base} base needs labelled rows; without labels the risk is "
            "agreement with its full depth"
        )
    if base_change is not None and base_change.risk == "reference" and base_change.reference is None:
        raise ValueError(
            f"certifying on the {base_change.base} base against the saved full model needs that model "
            "(BaseChange.reference); give it, or the risk 'agreement' (with the served base's full depth)"
        )
    if max_changed is not None and (
        confidence is None
        or labels is None
        or unlabelled is not None
        or (base_change is not None and base_change.risk == "agreement")
    ):
        raise FitError(
            "--max-changed is certified beside accuracy lost, on labelled rows alone: give FILE with a label column "
            "and a --confidence, without unlabelled rows (and not --risk agreement, which certifies the answers "
            "changed already: give its budget as --max-drop), or --max-changed off"
        )
    model.eval()
    batches = length_sorted_batches(encoded, labels, batch_size)
    with torch.no_grad():
        record = record_exits(model, batches)
        extra = extra_batches = None
        if unlabelled is not None:
            extra_batches = length_sorted_batches(encode(tokenizer, unlabelled, length), None, batch_size)
            extra = record_exits(model, extra_batches)
        reference = None
        if base_change is not None and base_change.reference is not None:
            reference = record_exits(base_change.reference, batches)
        if extra is not None and base_change is not None and base_change.risk == "reference":
            more = record_exits(base_change.reference, extra_batches)
            extra = extra.against(more.all_logits[-1])
    certified_on = record
    if base_change is not None and base_change.risk == "agreement":
        certified_on = dataclasses.replace(record, labels=None)  # the labels do not enter the risk
    elif base_change is not None and base_change.risk == "reference":
        # the full model the risk reads is the saved base's, on the same rows in the same order
        certified_on = record.against(reference.all_logits[-1])
    report = calibrate_record(model, certified_on, goal, path=path, unlabelled=extra)
    if base_change is not None:
        report.base = base_change.base
        report.base_risk = base_change.risk
        report.agreements = _agreements(model, record, reference)
    return report


def _agreements(model, record, reference) -> dict:
    """The agreements of a threshold certified on another base: its full depth and its exits (the policy
    ``model`` ends patched with) with the reference's full depth, and its exits with its own full depth."""
    from earlyexit_kernels.calibration.record import replay
    from earlyexit_kernels.calibration.row_losses import disagreement
    from earlyexit_kernels.patching.patch import policy_of

    multi_label = getattr(model.config, "problem_type", None) == "multi_label_classification"
    exits = replay(policy_of(model), record).logits
    full = record.all_logits[-1]

    def agreement(a, b) -> float:
        return 1.0 - float(disagreement(a, b, multi_label=multi_label).mean())

    if reference is None:
        return {"exits_base": agreement(exits, full)}
    return {
        "base_full": agreement(full, reference.all_logits[-1]),
        "exits": agreement(exits, reference.all_logits[-1]),
        "exits_base": agreement(exits, full),
    }


def calibrate_record(model, record, goal, *, path: list | None = None, unlabelled=None) -> CalibrationReport:
    """:func:`calibrate_texts` on rows already recorded (:class:`~earlyexit_kernels.calibration.record.ExitRecord`:
    every head's logits, e.g. the audited rows of ``eek serve --audit-record``) for ``goal`` (what
    :func:`calibration_goal` made: ``max_drop``, ``confidence``, ``guarantee``, ``max_changed``), along ``path``
    where certified; the model ends patched with the chosen policy."""
    from earlyexit_kernels.calibration.candidates import describe
    from earlyexit_kernels.calibration.record import replay
    from earlyexit_kernels.patching.patch import backend_of, patch, policy_of
    from earlyexit_kernels.training.calibrate_model import calibrate

    rows = record.all_logits.shape[1]
    if goal.confidence is not None:
        check_enough(rows, goal.max_drop, goal.confidence, "rows", goal.guarantee)
    previous = policy_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kept in the result and printed by the report
        result = calibrate(
            record,
            goal=dataclasses.replace(goal, policy=previous),
            path=path if goal.confidence else None,
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
        max_drop=goal.max_drop,
        confidence=goal.confidence,
        met=result.met,
        certificate=None if result.certificate is None else result.certificate.as_dict(),
        warnings=list(result.warnings),
    )
