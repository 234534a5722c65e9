"""Which engine runs a stream of sequences, chosen once per call: the continuous engine or the cohort engine.

The continuous engine (:mod:`earlyexit_kernels.engine.engines.continuous`) refills every layer call from
per-layer queues; on a CPU a call costs its rows, and that pays. On a GPU a call costs launches
and syncs: there the cohort engine (:mod:`earlyexit_kernels.engine.engines.cohort_engine`) runs
length-sorted cohorts through the graphed step, read back a cohort late. ``"auto"`` takes the
cohort engine where the model runs on CUDA on the graphed step (with ``compile`` or ``packed``,
which only the continuous engine has, the continuous engine). ``"segments"``
(:mod:`earlyexit_kernels.engine.engines.segments`, E3's layer segments, each refilled to the token
budget) is only ever chosen by name: it becomes ``"auto"``'s choice only once a GPU measures it
faster than the cohorts. ``"varlen"`` (:mod:`earlyexit_kernels.engine.engines.varlen`, cohorts of
packed tokens with varlen attention) likewise.

:func:`choose_engine` reads the model's patched record and resolves its step once; the
:class:`~earlyexit_kernels.engine.stream.engine_config.EngineChoice` it returns is handed to the engine,
which reads neither again.
"""

from __future__ import annotations

from earlyexit_kernels.engine.step.patched_state import patched_state
from earlyexit_kernels.engine.step.step_choice import resolve_step
from earlyexit_kernels.engine.stream.engine_config import EngineChoice, EngineConfig

__all__ = ["choose_engine", "engine_kind", "make_engine"]


def choose_engine(model, config: EngineConfig, needed_by: str = "the stream engine") -> EngineChoice:
    """The engine ``config.engine`` names for ``model``, ``"auto"`` resolved, with the model's step and record
    (``needed_by``: who asks, in the error for a model nobody patched)."""
    state = patched_state(model, needed_by)
    device = next(model.parameters()).device
    step = resolve_step(state.step, state.policy, device)
    if config.engine != "auto":
        kind = config.engine
    elif config.compile or config.packed:
        kind = "continuous"
    else:
        kind = "cohorts" if device.type == "cuda" and step == "graphed" else "continuous"
    return EngineChoice(kind, step, state)


def engine_kind(model, config: EngineConfig) -> str:
    """``"continuous"``, ``"cohorts"``, ``"segments"`` or ``"varlen"``: ``config.engine``, with ``"auto"`` resolved for ``model``."""
    return choose_engine(model, config).kind


def make_engine(model, config: EngineConfig, choice: EngineChoice | None = None):
    """The engine ``choice`` names (by default :func:`choose_engine`'s for ``config``), built on ``model``."""
    if choice is None:
        choice = choose_engine(model, config)
    if choice.kind == "varlen":
        from earlyexit_kernels.engine.engines.varlen.engine import VarlenEngine

        return VarlenEngine(model, config, choice=choice)
    if choice.kind == "segments":
        from earlyexit_kernels.engine.engines.segments.engine import SegmentEngine

        return SegmentEngine(model, config, choice=choice)
    if choice.kind == "cohorts":
        from earlyexit_kernels.engine.engines.cohort_engine import CohortEngine

        return CohortEngine(model, config, choice=choice)
    from earlyexit_kernels.engine.engines.continuous.engine import ContinuousEngine

    return ContinuousEngine(model, config, choice=choice)
