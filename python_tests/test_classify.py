"""``eek.classify``: each prediction equals the patched model on that sequence alone.

The models are tiny and random; their exit heads are perturbed so that predictions
differ from layer to layer, and every threshold lies midway between two of the values
the rule compares it with, so that exits spread over the layers and no rounding can
flip a decision.
"""

import gc
import itertools
import warnings

import pytest
import torch
from conftest import VOCAB, tiny_model, word_vocab

import earlyexit_kernels as eek
from earlyexit_kernels.engine.engines.continuous.engine import ContinuousEngine
from earlyexit_kernels.methods.exit_rules import entropy
from earlyexit_kernels.patching.patch import current_adapter

NUM_LAYERS = 5


def _sequences(count, *, seed=0, longest=40, pairs=True):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(2, longest + 1, (1,), generator=generator))
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        item = {"input_ids": ids}
        if pairs:
            first = length // 2
            item["token_type_ids"] = [0] * first + [1] * (length - first)
        out.append(item)
    return out


def _alone(model, item):
    with torch.no_grad():
        kwargs = {"input_ids": torch.tensor([item["input_ids"]])}
        if "token_type_ids" in item:
            kwargs["token_type_ids"] = torch.tensor([item["token_type_ids"]])
        return model(**kwargs)


def _midway_below_median(values):
    """A threshold halfway between the two distinct values around the median of ``values``."""
    values = sorted(set(values))
    middle = len(values) // 2
    return (values[middle - 1] + values[middle]) / 2


def _all_exits(model, items):
    """Every head's logits and the halting probabilities of each sequence run alone."""
    outs = []
    for item in items:
        with torch.no_grad():
            kwargs = {"input_ids": torch.tensor([item["input_ids"]])}
            if "token_type_ids" in item:
                kwargs["token_type_ids"] = torch.tensor([item["token_type_ids"]])
            outs.append(model(**kwargs, return_all_exits=True))
    return outs


def _perturb(modules, scale, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def spread_model(arch, name, items):
    """A patched tiny model whose policy ``name`` sends ``items`` out at several layers."""
    model = tiny_model(arch, num_layers=NUM_LAYERS)
    probe_policy = {"entropy": eek.Entropy(0.0), "skipgates": eek.Entropy(0.0), "maxprob": eek.MaxProb(1.0)}.get(
        name,
        {"qexit": eek.QExit(0.5), "patience": eek.Patience(1), "voting": eek.Voting(2), "dact": eek.DACT()}.get(name),
    )
    eek.patch(model, probe_policy)
    heads = model.early_exit_heads
    _perturb([current_adapter(model).pooler_linear], 0.5, seed=3)  # pooled vectors that differ from input to input
    _perturb(heads.classifiers, 0.5)
    if heads.halting_head(probe_policy) is not None:
        _perturb([heads.halting_head(probe_policy)], 1.5, seed=1)
    if name in ("entropy", "skipgates"):
        values = [entropy(out.all_logits[:-1, 0]) for out in _all_exits(model, items)]
        threshold = _midway_below_median(itertools.chain(*(v.tolist() for v in values)))
        policy = eek.Entropy(threshold) if name == "entropy" else eek.SkipGates(0.5, entropy_threshold=threshold)
    elif name == "maxprob":
        # Around the median of layer 1's values: half leave there, the others later.
        values = [float(out.all_logits[0, 0].softmax(-1).max()) for out in _all_exits(model, items)]
        policy = eek.MaxProb(_midway_below_median(values))
    elif name == "qexit":
        cdfs = []
        for out in _all_exits(model, items):
            lam = out.all_halting[:, 0]
            remaining = torch.cumprod(torch.cat([torch.ones(1), 1 - lam[:-1]]), 0)
            cdfs += torch.cumsum(lam * remaining, 0)[:-1].tolist()
        policy = eek.QExit(_midway_below_median(cdfs))
    else:
        policy = probe_policy
    eek.patch(model, policy)  # keeps the perturbed heads
    if name == "skipgates":
        _perturb(heads.gates, 1.5, seed=2)  # gate values do not move the entropies
    return model, policy


POLICIES = ("entropy", "maxprob", "patience", "voting", "qexit", "dact", "skipgates")


@pytest.mark.parametrize("name", POLICIES)
def test_each_prediction_equals_the_model_on_that_sequence_alone(arch, name):
    items = _sequences(48, seed=1)
    model, _ = spread_model(arch, name, items)
    predictions = list(eek.classify(model, items, max_batch_size=8, max_in_flight=16))

    assert [p.index for p in predictions] == list(range(len(items)))
    for prediction, item in zip(predictions, items):
        alone = _alone(model, item)
        assert prediction.exit_layer == int(alone.exit_layer)
        assert prediction.layers_run == int(alone.layers_run)
        torch.testing.assert_close(prediction.logits, alone.logits[0], rtol=0, atol=1e-5)
    if name != "dact":  # DACT's untrained-looking halting head may keep everyone to the end
        assert len({p.exit_layer for p in predictions}) >= 2, "the exits should spread over the layers"
    if name == "skipgates":
        assert any(p.layers_run < p.exit_layer for p in predictions), "some layers should be skipped"


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("name", ["entropy", "qexit", "voting"])
def test_every_backend_gives_the_predictions_of_the_model_alone(backend, name):
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r}: {eek.backend_status()[backend]}")
    items = _sequences(24, seed=2)
    model, policy = spread_model("bert", name, items)
    eek.patch(model, policy, backend=backend)
    for prediction, item in zip(eek.classify(model, items, max_batch_size=8), items):
        alone = _alone(model, item)
        assert prediction.exit_layer == int(alone.exit_layer)
        torch.testing.assert_close(prediction.logits, alone.logits[0], rtol=0, atol=1e-5)


def test_bfloat16_predictions_match_within_its_rounding():
    items = _sequences(24, seed=3)
    model, _ = spread_model("bert", "patience", items)
    model.to(torch.bfloat16)
    for prediction, item in zip(eek.classify(model, items, max_batch_size=8), items):
        alone = _alone(model, item)
        assert prediction.logits.dtype == torch.bfloat16
        assert prediction.exit_layer == int(alone.exit_layer)
        torch.testing.assert_close(prediction.logits, alone.logits[0], rtol=0, atol=3e-2)


def _tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    return BertTokenizerFast(vocab=str(word_vocab(tmp_path, words)))


def test_texts_and_text_pairs_go_through_the_tokenizer(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    model = eek.patch(tiny_model("bert", num_layers=3), eek.Patience(1))
    inputs = ["alpha beta gamma", ("delta eps", "zeta eta theta alpha"), "", "theta " * 7]
    predictions = list(eek.classify(model, inputs, tokenizer=tokenizer, max_batch_size=4))
    for prediction, item in zip(predictions, inputs):
        encoded = tokenizer(*(item if isinstance(item, tuple) else (item,)), return_tensors="pt")
        with torch.no_grad():
            alone = model(**encoded)
        assert prediction.exit_layer == int(alone.exit_layer)
        torch.testing.assert_close(prediction.logits, alone.logits[0], rtol=0, atol=1e-5)


def test_long_texts_are_truncated_with_one_warning(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    model = eek.patch(tiny_model("bert", num_layers=2), eek.Patience(1))
    inputs = ["alpha " * 30, "beta", "gamma " * 40]
    with pytest.warns(UserWarning, match="longer than max_length=10") as caught:
        predictions = list(eek.classify(model, inputs, tokenizer=tokenizer, max_length=10))
    assert len([w for w in caught if "max_length" in str(w.message)]) == 1
    truncated = tokenizer(inputs[0], truncation=True, max_length=10, return_tensors="pt")
    with torch.no_grad():
        alone = model(**truncated)
    torch.testing.assert_close(predictions[0].logits, alone.logits[0], rtol=0, atol=1e-5)


def test_unordered_output_yields_every_sequence_once_as_it_exits():
    items = _sequences(40, seed=4)
    model, _ = spread_model("bert", "patience", items)
    ordered = list(eek.classify(model, items, max_batch_size=8))
    unordered = list(eek.classify(model, items, max_batch_size=8, ordered=False))
    assert sorted(p.index for p in unordered) == list(range(40))
    assert [p.index for p in unordered] != list(range(40))  # early exits overtake
    by_index = {p.index: p for p in unordered}
    assert all(by_index[p.index].exit_layer == p.exit_layer for p in ordered)


def test_a_generator_is_read_lazily():
    model = eek.patch(tiny_model("bert", num_layers=2), eek.Patience(1))
    pulled = 0

    def endless():
        nonlocal pulled
        for item in itertools.cycle(_sequences(10, seed=5)):
            pulled += 1
            yield item

    stream = eek.classify(model, endless(), max_batch_size=4, max_in_flight=8, read_ahead=16)
    first = list(itertools.islice(stream, 20))
    assert [p.index for p in first] == list(range(20))
    assert pulled <= 20 + 16 + 8 + 4  # yielded, read_ahead + max_in_flight, one tokenizing chunk


def test_an_empty_stream_yields_nothing():
    model = eek.patch(tiny_model("bert", num_layers=2), eek.Patience(1))
    assert list(eek.classify(model, [])) == []


def _recorded_calls(engine, before=None):
    """The layer calls ``engine`` runs from now on; ``before(call)`` runs as each begins."""
    calls = []
    run_call = engine._run_call

    def recording(call):
        calls.append(call)
        if before is not None:
            before(call)
        return run_call(call)

    engine._run_call = recording
    return calls


def test_eager_calls_run_their_exact_rows_and_lengths_with_at_most_one_read_back():
    items = _sequences(64, seed=6)
    model, _ = spread_model("bert", "entropy", items)
    engine = ContinuousEngine(model, max_batch_size=8, max_in_flight=32)
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"], item["token_type_ids"])
    calls = _recorded_calls(engine)
    finished = list(engine.run())
    assert len(finished) == 64
    assert engine.stats.host_syncs <= engine.stats.calls
    assert all(call.padded_rows == len(call.rows) for call in calls)  # no pad rows
    # no pad length: each call as long as its longest row, which the engine's token count shows
    lengths = [len(item["input_ids"]) for item in items]
    assert engine.stats.tokens == sum(lengths[done.key] * done.layers_run for done in finished)
    assert engine.stats.slots == sum(len(c.rows) * c.padded_length for c in calls)
    assert len({c.padded_length for c in calls}) > 8  # lengths other than multiples of a step


def test_outputs_kept_for_later_calls_stay_bounded_and_are_gone_when_the_stream_is():
    from earlyexit_kernels.engine.engines.continuous.engine import KEPT_OUTPUTS

    items = _sequences(96, seed=9)
    model, _ = spread_model("bert", "entropy", items)
    engine = ContinuousEngine(model, max_batch_size=8, max_in_flight=48)
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"], item["token_type_ids"])
    kept, read_from_kept = [], []
    _recorded_calls(engine, before=lambda call: read_from_kept.append(sum(slot in engine._held for slot in call.rows)))
    while not engine.idle:
        engine.step()
        kept.append(len(engine._residents))
        largest = max((resident.hidden.numel() for resident in engine._residents), default=0)
        assert engine._kept_states() <= max(engine._tokens.pool.numel(), largest)
    assert max(kept) <= KEPT_OUTPUTS and max(kept) > 1
    assert sum(read_from_kept) > engine.stats.rows // 4  # 103 of 200: rows come from kept outputs, not the pool
    assert engine._residents == [] and engine._held == {}


def test_compiled_calls_take_their_shapes_from_the_fixed_sets():
    items = _sequences(37, seed=6)  # the last batch holds 5 rows: padded to 8
    model = eek.patch(tiny_model("bert", num_layers=3, attn="sdpa"), eek.Patience(1))
    engine = ContinuousEngine(model, max_batch_size=8, max_in_flight=16, compile=True)
    assert engine.buckets.row_counts == (1, 2, 4, 8) and engine.buckets.length_step == 8
    engine._run_layer = engine.adapter.run_layer  # the shapes are the scheduler's: no need to compile here
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"])
    calls = _recorded_calls(engine)
    assert len(list(engine.run())) == 37
    assert {c.padded_rows for c in calls} <= {1, 2, 4, 8}
    assert {c.padded_length for c in calls} <= set(range(8, 65, 8))
    assert any(c.padded_rows > len(c.rows) for c in calls)  # some were padded to a row count


def test_layers_where_nobody_can_exit_read_nothing_back():
    items = _sequences(16, seed=7)
    model = eek.patch(tiny_model("bert", num_layers=4), eek.Patience(3))  # no exit before layer 4
    engine = ContinuousEngine(model, max_batch_size=16)
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"])
    assert all(done.exit_layer == 4 for done in engine.run())
    assert engine.stats.calls == 4 and engine.stats.host_syncs == 1


def test_compiled_layer_calls_do_not_recompile_after_warm_up():
    from torch._dynamo.utils import counters

    items = _sequences(24, seed=8, longest=14)
    model = eek.patch(tiny_model("bert", num_layers=2, attn="sdpa"), eek.Patience(1))
    eager = list(eek.classify(model, items, max_batch_size=4))
    warm = list(eek.classify(model, items, max_batch_size=4, compile=True))
    graphs = counters["stats"]["unique_graphs"]
    again = list(eek.classify(model, items, max_batch_size=4, compile=True))
    assert counters["stats"]["unique_graphs"] == graphs, "the second pass compiled new graphs"
    for a, b, c in zip(eager, warm, again):
        assert a.exit_layer == b.exit_layer == c.exit_layer
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(c.logits, a.logits, rtol=0, atol=1e-5)


def test_a_fresh_engine_reuses_the_graphs_an_earlier_engine_compiled():
    """A server starts its engine anew after an error (``BackgroundEngine``): the new engine's
    compiled layer calls reuse the graphs of the shapes met before instead of compiling them again
    (a code reading suspected each new engine's ``torch.compile`` recompiled them all)."""
    from torch._dynamo.utils import counters

    items = _sequences(24, seed=9, longest=14)
    model = eek.patch(tiny_model("bert", num_layers=2, attn="sdpa"), eek.Patience(1))

    def run_fresh_engine():
        engine = ContinuousEngine(model, max_batch_size=4, compile=True)
        for index, item in enumerate(items):
            engine.submit(index, item["input_ids"])
        return sorted(engine.run(), key=lambda done: done.key)

    first = run_fresh_engine()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    second = run_fresh_engine()
    assert counters["stats"]["unique_graphs"] == graphs, "the fresh engine compiled the same shapes again"
    for a, b in zip(first, second):
        assert a.exit_layer == b.exit_layer
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "inputs, kwargs, error, message",
    [
        (["some text"], {}, ValueError, "no tokenizer"),
        ([3.5], {}, TypeError, "expected a str"),
        ([("a", "b", "c")], {}, TypeError, "two strings"),
        ([{"ids": [1, 2]}], {}, TypeError, "needs input_ids"),
        ([{"input_ids": []}], {}, ValueError, "no tokens"),
        ([{"input_ids": [2, 5], "attention_mask": [0, 1]}], {}, ValueError, "ones then zeros"),
        ([{"input_ids": [2, 5]}], {"max_length": 4096}, ValueError, "max_length must be"),
        ([{"input_ids": [2, 5]}], {"max_batch_size": 0}, ValueError, "max_batch_size"),
    ],
)
def test_bad_input_gets_a_clear_error(inputs, kwargs, error, message):
    model = eek.patch(tiny_model("bert", num_layers=2), eek.Patience(1))
    with pytest.raises(error, match=message):
        list(eek.classify(model, inputs, **kwargs))


def test_a_model_that_cannot_stream_is_refused():
    with pytest.raises(ValueError, match="patched with eek.patch"):
        eek.classify(tiny_model("bert", num_layers=2), [])
    model = eek.patch(tiny_model("bert", num_layers=2), eek.Scheduled(torch.tensor([1])))
    with pytest.raises(ValueError, match="Scheduled"):
        eek.classify(model, [])
    model = eek.patch(tiny_model("bert", num_layers=2), eek.Patience(1)).train()
    with pytest.raises(ValueError, match="model.eval"):
        eek.classify(model, [])


def test_the_engine_takes_token_ids_as_integers_only():
    engine = ContinuousEngine(eek.patch(tiny_model("bert", num_layers=2), eek.Patience(1)))
    for ids in ([2, 7, 9], (2, 7, 9), torch.tensor([2, 7, 9]), torch.tensor([2, 7, 9], dtype=torch.int32)):
        engine.submit("ok", ids)
    assert engine.pending == 4
    with pytest.raises(TypeError, match="input_ids must be a flat sequence of integers"):
        engine.submit("floats", [2.0, 7.5])
    with pytest.raises(TypeError, match="token_type_ids must be a flat sequence of integers"):
        engine.submit("types", [2, 7], token_type_ids=[[0, 1]])


def test_a_right_padded_token_input_is_stripped_of_its_padding():
    model = eek.patch(tiny_model("bert", num_layers=2), eek.Patience(1))
    padded = {"input_ids": [2, 7, 9, 0, 0], "attention_mask": [1, 1, 1, 0, 0]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (prediction,) = eek.classify(model, [padded])
    alone = _alone(model, {"input_ids": [2, 7, 9]})
    torch.testing.assert_close(prediction.logits, alone.logits[0], rtol=0, atol=1e-5)


def test_pending_sequences_are_entries_the_garbage_collector_stops_tracking():
    # A read-ahead of thousands of tracked objects would lengthen and multiply full collections.
    engine = ContinuousEngine(eek.patch(tiny_model("bert", num_layers=2), eek.Patience(1)))
    for key in range(50):
        engine.submit(key, [2, 7, 9], token_type_ids=[0, 0, 0])
    engine.submit("a text key", [2, 7])
    gc.collect()
    assert engine.pending == 51 and not any(gc.is_tracked(entry) for entry in engine._pending)


def test_length_admission_sweeps_lengths_and_starves_no_one():
    model = eek.patch(tiny_model("bert", num_layers=2), eek.Patience(1))
    engine = ContinuousEngine(model, max_batch_size=4, max_in_flight=4, admission="length")
    admitted = []
    admit = engine._admit
    engine._admit = lambda entries: (admitted.append([length for length, *_ in entries]), admit(entries))
    lengths = [30, 3, 30, 12, 30, 7, 30, 30, 20, 30, 30, 5]
    for key, length in enumerate(lengths):
        engine.submit(key, [5] * length)
    assert sorted(done.key for done in engine.run()) == list(range(len(lengths)))
    assert admitted[0] == [3, 5, 7, 12]  # the shortest first, together
    assert admitted[1][0] == 20 and admitted[1] == sorted(admitted[1])  # on from where the sweep stopped


def test_length_admission_wraps_around_to_sequences_shorter_than_the_sweep():
    model = eek.patch(tiny_model("bert", num_layers=2), eek.Patience(1))
    engine = ContinuousEngine(model, max_batch_size=4, max_in_flight=4, admission="length")
    for key in range(4):
        engine.submit(key, [5] * 30)
    engine.step()  # the sweep now stands past 30
    engine.submit(4, [5] * 3)
    for key in range(5, 9):
        engine.submit(key, [5] * 30)  # as long as the last ones: the sweep has passed them too
    finished = []
    while len(finished) < 5:
        finished += [done.key for done in engine.step()]
    assert 4 in finished  # the short one went in with the next admission
