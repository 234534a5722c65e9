"""Calibrate an exit policy on a validation set: pick the threshold (patience, q, votes) for a target.

Every head runs once on the validation set (``return_all_exits=True``,
:mod:`~earlyexit_kernels.calibration.record`); each candidate policy is then replayed offline on the recorded logits and halting logits with
:func:`earlyexit_kernels.methods.exit_rules.exit_step`, the step the engine applies, in the same
order and with the same state, so the replay makes exactly the decisions of the
patched model's all-exits forward (``out.exit_layer``, ``out.layers_run``) on that data.

    result = calibrate(model, val_batches, max_drop=1.0)        # (a) fewest layers, <= 1 point lost
    result = calibrate(model, val_batches, target_layers=3.0)   # (b) best accuracy at <= 3 layers
    eek.patch(model, result.policy)
    print_curve(result.curve); plot_curve(result.curve, "curve.png", full_accuracy=result.full_accuracy)

The family of candidates is that of the model's current policy (an ``Entropy`` model is
calibrated over entropy thresholds, ``Patience`` over ``1..L-1``, ``QExit`` over ``q``,
``Voting`` over ``1..L``, ``SkipGates`` over its entropy threshold with the recorded
gates, ``MaxProb`` over thresholds; ``DACT`` has no knob and gives one point).
Accuracies are fractions in [0, 1]; ``max_drop`` is in accuracy points (percent).
A multi-label model (labels [N, C] of 0/1, ``MultiLabelConfidence`` over its threshold) is
measured by micro-F1 in place of accuracy, see :func:`micro_f1`.
"full model" is the last layer's head on every sequence (under ``SkipGates``, with the
recorded gates' skips). Classification heads only (num_labels >= 2): for a regression
head, :func:`replay` candidate policies on one :func:`record_exits` and choose by hand.

What is measured: ``target="accuracy"`` against the labels, ``target="agreement"`` against
the full model's own predictions (no labels needed; the full model scores 1.0), ``"auto"``
(the default) the first when the batches have labels, else the second. ``metric=`` plugs
in another score ``metric(logits [N, C] float32, references) -> float`` (higher is better).

Calibration says when it saves little: a :class:`CalibrationWarning` (also in
``result.warnings``) when the chosen policy saves less than ``min_saving`` of the layers
(``result.saves_little``) or when internal heads score within ``chance_margin`` of always
predicting the most frequent class (``result.heads_at_chance``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from earlyexit_kernels.calibration.record import (
    TARGETS,
    CurvePoint,
    ExitRecord,
    Replay,
    accuracy,
    micro_f1,
    references,
    replay,
    resolve_target,
)
from earlyexit_kernels.methods.exit_rules import entropy
from earlyexit_kernels.methods.policies import (
    DACT,
    Entropy,
    ExitPolicy,
    MaxProb,
    MultiLabelConfidence,
    Patience,
    QExit,
    SkipGates,
    Voting,
)
from earlyexit_kernels.training.certified_calibration import certify
from earlyexit_kernels.training.record_exits import record_exits

__all__ = [
    "CalibrationWarning",
    "TARGETS",
    "ExitRecord",
    "Replay",
    "CurvePoint",
    "Calibration",
    "record_exits",
    "replay",
    "candidates",
    "accuracy",
    "micro_f1",
    "references",
    "chance_score",
    "accuracy_curve",
    "static_baseline",
    "interpolate_baseline",
    "calibrate",
    "describe",
    "distinct_digits",
    "print_curve",
    "compact_curve",
    "plot_curve",
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
    ``confidence=``, the :class:`~earlyexit_kernels.training.certified_calibration.Certificate`
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


def _quantile_grid(values: torch.Tensor, count: int) -> list[float]:
    values = values[torch.isfinite(values)].float()
    if values.numel() == 0:
        return []
    if values.numel() > 1_000_000:
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    grid = torch.quantile(values.double(), torch.linspace(0, 1, count, dtype=torch.float64))
    return sorted({float(v) for v in grid})


def candidates(record: ExitRecord, policy: ExitPolicy | None = None, *, count: int = 60) -> list[ExitPolicy]:
    """The candidate policies of ``policy``'s family (default: the recorded policy's) for this record."""
    policy = record.policy if policy is None else policy
    num_layers = record.num_layers
    inner = record.all_logits[:-1].float()  # the internal heads decide the early exits
    if isinstance(policy, (Entropy, SkipGates)):
        h = entropy(inner)
        if policy.normalized:
            h = h / math.log(record.all_logits.shape[-1])
        # Exit when H < tau: tau = 0 never exits early, a tau above every entropy exits at once.
        thresholds = [0.0] + [v for v in _quantile_grid(h, count) if v > 0] + [float(h.max()) * 1.001 + 1e-6]
        if isinstance(policy, SkipGates):
            return [dataclasses.replace(policy, entropy_threshold=t) for t in thresholds]
        return [Entropy(t, normalized=policy.normalized) for t in thresholds]
    if isinstance(policy, MaxProb):
        probs = torch.softmax(inner, dim=-1).amax(-1)
        return [MaxProb(t, temperature=policy.temperature) for t in _quantile_grid(probs, count) + [1.0]]
    if isinstance(policy, Patience):
        return [Patience(p, regression_threshold=policy.regression_threshold) for p in range(1, num_layers)]
    if isinstance(policy, Voting):
        return [Voting(k) for k in range(1, num_layers + 1)]
    if isinstance(policy, QExit):
        lam = torch.sigmoid(record.all_halting_logits[:-1].float())
        cdf = 1.0 - torch.cumprod(1.0 - lam, dim=0)
        qs = [min(max(v, 1e-6), 1 - 1e-6) for v in _quantile_grid(cdf, count)] + [1 - 1e-6]
        return [dataclasses.replace(policy, q=q, stochastic=False) for q in sorted(set(qs))]
    if isinstance(policy, DACT):
        return [DACT()]
    if isinstance(policy, MultiLabelConfidence):
        # A row exits when its least decided label has |z| >= ln(t / (1 - t)): the grid is over that |z|.
        least = inner.abs().amin(-1)
        margins = [m for m in _quantile_grid(least, count) if m > 0]
        thresholds = [0.5] + [1.0 / (1.0 + math.exp(-m)) for m in margins] + [1.0]
        return [MultiLabelConfidence(t) for t in sorted(set(thresholds))]
    raise ValueError(f"cannot calibrate a {type(policy).__name__} policy")


def accuracy_curve(
    record: ExitRecord, policies: Sequence[ExitPolicy], *, target: str = "auto", metric=None
) -> list[CurvePoint]:
    """Score and mean layers run of every policy in ``policies``, replayed on ``record``.

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
    """``(k, score)`` of cutting the model after layer ``k`` for every sequence (head k), k = 1..L."""
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


def calibrate(
    model_or_record,
    batches=None,
    *,
    max_drop: float | None = None,
    target_layers: float | None = None,
    policy: ExitPolicy | None = None,
    count: int = 60,
    verbose: bool = False,
    plot: str | None = None,
    target: str = "auto",
    metric=None,
    min_saving: float = 0.10,
    chance_margin: float = 0.02,
    confidence: float | None = None,
    path_record: ExitRecord | None = None,
    path: list[ExitPolicy] | None = None,
    unlabelled=None,
) -> Calibration:
    """Choose the policy's threshold on rows set apart for it (validation or calibration rows) for one target.

    ``model_or_record``: a patched model (then ``batches`` holds the rows) or an
    :class:`ExitRecord`. Exactly one target: ``max_drop`` (points): the fewest mean layers
    run with a score at least ``full - max_drop``; ``target_layers``: the best score
    with at most that many mean layers run. Ties go to the more accurate, then the
    cheaper candidate. ``policy``: the family and fixed fields (default: the recorded
    policy). When no candidate meets the target, the closest one is returned with
    ``met=False`` and a warning. ``verbose`` prints a compact curve (:func:`compact_curve`)
    and the summary, ``plot`` saves the curve.

    ``target``: ``"accuracy"`` (against the labels), ``"agreement"`` (against the full
    model's predictions: no labels needed, the full model scores 1.0) or ``"auto"`` (accuracy
    when the batches have labels, else agreement). ``metric``: a function
    ``metric(logits [N, C] float32, references [N]) -> float`` (higher is better) used in
    place of accuracy; references are the labels or the full model's predicted classes.

    It warns (:class:`CalibrationWarning`, message with the numbers, also kept in
    ``result.warnings``) when the chosen policy saves less than ``min_saving`` (a fraction,
    default 0.10) of the layers (``result.saves_little``), and when internal heads score
    at most ``chance_margin`` (a fraction, default 0.02) above always predicting the most
    frequent class (``result.heads_at_chance``: their layers), so that a policy running at
    full depth with untrained heads never passes silently as ``met=True``.

    ``confidence`` (in (0, 1), with ``max_drop``): certify the budget instead of meeting it on
    these rows: the most aggressive policy of a fixed grid whose risk is at most ``max_drop``
    points with probability ``confidence`` over the draw of the rows
    (:mod:`earlyexit_kernels.training.certified_calibration` says what is guaranteed and how);
    ``result.certificate`` holds the bound reached, and ``met`` is whether any early exit was
    certified (if none, the policy never exits early and a warning says how many rows would do).
    ``path_record`` (with ``confidence``): other rows than these (validation rows) on which the
    path of candidates is chosen (:mod:`earlyexit_kernels.training.certified_paths`); ``path``:
    the ordered candidates to walk, given whole (a folder's saved path). ``unlabelled`` (with
    ``confidence``): more calibration rows without labels (an :class:`ExitRecord`, or batches the model
    runs), in the certificate beside these (:func:`~earlyexit_kernels.training.certified_calibration.certify`).
    """
    if (max_drop is None) == (target_layers is None):
        raise ValueError("give exactly one target: max_drop (accuracy points) or target_layers (mean layers)")
    if confidence is not None:
        from earlyexit_kernels.methods.risk_control import check_confidence

        check_confidence(confidence)
        if target_layers is not None:
            raise ValueError("confidence certifies a risk budget: give max_drop (points), not target_layers")
        if metric is not None:
            raise ValueError(
                "confidence certifies a per-row risk (agreement, or accuracy lost against the full model); a custom "
                "metric has no per-row loss to bound: drop metric= or confidence="
            )
    if max_drop is not None and not max_drop >= 0:
        raise ValueError(f"max_drop must be >= 0 accuracy points, got {max_drop!r}")
    if not 0.0 <= min_saving <= 1.0:
        raise ValueError(f"min_saving must be a fraction of the layers in [0, 1], got {min_saving!r}")
    if not chance_margin >= 0.0:
        raise ValueError(f"chance_margin must be a fraction >= 0, got {chance_margin!r}")
    record = model_or_record if isinstance(model_or_record, ExitRecord) else record_exits(model_or_record, batches)
    if unlabelled is not None and confidence is None:
        raise ValueError("unlabelled rows join a certificate: give confidence= too, or leave them out")
    if unlabelled is not None and not isinstance(unlabelled, ExitRecord):
        if isinstance(model_or_record, ExitRecord):
            raise ValueError("unlabelled batches are run by the model: give an ExitRecord with a record")
        unlabelled = record_exits(model_or_record, unlabelled)
    measure = resolve_target(record, target)
    refs = references(record, measure)
    measure_name = getattr(metric, "__name__", "metric") if metric is not None else measure
    curve = accuracy_curve(record, candidates(record, policy, count=count), target=measure, metric=metric)
    baseline = static_baseline(record, target=measure, metric=metric)
    full_accuracy = baseline[-1][1]
    if max_drop is not None:
        floor = full_accuracy - max_drop / 100.0 - 1e-12
        feasible = [p for p in curve if p.accuracy >= floor]
        goal = f"{measure_name} >= {100 * full_accuracy:.2f}% - {max_drop:g} points"
        pool = feasible or sorted(curve, key=lambda p: -p.accuracy)[:1]
        best = min(pool, key=lambda p: (p.mean_layers, -p.accuracy))
    else:
        feasible = [p for p in curve if p.mean_layers <= target_layers + 1e-12]
        goal = f"mean layers <= {target_layers:g}"
        pool = feasible or sorted(curve, key=lambda p: p.mean_layers)[:1]
        best = max(pool, key=lambda p: (p.accuracy, -p.mean_layers))
    if not feasible and confidence is None:
        warnings.warn(f"calibrate: no candidate meets {goal}; returning the closest", stacklevel=2)
    result = Calibration(
        best.policy,
        best.accuracy,
        best.mean_layers,
        full_accuracy,
        bool(feasible),
        goal,
        curve,
        measure=measure_name,
        num_layers=record.num_layers,
        layer_scores=[score for _, score in baseline],
        chance=chance_score(refs, record.all_logits.shape[-1], metric),
    )
    if confidence is not None:
        best = _certify_into(result, record, max_drop, confidence, measure, policy, path_record, path, unlabelled)
    _check_savings(result, min_saving, chance_margin)
    for message in result.warnings:
        warnings.warn(message, CalibrationWarning, stacklevel=2)
    if verbose:
        print_curve(compact_curve(curve, chosen=best))
        print(result.summary())
    if plot:
        plot_curve(curve, plot, full_accuracy=full_accuracy, baseline=baseline, chosen=best)
    return result


def _certify_into(result, record, max_drop, confidence, measure, policy, path_record, path, unlabelled) -> CurvePoint:
    """Replace ``result``'s chosen point by the certified one; returns it (for printing and plotting)."""
    chosen, certificate, walked = certify(
        record,
        max_drop / 100.0,
        confidence,
        target=measure,
        policy=policy,
        path_record=path_record,
        candidates=path,
        unlabelled=unlabelled,
    )
    result.path = [point.policy for point in walked]
    result.policy, result.accuracy, result.mean_layers = chosen.policy, chosen.accuracy, chosen.mean_layers
    result.met = certificate.certified
    result.target = f"{certificate.risk} <= {max_drop:g}% with confidence {100 * confidence:g}%"
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


def describe(policy: ExitPolicy, digits: int | None = 4) -> str:
    """The code that builds ``policy``, floats rounded to ``digits`` significant digits (None: exact).

    ``Entropy(0.2131)``, ``Patience(2)``, ``QExit(q=0.41)``, ``SkipGates(entropy_threshold=0.3874)``:
    valid Python, as :meth:`ExitPolicy.to_code` writes it.
    """
    return policy.to_code(digits)


def distinct_digits(policies: Sequence[ExitPolicy], start: int = 4) -> int | None:
    """The fewest significant digits (at least ``start``) that print distinct policies distinctly.

    None when only the exact text does (17 digits are always enough for a float).
    """
    exact = len({repr(p) for p in policies})
    for digits in range(start, 18):
        if len({p.to_code(digits) for p in policies}) == exact:
            return digits
    return None


def print_curve(curve: Sequence[CurvePoint], file=None) -> None:
    """Print the accuracy-vs-layers table, cheapest first, with enough digits to tell the policies apart."""
    digits = distinct_digits([p.policy for p in curve])
    names = [describe(p.policy, digits) for p in curve]
    width = max([34, *(len(n) + 2 for n in names)])
    print(f"{'policy':<{width}}{'accuracy':>10}{'layers':>9}{'exit':>7}", file=file)
    for name, point in sorted(zip(names, curve), key=lambda item: (item[1].mean_layers, item[1].accuracy)):
        print(
            f"{name:<{width}}{100 * point.accuracy:>9.2f}%{point.mean_layers:>9.3f}{point.mean_exit_layer:>7.2f}",
            file=file,
        )


def compact_curve(curve: Sequence[CurvePoint], rows: int = 12, chosen: CurvePoint | None = None) -> list[CurvePoint]:
    """At most ``rows`` points of ``curve`` for printing: its Pareto front (no other point is both
    cheaper and more accurate), thinned evenly by mean layers, with its two ends and ``chosen`` kept."""
    ordered = sorted(curve, key=lambda p: (p.mean_layers, -p.accuracy))
    front, best = [], -math.inf
    for point in ordered:
        if point.accuracy > best:
            front.append(point)
            best = point.accuracy
    if len(front) > rows:
        picks = {round(i * (len(front) - 1) / (rows - 1)) for i in range(rows)}
        front = [p for i, p in enumerate(front) if i in picks]
    if chosen is not None and all(p is not chosen for p in front):
        front.append(chosen)
    return sorted(front, key=lambda p: (p.mean_layers, p.accuracy))


def plot_curve(
    curves,
    path: str,
    *,
    full_accuracy: float | None = None,
    baseline: Sequence[tuple[int, float]] | None = None,
    chosen: CurvePoint | None = None,
    title: str = "accuracy vs mean layers run",
) -> str | None:
    """Save accuracy against mean layers run as an image; returns ``path``, or None without matplotlib.

    ``curves``: one curve (a list of :class:`CurvePoint`) or a dict ``{label: curve}``.
    ``baseline``: the static cut-at-layer-k accuracies, drawn dashed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("plot_curve: matplotlib is not installed (pip install matplotlib); no plot written", stacklevel=2)
        return None
    if not isinstance(curves, Mapping):
        curves = {"early exit": curves}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if baseline is not None:
        ax.plot([k for k, _ in baseline], [100 * a for _, a in baseline], "k--o", ms=3, label="static: cut at layer k")
    for label, curve in curves.items():
        points = sorted(curve, key=lambda p: p.mean_layers)
        ax.plot([p.mean_layers for p in points], [100 * p.accuracy for p in points], "-o", ms=3, label=label)
    if full_accuracy is not None:
        ax.axhline(100 * full_accuracy, color="grey", lw=0.8, label="full model")
    if chosen is not None:
        ax.plot([chosen.mean_layers], [100 * chosen.accuracy], "r*", ms=12, label="chosen")
    ax.set_xlabel("mean layers run")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
