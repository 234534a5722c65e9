"""Policies are validated when built, and checked against the model when attached."""

import math

import pytest
import torch

import earlyexit_kernels as eek


@pytest.mark.parametrize(
    "build",
    [
        lambda: eek.Entropy(-0.1),
        lambda: eek.Entropy(math.nan),
        lambda: eek.Entropy([]),
        lambda: eek.Entropy("0.3"),
        lambda: eek.Entropy(0.3, normalized="yes"),
        lambda: eek.MaxProb(1.5),
        lambda: eek.MaxProb(0.9, temperature=0.0),
        lambda: eek.MaxProb(0.9, temperature=[1.0, -1.0]),
        lambda: eek.Patience(0),
        lambda: eek.Patience(2.5),
        lambda: eek.Patience(True),
        lambda: eek.Patience(2, regression_threshold=0.0),
        lambda: eek.QExit(q=1.0),
        lambda: eek.QExit(q=0.0),
        lambda: eek.QExit(combine="sum"),
        lambda: eek.QExit(lambda_layers=-1),
        lambda: eek.Voting(0),
        lambda: eek.SkipGates(skip_threshold=0.0, entropy_threshold=0.3),
        lambda: eek.SkipGates(),
        lambda: eek.Scheduled(torch.tensor([1.0, 2.0])),
        lambda: eek.Scheduled(torch.tensor([[1, 2]])),
        lambda: eek.Scheduled(torch.tensor([0, 2])),
    ],
)
def test_invalid_parameters_raise_value_error_when_built(build):
    with pytest.raises(ValueError):
        build()


def test_policies_are_frozen_and_normalise_sequences_to_tuples():
    policy = eek.Entropy([0.1, 0.2, 0.3])
    assert policy.threshold == (0.1, 0.2, 0.3)
    with pytest.raises(AttributeError):
        policy.threshold = 0.5
    assert eek.Entropy(0.3) == eek.Entropy(0.3)


@pytest.mark.parametrize(
    ("policy", "num_layers", "num_labels", "message"),
    [
        (eek.Entropy([0.1, 0.2]), 4, 3, "one value per layer"),
        (eek.MaxProb(0.9, temperature=[1.0] * 3), 4, 3, "one value per layer"),
        (eek.Entropy(0.3), 4, 1, "num_labels"),
        (eek.Patience(2, regression_threshold=0.1), 4, 3, "regression"),
        (eek.Patience(2), 4, 1, "regression_threshold"),
        (eek.Patience(4), 4, 3, "never be met"),
        (eek.Voting(3), 4, 1, "num_labels"),
        (eek.Voting(5), 4, 3, "exceeds"),
        (eek.DACT(), 4, 1, "num_labels"),
        (eek.Scheduled(torch.tensor([1, 5])), 4, 3, "1..4"),
    ],
)
def test_policy_that_does_not_fit_the_model_raises(policy, num_layers, num_labels, message):
    with pytest.raises(ValueError, match=message):
        policy.check_fits(num_layers, num_labels)


@pytest.mark.parametrize(
    "policy",
    [
        eek.Entropy([0.1, 0.2, 0.3, 0.4]),
        eek.MaxProb(0.9, temperature=2.0),
        eek.Patience(3),
        eek.QExit(),
        eek.Voting(4),
        eek.DACT(),
        eek.SkipGates(entropy_threshold=0.2),
        eek.Scheduled(torch.tensor([1, 4])),
    ],
)
def test_valid_policies_fit_a_four_layer_classifier(policy):
    policy.check_fits(4, 3)


def test_regression_policies_fit_a_regression_head():
    eek.Patience(2, regression_threshold=0.1).check_fits(4, 1)
    eek.QExit(q=0.3).check_fits(4, 1)
