"""The per-layer path: one entropy threshold per layer, set on validation rows, certified on calibration rows.

Constructed records (no model): each row's logits at every layer are chosen, so that what each
path can certify is known. Layer 1's head is as confident as layer 2's but wrong half the time
where layer 2's is right: one global threshold cannot tell them apart and must stay below both;
a threshold per layer lets layer 2 exit and holds layer 1 back.
"""

import math

import pytest
import torch

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.candidates import (
    MAX_LEVEL,
    RAMP_STEPS,
    _disagreement_odds,
    certified_candidates,
    choose_path,
    marginal_path,
    per_layer_path,
    per_layer_rows_needed,
)
from earlyexit_kernels.calibration.certify import certify
from earlyexit_kernels.calibration.record import (
    ExitRecord,
    entropy_replay,
    replay,
    replays,
    stepwise_replay,
)
from earlyexit_kernels.calibration.share import predicted_layers
from earlyexit_kernels.methods.exit_rules import entropy

BUDGET, CONFIDENCE = 0.02, 0.95
#: the seeds whose splits the spread of a path's score is measured over
SPLIT_SEEDS = 8
#: the paths with a threshold per layer: on these constructed records they need about as many layers (within 0.05)
PER_LAYER_PATHS = ("per_layer", "marginal")


def record_of(rows: int, seed: int, *, layer_one_wrong: float = 0.5, layer_two_sure: float = 0.8) -> ExitRecord:
    """Three layers, two classes, the final class the truth. Layer 1: confident on every row, on the
    wrong class for ``layer_one_wrong`` of them. Layer 2: confident and right on ``layer_two_sure``
    of the rows, unsure (equal logits) on the rest. Confident logits differ by 4 to 8."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, 2, (rows,), generator=g)
    sign = truth * 2 - 1  # +1: class 1

    def confident(side):
        margin = 4 + 4 * torch.rand(rows, generator=g)
        return torch.stack([-side * margin / 2, side * margin / 2], 1)

    wrong = torch.rand(rows, generator=g) < layer_one_wrong
    layer1 = confident(torch.where(wrong, -sign, sign))
    sure = torch.rand(rows, generator=g) < layer_two_sure
    layer2 = torch.where(sure[:, None], confident(sign), torch.zeros(rows, 2))
    layer3 = confident(sign)
    return ExitRecord(torch.stack([layer1, layer2, layer3]), truth, None, None, eek.Entropy(0.0))


def smooth_record(rows: int, seed: int) -> ExitRecord:
    """Three layers, two classes: layer 1 wrong on 30% of the rows whatever its confidence; layer 2
    wrong less often the surer it is (``0.4 exp(-margin / 1.5)``), so its risk grows smoothly with its
    threshold."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, 2, (rows,), generator=g)
    sign = (truth * 2 - 1).float()
    layers = []
    for wrong_rate in (lambda m: torch.full_like(m, 0.3), lambda m: 0.4 * torch.exp(-m / 1.5)):
        margin = 8 * torch.rand(rows, generator=g)
        wrong = torch.rand(rows, generator=g) < wrong_rate(margin)
        side = torch.where(wrong, -sign, sign)
        layers.append(torch.stack([-side * margin / 2, side * margin / 2], 1))
    layers.append(torch.stack([-sign * 3, sign * 3], 1))
    return ExitRecord(torch.stack(layers), truth, None, None, eek.Entropy(0.0))


def disagreement(logits, record):
    return (logits.argmax(-1) != record.all_logits[-1].argmax(-1)).double()


def test_the_per_layer_path_certifies_fewer_layers_than_one_global_threshold_at_the_same_risk():
    calibration, validation = record_of(3000, seed=1), record_of(1000, seed=2)
    _, global_cert, _ = certify(calibration, BUDGET, CONFIDENCE, target="agreement", steps=100)
    point, path_cert, _ = certify(
        calibration, BUDGET, CONFIDENCE, target="agreement", path_record=validation, steps=100
    )
    assert path_cert.path in PER_LAYER_PATHS and global_cert.path == "global"
    assert path_cert.certified and path_cert.bound <= BUDGET
    # global: layer 1's confident wrong answers look like layer 2's right ones, nothing early is safe
    # (3.00 layers); per layer: layer 1 held back, layer 2 lets its 80% go (about 2.2 layers)
    assert global_cert.mean_layers > 2.9
    assert path_cert.mean_layers < 2.5
    # layer 1 held back to its few surest rows, layer 2 lets its confident ones go
    assert point.policy.threshold[0] < 0.01 < 0.1 < point.policy.threshold[1]
    assert path_cert.path_layers[path_cert.path] < path_cert.path_layers["global"]


def test_where_one_threshold_does_as_well_the_simplest_path_is_kept():
    # layer 1 as trustworthy as layer 2: a threshold per layer gains nothing over one
    alike = record_of(1000, seed=3, layer_one_wrong=0.0)
    choice = choose_path(alike, [eek.Entropy(t) for t in (0.0, 0.01, 0.1, 0.3, 0.7)], BUDGET, disagreement)
    assert choice.name == "global"


def test_too_few_path_rows_to_see_the_budget_keep_the_global_path():
    # 300 rows at 2%: half of them expect 3 errors at the budget; on fewer the per-layer thresholds are set blind
    assert per_layer_rows_needed(BUDGET) == 300 and per_layer_rows_needed(0.01) == 600
    candidates = [eek.Entropy(t) for t in (0.0, 0.01, 0.1, 0.3, 0.7)]
    few = choose_path(record_of(298, seed=6), candidates, BUDGET, disagreement)
    assert few.name == "global" and few.layers == {}  # not tried
    enough = choose_path(record_of(1000, seed=6), candidates, BUDGET, disagreement)
    assert enough.name in PER_LAYER_PATHS  # the same heads, rows enough: a threshold per layer wins


def test_each_path_scores_what_its_certificate_would_keep_on_the_calibration_rows():
    # 250 calibration rows cannot certify 1% at 95% for any policy (it takes 299 without an error): each path
    # would keep every layer, and the simplest is kept, where its best candidate alone chose the per-layer one
    path_rows = smooth_record(600, seed=2)
    grid = certified_candidates(eek.Entropy(0.0), 3, 2, steps=100)
    uncertified = choose_path(path_rows, grid, 0.01, disagreement)
    assert uncertified.name in PER_LAYER_PATHS and uncertified.layers[uncertified.name] < 2.4
    few = choose_path(path_rows, grid, 0.01, disagreement, confidence=CONFIDENCE, calibration_rows=250)
    assert few.name == "global" and min(few.layers.values()) > 2.999
    enough = choose_path(path_rows, grid, 0.01, disagreement, confidence=CONFIDENCE, calibration_rows=1000)
    assert enough.name in PER_LAYER_PATHS and enough.layers[enough.name] < 2.45 < 2.95 < enough.layers["global"]


def test_the_paths_scores_are_means_over_several_splits_that_move_less_with_the_seed():
    # one split's held-out half moves a path's score by more than the savings at stake; the mean over both ways
    # of 4 splits (the default) moves about half as much between seeds as the two folds of one split
    path_rows = smooth_record(1000, seed=2)
    grid = certified_candidates(eek.Entropy(0.0), 3, 2, steps=100)

    def spreads(splits: int) -> torch.Tensor:
        """Each path's standard deviation of its score over the seeds that split the rows."""
        choices = [
            choose_path(
                path_rows,
                grid,
                0.01,
                disagreement,
                confidence=CONFIDENCE,
                calibration_rows=1000,
                seed=seed,
                splits=splits,
            )
            for seed in range(SPLIT_SEEDS)
        ]
        scores = [[choice.layers[name] for name in PER_LAYER_PATHS] for choice in choices]
        return torch.tensor(scores).std(0)

    ratios = spreads(4) / spreads(1)
    assert (ratios < 0.75).all(), ratios  # measured: 0.46 and 0.44


def test_the_per_layer_path_ramps_up_to_its_first_level():
    # the first level lets go every row a head is as sure of as the surest one it got wrong on the path rows:
    # here half the rows at once, a step 1,000 calibration rows fail; along the ramp the walk stops later
    path_rows = smooth_record(600, seed=2)
    path = per_layer_path(path_rows, eek.Entropy(0.0), steps=100)
    first_level = torch.tensor(path[RAMP_STEPS].threshold)
    for step in range(1, RAMP_STEPS):  # the first level's thresholds, scaled up from 0
        assert torch.allclose(torch.tensor(path[step].threshold), (step / RAMP_STEPS) ** 2 * first_level)
    calibration = smooth_record(1000, seed=7)
    _, levels_only, _ = certify(
        calibration, 0.01, CONFIDENCE, target="agreement", candidates=[path[0]] + path[RAMP_STEPS:]
    )
    assert not levels_only.certified and levels_only.mean_layers == 3.0  # the walk stopped at the first level
    _, ramped, _ = certify(calibration, 0.01, CONFIDENCE, target="agreement", candidates=path)
    assert ramped.certified and ramped.mean_layers < 2.6
    _, chosen, _ = certify(calibration, 0.01, CONFIDENCE, target="agreement", path_record=path_rows, steps=100)
    _, one_threshold, _ = certify(calibration, 0.01, CONFIDENCE, target="agreement", steps=100)
    assert chosen.path in PER_LAYER_PATHS and chosen.mean_layers < 2.6 < 2.9 < one_threshold.mean_layers


def test_the_per_layer_path_is_ordered_from_never_exiting_to_letting_every_row_go():
    path = per_layer_path(record_of(500, seed=4), eek.Entropy(0.0), steps=50)
    assert path[0].threshold == (0.0, 0.0, 0.0)
    for before, after in zip(path, path[1:]):
        assert all(a >= b for a, b in zip(after.threshold, before.threshold)) and after != before
    layers = [replay(p, record_of(500, seed=5)).layers_run.float().mean().item() for p in path]
    assert layers == sorted(layers, reverse=True)


def test_redrawn_calibration_rows_violate_the_budget_no_more_often_than_the_confidence_allows():
    """Population reading: calibration and path rows drawn from a large pool, the chosen policy's
    disagreement measured on the whole pool. The uncertified point on the same draws shows the test
    would see a broken guarantee: it violates the budget on many draws."""
    pool = smooth_record(20000, seed=6)
    pool_truth = pool.all_logits[-1].argmax(-1)
    g = torch.Generator().manual_seed(7)
    draws, certified_violations, uncertified_violations = 30, 0, 0
    for _ in range(draws):
        rows = torch.randint(0, 20000, (800,), generator=g)
        path_rows = torch.randint(0, 20000, (400,), generator=g)
        point, cert, walked = certify(
            pool.subset(rows), BUDGET, CONFIDENCE, target="agreement", path_record=pool.subset(path_rows)
        )
        risk = float((replay(point.policy, pool).logits.argmax(-1) != pool_truth).double().mean())
        certified_violations += risk > BUDGET
        # the uncertified point of the same path on the same rows
        calibration = pool.subset(rows)
        within = [
            p for p in walked if float(disagreement(replay(p.policy, calibration).logits, calibration).mean()) <= BUDGET
        ]
        cheapest = min(within, key=lambda p: p.mean_layers).policy
        uncertified_violations += (
            float((replay(cheapest, pool).logits.argmax(-1) != pool_truth).double().mean()) > BUDGET
        )
    # 5% of 30 draws is 1.5: at most 4 (Binomial(30, 0.05) reaches 5 with probability 0.6%)
    assert certified_violations <= 4, certified_violations
    # the uncertified point violates on 12 of these 30 draws: a test that could not see violations would not
    assert uncertified_violations >= 6, uncertified_violations


def _logits_with_non_finite_rows(seed: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Logits [4 layers, 300 rows, 3] with a NaN, an inf and a row of -inf at layers 1-3, where those rows may not exit."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(4, 300, 3, generator=g) * scale).to(dtype)
    logits[0, 5, 1] = float("nan")
    logits[1, 6, 0] = float("inf")
    logits[2, 7] = float("-inf")
    return logits


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_the_entropy_replay_makes_the_stepwise_replay_s_decisions(normalized, dtype):
    """The all-layers-at-once replay of Entropy is the layer-by-layer one (exit_step): same exits, logits."""
    logits = _logits_with_non_finite_rows(seed=8, scale=2.0, dtype=dtype)
    record = ExitRecord(logits, None, None, None, eek.Entropy(0.0))
    values = entropy(logits[:3].float()).flatten().sort().values
    for threshold in (0.0, float(values[400]), (float(values[100]), 0.0, float(values[800]), 0.0), 1e9):
        policy = eek.Entropy(threshold, normalized=normalized)
        fast, slow = entropy_replay(policy, record), stepwise_replay(policy, record)
        assert torch.equal(fast.exit_layer, slow.exit_layer) and torch.equal(fast.layers_run, slow.layers_run)
        assert torch.equal(fast.logits, slow.logits)
    # a path's candidates replayed together (in chunks, here 70 > one chunk of 64): each as it alone decides
    policies = [eek.Entropy(float(v), normalized=normalized) for v in values[values.isfinite()][::13]]
    policies[3] = eek.Entropy((float(values[100]), 0.0, float(values[800]), 0.0), normalized=normalized)
    assert len(policies) > 64
    # a list of other families, or of Entropy with both normalizations, is replayed one policy at a time
    mixed = [eek.Entropy(0.1), eek.Entropy(0.1, normalized=True), eek.MaxProb(0.9)]
    for candidates in (policies, mixed):
        for policy, out in zip(candidates, replays(candidates, record), strict=True):
            alone = stepwise_replay(policy, record)
            assert torch.equal(out.exit_layer, alone.exit_layer) and torch.equal(out.layers_run, alone.layers_run)
            assert torch.equal(out.logits, alone.logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_the_multi_label_replay_of_a_path_makes_the_stepwise_replay_s_decisions(dtype):
    """A path's MultiLabelConfidence candidates replayed together (the smallest |z| of a row against each margin)
    decide as each alone does layer by layer (exit_step): same exits, logits; non-finite rows never exit early."""
    logits = _logits_with_non_finite_rows(seed=9, scale=3.0, dtype=dtype)
    record = ExitRecord(logits, None, None, None, eek.MultiLabelConfidence(0.9))
    smallest = logits[:3].float().abs().amin(-1).flatten()
    probabilities = torch.sigmoid(smallest[smallest.isfinite()]).sort().values
    thresholds = [float(p) for p in probabilities[::7]] + [0.5, 1.0, (0.97, 0.5, 1.0, 0.5), (1.0, 0.8, 0.9, 1.0)]
    # a threshold exactly on a row's margin: exits (>=), as exit_step decides
    thresholds.append(float(torch.sigmoid(logits[1, 9].float().abs().amin())))
    policies = [eek.MultiLabelConfidence(t) for t in thresholds]
    assert len(policies) > 64  # more than one chunk
    for policy, out in zip(policies, replays(policies, record), strict=True):
        alone = stepwise_replay(policy, record)
        assert torch.equal(out.exit_layer, alone.exit_layer) and torch.equal(out.layers_run, alone.layers_run)
        assert torch.equal(out.logits, alone.logits)


def test_the_predicted_certified_layers_fall_as_more_rows_certify():
    """What the calibration share's probe weighs: the same heads, more calibration rows, a tighter bound."""
    record = smooth_record(2000, seed=9)
    layers = [
        predicted_layers(record, eek.Entropy(0.0), BUDGET, CONFIDENCE, n, "agreement") for n in (30, 300, 3000, 30000)
    ]
    assert layers == sorted(layers, reverse=True) and layers[0] > layers[-1] + 0.1
    assert layers[0] == 3.0  # 30 rows certify nothing


# ------------------------------------------------------------------------------------ the marginal path


def test_each_layer_s_chance_of_disagreeing_is_fitted_from_its_entropy():
    """The logistic fit of one layer recovers the chance it was drawn from (20,000 rows: its slope's standard
    error is about 0.2 here); a chance that does not grow with the entropy gives no fit."""
    g = torch.Generator().manual_seed(11)
    values = torch.rand(20_000, generator=g, dtype=torch.float64) * 0.69
    wrong = (torch.rand(20_000, generator=g, dtype=torch.float64) < torch.sigmoid(8 * values - 5)).double()
    a, b = _disagreement_odds(values, wrong)
    assert abs(a - 8) < 1.0 and abs(b + 5) < 0.5
    flat = (torch.rand(20_000, generator=g, dtype=torch.float64) < 0.3).double()
    assert _disagreement_odds(values, flat) is None or _disagreement_odds(values, flat)[0] < 0.5
    assert _disagreement_odds(values, 1 - wrong) is None  # falls as the entropy grows: no threshold can use it


def test_the_marginal_path_opens_each_layer_where_its_next_row_would_risk_the_common_level():
    path = marginal_path(smooth_record(2000, seed=8), eek.Entropy(0.0), steps=200)
    assert path[0].threshold == (0.0, 0.0, 0.0)
    for before, after in zip(path, path[1:]):
        assert all(a >= b for a, b in zip(after.threshold, before.threshold)) and after != before
    # layer 2's risk falls with its margin: opened a little at a time from the lowest levels; layer 1 is wrong on
    # 30% of its rows whatever its entropy (its fitted slope is the rows' noise): shut all the while layer 2 opens
    # (layer 2's thresholds up to 0.6 here hold levels up to about 0.2), then opened whole within the grid
    opening = [p for p in path if 0.0 < p.threshold[1] < 0.6]
    assert len(opening) > 20 and all(p.threshold[0] == 0.0 for p in opening)
    assert path[-1].threshold[0] == pytest.approx(math.log(2), rel=1e-3) and MAX_LEVEL > 0.3
