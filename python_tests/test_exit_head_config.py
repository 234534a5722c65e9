"""The internal exit heads' pooling ("cls" / "mean") and form ("model" / "mlp"), chosen at ``eek.patch``.

Per choice and family (tiny random models, built offline): full-depth logits equal the
unpatched model's; early exit equals the all-exits replay; compaction and trimming give what
each row alone gives, and mean pooling never reads padding; the fast CPU backends (and
Triton's interpreter) equal the torch backend; the continuous engine equals the per-batch
engine; save/load keeps the choice and the heads; the training loss reaches the heads;
``adapter.exit_input`` / ``adapter.classify`` are what the engine computes; bad values are refused.
"""

import pytest
import torch
from model_comparison import assert_same_function, assert_same_weights
from test_model_families import (
    NUM_LAYERS,
    assert_continuous_as_per_batch,
    assert_rows_leave_as_alone,
    tiny_family,
    tiny_inputs,
)

import earlyexit_kernels as eek
from earlyexit_kernels.engine.step.heads import ExitHeadConfig, MLPExitHead
from earlyexit_kernels.methods.exit_rules import entropy
from earlyexit_kernels.models.base import masked_mean
from earlyexit_kernels.patching.patch import current_adapter

CHOICES = [(p, h) for p in ("cls", "mean") for h in ("model", "mlp")]
FAMILIES = ("bert", "distilbert", "modernbert")  # fused tanh pooler; unfused head; final norm + own pooling


def spread_exit_heads(model, seed: int = 0) -> None:
    """Distinct values in every internal head (Linear or MLP) so that sequences leave at different layers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.early_exit_heads.classifiers:
            for parameter in head.parameters():
                if parameter.dim() == 2:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 3.0 / parameter.shape[1] ** 0.5)
                elif isinstance(head, MLPExitHead):
                    continue  # LayerNorm's affine and the biases keep their values
                else:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def patched_with_spread_exits(family, pooling, head, inputs, *, seed=0, backend="torch"):
    """A tiny ``family`` model patched with the choice and an Entropy threshold midway between the
    two middle entropies of layer 1's head (about half the rows leave there)."""
    model = tiny_family(family, seed=seed)
    eek.patch(model, eek.Entropy(0.0), backend="torch", pooling=pooling, head=head)
    spread_exit_heads(model, seed)
    with torch.no_grad():
        values = entropy(model(**inputs, return_all_exits=True).all_logits[0].float()).sort().values
    middle = len(values) // 2
    threshold = float(values[middle - 1] + values[middle]) / 2
    return eek.patch(model, eek.Entropy(threshold), backend=backend)


def available(backend):
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r} unavailable")


@pytest.mark.exact
@pytest.mark.parametrize("family", FAMILIES + ("deberta_v2",))
@pytest.mark.parametrize("pooling,head", CHOICES)
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_full_depth_logits_equal_the_unpatched_model(family, pooling, head, backend):
    available(backend)
    model = tiny_family(family)
    inputs = tiny_inputs(family, 7, 12)
    with torch.no_grad():
        reference = model(**inputs).logits
        eek.patch(model, eek.Entropy(0.0), backend=backend, pooling=pooling, head=head)
        spread_exit_heads(model)
        out = model(**inputs)
    assert eek.head_config(model) == ExitHeadConfig(pooling, head, 32 if head == "mlp" else None)
    assert torch.equal(out.logits, reference)
    assert out.exit_layer.tolist() == [NUM_LAYERS] * 7


@pytest.mark.exact
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling,head", CHOICES)
def test_early_exit_agrees_with_the_all_exits_replay(family, pooling, head):
    inputs = tiny_inputs(family, 16, 12, seed=3)
    model = patched_with_spread_exits(family, pooling, head, inputs, seed=2)
    with torch.no_grad():
        early = model(**inputs)
        full = model(**inputs, return_all_exits=True)
    assert torch.equal(early.exit_layer, full.exit_layer)
    assert len(set(early.exit_layer.tolist())) >= 2, "the test needs exits spread over layers"
    picked = full.all_logits[early.exit_layer - 1, torch.arange(16)]
    torch.testing.assert_close(early.logits, picked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling,head", CHOICES)
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_compaction_and_trimming_give_what_each_row_alone_gives(family, pooling, head, backend):
    available(backend)
    inputs = tiny_inputs(family, 12, 14, seed=5)
    assert_rows_leave_as_alone(
        patched_with_spread_exits(family, pooling, head, inputs, seed=4, backend=backend), inputs
    )


@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize("head", ["model", "mlp"])
def test_mean_pooling_ignores_padding(family, head):
    """The same rows padded to a longer length, with other ids in the padding, exit alike."""
    inputs = tiny_inputs(family, 10, 12, seed=13)
    model = patched_with_spread_exits(family, "mean", head, inputs, seed=12)
    longer = {}
    for name, value in inputs.items():
        filler = torch.randint(3, 90, (value.shape[0], 6)) if name == "input_ids" else torch.zeros_like(value[:, :6])
        longer[name] = torch.cat([value, filler], dim=1)
    longer["input_ids"] = torch.where(
        longer["attention_mask"] == 1, longer["input_ids"], torch.randint(3, 90, (10, 18))
    )
    with torch.no_grad():
        a, b = model(**inputs), model(**longer)
        replay_a = model(**inputs, return_all_exits=True).all_logits
        replay_b = model(**longer, return_all_exits=True).all_logits
    assert torch.equal(a.exit_layer, b.exit_layer)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(replay_a, replay_b, rtol=1e-4, atol=1e-5)


def test_masked_mean_reads_no_padding_and_survives_an_empty_row():
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    hidden[0, 3:] = float("nan")
    pooled = masked_mean(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    assert torch.equal(pooled[2], torch.zeros(4))
    torch.testing.assert_close(masked_mean(hidden[1:2], None), hidden[1:2].mean(1))
    half = masked_mean(hidden[:2].to(torch.bfloat16), mask[:2])
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


@pytest.mark.parametrize(
    "family,pooling,head,backend",
    [
        ("bert", "mean", "model", "cpp"),  # fused head on the masked mean
        ("bert", "mean", "mlp", "cpp"),
        ("distilbert", "mean", "model", "cpp"),
        ("bert", "mean", "model", "triton"),  # fused, in Triton's interpreter
        ("distilbert", "cls", "mlp", "triton"),
    ],
)
@pytest.mark.exact
def test_a_fast_backend_equals_the_torch_backend(family, pooling, head, backend):
    available(backend)
    inputs = tiny_inputs(family, 12, 14, seed=15)
    model = patched_with_spread_exits(family, pooling, head, inputs, seed=14)
    with torch.no_grad():
        reference = model(**inputs)
        eek.patch(model, eek.policy_of(model), backend=backend)
        fast = model(**inputs)
    if head == "model" and family == "bert":
        assert current_adapter(model).fuses_internal_heads
    assert torch.equal(fast.exit_layer, reference.exit_layer)
    torch.testing.assert_close(fast.logits, reference.logits, rtol=1e-4, atol=1e-5)
    assert len(set(reference.exit_layer.tolist())) >= 2


@pytest.mark.parametrize(
    "family,pooling,head,backend",
    [("bert", "mean", "model", "cpp"), ("distilbert", "mean", "mlp", "torch"), ("modernbert", "mean", "mlp", "cpp")],
)
def test_the_continuous_engine_gives_the_per_batch_results(family, pooling, head, backend):
    available(backend)
    inputs = tiny_inputs(family, 16, 16, seed=9)
    assert_continuous_as_per_batch(
        patched_with_spread_exits(family, pooling, head, inputs, seed=8, backend=backend), inputs
    )


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_save_and_load_keep_the_choice_and_the_heads(family, tmp_path):
    inputs = tiny_inputs(family, 8, 10, seed=7)
    model = tiny_family(family, seed=6)
    eek.patch(model, eek.QExit(), backend="torch", pooling="mean", head="mlp", mlp_hidden=24)
    eek.patch(model, eek.Patience(1))
    spread_exit_heads(model, seed=6)
    assert_saved_and_loaded(model, inputs, tmp_path, ExitHeadConfig("mean", "mlp", 24))


def assert_saved_and_loaded(model, inputs, folder, config: ExitHeadConfig) -> None:
    """``save_pretrained`` then ``eek.from_pretrained`` give the heads of ``config``, the same weights
    and the same outputs at every exit."""
    model.save_pretrained(folder)
    loaded = eek.from_pretrained(folder)
    assert eek.head_config(loaded) == config
    assert_same_weights(loaded, model)
    with torch.no_grad():
        a, b = model(**inputs, return_all_exits=True), loaded(**inputs, return_all_exits=True)
    assert_same_function(b.all_logits, a.all_logits)


def test_a_file_saved_before_the_choice_existed_loads_with_the_family_default(tmp_path):
    import json

    model = eek.patch(tiny_family("modernbert_mean"), eek.Entropy(0.1))
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "early_exit_config.json"
    saved = json.loads(config_path.read_text())
    for key in ("pooling", "form", "mlp_hidden"):
        del saved["heads"][key]
    config_path.write_text(json.dumps(saved))
    assert eek.head_config(eek.from_pretrained(tmp_path)) == ExitHeadConfig("mean", "model", None)


def test_the_defaults_are_the_model_s_own_and_a_repatch_with_none_keeps_the_choice():
    assert eek.head_config(eek.patch(tiny_family("bert"), eek.Entropy(0.1))) == ExitHeadConfig("cls", "model")
    assert eek.head_config(eek.patch(tiny_family("modernbert_mean"), eek.Entropy(0.1))).pooling == "mean"
    model = eek.patch(tiny_family("bert"), eek.Entropy(0.1), pooling="mean", head="mlp", mlp_hidden=16)
    heads = list(model.early_exit_heads.classifiers)
    eek.patch(model, eek.Patience(1))
    assert eek.head_config(model) == ExitHeadConfig("mean", "mlp", 16)
    assert list(model.early_exit_heads.classifiers) == heads  # same modules, trained values kept
    eek.patch(model, eek.Patience(1), pooling="cls")
    assert list(model.early_exit_heads.classifiers) == heads  # a new pooling keeps the heads
    eek.unpatch(model)
    eek.patch(model, eek.Entropy(0.1))
    assert eek.head_config(model) == ExitHeadConfig("cls", "mlp", 16)
    eek.patch(model, eek.Entropy(0.1), head="model")
    head = model.early_exit_heads.classifiers[0]
    assert isinstance(head, torch.nn.Linear) and torch.equal(head.weight, model.classifier.weight)
    eek.patch(model, eek.Entropy(0.1), head="mlp", mlp_hidden=8)
    assert model.early_exit_heads.classifiers[0].dense.out_features == 8


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(pooling="max"), "pooling must be one of 'cls', 'mean'"),
        (dict(head="linear"), "head must be one of 'model', 'mlp', 'cascade'"),
        (dict(head="mlp", mlp_hidden=0), "mlp_hidden must be a positive int"),
        (dict(head="mlp", mlp_hidden=8.0), "mlp_hidden must be a positive int"),
        (dict(head="model", mlp_hidden=8), 'no meaning with head="model"'),
        (dict(mlp_hidden=8), 'pass head="mlp" or head="cascade" with it'),
    ],
)
def test_bad_choices_are_refused_with_a_message(kwargs, message):
    model = tiny_family("bert")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        eek.patch(model, eek.Entropy(0.1), **kwargs)
    assert not eek.is_patched(model)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize("pooling,head", CHOICES)
def test_exit_input_and_classify_are_what_the_engine_computes(family, pooling, head):
    """The contract a cached-input trainer relies on: classify(i, exit_input(i, h_i, mask)) is head i's output."""
    inputs = tiny_inputs(family, 6, 10, seed=17)
    model = patched_with_spread_exits(family, pooling, head, inputs, seed=16)
    adapter = current_adapter(model)
    with torch.no_grad():
        all_logits = model(**inputs, return_all_exits=True).all_logits
        eek.unpatch(model)
        states = model(**inputs, output_hidden_states=True).hidden_states
    mask = inputs["attention_mask"]
    for layer in range(1, NUM_LAYERS + 1):
        with torch.no_grad():
            x = adapter.exit_input(layer, states[layer], mask)
            logits = adapter.classify(layer, x)
        assert x.shape == (6, 32)
        torch.testing.assert_close(logits, all_logits[layer - 1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(adapter.exit_input(NUM_LAYERS, states[-1], mask), adapter.pool(states[-1], mask))
        rows = states[1][:, 0] if pooling == "cls" else masked_mean(states[1], mask)
        expected = adapter.pool_cls(rows) if head == "model" else rows
        torch.testing.assert_close(adapter.exit_input(1, states[1], mask), expected)
        # no trainable head parameter inside exit_input: changing the heads leaves it as it was
        before = adapter.exit_input(1, states[1], mask)
        for parameter in adapter.heads.classifiers.parameters():
            parameter.add_(1.0)
        assert torch.equal(adapter.exit_input(1, states[1], mask), before)


@pytest.mark.parametrize("pooling,head", CHOICES)
def test_the_training_loss_reaches_every_head(pooling, head):
    model = tiny_family("distilbert", seed=10)
    inputs = tiny_inputs("distilbert", 6, 10, seed=11)
    eek.patch(model, eek.QExit(), objective="palbert", pooling=pooling, head=head)
    model.train()
    out = model(**inputs, labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out.all_logits.shape == (NUM_LAYERS, 6, 3)
    out.loss.backward()
    for classifier in model.early_exit_heads.classifiers:
        for name, parameter in classifier.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    halting = model.early_exit_heads.qexit_halting
    assert all(p.grad is not None for p in halting.parameters())
