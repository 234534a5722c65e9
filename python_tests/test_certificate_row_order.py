"""The certificate never depends on the order its rows were recorded in (issue 77).

``eek fit`` and ``eek calibrate`` record calibration rows from length-sorted batches, so a record arrives
sorted by length. A test that counts rows (the exact binomial, the exact paired test) reads no order;
a test that reads rows one by one (betting: multi-label accuracy lost, prediction-powered bounds, the
online e-processes) is valid only in an order drawn without looking at them. These are the checks:
the exact tests' certificates are the same in any order, the exact paired test's level holds exactly
(by enumeration, not simulation), and betting over rows recorded the way production records them holds
its level in 2,000 draws, where the same rows read as recorded do not.
"""

import math

import pytest
import torch

from earlyexit_kernels.calibration.certify import certify
from earlyexit_kernels.calibration.record import ExitRecord
from earlyexit_kernels.methods import paired_exact
from earlyexit_kernels.methods.paired_exact import paired_exact_p_value, score_statistic, score_value
from earlyexit_kernels.methods.policies import Entropy
from earlyexit_kernels.methods.risk_control import betting_p_values
from earlyexit_kernels.training.labelled_texts import Encoded, length_sorted_batches, order_by_length


def _record(rows: int, seed: int) -> ExitRecord:
    """Four heads on two labels, deeper heads right more often, a full model right on 85% of the rows."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (rows,), generator=g)
    logits = torch.zeros(4, rows, 2)
    for layer in range(4):
        right = torch.rand(rows, generator=g) < (0.85 if layer == 3 else 0.6 + 0.08 * layer)
        sure = torch.rand(rows, generator=g) * (layer + 1)
        logits[layer, torch.arange(rows), torch.where(right, labels, 1 - labels)] = 0.5 + sure
    return ExitRecord(logits, labels, None, None, Entropy(0.3))


@pytest.mark.parametrize("target", ["accuracy", "agreement"])
def test_a_certificate_by_counts_is_the_same_in_any_row_order(target):
    record = _record(1_200, seed=3)
    by_confidence = record.all_logits[0].softmax(-1).amax(-1).argsort()  # an order that looks at the rows
    forward = certify(record, 0.05, 0.9, target=target, steps=40, order_seed=1)[1]
    sorted_ = certify(record.subset(by_confidence), 0.05, 0.9, target=target, steps=40, order_seed=2)[1]
    assert forward.test == ("exact paired" if target == "accuracy" else "exact binomial")
    assert (forward.order_seed, sorted_.order_seed) == (1, 2)
    forward.order_seed = sorted_.order_seed = None
    assert forward == sorted_


def test_the_order_seed_is_drawn_anew_and_kept():
    record = _record(600, seed=4)
    seeds = {certify(record, 0.1, 0.9, target="accuracy", steps=20)[1].order_seed for _ in range(3)}
    assert len(seeds) == 3 and all(isinstance(seed, int) and seed >= 0 for seed in seeds)


def _chance(a: int, b: int, n: int, p1: float, p2: float) -> float:
    p0 = 1.0 - p1 - p2
    log = math.lgamma(n + 1) - math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(n - a - b + 1)
    for count, p in ((a, p1), (b, p2), (n - a - b, p0)):
        if count:
            if p <= 0:
                return 0.0
            log += count * math.log(p)
    return math.exp(log)


@pytest.mark.parametrize(
    "a, b, n, budget",
    [(12, 3, 300, 0.02), (0, 0, 300, 0.02), (30.5, 7.25, 1500, 0.01), (0, 9, 50, -0.1), (5, 0, 5, 0.0)],
)
def test_the_score_of_one_pair_of_counts_is_the_tensor_statistic_s(a, b, n, budget):
    """``score_value`` (plain floats, for the search over row counts) is ``score_statistic`` (tensors)."""
    expected = float(score_statistic(torch.tensor([a]), torch.tensor([b]), n, budget)[0])
    assert score_value(a, b, n, budget) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("b, n", [(0, 1), (0, 300), (7, 300), (80, 1200), (1120, 1200), (2999, 3000)])
def test_the_clopper_pearson_limit_is_the_bisection_of_the_binomial_tail(b, n):
    """``_binomial_upper_limit`` (the coefficients computed once) is the bisection of ``P(Binomial(n, p) <= b)``
    from ``_binomial_log_pmf`` at every step, bit for bit."""
    gamma = 5e-7
    k = torch.arange(b + 1)
    low, high = b / n, 1.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        if float(torch.logsumexp(paired_exact._binomial_log_pmf(k, n, middle), 0).exp()) > gamma:
            low = middle
        else:
            high = middle
    paired_exact._binomial_upper_limit.cache_clear()
    assert paired_exact._binomial_upper_limit(b, n, gamma) == high


def test_the_exact_paired_test_holds_its_level_at_the_boundary_exactly():
    """Every count of 50 rows enumerated: at an accuracy lost of exactly the budget, whatever the share of
    rows where the early exit is right and the full model wrong, the test rejects at most 5% of the time;
    where nothing is lost it rejects most of the time (it has power)."""
    n, budget, level = 50, 0.15, 0.05
    rejected = [
        (a, b) for a in range(n + 1) for b in range(n + 1 - a) if paired_exact_p_value(a, b, n, budget) <= level
    ]
    for p2 in (0.0, 0.02, 0.05, 0.1, 0.2, 0.35):
        size = sum(_chance(a, b, n, p2 + budget, p2) for a, b in rejected)
        print(f"P(-1) = {p2}: rejects {size:.4f}")
        assert size <= level + 1e-9, f"at P(-1) = {p2} the test rejects {size:.4f} of the time"
    power = sum(_chance(a, b, n, 0.02, 0.02) for a, b in rejected)
    print(f"power where nothing is lost: {power:.3f}")
    assert power > 0.74  # 0.986 when written: the threshold sits midway between it and a coin's 0.5


def _production_order(lengths: list[int]) -> torch.Tensor:
    """The order a record's rows arrive in: that of ``eek fit``'s length-sorted batches (``length_order``)."""
    return torch.tensor(order_by_length(lengths))


def test_the_production_order_of_token_counts_is_the_order_of_eek_fit_s_length_sorted_batches():
    lengths = [3, 7, 7, 1, 5, 7, 2]
    encoded = Encoded([list(range(n)) for n in lengths], None, 0, max(lengths), 0)
    batched = torch.cat([batch["rows"] for batch in length_sorted_batches(encoded, None, 3)]).tolist()
    assert order_by_length(lengths) == order_by_length(torch.tensor(lengths)) == batched == [1, 2, 5, 4, 0, 6, 3]


def test_betting_over_rows_recorded_as_production_records_them_holds_its_level():
    """Paired losses averaged over labels (multi-label accuracy lost, what betting certifies) with every loss
    on the longest 20% of the rows, the mean exactly at the budget: 2,000 draws of 400 rows, each recorded in
    the length-sorted batches' order. Read in an order drawn apart from them, as the certificate reads
    them, the test rejects at most its level (the 99% lower bound of the rejection rate below 5%); read as
    recorded, it rejects far more often, which is why the order is drawn."""
    g = torch.Generator().manual_seed(0)
    population, rows, draws, budget, level = 50_000, 400, 2_000, 0.05, 0.05
    lengths = torch.randint(8, 129, (population,), generator=g)
    longest = lengths >= torch.quantile(lengths.double(), 0.8)
    losses = torch.zeros(population, dtype=torch.float64)
    # on the longest rows: a label's loss of 1 or -1 averaged over 4 labels, with the population mean at the budget
    values = torch.tensor([-0.25, 0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    picked = values[torch.randint(0, len(values), (int(longest.sum()),), generator=g)]
    losses[longest] = picked + (budget * population / int(longest.sum()) - float(picked.mean()))
    losses = losses.clamp(-1.0, 1.0)
    losses += budget - float(losses.mean())  # exactly at the boundary
    drawn = torch.randint(0, population, (draws, rows), generator=g)
    as_recorded = torch.stack([losses[d][_production_order(lengths[d].tolist())] for d in drawn])
    # each draw read in an order drawn apart from its rows, as certify draws one (there from the OS's entropy; here
    # from a seeded generator, so that the figure is the same on every run)
    orders = torch.Generator().manual_seed(2)
    reordered = torch.stack([row[torch.randperm(rows, generator=orders)] for row in as_recorded])
    drawn_order = float((betting_p_values(reordered, budget) <= level).double().mean())
    recorded_order = float((betting_p_values(as_recorded.flip(1), budget, seed=None) <= level).double().mean())
    print(f"betting at the boundary: {drawn_order:.1%} rejected in a drawn order, {recorded_order:.1%} as recorded")
    # the 99% lower bound of the rejection rate (normal approximation, 2,000 draws)
    assert drawn_order - 2.326 * math.sqrt(drawn_order * (1 - drawn_order) / draws) <= level
    # shortest first, the short rows' zero losses come first and the bettor wins: 100% when written (the drawn
    # order 3.5%); the threshold sits midway between the level and that
    assert recorded_order > 0.5
