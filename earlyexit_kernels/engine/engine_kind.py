"""Which engine runs a stream of sequences: the continuous engine or the cohort engine.

The continuous engine (:mod:`earlyexit_kernels.engine.continuous`) refills every layer call from
per-layer queues; on a CPU a call costs its rows, and that pays. On a GPU a call costs launches
and syncs: there the cohort engine (:mod:`earlyexit_kernels.engine.cohort_engine`) runs
length-sorted cohorts through the graphed step, read back a cohort late. ``"auto"`` takes the
cohort engine where the model runs on CUDA on the graphed step (with ``compile`` or ``packed``,
which only the continuous engine has, the continuous engine). ``"segments"``
(:mod:`earlyexit_kernels.engine.segment_engine`, E3's layer segments, each refilled to the token
budget) is only ever chosen by name: it becomes ``"auto"``'s choice only once a GPU measures it
faster than the cohorts. ``"varlen"`` (:mod:`earlyexit_kernels.engine.varlen_engine`, cohorts of
packed tokens with varlen attention) likewise.
"""

from __future__ import annotations

from earlyexit_kernels.engine.engine_config import EngineConfig
from earlyexit_kernels.engine.patched_state import patched_state
from earlyexit_kernels.engine.step_choice import resolve_step

__all__ = ["engine_kind", "make_engine"]


def engine_kind(model, config: EngineConfig) -> str:
    """``"continuous"``, ``"cohorts"``, ``"segments"`` or ``"varlen"``: ``config.engine``, with ``"auto"`` resolved for ``model``."""
    if config.engine != "auto":
        return config.engine
    if config.compile or config.packed:
        return "continuous"
    state = patched_state(model, "the stream engine")
    device = next(model.parameters()).device
    graphed = resolve_step(state.step, state.policy, device) == "graphed"
    return "cohorts" if device.type == "cuda" and graphed else "continuous"


def make_engine(model, config: EngineConfig):
    """The engine ``config`` asks for (:func:`engine_kind`), built on ``model``."""
    kind = engine_kind(model, config)
    if kind == "varlen":
        from earlyexit_kernels.engine.varlen_engine import VarlenEngine

        return VarlenEngine(model, config)
    if kind == "segments":
        from earlyexit_kernels.engine.segment_engine import SegmentEngine

        return SegmentEngine(model, config)
    if kind == "cohorts":
        from earlyexit_kernels.engine.cohort_engine import CohortEngine

        return CohortEngine(model, config)
    from earlyexit_kernels.engine.continuous import ContinuousEngine

    return ContinuousEngine(model, config)
