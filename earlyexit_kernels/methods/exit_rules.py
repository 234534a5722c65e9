"""The exit step in plain PyTorch: every policy's criterion and per-sequence state.

This module is the executable form of ``docs/exit_methods.md`` and the
reference every fast backend is tested against. It works on the rows that are
still active, in float32, without a host sync:

    state = init_state(policy, batch_size, num_labels, hidden_size, num_layers, device)
    exits, returned_logits, state = exit_step(policy, layer, num_layers, logits, halting_logit, state)

Shapes: ``logits`` [n, C] in any float dtype; ``halting_logit`` [n] (the halting
head's output before the sigmoid; ``None`` unless the policy has a halting head);
``exits`` bool [n]; ``returned_logits`` float32 [n, C] (the logits themselves where the rule
returns them and they are float64); every state tensor has the
rows in its first dimension, so compaction gathers it like the hidden states.

A non-finite logit (or halting logit) never lets a sequence exit on that layer.
How each rule treats it: Patience breaks the streak; Voting casts no vote; DACT
leaves its state unchanged on that layer; QExit leaves its state unchanged when the
halting logit is non-finite (its state does not read the class logits, which then
only block the exit). At the last layer every
sequence exits, whatever its head says.
"""

from __future__ import annotations

import math

import torch

from earlyexit_kernels.methods.policies import (
    DACT,
    Entropy,
    ExitPolicy,
    MaxProb,
    MultiLabelConfidence,
    Patience,
    QExit,
    Scheduled,
    ScoreBand,
    SkipGates,
    Voting,
    layer_value,
)

__all__ = [
    "init_state",
    "exit_step",
    "head_exit_step",
    "can_exit_before_last",
    "needs_head_when_none_can_exit",
    "entropy",
]

State = dict[str, torch.Tensor]


def init_state(
    policy: ExitPolicy,
    batch_size: int,
    num_labels: int,
    hidden_size: int,
    num_layers: int,
    device: torch.device,
    pooled_dtype: torch.dtype = torch.float32,
) -> State:
    """The per-sequence state of ``policy`` before layer 1, for ``batch_size`` rows."""
    f32 = dict(dtype=torch.float32, device=device)
    if isinstance(policy, Patience):
        if policy.is_regression:
            return {
                "prev_value": torch.full((batch_size,), math.nan, **f32),
                "counter": torch.zeros(batch_size, dtype=torch.int32, device=device),
            }
        return {
            "prev_pred": torch.full((batch_size,), -1, dtype=torch.int64, device=device),
            "counter": torch.zeros(batch_size, dtype=torch.int32, device=device),
        }
    if isinstance(policy, QExit):
        state = {
            "cdf": torch.zeros(batch_size, **f32),
            "remaining": torch.ones(batch_size, **f32),
            "prev_pooled": torch.zeros(batch_size, hidden_size, dtype=pooled_dtype, device=device),
        }
        if policy.stochastic:
            # Drawn once for the whole batch, so the decision of a row does not depend on
            # which other rows are still active.
            generator = torch.Generator().manual_seed(policy.seed)
            state["uniforms"] = torch.rand(batch_size, num_layers, generator=generator).to(device)
        return state
    if isinstance(policy, Voting):
        return {
            "votes": torch.zeros(batch_size, num_labels, dtype=torch.int32, device=device),
            "prob_sum": torch.zeros(batch_size, num_labels, **f32),
        }
    if isinstance(policy, DACT):
        return {
            "accumulated": torch.zeros(batch_size, num_labels, **f32),
            "pi": torch.ones(batch_size, **f32),
        }
    if isinstance(policy, Scheduled):
        policy.check_batch(batch_size)
        return {"exit_layers": policy.exit_layers.to(device)}
    return {}


def needs_head_when_none_can_exit(policy: ExitPolicy) -> bool:
    """Whether the policy's state advances from the heads even on a layer where nobody can leave.

    Patience counts agreements, Voting votes, QExit and DACT accumulate; ``Scheduled``
    decides from its schedule alone, so the engine skips its head on such a layer.
    """
    return not isinstance(policy, Scheduled)


def can_exit_before_last(policy: ExitPolicy, layer: int) -> bool:
    """Whether any sequence can possibly exit at ``layer`` (host-side, no sync).

    The engine skips the active-count read-back on layers where this is False.
    """
    if isinstance(policy, Patience):
        return layer >= policy.patience + 1
    if isinstance(policy, Voting):
        return layer >= policy.min_votes
    return True


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` over the last dim, in float32."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def _entropy_exits(threshold, normalized: bool, layer: int, z: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    h = entropy(z)
    if normalized:
        h = h / math.log(z.shape[-1])
    return finite & (h < layer_value(threshold, layer))


def exit_step(
    policy: ExitPolicy,
    layer: int,
    num_layers: int,
    logits: torch.Tensor,
    halting_logit: torch.Tensor | None,
    state: State,
) -> tuple[torch.Tensor, torch.Tensor, State]:
    """Apply ``policy`` at 1-based ``layer``; see the module docstring for shapes."""
    z = logits.float()
    finite = torch.isfinite(z).all(dim=-1)
    returned = logits if logits.dtype == torch.float64 else z  # a float64 model's own logits, unrounded
    state = dict(state)

    if isinstance(policy, Entropy):
        exits = _entropy_exits(policy.threshold, policy.normalized, layer, z, finite)
    elif isinstance(policy, SkipGates):
        exits = _entropy_exits(policy.entropy_threshold, policy.normalized, layer, z, finite)
    elif isinstance(policy, MaxProb):
        if policy.temperature is not None:
            z_t = z / layer_value(policy.temperature, layer)
        else:
            z_t = z
        max_p = torch.softmax(z_t, dim=-1).amax(dim=-1)
        exits = finite & (max_p >= layer_value(policy.threshold, layer))
    elif isinstance(policy, Patience):
        if policy.is_regression:
            value = z[:, 0]
            agrees = (value - state["prev_value"]).abs() < policy.regression_threshold
            state["prev_value"] = value
        else:
            pred = torch.where(finite, z.argmax(dim=-1), torch.full_like(state["prev_pred"], -1))
            agrees = (pred == state["prev_pred"]) & finite
            state["prev_pred"] = pred
        counter = torch.where(agrees, state["counter"] + 1, torch.zeros_like(state["counter"]))
        state["counter"] = counter
        exits = counter == policy.patience
    elif isinstance(policy, QExit):
        halting = halting_logit.float()
        valid = torch.isfinite(halting)
        lam = torch.where(valid, torch.sigmoid(halting), torch.zeros_like(halting))
        state["cdf"] = state["cdf"] + lam * state["remaining"]
        state["remaining"] = state["remaining"] * (1.0 - lam)
        if policy.stochastic:
            exits = valid & finite & (state["uniforms"][:, layer - 1] < lam)
        else:
            exits = valid & finite & (state["cdf"] > policy.q)
    elif isinstance(policy, Voting):
        pred = z.argmax(dim=-1)
        vote = torch.nn.functional.one_hot(pred, z.shape[-1]).to(torch.int32) * finite[:, None].to(torch.int32)
        probs = torch.where(finite[:, None], torch.softmax(z, dim=-1), torch.zeros_like(z))
        votes = state["votes"] + vote
        prob_sum = state["prob_sum"] + probs
        state["votes"], state["prob_sum"] = votes, prob_sum
        score = votes.float() + prob_sum / (layer + 1)
        returned = torch.log(score) - torch.log(score.sum(dim=-1, keepdim=True))
        exits = finite & (votes.amax(dim=-1) >= policy.min_votes)
    elif isinstance(policy, DACT):
        halting = halting_logit.float()
        valid = finite & torch.isfinite(halting)
        pi_prev, acc_prev = state["pi"], state["accumulated"]
        acc = pi_prev[:, None] * torch.softmax(z, dim=-1) + (1.0 - pi_prev[:, None]) * acc_prev
        pi = torch.sigmoid(halting) * pi_prev
        acc = torch.where(valid[:, None], acc, acc_prev)
        pi = torch.where(valid, pi, pi_prev)
        state["accumulated"], state["pi"] = acc, pi
        layers_left = num_layers - layer
        top2 = acc.topk(2, dim=-1).values
        margin = top2[:, 0] * (1.0 - pi) ** layers_left - top2[:, 1] - layers_left * pi
        exits = valid & (margin > 0)
        returned = torch.log(acc)
    elif isinstance(policy, MultiLabelConfidence):
        exits = finite & (z.abs() >= policy.margin(layer)).all(dim=-1)
    elif isinstance(policy, ScoreBand):
        score = z[:, 0]
        low = score <= policy.low if policy.low is not None else torch.zeros_like(finite)
        high = score >= policy.high if policy.high is not None else torch.zeros_like(finite)
        exits = finite & (low | high)
    elif isinstance(policy, Scheduled):
        exits = state["exit_layers"] == layer
    else:
        raise TypeError(f"unknown exit policy {type(policy).__name__}")

    if layer >= num_layers:
        exits = torch.ones_like(exits)
    return exits, returned, state


def head_exit_step(
    policy: ExitPolicy,
    layer: int,
    num_layers: int,
    cls_hidden: torch.Tensor,
    pooler_weight: torch.Tensor,
    pooler_bias: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    state: State,
    halting_fn=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, State]:
    """The default head followed by :func:`exit_step`: what a fused kernel computes.

    ``cls_hidden`` [n, H] (may be a strided view of the hidden states),
    ``pooler_weight`` [H, H], ``pooler_bias`` [H], ``head_weight`` [C, H], ``head_bias`` [C].
    ``halting_fn(pooled, previous_pooled)`` gives the halting logit [n] for policies with a
    halting head. Returns ``(exits [n] bool, returned_logits [n, C] float32,
    logits [n, C] in the input dtype, halting_logit [n] or None, state)``; the state's
    ``prev_pooled`` (QExit) is advanced to the pooled vector.
    """
    pooled = torch.tanh(torch.nn.functional.linear(cls_hidden, pooler_weight, pooler_bias))
    logits = torch.nn.functional.linear(pooled, head_weight, head_bias)
    halting = halting_fn(pooled, state.get("prev_pooled")) if halting_fn is not None else None
    exits, returned, state = exit_step(policy, layer, num_layers, logits, halting, state)
    if "prev_pooled" in state:
        state["prev_pooled"] = pooled
    return exits, returned, logits, halting, state
