"""Regression tests for the defects users reported in issue 11 (defects 3 to 14 and its "Also" items).

Each test states one behaviour of a patched model that a user relied on and that was broken.
"""

import pytest
import torch
from conftest import tiny_batch, tiny_model
from model_comparison import assert_same_function, assert_same_weights

import earlyexit_kernels as eek
from earlyexit_kernels.methods import exit_rules

AVAILABLE = [name for name, ok in eek.backends().items() if ok and name != "cuda"]


def nan_heads(model):
    with torch.no_grad():
        for head in model.early_exit_heads.classifiers:
            head.bias.fill_(float("nan"))
        model.classifier.bias.fill_(float("nan"))


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("policy", [eek.Patience(1), eek.Voting(2), eek.DACT(), eek.QExit()], ids=repr)
def test_all_nan_logits_with_two_classes_never_crash_and_run_to_the_last_layer(policy, backend):
    model = tiny_model(num_labels=2)
    eek.patch(model, policy, backend=backend)
    nan_heads(model)
    ids, mask, _ = tiny_batch(5, 8)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert out.exit_layer.tolist() == [4] * 5
    assert out.logits.shape == (5, 2)


def test_a_zero_dimensional_tensor_threshold_is_one_number():
    assert eek.Entropy(torch.tensor(0.25)).threshold == 0.25
    assert eek.MaxProb(torch.tensor(0.5), temperature=torch.tensor(2.0)).temperature == 2.0
    assert eek.SkipGates(entropy_threshold=torch.tensor(0.5)).entropy_threshold == 0.5
    with pytest.raises(ValueError, match="threshold must lie in"):
        eek.Entropy(torch.tensor(-1.0))


def test_patience_says_exactly_which_patience_a_model_allows():
    eek.patch(tiny_model(num_layers=4), eek.Patience(3))  # met at layer 4, the last: allowed
    with pytest.raises(ValueError, match=r"use a patience in 1\.\.3 .*2 is the largest that can exit earlier"):
        eek.patch(tiny_model(num_layers=4), eek.Patience(4))
    with pytest.raises(ValueError, match="use patience=1"):
        eek.Patience(2).check_fits(2, 3)


def test_qexit_refuses_a_seed_the_generator_cannot_take_when_built():
    with pytest.raises(ValueError, match=r"seed must lie in -2\*\*63\.\.2\*\*64 - 1"):
        eek.QExit(stochastic=True, seed=2**70)
    for seed in (2**64 - 1, -(2**63)):
        torch.Generator().manual_seed(eek.QExit(stochastic=True, seed=seed).seed)


def constant_heads(model, biases):
    """Every head (the per-layer ones, then the model's classifier) returns its row of ``biases``."""
    heads = list(model.early_exit_heads.classifiers) + [model.classifier]
    with torch.no_grad():
        for head, bias in zip(heads, biases, strict=True):
            head.weight.zero_()
            head.bias.copy_(torch.tensor(bias))


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_voting_logits_argmax_is_the_prediction_in_low_precision(dtype, backend):
    # Layers 1-2 vote class 0, layers 3-4 class 1: a 2-2 tie that the larger probability sum
    # breaks for class 1, by less than one step of the dtype in the returned log-scores.
    biases = [[6.0, 0.0], [6.0, 0.0], [0.0, 6.0625], [0.0, 6.0625]]
    model = tiny_model(num_labels=2).to(dtype)
    eek.patch(model, eek.Voting(3), backend=backend)
    constant_heads(model, biases)
    ids, mask, _ = tiny_batch(3, 6)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, return_all_exits=True)
    votes = out.all_logits.argmax(-1)
    assert votes[:, 0].tolist() == [0, 0, 1, 1]  # the tie the test is about
    prob_sum = out.all_logits.float().softmax(-1).sum(0)
    assert (prob_sum[:, 1] > prob_sum[:, 0]).all()
    state = exit_rules.init_state(eek.Voting(3), 3, 2, 32, 4, "cpu")
    for layer in range(1, 5):
        _, scores, state = exit_rules.exit_step(eek.Voting(3), layer, 4, out.all_logits[layer - 1], None, state)
    assert (scores[:, 1] > scores[:, 0]).all()
    assert torch.equal(scores.to(dtype)[:, 0], scores.to(dtype)[:, 1])  # rounding alone ties them
    assert out.exit_layer.tolist() == [4, 4, 4] and out.logits.dtype == dtype
    assert out.logits.argmax(-1).tolist() == [1, 1, 1]
    with torch.no_grad():
        early = model(input_ids=ids, attention_mask=mask)
    assert early.logits.argmax(-1).tolist() == [1, 1, 1]


def test_a_patched_model_round_trips_through_pickle_torch_save_and_deepcopy():
    import copy
    import io
    import pickle

    model = tiny_model()
    eek.patch(model, eek.Entropy(0.5), backend="torch")
    ids, mask, _ = tiny_batch()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False), copy.deepcopy(model)]
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask)
        for twin in copies:
            assert eek.is_patched(twin)
            assert_same_weights(twin, model)
            out = twin(input_ids=ids, attention_mask=mask)
            assert_same_function(out.logits, reference.logits)
            assert torch.equal(out.exit_layer, reference.exit_layer)
            # the copy runs its own heads, not the original's
            twin.early_exit_heads.classifiers[0].bias.fill_(float("nan"))
            assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()
            eek.unpatch(twin)


@pytest.mark.exact
def test_a_float64_model_runs_with_every_backend_choice_and_is_exact_at_full_depth():
    model = tiny_model().double()
    ids, mask, _ = tiny_batch()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        for backend in ("auto", "torch"):
            eek.patch(model, eek.Scheduled(torch.full((6,), 4)), backend=backend)
            out = model(input_ids=ids, attention_mask=mask)
            assert out.logits.dtype == torch.float64 and torch.equal(out.logits, reference), backend
            eek.patch(model, eek.Voting(2), backend=backend)
            assert model(input_ids=ids, attention_mask=mask).logits.dtype == torch.float64
    for backend in AVAILABLE:
        if backend != "torch":
            with pytest.raises(RuntimeError, match="not float64; use backend='torch'"):
                eek.patch(model, eek.Entropy(0.3), backend=backend)


def test_heads_follow_the_model_to_another_dtype_patched_or_not():
    model = tiny_model()
    ids, mask, _ = tiny_batch()
    eek.patch(model, eek.QExit(), backend="torch")
    eek.unpatch(model)
    model.to(torch.bfloat16)
    eek.patch(model, eek.QExit(), backend="torch")
    assert {p.dtype for p in model.early_exit_heads.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).logits.dtype == torch.bfloat16
        model.half()
        assert {p.dtype for p in model.early_exit_heads.parameters()} == {torch.float16}
        assert model(input_ids=ids, attention_mask=mask).logits.dtype == torch.float16


@pytest.mark.exact
def test_changing_the_attention_implementation_after_patching_keeps_padding_masked():
    model = tiny_model(attn="sdpa")
    eek.patch(model, eek.Scheduled(torch.full((6,), 4)), backend="torch")
    model.set_attn_implementation("eager")
    ids, mask, _ = tiny_batch()
    other = ids.masked_fill(mask == 0, 5)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(model(input_ids=other, attention_mask=mask).logits, out)
        eek.unpatch(model)
        torch.testing.assert_close(out, model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-6)


def test_an_all_padding_row_that_runs_every_layer_gets_the_unpatched_logits_with_eager_attention():
    model = tiny_model(attn="eager")
    ids, mask, _ = tiny_batch(6, 12)
    mask[:, 7:] = 0  # every row shorter than the batch: the engine trims
    mask[2] = 0
    assert_full_depth_rows_as_unpatched(model, ids, mask, torch.tensor([1, 2, 4, 3, 4, 1]))


def test_feed_forward_chunking_runs_with_any_padding_and_matches_the_unpatched_model():
    model = tiny_model(attn="sdpa", chunk_size_feed_forward=4)
    ids, mask, _ = tiny_batch(6, 12)
    mask[:, 7:] = 0  # trimmed to 7 (not a multiple of 4), then to the survivors' lengths
    mask[3:, 5:] = 0
    assert_full_depth_rows_as_unpatched(model, ids, mask, torch.tensor([4, 1, 2, 4, 3, 4]))


def assert_full_depth_rows_as_unpatched(model, ids, mask, schedule) -> None:
    """Patched with ``Scheduled(schedule)``, the rows that run every layer give the unpatched model's logits."""
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        eek.patch(model, eek.Scheduled(schedule), backend="torch")
        out = model(input_ids=ids, attention_mask=mask)
    full = schedule == model.config.num_hidden_layers
    assert full.any()
    torch.testing.assert_close(out.logits[full], reference[full], rtol=1e-5, atol=1e-6)


def test_multi_output_regression_labels_give_hugging_faces_loss():
    model = tiny_model(num_labels=2)
    model.config.problem_type = "regression"
    ids, mask, _ = tiny_batch()
    labels = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        eek.patch(model, eek.Scheduled(torch.full((6,), 4)), backend="torch")
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, reference)


def test_a_causal_decoder_classifier_is_refused_at_patch_time():
    from conftest import VOCAB
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    config.is_decoder = True
    model = BertForSequenceClassification(config).eval()
    with pytest.raises(ValueError, match="is_decoder=True.*causal attention mask"):
        eek.patch(model, eek.Entropy(0.3))
    model.config.is_decoder = False
    eek.patch(model, eek.Entropy(0.3))
    model.config.is_decoder = True  # after patching: refused at the forward
    with pytest.raises(ValueError, match="is_decoder=True"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long))


@pytest.mark.exact
@pytest.mark.parametrize("backend", AVAILABLE)
def test_monte_carlo_dropout_applies_classifier_dropout_on_every_layer_and_backend(backend):
    model = tiny_model()
    eek.patch(model, eek.Entropy(0.3), backend="torch")
    model.dropout.p = 0.5
    ids, mask, _ = tiny_batch()
    with torch.no_grad():
        deterministic = model(input_ids=ids, attention_mask=mask, return_all_exits=True).all_logits
        model.train()
        torch.manual_seed(7)
        reference = model(input_ids=ids, attention_mask=mask).all_logits
        eek.patch(model, eek.Entropy(0.3), backend=backend)
        torch.manual_seed(7)
        out = model(input_ids=ids, attention_mask=mask).all_logits
    assert not torch.equal(reference[0], deterministic[0])  # dropout acts on internal layers
    assert torch.equal(out, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("policy", [eek.QExit(), eek.DACT()], ids=repr)
def test_a_one_layer_low_precision_model_gets_its_halting_head_in_its_dtype(policy, dtype):
    model = tiny_model(num_layers=1).to(dtype)
    eek.patch(model, policy, backend="torch")
    assert {p.dtype for p in model.early_exit_heads.parameters()} == {dtype}
    ids, mask, _ = tiny_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, return_all_exits=True)
    assert out.logits.dtype == dtype and out.exit_layer.tolist() == [1] * 6
    assert out.all_halting.shape == (1, 6)


@pytest.mark.parametrize(
    "policy", [eek.QExit(), eek.DACT(), eek.SkipGates(entropy_threshold=0.3), eek.Entropy(0.3)], ids=repr
)
def test_all_exits_of_an_empty_batch_have_the_shapes_of_any_batch(policy):
    model = tiny_model()
    eek.patch(model, policy, backend="torch")
    with torch.no_grad():
        out = model(input_ids=torch.zeros(0, 5, dtype=torch.long), return_all_exits=True)
        full = model(input_ids=torch.ones(2, 5, dtype=torch.long), return_all_exits=True)
    assert out.all_logits.shape == (4, 0, 3)
    for name in ("all_halting", "all_halting_logits", "all_skipped", "all_gates"):
        value, reference = getattr(out, name), getattr(full, name)
        if reference is None:
            assert value is None, name
        else:
            assert value.shape == (4, 0) and value.dtype == reference.dtype, name


@pytest.mark.exact
@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("arch", ["bert", "albert", "roberta"])
def test_under_cpu_autocast_the_patched_model_returns_the_unpatched_dtype(arch, backend):
    model = tiny_model(arch)
    ids, mask, _ = tiny_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(input_ids=ids, attention_mask=mask).logits
        eek.patch(model, eek.Scheduled(torch.full((6,), 4)), backend=backend)
        out = model(input_ids=ids, attention_mask=mask)
    assert reference.dtype == torch.bfloat16 and out.logits.dtype == reference.dtype
    assert torch.equal(out.logits, reference)  # full depth: the model's own classifier, in autocast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_voting_logits_argmax_is_the_prediction_in_the_continuous_engine_too(dtype):
    biases = [[6.0, 0.0], [6.0, 0.0], [0.0, 6.0625], [0.0, 6.0625]]
    model = tiny_model(num_labels=2).to(dtype)
    eek.patch(model, eek.Voting(3), backend="torch")
    constant_heads(model, biases)
    ids, mask, _ = tiny_batch(3, 6)
    inputs = [{"input_ids": row[m.bool()]} for row, m in zip(ids, mask, strict=True)]

    predictions = list(eek.classify(model.eval(), inputs))

    assert [p.exit_layer for p in predictions] == [4, 4, 4]
    assert all(p.logits.dtype == dtype for p in predictions)
    assert [int(p.logits.argmax()) for p in predictions] == [1, 1, 1]
