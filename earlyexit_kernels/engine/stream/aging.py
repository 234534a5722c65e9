"""Bounded waiting: the continuous engine serves a sequence first once it is overdue.

Pure bookkeeping, no tensors: :class:`AgeRule` holds when each sequence in flight was
submitted, on the scheduler's clock (the layer calls run so far), and says what must run
next, if anything is overdue; :class:`~earlyexit_kernels.engine.engines.continuous.scheduler.LayerScheduler`
asks it before its own rule.

**The rule.** A sequence is *overdue* once ``max_age`` layer calls have run since it was
submitted. While any sequence is overdue, the oldest one (the earliest submitted; pending
or in flight) is served next: admitted if it is pending (the admission takes the overdue
sequences first, oldest first), else the layer call holding its row. Where it is pending
and there is no room in flight, the oldest sequence in flight runs instead, until one
leaves and makes room.

**The bound.** A sequence submitted at clock ``t`` has been admitted within ``n``
admissions after ``t + max_age`` and has left the encoder by clock ``t + max_age + L x n``
(``L`` the layers), where ``n`` counts the sequences submitted at clock ``t`` or earlier that
are still there at ``t + max_age`` (itself included: at most the sequences outstanding when it
was submitted; at concurrency ``C`` with one text per request, ``C``). From ``t + max_age`` on,
every layer call runs the oldest overdue row, one of those ``n``, one layer further (a
sequence runs at most ``L`` layers), and every admission takes the oldest pending one. Only
where ``max_in_flight`` sequences fill the engine while the oldest is pending do calls run a
younger row: the oldest in flight, which leaves within ``L`` calls and makes room; so
``t + max_age + 2 L x n`` where the engine can be full (not in ``eek serve`` while
``--max-queue`` is at most ``max_in_flight``, 16 x ``--max-batch-size``: as by default, 1024
and 64). In seconds: those calls times a call's duration (a call holds at most
``max_batch_size`` rows; a BERT layer on a few short rows takes milliseconds on a CPU thread),
plus one step: a server's engine thread takes a submitted sequence between two steps.

Without the rule (``max_age=None``, what ``eek.classify`` runs for throughput) the
scheduler's own bounds hold: a group waits at most ``max_wait + max_in_flight`` layer calls
in each queue, and a pending sequence at most the admission order's bound.
"""

from __future__ import annotations

import heapq
import itertools

__all__ = ["ADMIT_OVERDUE", "AgeRule", "check_max_age", "default_max_age", "parse_max_age"]

ADMIT_OVERDUE = "admit"  # AgeRule.next_overdue's answer when the oldest overdue sequence is pending


def default_max_age(num_layers: int) -> int:
    """Twice the layer calls one sequence runs alone: a lone request is never overdue."""
    return 2 * num_layers


def check_max_age(max_age):
    """``max_age`` as the engine takes it (``"auto"``, None, or an integer >= 0), else ``ValueError``."""
    if max_age is None or max_age == "auto":
        return max_age
    if not isinstance(max_age, int) or isinstance(max_age, bool) or max_age < 0:
        raise ValueError(
            f"max_age must be 'auto' (2 x the layers), None (no age rule) or an integer >= 0 (layer calls), "
            f"got {max_age!r}"
        )
    return max_age


def parse_max_age(text: str):
    """The command line's ``--max-age``: ``auto`` -> ``"auto"``, ``off`` -> None, ``N`` -> N (layer calls, >= 0).

    ``ValueError`` (one line, saying what is accepted) for anything else."""
    word = text.strip().lower()
    if word in ("auto", "off"):
        return "auto" if word == "auto" else None
    if word.isdigit():
        return int(word)
    raise ValueError(
        f"--max-age must be auto (2 x the model's layers), off (no age rule) or a whole number of layer calls "
        f">= 0 (0: strictly oldest first), got {text!r}"
    )


class AgeRule:
    """The submission clocks of the sequences in flight, and which one is served first when overdue.

    Rows are the scheduler's integers (reused once a row leaves). ``max_age``: layer calls
    after a sequence's submission from which it is overdue (0: always, strict age order).
    """

    def __init__(self, max_age: int):
        if not isinstance(max_age, int) or isinstance(max_age, bool) or max_age < 0:
            raise ValueError(f"max_age must be an integer >= 0 (layer calls) or None, got {max_age!r}")
        self.max_age = max_age
        self._heap: list[tuple[int, int, int]] = []  # (submitted, serial, row); stale where the row left
        self._serial_of: dict[int, int] = {}  # row in flight -> the serial of its entry
        self._serials = itertools.count()

    def entered(self, rows, submitted) -> None:
        """``rows`` were admitted; ``submitted``: each one's clock at submission."""
        for row, clock in zip(rows, submitted, strict=True):
            serial = next(self._serials)
            self._serial_of[row] = serial
            heapq.heappush(self._heap, (clock, serial, row))

    def left(self, rows) -> None:
        """``rows`` left the encoder (their entries go stale)."""
        for row in rows:
            self._serial_of.pop(row, None)

    def oldest(self) -> tuple[int, int] | None:
        """``(submitted, row)`` of the earliest submitted sequence in flight, or None."""
        heap = self._heap
        while heap and self._serial_of.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        return (heap[0][0], heap[0][2]) if heap else None

    def next_overdue(self, now: int, oldest_pending: int | None, room: int) -> str | int | None:
        """What runs next under the rule at clock ``now``: :data:`ADMIT_OVERDUE`, the row whose call
        runs next, or None (nothing overdue: the scheduler's own rule decides).

        ``oldest_pending``: the submission clock of the earliest pending sequence (None: none
        pending, or none may be admitted); ``room``: how many more sequences may be in flight.
        """
        limit = now - self.max_age
        in_flight = self.oldest()
        pending_overdue = oldest_pending is not None and oldest_pending <= limit
        if pending_overdue and room > 0 and (in_flight is None or oldest_pending <= in_flight[0]):
            return ADMIT_OVERDUE
        if in_flight is not None and (in_flight[0] <= limit or pending_overdue):
            return in_flight[1]  # overdue itself, or the oldest in flight making room for an overdue one
        return None
