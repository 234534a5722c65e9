"""The graphed step's bookkeeping after a layer where rows may leave: one gather by the survivor order.

After the exit kernel has written the exiting rows' outputs and given the survivor order
(``order`` [n], a permutation: the rows that stay first, in order), the graphed step
(:mod:`earlyexit_kernels.engine.graphed.static_step`) puts every per-row tensor of its bucket in that
order in the other half of its double buffer, marks the rows that left dead and counts the live
ones. Written as PyTorch ops that is a masked fill, an index_select and a compare-and-sum for the
rows and one index_select per tensor (the hidden states, the mask, each state tensor): 7 to 10
launches an exit layer on a GPU. The C++ and CUDA backends do it in one op,
``earlyexit::cpp_gather_survivors`` (``csrc/cpu/gather_survivors_cpu.cpp``,
``csrc/cuda/gather_survivors.cu``); :func:`gather_survivors` here is its reference, and the
tests hold the op to it bit for bit.
"""

from __future__ import annotations

import torch

__all__ = ["gather_survivors", "check_lists", "MAX_TENSORS"]

# The most tensors one call moves (csrc/ops.h kMaxSurvivorCopies): the CUDA kernel takes their
# row copies as one launch parameter.
MAX_TENSORS = 12


def check_lists(sources: list, targets: list) -> None:
    """A source for every target, at most :data:`MAX_TENSORS` (what every backend's gather refuses alike)."""
    if len(sources) != len(targets):
        raise ValueError(f"gather_survivors: {len(sources)} sources but {len(targets)} targets")
    if len(sources) > MAX_TENSORS:
        raise ValueError(f"gather_survivors: at most {MAX_TENSORS} tensors a call, got {len(sources)}")


def gather_survivors(
    order: torch.Tensor,
    exits: torch.Tensor,
    rows: torch.Tensor,
    dead: int,
    next_rows: torch.Tensor,
    count: torch.Tensor,
    sources: list[torch.Tensor],
    targets: list[torch.Tensor],
    host_count: torch.Tensor | None = None,
) -> None:
    """Write ``next_rows[i] = dead if exits[order[i]] else rows[order[i]]``, ``count`` (one int64) =
    how many of ``next_rows`` are not ``dead`` (and ``host_count`` too where given), and row ``i``
    of each ``targets[t]`` = row ``order[i]`` of ``sources[t]``.

    Shapes: ``order``, ``exits`` (bool), ``rows`` and ``next_rows`` (int64) [n]; each source and
    its target the same shape and dtype, ``n`` rows first. A target never overlaps a source."""
    check_lists(sources, targets)
    torch.index_select(rows.masked_fill(exits, dead), 0, order, out=next_rows)
    torch.sum(next_rows != dead, dim=0, keepdim=True, out=count.view(1))
    if host_count is not None:
        host_count.copy_(count.view(host_count.shape), non_blocking=True)
    for source, target in zip(sources, targets):
        torch.index_select(source, 0, order, out=target)
