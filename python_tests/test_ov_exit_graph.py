"""Early exit in one OpenVINO call (engine/step/ov_exit_graph.py): on static int8 layers a patched model's CPU forward
runs its layers, heads and exit rule in one compiled model, and answers as the layer-by-layer loop does.
(Past 600 lines: the graph's answers and the benchmarks that read the graph itself share one module-scoped model on
static int8 layers, which NNCF takes seconds a layer to quantize: a second file would quantize it again.)"""

import copy
import logging

import pytest
import torch
from conftest import tiny_model, tiny_mpnet

import earlyexit_kernels as eek
from earlyexit_kernels.engine.layers import ov_static
from earlyexit_kernels.engine.layers.packed_call_shapes import ROW_STEP
from earlyexit_kernels.engine.layers.precision import int8_encoder
from earlyexit_kernels.engine.step import ov_exit_graph
from earlyexit_kernels.engine.step.batch_loop import kept_length, mask_extents
from earlyexit_kernels.methods.exit_rules import entropy
from earlyexit_kernels.patching.patch import current_adapter, policy_of

pytestmark = pytest.mark.skipif(not ov_static.static_available(), reason=ov_static.STATIC_MISSING)

LAYERS = 3


def _batch(model, rows=24, length=14, seed=0):
    """Random rows of the model's vocabulary, of unequal lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (rows, length), generator=generator)
    lengths = torch.randint(3, length + 1, (rows,), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _heads_apart(model) -> None:
    torch.manual_seed(1)
    with torch.no_grad():  # heads apart from one another, so the rows' scores spread
        for parameter in model.early_exit_heads.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)


@pytest.fixture(scope="module")
def quantized():
    """A patched tiny BERT on static int8 layers, quantized once for the module (NNCF takes seconds a layer)."""
    model = tiny_model("bert", num_layers=LAYERS)
    eek.patch(model, eek.Entropy(0.0), head="mlp", pooling="mean")
    return int8_encoder(model, "static-ov", calibration=[_batch(model, seed=s) for s in (1, 2)])


def _static(quantized, policy, *, head="mlp", pooling="mean"):
    """A copy of ``quantized`` with ``policy`` and heads of ``head`` and ``pooling``."""
    static = copy.deepcopy(quantized)
    eek.patch(static, policy, head=head, pooling=pooling)
    _heads_apart(static)
    return static


def _midway_thresholds(static, batch, score) -> tuple[float, ...]:
    """Per layer 1..L-1, a threshold midway between the two scores of the widest gap in the middle half of the
    rows' sorted scores at that layer (never on a row's score): some rows leave at every layer, some stay."""
    with torch.inference_mode():
        all_logits = static(**batch, return_all_exits=True).all_logits
    thresholds = []
    for layer in range(LAYERS - 1):
        values = score(all_logits[layer].float()).sort().values
        quarter = len(values) // 4
        middle = values[quarter : len(values) - quarter]
        gap = int((middle[1:] - middle[:-1]).argmax())
        thresholds.append(float(middle[gap] + middle[gap + 1]) / 2)
    return (*thresholds, 0.0)


def _exact_copy(static):
    exact = copy.deepcopy(static)
    eek.patch(exact, policy_of(static), step="exact")
    return exact


def _answers(model, batch):
    with torch.inference_mode():
        out = model(**batch)
    return out.logits, out.exit_layer, out.layers_run


def _assert_same_answers(graph_model, exact_model, batch):
    logits, exits, layers_run = _answers(graph_model, batch)
    logits_exact, exits_exact, layers_exact = _answers(exact_model, batch)
    assert torch.equal(exits, exits_exact) and torch.equal(layers_run, layers_exact)
    # OpenVINO's float32 heads against torch's: the same products summed in another order
    torch.testing.assert_close(logits, logits_exact, rtol=1e-5, atol=1e-5)
    return exits


@pytest.fixture
def graph_calls(monkeypatch):
    """The rows of each call the exit graph ran (ExitGraph.run spied on)."""
    calls = []
    run = ov_exit_graph.ExitGraph.run

    def spied(self, hidden, *args, **kwargs):
        calls.append(hidden.shape[0])
        return run(self, hidden, *args, **kwargs)

    monkeypatch.setattr(ov_exit_graph.ExitGraph, "run", spied)
    return calls


def _graph_of(static):
    adapter = current_adapter(static)
    return ov_exit_graph.exit_graph(static, adapter, static.early_exit_heads, policy_of(static))


@pytest.mark.parametrize(
    "kind, head, pooling",
    [("entropy", "mlp", "mean"), ("entropy-normalized", "model", "cls"), ("max-prob", "mlp", "cls")],
)
def test_the_exit_graph_answers_as_the_layer_by_layer_loop(quantized, kind, head, pooling, graph_calls):
    static = _static(quantized, eek.Entropy(0.0), head=head, pooling=pooling)
    batch = _batch(static, rows=40, seed=7)
    if kind == "max-prob":
        thresholds = _midway_thresholds(static, batch, lambda z: torch.softmax(z / 1.5, dim=-1).amax(-1))
        policy = eek.MaxProb(thresholds[:-1] + (1.0,), temperature=1.5)
    else:
        normalized = kind == "entropy-normalized"
        scale = torch.log(torch.tensor(3.0)) if normalized else 1.0
        policy = eek.Entropy(_midway_thresholds(static, batch, lambda z: entropy(z) / scale), normalized=normalized)
    eek.patch(static, policy)
    assert _graph_of(static) is not None
    exits = _assert_same_answers(static, _exact_copy(static), batch)
    assert graph_calls == [40]  # the forward ran the graph (the exact copy, the loop)
    assert len(set(exits.tolist())) >= 3  # rows left at several layers: the compaction ran between them


@pytest.fixture(scope="module")
def quantized_mpnet():
    """A patched tiny MPNet on static int8 layers, quantized once for the module."""
    model = tiny_mpnet(num_layers=LAYERS)
    eek.patch(model, eek.Entropy(0.0), head="mlp", pooling="mean")
    return int8_encoder(model, "static-ov", calibration=[_batch(model, seed=s) for s in (1, 2)])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_mpnet_runs_in_the_graph_with_its_position_bias_broadcast_over_the_rows_left(
    quantized_mpnet, pooling, graph_calls
):
    """MPNet's layers take the encoder's relative position bias: one [1, heads, S, S] input of the graph, the same
    for every row whichever rows are left, so its answers are the loop's at every layer."""
    static = _static(quantized_mpnet, eek.Entropy(0.0), pooling=pooling)
    batch = _batch(static, rows=40, seed=7)
    eek.patch(static, eek.Entropy(_midway_thresholds(static, batch, entropy)))
    graph = _graph_of(static)
    assert graph is not None and graph.position_bias
    exits = _assert_same_answers(static, _exact_copy(static), batch)
    assert graph_calls == [40] and len(set(exits.tolist())) >= 3


def _expected_lengths(exits: torch.Tensor, mask: torch.Tensor, grid: int, step: int = ov_static.LENGTH_STEP):
    """The grid's length at each layer as the exact loop trims it (batch_loop's ``mask_extents`` and ``kept_length``):
    the longest row still going on, rounded up to the graph's length ``step``, at most the grid's; one position where
    every row has left (the row kept for the plugin)."""
    extents = mask_extents(mask)
    lengths = [grid]
    for layer in range(1, LAYERS):
        going_on = extents[exits > layer]
        lengths.append(kept_length(int(going_on.max()), grid, step) if len(going_on) else 1)
    return lengths


def test_each_later_layer_runs_on_the_grid_its_rows_need_and_a_row_kept_for_the_plugin_on_one_position(quantized):
    """Between layers the grid is trimmed to the longest row going on (as the exact loop trims it), so short rows
    left behind by long ones run on fewer positions; where every row has left, the one row the plugin needs runs the
    later layers on one position. The answers stay the loop's."""
    static = _static(quantized, eek.Entropy(0.0))
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(5, static.config.vocab_size, (32, 40), generator=generator)
    lengths = torch.cat([torch.full((4,), 40), torch.randint(3, 21, (28,), generator=generator)])
    mask = (torch.arange(40)[None] < lengths[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    with torch.inference_mode():
        scores = entropy(static(**batch, return_all_exits=True).all_logits[0].float())
    # the four long rows leave at the first layer, with the short rows of lower scores; those of higher scores stay
    above = scores[scores > scores[:4].max()]
    assert len(above) >= 4
    policy = eek.Entropy((float(scores[:4].max() + above.min()) / 2, 0.0, 0.0))
    eek.patch(static, policy)
    exits = _assert_same_answers(static, _exact_copy(static), batch)
    graph = _graph_of(static)
    adapter = current_adapter(static)
    with torch.inference_mode():
        hidden = adapter.embed(batch["input_ids"], None, None, None, batch["attention_mask"])
        _, graph_exits, grid_lengths = graph.run(hidden, batch["attention_mask"], policy)
    assert torch.equal(graph_exits, exits)
    assert grid_lengths == _expected_lengths(exits, batch["attention_mask"], 40)
    assert grid_lengths[1] <= 24 < grid_lengths[0] == 40  # trimmed to the short rows
    # every row leaves at the first layer: the row kept for the plugin runs the second and third on one position
    everyone = eek.Entropy((10.0, 0.0, 0.0))
    eek.patch(static, everyone)
    with torch.inference_mode():
        _, graph_exits, grid_lengths = graph.run(hidden, batch["attention_mask"], everyone)
    assert graph_exits.tolist() == [1] * 32 and grid_lengths == [40, 1, 1]


def test_a_graph_built_without_compaction_answers_as_the_shipped_one_with_every_row_on_its_first_grid(quantized):
    """``compact=False`` (the profile's ``--without-compaction``): every row runs every layer on its first grid, the
    answers still the shipped graph's, so the heads' and decisions' cost reads apart from the compaction's."""
    static = _static(quantized, eek.Entropy(0.0))
    batch = _batch(static, rows=40, seed=7)
    policy = eek.Entropy(_midway_thresholds(static, batch, entropy))
    eek.patch(static, policy)
    adapter, heads, shipped = current_adapter(static), static.early_exit_heads, _graph_of(static)
    whole = ov_exit_graph.ExitGraph(static, adapter, heads, policy, compact=False)
    with torch.inference_mode():
        hidden = adapter.embed(batch["input_ids"], None, None, None, batch["attention_mask"])
        (logits, exits, lengths), (logits_whole, exits_whole, lengths_whole) = (
            graph.run(hidden, batch["attention_mask"], policy) for graph in (shipped, whole)
        )
    assert len(set(exits.tolist())) >= 3 and torch.equal(exits_whole, exits)  # rows left at every layer
    torch.testing.assert_close(logits_whole, logits, rtol=1e-5, atol=1e-5)  # the heads on other row counts
    assert lengths_whole == [lengths[0]] * LAYERS


def _rows_run(graph) -> list[int]:
    """The rows each layer of ``graph``'s last call ran (its outputs: per layer ``i < L`` logits, decisions, rows and
    the next grid's length, then the last layer's logits and rows)."""
    request = graph.request()
    outputs = [request.get_output_tensor(i).data for i in range(len(graph.compiled().outputs))]
    return [len(outputs[4 * i + 2]) for i in range(graph.num_layers - 1)] + [len(outputs[-1])]


@pytest.mark.parametrize("settings", [(), (("SNIPPETS_MODE", "DISABLE"),)])
def test_after_a_compaction_the_rows_are_padded_to_the_row_step_with_rows_that_left_and_the_answers_stay_the_loop_s(
    quantized, settings
):
    """The plugin prepares every operation again for each shape it has not met: each later layer runs its rows padded
    up to a multiple of ROW_STEP with rows that have left (never past the rows there are), on a grid whose length is a
    multiple of LENGTH_STEP, with either plugin setting; the host reads no answer of a padding row."""
    from earlyexit_kernels.engine.layers.runtime_choice import use_exit_graph_settings

    static = _static(quantized, eek.Entropy(0.0))
    generator = torch.Generator().manual_seed(12)
    ids = torch.randint(5, static.config.vocab_size, (30, 37), generator=generator)
    lengths = torch.cat([torch.full((4,), 37), torch.randint(3, 22, (26,), generator=generator)])
    mask = (torch.arange(37)[None] < lengths[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    with torch.inference_mode():
        scores = entropy(static(**batch, return_all_exits=True).all_logits[0].float())
    above = scores[scores > scores[:4].max()]
    policy = eek.Entropy((float(scores[:4].max() + above.min()) / 2, 0.0, 0.0))  # the long rows leave first
    eek.patch(static, policy)
    if settings:
        use_exit_graph_settings(static, settings)
    exits = _assert_same_answers(static, _exact_copy(static), batch)
    graph = _graph_of(static)
    assert graph.settings == settings and graph.length_step == ov_static.LENGTH_STEP == 8
    with torch.inference_mode():
        hidden = current_adapter(static).embed(batch["input_ids"], None, None, None, batch["attention_mask"])
        _, graph_exits, grid_lengths = graph.run(hidden, batch["attention_mask"], policy)
    assert torch.equal(graph_exits, exits)
    assert grid_lengths == _expected_lengths(exits, batch["attention_mask"], 40)
    going_on = int((exits > 1).sum())
    assert 0 < going_on % ROW_STEP  # the rows going on are not a multiple of the step: padded
    padded = -(-going_on // ROW_STEP) * ROW_STEP
    assert _rows_run(graph)[:2] == [30, padded]


def test_a_batch_every_row_of_which_leaves_at_the_first_layer_is_answered(quantized, graph_calls):
    """The plugin fails on an empty batch: the first row goes on alone, and every row keeps its first exit."""
    static = _static(quantized, eek.Entropy(10.0))
    batch = _batch(static, rows=40, seed=3)
    exits = _assert_same_answers(static, _exact_copy(static), batch)
    assert graph_calls == [40] and exits.tolist() == [1] * 40


def test_a_call_too_small_to_earn_the_graph_s_cost_back_runs_layer_by_layer(quantized, graph_calls):
    """The graph's fixed cost a call is earned back from GRAPH_MIN_POSITIONS grid positions (rows x padded length):
    a smaller call runs the layer-by-layer loop, a larger one the graph, with the same answers."""
    static = _static(quantized, eek.Entropy(1.05))
    exact = _exact_copy(static)
    small, large = _batch(static, rows=8, seed=12), _batch(static, rows=40, seed=12)  # 14 positions a row
    assert 8 * 14 < ov_exit_graph.GRAPH_MIN_POSITIONS <= 40 * 14
    _assert_same_answers(static, exact, small)
    assert graph_calls == []
    _assert_same_answers(static, exact, large)
    assert graph_calls == [40]


def test_new_thresholds_run_on_the_same_compiled_graph(quantized):
    static = _static(quantized, eek.Entropy(0.0))
    first = _graph_of(static)
    eek.patch(static, eek.Entropy((0.9, 0.8, 0.0)))
    assert _graph_of(static) is first
    eek.patch(static, eek.MaxProb(0.9))
    assert _graph_of(static) is not first  # another rule: another graph


@pytest.mark.parametrize(
    "case, reason",
    [
        ("patience", "not a threshold on one head's distribution"),
        ("cascade", "cascade form"),
        ("float", "not static int8 layers"),
    ],
)
def test_what_the_graph_cannot_run_takes_the_layer_by_layer_loop(quantized, case, reason):
    if case == "float":
        static = tiny_model("bert", num_layers=LAYERS)
        eek.patch(static, eek.Entropy(0.5), head="mlp", pooling="mean")
    else:
        patience = case == "patience"
        policy = eek.Patience(1) if patience else eek.Entropy(1.05)
        static = _static(quantized, policy, head="mlp" if patience else "cascade")
    adapter = current_adapter(static)
    refusal = ov_exit_graph.exit_graph_refusal(static, adapter, static.early_exit_heads, policy_of(static))
    assert refusal is not None and reason in refusal
    assert _graph_of(static) is None
    _assert_same_answers(static, _exact_copy(static), _batch(static, seed=4))


def test_a_call_the_plugin_fails_runs_layer_by_layer_logged_once(quantized, monkeypatch, caplog):
    static = _static(quantized, eek.Entropy(1.05))
    batch = _batch(static, rows=40, seed=5)
    expected = _answers(_exact_copy(static), batch)

    def fail(self, hidden, mask, policy, position_bias=None):
        raise RuntimeError("Exception from the CPU plugin: no memory for this shape")

    monkeypatch.setattr(ov_exit_graph.ExitGraph, "run", fail)
    monkeypatch.setattr(ov_exit_graph, "_failures", set())
    with caplog.at_level(logging.WARNING, logger=ov_exit_graph.__name__):
        first, second = _answers(static, batch), _answers(static, batch)
    for answers in (first, second):
        assert torch.equal(answers[1], expected[1])
        torch.testing.assert_close(answers[0], expected[0], rtol=1e-5, atol=1e-5)
    failures = [r.getMessage() for r in caplog.records if "exit graph failed a call" in r.getMessage()]
    assert len(failures) == 1 and "no memory for this shape" in failures[0]


def test_the_cohort_engine_runs_each_cohort_in_one_call_as_the_loop_answers(quantized, graph_calls):
    """``eek classify --engine cohorts`` on static int8 layers: each cohort through the exit graph, every sequence
    answered as the exact step answers it alone."""
    from earlyexit_kernels.engine.engines.cohort_engine import CohortEngine

    static = _static(quantized, eek.Entropy(0.0))
    batch = _batch(static, rows=40, seed=9)
    eek.patch(static, eek.Entropy(_midway_thresholds(static, batch, entropy)))
    exact = _exact_copy(static)
    engine = CohortEngine(static, max_batch_size=40, admission="length")
    sequences = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    for key, ids in enumerate(sequences):
        engine.submit(key, ids)
    with torch.no_grad():
        finished = {done.key: done for done in engine.run()}
    assert sorted(finished) == list(range(len(sequences)))
    assert graph_calls and sum(graph_calls) == len(sequences)  # every cohort in one call of the graph
    for key, ids in enumerate(sequences):
        logits, exits, _ = _answers(exact, {"input_ids": torch.tensor([ids])})
        assert finished[key].exit_layer == int(exits[0])
        torch.testing.assert_close(finished[key].logits.float(), logits[0].float(), rtol=1e-5, atol=1e-5)


def test_the_cohort_engine_compiles_the_exit_graph_when_it_is_made_not_in_its_first_cohort(
    quantized, monkeypatch, graph_calls
):
    """A server made with ``--engine cohorts`` on static int8 layers builds and compiles the graph before it takes a
    request: its first cohort compiles nothing."""
    from earlyexit_kernels.engine.engines.cohort_engine import CohortEngine

    static = _static(quantized, eek.Entropy(0.0))
    engine = CohortEngine(static, max_batch_size=40, admission="fifo")
    graph = _graph_of(static)  # the one the engine built (kept on the model)
    assert graph is not None and graph._compiled is not None

    def no_compile(self, *args, **kwargs):
        raise AssertionError("the first cohort compiled the exit graph")

    monkeypatch.setattr(ov_exit_graph.ov_core().__class__, "compile_model", no_compile, raising=True)
    batch = _batch(static, rows=40, seed=11)
    for key, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
        engine.submit(key, ids[mask.bool()].tolist())
    with torch.no_grad():
        assert len(list(engine.run())) == 40
    assert graph_calls == [40]  # the cohort ran on the graph compiled before it


def test_8_bit_layers_on_a_cpu_whose_int8_kernels_saturate_are_refused_as_the_layers_refuse_them(
    quantized, monkeypatch
):
    """The graph reads the layers' IR without compiling them: it must not run 8-bit weights where the layers
    themselves refuse to, so the forward takes the loop, whose layers say to fit again."""
    from earlyexit_kernels.engine.layers import ov_layer

    static = _static(quantized, eek.Entropy(1.05))
    for layer in static.base_model.encoder.layer:
        layer.weight_bits = 8
    for module in (ov_layer, ov_exit_graph):
        monkeypatch.setattr(module, "int8_weight_bits", lambda: 7)
    monkeypatch.setattr(ov_layer, "int8_isa", lambda: "avx2")
    adapter = current_adapter(static)
    refusal = ov_exit_graph.exit_graph_refusal(static, adapter, static.early_exit_heads, policy_of(static))
    assert refusal is not None and "8-bit weights" in refusal
    with pytest.raises(ValueError, match="Fit the folder again on this CPU"):
        _answers(static, _batch(static, seed=6))


def test_the_call_size_benchmark_times_the_graph_on_every_call_and_the_loop_on_the_same_calls(quantized, graph_calls):
    """benchmarks/micro/exit_graph_call_size.py: per call size, the graph forced on every call (also below the rule's
    size) against the loop on the same calls, paired, with the same exits; the rule is left as it was."""
    import importlib.util
    from pathlib import Path

    from earlyexit_kernels.patching.state import read

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "micro" / "exit_graph_call_size.py"
    spec = importlib.util.spec_from_file_location("call_size", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    static = _static(quantized, eek.Entropy(1.05))
    batch = _batch(static, rows=4, seed=13)
    single_rows = [{name: batch[name][i : i + 1] for name in batch} for i in range(4)]
    reading = bench.measure(static, single_rows, rounds=2)
    assert graph_calls == [1] * 4 * 3  # one untimed pass and two rounds, every call on the graph
    assert (reading["calls"], reading["texts"], reading["mean_positions"]) == (4, 4, 14)
    assert len(reading["graph_ms_per_text"]) == len(reading["loop_ms_per_text"]) == 2
    low, high = reading["loop_over_graph_range"]
    assert 0 < low <= reading["loop_over_graph_median"] <= high and reading["same_exits"]
    assert ov_exit_graph.GRAPH_MIN_POSITIONS == 512 and read(static).step == "auto"  # as they were


def test_the_shape_memory_benchmark_reads_the_bytes_in_use_after_each_pass_in_order(quantized):
    """benchmarks/micro/ov_shape_memory.py: two sets of calls drawn from their own seeds, run A, A, B, A, B, each
    pass's seconds and glibc's bytes in use after it, a set's first pass marked."""
    import importlib.util
    from pathlib import Path

    from earlyexit_kernels.integrations.server.memory_trim import heap_account

    if heap_account() is None:
        pytest.skip("this C library has no mallinfo2: the benchmark reads glibc's bytes in use")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "micro" / "ov_shape_memory.py"
    spec = importlib.util.spec_from_file_location("shape_memory", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    texts = [f"text {i}" for i in range(12)]
    first, again = bench.draw_calls(texts, 5, 4, seed=1), bench.draw_calls(texts, 5, 4, seed=1)
    assert first == again and all(1 <= len(call) <= 4 for call in first)
    assert bench.draw_calls(texts, 5, 4, seed=2) != first
    static = _static(quantized, eek.Entropy(0.3))
    seen = []

    def tokenize(call, **options):  # the model's inputs for a call: its rows, the length of its longest text
        seen.append(len(call))
        return _batch(static, rows=len(call), length=6 + len(call), seed=len(seen))

    sets = {"A": first, "B": bench.draw_calls(texts, 5, 4, seed=2)}
    readings = bench.run_passes(static, tokenize, sets, max_length=32)
    assert [(r["pass"], r["first"]) for r in readings] == [
        ("A", True), ("A", False), ("B", True), ("A", False), ("B", False)
    ]  # fmt: skip
    assert seen == [len(c) for name in bench.PASSES for c in sets[name]]
    assert all(r["seconds"] > 0 and r["in_use_mib"] > 0 for r in readings)


def test_the_trim_benchmark_times_the_graph_against_one_built_without_the_cut(quantized, graph_calls):
    """benchmarks/micro/exit_graph_grid_trim.py: a second graph of the same model whose later layers keep the first
    layer's grid (two slices fewer a later layer: hidden and key mask), timed against the model's own graph on the
    same calls with the same exits; the cut, the graph lookup and the size rule are left as they were."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "micro" / "exit_graph_grid_trim.py"
    spec = importlib.util.spec_from_file_location("grid_trim", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    static = _static(quantized, eek.Entropy(0.0))
    batch = _batch(static, rows=40, seed=7)
    eek.patch(static, eek.Entropy(_midway_thresholds(static, batch, entropy)))
    calls = [{name: batch[name][i : i + 10] for name in batch} for i in range(0, 40, 10)]
    kept = (ov_exit_graph._trimmed, ov_exit_graph.exit_graph, ov_exit_graph.GRAPH_MIN_POSITIONS)
    untrimmed = bench.untrimmed_graph(static, calls[0])
    assert (ov_exit_graph._trimmed, ov_exit_graph.exit_graph, ov_exit_graph.GRAPH_MIN_POSITIONS) == kept

    def slices(graph):
        return sum(op.get_type_name() == "Slice" for op in graph._model.get_ops())

    assert slices(_graph_of(static)) - slices(untrimmed) == 2 * (LAYERS - 1)
    graph_calls.clear()
    reading = bench.measure(static, untrimmed, calls, rounds=2)
    assert graph_calls == [10] * 4 * 3 * 2  # each graph: one untimed pass and two rounds, every call on a graph
    assert (ov_exit_graph._trimmed, ov_exit_graph.exit_graph, ov_exit_graph.GRAPH_MIN_POSITIONS) == kept
    assert reading["same_exits"] and reading["max_logit_difference"] < 1e-4
    assert 1 < reading["mean_layers"] < LAYERS  # rows left early
    lengths = reading["mean_trimmed_length_by_layer"]
    assert len(lengths) == LAYERS and lengths[0] == 16 and min(lengths) < 16  # the cut moved some grid
    low, high = reading["untrimmed_over_trimmed_range"]
    assert 0 < low <= reading["untrimmed_over_trimmed_median"] <= high


# ------------------------------------------------------------------------------ the graph's compilation, timed by eek fit

SNIPPETS_OFF = (("SNIPPETS_MODE", "DISABLE"),)
LOOP = "the layer loop"


def test_the_graph_compiles_with_its_layers_settings_and_a_change_builds_it_again(quantized, graph_calls, caplog):
    """The static layers carry the plugin's options for their exit graph: a graph with them answers as the loop
    does, a change of them builds the graph again, and an option the plugin refuses fails the call over to the loop
    (the reason logged once), never the answers."""
    from earlyexit_kernels.engine.layers.runtime_choice import use_exit_graph_settings

    static = _static(quantized, eek.Entropy(0.0))
    batch = _batch(static, rows=40, seed=7)
    eek.patch(static, eek.Entropy(_midway_thresholds(static, batch, entropy)))
    own = _graph_of(static)
    assert own.settings == ()
    use_exit_graph_settings(static, SNIPPETS_OFF)
    chosen = _graph_of(static)
    assert chosen is not own and chosen.settings == SNIPPETS_OFF
    _assert_same_answers(static, _exact_copy(static), batch)
    assert graph_calls == [40]
    use_exit_graph_settings(static, (("NOT_AN_OPTION", "X"),))
    with caplog.at_level(logging.WARNING):
        _assert_same_answers(static, _exact_copy(static), batch)  # the loop ran it
    assert graph_calls == [40, 40] and "the exit graph failed a call" in caplog.text


@pytest.fixture
def graph_timings(monkeypatch):
    """Each setting's seconds per round on the batches (``table[name]``), as the test gives them; the copies are
    still built, compiled and run once."""
    from earlyexit_kernels.engine.layers import runtime_choice

    table: dict = {}
    names = {(): "default", **{s: n for n, s in runtime_choice.EXIT_GRAPH_CANDIDATES.items()}}

    def seconds(model, batches):
        layer = model.base_model.encoder.layer[0]
        name = names[layer.exit_graph_settings] if layer.exit_graph_on else runtime_choice.LAYER_LOOP
        model.rounds_timed = getattr(model, "rounds_timed", -1) + 1  # each copy's untimed pass is its call 0
        return table[name][model.rounds_timed - 1] if model.rounds_timed else 0.0

    monkeypatch.setattr(runtime_choice, "_seconds", seconds)
    return table


def test_a_graph_setting_faster_in_enough_rounds_is_chosen_and_a_slower_one_keeps_the_layers(quantized, graph_timings):
    from earlyexit_kernels.engine.layers.runtime_choice import choose_exit_graph_settings

    static = _static(quantized, eek.Entropy(0.3))
    batches = [_batch(static, rows=40, seed=s) for s in (1, 2)]
    name = "fused-subgraph code generation off"
    graph_timings.update({"default": [1.0] * 12, name: [0.95, 1.1, 0.95, 0.95, 1.2] + [0.95] * 7, LOOP: [1.05] * 12})
    choice = choose_exit_graph_settings(static, batches, _graph_of)
    assert choice.settings == SNIPPETS_OFF and choice.name == name and choice.graph
    assert choice.reason.startswith(f"the exit graph: {name}, faster in 10 of 12 rounds (80 rows in batches")
    assert all(layer.exit_graph_settings == () for layer in static.base_model.encoder.layer)  # left as it was
    assert choice.as_dict()["settings"] == {"SNIPPETS_MODE": "DISABLE"}
    graph_timings.clear()
    graph_timings.update({"default": [1.0] * 12, name: [1.05] * 12, LOOP: [1.05] * 12})
    kept = choose_exit_graph_settings(static, batches, _graph_of)
    assert kept.settings == () and kept.name == "default" and len(kept.seconds[name]) == 3  # out after 3 losses
    assert kept.reason.startswith("the exit graph: the layers' settings, no other faster in 10 of 12 rounds")
    assert kept.graph and kept.as_dict()["graph"] is True


def test_layers_one_call_each_timed_faster_than_the_graph_run_without_it(quantized, graph_timings, graph_calls):
    """Where the layer loop beats every compilation of the exit graph in enough rounds (the AVX-512 AMD EPYC's case),
    the choice is no graph: the model it is set on never builds one and answers as the loop does."""
    from earlyexit_kernels.engine.layers import runtime_choice
    from earlyexit_kernels.engine.layers.runtime_choice import choose_exit_graph_settings, use_exit_graph_settings

    static = _static(quantized, eek.Entropy(0.0))
    batch = _batch(static, rows=40, seed=7)
    eek.patch(static, eek.Entropy(_midway_thresholds(static, batch, entropy)))
    name = "fused-subgraph code generation off"
    graph_timings.update({"default": [1.0] * 12, name: [1.05] * 12, LOOP: [0.8] * 12})
    choice = choose_exit_graph_settings(static, [batch], _graph_of)
    assert choice.name == LOOP and not choice.graph and choice.settings == ()
    assert choice.reason.startswith("no exit graph: the layer loop, faster than the graph in 10 of 10 rounds")
    assert choice.as_dict()["graph"] is False
    assert all(layer.exit_graph_on for layer in static.base_model.encoder.layer)  # the model timed: left as it was
    use_exit_graph_settings(static, choice.settings, choice.graph)
    assert _graph_of(static) is None
    refusal = ov_exit_graph.exit_graph_refusal(
        static, current_adapter(static), static.early_exit_heads, eek.Entropy(0.3)
    )
    assert refusal.startswith("eek fit timed its layers one call each faster than the exit graph")
    graph_calls.clear()
    _assert_same_answers(static, _exact_copy(static), batch)
    assert graph_calls == []
    runtime_choice.graph_on(static)  # the benchmarks that read the graph itself turn it back on
    assert _graph_of(static) is not None


def test_a_graph_setting_the_plugin_refuses_is_left_out_with_its_reason(quantized, monkeypatch, graph_timings):
    from earlyexit_kernels.engine.layers import runtime_choice

    static = _static(quantized, eek.Entropy(0.3))
    monkeypatch.setattr(runtime_choice, "EXIT_GRAPH_CANDIDATES", {"an unknown option": (("NOT_AN_OPTION", "X"),)})
    graph_timings.update({"default": [1.0] * 12, LOOP: [1.05] * 12})  # the loop still timed against the graph
    choice = runtime_choice.choose_exit_graph_settings(static, [_batch(static, rows=40, seed=1)], _graph_of)
    assert choice.settings == () and choice.graph and "NOT_AN_OPTION" in choice.refused["an unknown option"]
    assert set(choice.seconds) == {"default", LOOP}
    assert choice.reason.startswith("the exit graph: the layers' settings, no other faster in 10 of 12 rounds")
    assert "; an unknown option refused by the plugin (" in choice.reason
    with pytest.raises(ValueError, match="a patched model on the static int8 layers"):
        runtime_choice.choose_exit_graph_settings(tiny_model("bert", num_layers=2), [_batch(static, seed=1)], _graph_of)
