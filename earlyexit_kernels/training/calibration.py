"""Calibrate an exit policy on rows set apart for it: pick the threshold (patience, q, votes) for a target.

Every head runs once on the rows (``return_all_exits=True``,
:func:`~earlyexit_kernels.training.record_exits.record_exits`); each candidate policy is then
replayed offline on the recorded logits and halting logits with
:func:`earlyexit_kernels.methods.exit_rules.exit_step`, the step the engine applies, in the same
order and with the same state, so the replay makes exactly the decisions of the patched model's
all-exits forward (``out.exit_layer``, ``out.layers_run``) on that data. What is chosen and how is
tensor code over the record, in :mod:`earlyexit_kernels.calibration` (:mod:`~earlyexit_kernels.calibration.select`
says what is measured and when it warns); this module runs the model and reports.

    result = calibrate(model, val_batches, max_drop=1.0)        # (a) fewest layers, <= 1 point lost
    result = calibrate(model, val_batches, target_layers=3.0)   # (b) best accuracy at <= 3 layers
    eek.patch(model, result.policy)
    print_curve(result.curve); plot_curve(result.curve, "curve.png", full_accuracy=result.full_accuracy)

Classification heads only (num_labels >= 2): for a regression head,
:func:`~earlyexit_kernels.calibration.record.replay` candidate policies on one
:func:`~earlyexit_kernels.training.record_exits.record_exits` and choose by hand.
"""

from __future__ import annotations

import warnings

from earlyexit_kernels.calibration.record import ExitRecord
from earlyexit_kernels.calibration.report import compact_curve, plot_curve, print_curve
from earlyexit_kernels.calibration.select import Calibration, CalibrationWarning, Goal, choose
from earlyexit_kernels.methods.policies import ExitPolicy
from earlyexit_kernels.training.record_exits import record_exits

__all__ = ["Calibration", "CalibrationWarning", "calibrate"]


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
    guarantee: str = "probable",
    max_changed: float | None = None,
) -> Calibration:
    """Choose the policy's threshold on rows set apart for it (validation or calibration rows) for one target.

    ``model_or_record``: a patched model (then ``batches`` holds the rows) or an
    :class:`~earlyexit_kernels.calibration.record.ExitRecord`. Exactly one target: ``max_drop`` (points):
    the fewest mean layers run with a score at least ``full - max_drop``; ``target_layers``: the best score
    with at most that many mean layers run. Ties go to the more accurate, then the
    cheaper candidate. ``policy``: the family and fixed fields (default: the recorded
    policy). When no candidate meets the target, the closest one is returned with
    ``met=False`` and a warning. ``verbose`` prints a compact curve
    (:func:`~earlyexit_kernels.calibration.report.compact_curve`) and the summary, ``plot`` saves the curve.

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
    (:mod:`earlyexit_kernels.calibration.certify` says what is guaranteed and how);
    ``result.certificate`` holds the bound reached, and ``met`` is whether any early exit was
    certified (if none, the policy never exits early and a warning says how many rows would do).
    ``path_record`` (with ``confidence``): other rows than these (validation rows) on which the
    path of candidates is chosen (:mod:`earlyexit_kernels.calibration.candidates`); ``path``:
    the ordered candidates to walk, given whole (a folder's saved path). ``unlabelled`` (with
    ``confidence``): more calibration rows without labels (an ``ExitRecord``, or batches the model
    runs), in the certificate beside these (:func:`~earlyexit_kernels.calibration.certify.certify`).
    ``guarantee`` (with ``confidence``): ``"probable"`` (the default: with probability ``confidence``, the risk is
    within the budget) or ``"expected"`` (within it on average over the draw of the rows, conformal risk control:
    cheaper, and any one draw may serve above it); :data:`~earlyexit_kernels.calibration.certify.GUARANTEES`.
    ``max_changed`` (points, with ``confidence`` and labelled rows): a second budget certified beside accuracy lost,
    on the answers changed against the full model (accuracy lost lets fixes of the full model's errors pay for new
    errors, so it alone does not bound how many answers change).
    """
    goal = Goal(
        max_drop=max_drop,
        target_layers=target_layers,
        policy=policy,
        count=count,
        target=target,
        metric=metric,
        min_saving=min_saving,
        chance_margin=chance_margin,
        confidence=confidence,
        guarantee=guarantee,
        max_changed=max_changed,
    )
    record = model_or_record if isinstance(model_or_record, ExitRecord) else record_exits(model_or_record, batches)
    if unlabelled is not None and confidence is None:
        raise ValueError("unlabelled rows join a certificate: give confidence= too, or leave them out")
    if unlabelled is not None and not isinstance(unlabelled, ExitRecord):
        if isinstance(model_or_record, ExitRecord):
            raise ValueError("unlabelled batches are run by the model: give an ExitRecord with a record")
        unlabelled = record_exits(model_or_record, unlabelled)
    chosen = choose(record, goal, path_record=path_record, path=path, unlabelled=unlabelled)
    result = chosen.result
    if chosen.missed is not None:
        warnings.warn(f"calibrate: no candidate meets {chosen.missed}; returning the closest", stacklevel=2)
    for message in result.warnings:
        warnings.warn(message, CalibrationWarning, stacklevel=2)
    if verbose:
        print_curve(compact_curve(result.curve, chosen=chosen.point))
        print(result.summary())
    if plot:
        plot_curve(
            result.curve, plot, full_accuracy=result.full_accuracy, baseline=chosen.baseline, chosen=chosen.point
        )
    return result
