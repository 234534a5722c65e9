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
