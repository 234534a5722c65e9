"""Every certificate ``certify`` ships passes its re-draw test.

The calibration rows are drawn again and again (2,000 times) from one population, put in the order production
records them (``eek fit``'s and ``eek calibrate``'s length-sorted batches: longest first), and certified by
``certify`` end to end. The populations are boundary stresses: their losses sit on the longest rows (a row with
little evidence for its labels is long, and its heads disagree with the full model), and their risk rises
through the budget along the grid, so some candidate is always near the limit. One label a row (the exact
binomial for disagreement, the exact paired test for accuracy lost) and several (Hoeffding-Bentkus for the
fraction of labels decided otherwise, betting for the per-label accuracy lost, which reads rows in order: the
order certify draws).

- ``probable`` (with probability ``confidence`` over the draw): the share of draws whose certified policy's
  population risk is over the budget. The test fails where its exact 99% lower bound passes ``1 - confidence``.
  The uncertified point of the same draws (the fewest layers within the budget on the draw's rows) must
  violate often: a check that could not see a broken guarantee would pass anything.
- ``expected`` (on average over the draw): the mean population risk of what is served. The test fails where it
  passes the budget by 2.6 standard errors; single draws serve above it often (a mean, not a bound).
"""

import math

import pytest
import torch

from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.calibration.certify import certify
from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.calibration.row_losses import row_losses
from earlyexit_kernels.methods.policies import Entropy, MultiLabelConfidence
from earlyexit_kernels.methods.risk_control import upper_bound
from earlyexit_kernels.training.labelled_texts import order_by_length

LAYERS, POPULATION, ROWS, DRAWS = 4, 40_000, 300, 2_000
#: the grid's steps: the multi-label policy is replayed layer by layer, so its grid is coarser
STEPS = {"one label": 24, "multi-label": 12}
CONFIDENCE = 0.95
#: each risk's budget where the population's risk passes it between two neighbours of the grid (one label:
#: disagreement 4.5% to 5.3%, accuracy lost 1.99% to 2.34%; multi-label: 3.11% to 5.06%, 1.41% to 2.22%)
BUDGETS = {"agreement": 0.05, "accuracy": 0.02}
#: the figures when written (2,000 draws; the exact tests read no order, so theirs repeat): the uncertified point
#: over the budget on 46.1% and 50.8% of the draws (one label: disagreement, accuracy lost), 49.0% and 44.1%
#: (multi-label), each threshold midway between that and the 5% a valid certificate may show; the expected
#: guarantee's draws over the budget 36.0% and 35.4%, 35.7% and 34.1%, each threshold midway between that and
#: the same 5%
THRESHOLDS = {
    ("one label", "agreement", "uncertified"): 0.25,
    ("one label", "accuracy", "uncertified"): 0.28,
    ("multi-label", "agreement", "uncertified"): 0.27,
    ("multi-label", "accuracy", "uncertified"): 0.24,
    ("one label", "agreement", "expected over"): 0.2,
    ("one label", "accuracy", "expected over"): 0.2,
    ("multi-label", "agreement", "expected over"): 0.2,
    ("multi-label", "accuracy", "expected over"): 0.19,
}


def _stress_population(rows: int, seed: int) -> tuple[ExitRecord, torch.Tensor]:
    """``(record, lengths)``: each row's evidence for its label grows layer by layer with noise, a head answers
    its sign and is as sure as it is large, the full model has noise of its own; rows of little evidence are
    long (the benchmark's evidence walk, ``benchmarks/statistics/certificate_price_redraw.py``, at 4 layers)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (rows,), generator=g)
    evidence = 2.0 + 2.0 * torch.randn(rows, generator=g)
    steps = evidence / LAYERS + 1.5 / LAYERS**0.5 * torch.randn(LAYERS, rows, generator=g)
    seen = torch.cumsum(steps, 0) * LAYERS / torch.arange(1, LAYERS + 1).reshape(-1, 1) ** 0.5
    seen[-1] += 1.0 * LAYERS**0.5 * torch.randn(rows, generator=g)
    answers = torch.where(seen > 0, labels, 1 - labels)
    logits = torch.zeros(LAYERS, rows, 2)
    logits.scatter_(2, answers.unsqueeze(-1), seen.abs().unsqueeze(-1))
    lengths = (40 - 12 * evidence + 8 * torch.randn(rows, generator=g)).clamp(4, 256).round().long()
    return ExitRecord(logits, labels, None, None, Entropy(0.3)), lengths


def _multi_label_population(rows: int, seed: int) -> tuple[ExitRecord, torch.Tensor]:
    """``(record, lengths)`` of three labels a row: the same walk per label, on an evidence shared by the row's
    labels (and a little of each label's own); rows of little evidence are long."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.rand(rows, 3, generator=g) > 0.5
    evidence = 2.0 + 2.0 * torch.randn(rows, 1, generator=g) + 0.5 * torch.randn(rows, 3, generator=g)
    steps = evidence / LAYERS + 1.5 / LAYERS**0.5 * torch.randn(LAYERS, rows, 3, generator=g)
    seen = torch.cumsum(steps, 0) * LAYERS / torch.arange(1, LAYERS + 1).reshape(-1, 1, 1) ** 0.5
    seen[-1] += 1.0 * LAYERS**0.5 * torch.randn(rows, 3, generator=g)
    logits = torch.where(truth, seen, -seen)
    lengths = (40 - 12 * evidence.mean(1) + 8 * torch.randn(rows, generator=g)).clamp(4, 256).round().long()
    return ExitRecord(logits, truth.float(), None, None, MultiLabelConfidence(0.9)), lengths


POPULATIONS = {"one label": _stress_population, "multi-label": _multi_label_population}


def _recorded(population: ExitRecord, lengths: torch.Tensor, picked: torch.Tensor) -> ExitRecord:
    """The drawn rows as a record arrives from production: in ``length_order`` (longest first)."""
    return population.subset(picked[torch.tensor(order_by_length(lengths[picked]))])


@pytest.fixture(scope="module", params=list(POPULATIONS))
def redraws(request):
    """A population, its grid's population risks per target, 2,000 draws as production records them, and the
    certificates made on them so far (filled by :func:`_certified`)."""
    kind = request.param
    population, lengths = POPULATIONS[kind](POPULATION, seed=3)
    num_labels = population.all_logits.shape[-1]
    grid = certified_candidates(population.policy, LAYERS, num_labels, steps=STEPS[kind])
    outs = [replay(policy, population) for policy in grid]
    risks = {
        target: torch.stack([row_losses(out.logits, population, target) for out in outs]).double().mean(1)
        for target in ("agreement", "accuracy")
    }
    g = torch.Generator().manual_seed(4)
    samples = [_recorded(population, lengths, torch.randint(0, POPULATION, (ROWS,), generator=g)) for _ in range(DRAWS)]
    return kind, grid, risks, samples, {}


def _certified(redraws, target: str, guarantee: str) -> list[tuple[int, int]]:
    """Per draw, the grid's index of the certified policy and of the uncertified point on the same rows. Each
    (target, guarantee) is certified once per draw and kept with the draws: the tests below read it again."""
    kind, grid, _, samples, kept = redraws
    if (target, guarantee) not in kept:
        indices = []
        for sample in samples:
            chosen, certificate, curve = certify(
                sample, BUDGETS[target], CONFIDENCE, target=target, steps=STEPS[kind], guarantee=guarantee
            )
            # the uncertified point: the candidate of the fewest mean layers within the budget on these rows
            picked = next(
                i for i, point in enumerate(curve) if abs(point.mean_layers - certificate.uncertified_layers) < 1e-6
            )
            indices.append((grid.index(chosen.policy), picked))
        kept[target, guarantee] = indices
    return kept[target, guarantee]


def _served(redraws, target: str, guarantee: str) -> tuple[list[float], list[float]]:
    """Per draw, the population risk of the certified policy and of the uncertified point on the same rows."""
    risks = redraws[2][target]
    indices = _certified(redraws, target, guarantee)
    return [float(risks[chosen]) for chosen, _ in indices], [float(risks[picked]) for _, picked in indices]


@pytest.mark.parametrize("target", ["agreement", "accuracy"])
def test_the_probable_certificate_holds_its_confidence_over_2000_draws_in_production_order(redraws, target):
    kind = redraws[0]
    served, uncertified = _served(redraws, target, "probable")
    over = sum(risk > BUDGETS[target] for risk in served)
    lower = 1.0 - upper_bound(DRAWS - over, DRAWS, 0.99)  # the exact 99% lower bound of the violation rate
    broken = sum(risk > BUDGETS[target] for risk in uncertified) / DRAWS
    print(
        f"\n{kind}, {target}, probable: {over / DRAWS:.2%} of draws over the budget (99% lower bound {lower:.2%}); "
        f"the uncertified point {broken:.1%}"
    )
    assert lower <= 1.0 - CONFIDENCE
    assert broken > THRESHOLDS[kind, target, "uncertified"]


@pytest.mark.parametrize("target", ["agreement", "accuracy"])
def test_the_expected_certificate_holds_the_budget_on_average_over_2000_draws_in_production_order(redraws, target):
    kind = redraws[0]
    served, _ = _served(redraws, target, "expected")
    mean = sum(served) / DRAWS
    spread = math.sqrt(sum((risk - mean) ** 2 for risk in served) / (DRAWS - 1))
    over = sum(risk > BUDGETS[target] for risk in served) / DRAWS
    print(
        f"\n{kind}, {target}, expected: mean served risk {mean:.3%} (standard error {spread / math.sqrt(DRAWS):.3%}), "
        f"{over:.1%} of draws over the budget"
    )
    assert mean <= BUDGETS[target] + 2.6 * spread / math.sqrt(DRAWS)
    assert over > THRESHOLDS[kind, target, "expected over"]  # a mean, not a bound


#: the answers-changed budget certified beside accuracy lost (``max_changed``): on both populations accuracy lost
#: stays within its budget long after the answers changed pass this one (an exit's fixes of the full model's
#: errors pay for its new ones), so here the second budget is the one that binds
CHANGED = 0.05
#: the figures when written (2,000 draws): accuracy lost certified alone served over CHANGED on 28.6% (one
#: label) and 31.4-32.6% (multi-label, whose betting test reads rows in a drawn order) of the draws; the joint
#: certificate over either budget on 1.05% and 0.00%. The threshold midway between the smallest and 5%
CHANGED_ALONE_OVER = 0.17


def test_answers_changed_certified_beside_accuracy_lost_hold_both_budgets_over_2000_draws(redraws):
    kind, grid, risks, samples, _ = redraws
    over = 0
    for sample in samples:
        chosen, certificate, _ = certify(
            sample, BUDGETS["accuracy"], CONFIDENCE, target="accuracy", steps=STEPS[kind], max_changed=CHANGED
        )
        index = grid.index(chosen.policy)
        over += bool(risks["accuracy"][index] > BUDGETS["accuracy"] or risks["agreement"][index] > CHANGED)
    # accuracy lost certified alone on the same draws (the probable test's certificates)
    alone = _certified(redraws, "accuracy", "probable")
    alone_over = sum(bool(risks["agreement"][index] > CHANGED) for index, _ in alone)
    lower = 1.0 - upper_bound(DRAWS - over, DRAWS, 0.99)
    print(
        f"\n{kind}, accuracy lost and answers changed: {over / DRAWS:.2%} of draws over either budget (99% lower "
        f"bound {lower:.2%}); accuracy lost alone served over the changed budget on {alone_over / DRAWS:.1%}"
    )
    assert lower <= 1.0 - CONFIDENCE
    assert alone_over / DRAWS > CHANGED_ALONE_OVER
