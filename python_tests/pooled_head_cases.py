"""Inputs of the whole per-layer head step's tests (C++ and Triton against the same reference).

A head of either form, a layer's output with the padding cases a kernel could get wrong, and the
write-back target and threshold check of the decision tests.
"""

import math

import torch

import earlyexit_kernels as eek
from earlyexit_kernels.backends.pooled_head import FusedExitHead
from earlyexit_kernels.backends.write_back import WriteBack


def make_head(kind: str, pooling: str, hidden: int, width: int, labels: int, seed: int, dtype=torch.float32):
    """A ``"model"`` (tanh pooler, M = H) or ``"mlp"`` (LayerNorm, Linear, GELU, Linear) head
    [M = width] whose logits spread over a few units, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(width, hidden, generator=g) / math.sqrt(hidden)
    out = torch.randn(labels, width, generator=g) * 3.0 / math.sqrt(width)
    biases = (torch.randn(width, generator=g) * 0.1, torch.randn(labels, generator=g) * 0.5)
    if kind == "model":
        tensors, activation = (dense, biases[0], out, biases[1]), "tanh"
    else:
        norm = (1.0 + 0.1 * torch.randn(hidden, generator=g), 0.1 * torch.randn(hidden, generator=g))
        tensors, activation = (dense, biases[0], out, biases[1], *norm), "gelu"
    t = [x.to(dtype) for x in tensors]
    norm = dict(norm_weight=t[4], norm_bias=t[5], norm_eps=1e-5) if kind == "mlp" else {}
    return FusedExitHead(pooling, t[0], t[1], activation, t[2], t[3], **norm)


def head_as(head: FusedExitHead, dtype) -> FusedExitHead:
    """``head`` with every tensor in ``dtype``."""
    fields = {f: getattr(head, f) for f in head.__dataclass_fields__}
    return FusedExitHead(**{f: v.to(dtype) if torch.is_tensor(v) else v for f, v in fields.items()})


def layer_output(rows: int, length: int, hidden: int, seed: int, dtype=torch.float32):
    """hidden [rows, length, H] (a strided view, as after a layer of a wider batch) and a mask
    with padding, one row without any valid token, and NaN in a padded position (never read)."""
    g = torch.Generator().manual_seed(seed)
    hidden_states = (torch.randn(rows + 2, length, hidden, generator=g) * 2.0).to(dtype)[1 : rows + 1]
    lengths = torch.randint(1, length + 1, (rows,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    if rows > 2:
        mask[2] = 0
    padded = (mask == 0).nonzero()
    if len(padded):
        hidden_states[padded[0, 0], padded[0, 1], 0] = float("nan")
    return hidden_states, mask


def write_back_target(rows: int, runs: int, labels: int, num_layers: int) -> WriteBack:
    """Outputs of a batch of ``rows + 4`` where the active rows sit at positions 2.."""
    batch = rows + 4
    return WriteBack(
        torch.arange(2, rows + 2),
        torch.full((rows,), runs),
        None,
        torch.zeros(batch, labels),
        torch.full((batch,), num_layers),
        torch.zeros(batch, dtype=torch.long),
    )


def assert_far_from_threshold(policy, logits: torch.Tensor) -> None:
    """The reference's decision quantities lie far from the threshold: rounding cannot flip one."""
    probs = logits.float().softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    if isinstance(policy, eek.Entropy):
        assert (entropy - policy.threshold).abs().min() > 1e-4
    if isinstance(policy, eek.MaxProb):
        assert (probs.max(-1).values - policy.threshold).abs().min() > 1e-4


DECISION_LAYERS = 6
DECISION_ROWS = 23


def decision_policies():
    return [eek.Entropy(0.6), eek.Patience(2), eek.Voting(2), eek.MaxProb(0.7)]


def decision_case(kind: str, policy):
    """``(head, hidden, mask, state)`` for layer 3 of a 6-layer model: 23 rows of 12 tokens, H = 48,
    the state after two earlier layers on other hidden states (patience counts and votes under
    way), decision quantities far from the threshold."""
    from earlyexit_kernels.backends.pooled_head import pooled_head_exit_step
    from earlyexit_kernels.methods.exit_rules import init_state

    rows, length, hidden = DECISION_ROWS, 12, 48
    head = make_head(kind, "mean", hidden, 32 if kind == "mlp" else hidden, 3, seed=7)
    x, mask = layer_output(rows, length, hidden, seed=3)
    earlier, _ = layer_output(rows, length, hidden, seed=4)
    state = init_state(policy, rows, 3, hidden, DECISION_LAYERS, torch.device("cpu"))
    with torch.no_grad():
        for layer in (1, 2):
            _, _, _, state = pooled_head_exit_step(policy, layer, DECISION_LAYERS, earlier, mask, head, state)
        _, _, logits, _ = pooled_head_exit_step(policy, 3, DECISION_LAYERS, x, mask, head, dict(state))
    assert_far_from_threshold(policy, logits)
    return head, x, mask, state
