"""The statistics of certified calibration: p-values and bounds for a risk measured on exchangeable rows.

A *risk* is the mean of a per-row loss in [0, 1] (1 when the early-exit prediction disagrees
with the full model, say). Calibration wants the most aggressive policy whose risk, on rows
drawn like the calibration rows, is at most ``budget``, with probability at least
``confidence`` over the draw of those rows. Learn-then-Test (Angelopoulos et al. 2021) gets it
by testing the null "risk > budget" for each candidate and keeping the rejected ones; testing
them in a fixed order, from the most conservative down, and stopping at the first that is not
rejected (fixed-sequence testing) controls the chance of keeping any candidate whose risk is
over budget at ``1 - confidence`` without splitting it between the candidates.

The p-values:

- :func:`binomial_p_value`: exact, for 0/1 losses: ``P(Binomial(n, budget) <= losses)``.
- :func:`hoeffding_bentkus_p_value`: for losses anywhere in [0, 1] (Bates et al. 2021).
- :func:`~earlyexit_kernels.methods.paired_exact.paired_exact_p_value`: for paired losses of -1, 0 or 1
  (accuracy lost against the full model, row by row), the exact unconditional score test of paired
  non-inferiority; it reads the rows' counts, never their order.
- :func:`betting_p_value`: for paired losses anywhere in [-1, 1] (a multi-label row averages its
  labels'), by testing by betting (Waudby-Smith and Ramdas 2024). It reads the rows in an order drawn
  from ``seed``: the seed must be drawn without looking at the rows (:func:`draw_order_seed`), or a
  data-sorted order (length-sorted calibration batches) voids the test.
- :func:`risk_p_value` runs the one :func:`test_for` names from the risk asked for, never from what the
  rows show: accuracy lost is paired (the exact test for one label a row, betting where a row averages
  several), disagreement is 0/1 for one label a row (the exact binomial) and a fraction where a row
  averages several (Hoeffding-Bentkus).

:func:`upper_bound` is the matching upper confidence bound (Clopper-Pearson for 0/1 losses):
a candidate is rejected at level ``1 - confidence`` exactly when its bound is at most the
budget. :func:`rows_to_certify` says how many rows a risk rate would need.

Every function is on plain Python numbers (float64 inside), so the serving watch uses the same
bounds without a model.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable, Sequence

import torch

from earlyexit_kernels.methods.paired_exact import counts, paired_exact_p_value, paired_exact_upper_bound

__all__ = [
    "check_confidence",
    "check_budget",
    "check_fraction",
    "binomial_cdf",
    "binomial_p_value",
    "kl_bernoulli",
    "hoeffding_bentkus_p_value",
    "betting_p_value",
    "betting_p_values",
    "draw_order_seed",
    "TESTS",
    "test_for",
    "risk_p_value",
    "upper_bound",
    "paired_upper_bound",
    "paired_upper_bounds",
    "risk_upper_bound",
    "count_p_value",
    "is_binary",
    "fixed_sequence",
    "rows_to_certify",
    "MOST_ROWS",
    "least_rows",
    "most_losses",
]


def check_confidence(confidence: float) -> float:
    """``confidence`` as a float, or a ``ValueError`` saying what a valid one is."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(
            f"confidence must be a probability strictly between 0 and 1 (e.g. 0.95: the budget holds with "
            f"probability 95% over the draw of the calibration rows), got {confidence!r}"
        )
    return float(confidence)


def check_fraction(fraction: float) -> float:
    """The audit's ``fraction`` (the share of served rows also run at full depth, what the online tests read)
    as a float, or a ``ValueError`` saying what a valid one is."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not math.isfinite(fraction)
        or not 0.0 <= fraction <= 1.0
    ):
        raise ValueError(
            f"the audit fraction must be a number in [0, 1] (0.05: one sequence in twenty also runs the full "
            f"model; 0: no audit), got {fraction!r}"
        )
    return float(fraction)


def check_budget(budget: float) -> float:
    """``budget`` (a fraction of rows) as a float, or a ``ValueError``."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 <= budget < 1.0:
        raise ValueError(f"the risk budget must be a fraction in [0, 1) (0.01: one row in a hundred), got {budget!r}")
    return float(budget)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) <= k)``, exact (a log-space sum in float64)."""
    return _binomial_cdf(int(k), int(n), float(p))


# the caches below are keyed by plain numbers only (a tensor would hash by its identity): their public
# functions convert first
@functools.lru_cache(maxsize=65536)  # pure: a walk's tests and a bound's bisection meet the same tails again
def _binomial_cdf(k: int, n: int, p: float) -> float:
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = torch.arange(k + 1, dtype=torch.float64)
    log_terms = (
        math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
    )
    return min(1.0, float(torch.logsumexp(log_terms, 0).exp()))


def binomial_p_value(losses: int, n: int, budget: float) -> float:
    """The exact p-value of "risk > budget" for ``losses`` rows lost of ``n`` (0/1 losses)."""
    return binomial_cdf(int(losses), int(n), budget)


def kl_bernoulli(a: float, b: float) -> float:
    """The Kullback-Leibler divergence of Bernoulli(``a``) from Bernoulli(``b``)."""

    def term(x, y):
        return 0.0 if x == 0.0 else x * math.log(x / y)

    return term(a, b) + term(1.0 - a, 1.0 - b)


def hoeffding_bentkus_p_value(mean: float, n: int, budget: float) -> float:
    """The Hoeffding-Bentkus p-value of "risk > budget" for losses in [0, 1] with mean ``mean`` over ``n`` rows."""
    if n <= 0:
        return 1.0
    if budget <= 0.0:
        return 1.0  # no finite sample tells a zero risk from a tiny positive one
    hoeffding = math.exp(-n * kl_bernoulli(min(mean, budget), budget))
    bentkus = math.e * binomial_cdf(math.ceil(n * mean - 1e-9), n, budget)
    return min(1.0, hoeffding, bentkus)


def betting_p_value(losses: torch.Tensor, budget: float, *, seed: int = 0, cap: float = 0.75) -> float:
    """The p-value of "mean loss > budget" for losses [n] in [-1, 1], by betting against it.

    A bettor starts with 1 and, row by row in a fixed random order (``seed``: the rows are
    exchangeable, so any order chosen without looking at them will do), stakes a fraction
    ``lam`` of the capital on the loss being below the budget: the capital is multiplied by
    ``1 + lam * (m - z)`` with ``z = (loss + 1) / 2`` in [0, 1] and ``m = (budget + 1) / 2``.
    Were the mean over the budget, the capital would be a nonnegative supermartingale, so it
    reaches ``1 / delta`` with probability at most ``delta`` (Ville's inequality): the p-value
    is one over its largest value. ``lam`` is set from the rows before (their variance, the
    number of rows) and capped at ``cap / m`` (Waudby-Smith and Ramdas' predictable plug-in,
    tuned for a known number of rows).
    """
    return float(betting_p_values(losses.reshape(1, -1), budget, seed=seed, cap=cap)[0])


def betting_p_values(losses: torch.Tensor, budget, *, seed: int | None = 0, cap: float = 0.75) -> torch.Tensor:
    """:func:`betting_p_value` of every row of ``losses`` [K, n] (K candidates on the same n rows): float64 [K].
    ``budget``: one for every row, or a tensor [K] of one per row (each below 1). ``seed`` None: the rows are read
    in the order given (valid only where that order was drawn without looking at them)."""
    count, n = losses.shape
    if not isinstance(budget, torch.Tensor) and (n == 0 or budget >= 1.0):
        return torch.full((count,), 1.0 if budget < 1.0 else 0.0, dtype=torch.float64)
    if n == 0:
        return torch.ones(count, dtype=torch.float64)
    z = (_in_seed_order(losses.double(), seed) + 1.0) / 2.0
    m = (torch.as_tensor(budget, dtype=torch.float64).reshape(-1, 1) + 1.0) / 2.0
    t = torch.arange(1, n + 1, dtype=torch.float64)
    mean = (0.5 + torch.cumsum(z, 1)) / (t + 1)
    variance = (0.25 + torch.cumsum((z - mean) ** 2, 1)) / (t + 1)
    before = torch.cat([torch.full((count, 1), 0.25, dtype=torch.float64), variance[:, :-1]], 1)
    # the stake is tuned for a 5% level; any stake set from the rows before keeps the test valid
    # a stake past 1 / (1 - m) could lose more than the capital on a loss of 1: capped below both ends (for a
    # budget >= 0, m >= 1/2 and the cap is cap / m, as tuned; a budget below 0, the bounds that map a narrower
    # range onto [-1, 1] ask for, needs the other end)
    lam = torch.minimum(torch.sqrt(2.0 * math.log(20.0) / (before * n)), cap / torch.maximum(m, 1.0 - m))
    log_capital = torch.cumsum(torch.log1p(lam * (m - z)), 1)
    return torch.exp(-log_capital.amax(1).clamp(min=0.0)).clamp(max=1.0)


def _in_seed_order(losses: torch.Tensor, seed: int | None) -> torch.Tensor:
    """The columns (calibration rows) of ``losses`` [K, n] in the order ``seed`` draws; None: as given."""
    if seed is None:
        return losses
    return losses[:, torch.randperm(losses.shape[1], generator=torch.Generator().manual_seed(seed))]


def draw_order_seed() -> int:
    """A seed for the order betting reads rows in, drawn from the operating system's entropy: independent of the
    rows, whatever order they were recorded in. Store it with the result to reproduce it."""
    return secrets.randbits(62)


def is_binary(losses: torch.Tensor) -> bool:
    """Whether every loss is 0 or 1 (then the exact binomial applies)."""
    return bool(((losses == 0) | (losses == 1)).all())


def count_p_value(losses: float, n: int, budget: float, *, binary: bool = True) -> float:
    """The p-value of "risk > budget" from ``losses`` (summed) over ``n`` rows: exact binomial for
    0/1 losses, else Hoeffding-Bentkus (losses in [0, 1])."""
    if binary:
        return binomial_p_value(round(losses), n, budget)
    return hoeffding_bentkus_p_value(losses / n if n > 0 else 0.0, n, budget)


#: the tests of "risk > budget", each for the losses of one kind of risk
TESTS = ("exact binomial", "hoeffding-bentkus", "exact paired", "betting")


def test_for(*, paired: bool, fractional: bool) -> str:
    """The test of a risk, from what the risk is, never from what its rows showed: ``paired``, the accuracy lost
    against the full model (losses in [-1, 1]), else a loss in [0, 1]; ``fractional``, a row's loss averages
    several (a multi-label row's labels, a query's top k), else it is whole (0/1, or -1/0/1 paired)."""
    if paired:
        return "betting" if fractional else "exact paired"
    return "hoeffding-bentkus" if fractional else "exact binomial"


def risk_p_value(losses: torch.Tensor, budget: float, *, test: str, seed: int = 0) -> float:
    """The p-value of "risk > budget" for per-row ``losses`` [n] by ``test`` (:func:`test_for`): the exact binomial
    (0/1 losses), Hoeffding-Bentkus (losses in [0, 1]), the exact paired test (-1, 0 or 1) or betting (in [-1, 1],
    read in the order ``seed`` draws). Losses the test cannot take raise ``ValueError``."""
    if test == "exact paired":
        return paired_exact_p_value(*counts(losses), budget)
    if test == "betting":
        return betting_p_value(losses, budget, seed=seed)
    if test == "exact binomial":
        return binomial_p_value(_whole_count(losses), losses.numel(), budget)
    if test == "hoeffding-bentkus":
        return hoeffding_bentkus_p_value(float(losses.double().mean()), losses.numel(), budget)
    raise ValueError(f"test must be one of {', '.join(TESTS)}, got {test!r}")


def _whole_count(losses: torch.Tensor) -> int:
    """The number of losses of 1 among 0/1 ``losses``; ``ValueError`` for another value."""
    if not is_binary(losses):
        raise ValueError("the exact binomial test takes losses of 0 or 1 (one label a row)")
    return int(losses.sum())


def paired_upper_bound(losses: torch.Tensor, confidence: float, *, seed: int = 0) -> float:
    """The upper ``confidence`` bound on the mean of paired ``losses`` [n] in [-1, 1]: the smallest
    budget :func:`betting_p_value` (rows in ``seed``'s order) rejects at ``1 - confidence`` (bisection; 1.0
    when none)."""
    check_confidence(confidence)
    delta = 1.0 - confidence
    low, high = float(losses.double().mean()), 1.0
    n = losses.numel()
    ordered = _in_seed_order(losses.double().reshape(1, -1), seed)  # the order betting reads, drawn once
    if float(betting_p_values(ordered, high - 1e-12, seed=None)[0]) > delta:
        return 1.0
    # to 2^-24 of the bracket (at most 2): far below the bound's printed digits. The bisection's next _LEVELS
    # midpoints, whichever way each step goes, are tested in one call, then walked as the steps would walk them
    for _ in range(24 // _LEVELS):
        nodes = _midpoints(low, high, _LEVELS)
        rejected = (
            betting_p_values(ordered.expand(len(nodes), n), torch.tensor(nodes, dtype=torch.float64), seed=None)
            <= delta
        ).tolist()
        node = 0
        for _ in range(_LEVELS):
            if rejected[node]:
                high, node = nodes[node], 2 * node + 1
            else:
                low, node = nodes[node], 2 * node + 2
    return high


#: bisection steps :func:`paired_upper_bound` tests in one call (2^_LEVELS - 1 budgets); divides 24
_LEVELS = 4


def _midpoints(low: float, high: float, levels: int) -> list[float]:
    """The midpoints a bisection of ``[low, high]`` may test in its next ``levels`` steps, each computed as the
    step computes it (``0.5 * (low + high)``), in heap order: node ``i``'s children ``2i + 1`` (the lower half,
    where ``i`` was rejected) and ``2i + 2`` (the upper half)."""
    nodes, intervals = [], [(low, high)]
    for _ in range(levels):
        halves = []
        for a, b in intervals:
            middle = 0.5 * (a + b)
            nodes.append(middle)
            halves += [(a, middle), (middle, b)]
        intervals = halves
    return nodes


def paired_upper_bounds(losses: torch.Tensor, confidence: float, *, seed: int = 0) -> torch.Tensor:
    """:func:`paired_upper_bound` of every row of ``losses`` [K, n] at once (one bisection for all, the rows in
    ``seed``'s order): float64 [K]."""
    check_confidence(confidence)
    delta = 1.0 - confidence
    count = losses.shape[0]
    low = losses.double().mean(1) if losses.shape[1] else torch.full((count,), -1.0, dtype=torch.float64)
    high = torch.ones(count, dtype=torch.float64)
    none = betting_p_values(losses, high - 1e-12, seed=seed) > delta
    for _ in range(24):  # to 2^-24 of the bracket (at most 2): far below the bound's printed digits
        middle = 0.5 * (low + high)
        rejected = betting_p_values(losses, middle, seed=seed) <= delta
        high = torch.where(rejected, middle, high)
        low = torch.where(rejected, low, middle)
    return torch.where(none, torch.ones_like(high), high)


def upper_bound(losses: float, n: int, confidence: float, *, binary: bool = True) -> float:
    """The upper ``confidence`` bound on the risk from ``losses`` (summed) over ``n`` rows.

    ``binary``: 0/1 losses (Clopper-Pearson, exact); else losses in [0, 1] (Hoeffding-Bentkus).
    The smallest ``b`` whose p-value is at most ``1 - confidence``: a risk over ``b`` would show
    ``losses`` or fewer with probability below ``1 - confidence``. 1.0 without rows.
    """
    check_confidence(confidence)
    return _upper_bound(float(losses), int(n), float(confidence), bool(binary))


@functools.lru_cache(maxsize=16384)  # pure: re-drawn rows and the serving watch meet the same counts again
def _upper_bound(losses: float, n: int, confidence: float, binary: bool) -> float:
    if n <= 0:
        return 1.0
    delta = 1.0 - confidence
    mean = losses / n

    def p_value(b: float) -> float:
        return count_p_value(losses, n, b, binary=binary)

    low, high = mean, 1.0
    if p_value(min(1.0, low + 1e-15)) <= delta:
        return low
    for _ in range(60):  # bisection to 1e-18: the p-value falls as the budget rises
        middle = 0.5 * (low + high)
        if p_value(middle) <= delta:
            high = middle
        else:
            low = middle
    return high


def risk_upper_bound(losses: torch.Tensor, confidence: float, *, test: str, seed: int = 0) -> float:
    """The upper ``confidence`` bound on the mean of per-row ``losses`` [n] by ``test`` (:func:`risk_p_value`'s;
    ``seed``: the order betting reads rows in)."""
    if test == "exact paired":
        return paired_exact_upper_bound(*counts(losses), confidence)
    if test == "betting":
        return paired_upper_bound(losses, confidence, seed=seed)
    if test == "exact binomial":
        return upper_bound(_whole_count(losses), losses.numel(), confidence, binary=True)
    if test == "hoeffding-bentkus":
        return upper_bound(float(losses.sum()), losses.numel(), confidence, binary=False)
    raise ValueError(f"test must be one of {', '.join(TESTS)}, got {test!r}")


def fixed_sequence(p_values: Sequence[float] | Callable[[int], float], count: int, delta: float) -> int:
    """Fixed-sequence testing: the index of the last candidate rejected (p-value <= ``delta``)
    before the first one that is not, testing ``0, 1, ... count - 1`` in order; -1 when the first
    is not rejected. ``p_values``: a list, or a function of the index (evaluated lazily, so the
    candidates after the first failure are never scored)."""
    last = -1
    for index in range(count):
        value = p_values(index) if callable(p_values) else p_values[index]
        if value > delta:
            break
        last = index
    return last


#: the most rows :func:`rows_to_certify` answers with (about four million)
MOST_ROWS = 1 << 22


def rows_to_certify(
    rate: float, budget: float, confidence: float, *, binary: bool = True, discordant: float | None = None
) -> int | None:
    """The fewest rows at which a risk observed at ``rate`` certifies ``budget`` at ``confidence``.

    None when no number of rows does (``rate >= budget``), or none up to :data:`MOST_ROWS` (a rate just under the
    budget: the exact tails over more rows than that would also take gigabytes). With ``rate == 0`` it is the rows
    that a policy making no loss at all needs: ``log(1 - confidence) / log(1 - budget)``.
    ``discordant``: paired losses (accuracy lost), the share of rows whose loss is not 0; the rows are then
    those at which the exact paired test's score statistic, at these shares, passes its normal quantile:
    its variance is the discordant rows', which a test of the net rate alone ignores.
    """
    check_confidence(confidence)
    return _rows_to_certify(
        float(rate), float(budget), float(confidence), bool(binary), None if discordant is None else float(discordant)
    )


# a pure function of its numbers: re-draws of the same row count meet the same rates
@functools.lru_cache(maxsize=65536)
def _rows_to_certify(rate: float, budget: float, confidence: float, binary: bool, discordant: float | None):
    if rate >= budget:
        return None
    delta = 1.0 - confidence
    if discordant is not None:
        from statistics import NormalDist

        from earlyexit_kernels.methods.paired_exact import score_value

        plus, minus = (discordant + rate) / 2.0, max(0.0, (discordant - rate) / 2.0)
        z = NormalDist().inv_cdf(confidence)

        def certifies(n: int) -> bool:
            return score_value(n * plus, n * minus, n, budget) <= -z

    elif binary:

        def certifies(n: int) -> bool:
            return binomial_p_value(math.floor(rate * n + 1e-9), n, budget) <= delta

    else:

        def certifies(n: int) -> bool:
            return hoeffding_bentkus_p_value(rate, n, budget) <= delta

    high = 1
    while not certifies(high):
        high *= 2
        if high > MOST_ROWS:  # a rate just under the budget would ask for more rows than any user labels
            return None
    low = high // 2
    while high - low > 1:
        middle = (low + high) // 2
        if certifies(middle):
            high = middle
        else:
            low = middle
    return high


def least_rows(budget: float, confidence: float) -> int | None:
    """The fewest rows that certify ``budget`` (a fraction) at ``confidence`` for a policy that never errs:
    ``log(1 - confidence) / log(1 - budget)`` rounded up; None where no number of rows does (a budget of 0)."""
    return rows_to_certify(0.0, budget, confidence)


def most_losses(rows: int, budget: float, confidence: float) -> int:
    """The most 0/1 losses among ``rows`` that still certify ``budget`` at ``confidence`` (-1: none do)."""
    delta = 1.0 - confidence
    low, high = -1, rows  # binomial_p_value grows with the losses: the largest k with p <= delta
    while high - low > 1:
        middle = (low + high) // 2
        if binomial_p_value(middle, rows, budget) <= delta:
            low = middle
        else:
            high = middle
    return low
