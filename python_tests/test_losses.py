"""Every method's training loss on small hand-checked tensors, and a few steps of training lower each one."""

import math

import pytest
import torch
from conftest import tiny_batch, tiny_model

import earlyexit_kernels as eek
from earlyexit_kernels.methods import losses
from earlyexit_kernels.methods.exit_rules import exit_step, init_state
from earlyexit_kernels.training import pabee_loss as reexported_pabee_loss
from earlyexit_kernels.training import train_exit_heads

LN3 = math.log(3.0)


def test_training_module_reexports_the_losses():
    assert reexported_pabee_loss is losses.pabee_loss


def test_deebert_stage1_is_the_final_heads_cross_entropy():
    all_logits = torch.tensor([[[50.0, 0.0]], [[0.0, 0.0]]])
    assert losses.deebert_stage1_loss(all_logits, torch.tensor([1])).item() == pytest.approx(math.log(2), abs=1e-6)


def test_fastbert_distills_the_last_layer_into_the_others_without_labels():
    # teacher p_L = (3/4, 1/4); student 1 uniform, student 2 equal to the teacher
    all_logits = torch.tensor([[[0.0, 0.0]], [[LN3, 0.0]], [[LN3, 0.0]]], requires_grad=True)
    loss = losses.fastbert_loss(all_logits)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert torch.equal(all_logits.grad[-1], torch.zeros(1, 2)), "the teacher must be detached"
    assert all_logits.grad[0].abs().sum() > 0


def test_fastbert_regression_distills_with_squared_error():
    all_logits = torch.tensor([[[1.0], [3.0]], [[2.0], [2.0]]])
    assert losses.fastbert_loss(all_logits).item() == pytest.approx(1.0)


def test_joint_loss_mixes_labels_and_the_final_layers_answers_with_the_final_layer_weighted_as_the_rest():
    # teacher p_L = (3/4, 1/4) with CE_L = ln(4/3) for label 0; two internal heads
    all_logits = torch.tensor([[[0.0, 0.0]], [[LN3, 0.0]], [[LN3, 0.0]]], requires_grad=True)
    labels = torch.tensor([0])
    ce = [math.log(2), math.log(4 / 3), math.log(4 / 3)]
    kl = [0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5), 0.0]
    internal = [0.5 * c + 0.5 * k for c, k in zip(ce[:2], kl)]
    loss = losses.joint_loss(all_logits, labels)
    assert loss.item() == pytest.approx((internal[0] + internal[1] + 2 * ce[2]) / 4, abs=1e-6)
    assert losses.joint_loss(all_logits, labels, distill=0.0, layer_weights=[1, 0, 0]).item() == pytest.approx(
        ce[0], abs=1e-6
    )
    assert losses.joint_loss(all_logits, labels, distill=1.0, layer_weights=[1, 0, 0]).item() == pytest.approx(
        kl[0], abs=1e-6
    )
    # the teacher gets its gradient from its own cross-entropy only
    losses.joint_loss(all_logits, labels, layer_weights=[1, 1, 0]).backward()
    assert torch.equal(all_logits.grad[-1], torch.zeros(1, 2))
    with pytest.raises(ValueError, match="distill must lie in"):
        losses.joint_loss(all_logits, labels, distill=1.5)
    with pytest.raises(ValueError, match="layer_weights must hold 3"):
        losses.joint_loss(all_logits, labels, layer_weights=[1, 1])


def test_geometric_prior_puts_the_remainder_on_the_last_layer():
    prior = losses.geometric_prior(4, 0.1)
    assert prior.tolist() == pytest.approx([0.1, 0.09, 0.081, 0.729])
    assert prior.sum().item() == pytest.approx(1.0)


def test_pondernet_loss_by_hand():
    # lambda = (0.5, 0.5, unused): P = (0.5, 0.25, 0.25); CE = (ln 2, ln 2, ~0)
    all_logits = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 60.0]]])
    all_halting = torch.tensor([[0.5], [0.5], [0.9]])
    labels = torch.tensor([1])
    halt = losses.halting_distribution(all_halting)
    assert halt[:, 0].tolist() == pytest.approx([0.5, 0.25, 0.25])
    prior = [0.1, 0.09, 0.81]
    kl = sum(p * math.log(p / q) for p, q in zip(prior, [0.5, 0.25, 0.25]))
    expected = 0.5 * math.log(2) + 0.25 * math.log(2) + 0.25 * 0.0 + 0.5 * kl
    assert losses.pondernet_loss(all_logits, all_halting, labels).item() == pytest.approx(expected, abs=1e-6)
    # beta and lambda_p are arguments
    kl2 = sum(p * math.log(p / q) for p, q in zip([0.5, 0.25, 0.25], [0.5, 0.25, 0.25]))
    value = losses.pondernet_loss(all_logits, all_halting, labels, lambda_p=0.5, beta=2.0).item()
    assert value == pytest.approx(0.75 * math.log(2) + 2.0 * kl2, abs=1e-6)


def test_halting_distribution_matches_the_qexit_cdf_of_the_exit_rule():
    torch.manual_seed(0)
    lam_logits = torch.randn(5, 7)
    halt = losses.halting_distribution(torch.sigmoid(lam_logits))
    assert torch.allclose(halt.sum(0), torch.ones(7))
    state = init_state(eek.QExit(0.5), 7, 2, 4, 5, torch.device("cpu"))
    for layer in range(1, 5):
        _, _, state = exit_step(eek.QExit(0.5), layer, 5, torch.zeros(7, 2), lam_logits[layer - 1], state)
        assert torch.allclose(state["cdf"], halt[:layer].sum(0), atol=1e-6)


def test_dact_recursion_and_loss_by_hand():
    # p_1 = (1/2, 1/2), h_1 = 1/2: a_1 = p_1, pi_1 = 1/2
    # p_2 = (3/4, 1/4), h_2 = 1/5: a_2 = (5/8, 3/8), pi_2 = 1/10
    all_logits = torch.tensor([[[0.0, 0.0]], [[LN3, 0.0]]])
    all_halting = torch.tensor([[0.5], [0.2]])
    acc, pi = losses.dact_accumulate(all_logits, all_halting)
    assert acc[:, 0].tolist() == [pytest.approx([0.5, 0.5]), pytest.approx([0.625, 0.375])]
    assert pi[:, 0].tolist() == pytest.approx([0.5, 0.1])
    loss = losses.dact_loss(all_logits, all_halting, torch.tensor([0]), tau=0.1)
    assert loss.item() == pytest.approx(-math.log(0.625) + 0.1 * 0.6, abs=1e-6)


def test_dact_recursion_matches_the_exit_rule_and_is_differentiable():
    torch.manual_seed(1)
    all_logits = torch.randn(4, 5, 3, requires_grad=True)
    halting_logits = torch.randn(4, 5, requires_grad=True)
    acc, pi = losses.dact_accumulate(all_logits, torch.sigmoid(halting_logits))
    state = init_state(eek.DACT(), 5, 3, 8, 4, torch.device("cpu"))
    for layer in range(1, 5):
        _, _, state = exit_step(eek.DACT(), layer, 4, all_logits[layer - 1], halting_logits[layer - 1], state)
        assert torch.allclose(state["accumulated"], acc[layer - 1], atol=1e-6)
        assert torch.allclose(state["pi"], pi[layer - 1], atol=1e-6)
    losses.dact_loss(all_logits, torch.sigmoid(halting_logits), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert halting_logits.grad.abs().sum() > 0 and all_logits.grad.abs().sum() > 0


def test_ensemble_loss_by_hand():
    # label 0 of 3 classes. Head 1 uniform: q_1 = (0, 1/2, 1/2); head 2 logits (0, ln 3, 0):
    # q_2 = (0, 3/4, 1/4); <q_1, q_2> = 1/2. CE_1 = ln 3, CE_2 = ln 5.
    all_logits = torch.tensor([[[0.0, 0.0, 0.0]], [[0.0, LN3, 0.0]]])
    value = losses.ensemble_loss(all_logits, torch.tensor([0]), diversity=0.5).item()
    assert value == pytest.approx(LN3 + math.log(5) + 0.5 * 0.5, abs=1e-6)
    # heads that put their errors on different classes score lower than heads that agree
    agree = torch.tensor([[[0.0, 5.0, 0.0]], [[0.0, 5.0, 0.0]]])
    disagree = torch.tensor([[[0.0, 5.0, 0.0]], [[0.0, 0.0, 5.0]]])
    ce = losses.per_layer_loss(agree, torch.tensor([0])).sum()
    assert ce == pytest.approx(losses.per_layer_loss(disagree, torch.tensor([0])).sum())
    assert losses.ensemble_loss(disagree, torch.tensor([0])) < losses.ensemble_loss(agree, torch.tensor([0]))
    with pytest.raises(ValueError, match="classification"):
        losses.ensemble_loss(torch.zeros(2, 1, 1), torch.zeros(1))


def test_smartbert_stage1_loss_by_hand():
    all_logits = torch.tensor([[[9.0, 0.0]], [[9.0, 0.0]], [[9.0, 0.0]], [[0.0, 0.0]]]).expand(4, 2, 2)
    all_gates = torch.tensor([[5.0, 5.0], [0.2, 0.4], [0.6, 0.8], [5.0, 5.0]])  # layers 1 and L ignored
    value = losses.smartbert_stage1_loss(all_logits, all_gates, torch.tensor([1, 0]), lam=0.04).item()
    assert value == pytest.approx(math.log(2) + 0.04 / (0.3 + 0.7), abs=1e-6)


def test_regression_where_the_method_allows_it():
    all_logits = torch.tensor([[[1.0], [2.0]], [[0.0], [0.0]]])
    labels = torch.tensor([0.0, 0.0])
    assert losses.pabee_loss(all_logits, labels).item() == pytest.approx((1 * 2.5 + 2 * 0.0) / 3)
    assert losses.deebert_stage2_loss(all_logits, labels).item() == pytest.approx(2.5)
    halting = torch.tensor([[1.0, 1.0], [0.5, 0.5]])  # P = (1, 0): all weight on layer 1
    value = losses.pondernet_loss(all_logits, halting, labels, beta=0.0).item()
    assert value == pytest.approx(2.5)
    for name in ("ensemble", "dact"):
        assert not losses.objective(name).regression


def test_objective_names():
    assert losses.objective("deebert").name == "deebert_stage2"
    assert losses.objective("pondernet").name == "palbert"
    with pytest.raises(ValueError, match="method must be one of"):
        losses.objective("nope")


# -- a few training steps lower each method's loss ---------------------------------------------

METHOD_POLICIES = {
    "pabee": eek.Patience(1),
    "deebert_stage1": eek.Entropy(0.3),
    "deebert_stage2": eek.Entropy(0.3),
    "fastbert": eek.Entropy(0.3),
    "palbert": eek.QExit(),
    "ensemble": eek.Voting(2),
    "dact": eek.DACT(),
    "smartbert_stage1": eek.SkipGates(entropy_threshold=0.3),
    "smartbert_stage2": eek.SkipGates(entropy_threshold=0.3),
    "joint": eek.Entropy(0.3),
}


def _learnable_data(batches=3, size=8):
    """Label = whether token 5 is in the sequence: learnable by a tiny model in a few steps."""
    out = []
    for seed in range(batches):
        ids, mask, _ = tiny_batch(size, 10, seed=seed, padded=False)
        labels = torch.arange(size) % 3
        ids[:, 1] = 5 + labels * 10
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.fixture(scope="module")
def fine_tuned_backbone():
    """A tiny BERT whose backbone and final classifier learnt the task (DeeBERT's stage 1)."""
    model = eek.patch(tiny_model("bert", num_layers=4), eek.Entropy(0.3))
    train_exit_heads(model, _learnable_data(), method="deebert_stage1", epochs=8, lr=3e-3, progress=False)
    eek.unpatch(model)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", list(METHOD_POLICIES))
def test_a_few_steps_lower_the_loss(method, fine_tuned_backbone):
    model = tiny_model("bert", num_layers=4)
    head_only = losses.objective(method).trains == "heads"
    if head_only:  # the heads learn from a fine-tuned backbone, as in the methods' second stages
        model.load_state_dict(fine_tuned_backbone)
    eek.patch(model, METHOD_POLICIES[method])
    data = _learnable_data()
    lr = 1e-2 if head_only else 3e-3
    first = train_exit_heads(model, data, method=method, epochs=1, lr=0.0, warmup_fraction=0.0, progress=False)
    train_exit_heads(model, data, method=method, epochs=6, lr=lr, warmup_fraction=0.0, progress=False)
    after = train_exit_heads(model, data, method=method, epochs=1, lr=0.0, warmup_fraction=0.0, progress=False)
    assert sum(after) < 0.9 * sum(first), f"{method}: {first} -> {after}"


def test_smartbert_stage1_trains_the_gates_through_the_straight_through_estimator():
    model = eek.patch(tiny_model("bert", num_layers=4), eek.SkipGates(entropy_threshold=0.3))
    gates = model.early_exit_heads.gates
    # open layer 2's gate for every row (skip), keep layer 3's closed
    with torch.no_grad():
        gates[1].bias.fill_(5.0)
    ids, mask, _ = tiny_batch(4, 8)
    model.train()
    out = model(input_ids=ids, attention_mask=mask)
    assert out.all_skipped[1].all() and not out.all_skipped[2].any()
    assert out.all_gates[1].min() > 0.99 and out.all_gates[0].abs().sum() == 0
    losses.smartbert_stage1_loss(out.all_logits, out.all_gates, torch.tensor([0, 1, 2, 0])).backward()
    assert gates[1].weight.grad.abs().sum() > 0 and gates[2].weight.grad.abs().sum() > 0
    # the forward values are those of the hard skip
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, return_all_exits=True).all_logits
    assert torch.allclose(out.all_logits.detach(), reference, atol=1e-5)


def test_head_only_training_freezes_the_backbone_and_restores_requires_grad():
    model = eek.patch(tiny_model("bert", num_layers=3), eek.QExit())
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "early_exit_heads" not in k}
    halting = [p.clone() for p in model.early_exit_heads.qexit_halting.parameters()]
    train_exit_heads(
        model,
        _learnable_data(2),
        method="palbert",
        trains="heads",
        optimizer="sgd",
        schedule="cosine",
        lr=1e-2,
        progress=False,
    )
    for name, value in model.state_dict().items():
        if name in backbone:
            assert torch.equal(value, backbone[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(model.early_exit_heads.qexit_halting.parameters(), halting))
    assert all(p.requires_grad for p in model.parameters())


def test_methods_that_need_a_head_check_the_policy():
    model = eek.patch(tiny_model("bert"), eek.Entropy(0.3))
    for method, policy in (("palbert", "QExit"), ("dact", "DACT"), ("smartbert_stage1", "SkipGates")):
        with pytest.raises(ValueError, match=policy):
            train_exit_heads(model, _learnable_data(1), method=method, progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        train_exit_heads(model, _learnable_data(1), optimizer="lion", progress=False)
