"""Which submitted sequences the continuous engine embeds next: the admission order.

The scheduler decides *how many* sequences to admit (:class:`~earlyexit_kernels.engine.engines.continuous.scheduler.Admit`);
:class:`PendingQueue` decides *which*. ``"fifo"``: the oldest. ``"length"``: a sweep over lengths,
ascending, wrapping to the shortest, so that sequences admitted together have similar lengths and
the layer queues hold runs of similar lengths to batch; a sweep takes only what was pending when
it began, so a stream of one length cannot hold the sweep where it is.

Bounded waiting (:mod:`earlyexit_kernels.engine.stream.aging`): each entry holds its submission on the
scheduler's clock; :meth:`PendingQueue.take` takes the overdue ones first, oldest first, whatever
the order, and :meth:`PendingQueue.oldest` says when the earliest pending one was submitted.

An entry is the plain tuple ``(length, arrival, key, input_ids, token_type_ids, submitted,
submitted_at)`` (``submitted``: the scheduler's clock; ``submitted_at``: ``time.perf_counter()``,
for the queue time): a tuple of untracked values (ints, floats, numpy arrays, a key that is an int or a string) leaves the garbage
collector's lists at its first pass, where a long read-ahead of objects it tracks would make
every full collection longer and more frequent.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
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
        # (arrival, submitted) of every entry, in arrival order; an arrival no longer in _pending_arrivals is stale
        self._by_arrival: deque[tuple[int, int]] = deque()
        self._pending_arrivals: set[int] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._entries)

    def add(self, key, input_ids, token_type_ids, submitted: int = 0, submitted_at: float = 0.0) -> None:
        """Queue one sequence (its token ids and token types, numpy arrays, or None for the types),
        submitted at clock ``submitted`` (the scheduler's layer calls) and time ``submitted_at``."""
        arrival = self._next_arrival
        entry = (len(input_ids), arrival, key, input_ids, token_type_ids, submitted, submitted_at)
        self._next_arrival += 1
        self._by_arrival.append((arrival, submitted))
        self._pending_arrivals.add(arrival)
        if self.order == "length" and self._entries and entry < self._entries[-1]:
            self._sorted = False
        self._entries.append(entry)

    def remove(self, keys: set) -> int:
        """Drop the entries with these keys; returns how many were dropped."""
        before = len(self._entries)
        kept = []
        for entry in self._entries:
            if entry[2] in keys:
                self._pending_arrivals.discard(entry[1])
            else:
                kept.append(entry)
        self._entries = kept
        self._forget_stale()
        return before - len(self._entries)

    def oldest(self) -> int | None:
        """The submission clock of the earliest submitted entry, or None when none is pending."""
        by_arrival = self._by_arrival
        while by_arrival and by_arrival[0][0] not in self._pending_arrivals:
            by_arrival.popleft()
        return by_arrival[0][1] if by_arrival else None

    def take(self, count: int, overdue_from: int | None = None, fits=None) -> list[tuple]:
        """The next ``count`` entries (or all, where fewer are pending), removed from the queue.

        ``overdue_from``: entries submitted at this clock or before are overdue and taken first,
        oldest first (fifo takes the oldest first anyway). ``fits``: ``fits(lengths) -> k``, how many
        of the next ``count`` entries' lengths (in the order they would be taken) to take: the first
        ``k`` are taken and the others stay, as if ``count`` had been ``k`` (a token budget)."""
        taken = self._take(count, overdue_from, fits)
        for entry in taken:
            self._pending_arrivals.discard(entry[1])
        self._forget_stale()
        return taken

    def _forget_stale(self) -> None:
        """Drop the arrivals no longer pending from ``_by_arrival``, so that it holds O(pending) entries
        whether or not an age rule ever asks for the oldest: the front as :meth:`oldest` does, and the
        whole deque once stale entries are most of it (amortized O(1) a sequence)."""
        by_arrival, pending = self._by_arrival, self._pending_arrivals
        while by_arrival and by_arrival[0][0] not in pending:
            by_arrival.popleft()
        if len(by_arrival) > 2 * len(pending) + 64:
            self._by_arrival = deque(item for item in by_arrival if item[0] in pending)

    def _take(self, count: int, overdue_from: int | None, fits=None) -> list[tuple]:
        if self.order == "fifo":
            if fits is not None:
                count = _fitting(fits, [entry[0] for entry in self._entries[:count]])
            taken, self._entries = self._entries[:count], self._entries[count:]
            return taken
        if not self._sorted:  # a sorted run and the submissions since: timsort merges them
            self._entries.sort()
            self._sorted = True
        pending = self._entries
        chosen: list[int] = []  # positions in pending, in the order taken
        if overdue_from is not None and (oldest := self.oldest()) is not None and oldest <= overdue_from:
            overdue = sorted((entry[1], position) for position, entry in enumerate(pending) if entry[5] <= overdue_from)
            chosen = [position for _, position in overdue[:count]]
        overdue_taken, taken_overdue = len(chosen), set(chosen)
        start = bisect_left(pending, (self._sweep[0], self._sweep[1] + 1))
        for position in range(start, len(pending)):
            if len(chosen) == count:
                break
            if pending[position][1] < self._cutoff and position not in taken_overdue:
                chosen.append(position)
        wrapped = None  # how many were chosen when the sweep wrapped to the shortest
        if len(chosen) < count:  # the sweep is over: the next one begins at the shortest
            wrapped = len(chosen)
            in_sweep = set(chosen)
            for position in range(len(pending)):
                if len(chosen) == count:
                    break
                if position not in in_sweep:
                    chosen.append(position)
        if fits is not None:
            chosen = chosen[: _fitting(fits, [pending[position][0] for position in chosen])]
        if wrapped is not None and (len(chosen) > wrapped or len(chosen) == len(pending)):
            self._cutoff = self._next_arrival
        if len(chosen) > overdue_taken:  # the sweep goes on from the last it took
            self._sweep = pending[chosen[-1]][:2]
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
        return taken


def _fitting(fits, lengths: list[int]) -> int:
    """``fits(lengths)``, checked: between 1 and ``len(lengths)`` (0 where nothing is offered)."""
    if not lengths:
        return 0
    k = fits(lengths)
    if not isinstance(k, int) or not 1 <= k <= len(lengths):
        raise ValueError(
            f"fits must return how many of the {len(lengths)} lengths to take (1..{len(lengths)}), got {k!r}"
        )
    return k
