"""A layer-cost table: the time of one encoder layer at each row count, as measured, with its spread.

What :func:`earlyexit_kernels.bench.layer_costs.measure_layer_costs` measures and
:func:`earlyexit_kernels.engine.graphed.buckets.sizes_from_table` chooses the graphed step's bucket sizes
from. ``seconds[n]`` is the median over the repetitions of one call of the encoder layer on
``[n, seq_len, H]`` (one period of the layer types where they differ, ModernBERT's); ``spread[n]``
is the interquartile range of the same repetitions, the noise a difference between two row
counts must exceed to be believed. The rest says what was measured where: the device's name, the
dtype, the length, the hidden size, the model type, torch's version, whether the layer was captured
in a CUDA graph, the repetitions and the calls timed together in each.

Saved as JSON (row counts as string keys, as JSON has no other) and loaded back unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["LayerCostTable"]


@dataclass(frozen=True)
class LayerCostTable:
    """Seconds of one encoder layer call by row count (``seconds``), their interquartile range over
    the repetitions (``spread``), and where and how they were measured."""

    seconds: dict[int, float]
    spread: dict[int, float]
    seq_len: int
    device: str
    dtype: str
    torch: str
    model: str = ""
    hidden_size: int = 0
    padded: bool = False
    captured: bool = False  # each call a CUDA graph replay (the graphed step's way), else eager
    repeats: int = 0
    replays: int = 0  # calls timed back to back in one repetition, the time divided by them
    layers: int = 1  # encoder layers in one call (one period of the layer types)
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        if set(self.seconds) != set(self.spread):
            raise ValueError("a layer-cost table has a spread for every row count it times, and no other")
        if any(n < 1 for n in self.seconds):
            raise ValueError(f"row counts are 1 or more; got {sorted(self.seconds)[:3]}")

    @property
    def rows(self) -> tuple[int, ...]:
        """The row counts timed, ascending."""
        return tuple(sorted(self.seconds))

    def time(self, rows: int) -> float:
        """Seconds of one call at ``rows`` rows; a ``KeyError`` saying which counts exist where it was not timed."""
        try:
            return self.seconds[rows]
        except KeyError:
            raise KeyError(f"the layer-cost table has no time at {rows} rows; it timed {_ranges(self.rows)}") from None

    def to_json(self) -> str:
        data = asdict(self)
        data["seconds"] = {str(n): self.seconds[n] for n in self.rows}
        data["spread"] = {str(n): self.spread[n] for n in self.rows}
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LayerCostTable:
        data = json.loads(text)
        data["seconds"] = {int(n): float(t) for n, t in data["seconds"].items()}
        data["spread"] = {int(n): float(t) for n, t in data["spread"].items()}
        return cls(**data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> LayerCostTable:
        return cls.from_json(Path(path).read_text())


def _ranges(rows: tuple[int, ...]) -> str:
    """``1-16, 24, 32-40``: sorted counts as runs of consecutive ones."""
    runs: list[list[int]] = []
    for n in rows:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs) or "nothing"
