"""Which per-layer step a patched model runs: ``"exact"``, ``"graphed"`` or ``"auto"``.

- ``"exact"`` (:mod:`earlyexit_kernels.engine.step.batch_loop`): compact after every layer where rows
  may leave, with one read-back of the survivor count there. The fewest rows and tokens per layer.
- ``"graphed"`` (:mod:`earlyexit_kernels.engine.graphed.static_step`): fixed buckets, exited rows kept as
  dead rows, no read-back between the first layer and the last, each (layer, bucket) step captured
  in a CUDA graph on a GPU. Pays off where the host's work around a layer costs as much as the
  layer: a GPU.
- ``"auto"``: ``"graphed"`` on CUDA, ``"exact"`` elsewhere, and ``"exact"`` for a policy the
  graphed step cannot run.
"""

from __future__ import annotations

import torch

from earlyexit_kernels.methods.policies import ExitPolicy, SkipGates

__all__ = ["STEP_NAMES", "check_step_name", "graphed_refusal", "check_graphed_policy", "resolve_step"]

STEP_NAMES = ("auto", "exact", "graphed")


def check_step_name(step) -> None:
    if step not in STEP_NAMES:
        raise ValueError(f"step must be one of {', '.join(repr(s) for s in STEP_NAMES)}; got {step!r}")


def graphed_refusal(policy: ExitPolicy) -> str | None:
    """Why ``policy`` cannot run in the graphed step, or None where it can."""
    if isinstance(policy, SkipGates):
        return (
            "SkipGates runs each gated layer on the rows its gates keep, a number known only by reading "
            "it back at that layer; a fixed-shape step would run the layer on every row and lose what "
            "skipping saves"
        )
    return None


def check_graphed_policy(policy: ExitPolicy) -> None:
    reason = graphed_refusal(policy)
    if reason is not None:
        raise ValueError(
            f"step='graphed' cannot run {type(policy).__name__}: {reason}. Use step='exact' (or 'auto', "
            f"which picks it for this policy)"
        )


def resolve_step(step: str, policy: ExitPolicy, device: torch.device) -> str:
    """The step a forward on ``device`` runs: ``"exact"`` or ``"graphed"``."""
    if step == "auto":
        return "graphed" if device.type == "cuda" and graphed_refusal(policy) is None else "exact"
    return step
