"""Policies from command-line text: parsed with ast, literal arguments only, errors that say what to fix."""

import re

import pytest

import earlyexit_kernels as eek
from earlyexit_kernels.methods.policy_spec import POLICY_NAMES, parse_policy


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Entropy(0.3)", eek.Entropy(0.3)),
        ("Entropy(threshold=0.3, normalized=True)", eek.Entropy(0.3, normalized=True)),
        ("Entropy([0.1, 0.2, 0.3])", eek.Entropy((0.1, 0.2, 0.3))),
        ("Entropy(threshold=[0.1, 0.2], normalized=True)", eek.Entropy((0.1, 0.2), normalized=True)),
        ("Patience(2)", eek.Patience(2)),
        ("Patience(patience=3, regression_threshold=0.05)", eek.Patience(3, regression_threshold=0.05)),
        ("MaxProb(0.9)", eek.MaxProb(0.9)),
        ("MaxProb(0.9, temperature=2.0)", eek.MaxProb(0.9, temperature=2.0)),
        ("QExit(q=0.5)", eek.QExit(q=0.5)),
        ("QExit(q=0.4, combine='subtract')", eek.QExit(0.4, combine="subtract")),
        ("Voting(2)", eek.Voting(2)),
        (" Voting(3) ", eek.Voting(3)),
        ("DACT()", eek.DACT()),
        ("DACT", eek.DACT()),
        ("SkipGates(entropy_threshold=0.3)", eek.SkipGates(entropy_threshold=0.3)),
        ("SkipGates(skip_threshold=0.7, entropy_threshold=(0.2, 0.3))", eek.SkipGates(0.7, (0.2, 0.3))),
        ("MultiLabelConfidence(0.9)", eek.MultiLabelConfidence(0.9)),
        ("ScoreBand(low=-2.0)", eek.ScoreBand(low=-2.0)),
    ],
)
def test_policies_are_parsed_from_text(text, expected):
    assert parse_policy(text) == expected


def test_every_policy_but_scheduled_can_be_named():
    assert set(POLICY_NAMES) == {
        "Entropy",
        "MaxProb",
        "Patience",
        "QExit",
        "Voting",
        "DACT",
        "SkipGates",
        "MultiLabelConfidence",
        "ScoreBand",
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "a policy is a name and its arguments"),
        ("Entropy(", "cannot parse the policy 'Entropy('"),
        ("Entropy(0.3", "cannot parse"),
        ("Softmax(0.3)", "unknown policy 'Softmax'; the policies are Entropy, MaxProb, Patience, QExit, Voting, DACT"),
        ("entropy(0.3)", "unknown policy 'entropy'"),
        ("Entropy(x)", "must be literals"),
        ("Entropy(1 + 2)", "must be literals"),
        ("Entropy(__import__('os').getcwd())", "must be literals"),
        ("Entropy(**{'threshold': 1})", "must be literals"),
        ("Entropy(*[0.3])", "must be literals"),
        ("os.system('ls')", "must be a policy name and its arguments"),
        ("Entropy(0.3)(1)", "must be a policy name and its arguments"),
        ("0.3", "must be a policy name and its arguments"),
        ("Scheduled([1, 2])", "Scheduled replays exit layers per batch position"),
        ("Patience(patience=0)", "patience must be an integer >= 1"),
        ("Voting(K=2)", "unexpected keyword argument 'K'"),
        ("Entropy(tau=0.3)", "unexpected keyword argument 'tau'"),
        ("Entropy(0.3, 0.4, 0.5)", "positional argument"),
        ("Entropy(0.3, threshold=0.4)", "multiple values for argument 'threshold'"),
    ],
)
def test_bad_policy_text_says_what_to_fix(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_policy(text)


def test_nothing_in_the_text_is_evaluated(monkeypatch):
    import builtins

    def refuse(*args, **kwargs):
        raise AssertionError("eval or exec was called")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    assert parse_policy("Entropy(0.25)") == eek.Entropy(0.25)
    with pytest.raises(ValueError, match="must be literals"):
        parse_policy("Entropy(open('/etc/passwd').read())")
