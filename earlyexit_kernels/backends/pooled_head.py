"""An internal exit head as one fused per-layer step reads it, and that step's reference.

Both head forms of :mod:`earlyexit_kernels.engine.step.heads` are one shape: a pooling of the layer's
token vectors (``"cls"``: the first; ``"mean"``: the mean of the valid ones), an optional
LayerNorm, a first Linear ``[M, H]`` with an activation, and a last Linear ``[C, M]``:

- the model's form: the model's pooler ``tanh(W_p x + b_p)`` (M = H), then the layer's Linear;
- the MLP form (:class:`~earlyexit_kernels.engine.step.heads.MLPExitHead`): LayerNorm, Linear, GELU, Linear.

:func:`pooled_head_exit_step` is the PyTorch reference of the backends' fused step (the C++
``cpp_pooled_head_exit_step``): same signature, pooled as :func:`masked_mean` pools, then the
head's modules' computation and :func:`~earlyexit_kernels.methods.exit_rules.exit_step`. An
adapter gives its heads in this form (``EncoderAdapterBase.fused_exit_head``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from earlyexit_kernels.backends.write_back import WriteBack, write_back
from earlyexit_kernels.methods.exit_rules import exit_step

__all__ = [
    "FusedExitHead",
    "masked_mean",
    "pooled_head_exit_step",
    "pooled_head_exit_step_write_back",
    "pooled_head_logits",
]

ACTIVATIONS = ("tanh", "gelu")


@dataclass(frozen=True, eq=False)
class FusedExitHead:
    """The weights of one internal exit head, as the fused step reads them (shapes in comments).

    The tensors are the head's own parameters, not copies (the C++ backend keeps its float32 and
    transposed copies per tensor and version); compared by identity.
    """

    pooling: str  # "cls" or "mean"
    dense_weight: torch.Tensor  # [M, H]
    dense_bias: torch.Tensor  # [M]
    activation: str  # "tanh" (the model's pooler) or "gelu" (an MLP head)
    out_weight: torch.Tensor  # [C, M]
    out_bias: torch.Tensor  # [C]
    norm_weight: torch.Tensor | None = None  # [H], the MLP head's LayerNorm
    norm_bias: torch.Tensor | None = None  # [H]
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        m, h = self.dense_weight.shape
        if self.norm_weight is not None and tuple(self.norm_weight.shape) != (h,):
            raise ValueError(
                f"norm_weight must be [{h}] (the first Linear's inputs), got {tuple(self.norm_weight.shape)}"
            )
        if self.out_weight.dim() != 2 or self.out_weight.shape[1] != m:
            raise ValueError(f"out_weight must be [C, {m}], got {tuple(self.out_weight.shape)}")
        if (self.norm_weight is None) != (self.norm_bias is None):
            raise ValueError("give both norm_weight and norm_bias, or neither")

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        weights = (self.dense_weight, self.dense_bias, self.out_weight, self.out_bias)
        return weights + ((self.norm_weight, self.norm_bias) if self.norm_weight is not None else ())


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of each row's valid token vectors: ``hidden`` [n, S, H], ``mask`` [n, S] or None -> [n, H].

    Padding is never read (a non-finite value there cannot leak in); a row with no valid token
    gives zeros. Half-precision inputs are summed in float32.
    """
    if mask is None:
        return hidden.mean(dim=1)
    valid = mask.unsqueeze(-1) != 0
    wide = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    total = torch.where(valid, hidden, hidden.new_zeros(())).sum(dim=1, dtype=wide)
    count = valid.sum(dim=1).clamp(min=1).to(wide)
    return (total / count).to(hidden.dtype)


def pooled_head_logits(hidden: torch.Tensor, mask: torch.Tensor | None, head: FusedExitHead) -> tuple:
    """``(logits [n, C], pooled [n, H])`` of ``head`` on ``hidden`` [n, S, H] (2-D ``mask`` [n, S] or None)."""
    pooled = masked_mean(hidden, mask) if head.pooling == "mean" else hidden[:, 0]
    x = pooled
    if head.norm_weight is not None:
        x = nn.functional.layer_norm(x, x.shape[-1:], head.norm_weight, head.norm_bias, head.norm_eps)
    x = nn.functional.linear(x, head.dense_weight, head.dense_bias)
    x = torch.tanh(x) if head.activation == "tanh" else nn.functional.gelu(x)
    return nn.functional.linear(x, head.out_weight, head.out_bias), pooled


def pooled_head_exit_step(policy, layer: int, num_layers: int, hidden, mask, head: FusedExitHead, state: dict):
    """The pooling, the head and the exit step of 1-based ``layer`` on ``hidden`` [n, S, H].

    ``mask``: the 2-D mask [n, S] (None: no padding). Returns ``(exits [n] bool, returned [n, C]
    float32, logits [n, C], state)``. For policies without a halting head.
    """
    logits, _ = pooled_head_logits(hidden, mask, head)
    exits, returned, state = exit_step(policy, layer, num_layers, logits, None, state)
    return exits, returned, logits, state


def pooled_head_exit_step_write_back(
    policy, layer: int, num_layers: int, hidden, mask, head: FusedExitHead, state: dict, target: WriteBack
):
    """:func:`pooled_head_exit_step` then :func:`~earlyexit_kernels.backends.write_back.write_back`.

    Returns ``(exits [n] bool, state, order [n] int64, stats [2] int64)``.
    """
    exits, returned, _, state = pooled_head_exit_step(policy, layer, num_layers, hidden, mask, head, state)
    order, stats = write_back(target, exits, returned, layer)
    return exits, state, order, stats
