"""save_pretrained / eek.from_pretrained round trips keep the weights and policy bit for bit; a plain Hugging Face load still works."""

import json

import pytest
import torch
from conftest import tiny_batch, tiny_model
from model_comparison import assert_same_function, assert_same_weights
from threshold_helpers import assert_clear_of_threshold
from transformers import AutoModelForSequenceClassification

import earlyexit_kernels as eek
from earlyexit_kernels.patching.exit_files import CONFIG_FILE, HEADS_FILE, policy_from_dict, policy_to_dict

POLICIES = [
    eek.Entropy(0.3),
    eek.Entropy((0.1, 0.2, 0.30000000000000004, 1e-7), normalized=True),
    eek.MaxProb(0.9),
    eek.MaxProb((0.5, 0.6, 0.7, 0.8), temperature=(1.5, 0.3, 2.0, 1.0)),
    eek.Patience(2),
    eek.QExit(0.37, combine="subtract", lambda_layers=2, stochastic=True, seed=11),
    eek.Voting(3),
    eek.DACT(),
    eek.SkipGates(skip_threshold=0.4, entropy_threshold=(0.1, 0.2, 0.3, 0.4)),
    eek.Scheduled(torch.tensor([1, 4, 2, 3, 3, 1])),
]


def _same_policy(a, b):
    if isinstance(a, eek.Scheduled):
        return (
            type(b) is eek.Scheduled
            and torch.equal(a.exit_layers, b.exit_layers)
            and b.exit_layers.dtype == a.exit_layers.dtype
        )
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_policies_survive_json_exactly(policy):
    again = policy_from_dict(json.loads(json.dumps(policy_to_dict(policy))))
    assert _same_policy(policy, again)


def _trained_heads(model):
    # give every head (and halting head and gate) distinct non-trivial values
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.early_exit_heads.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_round_trip_keeps_the_weights_bit_for_bit_and_the_function(tmp_path, policy):
    model = tiny_model("bert", num_layers=4)
    eek.patch(model, eek.QExit())  # heads of other policies are saved too
    eek.patch(model, eek.DACT())
    eek.patch(model, policy, backend="torch")
    _trained_heads(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / HEADS_FILE).is_file() and (tmp_path / CONFIG_FILE).is_file()

    loaded = eek.from_pretrained(tmp_path)
    assert eek.is_patched(loaded) and not loaded.training
    assert _same_policy(policy, eek.policy_of(loaded)) and eek.backend_of(loaded) == "torch"
    assert_same_weights(loaded, model)
    ids, mask, tt = tiny_batch(6, 12)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, return_all_exits=True)
        b = loaded(input_ids=ids, attention_mask=mask, token_type_ids=tt, return_all_exits=True)
        c = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        d = loaded(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    assert_same_function(b.all_logits, a.all_logits)
    assert_clear_of_threshold(policy, a, 4)  # so rounding cannot move an exit
    for x, y in ((a, b), (c, d)):
        assert_same_function(y.logits, x.logits)
        assert torch.equal(x.exit_layer, y.exit_layer)


def test_plain_hugging_face_load_ignores_the_exit_files(tmp_path):
    model = tiny_model("roberta", num_layers=3)
    unpatched_state = {k: v.clone() for k, v in model.state_dict().items()}
    eek.patch(model, eek.Entropy(0.2))
    _trained_heads(model)
    model.save_pretrained(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager")
    assert not eek.is_patched(plain)
    # What is promised: the plain load is the unpatched model, weight for weight, bit for bit.
    assert plain.state_dict().keys() == unpatched_state.keys()
    for name, value in unpatched_state.items():
        assert torch.equal(plain.state_dict()[name], value), name
    # So it computes the same function, to rounding (model_comparison.py says why not bit for bit).
    ids, mask, _ = tiny_batch(4, 8)
    with torch.no_grad():
        assert_same_function(
            plain(input_ids=ids, attention_mask=mask).logits,
            eek.unpatch(model)(input_ids=ids, attention_mask=mask).logits,
        )


def test_from_pretrained_with_another_policy_and_a_plain_directory(tmp_path):
    model = eek.patch(tiny_model("albert", num_layers=4), eek.Patience(1), objective="pabee")
    _trained_heads(model)
    model.save_pretrained(tmp_path / "patched")
    loaded = eek.from_pretrained(tmp_path / "patched", eek.Voting(2))
    assert eek.policy_of(loaded) == eek.Voting(2)
    assert eek.training_objective(loaded)[0].name == "pabee"
    for a, b in zip(model.early_exit_heads.classifiers, loaded.early_exit_heads.classifiers):
        assert torch.equal(a.weight, b.weight)

    eek.unpatch(model)
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="policy"):
        eek.from_pretrained(tmp_path / "plain")
    fresh = eek.from_pretrained(tmp_path / "plain", eek.Entropy(0.1))
    assert eek.is_patched(fresh)


def test_unpatch_restores_hugging_face_save_pretrained(tmp_path):
    model = eek.patch(tiny_model("bert", num_layers=2), eek.Entropy(0.2))
    eek.unpatch(model)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / HEADS_FILE).exists()
