"""The continuous engine's scheduling policy: which layer runs next, on which rows, in which shape.

Pure bookkeeping on the host, no tensors: the runner (:mod:`earlyexit_kernels.engine.continuous`)
executes what this module hands it and reports back which rows go on to which layer.

Every sequence in flight waits in the queue of the next layer it has to run, sorted
by length. A layer call takes consecutive rows of one sorted queue (a *window*) and pads
them to a shape from two fixed sets (:class:`ShapeBuckets`): a row count and a padded
length, the bucket of the window's longest row. So rows taken together have similar
lengths and padding is only what their bucket needs. A window's *token fill* is its real
tokens over the slots of a full call at its padded length (``capacity x length``): it
counts both missing rows and padding.

The rule, applied before every layer call (:meth:`LayerScheduler.decide`):

1. **Overdue first.** When the row that has waited longest in its queue has waited
   ``max_wait`` layer calls or more, the next call is its layer and its bucket: the row,
   the rows of its bucket just longer than it, then shorter ones.
2. **The deepest full call.** Otherwise, from the last layer down, the first layer
   with a full window (``capacity`` rows) whose token fill is at least
   ``min_token_fill``; the best such window of that layer. Deep layers first keep the
   number of sequences in flight low and let them leave soonest.
3. **Admit.** Otherwise, while there is input and fewer than ``max_in_flight``
   sequences are in flight, new sequences are embedded into layer 1 (up to the room
   left), and the rule starts again.
4. **The fullest call.** Otherwise (input drained, or memory full) the window with the
   largest token fill over all layers, the deepest on ties.

Guarantees. Every call runs at least one row, so the stream drains. A row waits at
most ``max_wait + max_in_flight`` layer calls in a queue (:attr:`LayerScheduler.wait_bound`):
once overdue, each call serves the oldest overdue row, and only the rows that entered
their queue before it (fewer than ``max_in_flight``) can be served first. At most
``max_in_flight`` sequences are in flight.
"""

from __future__ import annotations

import math
from bisect import insort
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = ["Admit", "Call", "LayerScheduler", "ShapeBuckets"]


def _row_counts(max_batch_size: int) -> tuple[int, ...]:
    counts = [c for c in (1, 2, 4, 8, 16, 32) if c < max_batch_size]
    counts += list(range(48, max_batch_size, 16))
    return tuple(counts) + (max_batch_size,)


@dataclass(frozen=True)
class ShapeBuckets:
    """The fixed shapes of a layer call: row counts and padded lengths.

    Row counts: 1, 2, 4, 8, 16, 32, then every multiple of 16, up to ``max_batch_size``
    (always included). Padded lengths: every multiple of ``length_step`` up to
    ``max_length`` (always included). ``max_tokens`` (optional) caps rows x padded
    length of a call, like serving systems' ``max_batch_tokens``.
    """

    max_batch_size: int
    max_length: int
    length_step: int = 16
    max_tokens: int | None = None
    row_counts: tuple[int, ...] = field(init=False)
    lengths: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        for name in ("max_batch_size", "max_length", "length_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_tokens is not None:
            if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
                raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
            if self.max_tokens < self.max_length:
                raise ValueError(
                    f"max_tokens={self.max_tokens} cannot hold one sequence of max_length={self.max_length}; "
                    f"raise max_tokens or lower max_length"
                )
        object.__setattr__(self, "row_counts", _row_counts(self.max_batch_size))
        lengths = tuple(range(self.length_step, self.max_length, self.length_step)) + (self.max_length,)
        object.__setattr__(self, "lengths", lengths)

    def padded_length(self, length: int) -> int:
        """The smallest padded length that holds ``length`` tokens."""
        if not 1 <= length <= self.max_length:
            raise ValueError(f"a sequence of {length} tokens does not fit 1..max_length={self.max_length}")
        return min(math.ceil(length / self.length_step) * self.length_step, self.max_length)

    def padded_rows(self, rows: int) -> int:
        """The smallest row count that holds ``rows`` rows."""
        return next(c for c in self.row_counts if c >= rows)

    def capacity(self, padded_length: int) -> int:
        """Rows a call padded to ``padded_length`` may take: a row count within ``max_tokens``."""
        limit = self.max_batch_size
        if self.max_tokens is not None:
            limit = min(limit, self.max_tokens // padded_length)
        return max(c for c in self.row_counts if c <= max(limit, 1))


@dataclass(frozen=True)
class Call:
    """One layer call: run 1-based ``layer`` on ``rows``, padded to ``padded_rows`` x ``padded_length``."""

    layer: int
    padded_length: int
    rows: tuple[int, ...]
    padded_rows: int


@dataclass(frozen=True)
class Admit:
    """Embed up to ``count`` new sequences into layer 1."""

    count: int


class _Waiting(NamedTuple):  # a tuple: sorted by (length, arrival) with C comparisons
    length: int
    since: int  # the layer call count when the row entered its queue
    row: int


@dataclass
class _Window:
    """A call at one layer: rows ``[start, end)`` of its length-sorted queue."""

    start: int
    end: int
    padded_length: int
    score: float  # real tokens / (capacity x padded length)


@dataclass
class _Choices:
    """The best call at one layer (``best``) and its best full call meeting ``min_token_fill`` (or None)."""

    best: _Window
    full: _Window | None
    oldest: int  # position of the row that has waited longest
    since: int  # when it entered the queue


class LayerScheduler:
    """One length-sorted queue per layer; :meth:`decide` applies the rule of the module docstring.

    Rows are the runner's integers (its slots). ``add`` puts a new sequence into
    layer 1, ``requeue`` a survivor into the next layer it must run, ``release`` frees
    a sequence that left. The runner calls :meth:`decide` until it returns None.

    ``max_wait`` defaults to ``4 * num_layers * (max_in_flight // max_batch_size)``
    layer calls: about four passes of every sequence in flight through every layer.
    """

    def __init__(
        self,
        num_layers: int,
        buckets: ShapeBuckets,
        max_in_flight: int,
        max_wait: int | None = None,
        min_token_fill: float = 0.85,
    ):
        if not isinstance(max_in_flight, int) or max_in_flight < buckets.max_batch_size:
            raise ValueError(
                f"max_in_flight must be an integer >= max_batch_size={buckets.max_batch_size}, got {max_in_flight!r}"
            )
        if not 0.0 < min_token_fill <= 1.0:
            raise ValueError(f"min_token_fill must lie in (0, 1], got {min_token_fill!r}")
        self.num_layers = num_layers
        self.buckets = buckets
        self.max_in_flight = max_in_flight
        self.max_wait = 4 * num_layers * (max_in_flight // buckets.max_batch_size) if max_wait is None else max_wait
        if self.max_wait < 1:
            raise ValueError(f"max_wait must be >= 1, got {self.max_wait!r}")
        self.min_token_fill = min_token_fill
        # queues[layer]: the rows waiting for that layer, sorted by (length, arrival)
        self._queues: list[list[_Waiting]] = [[] for _ in range(num_layers + 1)]
        self._choices: list[_Choices | None] = [None] * (num_layers + 1)  # cached per layer, None when stale
        lengths = range(buckets.max_length + 1)
        self._padded = np.array([buckets.padded_length(max(n, 1)) for n in lengths])  # by a row's length
        self._capacity = np.array([buckets.capacity(p) for p in self._padded])
        self.in_flight = 0
        self.calls = 0

    @property
    def wait_bound(self) -> int:
        """The most layer calls a row can wait in one queue."""
        return self.max_wait + self.max_in_flight

    @property
    def room(self) -> int:
        return self.max_in_flight - self.in_flight

    def waiting(self, layer: int) -> int:
        return len(self._queues[layer])

    def add(self, row: int, length: int) -> None:
        """A new sequence of ``length`` tokens enters layer 1."""
        if self.in_flight >= self.max_in_flight:
            raise RuntimeError("LayerScheduler.add: max_in_flight sequences are already in flight")
        self.in_flight += 1
        self.requeue(row, 1, length)

    def requeue(self, row: int, layer: int, length: int) -> None:
        """``row`` (``length`` tokens) waits for 1-based ``layer``."""
        self.buckets.padded_length(length)  # validates the length
        insort(self._queues[layer], _Waiting(length, self.calls, row))
        self._choices[layer] = None

    def release(self, row: int) -> None:
        """``row`` left the encoder."""
        self.in_flight -= 1

    def discard(self, rows) -> int:
        """Remove waiting ``rows`` (e.g. a client went away) and release them; returns how many were found."""
        rows = set(rows)
        found = 0
        for layer, queue in enumerate(self._queues):
            kept = [w for w in queue if w.row not in rows]
            if len(kept) != len(queue):
                found += len(queue) - len(kept)
                self._queues[layer] = kept
                self._choices[layer] = None
        self.in_flight -= found
        return found

    def decide(self, can_admit: bool) -> Call | Admit | None:
        """The next action: a :class:`Call`, an :class:`Admit` (only with ``can_admit``), or None when idle."""
        layers = [(layer, self._layer_choices(layer)) for layer in range(self.num_layers, 0, -1) if self._queues[layer]]
        if not layers:
            return Admit(self.room) if can_admit and self.room > 0 else None
        layer, oldest = min(layers, key=lambda lc: lc[1].since)
        if self.calls - oldest.since >= self.max_wait:
            return self._take(layer, self._around(layer, oldest.oldest))
        for layer, choices in layers:
            if choices.full is not None:
                return self._take(layer, choices.full)
        if can_admit and self.room > 0:
            return Admit(self.room)
        layer, choices = max(layers, key=lambda lc: lc[1].best.score)  # max keeps the first (deepest) on ties
        return self._take(layer, choices.best)

    def _around(self, layer: int, position: int) -> _Window:
        """A call for the overdue row at ``position``: its bucket's rows just above it, then shorter ones."""
        queue = self._queues[layer]
        length = queue[position].length
        padded_length, capacity = int(self._padded[length]), int(self._capacity[length])
        end = position + 1
        while end < len(queue) and end - position < capacity and queue[end].length <= padded_length:
            end += 1
        return _Window(max(0, end - capacity), end, padded_length, 0.0)

    def _layer_choices(self, layer: int) -> _Choices:
        """Every window of ``capacity`` consecutive rows of the sorted queue, scored; cached until it changes."""
        if self._choices[layer] is not None:
            return self._choices[layer]
        queue = self._queues[layer]
        lengths = np.fromiter((w.length for w in queue), dtype=np.int64, count=len(queue))
        since = np.fromiter((w.since for w in queue), dtype=np.int64, count=len(queue))
        prefix = np.concatenate([[0], np.cumsum(lengths)])
        # The window ending at row end - 1 is padded to that row's bucket (the queue is sorted).
        ends = np.arange(1, len(queue) + 1)
        padded, capacity = self._padded[lengths], self._capacity[lengths]
        starts = np.maximum(0, ends - capacity)
        scores = (prefix[ends] - prefix[starts]) / (capacity * padded)
        full_scores = np.where((ends - starts == capacity) & (scores >= self.min_token_fill), scores, -1.0)

        def window(i: int) -> _Window:
            return _Window(int(starts[i]), int(ends[i]), int(padded[i]), float(scores[i]))

        last = len(queue) - 1  # on ties, the window of the longest rows
        best = window(last - int(np.argmax(scores[::-1])))
        full_at = last - int(np.argmax(full_scores[::-1]))
        full = window(full_at) if full_scores[full_at] >= 0 else None
        oldest = int(np.argmin(since))
        self._choices[layer] = _Choices(best, full, oldest, int(since[oldest]))
        return self._choices[layer]

    def _take(self, layer: int, window: _Window) -> Call:
        queue = self._queues[layer]
        rows = tuple(w.row for w in queue[window.start : window.end])
        del queue[window.start : window.end]
        self._choices[layer] = None
        self.calls += 1
        return Call(layer, window.padded_length, rows, self.buckets.padded_rows(len(rows)))
