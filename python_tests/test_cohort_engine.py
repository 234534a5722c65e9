"""The cohort engine (engine/engines/cohort_engine.py), the GPU's stream engine, on its CPU twin.

Sequences run in length-sorted cohorts through the patched model's step; each cohort's outputs
are the patched model's on that cohort, bit for bit; no read-back stalls a layer; a cohort's
exits are read after the next cohort has been launched; calls are sized by a token budget."""

import pytest
import torch
from test_classify import _sequences, spread_model

import earlyexit_kernels as eek
from earlyexit_kernels.engine.engines.choice import engine_kind
from earlyexit_kernels.engine.engines.cohort_engine import CohortEngine
from earlyexit_kernels.engine.engines.continuous.engine import ContinuousEngine
from earlyexit_kernels.engine.engines.launched import COHORTS_IN_FLIGHT, cohort_size, copy_to_host
from earlyexit_kernels.engine.entry.background import BackgroundEngine
from earlyexit_kernels.engine.stream.engine_config import EngineConfig
from earlyexit_kernels.patching.state import state_of


def _padded(items):
    """The batch the patched model takes for ``items``: ids, types and a right-padding mask."""
    longest = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n] = torch.tensor(item["input_ids"])
        types[row, :n] = torch.tensor(item["token_type_ids"])
        mask[row, :n] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def _run(engine, items):
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"], item.get("token_type_ids"))
    with torch.no_grad():
        return {done.key: done for done in engine.run()}


def _sorted_cohorts(items, rows):
    """The cohorts a length sweep makes of sequences all pending at once: the length-sorted order
    (ties in arrival order), ``rows`` at a time."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i]["input_ids"]), i))
    return [order[start : start + rows] for start in range(0, len(order), rows)]


@pytest.mark.parametrize("step", ["graphed", "exact"])
@pytest.mark.parametrize("name", ["entropy", "patience", "qexit"])
def test_each_cohort_gives_the_patched_models_outputs_on_it_bit_for_bit(name, step):
    items = _sequences(37, seed=4, longest=30)
    model, policy = spread_model("bert", name, items)
    eek.patch(model, policy, step=step)
    engine = CohortEngine(model, max_batch_size=8, admission="length")
    finished = _run(engine, items)
    assert sorted(finished) == list(range(len(items)))
    exits = []
    for cohort in _sorted_cohorts(items, 8):
        with torch.no_grad():
            out = model(**_padded([items[i] for i in cohort]))
        for row, index in enumerate(cohort):
            done = finished[index]
            assert torch.equal(done.logits, out.logits[row]), (index, done.logits, out.logits[row])
            assert done.exit_layer == int(out.exit_layer[row]) and done.layers_run == int(out.layers_run[row])
            exits.append(done.exit_layer)
    assert len(set(exits)) > 1, "the test needs exits spread over layers"


def test_the_cohorts_agree_with_the_continuous_engine_on_every_exit():
    items = _sequences(40, seed=1, longest=30)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="graphed")
    cohorts = _run(CohortEngine(model, max_batch_size=8), items)
    continuous = _run(ContinuousEngine(model, max_batch_size=8), items)
    assert [cohorts[i].exit_layer for i in range(40)] == [continuous[i].exit_layer for i in range(40)]
    for i in range(40):
        torch.testing.assert_close(cohorts[i].logits, continuous[i].logits, rtol=1e-5, atol=1e-5)


def test_no_read_back_stalls_a_layer_where_the_continuous_engine_reads_back_every_exit_layer():
    items = _sequences(48, seed=2, longest=30)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="graphed")
    cohorts = CohortEngine(model, max_batch_size=8)
    _run(cohorts, items)
    assert cohorts.stats.calls >= 6 and cohorts.stats.host_syncs == 0  # six cohorts of 8, each a layer or more
    continuous = ContinuousEngine(model, max_batch_size=8)
    _run(continuous, items)
    assert continuous.stats.host_syncs / continuous.stats.calls > 0.5  # the contrast: the check can fail


def test_a_cohorts_exits_are_read_after_the_next_cohort_is_launched():
    items = _sequences(24, seed=3, longest=20)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="graphed")
    engine = CohortEngine(model, max_batch_size=8)
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"], item["token_type_ids"])
    with torch.no_grad():
        assert engine.step() == []  # the first cohort launched, nothing read yet
        assert engine.in_flight == 8 and engine.pending == 16
        second = engine.step()  # the second launched, then the first read back
        assert len(second) == 8 and engine.in_flight == 8 and engine.pending == 8
        assert len(engine._cohorts) == COHORTS_IN_FLIGHT - 1
        rest = list(engine.run())
    assert len(rest) == 16 and engine.idle


def test_a_cohort_holds_what_the_token_budget_allows():
    assert cohort_size([5, 6, 7, 8, 9], max_rows=100, max_tokens=24, length_step=1) == 3  # 3 x 7 fits, 4 x 8 not
    assert cohort_size([5, 6, 7, 8, 9], max_rows=100, max_tokens=24, length_step=8) == 3  # padded to 8
    assert cohort_size([5, 6, 7, 8, 9], max_rows=2, max_tokens=10**6, length_step=1) == 2
    assert cohort_size([300, 301], max_rows=8, max_tokens=256, length_step=1) == 1  # alone, over the budget
    items = _sequences(30, seed=5, longest=30)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="graphed")
    engine = CohortEngine(model, max_batch_size=None, max_tokens=64)
    finished = _run(engine, items)
    assert len(finished) == 30
    assert engine.stats.largest_call <= 64 or engine.stats.largest_call == max(len(i["input_ids"]) for i in items)


def test_cancelled_sequences_are_not_returned_pending_or_launched():
    items = _sequences(24, seed=6, longest=20)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="graphed")
    engine = CohortEngine(model, max_batch_size=8, admission="fifo")
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"], item["token_type_ids"])
    with torch.no_grad():
        engine.step()  # 0..7 launched
        assert engine.cancel([3, 20, 99]) == 2
        keys = [done.key for done in engine.run()]
    assert sorted(keys) == [k for k in range(24) if k not in (3, 20)]


def test_bad_input_is_refused_at_submission_with_what_to_fix():
    items = _sequences(4, seed=7)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="graphed")
    engine = CohortEngine(model, max_batch_size=8)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit("a", [1, 2, 10**6])
    with pytest.raises(ValueError, match="it must have 1..64"):
        engine.submit("b", [])
    with pytest.raises(ValueError, match="continuous engine"):
        CohortEngine(model, compile=True)
    with pytest.raises(ValueError, match="engine must be"):
        EngineConfig(engine="gpu")
    eek.patch(model, eek.Scheduled(torch.ones(2, dtype=torch.long)), step="graphed")
    with pytest.raises(ValueError, match="Scheduled replays exit layers"):
        CohortEngine(model)


def test_auto_takes_the_cohorts_on_cuda_only():
    items = _sequences(4, seed=7)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="graphed")
    assert engine_kind(model, EngineConfig()) == "continuous"  # on the CPU
    assert engine_kind(model, EngineConfig(engine="cohorts")) == "cohorts"


def test_classify_and_the_engine_thread_run_on_the_cohorts():
    items = _sequences(30, seed=8, longest=24)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="graphed")
    assert_engine_thread_runs(model, items, "cohorts", CohortEngine)
    assert state_of(model).policy is policy


def assert_exact_steps_exits(model, items, engine) -> dict:
    """``engine`` runs ``items``; every item's exit layer and layers run are the exact step's on the padded batch
    of all items, its logits within 1e-12 (float64: an engine's rows meet other rows in each GEMM, and the packed
    attention runs on another grid, which the CPU's kernels round differently, by a few ulps)."""
    finished = _run(engine, items)
    assert sorted(finished) == list(range(len(items)))
    with torch.no_grad():
        exact = model(**_padded(items))
    for index, done in finished.items():
        assert done.exit_layer == int(exact.exit_layer[index]), index
        assert done.layers_run == int(exact.layers_run[index]), index
        torch.testing.assert_close(done.logits, exact.logits[index], rtol=0, atol=1e-12)
    return finished


def assert_engine_thread_runs(model, items, engine: str, engine_class) -> None:
    """The engine thread (``eek serve``'s) runs ``engine`` and gives the cohort engine's exits, in order."""
    expected = _run(CohortEngine(model, max_batch_size=8, admission="fifo"), items)
    worker = BackgroundEngine(model, max_batch_size=8, admission="fifo", engine=engine)
    try:
        assert isinstance(worker.engine, engine_class)
        futures = worker.submit_many([(item["input_ids"], item["token_type_ids"]) for item in items])
        results = [future.result(timeout=60) for future in futures]
    finally:
        worker.close()
    assert [r.exit_layer for r in results] == [expected[i].exit_layer for i in range(len(items))]


def test_outputs_packed_in_one_buffer_come_back_in_one_copy_as_the_same_views():
    from earlyexit_kernels.engine.graphed.static_buffers import PackedOutputs

    packed = PackedOutputs.make(5, 3, torch.bfloat16, "cpu")
    packed.logits.copy_(torch.randn(5, 3))
    packed.exit_layer.copy_(torch.arange(5))
    packed.layers_run.copy_(torch.arange(5) * 2)
    logits, exit_layer, layers_run = PackedOutputs.views(packed.buffer.clone(), 5, 3, torch.bfloat16)
    outputs = (logits[:4], exit_layer[:4], layers_run[:4])  # as run_graphed returns a batch of 4
    copies = copy_to_host(outputs, pin=False)
    assert len({c.untyped_storage().data_ptr() for c in copies}) == 1  # one buffer, one copy
    assert copies[0].untyped_storage().data_ptr() != outputs[0].untyped_storage().data_ptr()
    for copy, output in zip(copies, outputs):
        assert copy.shape == output.shape and torch.equal(copy, output)
    apart = (torch.randn(4, 3), torch.arange(4), torch.arange(4))  # the exact step's: three tensors
    assert all(torch.equal(c, o) for c, o in zip(copy_to_host(apart, pin=False), apart))


def test_a_streams_buffers_settle_where_rows_and_lengths_trade_places_under_the_budget():
    """Under a token budget a length sweep makes many short rows, then a few long ones: the static batch is made
    anew only while either dimension still grows (its graphs go with it on a GPU), then serves every later pass."""
    from test_graphed_step import GPU_PLAN

    from earlyexit_kernels.engine.graphed.static_step import StaticBatches

    items = _sequences(96, seed=8, longest=60)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="graphed")
    batches = state_of(model).static_batches = StaticBatches(**GPU_PLAN)
    first = _run(CohortEngine(model, max_batch_size=None, max_tokens=512), items)
    made = batches.made
    again = _run(CohortEngine(model, max_batch_size=None, max_tokens=512), items)
    assert 1 <= made <= 3  # grown to the most rows and the longest length (sized to each cohort: 9, then 8 a pass)
    assert batches.made == made, "a second pass over the same stream makes no buffers"
    assert {k: v.exit_layer for k, v in again.items()} == {k: v.exit_layer for k, v in first.items()}
