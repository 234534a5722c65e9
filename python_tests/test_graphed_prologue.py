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
from test_graphed_step import GPU_PLAN
from test_model_families import FAMILIES, spread_heads, tiny_family, tiny_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import earlyexit_kernels as eek
from earlyexit_kernels.engine.graphed_prologue import KEPT_PROLOGUES, Prologue
from earlyexit_kernels.engine.step_graphs import GraphStats
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
    from earlyexit_kernels.engine.static_step import StaticBatches

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
    # the layers' graphs and the prologue's one, none run uncaptured
    assert batches.stats.captures == layer_graphs + 1 and batches.stats.eager == 0, batches.stats
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
