"""The Hugging Face drop-in: exact when nothing exits, consistent with the all-exits path, clear errors."""

import pytest
import torch
from conftest import VOCAB, tiny_batch, tiny_model
from transformers import BertConfig, BertModel, SqueezeBertConfig, SqueezeBertForSequenceClassification

import earlyexit_kernels as eek
from earlyexit_kernels.patching.patch import current_adapter

EVERY_POLICY = {
    "entropy": lambda n: eek.Entropy(0.15),
    "entropy_normalized_per_layer": lambda n: eek.Entropy([0.05, 0.1, 0.2, 0.3], normalized=True),
    "maxprob": lambda n: eek.MaxProb(0.97),
    "maxprob_temperature": lambda n: eek.MaxProb(0.9, temperature=[3.0, 2.0, 1.0, 1.0]),
    "patience": lambda n: eek.Patience(1),
    "qexit": lambda n: eek.QExit(q=0.4),
    "qexit_subtract": lambda n: eek.QExit(q=0.4, combine="subtract", lambda_layers=0),
    "voting": lambda n: eek.Voting(2),
    "dact": lambda n: eek.DACT(),
    "skip_gates": lambda n: eek.SkipGates(skip_threshold=0.5, entropy_threshold=0.15),
    "scheduled": lambda n: eek.Scheduled(torch.arange(n) % 4 + 1),
}


def spread_heads(model, seed=0):
    """Random, confident exit heads, halting heads and gates so that sequences exit at different layers."""
    generator = torch.Generator().manual_seed(seed)
    heads = model.early_exit_heads
    with torch.no_grad():
        for module in heads.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.early_exit_heads:
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 4.0)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.5)


def patched(arch="bert", policy=None, attn="eager", num_labels=3, seed=0):
    model = tiny_model(arch, attn=attn, num_labels=num_labels, seed=seed)
    eek.patch(model, policy or eek.Entropy(0.5), backend="torch")
    spread_heads(model, seed)
    return model


@pytest.mark.exact
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [True, False])
def test_logits_are_exactly_the_unpatched_model_when_nothing_exits(arch, attn, padded):
    model = tiny_model(arch, attn=attn)
    ids, mask, token_types = tiny_batch(7, 12, padded=padded)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
        eek.patch(model, eek.Scheduled(torch.full((7,), 4)))
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
    assert torch.equal(out.logits, reference)
    assert out.exit_layer.tolist() == [4] * 7 and out.layers_run.tolist() == [4] * 7


def test_a_sequence_that_runs_every_layer_gets_the_unpatched_logits_even_when_others_exit(arch):
    model = tiny_model(arch)
    ids, mask, token_types = tiny_batch(8, 10, padded=False)
    with torch.no_grad():
        reference = model(input_ids=ids, token_type_ids=token_types).logits
        schedule = torch.tensor([1, 4, 2, 4, 3, 4, 1, 4])
        eek.patch(model, eek.Scheduled(schedule))
        out = model(input_ids=ids, token_type_ids=token_types)
    full = schedule == 4
    torch.testing.assert_close(out.logits[full], reference[full], rtol=1e-5, atol=1e-6)


@pytest.mark.exact
@pytest.mark.parametrize("name", sorted(EVERY_POLICY))
def test_early_exit_path_agrees_with_the_all_exits_path(name):
    batch = 16
    model = patched("bert", EVERY_POLICY[name](batch), seed=3)
    ids, mask, token_types = tiny_batch(batch, 12, seed=5)
    with torch.no_grad():
        early = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
        full = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types, return_all_exits=True)
    assert torch.equal(early.exit_layer, full.exit_layer)
    assert torch.equal(early.layers_run, full.layers_run)
    torch.testing.assert_close(early.logits, full.logits, rtol=1e-4, atol=1e-5)
    assert full.all_logits.shape == (4, batch, 3)
    if name in ("qexit", "qexit_subtract", "dact"):
        assert full.all_halting.shape == (4, batch)
        assert ((full.all_halting >= 0) & (full.all_halting <= 1)).all()
    else:
        assert full.all_halting is None


@pytest.mark.exact
@pytest.mark.parametrize("name", ["entropy", "patience", "maxprob", "qexit"])
def test_returned_logits_are_the_exit_layers_head(name):
    batch = 16
    model = patched("roberta", EVERY_POLICY[name](batch), seed=1)
    ids, mask, _ = tiny_batch(batch, 12, seed=2)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, return_all_exits=True)
    picked = out.all_logits[out.exit_layer - 1, torch.arange(batch)]
    assert torch.equal(out.logits, picked)
    assert 1 < len(set(out.exit_layer.tolist())), "the test needs exits spread over layers"


def test_scheduled_exits_land_at_the_original_positions(arch):
    schedule = torch.tensor([3, 1, 4, 2, 2, 4, 1, 3, 1])
    model = patched(arch, eek.Scheduled(schedule))
    ids, mask, token_types = tiny_batch(9, 11)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
        full = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types, return_all_exits=True)
    assert torch.equal(out.exit_layer, schedule)
    torch.testing.assert_close(out.logits, full.all_logits[schedule - 1, torch.arange(9)], rtol=1e-4, atol=1e-5)


def test_skip_gates_skip_layers_and_count_layers_run():
    model = patched("bert", eek.SkipGates(skip_threshold=0.5, entropy_threshold=0.0))
    gates = model.early_exit_heads.gates
    with torch.no_grad():
        for gate in gates:
            gate.weight.zero_()
            gate.bias.fill_(-5.0)
        gates[1].bias.fill_(5.0)  # every sequence skips layer 2
    ids, mask, _ = tiny_batch(12, 10)
    # About half of the sequences skip layer 3: centre its gate on the median score of the
    # [CLS] states it reads (those after layer 1, since everybody skips layer 2).
    with torch.no_grad():
        adapter = current_adapter(model)
        cls_after_1 = adapter.run_layer(0, adapter.embed(ids, None, None, None), None)[:, 0]
        gates[2].weight.normal_(0, 3.0)
        gates[2].bias.fill_(-(cls_after_1 @ gates[2].weight[0]).median().item() + 1e-3)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        full = model(input_ids=ids, attention_mask=mask, return_all_exits=True)
    assert (out.exit_layer == 4).all()
    skipped3 = full.all_skipped[2]
    assert full.all_skipped[1].all() and 0 < skipped3.sum() < 12
    assert torch.equal(out.layers_run, 3 - skipped3.long())
    torch.testing.assert_close(out.logits, full.logits, rtol=1e-4, atol=1e-5)


def test_at_most_one_host_sync_per_layer_and_none_where_no_exit_is_possible():
    model = patched("bert", eek.Patience(2))
    ids, mask, _ = tiny_batch(8, 10)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    # One read-back at the start (the ids' range and the mask's extent together); Patience(2)
    # cannot exit before layer 3 and the last layer needs none: layer 3 reads the survivor count.
    assert out.host_syncs == 2


def test_trailing_padding_nobody_needs_is_trimmed_without_changing_results(arch):
    model = patched(arch, eek.Scheduled(torch.tensor([4, 4, 1, 1])))
    ids, mask, _ = tiny_batch(4, 12, padded=False)
    mask[:2, 5:] = 0  # the two sequences that stay are short; the long ones leave at layer 1
    seen = []
    adapter = current_adapter(model)
    original = adapter.run_layer

    def spy(index, hidden, attention_mask):
        seen.append(tuple(hidden.shape[:2]))
        return original(index, hidden, attention_mask)

    adapter.run_layer = spy
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        full = model(input_ids=ids, attention_mask=mask, return_all_exits=True)
    assert seen[:4] == [(4, 12), (2, 5), (2, 5), (2, 5)]
    torch.testing.assert_close(out.logits, full.logits, rtol=1e-4, atol=1e-5)


def test_empty_batch_returns_empty_outputs():
    model = patched("bert", eek.Entropy(0.5))
    out = model(input_ids=torch.zeros(0, 8, dtype=torch.long), attention_mask=torch.zeros(0, 8, dtype=torch.long))
    assert out.logits.shape == (0, 3) and out.exit_layer.shape == (0,) and out.layers_run.shape == (0,)


def test_nan_in_a_head_means_that_sequence_does_not_exit_there():
    model = patched("bert", eek.Entropy(10.0))  # every finite head would exit at layer 1
    with torch.no_grad():
        model.early_exit_heads.classifiers[0].bias[0] = float("nan")
    ids, mask, _ = tiny_batch(5, 8)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert out.exit_layer.tolist() == [2] * 5
    assert torch.isfinite(out.logits).all()


def test_labels_give_the_loss_of_the_exit_logits():
    model = patched("bert", eek.Entropy(0.5))
    ids, mask, _ = tiny_batch(6, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


@pytest.mark.exact
def test_unpatch_restores_the_original_forward_and_repatch_keeps_the_heads():
    model = tiny_model("bert")
    ids, mask, _ = tiny_batch(4, 8)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
    eek.patch(model, eek.Entropy(0.5))
    assert eek.is_patched(model)
    heads = model.early_exit_heads
    eek.unpatch(model)
    assert not eek.is_patched(model) and not hasattr(model, "early_exit_heads")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert type(out).__name__ == "SequenceClassifierOutput" and torch.equal(out.logits, reference)
    eek.patch(model, eek.Patience(2))
    assert model.early_exit_heads is heads
    with pytest.raises(ValueError, match="not patched"):
        eek.unpatch(tiny_model("bert"))


def test_patching_again_swaps_the_policy_and_adds_heads_it_needs():
    model = patched("bert", eek.Entropy(0.5))
    first_head = model.early_exit_heads.classifiers[0]
    assert model.early_exit_heads.dact_halting is None
    eek.patch(model, eek.DACT())
    assert model.early_exit_heads.classifiers[0] is first_head
    assert model.early_exit_heads.dact_halting is not None
    assert eek.policy_of(model) == eek.DACT()


def test_heads_start_as_copies_of_the_model_classifier():
    model = tiny_model("albert")
    eek.patch(model, eek.Entropy(0.5))
    for head in model.early_exit_heads.classifiers:
        assert torch.equal(head.weight, model.classifier.weight) and torch.equal(head.bias, model.classifier.bias)


def test_heads_are_parameters_of_the_model():
    model = tiny_model("bert")
    before = {id(p) for p in model.parameters()}
    eek.patch(model, eek.QExit())
    added = [p for p in model.parameters() if id(p) not in before]
    assert len(added) > 0 and all(p.requires_grad for p in added)


def test_unsupported_model_raises_type_error_naming_the_supported_classes():
    groups = dict.fromkeys(("q", "k", "v", "post_attention", "intermediate", "output"), 1)
    config = SqueezeBertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        embedding_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        **{f"{name}_groups": value for name, value in groups.items()},
    )
    with pytest.raises(TypeError, match="BertForSequenceClassification.*MPNetForSequenceClassification"):
        eek.patch(SqueezeBertForSequenceClassification(config), eek.Entropy(0.5))
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(TypeError, match="RobertaForSequenceClassification"):
        eek.patch(BertModel(config), eek.Entropy(0.5))
    with pytest.raises(TypeError, match="policy"):
        eek.patch(tiny_model("bert"), 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(attention_mask=torch.ones(4, 9, dtype=torch.long)), "attention_mask must have the shape"),
        (dict(token_type_ids=torch.zeros(3, 8, dtype=torch.long)), "token_type_ids must have the shape"),
    ],
)
def test_mismatched_input_shapes_raise_value_error(kwargs, message):
    model = patched("bert")
    with pytest.raises(ValueError, match=message):
        model(input_ids=torch.ones(4, 8, dtype=torch.long), **kwargs)


def test_bad_inputs_raise_value_error():
    model = patched("bert")
    with pytest.raises(ValueError, match="vocabulary"):
        model(input_ids=torch.full((2, 4), VOCAB))
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        model(input_ids=torch.ones(8, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_scheduled_must_match_the_batch_and_the_model():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="1..4"):
        eek.patch(model, eek.Scheduled(torch.tensor([1, 5])))
    eek.patch(model, eek.Scheduled(torch.tensor([1, 2, 3])))
    with pytest.raises(ValueError, match="3 entries but the batch has 4"):
        model(input_ids=torch.ones(4, 6, dtype=torch.long))


def test_policy_that_does_not_fit_the_head_raises_at_patch():
    with pytest.raises(ValueError, match="regression"):
        eek.patch(tiny_model("bert", num_labels=3), eek.Patience(1, regression_threshold=0.1))
    with pytest.raises(ValueError, match="Voting"):
        eek.patch(tiny_model("bert", num_labels=1), eek.Voting(2))
    with pytest.raises(ValueError, match="DACT"):
        eek.patch(tiny_model("bert", num_labels=1), eek.DACT())


@pytest.mark.exact
def test_regression_head_with_patience():
    model = patched("bert", eek.Patience(1, regression_threshold=0.5), num_labels=1)
    ids, mask, _ = tiny_batch(6, 8)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        full = model(input_ids=ids, attention_mask=mask, return_all_exits=True)
    assert out.logits.shape == (6, 1)
    assert torch.equal(out.exit_layer, full.exit_layer)


def test_backends_report_and_unknown_or_missing_backends_fail_clearly():
    available = eek.backends()
    assert set(available) == {"torch", "cpp", "triton", "cuda"} and available["torch"] is True
    status = eek.backend_status()
    assert status["torch"] == "available"
    with pytest.raises(ValueError, match="backend must be one of"):
        eek.patch(tiny_model("bert"), eek.Entropy(0.5), backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            eek.patch(tiny_model("bert"), eek.Entropy(0.5), backend="cuda")
    eek.patch(tiny_model("bert"), eek.Entropy(0.5), backend="auto")


def test_unsupported_attention_implementation_is_refused():
    model = tiny_model("bert")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="sdpa"):
        eek.patch(model, eek.Entropy(0.5))


@pytest.mark.exact
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_runs_and_matches_all_exits(dtype):
    model = patched("bert", eek.Patience(1)).to(dtype)
    ids, mask, _ = tiny_batch(8, 10)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        full = model(input_ids=ids, attention_mask=mask, return_all_exits=True)
    assert out.logits.dtype == dtype
    assert torch.equal(out.exit_layer, full.exit_layer)
