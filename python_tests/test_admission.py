"""The continuous engine's admission order and packing rule, on their own (no model, no tensors)."""

import gc
import math

import numpy as np
import pytest

from earlyexit_kernels.engine.engines.continuous.scheduler import (
    PACK_BELOW_FILL,
    PackingRule,
    default_call_cost,
    default_length_step,
    default_max_in_flight,
)
from earlyexit_kernels.engine.stream.admission import PendingQueue


def queued(order: str, lengths: list[int]) -> PendingQueue:
    queue = PendingQueue(order)
    for key, length in enumerate(lengths):
        queue.add(key, np.arange(length), None)
    return queue


def keys(entries) -> list:
    return [entry[2] for entry in entries]


def test_fifo_takes_the_oldest_first():
    queue = queued("fifo", [5, 2, 9, 1])
    assert keys(queue.take(3)) == [0, 1, 2]
    assert keys(queue.take(3)) == [3] and len(queue) == 0


def test_length_sweeps_up_from_the_shortest_then_wraps_to_what_came_since():
    queue = queued("length", [5, 2, 9, 1, 7])
    assert keys(queue.take(2)) == [3, 1]  # lengths 1, 2
    queue.add("late", np.arange(3), None)  # after the sweep began: waits for the next one
    assert keys(queue.take(2)) == [0, 4]  # lengths 5, 7
    assert keys(queue.take(2)) == [2, "late"]  # 9 ends the sweep; the next starts at the shortest
    assert len(queue) == 0


def test_a_stream_of_one_length_cannot_hold_a_sweep_where_it_is():
    queue = queued("length", [4, 8])
    assert keys(queue.take(1)) == [0]
    for key in range(10, 14):
        queue.add(key, np.arange(4), None)  # the same length as the one just taken
    assert keys(queue.take(1)) == [1], "the sequence of length 8 must not wait behind later arrivals"


def test_remove_drops_by_key_and_counts():
    queue = queued("length", [3, 4, 5])
    assert queue.remove({1, 7}) == 1
    assert sorted(keys(queue)) == [0, 2]


@pytest.mark.parametrize("order", ["fifo", "length"])
def test_what_the_queue_keeps_stays_bounded_by_what_is_pending_with_no_age_rule(order):
    # eek serve --max-age off and eek.classify never ask for the oldest entry: what the queue
    # keeps about arrivals must still be dropped as they are taken (it once grew by one a sequence)
    queue = PendingQueue(order)
    rng = np.random.default_rng(0)
    for key in range(20_000):
        queue.add(key, np.arange(int(rng.integers(1, 40))), None)
        if key % 4 == 3:
            queue.take(3)  # a backlog builds up: a quarter of the arrivals stay pending
        if key % 1000 == 999:
            queue.remove(set(range(key - 999, key - 900)))  # clients gone
        assert len(queue._by_arrival) <= 2 * len(queue) + 64 + 4
    assert 2_000 < len(queue) < 5_000  # 3,317 (fifo) and 3,491 (length) pending at the end


def test_entries_are_tuples_the_garbage_collector_stops_tracking():
    queue = queued("fifo", [3, 4])
    gc.collect()
    assert not any(gc.is_tracked(entry) for entry in queue)


def test_an_unknown_order_is_refused_by_name():
    with pytest.raises(ValueError, match="admission must be 'fifo' or 'length'"):
        PendingQueue("shortest")


@pytest.mark.parametrize(
    "packable, packed, below",
    [(False, None, 0.0), (True, False, 0.0), (True, None, PACK_BELOW_FILL), (True, True, math.inf)],
)
def test_the_packing_rule_follows_the_engines_option(packable, packed, below):
    assert PackingRule.choose(packable, packed).below_fill == below


def test_a_call_packs_below_the_fill_and_never_without_padding():
    rule = PackingRule.choose(packable=True, packed=None)
    slots = 100
    assert rule.packs(74, slots) and not rule.packs(76, slots)  # either side of 0.75
    always = PackingRule.choose(packable=True, packed=True)
    assert always.packs(99, slots) and not always.packs(slots, slots)  # nothing to skip without padding


def test_the_engines_defaults():
    assert default_call_cost(128) == 32.0 and default_call_cost(256) == 8.0  # a token's cost grows as H^2
    assert default_max_in_flight(32) == 512
    assert (default_length_step(fixed_shapes=True), default_length_step(fixed_shapes=False)) == (8, 1)
