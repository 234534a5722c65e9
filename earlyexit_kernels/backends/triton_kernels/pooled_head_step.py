"""The whole per-layer step of an internal exit head in Triton: pooling, head, rule, write-back.

Wrappers with the signatures of :func:`earlyexit_kernels.backends.pooled_head.pooled_head_exit_step`
and its ``_write_back`` form, over three launches at most per layer:

1. :mod:`.pool_norm`: the [CLS] vector or masked mean of each row, and the MLP head's LayerNorm
   (skipped for a [CLS] head without a norm: the head kernel reads the [CLS] rows in place);
2. :mod:`.exit_head`: the first Linear, its activation (tanh or GELU) and the partial logits;
3. :mod:`.exit_decide`: the logits, the policy's rule, and with a target the write-back of the
   exiting rows and the survivor order.

Nothing is read back. Numerics: fp32 accumulation throughout; the pooled rows, the first
Linear's output and its activation rounded to the input dtype where the reference's modules
return them, so bf16 and fp16 follow the reference's roundings. For policies without a
halting head (QExit and DACT run their halting MLP between the modules).
"""

from __future__ import annotations

import torch

from earlyexit_kernels.backends.pooled_head import FusedExitHead
from earlyexit_kernels.backends.triton_kernels._common import use_ops
from earlyexit_kernels.backends.triton_kernels.exit_decide import DACT_CODE, F_LOGITS, F_PARTIALS, F_RETURNED, QEXIT
from earlyexit_kernels.backends.triton_kernels.exit_head import _run_head
from earlyexit_kernels.backends.triton_kernels.exit_step import _decide, _direct, _lower, _same_dtype
from earlyexit_kernels.backends.triton_kernels.pool_norm import _run_pool_norm
from earlyexit_kernels.backends.write_back import WriteBack

__all__ = ["pooled_head_exit_step", "pooled_head_exit_step_write_back"]


def _check(policy, num_layers: int, hidden: torch.Tensor, mask: torch.Tensor | None, head: FusedExitHead) -> None:
    if _lower(policy, num_layers).code in (QEXIT, DACT_CODE):
        raise ValueError(
            f"pooled_head_exit_step: {type(policy).__name__} needs a halting head, which this step does not "
            "run; use head_exit_step with halting_fn"
        )
    if hidden.dim() != 3:
        raise ValueError(f"pooled_head_exit_step: hidden must be [n, S, H], got {list(hidden.shape)}")
    n, length, width = hidden.shape
    if head.dense_weight.shape[1] != width:
        raise ValueError(
            f"pooled_head_exit_step: the head's first Linear takes {head.dense_weight.shape[1]} features, "
            f"hidden has {width}"
        )
    if mask is not None and tuple(mask.shape) != (n, length):
        raise ValueError(f"pooled_head_exit_step: mask must be [{n}, {length}], got {list(mask.shape)}")
    if mask is not None and mask.device != hidden.device:
        raise ValueError(f"pooled_head_exit_step: mask is on {mask.device}, hidden on {hidden.device}")


def _partials(policy, num_layers: int, hidden, mask, head: FusedExitHead):
    """Launches 1 and 2: the partial logits [T, n, C] fp32, and the last Linear's bias."""
    _check(policy, num_layers, hidden, mask, head)
    norm = head.norm_weight is not None
    tensors = (hidden, head.dense_weight, head.dense_bias, head.out_weight, head.out_bias)
    tensors = _same_dtype("pooled_head_exit_step", *tensors + ((head.norm_weight, head.norm_bias) if norm else ()))
    hidden, dense_weight, dense_bias, out_weight, out_bias = tensors[:5]
    norm_weight, norm_bias = tensors[5:] if norm else (None, None)
    mean = head.pooling == "mean"
    ops = use_ops()
    if mean or norm:
        if ops:
            rows = torch.ops.earlyexit.pool_norm(hidden, mask, norm_weight, norm_bias, head.norm_eps, mean)
        else:
            rows = _run_pool_norm(_direct, hidden, mask, norm_weight, norm_bias, head.norm_eps, mean)
    else:
        rows = hidden[:, 0]
    gelu = head.activation == "gelu"
    if ops:
        zpart, _ = torch.ops.earlyexit.exit_head(rows, dense_weight, dense_bias, out_weight, False, gelu)
    else:
        zpart, _ = _run_head(_direct, rows, dense_weight, dense_bias, out_weight, False, False, gelu)
    return zpart, out_bias


def pooled_head_exit_step(policy, layer: int, num_layers: int, hidden, mask, head: FusedExitHead, state: dict):
    """Triton version of :func:`earlyexit_kernels.backends.pooled_head.pooled_head_exit_step`.

    ``hidden`` [n, S, H], ``mask`` [n, S] or None. Returns ``(exits [n] bool, returned [n, C]
    float32, logits [n, C], state)``: three launches, no read-back.
    """
    zpart, bias = _partials(policy, num_layers, hidden, mask, head)
    exits, returned, logits, state, _, _ = _decide(
        policy, layer, num_layers, zpart, bias, None, state, F_PARTIALS | F_RETURNED | F_LOGITS
    )
    return exits, returned, logits, state


def pooled_head_exit_step_write_back(
    policy, layer: int, num_layers: int, hidden, mask, head: FusedExitHead, state: dict, target: WriteBack
):
    """Triton version of :func:`earlyexit_kernels.backends.pooled_head.pooled_head_exit_step_write_back`.

    Returns ``(exits [n] bool, state, order [n] int64, stats [2] int64)``; ``order[:count]`` the
    staying rows in increasing order, the exiting rows after them in decreasing order.
    """
    zpart, bias = _partials(policy, num_layers, hidden, mask, head)
    exits, _, _, state, order, stats = _decide(policy, layer, num_layers, zpart, bias, None, state, F_PARTIALS, target)
    return exits, state, order, stats
