"""Choose the operating point: every candidate scored on the record, and the one a target asks for.

:func:`accuracy_curve` scores each candidate (its accuracy, agreement with the full model or a
metric, and its mean layers run, replayed on the record); :func:`select_point` is the one
operating-point selector, for classifiers and rerankers alike: the fewest mean layers whose score
is at least a floor, or the best score within a number of layers. :func:`choose` composes them for
one :class:`Goal` on one record (with ``confidence``, the certified point of
:func:`~earlyexit_kernels.calibration.certify.certify` instead) into a :class:`Calibration`;
:func:`earlyexit_kernels.training.calibrate_model.calibrate` records the rows from a model and calls it.

The family of candidates is that of the model's current policy (an ``Entropy`` model is
calibrated over entropy thresholds, ``Patience`` over ``1..L-1``, ``QExit`` over ``q``,
``Voting`` over ``1..L``, ``SkipGates`` over its entropy threshold with the recorded
gates, ``MaxProb`` over thresholds; ``DACT`` has no knob and gives one point:
:func:`~earlyexit_kernels.calibration.candidates.candidates`).
Accuracies are fractions in [0, 1]; ``max_drop`` is in accuracy points (percent).
A multi-label model (labels [N, C] of 0/1, ``MultiLabelConfidence`` over its threshold) is
measured by micro-F1 in place of accuracy, see :func:`~earlyexit_kernels.calibration.record.micro_f1`.
"full model" is the last layer's head on every sequence (under ``SkipGates``, with the
recorded gates' skips).

What is measured: ``target="accuracy"`` against the labels, ``target="agreement"`` against
the full model's own predictions (no labels needed; the full model scores 1.0), ``"auto"``
(the default) the first when the record has labels, else the second. ``metric=`` plugs
in another score ``metric(logits [N, C] float32, references) -> float`` (higher is better).

Calibration says when it saves little: a :class:`CalibrationWarning` (also in
``result.warnings``) when the chosen policy saves less than ``min_saving`` of the layers
(``result.saves_little``) or when internal heads score within ``chance_margin`` of always
predicting the most frequent class (``result.heads_at_chance``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from earlyexit_kernels._fit_fields import fit_field
from earlyexit_kernels.calibration.candidates import candidates, describe, distinct_digits
from earlyexit_kernels.calibration.certify import certify
from earlyexit_kernels.calibration.record import CurvePoint, ExitRecord, accuracy, references, replay, resolve_target
from earlyexit_kernels.methods.policies import ExitPolicy
from earlyexit_kernels.methods.risk_control import check_confidence

__all__ = [
    "Calibration",
    "CalibrationWarning",
    "Chosen",
    "Goal",
    "accuracy_curve",
    "chance_score",
    "choose",
    "interpolate_baseline",
    "select_point",
    "static_baseline",
]


class CalibrationWarning(UserWarning):
    """Calibration found that early exit saves little here: the heads are at chance or the policy runs nearly every layer."""


@dataclass
class Calibration:
    """The outcome of :func:`calibrate` on its rows (validation or calibration rows).

    ``policy``: the chosen policy; ``accuracy``: its score (a fraction: accuracy, agreement
    with the full model or the ``metric``'s value); ``mean_layers``: its mean layers run;
    ``full_accuracy``: the full model's score (1.0 for agreement); ``met``: whether the target
    was met (False: the closest candidate was returned); ``target``: the target in words;
    ``curve``: every candidate. ``measure``: ``"accuracy"``, ``"agreement"`` or the metric's
    name; ``num_layers``: L; ``layer_scores``: the score of cutting every sequence after layer
    ``k`` (the head of layer k alone), k = 1..L; ``chance``: the score of always predicting
    the most frequent reference class (None when it does not apply); ``heads_at_chance``:
    the layers ``1..L-1`` whose head scores at most ``chance + chance_margin``;
    ``saves_little``: the policy saves less than ``min_saving`` of the layers;
    ``warnings``: the messages warned (empty when all is well); ``certificate``: with
    ``confidence=``, the :class:`~earlyexit_kernels.calibration.certify.Certificate`
    (the risk, rows, bound reached and the uncertified point's layers), else None; ``path``:
    with ``confidence=``, the ordered candidates the certification walked.
    """

    policy: ExitPolicy
    accuracy: float
    mean_layers: float
    full_accuracy: float
    met: bool
    target: str
    curve: list[CurvePoint]
    measure: str = "accuracy"
    num_layers: int = 0
    layer_scores: list[float] = dataclasses.field(default_factory=list)
    chance: float | None = None
    heads_at_chance: list[int] = dataclasses.field(default_factory=list)
    saves_little: bool = False
    warnings: list[str] = dataclasses.field(default_factory=list)
    certificate: object | None = None
    path: list = dataclasses.field(default_factory=list)

    @property
    def saved_fraction(self) -> float:
        """The fraction of layers the policy saves on the rows calibrated on: ``1 - mean_layers / L``."""
        return 1.0 - self.mean_layers / self.num_layers if self.num_layers else 0.0

    def summary(self) -> str:
        """A few lines: the target, the full model, the chosen policy and every warning."""
        lines = [
            f"calibration target: {self.target} ({self.measure}); full model {100 * self.full_accuracy:.2f}%",
            "per-layer "
            + self.measure
            + ": "
            + " ".join(f"{k}:{100 * a:.1f}" for k, a in enumerate(self.layer_scores, 1))
            + ("" if self.chance is None else f" (chance {100 * self.chance:.1f})"),
            f"chosen: {describe(self.policy, distinct_digits([p.policy for p in self.curve]))}: "
            f"{100 * self.accuracy:.2f}% at {self.mean_layers:.2f} of {self.num_layers} layers "
            f"(saves {100 * self.saved_fraction:.0f}%)" + ("" if self.met else " (target not met)"),
        ]
        if self.certificate is not None:
            lines.append(self.certificate.describe())
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def accuracy_curve(
    record: ExitRecord, policies: Sequence[ExitPolicy], *, target: str = "auto", metric=None
) -> list[CurvePoint]:
    """Score and mean layers run of every policy in ``policies``, replayed on ``record`` (``all_logits`` [L, N, C]):
    one :class:`CurvePoint` per policy, in their order.

    ``target`` and ``metric`` as in :func:`calibrate` (default: accuracy against the labels).
    """
    refs = references(record, target)
    metric = metric or accuracy
    points = []
    for policy in policies:
        result = replay(policy, record)
        points.append(
            CurvePoint(
                policy,
                float(metric(result.logits, refs)),
                result.layers_run.float().mean().item(),
                result.exit_layer.float().mean().item(),
            )
        )
    return points


def static_baseline(record: ExitRecord, *, target: str = "auto", metric=None) -> list[tuple[int, float]]:
    """``(k, score)`` of cutting the model after layer ``k`` for every sequence (head k), k = 1..L: head k's
    logits are ``record.all_logits[k - 1]`` [N, C]."""
    refs = references(record, target)
    metric = metric or accuracy
    return [(k + 1, float(metric(record.all_logits[k].float(), refs))) for k in range(record.num_layers)]


def chance_score(refs: torch.Tensor, num_labels: int, metric=None) -> float | None:
    """The score of always predicting the most frequent class of ``refs`` [N] (None when ``refs`` are not class ids)."""
    if refs.dim() != 1 or refs.dtype.is_floating_point or refs.numel() == 0:
        return None
    majority = int(torch.bincount(refs.long(), minlength=num_labels).argmax())
    constant = torch.zeros(refs.shape[0], num_labels)
    constant[:, majority] = 1.0
    return float((metric or accuracy)(constant, refs))


def interpolate_baseline(baseline: Sequence[tuple[int, float]], mean_layers: float) -> float:
    """The static baseline's accuracy at ``mean_layers``, linear between the neighbouring layers."""
    layers = [k for k, _ in baseline]
    accs = [a for _, a in baseline]
    if mean_layers <= layers[0]:
        return accs[0]
    if mean_layers >= layers[-1]:
        return accs[-1]
    low = int(math.floor(mean_layers))
    high = low + 1
    frac = mean_layers - low
    return accs[low - 1] * (1 - frac) + accs[high - 1] * frac


@dataclass(frozen=True)
class Goal:
    """What a calibration is asked for: the settings of
    :func:`earlyexit_kernels.training.calibrate_model.calibrate` (which takes one) and of :func:`choose`.

    Exactly one target: ``max_drop`` (accuracy points): the fewest mean layers run with a score at least
    ``full - max_drop``; ``target_layers``: the best score with at most that many mean layers run. Ties go to the
    more accurate, then the cheaper candidate. ``policy``: the family and fixed fields (None: the recorded
    policy's); ``count``: candidates of the uncertified search.

    ``target``: ``"accuracy"`` (against the labels), ``"agreement"`` (against the full model's predictions: no
    labels needed, the full model scores 1.0) or ``"auto"`` (accuracy when the rows have labels, else agreement).
    ``metric``: a function ``metric(logits [N, C] float32, references [N]) -> float`` (higher is better) used in
    place of accuracy; references are the labels or the full model's predicted classes.

    ``min_saving`` (a fraction, default 0.10): warn when the chosen policy saves less of the layers;
    ``chance_margin`` (a fraction, default 0.02): warn of internal heads that score at most that much above always
    predicting the most frequent class.

    ``confidence`` (in (0, 1), with ``max_drop``): certify the budget instead of meeting it on the rows: the most
    aggressive policy of a fixed grid whose risk is at most ``max_drop`` points with probability ``confidence``
    over the draw of the rows (:mod:`earlyexit_kernels.calibration.certify`). ``guarantee`` (with
    ``confidence``): ``"probable"`` (the default: with probability ``confidence``, the risk is within the budget)
    or ``"expected"`` (within it on average over the draw of the rows, conformal risk control: cheaper, and any one
    draw may serve above it); :data:`~earlyexit_kernels.calibration.certify.GUARANTEES`. ``max_changed`` (points,
    with ``confidence`` and labelled rows): a second budget certified beside accuracy lost, on the answers changed
    against the full model (accuracy lost lets fixes of the full model's errors pay for new errors, so it alone
    does not bound how many answers change)."""

    max_drop: float | None = fit_field("max_drop", None)
    target_layers: float | None = None
    policy: ExitPolicy | None = None
    count: int = 60
    target: str = "auto"
    metric: Callable | None = None
    min_saving: float = 0.10
    chance_margin: float = 0.02
    confidence: float | None = fit_field("confidence", None)
    guarantee: str = fit_field("guarantee", "probable")
    max_changed: float | None = fit_field("max_changed", None)

    def __post_init__(self) -> None:
        """Every field checked here, once: a ``ValueError`` naming the field, its bound and what to give."""
        from earlyexit_kernels.calibration.certify import check_guarantee

        check_guarantee(self.guarantee)
        if (self.max_drop is None) == (self.target_layers is None):
            which = "neither was given" if self.max_drop is None else "not both"
            raise ValueError(
                f"give exactly one target: max_drop (accuracy points) or target_layers (mean layers), {which}"
            )
        if self.confidence is not None:
            check_confidence(self.confidence)
            if self.target_layers is not None:
                raise ValueError("confidence certifies a risk budget: give max_drop (points), not target_layers")
            if self.metric is not None:
                raise ValueError(
                    "confidence certifies a per-row risk (agreement, or accuracy lost against the full model); a "
                    "custom metric has no per-row loss to bound: drop metric= or confidence="
                )
        if self.max_changed is not None and self.confidence is None:
            raise ValueError(
                "max_changed is certified beside accuracy lost: give confidence= too, or leave max_changed out"
            )
        if self.max_changed is not None and not (_points(self.max_changed) and self.max_changed < 100):
            raise ValueError(
                f"max_changed must be in [0, 100) points (answers changed), got {self.max_changed!r}: give a budget "
                "such as 5 (at most five answers in a hundred differ from the full model's), or None"
            )
        if self.max_drop is not None and not _points(self.max_drop):
            raise ValueError(
                f"max_drop must be >= 0 accuracy points, got {self.max_drop!r}: give a budget such as 1 (at most one "
                "point lost)"
            )
        if not 0.0 <= self.min_saving <= 1.0:
            raise ValueError(f"min_saving must be a fraction of the layers in [0, 1], got {self.min_saving!r}")
        if not self.chance_margin >= 0.0:
            raise ValueError(f"chance_margin must be a fraction >= 0, got {self.chance_margin!r}")


def _points(value) -> bool:
    """A finite number of points, at least 0 (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def select_point(curve: Sequence, score: Callable, *, floor: float | None = None, max_layers: float | None = None):
    """The operating point of ``curve`` (points with ``mean_layers``) for one target: ``(best, feasible)``.

    ``floor``: the fewest mean layers among the points whose ``score(point)`` is at least it, ties to
    the higher score; ``max_layers``: the best score among the points with at most that many mean
    layers, ties to the cheaper. Where no point is feasible (``feasible`` empty), the closest: the best
    score, or the fewest layers."""
    if (floor is None) == (max_layers is None):
        raise ValueError("select_point takes one target: floor or max_layers")
    if floor is not None:
        feasible = [p for p in curve if score(p) >= floor]
        pool = feasible or sorted(curve, key=lambda p: -score(p))[:1]
        return min(pool, key=lambda p: (p.mean_layers, -score(p))), feasible
    feasible = [p for p in curve if p.mean_layers <= max_layers + 1e-12]
    pool = feasible or sorted(curve, key=lambda p: p.mean_layers)[:1]
    return max(pool, key=lambda p: (score(p), -p.mean_layers)), feasible


@dataclass
class Chosen:
    """What :func:`choose` found: the ``result``, its chosen ``point`` (for printing and plotting), the static
    ``baseline`` (cut at layer k) and, where no candidate met an uncertified target, that target (``missed``)."""

    result: Calibration
    point: CurvePoint
    baseline: list[tuple[int, float]]
    missed: str | None = None


def choose(
    record: ExitRecord,
    goal: Goal,
    *,
    path_record: ExitRecord | None = None,
    path: list[ExitPolicy] | None = None,
    unlabelled: ExitRecord | None = None,
) -> Chosen:
    """The operating point of ``record`` for ``goal`` (checked when it was made): the uncertified search, or with
    ``goal.confidence`` the certified point along the fixed grid, the path chosen on ``path_record`` or the
    ``path`` given, with the ``unlabelled`` rows in the certificate (:func:`~earlyexit_kernels.calibration.certify.certify`)."""
    if unlabelled is not None and goal.confidence is None:
        raise ValueError("unlabelled rows join a certificate: give confidence= too, or leave them out")
    metric = goal.metric
    measure = resolve_target(record, goal.target)
    refs = references(record, measure)
    measure_name = getattr(metric, "__name__", "metric") if metric is not None else measure
    curve = accuracy_curve(record, candidates(record, goal.policy, count=goal.count), target=measure, metric=metric)
    baseline = static_baseline(record, target=measure, metric=metric)
    full_accuracy = baseline[-1][1]
    if record.reference_logits is not None:  # the full model measured against is not the last layer's
        full_accuracy = float((metric or accuracy)(record.full_logits.float(), refs))
    if goal.max_drop is not None:
        floor = full_accuracy - goal.max_drop / 100.0 - 1e-12
        wanted = f"{measure_name} >= {100 * full_accuracy:.2f}% - {goal.max_drop:g} points"
        best, feasible = select_point(curve, lambda p: p.accuracy, floor=floor)
    else:
        wanted = f"mean layers <= {goal.target_layers:g}"
        best, feasible = select_point(curve, lambda p: p.accuracy, max_layers=goal.target_layers)
    result = Calibration(
        best.policy,
        best.accuracy,
        best.mean_layers,
        full_accuracy,
        bool(feasible),
        wanted,
        curve,
        measure=measure_name,
        num_layers=record.num_layers,
        layer_scores=[score for _, score in baseline],
        chance=chance_score(refs, record.all_logits.shape[-1], metric),
    )
    if goal.confidence is not None:
        best = _certify_into(result, record, goal, measure, path_record, path, unlabelled)
    _check_savings(result, goal.min_saving, goal.chance_margin)
    return Chosen(result, best, baseline, None if feasible or goal.confidence is not None else wanted)


def _certify_into(result, record, goal: Goal, measure, path_record, path, unlabelled) -> CurvePoint:
    """Replace ``result``'s chosen point by the certified one; returns it (for printing and plotting)."""
    max_drop, confidence = goal.max_drop, goal.confidence
    chosen, certificate, walked = certify(
        record,
        max_drop / 100.0,
        confidence,
        target=measure,
        policy=goal.policy,
        path_record=path_record,
        candidates=path,
        unlabelled=unlabelled,
        guarantee=goal.guarantee,
        max_changed=None if goal.max_changed is None else goal.max_changed / 100.0,
    )
    result.path = [point.policy for point in walked]
    result.policy, result.accuracy, result.mean_layers = chosen.policy, chosen.accuracy, chosen.mean_layers
    result.met = certificate.certified
    promise = "in expectation" if goal.guarantee == "expected" else f"with confidence {100 * confidence:g}%"
    result.target = f"{certificate.risk} <= {max_drop:g}% {promise}"
    if goal.max_changed is not None:
        result.target += f", answers changed <= {goal.max_changed:g}%"
    result.certificate = certificate
    if not certificate.certified:
        result.warnings.append(f"calibrate: {certificate.describe()}")
    return chosen


def _check_savings(result: Calibration, min_saving: float, chance_margin: float) -> None:
    """Fill ``heads_at_chance``, ``saves_little`` and ``warnings`` of ``result``."""
    internal = list(enumerate(result.layer_scores[:-1], 1))
    if result.chance is not None:
        result.heads_at_chance = [k for k, score in internal if score <= result.chance + chance_margin]
    if result.heads_at_chance:
        scores = ", ".join(f"layer {k}: {100 * result.layer_scores[k - 1]:.1f}%" for k in result.heads_at_chance)
        result.warnings.append(
            f"calibrate: {len(result.heads_at_chance)} of {len(internal)} internal heads score at chance on the "
            f"calibration rows ({result.measure}; always predicting the most frequent class scores "
            f"{100 * result.chance:.1f}%, margin {100 * chance_margin:g} points): {scores}. Untrained heads: train "
            f"them (earlyexit_kernels.training.fit_exit_heads, or train_exit_heads with the default lr of its trains "
            f"mode); trained heads that stay at chance read too little of the layer: patch with pooling='mean' "
            f"(and head='mlp')"
        )
    if result.saved_fraction < min_saving:
        result.saves_little = True
        result.warnings.append(
            f"calibrate: the chosen policy {describe(result.policy)} runs {result.mean_layers:.2f} of "
            f"{result.num_layers} layers on average and saves {100 * result.saved_fraction:.1f}% of them, less "
            f"than min_saving={100 * min_saving:g}% ({result.target}: {100 * result.accuracy:.2f}% against "
            f"{100 * result.full_accuracy:.2f}% for the full model); early exit barely pays here"
        )
