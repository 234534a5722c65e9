"""One lowering of every policy to kernel codes, the same enum as the C++ header's."""

import re
from pathlib import Path

import pytest
import torch

import earlyexit_kernels as eek
from earlyexit_kernels.backends import cpp_backend
from earlyexit_kernels.backends.policy_lowering import PolicyKind, RuleFlag, lower

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "common" / "exit_rule.h"


def header_enum(name: str) -> dict[str, int]:
    """``enum NAME : int { kFoo = 1, ... }`` of exit_rule.h as {"FOO": 1}."""
    body = re.search(rf"enum {name} : int \{{(.*?)\}};", HEADER.read_text(), re.S)
    assert body, f"no enum {name} in {HEADER}"
    entries = re.findall(r"\bk(\w+)\s*=\s*(\d+)", body.group(1))
    return {entry.upper(): int(value) for entry, value in entries}


def test_the_policy_kinds_are_the_headers():
    kinds = header_enum("Kind")
    assert kinds.pop("NUMKINDS") == len(PolicyKind)
    assert kinds == {kind.name.replace("_", ""): kind.value for kind in PolicyKind}


def test_the_policy_flags_are_the_headers_and_the_backends_own_bits_lie_above_them():
    flags = header_enum("Flag")
    assert flags.pop("SURVIVORS") == cpp_backend.FLAG_SURVIVORS
    assert flags == {flag.name: flag.value for flag in RuleFlag}
    policy_bits = sum(RuleFlag)
    assert not cpp_backend.FLAG_SURVIVORS & policy_bits
    pytest.importorskip("triton", reason="the Triton backend's flags")
    from earlyexit_kernels.backends.triton_kernels import exit_decide as tk

    assert (tk.F_NORMALIZED, tk.F_TEMPERATURE, tk.F_STOCHASTIC) == tuple(RuleFlag)
    for own in (tk.F_PARTIALS, tk.F_WRITE_BACK, tk.F_RETURNED, tk.F_LOGITS):
        assert not own & policy_bits


@pytest.mark.parametrize(
    "policy, kind, flags",
    [
        (eek.Entropy(0.3, normalized=True), PolicyKind.ENTROPY, RuleFlag.NORMALIZED),
        (eek.SkipGates(skip_threshold=0.4, entropy_threshold=0.2), PolicyKind.ENTROPY, RuleFlag(0)),
        (eek.MaxProb(0.9, temperature=1.5), PolicyKind.MAXPROB, RuleFlag.TEMPERATURE),
        (eek.Patience(2), PolicyKind.PATIENCE, RuleFlag(0)),
        (eek.Patience(2, regression_threshold=0.1), PolicyKind.PATIENCE_REG, RuleFlag(0)),
        (eek.QExit(0.5, stochastic=True, seed=1), PolicyKind.QEXIT, RuleFlag.STOCHASTIC),
        (eek.Voting(2), PolicyKind.VOTING, RuleFlag(0)),
        (eek.DACT(), PolicyKind.DACT, RuleFlag(0)),
        (eek.Scheduled(torch.tensor([1, 2])), PolicyKind.SCHEDULED, RuleFlag(0)),
    ],
    ids=lambda value: repr(value) if isinstance(value, eek.ExitPolicy) else None,
)
def test_every_kernel_policy_lowers_once_to_its_kind_and_flags(policy, kind, flags):
    lowered = lower(policy)
    assert (lowered.kind, lowered.flags) == (kind, flags)
    assert cpp_backend.lower_policy(policy, 4).kind == kind  # the C++ ops take the same codes


def test_a_policy_no_kernel_runs_is_refused_by_name():
    with pytest.raises(TypeError, match="MultiLabelConfidence"):
        lower(eek.MultiLabelConfidence(0.9))


def test_what_no_kernel_lowers_runs_on_the_reference_step_inside_every_backend():
    from earlyexit_kernels.backends.reference_rules import runs_on_reference

    assert runs_on_reference(eek.MultiLabelConfidence(0.9)) and runs_on_reference(eek.ScoreBand(low=0.0))
    assert not any(runs_on_reference(policy) for policy in (eek.Entropy(0.3), eek.Patience(2), eek.DACT()))
