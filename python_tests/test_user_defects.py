"""Regression tests for the defects users reported in issue 11 (defects 3 to 14 and its "Also" items).

Each test states one behaviour of a patched model that a user relied on and that was broken.
"""

import pytest
import torch
from conftest import tiny_batch, tiny_model

import earlyexit_kernels as eek

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
