"""The stream engines' limits as one object, checked once where it is built, and the engine choice made from them.

``eek.classify``, the server (:class:`earlyexit_kernels.integrations.server.serve_settings.ServeSettings`)
and the engine thread each build an :class:`EngineConfig` once from their own options and hand
it on, as vLLM's command line builds one ``VllmConfig`` that every part reads. What can be
checked without the model is checked here; what needs it (the longest sequence its positions
hold, whether its layers can be packed or compiled) is checked by the engine that runs it: the continuous
engine (:mod:`earlyexit_kernels.engine.engines.continuous`), the cohort engine, the segment or the varlen
engine. Which of them runs, and on which step, is an :class:`EngineChoice`, made once per call by
:func:`earlyexit_kernels.engine.engines.choice.choose_engine` and handed down to the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from earlyexit_kernels.engine.stream.admission import ADMISSION_ORDERS
from earlyexit_kernels.engine.stream.aging import check_max_age

__all__ = ["ENGINE_KINDS", "EngineChoice", "EngineConfig", "engine_config"]

ENGINE_KINDS = ("auto", "continuous", "cohorts", "segments", "varlen")


def _option(help: str, metavar: str | None = None, *, none: str | None = None, choices=None) -> dict:
    """A field's command-line metadata: its help line, its metavar, what None means, its choices."""
    return {"help": help, "metavar": metavar, "none": none, "choices": choices}


def _whole(name: str, value, *, least: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What a stream engine runs under, each engine reading the limits it has (the continuous engine's docstring,
    :class:`~earlyexit_kernels.engine.engines.continuous.engine.ContinuousEngine`, says what each does; the cohort,
    segment and varlen engines refuse ``compile`` and ``packed``); ``None`` takes the default worked out from the model.

    ``max_batch_size``: most rows per layer call. ``max_tokens``: most rows x padded length per
    call. ``max_length``: longest sequence accepted. ``length_step``: the lengths calls are padded
    to the multiples of. ``max_in_flight``: most sequences embedded at a time. ``max_wait``: layer
    calls after which a waiting row is served first. ``compile``: layer calls through
    ``torch.compile`` (``True`` or a dict of its options). ``admission``: ``"fifo"`` or ``"length"``.
    ``call_cost``: a call's cost beyond its tokens, in tokens. ``packed``: ``None`` (where it pays),
    ``True`` or ``False``. ``max_age``: layer calls after which a sequence is served first,
    ``"auto"`` or ``None`` (off). ``engine``: which engine runs the stream
    (:mod:`earlyexit_kernels.engine.engines.choice`): ``"auto"`` (the cohort engine on CUDA where the
    model runs the graphed step, else the continuous engine), ``"continuous"``, ``"cohorts"`` or
    ``"segments"`` (opt-in: :mod:`earlyexit_kernels.engine.engines.segments.engine`, E3's segments) or ``"varlen"``
    (opt-in: :mod:`earlyexit_kernels.engine.engines.varlen.engine`, cohorts of packed tokens, varlen attention).
    ``segments``: how many segments of consecutive layers the segment engine splits the model into.
    ``max_batch_size`` None: the engine's own (64 rows for the continuous engine; for the cohort
    engine as many as ``max_tokens`` allows, up to 1,024).
    """

    # The fields with ``help`` in their metadata are command-line options of eek classify and eek serve
    # (earlyexit_kernels/integrations/cli_options.py): their help line, and what None means, once here.
    max_batch_size: int | None = field(
        default=64,
        metadata=_option("most rows per layer call", "N", none="64; on CUDA's cohort engine what --max-tokens allows"),
    )
    max_tokens: int | None = field(
        default=None,
        metadata=_option("most rows x padded length per layer call", "N", none="none; 16384 on CUDA's cohort engine"),
    )
    max_length: int | None = field(
        default=None,
        metadata=_option("most tokens per text; longer texts are truncated", "N", none="the model's positions"),
    )
    length_step: int | None = None
    max_in_flight: int | None = None
    max_wait: int | None = None
    compile: bool | dict = field(default=False, metadata=_option("run the layer calls through torch.compile"))
    admission: str = "fifo"
    call_cost: float | None = field(
        default=None,
        metadata=_option(
            "what a layer call costs beyond its tokens, in tokens, for the continuous engine's merges of waiting rows",
            "TOKENS",
            none="32 x (128 / hidden size)^2, measured on a CPU in float32",
        ),
    )
    packed: bool | None = None
    max_age: int | str | None = field(
        default="auto",
        metadata=_option(
            "bounded waiting: once a text has waited N layer calls since the engine took it, the oldest such runs "
            "next (admitted, or its layer call) whatever the batching order, so a text leaves within N + layers x n "
            "layer calls, n the texts taken no later and still there (docs/serving.md). 0: strictly oldest first; "
            "auto: 2 x the model's layers; off: no age rule (the batching order's own, looser bounds)",
            "auto|off|N",
            none="off",
        ),
    )
    engine: str = field(
        default="auto",
        metadata=_option(
            "which engine runs the stream: auto (the cohort engine on CUDA where the model runs the graphed step, "
            "else the continuous engine), continuous, cohorts, segments (opt-in, E3's layer segments) or varlen "
            "(opt-in, cohorts of packed tokens with varlen attention; docs/serving.md)",
            choices=ENGINE_KINDS,
        ),
    )
    segments: int | None = field(
        default=None,
        metadata=_option(
            "the segment engine's (engine segments) number of segments of consecutive layers, each refilled to "
            "the token budget from the rows leaving the one below",
            "N",
            none="3, equal thirds of the layers (one a layer, where the model has fewer)",
        ),
    )

    def __post_init__(self):
        _whole("max_batch_size", self.max_batch_size, optional=True)
        if self.engine not in ENGINE_KINDS:
            raise ValueError(f"engine must be {', '.join(map(repr, ENGINE_KINDS))}, got {self.engine!r}")
        for name in ("max_tokens", "max_length", "length_step", "max_in_flight"):
            _whole(name, getattr(self, name), optional=True)
        _whole("max_wait", self.max_wait, optional=True)
        if not isinstance(self.compile, bool | dict):
            raise ValueError(f"compile must be True, False or a dict of torch.compile's options, got {self.compile!r}")
        if self.admission not in ADMISSION_ORDERS:
            raise ValueError(f"admission must be {' or '.join(map(repr, ADMISSION_ORDERS))}, got {self.admission!r}")
        if self.call_cost is not None and (
            isinstance(self.call_cost, bool) or not isinstance(self.call_cost, int | float) or not self.call_cost >= 0
        ):
            raise ValueError(f"call_cost must be a number >= 0 (tokens) or None, got {self.call_cost!r}")
        if self.packed not in (None, True, False):
            raise ValueError(f"packed must be None (where it pays), True or False, got {self.packed!r}")
        check_max_age(self.max_age)
        _whole("segments", self.segments, optional=True)  # at most the model's layers: checked by the engine

    def replace(self, **changes) -> EngineConfig:
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)


def engine_config(config: EngineConfig | None, limits: dict) -> EngineConfig:
    """``config``, or one built from keyword ``limits`` (the engine's keyword arguments), not both."""
    if config is None:
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(limits) - names)
        if unknown:
            raise TypeError(f"unknown engine limit(s) {', '.join(unknown)}; the limits are {', '.join(sorted(names))}")
        return EngineConfig(**limits)
    if not isinstance(config, EngineConfig):
        raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
    if limits:
        raise TypeError(
            f"give an EngineConfig or keyword limits, not both (got config and {', '.join(sorted(limits))})"
        )
    return config


@dataclass(frozen=True, slots=True)
class EngineChoice:
    """Which engine runs a stream on a patched model, resolved once per call: ``kind`` (``"continuous"``,
    ``"cohorts"``, ``"segments"`` or ``"varlen"``), ``step`` (the model's step on its device, ``"exact"`` or
    ``"graphed"``) and ``state``, the model's patched record as read for it."""

    kind: str
    step: str
    state: object
