"""Compaction gather in Triton: the surviving rows of the hidden states and mask, trimmed.

``compact(hidden, mask, index, seq_len)`` copies rows ``index`` of ``hidden`` [n, S, H]
(and of the 2-D ``mask`` [n, S]) into a new contiguous ``[m, min(seq_len, S), H]``
buffer, with the signature and results of
:func:`earlyexit_kernels.backends.compaction.compact`. One program copies a block of
``BLOCK_S`` positions of one output row, ``BLOCK_H`` contiguous features at a time:
row-contiguous, wide (vectorised) loads and stores, int64 offsets. The mask rows are
copied by the same programs. ``index`` may be any 1-D view (its stride is honoured).
Registered as ``earlyexit::compact``, the op that ``torch.compile`` and dispatch modes
see; eager calls launch directly (see :func:`._common.use_ops`), on the device of the
hidden states.

The indices are not bounds-checked on the device (like a CUDA gather); they must lie
in ``0..n-1``, which holds for the engine's survivor indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from earlyexit_kernels.backends.triton_kernels._common import (
    cdiv,
    device_guard,
    interpreting,
    new_empty,
    pow2_bucket,
    register_op,
    use_ops,
)

__all__ = ["compact"]

# Tests set this to run the GPU block sizes under the interpreter too.
FORCE_GPU_BLOCKS = False

# Integer arguments that change from call to call (the trimmed length, and the mask's row
# stride, the untrimmed length): never specialized, or each value that is or is not a
# multiple of 16 compiles another variant.
COMPACT_PER_CALL = ("seq_len", "s_blocks", "stride_mn")

# Looked up at each call, so that a benchmark can route eager calls through the op.
_use_ops = use_ops


@triton.jit(do_not_specialize=COMPACT_PER_CALL)
def _compact_kernel(
    src_ptr,
    stride_n,
    stride_s,
    stride_h,
    idx_ptr,
    stride_idx,
    dst_ptr,
    mask_ptr,
    stride_mn,
    stride_ms,
    mask_out_ptr,
    seq_len,
    H,
    s_blocks,
    HAS_MASK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid // s_blocks
    sb = pid % s_blocks
    src_row = tl.load(idx_ptr + r.to(tl.int64) * stride_idx).to(tl.int64)
    ss = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = ss < seq_len
    hs = tl.arange(0, BLOCK_H)
    src_base = src_ptr + src_row * stride_n + ss.to(tl.int64)[:, None] * stride_s
    dst_base = dst_ptr + (r.to(tl.int64) * seq_len + ss.to(tl.int64))[:, None] * H
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hs
        m = s_ok[:, None] & (h < H)[None, :]
        v = tl.load(src_base + h[None, :] * stride_h, mask=m)
        tl.store(dst_base + h[None, :], v, mask=m)
    if HAS_MASK:
        mv = tl.load(mask_ptr + src_row * stride_mn + ss * stride_ms, mask=s_ok)
        tl.store(mask_out_ptr + r.to(tl.int64) * seq_len + ss, mv, mask=s_ok)


def _blocks(seq_len, hidden) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_H, num_warps); the sizes may be SymInts (traced with dynamic shapes)."""
    block_h = pow2_bucket(hidden, 1, 1024)
    if interpreting() and not FORCE_GPU_BLOCKS:
        return pow2_bucket(seq_len, 1, 64), block_h, 1
    # About 4096 elements per program: 8 positions x 512 features, wide contiguous rows. Not
    # from seq_len: one variant per hidden size, whatever the trimming does to the length.
    block_s = 4096 // block_h
    # 1024-wide rows on 4 warps left a 24-byte stack frame on sm_90 with an int64 row stride
    # (make triton-check); on 8 warps: 48 registers, no stack, on sm_80 and sm_90.
    return block_s, block_h, 8 if block_h >= 1024 else 4


def _run_compact(wrap, hidden, mask, index, seq_len: int, placeholders: bool):
    """Allocate and launch the gather (``wrap``: ``wrap_triton`` in the op, the identity otherwise)."""
    m = index.shape[0]
    _, full_len, hidden_size = hidden.shape
    length = min(seq_len, full_len)
    out = new_empty((m, length, hidden_size), hidden.dtype, hidden.device)
    if mask is not None:
        mask_out = new_empty((m, length), mask.dtype, mask.device)
    else:
        mask_out = new_empty((0, length), torch.bool, hidden.device) if placeholders else None
    if m == 0 or length == 0 or hidden_size == 0:
        return out, mask_out
    block_s, block_h, warps = _blocks(length, hidden_size)
    s_blocks = cdiv(length, block_s)
    has_mask = mask is not None
    with device_guard(hidden):
        wrap(_compact_kernel)[(m * s_blocks,)](
            hidden,
            hidden.stride(0),
            hidden.stride(1),
            hidden.stride(2),
            index,
            index.stride(0),
            out,
            mask if has_mask else out,
            mask.stride(0) if has_mask else 0,
            mask.stride(1) if has_mask else 0,
            mask_out if has_mask else out,
            length,
            hidden_size,
            s_blocks,
            HAS_MASK=has_mask,
            BLOCK_S=block_s,
            BLOCK_H=block_h,
            num_warps=warps,
        )
    return out, mask_out


@register_op("earlyexit::compact", mutates_args=())
def compact_op(
    hidden: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [m, L, H], mask [m, L] or [0, L])`` with ``L = min(seq_len, S)``."""
    return _run_compact(wrap_triton, hidden, mask, index, seq_len, True)


@compact_op.register_fake
def _compact_fake(hidden, mask, index, seq_len):
    m = index.shape[0]
    length = min(seq_len, hidden.shape[1])
    out = hidden.new_empty((m, length, hidden.shape[2]))
    mask_out = mask.new_empty((m, length)) if mask is not None else hidden.new_empty((0, length), dtype=torch.bool)
    return out, mask_out


def compact(
    hidden: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of :func:`earlyexit_kernels.backends.compaction.compact` (same arguments and results)."""
    if hidden.dim() != 3:
        raise ValueError(f"compact: hidden must be [n, S, H], got shape {tuple(hidden.shape)}")
    if mask is not None and (mask.dim() != 2 or mask.shape[0] != hidden.shape[0]):
        raise ValueError(f"compact: mask must be [n, S] matching hidden, got shape {tuple(mask.shape)}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"compact: index must be int32 or int64, got {index.dtype}")
    if index.dim() != 1 or index.device != hidden.device or (mask is not None and mask.device != hidden.device):
        raise ValueError("compact: index must be 1-D, and index and mask on the hidden states' device")
    if _use_ops():
        out, mask_out = torch.ops.earlyexit.compact(hidden, mask, index, seq_len)
        return out, (mask_out if mask is not None else None)
    return _run_compact(_direct, hidden, mask, index, seq_len, False)


def _direct(kernel):
    return kernel
