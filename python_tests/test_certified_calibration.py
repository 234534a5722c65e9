"""Certified calibration: the budget a user asks for holds with the confidence they ask for.

The statistics (``risk_control``) are checked against their definitions; the guarantee is
checked the way it is stated: draw many calibration sets from a known distribution, certify
on each, and count how often the chosen policy's true risk is over the budget.
"""

import math

import pytest
import torch

from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.calibration.certify import certify
from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.calibration.rerank import calibrate_rerank
from earlyexit_kernels.calibration.row_losses import query_recalls, row_losses
from earlyexit_kernels.methods.policies import Entropy, MultiLabelConfidence, Patience, ScoreBand
from earlyexit_kernels.methods.risk_control import (
    MOST_ROWS,
    betting_p_value,
    binomial_cdf,
    fixed_sequence,
    hoeffding_bentkus_p_value,
    paired_upper_bound,
    risk_p_value,
    rows_to_certify,
    upper_bound,
)
from earlyexit_kernels.training.calibrate_model import calibrate


def _brute_binomial_cdf(k, n, p):
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.1), (3, 20, 0.25), (7, 40, 0.1), (19, 20, 0.5), (5, 300, 0.01)])
def test_the_binomial_tail_is_exact(k, n, p):
    assert binomial_cdf(k, n, p) == pytest.approx(_brute_binomial_cdf(k, n, p), rel=1e-9)


def test_the_upper_bound_is_clopper_pearson():
    bound = upper_bound(9, 1500, 0.95)
    assert binomial_cdf(9, 1500, bound) == pytest.approx(0.05, rel=1e-6)  # the bound puts 5% below the count
    assert 9 / 1500 < bound < 0.011
    assert upper_bound(0, 299, 0.95) == pytest.approx(1 - 0.05 ** (1 / 299), rel=1e-6)


def test_hoeffding_bentkus_is_valid_where_the_exact_test_applies_and_never_sharper():
    for losses, n, budget in [(0, 400, 0.01), (3, 400, 0.02), (10, 2000, 0.01), (50, 1000, 0.1)]:
        exact = binomial_cdf(losses, n, budget)
        assert hoeffding_bentkus_p_value(losses / n, n, budget) >= exact * (1 - 1e-12)


def test_a_loss_of_zero_needs_the_rows_the_formula_says():
    assert rows_to_certify(0.0, 0.01, 0.95) == math.ceil(math.log(0.05) / math.log(0.99))  # 299
    assert rows_to_certify(0.02, 0.01, 0.95) is None  # a rate over the budget is never certified
    rows = rows_to_certify(0.005, 0.01, 0.95)
    losses = torch.tensor([1.0] * round(0.005 * rows) + [0.0] * (rows - round(0.005 * rows)))
    assert risk_p_value(losses, 0.01, test="exact binomial") <= 0.05


@pytest.mark.parametrize("binary", [True, False])
def test_a_rate_just_under_the_budget_asks_for_no_number_of_rows_past_the_most_a_user_labels(binary):
    """The search doubled its rows to 2^40, and the exact tail at a rate 1e-7 under the budget then took
    more memory than the machine had (a multi-label re-draw was killed at 24 GiB)."""
    assert rows_to_certify(0.05 - 1e-7, 0.05, 0.95, binary=binary) is None
    assert rows_to_certify(0.049, 0.05, 0.95, binary=binary) <= MOST_ROWS


def test_fixed_sequence_stops_at_the_first_candidate_it_cannot_reject():
    assert fixed_sequence([0.01, 0.02, 0.2, 0.01], 4, 0.05) == 1
    assert fixed_sequence([0.3, 0.01], 2, 0.05) == -1
    scored = []
    fixed_sequence(lambda i: scored.append(i) or [0.0, 0.9, 0.0][i], 3, 0.05)
    assert scored == [0, 1]  # lazily: nothing after the first failure is scored


def _population(rows: int, *, num_layers: int = 4, num_labels: int = 3, seed: int = 0) -> ExitRecord:
    """A known distribution of exit logits: each row has a difficulty; deeper heads are right and
    confident on harder rows, and some confident heads are wrong, as real ones are."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_labels, (rows,), generator=g)
    difficulty = torch.rand(rows, generator=g)
    logits = torch.zeros(num_layers, rows, num_labels)
    for k in range(num_layers):
        reach = (k + 1) / num_layers
        margin = 4.0 * (reach - difficulty) + 0.8 * torch.randn(rows, generator=g)
        right = margin > -0.3 if k < num_layers - 1 else torch.rand(rows, generator=g) < 0.9
        other = (labels + torch.randint(1, num_labels, (rows,), generator=g)) % num_labels
        predicted = torch.where(right, labels, other)
        logits[k, torch.arange(rows), predicted] = 0.5 + margin.abs() * 2
    return ExitRecord(logits, labels, None, None, Entropy(0.3))


@pytest.mark.parametrize("target,confidence", [("agreement", 0.9), ("accuracy", 0.8)])
def test_the_budget_holds_over_many_draws_of_the_calibration_rows(target, confidence):
    population = _population(20_000)  # drawing rows with replacement from it: it is the distribution
    budget, rows, draws = 0.05, 400, 300
    grid = certified_candidates(population.policy, 4, 3, steps=100)
    losses = torch.stack([row_losses(replay(p, population).logits, population, target) for p in grid])
    true_risk = losses.mean(1)
    g = torch.Generator().manual_seed(1)
    certified_over = uncertified_over = saving = 0
    for _ in range(draws):
        sample = torch.randint(0, population.all_logits.shape[1], (rows,), generator=g)
        drawn = losses[:, sample]
        test = "exact paired" if target == "accuracy" else "exact binomial"
        chosen = fixed_sequence(
            lambda i, drawn=drawn, test=test: risk_p_value(drawn[i], budget, test=test),
            len(grid),
            1 - confidence,
        )
        certified_over += chosen >= 0 and bool(true_risk[chosen] > budget)
        saving += chosen > 0
        # what an uncertified calibration does: the most aggressive candidate within the budget on these rows
        within = (drawn.mean(1) <= budget).nonzero().squeeze(-1)
        uncertified_over += bool(true_risk[int(within.max())] > budget)
    # 1 - confidence is a bound on the violation rate; the binomial noise of 300 draws is about 2 points
    assert certified_over / draws < (1 - confidence) + 0.05
    assert uncertified_over / draws > 0.3  # the check has teeth: the uncertified point is over budget often
    assert saving > draws / 2  # and the certified one still exits early


def test_certify_on_a_record_is_the_fixed_sequence_on_its_rows():
    record = _population(3_000, seed=3).subset(torch.arange(1_000))
    chosen, certificate, curve = certify(record, 0.05, 0.9, target="agreement", steps=100)
    grid = certified_candidates(record.policy, 4, 3, steps=100)
    losses = [row_losses(replay(p, record).logits, record, "agreement") for p in grid]
    last = fixed_sequence(lambda i: risk_p_value(losses[i], 0.05, test="exact binomial"), len(grid), 0.1)
    assert chosen.policy == grid[last] and certificate.certified and certificate.tested == last + 2
    assert certificate.bound <= 0.05 and certificate.observed == pytest.approx(float(losses[last].mean()))
    assert [p.policy for p in curve] == grid  # the whole grid is scored, for the uncertified point


def test_calibrate_with_confidence_reports_the_bound_and_its_price():
    record = _population(4_000, seed=4)
    result = calibrate(record, max_drop=5.0, confidence=0.95, target="agreement")
    certificate = result.certificate
    assert result.met and certificate.certified and certificate.rows == 4_000
    assert certificate.bound <= 0.05 and 1 - result.accuracy == pytest.approx(certificate.observed)
    # the uncertified point: the fewest layers of the same grid within the budget on these rows
    assert certificate.uncertified_layers <= result.mean_layers  # the guarantee never comes free
    assert "with confidence 95%" in result.summary() and "the guarantee costs" in result.summary()


def test_labels_certify_the_accuracy_lost_against_the_full_model():
    record = _population(4_000, seed=5)
    result = calibrate(record, max_drop=3.0, confidence=0.9)  # labels: accuracy
    exits = replay(result.policy, record).logits.argmax(-1)
    full = record.all_logits[-1].argmax(-1)
    drop = (full == record.labels).double().mean().item() - (exits == record.labels).double().mean().item()
    assert result.certificate.observed == pytest.approx(drop)  # paired per row: +1, 0 or -1
    assert (
        drop <= result.certificate.bound <= 0.03 and result.certificate.risk == "accuracy lost against the full model"
    )


def test_betting_rejects_a_budget_below_the_mean_rarely_and_one_far_above_it_surely():
    g = torch.Generator().manual_seed(12)

    def paired(rows, lost, gained):  # +1 with probability lost, -1 with probability gained, else 0
        u = torch.rand(rows, generator=g)
        return (u < lost).double() - ((u >= lost) & (u < lost + gained)).double()

    # a mean drop of 1 point tested against a budget of 1 point (the null's edge): rejected at 5% rarely
    rejected = sum(betting_p_value(paired(2_000, 0.02, 0.01), 0.01) <= 0.05 for _ in range(300))
    assert rejected / 300 < 0.05 + 0.03
    assert betting_p_value(paired(2_000, 0.004, 0.004), 0.01) < 0.05  # no drop, mostly ties: certified at 95%
    losses = paired(2_000, 0.006, 0.002)
    assert float(losses.mean()) < paired_upper_bound(losses, 0.95) < 0.01


def _bisected_bound(losses, confidence, seed):
    """The reference of ``paired_upper_bound``: the bisection one step a call, 24 steps."""
    delta = 1.0 - confidence
    low, high = float(losses.double().mean()), 1.0
    if betting_p_value(losses, high - 1e-12, seed=seed) > delta:
        return 1.0
    for _ in range(24):
        middle = 0.5 * (low + high)
        if betting_p_value(losses, middle, seed=seed) <= delta:
            high = middle
        else:
            low = middle
    return high


def test_the_betting_bound_tests_several_bisection_steps_a_call_and_lands_where_one_step_a_call_lands():
    g = torch.Generator().manual_seed(13)
    for trial in range(120):
        rows = int(torch.randint(1, 700, (1,), generator=g))
        shares = torch.rand(3, generator=g)
        losses = torch.multinomial(shares / shares.sum(), rows, replacement=True, generator=g).double() - 1.0
        if trial % 3 == 0:  # a fractional loss (a multi-label row's)
            losses = losses * torch.rand(rows, generator=g, dtype=torch.float64)
        confidence = (0.8, 0.9, 0.95, 0.99)[trial % 4]
        assert paired_upper_bound(losses, confidence, seed=trial) == _bisected_bound(losses, confidence, trial)


def test_rows_that_cannot_certify_anything_say_how_many_would():
    record = _population(4_000, seed=6)
    few = record.subset(torch.arange(320))
    with pytest.warns(UserWarning, match=r"no early exit certified; Entropy\(.*\) would be with about \d+ rows"):
        result = calibrate(few, max_drop=1.0, confidence=0.95, target="agreement")
    assert not result.met and result.mean_layers == 4.0 and result.certificate.rows_needed > 320
    with pytest.raises(ValueError, match="even a policy that never errs needs 299 rows"):
        calibrate(record.subset(torch.arange(200)), max_drop=1.0, confidence=0.95)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"max_drop": 1.0, "confidence": 1.0}, "confidence must be a probability strictly between 0 and 1"),
        ({"max_drop": 1.0, "confidence": 0.0}, "confidence must be a probability strictly between 0 and 1"),
        ({"max_drop": -1.0, "confidence": 0.9}, "max_drop must be >= 0"),
        ({"target_layers": 2.0, "confidence": 0.9}, "give max_drop"),
        ({"max_drop": 1.0, "confidence": 0.9, "metric": lambda lg, r: 0.0}, "a custom metric has no per-row loss"),
    ],
)
def test_bad_requests_get_a_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        calibrate(_population(500), **options)


def test_patience_is_certified_over_its_own_fixed_grid():
    record = _population(4_000, seed=7)
    record = ExitRecord(record.all_logits, record.labels, None, None, Patience(2))
    assert certified_candidates(Patience(2), 4, 3) == [Patience(3), Patience(2), Patience(1)]
    result = calibrate(record, max_drop=10.0, confidence=0.9, target="agreement")
    assert isinstance(result.policy, Patience) and result.certificate.bound <= 0.10


def test_multi_label_certifies_the_fraction_of_labels_decided_otherwise():
    g = torch.Generator().manual_seed(8)
    truth = (torch.rand(2_000, 5, generator=g) > 0.5).float()
    signs = truth * 2 - 1
    logits = torch.stack([signs * (0.5 + k) + torch.randn(2_000, 5, generator=g) * 1.5 for k in range(4)])
    record = ExitRecord(logits, None, None, None, MultiLabelConfidence(0.9))
    result = calibrate(record, max_drop=5.0, confidence=0.9, target="agreement")
    exits = replay(result.policy, record).logits > 0
    decided_otherwise = (exits != (logits[-1] > 0)).double().mean().item()
    assert result.certificate.observed == pytest.approx(decided_otherwise)
    assert result.certificate.bound <= 0.05 and "labels decided otherwise" in result.certificate.risk


def test_a_reranker_certifies_the_recall_of_the_full_model_s_top_k():
    g = torch.Generator().manual_seed(9)
    queries, per_query = 400, 8
    relevance = torch.randn(queries * per_query, generator=g) * 3
    logits = torch.stack([relevance + torch.randn_like(relevance) * (2.0 - 0.6 * k) for k in range(4)])[..., None]
    groups = torch.arange(queries).repeat_interleave(per_query)
    record = ExitRecord(logits, None, None, None, ScoreBand(low=-2.0))
    result = calibrate_rerank(record, groups, k=3, min_recall=0.9, confidence=0.9)
    recall = query_recalls(replay(result.policy, record).logits[:, 0], logits[-1, :, 0], groups, 3).mean().item()
    assert result.met and result.recall == pytest.approx(recall)
    assert result.certificate.bound <= 0.1 and result.certificate.unit == "queries" and result.mean_layers < 4
