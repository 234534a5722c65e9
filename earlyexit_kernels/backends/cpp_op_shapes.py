"""What the C++ ops' outputs look like: the kinds' state tensors, the survivors flag, and the fake
(meta) kernels that give torch.compile and FakeTensor tracing each op's output shapes and dtypes
from its inputs' (schemas in ``csrc/bindings.cpp``)."""

from __future__ import annotations

import torch

from earlyexit_kernels.backends.policy_lowering import PolicyKind

__all__ = ["FLAG_SURVIVORS", "register"]

# The policy's kinds and flags (csrc/common/exit_rule.h), and the C++ rule's own bit above them.
KIND_PATIENCE, KIND_PATIENCE_REG = int(PolicyKind.PATIENCE), int(PolicyKind.PATIENCE_REG)
KIND_QEXIT, KIND_VOTING, KIND_DACT = int(PolicyKind.QEXIT), int(PolicyKind.VOTING), int(PolicyKind.DACT)
FLAG_SURVIVORS = 8  # eek::kSurvivors: also produce the stable survivor list and its count


def _fake_state(kind: int, logits_like: torch.Tensor, n: int, num_labels: int) -> list[torch.Tensor]:
    """state0 and state1 (csrc/common/exit_op.h): empty float32 where the policy has fewer."""
    state = _fake_state_used(kind, logits_like, n, num_labels)
    return state + [logits_like.new_empty((0,), dtype=torch.float32) for _ in range(2 - len(state))]


def _fake_state_used(kind: int, logits_like: torch.Tensor, n: int, num_labels: int) -> list[torch.Tensor]:
    def new(shape, dtype):
        return logits_like.new_empty(shape, dtype=dtype)

    if kind == KIND_PATIENCE:
        return [new((n,), torch.int64), new((n,), torch.int32)]
    if kind == KIND_PATIENCE_REG:
        return [new((n,), torch.float32), new((n,), torch.int32)]
    if kind == KIND_QEXIT:
        return [new((n,), torch.float32), new((n,), torch.float32)]
    if kind == KIND_VOTING:
        return [new((n, num_labels), torch.int32), new((n, num_labels), torch.float32)]
    if kind == KIND_DACT:
        return [new((n, num_labels), torch.float32), new((n,), torch.float32)]
    return []


def _fake_rule_outputs(like: torch.Tensor, n: int, num_labels: int, kind: int, flags: int):
    exits = like.new_empty((n,), dtype=torch.bool)
    returned = like.new_empty((n, num_labels), dtype=torch.float32)
    survivors = like.new_empty((n if flags & FLAG_SURVIVORS else 0,), dtype=torch.int64)
    count = like.new_empty((), dtype=torch.int64)
    return exits, returned, *_fake_state(kind, like, n, num_labels), survivors, count


def register() -> None:
    """Register the fake kernels of every op of earlyexit_kernels._C (once it is loaded)."""

    @torch.library.register_fake("earlyexit::cpp_bert_layer")
    def _(hidden, mask, weights, attention_eps, output_eps, head_size, scaling):
        return torch.empty_like(hidden)

    @torch.library.register_fake("earlyexit::cpp_head")
    def _(cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias):
        n, h = cls_hidden.shape
        return cls_hidden.new_empty((n, h)), cls_hidden.new_empty((n, head_weight.shape[0]))

    @torch.library.register_fake("earlyexit::cpp_exit_step")
    def _(logits, halting, state, kind, flags, layer, num_layers, int_param, scalar, per_layer, *args, **kwargs):
        return _fake_rule_outputs(logits, logits.shape[0], logits.shape[1], kind, flags)

    @torch.library.register_fake("earlyexit::cpp_head_exit_step")
    def _(
        cls_hidden,
        pooler_weight,
        pooler_bias,
        head_weight,
        head_bias,
        halting,
        state,
        kind,
        flags,
        layer,
        num_layers,
        int_param,
        scalar,
        per_layer,
        *args,
        **kwargs,
    ):
        n, h = cls_hidden.shape
        c = head_weight.shape[0]
        exits, returned, state0, state1, survivors, count = _fake_rule_outputs(cls_hidden, n, c, kind, flags)
        logits, pooled = cls_hidden.new_empty((n, c)), cls_hidden.new_empty((n, h))
        return exits, returned, logits, pooled, state0, state1, survivors, count

    @torch.library.register_fake("earlyexit::cpp_packed_head_exit_step")
    def _(cls_hidden, pooler_weight_t, pooler_bias, head_weight, head_bias, halting, state, kind, flags, *rest):
        n, h = cls_hidden.shape
        c = head_weight.shape[0]
        exits, returned, state0, state1, survivors, count = _fake_rule_outputs(cls_hidden, n, c, kind, flags)
        return (
            exits,
            returned,
            cls_hidden.new_empty((n, c)),
            cls_hidden.new_empty((n, h)),
            state0,
            state1,
            survivors,
            count,
        )

    @torch.library.register_fake("earlyexit::cpp_pooled_head_exit_step")
    def _(
        hidden,
        mask,
        pooling,
        norm_weight,
        norm_bias,
        norm_eps,
        dense_weight_t,
        dense_bias,
        activation,
        out_weight,
        out_bias,
        halting,
        state,
        kind,
        flags,
        *rest,
    ):
        n, _, h = hidden.shape
        c = out_weight.shape[0]
        exits, returned, state0, state1, survivors, count = _fake_rule_outputs(hidden, n, c, kind, flags)
        # the pooled rows: kept on the CPU, not on a GPU (bindings_cuda.cpp)
        logits, pooled = hidden.new_empty((n, c)), hidden.new_empty((n if hidden.device.type == "cpu" else 0, h))
        return exits, returned, logits, pooled, state0, state1, survivors, count

    @torch.library.register_fake("earlyexit::cpp_gather_survivors")
    def _(order, exits, rows, dead, next_rows, count, sources, targets, host_count=None):
        return None  # writes its outputs in place

    @torch.library.register_fake("earlyexit::cpp_compact")
    def _(hidden, mask, index, seq_len):
        m = index.shape[0]
        length = min(seq_len, hidden.shape[1])
        out = hidden.new_empty((m, length, hidden.shape[2]))
        out_mask = mask.new_empty((m, length)) if mask is not None else hidden.new_empty((0,), dtype=torch.int64)
        return out, out_mask
