"""Settling one layer's exits: outputs to the original positions, survivors in order.

After a layer's exit step the engine must (1) write each exiting row's logits, exit
layer and layers run at the row's original position in the batch and (2) learn which
rows stay, in stable order, with how many there are and how long the longest of them
is (for trimming padding). Here is the plain-PyTorch reference; the fast backends do
the same inside their exit-step kernel (``exit_step_write_back`` and
``head_exit_step_write_back`` on :class:`earlyexit_kernels.backends.registry.Backend`),
so a layer costs one launch plus one read of ``stats``. Nothing here syncs with the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from earlyexit_kernels.methods.exit_rules import State, exit_step, head_exit_step
from earlyexit_kernels.methods.policies import ExitPolicy

__all__ = ["WriteBack", "write_back", "exit_step_write_back", "head_exit_step_write_back"]


class WriteBack(NamedTuple):
    """The active rows' bookkeeping and the batch's output buffers (written in place).

    ``rows`` [n] int64: original position of each active row. ``runs`` [n] int64: layers
    each active row has run. ``extents`` [n] int64 or None: one past each row's last
    attended position (None without padding). ``logits`` [B, C], ``exit_layer`` [B] int64
    and ``layers_run`` [B] int64: the outputs at the original positions.
    """

    rows: torch.Tensor
    runs: torch.Tensor
    extents: torch.Tensor | None
    logits: torch.Tensor
    exit_layer: torch.Tensor
    layers_run: torch.Tensor


def write_back(
    target: WriteBack, exits: torch.Tensor, returned: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the rows with ``exits`` [n] bool to ``target``; return ``(order, stats)``.

    ``returned`` [n, C]: the logits the exiting rows report. ``order`` [n] int64, a
    permutation of the rows: ``order[:count]`` are the staying rows in increasing order
    (the engine gathers the rows' bookkeeping by all of it before it reads ``count``). ``stats`` [2] int64: ``(count, longest)``, ``longest`` being the largest
    extent of a staying row (0 when ``extents`` is None or nobody stays).
    """
    dst = target.rows
    current = target.logits.index_select(0, dst)
    target.logits.index_copy_(0, dst, torch.where(exits[:, None], returned.to(current.dtype), current))
    current_exit = target.exit_layer.index_select(0, dst)
    target.exit_layer.index_copy_(0, dst, torch.where(exits, torch.full_like(current_exit, layer), current_exit))
    current_runs = target.layers_run.index_select(0, dst)
    target.layers_run.index_copy_(0, dst, torch.where(exits, target.runs, current_runs))

    keep = ~exits
    order = torch.argsort(exits.to(torch.int8), stable=True)
    longest = torch.zeros((), dtype=torch.long, device=exits.device)
    if target.extents is not None and exits.numel() > 0:
        longest = torch.where(keep, target.extents, torch.zeros_like(target.extents)).max()
    return order, torch.stack([keep.sum(), longest])


def exit_step_write_back(
    policy: ExitPolicy,
    layer: int,
    num_layers: int,
    logits: torch.Tensor,
    halting_logit: torch.Tensor | None,
    state: State,
    target: WriteBack,
) -> tuple[torch.Tensor, State, torch.Tensor, torch.Tensor]:
    """:func:`earlyexit_kernels.methods.exit_rules.exit_step` then :func:`write_back`.

    Returns ``(exits [n] bool, state, order [n] int64, stats [2] int64)``.
    """
    exits, returned, state = exit_step(policy, layer, num_layers, logits, halting_logit, state)
    order, stats = write_back(target, exits, returned, layer)
    return exits, state, order, stats


def head_exit_step_write_back(
    policy: ExitPolicy,
    layer: int,
    num_layers: int,
    cls_hidden: torch.Tensor,
    pooler_weight: torch.Tensor,
    pooler_bias: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    state: State,
    halting_fn,
    target: WriteBack,
) -> tuple[torch.Tensor, State, torch.Tensor, torch.Tensor]:
    """:func:`earlyexit_kernels.methods.exit_rules.head_exit_step` then :func:`write_back`.

    Returns ``(exits [n] bool, state, order [n] int64, stats [2] int64)``.
    """
    exits, returned, _, _, state = head_exit_step(
        policy, layer, num_layers, cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias, state, halting_fn
    )
    order, stats = write_back(target, exits, returned, layer)
    return exits, state, order, stats
