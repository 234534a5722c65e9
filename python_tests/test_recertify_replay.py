"""The replay logic of ``benchmarks/statistics/recertify_replay.py`` (:mod:`benchmarks.suite.certificate_replay`) on a tiny
synthetic pool (no model, no real material)."""

import pytest
import torch

from benchmarks.suite import certificate_replay
from earlyexit_kernels.calibration.online import OnlineCertificate
from earlyexit_kernels.methods.policies import Entropy

BUDGET, CONFIDENCE = 0.05, 0.95


@pytest.fixture(scope="module")
def bench():
    return certificate_replay


def _pool(bench, name, rates, rows=400, seed=0):
    """Candidates whose rows disagree at ``rates`` and run fewer layers along the path (6 down to 1)."""
    rates = torch.tensor(rates, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    losses = (torch.rand(len(rates), rows, generator=generator, dtype=torch.float64) < rates[:, None]).double()
    layers = torch.linspace(6, 1, len(rates), dtype=torch.float64)[:, None].expand(-1, rows).clone()
    return bench.Pool(name, losses, layers)


PATH = [Entropy(0.1 * i) for i in range(8)]
RATES = [0.0, 0.005, 0.01, 0.02, 0.03, 0.1, 0.2, 0.4]


def test_the_oracle_is_the_cheapest_candidate_within_the_budget(bench):
    pool = _pool(bench, "test", RATES)
    oracle = bench.oracle_index(pool, BUDGET)
    assert float(pool.risk[oracle]) <= BUDGET < float(pool.risk[oracle + 1])
    assert bench.oracle_index(_pool(bench, "bad", [0.0] + [0.5] * 7), BUDGET) == 0


def test_served_after_follows_the_certificate_row_by_row(bench):
    pool = _pool(bench, "test", RATES)
    draws = bench.draws_for(pool, 600, seed=3)
    replay = bench.Replay(PATH, range(len(PATH)), 1, BUDGET, CONFIDENCE, chunk=100)
    replay.feed(pool, draws)
    assert any(m.direction == "looser" for m in replay.moves)
    # the same rows one at a time: served_index after each is the reconstruction's
    certificate = OnlineCertificate(PATH, start=1, budget=BUDGET, confidence=CONFIDENCE, window=0)
    step = [certificate.served_index]
    for row in draws.tolist():
        certificate.observe(pool.losses[:, [row]], pool.layers[:, [row]])
        step.append(certificate.served_index)
    assert replay.served().tolist() == step


def _duplicated(bench, name, rates, seed):
    """Candidates 0-2 alike (no loss), 3 and 4 alike: the reduced path stands one for each run."""
    pool = _pool(bench, name, rates, seed=seed)
    pool.losses[:3] = 0.0
    pool.losses[4] = pool.losses[3]
    return pool


def test_the_reduced_path_serves_as_the_whole_path(bench):
    rates = [0.0, 0.0, 0.0, 0.01, 0.01, 0.03, 0.1, 0.2, 0.3, 0.4]
    path = [Entropy(0.05 * i) for i in range(len(rates))]
    test = _duplicated(bench, "test", rates, seed=0)
    drift = _duplicated(bench, "drift", [0.0, 0.0, 0.0, 0.3, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], seed=1)
    keep = bench.reduced_path([test, drift], 1, BUDGET)
    last = bench.sentinel([test, drift], 1, BUDGET)
    assert last < len(path) - 1 and keep[-1] == last  # the sentinel cut
    assert 3 not in keep and keep[:2] == [0, 1]  # one of 3 and 4; start (1) and 0 alone
    plan = bench.Plan(checkpoints=(200, 900), drift_at=500, post=400, chunk=128)
    cut, cut_branches = bench.replay_seed(path, 1, BUDGET, CONFIDENCE, test, [drift], plan, 0, keep)
    whole, whole_branches = bench.replay_seed(path, 1, BUDGET, CONFIDENCE, test, [drift], plan, 0, None)
    assert cut.keep.tolist() == keep  # not replayed whole
    for a, b in [(cut, whole), (cut_branches[0], whole_branches[0])]:
        assert torch.equal(a.served(), b.served())
        assert [m.as_dict() for m in a.moves] == [m.as_dict() for m in b.moves]
    assert any(m.direction == "looser" for m in whole.moves)
    assert any(m.direction == "tighter" for m in whole_branches[0].moves)  # the drift was seen


def test_a_fork_goes_on_as_a_fresh_replay_of_the_same_rows(bench):
    test = _pool(bench, "test", RATES)
    drift = _pool(bench, "drift", [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], seed=1)
    plan = bench.Plan(checkpoints=(700,), drift_at=300, post=300, chunk=64)
    _, (branch,) = bench.replay_seed(PATH, 1, BUDGET, CONFIDENCE, test, [drift], plan, 5, None)
    fresh = bench.Replay(PATH, range(len(PATH)), 1, BUDGET, CONFIDENCE, chunk=64)
    fresh.feed(test, bench.draws_for(test, 700, 5)[:300])
    fresh.feed(drift, bench.draws_for(drift, 300, 5, 1))
    assert torch.equal(branch.served(), fresh.served())
    assert [m.as_dict() for m in branch.moves] == [m.as_dict() for m in fresh.moves]


def test_windows_and_checkpoints_read_the_exact_pool_risk(bench):
    pool = _pool(bench, "test", RATES)
    plan = bench.Plan(checkpoints=(2, 6), window=3)
    served = torch.tensor([0, 0, 5, 5, 5, 1, 1])  # after 0..6 audited rows
    summary = bench.stationary_summary(served, pool, BUDGET, plan)
    assert summary["checkpoints"]["2"]["index"] == 5
    assert summary["checkpoints"]["6"]["mean_layers"] == pytest.approx(float(pool.mean_layers[1]))
    # windows: slots served [0, 0, 5] and [5, 5, 1]; only candidate 5 is over the budget
    risk = pool.risk
    assert summary["windows"] == 2
    assert summary["worst_window_risk"] == pytest.approx(float(2 * risk[5] + risk[1]) / 3)
    assert summary["windows_over"] == (float(risk[5]) / 3 > BUDGET) + (float(2 * risk[5] + risk[1]) / 3 > BUDGET)
    assert summary["ever_over"]


def test_drift_replays_pull_back_and_are_summarised(bench):
    test = _pool(bench, "test", RATES)
    drift = _pool(bench, "drift", [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], seed=1)
    plan = bench.Plan(checkpoints=(100, 400), drift_at=400, post=300, window=100, replays=2, drift_replays=2, chunk=64)
    results = bench.run_replays(PATH, 1, BUDGET, CONFIDENCE, test, [drift], plan)
    assert results["windows"] == 2 * 4 and results["oracle"] == bench.oracle_index(test, BUDGET)
    assert set(results["checkpoints"]) == {"100", "400"}
    (row,) = results["drifts"]
    assert row["start_risk"] == pytest.approx(float(drift.risk[1]))
    assert row["streams"] == 2 and row["pulled_back"] == 2 and row["median_pulled_after"] < 300
    one = row["stream_0"]
    assert one["risk_at_switch"] > BUDGET and one["pulled_back_after"] is not None
    assert one["end_index"] == 0  # nothing else is within the budget on the drift: full depth stays served
    text = bench.render(
        {"date": "today", "cpu": "a CPU", "command": "test", "seconds": 1.0, "replay": results, "fit": FIT}
    )
    assert text.startswith(bench.START) and text.rstrip().endswith(bench.END)
    assert "| drift |" in text


FIT = {"rows": 1500, "train_rows": 512, "calibration_rows": 838, "policy": "Entropy(0.3)"}


def test_the_one_shot_certificate_stops_at_the_first_candidate_that_fails(bench):
    from earlyexit_kernels.methods.risk_control import binomial_p_value

    rows = 400
    losses = torch.zeros(8, rows, dtype=torch.float64)
    for k in range(8):
        losses[k, : 4 * k] = 1.0  # candidate k: 4k disagreements
    losses[3], losses[4] = losses[6].clone(), losses[1].clone()  # 3 fails, 4 would pass: the walk stops at 3
    pool = bench.Pool("test", losses, torch.ones_like(losses))
    passes = [binomial_p_value(int(losses[k].sum()), rows, BUDGET) <= 1 - CONFIDENCE for k in range(8)]
    assert passes[:3] == [True] * 3 and not passes[3] and passes[4]
    assert bench.one_shot_index(pool, torch.arange(rows), BUDGET, CONFIDENCE) == 2
