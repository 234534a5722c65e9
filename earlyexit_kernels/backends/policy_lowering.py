"""Every exit policy lowered to the codes the kernels take: one enum for C++, CUDA and Triton.

A fused kernel does not see a policy object: it sees a rule kind, flag bits, one integer
parameter, one scalar, per-layer thresholds and temperatures, and the names of the state
tensors it reads and writes. This module is the only place that maps a policy class to
them. ``PolicyKind`` and ``RuleFlag`` mirror ``enum Kind`` and ``enum Flag`` in
``csrc/common/exit_rule.h`` (``python_tests/test_policy_lowering.py`` reads the header and
fails when they disagree); the Triton kernels take the same values as constexprs.

Adding a policy to the kernels: its rule in ``csrc/common/exit_rule.h`` and the Triton decision
(``triton_kernels/exit_decide.py``), and its entry here; a policy without one runs on the
reference step inside every backend.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

from earlyexit_kernels.methods.policies import (
    DACT,
    Entropy,
    ExitPolicy,
    MaxProb,
    Patience,
    QExit,
    Scheduled,
    SkipGates,
    Voting,
)

__all__ = ["PolicyKind", "RuleFlag", "LoweredPolicy", "KERNEL_POLICIES", "lowers", "lower"]


class PolicyKind(enum.IntEnum):
    """The rule a kernel applies (``eek::Kind``)."""

    ENTROPY = 0  # Entropy and SkipGates (the exit part)
    MAXPROB = 1
    PATIENCE = 2  # classification
    PATIENCE_REG = 3  # regression (one output)
    QEXIT = 4
    VOTING = 5
    DACT = 6
    SCHEDULED = 7


class RuleFlag(enum.IntFlag):
    """Bits a policy sets in the kernels' ``flags`` (``eek::Flag``); each backend adds its own above them."""

    NORMALIZED = 1  # entropy divided by ln C
    TEMPERATURE = 2  # MaxProb divides the logits by the layer's temperature
    STOCHASTIC = 4  # QExit exits with probability lambda (reads the uniforms)


# The state tensors each kind reads and writes, in the order of the kernels' state arguments.
STATE_KEYS: dict[PolicyKind, tuple[tuple[str, ...], tuple[str, ...]]] = {
    PolicyKind.ENTROPY: ((), ()),
    PolicyKind.MAXPROB: ((), ()),
    PolicyKind.PATIENCE: (("prev_pred", "counter"), ("prev_pred", "counter")),
    PolicyKind.PATIENCE_REG: (("prev_value", "counter"), ("prev_value", "counter")),
    PolicyKind.QEXIT: (("cdf", "remaining"), ("cdf", "remaining")),
    PolicyKind.VOTING: (("votes", "prob_sum"), ("votes", "prob_sum")),
    PolicyKind.DACT: (("accumulated", "pi"), ("accumulated", "pi")),
    PolicyKind.SCHEDULED: (("exit_layers",), ()),
}


@dataclass(frozen=True)
class LoweredPolicy:
    """One policy as every kernel takes it.

    ``threshold`` and ``temperature`` are as the policy holds them: a float, a per-layer tuple,
    or None where the kind has none. ``aux_key`` names the one extra state input a kind reads
    whole (``uniforms`` for a stochastic QExit, ``exit_layers`` for Scheduled), or None.
    """

    kind: PolicyKind
    flags: RuleFlag
    int_param: int  # Patience: patience; Voting: min_votes
    scalar: float  # QExit: q; Patience on a regression head: regression_threshold
    threshold: float | tuple[float, ...] | None
    temperature: float | tuple[float, ...] | None
    state_in: tuple[str, ...]
    state_out: tuple[str, ...]
    aux_key: str | None


#: the policies the kernels run; every other runs on the reference step inside any backend
#: (:mod:`earlyexit_kernels.backends.reference_rules`)
KERNEL_POLICIES = (Entropy, SkipGates, MaxProb, Patience, QExit, Voting, DACT, Scheduled)


def lowers(policy: ExitPolicy) -> bool:
    """Whether the kernels run ``policy`` (else a fast backend runs it with the reference step)."""
    return isinstance(policy, KERNEL_POLICIES)


@functools.lru_cache(maxsize=256)
def lower(policy: ExitPolicy) -> LoweredPolicy:
    """``policy`` as the kernels take it; each backend lays the per-layer values out for its model."""
    flags, int_param, scalar = RuleFlag(0), 0, 0.0
    threshold = temperature = aux_key = None
    if isinstance(policy, (Entropy, SkipGates)):
        kind = PolicyKind.ENTROPY
        threshold = policy.threshold if isinstance(policy, Entropy) else policy.entropy_threshold
        flags |= RuleFlag.NORMALIZED if policy.normalized else 0
    elif isinstance(policy, MaxProb):
        kind, threshold, temperature = PolicyKind.MAXPROB, policy.threshold, policy.temperature
        flags |= RuleFlag.TEMPERATURE if policy.temperature is not None else 0
    elif isinstance(policy, Patience):
        int_param = policy.patience
        if policy.is_regression:
            kind, scalar = PolicyKind.PATIENCE_REG, policy.regression_threshold
        else:
            kind = PolicyKind.PATIENCE
    elif isinstance(policy, QExit):
        kind, scalar = PolicyKind.QEXIT, policy.q
        if policy.stochastic:
            flags |= RuleFlag.STOCHASTIC
            aux_key = "uniforms"
    elif isinstance(policy, Voting):
        kind, int_param = PolicyKind.VOTING, policy.min_votes
    elif isinstance(policy, DACT):
        kind = PolicyKind.DACT
    elif isinstance(policy, Scheduled):
        kind, aux_key = PolicyKind.SCHEDULED, "exit_layers"
    else:
        raise TypeError(f"unknown exit policy {type(policy).__name__}")
    state_in, state_out = STATE_KEYS[kind]
    return LoweredPolicy(
        kind, flags, int(int_param), float(scalar), threshold, temperature, state_in, state_out, aux_key
    )
