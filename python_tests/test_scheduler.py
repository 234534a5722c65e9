"""The continuous engine's scheduling policy, on its own: shapes, progress, waiting, memory, grouping."""

import math
import random

import pytest

from earlyexit_kernels.engine.scheduler import Admit, Call, LayerScheduler, ShapeBuckets


def test_shapes_come_from_two_fixed_sets():
    buckets = ShapeBuckets(max_batch_size=100, max_length=70, length_step=16)
    assert buckets.row_counts == (1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100)
    assert buckets.lengths == (16, 32, 48, 64, 70)
    assert [buckets.padded_length(n) for n in (1, 16, 17, 64, 65, 70)] == [16, 16, 32, 64, 70, 70]
    assert [buckets.padded_rows(n) for n in (1, 3, 33, 97)] == [1, 4, 48, 100]


def test_a_token_budget_lowers_the_rows_of_long_calls():
    buckets = ShapeBuckets(max_batch_size=64, max_length=256, length_step=16, max_tokens=2048)
    assert buckets.capacity(16) == 64
    assert buckets.capacity(64) == 32
    assert buckets.capacity(256) == 8
    assert buckets.capacity(48) == 32  # 2048 // 48 = 42 rows: the largest row count within it


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_batch_size=0, max_length=8), "max_batch_size"),
        (dict(max_batch_size=4, max_length=8, length_step=0), "length_step"),
        (dict(max_batch_size=4, max_length=64, max_tokens=32), "max_tokens=32 cannot hold"),
    ],
)
def test_bad_shapes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapeBuckets(**kwargs)


def test_a_length_outside_the_buckets_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        ShapeBuckets(8, 32).padded_length(33)


def _simulate(scheduler, lengths, exit_layers):
    """Drive ``scheduler`` like the engine does; every row leaves at its exit layer.

    Returns the calls, the longest wait (layer calls between entering a queue and
    leaving it) and the most rows in flight at once.
    """
    calls, entered, longest_wait, most_in_flight = [], {}, 0, 0
    next_input = 0
    while True:
        action = scheduler.decide(can_admit=next_input < len(lengths))
        if action is None:
            break
        if isinstance(action, Admit):
            for _ in range(min(action.count, len(lengths) - next_input)):
                scheduler.add(next_input, lengths[next_input])
                entered[next_input] = scheduler.calls
                next_input += 1
            most_in_flight = max(most_in_flight, scheduler.in_flight)
            continue
        calls.append(action)
        for row in action.rows:
            longest_wait = max(longest_wait, scheduler.calls - 1 - entered[row])
            if exit_layers[row] == action.layer:
                scheduler.release(row)
            else:
                scheduler.requeue(row, action.layer + 1, lengths[row])
                entered[row] = scheduler.calls
    return calls, longest_wait, most_in_flight


def _stream(count, num_layers, seed=0):
    rng = random.Random(seed)
    lengths = [min(max(round(math.exp(rng.gauss(math.log(28), 0.55))), 3), 256) for _ in range(count)]
    exits = [min(num_layers, 1 + int(rng.expovariate(0.5))) for _ in range(count)]
    return lengths, exits


def test_every_sequence_runs_each_of_its_layers_once_in_a_fixed_shape():
    num_layers = 6
    buckets = ShapeBuckets(max_batch_size=32, max_length=256, length_step=8)
    scheduler = LayerScheduler(num_layers, buckets, max_in_flight=128)
    lengths, exits = _stream(1500, num_layers)
    calls, _, most_in_flight = _simulate(scheduler, lengths, exits)

    layers_seen = {}
    for call in calls:
        assert call.padded_rows in buckets.row_counts and call.padded_length in buckets.lengths
        assert 1 <= len(call.rows) <= call.padded_rows <= buckets.capacity(call.padded_length)
        for row in call.rows:
            assert lengths[row] <= call.padded_length  # never a row longer than the call
            layers_seen.setdefault(row, []).append(call.layer)
    assert all(layers_seen[row] == list(range(1, exits[row] + 1)) for row in range(len(lengths)))
    assert most_in_flight <= 128
    assert scheduler.in_flight == 0


def test_no_row_waits_longer_than_the_documented_bound():
    num_layers = 4
    scheduler = LayerScheduler(num_layers, ShapeBuckets(16, 256, 8), max_in_flight=64, max_wait=10)
    lengths, exits = _stream(2000, num_layers, seed=3)
    lengths[::97] = [250] * len(lengths[::97])  # rare long rows, which would fill no call of their own
    _, longest_wait, _ = _simulate(scheduler, lengths, exits)
    assert scheduler.wait_bound == 10 + 64
    assert longest_wait <= scheduler.wait_bound


def test_a_lone_long_sequence_is_not_starved_by_a_stream_of_short_ones():
    scheduler = LayerScheduler(2, ShapeBuckets(8, 128, 8), max_in_flight=16, max_wait=5)
    lengths = [120] + [10] * 400
    exits = [2] * len(lengths)
    calls, _, _ = _simulate(scheduler, lengths, exits)
    first_call_of_long_row = next(i for i, call in enumerate(calls) if 0 in call.rows)
    assert first_call_of_long_row <= scheduler.wait_bound
    assert first_call_of_long_row < len(calls) // 2  # served long before the short ones ran out


def test_the_deepest_full_call_runs_first_and_admission_waits_for_it():
    scheduler = LayerScheduler(3, ShapeBuckets(4, 32, 8), max_in_flight=12)
    for row in range(8):
        scheduler.add(row, 8)
    first = scheduler.decide(can_admit=True)
    assert isinstance(first, Call) and first.layer == 1 and len(first.rows) == 4
    for row in first.rows:
        scheduler.requeue(row, 2, 8)
    second = scheduler.decide(can_admit=True)
    assert isinstance(second, Call) and second.layer == 2  # layer 2 is full: it goes before layer 1
    for row in second.rows:
        scheduler.release(row)
    third = scheduler.decide(can_admit=True)
    assert third.layer == 1
    for row in third.rows:
        scheduler.release(row)
    assert scheduler.decide(can_admit=True) == Admit(12)  # nothing to run: room for twelve
    assert scheduler.decide(can_admit=False) is None


def test_rows_of_a_call_are_grouped_by_length():
    scheduler = LayerScheduler(1, ShapeBuckets(8, 128, 8), max_in_flight=32)
    for row in range(16):
        scheduler.add(row, 100 if row % 2 else 6)  # two clusters, interleaved in arrival
    calls = []
    while (action := scheduler.decide(can_admit=False)) is not None:
        calls.append(action)
        for row in action.rows:
            scheduler.release(row)
    assert sorted((c.padded_length, len(c.rows)) for c in calls) == [(8, 8), (104, 8)]


def test_a_partial_call_runs_when_nothing_can_be_admitted():
    scheduler = LayerScheduler(2, ShapeBuckets(8, 64, 8), max_in_flight=8)
    for row in range(3):
        scheduler.add(row, 20)
    call = scheduler.decide(can_admit=False)
    assert call == Call(layer=1, padded_length=24, rows=(0, 1, 2), padded_rows=4)


def test_discarded_rows_leave_their_queue_and_free_their_room():
    scheduler = LayerScheduler(2, ShapeBuckets(8, 64, 8), max_in_flight=8)
    for row in range(5):
        scheduler.add(row, 10)
    assert scheduler.discard([1, 3, 42]) == 2
    assert scheduler.in_flight == 3
    call = scheduler.decide(can_admit=False)
    assert set(call.rows) == {0, 2, 4}


def test_max_in_flight_must_hold_a_full_call():
    with pytest.raises(ValueError, match="max_in_flight"):
        LayerScheduler(2, ShapeBuckets(8, 64), max_in_flight=4)
