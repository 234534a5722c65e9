"""Which submitted sequences the continuous engine embeds next: the admission order.

The scheduler decides *how many* sequences to admit (:class:`~earlyexit_kernels.engine.scheduler.Admit`);
:class:`PendingQueue` decides *which*. ``"fifo"``: the oldest. ``"length"``: a sweep over lengths,
ascending, wrapping to the shortest, so that sequences admitted together have similar lengths and
the layer queues hold runs of similar lengths to batch; a sweep takes only what was pending when
it began, so a stream of one length cannot hold the sweep where it is.

An entry is the plain tuple ``(length, arrival, key, input_ids, token_type_ids)``: a tuple of
untracked values (ints, numpy arrays, a key that is an int or a string) leaves the garbage
collector's lists at its first pass, where a long read-ahead of objects it tracks would make
every full collection longer and more frequent.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

__all__ = ["ADMISSION_ORDERS", "PendingQueue"]

ADMISSION_ORDERS = ("fifo", "length")


class PendingQueue:
    """Sequences submitted and not embedded yet, taken in the ``order`` chosen (``"fifo"`` or ``"length"``)."""

    def __init__(self, order: str = "fifo"):
        if order not in ADMISSION_ORDERS:
            raise ValueError(f"admission must be 'fifo' or 'length', got {order!r}")
        self.order = order
        self._entries: list[tuple] = []
        # "length": whether _entries is in order. Sorted when sequences are taken, not at each
        # submission: inserting in order moves half the list each time, quadratic in a long read-ahead.
        self._sorted = True
        self._next_arrival = 0
        # "length": (length, arrival) of the last sequence taken, and the arrivals the sweep takes
        self._sweep, self._cutoff = (0, -1), 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._entries)

    def add(self, key, input_ids, token_type_ids) -> None:
        """Queue one sequence (its token ids and token types, numpy arrays, or None for the types)."""
        entry = (len(input_ids), self._next_arrival, key, input_ids, token_type_ids)
        self._next_arrival += 1
        if self.order == "length" and self._entries and entry < self._entries[-1]:
            self._sorted = False
        self._entries.append(entry)

    def remove(self, keys: set) -> int:
        """Drop the entries with these keys; returns how many were dropped."""
        before = len(self._entries)
        self._entries = [entry for entry in self._entries if entry[2] not in keys]
        return before - len(self._entries)

    def take(self, count: int) -> list[tuple]:
        """The next ``count`` entries (or all, where fewer are pending), removed from the queue."""
        if self.order == "fifo":
            taken, self._entries = self._entries[:count], self._entries[count:]
            return taken
        if not self._sorted:  # a sorted run and the submissions since: timsort merges them
            self._entries.sort()
            self._sorted = True
        pending = self._entries
        start = bisect_left(pending, (self._sweep[0], self._sweep[1] + 1))
        chosen: list[int] = []  # positions in pending, in the order taken
        for position in range(start, len(pending)):
            if pending[position][1] < self._cutoff:
                chosen.append(position)
                if len(chosen) == count:
                    break
        if len(chosen) < count:  # the sweep is over: the next one begins at the shortest
            self._cutoff = self._next_arrival
            in_sweep = set(chosen)
            for position in range(len(pending)):
                if position not in in_sweep:
                    chosen.append(position)
                    if len(chosen) == count:
                        break
        taken = [pending[position] for position in chosen]
        # Deleted as contiguous runs, from the last: the sweep takes a run or two of the sorted list.
        runs: list[list[int]] = []
        for position in sorted(chosen):
            if runs and runs[-1][1] == position:
                runs[-1][1] += 1
            else:
                runs.append([position, position + 1])
        for begin, end in reversed(runs):
            del pending[begin:end]
        if taken:
            self._sweep = taken[-1][:2]
        return taken
