"""Exit heads that read the head below (``head="cascade"``): ``z_i = MLP_i(x_i) + B_i z_{i-1}``.

What the form promises, on tiny random models built offline:

- untrained (``B_i = 0``) a cascade head is the MLP head it was built from; layer 1 has no head
  below and is an MLP head; layer L is the model's own, so full depth stays bit for bit;
- every engine computes the chain of :func:`reference_chain` (``exit_input`` and ``classify``
  on the unpatched model's hidden states, each head fed the logits of the one below): early
  exit, compaction and trimming, the C++ and Triton backends, the graphed step, the continuous engine, and
  a ``Scheduled`` policy that exits where no head would run otherwise;
- the cached training path computes the same chain, and the loss reaches every ``B_i``;
- save/load keeps the form and the weights;
- ``head="auto"`` keeps the cascade where it runs fewer layers on the validation rows, past
  their noise (paired resamples), and not where the heads that read their own layer already do
  as well.
"""

import pytest
import torch
from conftest import tiny_model
from test_exit_head_config import (
    assert_continuous_as_per_batch,
    assert_rows_leave_as_alone,
    assert_saved_and_loaded,
    available,
    patched_with_spread_exits,
)
from test_model_families import NUM_LAYERS, tiny_family, tiny_inputs

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.record import ExitRecord
from earlyexit_kernels.engine.step.heads import CascadeExitHead, ExitHeadConfig, MLPExitHead
from earlyexit_kernels.patching.patch import current_adapter
from earlyexit_kernels.training.cached_heads import ExitInputCache, cache_exit_inputs, cached_exits
from earlyexit_kernels.training.head_choice import (
    CANDIDATES,
    CASCADE_CONFIDENCE,
    choose_heads,
    describe_trials,
    saving_share,
)
from earlyexit_kernels.training.train import train_exit_heads


def reference_chain(model, inputs) -> torch.Tensor:
    """[L, n, C]: every head on the unpatched model's hidden states, each cascade head given the
    logits of the head below (the definition, written out)."""
    adapter = current_adapter(model)
    policy = eek.policy_of(model)
    with torch.no_grad():
        eek.unpatch(model)
        states = model(**inputs, output_hidden_states=True).hidden_states
        eek.patch(model, policy, backend="torch")
        mask = inputs["attention_mask"]
        logits, below = [], None
        for layer in range(1, NUM_LAYERS + 1):
            logits.append(adapter.classify(layer, adapter.exit_input(layer, states[layer], mask), below))
            below = logits[-1].float()
    return torch.stack(logits)


def test_the_form_is_an_mlp_plus_the_head_below_and_starts_as_the_mlp():
    model = eek.patch(tiny_family("bert"), eek.Entropy(0.0), "torch", pooling="mean", head="cascade", mlp_hidden=16)
    heads = list(model.early_exit_heads.classifiers)
    assert type(heads[0]) is MLPExitHead  # layer 1: no head below
    assert all(type(h) is CascadeExitHead and torch.equal(h.below.weight, torch.zeros(3, 3)) for h in heads[1:])
    assert eek.head_config(model) == ExitHeadConfig("mean", "cascade", 16)
    assert model.early_exit_heads.reads_below
    inputs = tiny_inputs("bert", 6, 10, seed=2)
    with torch.no_grad():
        cascade = model(**inputs, return_all_exits=True).all_logits
        mlp_state = {k: v for k, v in model.early_exit_heads.classifiers.state_dict().items() if "below" not in k}
        eek.patch(model, eek.Entropy(0.0), head="mlp", mlp_hidden=16)
        model.early_exit_heads.classifiers.load_state_dict(mlp_state)
        mlp = model(**inputs, return_all_exits=True).all_logits
    torch.testing.assert_close(mlp, cascade, rtol=1e-6, atol=1e-6)  # the MLP form runs the pooled-head step


@pytest.mark.exact
@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_full_depth_logits_equal_the_unpatched_model(family, backend):
    available(backend)
    model = tiny_family(family)
    inputs = tiny_inputs(family, 7, 12)
    with torch.no_grad():
        reference = model(**inputs).logits
        eek.patch(model, eek.Entropy(0.0), backend=backend, pooling="mean", head="cascade")
        out = model(**inputs)
    assert torch.equal(out.logits, reference)
    assert out.exit_layer.tolist() == [NUM_LAYERS] * 7


@pytest.mark.parametrize("family", ["bert", "distilbert", "modernbert"])
def test_every_head_is_the_chain_and_early_exit_replays_it(family):
    inputs = tiny_inputs(family, 16, 12, seed=3)
    model = patched_with_spread_exits(family, "mean", "cascade", inputs, seed=2)
    assert any(h.below.weight.abs().sum() > 0 for h in model.early_exit_heads.classifiers[1:])
    with torch.no_grad():
        full = model(**inputs, return_all_exits=True)
        early = model(**inputs)
    internal = slice(0, NUM_LAYERS - 1)  # layer L: the model's own (ModernBERT's final norm is not in its states)
    torch.testing.assert_close(
        full.all_logits[internal], reference_chain(model, inputs)[internal], rtol=1e-5, atol=1e-6
    )
    assert torch.equal(early.exit_layer, full.exit_layer)
    assert len(set(early.exit_layer.tolist())) >= 2, "the test needs exits spread over layers"
    picked = full.all_logits[early.exit_layer - 1, torch.arange(16)]
    torch.testing.assert_close(early.logits, picked, rtol=1e-4, atol=1e-5)


def test_the_head_below_changes_what_a_head_says():
    """A cascade head with B_i != 0 differs from its MLP alone: the chain is read, not ignored."""
    inputs = tiny_inputs("bert", 16, 12, seed=3)
    model = patched_with_spread_exits("bert", "mean", "cascade", inputs, seed=2)
    with torch.no_grad():
        chained = model(**inputs, return_all_exits=True).all_logits
        for head in model.early_exit_heads.classifiers[1:]:
            head.below.weight.zero_()
        alone = model(**inputs, return_all_exits=True).all_logits
    assert torch.equal(chained[0], alone[0]) and torch.equal(chained[-1], alone[-1])
    assert (chained[1] - alone[1]).abs().max() > 0.1


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_compaction_and_trimming_give_what_each_row_alone_gives(backend):
    available(backend)
    inputs = tiny_inputs("bert", 12, 14, seed=5)
    assert_rows_leave_as_alone(
        patched_with_spread_exits("bert", "mean", "cascade", inputs, seed=4, backend=backend), inputs
    )


@pytest.mark.exact
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_a_fast_backend_equals_the_torch_backend(backend):
    """The cascade's head runs in PyTorch on every backend; the backend's exit step decides."""
    available(backend)
    inputs = tiny_inputs("bert", 12, 14, seed=15)
    model = patched_with_spread_exits("bert", "mean", "cascade", inputs, seed=14)
    with torch.no_grad():
        reference = model(**inputs)
        eek.patch(model, eek.policy_of(model), backend=backend)
        fast = model(**inputs)
    assert torch.equal(fast.exit_layer, reference.exit_layer)
    torch.testing.assert_close(fast.logits, reference.logits, rtol=1e-4, atol=1e-5)
    assert len(set(reference.exit_layer.tolist())) >= 2


@pytest.mark.exact
def test_the_graphed_step_gives_the_exact_step_s_bits():
    inputs = tiny_inputs("bert", 16, 12, seed=7)
    model = patched_with_spread_exits("bert", "mean", "cascade", inputs, seed=6)
    with torch.no_grad():
        exact = model(**inputs)
        eek.patch(model, eek.policy_of(model), backend="torch", step="graphed")
        graphed = model(**inputs)
    assert torch.equal(graphed.exit_layer, exact.exit_layer)
    assert torch.equal(graphed.logits, exact.logits)
    assert len(set(exact.exit_layer.tolist())) >= 2


def test_a_schedule_exits_on_the_chain_where_no_head_would_run_otherwise():
    """``Scheduled`` skips the heads of layers nobody leaves at; a cascade head needs them all."""
    inputs = tiny_inputs("bert", 6, 12, seed=9)
    model = patched_with_spread_exits("bert", "mean", "cascade", inputs, seed=8)
    with torch.no_grad():
        full = model(**inputs, return_all_exits=True).all_logits
        eek.patch(model, eek.Scheduled(torch.tensor([2, 2, 3, 2, 3, 2])))  # nobody leaves at layer 1
        out = model(**inputs)
    assert out.exit_layer.tolist() == [2, 2, 3, 2, 3, 2]
    torch.testing.assert_close(out.logits, full[out.exit_layer - 1, torch.arange(6)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_the_continuous_engine_gives_the_per_batch_results(backend):
    available(backend)
    inputs = tiny_inputs("distilbert", 16, 16, seed=9)
    model = patched_with_spread_exits("distilbert", "mean", "cascade", inputs, seed=8, backend=backend)
    assert_continuous_as_per_batch(model, inputs)


def test_the_cached_training_path_computes_the_chain_and_trains_every_map():
    inputs = tiny_inputs("bert", 8, 12, seed=11)
    model = patched_with_spread_exits("bert", "mean", "cascade", inputs, seed=10)
    batches = [dict(inputs, labels=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))]
    cache = cache_exit_inputs(model, batches)
    with torch.no_grad():
        forward = model(**inputs, return_all_exits=True).all_logits
        cached = cached_exits(model, cache).all_logits
    torch.testing.assert_close(cached, forward, rtol=1e-5, atol=1e-6)
    model.train()
    out = cached_exits(model, cache)
    torch.nn.functional.cross_entropy(out.all_logits[:-1].flatten(0, 1), cache.labels.repeat(NUM_LAYERS - 1)).backward()
    for head in model.early_exit_heads.classifiers[1:]:
        assert head.below.weight.grad is not None and head.below.weight.grad.abs().sum() > 0


def test_trains_below_learns_the_maps_alone_and_needs_cascade_heads():
    inputs = tiny_inputs("bert", 8, 12, seed=13)
    model = eek.patch(tiny_family("bert", seed=12), eek.Entropy(0.0), "torch", pooling="mean", head="cascade")
    batches = [dict(inputs, labels=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))]
    cache = cache_exit_inputs(model, batches)
    before = {k: v.clone() for k, v in model.early_exit_heads.state_dict().items()}
    train_exit_heads(model, cache, method="deebert", trains="below", epochs=3, progress=False)
    after = model.early_exit_heads.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"classifiers.{i}.below.weight" for i in range(1, NUM_LAYERS - 1)}
    assert all(p.requires_grad for p in model.early_exit_heads.parameters())  # restored after the loop
    eek.patch(model, eek.Entropy(0.0), head="mlp")
    with pytest.raises(ValueError, match='these heads are head="mlp": patch with head="cascade"'):
        train_exit_heads(model, cache, method="deebert", trains="below", epochs=1, progress=False)


def test_save_and_load_keep_the_form_and_the_heads(tmp_path):
    inputs = tiny_inputs("bert", 8, 10, seed=7)
    model = patched_with_spread_exits("bert", "mean", "cascade", inputs, seed=6)
    assert_saved_and_loaded(model, inputs, tmp_path, ExitHeadConfig("mean", "cascade", 32))


# ---------------------------------------------------------------- the automatic choice


def _split_signal_cache(model, rows: int, seed: int, *, whole_at_layer_1: bool) -> ExitInputCache:
    """Two classes, the label the sign of ``a_1 + a_2 + a_3`` (three independent draws).

    ``whole_at_layer_1=False``: layer k's vectors carry ``a_k`` alone, so a head that reads its
    own layer sees a third of the evidence and a cascade head all of it below and at its layer.
    ``True``: layer 1's vectors carry the whole sum (the rows near zero left out), so a head
    that reads its own layer is sure at layer 1 and the head below has nothing to add.
    """
    generator = torch.Generator().manual_seed(seed)
    parts = torch.randn(rows * 2, 3, generator=generator)
    total = parts.sum(1)
    keep = total.abs() > 0.5 if whole_at_layer_1 else torch.ones_like(total, dtype=torch.bool)
    parts, total = parts[keep][:rows], total[keep][:rows]
    if whole_at_layer_1:
        parts = total[:, None].expand(-1, 3)
    labels = (total > 0).long()
    # a_k along one direction beside a constant one: the MLP heads' LayerNorm keeps a_k (as a ratio)
    signs = torch.ones(32)
    signs[::2] = -1.0
    offset = torch.zeros(32)
    offset[:16] = 1.0
    noise = 0.05 * torch.randn(rows, 3, 32, generator=generator)
    vectors = parts[:, :, None] * signs + offset + noise
    real = cache_exit_inputs(model, [{"input_ids": torch.full((1, 4), 7)}])
    final = torch.nn.functional.one_hot(labels, 2).float() * 8.0 - 4.0
    inputs = real.inputs.expand(rows, -1, -1)
    return ExitInputCache(inputs, None, final, labels, {"cls": vectors, "mean": vectors.clone()})


def _choose(whole_at_layer_1: bool):
    model = eek.patch(tiny_model("bert", num_layers=4, num_labels=2), eek.Entropy(0.0), backend="torch")
    train = _split_signal_cache(model, 600, 1, whole_at_layer_1=whole_at_layer_1)
    val = _split_signal_cache(model, 300, 2, whole_at_layer_1=whole_at_layer_1)

    # where layer 1 holds the whole sum every head is sure there within a few epochs (measured: 15, 25 and 60
    # epochs choose alike, every row leaving at layer 1); the spread evidence takes 60 to part the heads
    epochs = 15 if whole_at_layer_1 else 60

    def train_heads(train_cache, val_cache, trains=None):
        return train_exit_heads(
            model, train_cache, method="deebert", trains=trains, val_batches=val_cache, epochs=epochs, progress=False
        )

    chosen, trials, _ = choose_heads(
        model, eek.Entropy(0.0), train, val, train_heads=train_heads, max_drop=1.0, target_layers=None, target="auto"
    )
    assert [(t.pooling, t.head) for t in trials] == list(CANDIDATES)
    assert [t.beats_base is not None for t in trials] == [head == "cascade" for _, head in CANDIDATES]
    model.trials = trials
    return model, chosen, {(t.pooling, t.head): t.mean_layers for t in trials}


def test_the_choice_keeps_the_cascade_where_the_evidence_is_spread_over_the_layers():
    model, chosen, layers = _choose(whole_at_layer_1=False)
    best_own = min(v for (_, head), v in layers.items() if head != "cascade")
    assert chosen.head == "cascade" and eek.head_config(model).head == "cascade"
    # measured: the cascades 3.25-3.32 layers of 4 (their maps alone trained on the MLP heads), the
    # heads that read their own layer 3.58 and more
    assert chosen.mean_layers < 3.45 < best_own
    assert chosen.beats_base >= CASCADE_CONFIDENCE  # past the noise of the validation rows


@pytest.mark.filterwarnings("ignore:train_exit_heads. the training stopped at its cap")
def test_the_choice_keeps_the_simpler_heads_where_the_cascade_adds_nothing():
    model, chosen, layers = _choose(whole_at_layer_1=True)
    assert chosen.head != "cascade" and eek.head_config(model).head == chosen.head
    assert chosen.mean_layers < 1.5  # every row leaves at layer 1, and the cascade cannot do better
    assert min(v for (_, head), v in layers.items() if head == "cascade") >= chosen.mean_layers
    assert all(t.beats_base < CASCADE_CONFIDENCE for t in model.trials if t.head == "cascade")
    assert "not kept" in "\n".join(describe_trials(model.trials, "accuracy", 4))


def test_the_saving_share_weighs_a_difference_against_the_noise_of_the_rows():
    """Paired resamples: a record never beats itself; one whose heads are right on more rows beats
    a worse one nearly always; one surer on one row of 400 (measured: better in 62% of resamples,
    where the row was drawn) does not pass 95%."""
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(2, (400,), generator=generator)
    sure = torch.nn.functional.one_hot(labels, 2).float() * 6.0 - 3.0

    def record(right_at_layer_1: int) -> ExitRecord:
        first = sure.clone()
        first[right_at_layer_1:] = 0.0  # unsure (entropy log 2) past the first rows
        return ExitRecord(torch.stack([first, sure.clone(), sure]), labels, None, None, eek.Entropy(0.0))

    settings = dict(max_drop=1.0, target_layers=None, target="accuracy", resamples=400)
    worse, better, close = record(100), record(300), record(101)
    assert saving_share(worse, worse, **settings) == 0.0
    assert saving_share(worse, better, **settings) > 0.99
    assert saving_share(better, worse, **settings) < 0.01
    assert saving_share(worse, close, **settings) < CASCADE_CONFIDENCE
