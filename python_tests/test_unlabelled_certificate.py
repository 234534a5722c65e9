"""Unlabelled rows beside labelled ones in the accuracy-lost certificate (issue 62, item 1).

The accuracy lost is 0 wherever the exit predicts the full model's class; the full model's own
probabilities predict it where they differ. Prediction-powered inference bounds that prediction on
every row and its error on the labelled rows (``calibration/prediction_powered.py``). Checked as the
guarantee is stated (the budget holds over many draws of the calibration rows), on a constructed
case where the unlabelled rows certify fewer layers, and on one where the validation rows say they
would not help, so the labelled rows certify alone.
"""

import pytest
import torch
from test_certified_calibration import _population

from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.calibration.certify import certify
from earlyexit_kernels.calibration.prediction_powered import powered_bounds, predicted_losses
from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.calibration.row_losses import row_losses
from earlyexit_kernels.methods.policies import Entropy
from earlyexit_kernels.methods.risk_control import paired_upper_bound
from earlyexit_kernels.training.calibrate_model import calibrate
from earlyexit_kernels.training.labelled_texts import order_by_length

STEPS = 40


def _rows(record: ExitRecord, rows: torch.Tensor, *, labels: bool = True) -> ExitRecord:
    picked = record.subset(rows)
    return picked if labels else ExitRecord(picked.all_logits, None, None, None, picked.policy)


def test_the_predicted_loss_is_the_full_model_s_probability_gap_where_the_classes_differ():
    full = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    exits = torch.tensor([[0.0, 3.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 4.0]])
    p = full.double().softmax(-1)
    expected = torch.tensor([p[0, 0] - p[0, 1], 0.0, p[2, 0] - p[2, 2]], dtype=torch.float64)
    assert torch.allclose(predicted_losses(exits, full), expected)


def test_each_part_is_bounded_on_its_own_rows_at_its_share_of_the_miss_rate():
    losses = torch.tensor([[1.0] * 20 + [0.0] * 380])
    predicted = losses.clone()  # the full model's probabilities say exactly where the exit loses
    every = torch.cat([predicted, torch.tensor([[1.0] * 200 + [0.0] * 3800])], 1)
    bounds = powered_bounds(losses, predicted, every, torch.tensor([1.0]), 0.9)
    # the predicted loss, in [0, 1], on all 4,400 rows at 1 - 0.2 * 0.1; mapped onto [-1, 1] for the bound
    assert float(bounds.predicted_part) == pytest.approx((paired_upper_bound(2 * every[0] - 1, 0.98) + 1) / 2)
    # its error, 0 on each of the 400 labelled rows, in [-2, 1], at 1 - 0.8 * 0.1
    zero = 2 * (0 + 2) / 3 - 1
    assert float(bounds.error_part) == pytest.approx(
        -2 + (paired_upper_bound(torch.full((400,), zero), 0.92) + 1) * 1.5
    )
    assert float(bounds.estimate) == pytest.approx(220 / 4400)
    assert float(bounds.bound) == pytest.approx(float(bounds.predicted_part + bounds.error_part))


def _production_order(rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``rows`` in the order ``eek fit`` records them: its length-sorted batches, longest first."""
    return rows[torch.tensor(order_by_length(lengths[rows]))]


def test_the_budget_holds_over_many_draws_of_labelled_and_unlabelled_rows():
    """Each draw's labelled and unlabelled rows recorded as production records them: sorted by length, the rows
    whose heads are wrong the longest (the bounds read rows one by one, so they must read them in a drawn order)."""
    # no validation rows: the prediction-powered bound on every draw, with the weight N / (N + n)
    population = _confident_full_model(20_000, seed=7)
    wrong_heads = (population.all_logits[:-1].argmax(-1) != population.labels).sum(0)
    lengths = 20 + 30 * wrong_heads + torch.randint(0, 10, (20_000,), generator=torch.Generator().manual_seed(8))
    budget, confidence, labelled, unlabelled, draws = 0.05, 0.8, 400, 1200, 100
    grid = certified_candidates(population.policy, 4, 2, steps=STEPS)
    losses = torch.stack([row_losses(replay(p, population).logits, population, "accuracy") for p in grid])
    true_risk = losses.mean(1)
    g = torch.Generator().manual_seed(11)
    over = saving = uncertified_over = 0
    for _ in range(draws):
        rows = torch.randint(0, 20_000, (labelled + unlabelled,), generator=g)
        rows = torch.cat([_production_order(rows[:labelled], lengths), _production_order(rows[labelled:], lengths)])
        chosen, certificate, _ = certify(
            _rows(population, rows[:labelled]),
            budget,
            confidence,
            target="accuracy",
            steps=STEPS,
            unlabelled=_rows(population, rows[labelled:], labels=False),
        )
        assert certificate.unlabelled_use == "powered"
        index = grid.index(chosen.policy)
        over += certificate.certified and bool(true_risk[index] > budget)
        saving += certificate.certified
        within = (losses[:, rows[:labelled]].mean(1) <= budget).nonzero().squeeze(-1)
        uncertified_over += bool(true_risk[int(within.max())] > budget)
    assert over / draws <= 1 - confidence  # what the certificate promises
    assert uncertified_over / draws > 0.3  # the check has teeth: the uncertified point is over budget often
    assert saving > draws / 2  # and the certified one still exits early


def _confident_full_model(rows: int, seed: int) -> ExitRecord:
    """Heads that disagree with the full model only where they are wrong, and a full model that is sure
    and right there: the full model's probabilities predict each row's loss."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (rows,), generator=g)
    logits = torch.zeros(4, rows, 2)
    logits[-1, torch.arange(rows), labels] = 8.0
    for layer in range(3):
        sure = torch.rand(rows, generator=g) * (layer + 1)
        right = torch.rand(rows, generator=g) < 0.8 + 0.06 * layer
        logits[layer, torch.arange(rows), torch.where(right, labels, 1 - labels)] = sure
    return ExitRecord(logits, labels, None, None, Entropy(0.3))


def test_where_the_validation_rows_say_they_would_not_help_the_labelled_rows_certify_alone():
    population = _population(8_000, seed=9)  # its full model's probabilities say nothing of its errors
    labelled, validation = _rows(population, torch.arange(400)), _rows(population, torch.arange(400, 1_400))
    more = _rows(population, torch.arange(1_400, 2_000), labels=False)
    options = dict(target="accuracy", steps=STEPS, path_record=validation)
    alone = certify(labelled, 0.05, 0.9, **options)
    both = certify(labelled, 0.05, 0.9, unlabelled=more, **options)
    assert both[0].policy == alone[0].policy and both[1].bound == alone[1].bound
    assert both[1].unlabelled_use.startswith("on the 1000 validation rows, drawn as many as the calibration rows")
    assert "the 600 unlabelled rows were not used" in both[1].describe()


def test_under_agreement_unlabelled_rows_are_calibration_rows_like_the_others():
    population = _population(6_000, seed=12)
    first, second = _rows(population, torch.arange(3_000)), _rows(population, torch.arange(3_000, 6_000))
    joined = certify(first, 0.05, 0.9, target="agreement", steps=STEPS, unlabelled=second, order_seed=7)[1]
    assert joined.rows == 6_000 and joined.unlabelled_rows is None
    assert joined == certify(population, 0.05, 0.9, target="agreement", steps=STEPS, order_seed=7)[1]


def test_calibrate_passes_the_unlabelled_rows_to_the_certificate():
    record = _confident_full_model(5_400, seed=2)
    labelled, more = _rows(record, torch.arange(400)), _rows(record, torch.arange(400, 5_400), labels=False)
    result = calibrate(labelled, max_drop=5.0, confidence=0.9, unlabelled=more)
    assert result.certificate.unlabelled_rows == 5_000 and result.certificate.unlabelled_use == "powered"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: ExitRecord(r.all_logits[:3], None, None, None, r.policy), "recorded with 3 layers"),
        (lambda r: ExitRecord(r.all_logits[..., :2], None, None, None, r.policy), "and 2 labels"),
    ],
)
def test_unlabelled_rows_of_another_model_are_refused(make, message):
    record = _population(1_000, seed=13)
    with pytest.raises(ValueError, match=message):
        certify(record, 0.05, 0.9, target="accuracy", steps=STEPS, unlabelled=make(record))
