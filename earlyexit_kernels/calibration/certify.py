"""Calibration with a guarantee: the most aggressive policy whose risk is certified to stay within a budget.

    result = calibrate(model, calibration_batches, max_drop=1.0, confidence=0.95)
    result.certificate.describe()    # the risk, the rows, the bound reached, what it costs

What is guaranteed. Let the calibration rows and the rows the model will serve be drawn
independently from one distribution (exchangeable). Then, with probability at least
``confidence`` over the draw of the calibration rows, the chosen policy's risk on the served
rows is at most the budget. The risk is, per row:

- ``"agreement"`` (no labels needed): the early exit predicts another class than the full
  model (multi-label: the fraction of labels decided otherwise).
- ``"accuracy"`` (labels): the accuracy lost against the full model, row by row 1 (the full
  model right, the exit wrong), -1 (the other way round) or 0 (multi-label: the same per label,
  averaged over the row's labels). Its mean is the accuracy points lost.

What is not: the guarantee is over the draw of the calibration rows, for rows like them. A
shift in what is served (other topics, lengths, a new source) voids it; the serving watch
(``eek serve --audit-fraction``) measures the risk on live traffic for that reason.

How. The candidates are a fixed grid of the policy's family, set by the number of layers and
labels only (never by the calibration rows), ordered from the most conservative (never exits
early) to the most aggressive; or a path chosen on other rows (the validation rows:
:mod:`~earlyexit_kernels.calibration.candidates`), or one given whole (a folder's saved path). Each is tested in turn for "risk > budget" by the test of the risk asked for: an exact
binomial p-value (disagreement, 0/1 losses), the Hoeffding-Bentkus one (a multi-label row's fraction),
the exact paired test (accuracy lost, :mod:`~earlyexit_kernels.methods.paired_exact`) or betting (a
multi-label row's paired average, read in an order drawn from the OS's entropy, ``order_seed``); the test
stops at the first that is not rejected at ``1 - confidence`` (fixed-sequence testing,
Learn-then-Test): the last rejected candidate is chosen. With ``guarantee="expected"`` the walk stops at
the first candidate whose adjusted risk ``(n x observed + 1) / (n + 1)`` passes the budget (conformal risk
control): the budget holds on average over the draw of the rows (:data:`GUARANTEES`).
"""

from __future__ import annotations

import math

import torch

from earlyexit_kernels.calibration.candidates import GRID_STEPS, certified_candidates, choose_path
from earlyexit_kernels.calibration.certificate import (  # re-exported: certify's results, said in words
    GUARANTEES,
    MULTI_LABEL_RISKS,
    RISKS,
    Certificate,
    check_guarantee,
    describe_certificate,
    guarantee_of,
)
from earlyexit_kernels.calibration.record import (
    CurvePoint,
    ExitRecord,
    accuracy,
    is_multi_label_record,
    references,
    replays,
    resolve_target,
)
from earlyexit_kernels.calibration.row_losses import row_losses
from earlyexit_kernels.methods.policies import ExitPolicy
from earlyexit_kernels.methods.risk_control import (
    check_budget,
    check_confidence,
    draw_order_seed,
    fixed_sequence,
    least_rows,  # re-exported: the rows a certificate needs, worked out beside the tests they come from
    most_losses,
    risk_p_value,
    risk_upper_bound,
    rows_to_certify,
    test_for,
)

__all__ = [
    "GUARANTEES",
    "RISKS",
    "guarantee_of",
    "Certificate",
    "certified_index",
    "certify",
    "describe_certificate",
    "least_rows",
    "least_rows_for",
    "most_losses",
    "require_rows",
    "rows_needed",
]

# ---------------------------------------------------------------------------------- rows needed


def least_rows_for(budget: float, confidence: float, guarantee: str = "probable") -> int | None:
    """The fewest rows that certify ``budget`` for a policy that never errs: ``log(1 - confidence) / log(1 - budget)``
    under the probable guarantee, ``1 / budget - 1`` under the expected one (its adjusted risk ``1 / (n + 1)``);
    None where no number of rows does (a budget of 0)."""
    if guarantee == "expected":
        return None if budget <= 0 else max(1, math.ceil(1.0 / budget - 1.0 - 1e-12))
    return least_rows(budget, confidence)


def require_rows(
    rows: int, budget: float, confidence: float, *, unit: str = "rows", hint: str = "", guarantee: str = "probable"
) -> None:
    """A ``ValueError`` when ``rows`` cannot certify ``budget`` (at ``confidence``, or in expectation) even for a
    loss of 0."""
    least = least_rows_for(budget, confidence, guarantee)
    if least is None or rows < least:
        how = "(1 / budget - 1)" if guarantee == "expected" else "(log(1 - confidence) / log(1 - budget))"
        at = "in expectation" if guarantee == "expected" else f"at confidence {100 * confidence:g}%"
        raise ValueError(
            f"{rows} calibration {unit} cannot certify a risk budget of {100 * budget:g}% {at}: even a policy that "
            f"never errs needs {least} {unit} {how}; give more calibration {unit}{hint} or a lower confidence"
        )


def rows_needed(points, losses_of, budget, confidence, num_layers, *, test: str):
    """A candidate more rows would certify, and about how many: ``(rows, point, observed rate)`` of the one
    saving the most layers among those whose observed risk is at most half the budget (else the one
    needing the fewest rows); None where no candidate that exits early is under the budget. ``test``: the
    certificate's (:func:`~earlyexit_kernels.methods.risk_control.test_for`); a paired one counts the rows with
    the discordant rows' variance."""
    paired = test in ("exact paired", "betting")
    found = []
    for index, point in points:
        if point.mean_layers >= num_layers - 1e-9:
            continue
        losses = losses_of(index)
        rate = max(0.0, float(losses.mean()))
        discordant = float((losses != 0).double().mean()) if paired else None
        rows = rows_to_certify(rate, budget, confidence, binary=test == "exact binomial", discordant=discordant)
        if rows is not None:
            found.append((rows, point, rate))
    if not found:
        return None
    comfortable = [f for f in found if f[2] <= budget / 2]
    if comfortable:
        return min(comfortable, key=lambda f: f[1].mean_layers)
    return min(found, key=lambda f: f[0])


# ---------------------------------------------------------------------------------- the walk


def certified_index(losses_of, count: int, budget: float, confidence: float, *, test: str, seed: int = 0) -> int:
    """Fixed-sequence testing along ``count`` ordered candidates: the index of the last whose loss
    (``losses_of(i)``: per row, or per query) is certified within ``budget`` before the first that is not
    (-1: not even the first). Candidates after the first failure are never scored. ``test``: the risk's
    (:func:`~earlyexit_kernels.methods.risk_control.test_for`); ``seed``: the order a betting test reads rows in."""
    return fixed_sequence(lambda i: risk_p_value(losses_of(i), budget, test=test, seed=seed), count, 1.0 - confidence)


def _adjusted(losses: torch.Tensor) -> float:
    """Conformal risk control's adjusted risk of ``losses`` [n] (each at most 1): ``(n x mean + 1) / (n + 1)``."""
    n = losses.numel()
    return (float(losses.double().sum()) + 1.0) / (n + 1)


def expected_index(losses_of, count: int, budget: float) -> int:
    """Conformal risk control along ``count`` ordered candidates: the index of the last before the first whose
    adjusted risk ``(n x observed + 1) / (n + 1)`` passes ``budget`` (-1: not even the first). The walk stops there,
    never skipping to a more aggressive candidate that passes again."""
    return fixed_sequence(lambda i: 0.0 if _adjusted(losses_of(i)) <= budget else 1.0, count, 0.5)


def _point(policy: ExitPolicy, result, refs) -> CurvePoint:
    return CurvePoint(
        policy,
        float(accuracy(result.logits, refs)),
        result.layers_run.float().mean().item(),
        result.exit_layer.float().mean().item(),
    )


def certify(
    record: ExitRecord,
    budget: float,
    confidence: float,
    *,
    target: str = "auto",
    policy: ExitPolicy | None = None,
    steps: int = GRID_STEPS,
    path_record: ExitRecord | None = None,
    candidates: list[ExitPolicy] | None = None,
    unlabelled: ExitRecord | None = None,
    order_seed: int | None = None,
    guarantee: str = "probable",
    max_changed: float | None = None,
) -> tuple[CurvePoint, Certificate, list[CurvePoint]]:
    """The certified point on ``record``: ``(chosen, certificate, curve)``.

    Shapes: ``record.all_logits`` [L, n, C] on the n calibration rows, with ``labels`` [n] for accuracy
    (multi-label [n, C]); ``path_record`` and ``unlabelled`` are records of other rows of the same model
    ([L, m, C]); ``curve`` has one point per candidate.

    ``budget``: the risk budget, a fraction of rows (``max_drop / 100``); ``confidence`` in
    (0, 1); ``target``: ``"agreement"``, ``"accuracy"`` or ``"auto"`` (accuracy with labels);
    ``policy``: the family (default: the recorded policy's). ``chosen`` is a
    :class:`CurvePoint` scored like :func:`calibrate` (accuracy or agreement); ``curve``:
    every candidate of the grid, in order (``certificate.tested`` of them were tested). The
    certificate's uncertified point is the fewest mean layers of the grid whose score is
    within ``budget`` of the full model's on these rows, what calibrating without a
    guarantee would pick. Raises ``ValueError`` when the rows are too few for
    even a policy that never errs to be certified.

    ``path_record``: rows apart from ``record`` (the validation rows) on which the path is chosen
    (:func:`~earlyexit_kernels.calibration.candidates.choose_path`); None: the fixed grid.
    ``candidates``: an ordered path given whole (a folder's saved one), walked as is.

    ``unlabelled``: more calibration rows, without labels. Under ``"agreement"`` they are calibration rows
    like the others; under ``"accuracy"`` they join the labelled ones by prediction-powered inference
    (:mod:`~earlyexit_kernels.calibration.prediction_powered`), where the validation rows (``path_record``)
    predict that it certifies fewer layers than the labelled rows alone (else those alone, said in the
    certificate).

    ``order_seed``: the rows are read in the order it draws (default: a seed drawn from the operating system's
    entropy, kept in the certificate). A test that reads rows in order is valid only in an order drawn without
    looking at them; calibration rows are recorded from length-sorted batches, so they come sorted.

    ``guarantee``: ``"probable"`` (the default) or ``"expected"`` (:data:`GUARANTEES`); under ``"expected"`` the
    ``confidence`` is not used, and ``unlabelled`` rows join an agreement certificate only.

    ``max_changed``: a second budget, a fraction of rows, beside accuracy lost: the rows whose answer differs
    from the full model's (disagreement, the exact binomial test). Accuracy lost lets an exit's fixes of the full
    model's errors pay for as many new errors, so it does not bound how many answers change; with ``max_changed``
    a candidate is certified only where both risks are, at the same confidence (the larger of the two p-values:
    a valid test of "either risk is over its budget"), or under ``"expected"`` where both adjusted risks are
    within their budgets. Labelled rows only (``target`` ``"accuracy"``, no ``unlabelled`` rows).
    """
    check_guarantee(guarantee)
    budget, confidence = check_budget(budget), check_confidence(confidence)
    target = resolve_target(record, target)
    order_seed = draw_order_seed() if order_seed is None else int(order_seed)
    record = _shuffled(record, order_seed)
    unlabelled_note = None
    if unlabelled is not None:
        unlabelled = _shuffled(unlabelled, order_seed + 1)
        _check_unlabelled(record, unlabelled)
        if target == "agreement":  # disagreement needs no label: they are calibration rows like the others
            record, unlabelled = _joined(record, unlabelled), None
        elif guarantee == "expected":
            unlabelled_note = (unlabelled.all_logits.shape[1], "the expected guarantee reads the labelled rows only")
            unlabelled = None
    refs = references(record, target)
    num_layers, rows, num_labels = record.all_logits.shape
    require_rows(rows, budget, confidence, hint=", a larger budget", guarantee=guarantee)
    if max_changed is not None:
        max_changed = _checked_changed(max_changed, target, unlabelled)
        require_rows(rows, max_changed, confidence, hint=", a larger max_changed", guarantee=guarantee)
    grid = certified_candidates(record.policy if policy is None else policy, num_layers, num_labels, steps=steps)
    path_name, path_layers = "global", None
    if candidates is not None:
        grid, path_name = list(candidates), "saved"
    elif path_record is not None:
        choice = choose_path(
            path_record,
            grid,
            budget,
            lambda z, rows: row_losses(z, rows, target),
            steps=steps,
            confidence=confidence,
            calibration_rows=rows,
        )
        grid, path_name, path_layers = choice.candidates, choice.name, choice.layers
    # every candidate's decisions at once (a path's entropy thresholds in a few batched comparisons): the curve
    # reads them all anyway; the walk still scores them lazily, so ``tested`` counts what it read
    decided = dict(enumerate(replays(grid, record)))
    losses, changes = {}, {}
    test = test_for(paired=target == "accuracy", fractional=is_multi_label_record(record))
    changed_test = test_for(paired=False, fractional=is_multi_label_record(record))

    def losses_of(index: int) -> torch.Tensor:
        if index not in losses:
            losses[index] = row_losses(decided[index].logits, record, target)
        return losses[index]

    def changed_of(index: int) -> torch.Tensor:
        if index not in changes:
            losses_of(index)
            changes[index] = row_losses(decided[index].logits, record, "agreement")
        return changes[index]

    def within_changed(index: int) -> bool:
        """Whether candidate ``index``'s observed changes are within ``max_changed`` (always, without one)."""
        return max_changed is None or float(changed_of(index).mean()) <= max_changed + 1e-12

    # the risks each candidate is tested on: the one asked for, and the answers changed where they have a budget;
    # with one risk, the walks below are certified_index's and expected_index's
    risks = [(losses_of, budget, test)]
    if max_changed is not None:
        risks.append((changed_of, max_changed, changed_test))

    def probable_index() -> int:
        def p_value(index: int) -> float:  # the larger p-value: a valid test of "some risk is over its budget"
            return max(risk_p_value(of(index), cap, test=kind, seed=order_seed) for of, cap, kind in risks)

        return fixed_sequence(p_value, len(grid), 1.0 - confidence)

    def expected_walk() -> int:
        return fixed_sequence(
            lambda i: 0.0 if all(_adjusted(of(i)) <= cap for of, cap, _ in risks) else 1.0, len(grid), 0.5
        )

    powered = None
    if unlabelled is not None:
        from earlyexit_kernels.calibration.prediction_powered import powered_walk

        powered = powered_walk(
            record,
            unlabelled,
            grid,
            losses_of,
            decided,
            budget,
            confidence,
            path_record,
            lambda logits, rows: row_losses(logits, rows, "accuracy"),
        )
    if powered is not None and powered.bounds is not None:
        last = fixed_sequence(lambda i: 0.0 if powered.bounds.bound[i] <= budget else 1.0, len(grid), 0.5)
        tested = min(last + 2, len(grid))
    elif guarantee == "expected":
        last = expected_walk()
        tested = len(losses)
    else:
        last = probable_index()
        tested = len(losses)
    for index in range(len(grid)):  # the rest of the grid: the uncertified point, and what more rows would do
        losses_of(index)
    points = [(index, _point(grid[index], decided[index], refs)) for index in range(len(grid))]
    full_score = float(accuracy(record.full_logits.float(), refs))
    within = [p for i, p in points if p.accuracy >= full_score - budget - 1e-12 and within_changed(i)]
    chosen_index = max(last, 0)
    chosen = points[chosen_index][1]
    chosen_losses = losses_of(chosen_index)
    certified = last >= 0 and chosen.mean_layers < num_layers - 1e-9
    if guarantee == "expected":  # what the probable guarantee would serve on the same rows
        other = points[max(probable_index(), 0)][1].mean_layers
        bound = _adjusted(chosen_losses)
    else:
        other = points[max(expected_walk(), 0)][1].mean_layers
        bound = risk_upper_bound(chosen_losses, confidence, test=test, seed=order_seed)
    certificate = Certificate(
        budget=budget,
        confidence=confidence,
        risk=(MULTI_LABEL_RISKS if is_multi_label_record(record) else RISKS)[target],
        rows=rows,
        observed=float(chosen_losses.mean()),
        bound=bound,
        certified=certified,
        tested=tested,
        mean_layers=chosen.mean_layers,
        num_layers=num_layers,
        uncertified_layers=min(p.mean_layers for p in within) if within else None,
        path=path_name,
        path_layers=path_layers,
        order_seed=order_seed,
        test="conformal risk control" if guarantee == "expected" else test,
        guarantee=guarantee,
        other_layers=None if powered is not None and powered.bounds is not None else other,
    )
    if max_changed is not None:
        changed = changed_of(chosen_index)
        certificate.changed_budget, certificate.changed_observed = max_changed, float(changed.mean())
        certificate.changed_bound = (
            _adjusted(changed)
            if guarantee == "expected"
            else risk_upper_bound(changed, confidence, test=changed_test, seed=order_seed)
        )
    if unlabelled_note is not None:
        certificate.unlabelled_rows, certificate.unlabelled_use = unlabelled_note
    if powered is not None:
        powered.fill(certificate, chosen_index, losses_of(chosen_index), confidence)
    changed_points = [(i, p) for i, p in points if within_changed(i)]
    found = rows_needed(changed_points, losses_of, budget, confidence, num_layers, test=test)
    if certified and found is not None and found[1].mean_layers < chosen.mean_layers - 1e-9 and found[0] > rows:
        certificate.more_rows, certificate.more_rows_layers = found[0], found[1].mean_layers
    if not certified:
        if found is not None:
            certificate.rows_needed = found[0]
            certificate.needed_for = f"{found[1].policy.to_code(4)} ({found[1].mean_layers:.2f} mean layers)"
            certificate.needed_rate = found[2]
    return chosen, certificate, [point for _, point in points]


def _checked_changed(max_changed, target: str, unlabelled) -> float:
    """``max_changed`` (a fraction of rows) where it can be certified, else a ``ValueError`` saying what to do."""
    if target != "accuracy":
        raise ValueError(
            "max_changed bounds the answers changed beside accuracy lost; this certificate's risk is already "
            "disagreement with the full model: give that budget alone (max_drop), or labelled rows"
        )
    if unlabelled is not None:
        raise ValueError(
            "max_changed is certified on the labelled rows, and unlabelled rows join accuracy lost by "
            "prediction-powered inference only: leave the unlabelled rows out, or max_changed"
        )
    try:
        return check_budget(max_changed)
    except ValueError:
        raise ValueError(
            f"max_changed must be a fraction of rows in [0, 1) (0.03: three answers in a hundred), got {max_changed!r}"
        ) from None


def _shuffled(record: ExitRecord, seed: int) -> ExitRecord:
    """``record``'s rows in the order ``seed`` draws (a permutation that never looks at them)."""
    rows = record.all_logits.shape[1]
    return record.subset(torch.randperm(rows, generator=torch.Generator().manual_seed(seed)))


def _check_unlabelled(record: ExitRecord, unlabelled: ExitRecord) -> None:
    if unlabelled.all_logits.shape[0] != record.all_logits.shape[0] or (
        unlabelled.all_logits.shape[2] != record.all_logits.shape[2]
    ):
        raise ValueError(
            f"the unlabelled rows were recorded with {unlabelled.all_logits.shape[0]} layers and "
            f"{unlabelled.all_logits.shape[2]} labels, the calibration rows with {record.all_logits.shape[0]} and "
            f"{record.all_logits.shape[2]}: record both with the same model"
        )
    if is_multi_label_record(record):
        raise ValueError(
            "unlabelled rows join the certificate of a single-label classifier; a multi-label model's calibration "
            "rows need every label: leave the unlabelled rows out"
        )


def _joined(record: ExitRecord, more: ExitRecord) -> ExitRecord:
    """``record``'s rows then ``more``'s, without labels (what the agreement certificate reads)."""

    def both(a, b):
        return None if a is None or b is None else torch.cat([a, b], dim=1)

    reference = None
    if record.reference_logits is not None or more.reference_logits is not None:
        reference = torch.cat([record.full_logits, more.full_logits.to(record.full_logits.dtype)])
    return ExitRecord(
        torch.cat([record.all_logits, more.all_logits.to(record.all_logits.dtype)], dim=1),
        None,
        both(record.all_halting_logits, more.all_halting_logits),
        both(record.all_skipped, more.all_skipped),
        record.policy,
        reference,
    )
