"""What each exit pattern of the suite is, in words, from its name (no torch).

:mod:`.patterns` builds the patterns; this says what one does at a batch size and depth, so that a
table or a summary never has to guess from the name: ``sched-f0.50`` on 12 layers is *every row
exits after layer 6*, not "half the rows leave". ``scripts/gpu_session_report.py`` loads this file
by its path (it reads CSVs without importing torch), so it imports nothing but the standard library.
"""

from __future__ import annotations

__all__ = ["scheduled_layers", "describe_pattern"]


def scheduled_layers(f: float, num_layers: int, batch: int) -> tuple[int, int]:
    """``(base, extra)`` of ``sched-f<f>``: every row exits after layer ``base``, ``extra`` of them one layer later.

    The budget ``round((1 - f) * L * B)`` clamped to ``B..L*B``, split as evenly as possible
    (:func:`earlyexit_kernels.bench.patterns.scheduled` builds it the same way).
    """
    total = min(max(round((1.0 - f) * num_layers * batch), batch), num_layers * batch)
    return divmod(total, batch)


def describe_pattern(name: str, num_layers: int, batch: int) -> str:
    """``name`` (``sched-f0.50``, ``geometric-p0.10``, ``padded-geometric``) in words, for ``L`` layers and ``B`` rows."""
    try:
        if name.startswith("sched-f"):
            base, extra = scheduled_layers(float(name.removeprefix("sched-f")), num_layers, batch)
            if base >= num_layers:
                return f"nobody exits early: every row runs all {num_layers} layers"
            if extra == 0:
                return f"every row exits after layer {base} of {num_layers}"
            return f"every row exits after layer {base} of {num_layers}, {extra} of the {batch} after layer {base + 1}"
        if name.startswith("geometric-p"):
            p = float(name.removeprefix("geometric-p"))
            return f"{p:.0%} of the rows still running exit after each layer, the rest after layer {num_layers}"
    except ValueError:
        return name
    if name == "padded-geometric":
        return (
            "mixed lengths (S/8 to S, right-padded), 10% of the rows still running exit after each layer, "
            "the longest first"
        )
    return name
