"""The graphed step's prologue (``StaticBatches(prologue=True)``): the inputs' summary and the
embeddings as one step on fixed buffers, captured on a GPU, its one read-back after it.

On the CPU it runs uncaptured and must give the eager prologue's outputs bit for bit, on every
model family, with and without a mask or token types; an id out of range must still end in the
same clear error (the embedding ran on clamped ids, so no kernel saw it); the step itself must read
nothing back (else no graph could hold it). On a GPU it must be captured and replayed and give the
eager prologue's outputs.
"""

import pytest
import torch
from test_graphed_step import GPU_PLAN, GRAPHED_POLICIES, batch_inputs, patched, run
from test_hf_patch import EVERY_POLICY
from test_model_families import FAMILIES, spread_heads, tiny_family, tiny_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import earlyexit_kernels as eek
from earlyexit_kernels.engine.graphed import step_graphs
from earlyexit_kernels.engine.graphed.prologue import KEPT_PROLOGUES, Prologue
from earlyexit_kernels.engine.graphed.static_step import StaticBatches
from earlyexit_kernels.engine.graphed.step_graphs import GraphStats
from earlyexit_kernels.patching.patch import current_adapter
from earlyexit_kernels.patching.state import state_of


def patched_family(family, *, device="cpu", dtype=torch.float32):
    """A tiny ``family`` model patched with the graphed step and an ``Entropy`` threshold at which
    its rows leave at more than one layer (a schedule of 8 rows where none does)."""
    model = tiny_family(family).to(device, dtype)
    inputs = {k: v.to(device) for k, v in tiny_inputs(family, batch=8, padded=False).items()}
    for threshold in (0.6, 0.3, 0.8, 0.15, 0.95, 0.05):
        eek.patch(model, eek.Entropy(threshold), backend="torch", step="graphed")
        spread_heads(model, seed=4)
        with torch.no_grad():
            if len(set(model(**inputs).exit_layer.tolist())) > 1:
                return model
    # no threshold spreads this tiny model's exits (its heads' entropies sit together): a schedule does
    eek.patch(model, eek.Scheduled(torch.arange(8, device=device) % 3 + 1), backend="torch", step="graphed")
    return model


def forward(model, inputs, *, prologue: bool, plan=None):
    state_of(model).static_batches = eek_batches(prologue, plan)
    with torch.no_grad():
        return model(**inputs)


def eek_batches(prologue: bool, plan=None):
    from earlyexit_kernels.engine.graphed.static_step import StaticBatches

    return StaticBatches(prologue=prologue, **(plan or {}))


def same(a, b) -> None:
    assert torch.equal(a.exit_layer, b.exit_layer)
    assert torch.equal(a.layers_run, b.layers_run)
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_prologue_step_gives_the_eager_prologues_bits_on_every_family(family):
    model = patched_family(family)
    forward(model, tiny_inputs(family, batch=8), prologue=False)  # a schedule's counts are read at its first forward
    for padded in (True, False):  # a padded batch, and one whose mask is all ones (dropped)
        inputs = tiny_inputs(family, batch=8, padded=padded)
        eager = forward(model, inputs, prologue=False)
        stepped = forward(model, inputs, prologue=True)
        same(stepped, eager)
        assert stepped.host_syncs == eager.host_syncs  # one read-back before the layers either way


def test_without_a_mask_or_token_types_and_with_positions_given():
    model = patched_family("bert")
    inputs = tiny_inputs("bert", batch=6)
    for given in (
        {"input_ids": inputs["input_ids"]},
        {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
        {**inputs, "position_ids": torch.arange(12).expand(6, -1)},
    ):
        same(forward(model, given, prologue=True), forward(model, given, prologue=False))


def test_the_prologue_is_reused_per_input_shape_and_keeps_a_few():
    model = patched_family("bert")
    batches = eek_batches(True)
    state_of(model).static_batches = batches
    with torch.no_grad():
        for seq_len in (8, 12, 8, 12):
            model(**tiny_inputs("bert", batch=4, seq_len=seq_len))
        assert len(batches.prologues._kept) == 2
        for seq_len in range(2, 4 + KEPT_PROLOGUES):
            model(**tiny_inputs("bert", batch=4, seq_len=seq_len))
    assert len(batches.prologues._kept) == KEPT_PROLOGUES


def test_an_id_out_of_range_still_ends_in_the_clear_error_and_the_next_forward_runs():
    model = patched_family("bert")
    state_of(model).static_batches = eek_batches(True)
    inputs = tiny_inputs("bert", batch=4)
    bad = {**inputs, "input_ids": inputs["input_ids"].clone()}
    bad["input_ids"][2, 3] = 500
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"input_ids must lie in 0\.\.96 \(the vocabulary\), got values in 0\.\.500"),
    ):
        model(**bad)
    bad["input_ids"][2, 3] = -2
    with torch.no_grad(), pytest.raises(ValueError, match=r"got values in -2\.\."):
        model(**bad)
    with torch.no_grad():
        after = model(**inputs)
    same(after, forward(model, inputs, prologue=False))


class _ReadBacks(TorchDispatchMode):
    """Counts the ops that read a device value back to the host (what no CUDA graph can hold)."""

    def __init__(self):
        super().__init__()
        self.read_backs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.read_backs.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "deberta_v2", "mpnet"])
def test_the_prologue_step_reads_nothing_back(family):
    """Everything a graph would hold (the summary and the embeddings) runs without a host read:
    the one read-back is the summary's, after the step."""
    model = patched_family(family)
    inputs = tiny_inputs(family, batch=5)
    prologue = Prologue(
        current_adapter(model),
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs.get("token_type_ids"),
        None,
        GraphStats(),
    )
    for buffer, name in (
        (prologue.ids, "input_ids"),
        (prologue.mask, "attention_mask"),
        (prologue.types, "token_type_ids"),
    ):
        if buffer is not None:
            buffer.copy_(inputs[name])
    with torch.no_grad(), _ReadBacks() as mode:
        prologue._step()
    assert mode.read_backs == []
    assert prologue.summary.tolist()[2] == int(inputs["attention_mask"].sum(1).max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_session.sh)")
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_on_a_gpu_the_prologue_is_captured_and_gives_the_eager_prologues_outputs(family):
    model = patched_family(family, device="cuda")
    inputs = {k: v.cuda() for k, v in tiny_inputs(family, batch=16, seq_len=32).items()}
    eager = forward(model, inputs, prologue=False, plan=GPU_PLAN)
    layer_graphs = state_of(model).static_batches.stats.captures
    state_of(model).static_batches = batches = eek_batches(True, GPU_PLAN)
    with torch.no_grad():
        first = model(**inputs)
        again = model(**inputs)
    # the layers' and the finishing step's graphs, the prologue's and the load's, none run uncaptured
    assert batches.stats.captures == layer_graphs + 2 and batches.stats.eager == 0, batches.stats
    for out in (first, again):
        assert torch.equal(out.exit_layer, eager.exit_layer)
        torch.testing.assert_close(out.logits, eager.logits)
    bad = {**inputs, "input_ids": inputs["input_ids"].clone()}
    bad["input_ids"][0, 0] = 10_000
    with torch.no_grad(), pytest.raises(ValueError, match="the vocabulary"):
        model(**bad)
    torch.cuda.synchronize()  # the clamped embedding raised no device-side assert


def test_a_copied_model_keeps_the_choice_and_starts_without_buffers():
    import pickle

    model = patched_family("bert")
    forward(model, tiny_inputs("bert", batch=4), prologue=True)
    batches = pickle.loads(pickle.dumps(state_of(model).static_batches))
    assert batches.prologue is True and batches.prologues._kept == {}
    assert batches.prologues.stats is batches.stats


# ------------------------------------------------------------------ exactness and what a GPU launches


@pytest.mark.exact
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("name", GRAPHED_POLICIES)
def test_with_the_prologue_the_graphed_step_gives_the_exact_steps_bits_for_every_policy(name, backend):
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r}: {eek.backend_status()[backend]}")
    model = patched(EVERY_POLICY[name](16), backend=backend)
    inputs = batch_inputs(16)
    exact = run(model, inputs, "exact")
    assert 1 < len(set(exact.exit_layer.tolist())), "the test needs exits spread over layers"
    for plan in (None, GPU_PLAN):  # the CPU's plan gives the exact step's shapes; the GPU's runs dead rows
        eek.patch(model, state_of(model).policy, backend=backend, step="graphed")
        state_of(model).static_batches = eek_batches(True, plan)
        with torch.no_grad():
            graphed = [model(**inputs) for _ in range(2)]  # the second forward reuses every buffer
        for out in graphed:
            assert torch.equal(out.exit_layer, exact.exit_layer) and torch.equal(out.layers_run, exact.layers_run)
            if plan is None:
                assert torch.equal(out.logits, exact.logits)
            else:
                torch.testing.assert_close(out.logits, exact.logits, rtol=1e-5, atol=1e-6)


@pytest.mark.exact
@pytest.mark.parametrize("family", FAMILIES)
def test_with_the_prologue_the_graphed_step_gives_the_exact_steps_bits_on_every_family(family):
    model = patched_family(family)
    policy = state_of(model).policy
    for padded in (True, False):
        inputs = tiny_inputs(family, batch=8, padded=padded)
        stepped = forward(model, inputs, prologue=True)
        eek.patch(model, policy, backend="torch", step="exact")
        with torch.no_grad():
            exact = model(**inputs)
        eek.patch(model, policy, backend="torch", step="graphed")
        same(stepped, exact)


class _Launches(TorchDispatchMode):
    """What one forward launches, in order: each op outside a graph, each would-be-captured step as
    one entry (``("step", key)``, its ops not counted: on a GPU it is one graph replay), each read-back."""

    VIEWS = {"view", "slice", "select", "unsqueeze", "squeeze", "expand", "t", "transpose", "permute", "detach"}
    VIEWS |= {"alias", "lift_fresh", "_unsafe_view", "as_strided", "_reshape_alias"}
    ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty"}

    def __init__(self):
        super().__init__()
        self.seen, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        on_meta = isinstance(out, torch.Tensor) and out.device.type == "meta"  # shapes only: nothing launched
        if not self.paused and not on_meta and name not in self.VIEWS | self.ALLOCATIONS:
            self.seen.append(name)
        return out


def launches(model, inputs, monkeypatch) -> list:
    counting = _Launches()

    def one_launch(graphs, key, step, capture):
        counting.seen.append(("step", key[0]))
        counting.paused = True
        try:
            step()
        finally:
            counting.paused = False

    monkeypatch.setattr(step_graphs, "run_step", one_launch)
    for method in ("cpu", "item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, method)

        def read_back(self, *args, _original=original, **kwargs):
            if not counting.paused:  # a CPU tensor's read dispatches nothing: counted at the method
                counting.seen.append("read-back")
            counting.paused, paused = True, counting.paused
            try:
                return _original(self, *args, **kwargs)
            finally:
                counting.paused = paused

        monkeypatch.setattr(torch.Tensor, method, read_back)
    with torch.no_grad(), counting:
        model(**inputs)
    monkeypatch.undo()
    return counting.seen


@pytest.mark.parametrize("name", ["entropy", "patience"])
def test_before_the_first_layer_graph_a_forward_launches_three_steps_and_reads_back_once(name, monkeypatch):
    """Issue 93's target on the GPU plan, counted on the CPU twin: the inputs' copy (one kernel),
    the prologue's graph and the load's graph, with the summary's one read-back between them; after
    the layers, the finishing graph (the logits rounded, the outputs packed) and one clone."""
    model = patched(EVERY_POLICY[name](16), backend="torch")
    state_of(model).static_batches = eek_batches(True, GPU_PLAN)
    inputs = batch_inputs(16)
    with torch.no_grad():
        model(**inputs)  # the first forward makes the buffers, the start state and the graphs
    seen = launches(model, inputs, monkeypatch)
    first_layer = seen.index(("step", 1))
    before = seen[:first_layer]
    assert before == ["_foreach_copy_", ("step", "prologue"), "read-back", ("step", "load")], seen
    last_layer = max(i for i, entry in enumerate(seen) if isinstance(entry, tuple) and isinstance(entry[1], int))
    assert seen[last_layer + 1 :] == [("step", "finish"), "clone"], seen
    # between the layers: nothing outside their graphs (the counts are read from host memory)
    between = [entry for entry in seen[first_layer:last_layer] if not (isinstance(entry, tuple))]
    assert between == [], seen


def test_without_the_prologue_the_load_runs_outside_a_graph_and_the_finish_inside(monkeypatch):
    """The eager prologue hands the step the caller's tensors, whose addresses change from forward to
    forward: the load then runs op by op; the finishing step reads only the static batch: one graph."""
    model = patched(eek.Entropy(0.15), backend="torch")
    state_of(model).static_batches = eek_batches(False, GPU_PLAN)
    inputs = batch_inputs(16)
    with torch.no_grad():
        model(**inputs)
    seen = launches(model, inputs, monkeypatch)
    before = seen[: seen.index(("step", 1))]
    assert ("step", "load") not in seen and "copy_" in before, before  # the rows copied in, op by op
    assert seen[-2:] == [("step", "finish"), "clone"], seen


def test_the_load_graphs_of_a_prologue_no_longer_kept_are_dropped():
    """A load graph reads its prologue's buffers and its start state: once either is no longer kept,
    the forward that captures a new load drops the graphs keyed by it (here, on the CPU, a stand-in
    entry where a capture would have left the graph)."""
    model = patched_family("bert")
    batches = eek_batches(True)
    state_of(model).static_batches = batches
    with torch.no_grad():
        model(**tiny_inputs("bert", batch=4, seq_len=12))
        (first,) = batches.prologues._kept.values()
        (static,) = batches._kept.values()
        (template,) = static.templates.values()
        kept_key = ("load", first.serial, template.serial)
        static.graphs._graphs[kept_key] = None
        static.graphs._graphs[("load", first.serial, -1)] = None  # a start state no longer kept
        model(**tiny_inputs("bert", batch=4, seq_len=11))  # a new prologue: its load is new
        assert kept_key in static.graphs and ("load", first.serial, -1) not in static.graphs
        for seq_len in range(2, 2 + KEPT_PROLOGUES):
            model(**tiny_inputs("bert", batch=4, seq_len=seq_len))
    assert first.serial not in batches.prologues.serials()
    assert kept_key not in static.graphs


@pytest.mark.parametrize("name", ["entropy", "patience", "qexit"])
def test_heads_as_the_models_modules_exit_as_the_fused_head_and_run_no_fused_head(name):
    """``head_kernels="torch"``: the heads as the model's modules (cuBLAS on a GPU), then the backend's
    rule; the exits of the fused head, the logits within float rounding, and no fused head launched."""
    if not eek.backends()["cpp"]:
        pytest.skip(f"backend 'cpp': {eek.backend_status()['cpp']}")
    model = patched(EVERY_POLICY[name](16), backend="cpp")
    inputs = batch_inputs(16)
    exact = run(model, inputs, "exact")
    eek.patch(model, state_of(model).policy, backend="cpp", step="graphed")
    state_of(model).static_batches = StaticBatches(prologue=True, head_kernels="torch", **GPU_PLAN)
    with torch.no_grad():
        modules = model(**inputs)
    assert torch.equal(modules.exit_layer, exact.exit_layer) and torch.equal(modules.layers_run, exact.layers_run)
    torch.testing.assert_close(modules.logits, exact.logits, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), _Launches() as ops:  # every op, the steps' own included
        model(**inputs)
    assert "cpp_exit_step" in ops.seen and "addmm" in ops.seen  # the rule op after the modules' GEMMs
    assert not {"cpp_pooled_head_exit_step", "cpp_head_exit_step"} & set(ops.seen)
    with pytest.raises(ValueError, match=r"head_kernels must be one of \('fused', 'torch'\)"):
        StaticBatches(head_kernels="cublas")


def test_the_head_choice_survives_a_copy():
    import pickle

    batches = pickle.loads(pickle.dumps(StaticBatches(head_kernels="torch")))
    assert batches.head_kernels == "torch"
