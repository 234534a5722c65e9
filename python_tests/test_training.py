"""Training losses on hand-checked tensors, and short runs that must lower them."""

import math

import pytest
import torch
from conftest import tiny_batch, tiny_model

import earlyexit_kernels as eek
from earlyexit_kernels.training import deebert_stage2_loss, pabee_loss, per_layer_loss, train_exit_heads


def test_pabee_loss_weights_layer_i_by_i():
    # Layer 1 predicts uniformly (CE = ln 2), layer 2 is certain and right (CE ~ 0).
    all_logits = torch.tensor([[[0.0, 0.0]], [[0.0, 50.0]]])
    labels = torch.tensor([1])
    assert per_layer_loss(all_logits, labels).tolist() == pytest.approx([math.log(2), 0.0], abs=1e-6)
    assert pabee_loss(all_logits, labels).item() == pytest.approx((1 * math.log(2) + 2 * 0.0) / 3, abs=1e-6)


def test_deebert_stage2_loss_leaves_out_the_final_classifier():
    all_logits = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]], [[50.0, 0.0]]])
    labels = torch.tensor([1])
    assert deebert_stage2_loss(all_logits, labels).item() == pytest.approx(2 * math.log(2), abs=1e-6)


def test_regression_heads_use_mean_squared_error():
    all_logits = torch.tensor([[[1.0], [2.0]], [[0.0], [0.0]]])
    labels = torch.tensor([0.0, 0.0])
    assert per_layer_loss(all_logits, labels).tolist() == pytest.approx([2.5, 0.0])


def _data(batches=4, size=8, labels=None):
    out = []
    for seed in range(batches):
        ids, mask, _ = tiny_batch(size, 10, seed=seed)
        out.append(
            {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(size) % 3 if labels is None else labels}
        )
    return out


def test_pabee_training_lowers_the_loss():
    model = eek.patch(tiny_model("bert"), eek.Patience(1))
    data = _data()
    losses = train_exit_heads(model, data, method="pabee", epochs=6, lr=3e-3, warmup_fraction=0.0, progress=False)
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])
    assert not model.training


def test_deebert_stage2_trains_only_the_internal_heads():
    model = eek.patch(tiny_model("albert"), eek.Entropy(0.3))
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "early_exit_heads" not in k}
    heads_before = [h.weight.clone() for h in model.early_exit_heads.classifiers]
    # The frozen features of a random model hardly differ between rows: a skewed label
    # distribution gives the heads something to learn from them.
    data = _data(labels=torch.tensor([0, 0, 0, 0, 0, 0, 1, 2]))
    losses = train_exit_heads(model, data, method="deebert", epochs=6, lr=3e-2, warmup_fraction=0.0, progress=False)
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])
    for name, value in model.state_dict().items():
        if name in backbone:
            assert torch.equal(value, backbone[name]), f"{name} changed in stage 2"
    assert all(not torch.equal(h.weight, w) for h, w in zip(model.early_exit_heads.classifiers, heads_before))
    assert all(p.requires_grad for p in model.parameters())


def test_training_arguments_are_checked():
    model = eek.patch(tiny_model("bert"), eek.Patience(1))
    with pytest.raises(ValueError, match="method"):
        train_exit_heads(model, _data(1), method="no-such-method")
    with pytest.raises(ValueError, match="patched"):
        train_exit_heads(tiny_model("bert"), _data(1))


def test_a_generator_trains_one_epoch_and_a_second_epoch_is_refused():
    model = eek.patch(tiny_model("bert"), eek.Patience(1))
    data = _data(3)
    losses = train_exit_heads(model, (batch for batch in data), method="pabee", progress=False)
    assert len(losses) == 3  # every batch of the generator, once
    with pytest.raises(ValueError, match="one-shot iterator.*epochs=2"):
        train_exit_heads(model, (batch for batch in data), method="pabee", epochs=2, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        train_exit_heads(model, [], method="pabee", progress=False)


class _FewPasses:
    """Re-iterable in form (``iter`` gives a fresh iterator) but empty after ``passes`` passes."""

    def __init__(self, batches, passes):
        self.batches, self.passes = list(batches), passes

    def __iter__(self):
        self.passes -= 1
        return iter(self.batches if self.passes >= 0 else [])


def test_an_epoch_that_finds_no_batches_raises():
    model = eek.patch(tiny_model("bert"), eek.Patience(1))
    # one pass counts the steps, one is the first epoch: the second epoch finds nothing
    with pytest.raises(ValueError, match="epoch 2 of 2 found no batches"):
        train_exit_heads(model, _FewPasses(_data(2), passes=2), method="pabee", epochs=2, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        train_exit_heads(model, _FewPasses(_data(2), passes=0), method="pabee", progress=False)


def _halting_step(model, method, **kwargs):
    """How far one step moves the halting head (or the gates) and one internal classifier, at most."""
    heads = model.early_exit_heads
    halting = heads.dact_halting or heads.qexit_halting or heads.gates
    before = [p.detach().clone() for p in halting.parameters()]
    classifier = heads.classifiers[0].weight.detach().clone()
    train_exit_heads(model, _data(1), method=method, warmup_fraction=0.0, schedule="constant", progress=False, **kwargs)
    moved = max((p - b).abs().max().item() for p, b in zip(halting.parameters(), before))
    return moved, (heads.classifiers[0].weight - classifier).abs().max().item()


@pytest.mark.parametrize(
    ("policy", "method"),
    [(eek.DACT(), "dact"), (eek.QExit(0.5), "palbert"), (eek.SkipGates(entropy_threshold=0.3), "smartbert_stage1")],
)
def test_halting_heads_and_gates_learn_at_their_own_rate(policy, method):
    # Adam's first step moves every parameter by about its learning rate, whatever the gradient's size.
    torch.manual_seed(0)
    model = eek.patch(tiny_model("bert"), policy)
    halting_moved, classifier_moved = _halting_step(model, method, lr=1e-5, weight_decay=0.0)
    assert 1.5e-3 < halting_moved < 6e-3  # the default halting_lr, 3e-3
    assert classifier_moved < 3e-5  # lr, 1e-5
    model = eek.patch(tiny_model("bert"), policy)
    halting_moved, _ = _halting_step(model, method, lr=1e-5, halting_lr=None, weight_decay=0.0)
    assert halting_moved < 3e-5  # halting_lr=None: the same rate as the rest


def test_a_bad_halting_lr_is_refused():
    model = eek.patch(tiny_model("bert"), eek.DACT())
    for bad in (0.0, -1e-3, float("nan"), "3e-3"):
        with pytest.raises(ValueError, match="halting_lr"):
            train_exit_heads(model, _data(1), method="dact", halting_lr=bad, progress=False)


def test_parameter_groups_give_an_optimizer_of_ones_own_the_halting_rate():
    from earlyexit_kernels.training import parameter_groups

    model = eek.patch(tiny_model("bert"), eek.DACT())
    groups = parameter_groups(model, lr=2e-5)
    assert [g["lr"] for g in groups] == [2e-5, 3e-3]
    assert set(map(id, groups[1]["params"])) == set(map(id, model.early_exit_heads.dact_halting.parameters()))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups)  # what a Trainer's optimizers=(optimizer, None) takes
