"""Bounded waiting, on its own (no model, no tensors): the age rule, and the scheduler and the
admission order driven as the engine thread drives them through adversarial arrivals.

The bound under test (earlyexit_kernels/engine/stream/aging.py): a sequence submitted at clock ``t``
(the layer calls run so far) has left by ``t + max_age + L x n`` (``+ 2 L x n`` where the
engine may be full: ``max_in_flight`` sequences in flight while it is overdue and pending) and
been admitted within ``n`` admissions after ``t + max_age``, ``n`` the sequences submitted at
``t`` or earlier that are still there at ``t + max_age``.
"""

import random
from dataclasses import dataclass, field

import numpy as np
import pytest

from earlyexit_kernels.engine.engines.continuous.scheduler import Admit, LayerScheduler, ShapeBuckets
from earlyexit_kernels.engine.stream.admission import PendingQueue
from earlyexit_kernels.engine.stream.aging import ADMIT_OVERDUE, AgeRule, default_max_age

# ------------------------------------------------------------------ the rule alone


def test_nothing_overdue_leaves_the_choice_to_the_scheduler():
    rule = AgeRule(max_age=10)
    rule.entered([0, 1], [5, 7])
    assert rule.next_overdue(now=14, oldest_pending=6, room=4) is None


def test_the_oldest_overdue_sequence_in_flight_runs_next():
    rule = AgeRule(max_age=10)
    rule.entered([3, 1], [5, 2])
    assert rule.next_overdue(now=12, oldest_pending=None, room=4) == 1  # submitted at 2: overdue at 12
    rule.left([1])
    assert rule.next_overdue(now=12, oldest_pending=None, room=4) is None
    assert rule.next_overdue(now=15, oldest_pending=None, room=4) == 3


def test_an_overdue_pending_sequence_older_than_every_row_in_flight_is_admitted():
    rule = AgeRule(max_age=10)
    rule.entered([0], [4])
    assert rule.next_overdue(now=14, oldest_pending=3, room=1) == ADMIT_OVERDUE
    assert rule.next_overdue(now=14, oldest_pending=5, room=1) == 0  # the row in flight is older


def test_without_room_the_oldest_in_flight_runs_to_make_room_for_an_overdue_pending_one():
    rule = AgeRule(max_age=10)
    rule.entered([0, 1], [9, 8])  # neither overdue at 12
    assert rule.next_overdue(now=12, oldest_pending=1, room=0) == 1


def test_a_row_reused_after_it_left_is_as_old_as_its_new_sequence():
    rule = AgeRule(max_age=10)
    rule.entered([0], [0])
    rule.left([0])
    rule.entered([0], [20])
    assert rule.oldest() == (20, 0)
    assert rule.next_overdue(now=25, oldest_pending=None, room=1) is None


def test_max_age_zero_is_strict_age_order_and_a_negative_one_is_refused():
    rule = AgeRule(max_age=0)
    rule.entered([0, 1], [3, 2])
    assert rule.next_overdue(now=3, oldest_pending=None, room=0) == 1
    with pytest.raises(ValueError, match="max_age must be an integer >= 0"):
        AgeRule(-1)
    assert default_max_age(6) == 12


# ------------------------------------------------------------------ the admission order


def test_the_length_sweep_takes_overdue_entries_first_and_goes_on_where_it_was():
    queue = PendingQueue("length")
    for key, (length, clock) in enumerate([(5, 0), (90, 0), (3, 4), (7, 4), (6, 4)]):
        queue.add(key, np.zeros(length), None, submitted=clock)
    assert [e[2] for e in queue.take(2)] == [2, 0]  # the sweep: lengths 3, 5
    assert queue.oldest() == 0  # the long one, submitted at 0
    assert [e[2] for e in queue.take(2, overdue_from=0)] == [1, 4]  # overdue first, then the sweep: 6
    assert queue.oldest() == 4 and [e[2] for e in queue.take(5, overdue_from=0)] == [3]


def test_the_oldest_pending_follows_removals():
    queue = PendingQueue("fifo")
    for key, clock in enumerate([1, 2, 3]):
        queue.add(key, np.zeros(4), None, submitted=clock)
    assert queue.remove({0}) == 1 and queue.oldest() == 2
    queue.take(2)
    assert queue.oldest() is None


# ------------------------------------------------------------------ the scheduler, driven as the engine thread drives it


@dataclass
class Sequence:
    length: int
    exit_layer: int
    submitted: int  # the clock (layer calls run) when the engine thread took it
    admissions_then: int  # admissions made before it was submitted
    admitted: int | None = None  # the admission (counted from the start) that took it
    left: int | None = None  # the clock after the call it left in


@dataclass
class Log:
    sequences: list[Sequence] = field(default_factory=list)
    admissions: list[int] = field(default_factory=list)  # the clock of each admission
    calls: int = 0


class Clients:
    """``concurrency`` clients, each sending its next text as soon as its last was answered."""

    def __init__(self, concurrency: int, texts: list[tuple[int, int]]):
        self.concurrency, self.texts, self.sent = concurrency, texts, 0

    def arrivals(self, clock: int, answered: int, idle: bool) -> list[tuple[int, int]]:
        due = self.concurrency if self.sent == 0 else answered
        new = self.texts[self.sent : self.sent + due]
        self.sent += len(new)
        return new

    @property
    def exhausted(self) -> bool:
        return self.sent >= len(self.texts)


class Bursts:
    """``bursts[clock]``: texts that arrive together once that many layer calls have run (the next
    burst at once when the engine has nothing to do)."""

    def __init__(self, bursts: dict[int, list[tuple[int, int]]]):
        self.bursts = dict(sorted(bursts.items()))

    def arrivals(self, clock: int, answered: int, idle: bool) -> list[tuple[int, int]]:
        due = [at for at in self.bursts if at <= clock or (idle and at == next(iter(self.bursts)))]
        return [text for at in due for text in self.bursts.pop(at)]

    @property
    def exhausted(self) -> bool:
        return not self.bursts


def serve(scheduler: LayerScheduler, queue: PendingQueue, stream) -> Log:
    """Submit, admit, run and requeue as ContinuousEngine.step does; every row leaves at its exit layer."""
    log, free, sequence_of = Log(), list(range(scheduler.max_in_flight))[::-1], {}
    answered, idle = 0, False
    while True:
        for length, exit_layer in stream.arrivals(scheduler.calls, answered, idle):
            queue.add(len(log.sequences), np.zeros(length), None, submitted=scheduler.calls)
            log.sequences.append(Sequence(length, exit_layer, scheduler.calls, len(log.admissions)))
        answered = 0
        action = scheduler.decide(bool(queue), queue.oldest())
        idle = action is None
        if idle:
            if stream.exhausted and not queue:
                return log
            continue
        if isinstance(action, Admit):
            overdue_from = scheduler.calls - scheduler.aging.max_age if scheduler.aging else None
            taken = queue.take(action.count, overdue_from)
            rows = [free.pop() for _ in taken]
            for row, entry in zip(rows, taken):
                sequence_of[row] = log.sequences[entry[2]]
                sequence_of[row].admitted = len(log.admissions)
            log.admissions.append(scheduler.calls)
            scheduler.admit(rows, [entry[0] for entry in taken], [entry[5] for entry in taken])
            continue
        log.calls += 1
        if action.layer < scheduler.num_layers and all(sequence_of[r].exit_layer > action.layer for r in action.rows):
            scheduler.advance(action)  # every row goes on: the runner's shortcut
            continue
        for row in action.rows:
            sequence = sequence_of[row]
            if sequence.exit_layer == action.layer:
                sequence.left = scheduler.calls
                scheduler.release(row)
                free.append(row)
                answered += 1
            else:
                scheduler.requeue(row, action.layer + 1, sequence.length)


def against_the_bound(log: Log, max_age: int, num_layers: int, full: bool) -> list[tuple[int, int, int, int]]:
    """Per sequence ``(layer calls waited, their bound, admissions waited once overdue, their bound)``;
    ``full``: whether the engine may be full while a sequence is overdue and pending."""
    out = []
    for s in log.sequences:
        overdue_at = s.submitted + max_age
        n = sum(1 for t in log.sequences if t.submitted <= s.submitted and t.left > overdue_at)
        admissions_once_overdue = sum(1 for at in log.admissions[: s.admitted + 1] if at >= overdue_at)
        out.append((s.left - s.submitted, max_age + (1 + full) * num_layers * n, admissions_once_overdue, n))
    return out


def assert_bounded(log: Log, max_age: int, num_layers: int, full: bool = False) -> None:
    assert all(s.left is not None for s in log.sequences), "every sequence leaves"
    for sequence, (waited, bound, admissions, admission_bound) in zip(
        log.sequences, against_the_bound(log, max_age, num_layers, full)
    ):
        assert waited <= bound, f"{sequence} waited {waited} layer calls, over its bound {bound}"
        assert admissions <= admission_bound, f"{sequence} waited {admissions} admissions once overdue"


def _scheduler(num_layers=6, max_batch_size=8, max_in_flight=64, max_age=12, call_cost=3.6):
    # eager shapes and a call cost where groups of different lengths seldom merge (MiniLM's on a CPU):
    # the longest group of a layer then stays open, waiting for rows that could join it
    buckets = ShapeBuckets.exact(max_batch_size, 128)
    return LayerScheduler(num_layers, buckets, max_in_flight, call_cost=call_cost, max_age=max_age)


def _shorts_with_a_long_one_every(every: int, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """Short texts (8-20 tokens) leaving at layers 1-6, and every ``every``-th a long one (120 tokens) that runs all 6."""
    rng = random.Random(seed)
    return [(120, 6) if i % every == every // 2 else (rng.randint(8, 20), rng.randint(1, 6)) for i in range(count)]


@pytest.mark.parametrize("concurrency", [8, 32])
def test_a_long_text_among_a_stream_of_short_ones_leaves_within_the_bound(concurrency):
    max_age, num_layers = 12, 6
    log = serve(
        _scheduler(max_age=max_age), PendingQueue("fifo"), Clients(concurrency, _shorts_with_a_long_one_every(50, 1500))
    )
    assert all(s.left is not None for s in log.sequences)
    assert_bounded(log, max_age, num_layers)
    # at concurrency C with one text per request, n <= C: every text leaves within max_age + L x C
    longs = [s.left - s.submitted for s in log.sequences if s.length == 120]
    assert max(longs) <= max_age + num_layers * concurrency


def test_a_long_text_in_one_of_a_run_of_bursts_leaves_within_the_bound():
    """Bursts of short texts every few layer calls; one burst also holds a long text."""
    rng = random.Random(1)
    bursts = {at: [(rng.randint(8, 20), rng.randint(1, 6)) for _ in range(4)] for at in range(0, 800, 10)}
    bursts[200].append((120, 6))
    max_age = 12
    log = serve(_scheduler(max_age=max_age), PendingQueue("fifo"), Bursts(bursts))
    assert_bounded(log, max_age, 6)


def test_bursts_larger_than_the_room_are_admitted_in_age_order():
    rng = random.Random(1)
    texts = lambda count: [(rng.choice([6, 12, 40, 120]), rng.randint(1, 6)) for _ in range(count)]  # noqa: E731
    max_age = 12
    log = serve(
        _scheduler(max_in_flight=32, max_age=max_age), PendingQueue("length"), Bursts({0: texts(150), 40: texts(150)})
    )
    assert_bounded(log, max_age, 6, full=True)
    first, second = log.sequences[:150], log.sequences[150:]
    assert max(s.admitted for s in first) <= min(s.admitted for s in second)  # a later burst never jumps ahead


def test_the_length_sweep_cannot_hold_a_long_text_behind_shorter_ones_that_came_after_it():
    """The long text arrives after a sweep began, and many short ones after it: the next sweep,
    from the shortest, would take every one of them first."""
    max_age, num_layers = 6, 3
    rng = random.Random(2)
    shorts = lambda count: [(rng.randint(4, 10), num_layers) for _ in range(count)]  # noqa: E731
    bursts = Bursts({0: shorts(8), 1: [(120, num_layers)], 2: shorts(200)})
    scheduler = _scheduler(num_layers=num_layers, max_batch_size=4, max_in_flight=4, max_age=max_age)
    log = serve(scheduler, PendingQueue("length"), bursts)
    assert_bounded(log, max_age, num_layers, full=True)
    long_text = log.sequences[8]  # n <= 9: the 8 short texts before it, and itself
    assert long_text.length == 120 and long_text.left - long_text.submitted <= max_age + 2 * num_layers * 9


@pytest.mark.parametrize("seed", range(6))
def test_random_streams_stay_within_the_bound(seed):
    """Bursts and lulls, every length, exits at every layer, room from scarce to ample, any max_age."""
    rng = random.Random(seed)
    num_layers = rng.randint(2, 6)
    max_age = rng.choice([0, 1, 5, 3 * num_layers])
    max_batch_size = rng.choice([2, 4, 8])
    scheduler = _scheduler(
        num_layers, max_batch_size, max_batch_size * rng.randint(1, 4), max_age, rng.choice([0, 3.6, 500])
    )
    bursts = Bursts(
        {
            rng.randint(0, 600): [(rng.randint(1, 128), rng.randint(1, num_layers)) for _ in range(rng.randint(1, 40))]
            for _ in range(30)
        }
    )
    order = rng.choice(["fifo", "length"])
    log = serve(scheduler, PendingQueue(order), bursts)
    assert scheduler.in_flight == 0
    assert_bounded(log, max_age, num_layers, full=True)
