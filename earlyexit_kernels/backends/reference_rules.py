"""Rules the fast kernels do not lower run on the reference step, inside any backend.

The policies :mod:`earlyexit_kernels.backends.policy_lowering` does not lower
(``MultiLabelConfidence`` and ``ScoreBand``: state-free comparisons of the logits with a
threshold, and any new policy until the kernels learn it) have no kernel code. A fast
backend registered through :func:`earlyexit_kernels.backends.registry.register_backend`
is wrapped here: for these policies each of its per-layer functions runs the
plain-PyTorch functions of :mod:`earlyexit_kernels.methods.exit_rules` and
:mod:`earlyexit_kernels.backends.write_back` (the head as ``F.linear``, the rule, the
write-back), so the decisions and logits are the reference's exactly; every other
policy goes to the backend's kernels unchanged. The compaction gather stays the
backend's own.
"""

from __future__ import annotations

import dataclasses
import functools

from earlyexit_kernels.backends import pooled_head, write_back
from earlyexit_kernels.backends.policy_lowering import lowers
from earlyexit_kernels.methods import exit_rules

__all__ = ["runs_on_reference", "with_reference_rules"]

_REFERENCE = {
    "exit_step": exit_rules.exit_step,
    "head_exit_step": exit_rules.head_exit_step,
    "exit_step_write_back": write_back.exit_step_write_back,
    "head_exit_step_write_back": write_back.head_exit_step_write_back,
    "pooled_head_exit_step": pooled_head.pooled_head_exit_step,
    "pooled_head_exit_step_write_back": pooled_head.pooled_head_exit_step_write_back,
}


def runs_on_reference(policy) -> bool:
    """Whether a fast backend runs ``policy`` with the reference step (see the module docstring)."""
    return not lowers(policy)


def _routed(fast, reference):
    @functools.wraps(fast)
    def step(policy, *args, **kwargs):
        return (fast if lowers(policy) else reference)(policy, *args, **kwargs)

    step.fast = fast
    return step


def with_reference_rules(backend):
    """``backend`` (a :class:`earlyexit_kernels.backends.registry.Backend`) with its exit steps routed."""
    changes = {}
    for name, reference in _REFERENCE.items():
        fast = getattr(backend, name)
        if fast is not None and fast is not reference and not hasattr(fast, "fast"):
            changes[name] = _routed(fast, reference)
    return dataclasses.replace(backend, **changes)
