"""The calibration share's probe stops on evidence, not on noise (issue 62, item 0).

An outside check: heads trained on 256 then 512 rows predicted 3.88 then 3.92 layers on 1,031
validation rows; the greedy rule (stop once a doubling saves under 0.05 layers) kept 512 rows to train
the heads, and the fit ran 4.10 of 6 layers where three quarters of the rows ran 3.56. The stand-in
here: validation records of 1,031 rows, 6 layers, two classes, the final layer fixed; the heads'
agreement with it and their confidence per layer set how good they are. Two draws of heads of the
same quality differ by noise only; better heads agree more, earlier.
"""

import math

import torch

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.calibration.row_losses import row_losses
from earlyexit_kernels.calibration.share import (
    MIN_GAIN_LAYERS,
    CandidateTable,
    doubling_verdict,
    predicted_layers,
    redraws,
)
from earlyexit_kernels.methods.risk_control import binomial_p_value

ROWS, LAYERS = 1031, 6
POLICY = eek.Entropy(0.1)
#: each internal head's agreement with the final layer, layers 1-5
SAME = [0.80, 0.86, 0.92, 0.96, 0.985]
BETTER = [0.90, 0.95, 0.98, 0.99, 0.995]
BUDGET = dict(budget=0.01, confidence=0.95)


def validation_record(agree, heads_seed: int, *, labels: bool = False) -> ExitRecord:
    final = torch.randint(2, (ROWS,), generator=torch.Generator().manual_seed(0))
    draw = torch.Generator().manual_seed(heads_seed)
    logits = torch.zeros(LAYERS, ROWS, 2)
    logits[-1, torch.arange(ROWS), final] = 4.0
    for layer, rate in enumerate(agree):
        right = torch.rand(ROWS, generator=draw) < rate
        margin = torch.rand(ROWS, generator=draw) * (1.0 + layer) * torch.where(right, 2.0, 1.0)
        logits[layer, torch.arange(ROWS), torch.where(right, final, 1 - final)] = margin
    truth = torch.where(torch.rand(ROWS, generator=draw) < 0.85, final, 1 - final) if labels else None
    return ExitRecord(logits, truth, None, None, POLICY)


def table(agree, heads_seed: int) -> CandidateTable:
    return CandidateTable.of(validation_record(agree, heads_seed), POLICY, "agreement")


def verdict(previous, current, calibration_rows: int, next_calibration_rows: int):
    return doubling_verdict(
        previous,
        current,
        redraws(ROWS, 400, seed=0),
        calibration_rows=calibration_rows,
        next_calibration_rows=next_calibration_rows,
        **BUDGET,
    )


def test_a_doubling_that_seems_to_lose_by_noise_does_not_stop_the_probe():
    # the outside check's case: 9,277 training rows, 256 then 512 probed, plenty left to certify either way
    found = verdict(table(SAME, 5), table(SAME, 15), calibration_rows=9277 - 512, next_calibration_rows=9277 - 1024)
    assert found.gain < MIN_GAIN_LAYERS  # the greedy rule stopped here
    assert found.price == 0.0  # 8,253 rows certify as well as 8,765
    assert found.go_on and found.bound > 0.15  # re-draws of the validation rows cannot tell it from noise


def test_the_probe_stops_when_fewer_calibration_rows_would_cost_more_than_the_heads_gain():
    # heads of the same quality, and a doubling that would leave 400 rows to certify 1% at 95%
    found = verdict(table(SAME, 6), table(SAME, 16), calibration_rows=3000, next_calibration_rows=400)
    assert found.price > 0.5
    assert not found.go_on and found.bound < -0.2
    assert "under 0.05" in found.describe(1024, 2048)


def test_heads_clearly_better_go_on_even_at_a_price():
    found = verdict(table(SAME, 1), table(BETTER, 11), calibration_rows=3000, next_calibration_rows=1500)
    assert found.gain > 0.5 and found.go_on


def test_a_step_shorter_than_a_doubling_is_credited_that_share_of_the_last_doublings_gain():
    # past the last doubling, the step to the fixed share: clearly better heads, a price of about half a layer
    weights = redraws(ROWS, 400, seed=0)
    previous, current = table(SAME, 1), table(BETTER, 11)
    rows = dict(calibration_rows=3000, next_calibration_rows=450)
    whole = doubling_verdict(previous, current, weights, **rows, **BUDGET)
    quarter = doubling_verdict(previous, current, weights, **rows, step=0.25, **BUDGET)
    assert (whole.gain, whole.price) == (quarter.gain, quarter.price)  # the same heads, the same price
    assert whole.go_on and whole.bound > 0.4  # a doubling's gain pays for it
    assert not quarter.go_on and quarter.bound < 0.0  # a quarter of it does not


def reference_predicted(record, target: str, calibration_rows: int) -> float:
    """The walk, one candidate at a time, as written in calibration_share's docstring."""
    from statistics import NormalDist

    layers = float(LAYERS)
    for candidate in certified_candidates(POLICY, LAYERS, 2):
        out = replay(candidate, record)
        losses = row_losses(out.logits, record, target)
        rate = float(losses.mean())
        if target == "agreement":
            fails = binomial_p_value(math.floor(rate * calibration_rows + 1e-9), calibration_rows, 0.01) > 0.05
        else:  # Nam's score statistic of the exact paired test at these shares, against its normal quantile
            n, d = calibration_rows, 0.01
            a, b = n * float((losses == 1).double().mean()), n * float((losses == -1).double().mean())
            c = n - a - b
            big_b = a * (1 - d) + b * (1 - 3 * d) - 2 * c * d
            p2 = (big_b + math.sqrt(big_b**2 + 8 * n * b * d * (1 - d))) / (4 * n)  # the null's MLE of P(-1)
            fails = (a - b - n * d) / math.sqrt(n * (2 * p2 + d - d * d)) > -NormalDist().inv_cdf(0.95)
        if fails:
            break
        layers = out.layers_run.double().mean().item()
    return layers


def test_the_prediction_is_the_walk_along_the_certified_grid():
    for target, record in (
        ("agreement", validation_record(SAME, 3)),
        ("accuracy", validation_record(SAME, 3, labels=True)),
    ):
        for rows in (400, 2000, 9000):
            expected = reference_predicted(record, target, rows)
            assert math.isclose(predicted_layers(record, POLICY, 0.01, 0.95, rows, target), expected, abs_tol=1e-9)
    # too few rows for even a loss-free policy: every layer
    assert predicted_layers(validation_record(SAME, 3), POLICY, 0.01, 0.95, 200, "agreement") == LAYERS


def test_the_redraws_are_the_rows_as_they_are_then_seeded_bootstrap_weights():
    weights = redraws(50, 8, seed=3)
    assert weights.shape == (9, 50)
    assert torch.allclose(weights[0], torch.full((50,), 1 / 50, dtype=torch.float64))
    assert torch.allclose(weights.sum(1), torch.ones(9, dtype=torch.float64))
    assert torch.equal(weights, redraws(50, 8, seed=3)) and not torch.equal(weights, redraws(50, 8, seed=4))
