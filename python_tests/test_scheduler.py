"""The continuous engine's scheduling policy, on its own: shapes, progress, waiting, memory, grouping."""

import math
import random

import pytest

from earlyexit_kernels.engine.engines.continuous.scheduler import Admit, Call, LayerScheduler, ShapeBuckets


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


def test_exact_shapes_are_every_row_count_and_length():
    buckets = ShapeBuckets.exact(max_batch_size=5, max_length=40)
    assert buckets.row_counts == (1, 2, 3, 4, 5) and buckets.lengths == tuple(range(1, 41))
    assert [buckets.padded_length(n) for n in (1, 17, 40)] == [1, 17, 40]
    assert [buckets.padded_rows(n) for n in (1, 3, 5)] == [1, 3, 5]


# The per-batch loop on length-sorted batches, and the guarantee that the engine's calls are never costlier.


def _per_batch_calls(lengths, exits, batch):
    """The per-batch loop's layer calls on the length-sorted batches of ``batch``: (layer, rows), rows sorted."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    calls = []
    for start in range(0, len(order), batch):
        cohort = order[start : start + batch]
        for layer in range(1, max(exits[i] for i in cohort) + 1):
            calls.append((layer, tuple(i for i in cohort if exits[i] >= layer)))
    return calls


def _engine_calls(scheduler, lengths, exits):
    """The whole stream admitted at once (as eek.classify does with a stream it holds), driven to the end."""
    calls, next_input = [], 0
    while True:
        action = scheduler.decide(can_admit=next_input < len(lengths))
        if action is None:
            return calls
        if isinstance(action, Admit):
            rows = list(range(next_input, min(len(lengths), next_input + action.count)))
            # eek.classify's length sweep: the shortest pending first
            scheduler.admit(rows, [lengths[r] for r in rows])
            next_input += len(rows)
            continue
        calls.append((action.layer, action.rows))
        for row in action.rows:
            if exits[row] == action.layer:
                scheduler.release(row)
            else:
                scheduler.requeue(row, action.layer + 1, lengths[row])


def _cost(calls, lengths, call_cost):
    return sum(call_cost + len(rows) * max(lengths[r] for r in rows) for _, rows in calls)


def _sorted_stream(count, num_layers, seed, exit_rate):
    rng = random.Random(seed)
    lengths = sorted(min(max(round(math.exp(rng.gauss(math.log(28), 0.55))), 3), 256) for _ in range(count))
    exits = [rng.randint(1, num_layers - 1) if rng.random() < exit_rate else num_layers for _ in range(count)]
    return lengths, exits


@pytest.mark.parametrize("count", [32, 100, 600])
@pytest.mark.parametrize("exit_rate", [0.0, 0.75])
@pytest.mark.parametrize("call_cost", [0.0, 32.0, 1000.0])
def test_calls_never_cost_more_than_the_per_batch_loops(count, exit_rate, call_cost):
    """In the cost model (call_cost + rows x longest), layer by layer and in all, on the same batches."""
    num_layers, batch = 6, 16
    lengths, exits = _sorted_stream(count, num_layers, seed=count, exit_rate=exit_rate)
    scheduler = LayerScheduler(num_layers, ShapeBuckets.exact(batch, 256), max_in_flight=4 * batch, call_cost=call_cost)
    engine = _engine_calls(scheduler, lengths, exits)
    baseline = _per_batch_calls(lengths, exits, batch)
    for layer in range(1, num_layers + 1):
        mine = [c for c in engine if c[0] == layer]
        theirs = [c for c in baseline if c[0] == layer]
        assert sorted(r for _, rows in mine for r in rows) == sorted(r for _, rows in theirs for r in rows)
        assert _cost(mine, lengths, call_cost) <= _cost(theirs, lengths, call_cost)
        assert len(mine) <= len(theirs)
    if exit_rate == 0.0:  # nothing to merge: exactly the per-batch loop's calls
        assert sorted(engine) == sorted(baseline)


def test_survivors_of_several_batches_merge_into_one_call_where_it_pays():
    num_layers, batch = 3, 8
    lengths = [10] * 32  # four batches of equal lengths: merging adds no padding
    exits = [1 if i % 4 else 3 for i in range(32)]  # a quarter of each batch goes on
    scheduler = LayerScheduler(num_layers, ShapeBuckets.exact(batch, 64), max_in_flight=32, call_cost=0.0)
    calls = _engine_calls(scheduler, lengths, exits)
    assert [len(rows) for layer, rows in calls if layer > 1] == [8, 8]  # 4 x 2 survivors, one call per layer
    assert len(_per_batch_calls(lengths, exits, batch)) == 4 * 3


def test_survivors_that_do_not_fit_one_call_fill_it_and_the_rest_run_together():
    num_layers, batch = 2, 8
    lengths = [10] * 24  # three batches of equal lengths
    exits = [1 if i % 4 == 0 else 2 for i in range(24)]  # 6 of each batch's 8 go on
    scheduler = LayerScheduler(num_layers, ShapeBuckets.exact(batch, 64), max_in_flight=24, call_cost=0.0)
    calls = _engine_calls(scheduler, lengths, exits)
    assert sorted(len(rows) for layer, rows in calls if layer == 2) == [2, 8, 8]  # not 6, 6, 6


def test_a_fill_that_pads_the_call_is_not_made():
    lengths = [10] * 8 + [40] * 8  # two batches far apart in length
    exits = [1 if i % 4 == 0 else 2 for i in range(16)]  # 6 of each batch's 8 go on
    scheduler = LayerScheduler(2, ShapeBuckets.exact(8, 64), max_in_flight=16, call_cost=1000.0)
    calls = _engine_calls(scheduler, lengths, exits)
    assert [len(rows) for layer, rows in calls if layer == 2] == [6, 6]  # 8 + 4 would pad 6 rows from 10 to 40


def test_a_merge_that_adds_more_padding_than_a_call_costs_is_not_made():
    lengths = [4] * 8 + [60] * 8  # two batches, far apart in length
    exits = [1 if i % 2 else 2 for i in range(16)]  # half of each goes on to layer 2
    for call_cost, layer_2_calls in ((10.0, 2), (1000.0, 1)):  # padding added by merging: 4 rows x 56 tokens
        scheduler = LayerScheduler(2, ShapeBuckets.exact(8, 64), max_in_flight=16, call_cost=call_cost)
        calls = _engine_calls(scheduler, lengths, exits)
        assert len([c for c in calls if c[0] == 2]) == layer_2_calls


def test_a_bad_call_cost_is_refused():
    with pytest.raises(ValueError, match="call_cost"):
        LayerScheduler(2, ShapeBuckets(8, 64), max_in_flight=8, call_cost=-1)


# advance: every row of a call goes on to the next layer.


def _drive(scheduler, lengths, exits, *, advance, can_admit_every=1):
    """Like ``_engine_calls``, the rows of a call that nobody leaves going on through ``advance`` or,
    for the rule's own queues, through ``requeue_many``. Returns the calls and how many were held."""
    calls, next_input, held, step = [], 0, 0, 0
    while True:
        step += 1
        can_admit = next_input < len(lengths) and step % can_admit_every == 0
        action = scheduler.decide(can_admit=can_admit)
        if action is None:
            if next_input < len(lengths):
                continue
            return calls, held
        if isinstance(action, Admit):
            rows = list(range(next_input, min(len(lengths), next_input + action.count)))
            scheduler.admit(rows, [lengths[r] for r in rows])
            next_input += len(rows)
            continue
        calls.append(action)
        if action.layer < scheduler.num_layers and all(exits[row] > action.layer for row in action.rows):
            if advance:
                scheduler.advance(action)
                held += scheduler._ready is not None
            else:
                scheduler.requeue_many(list(action.rows), action.layer + 1, [lengths[r] for r in action.rows])
            continue
        for row in action.rows:
            if exits[row] == action.layer:
                scheduler.release(row)
            else:
                scheduler.requeue(row, action.layer + 1, lengths[row])


@pytest.mark.parametrize("exit_rate", [0.0, 0.3, 0.75])
@pytest.mark.parametrize("max_wait", [None, 3])
@pytest.mark.parametrize("max_tokens", [None, 640])
@pytest.mark.parametrize("max_age", [None, 0, 4])
def test_advance_makes_the_calls_the_queues_would(exit_rate, max_wait, max_tokens, max_age):
    num_layers = 5
    rng = random.Random(7)
    lengths = [min(max(round(math.exp(rng.gauss(math.log(28), 0.55))), 3), 120) for _ in range(700)]
    exits = [rng.randint(1, num_layers - 1) if rng.random() < exit_rate else num_layers for _ in lengths]
    runs = []
    for advance in (False, True):
        buckets = ShapeBuckets.exact(16, 128, max_tokens)
        scheduler = LayerScheduler(num_layers, buckets, max_in_flight=64, max_wait=max_wait, max_age=max_age)
        runs.append(_drive(scheduler, lengths, exits, advance=advance, can_admit_every=3))
        assert scheduler.in_flight == 0
    (queued, _), (advanced, held) = runs
    assert advanced == queued
    if exit_rate == 0.0:
        assert held > 0  # full cohorts that nobody left went on without the queues


def test_a_call_held_by_advance_gives_up_a_discarded_row():
    scheduler = LayerScheduler(3, ShapeBuckets.exact(4, 16), max_in_flight=4)
    assert scheduler.decide(can_admit=True) == Admit(4)
    scheduler.admit([0, 1, 2, 3], [5, 6, 7, 8])
    first = scheduler.decide(can_admit=False)
    assert first == Call(1, 8, (0, 1, 2, 3), 4)
    scheduler.advance(first)
    assert scheduler.waiting(2) == 4
    assert scheduler.discard([2]) == 1
    assert scheduler.decide(can_admit=False) == Call(2, 8, (0, 1, 3), 3)
    assert scheduler.in_flight == 3


def test_a_call_held_by_advance_goes_back_to_its_queue_when_other_rows_are_queued():
    scheduler = LayerScheduler(3, ShapeBuckets.exact(2, 16), max_in_flight=4)
    scheduler.admit([0, 1, 2, 3], [4, 4, 9, 9])
    first = scheduler.decide(can_admit=False)  # layer 1, rows 0 and 1
    scheduler.requeue_many(list(first.rows), 2, [4, 4])
    second = scheduler.decide(can_admit=False)  # the deepest closed call: layer 2
    assert second == Call(2, 4, (0, 1), 2)
    third = scheduler.decide(can_admit=False)
    assert third == Call(1, 9, (2, 3), 2)
    scheduler.advance(third)  # nothing queued at layer 2 or deeper: held as the next call
    assert scheduler._ready == Call(2, 9, (2, 3), 2)
    scheduler.requeue_many([0, 1], 3, [4, 4])  # ... until rows 0, 1 are queued deeper
    assert scheduler.decide(can_admit=False) == Call(3, 4, (0, 1), 2)  # the deepest closed call first
    assert scheduler.decide(can_admit=False) == Call(2, 9, (2, 3), 2)
