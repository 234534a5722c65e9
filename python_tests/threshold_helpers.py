"""Thresholds for tests that compare backends: midway between data points, and checked to be.

Two backends agree on a decision only where the decision quantity (an entropy, a
probability, a margin) is farther from the threshold than their rounding differences. On a
GPU those differences are real (approximate exp, another summation order in cuBLAS), so a
threshold that sits on a data point (the median of an odd number of rows, say) flips at
random there. These helpers pick thresholds in the middle of a gap between the values the
test will meet, and check, for every policy, that no value the rule compares on any layer
lies within ``MIN_MARGIN`` of its threshold (or a margin the test states, for data whose
values lie closer together and backends that round alike).
"""

from __future__ import annotations

import math

import torch

import earlyexit_kernels as eek
from earlyexit_kernels.methods import exit_rules
from earlyexit_kernels.methods.policies import layer_value

# Far above the rounding differences between backends (a few fp32 ulps of values <= ln C).
MIN_MARGIN = 1e-4


def randomize_heads(model, seed: int) -> None:
    """Distinct per-layer heads, halting heads and gates, so that exits differ between rows and
    layers (the tiny models' own heads give near-uniform predictions)."""
    g = torch.Generator().manual_seed(seed)
    heads = model.early_exit_heads
    with torch.no_grad():
        for module in list(heads.classifiers) + [heads.qexit_halting, heads.dact_halting]:
            if module is None:
                continue
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)
        if heads.gates is not None:
            for gate in heads.gates:
                gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.5)
                gate.bias.fill_(0.0)


def midway(values: torch.Tensor, around: torch.Tensor | None = None, min_margin: float = MIN_MARGIN) -> float:
    """The middle of the widest gap between neighbouring ``values`` (every value the rule will
    meet) within the middle half of ``around`` (default: of ``values``): both sides stay
    populated and no value lies within ``min_margin`` of the threshold."""
    v = torch.unique(values.flatten().double())  # sorted
    v = v[torch.isfinite(v)]
    a = torch.unique((values if around is None else around).flatten().double())
    a = a[torch.isfinite(a)]
    assert len(a) >= 2, "too few distinct values to place a threshold between"
    lo, hi = a[len(a) // 4], a[max(len(a) // 4 + 1, 3 * len(a) // 4)]
    gaps = v[1:] - v[:-1]
    inside = (v[:-1] >= lo) & (v[1:] <= hi)
    assert inside.any(), "no gap between two values in the middle half"
    i = int(torch.argmax(torch.where(inside, gaps, -1.0)))
    assert float(gaps[i]) > 2 * min_margin, "the values are too close together for a clear threshold"
    return float((v[i] + v[i + 1]) / 2)


def qexit_cdfs(all_halting: torch.Tensor) -> torch.Tensor:
    """Q-exit's cumulative halting probability per layer [L, B] from the lambdas [L, B]."""
    cdf = torch.zeros_like(all_halting[0], dtype=torch.float64)
    remaining = torch.ones_like(cdf)
    out = []
    for lam in all_halting.double():
        cdf = cdf + lam * remaining
        remaining = remaining * (1 - lam)
        out.append(cdf)
    return torch.stack(out)


def decision_quantity(policy, layer: int, num_layers: int, logits, halting, state):
    """The quantity each decision compares with its threshold, in float64: ``(q, threshold)``.

    For the argmax rules (Patience, Voting) it is the gap between the two largest logits:
    the decision is ambiguous when that gap is within rounding of 0. ``(None, None)`` for a
    rule that reads no computed value (Scheduled).
    """
    z = logits.double()
    if isinstance(policy, (eek.Entropy, eek.SkipGates)):
        thr = policy.threshold if isinstance(policy, eek.Entropy) else policy.entropy_threshold
        logp = torch.log_softmax(z, -1)
        q = -(logp.exp() * logp).sum(-1)
        if policy.normalized:
            q = q / math.log(z.shape[-1])
        return q, layer_value(thr, layer)
    if isinstance(policy, eek.MaxProb):
        t = 1.0 if policy.temperature is None else layer_value(policy.temperature, layer)
        return torch.softmax(z / t, -1).amax(-1), layer_value(policy.threshold, layer)
    if isinstance(policy, eek.Patience) and policy.is_regression:
        return (z[:, 0] - state["prev_value"].double()).abs(), policy.regression_threshold
    if isinstance(policy, (eek.Patience, eek.Voting)):
        top = z.topk(2, -1).values
        return top[:, 0] - top[:, 1], 0.0
    if isinstance(policy, eek.QExit):
        lam = torch.sigmoid(halting.double())
        if policy.stochastic:
            return lam - state["uniforms"][:, layer - 1].double(), 0.0
        return state["cdf"].double() + lam * state["remaining"].double(), policy.q
    if isinstance(policy, eek.DACT):
        pi_prev, acc_prev = state["pi"].double(), state["accumulated"].double()
        acc = pi_prev[:, None] * torch.softmax(z, -1) + (1 - pi_prev[:, None]) * acc_prev
        pi = torch.sigmoid(halting.double()) * pi_prev
        left = num_layers - layer
        top = acc.topk(2, -1).values
        return top[:, 0] * (1 - pi) ** left - top[:, 1] - left * pi, 0.0
    return None, None


def smallest_margin(policy, out, num_layers: int) -> float:
    """The smallest distance between a decision quantity and its threshold over every row and
    every layer before the last, replaying the rule on a ``return_all_exits=True`` output."""
    logits = out.all_logits.float().cpu()
    halting_logits = out.all_halting_logits.cpu() if out.all_halting_logits is not None else None
    batch, num_labels = logits.shape[1], logits.shape[2]
    state = exit_rules.init_state(policy, batch, num_labels, 1, num_layers, torch.device("cpu"))
    state = {k: v.cpu() for k, v in state.items()}
    state.pop("prev_pooled", None)
    smallest = math.inf
    for layer in range(1, num_layers):
        halting = halting_logits[layer - 1] if halting_logits is not None else None
        q, threshold = decision_quantity(policy, layer, num_layers, logits[layer - 1], halting, state)
        if q is not None:
            finite = torch.isfinite(q)
            if finite.any():
                smallest = min(smallest, float((q[finite] - threshold).abs().min()))
        _, _, state = exit_rules.exit_step(policy, layer, num_layers, logits[layer - 1], halting, state)
    return smallest


def assert_clear_of_threshold(policy, out, num_layers: int, min_margin: float = MIN_MARGIN) -> None:
    margin = smallest_margin(policy, out, num_layers)
    assert margin > min_margin, (
        f"{policy}: a decision quantity lies {margin:.3g} from its threshold; backends may round "
        "it to either side (move the threshold or the data)"
    )
