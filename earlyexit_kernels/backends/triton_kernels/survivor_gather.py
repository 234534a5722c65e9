"""The graphed step's bookkeeping after an exit layer in one Triton kernel: ``earlyexit::gather_survivors``.

The Triton twin of ``csrc/cuda/gather_survivors.cu`` (the reference, and what it does:
:mod:`earlyexit_kernels.backends.survivor_gather`). Program ``(i, c)`` moves the ``c``-th block of
output row ``i`` of every tensor from source row ``order[i]``; programs ``(i, 0)`` write
``next_rows[i]``; program ``(0, 0)`` also counts the live rows. The tensors may differ in dtype and
shape: each is moved as raw words, 4 bytes wide where every row, row stride and address allows it,
else bytes. Where a pinned host count is given it is copied after the kernel (a Triton kernel takes
device pointers only), one more launch than the CUDA kernel, which writes the mapped memory itself.

Unlike the CUDA kernel, ``order`` is not bounds-checked on the device: it is the exit kernel's
survivor permutation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from earlyexit_kernels.backends.survivor_gather import check_lists
from earlyexit_kernels.backends.triton_kernels._common import (
    cdiv,
    device_guard,
    interpreting,
    next_pow2,
    register_op,
    use_ops,
)

__all__ = ["gather_survivors", "SLOTS"]

# Tensors one launch moves: the kernel takes a fixed list of (source, target) slots. A call with
# more than this launches again for the rest (the engine moves at most 2 + a policy's 3 states).
SLOTS = 6
BLOCK = 1024  # words of a row one program moves
PER_CALL = ("n", "dead", *(f"{k}{i}" for i in range(SLOTS) for k in ("ss", "ds", "w")))


@triton.jit
def _copy_share(src, dst, src_stride, dst_stride, words, i, j, c, BLOCK: tl.constexpr):
    k = c * BLOCK + tl.arange(0, BLOCK)
    ok = k < words
    v = tl.load(src + j * src_stride + k, mask=ok)
    tl.store(dst + i * dst_stride + k, v, mask=ok)


@triton.jit(do_not_specialize=PER_CALL)
def _gather_kernel(
    order_ptr,
    exits_ptr,
    rows_ptr,
    next_rows_ptr,
    count_ptr,
    n,
    dead,
    s0,
    d0,
    ss0,
    ds0,
    w0,
    s1,
    d1,
    ss1,
    ds1,
    w1,
    s2,
    d2,
    ss2,
    ds2,
    w2,
    s3,
    d3,
    ss3,
    ds3,
    w3,
    s4,
    d4,
    ss4,
    ds4,
    w4,
    s5,
    d5,
    ss5,
    ds5,
    w5,
    NUM: tl.constexpr,
    WRITE_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    j = tl.load(order_ptr + i).to(tl.int64)
    if WRITE_ROWS:
        if c == 0:
            row = tl.load(rows_ptr + j)
            gone = tl.load(exits_ptr + j).to(tl.int1)
            tl.store(next_rows_ptr + i, tl.where(gone, dead, row))
            if i == 0:  # the live rows: those that stay and were not dead (order is a permutation)
                live = tl.zeros((BLOCK_N,), dtype=tl.int64)
                for start in range(0, n, BLOCK_N):
                    r = start + tl.arange(0, BLOCK_N)
                    ok = r < n
                    stays = tl.load(exits_ptr + r, mask=ok, other=1).to(tl.int1) == 0
                    alive = tl.load(rows_ptr + r, mask=ok, other=dead) != dead
                    live += (stays & alive & ok).to(tl.int64)
                tl.store(count_ptr, tl.sum(live, axis=0))
    if NUM > 0:
        _copy_share(s0, d0, ss0, ds0, w0, i, j, c, BLOCK)
    if NUM > 1:
        _copy_share(s1, d1, ss1, ds1, w1, i, j, c, BLOCK)
    if NUM > 2:
        _copy_share(s2, d2, ss2, ds2, w2, i, j, c, BLOCK)
    if NUM > 3:
        _copy_share(s3, d3, ss3, ds3, w3, i, j, c, BLOCK)
    if NUM > 4:
        _copy_share(s4, d4, ss4, ds4, w4, i, j, c, BLOCK)
    if NUM > 5:
        _copy_share(s5, d5, ss5, ds5, w5, i, j, c, BLOCK)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with at least one dimension past the rows (a 1-D state's row is one element, at any stride)."""
    return tensor.unsqueeze(-1) if tensor.dim() == 1 else tensor


def _row_bytes(tensor: torch.Tensor) -> int:
    n = tensor.shape[0]
    return (tensor.numel() // n if n else 0) * tensor.element_size()


def _as_words(tensor: torch.Tensor, word: torch.dtype) -> tuple[torch.Tensor, int, int]:
    """``(words view, row stride in words, words a row)`` of a tensor whose rows are contiguous."""
    rows = _rows(tensor)
    raw = rows.view(torch.uint8) if rows.dtype != torch.uint8 else rows
    if word != torch.uint8:
        raw = raw.view(word)
    per = word.itemsize
    return raw, tensor.stride(0) * tensor.element_size() // per, _row_bytes(tensor) // per


def _word_for(tensors) -> torch.dtype:
    """int32 where every row, row stride and address is a multiple of 4 bytes, else uint8."""
    for t in tensors:
        if _row_bytes(t) % 4 or (t.stride(0) * t.element_size()) % 4 or t.data_ptr() % 4:
            return torch.uint8
    return torch.int32


def _launch(wrap, order, exits, rows, dead, next_rows, count, sources, targets) -> None:
    n = order.shape[0]
    if n == 0:
        count.zero_()
        return
    chunks = [(sources[k : k + SLOTS], targets[k : k + SLOTS]) for k in range(0, max(len(sources), 1), SLOTS)]
    with device_guard(order):
        for index, (srcs, dsts) in enumerate(chunks):
            word = _word_for([*srcs, *dsts])
            slots, widest = [], 1
            for src, dst in zip(srcs, dsts):
                s, ss, words = _as_words(src, word)
                d, ds, _ = _as_words(dst, word)
                slots += [s, d, ss, ds, words]
                widest = max(widest, words)
            filler = [order, order, 0, 0, 0]
            slots += filler * (SLOTS - len(srcs))
            grid = (n, cdiv(widest, BLOCK))
            wrap(_gather_kernel)[grid](
                order,
                exits,
                rows,
                next_rows,
                count,
                n,
                dead,
                *slots,
                NUM=len(srcs),
                WRITE_ROWS=index == 0,
                BLOCK=BLOCK,
                BLOCK_N=min(next_pow2(n), 1024) if not interpreting() else next_pow2(n),
                num_warps=4,
            )


@register_op("earlyexit::gather_survivors", mutates_args=("next_rows", "count", "targets"))
def gather_survivors_op(
    order: torch.Tensor,
    exits: torch.Tensor,
    rows: torch.Tensor,
    dead: int,
    next_rows: torch.Tensor,
    count: torch.Tensor,
    sources: list[torch.Tensor],
    targets: list[torch.Tensor],
) -> None:
    _launch(wrap_triton, order, exits, rows, dead, next_rows, count, sources, targets)


@gather_survivors_op.register_fake
def _gather_fake(order, exits, rows, dead, next_rows, count, sources, targets):
    return None


def _check(order, exits, rows, next_rows, count, sources, targets) -> None:
    n = order.shape[0] if order.dim() == 1 else -1
    for name, t, dtype in (("order", order, torch.int64), ("rows", rows, torch.int64), ("exits", exits, torch.bool)):
        if t.dim() != 1 or t.shape[0] != n or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(
                f"gather_survivors: {name} must be a contiguous [{n}] {dtype} tensor, got {tuple(t.shape)}"
            )
    if next_rows.shape != (n,) or next_rows.dtype != torch.int64 or not next_rows.is_contiguous():
        raise ValueError(f"gather_survivors: next_rows must be a contiguous [{n}] int64 tensor")
    if count.numel() != 1 or count.dtype != torch.int64:
        raise ValueError("gather_survivors: count must be one int64")
    check_lists(sources, targets)
    for k, (src, dst) in enumerate(zip(sources, targets)):
        if src.shape != dst.shape or src.dim() < 1 or src.shape[0] != n:
            raise ValueError(
                f"gather_survivors: tensor {k}: source {tuple(src.shape)} and target {tuple(dst.shape)} must have "
                f"the same shape, {n} rows first"
            )
        if src.dtype != dst.dtype:
            raise ValueError(f"gather_survivors: tensor {k}: source {src.dtype} and target {dst.dtype} must match")
        for t in (src, dst):
            if not t[:1].is_contiguous():
                raise ValueError(
                    f"gather_survivors: tensor {k}: each row must be contiguous (only the row stride may differ)"
                )


def gather_survivors(order, exits, rows, dead, next_rows, count, sources, targets, host_count=None) -> None:
    """:func:`earlyexit_kernels.backends.survivor_gather.gather_survivors` in one Triton kernel (and,
    with ``host_count``, one copy of the count to it)."""
    _check(order, exits, rows, next_rows, count, sources, targets)
    count_view = count.view(1)
    if use_ops():
        torch.ops.earlyexit.gather_survivors(order, exits, rows, int(dead), next_rows, count_view, sources, targets)
    else:
        _launch(_direct, order, exits, rows, int(dead), next_rows, count_view, list(sources), list(targets))
    if host_count is not None:
        host_count.copy_(count_view.view(host_count.shape), non_blocking=True)


def _direct(kernel):
    return kernel
