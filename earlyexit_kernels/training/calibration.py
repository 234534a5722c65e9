"""Calibrate an exit policy on rows set apart for it: pick the threshold (patience, q, votes) for a target.

Every head runs once on the rows (``return_all_exits=True``,
:func:`~earlyexit_kernels.training.record_exits.record_exits`); each candidate policy is then
replayed offline on the recorded logits and halting logits with
:func:`earlyexit_kernels.methods.exit_rules.exit_step`, the step the engine applies, in the same
order and with the same state, so the replay makes exactly the decisions of the patched model's
all-exits forward (``out.exit_layer``, ``out.layers_run``) on that data. What is chosen and how is
tensor code over the record, in :mod:`earlyexit_kernels.calibration` (:mod:`~earlyexit_kernels.calibration.select`
says what is measured and when it warns); this module runs the model and reports.

    result = calibrate(model, val_batches, goal=Goal(max_drop=1.0))       # (a) fewest layers, <= 1 point lost
    result = calibrate(model, val_batches, goal=Goal(target_layers=3.0))  # (b) best accuracy at <= 3 layers
    result = calibrate(model, val_batches, max_drop=1.0)                  # (a) again: the Goal's fields as keywords
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
from earlyexit_kernels.training.fit_config import settings_of
from earlyexit_kernels.training.record_exits import record_exits

__all__ = ["Calibration", "CalibrationWarning", "Goal", "calibrate"]


def calibrate(
    model_or_record,
    batches=None,
    *,
    goal: Goal | None = None,
    path_record: ExitRecord | None = None,
    path: list[ExitPolicy] | None = None,
    unlabelled=None,
    verbose: bool = False,
    plot: str | None = None,
    **goal_fields,
) -> Calibration:
    """Choose the policy's threshold on rows set apart for it (validation or calibration rows) for one ``goal``.

    ``model_or_record``: a patched model (then ``batches`` holds the rows) or an
    :class:`~earlyexit_kernels.calibration.record.ExitRecord`. ``goal``: what is asked, a
    :class:`~earlyexit_kernels.calibration.select.Goal` (its docstring says each field: the target ``max_drop`` or
    ``target_layers``, the ``policy`` family, what is measured, when it warns, and with ``confidence`` the
    certificate's ``guarantee`` and ``max_changed``), checked once when it is made. Its fields may be given as
    keywords instead (``calibrate(record, max_drop=1.0)`` is ``calibrate(record, goal=Goal(max_drop=1.0))``), not
    both. When no candidate meets an uncertified target, the closest one is returned with ``met=False`` and a
    warning. ``verbose`` prints a compact curve (:func:`~earlyexit_kernels.calibration.report.compact_curve`) and
    the summary, ``plot`` saves the curve.

    It warns (:class:`CalibrationWarning`, message with the numbers, also kept in
    ``result.warnings``) when the chosen policy saves less than ``goal.min_saving`` of the layers
    (``result.saves_little``), and when internal heads score at most ``goal.chance_margin`` above always
    predicting the most frequent class (``result.heads_at_chance``: their layers), so that a policy running at
    full depth with untrained heads never passes silently as ``met=True``.

    With ``goal.confidence``, the budget is certified instead of met on these rows
    (:mod:`earlyexit_kernels.calibration.certify` says what is guaranteed and how): ``result.certificate`` holds the
    bound reached, and ``met`` is whether any early exit was certified (if none, the policy never exits early and a
    warning says how many rows would do). ``path_record``: other rows than these (validation rows) on which the
    path of candidates is chosen (:mod:`earlyexit_kernels.calibration.candidates`); ``path``: the ordered
    candidates to walk, given whole (a folder's saved path). ``unlabelled``: more calibration rows without labels
    (an ``ExitRecord``, or batches the model runs), in the certificate beside these
    (:func:`~earlyexit_kernels.calibration.certify.certify`).
    """
    goal = settings_of(Goal, goal, goal_fields, who="calibrate", what="goal")
    record = model_or_record if isinstance(model_or_record, ExitRecord) else record_exits(model_or_record, batches)
    if unlabelled is not None and goal.confidence is None:
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
