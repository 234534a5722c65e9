"""``integrations.evaluation.evaluate``: what it compares with the full model, and when it does not."""

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_model

import earlyexit_kernels as eek
from earlyexit_kernels.integrations.evaluation import evaluate


def _batches():
    ids, mask, _ = tiny_batch(8, 12)
    return [{"input_ids": ids, "attention_mask": mask, "labels": torch.arange(8) % 2}]


def test_rows_that_run_every_layer_are_compared_with_the_full_model_bit_for_bit():
    full = tiny_model("bert", num_labels=2)
    model = eek.patch(copy.deepcopy(full), eek.Entropy(0.0))  # nobody leaves early
    result = evaluate(model, _batches(), full_model=full)
    assert result.mean_layers == 4.0
    assert result.full_depth_max_diff == 0.0
    assert result.agreement == 1.0


@pytest.mark.parametrize("policy", [eek.Voting(4), eek.DACT()], ids=["voting", "dact"])
def test_policies_that_combine_the_layers_at_the_last_one_have_nothing_to_compare(policy):
    # Their answer at full depth is a vote or an accumulated distribution, not the model's logits.
    full = tiny_model("bert", num_labels=2)
    model = eek.patch(copy.deepcopy(full), policy)
    result = evaluate(model, _batches(), full_model=full)
    assert result.mean_layers == 4.0
    assert result.full_depth_max_diff is None
