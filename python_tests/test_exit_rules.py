"""The reference exit step on small hand-checked tensors: the spec, rule by rule."""

import math

import pytest
import torch

import earlyexit_kernels as eek
from earlyexit_kernels.methods.exit_rules import can_exit_before_last, entropy, exit_step, init_state

L = 6


def run(policy, layer_logits, halting=None, num_layers=L):
    """Apply ``policy`` layer by layer to logits [layers, n, C]; returns (exit layer [n], state trace)."""
    n, c = layer_logits.shape[1:]
    state = init_state(policy, n, c, 4, num_layers, torch.device("cpu"))
    exit_layer = torch.zeros(n, dtype=torch.long)
    returned_at_exit = torch.zeros(n, c)
    trace = []
    for i in range(layer_logits.shape[0]):
        h = None if halting is None else halting[i]
        exits, returned, state = exit_step(policy, i + 1, num_layers, layer_logits[i], h, state)
        first = exits & (exit_layer == 0)
        exit_layer[first] = i + 1
        returned_at_exit[first] = returned[first]
        trace.append({k: v.clone() for k, v in state.items()})
    return exit_layer, returned_at_exit, trace


def test_entropy_exits_below_threshold_with_per_layer_values():
    confident = torch.tensor([[4.0, 0.0, 0.0]])
    unsure = torch.tensor([[0.0, 0.0, 0.0]])
    h_confident = entropy(confident).item()
    p_top = math.exp(4) / (math.exp(4) + 2)
    p_low = 1 / (math.exp(4) + 2)
    assert h_confident == pytest.approx(-(p_top * math.log(p_top) + 2 * p_low * math.log(p_low)), rel=1e-5)
    logits = torch.stack([unsure, confident, confident, confident])
    thresholds = [10.0 if i == 0 else h_confident / 2 for i in range(L)]
    thresholds[2] = h_confident + 1e-3
    exit_layer, _, _ = run(eek.Entropy(thresholds), logits)
    assert exit_layer.tolist() == [1]  # layer 1: ln 3 < 10
    thresholds[0] = 0.0
    exit_layer, _, _ = run(eek.Entropy(thresholds), logits)
    assert exit_layer.tolist() == [3]


def test_normalized_entropy_divides_by_log_num_classes():
    uniform = torch.zeros(1, 1, 5)
    assert run(eek.Entropy(1.0 + 1e-6, normalized=True), uniform)[0].tolist() == [1]
    assert run(eek.Entropy(1.0 - 1e-6, normalized=True), uniform)[0].tolist() == [0]


def test_maxprob_with_per_layer_temperature():
    logits = torch.tensor([[[2.0, 0.0]], [[2.0, 0.0]]])
    p_max = torch.softmax(torch.tensor([2.0, 0.0]), 0).max().item()  # 0.881
    policy = eek.MaxProb(0.85, temperature=[4.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    exit_layer, _, _ = run(policy, logits)
    assert p_max >= 0.85
    assert exit_layer.tolist() == [2]  # T=4 at layer 1 flattens to 0.62


def test_patience_counts_agreeing_layers_per_sequence():
    a, b = [3.0, 0.0], [0.0, 3.0]
    # row 0: a a a ... exits when t == 2, at layer 3. row 1: a b b a a a -> t: 0 0 1 0 1 2 -> layer 6.
    logits = torch.tensor([[a, a], [a, b], [a, b], [a, a], [a, a], [a, a]])
    exit_layer, _, trace = run(eek.Patience(2), logits)
    assert exit_layer.tolist() == [3, 6]
    assert [t["counter"][1].item() for t in trace] == [0, 0, 1, 0, 1, 2]


def test_patience_regression_counts_small_changes():
    values = torch.tensor([[1.0], [1.05], [1.5], [1.52], [1.55], [1.58]]).unsqueeze(1)
    exit_layer, _, trace = run(eek.Patience(2, regression_threshold=0.1), values)
    assert [t["counter"].item() for t in trace] == [0, 1, 0, 1, 2, 3]
    assert exit_layer.tolist() == [5]


def test_qexit_cdf_and_product_state():
    lam = torch.tensor([0.2, 0.25, 0.5, 0.5, 0.5, 0.5])
    halting = torch.logit(lam)[:, None]
    logits = torch.zeros(L, 1, 2)
    _, _, trace = run(eek.QExit(q=0.5), logits, halting)
    cdf = [t["cdf"].item() for t in trace]
    # P_1 = .2, P_2 = .25 * .8 = .2, P_3 = .5 * .6 = .3 -> cdf .2 .4 .7
    assert cdf[:3] == pytest.approx([0.2, 0.4, 0.7], abs=1e-6)
    assert trace[2]["remaining"].item() == pytest.approx(0.3, abs=1e-6)
    assert run(eek.QExit(q=0.5), logits, halting)[0].tolist() == [3]
    assert run(eek.QExit(q=0.1), logits, halting)[0].tolist() == [1]


def test_qexit_stochastic_is_reproducible_with_its_seed():
    halting = torch.zeros(L, 64)
    logits = torch.zeros(L, 64, 2)
    first = run(eek.QExit(stochastic=True, seed=3), logits, halting)[0]
    again = run(eek.QExit(stochastic=True, seed=3), logits, halting)[0]
    other = run(eek.QExit(stochastic=True, seed=4), logits, halting)[0]
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.float().mean() < 3  # lambda = 0.5: most leave within two layers


def test_voting_needs_min_votes_and_breaks_ties_by_probability_sum():
    a_strong, b_weak, a_weak = [5.0, 0.0], [0.0, 0.1], [0.1, 0.0]
    logits = torch.tensor([[a_strong], [b_weak], [a_weak], [b_weak], [b_weak], [b_weak]])
    exit_layer, returned, trace = run(eek.Voting(3), logits)
    assert exit_layer.tolist() == [5]  # votes a: 2 (layers 1, 3), b: 3 at layer 5
    assert trace[1]["votes"][0].tolist() == [1, 1]
    # At layer 2 the vote is tied 1-1; a has the larger probability sum and must win.
    _, returned2, _ = run(eek.Voting(1), logits[:2], num_layers=2)
    assert returned2.argmax(-1).item() == 0
    assert returned.argmax(-1).item() == 1


def test_dact_recursion_and_exit_rule():
    z = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]], [[2.0, 0.0]]])
    h = torch.logit(torch.tensor([[0.5], [0.5], [0.5]]))
    p1, p2 = torch.softmax(z[0, 0], 0), torch.softmax(z[1, 0], 0)
    _, _, trace = run(eek.DACT(), z, h, num_layers=3)
    a1 = p1  # pi_0 = 1
    a2 = 0.5 * p2 + 0.5 * a1
    assert torch.allclose(trace[0]["accumulated"][0], a1)
    assert torch.allclose(trace[1]["accumulated"][0], a2)
    assert trace[1]["pi"].item() == pytest.approx(0.25)
    # exit when a[c1] (1 - pi)^d - a[c2] - d pi > 0; with h tiny pi collapses and layer 1 exits.
    confident = torch.tensor([[[6.0, 0.0]]] * 3)
    tiny_h = torch.full((3, 1), -20.0)
    assert run(eek.DACT(), confident, tiny_h, num_layers=3)[0].tolist() == [1]
    exit_layer, returned, _ = run(eek.DACT(), z, h, num_layers=3)
    assert exit_layer.tolist() == [3]
    assert torch.allclose(returned.exp().sum(-1), torch.ones(1))


def test_scheduled_exits_at_the_given_layer():
    logits = torch.zeros(L, 3, 2)
    assert run(eek.Scheduled(torch.tensor([2, 6, 1])), logits)[0].tolist() == [2, 6, 1]


@pytest.mark.parametrize(
    "policy",
    [eek.Entropy(10.0), eek.MaxProb(0.0), eek.Voting(1), eek.QExit(q=0.01), eek.DACT(), eek.Patience(1)],
)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_heads_never_exit_early(policy, bad):
    logits = torch.tensor([[[1.0, bad]], [[1.0, bad]], [[1.0, bad]]])
    halting = torch.full((3, 1), 20.0)
    exit_layer, _, _ = run(policy, logits, halting, num_layers=3)
    assert exit_layer.tolist() == [3]  # only the forced exit at the last layer


def test_non_finite_halting_logit_leaves_qexit_state_unchanged():
    halting = torch.tensor([[math.nan], [0.0]])
    _, _, trace = run(eek.QExit(), torch.zeros(2, 1, 2), halting, num_layers=4)
    assert trace[0]["cdf"].item() == 0 and trace[0]["remaining"].item() == 1
    assert trace[1]["cdf"].item() == pytest.approx(0.5)


def test_every_sequence_exits_at_the_last_layer():
    exits, _, _ = exit_step(eek.Entropy(0.0), L, L, torch.zeros(4, 3), None, {})
    assert exits.all()


def test_layers_where_no_exit_is_possible_are_known_on_the_host():
    assert not can_exit_before_last(eek.Patience(3), 3) and can_exit_before_last(eek.Patience(3), 4)
    assert not can_exit_before_last(eek.Voting(2), 1) and can_exit_before_last(eek.Voting(2), 2)
    assert can_exit_before_last(eek.Entropy(0.1), 1)
