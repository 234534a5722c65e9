"""What certification along an ordered path of candidates would keep, predicted from rows like the calibration rows.

Fixed-sequence testing walks the path from its most conservative candidate and stops at the first one
the calibration rows fail; the candidate before it is certified. Given each candidate's losses and
layers on rows apart from the calibration rows (the validation rows), :class:`WalkTable` predicts
where that walk would stop on ``calibration_rows`` rows like them: 0/1 losses by the exact binomial,
as certification counts them; paired ones of one label a row by the exact paired test's score statistic
(:mod:`~earlyexit_kernels.methods.paired_exact`) at the rows' shares of +1 and -1, passing when it is below
minus ``z`` (``z``: the normal quantile of the confidence), its null variance that of the discordant rows;
other paired ones (multi-label averages) when their mean plus ``z`` standard errors is within the budget. Weights over the rows let one table predict for
many bootstrap re-draws at once. The calibration share
(:mod:`~earlyexit_kernels.calibration.share`) asks it how many rows to keep out; the path choice
(:func:`~earlyexit_kernels.calibration.candidates.choose_path`) which path keeps more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from earlyexit_kernels.calibration.record import replays
from earlyexit_kernels.methods.risk_control import is_binary, least_rows, most_losses

__all__ = ["WalkTable", "point_weights"]


def point_weights(rows: int) -> torch.Tensor:
    """The weights [1, rows] of the rows as they are (each ``1 / rows``)."""
    return torch.full((1, rows), 1.0 / rows, dtype=torch.float64)


@dataclass
class WalkTable:
    """Each candidate of a path (most conservative first) on the rows of one record: the rows' ``losses`` and
    ``layers`` [candidates, rows], so that :meth:`predicted` weighs them for many re-draws of the rows at once."""

    losses: torch.Tensor  # float64
    layers: torch.Tensor  # float64
    binary: bool
    num_layers: int

    @property
    def rows(self) -> int:
        return self.losses.shape[1]

    @property
    def one_label(self) -> bool:
        """Paired losses of one label a row (each -1, 0 or 1): the exact paired test's."""
        return bool(((self.losses == 1) | (self.losses == 0) | (self.losses == -1)).all())

    @classmethod
    def of_path(cls, candidates, record, loss_of) -> WalkTable:
        """The table of ``candidates`` (in walk order) on ``record``; ``loss_of(logits [N, C]) -> [N]``."""
        outs = list(replays(candidates, record))
        losses = torch.stack([loss_of(out.logits).double() for out in outs])
        layers = torch.stack([out.layers_run.double() for out in outs])
        return cls(losses, layers, is_binary(losses), record.all_logits.shape[0])

    def predicted(self, weights: torch.Tensor, budget: float, confidence: float, calibration_rows: int):
        """The mean layers the walk would keep certified on ``calibration_rows`` rows like these, for each row
        of ``weights`` [draws, rows] (each draw's weights sum to 1): float64 [draws]; all the layers where
        no candidate is certified (and below the rows a loss-free policy needs)."""
        from statistics import NormalDist

        draws = weights.shape[0]
        full = torch.full((draws,), float(self.num_layers), dtype=torch.float64)
        if calibration_rows < least_rows(budget, confidence):
            return full
        rate = weights @ self.losses.T  # [draws, candidates]
        if self.binary:  # the exact binomial, as certification counts 0/1 losses
            fails = torch.floor(rate * calibration_rows + 1e-9) > most_losses(calibration_rows, budget, confidence)
        elif self.one_label:  # the exact paired test's statistic at these shares, as certification tests them
            from earlyexit_kernels.methods.paired_exact import score_statistic

            plus = weights @ (self.losses == 1).double().T
            minus = weights @ (self.losses == -1).double().T
            n = calibration_rows
            fails = score_statistic(n * plus, n * minus, n, budget) > -NormalDist().inv_cdf(confidence)
        else:
            spread = (weights @ (self.losses**2).T - rate**2).clamp_min(0.0).sqrt()
            z = NormalDist().inv_cdf(confidence)
            fails = rate + z * spread / math.sqrt(calibration_rows) > budget
        # the walk stops at its first failing candidate; the one before it is certified
        sentinel = torch.ones((draws, 1), dtype=torch.bool)
        first_fail = torch.cat([fails, sentinel], dim=1).int().argmax(dim=1)
        mean_layers = torch.cat([full[:, None], weights @ self.layers.T], dim=1)
        return mean_layers.gather(1, first_fail[:, None]).squeeze(1)
