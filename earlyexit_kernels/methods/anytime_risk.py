"""Anytime-valid tests of a risk on a stream of audited rows: a betting e-process and an e-detector.

A served candidate's *risk* is the mean of a per-row loss ``z`` in [0, 1] (1 when its early exit
disagrees with the full model). The audit adds rows one at a time and may be looked at after
every one, so a test run once on a fixed sample (the binomial of
:mod:`~earlyexit_kernels.methods.risk_control`) would lose its level over repeated looks. These
two statistics keep theirs at every moment:

- :func:`safety_log_capital` (certify "risk <= budget"): a bettor starts with 1 and, row by row,
  multiplies its capital by ``1 + lam_t * (budget - z_t)``. Were the risk at or over the budget
  on every row, the capital would be a nonnegative supermartingale and, by Ville's inequality,
  would ever reach ``1 / delta`` with probability at most ``delta`` whenever it is read. The
  stake ``lam_t`` is set from the rows before (predictable: any such choice keeps the test
  valid): the Kelly bet ``(budget - r) / (budget * (1 - budget))`` against the rate ``r``
  estimated with :data:`PRIOR_ROWS` pseudo-rows at half the budget, capped at
  :data:`MAX_STAKE` ``/ (1 - budget)`` so that one loss keeps a tenth of the capital.
- :func:`alarm_log_detector` (show "risk > budget"): a mixture of e-CUSUM detectors (Shin,
  Ramdas and Rinaldo 2023), each betting that the risk is ``budget * (1 + a)`` for a shift ``a``
  of :data:`ALARM_SHIFTS` and restarting whenever that bet lost: ``C_t = max(C_{t-1}, 1) * (1 +
  lam * (z_t - budget))``. Their mean has expectation at most ``t`` while the risk is at or under
  the budget, so an alarm at ``A`` comes, on average, no sooner than ``A`` rows after the risk
  last was there (Lorden's average run length): a drift shows within a few hundred rows of the
  change, whatever the stream did before it.

Both take the losses of ``M`` candidates on the same rows at once ([M, n], float64) and carry
their state from one chunk of rows to the next, so a server feeds them as the audit runs and a
replay in chunks of any size gets the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ALARM_SHIFTS",
    "MAX_STAKE",
    "PRIOR_ROWS",
    "AlarmState",
    "SafetyState",
    "alarm_log_cusums",
    "alarm_log_detector",
    "detector_of",
    "safety_log_capital",
]

#: the stake's cap times (1 - budget): a loss of 1 keeps 1 - MAX_STAKE of the capital
MAX_STAKE = 0.9
#: pseudo-rows at half the budget that the bettor's rate estimate starts from, in units of 1 / budget
PRIOR_ROWS = 1.0
#: the shifts the alarm's detectors bet on: a risk of budget * (1 + a)
ALARM_SHIFTS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass
class SafetyState:
    """The bettor's state per candidate: ``losses`` summed [M] and ``log_capital`` [M] (float64) after ``rows``."""

    losses: torch.Tensor
    log_capital: torch.Tensor
    rows: int = 0

    @classmethod
    def start(cls, count: int) -> SafetyState:
        zeros = torch.zeros(count, dtype=torch.float64)
        return cls(zeros, zeros.clone(), 0)


@dataclass
class AlarmState:
    """The detectors' state: ``log_cusum`` [M, K] (float64; -inf before any row)."""

    log_cusum: torch.Tensor

    @classmethod
    def start(cls, count: int) -> AlarmState:
        return cls(torch.full((count, len(ALARM_SHIFTS)), -math.inf, dtype=torch.float64))


def safety_log_capital(state: SafetyState, losses: torch.Tensor, budget: float) -> tuple[torch.Tensor, SafetyState]:
    """The bettor's log capital after each of ``losses`` [M, n] (in [0, 1]): ``([M, n], the state after them)``.

    The capital of candidate ``m`` reaching ``1 / delta`` certifies, at level ``delta`` and at
    any moment it is read, that the risk of ``m`` is under ``budget``."""
    if not 0.0 < budget < 1.0:
        raise ValueError(f"the budget must lie strictly between 0 and 1 to be certified online, got {budget!r}")
    z = losses.double()
    count, n = z.shape
    if n == 0:
        return torch.empty(count, 0, dtype=torch.float64), state
    prior = PRIOR_ROWS / budget
    before = state.losses[:, None] + torch.cat(
        [torch.zeros(count, 1, dtype=torch.float64), torch.cumsum(z, 1)[:, :-1]], 1
    )
    seen = state.rows + torch.arange(n, dtype=torch.float64)
    rate = (before + prior * budget / 2) / (seen + prior)
    stake = ((budget - rate) / (budget * (1.0 - budget))).clamp(0.0, MAX_STAKE / (1.0 - budget))
    log_capital = state.log_capital[:, None] + torch.cumsum(torch.log1p(stake * (budget - z)), 1)
    after = SafetyState(state.losses + z.sum(1), log_capital[:, -1].clone(), state.rows + n)
    return log_capital, after


def alarm_log_cusums(state: AlarmState, losses: torch.Tensor, budget: float) -> tuple[torch.Tensor, AlarmState]:
    """Each e-CUSUM's log after each of ``losses`` [M, n]: ``([M, K, n], the state after them)``;
    :func:`detector_of` gives the alarm's detector from them."""
    if not 0.0 < budget < 1.0:
        raise ValueError(f"the budget must lie strictly between 0 and 1 to be watched online, got {budget!r}")
    z = losses.double()
    count, n = z.shape
    shifts = len(ALARM_SHIFTS)
    if n == 0:
        return torch.empty(count, shifts, 0, dtype=torch.float64), state
    # the stake betting on budget * (1 + a): the Kelly bet a / (1 - budget), kept so that a loss of 0 keeps 1%
    stakes = torch.tensor([min(a / (1.0 - budget), 0.99 / budget) for a in ALARM_SHIFTS], dtype=torch.float64)
    if bool(((z == 0) | (z == 1)).all()):  # 0/1 losses: two values per detector, no logarithm per row
        lost, kept = torch.log1p(stakes * (1.0 - budget)), torch.log1p(-stakes * budget)
        log_factor = torch.where(z[:, None, :] > 0.5, lost[None, :, None], kept[None, :, None])
    else:
        log_factor = torch.log1p(stakes[None, :, None] * (z[:, None, :] - budget))  # [M, K, n]
    sums = torch.cumsum(log_factor, 2)
    # C_t = max(C_{t-1}, 1) * f_t in closed form: log C_t = S_t - min(-u, min_{0 <= j < t} S_j), u = max(log C_0, 0)
    floor = -state.log_cusum.clamp(min=0.0)  # [M, K]
    previous = torch.cat([torch.zeros(count, shifts, 1, dtype=torch.float64), sums[:, :, :-1]], 2)
    lowest = torch.minimum(torch.cummin(previous, 2).values, floor[:, :, None])
    log_cusum = sums - lowest
    return log_cusum, AlarmState(log_cusum[:, :, -1].clone())


def detector_of(log_cusum: torch.Tensor) -> torch.Tensor:
    """The log of the alarm's detector, the mean of the e-CUSUMs, from their logs [..., K, n]: [..., n]."""
    return torch.logsumexp(log_cusum, -2) - math.log(log_cusum.shape[-2])


def alarm_log_detector(state: AlarmState, losses: torch.Tensor, budget: float) -> tuple[torch.Tensor, AlarmState]:
    """The log of the alarm's detector (the mean of the e-CUSUMs) after each of ``losses`` [M, n]:
    ``([M, n], the state after them)``. Reaching ``log A`` shows the risk over ``budget``, with
    false alarms no more often than once in ``A`` rows on average where it is not."""
    log_cusum, after = alarm_log_cusums(state, losses, budget)
    return detector_of(log_cusum), after
