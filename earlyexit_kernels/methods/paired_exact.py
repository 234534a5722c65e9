"""The exact test of paired accuracy lost: an unconditional exact score test of paired non-inferiority.

Each calibration row gives a paired loss: 1 where the full model is right and the early exit wrong,
-1 the other way round, 0 where they agree on it. Its mean is the accuracy lost. With ``a`` rows at 1,
``b`` at -1 among ``n``, the null "accuracy lost >= budget" (``p1 - p2 >= d``, ``p1`` and ``p2`` the
chances of a 1 and a -1) is tested with the score statistic of Nam (1997) (Tango's for matched pairs):

    T = (a - b - n d) / sqrt(n (2 p2~ + d - d^2)),

``p2~`` the maximum-likelihood ``p2`` under ``p1 = p2 + d``. Small values of ``T`` speak against the
null. Its p-value is exact and unconditional: the largest chance, over the nuisance ``p2``, that
``(A, B) ~ Multinomial(n; p2 + d, p2, 1 - 2 p2 - d)`` gives a ``T`` at most the observed one. As Berger
and Boos (1994) do, the largest is taken over a ``1 - gamma`` confidence interval of ``p2`` (exact, from
``b``) and ``gamma`` is added, which keeps the test exact and spares the nuisance values the data rule
out. The chance is summed over the counts that carry it (every count whose marginal tails are below
``1e-12`` is left out, and that bound added), so a p-value costs a few milliseconds at a thousand
rows and grows with the rows' spread, not their number squared.

Nothing here depends on the rows' order, where the betting test the certificate used before
(:func:`~earlyexit_kernels.methods.risk_control.betting_p_value`) gives a bound that moves with the order the
rows are read in.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["score_statistic", "score_value", "paired_exact_p_value", "paired_exact_upper_bound", "counts"]

#: the share of the nuisance's confidence interval left out, added to the p-value (Berger and Boos)
GAMMA = 1e-6
#: nuisance values the largest chance is sought over, before refining around the best
NUISANCE_GRID = 24
#: the marginal tail mass a count's range may leave out (bounded and added to the p-value)
TAIL = 1e-12


def counts(losses: torch.Tensor) -> tuple[int, int, int]:
    """``(a, b, n)``: rows at 1, rows at -1, and all rows of paired ``losses`` [n] in {-1, 0, 1}; a
    ``ValueError`` for another value (multi-label rows average their labels' losses: not this test's)."""
    values = losses.double()
    if not bool(((values == 1) | (values == -1) | (values == 0)).all()):
        raise ValueError("the exact paired test takes losses of -1, 0 or 1 (one label per row)")
    return int((values == 1).sum()), int((values == -1).sum()), values.numel()


def score_statistic(a: torch.Tensor, b: torch.Tensor, n: int, budget: float) -> torch.Tensor:
    """Nam's score statistic of "accuracy lost = ``budget``" for counts ``a`` (rows at 1) and ``b`` (at -1)
    of ``n`` rows, elementwise over tensors of counts: float64, ``+-inf`` where the null's variance is 0."""
    a, b, d = a.double(), b.double(), float(budget)
    c = n - a - b
    # the restricted maximum-likelihood p2: the positive root of 2n p^2 - B p - C = 0
    big_b = a * (1 - d) + b * (1 - 3 * d) - 2 * c * d
    big_c = b * d * (1 - d)
    p2 = (big_b + torch.sqrt(big_b**2 + 8 * n * big_c)) / (4 * n)
    variance = n * (2 * p2 + d - d * d)
    difference = a - b - n * d
    safe = torch.where(variance > 0, variance, torch.ones_like(variance))
    stat = difference / torch.sqrt(safe)
    flat = torch.where(difference > 0, math.inf, torch.where(difference < 0, -math.inf, 0.0))
    return torch.where(variance > 0, stat, flat.to(stat.dtype))


def score_value(a: float, b: float, n: int, budget: float) -> float:
    """:func:`score_statistic` of one pair of counts, in plain floats (the same formula): what a search over the
    number of rows calls thousands of times, where a tensor of one element costs a hundred times more."""
    d = float(budget)
    c = n - a - b
    big_b = a * (1 - d) + b * (1 - 3 * d) - 2 * c * d
    big_c = b * d * (1 - d)
    p2 = (big_b + math.sqrt(max(0.0, big_b**2 + 8 * n * big_c))) / (4 * n)
    variance = n * (2 * p2 + d - d * d)
    difference = a - b - n * d
    if variance > 0:
        return difference / math.sqrt(variance)
    return math.inf if difference > 0 else -math.inf if difference < 0 else 0.0


def _log_choose(k: torch.Tensor, n: int) -> torch.Tensor:
    """``log C(n, k)`` for each count of ``k`` (float64 [K]), the one way every binomial term here is computed."""
    return math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def _binomial_log_pmf(k: torch.Tensor, n: int, p: float) -> torch.Tensor:
    if p <= 0.0:
        return torch.where(k == 0, 0.0, -math.inf).double()
    if p >= 1.0:
        return torch.where(k == n, 0.0, -math.inf).double()
    k = k.double()
    return _log_choose(k, n) + k * math.log(p) + (n - k) * math.log1p(-p)


def _upper_count(n: int, p: float) -> int:
    """The least ``k`` with ``P(Binomial(n, p) > k) <= TAIL``."""
    if p <= 0.0:
        return 0
    k = torch.arange(n + 1)
    tail = torch.logcumsumexp(_binomial_log_pmf(k, n, p).flip(0), 0).flip(0)  # log P(X >= k)
    above = (tail > math.log(TAIL)).nonzero()
    return min(n, int(above.max()) if above.numel() else 0)


@functools.lru_cache(maxsize=4096)  # the nuisance's interval depends on b and n only: one per bound's bisection
def _binomial_upper_limit(b: int, n: int, gamma: float) -> float:
    """The exact (Clopper-Pearson) one-sided ``1 - gamma`` upper limit of a proportion seen ``b`` times in ``n``."""
    if b >= n:
        return 1.0
    k = torch.arange(b + 1).double()
    # _binomial_log_pmf's terms in its order, the coefficients once for the 60 steps (every middle is in (0, 1))
    log_choose = _log_choose(k, n)
    low, high = b / n, 1.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        log_pmf = log_choose + k * math.log(middle) + (n - k) * math.log1p(-middle)
        if float(torch.logsumexp(log_pmf, 0).exp()) > gamma:
            low = middle
        else:
            high = middle
    return high


def _binomial_lower_limit(b: int, n: int, gamma: float) -> float:
    if b <= 0:
        return 0.0
    return 1.0 - _binomial_upper_limit(n - b, n, gamma)


def _tail_chances(n: int, budget: float, nuisance: list[float], grid) -> list[float]:
    """``P(T <= t_obs)`` at each nuisance ``p2`` of ``nuisance``, summed over the counts ``grid`` holds inside the
    region, plus the marginal tails the grid leaves out (one tensor operation for all of them)."""
    a, b, c, base, a_max, b_max = grid
    p2 = torch.tensor(nuisance, dtype=torch.float64).reshape(-1, 1)
    p1 = p2 + budget
    p0 = (1.0 - p1 - p2).clamp(min=0.0)
    log_pmf = base + _xlogy(a, p1) + _xlogy(b, p2) + _xlogy(c, p0)
    chances = torch.logsumexp(log_pmf, 1).exp() if a.numel() else torch.zeros(len(nuisance), dtype=torch.float64)
    left_out = _tails(a_max, n, p1) + _tails(b_max, n, p2)
    return (chances + left_out).clamp(max=1.0).tolist()


def _xlogy(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``x * log(p)`` with ``0 * log(0) = 0``, ``x`` [G] against ``p`` [P, 1]: [P, G]."""
    if bool((p > 0).all()):  # the usual case: the same products without the [P, G] masks
        return x * torch.log(p)
    safe = torch.where(p > 0, p, torch.ones_like(p))
    return torch.where(p > 0, x * torch.log(safe), torch.where(x == 0, 0.0, -math.inf).double())


def _tails(k: int, n: int, p: torch.Tensor) -> torch.Tensor:
    """``P(Binomial(n, p) > k)`` for each chance of ``p`` [P, 1]: [P]."""
    if k >= n:
        return torch.zeros(p.shape[0], dtype=torch.float64)
    i, log_choose = _upper_counts(k, n)
    return torch.logsumexp(log_choose + _xlogy(i, p) + _xlogy(n - i, 1.0 - p), 1).exp()


@functools.lru_cache(maxsize=256)  # the same counts for every nuisance value of one p-value, and across a bound
def _upper_counts(k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The counts ``k + 1 .. n`` and their log binomial coefficients ``log C(n, i)``."""
    i = torch.arange(k + 1, n + 1, dtype=torch.float64)
    return i, _log_choose(i, n)


@functools.lru_cache(maxsize=65536)  # a pure function of five numbers: re-draws and bisections meet the same counts
def paired_exact_p_value(a: int, b: int, n: int, budget: float, *, gamma: float = GAMMA) -> float:
    """The exact unconditional p-value of "accuracy lost >= ``budget``" from ``a`` rows at 1 and ``b`` at -1 of
    ``n`` (see the module's docstring). ``budget`` in [-1, 1)."""
    if n <= 0:
        return 1.0
    budget = float(budget)
    if budget >= 1.0:
        return 0.0
    t_obs = float(score_statistic(torch.tensor([a]), torch.tensor([b]), n, budget)[0])
    if t_obs == math.inf:
        return 1.0
    # the nuisance p2 under the null: p1 = p2 + budget and p0 = 1 - 2 p2 - budget in [0, 1]
    feasible_low, feasible_high = max(0.0, -budget), (1.0 - budget) / 2.0
    low = max(feasible_low, _binomial_lower_limit(b, n, gamma / 2))
    high = min(feasible_high, _binomial_upper_limit(b, n, gamma / 2))
    if low > high:  # the data rule out every null nuisance value
        return gamma
    a_max = _upper_count(n, min(1.0, high + budget))
    b_max = _upper_count(n, high)
    ka = torch.arange(a_max + 1, dtype=torch.float64).reshape(-1, 1)
    kb = torch.arange(b_max + 1, dtype=torch.float64).reshape(1, -1)
    ka, kb = torch.broadcast_tensors(ka, kb)
    possible = ka + kb <= n
    a_grid, b_grid = ka[possible], kb[possible]
    inside = score_statistic(a_grid, b_grid, n, budget) <= t_obs + 1e-9
    a_in, b_in = a_grid[inside], b_grid[inside]
    c_in = n - a_in - b_in
    # the multinomial coefficients of the counts inside, the same at every nuisance value
    base = math.lgamma(n + 1) - torch.lgamma(a_in + 1) - torch.lgamma(b_in + 1) - torch.lgamma(c_in + 1)
    grid = (a_in, b_in, c_in, base, a_max, b_max)
    values = torch.linspace(low, high, NUISANCE_GRID, dtype=torch.float64).tolist() if high > low else [low]
    chances = _tail_chances(n, budget, values, grid)
    top = max(chances)
    for _ in range(3):  # refine three times: a finer grid between the best value's neighbours
        best = max(range(len(values)), key=chances.__getitem__)
        left, right = values[max(best - 1, 0)], values[min(best + 1, len(values) - 1)]
        if right <= left:
            break
        values = torch.linspace(left, right, 9, dtype=torch.float64).tolist()
        chances = _tail_chances(n, budget, values, grid)
        top = max(top, *chances)
    return min(1.0, top + gamma)


def paired_exact_upper_bound(a: int, b: int, n: int, confidence: float) -> float:
    """The upper ``confidence`` bound on the accuracy lost: the smallest budget :func:`paired_exact_p_value` rejects
    at ``1 - confidence`` (bisection to 2^-16 of its bracket, which starts a few standard errors above the observed
    loss; 1.0 when none below 1)."""
    if n <= 0:
        return 1.0
    delta = 1.0 - confidence
    low = (a - b) / n
    spread = math.sqrt(max(a + b, 1) / n / n)  # the discordant rows' standard error
    high = min(1.0 - 1e-9, low + 8.0 * spread + 0.01)
    if paired_exact_p_value(a, b, n, high) > delta:
        high = 1.0 - 1e-9
        if paired_exact_p_value(a, b, n, high) > delta:
            return 1.0
    for _ in range(16):  # the p-value falls as the budget rises
        middle = 0.5 * (low + high)
        if paired_exact_p_value(a, b, n, middle) <= delta:
            high = middle
        else:
            low = middle
    return high
