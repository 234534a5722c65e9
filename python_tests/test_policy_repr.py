"""Policies print as the code that builds them: ``eval(repr(p))`` and ``parse_policy(repr(p))`` give ``p`` back."""

import io

import pytest
import torch

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.candidates import describe, distinct_digits, print_curve
from earlyexit_kernels.calibration.record import CurvePoint
from earlyexit_kernels.methods.policy_spec import parse_policy

POLICIES = [
    eek.Entropy(0.3),
    eek.Entropy(0.48891234567891234),
    eek.Entropy([0.1, 0.2, 0.3]),
    eek.Entropy((0.25,), normalized=True),
    eek.MaxProb(0.9),
    eek.MaxProb(0.75, temperature=[1.5, 2.0]),
    eek.Patience(2),
    eek.Patience(3, regression_threshold=0.1),
    eek.QExit(),
    eek.QExit(q=0.10961234, combine="subtract", lambda_layers=2, stochastic=True, seed=7),
    eek.Voting(3),
    eek.DACT(),
    eek.SkipGates(entropy_threshold=0.3874),
    eek.SkipGates(skip_threshold=0.7, entropy_threshold=(0.1, 0.2), normalized=True),
]


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_repr_is_the_code_that_builds_the_policy(policy):
    text = repr(policy)
    assert eval(text, vars(eek)) == policy  # noqa: S307 - the point of the test
    assert parse_policy(text) == policy  # what the command line reads
    assert str(policy) == text


def test_repr_writes_required_fields_positionally_and_defaults_not_at_all():
    assert repr(eek.Entropy(0.3)) == "Entropy(0.3)"
    assert repr(eek.Patience(2)) == "Patience(2)"
    assert repr(eek.QExit(q=0.5)) == "QExit()"
    assert repr(eek.SkipGates(entropy_threshold=0.3)) == "SkipGates(entropy_threshold=0.3)"
    assert repr(eek.Entropy(0.7, normalized=True)) == "Entropy(0.7, normalized=True)"


def test_scheduled_repr_rebuilds_the_same_exit_layers():
    policy = eek.Scheduled(torch.tensor([1, 3, 2]))
    assert repr(policy) == "Scheduled([1, 3, 2])"
    rebuilt = eval(repr(policy), vars(eek))  # noqa: S307
    assert torch.equal(rebuilt.exit_layers, policy.exit_layers)


def test_rounded_code_stays_valid():
    assert eek.Entropy(0.48891234).to_code(4) == "Entropy(0.4889)"
    # 0.999999 rounds to 1 at 4 digits, which QExit refuses: more digits are written instead
    assert eek.QExit(q=1 - 1e-6).to_code(4) == "QExit(q=0.999999)"
    assert describe(eek.SkipGates(entropy_threshold=0.38741234)) == "SkipGates(entropy_threshold=0.3874)"


def test_the_printed_curve_tells_close_thresholds_apart():
    # untrained heads put every entropy near ln 2: the candidates differ only after 4 digits
    thresholds = [0.6927 + k * 1e-6 for k in range(5)]
    curve = [CurvePoint(eek.Entropy(t), 0.5 + k / 100, 1.0 + k / 10, 1.0) for k, t in enumerate(thresholds)]
    assert distinct_digits([p.policy for p in curve]) == 6  # 0.692700, 0.692701, ...
    out = io.StringIO()
    print_curve(curve, file=out)
    names = [line.split()[0] for line in out.getvalue().splitlines()[1:]]
    assert len(set(names)) == len(thresholds)
    for name, threshold in zip(names, thresholds):
        assert parse_policy(name).threshold == pytest.approx(threshold, abs=1e-12)
