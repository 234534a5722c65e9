"""The library's calibration of a patched model: its heads recorded on rows set apart, then the threshold chosen.

The policy's threshold (patience, q, votes) is picked for a target.

Every head runs once on the rows (``return_all_exits=True``,
:func:`record_exits`, below); each candidate policy is then
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
:func:`record_exits` and choose by hand.

:func:`calibrate` is the library's entry (``eek.calibrate``); the certificate's statistics are
:mod:`earlyexit_kernels.calibration.certify`, ``eek calibrate``'s re-certification of a saved folder is
:mod:`earlyexit_kernels.integrations.recertify_folder`, and the same from texts and a tokenizer is
:mod:`earlyexit_kernels.training.calibrate_texts`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch

from earlyexit_kernels.calibration.candidates import compact_curve, plot_curve, print_curve
from earlyexit_kernels.calibration.record import ExitRecord
from earlyexit_kernels.calibration.select import Calibration, CalibrationWarning, Goal, choose
from earlyexit_kernels.methods.policies import ExitPolicy, Scheduled
from earlyexit_kernels.training.fit_config import settings_of

__all__ = ["Calibration", "CalibrationWarning", "Goal", "calibrate", "each_batch", "record_exits"]


def each_batch(data) -> Iterable[Mapping[str, torch.Tensor]]:
    """The batches of ``data``: one batch (a dict) alone, or each of a list, a ``DataLoader`` or a generator."""
    if isinstance(data, Mapping):
        yield data
    else:
        yield from data


@torch.no_grad()
def record_exits(model, batches) -> ExitRecord:
    """Run every layer and head of a patched model on ``batches`` once (eval mode) and record them.

    ``batches``: dicts with ``input_ids`` and optionally ``attention_mask``,
    ``token_type_ids``, ``labels``. The record is kept on the CPU.
    """
    from earlyexit_kernels.patching.state import is_patched, state_of

    if not is_patched(model):
        raise ValueError("record_exits needs a model patched with eek.patch")
    policy = state_of(model).policy
    if isinstance(policy, Scheduled):
        raise ValueError("a Scheduled policy cannot be calibrated; patch the model with the policy to calibrate")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, halting, skipped, labels = [], [], [], []
    try:
        for batch in each_batch(batches):
            out = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=None if batch.get("attention_mask") is None else batch["attention_mask"].to(device),
                token_type_ids=None if batch.get("token_type_ids") is None else batch["token_type_ids"].to(device),
                return_all_exits=True,
            )
            logits.append(out.all_logits.cpu())
            if out.all_halting_logits is not None:
                halting.append(out.all_halting_logits.cpu())
            if out.all_skipped is not None:
                skipped.append(out.all_skipped.cpu())
            if batch.get("labels") is not None:
                labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("record_exits got no batches")
    return ExitRecord(
        torch.cat(logits, dim=1),
        torch.cat(labels) if labels else None,
        torch.cat(halting, dim=1) if halting else None,
        torch.cat(skipped, dim=1) if skipped else None,
        policy,
    )


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
    warning. ``verbose`` prints a compact curve (:func:`~earlyexit_kernels.calibration.candidates.compact_curve`) and
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
