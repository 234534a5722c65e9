"""The segment engine (engine/engines/segments/engine.py): E3's layer segments, each refilled to the token budget.

The layers run in segments; the rows that leave a segment alive wait in the next one's queue, where
the survivors of several calls fill one call. Each sequence exits where the exact step makes it exit;
a batch run alone through the segments gives the exact step's bits; later segments' calls are
refilled from several first-segment calls; no read-back stalls a layer; bad settings are refused."""

import pytest
import torch
from test_classify import _sequences, spread_model
from test_cohort_engine import _padded, _run, _sorted_cohorts, assert_engine_thread_runs, assert_exact_steps_exits

import earlyexit_kernels as eek
from earlyexit_kernels.engine.engines.choice import engine_kind, make_engine
from earlyexit_kernels.engine.engines.continuous.engine import ContinuousEngine
from earlyexit_kernels.engine.engines.launched import COHORTS_IN_FLIGHT
from earlyexit_kernels.engine.engines.segments.engine import SegmentEngine, default_segments
from earlyexit_kernels.engine.engines.segments.step import segment_bounds
from earlyexit_kernels.engine.graphed.buckets import DEFAULT_SIZES
from earlyexit_kernels.engine.graphed.static_step import StaticBatches
from earlyexit_kernels.engine.stream.engine_config import EngineConfig
from earlyexit_kernels.patching.state import state_of

ITEMS = _sequences(48, seed=6, longest=30)


@pytest.fixture(scope="module")
def entropy_model():
    """A tiny BERT whose Entropy policy spreads ``ITEMS``' exits over its 5 layers (made once: its calibration
    runs every item alone), patched on the graphed step for each test."""
    model, policy = spread_model("bert", "entropy", ITEMS)

    def patched():
        eek.patch(model, policy, step="graphed")
        return model

    return patched


@pytest.mark.parametrize("name", ["entropy", "patience", "qexit"])
def test_each_sequence_exits_where_the_exact_step_makes_it_exit(name):
    items = _sequences(48, seed=4, longest=30)
    model, policy = spread_model("bert", name, items)
    # float64: the logits are compared to 1e-12. They are not bit for bit: a sequence meets other rows
    # in each segment's call than in the exact step's batch, and the CPU's GEMMs round a row differently
    # with the number of rows they block (in float32 and float64 alike); the state the policy carries
    # across segments (Patience's count, QExit's previous pooled vector) is held bit for bit below.
    model.to(torch.float64)
    eek.patch(model, policy, step="exact")
    engine = SegmentEngine(model, max_batch_size=8, admission="length")
    finished = assert_exact_steps_exits(model, items, engine)
    assert len({done.exit_layer for done in finished.values()}) > 2, "the test needs exits in several segments"
    assert engine.stats.refilled_calls > 0  # the refilling was exercised, not only one batch at a time


@pytest.mark.parametrize("name", ["entropy", "patience", "qexit"])
def test_a_batch_alone_in_the_segments_gives_the_exact_steps_bits(name):
    """With one batch in the engine at a time, each later segment's call holds exactly the survivors of the
    call below, as the exact step's batch does after its compaction: the same rows in the same order, the
    same trimmed length, hence its bits (hidden states, mask and the policy's state handed on intact)."""
    items = _sequences(24, seed=5, longest=30)
    model, policy = spread_model("bert", name, items)
    eek.patch(model, policy, step="exact")
    engine = SegmentEngine(model, max_batch_size=8, admission="length", segments=3)  # 5 layers: 1-2, 3-4, 5
    exits = set()
    for cohort in _sorted_cohorts(items, 8):
        batch = [items[i] for i in cohort]
        finished = _run(engine, batch)
        assert engine.stats.refilled_calls == 0
        with torch.no_grad():
            exact = model(**_padded(batch))
        for row in range(len(batch)):
            done = finished[row]
            assert torch.equal(done.logits, exact.logits[row]), (row, done.logits, exact.logits[row])
            assert done.exit_layer == int(exact.exit_layer[row]) and done.layers_run == int(exact.layers_run[row])
            exits.add(done.exit_layer)
    assert len(exits) > 1 and max(exits) > engine.bounds[0][1], "the test needs rows handed on across segments"


def test_on_the_gpus_plan_the_same_exits_and_no_dead_row_reaches_a_live_one(entropy_model):
    """The CUDA plan on the CPU: fixed buckets, survivor counts read a layer late, so calls hold dead rows (and
    hand them on past their survivors); dead rows poisoned with NaN after every layer must never reach a live one."""
    model, items = entropy_model(), ITEMS
    with torch.no_grad():
        exact = model(**_padded(items))
    state = state_of(model)
    kept, state.static_batches = state.static_batches, StaticBatches(sizes=DEFAULT_SIZES, lag=1, dead_fill=float("nan"))
    try:
        engine = SegmentEngine(model, max_batch_size=12)
        finished = _run(engine, items)
    finally:
        state.static_batches = kept
    assert engine.stats.padded_rows > engine.stats.rows  # buckets larger than the rows alive: dead rows ran
    assert engine.stats.refilled_calls > 0
    for index, done in finished.items():
        assert done.exit_layer == int(exact.exit_layer[index]) and done.layers_run == int(exact.layers_run[index])
        torch.testing.assert_close(done.logits, exact.logits[index], rtol=1e-5, atol=1e-5)  # NaN fails here


def test_later_segments_are_refilled_from_several_first_segment_calls(entropy_model):
    engine = SegmentEngine(entropy_model(), max_batch_size=8, admission="fifo", segments=2)  # 5 layers: 1-3, 4-5
    finished = _run(engine, ITEMS)
    assert len(finished) == 48
    stats = engine.stats
    # 6 first-segment calls of 8 rows; their survivors (fewer than 8 each) share the second segment's calls
    assert stats.segment_calls[0] == 6
    assert stats.refilled_calls >= 1
    assert stats.segment_calls[1] < sum(done.exit_layer > 3 for done in finished.values()) / 4
    assert stats.segment_calls[1] < stats.segment_calls[0]


def test_engines_made_one_after_another_replay_the_buffers_and_graphs_the_first_made(entropy_model):
    """eek.classify makes an engine per call: the segments' buffers (and on CUDA their graphs) are the patched
    model's, kept with its static batches, so that a second call captures nothing anew."""
    model = entropy_model()
    first = SegmentEngine(model, max_batch_size=8)
    _run(first, ITEMS)
    buffers = dict(first._steps._statics)
    second = SegmentEngine(model, max_batch_size=8, segments=2)  # other segments, the same layers' steps
    assert second._steps is first._steps
    _run(SegmentEngine(model, max_batch_size=8), ITEMS)
    assert all(first._steps._statics[key] is static for key, static in buffers.items())


def test_no_read_back_stalls_a_layer_one_read_per_call_hands_the_survivors_on(entropy_model):
    model, items = entropy_model(), ITEMS
    engine = SegmentEngine(model, max_batch_size=8)
    _run(engine, items)
    stats = engine.stats
    assert stats.calls >= 12 and stats.host_syncs == 0  # no blocking read inside a call's layers
    # the hand-off: one read of a call's survivors per call below the last segment, never per layer
    assert stats.handoff_reads == sum(stats.segment_calls[:-1])
    continuous = ContinuousEngine(model, max_batch_size=8)
    _run(continuous, items)
    assert continuous.stats.host_syncs / continuous.stats.calls > 0.5  # the contrast: the check can fail


def test_a_calls_outputs_are_read_after_the_next_call_is_launched(entropy_model):
    items = ITEMS[:24]
    engine = SegmentEngine(entropy_model(), max_batch_size=8, admission="fifo")
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"], item["token_type_ids"])
    with torch.no_grad():
        assert engine.step() == []  # the first call launched, nothing read yet
        assert engine.in_flight == 8 and engine.pending == 16 and len(engine._unread) == 1
        engine.step()  # the second launched, then the first read back: its exits returned, its survivors queued
        assert len(engine._unread) == COHORTS_IN_FLIGHT - 1 and engine.stats.handoff_reads == 1
        rest = list(engine.run())
    assert engine.idle and engine.in_flight == 0 and len(rest) <= 24


def test_every_call_holds_what_the_token_budget_allows(entropy_model):
    items = ITEMS
    engine = SegmentEngine(entropy_model(), max_batch_size=None, max_tokens=64)
    assert len(_run(engine, items)) == 48
    assert engine.stats.largest_call <= 64 or engine.stats.largest_call == max(len(i["input_ids"]) for i in items)


def test_the_layers_split_into_equal_segments_by_default():
    assert segment_bounds(12, 3) == [(1, 4), (5, 8), (9, 12)]  # equal thirds
    assert segment_bounds(5, 3) == [(1, 2), (3, 4), (5, 5)]  # the first ones a layer longer
    assert segment_bounds(6, 1) == [(1, 6)]
    assert default_segments(12) == 3 and default_segments(2) == 2
    items = _sequences(4, seed=7)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="graphed")
    assert SegmentEngine(model).bounds == [(1, 2), (3, 4), (5, 5)]
    assert SegmentEngine(model, segments=5).bounds == [(layer, layer) for layer in range(1, 6)]


def test_bad_settings_and_input_are_refused_with_what_to_fix():
    items = _sequences(4, seed=7)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="graphed")
    with pytest.raises(ValueError, match=r"segments must be an integer in 1\.\.5 \(the model's layers\), got 6"):
        SegmentEngine(model, segments=6)
    with pytest.raises(ValueError, match="segments must be an integer >= 1 or None, got 0"):
        EngineConfig(engine="segments", segments=0)
    with pytest.raises(ValueError, match="engine must be .*'segments'"):
        EngineConfig(engine="e3")
    with pytest.raises(ValueError, match="continuous engine"):
        SegmentEngine(model, compile=True)
    with pytest.raises(ValueError, match="max_in_flight must be an integer >= max_batch_size=8"):
        SegmentEngine(model, max_batch_size=8, max_in_flight=4)
    engine = SegmentEngine(model, max_batch_size=8)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit("a", [1, 2, 10**6])
    with pytest.raises(ValueError, match="it must have 1..64"):
        engine.submit("b", [])
    eek.patch(model, eek.SkipGates(0.5, entropy_threshold=0.1), step="exact")
    with pytest.raises(ValueError, match="cannot run SkipGates"):
        SegmentEngine(model)
    eek.patch(model, eek.Scheduled(torch.ones(2, dtype=torch.long)), step="graphed")
    with pytest.raises(ValueError, match="Scheduled replays exit layers"):
        SegmentEngine(model)


def test_cancelled_sequences_are_not_returned_pending_queued_or_launched(entropy_model):
    items = ITEMS
    engine = SegmentEngine(entropy_model(), max_batch_size=8, max_in_flight=16, admission="fifo")
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"], item["token_type_ids"])
    returned = []
    with torch.no_grad():
        while not engine._queues[1] or not engine._unread:  # rows waiting at the second segment, a call in flight
            returned += [done.key for done in engine.step()]
        queued = engine._queues[1][0].keys[0]
        launched = engine._unread[-1].keys[0]
        pending = next(iter(engine._pending))[2]
        cancel = [queued, launched, pending, 99]
        assert engine.cancel(cancel) == 3
        returned += [done.key for done in engine.run()]
    assert sorted(returned) == [k for k in range(48) if k not in cancel]
    assert engine.in_flight == 0


def test_auto_never_takes_the_segments_they_run_by_name_in_classify_and_the_engine_thread(entropy_model):
    items = ITEMS[:30]
    model = entropy_model()
    assert engine_kind(model, EngineConfig()) == "continuous"  # on the CPU; on CUDA the cohorts
    assert engine_kind(model, EngineConfig(engine="segments")) == "segments"
    assert isinstance(make_engine(model, EngineConfig(engine="segments", segments=2)), SegmentEngine)
    assert_engine_thread_runs(model, items, "segments", SegmentEngine)


def test_concurrent_clients_on_the_segment_engine_get_eek_classify_s_answers(loaded_classifier):
    pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
    pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
    httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")
    from conftest import word_texts
    from served_models import serving

    model, tokenizer = loaded_classifier
    eek.patch(model, state_of(model).policy, step="graphed")
    texts = [t or "w1" for t in word_texts(48, seed=22)]
    expected = list(eek.classify(model, texts, tokenizer=tokenizer, engine="continuous"))
    segmented = list(eek.classify(model, texts, tokenizer=tokenizer, engine="segments", max_batch_size=8))
    assert [r.exit_layer for r in segmented] == [r.exit_layer for r in expected]
    with serving(model, tokenizer, max_batch_size=16, engine="segments") as running:
        assert isinstance(running.app.state.eek.worker.engine, SegmentEngine)

        def ask(i):
            return httpx.post(running.url + "/predict", json={"inputs": [[texts[i]]], "raw_scores": True}, timeout=60)

        responses = [ask(i) for i in range(24)]
    for i, response in enumerate(responses):
        assert response.status_code == 200
        answer = response.json()[0]
        assert answer[0]["exit_layer"] == expected[i].exit_layer
