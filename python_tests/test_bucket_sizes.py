"""Bucket sizes chosen from a layer-cost table (engine/graphed/buckets.py) and what a plan runs and costs (bench/bucket_plans.py).

The tables here are made up, shaped as a GPU's are (a layer costs the same from one row count to
the next until its GEMMs need one more wave of tiles) or as a CPU's (a cost per row); each
margin a test sets lies midway between the differences it separates. The simulation is checked
against the graphed forward itself, run on the CPU with the GPU's plan.
"""

import collections

import pytest
import torch
from conftest import tiny_batch, tiny_model

import earlyexit_kernels as eek
from earlyexit_kernels.bench.bucket_plans import plan_cost
from earlyexit_kernels.bench.patterns import geometric, scheduled
from earlyexit_kernels.engine.graphed.buckets import DEFAULT_SIZES, sizes_from_table
from earlyexit_kernels.engine.graphed.cost_table import LayerCostTable
from earlyexit_kernels.engine.graphed.static_step import StaticBatches
from earlyexit_kernels.patching.patch import current_adapter
from earlyexit_kernels.patching.state import state_of


def table(seconds: dict, spread) -> LayerCostTable:
    """A table of ``seconds`` by rows, with ``spread`` (a number: the same for every count) as its noise."""
    if not isinstance(spread, dict):
        spread = dict.fromkeys(seconds, spread)
    return LayerCostTable(seconds=seconds, spread=spread, seq_len=128, device="made up", dtype="bf16", torch="t")


def waves(edges: tuple[int, ...], rows=range(1, 65), jitter=0.0) -> dict[int, float]:
    """One more unit of time at every edge passed (a GEMM's waves), with an alternating ``jitter``."""
    return {n: 1.0 + sum(n > e for e in edges) + (jitter if n % 2 else -jitter) for n in rows}


def test_a_size_that_costs_what_the_next_larger_one_costs_is_dropped():
    """Two waves, 1-40 rows and 41-64: only the largest count of each is worth a bucket, whatever
    the jitter below the spread."""
    assert sizes_from_table(table(waves((40,)), 0.05)) == (40, 64)
    assert sizes_from_table(table(waves((8, 40), jitter=0.02), 0.5)) == (8, 40, 64)
    assert sizes_from_table(table(waves(()), 0.05)) == (64,)  # flat: one bucket


def test_the_margin_is_the_measurements_own_spread():
    """A step of 0.1 between 32 and 33 rows: kept under a spread of 0.05, dropped under 0.2; the
    larger of the two counts' spreads decides."""
    steps = {n: 1.0 if n <= 32 else 1.1 for n in range(1, 65)}
    assert sizes_from_table(table(steps, 0.05)) == (32, 64)
    assert sizes_from_table(table(steps, 0.2)) == (64,)
    noisy_top = dict.fromkeys(steps, 0.05) | {64: 0.2}
    assert sizes_from_table(table(steps, noisy_top)) == (64,)


def test_a_cost_per_row_keeps_a_size_each_time_the_saving_passes_the_spread():
    """A CPU-like table: 0.01 a row, spread 0.025: kept every 3 rows down from the largest, as the
    difference is taken from the last size kept, not the neighbour."""
    linear = {n: 0.01 * n for n in range(1, 65)}
    assert sizes_from_table(table(linear, 0.025)) == tuple(range(1, 65, 3))


def test_a_smaller_count_that_is_slower_never_keeps_a_size():
    odd = {1: 0.5, 16: 1.5, 32: 1.0, 64: 2.0}
    assert sizes_from_table(table(odd, 0.1)) == (1, 32, 64)
    with pytest.raises(ValueError, match="empty"):
        sizes_from_table(table({}, 0.1))


def test_geometric_p010_at_64_rows_runs_544_row_layers_where_461_are_needed():
    """Issue 93's reading: BERT-base's 12 layers, B = 64, vLLM's sizes, the count read a layer late."""
    cost = plan_cost(geometric(64, 12, 128).exit_layers, 12, sizes=DEFAULT_SIZES, lag=1)
    assert cost.buckets == (64, 64, 64, 56, 48, 48, 40, 40, 32, 32, 32, 24)
    assert (cost.row_layers_run, cost.row_layers_needed) == (544, 461)
    assert cost.row_fraction == pytest.approx(461 / 544)  # 0.85
    assert cost.seconds is None and cost.time_fraction is None  # no table: rows only


def test_every_row_after_layer_6_runs_a_seventh_layer_of_dead_rows_with_the_late_count():
    half = scheduled(64, 12, 0.5, 128).exit_layers
    late = plan_cost(half, 12, sizes=DEFAULT_SIZES, lag=1)
    assert late.buckets == (64,) * 7 and late.needed == (64,) * 6 + (0,)
    assert (late.row_layers_run, late.row_layers_needed) == (448, 384)
    at_once = plan_cost(half, 12, sizes=DEFAULT_SIZES, lag=0)  # Scheduled: its counts known on the host
    assert at_once.buckets == (64,) * 6 and at_once.row_fraction == 1.0


def test_the_predicted_time_sums_the_buckets_times_and_the_ideal_the_exact_counts():
    exits = [1] * 20 + [2] * 20 + [4] * 24
    times = {n: 10.0 + n for n in range(1, 65)}
    cost = plan_cost(exits, 4, times, sizes=DEFAULT_SIZES, lag=1)
    assert cost.buckets == (64, 64, 48, 24)  # as test_graphed_buckets' hand-driven SurvivorLag
    assert cost.needed == (64, 44, 24, 24)
    assert cost.seconds == pytest.approx(74 + 74 + 58 + 34)
    assert cost.ideal_seconds == pytest.approx(74 + 54 + 34 + 34)
    assert cost.full_seconds == pytest.approx(4 * 74)
    assert cost.time_fraction == pytest.approx(196 / 240) and cost.speedup == pytest.approx(296 / 240)
    exact = plan_cost(exits, 4, times, sizes=None, lag=0)  # every count its own bucket, read at once
    assert exact.seconds == exact.ideal_seconds and exact.time_fraction == 1.0


def test_a_count_the_table_lacks_is_named():
    with pytest.raises(KeyError, match="no time at 48 rows"):
        plan_cost([1] * 20 + [2] * 20 + [4] * 24, 4, {n: 1.0 for n in range(1, 65) if n != 48}, lag=1)
    with pytest.raises(ValueError, match=r"1\.\.4"):
        plan_cost([0, 2], 4)


def test_the_simulation_runs_the_buckets_the_graphed_forward_runs():
    """The graphed step on the CPU with the GPU's sizes: Scheduled's known counts pick each bucket at
    once (lag 0 whatever the plan says), and the simulation with lag 0 gives the same layer calls."""
    schedule = torch.tensor([1] * 9 + [2] * 11 + [3] * 3 + [4] * 7)
    model = tiny_model("bert", seed=3)
    eek.patch(model, eek.Scheduled(schedule), backend="torch", step="graphed")
    state_of(model).static_batches = StaticBatches(sizes=DEFAULT_SIZES, lag=1)
    ids, mask, token_types = tiny_batch(30, 10, seed=2)
    adapter = current_adapter(model)
    seen = collections.Counter()
    original = adapter.run_layer

    def run_layer(index, hidden, layer_mask):
        seen[index + 1] = hidden.shape[0]
        return original(index, hidden, layer_mask)

    adapter.run_layer = run_layer
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
    finally:
        del adapter.run_layer
    assert torch.equal(out.exit_layer, schedule)
    cost = plan_cost(schedule, 4, sizes=DEFAULT_SIZES, lag=0)
    assert tuple(seen[layer] for layer in sorted(seen)) == cost.buckets == (32, 24, 16, 8)
