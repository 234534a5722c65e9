"""The graphed step (``eek.patch(..., step="graphed")``): fixed buckets, dead rows, no read-back between layers.

On the CPU the step runs uncaptured. With the CPU's plan (every survivor count its own bucket,
read at once) it runs the exact step's shapes and must give its bits; with the GPU's plan (fixed
buckets, counts read a layer late) it runs dead rows, and must give the same exits and layers run,
logits within float rounding (a small GEMM's rows round differently with the number of rows), and
bits that nothing in a dead row can change.
"""

import copy
import pickle

import pytest
import torch
from conftest import backend_device, tiny_batch, tiny_model
from test_hf_patch import EVERY_POLICY, spread_heads
from test_launch_budget import count
from test_model_families import FAMILIES, tiny_family, tiny_inputs
from test_model_families import spread_heads as spread_family_heads
from torch.utils._python_dispatch import TorchDispatchMode

import earlyexit_kernels as eek
from earlyexit_kernels.engine.graphed.buckets import DEFAULT_SIZES
from earlyexit_kernels.engine.graphed.static_buffers import BatchShape, Loaded, load
from earlyexit_kernels.engine.graphed.static_step import GraphedStep, StaticBatch, StaticBatches, layer_step
from earlyexit_kernels.engine.step.batch_loop import mask_extents
from earlyexit_kernels.methods.exit_rules import init_state
from earlyexit_kernels.patching.patch import current_adapter, step_of
from earlyexit_kernels.patching.state import state_of

GRAPHED_POLICIES = sorted(name for name in EVERY_POLICY if name != "skip_gates")
GPU_PLAN = dict(sizes=DEFAULT_SIZES, lag=1)


def cpu_backends():
    return [name for name in ("torch", "cpp") if eek.backends()[name]]


def patched(policy, *, arch="bert", seed=3, backend="torch", step="graphed"):
    model = tiny_model(arch, seed=seed)
    eek.patch(model, policy, backend=backend, step=step)
    spread_heads(model, seed)
    return model


def run(model, inputs, step, plan=None):
    """One forward with ``step``; ``plan``: the graphed step's bucket plan (default: the device's)."""
    eek.patch(model, state_of(model).policy, backend=state_of(model).backend, step=step)
    if plan is not None:
        state_of(model).static_batches = StaticBatches(**plan)
    with torch.no_grad():
        return model(**inputs)


def batch_inputs(batch=16, seq_len=12, seed=5):
    ids, mask, token_types = tiny_batch(batch, seq_len, seed=seed)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types}


# ---------------------------------------------------------------------------------- exactness


@pytest.mark.exact
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", GRAPHED_POLICIES)
def test_graphed_gives_the_exact_steps_outputs_bit_for_bit_for_every_policy(name, backend):
    batch = 16
    model = patched(EVERY_POLICY[name](batch), backend=backend)
    inputs = batch_inputs(batch)
    exact = run(model, inputs, "exact")
    graphed = run(model, inputs, "graphed")
    assert 1 < len(set(exact.exit_layer.tolist())), "the test needs exits spread over layers"
    assert torch.equal(graphed.exit_layer, exact.exit_layer)
    assert torch.equal(graphed.layers_run, exact.layers_run)
    assert torch.equal(graphed.logits, exact.logits)


@pytest.mark.exact
@pytest.mark.parametrize("family", FAMILIES)
def test_graphed_gives_the_exact_steps_outputs_bit_for_bit_on_every_family(family):
    model = tiny_family(family)
    inputs = tiny_inputs(family, 9, 12)
    eek.patch(model, eek.Entropy(0.6), backend="torch", step="exact")
    spread_family_heads(model)
    exact = run(model, inputs, "exact")
    graphed = run(model, inputs, "graphed")
    assert torch.equal(graphed.exit_layer, exact.exit_layer)
    assert torch.equal(graphed.layers_run, exact.layers_run)
    assert torch.equal(graphed.logits, exact.logits)


@pytest.mark.parametrize("lag", [0, 1, 2])
@pytest.mark.parametrize("name", ["entropy", "patience", "qexit", "voting", "dact", "scheduled"])
def test_fixed_buckets_and_a_late_count_keep_every_exit_and_the_logits(name, lag):
    """The GPU's plan on the CPU: dead rows ride along in the buckets; the decisions never change."""
    batch = 21  # bucket 24: three dead rows from the start
    model = patched(EVERY_POLICY[name](batch), seed=4)
    inputs = batch_inputs(batch, seed=6)
    exact = run(model, inputs, "exact")
    graphed = run(model, inputs, "graphed", plan=dict(sizes=DEFAULT_SIZES, lag=lag))
    assert torch.equal(graphed.exit_layer, exact.exit_layer)
    assert torch.equal(graphed.layers_run, exact.layers_run)
    torch.testing.assert_close(graphed.logits, exact.logits, rtol=1e-5, atol=1e-6)


@pytest.mark.exact
@pytest.mark.parametrize("name", ["entropy", "patience", "qexit", "dact", "scheduled"])
def test_dead_rows_filled_with_nan_leave_the_live_rows_bit_identical(name):
    batch = 13  # bucket 16
    model = patched(EVERY_POLICY[name](batch), seed=2)
    inputs = batch_inputs(batch, seed=7)
    clean = run(model, inputs, "graphed", plan=GPU_PLAN)
    poisoned = run(model, inputs, "graphed", plan=dict(GPU_PLAN, dead_fill=float("nan")))
    assert torch.isfinite(clean.logits).all()
    assert torch.equal(poisoned.logits, clean.logits)
    assert torch.equal(poisoned.exit_layer, clean.exit_layer)
    assert torch.equal(poisoned.layers_run, clean.layers_run)


@pytest.mark.exact
@pytest.mark.parametrize("batch, plan", [(7, None), (8, GPU_PLAN)], ids=["cpu-plan", "gpu-plan-full-bucket"])
@pytest.mark.parametrize("arch", ["bert", "albert", "roberta"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_nobody_exiting_gives_the_unpatched_model_bit_for_bit(arch, attn, batch, plan):
    """Bit for bit wherever the step runs the unpatched model's shapes: the CPU's plan, or a batch
    that fills its bucket."""
    model = tiny_model(arch, attn=attn)
    ids, mask, token_types = tiny_batch(batch, 12)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
    eek.patch(model, eek.Entropy(0.0), backend="torch", step="graphed")
    spread_heads(model)
    out = run(model, {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types}, "graphed", plan)
    assert torch.equal(out.logits, reference)
    assert out.exit_layer.tolist() == [4] * batch


def test_nobody_exiting_in_a_bucket_with_dead_rows_gives_the_unpatched_model_to_rounding():
    model = tiny_model("bert")
    ids, mask, token_types = tiny_batch(7, 12)  # bucket 8: one dead row from the start
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
    eek.patch(model, eek.Entropy(0.0), backend="torch", step="graphed")
    spread_heads(model)
    out = run(model, {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types}, "graphed", GPU_PLAN)
    torch.testing.assert_close(out.logits, reference, rtol=1e-5, atol=1e-6)
    assert out.exit_layer.tolist() == [4] * 7


def test_the_outputs_are_the_callers_and_the_buffers_are_reused():
    """A second forward reuses the buffers and must not change what the first returned."""
    model = patched(eek.Entropy(0.15), seed=3)
    first_inputs, second_inputs = batch_inputs(16, seed=5), batch_inputs(11, seed=9)
    first = run(model, first_inputs, "graphed", plan=GPU_PLAN)
    kept = first.logits.clone(), first.exit_layer.clone()
    batches = state_of(model).static_batches
    with torch.no_grad():
        second = model(**second_inputs)
    assert len(batches._kept) == 1, "the same shape reuses its buffers"
    assert torch.equal(first.logits, kept[0]) and torch.equal(first.exit_layer, kept[1])
    assert second.logits.shape == (11, 3)


def test_every_length_up_to_the_longest_shares_one_set_of_buffers():
    """A server's batches come in many lengths: one static batch holds every length up to the
    longest it has met (each length's rows viewed contiguously at the start of the same buffers,
    its graphs keyed by the length), and is made anew only for a longer one."""
    model = patched(eek.Entropy(0.15), seed=3)
    reference = patched(eek.Entropy(0.15), seed=3, step="exact")
    batches = state_of(model).static_batches = StaticBatches(**GPU_PLAN)
    made = []
    for seq_len in (12, 7, 12, 20, 7, 20):
        inputs = batch_inputs(16, seq_len=seq_len, seed=seq_len)
        with torch.no_grad():
            exact, graphed = reference(**inputs), model(**inputs)
        assert torch.equal(graphed.exit_layer, exact.exit_layer)
        torch.testing.assert_close(graphed.logits, exact.logits, rtol=1e-5, atol=1e-6)
        (static,) = batches._kept.values()
        if not made or made[-1] is not static:
            made.append(static)
        assert static.halves[0].hidden.is_contiguous() and static.halves[0].hidden.shape[1] == seq_len
    assert [static.max_length for static in made] == [12, 20], "made again only for a longer length"


def test_a_patched_model_pickles_and_copies_after_a_graphed_forward():
    model = patched(eek.Entropy(0.15))
    inputs = batch_inputs(8)
    out = run(model, inputs, "graphed")
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            again = other(**inputs)
        assert torch.equal(again.logits, out.logits)
        assert step_of(other) == "graphed"


def test_buffers_made_under_inference_mode_serve_a_later_no_grad_forward():
    """The buffers are normal tensors: a forward under no_grad() writes its rows into buffers a
    first forward under inference_mode() made (an inference tensor refuses that in-place write)."""
    model = patched(eek.Entropy(0.15))
    eek.patch(model, state_of(model).policy, backend="torch", step="graphed")
    inputs = batch_inputs(8)
    with torch.inference_mode():
        first = model(**inputs)
    with torch.no_grad():
        again = model(**inputs)
    assert len(state_of(model).static_batches._kept) == 1, "the same buffers served both forwards"
    assert torch.equal(again.logits, first.logits) and torch.equal(again.exit_layer, first.exit_layer)


def test_after_a_failed_capture_nothing_is_captured_in_the_process_and_the_counts_say_why(monkeypatch):
    """A failed capture can leave torch's capture state broken for every later capture in the
    process: the graphed step then runs every step uncaptured, warns once per owner, and its
    counts carry the reason (the benchmark's rows report them)."""
    from earlyexit_kernels.engine.graphed import step_graphs

    monkeypatch.setattr(step_graphs, "_FAILURE", "RuntimeError: operation not permitted when stream is capturing")
    stats = step_graphs.GraphStats()
    graphs = step_graphs.StepGraphs(torch.device("cpu"), stats)
    ran = []
    with pytest.warns(RuntimeWarning, match="an earlier failure .*operation not permitted"):
        graphs.run((1, 64, False, 128), lambda: ran.append(1))
    graphs.run((2, 64, False, 128), lambda: ran.append(2))
    assert ran == [1, 2] and len(graphs) == 0
    assert (stats.captures, stats.replays, stats.eager) == (0, 0, 2)
    assert stats.fallback.startswith("capture stopped in this process after an earlier failure")
    assert step_graphs.capture_failure() is not None


def test_a_models_graph_counts_add_up_over_its_shapes():
    """Every shape's graphs count into the patched model's one GraphStats (evicted shapes too)."""
    from earlyexit_kernels.engine.graphed.step_graphs import GraphStats

    model = patched(eek.Entropy(0.15))
    run(model, batch_inputs(8), "graphed")
    batches = state_of(model).static_batches
    assert all(static.graphs.stats is batches.stats for static in batches._kept.values())
    copied = pickle.loads(pickle.dumps(model))
    assert state_of(copied).static_batches.stats == GraphStats(), "a copy starts its own counts"


def test_deberta_builds_its_relative_positions_once_for_every_length(monkeypatch):
    """Hugging Face builds DeBERTa's relative positions with a host-to-device copy, which no CUDA
    graph can capture: the adapter builds them once for the longest input and slices a corner for
    each length, the same values, so the outputs stay Hugging Face's bit for bit."""
    from transformers.models.deberta_v2 import modeling_deberta_v2

    built = []
    original = modeling_deberta_v2.build_relative_position

    def counting(*args, **kwargs):
        built.append(args[0].shape[-2])
        return original(*args, **kwargs)

    model = tiny_family("deberta_v2")
    eek.patch(model, eek.Entropy(0.6), backend="torch", step="graphed")
    spread_family_heads(model)
    monkeypatch.setattr(modeling_deberta_v2, "build_relative_position", counting)
    for seq_len in (12, 7, 12, 20):
        inputs = tiny_inputs("deberta_v2", 5, seq_len)
        exact = run(model, inputs, "exact")
        graphed = run(model, inputs, "graphed")
        assert torch.equal(graphed.logits, exact.logits) and torch.equal(graphed.exit_layer, exact.exit_layer)
    assert built == [model.config.max_position_embeddings], "built once, for the longest input"
    encoder = model.deberta.encoder
    kept = encoder.__dict__["earlyexit_relative_positions"][torch.device("cpu")]
    x = torch.empty(1, 20, 1)
    fresh = original(x, x, bucket_size=encoder.position_buckets, max_position=encoder.max_relative_positions)
    assert len(kept) == 1 and torch.equal(kept[0][..., :20, :20], fresh)


# ------------------------------------------------------------------ what the host does per layer


def test_no_value_is_read_back_between_the_first_layer_and_the_last(monkeypatch):
    batch = 64
    model = patched(eek.Entropy(0.15), seed=3)
    state_of(model).static_batches = StaticBatches(**GPU_PLAN)
    ids, mask, _ = tiny_batch(batch, 30, seed=8)
    per_layer, out, _ = count(model, ids, mask, monkeypatch)
    assert 1 < len(set(out.exit_layer.tolist())), "the test needs exits spread over layers"
    assert per_layer[0][1] == 1, "the prologue reads the inputs' range and the padding once"
    assert [per_layer[layer][1] for layer in range(1, 5)] == [0, 0, 0, 0]
    # the exact step reads back after every layer where rows leave
    eek.patch(model, eek.Entropy(0.15), backend="torch", step="exact")
    per_layer, _, _ = count(model, ids, mask, monkeypatch)
    assert sum(per_layer[layer][1] for layer in range(1, 4)) == 3


class _Shapes(TorchDispatchMode):
    """Every op and its tensors' shapes, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((func.overloadpacket.__name__, shapes))
        return func(*args, **(kwargs or {}))


def loaded_step(model, inputs, policy, bucket):
    """One forward's buffers with ``inputs`` loaded in a bucket of ``bucket`` rows, and its step."""
    adapter = current_adapter(model)
    batch = len(inputs["input_ids"])
    hidden = adapter.embed(inputs["input_ids"], inputs["token_type_ids"], None, None, inputs["attention_mask"])
    state0 = init_state(policy, batch, 3, 32, 4, hidden.device)
    static = StaticBatch(
        BatchShape(bucket, hidden.shape[1], 32, 3, 4, hidden.dtype, torch.float32, hidden.device),
        mask=inputs["attention_mask"],
        state=state0,
    )
    mask = inputs["attention_mask"]
    template = static.template(policy, adapter, batch, bucket)
    load(static, Loaded(hidden, mask, mask_extents(mask), hidden.shape[1]), template, batch, bucket)
    return static, GraphedStep(adapter, _torch_backend(), policy, None, False, None, hidden.dtype, None)


def step_ops(model, inputs, schedule, layer, bucket):
    """The ops of one (layer, bucket) step after loading ``inputs`` with ``Scheduled(schedule)``."""
    with torch.no_grad():
        static, step = loaded_step(model, inputs, eek.Scheduled(schedule), bucket)
        length = static.halves[0].hidden.shape[1]
        shapes = _Shapes()
        with shapes:
            for previous in range(1, layer):
                layer_step(step, static, previous, bucket, True, length)
            shapes.ops.clear()
            layer_step(step, static, layer, bucket, True, length)
    return shapes.ops


def _torch_backend():
    from earlyexit_kernels.backends.registry import resolve_backend

    return resolve_backend("torch", torch.device("cpu"))


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_a_steps_ops_and_shapes_are_the_same_for_every_exit_pattern_in_a_bucket(layer):
    model = patched(eek.Scheduled(torch.full((12,), 4)))
    inputs = batch_inputs(12, seed=3)
    patterns = [torch.full((12,), 4), torch.arange(12) % 4 + 1, torch.tensor([1] * 11 + [4]), torch.ones(12)]
    seen = {tuple(step_ops(model, inputs, pattern.long(), layer, 16)) for pattern in patterns}
    assert len(seen) == 1


def test_torch_compile_traces_a_step_without_a_graph_break():
    """The CPU's proxy for "capturable": the whole step is one graph (no data-dependent shape or read)."""
    model = patched(eek.Entropy(0.15))
    with torch.no_grad():
        static, step = loaded_step(model, batch_inputs(8), eek.Entropy(0.15), 8)

        def layer_two():
            layer_step(step, static, 2, 8, True, 12)

        layer_step(step, static, 1, 8, True, 12)
        layer_two()
        expected = (static.halves[1].hidden.clone(), static.counts.clone(), static.logits.clone())
        torch._dynamo.reset()
        compiled = torch.compile(layer_two, fullgraph=True, backend="eager")
        compiled()
    assert torch.equal(static.halves[1].hidden, expected[0])
    assert torch.equal(static.counts, expected[1]) and torch.equal(static.logits, expected[2])


# ------------------------------------------------------------------------------ choice and errors


def test_an_unknown_step_is_refused_with_the_choices():
    model = tiny_model()
    with pytest.raises(ValueError, match="step must be one of 'auto', 'exact', 'graphed'; got 'fast'"):
        eek.patch(model, eek.Entropy(0.3), step="fast")


def test_skip_gates_cannot_run_graphed_and_auto_runs_it_exact():
    model = tiny_model()
    policy = eek.SkipGates(skip_threshold=0.5, entropy_threshold=0.1)
    with pytest.raises(ValueError, match="cannot run SkipGates: SkipGates runs each gated layer.*step='exact'"):
        eek.patch(model, policy, step="graphed")
    eek.patch(model, policy, step="auto")
    assert step_of(model) == "auto"
    ids, mask, _ = tiny_batch(6, 10)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert state_of(model).static_batches is None  # the exact step ran
    assert out.logits.shape == (6, 3)


def test_auto_runs_the_exact_step_on_the_cpu():
    model = patched(eek.Entropy(0.15), step="auto")
    with torch.no_grad():
        model(**batch_inputs(8))
    assert step_of(model) == "auto" and state_of(model).static_batches is None


def test_training_and_all_exits_take_the_all_exits_path_whatever_the_step():
    model = patched(eek.Entropy(0.15))
    inputs = batch_inputs(8)
    with torch.no_grad():
        out = model(**inputs, return_all_exits=True)
    assert out.all_logits.shape == (4, 8, 3)
    model.train()
    out = model(**inputs, labels=torch.zeros(8, dtype=torch.long))
    assert out.loss.requires_grad


# ------------------------------------------------------------------- other backends, and the GPU


@pytest.mark.parametrize("name", ["entropy", "patience", "qexit", "scheduled"])
def test_graphed_on_the_triton_backend_gives_its_exact_steps_outputs(name):
    """Triton's kernels (the interpreter on the CPU, compiled on a GPU) in the graphed step."""
    pytest.importorskip("triton")
    if not eek.backends()["triton"]:
        pytest.skip(f"backend 'triton': {eek.backend_status()['triton']}")
    batch = 16
    device = backend_device("triton")
    model = patched(EVERY_POLICY[name](batch), backend="triton", seed=3).to(device)
    inputs = {k: v.to(device) for k, v in batch_inputs(batch).items()}
    exact = run(model, inputs, "exact")
    graphed = run(model, inputs, "graphed")
    assert torch.equal(graphed.exit_layer, exact.exit_layer)
    assert torch.equal(graphed.layers_run, exact.layers_run)
    if device.type == "cpu":
        assert torch.equal(graphed.logits, exact.logits)
    else:
        torch.testing.assert_close(graphed.logits, exact.logits, rtol=1e-5, atol=1e-5)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_session.sh)")
# bfloat16's own rounding (torch.testing's default rtol for it), on logits of order 1
BF16_TOLERANCE = dict(rtol=1.6e-2, atol=1.6e-2)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_on_the_gpu_the_captured_step_gives_the_exact_steps_outputs_and_replays(backend, dtype):
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r}: {eek.backend_status()[backend]}")
    batch = 40  # bucket 40, then smaller ones as the schedule empties it
    schedule = torch.arange(batch) % 4 + 1
    model = patched(eek.Scheduled(schedule), backend=backend).to("cuda", dtype)
    inputs = {k: v.cuda() for k, v in batch_inputs(batch).items()}
    exact = run(model, inputs, "exact")
    graphed = run(model, inputs, "graphed")
    graphs = next(iter(state_of(model).static_batches._kept.values())).graphs
    assert graphs.uncapturable is None, graphs.uncapturable
    captured = graphs.captures
    assert captured >= 4
    with torch.no_grad():
        again = model(**inputs)
    assert graphs.captures == captured, "a second forward replays what the first captured"
    assert torch.equal(again.logits, graphed.logits) and torch.equal(again.exit_layer, graphed.exit_layer)
    assert torch.equal(graphed.exit_layer, schedule.cuda()) and torch.equal(graphed.layers_run, exact.layers_run)
    tolerance = BF16_TOLERANCE if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(graphed.logits, exact.logits, **tolerance)


@needs_cuda
@pytest.mark.parametrize("name", ["entropy", "maxprob", "patience", "qexit", "voting", "dact"])
def test_on_the_gpu_threshold_policies_decide_as_the_exact_step_away_from_the_threshold(name):
    from threshold_helpers import assert_clear_of_threshold

    batch = 48
    policy = EVERY_POLICY[name](batch)
    model = patched(policy, backend="auto").to("cuda")
    inputs = {k: v.cuda() for k, v in batch_inputs(batch, seed=11).items()}
    with torch.no_grad():
        everything = model(**inputs, return_all_exits=True)
    assert_clear_of_threshold(policy, everything, 4)
    exact = run(model, inputs, "exact")
    graphed = run(model, inputs, "graphed")
    assert torch.equal(graphed.exit_layer, exact.exit_layer)
    assert torch.equal(graphed.layers_run, exact.layers_run)
    torch.testing.assert_close(graphed.logits, exact.logits, rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_on_the_gpu_nobody_exiting_gives_the_unpatched_model(attn):
    """Bit for bit where the batch fills its bucket and has no padding (the unpatched model's shapes);
    to rounding with a dead row and a length padded to 32."""
    model = tiny_model("bert", attn=attn).cuda()
    full_ids, _, full_types = tiny_batch(8, 12, padded=False)
    ids, mask, token_types = tiny_batch(7, 12)
    with torch.no_grad():
        full_reference = model(input_ids=full_ids.cuda(), token_type_ids=full_types.cuda()).logits
        reference = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), token_type_ids=token_types.cuda()).logits
    eek.patch(model, eek.Entropy(0.0), backend="auto", step="graphed")
    spread_heads(model)
    with torch.no_grad():
        full = model(input_ids=full_ids.cuda(), token_type_ids=full_types.cuda())
        out = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), token_type_ids=token_types.cuda())
    assert torch.equal(full.logits, full_reference)
    torch.testing.assert_close(out.logits, reference, rtol=1e-4, atol=1e-5)
    assert out.exit_layer.tolist() == [4] * 7


@needs_cuda
def test_on_the_gpu_auto_runs_graphed_and_nothing_is_read_back_between_layers(monkeypatch):
    model = patched(eek.Entropy(0.15), seed=3, step="auto").cuda()
    ids, mask, _ = tiny_batch(64, 30, seed=8)
    per_layer, out, _ = count(model, ids, mask, monkeypatch)
    assert state_of(model).static_batches is not None, "auto ran the graphed step on CUDA"
    assert per_layer[0][1] == 1
    assert [per_layer[layer][1] for layer in range(1, 5)] == [0, 0, 0, 0]


def test_save_pretrained_keeps_the_step_with_the_policy(tmp_path):
    model = patched(eek.Entropy(0.15))
    model.save_pretrained(tmp_path)
    assert step_of(eek.from_pretrained(tmp_path)) == "graphed"
    assert step_of(eek.from_pretrained(tmp_path, eek.SkipGates(0.5, entropy_threshold=0.1))) == "auto"


def test_new_head_weights_get_new_buffers_and_the_outputs_follow_them():
    """The fused backends keep converted copies of the heads per version, which a captured graph
    would keep reading: an in-place update of a head makes new buffers (and graphs)."""
    model = patched(eek.Entropy(0.15))
    inputs = batch_inputs(16)
    before = run(model, inputs, "graphed", plan=GPU_PLAN)
    batches = state_of(model).static_batches
    with torch.no_grad():
        for head in model.early_exit_heads.classifiers:
            head.weight.mul_(-1.0)
        after = model(**inputs)
    assert len(batches._kept) == 2
    eek.patch(model, eek.Entropy(0.15), backend="torch", step="exact")
    with torch.no_grad():
        exact = model(**inputs)
    assert torch.equal(after.exit_layer, exact.exit_layer)
    assert not torch.equal(after.exit_layer, before.exit_layer)


def test_an_unpadded_batch_at_a_length_off_the_step_is_masked_so_its_length_rounds_up():
    """On a GPU a stream engine's unpadded batch (one row, rows of one length) would run at its exact length, and
    every length met would capture its own graphs of every layer; it is given a mask of ones so that its length
    rounds up to the step as a padded batch's does (run_graphed's align_unpadded; the model's own forward keeps the
    unpatched model's shapes). A padded batch, or one at a multiple of the step, is left as it is."""
    from earlyexit_kernels.engine.graphed.static_step import masked_to_step

    mask, extents = masked_to_step(None, None, 3, 45, 32, "cpu")
    assert torch.equal(mask, torch.ones(3, 45, dtype=torch.long)) and extents.tolist() == [45, 45, 45]
    assert masked_to_step(None, None, 3, 64, 32, "cpu") == (None, None)
    given = (torch.ones(2, 5), torch.tensor([5, 3]))
    assert masked_to_step(*given, 2, 5, 32, "cpu") == given


def test_the_packed_outputs_are_kept_per_dtype_for_the_finishing_steps_captured_with_them():
    """A captured finishing step writes the buffer it was captured with: a forward under autocast (bf16 outputs)
    between two in float32 must not replace the float32 buffer the first one's graph writes."""
    shape = BatchShape(4, 8, 16, 3, 2, torch.float32, torch.float32, torch.device("cpu"))
    static = StaticBatch(shape, mask=None, state={})
    float32 = static.outputs(torch.float32)
    assert static.outputs(torch.bfloat16) is not float32
    assert static.outputs(torch.float32) is float32


def test_on_the_cpu_the_device_context_is_nothing():
    from earlyexit_kernels.engine.graphed.step_graphs import on_device

    with on_device(torch.device("cpu")):
        assert torch.ones(1).device.type == "cpu"
