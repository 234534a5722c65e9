"""Online re-certification's statistics and moves, on streams of known risk (no model).

The betting e-process and the e-detector against their definitions (row by row) and chunk by
chunk; a stream where the threshold must loosen (it moves to the most aggressive candidate
within the budget, never past it), one where it must tighten (the folder's candidate over the
budget is pulled back to full depth, and re-certification starts again on the new rows); a
re-draw test of the violation rate: over many streams, the share in which a candidate over the
budget was ever served on the online test's word stays under 1 - confidence. Bad input refused.
"""

import math

import pytest
import torch

from earlyexit_kernels.calibration.online import OnlineCertificate, RecertifyError, candidate_losses
from earlyexit_kernels.methods.anytime_risk import (
    ALARM_SHIFTS,
    MAX_STAKE,
    PRIOR_ROWS,
    AlarmState,
    SafetyState,
    alarm_log_detector,
    safety_log_capital,
)
from earlyexit_kernels.methods.policies import Entropy, QExit

BUDGET = 0.05


def _bernoulli_losses(rates, rows: int, generator) -> torch.Tensor:
    """[M, rows] 0/1 losses, nested (a row lost by a candidate is lost by every riskier one), as a path's are."""
    u = torch.rand(rows, generator=generator)
    return (u[None, :] < torch.tensor(rates, dtype=torch.float64)[:, None]).double()


def test_the_bettor_s_capital_follows_its_definition_row_by_row():
    z = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.5, 0.0]], dtype=torch.float64)
    log_capital, state = safety_log_capital(SafetyState.start(1), z, BUDGET)
    capital, losses, prior = 1.0, 0.0, PRIOR_ROWS / BUDGET
    for t, loss in enumerate(z[0].tolist()):
        rate = (losses + prior * BUDGET / 2) / (t + prior)
        stake = min(max((BUDGET - rate) / (BUDGET * (1 - BUDGET)), 0.0), MAX_STAKE / (1 - BUDGET))
        capital *= 1 + stake * (BUDGET - loss)
        losses += loss
        assert math.log(capital) == pytest.approx(float(log_capital[0, t]), abs=1e-12)
    assert state.rows == 6 and float(state.losses[0]) == 1.5


def test_the_detector_is_the_mean_of_e_cusums_row_by_row():
    z = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    log_detector, _ = alarm_log_detector(AlarmState.start(1), z, BUDGET)
    cusums = [0.0] * len(ALARM_SHIFTS)
    for t, loss in enumerate(z[0].tolist()):
        for k, shift in enumerate(ALARM_SHIFTS):
            stake = min(shift / (1 - BUDGET), 0.99 / BUDGET)
            cusums[k] = max(cusums[k], 1.0) * (1 + stake * (loss - BUDGET))
        assert math.log(sum(cusums) / len(cusums)) == pytest.approx(float(log_detector[0, t]), abs=1e-9)


def _drifting_stream() -> tuple[torch.Tensor, list]:
    """1,500 rows within the budget below the riskiest candidate, then 300 at 30% on every one; a path of 5."""
    generator = torch.Generator().manual_seed(3)
    rates = [0.0, 0.01, 0.02, 0.04, 0.2]
    losses = torch.cat([_bernoulli_losses(rates, 1500, generator), _bernoulli_losses([0.3] * 5, 300, generator)], 1)
    return losses, [Entropy(0.1 * i) for i in range(5)]


def test_chunks_of_any_size_give_the_same_numbers_and_moves():
    losses, path = _drifting_stream()
    whole = OnlineCertificate(path, budget=BUDGET, confidence=0.9, window=0)
    whole.observe(losses)
    pieces = OnlineCertificate(path, budget=BUDGET, confidence=0.9, window=0)
    for start in range(0, losses.shape[1], 37):
        pieces.observe(losses[:, start : start + 37])
    assert [m.as_dict() for m in pieces.moves] == [m.as_dict() for m in whole.moves]
    assert [m.direction for m in whole.moves][-1] == "tighter"  # the 30% tail is seen


def test_a_long_running_certificate_keeps_its_latest_moves_and_counts_them_all(monkeypatch):
    from earlyexit_kernels.calibration import online

    losses, path = _drifting_stream()
    every = OnlineCertificate(path, budget=BUDGET, confidence=0.9, window=0)
    every.observe(losses)
    monkeypatch.setattr(online, "KEPT_MOVES", 2)
    kept = OnlineCertificate(path, budget=BUDGET, confidence=0.9, window=0)
    kept.observe(losses)
    assert len(every.moves) > 2, "the stream must move more often than the two moves kept"
    assert [m.as_dict() for m in kept.moves] == [m.as_dict() for m in every.moves][-2:]
    assert kept.move_counts == {d: sum(m.direction == d for m in every.moves) for d in ("looser", "tighter")}
    assert kept.as_dict()["move_counts"] == kept.move_counts


def test_a_stream_within_the_budget_loosens_to_the_last_candidate_under_it():
    rates = [0.0, 0.005, 0.01, 0.02, 0.03, 0.08, 0.2]  # the budget (5%) lies between 0.03 and 0.08
    path = [Entropy(0.1 * i) for i in range(len(rates))]
    certificate = OnlineCertificate(path, budget=BUDGET, confidence=0.95, window=0)
    generator = torch.Generator().manual_seed(0)
    served = []
    for _ in range(20):
        certificate.observe(_bernoulli_losses(rates, 250, generator))
        served.append(certificate.served_index)
    assert served == sorted(served)  # only looser while nothing drifts
    assert served[-1] == 4  # 3% certified at 5% within 5,000 rows; 8% never
    assert all(m.direction == "looser" and m.to_index <= 4 for m in certificate.moves)
    assert certificate.epoch == 1 and certificate.served_policy == path[4]


def test_a_folder_threshold_over_the_budget_is_pulled_back_then_recertified_on_new_rows():
    rates = [0.0, 0.01, 0.03, 0.25]
    path = [Entropy(0.1 * i) for i in range(len(rates))]
    certificate = OnlineCertificate(path, start=3, budget=BUDGET, confidence=0.95, window=0)
    assert certificate.served_index == 3  # the folder's own candidate serves until the audit says otherwise
    generator = torch.Generator().manual_seed(1)
    certificate.observe(_bernoulli_losses(rates, 400, generator))
    pulled = [m for m in certificate.moves if m.direction == "tighter"]
    assert len(pulled) == 1 and pulled[0].from_index == 3 and pulled[0].to_index == 0
    assert pulled[0].rows < 150  # a 25% risk against 5% shows within a few dozen rows
    assert certificate.epoch == 2
    for _ in range(10):
        certificate.observe(_bernoulli_losses(rates, 300, generator))
    assert certificate.served_index == 2 and certificate.epoch == 2  # certified again from the new rows only


def test_redrawn_streams_serve_a_candidate_over_the_budget_at_most_one_time_in_twenty():
    # nested candidates around the budget, the worst case of fixed-sequence testing: 5.5% is over 5%
    rates = [0.0, 0.02, 0.035, 0.045, 0.055, 0.07, 0.1]
    path = [Entropy(0.1 * i) for i in range(len(rates))]
    streams, violations = 200, 0
    for seed in range(streams):
        generator = torch.Generator().manual_seed(1000 + seed)
        certificate = OnlineCertificate(path, budget=BUDGET, confidence=0.95, window=0)
        over = False
        for _ in range(6):
            certificate.observe(_bernoulli_losses(rates, 500, generator))
            over = over or any(m.direction == "looser" and rates[m.to_index] > BUDGET for m in certificate.moves)
        violations += over
    # at most 1 - confidence = 5%: 10 of 200; the bound of Ville's inequality is loose, so most seeds give far fewer
    assert violations <= 10


def test_candidate_losses_replay_each_candidate_against_the_last_layer():
    logits = torch.tensor(
        [
            [[3.0, 0.0], [0.0, 0.1]],  # layer 1: row 0 confident (class 0), row 1 unsure
            [[2.0, 0.0], [0.0, 3.0]],  # layer 2
            [[0.0, 1.0], [0.0, 1.0]],  # the full model: class 1 for both
        ]
    )
    path = [Entropy(0.0), Entropy(0.3), Entropy(0.8)]
    losses, layers = candidate_losses(path, logits)
    assert losses.tolist() == [[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    assert layers.tolist() == [[3.0, 3.0], [1.0, 2.0], [1.0, 1.0]]


def test_bad_input_is_refused_with_what_to_fix():
    path = [Entropy(0.0), Entropy(0.2)]
    with pytest.raises(ValueError, match="audit fraction must be a number in"):
        OnlineCertificate(path, budget=BUDGET, fraction=1.5)
    with pytest.raises(RecertifyError, match="budget of 0 cannot be certified"):
        OnlineCertificate(path, budget=0.0)
    with pytest.raises(RecertifyError, match="halting head or gates"):
        OnlineCertificate([QExit(0.5)], budget=BUDGET)
    with pytest.raises(RecertifyError, match="start must index the path"):
        OnlineCertificate(path, start=2, budget=BUDGET)
    with pytest.raises(RecertifyError, match="at least one candidate"):
        OnlineCertificate([], budget=BUDGET)
    with pytest.raises(ValueError, match=r"losses must be \[2, n\]"):
        OnlineCertificate(path, budget=BUDGET).observe(torch.zeros(3, 4))
