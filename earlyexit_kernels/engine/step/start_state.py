"""The per-row state every step and engine starts a row with: the policy's (:func:`~earlyexit_kernels.methods.exit_rules.init_state`)
and the heads' own (:func:`head_state`), made here once for the exact loop, the graphed step's buffers and shapes,
and the stream engines' templates.
"""

from __future__ import annotations

import torch

from earlyexit_kernels.methods.exit_rules import init_state
from earlyexit_kernels.methods.policies import ExitPolicy

__all__ = ["BELOW", "head_state", "start_state"]

#: the state key of the logits of the last head each row ran, for heads that read the head below
BELOW = "below_logits"


def head_state(adapter, batch: int, num_labels: int, device: torch.device) -> dict:
    """The per-row state the heads themselves carry from layer to layer, beside the policy's:
    ``{BELOW: zeros [batch, C] float32}`` where each head reads the logits of the head below
    (``"cascade"``; zeros read as "no head below" at layer 1), else nothing."""
    if not getattr(adapter, "heads_read_below", False):
        return {}
    return {BELOW: torch.zeros(batch, num_labels, dtype=torch.float32, device=device)}


def start_state(policy: ExitPolicy, adapter, rows: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The state ``rows`` rows start layer 1 with: ``policy``'s for ``adapter``'s labels, hidden size and layers
    (pooled vectors in ``dtype``), and the heads' own, on ``device`` (the meta device: shapes and dtypes only)."""
    labels = adapter.num_labels
    state = init_state(policy, rows, labels, adapter.hidden_size, adapter.num_layers, device, pooled_dtype=dtype)
    state.update(head_state(adapter, rows, labels, device))
    return state
