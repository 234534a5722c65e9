"""The graphed step's buckets and its late survivor count (engine/graphed/buckets.py), alone and in a forward."""

import collections

import pytest
import torch
from test_graphed_step import GPU_PLAN, batch_inputs, patched

import earlyexit_kernels as eek
from earlyexit_kernels.engine.graphed.buckets import DEFAULT_SIZES, ReadyCount, SurvivorLag, bucket_for, default_plan
from earlyexit_kernels.engine.graphed.static_step import StaticBatches
from earlyexit_kernels.patching.patch import current_adapter
from earlyexit_kernels.patching.state import state_of


def test_buckets_are_vllm_like_sizes():
    assert [bucket_for(n) for n in (0, 1, 3, 5, 8, 9, 64, 65, 97, 256, 257, 300)] == [
        0,
        1,
        4,
        8,
        8,
        16,
        64,
        96,
        128,
        256,
        320,
        320,
    ]
    assert [bucket_for(n, None) for n in (0, 7, 300)] == [0, 7, 300]
    with pytest.raises(ValueError, match="never negative"):
        bucket_for(-1)
    assert default_plan("cuda") == (DEFAULT_SIZES, 1) and default_plan("cpu") == (None, 0)


class _Counted(ReadyCount):
    """A count that remembers whether the host read it."""

    def __init__(self, value, log, layer):
        super().__init__(lambda: value)
        self.log, self.layer = log, layer

    def wait(self):
        self.log.append(self.layer)
        return super().wait()


def test_a_count_is_read_lag_layers_after_its_layer():
    reads = []
    lag = SurvivorLag(64, lag=1)
    assert lag.bucket_before(1) == 64
    lag.publish(1, _Counted(50, reads, 1))
    assert lag.bucket_before(2) == 64 and reads == []  # layer 1's count waits a layer
    lag.publish(2, _Counted(30, reads, 2))
    assert lag.bucket_before(3) == 56 and reads == [1]  # 50 rows: bucket 56
    lag.publish(3, _Counted(0, reads, 3))
    assert lag.bucket_before(4) == 32 and reads == [1, 2]
    assert lag.bucket_before(5) == 0 and reads == [1, 2, 3]  # nobody left: stop
    assert lag.buckets == [64, 64, 56, 32]


def test_with_no_lag_each_count_picks_the_next_bucket_and_quiet_layers_keep_the_last():
    lag = SurvivorLag(10, lag=0, sizes=None)
    assert lag.bucket_before(1) == 10
    assert lag.bucket_before(2) == 10  # layer 1 published nothing (nobody could leave)
    lag.publish(2, ReadyCount(lambda: 7))
    assert lag.bucket_before(3) == 7
    with pytest.raises(ValueError, match="layer order"):
        lag.publish(2, ReadyCount(lambda: 5))
    with pytest.raises(ValueError, match="0 or more"):
        SurvivorLag(4, lag=-1)


def test_the_bucket_sequence_of_a_forward_follows_the_counts():
    """Scheduled exits at known layers: the buckets each layer ran in, with the GPU's plan."""
    schedule = torch.tensor([1] * 20 + [2] * 20 + [4] * 24)
    model = patched(eek.Scheduled(schedule))
    state_of(model).static_batches = StaticBatches(**GPU_PLAN)
    inputs = batch_inputs(64, seed=2)
    adapter = current_adapter(model)
    seen = collections.Counter()
    original = adapter.run_layer

    def run_layer(index, hidden, layer_mask):
        seen[index + 1, hidden.shape[0]] += 1
        return original(index, hidden, layer_mask)

    adapter.run_layer = run_layer
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        del adapter.run_layer
    assert torch.equal(out.exit_layer, schedule)
    # Scheduled's counts are known on the host: no lag, no dead layer. Layer 2 runs the 44 rows
    # left in a bucket of 48, layers 3 and 4 the 24 left.
    assert sorted(seen) == [(1, 64), (2, 48), (3, 24), (4, 24)]
    assert out.host_syncs == 2  # the schedule's counts (its first forward) and the mask's extents
    with torch.no_grad():
        again = model(**inputs)
    assert again.host_syncs == 1  # the counts are kept with the schedule: only the mask's extents now
    assert torch.equal(again.exit_layer, schedule)


def test_device_counts_are_read_a_layer_late_and_the_schedules_at_once():
    """A threshold policy's counts come from the device: with the GPU's plan (lag 1) the bucket of
    layer l follows the count of layer l - 2, so a layer may run on rows that have just left.
    Scheduled's survivors are known on the host before the forward."""
    from earlyexit_kernels.engine.graphed.static_step import _known_survivors

    assert _known_survivors([0, 20, 20, 0, 24], 64, 4) == [64, 44, 24, 24, 0]
    assert _known_survivors(None, 64, 4) is None
    lag = SurvivorLag(64, lag=1, sizes=DEFAULT_SIZES)
    buckets = []
    for layer, left in zip(range(1, 5), (44, 24, 24, 0), strict=True):
        buckets.append(lag.bucket_before(layer))
        lag.publish(layer, ReadyCount(lambda n=left: n))
    assert buckets == [64, 64, 48, 24]


def test_a_schedule_changed_in_place_is_read_again():
    """Scheduled's counts are kept on the policy while its tensor's storage and version stay the
    same: a schedule written in place is read anew, so its rows leave where it now says."""
    from earlyexit_kernels.engine.step.batch_loop import scheduled_exit_counts

    schedule = torch.tensor([1, 2, 2, 4])
    policy = eek.Scheduled(schedule)
    assert scheduled_exit_counts(policy, 4) == ([0, 1, 2, 0, 1], 1)
    assert scheduled_exit_counts(policy, 4) == ([0, 1, 2, 0, 1], 0)
    policy.exit_layers[0] = 3
    assert scheduled_exit_counts(policy, 4) == ([0, 0, 2, 1, 1], 1)
    assert scheduled_exit_counts(policy, 5) == ([0, 0, 2, 1, 1, 0], 1)  # another depth, counted anew
    assert scheduled_exit_counts(eek.Entropy(0.3), 4) == (None, 0)
