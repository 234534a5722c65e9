"""Accuracy lost certified on labelled and unlabelled rows together: prediction-powered inference.

A user with a few labelled rows nearly always has many unlabelled ones (what they will serve).
The accuracy lost against the full model is, per row, ``l = 1[full right] - 1[exit right]``: 0
wherever the exit predicts the full model's class, so only the rows where they disagree need a
label. On such a row the full model's own probabilities predict the loss without one:
``p = P_full(full class) - P_full(exit's class)`` (0 where they agree). For any fixed weight ``w``,

    E[l] = w * E[p] + E[l - w * p]

(Angelopoulos et al., "Prediction-powered inference", Science 2023; the weight as in their PPI++).
The first term needs no label: it is bounded on every row, labelled and unlabelled. The second,
the prediction's error, is bounded on the labelled rows; where the prediction is good it varies
less than ``l`` itself, so fewer labelled rows bound it as tightly. Each term gets an upper
bound by betting (:func:`~earlyexit_kernels.methods.risk_control.paired_upper_bounds`, valid for any
number of rows, whatever the full model's calibration), the miss rate ``1 - confidence`` split
between them (``PREDICTED_SHARE`` of it to the first, bounded on many rows), and their sum is an
upper ``confidence`` bound on the accuracy lost (a union bound: both hold at once with probability
at least ``confidence``).

What it can gain is limited, and the validation rows decide whether to use it. A bound on a mean
costs about ``log(1 / miss) / n`` per unit of range even where every value is 0, so the error term
pays that on the labelled rows whatever the prediction; it wins where the accuracy lost varies
much (many disagreements that cancel) and the full model's probabilities say which way each
disagreement goes. They cannot predict a row where the exit is right and the full model wrong
(the predicted loss is never negative), so rows where the two models are equally unsure stay
as uncertain as without it. A candidate is certified where that sum is within the budget; the walk
along the path is Learn-then-Test's fixed sequence, as with labelled rows alone.

The weight must not be chosen on the calibration rows: it is set on the validation rows (those
the path is chosen on) as the variance-minimising ``Cov(l, p) / Var(p) * N / (N + n)`` (``n``
labelled, ``N`` all rows), clipped to [0, 1]; without validation rows, ``N / (N + n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from earlyexit_kernels.methods.risk_control import paired_upper_bounds

__all__ = ["PoweredBounds", "PoweredWalk", "powered_bounds", "powered_walk", "powered_weights", "predicted_losses"]


def predicted_losses(exit_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
    """The accuracy lost each row's early exit is predicted to cost by the full model's probabilities:
    ``P_full(full class) - P_full(exit's class)`` where the classes differ, else 0; float64 [N] in [-1, 1]."""
    probabilities = full_logits.double().softmax(-1)
    full_class, exit_class = full_logits.argmax(-1), exit_logits.float().argmax(-1)
    rows = torch.arange(full_logits.shape[0])
    gap = probabilities[rows, full_class] - probabilities[rows, exit_class]
    return torch.where(exit_class != full_class, gap, torch.zeros_like(gap))


def powered_weights(losses: torch.Tensor, predicted: torch.Tensor, labelled: int, total: int) -> torch.Tensor:
    """Each candidate's weight ``w`` [K] from rows apart from the calibration rows (``losses``, ``predicted``
    [K, m]: the validation rows), for ``labelled`` labelled of ``total`` calibration rows; None-free:
    ``total / (total + labelled)`` where the rows say nothing (no spread in the prediction)."""
    share = total / (total + labelled)
    if losses.shape[1] < 2:
        return torch.full((losses.shape[0],), share, dtype=torch.float64)
    centred = predicted - predicted.mean(1, keepdim=True)
    spread = (centred**2).mean(1)
    covariance = (centred * (losses - losses.mean(1, keepdim=True))).mean(1)
    slope = torch.where(spread > 1e-12, covariance / spread.clamp_min(1e-12), torch.ones_like(spread))
    return (slope * share).clamp(0.0, 1.0)


@dataclass
class PoweredBounds:
    """Per candidate [K]: ``bound`` = ``predicted_part`` + ``error_part``, the upper ``confidence`` bound on the
    accuracy lost; ``predicted_part``: ``w`` times the bound on the predicted loss (every row);
    ``error_part``: the bound on the prediction's error (labelled rows); ``estimate``: the point estimate;
    ``weight``: ``w``."""

    bound: torch.Tensor
    predicted_part: torch.Tensor
    error_part: torch.Tensor
    estimate: torch.Tensor
    weight: torch.Tensor


#: the share of the miss rate ``1 - confidence`` spent on the predicted part (bounded on every row, labelled
#: or not: many rows, a tight bound at any level); the rest goes to the prediction's error (the labelled rows)
PREDICTED_SHARE = 0.2


def _bounded(values: torch.Tensor, low: float | torch.Tensor, high: float | torch.Tensor, confidence: float):
    """Upper ``confidence`` bounds [K] on the means of ``values`` [K, n], each row within [low, high]: mapped onto
    [-1, 1] for the betting bound, then back (the narrower the range, the tighter the bound)."""
    low = torch.as_tensor(low, dtype=torch.float64).reshape(-1, 1)
    high = torch.as_tensor(high, dtype=torch.float64).reshape(-1, 1)
    span = high - low
    mapped = (2.0 * (values.double() - low) / span - 1.0).clamp(-1.0, 1.0)
    return low.squeeze(1) + (paired_upper_bounds(mapped, confidence) + 1.0) * span.squeeze(1) / 2.0


def powered_bounds(
    losses: torch.Tensor,
    predicted_labelled: torch.Tensor,
    predicted_all: torch.Tensor,
    weight: torch.Tensor,
    confidence: float,
) -> PoweredBounds:
    """:class:`PoweredBounds` of K candidates from the labelled rows' losses and predictions [K, n] and every
    row's prediction [K, N] (the labelled rows among them). The predicted loss lies in [0, 1] (the full
    model's class is its most probable one), its error ``l - w p`` in [-1 - w, 1]; the miss rate is split
    ``PREDICTED_SHARE`` to the first, the rest to the second."""
    miss = 1.0 - confidence
    w = weight.double()
    predicted_part = w * _bounded(predicted_all, 0.0, 1.0, 1.0 - PREDICTED_SHARE * miss)
    error = losses.double() - w[:, None] * predicted_labelled.double()
    error_part = _bounded(error, -1.0 - w, torch.ones_like(w), 1.0 - (1.0 - PREDICTED_SHARE) * miss)
    estimate = w * predicted_all.double().mean(1) + error.mean(1)
    return PoweredBounds(predicted_part + error_part, predicted_part, error_part, estimate, w)


#: candidates whose bounds are computed at a time, in the walk's order, until one fails
_CHUNK = 64


@dataclass
class PoweredWalk:
    """The unlabelled rows' part in a certificate: ``bounds`` per candidate of the path (``inf`` past the
    first chunk holding a failure), or None where the labelled rows alone certify (``reason`` says why)."""

    bounds: PoweredBounds | None
    unlabelled_rows: int
    reason: str | None = None

    def fill(self, certificate, chosen: int, chosen_losses: torch.Tensor, confidence: float) -> None:
        """Write what the unlabelled rows contributed into ``certificate`` (a ``Certificate``)."""
        from earlyexit_kernels.methods.risk_control import risk_upper_bound

        certificate.unlabelled_rows = self.unlabelled_rows
        if self.bounds is None:
            certificate.unlabelled_use = self.reason
            return
        certificate.unlabelled_use = "powered"
        certificate.observed = float(self.bounds.estimate[chosen])
        certificate.bound = float(self.bounds.bound[chosen])
        certificate.predicted_part = float(self.bounds.predicted_part[chosen])
        certificate.error_part = float(self.bounds.error_part[chosen])
        certificate.labelled_bound = risk_upper_bound(chosen_losses, confidence, test="exact paired")


def powered_walk(
    record, unlabelled, grid, losses_of, replays, budget, confidence, path_record, row_losses
) -> PoweredWalk:
    """The bounds of the path ``grid`` on the labelled ``record`` and the ``unlabelled`` rows (ExitRecords),
    ``losses_of(i)``: candidate ``i``'s accuracy lost per labelled row, ``replays[i]`` its decisions there. The weight
    and the choice against the labelled rows alone are made on ``path_record`` (labelled validation rows)
    where there is one, its losses by ``row_losses(logits, record)`` (the certificate's own)."""
    from earlyexit_kernels.calibration.record import replays as replay_all

    labelled, extra = record.all_logits.shape[1], unlabelled.all_logits.shape[1]
    total = labelled + extra
    weight = torch.full((len(grid),), total / (total + labelled), dtype=torch.float64)
    if path_record is not None and path_record.labels is not None:
        weight, reason = _weigh_on(path_record, grid, budget, confidence, labelled, total, row_losses)
        if reason is not None:
            return PoweredWalk(None, extra, reason)
    nothing = torch.full((len(grid),), float("inf"), dtype=torch.float64)
    parts = PoweredBounds(nothing.clone(), nothing.clone(), nothing.clone(), nothing.clone(), weight)
    for start in range(0, len(grid), _CHUNK):
        chunk = range(start, min(start + _CHUNK, len(grid)))
        losses = torch.stack([losses_of(i) for i in chunk])
        mine = torch.stack([predicted_losses(replays[i].logits, record.full_logits) for i in chunk])
        theirs = torch.stack(
            [
                predicted_losses(out.logits, unlabelled.full_logits)
                for out in replay_all([grid[i] for i in chunk], unlabelled)
            ]
        )
        found = powered_bounds(losses, mine, torch.cat([mine, theirs], 1), weight[start : chunk.stop], confidence)
        for name in ("bound", "predicted_part", "error_part", "estimate"):
            getattr(parts, name)[start : chunk.stop] = getattr(found, name)
        if bool((found.bound > budget).any()):
            break
    return PoweredWalk(parts, extra)


def _weigh_on(path_record, grid, budget: float, confidence: float, labelled: int, total: int, row_losses):
    """Each candidate's weight from the validation rows, and why not to use the unlabelled rows (None: use
    them). Both certificates are computed on a draw of the validation rows as large as the calibration
    rows (``labelled`` with labels, ``total`` in all; seeded, the same rows for both), and the mean layers
    each keeps along ``grid`` compared."""
    from earlyexit_kernels.calibration.record import replays as replay_all
    from earlyexit_kernels.methods.risk_control import paired_upper_bounds

    outs = list(replay_all(grid, path_record))
    losses = torch.stack([row_losses(out.logits, path_record) for out in outs])
    predicted = torch.stack([predicted_losses(out.logits, path_record.full_logits) for out in outs])
    layers = [out.layers_run.double().mean().item() for out in outs]
    weight = powered_weights(losses, predicted, labelled, total)
    rows = path_record.all_logits.shape[1]
    drawn = torch.randint(rows, (total,), generator=torch.Generator().manual_seed(0))
    mine = drawn[:labelled]
    alone = paired_upper_bounds(losses[:, mine], confidence)
    powered = powered_bounds(losses[:, mine], predicted[:, mine], predicted[:, drawn], weight, confidence).bound
    num_layers = float(path_record.all_logits.shape[0])

    def walked(bounds: torch.Tensor) -> float:
        kept = num_layers
        for index, bound in enumerate(bounds.tolist()):
            if bound > budget:
                break
            kept = layers[index]
        return kept

    with_them, without = walked(powered), walked(alone)
    if with_them < without - 1e-9:
        return weight, None
    return weight, (
        f"on the {rows} validation rows, drawn as many as the calibration rows, the labelled rows alone "
        f"certify {without:.2f} mean layers and with the unlabelled ones {with_them:.2f}"
    )
