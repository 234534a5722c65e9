"""The continuous engine's layer calls under the graphed step (engine/engines/continuous/call_graphs.py): fixed shapes,
one static step per (layer, rows, length), captured in a CUDA graph on CUDA and uncaptured on the CPU."""

import pytest
import torch
from test_classify import _sequences, spread_model
from test_graphed_step import needs_cuda

import earlyexit_kernels as eek
from earlyexit_kernels.engine.engines.continuous.engine import ContinuousEngine
from earlyexit_kernels.patching.state import state_of


def _stream_predictions(model, items, step, **kwargs):
    eek.patch(model, state_of(model).policy, step=step)
    engine = ContinuousEngine(model, **kwargs)
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"], item.get("token_type_ids"))
    with torch.no_grad():
        finished = sorted(engine.run(), key=lambda f: f.key)
    return engine, finished


@pytest.mark.parametrize("name", ["entropy", "patience", "qexit", "dact"])
def test_the_continuous_engine_runs_graphed_calls_with_the_exact_steps_exits(name):
    items = _sequences(40, seed=1, longest=30)
    model, _ = spread_model("bert", name, items)
    _, exact = _stream_predictions(model, items, "exact", max_batch_size=8)
    engine, graphed = _stream_predictions(model, items, "graphed", max_batch_size=8)
    assert engine.graphed and engine._calls is not None
    assert [f.exit_layer for f in graphed] == [f.exit_layer for f in exact]
    assert [f.layers_run for f in graphed] == [f.layers_run for f in exact]
    for mine, theirs in zip(graphed, exact):
        torch.testing.assert_close(mine.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    assert len({f.exit_layer for f in exact}) > 1, "the test needs exits spread over layers"


def test_graphed_calls_take_fixed_shapes_and_read_back_once():
    items = _sequences(30, seed=2, longest=30)
    model, _ = spread_model("bert", "entropy", items)
    eek.patch(model, state_of(model).policy, step="graphed")
    engine = ContinuousEngine(model, max_batch_size=8)
    shapes = []
    original = engine._static_calls

    def recording():
        calls = original()
        run = calls.run

        def run_recorded(layer, hidden, mask, state, step):
            shapes.append(tuple(hidden.shape[:2]))
            return run(layer, hidden, mask, state, step)

        calls.run = run_recorded
        return calls

    engine._static_calls = recording
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"], item.get("token_type_ids"))
    with torch.no_grad():
        finished = list(engine.run())
    assert len(finished) == 30
    assert {rows for rows, _ in shapes} <= set(engine.buckets.row_counts)
    assert all(length % 8 == 0 for _, length in shapes)
    assert engine.stats.host_syncs <= len(shapes)


@needs_cuda
def test_on_the_gpu_the_continuous_engine_captures_its_calls_and_replays_them_on_a_second_stream():
    items = _sequences(48, seed=1, longest=30)
    model, policy = spread_model("bert", "entropy", items)
    model.cuda()
    eek.patch(model, policy, step="auto")
    first = list(eek.classify(model, items, max_batch_size=8))
    engine = ContinuousEngine(model, max_batch_size=8)
    assert engine.graphed
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"], item.get("token_type_ids"))
    with torch.no_grad():
        again = sorted(engine.run(), key=lambda f: f.key)
    graphs = engine._calls.graphs
    assert graphs.uncapturable is None, graphs.uncapturable
    assert graphs.captures > 0 and graphs.replays >= graphs.captures
    eek.patch(model, policy, step="exact")
    exact = sorted(eek.classify(model, items, max_batch_size=8), key=lambda p: p.index)
    assert [f.exit_layer for f in again] == [p.exit_layer for p in exact]
    assert [p.exit_layer for p in sorted(first, key=lambda p: p.index)] == [p.exit_layer for p in exact]


def test_a_new_policy_reaches_the_graphed_calls():
    """set_policy (online re-certification) between steps: the next calls decide with the new
    thresholds, the captured graphs that held the old ones are dropped (on CUDA)."""
    items = _sequences(32, seed=3, longest=30)
    model, policy = spread_model("bert", "entropy", items)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    eek.patch(model, policy, step="graphed")
    engine = ContinuousEngine(model, max_batch_size=8)
    for index, item in enumerate(items[:16]):
        engine.submit(index, item["input_ids"], item.get("token_type_ids"))
    with torch.no_grad():
        first = list(engine.run())
    engine.set_policy(eek.Entropy(0.0))  # nobody leaves before the last layer
    for index, item in enumerate(items[16:], start=16):
        engine.submit(index, item["input_ids"], item.get("token_type_ids"))
    with torch.no_grad():
        after = list(engine.run())
    assert any(f.exit_layer < model.config.num_hidden_layers for f in first)
    assert all(f.exit_layer == model.config.num_hidden_layers for f in after)


def test_classify_keeps_its_engine_and_graphs_between_calls_on_the_graphed_step():
    """``eek.classify`` on the graphed step lends the engine an earlier call with the same settings
    gave back, with its static calls (on a GPU, their CUDA graphs): captured once, not per call. A
    call stopped part-way gives back nothing; other settings, or a copy of the model, make their own."""
    import copy

    from earlyexit_kernels.engine.entry.classify import classify

    items = _sequences(24, seed=3, longest=30)
    model, _ = spread_model("bert", "entropy", items)
    eek.patch(model, state_of(model).policy, step="graphed")
    with torch.no_grad():
        first = list(classify(model, items, max_batch_size=8))
        kept = state_of(model).kept_engines
        ((_, engine),) = kept._idle.items()
        calls = engine._calls
        again = list(classify(model, items, max_batch_size=8))
        assert len(kept) == 1 and next(iter(kept._idle.values())) is engine and engine._calls is calls
        assert [p.exit_layer for p in again] == [p.exit_layer for p in first]
        assert all(torch.equal(a.logits, b.logits) for a, b in zip(again, first, strict=True))

        stopped = classify(model, items, max_batch_size=8, ordered=False)
        next(stopped)  # borrows the engine, then stops at the first sequence out, the others in flight
        assert len(kept) == 0
        stopped.close()
        assert len(kept) == 0, "an engine with sequences in flight is not kept"

        list(classify(model, items, max_batch_size=4))
        list(classify(model, items, max_batch_size=8))
        assert len(kept) == 2, "one engine per setting"
    assert len(state_of(copy.deepcopy(model)).kept_engines) == 0


def test_classify_on_the_exact_step_makes_an_engine_per_call():
    items = _sequences(8, seed=3, longest=20)
    model, _ = spread_model("bert", "entropy", items)
    eek.patch(model, state_of(model).policy, step="exact")
    from earlyexit_kernels.engine.entry.classify import classify

    with torch.no_grad():
        list(classify(model, items, max_batch_size=8))
    assert state_of(model).kept_engines is None
